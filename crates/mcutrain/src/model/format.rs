//! The model file: versioned, checksummed, deterministic, written atomically.
//!
//! [`save`] and [`load`] move a [`Model`] to and from disk; [`to_bytes`] and [`from_bytes`] are
//! the same encoding in memory. The bytes depend only on the model (no timestamps, no map
//! order; floats are stored by bit pattern), so the same model always gives a byte-identical
//! file, and the encoding is canonical: a file that loads re-encodes to exactly its bytes.
//! [`from_bytes`] never panics, checks sizes before it allocates, and ends with
//! [`Model::validate`]; [`save`] refuses a model that [`load`] would refuse.
//!
//! # Layout, format version 1
//!
//! Numbers are little-endian and fixed-width. The header is 20 bytes, and every section of the
//! payload starts 4-byte aligned in the file, so the firmware can read parameter arrays in
//! place.
//!
//! | Offset | Size | Field |
//! |--------|------|-------|
//! | 0      | 8    | magic `MCUTMODL` ([`MAGIC`]) |
//! | 8      | 2    | format version, u16 ([`FORMAT_VERSION`]) |
//! | 10     | 2    | precision, u16: 0 float32, 1 int8 |
//! | 12     | 4    | payload length in bytes, u32 |
//! | 16     | 4    | CRC-32 (IEEE, [`mcutrain_core::checksum`]) of bytes 8..16 followed by the payload |
//! | 20     | len  | payload |
//!
//! The checksum also covers version, precision and length, so no single changed bit of a file
//! can turn it into another valid file.
//!
//! The payload, in order:
//!
//! | Section | Encoding |
//! |---------|----------|
//! | architecture | input shape 3 x u32 (`[c, h, w]`), classes u32, layer count u32, then per layer: name (u16 byte length + UTF-8), kind tag u8, the kind's fields as u32, and an activation u8 for kinds that have one; then zero bytes up to a multiple of 4 |
//! | float32 parameters | record count u32 (one per layer), then per layer: weight count u32, weights f32; bias count u32, biases f32 (counts are 0 for layers without parameters) |
//! | int8 parameters | record count u32 (one per layer), then per layer: weight qparams count u32, each (scale f32, zero point i32); weight range (range record); weight count u32, weights i8, zero bytes up to a multiple of 4; bias count u32, biases i32; bias scale f32 |
//! | int8 tensor ranges | activation ranges: count u32, range records; error ranges: count u32, range records |
//!
//! A range record ([`RangeEma`]) is min f32, max f32, initialized u8 (0 or 1), 3 zero bytes.
//! The activation byte is 0 none, 1 ReLU, 2 ReLU6. A layer's kind tag, its `u32` fields and
//! whether an activation byte follows are the layer contract's
//! ([`mcutrain_core::layer::KINDS`], fields in the order of
//! [`mcutrain_core::layer::LayerKind::fields`]): tag 0 conv2d (out channels, kernel h, kernel w,
//! stride h, stride w, padding h, padding w, groups; activation), 1 linear (out features;
//! activation), 2 activation (activation), 3 avgpool and 4 maxpool (kernel h, kernel w, stride h,
//! stride w, padding h, padding w), 5 globalavgpool, 6 add (skip from), 7 flatten; a new
//! operator adds its row there.
//!
//! Limits, checked before anything is allocated: at most [`MAX_LAYERS`] layers, names of at
//! most [`MAX_NAME_BYTES`] bytes, and at most [`MAX_ELEMENTS`] elements in any stored array,
//! any weight tensor, and (as a bound propagated through the layers) any per-sample tensor.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use mcutrain_core::checksum::{crc32, crc32_update};
use mcutrain_core::codec;
use mcutrain_core::layer::KINDS;
use mcutrain_core::ops::activation::Activation;
use mcutrain_core::quant::{QParams, RangeEma};

use super::{
    Architecture, FloatLayer, Layer, LayerKind, Model, ModelError, Params, QuantLayer, QuantState,
};

/// The first 8 bytes of every model file.
pub const MAGIC: [u8; 8] = *b"MCUTMODL";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Most layers a model file may hold.
pub const MAX_LAYERS: usize = 4096;
/// Longest layer name, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most elements of any stored array, weight tensor or per-sample tensor (`2^28`).
pub const MAX_ELEMENTS: usize = 1 << 28;

const PRECISION_FLOAT32: u16 = 0;
const PRECISION_INT8: u16 = 1;

/// Size of a range record: min f32, max f32, initialized u8, 3 zero bytes.
const RANGE_RECORD_LEN: usize = 12;
/// Size of a weight qparams record: scale f32, zero point i32.
const QPARAMS_RECORD_LEN: usize = 8;
/// Size of a float parameter record without parameters: two zero counts.
const FLOAT_RECORD_MIN_LEN: usize = 8;
/// Size of an int8 parameter record without parameters: three zero counts, the weight range
/// and the bias scale.
const QUANT_RECORD_MIN_LEN: usize = 3 * 4 + RANGE_RECORD_LEN + 4;

/// Why a model could not be saved or loaded; every message names the file and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The operating system refused an operation on the file.
    #[error("cannot {action} `{}`: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted, e.g. "read", "write", "replace".
        action: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error(
        "`{}` is not an mcutrain model (magic \"{}\", expected \"MCUTMODL\"); pass a file written by `mcutrain pretrain|quantize|train --out`",
        .file.display(),
        .found.escape_ascii()
    )]
    NotAModel {
        /// The file.
        file: PathBuf,
        /// Its first (up to 8) bytes.
        found: Vec<u8>,
    },
    /// The file has another format version.
    #[error(
        "`{}` has model format version {found}, but this mcutrain reads version {supported}; {}",
        .file.display(),
        version_advice(*.found, *.supported)
    )]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Version in the file.
        found: u16,
        /// Version this build reads ([`FORMAT_VERSION`]).
        supported: u16,
    },
    /// The file is shorter than its header says.
    #[error(
        "`{}` is truncated: it has {actual} bytes but needs {expected}; the write or copy was interrupted, re-create or re-copy it",
        .file.display()
    )]
    Truncated {
        /// The file.
        file: PathBuf,
        /// Bytes needed (the header, or the header and the declared payload).
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The payload does not match its checksum.
    #[error(
        "`{}`: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt or was modified; re-create it",
        .file.display()
    )]
    ChecksumMismatch {
        /// The file.
        file: PathBuf,
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// The checksum matches but the content is malformed (not written by this format version).
    #[error("`{}` is corrupt: {problem}; re-create it", .file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is malformed, and where.
        problem: String,
    },
    /// The model exceeds the format limits ([`MAX_LAYERS`], [`MAX_NAME_BYTES`], [`MAX_ELEMENTS`]).
    #[error("`{}`: the model exceeds the format limits: {problem}; use a smaller model", .file.display())]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// Which limit, and where.
        problem: String,
    },
    /// The parameters do not fit the architecture, or the architecture is unusable.
    #[error("`{}`: invalid model: {source}", .file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What [`Model::validate`] found.
        source: ModelError,
    },
}

fn version_advice(found: u16, supported: u16) -> &'static str {
    if found > supported {
        "it was written by a newer mcutrain: upgrade mcutrain to read it"
    } else {
        "it is not a file this mcutrain wrote: re-create it"
    }
}

/// Encode a model (see the module documentation for the layout). Deterministic: equal models
/// give identical bytes. The model need not pass [`Model::validate`]; [`save`] checks that.
///
/// # Panics
///
/// If the model exceeds the format limits ([`MAX_LAYERS`], [`MAX_NAME_BYTES`],
/// [`MAX_ELEMENTS`], or a size above `u32::MAX`); [`save`] reports this as
/// [`FormatError::TooLarge`] instead.
pub fn to_bytes(model: &Model) -> Vec<u8> {
    encode(model).unwrap_or_else(|problem| {
        panic!("the model exceeds the format limits: {problem}; `save` reports this as an error")
    })
}

/// Decode and validate a model from bytes produced by [`to_bytes`]. Never panics; errors name
/// the source as `<bytes>`.
pub fn from_bytes(bytes: &[u8]) -> Result<Model, FormatError> {
    decode(bytes, Path::new("<bytes>"))
}

/// Write `model` to `path` atomically ([`crate::fsutil::write_atomically`]: a temporary file in
/// the same directory, flushed to disk, then renamed over `path`), so `path` never holds a
/// partial model and a failed save leaves no temporary file. Refuses (before touching the disk)
/// a model that fails [`Model::validate`] or the limits.
pub fn save(path: &Path, model: &Model) -> Result<(), FormatError> {
    model.validate().map_err(|source| FormatError::Invalid {
        file: path.to_path_buf(),
        source,
    })?;
    let bytes = encode(model).map_err(|problem| FormatError::TooLarge {
        file: path.to_path_buf(),
        problem,
    })?;
    crate::fsutil::write_atomically(path, &bytes).map_err(|e| FormatError::Io {
        path: e.path,
        action: e.action,
        source: e.source,
    })
}

/// Read and validate a model file written by [`save`].
pub fn load(path: &Path) -> Result<Model, FormatError> {
    let bytes = fs::read(path).map_err(io_error(path, "read"))?;
    decode(&bytes, path)
}

fn io_error<'p>(
    path: &'p Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> FormatError + 'p {
    move |source| FormatError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// CRC-32 of the header fields after the magic (version, precision, length) and the payload.
fn checksum(header_fields: &[u8], payload: &[u8]) -> u32 {
    crc32_update(crc32(header_fields), payload)
}

/// Zero bytes needed after `len` bytes to reach a multiple of 4.
fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// The bytes [`save`] writes for `model` (an error names a size the format cannot hold).
pub fn encode(model: &Model) -> Result<Vec<u8>, String> {
    check_sizes(&model.arch)?;
    let mut w = Writer::default();
    write_architecture(&mut w, &model.arch)?;
    let precision = match &model.params {
        Params::Float(layers) => {
            w.count(layers.len(), "parameter records")?;
            for layer in layers {
                w.count(layer.weight.len(), "weights")?;
                layer.weight.iter().for_each(|&v| w.f32(v));
                w.count(layer.bias.len(), "biases")?;
                layer.bias.iter().for_each(|&v| w.f32(v));
            }
            PRECISION_FLOAT32
        }
        Params::Int8(state) => {
            w.count(state.layers.len(), "parameter records")?;
            for layer in &state.layers {
                write_quant_layer(&mut w, layer)?;
            }
            write_ranges(&mut w, &state.activations)?;
            write_ranges(&mut w, &state.errors)?;
            PRECISION_INT8
        }
    };
    let payload = w.bytes;
    let length = u32::try_from(payload.len())
        .map_err(|_| format!("the payload has {} bytes", payload.len()))?;
    let mut header_fields = Vec::with_capacity(8);
    header_fields.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header_fields.extend_from_slice(&precision.to_le_bytes());
    header_fields.extend_from_slice(&length.to_le_bytes());
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&header_fields);
    bytes.extend_from_slice(&checksum(&header_fields, &payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Little-endian payload writer; sizes that do not fit the format are errors.
#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn i32(&mut self, value: i32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn f32(&mut self, value: f32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A shape or layer field as u32.
    fn dim(&mut self, value: usize) -> Result<(), String> {
        let value = u32::try_from(value).map_err(|_| format!("{value} does not fit in 32 bits"))?;
        self.u32(value);
        Ok(())
    }

    /// The element count of the array that follows.
    fn count(&mut self, len: usize, what: &str) -> Result<(), String> {
        if len > MAX_ELEMENTS {
            return Err(format!("{len} {what}, more than {MAX_ELEMENTS}"));
        }
        self.dim(len)
    }

    fn pad(&mut self) {
        let zeros = pad_len(self.bytes.len());
        self.bytes.resize(self.bytes.len() + zeros, 0);
    }

    fn activation(&mut self, activation: Activation) {
        self.u8(match activation {
            Activation::None => 0,
            Activation::Relu => 1,
            Activation::Relu6 => 2,
        });
    }

    fn range(&mut self, range: &RangeEma) {
        self.f32(range.min);
        self.f32(range.max);
        self.u8(range.initialized.into());
        self.pad();
    }
}

fn write_architecture(w: &mut Writer, arch: &Architecture) -> Result<(), String> {
    if arch.layers.len() > MAX_LAYERS {
        return Err(format!(
            "{} layers, more than {MAX_LAYERS}",
            arch.layers.len()
        ));
    }
    arch.input.iter().try_for_each(|&d| w.dim(d))?;
    w.dim(arch.classes)?;
    w.dim(arch.layers.len())?;
    for (index, layer) in arch.layers.iter().enumerate() {
        write_layer(w, layer).map_err(|e| format!("layer {index} ({}): {e}", layer.name))?;
    }
    w.pad();
    Ok(())
}

fn write_layer(w: &mut Writer, layer: &Layer) -> Result<(), String> {
    let name = layer.name.as_bytes();
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the name has {} bytes, more than {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    w.u16(name.len() as u16);
    w.bytes.extend_from_slice(name);
    let fields = layer.kind.fields();
    w.u8(fields.tag);
    for &field in fields.used() {
        w.dim(field)?;
    }
    if let Some(activation) = fields.activation {
        w.activation(activation);
    }
    Ok(())
}

fn write_quant_layer(w: &mut Writer, layer: &QuantLayer) -> Result<(), String> {
    w.count(layer.weight_q.len(), "weight qparams")?;
    for q in &layer.weight_q {
        w.f32(q.scale);
        w.i32(q.zero_point);
    }
    w.range(&layer.weight_range);
    w.count(layer.weight.len(), "weights")?;
    w.bytes.extend(layer.weight.iter().map(|&q| q as u8));
    w.pad();
    w.count(layer.bias.len(), "biases")?;
    layer.bias.iter().for_each(|&b| w.i32(b));
    w.f32(layer.bias_scale);
    Ok(())
}

fn write_ranges(w: &mut Writer, ranges: &[RangeEma]) -> Result<(), String> {
    w.count(ranges.len(), "tensor ranges")?;
    ranges.iter().for_each(|r| w.range(r));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Parse and validate a whole file; `file` names it in errors.
fn decode(bytes: &[u8], file: &Path) -> Result<Model, FormatError> {
    let (int8, payload) = check_header(bytes, file)?;
    let mut r = Reader::new(payload, file);
    let arch = read_architecture(&mut r)?;
    check_sizes(&arch).map_err(|problem| FormatError::TooLarge {
        file: file.to_path_buf(),
        problem,
    })?;
    let params = if int8 {
        Params::Int8(QuantState {
            layers: r.list("parameter records", QUANT_RECORD_MIN_LEN, read_quant_layer)?,
            activations: r.list("activation ranges", RANGE_RECORD_LEN, Reader::range)?,
            errors: r.list("error ranges", RANGE_RECORD_LEN, Reader::range)?,
        })
    } else {
        Params::Float(r.list("parameter records", FLOAT_RECORD_MIN_LEN, read_float_layer)?)
    };
    let unread = payload.len() - r.pos();
    if unread != 0 {
        return Err(r.corrupt(format!("{unread} unused bytes at the end of the payload")));
    }
    let model = Model { arch, params };
    model.validate().map_err(|source| FormatError::Invalid {
        file: file.to_path_buf(),
        source,
    })?;
    Ok(model)
}

/// Check magic, version, length and checksum, in that order (so that a foreign or newer file
/// is named as such rather than as corrupt); returns whether the model is int8, and the payload.
fn check_header<'a>(bytes: &'a [u8], file: &Path) -> Result<(bool, &'a [u8]), FormatError> {
    let magic = &bytes[..bytes.len().min(MAGIC.len())];
    if magic != &MAGIC[..magic.len()] {
        return Err(FormatError::NotAModel {
            file: file.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    let truncated = |expected: usize| FormatError::Truncated {
        file: file.to_path_buf(),
        expected,
        actual: bytes.len(),
    };
    if let Some(version) = bytes.get(8..10) {
        let version = u16::from_le_bytes([version[0], version[1]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
    }
    let mut header = Reader::new(
        bytes
            .get(..HEADER_LEN)
            .ok_or_else(|| truncated(HEADER_LEN))?,
        file,
    );
    header.take(10, "the magic and version")?;
    let precision = header.u16("the precision")?;
    let payload_len = header.dim("the payload length")?;
    let stored = header.u32("the checksum")?;
    let expected_len = HEADER_LEN.saturating_add(payload_len);
    if bytes.len() < expected_len {
        return Err(truncated(expected_len));
    }
    if bytes.len() > expected_len {
        return Err(FormatError::Corrupt {
            file: file.to_path_buf(),
            problem: format!(
                "{} bytes follow the {payload_len}-byte payload that the header declares",
                bytes.len() - expected_len
            ),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    let computed = checksum(&bytes[8..16], payload);
    if computed != stored {
        return Err(FormatError::ChecksumMismatch {
            file: file.to_path_buf(),
            stored,
            computed,
        });
    }
    match precision {
        PRECISION_FLOAT32 => Ok((false, payload)),
        PRECISION_INT8 => Ok((true, payload)),
        other => Err(header.corrupt(format!("unknown precision tag {other}"))),
    }
}

/// The core's little-endian reader ([`codec::Reader`]) over a checksummed payload, with the
/// file's errors: running out of bytes means the payload is malformed
/// ([`FormatError::Corrupt`]), and every message names the byte and what was being read.
struct Reader<'a> {
    bytes: codec::Reader<'a>,
    file: &'a Path,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], file: &'a Path) -> Self {
        Reader {
            bytes: codec::Reader::new(bytes),
            file,
        }
    }

    /// The current byte offset in the payload.
    fn pos(&self) -> usize {
        self.bytes.position()
    }

    fn corrupt(&self, problem: String) -> FormatError {
        FormatError::Corrupt {
            file: self.file.to_path_buf(),
            problem,
        }
    }

    /// `read` of the core reader, or the error that the payload ends inside `what`.
    fn field<T>(
        &mut self,
        what: &str,
        read: impl FnOnce(&mut codec::Reader<'a>) -> Option<T>,
    ) -> Result<T, FormatError> {
        let at = self.pos();
        read(&mut self.bytes)
            .ok_or_else(|| self.corrupt(format!("the payload ends inside {what} (at byte {at})")))
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], FormatError> {
        self.field(what, |r| r.take(len))
    }

    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        self.field(what, codec::Reader::u8)
    }

    fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        self.field(what, codec::Reader::u16)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        self.field(what, codec::Reader::u32)
    }

    fn i32(&mut self, what: &str) -> Result<i32, FormatError> {
        self.field(what, codec::Reader::i32)
    }

    fn f32(&mut self, what: &str) -> Result<f32, FormatError> {
        self.field(what, codec::Reader::f32)
    }

    /// A shape or layer field.
    fn dim(&mut self, what: &str) -> Result<usize, FormatError> {
        self.u32(what).map(|v| v as usize)
    }

    /// An element count, checked against [`MAX_ELEMENTS`] and the bytes left before any
    /// allocation.
    fn count(&mut self, what: &str, element_len: usize) -> Result<usize, FormatError> {
        let count = self.dim(what)?;
        if count > MAX_ELEMENTS {
            return Err(FormatError::TooLarge {
                file: self.file.to_path_buf(),
                problem: format!(
                    "{count} {what} at byte {}, more than {MAX_ELEMENTS}",
                    self.pos()
                ),
            });
        }
        let left = self.bytes.remaining();
        let needed = count.saturating_mul(element_len);
        if needed > left {
            return Err(self.corrupt(format!(
                "{count} {what} need {needed} bytes but {left} are left (at byte {})",
                self.pos()
            )));
        }
        Ok(count)
    }

    /// A count followed by that many records.
    fn list<T>(
        &mut self,
        what: &str,
        element_len: usize,
        mut read: impl FnMut(&mut Self) -> Result<T, FormatError>,
    ) -> Result<Vec<T>, FormatError> {
        let count = self.count(what, element_len)?;
        (0..count).map(|_| read(self)).collect()
    }

    /// Zero bytes up to a multiple of 4.
    fn padding(&mut self) -> Result<(), FormatError> {
        let at = self.pos();
        if self.take(pad_len(at), "padding")?.iter().any(|&b| b != 0) {
            return Err(self.corrupt(format!("non-zero padding at byte {at}")));
        }
        Ok(())
    }

    fn activation(&mut self) -> Result<Activation, FormatError> {
        match self.u8("an activation")? {
            0 => Ok(Activation::None),
            1 => Ok(Activation::Relu),
            2 => Ok(Activation::Relu6),
            other => Err(self.corrupt(format!(
                "unknown activation {other} at byte {}",
                self.pos() - 1
            ))),
        }
    }

    fn range(&mut self) -> Result<RangeEma, FormatError> {
        let min = self.f32("a range")?;
        let max = self.f32("a range")?;
        let initialized = match self.u8("a range")? {
            0 => false,
            1 => true,
            other => {
                return Err(self.corrupt(format!(
                    "range flag {other} at byte {} is neither 0 nor 1",
                    self.pos() - 1
                )))
            }
        };
        self.padding()?;
        Ok(RangeEma {
            min,
            max,
            initialized,
        })
    }
}

fn read_architecture(r: &mut Reader) -> Result<Architecture, FormatError> {
    let input = [
        r.dim("the input shape")?,
        r.dim("the input shape")?,
        r.dim("the input shape")?,
    ];
    let classes = r.dim("the class count")?;
    let layer_count = r.dim("the layer count")?;
    if layer_count > MAX_LAYERS {
        return Err(FormatError::TooLarge {
            file: r.file.to_path_buf(),
            problem: format!("{layer_count} layers, more than {MAX_LAYERS}"),
        });
    }
    let layers = (0..layer_count)
        .map(|index| read_layer(r, index))
        .collect::<Result<_, _>>()?;
    r.padding()?;
    Ok(Architecture {
        input,
        classes,
        layers,
    })
}

fn read_layer(r: &mut Reader, index: usize) -> Result<Layer, FormatError> {
    let name_len = r.u16("a layer name")? as usize;
    if name_len > MAX_NAME_BYTES {
        return Err(FormatError::TooLarge {
            file: r.file.to_path_buf(),
            problem: format!(
                "layer {index} has a {name_len}-byte name, more than {MAX_NAME_BYTES}"
            ),
        });
    }
    let name_at = r.pos();
    let name = std::str::from_utf8(r.take(name_len, "a layer name")?)
        .map_err(|_| {
            r.corrupt(format!(
                "layer {index}: the name at byte {name_at} is not UTF-8"
            ))
        })?
        .to_owned();
    let tag = r.u8("a layer kind")?;
    let spec = KINDS.get(tag as usize).ok_or_else(|| {
        r.corrupt(format!(
            "layer {index} ({name}) has unknown kind {tag}; this mcutrain knows {}",
            KINDS.len()
        ))
    })?;
    let what = format!("layer {index} ({name})");
    let fields = (0..spec.fields)
        .map(|_| r.dim(&what))
        .collect::<Result<Vec<_>, _>>()?;
    let activation = match spec.activation {
        true => Some(r.activation()?),
        false => None,
    };
    let kind = LayerKind::from_fields(tag, &fields, activation)
        .ok_or_else(|| r.corrupt(format!("{what}: the fields of kind {tag} do not decode")))?;
    Ok(Layer { name, kind })
}

fn read_float_layer(r: &mut Reader) -> Result<FloatLayer, FormatError> {
    Ok(FloatLayer {
        weight: r.list("float weights", 4, |r| r.f32("a weight"))?,
        bias: r.list("float biases", 4, |r| r.f32("a bias"))?,
    })
}

fn read_quant_layer(r: &mut Reader) -> Result<QuantLayer, FormatError> {
    let weight_q = r.list("weight qparams", QPARAMS_RECORD_LEN, |r| {
        Ok(QParams {
            scale: r.f32("a weight scale")?,
            zero_point: r.i32("a weight zero point")?,
        })
    })?;
    let weight_range = r.range()?;
    let weight = r.list("int8 weights", 1, |r| Ok(r.u8("a weight")? as i8))?;
    r.padding()?;
    Ok(QuantLayer {
        weight,
        weight_q,
        weight_range,
        bias: r.list("int8 biases", 4, |r| r.i32("a bias"))?,
        bias_scale: r.f32("a bias scale")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Size limits

/// Refuse architectures whose per-sample tensors or weight tensors exceed [`MAX_ELEMENTS`],
/// so that validating them afterwards works on sizes that fit. Each layer is resolved through
/// the layer contract, whose geometries check their own size arithmetic; a layer that does not
/// resolve stops the walk here and is reported by [`Model::validate`].
fn check_sizes(arch: &Architecture) -> Result<(), String> {
    let elements = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= MAX_ELEMENTS)
    };
    let mut shape = arch.input;
    elements(&shape).ok_or_else(|| format!("the input shape {shape:?} is too large"))?;
    for (index, layer) in arch.layers.iter().enumerate() {
        let Ok(resolved) = layer.kind.resolve(shape, 1) else {
            return Ok(());
        };
        shape = resolved.op().output_shape();
        elements(&shape).ok_or_else(|| {
            format!(
                "layer {index} ({}) outputs more than {MAX_ELEMENTS} elements",
                layer.name
            )
        })?;
        if let Some(params) = resolved.params() {
            elements(&[params.channels, params.structure]).ok_or_else(|| {
                format!(
                    "layer {index} ({}) has more than {MAX_ELEMENTS} weights",
                    layer.name
                )
            })?;
        }
    }
    Ok(())
}
