//! The one error type of the data module.

/// Why a data set could not be loaded, checked, sampled or corrupted.
///
/// Every message names the file (or the data set, which is named after its file), says what is
/// wrong and what to do about it. `file` fields hold the path as the user gave it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{file}: cannot read the file ({source}); check the path and its permissions")]
    Io {
        /// Path of the file.
        file: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file starts like gzip but does not decompress.
    #[error("{file}: the gzip stream is corrupt or truncated ({source}); download the file again")]
    Gzip {
        /// Path of the file.
        file: String,
        /// The decompressor's error.
        source: std::io::Error,
    },
    /// The content is neither IDX, NPY nor `.ts`.
    #[error(
        "{file}: unknown format (starts with bytes {head}); expected IDX, NPY (either may be \
         gzipped) or UEA/UCR .ts text"
    )]
    UnknownFormat {
        /// Path of the file.
        file: String,
        /// The first bytes of the (decompressed) content, in hex.
        head: String,
    },
    /// The header of an IDX or NPY file is malformed or cut short.
    #[error("{file}: corrupt {format} header: {detail}; re-export or download the file again")]
    BadHeader {
        /// Path of the file.
        file: String,
        /// "IDX", "NPY" or ".ts".
        format: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The element type is not one the loader reads for this role.
    #[error("{file}: dtype '{dtype}' is not supported for {role}; save {role} as {supported}")]
    UnsupportedDtype {
        /// Path of the file.
        file: String,
        /// The element type as the file spells it (NPY `descr` or IDX type code).
        dtype: String,
        /// "data" or "labels".
        role: &'static str,
        /// The supported element types.
        supported: &'static str,
    },
    /// An NPY array stored in Fortran (column-major) order.
    #[error(
        "{file}: the array is stored in Fortran order; save it in C order \
         (np.save(path, np.ascontiguousarray(array)))"
    )]
    FortranOrder {
        /// Path of the file.
        file: String,
    },
    /// The array has a shape the loader cannot map to samples (or to labels).
    #[error("{file}: shape {shape:?} is not supported; expected {expected}")]
    BadShape {
        /// Path of the file.
        file: String,
        /// The shape found in the header.
        shape: Vec<usize>,
        /// The supported shapes.
        expected: &'static str,
    },
    /// The header's dimensions do not match the amount of data (truncated or padded file).
    #[error(
        "{file}: the header describes {expected} bytes of data but the file holds {actual} \
         (truncated or corrupt file); download or export it again"
    )]
    SizeMismatch {
        /// Path of the file.
        file: String,
        /// Bytes of element data implied by the header.
        expected: u64,
        /// Bytes of element data present (after decompression).
        actual: u64,
    },
    /// The file holds no samples.
    #[error("{file}: no samples (the file is empty or its sample count is 0)")]
    Empty {
        /// Path of the file.
        file: String,
    },
    /// IDX or NPY data given without a label file.
    #[error("{file}: {format} data carry no labels; pass the label file with --labels PATH")]
    MissingLabels {
        /// Path of the data file.
        file: String,
        /// "IDX" or "NPY".
        format: &'static str,
    },
    /// A label file given for a `.ts` file, which holds its own labels.
    #[error("{file}: a .ts file carries its own class labels; drop --labels {labels}")]
    UnexpectedLabels {
        /// Path of the data file.
        file: String,
        /// Path of the superfluous label file.
        labels: String,
    },
    /// Label and sample counts differ.
    #[error(
        "{labels}: holds {label_count} labels but {file} holds {sample_count} samples; \
         use the label file that belongs to the data"
    )]
    LabelCount {
        /// Path of the data file.
        file: String,
        /// Path of the label file.
        labels: String,
        /// Samples in the data file.
        sample_count: usize,
        /// Labels in the label file.
        label_count: usize,
    },
    /// A stored label is not a class index in `0..=65535`.
    #[error(
        "{file}: label {value} of sample {index} is not a class index in 0..=65535; \
         store labels as non-negative class numbers"
    )]
    LabelValue {
        /// Path of the label file.
        file: String,
        /// Sample number (0-based).
        index: usize,
        /// The stored value.
        value: i128,
    },
    /// A label is too large for a model with this many outputs.
    #[error(
        "{file}: label {label} of sample {index} is out of range for a model with {classes} \
         classes (valid labels are 0 to {classes} - 1); use a model with more outputs or \
         check the label file"
    )]
    LabelOutOfRange {
        /// Name of the data set (its file).
        file: String,
        /// Sample number (0-based).
        index: usize,
        /// The offending label.
        label: u16,
        /// The model's class count.
        classes: usize,
    },
    /// The samples do not have the shape the caller needs.
    #[error(
        "{file}: samples are {actual:?} (channels, height, width) but {expected:?} is \
         required; use data of the model's input shape"
    )]
    ShapeMismatch {
        /// Name of the data set (its file).
        file: String,
        /// The required `[channels, height, width]`.
        expected: [usize; 3],
        /// The data set's `[channels, height, width]`.
        actual: [usize; 3],
    },
    /// A class has fewer samples than requested per class.
    #[error(
        "{file}: class {class} has {available} samples, fewer than the {requested} requested \
         per class; ask for at most {available}"
    )]
    NotEnoughSamples {
        /// Name of the data set (its file).
        file: String,
        /// The class that is short.
        class: usize,
        /// Samples of that class.
        available: usize,
        /// Samples requested per class.
        requested: usize,
    },
    /// A syntax or consistency error in a `.ts` file.
    #[error("{file}:{line}: {detail}")]
    TsSyntax {
        /// Path of the file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The Fashion-MNIST files are not in the given directory.
    #[error(
        "{dir}: Fashion-MNIST not found ({missing} is missing); install it with \
         `apt-get install dataset-fashion-mnist` or pass the directory that holds \
         {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz"
    )]
    FashionMnistMissing {
        /// The directory searched.
        dir: String,
        /// The first file that is missing.
        missing: String,
    },
    /// A corruption name that is not one of [`crate::data::Corruption::ALL`].
    #[error("unknown corruption '{name}'; valid names: {valid}")]
    UnknownCorruption {
        /// The name given.
        name: String,
        /// The valid names, comma-separated.
        valid: String,
    },
    /// A corruption spec without a severity from 1 to 5.
    #[error(
        "corruption '{spec}': expected NAME:SEVERITY with a severity from 1 to 5, \
         e.g. gaussian_noise:5"
    )]
    BadSeverity {
        /// The spec given.
        spec: String,
    },
}
