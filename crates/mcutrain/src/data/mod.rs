//! Data sets: loading user data (IDX, NPY, UEA/UCR `.ts`) and Fashion-MNIST into an in-memory
//! [`Dataset`], seeded per-class sampling, and CIFAR-10-C style corruptions ([`corrupt`]).
//!
//! [`load`] recognises a file by its content, never by its extension: gzip (`1f 8b`) is
//! decompressed first, then `\x93NUMPY` means NPY, two zero bytes mean IDX, and text that
//! starts with a `@` header or a `#` comment means `.ts`. IDX and NPY data need a separate
//! label file (IDX or NPY, also recognised by content); a `.ts` file holds its own labels.
//! Loading never panics: every malformed input gives a [`DataError`] that names the file.

mod array;
pub mod corrupt;
mod error;
mod idx;
mod npy;
mod ts;

use std::io::Read;
use std::path::Path;

use mcutrain_core::rng::Rng;

pub use corrupt::{corrupt_dataset, Corruption, CorruptionSpec};
pub use error::DataError;

/// Where Debian's `dataset-fashion-mnist` package installs Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// In-memory data set: `len` samples of shape `[channels, height, width]` (time series:
/// height 1, width = length), f32, batch-major NCHW.
///
/// Invariant: `samples.len() == labels.len() * channels * height * width`, and for data sets
/// that come from this module every label is `< classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Channels per sample (1 for grayscale images, one per dimension for time series).
    pub channels: usize,
    /// Rows per channel (1 for time series).
    pub height: usize,
    /// Columns per row (the series length for time series).
    pub width: usize,
    /// All samples back to back, each `[channels][height][width]`.
    pub samples: Vec<f32>,
    /// Class index of each sample.
    pub labels: Vec<u16>,
    /// Number of classes: the `.ts` `@classLabel` count, 10 for Fashion-MNIST, otherwise the
    /// largest label + 1.
    pub classes: usize,
    /// Where the data came from (the data file's path as given), used in messages.
    pub name: String,
}

/// Which part of a data set with a fixed train/test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training part (Fashion-MNIST: 60000 images).
    Train,
    /// The test part (Fashion-MNIST: 10000 images).
    Test,
}

/// Samples decoded from a data file, before labels are attached; the sample count is
/// `values.len() / (channels * height * width)`.
#[derive(Debug)]
pub(crate) struct Samples {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) values: Vec<f32>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample: `channels * height * width`.
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Sample `i` as `[channels][height][width]`. Panics if `i >= len()`.
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.samples[i * n..(i + 1) * n]
    }

    /// The samples at `indices`, in that order (repeats allowed); same shape, classes and name.
    /// Panics if an index is `>= len()`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut samples = Vec::with_capacity(indices.len() * self.sample_len());
        for &i in indices {
            samples.extend_from_slice(self.sample(i));
        }
        Dataset {
            samples,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            name: self.name.clone(),
            ..*self
        }
    }

    /// `n` samples of each class `0..classes`, chosen at random but deterministically from
    /// `seed`; the chosen samples keep the order they have in `self`.
    ///
    /// Selection: one [`Rng`] seeded with `seed` draws, class after class, a partial
    /// Fisher-Yates shuffle of that class's sample indices and keeps the first `n`.
    /// Fails with [`DataError::NotEnoughSamples`] when a class has fewer than `n` samples.
    pub fn per_class(&self, n: usize, seed: u64) -> Result<Dataset, DataError> {
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes];
        for (i, &label) in self.labels.iter().enumerate() {
            if let Some(members) = by_class.get_mut(label as usize) {
                members.push(i);
            }
        }
        let mut rng = Rng::new(seed);
        let mut chosen = Vec::with_capacity(n * self.classes);
        for (class, members) in by_class.iter_mut().enumerate() {
            if members.len() < n {
                return Err(DataError::NotEnoughSamples {
                    file: self.name.clone(),
                    class,
                    available: members.len(),
                    requested: n,
                });
            }
            for k in 0..n {
                let remaining = (members.len() - k) as u32;
                let pick = k + rng.below(remaining) as usize;
                members.swap(k, pick);
            }
            chosen.extend_from_slice(&members[..n]);
        }
        chosen.sort_unstable();
        Ok(self.subset(&chosen))
    }

    /// Checks that every label is a valid output of a model with `classes` outputs; the error
    /// names the first sample whose label is `>= classes`.
    pub fn check_labels(&self, classes: usize) -> Result<(), DataError> {
        match self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &label)| label as usize >= classes)
        {
            Some((index, &label)) => Err(DataError::LabelOutOfRange {
                file: self.name.clone(),
                index,
                label,
                classes,
            }),
            None => Ok(()),
        }
    }

    /// Checks that samples are `[channels, height, width]`.
    pub fn check_shape(
        &self,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<(), DataError> {
        let expected = [channels, height, width];
        let actual = [self.channels, self.height, self.width];
        if expected == actual {
            Ok(())
        } else {
            Err(DataError::ShapeMismatch {
                file: self.name.clone(),
                expected,
                actual,
            })
        }
    }

    /// The same samples read as `[channels, height, width]`, which must hold the same number
    /// of values per sample (the memory layout does not change). Use it when a 3-D NPY array
    /// was read the other way (images vs time series, see [`load`]).
    pub fn reshape(
        self,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Dataset, DataError> {
        let expected = [channels, height, width];
        if channels * height * width != self.sample_len() || expected.contains(&0) {
            return Err(DataError::ShapeMismatch {
                file: self.name,
                expected,
                actual: [self.channels, self.height, self.width],
            });
        }
        Ok(Dataset {
            channels,
            height,
            width,
            ..self
        })
    }
}

/// The file formats [`load`] recognises.
#[derive(Debug)]
enum Format {
    Idx,
    Npy,
    Ts,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The file's bytes, gunzipped when they start with the gzip magic `1f 8b`.
fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        file: display(path),
        source,
    })?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut plain)
        .map_err(|source| DataError::Gzip {
            file: display(path),
            source,
        })?;
    Ok(plain)
}

/// Recognises the format of (decompressed) file content.
fn sniff(file: &str, bytes: &[u8]) -> Result<Format, DataError> {
    if bytes.starts_with(npy::MAGIC) {
        Ok(Format::Npy)
    } else if idx::looks_like(bytes) {
        Ok(Format::Idx)
    } else if ts::looks_like(bytes) {
        Ok(Format::Ts)
    } else if bytes.iter().all(u8::is_ascii_whitespace) {
        Err(DataError::Empty {
            file: file.to_owned(),
        })
    } else {
        Err(DataError::UnknownFormat {
            file: file.to_owned(),
            head: bytes
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

/// Loads a data set from `data` and, for IDX and NPY data, the labels from `labels`.
///
/// Formats are recognised by content (see the module documentation):
/// - IDX: unsigned-byte images `[N, H, W]` (1 channel) or `[N, C, H, W]`, scaled by `1 / 255`;
///   labels `[N]` of unsigned bytes.
/// - NPY 1.0/2.0/3.0 in C order: `|u1` (scaled by `1 / 255`) or `<f4` (as is), shape
///   `[N, C, H, W]`, `[N, H, W]` or `[N, C, L]`; a 3-D `[N, A, B]` is read as one-channel
///   images when `A == B` and as `A`-channel time series (height 1, width `B`) otherwise
///   ([`Dataset::reshape`] switches). Labels `[N]` or `[N, 1]` of `|u1 |i1 <i2 <u2 <i4 <u4
///   <i8 <u8`, each in `0..=65535`.
/// - `.ts`: see the `ts` format notes; missing values read as 0 and shorter series are padded
///   with 0 at the end to the longest series. `labels` must be `None`.
///
/// `classes` is the `.ts` label count, otherwise the largest label + 1; `name` is `data`'s
/// path. Memory: the decompressed file plus the `f32` samples.
pub fn load(data: &Path, labels: Option<&Path>) -> Result<Dataset, DataError> {
    let file = display(data);
    let bytes = read_file(data)?;
    let (samples, format) = match sniff(&file, &bytes)? {
        Format::Ts => {
            return match labels {
                Some(labels) => Err(DataError::UnexpectedLabels {
                    file,
                    labels: display(labels),
                }),
                None => ts::read(&file, &bytes),
            }
        }
        Format::Idx => (idx::read_samples(&file, &bytes)?, "IDX"),
        Format::Npy => (npy::read_samples(&file, &bytes)?, "NPY"),
    };
    drop(bytes);
    let Some(labels_path) = labels else {
        return Err(DataError::MissingLabels { file, format });
    };
    let labels_file = display(labels_path);
    let label_bytes = read_file(labels_path)?;
    let labels = match sniff(&labels_file, &label_bytes)? {
        Format::Idx => idx::read_labels(&labels_file, &label_bytes)?,
        Format::Npy => npy::read_labels(&labels_file, &label_bytes)?,
        Format::Ts => {
            return Err(DataError::BadShape {
                file: labels_file,
                shape: Vec::new(),
                expected: "an IDX or NPY label array (a .ts file is data, not labels)",
            })
        }
    };
    let sample_len = samples.channels * samples.height * samples.width;
    let sample_count = samples.values.len() / sample_len;
    if labels.len() != sample_count {
        return Err(DataError::LabelCount {
            file,
            labels: labels_file,
            sample_count,
            label_count: labels.len(),
        });
    }
    Ok(Dataset {
        channels: samples.channels,
        height: samples.height,
        width: samples.width,
        samples: samples.values,
        classes: labels.iter().max().map_or(0, |&m| m as usize + 1),
        labels,
        name: file,
    })
}

/// Loads one split of Fashion-MNIST from `dir` (normally [`FASHION_MNIST_DIR`]):
/// `{train,t10k}-images-idx3-ubyte.gz` with `{train,t10k}-labels-idx1-ubyte.gz`.
///
/// Gives 1 x 28 x 28 images in `[0, 1]`, 10 classes, named `fashion-mnist-train` or
/// `fashion-mnist-test`.
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    if let Some(missing) = [&images, &labels].into_iter().find(|p| !p.exists()) {
        return Err(DataError::FashionMnistMissing {
            dir: display(dir),
            missing: display(missing),
        });
    }
    let mut ds = load(&images, Some(&labels))?;
    ds.check_labels(10)?;
    ds.classes = 10;
    ds.name = match split {
        Split::Train => "fashion-mnist-train",
        Split::Test => "fashion-mnist-test",
    }
    .into();
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(labels: &[u16], classes: usize) -> Dataset {
        Dataset {
            channels: 1,
            height: 1,
            width: 2,
            samples: (0..labels.len() * 2).map(|v| v as f32).collect(),
            labels: labels.to_vec(),
            classes,
            name: "toy.npy".into(),
        }
    }

    #[test]
    fn subset_copies_samples_and_labels_in_order() {
        let ds = toy(&[0, 1, 2], 3);
        let sub = ds.subset(&[2, 0, 2]);
        assert_eq!(sub.samples, vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        assert_eq!(sub.labels, vec![2, 0, 2]);
        assert_eq!((sub.classes, sub.sample_len()), (3, 2));
    }

    #[test]
    fn sniff_sees_content_not_names() {
        assert!(matches!(sniff("a", b"\x93NUMPY\x01\x00"), Ok(Format::Npy)));
        assert!(matches!(sniff("a", &[0, 0, 8, 1]), Ok(Format::Idx)));
        assert!(matches!(sniff("a", b"# c\n@data"), Ok(Format::Ts)));
        assert!(matches!(sniff("a", b" \n"), Err(DataError::Empty { .. })));
        let err = sniff("a.npy", b"PK\x03\x04").unwrap_err();
        assert!(err.to_string().contains("50 4b 03 04"), "{err}");
    }

    #[test]
    fn per_class_with_zero_is_empty_and_reshape_keeps_values() {
        let ds = toy(&[0, 1], 2);
        assert!(ds.per_class(0, 1).unwrap().is_empty());
        let r = ds.clone().reshape(2, 1, 1).unwrap();
        assert_eq!((r.channels, r.width, &r.samples), (2, 1, &ds.samples));
        assert!(ds.reshape(3, 1, 1).is_err());
    }
}
