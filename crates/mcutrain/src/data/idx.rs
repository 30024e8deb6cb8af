//! IDX files (the MNIST / Fashion-MNIST format).
//!
//! Layout: two zero bytes, a type code (`0x08` unsigned byte, `0x09` signed byte, `0x0B` i16,
//! `0x0C` i32, `0x0D` f32, `0x0E` f64), the number of dimensions, one big-endian `u32` per
//! dimension, then the elements in row-major order. Only unsigned bytes are read: images
//! `[N, H, W]` (one channel) or `[N, C, H, W]`, labels `[N]`.

use super::array::{self, LabelType, ValueType};
use super::{DataError, Samples};

/// True when `bytes` start like an IDX file (two zero bytes and room for the rest of the magic).
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[0] == 0 && bytes[1] == 0
}

/// The unsigned-byte type code, the only one the loader reads.
const UNSIGNED_BYTE: u8 = 0x08;

/// A parsed IDX header.
struct Header {
    type_code: u8,
    shape: Vec<usize>,
    /// Offset of the first element.
    data_offset: usize,
}

fn bad_header(file: &str, detail: String) -> DataError {
    DataError::BadHeader {
        file: file.to_owned(),
        format: "IDX",
        detail,
    }
}

fn parse_header(file: &str, bytes: &[u8]) -> Result<Header, DataError> {
    let [0, 0, type_code, ndim, ..] = *bytes else {
        return Err(bad_header(
            file,
            "the magic number must start with two zero bytes".into(),
        ));
    };
    if !matches!(type_code, 0x08 | 0x09 | 0x0B | 0x0C | 0x0D | 0x0E) {
        return Err(bad_header(
            file,
            format!("unknown type code 0x{type_code:02X} (valid: 0x08, 0x09, 0x0B to 0x0E)"),
        ));
    }
    if ndim == 0 {
        return Err(bad_header(file, "the array has 0 dimensions".into()));
    }
    let data_offset = 4 + 4 * ndim as usize;
    let Some(dim_bytes) = bytes.get(4..data_offset) else {
        return Err(bad_header(
            file,
            format!(
                "the file ends inside the {ndim} dimension sizes ({} bytes)",
                bytes.len()
            ),
        ));
    };
    let shape = dim_bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    Ok(Header {
        type_code,
        shape,
        data_offset,
    })
}

/// Spelling of an IDX type code in error messages.
fn type_name(type_code: u8) -> String {
    let name = match type_code {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "int16",
        0x0C => "int32",
        0x0D => "float32",
        _ => "float64",
    };
    format!("IDX type 0x{type_code:02X} ({name})")
}

fn require_unsigned_bytes(
    file: &str,
    header: &Header,
    role: &'static str,
) -> Result<(), DataError> {
    if header.type_code == UNSIGNED_BYTE {
        return Ok(());
    }
    Err(DataError::UnsupportedDtype {
        file: file.to_owned(),
        dtype: type_name(header.type_code),
        role,
        supported: "unsigned bytes (IDX type 0x08)",
    })
}

/// Images from an IDX file: `[N, H, W]` gives one channel, `[N, C, H, W]` keeps `C`; bytes are
/// scaled by `1 / 255`.
pub(crate) fn read_samples(file: &str, bytes: &[u8]) -> Result<Samples, DataError> {
    let header = parse_header(file, bytes)?;
    require_unsigned_bytes(file, &header, "data")?;
    let sample_shape = match header.shape[..] {
        [_, h, w] => [1, h, w],
        [_, c, h, w] => [c, h, w],
        _ => {
            return Err(DataError::BadShape {
                file: file.to_owned(),
                shape: header.shape,
                expected: "images [N, H, W] or [N, C, H, W] (a 1-D IDX file holds labels: \
                           pass it with --labels)",
            })
        }
    };
    array::samples(
        file,
        &header.shape,
        sample_shape,
        ValueType::U8,
        &bytes[header.data_offset..],
    )
}

/// Labels from an IDX `idx1` file of unsigned bytes.
pub(crate) fn read_labels(file: &str, bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    let header = parse_header(file, bytes)?;
    require_unsigned_bytes(file, &header, "labels")?;
    array::labels(
        file,
        &header.shape,
        LabelType::U8,
        &bytes[header.data_offset..],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_with_too_few_dimension_bytes_is_rejected() {
        let err = read_samples("f.idx", &[0, 0, 8, 3, 0, 0, 0, 1]).unwrap_err();
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");
        assert!(err.to_string().contains("f.idx"));
    }

    #[test]
    fn reads_a_two_by_two_image() {
        let bytes = [
            0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 255, 51, 102,
        ];
        let s = read_samples("f", &bytes).unwrap();
        assert_eq!([s.channels, s.height, s.width], [1, 2, 2]);
        assert_eq!(s.values, vec![0.0, 1.0, 0.2, 0.4]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..64),
                                       type_code in prop_oneof![Just(8u8), any::<u8>()],
                                       ndim in 0u8..6) {
            let mut bytes = vec![0, 0, type_code, ndim];
            bytes.extend(tail);
            if let Err(e) = read_samples("f.idx", &bytes) {
                prop_assert!(e.to_string().starts_with("f.idx: "), "{}", e);
            }
            if let Err(e) = read_labels("f.idx", &bytes) {
                prop_assert!(e.to_string().starts_with("f.idx: "), "{}", e);
            }
        }
    }
}
