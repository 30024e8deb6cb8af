//! Training on the firmware under QEMU against the host twin: the fashion-shift int8 model
//! trained on qemu-m4 gives the same model file as on the host, byte for byte; a device
//! evaluates like the host twin; a plan that does not fit is refused before it runs, before
//! building when the plan alone is too big and at link time when the image is.
//!
//! Like `device.rs`, these need `qemu-system-arm` and the thumbv7em-none-eabihf target
//! (`scripts/setup.sh`); without them they fail with an error that says so.

#[path = "common/cli.rs"]
mod cli_helpers;
use cli_helpers::{mcutrain, ok_json, write_npy};
use std::path::{Path, PathBuf};

use mcutrain::compile::{compile, plan_file, PlanOptions, Precision};
use mcutrain::data::{self, fashion_mnist, Dataset, Split, FASHION_MNIST_DIR};
use mcutrain::device::{Board, Budget, DeviceError, Firmware, PlanSizes, Program};
use mcutrain::engine::fqt::FqtConfig;
use mcutrain::model::format;
use mcutrain::model::UpdateScheme;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn int8_model_path() -> PathBuf {
    repo_file("models/fashion-shift/int8.mcut")
}

/// Writes `data` as NPY files (`<f4` samples, `|u1` labels) for `--data`/`--labels`.
fn write_dataset(dir: &Path, name: &str, data: &Dataset) -> (String, String) {
    let samples = dir.join(format!("{name}.npy"));
    let labels = dir.join(format!("{name}-labels.npy"));
    let values: Vec<u8> = data.samples.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&samples, "<f4", &[data.len(), 28, 28], &values);
    let classes: Vec<u8> = data.labels.iter().map(|&l| l as u8).collect();
    write_npy(&labels, "|u1", &[data.len()], &classes);
    let text = |p: PathBuf| p.to_str().unwrap().to_string();
    (text(samples), text(labels))
}

/// The first `n` Fashion-MNIST samples of `split` under Gaussian noise at severity 5.
fn corrupted(split: Split, n: usize) -> Dataset {
    let all = fashion_mnist(Path::new(FASHION_MNIST_DIR), split)
        .expect("Fashion-MNIST installed by scripts/setup.sh");
    let subset = all.subset(&(0..n).collect::<Vec<_>>());
    data::corrupt_dataset(&subset, "gaussian_noise:5".parse().unwrap(), 7)
}

/// `mcutrain train MODEL --on ON --out FILE --json` with `settings`, on 24 corrupted training
/// samples (two epochs; batches of 16, so each epoch ends with a shorter one) and 16
/// evaluation samples; returns the model file and the JSON, after checking that the device
/// run and the host run wrote the same file and agree on losses and accuracy.
fn train_on_host_and_device(model: &Path, settings: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let (train, train_labels) = write_dataset(dir.path(), "train", &corrupted(Split::Train, 24));
    let (eval, eval_labels) = write_dataset(dir.path(), "eval", &corrupted(Split::Test, 16));
    let run = |on: &str| {
        let out = dir.path().join(format!("{on}.mcut"));
        let mut args = vec!["train", model.to_str().unwrap(), "--on", on];
        args.extend(settings);
        args.extend([
            "--batch",
            "16",
            "--epochs",
            "2",
            "--data",
            &train,
            "--labels",
            &train_labels,
            "--eval-data",
            &eval,
            "--eval-labels",
            &eval_labels,
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        let json = ok_json(&args);
        (std::fs::read(&out).unwrap(), json)
    };
    let (host_file, host) = run("host");
    let (device_file, device) = run("qemu-m4");
    assert!(
        host_file == device_file,
        "the model files of --on host and --on qemu-m4 differ ({settings:?})"
    );
    assert_ne!(
        host_file,
        std::fs::read(model).unwrap(),
        "training changed nothing"
    );
    assert_eq!(host["epoch_losses"], device["epoch_losses"]);
    // The device evaluated all 16 samples itself, with the weights it trained.
    assert_eq!(device["device_eval_samples"], 16);
    assert_eq!(device["accuracy"], host["accuracy"]);
    assert_eq!(device["host_accuracy"], host["accuracy"]);
    assert_eq!(device["train_samples"], 48);
    device
}

#[test]
fn fashion_shift_float32_trains_byte_for_byte_on_qemu_m4_and_the_host() {
    // SGD with momentum on the last two layers: a 249 KB arena, so a 512 KB budget.
    let device = train_on_host_and_device(
        &repo_file("models/fashion-shift/float32.mcut"),
        &[
            "--method",
            "float",
            "--update",
            "last:2",
            "--lr",
            "0.01",
            "--momentum",
            "0.9",
            "--sram",
            "512K",
        ],
    );
    assert!(device["instructions_per_sample"].as_u64().unwrap() > 3_329_216);
    assert!(device["arena_bytes"].as_u64().unwrap() > 248_952);
}

#[test]
fn fashion_shift_int8_trains_byte_for_byte_on_qemu_m4_and_the_host() {
    // Partial updates on the last five layers, the frozen blocks row-streamed.
    let device = train_on_host_and_device(
        &int8_model_path(),
        &[
            "--method",
            "fqt",
            "--update",
            "last:5",
            "--lr",
            "0.004",
            "--partial",
            "0.5:1",
            "--row-streaming",
            "on",
        ],
    );

    let figure = |key: &str| {
        device[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {device}"))
    };
    let per_sample = figure("instructions_per_sample");
    let split = &device["instructions_per_sample_split"];
    let parts: u64 = ["forward", "backward", "update", "other"]
        .iter()
        .map(|k| split[k].as_u64().unwrap())
        .sum();
    assert!(parts.abs_diff(per_sample) <= 4, "{split} vs {per_sample}");
    // At least one instruction per multiply-accumulate of the forward pass (3.3M MACs).
    let forward = split["forward"].as_u64().unwrap();
    assert!(forward > 3_329_216, "{split}");
    assert!(split["backward"].as_u64().unwrap() > 0 && split["update"].as_u64().unwrap() > 0);
    let layers = device["instructions_per_layer"].as_array().unwrap();
    let backward_layers: Vec<&str> = layers
        .iter()
        .filter(|l| l["backward"].as_u64().unwrap() > 0)
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert!(
        backward_layers.contains(&"block5.expand"),
        "{backward_layers:?}"
    );
    assert!(
        !backward_layers.contains(&"block4.project"),
        "{backward_layers:?}"
    );
    assert!(
        streamed_chains(&device) >= 4,
        "block1..block4 are streamed: {layers:?}"
    );
    // Measured memory, within the default budgets.
    let sram = figure("sram_bytes");
    assert_eq!(
        sram,
        figure("static_ram_bytes") + figure("peak_stack_bytes")
    );
    assert!(figure("arena_bytes") < figure("static_ram_bytes"));
    assert!(sram <= 256 << 10 && figure("flash_bytes") <= 1 << 20);
    assert!(figure("peak_stack_bytes") > 256);
    assert!(figure("flash_bytes") > figure("plan_file_bytes"));
}

/// A small encoder-decoder for 1x28x28 images whose every layer trains: a strided
/// convolution down to 14x14, a transposed convolution back up to 28x28, a strided
/// convolution, global pooling, a classifier; seeded float32 weights and their int8 form.
fn transposed_conv_models(dir: &Path) -> (PathBuf, PathBuf) {
    use mcutrain::model::{zoo, Architecture, Layer, LayerKind};
    use mcutrain_core::ops::activation::Activation;
    let conv = |out, stride| LayerKind::Conv2d {
        out_channels: out,
        kernel: (3, 3),
        stride: (stride, stride),
        padding: (1, 1),
        groups: 1,
        activation: Activation::Relu,
    };
    let layers = [
        ("down", conv(6, 2)),
        (
            "up",
            LayerKind::ConvTranspose2d {
                out_channels: 4,
                kernel: (3, 3),
                stride: (2, 2),
                padding: (1, 1),
                output_padding: (1, 1),
                groups: 1,
                activation: Activation::Relu6,
            },
        ),
        ("mix", conv(8, 2)),
        ("pool", LayerKind::GlobalAvgPool),
        (
            "classifier",
            LayerKind::Linear {
                out_features: 10,
                activation: Activation::None,
            },
        ),
    ];
    let arch = Architecture {
        input: [1, 28, 28],
        classes: 10,
        layers: layers
            .into_iter()
            .map(|(name, kind)| Layer {
                name: name.into(),
                kind,
            })
            .collect(),
    };
    let float = zoo::init_float(&arch, 5).unwrap();
    let calibration = corrupted(Split::Train, 64);
    let int8 = mcutrain::quantize::quantize(&float, &calibration, 64).unwrap();
    let paths = (dir.join("up-float32.mcut"), dir.join("up-int8.mcut"));
    format::save(&paths.0, &float).unwrap();
    format::save(&paths.1, &int8).unwrap();
    (paths.0, paths.1)
}

#[test]
fn a_transposed_convolution_trains_byte_for_byte_on_qemu_m4_and_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (float, int8) = transposed_conv_models(dir.path());
    // Every layer trains: the transposed convolution's forward, input error, weight and bias
    // gradients and updates all run on the device.
    for (model, method) in [(&int8, "fqt"), (&float, "float")] {
        let device = train_on_host_and_device(
            model,
            &["--method", method, "--update", "all", "--lr", "0.01"],
        );
        let layers = device["instructions_per_layer"].as_array().unwrap();
        let up = layers.iter().find(|l| l["layer"] == "up").unwrap();
        assert_eq!(up["op"], "conv_transpose2d");
        for phase in ["forward", "backward", "update"] {
            assert!(up[phase].as_u64().unwrap() > 0, "{method}: {up}");
        }
    }
}

#[test]
fn a_device_evaluates_like_the_host_twin_on_qemu_m7() {
    let dir = tempfile::tempdir().unwrap();
    let (eval, eval_labels) = write_dataset(dir.path(), "eval", &corrupted(Split::Test, 12));
    let model = int8_model_path();
    let run = |on: &str| {
        ok_json(&[
            "eval",
            model.to_str().unwrap(),
            "--data",
            &eval,
            "--labels",
            &eval_labels,
            "--on",
            on,
            "--json",
        ])
    };
    let (host, device) = (run("host"), run("qemu-m7"));
    assert_eq!(device["on"], "qemu-m7");
    assert_eq!(device["device_eval_samples"], 12);
    assert_eq!(device["accuracy"], host["accuracy"]);
    assert!(device["instructions_per_inference"].as_u64().unwrap() > 3_329_216);
    assert_eq!(device["train_samples"], 0);
    // The evaluation plan fits 256 KB without row streaming, so `auto` leaves it off.
    assert_eq!(streamed_chains(&device), 0, "{device}");
}

/// Row-streamed chains in a device report's layer table.
fn streamed_chains(device: &serde_json::Value) -> usize {
    device["instructions_per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["op"].as_str().unwrap().starts_with("streamed to"))
        .count()
}

#[test]
fn a_plan_that_does_not_fit_is_refused_before_anything_runs() {
    // The whole model at batch 16: a 438 KB arena against 256 KB, refused before building.
    let out = mcutrain(&[
        "train",
        int8_model_path().to_str().unwrap(),
        "--method",
        "fqt",
        "--on",
        "qemu-m4",
        "--update",
        "all",
        "--batch",
        "16",
        "--per-class",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in [
        "does not fit the memory budget",
        "nothing ran",
        "refused before building",
        "minimum stack",
        "> budget 262144 bytes",
        "plan file",
    ] {
        assert!(stderr.contains(needle), "lacks '{needle}': {stderr}");
    }
}

/// The plan file of the committed int8 model under `scheme` at `batch`.
fn int8_plan(scheme: UpdateScheme, batch: usize) -> Vec<u8> {
    let model = format::load(&int8_model_path()).unwrap();
    let cfg = FqtConfig {
        batch,
        scheme,
        ..FqtConfig::default()
    };
    let updates = scheme.updates(&model.arch);
    let options = PlanOptions {
        batch,
        ..PlanOptions::new(Precision::Int8)
    };
    let plan = compile(&model.arch, &updates, &options).unwrap();
    plan_file::write(&plan, &model, &cfg.plan_config()).unwrap()
}

#[test]
fn an_image_over_budget_is_refused_at_link_time_with_the_breakdown() {
    let bytes = int8_plan(UpdateScheme::BiasOnly(2), 1);
    let sizes = PlanSizes::of(&bytes).unwrap();
    // The arena and the minimum stack fit (so the plan passes the check before building),
    // the sample buffers and the rest of the static data do not.
    let budget = Budget {
        sram_bytes: (sizes.arena_bytes() + Budget::default().min_stack_bytes + 8).div_ceil(8) * 8,
        ..Budget::default()
    };
    match Firmware::in_repository().build(&budget, Program::Train { plan: &bytes }) {
        Err(DeviceError::OverBudget { linker, breakdown }) => {
            assert!(linker.contains("mcutrain budget"), "{linker}");
            let arena = format!("arena {}", sizes.arena_bytes());
            assert!(breakdown.contains(&arena), "{breakdown}");
            assert!(
                breakdown.contains(&format!("> budget {} bytes", budget.sram_bytes)),
                "{breakdown}"
            );
            assert!(
                breakdown.contains(&format!("plan file {}", sizes.file_bytes)),
                "{breakdown}"
            );
        }
        other => panic!("expected an over-budget error, got {other:?}"),
    }
}

#[test]
fn the_training_image_builds_for_the_nucleo_f746zg() {
    let bytes = int8_plan(UpdateScheme::LastLayers(5), 16);
    let budget = Budget::default();
    let image = Firmware::for_board(Board::NucleoF746zg)
        .build(&budget, Program::Train { plan: &bytes })
        .unwrap_or_else(|e| panic!("{e}"));
    let sizes = PlanSizes::of(&bytes).unwrap();
    assert!(image.footprint.static_ram_bytes() > sizes.arena_bytes());
    assert!(image.footprint.static_ram_bytes() + budget.min_stack_bytes <= budget.sram_bytes);
    assert!(image.footprint.const_bytes > sizes.file_bytes);
    assert!(image.footprint.flash_bytes() <= budget.flash_bytes);
    // Running it needs the board and its serial port.
    let out = mcutrain(&[
        "eval",
        int8_model_path().to_str().unwrap(),
        "--on",
        "nucleo-f746zg",
        "--per-class",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs --port"), "{stderr}");
}
