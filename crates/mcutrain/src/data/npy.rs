//! NPY files (NumPy's `np.save` format, versions 1.0, 2.0 and 3.0).
//!
//! Layout: `\x93NUMPY`, major and minor version bytes, the header length (little-endian `u16`
//! in version 1, `u32` in versions 2 and 3), the header, then the elements. The header is a
//! Python dict literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 28, 28), }`.
//!
//! Data arrays: `|u1` (scaled by `1 / 255`) or `<f4`, of shape `[N, C, H, W]`, `[N, H, W]` or
//! `[N, C, L]`. A 3-D array `[N, A, B]` is read as `N` one-channel `A x B` images when `A == B`
//! and as `N` time series of `A` channels and `B` steps (height 1) otherwise; both readings
//! have the same memory layout, and [`super::Dataset::reshape`] switches between them.
//! Label arrays: `[N]` or `[N, 1]` of `|u1 |i1 <i2 <u2 <i4 <u4 <i8 <u8`.

use super::array::{self, LabelType, ValueType};
use super::{DataError, Samples};

/// The first bytes of every NPY file.
pub(crate) const MAGIC: &[u8] = b"\x93NUMPY";

/// Deepest nesting of brackets accepted in a header (real headers nest at most 3 deep).
const MAX_NESTING: usize = 16;

/// The fields of an NPY header that the loader uses.
struct Header {
    /// `descr`: the dtype string, or `None` for a structured (record) dtype.
    descr: Option<String>,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Offset of the first element.
    data_offset: usize,
}

fn bad_header(file: &str, detail: impl Into<String>) -> DataError {
    DataError::BadHeader {
        file: file.to_owned(),
        format: "NPY",
        detail: detail.into(),
    }
}

fn parse_header(file: &str, bytes: &[u8]) -> Result<Header, DataError> {
    let (Some(&major), Some(&minor)) = (bytes.get(6), bytes.get(7)) else {
        return Err(bad_header(file, "the file ends inside the version bytes"));
    };
    let length_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => {
            return Err(bad_header(
                file,
                format!("version {major}.{minor} is unknown (1.0, 2.0 and 3.0 are supported)"),
            ))
        }
    };
    let header_start = 8 + length_bytes;
    let Some(length) = bytes.get(8..header_start) else {
        return Err(bad_header(file, "the file ends inside the header length"));
    };
    let header_len = length
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | b as usize);
    let data_offset = header_start + header_len;
    let Some(text) = bytes.get(header_start..data_offset) else {
        return Err(bad_header(
            file,
            format!(
                "the header length {header_len} runs past the end of the file ({} bytes)",
                bytes.len()
            ),
        ));
    };
    let fields = match literal::parse(text) {
        Ok(literal::Value::Dict(fields)) => fields,
        Ok(_) => return Err(bad_header(file, "the header is not a dict")),
        Err(detail) => return Err(bad_header(file, detail)),
    };
    let field = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| matches!(k, literal::Value::Str(s) if s == key))
            .map(|(_, v)| v)
            .ok_or_else(|| bad_header(file, format!("the header has no '{key}' entry")))
    };
    let descr = match field("descr")? {
        literal::Value::Str(s) => Some(s.clone()),
        literal::Value::Seq(_) => None,
        _ => return Err(bad_header(file, "'descr' is neither a string nor a list")),
    };
    let literal::Value::Bool(fortran_order) = *field("fortran_order")? else {
        return Err(bad_header(file, "'fortran_order' is not True or False"));
    };
    let literal::Value::Seq(dims) = field("shape")? else {
        return Err(bad_header(file, "'shape' is not a tuple"));
    };
    let shape = dims
        .iter()
        .map(|d| match d {
            literal::Value::Int(n) => usize::try_from(*n).ok(),
            _ => None,
        })
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad_header(file, "'shape' holds something other than sizes"))?;
    Ok(Header {
        descr,
        fortran_order,
        shape,
        data_offset,
    })
}

/// Parses the header and rejects Fortran order (for arrays where it changes the layout).
fn parse_c_order_header(file: &str, bytes: &[u8]) -> Result<Header, DataError> {
    let header = parse_header(file, bytes)?;
    if header.fortran_order && header.shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(DataError::FortranOrder {
            file: file.to_owned(),
        });
    }
    Ok(header)
}

fn unsupported(
    file: &str,
    header: &Header,
    role: &'static str,
    supported: &'static str,
) -> DataError {
    DataError::UnsupportedDtype {
        file: file.to_owned(),
        dtype: header
            .descr
            .clone()
            .unwrap_or_else(|| "structured (record) dtype".into()),
        role,
        supported,
    }
}

/// Samples from an NPY data array (see the module documentation for dtypes and shapes).
pub(crate) fn read_samples(file: &str, bytes: &[u8]) -> Result<Samples, DataError> {
    let header = parse_c_order_header(file, bytes)?;
    let value_type = match header.descr.as_deref() {
        Some("|u1" | "<u1" | ">u1" | "=u1" | "u1") => ValueType::U8,
        Some("<f4") => ValueType::F32,
        _ => {
            return Err(unsupported(
                file,
                &header,
                "data",
                "uint8 ('|u1') or float32 ('<f4')",
            ))
        }
    };
    let sample_shape = match header.shape[..] {
        [_, c, h, w] => [c, h, w],
        [_, h, w] if h == w => [1, h, w],
        [_, c, l] => [c, 1, l],
        _ => {
            return Err(DataError::BadShape {
                file: file.to_owned(),
                shape: header.shape,
                expected: "[N, C, H, W], [N, H, W] (square images) or [N, C, L] (time series)",
            })
        }
    };
    array::samples(
        file,
        &header.shape,
        sample_shape,
        value_type,
        &bytes[header.data_offset..],
    )
}

/// Labels from an NPY integer array of shape `[N]` or `[N, 1]`.
pub(crate) fn read_labels(file: &str, bytes: &[u8]) -> Result<Vec<u16>, DataError> {
    let header = parse_c_order_header(file, bytes)?;
    let label_type =
        match header.descr.as_deref() {
            Some("|u1" | "<u1" | ">u1" | "=u1" | "u1") => LabelType::U8,
            Some("|i1" | "<i1" | ">i1" | "=i1" | "i1") => LabelType::I8,
            Some("<i2") => LabelType::I16,
            Some("<u2") => LabelType::U16,
            Some("<i4") => LabelType::I32,
            Some("<u4") => LabelType::U32,
            Some("<i8") => LabelType::I64,
            Some("<u8") => LabelType::U64,
            _ => return Err(unsupported(
                file,
                &header,
                "labels",
                "little-endian integers ('|u1', '|i1', '<i2', '<u2', '<i4', '<u4', '<i8' or '<u8')",
            )),
        };
    array::labels(
        file,
        &header.shape,
        label_type,
        &bytes[header.data_offset..],
    )
}

/// The subset of Python literal syntax that NPY headers use.
mod literal {
    use super::MAX_NESTING;

    /// A parsed literal.
    #[derive(Debug, PartialEq)]
    pub(super) enum Value {
        Str(String),
        Int(u64),
        Bool(bool),
        None,
        /// A tuple or a list.
        Seq(Vec<Value>),
        Dict(Vec<(Value, Value)>),
    }

    /// Parses one literal that fills `text` (surrounding whitespace allowed); the error says
    /// what was found where.
    pub(super) fn parse(text: &[u8]) -> Result<Value, String> {
        let mut parser = Parser { text, pos: 0 };
        let value = parser.value(0)?;
        parser.skip_space();
        if parser.pos != text.len() {
            return Err(parser.unexpected("the end of the header"));
        }
        Ok(value)
    }

    struct Parser<'a> {
        text: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn skip_space(&mut self) {
            while self
                .text
                .get(self.pos)
                .is_some_and(|b| b.is_ascii_whitespace())
            {
                self.pos += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.skip_space();
            self.text.get(self.pos).copied()
        }

        fn unexpected(&self, wanted: &str) -> String {
            match self.text.get(self.pos) {
                Some(&b) => format!(
                    "expected {wanted} at byte {} of the header, found '{}'",
                    self.pos,
                    b.escape_ascii()
                ),
                None => format!("expected {wanted}, but the header ends"),
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value, String> {
            if depth > MAX_NESTING {
                return Err(format!("brackets nest deeper than {MAX_NESTING} levels"));
            }
            match self.peek() {
                Some(b'{') => self.dict(depth),
                Some(b'(') => self.seq(b')', depth),
                Some(b'[') => self.seq(b']', depth),
                Some(quote @ (b'\'' | b'"')) => self.string(quote),
                Some(b'0'..=b'9') => self.int(),
                Some(b'A'..=b'Z' | b'a'..=b'z') => self.word(),
                _ => Err(self.unexpected("a value")),
            }
        }

        /// Consumes `close` or a comma; returns true when `close` was consumed.
        fn comma_or(&mut self, close: u8) -> Result<bool, String> {
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    Ok(false)
                }
                Some(b) if b == close => {
                    self.pos += 1;
                    Ok(true)
                }
                _ => Err(self.unexpected(&format!("',' or '{}'", close as char))),
            }
        }

        fn seq(&mut self, close: u8, depth: usize) -> Result<Value, String> {
            self.pos += 1;
            let mut items = Vec::new();
            loop {
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(Value::Seq(items));
                }
                items.push(self.value(depth + 1)?);
                if self.comma_or(close)? {
                    return Ok(Value::Seq(items));
                }
            }
        }

        fn dict(&mut self, depth: usize) -> Result<Value, String> {
            self.pos += 1;
            let mut fields = Vec::new();
            loop {
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(Value::Dict(fields));
                }
                let key = self.value(depth + 1)?;
                if self.peek() != Some(b':') {
                    return Err(self.unexpected("':'"));
                }
                self.pos += 1;
                fields.push((key, self.value(depth + 1)?));
                if self.comma_or(b'}')? {
                    return Ok(Value::Dict(fields));
                }
            }
        }

        fn string(&mut self, quote: u8) -> Result<Value, String> {
            let start = self.pos + 1;
            let len = self.text[start..]
                .iter()
                .position(|&b| b == quote)
                .ok_or_else(|| "a string in the header is not closed".to_string())?;
            self.pos = start + len + 1;
            Ok(Value::Str(
                String::from_utf8_lossy(&self.text[start..start + len]).into_owned(),
            ))
        }

        fn int(&mut self) -> Result<Value, String> {
            let start = self.pos;
            while self.text.get(self.pos).is_some_and(u8::is_ascii_digit) {
                self.pos += 1;
            }
            let digits = &self.text[start..self.pos];
            // Python 2 wrote long integers with an `L` suffix.
            if self.text.get(self.pos) == Some(&b'L') {
                self.pos += 1;
            }
            std::str::from_utf8(digits)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Value::Int)
                .ok_or_else(|| format!("the number {} is too large", digits.escape_ascii()))
        }

        fn word(&mut self) -> Result<Value, String> {
            let start = self.pos;
            while self
                .text
                .get(self.pos)
                .is_some_and(u8::is_ascii_alphanumeric)
            {
                self.pos += 1;
            }
            match &self.text[start..self.pos] {
                b"True" => Ok(Value::Bool(true)),
                b"False" => Ok(Value::Bool(false)),
                b"None" => Ok(Value::None),
                word => Err(format!(
                    "unknown word '{}' in the header",
                    word.escape_ascii()
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::literal::{parse, Value};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_numpy_header_dict() {
        let text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 28, 28), }      \n";
        let Value::Dict(fields) = parse(text).unwrap() else {
            panic!("not a dict")
        };
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[0].1, Value::Str("<f4".into()));
        assert_eq!(fields[1].1, Value::Bool(false));
        assert_eq!(
            fields[2].1,
            Value::Seq(vec![Value::Int(3), Value::Int(28), Value::Int(28)])
        );
    }

    #[test]
    fn parses_one_element_tuples_lists_and_python2_longs() {
        assert_eq!(parse(b"(5,)").unwrap(), Value::Seq(vec![Value::Int(5)]));
        assert_eq!(parse(b"()").unwrap(), Value::Seq(vec![]));
        assert_eq!(
            parse(b"[('a', '<f4')]").unwrap(),
            Value::Seq(vec![Value::Seq(vec![
                Value::Str("a".into()),
                Value::Str("<f4".into())
            ])])
        );
        assert_eq!(parse(b"7L").unwrap(), Value::Int(7));
        assert_eq!(parse(b"None").unwrap(), Value::None);
    }

    #[test]
    fn rejects_malformed_literals_with_a_reason() {
        for bad in [
            &b"{'a': 1"[..],
            b"{'a' 1}",
            b"(1 2)",
            b"'open",
            b"{'a': yes}",
            b"99999999999999999999999",
            b"{} x",
            b"",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{}", bad.escape_ascii());
        }
        let deep = [b'('; 64];
        assert!(parse(&deep).unwrap_err().contains("nest"));
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(header in proptest::collection::vec(any::<u8>(), 0..80),
                                         major in 0u8..5) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend([major, 0, header.len() as u8, 0]);
            bytes.extend(&header);
            bytes.extend([0u8; 16]);
            if let Err(e) = read_samples("f.npy", &bytes) {
                prop_assert!(e.to_string().starts_with("f.npy: "), "{}", e);
            }
            if let Err(e) = read_labels("f.npy", &bytes) {
                prop_assert!(e.to_string().starts_with("f.npy: "), "{}", e);
            }
        }

        #[test]
        fn arbitrary_dict_text_never_panics(text in "[{}()\\[\\]':, a-zA-Z0-9<|]{0,60}") {
            let mut bytes = MAGIC.to_vec();
            bytes.extend([1, 0, text.len() as u8, 0]);
            bytes.extend(text.as_bytes());
            if let Err(e) = read_samples("f.npy", &bytes) {
                prop_assert!(e.to_string().starts_with("f.npy: "), "{}", e);
            }
        }
    }
}
