//! The `mcutrain` command as a user runs it: a small end-to-end pipeline on user data in NPY
//! files, byte-identical outputs, and clear errors (exit code 2, no panic) on bad input.

#[path = "common/cli.rs"]
mod cli_helpers;
use cli_helpers::{mcutrain, ok_json, write_npy};
use std::path::{Path, PathBuf};

/// Run, expect failure with exit code 2 and a message containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = mcutrain(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "mcutrain {args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "mcutrain {args:?} panicked: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "mcutrain {args:?}: message lacks '{n}': {stderr}"
        );
    }
}

/// `n` 28x28 uint8 images whose brightness pattern depends on the label (label = i % classes).
fn write_images(dir: &Path, n: usize, classes: u8) -> (PathBuf, PathBuf) {
    let mut pixels = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % classes as usize) as u8;
        for y in 0..28 {
            for x in 0..28 {
                let on = (y / 7 + x / 7) % classes as usize == label as usize;
                pixels.push(if on {
                    200
                } else {
                    ((x * 7 + y * 3 + i) % 40) as u8
                });
            }
        }
        labels.push(label);
    }
    let (d, l) = (dir.join("images.npy"), dir.join("labels.npy"));
    write_npy(&d, "|u1", &[n, 28, 28], &pixels);
    write_npy(&l, "|u1", &[n], &labels);
    (d, l)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pipeline_on_user_data_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (data, labels) = write_images(dir.path(), 64, 4);
    let init = dir.path().join("init.mcut");
    let out = mcutrain(&["model", "fashion-shift", "--seed", "3", "--out", s(&init)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let common = [
        "--data",
        s(&data),
        "--labels",
        s(&labels),
        "--eval-data",
        s(&data),
        "--eval-labels",
        s(&labels),
        "--epochs",
        "2",
        "--batch",
        "8",
        "--json",
    ];
    let f1 = dir.path().join("f1.mcut");
    let f2 = dir.path().join("f2.mcut");
    for f in [&f1, &f2] {
        let mut args = vec![
            "train",
            s(&init),
            "--method",
            "float",
            "--lr",
            "0.05",
            "--out",
            s(f),
        ];
        args.extend(common);
        let j = ok_json(&args);
        assert_eq!(j["method"], "float");
        assert_eq!(j["train_samples"], 64);
        assert!(j["accuracy"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(
        std::fs::read(&f1).unwrap(),
        std::fs::read(&f2).unwrap(),
        "float training is not deterministic"
    );

    let q = dir.path().join("q.mcut");
    let j = ok_json(&[
        "quantize",
        s(&f1),
        "--data",
        s(&data),
        "--labels",
        s(&labels),
        "--calibration-samples",
        "32",
        "--out",
        s(&q),
        "--json",
    ]);
    assert_eq!(j["calibration_samples"], 32);

    let t1 = dir.path().join("t1.mcut");
    let t2 = dir.path().join("t2.mcut");
    for t in [&t1, &t2] {
        let mut args = vec![
            "train",
            s(&q),
            "--method",
            "fqt",
            "--update",
            "last:3",
            "--partial",
            "0.2:0.6",
            "--out",
            s(t),
        ];
        args.extend(common);
        let j = ok_json(&args);
        assert_eq!(j["method"], "fqt");
        assert_eq!(j["epoch_losses"].as_array().unwrap().len(), 2);
    }
    assert_eq!(
        std::fs::read(&t1).unwrap(),
        std::fs::read(&t2).unwrap(),
        "FQT training is not deterministic"
    );
    assert_ne!(
        std::fs::read(&q).unwrap(),
        std::fs::read(&t1).unwrap(),
        "FQT training changed nothing"
    );

    let j = ok_json(&[
        "eval",
        s(&t1),
        "--data",
        s(&data),
        "--labels",
        s(&labels),
        "--json",
    ]);
    assert_eq!(j["samples"], 64);
    assert_eq!(j["precision"], "int8");
    let acc = j["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let info = ok_json(&["info", s(&t1), "--json"]);
    assert_eq!(info["classes"], 10);
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (data, labels) = write_images(dir.path(), 8, 4);
    let model = dir.path().join("m.mcut");
    assert!(mcutrain(&["model", "fashion-shift", "--out", s(&model)])
        .status
        .success());

    // A corrupt model file.
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let corrupt = dir.path().join("corrupt.mcut");
    std::fs::write(&corrupt, &bytes).unwrap();
    fails_with(
        &[
            "eval",
            s(&corrupt),
            "--data",
            s(&data),
            "--labels",
            s(&labels),
        ],
        &["corrupt.mcut", "checksum"],
    );
    // Not a model at all.
    fails_with(
        &["eval", s(&data), "--data", s(&data), "--labels", s(&labels)],
        &["images.npy"],
    );
    // Missing file.
    fails_with(
        &[
            "eval",
            "/nonexistent/m.mcut",
            "--data",
            s(&data),
            "--labels",
            s(&labels),
        ],
        &["/nonexistent/m.mcut"],
    );

    // Data of the wrong shape for the model.
    let small = dir.path().join("small.npy");
    write_npy(&small, "|u1", &[8, 5, 5], &[7u8; 200]);
    fails_with(
        &[
            "eval",
            s(&model),
            "--data",
            s(&small),
            "--labels",
            s(&labels),
        ],
        &["28"],
    );

    // Labels out of range for a 10-class model.
    let many = dir.path().join("many.npy");
    write_npy(&many, "|u1", &[8], &[0, 1, 2, 3, 12, 0, 1, 2]);
    fails_with(
        &["eval", s(&model), "--data", s(&data), "--labels", s(&many)],
        &["12"],
    );

    // Label count that does not match the samples.
    let short = dir.path().join("short.npy");
    write_npy(&short, "|u1", &[3], &[0, 1, 2]);
    fails_with(
        &["eval", s(&model), "--data", s(&data), "--labels", s(&short)],
        &["short.npy"],
    );

    // Truncated data file.
    let trunc = dir.path().join("trunc.npy");
    let full = std::fs::read(&data).unwrap();
    std::fs::write(&trunc, &full[..full.len() - 100]).unwrap();
    fails_with(
        &[
            "eval",
            s(&model),
            "--data",
            s(&trunc),
            "--labels",
            s(&labels),
        ],
        &["trunc.npy"],
    );

    // Wrong method for the model's precision, unknown corruption, bad scheme.
    fails_with(
        &[
            "train",
            s(&model),
            "--method",
            "fqt",
            "--data",
            s(&data),
            "--labels",
            s(&labels),
        ],
        &["quantize"],
    );
    fails_with(
        &[
            "eval",
            s(&model),
            "--data",
            s(&data),
            "--labels",
            s(&labels),
            "--corrupt",
            "fog:3",
        ],
        &["gaussian_noise"],
    );
    let out = mcutrain(&[
        "train",
        s(&model),
        "--method",
        "float",
        "--update",
        "some",
        "--data",
        s(&data),
        "--labels",
        s(&labels),
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("last:K"));

    // A failed run leaves no output file behind.
    let never = dir.path().join("never.mcut");
    fails_with(
        &[
            "train",
            s(&model),
            "--method",
            "float",
            "--data",
            s(&small),
            "--labels",
            s(&labels),
            "--out",
            s(&never),
        ],
        &[],
    );
    assert!(!never.exists());
}

/// A time-series data set in the UEA `.ts` format: a 1-D CNN learns rising vs falling
/// signals on 3 channels of unequal length.
#[test]
fn time_series_from_a_ts_file_train_a_1d_cnn() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("@problemName Slopes\n@timeStamps false\n@univariate false\n@dimensions 3\n@equalLength false\n@classLabel true up down\n@data\n");
    for i in 0..40 {
        let up = i % 2 == 0;
        let len = 20 + i % 5;
        let dims: Vec<String> = (0..3)
            .map(|c| {
                (0..len)
                    .map(|t| {
                        let v = if up { t as f32 } else { (len - t) as f32 } / len as f32;
                        format!("{:.3}", v * (c + 1) as f32)
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        text.push_str(&format!(
            "{}:{}\n",
            dims.join(":"),
            if up { "up" } else { "down" }
        ));
    }
    let ts = dir.path().join("slopes.ts");
    std::fs::write(&ts, text).unwrap();
    let m = dir.path().join("m.mcut");
    let j = ok_json(&[
        "pretrain",
        "--arch",
        "cnn1d",
        "--data",
        s(&ts),
        "--eval-data",
        s(&ts),
        "--epochs",
        "30",
        "--batch",
        "8",
        "--lr",
        "0.05",
        "--out",
        s(&m),
        "--json",
    ]);
    assert_eq!(j["train_samples"], 40);
    assert!(j["accuracy"].as_f64().unwrap() > 0.9, "{j}");
    let info = ok_json(&["info", s(&m), "--json"]);
    assert_eq!(info["input"], serde_json::json!([3, 1, 24]));
    fails_with(
        &[
            "pretrain",
            "--arch",
            "fashion-shift",
            "--data",
            s(&ts),
            "--out",
            s(&m),
        ],
        &["cnn1d"],
    );
}

/// A reader that has gone away (`mcutrain plan ... | head -1`) ends the command quietly: no
/// panic message on stderr, and on Unix the SIGPIPE exit of other command-line tools. The
/// pipe's read end is closed before the command starts, so its first write fails.
#[test]
fn closed_stdout_ends_quietly() {
    use std::process::{Command, Stdio};
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args(["plan", "mbv2-w035-r128", "--update", "all", "--sram", "4M"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run mcutrain");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{:?} {stderr}",
            out.status
        );
    }
}
