//! Little-endian fixed-width fields: the one reader and writer behind the plan files, the
//! self-test jobs and (through the host crate) the model files.
//!
//! [`Reader`] returns `None` when the bytes run out, so a caller turns a short input into its
//! own error without panicking; [`Writer`] fills a caller-supplied buffer and reports a write
//! past its end the same way. Neither allocates.

/// Sequential little-endian reads.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(len)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    /// The next `N` bytes.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Some(out)
    }

    /// Skip `len` bytes.
    pub fn skip(&mut self, len: usize) -> Option<()> {
        self.take(len).map(|_| ())
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    /// A `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    /// A `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    /// An `i32`.
    pub fn i32(&mut self) -> Option<i32> {
        self.array().map(i32::from_le_bytes)
    }

    /// An `f32`, by bit pattern.
    pub fn f32(&mut self) -> Option<f32> {
        self.array().map(f32::from_le_bytes)
    }
}

/// Sequential little-endian writes into a caller-supplied buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `out`.
    pub fn new(out: &'a mut [u8]) -> Self {
        Writer {
            out,
            at: 0,
            overflow: false,
        }
    }

    /// Bytes written so far (`None` when a write did not fit).
    pub fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.at)
    }

    /// Raw bytes.
    pub fn bytes(&mut self, value: &[u8]) {
        match self.out.get_mut(self.at..self.at + value.len()) {
            Some(dst) => dst.copy_from_slice(value),
            None => self.overflow = true,
        }
        self.at += value.len();
    }

    /// `len` zero bytes.
    pub fn zeros(&mut self, len: usize) {
        for _ in 0..len {
            self.bytes(&[0]);
        }
    }

    /// A `u8`.
    pub fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }

    /// A `u16`.
    pub fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }

    /// A `u32`.
    pub fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }

    /// An `i32`.
    pub fn i32(&mut self, value: i32) {
        self.bytes(&value.to_le_bytes());
    }

    /// An `f32`, by bit pattern.
    pub fn f32(&mut self, value: f32) {
        self.bytes(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_short_input_is_none() {
        let mut buf = [0u8; 15];
        let mut w = Writer::new(&mut buf);
        w.u8(7);
        w.u16(0xBEEF);
        w.u32(0xDEAD_BEEF);
        w.i32(-5);
        w.f32(1.5);
        assert_eq!(w.finish(), Some(15));
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8(), Some(7));
        assert_eq!(r.u16(), Some(0xBEEF));
        assert_eq!(r.u32(), Some(0xDEAD_BEEF));
        assert_eq!(r.i32(), Some(-5));
        assert_eq!((r.position(), r.remaining()), (11, 4));
        assert_eq!(r.take(5), None, "a failed read consumes nothing");
        assert_eq!(r.f32(), Some(1.5));
        assert_eq!(r.u8(), None);
        let mut short = [0u8; 3];
        let mut w = Writer::new(&mut short);
        w.u32(1);
        assert_eq!(w.finish(), None);
    }
}
