//! Typed views of arena and flash bytes, and disjoint mutable borrows of several arena regions.
//!
//! Every view checks length and alignment and returns `None` instead of panicking. The casts
//! are the only `unsafe` code of the plan executor; each states why it is sound.

use crate::update::GradStats;
use core::mem::{align_of, offset_of, size_of, size_of_val};

/// A byte range `[start, start + len)` of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// First byte.
    pub start: usize,
    /// Length in bytes (0: nothing is borrowed).
    pub len: usize,
}

impl Span {
    /// No bytes.
    pub const EMPTY: Span = Span { start: 0, len: 0 };
}

/// `i8` codes stored in bytes.
pub(crate) fn codes(bytes: &[u8]) -> &[i8] {
    // SAFETY: `i8` and `u8` have the same size and alignment and every bit pattern is valid
    // for both; the new slice covers exactly the borrowed bytes with the same lifetime.
    unsafe { core::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), bytes.len()) }
}

/// Mutable `i8` codes stored in bytes.
pub(crate) fn codes_mut(bytes: &mut [u8]) -> &mut [i8] {
    // SAFETY: as in `codes`; the exclusive borrow of `bytes` moves to the returned slice.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<i8>(), bytes.len()) }
}

/// Plain values (every bit pattern valid, no padding) that arenas and flash hold in place:
/// `f32` gradients, activations and float parameters, `i32` biases, `u16` channel lists,
/// `u32` channel bits, `i8` input codes.
pub(crate) trait Word: Copy + sealed::Sealed {}
impl Word for f32 {}
impl Word for i32 {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for i8 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for i8 {}
}

fn fits<T>(bytes: &[u8]) -> bool {
    bytes.len().is_multiple_of(size_of::<T>())
        && (bytes.as_ptr() as usize).is_multiple_of(align_of::<T>())
}

/// `bytes` as plain values (`None` when misaligned or of a partial length).
pub(crate) fn words<T: Word>(bytes: &[u8]) -> Option<&[T]> {
    if bytes.is_empty() {
        // An empty borrow may have a dangling, unaligned pointer.
        return Some(&[]);
    }
    if !fits::<T>(bytes) {
        return None;
    }
    // SAFETY: `T` is `f32`, `i32`, `u16` or `u32` (sealed `Word`): no padding, every bit pattern
    // valid. The pointer is aligned for `T` and the length is a whole number of values (checked
    // above); the slice borrows `bytes` for its lifetime.
    Some(unsafe {
        core::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size_of::<T>())
    })
}

/// The bytes of plain values, in the target's (little-endian) layout.
pub(crate) fn bytes_of<T: Word>(values: &[T]) -> &[u8] {
    // SAFETY: `T` is a sealed `Word`: no padding, so every byte of the slice is initialized;
    // `u8` has alignment 1, and the new slice covers exactly `size_of_val(values)` bytes of the
    // same borrow for the same lifetime.
    unsafe { core::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// Mutable plain values (`None` when misaligned or of a partial length).
pub(crate) fn words_mut<T: Word>(bytes: &mut [u8]) -> Option<&mut [T]> {
    if bytes.is_empty() {
        return Some(&mut []);
    }
    if !fits::<T>(bytes) {
        return None;
    }
    let len = bytes.len() / size_of::<T>();
    // SAFETY: as in `words`; every value written through the slice is a valid `T` and thus
    // leaves initialized bytes; the exclusive borrow of `bytes` moves to the returned slice.
    Some(unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), len) })
}

/// Byte offsets of the fields of a [`GradStats`] (its Rust layout, fixed per target).
const STATS_FIELDS: [(usize, usize); 3] = [
    (offset_of!(GradStats, mean), 4),
    (offset_of!(GradStats, var), 4),
    (offset_of!(GradStats, initialized), 1),
];

/// Gradient statistics stored in place: `size_of::<GradStats>()` bytes each, in the target's
/// layout of the struct, padding bytes zero. `None` when misaligned, of a partial length, or
/// when an `initialized` byte is not 0 or 1 (a corrupt arena).
///
/// After the statistics were written, call [`zero_grad_stats_padding`]: a typed write may
/// leave the padding bytes uninitialized, and the arena is read as plain bytes elsewhere.
pub(crate) fn grad_stats_mut(bytes: &mut [u8]) -> Option<&mut [GradStats]> {
    if !fits::<GradStats>(bytes) {
        return None;
    }
    let flag = offset_of!(GradStats, initialized);
    if bytes
        .chunks_exact(size_of::<GradStats>())
        .any(|entry| entry[flag] > 1)
    {
        return None;
    }
    let len = bytes.len() / size_of::<GradStats>();
    // SAFETY: the pointer is aligned for `GradStats` and the length is a whole number of
    // entries (checked by `fits`). Each entry is a valid value: its `f32` fields accept any
    // initialized bytes and its `bool` byte is 0 or 1 (checked above); padding bytes need no
    // particular value. The exclusive borrow of `bytes` moves to the returned slice.
    Some(unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<GradStats>(), len) })
}

/// Set every padding byte of in-place [`GradStats`] to 0 (see [`grad_stats_mut`]).
pub(crate) fn zero_grad_stats_padding(bytes: &mut [u8]) {
    for entry in bytes.chunks_exact_mut(size_of::<GradStats>()) {
        for (at, byte) in entry.iter_mut().enumerate() {
            let in_field = STATS_FIELDS
                .iter()
                .any(|&(start, len)| (start..start + len).contains(&at));
            if !in_field {
                *byte = 0;
            }
        }
    }
}

/// Exclusive borrows of `N` regions of `bytes` at once (an empty span gives an empty slice).
/// `None` when a region is out of bounds or two non-empty regions overlap.
pub(crate) fn split_disjoint<const N: usize>(
    bytes: &mut [u8],
    spans: [Span; N],
) -> Option<[&mut [u8]; N]> {
    let mut order: [usize; N] = core::array::from_fn(|i| i);
    order.sort_unstable_by_key(|&i| spans[i].start);
    let mut out: [&mut [u8]; N] = core::array::from_fn(|_| Default::default());
    let mut rest = bytes;
    let mut consumed = 0usize;
    for i in order {
        let span = spans[i];
        if span.len == 0 {
            continue;
        }
        let gap = span.start.checked_sub(consumed)?;
        let (_, tail) = core::mem::take(&mut rest).split_at_mut_checked(gap)?;
        let (region, tail) = tail.split_at_mut_checked(span.len)?;
        out[i] = region;
        rest = tail;
        consumed = span.start + span.len;
    }
    Some(out)
}

/// Little-endian `u32` at `at` (`None` out of bounds).
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Write a little-endian `u32` at `at` (`None` out of bounds).
pub(crate) fn write_u32(bytes: &mut [u8], at: usize, value: u32) -> Option<()> {
    bytes
        .get_mut(at..at.checked_add(4)?)?
        .copy_from_slice(&value.to_le_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(4))]
    struct Aligned([u8; 32]);

    #[test]
    fn disjoint_regions_in_any_order() {
        let mut buf = [0u8; 16];
        let spans = [
            Span { start: 8, len: 4 },
            Span::EMPTY,
            Span { start: 0, len: 8 },
        ];
        let [a, b, c] = split_disjoint(&mut buf, spans).expect("disjoint");
        assert_eq!((a.len(), b.len(), c.len()), (4, 0, 8));
        a.fill(1);
        c.fill(2);
        assert_eq!(buf[..12], [2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1]);
        let overlap = [Span { start: 0, len: 8 }, Span { start: 4, len: 8 }];
        assert!(split_disjoint(&mut buf, overlap).is_none());
        let outside = [Span { start: 12, len: 8 }];
        assert!(split_disjoint(&mut buf, outside).is_none());
    }

    #[test]
    fn word_views_check_alignment_and_length() {
        let mut buf = Aligned([0u8; 32]);
        buf.0[4..8].copy_from_slice(&7i32.to_le_bytes());
        assert_eq!(words::<i32>(&buf.0[..8]), Some(&[0, 7][..]));
        assert!(words::<i32>(&buf.0[1..5]).is_none());
        assert!(words::<f32>(&buf.0[..6]).is_none());
        words_mut::<f32>(&mut buf.0[8..12]).unwrap()[0] = 1.5;
        assert_eq!(
            f32::from_le_bytes([buf.0[8], buf.0[9], buf.0[10], buf.0[11]]),
            1.5
        );
        assert_eq!(codes(&[255u8, 1]), &[-1i8, 1]);
        assert_eq!(bytes_of(&[-1i8, 1]), &[255u8, 1]);
        assert_eq!(bytes_of(&[1.5f32]), &1.5f32.to_le_bytes());
    }

    #[test]
    fn grad_stats_in_place_reject_bad_flags_and_clear_padding() {
        let size = size_of::<GradStats>();
        let mut buf = Aligned([0u8; 32]);
        let bytes = &mut buf.0[..2 * size];
        {
            let stats = grad_stats_mut(bytes).expect("zeroed stats are valid");
            assert_eq!(stats[1], GradStats::new());
            stats[0].observe(&[1.0, 3.0], 0.5);
        }
        zero_grad_stats_padding(bytes);
        let stats = grad_stats_mut(bytes).unwrap();
        assert_eq!((stats[0].mean, stats[0].initialized), (2.0, true));
        bytes[offset_of!(GradStats, initialized)] = 2;
        assert!(grad_stats_mut(bytes).is_none());
    }
}
