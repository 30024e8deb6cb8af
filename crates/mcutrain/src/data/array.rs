//! Element decoding and size checks shared by the IDX and NPY readers.

use super::{DataError, Samples};

/// Element type of a data array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ValueType {
    /// Unsigned byte, scaled by `1 / 255` into `[0, 1]`.
    U8,
    /// Little-endian IEEE float32, taken as is.
    F32,
}

impl ValueType {
    fn size(self) -> usize {
        match self {
            ValueType::U8 => 1,
            ValueType::F32 => 4,
        }
    }
}

/// Element type of a label array (integers, little-endian where wider than a byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LabelType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
}

impl LabelType {
    fn size(self) -> usize {
        match self {
            LabelType::U8 | LabelType::I8 => 1,
            LabelType::I16 | LabelType::U16 => 2,
            LabelType::I32 | LabelType::U32 => 4,
            LabelType::I64 | LabelType::U64 => 8,
        }
    }

    /// The element at the start of `bytes` (exactly `size()` bytes), widened.
    fn decode(self, bytes: &[u8]) -> i128 {
        let mut le = [0u8; 8];
        le[..bytes.len()].copy_from_slice(bytes);
        match self {
            LabelType::U8 => bytes[0] as i128,
            LabelType::I8 => bytes[0] as i8 as i128,
            LabelType::I16 => i16::from_le_bytes([le[0], le[1]]) as i128,
            LabelType::U16 => u16::from_le_bytes([le[0], le[1]]) as i128,
            LabelType::I32 => i32::from_le_bytes([le[0], le[1], le[2], le[3]]) as i128,
            LabelType::U32 => u32::from_le_bytes([le[0], le[1], le[2], le[3]]) as i128,
            LabelType::I64 => i64::from_le_bytes(le) as i128,
            LabelType::U64 => u64::from_le_bytes(le) as i128,
        }
    }
}

/// Product of `dims`, or `None` on overflow.
fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Checks that `data` holds exactly `product(shape) * item_size` bytes.
fn check_size(file: &str, shape: &[usize], item_size: usize, data: &[u8]) -> Result<(), DataError> {
    let expected = element_count(shape)
        .and_then(|n| n.checked_mul(item_size))
        .ok_or_else(|| DataError::BadShape {
            file: file.to_owned(),
            shape: shape.to_vec(),
            expected: "dimensions whose product fits in memory",
        })?;
    if expected != data.len() {
        return Err(DataError::SizeMismatch {
            file: file.to_owned(),
            expected: expected as u64,
            actual: data.len() as u64,
        });
    }
    Ok(())
}

/// Samples of shape `[channels, height, width]` from an array of `shape` (whose first dimension
/// is the sample count) with element data `data`.
///
/// Checks, in order: a sample count above zero, non-zero sample dimensions, and the data size.
pub(crate) fn samples(
    file: &str,
    shape: &[usize],
    [channels, height, width]: [usize; 3],
    value_type: ValueType,
    data: &[u8],
) -> Result<Samples, DataError> {
    if shape.first().is_none_or(|&n| n == 0) {
        return Err(DataError::Empty {
            file: file.to_owned(),
        });
    }
    if channels == 0 || height == 0 || width == 0 {
        return Err(DataError::BadShape {
            file: file.to_owned(),
            shape: shape.to_vec(),
            expected: "non-zero sample dimensions",
        });
    }
    check_size(file, shape, value_type.size(), data)?;
    let values = match value_type {
        ValueType::U8 => data.iter().map(|&b| b as f32 / 255.0).collect(),
        ValueType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    };
    Ok(Samples {
        channels,
        height,
        width,
        values,
    })
}

/// Labels from a 1-D array `[N]` (or a column `[N, 1]`) of integers.
///
/// Every value must be in `0..=65535`.
pub(crate) fn labels(
    file: &str,
    shape: &[usize],
    label_type: LabelType,
    data: &[u8],
) -> Result<Vec<u16>, DataError> {
    if !matches!(shape, [_] | [_, 1]) {
        return Err(DataError::BadShape {
            file: file.to_owned(),
            shape: shape.to_vec(),
            expected: "labels of shape [N] or [N, 1]",
        });
    }
    check_size(file, shape, label_type.size(), data)?;
    data.chunks_exact(label_type.size())
        .enumerate()
        .map(|(index, bytes)| {
            let value = label_type.decode(bytes);
            u16::try_from(value).map_err(|_| DataError::LabelValue {
                file: file.to_owned(),
                index,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_types_decode_little_endian_and_sign() {
        assert_eq!(LabelType::I8.decode(&[0xff]), -1);
        assert_eq!(LabelType::U8.decode(&[0xff]), 255);
        assert_eq!(LabelType::I16.decode(&[0xfe, 0xff]), -2);
        assert_eq!(LabelType::U16.decode(&[0x01, 0x02]), 0x0201);
        assert_eq!(LabelType::I32.decode(&(-7i32).to_le_bytes()), -7);
        assert_eq!(
            LabelType::U32.decode(&u32::MAX.to_le_bytes()),
            u32::MAX as i128
        );
        assert_eq!(
            LabelType::I64.decode(&i64::MIN.to_le_bytes()),
            i64::MIN as i128
        );
        assert_eq!(
            LabelType::U64.decode(&u64::MAX.to_le_bytes()),
            u64::MAX as i128
        );
    }

    #[test]
    fn overflowing_shape_is_an_error_not_a_panic() {
        let err = samples("x", &[usize::MAX, 2, 2], [1, 2, 2], ValueType::U8, &[]).unwrap_err();
        assert!(matches!(err, DataError::BadShape { .. }), "{err}");
    }

    #[test]
    fn u8_values_are_scaled_into_unit_interval() {
        let s = samples("x", &[1, 1, 3], [1, 1, 3], ValueType::U8, &[0, 51, 255]).unwrap();
        assert_eq!(s.values, vec![0.0, 0.2, 1.0]);
    }
}
