//! Loading IDX, NPY and `.ts` data, every error case, per-class sampling and corruptions.
//!
//! Fixture files are written into a temporary directory by each test, except the hand-written
//! `fixtures/tiny.ts`.

use std::io::Write;
use std::path::{Path, PathBuf};

use mcutrain::data::{
    self, corrupt::rotate, corrupt_dataset, Corruption, CorruptionSpec, DataError, Dataset, Split,
};

// ---------------------------------------------------------------------------------------------
// Fixture writers

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn idx(type_code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, type_code, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

/// An NPY file as `np.save` writes it: the header dict padded with spaces and a newline so
/// that the data start on a 64-byte boundary.
fn npy_with_header(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let prefix = if version == 1 { 10 } else { 12 };
    let mut header = dict.to_owned();
    while !(prefix + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend([version, 0]);
    if version == 1 {
        bytes.extend((header.len() as u16).to_le_bytes());
    } else {
        bytes.extend((header.len() as u32).to_le_bytes());
    }
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    npy_with_header(1, &dict, data)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u8_labels_npy(labels: &[u8]) -> Vec<u8> {
    npy("|u1", &[labels.len()], labels)
}

/// Loads and expects an error whose message starts with the file's path.
fn load_err(data: &Path, labels: Option<&Path>, named: &Path) -> DataError {
    let err = data::load(data, labels).expect_err("loading should fail");
    let message = err.to_string();
    assert!(
        message.contains(&named.display().to_string()),
        "message does not name {}: {message}",
        named.display()
    );
    err
}

/// A bad input: file name, file content, and a test of the expected error variant.
type BadFile = (&'static str, Vec<u8>, fn(&DataError) -> bool);

/// Writes each bad file into `dir` and checks that `load_file` fails on it with the expected
/// variant and a message that names the file.
fn check_bad_files(
    dir: &Path,
    cases: Vec<BadFile>,
    load_file: impl Fn(&Path) -> Result<Dataset, DataError>,
) {
    for (name, bytes, is_expected) in cases {
        let path = write(dir, name, &bytes);
        let err = load_file(&path).expect_err(name);
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{name}: {message}"
        );
        assert!(is_expected(&err), "{name}: {message}");
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// IDX

const PIXELS: [u8; 12] = [0, 255, 51, 102, 1, 2, 3, 4, 5, 6, 7, 8];

#[test]
fn idx_images_plain_and_gzipped_load_exactly() {
    let dir = tempdir();
    let images = idx(0x08, &[2, 2, 3], &PIXELS);
    let labels = idx(0x08, &[2], &[3, 1]);
    for (suffix, transform) in [("", false), (".gz", true)] {
        let enc = |b: &[u8]| if transform { gzip(b) } else { b.to_vec() };
        let data = write(dir.path(), &format!("images{suffix}"), &enc(&images));
        let lab = write(dir.path(), &format!("labels{suffix}"), &enc(&labels));
        let ds = data::load(&data, Some(&lab)).unwrap();
        assert_eq!((ds.channels, ds.height, ds.width, ds.len()), (1, 2, 3, 2));
        let expected: Vec<f32> = PIXELS.iter().map(|&p| p as f32 / 255.0).collect();
        assert_eq!(ds.samples, expected);
        assert_eq!(ds.sample(1), &expected[6..]);
        assert_eq!(ds.labels, vec![3, 1]);
        assert_eq!(ds.classes, 4);
        assert_eq!(ds.name, data.display().to_string());
    }
}

#[test]
fn idx_four_dimensional_images_keep_their_channels() {
    let dir = tempdir();
    let data = write(dir.path(), "x", &idx(0x08, &[1, 3, 2, 2], &PIXELS));
    let lab = write(dir.path(), "y", &idx(0x08, &[1], &[0]));
    let ds = data::load(&data, Some(&lab)).unwrap();
    assert_eq!(
        (ds.channels, ds.height, ds.width, ds.sample_len()),
        (3, 2, 2, 12)
    );
    assert_eq!(ds.samples[1], 1.0);
}

#[test]
fn format_is_recognised_by_content_not_extension() {
    let dir = tempdir();
    let data = write(
        dir.path(),
        "images.npy",
        &idx(0x08, &[1, 2, 2], &[0, 0, 0, 255]),
    );
    let lab = write(dir.path(), "labels.idx", &u8_labels_npy(&[2]));
    let ds = data::load(&data, Some(&lab)).unwrap();
    assert_eq!(ds.samples, vec![0.0, 0.0, 0.0, 1.0]);
    assert_eq!(ds.labels, vec![2]);
}

// ---------------------------------------------------------------------------------------------
// NPY

#[test]
fn npy_u1_three_dimensional_square_arrays_are_one_channel_images() {
    let dir = tempdir();
    let data = write(dir.path(), "x.npy", &npy("|u1", &[3, 2, 2], &PIXELS));
    let lab = write(dir.path(), "y.npy", &u8_labels_npy(&[0, 1, 0]));
    let ds = data::load(&data, Some(&lab)).unwrap();
    assert_eq!((ds.channels, ds.height, ds.width, ds.len()), (1, 2, 2, 3));
    let expected: Vec<f32> = PIXELS.iter().map(|&p| p as f32 / 255.0).collect();
    assert_eq!(ds.samples, expected);
    assert_eq!(ds.classes, 2);
}

#[test]
fn npy_f4_four_dimensional_arrays_are_taken_as_is() {
    let dir = tempdir();
    let values: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
    let data = write(
        dir.path(),
        "x.npy",
        &npy("<f4", &[2, 2, 2, 2], &f32_bytes(&values)),
    );
    let lab = write(dir.path(), "y.npy", &u8_labels_npy(&[1, 1]));
    let ds = data::load(&data, Some(&lab)).unwrap();
    assert_eq!((ds.channels, ds.height, ds.width), (2, 2, 2));
    assert_eq!(ds.samples, values);
}

#[test]
fn npy_f4_non_square_three_dimensional_arrays_are_time_series() {
    let dir = tempdir();
    let values: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let data = write(
        dir.path(),
        "x.npy",
        &npy("<f4", &[2, 2, 3], &f32_bytes(&values)),
    );
    let lab = write(dir.path(), "y.npy", &u8_labels_npy(&[0, 2]));
    let ds = data::load(&data, Some(&lab)).unwrap();
    assert_eq!((ds.channels, ds.height, ds.width), (2, 1, 3));
    assert_eq!(ds.samples, values);
    // The other reading of the same memory.
    let images = ds.clone().reshape(1, 2, 3).unwrap();
    assert_eq!(
        (images.channels, images.height, images.samples),
        (1, 2, ds.samples)
    );
}

#[test]
fn npy_versions_two_and_three_are_read() {
    let dir = tempdir();
    let dict = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), }";
    let lab = write(dir.path(), "y.npy", &u8_labels_npy(&[0]));
    for version in [2, 3] {
        let data = write(
            dir.path(),
            &format!("v{version}.npy"),
            &npy_with_header(version, dict, &[255, 0, 0, 255]),
        );
        let ds = data::load(&data, Some(&lab)).unwrap();
        assert_eq!(ds.samples, vec![1.0, 0.0, 0.0, 1.0], "version {version}");
    }
}

#[test]
fn npy_labels_in_every_integer_dtype() {
    let dir = tempdir();
    let data = write(dir.path(), "x.npy", &npy("|u1", &[3, 1, 1], &[0, 1, 2]));
    let expected = vec![7u16, 0, 300];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("|u1", vec![7, 0, 44]),
        ("|i1", vec![7, 0, 100]),
        (
            "<i2",
            [7i16, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "<u2",
            [7u16, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "<i4",
            [7i32, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "<u4",
            [7u32, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "<i8",
            [7i64, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "<u8",
            [7u64, 0, 300]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    for (descr, bytes) in cases {
        let lab = write(dir.path(), "y.npy", &npy(descr, &[3], &bytes));
        let ds = data::load(&data, Some(&lab)).unwrap();
        let want = match descr {
            "|u1" => vec![7, 0, 44],
            "|i1" => vec![7, 0, 100],
            _ => expected.clone(),
        };
        assert_eq!(ds.labels, want, "{descr}");
        assert_eq!(ds.classes, *want.iter().max().unwrap() as usize + 1);
    }
    // A column vector [N, 1] is accepted too.
    let lab = write(dir.path(), "col.npy", &npy("<i8", &[3, 1], &[0; 24]));
    assert_eq!(data::load(&data, Some(&lab)).unwrap().labels, vec![0, 0, 0]);
}

// ---------------------------------------------------------------------------------------------
// .ts

#[test]
fn ts_fixture_matches_hand_computed_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.ts");
    let ds = data::load(&path, None).unwrap();
    assert_eq!((ds.channels, ds.height, ds.width, ds.len()), (2, 1, 4, 3));
    assert_eq!(ds.classes, 2);
    assert_eq!(ds.labels, vec![1, 0, 1]); // run, walk, run with @classLabel walk run
    #[rustfmt::skip]
    let expected = [
        1.0, 2.0, 3.0, 0.0,   4.0, 5.0, 6.0, 0.0,
        0.5, 0.0, 0.0, 0.0,   -1.0, -2.0, -3.0, -4.0,
        7.0, 0.0, 0.0, 0.0,   8.0, 9.0, 0.0, 0.0,
    ];
    assert_eq!(ds.samples, expected);
}

#[test]
fn ts_with_unequal_lengths_and_missing_values_plain_and_gzipped() {
    let dir = tempdir();
    let text = "#comment\r\n@problemName X\r\n@univariate true\r\n@classLabel true b a c\r\n\
                @DATA\r\n\r\n?,1.5,?,2e1:c\r\n-0.25:a\r\n";
    for (name, bytes) in [
        ("s.ts", text.as_bytes().to_vec()),
        ("s.ts.gz", gzip(text.as_bytes())),
    ] {
        let path = write(dir.path(), name, &bytes);
        let ds = data::load(&path, None).unwrap();
        assert_eq!((ds.channels, ds.height, ds.width), (1, 1, 4));
        assert_eq!(ds.samples, vec![0.0, 1.5, 0.0, 20.0, -0.25, 0.0, 0.0, 0.0]);
        assert_eq!(ds.labels, vec![2, 1]);
        assert_eq!(ds.classes, 3);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: each asserts the variant and that the message names the file

#[test]
fn unreadable_empty_and_unknown_files() {
    let dir = tempdir();
    let missing = dir.path().join("nope.npy");
    assert!(matches!(
        load_err(&missing, None, &missing),
        DataError::Io { .. }
    ));
    let empty = write(dir.path(), "empty", b"");
    assert!(matches!(
        load_err(&empty, None, &empty),
        DataError::Empty { .. }
    ));
    let zip = write(dir.path(), "x.zip", b"PK\x03\x04rest");
    let err = load_err(&zip, None, &zip);
    assert!(matches!(err, DataError::UnknownFormat { .. }));
    assert!(err.to_string().contains("50 4b 03 04"), "{err}");
    let mut bad_gz = gzip(&idx(0x08, &[1, 2, 2], &[0; 4]));
    bad_gz.truncate(bad_gz.len() / 2);
    let gz = write(dir.path(), "x.gz", &bad_gz);
    assert!(matches!(load_err(&gz, None, &gz), DataError::Gzip { .. }));
}

#[test]
fn idx_errors() {
    let dir = tempdir();
    let lab = write(dir.path(), "labels", &idx(0x08, &[1], &[0]));
    let cases: Vec<BadFile> = vec![
        ("type", idx(0x07, &[1, 2, 2], &[0; 4]), |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        ("float", idx(0x0D, &[1, 1, 1], &[0; 4]), |e| {
            matches!(e, DataError::UnsupportedDtype { .. })
        }),
        ("truncated", idx(0x08, &[2, 2, 3], &PIXELS[..10]), |e| {
            matches!(
                e,
                DataError::SizeMismatch {
                    expected: 12,
                    actual: 10,
                    ..
                }
            )
        }),
        ("longer", idx(0x08, &[1, 1, 1], &[1, 2]), |e| {
            matches!(
                e,
                DataError::SizeMismatch {
                    expected: 1,
                    actual: 2,
                    ..
                }
            )
        }),
        ("dims", vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0], |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        ("zero_dims", vec![0, 0, 8, 0], |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        ("no_samples", idx(0x08, &[0, 2, 2], &[]), |e| {
            matches!(e, DataError::Empty { .. })
        }),
        ("zero_width", idx(0x08, &[1, 2, 0], &[]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("one_d", idx(0x08, &[4], &[0; 4]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("five_d", idx(0x08, &[1, 1, 1, 1, 1], &[0]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
    ];
    check_bad_files(dir.path(), cases, |path| data::load(path, Some(&lab)));
    let truncated = write(dir.path(), "t", &idx(0x08, &[2, 2, 3], &PIXELS[..10]));
    let message = load_err(&truncated, Some(&lab), &truncated).to_string();
    assert!(
        message.contains("12 bytes") && message.contains("holds 10"),
        "{message}"
    );
}

#[test]
fn npy_errors() {
    let dir = tempdir();
    let lab = write(dir.path(), "labels.npy", &u8_labels_npy(&[0]));
    let good_dict = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), }";
    let cases: Vec<BadFile> = vec![
        ("version", npy_with_header(4, good_dict, &[0; 4]), |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        ("not_dict", npy_with_header(1, "[1, 2]", &[0; 4]), |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        (
            "garbage",
            npy_with_header(1, "{'descr': <f4}", &[0; 4]),
            |e| matches!(e, DataError::BadHeader { .. }),
        ),
        (
            "no_shape",
            npy_with_header(1, "{'descr': '|u1', 'fortran_order': False}", &[0; 4]),
            |e| matches!(e, DataError::BadHeader { .. }),
        ),
        (
            "header_past_end",
            b"\x93NUMPY\x01\x00\xff\x00{'descr'".to_vec(),
            |e| matches!(e, DataError::BadHeader { .. }),
        ),
        ("magic_only", b"\x93NUMPY".to_vec(), |e| {
            matches!(e, DataError::BadHeader { .. })
        }),
        (
            "fortran",
            npy_with_header(
                1,
                "{'descr': '|u1', 'fortran_order': True, 'shape': (1, 2, 2), }",
                &[0; 4],
            ),
            |e| matches!(e, DataError::FortranOrder { .. }),
        ),
        ("f8", npy("<f8", &[1, 1, 1], &[0; 8]), |e| {
            matches!(e, DataError::UnsupportedDtype { .. })
        }),
        ("big_endian", npy(">f4", &[1, 1, 1], &[0; 4]), |e| {
            matches!(e, DataError::UnsupportedDtype { .. })
        }),
        (
            "structured",
            npy_with_header(
                1,
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            |e| matches!(e, DataError::UnsupportedDtype { .. }),
        ),
        ("two_d", npy("|u1", &[1, 4], &[0; 4]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("five_d", npy("|u1", &[1, 1, 1, 2, 2], &[0; 4]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("truncated", npy("<f4", &[1, 2, 2], &[0; 15]), |e| {
            matches!(
                e,
                DataError::SizeMismatch {
                    expected: 16,
                    actual: 15,
                    ..
                }
            )
        }),
        ("no_samples", npy("<f4", &[0, 2, 2], &[]), |e| {
            matches!(e, DataError::Empty { .. })
        }),
    ];
    check_bad_files(dir.path(), cases, |path| data::load(path, Some(&lab)));
    let f8 = write(dir.path(), "train.npy", &npy("<f8", &[1, 1, 1], &[0; 8]));
    let message = load_err(&f8, Some(&lab), &f8).to_string();
    assert!(
        message.contains("dtype '<f8' is not supported")
            && message.contains("uint8 ('|u1') or float32 ('<f4')"),
        "{message}"
    );
    let fortran = write(
        dir.path(),
        "f.npy",
        &npy_with_header(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2, 2), }",
            &[0; 16],
        ),
    );
    assert!(load_err(&fortran, Some(&lab), &fortran)
        .to_string()
        .contains("C order"));
}

#[test]
fn label_errors() {
    let dir = tempdir();
    let data = write(dir.path(), "x.npy", &npy("|u1", &[2, 1, 1], &[0, 1]));
    let cases: Vec<BadFile> = vec![
        ("negative", npy("|i1", &[2], &[0, 0xff]), |e| {
            matches!(
                e,
                DataError::LabelValue {
                    index: 1,
                    value: -1,
                    ..
                }
            )
        }),
        (
            "too_large",
            npy("<i4", &[2], &[0, 0, 0, 0, 0x70, 0x11, 0x01, 0]),
            |e| {
                matches!(
                    e,
                    DataError::LabelValue {
                        index: 1,
                        value: 70000,
                        ..
                    }
                )
            },
        ),
        ("float", npy("<f4", &[2], &[0; 8]), |e| {
            matches!(e, DataError::UnsupportedDtype { role: "labels", .. })
        }),
        ("big_endian", npy(">i4", &[2], &[0; 8]), |e| {
            matches!(e, DataError::UnsupportedDtype { .. })
        }),
        ("images_as_labels", npy("|u1", &[2, 1, 1], &[0, 1]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("idx_3d", idx(0x08, &[2, 1, 1], &[0, 1]), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
        ("truncated", npy("<i8", &[2], &[0; 12]), |e| {
            matches!(e, DataError::SizeMismatch { .. })
        }),
        ("ts", b"@classLabel true a\n@data\n1:a\n".to_vec(), |e| {
            matches!(e, DataError::BadShape { .. })
        }),
    ];
    check_bad_files(dir.path(), cases, |lab| data::load(&data, Some(lab)));
    // Count mismatch names both files.
    let three = write(dir.path(), "three.npy", &u8_labels_npy(&[0, 1, 2]));
    let err = load_err(&data, Some(&three), &three);
    assert!(matches!(
        err,
        DataError::LabelCount {
            sample_count: 2,
            label_count: 3,
            ..
        }
    ));
    assert!(err.to_string().contains(&data.display().to_string()));
    // IDX and NPY data need labels; .ts data must not get any.
    assert!(matches!(
        load_err(&data, None, &data),
        DataError::MissingLabels { .. }
    ));
    let ts = write(dir.path(), "a.ts", b"@classLabel true a\n@data\n1:a\n");
    assert!(matches!(
        load_err(&ts, Some(&three), &ts),
        DataError::UnexpectedLabels { .. }
    ));
}

#[test]
fn ts_errors() {
    let dir = tempdir();
    let cases: Vec<BadFile> = vec![
        (
            "unknown_label",
            b"@classLabel true a b\n@data\n1,2:c\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 3, .. }),
        ),
        (
            "bad_number",
            b"@classLabel true a\n@data\n1,x:a\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 3, .. }),
        ),
        (
            "no_labels",
            b"@problemName P\n@data\n1,2:a\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 2, .. }),
        ),
        (
            "dims",
            b"@classLabel true a\n@data\n1:2:a\n1:a\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 4, .. }),
        ),
        (
            "declared_dims",
            b"@dimensions 2\n@classLabel true a\n@data\n1:a\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 4, .. }),
        ),
        (
            "timestamps",
            b"@timeStamps true\n@classLabel true a\n@data\n".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 1, .. }),
        ),
        ("no_data_line", b"@classLabel true a\n1:a\n".to_vec(), |e| {
            matches!(e, DataError::TsSyntax { line: 2, .. })
        }),
        ("missing_data", b"@classLabel true a\n".to_vec(), |e| {
            matches!(e, DataError::TsSyntax { .. })
        }),
        (
            "cut_short",
            b"@classLabel true walk run\n@data\n1,2:3,4:ru".to_vec(),
            |e| matches!(e, DataError::TsSyntax { line: 3, .. }),
        ),
        (
            "no_cases",
            b"@classLabel true a\n@data\n# nothing\n".to_vec(),
            |e| matches!(e, DataError::Empty { .. }),
        ),
        (
            "not_utf8",
            b"@classLabel true \xff\n@data\n".to_vec(),
            |e| matches!(e, DataError::BadHeader { .. }),
        ),
    ];
    check_bad_files(dir.path(), cases, |path| data::load(path, None));
}

// ---------------------------------------------------------------------------------------------
// Data-set operations

/// 10 samples of 1x1x2: labels 0,1,2,0,1,2,0,1,2,0 and values (i, -i).
fn ten() -> Dataset {
    Dataset {
        channels: 1,
        height: 1,
        width: 2,
        samples: (0..10).flat_map(|i| [i as f32, -(i as f32)]).collect(),
        labels: (0..10).map(|i| (i % 3) as u16).collect(),
        classes: 3,
        name: "ten.npy".into(),
    }
}

#[test]
fn per_class_is_balanced_seeded_and_keeps_order() {
    let ds = ten();
    let a = ds.per_class(3, 42).unwrap();
    assert_eq!(a, ds.per_class(3, 42).unwrap());
    assert_eq!(a.len(), 9);
    for class in 0..3 {
        assert_eq!(a.labels.iter().filter(|&&l| l == class).count(), 3);
    }
    // Only class 0 has a 4th sample to choose from; samples stay in data-set order.
    let firsts: Vec<f32> = (0..a.len()).map(|i| a.sample(i)[0]).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{firsts:?}");
    for i in 0..a.len() {
        let original = a.sample(i)[0] as usize;
        assert_eq!(a.labels[i], ds.labels[original]);
        assert_eq!(a.sample(i), ds.sample(original));
    }
    let picks = |seed| ds.per_class(1, seed).unwrap().samples;
    assert!(
        (0..20).any(|seed| picks(seed) != picks(0)),
        "seed has no effect"
    );
    let err = ds.per_class(4, 1).unwrap_err();
    assert!(matches!(
        err,
        DataError::NotEnoughSamples {
            class: 1,
            available: 3,
            requested: 4,
            ..
        }
    ));
    assert!(err.to_string().contains("ten.npy"));
}

#[test]
fn label_and_shape_checks() {
    let ds = ten();
    assert!(ds.check_labels(3).is_ok());
    let err = ds.check_labels(2).unwrap_err();
    assert!(matches!(
        err,
        DataError::LabelOutOfRange {
            index: 2,
            label: 2,
            classes: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("ten.npy"));
    assert!(ds.check_shape(1, 1, 2).is_ok());
    let err = ds.check_shape(1, 28, 28).unwrap_err();
    assert!(matches!(
        err,
        DataError::ShapeMismatch {
            expected: [1, 28, 28],
            actual: [1, 1, 2],
            ..
        }
    ));
    assert!(err.to_string().contains("ten.npy"));
    assert!(matches!(
        ds.reshape(2, 2, 1),
        Err(DataError::ShapeMismatch { .. })
    ));
}

#[test]
fn fashion_mnist_missing_directory_says_how_to_install() {
    let dir = tempdir();
    let err = data::fashion_mnist(dir.path(), Split::Test).unwrap_err();
    assert!(matches!(err, DataError::FashionMnistMissing { .. }));
    let message = err.to_string();
    assert!(message.contains("dataset-fashion-mnist") && message.contains("t10k-images"));
}

#[test]
fn fashion_mnist_when_installed() {
    let dir = Path::new(data::FASHION_MNIST_DIR);
    if !dir.exists() {
        println!(
            "note: {} is absent; skipping the Fashion-MNIST check",
            dir.display()
        );
        return;
    }
    for (split, count) in [(Split::Train, 60_000), (Split::Test, 10_000)] {
        let ds = data::fashion_mnist(dir, split).unwrap();
        assert_eq!(ds.len(), count);
        assert_eq!(
            (ds.channels, ds.height, ds.width, ds.classes),
            (1, 28, 28, 10)
        );
        assert!(ds.samples.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(ds.labels.iter().map(|&l| l as usize).max(), Some(9));
        assert!(ds.check_labels(10).is_ok());
    }
    // On real images every corruption also grows with severity (averaged over 300 images).
    let test = data::fashion_mnist(dir, Split::Test).unwrap();
    let some = test.subset(&(0..300).collect::<Vec<_>>());
    for corruption in Corruption::ALL {
        let diffs: Vec<f64> = (1..=5)
            .map(|s| mean_abs_diff(&some, &corrupt_dataset(&some, spec(corruption, s), 3)))
            .collect();
        assert!(
            diffs.windows(2).all(|w| w[0] <= w[1]),
            "{corruption}: {diffs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Corruptions

fn image(channels: usize, height: usize, width: usize, values: Vec<f32>) -> Dataset {
    let count = values.len() / (channels * height * width);
    Dataset {
        channels,
        height,
        width,
        samples: values,
        labels: vec![0; count],
        classes: 1,
        name: "img".into(),
    }
}

/// Four 28x28 test images: smooth garment-like ellipses of growing width on black, with a
/// soft edge and low-frequency shading (hard, grid-aligned edges can make `pixelate` at 10 px
/// closer to the original than at 12 px on a single image).
fn garments() -> Dataset {
    let mut values = Vec::new();
    for k in 0..4 {
        for y in 0..28 {
            for x in 0..28 {
                let (x, y) = (x as f32, y as f32);
                let dx = (x - 13.5) / (7.0 + k as f32);
                let dy = (y - 14.0) / 11.0;
                let edge = ((1.0 - (dx * dx + dy * dy).sqrt()) * 4.0).clamp(0.0, 1.0);
                let shade = 0.5 + 0.3 * (x * 0.4).sin() * (y * 0.3).cos();
                values.push(edge * shade);
            }
        }
    }
    image(1, 28, 28, values)
}

fn mean_abs_diff(a: &Dataset, b: &Dataset) -> f64 {
    let total: f64 = a
        .samples
        .iter()
        .zip(&b.samples)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum();
    total / a.samples.len() as f64
}

fn spec(corruption: Corruption, severity: u8) -> CorruptionSpec {
    CorruptionSpec {
        corruption,
        severity,
    }
}

#[test]
fn every_corruption_grows_with_severity_and_stays_in_range() {
    let ds = garments();
    for corruption in Corruption::ALL {
        let mut previous = 0.0;
        for severity in 1..=5 {
            let out = corrupt_dataset(&ds, spec(corruption, severity), 7);
            assert!(
                out.samples.iter().all(|v| (0.0..=1.0).contains(v)),
                "{corruption}"
            );
            assert_eq!(
                (out.labels.clone(), out.sample_len()),
                (ds.labels.clone(), 784)
            );
            let diff = mean_abs_diff(&ds, &out);
            assert!(diff > 0.0, "{corruption}:{severity} changes nothing");
            assert!(
                diff >= previous,
                "{corruption}: severity {severity} diff {diff} < {previous}"
            );
            previous = diff;
        }
    }
}

#[test]
fn corruptions_are_deterministic_and_independent_of_threads() {
    let ds = garments();
    for corruption in Corruption::ALL {
        let s = spec(corruption, 3);
        let a = corrupt_dataset(&ds, s, 11);
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = single.install(|| corrupt_dataset(&ds, s, 11));
        assert_eq!(a, b, "{corruption}");
        assert_eq!(a.name, format!("img ({})", s));
        let random = matches!(
            corruption,
            Corruption::GaussianNoise | Corruption::ShotNoise | Corruption::ImpulseNoise
        );
        let other_seed = corrupt_dataset(&ds, s, 12);
        assert_eq!(other_seed != a, random, "{corruption}");
    }
}

#[test]
fn pointwise_corruptions_on_a_two_by_two_image() {
    let ds = image(1, 2, 2, vec![0.0, 0.25, 0.5, 1.0]);
    let run = |c, s| corrupt_dataset(&ds, spec(c, s), 0).samples;
    // Mean 0.4375, c = 0.5: (x - m) * c + m.
    assert_eq!(
        run(Corruption::Contrast, 2),
        vec![0.21875, 0.34375, 0.46875, 0.71875]
    );
    assert_eq!(run(Corruption::Brightness, 5), vec![0.5, 0.75, 1.0, 1.0]);
    assert_eq!(run(Corruption::Inversion, 5), vec![1.0, 0.75, 0.5, 0.0]);
    let blended = run(Corruption::Inversion, 1); // 0.8 x + 0.2 (1 - x)
    for (got, want) in blended.iter().zip([0.2, 0.35, 0.5, 0.8]) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

#[test]
fn contrast_uses_the_mean_of_each_channel() {
    let ds = image(2, 1, 2, vec![0.0, 0.5, 0.5, 1.0]);
    let out = corrupt_dataset(&ds, spec(Corruption::Contrast, 2), 0);
    assert_eq!(out.samples, vec![0.125, 0.375, 0.625, 0.875]);
}

#[test]
fn pixelate_and_blur_keep_a_constant_image_constant() {
    for side in [28, 32, 9] {
        let ds = image(1, side, side, vec![0.375; side * side]);
        for severity in 1..=5 {
            let out = corrupt_dataset(&ds, spec(Corruption::Pixelate, severity), 0);
            assert!(
                out.samples.iter().all(|&v| v == 0.375),
                "{side} px, {severity}"
            );
            let out = corrupt_dataset(&ds, spec(Corruption::DefocusBlur, severity), 0);
            assert!(out.samples.iter().all(|&v| (v - 0.375).abs() < 1e-6));
        }
    }
}

#[test]
fn pixelate_averages_blocks() {
    // 28 -> 8 is not an integer ratio; 4x4 -> 1x1 on a 4-px image at severity 5 (round(8*4/28) = 1).
    let ds = image(1, 4, 4, (0..16).map(|v| v as f32 / 16.0).collect());
    let out = corrupt_dataset(&ds, spec(Corruption::Pixelate, 5), 0);
    assert!(
        out.samples.iter().all(|&v| v == 7.5 / 16.0),
        "{:?}",
        out.samples
    );
}

#[test]
fn rotation_by_zero_is_exact_and_by_ninety_is_counter_clockwise() {
    let plane: Vec<f32> = (0..9).map(|v| v as f32 / 8.0).collect();
    let mut out = vec![0.0; 9];
    rotate(&plane, 3, 3, 0.0, &mut out);
    assert_eq!(out, plane);
    // 0 1 2      2 5 8
    // 3 4 5  ->  1 4 7   (counter-clockwise as displayed)
    // 6 7 8      0 3 6
    rotate(&plane, 3, 3, 90.0, &mut out);
    let want = [2.0, 5.0, 8.0, 1.0, 4.0, 7.0, 0.0, 3.0, 6.0].map(|v: f32| v / 8.0);
    for (got, want) in out.iter().zip(want) {
        assert!((got - want).abs() < 1e-5, "{out:?}");
    }
    // Corners of a 2x2 plane rotated by 45 degrees fall outside and are filled with 0.
    rotate(&[1.0; 4], 2, 2, 45.0, &mut out[..4]);
    assert!(
        out[..4].iter().all(|&v| v < 1.0 && v > 0.0),
        "{:?}",
        &out[..4]
    );
}

#[test]
fn corruption_names_and_specs_parse() {
    let names: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "gaussian_noise",
            "shot_noise",
            "impulse_noise",
            "contrast",
            "brightness",
            "defocus_blur",
            "pixelate",
            "rotation",
            "inversion"
        ]
    );
    for c in Corruption::ALL {
        assert_eq!(c.name().parse::<Corruption>().unwrap(), c);
        for severity in 1..=5 {
            let s = spec(c, severity);
            assert_eq!(s.to_string().parse::<CorruptionSpec>().unwrap(), s);
        }
        assert_eq!(c.parameter(0), None);
        assert_eq!(c.parameter(6), None);
    }
    assert_eq!(
        "gaussian_noise:5".parse::<CorruptionSpec>().unwrap(),
        spec(Corruption::GaussianNoise, 5)
    );
    assert_eq!(Corruption::ShotNoise.parameter(2), Some(25.0));
    assert_eq!(Corruption::DefocusBlur.parameter(3), Some(1.0));
    let err = "fog:3".parse::<CorruptionSpec>().unwrap_err();
    assert!(matches!(err, DataError::UnknownCorruption { .. }));
    assert!(names.iter().all(|n| err.to_string().contains(n)), "{err}");
    for bad in [
        "contrast:0",
        "contrast:6",
        "contrast",
        "contrast:x",
        "contrast:-1",
    ] {
        let err = bad.parse::<CorruptionSpec>().unwrap_err();
        assert!(matches!(err, DataError::BadSeverity { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("1 to 5"));
    }
}
