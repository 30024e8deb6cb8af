//! Float32 plan files and the arena executor against the host float engine: planned execution
//! of random graphs and of the fashion-shift float model equals `engine::float` bit for bit
//! (weights, biases, losses) at batch 1 and > 1, with and without reordering and momentum,
//! under every update scheme; inference equals the host prediction; every step writes only
//! its planned outputs; corrupt float plans give errors, not panics.

mod common;
#[macro_use]
#[path = "common/exec_checks.rs"]
mod exec_checks;
use common::random_arch;
use exec_checks::{
    check_truncations_and_bit_flips, check_writes_stay_planned, edits, fashion_test_samples,
    parse_and_run, random_data, random_training, repo_file, resealed_corruption, run_plan_command,
    RandomTraining,
};
use mcutrain::compile::plan_file::{self, AlignedBytes, PlanFileError};
use mcutrain::compile::{compile, PlanOptions, Precision, TensorRole, TrainingPlan};
use mcutrain::data::Dataset;
use mcutrain::engine::cosine_lr;
use mcutrain::engine::float::{self, shuffled, FloatNet, FloatTrainConfig, FloatTrainer};
use mcutrain::model::UpdateScheme;
use mcutrain::model::{format, zoo, Architecture, FloatLayer, Model, Params};
use mcutrain_core::plan::exec::{self, ExecError};
use mcutrain_core::plan::{self as file, PlanError, PlanView};
use mcutrain_core::rng::Rng;
use proptest::prelude::*;

/// Peak learning rate of the runs; batch `b` of `total` trains with `cosine_lr(PEAK_LR, b,
/// total)`, so every batch has another rate.
const PEAK_LR: f32 = 0.05;

/// One training setup.
#[derive(Clone, Copy, Debug)]
struct Run {
    scheme: UpdateScheme,
    batch: usize,
    momentum: f32,
    reorder: bool,
}

/// The float32 plan of `model` under `run`, and its file in aligned storage.
fn plan_bytes(model: &Model, run: &Run) -> (TrainingPlan, AlignedBytes) {
    let updates = run.scheme.updates(&model.arch);
    let options = PlanOptions {
        batch: run.batch,
        reorder: run.reorder,
        momentum: run.momentum != 0.0,
        ..PlanOptions::new(Precision::Float32)
    };
    let plan = compile(&model.arch, &updates, &options).expect("compiles");
    let config = plan_file::float_train_config(PEAK_LR, run.momentum);
    let bytes = plan_file::write(&plan, model, &config).expect("writes");
    (plan, AlignedBytes::copy_of(&bytes))
}

fn float_params(model: &Model) -> &[FloatLayer] {
    match &model.params {
        Params::Float(layers) => layers,
        Params::Int8(_) => panic!("a float32 model expected"),
    }
}

/// The host reference: [`FloatTrainer`] over `order`, `run.batch` samples per batch, batch `b`
/// with its cosine learning rate; the loss of every batch.
fn reference_run(model: &Model, run: &Run, data: &Dataset, order: &[usize]) -> (Model, Vec<f64>) {
    let mut model = model.clone();
    let arch = model.arch.clone();
    let Params::Float(params) = &mut model.params else {
        panic!("a float32 model expected")
    };
    let updates = run.scheme.updates(&arch);
    let mut trainer = FloatTrainer::new(&arch, params, &updates, run.momentum).unwrap();
    let total = order.len().div_ceil(run.batch);
    let losses = order
        .chunks(run.batch)
        .enumerate()
        .map(|(b, idx)| {
            let input: Vec<f32> = idx.iter().flat_map(|&i| data.sample(i).to_vec()).collect();
            let labels: Vec<u16> = idx.iter().map(|&i| data.labels[i]).collect();
            trainer.train_batch(params, &input, &labels, cosine_lr(PEAK_LR, b, total))
        })
        .collect();
    (model, losses)
}

/// The executor over the same samples, setting each batch's learning rate before its first
/// sample and ending each batch with its last sample (a shorter last one early); the trained model and the loss of every batch (f64 sum of the sample losses in
/// order, as the host sums them).
fn planned_run(model: &Model, run: &Run, data: &Dataset, order: &[usize]) -> (Model, Vec<f64>) {
    let (_, bytes) = plan_bytes(model, run);
    let view = PlanView::parse(bytes.as_slice()).expect("parses");
    assert_eq!(view.precision(), file::Precision::Float32);
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).expect("init");
    let total = order.len().div_ceil(run.batch);
    let losses = order
        .chunks(run.batch)
        .enumerate()
        .map(|(b, idx)| {
            let lr = cosine_lr(PEAK_LR, b, total);
            exec::set_learning_rate(&view, arena.as_mut_slice(), lr).unwrap();
            idx.iter()
                .enumerate()
                .map(|(k, &i)| {
                    let train = if k + 1 == idx.len() {
                        exec::train_sample_ending_batch
                    } else {
                        exec::train_sample
                    };
                    let sample = data.sample(i);
                    train(&view, arena.as_mut_slice(), sample, data.labels[i]).expect("trains")
                        as f64
                })
                .fold(0.0, |sum, loss| sum + loss)
        })
        .collect();
    let trained = plan_file::trained_model(&view, arena.as_slice(), model).expect("reads back");
    (trained, losses)
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Weights and biases agree bit for bit.
fn assert_same_bits(expected: &Model, actual: &Model, what: &str) {
    let layers = float_params(expected).iter().zip(float_params(actual));
    for (i, (e, a)) in layers.enumerate() {
        assert_eq!(
            bits(&e.weight),
            bits(&a.weight),
            "{what}: weights of layer {i}"
        );
        assert_eq!(bits(&e.bias), bits(&a.bias), "{what}: bias of layer {i}");
    }
}

/// Planned and reference execution agree on losses and parameters; returns whether training
/// changed the parameters.
fn equal_runs(model: &Model, run: &Run, data: &Dataset, order: &[usize]) -> bool {
    let what = format!("{run:?}");
    let (expected, expected_losses) = reference_run(model, run, data, order);
    let (actual, actual_losses) = planned_run(model, run, data, order);
    let loss_bits = |l: &[f64]| l.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        loss_bits(&expected_losses),
        loss_bits(&actual_losses),
        "{what}: losses"
    );
    assert_same_bits(&expected, &actual, &what);
    expected.params != model.params
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_graphs_train_bit_for_bit(t in random_training()) {
        let data = random_data(&t.arch, 8, t.seed);
        let model = zoo::init_float(&t.arch, t.seed).unwrap();
        let run = Run {
            scheme: t.scheme,
            batch: t.batch,
            momentum: if t.option { 0.9 } else { 0.0 },
            reorder: t.reorder,
        };
        equal_runs(&model, &run, &data, &RandomTraining::ORDER);
    }

    /// MobileNetV2-style nets with frozen blocks: float32 plans keep every activation (no
    /// row-streamed chains or clamp masks, which are int8 forms) and still train bit for bit.
    #[test]
    fn mobilenets_train_bit_for_bit(
        c in 1usize..4, h in 4usize..10, w in 4usize..10,
        blocks in proptest::collection::vec((1usize..5, 1usize..7, any::<bool>()), 2..4),
        k in 1usize..3,
        momentum in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let arch = common::random_mobilenet([c, h, w], &blocks, 3);
        let data = random_data(&arch, 8, seed);
        let model = zoo::init_float(&arch, seed).unwrap();
        let run = Run {
            scheme: UpdateScheme::LastLayers(k),
            batch: 2,
            momentum: if momentum { 0.9 } else { 0.0 },
            reorder: true,
        };
        equal_runs(&model, &run, &data, &RandomTraining::ORDER);
    }
}

fn fashion_shift() -> (Model, Dataset) {
    let model =
        format::load(&repo_file("models/fashion-shift/float32.mcut")).expect("committed model");
    (model, fashion_test_samples(24))
}

#[test]
fn fashion_shift_trains_bit_for_bit() {
    let (model, data) = fashion_shift();
    let order: Vec<usize> = (0..data.len()).collect();
    let runs = [
        (UpdateScheme::All, 1, 0.0, true),
        (UpdateScheme::All, 4, 0.9, true),
        (UpdateScheme::All, 3, 0.0, false),
        (UpdateScheme::LastLayers(3), 1, 0.9, false),
        (UpdateScheme::LastLayers(3), 4, 0.0, true),
        (UpdateScheme::BiasOnly(2), 1, 0.9, true),
        (UpdateScheme::BiasOnly(2), 6, 0.9, false),
        // 24 samples in batches of 5: the last one has 4.
        (UpdateScheme::LastLayers(3), 5, 0.9, true),
        (UpdateScheme::All, 7, 0.0, false),
    ];
    for (scheme, batch, momentum, reorder) in runs {
        let run = Run {
            scheme,
            batch,
            momentum,
            reorder,
        };
        assert!(
            equal_runs(&model, &run, &data, &order),
            "{run:?}: training changed nothing"
        );
    }
}

/// The whole host training loop (`engine::float::train`: seeded shuffle per epoch, cosine
/// learning rate per batch, momentum) is what a device loop over the same plan reproduces.
#[test]
fn host_training_loop_equals_the_device_loop() {
    let (model, data) = fashion_shift();
    let cfg = FloatTrainConfig {
        epochs: 2,
        batch: 4,
        lr: PEAK_LR,
        momentum: 0.9,
        scheme: UpdateScheme::LastLayers(4),
        seed: 17,
    };
    let mut expected = model.clone();
    let expected_losses = float::train(&mut expected, &data, &cfg, |_| {}).unwrap();

    let run = Run {
        scheme: cfg.scheme,
        batch: cfg.batch,
        momentum: cfg.momentum,
        reorder: true,
    };
    let (_, bytes) = plan_bytes(&model, &run);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let batches = data.len() / cfg.batch;
    let mut rng = Rng::new(cfg.seed);
    let mut losses = Vec::new();
    for epoch in 0..cfg.epochs {
        let order = shuffled(data.len(), &mut rng);
        let mut epoch_loss = 0.0f64;
        for (b, idx) in order.chunks(cfg.batch).enumerate() {
            let lr = cosine_lr(cfg.lr, epoch * batches + b, batches * cfg.epochs);
            exec::set_learning_rate(&view, arena.as_mut_slice(), lr).unwrap();
            let mut batch_loss = 0.0f64;
            for &i in idx {
                let loss =
                    exec::train_sample(&view, arena.as_mut_slice(), data.sample(i), data.labels[i]);
                batch_loss += loss.unwrap() as f64;
            }
            epoch_loss += batch_loss;
        }
        losses.push(epoch_loss / data.len() as f64);
    }
    let actual = plan_file::trained_model(&view, arena.as_slice(), &model).unwrap();
    assert_eq!(
        expected_losses
            .iter()
            .map(|l| l.to_bits())
            .collect::<Vec<_>>(),
        losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    assert_same_bits(&expected, &actual, "the whole training loop");
    assert_ne!(expected.params, model.params);
}

#[test]
fn inference_matches_the_host_prediction() {
    let (model, data) = fashion_shift();
    let run = Run {
        scheme: UpdateScheme::LastLayers(3),
        batch: 1,
        momentum: 0.0,
        reorder: true,
    };
    let (_, bytes) = plan_bytes(&model, &run);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let expected = FloatNet::new(&model.arch)
        .unwrap()
        .predict(float_params(&model), &data);
    let actual: Vec<usize> = (0..data.len())
        .map(|i| exec::infer_sample(&view, arena.as_mut_slice(), data.sample(i)).unwrap())
        .collect();
    assert_eq!(expected, actual);
    let hits = actual
        .iter()
        .zip(&data.labels)
        .filter(|(p, l)| **p == **l as usize)
        .count();
    assert!(hits > 12, "{hits} of 24 right");
}

/// [`check_writes_stay_planned`] of the float plan of `model` under `run` over 3 samples.
fn check_planned_writes(model: &Model, run: &Run, data: &Dataset) {
    let (plan, bytes) = plan_bytes(model, run);
    let inputs: Vec<(Vec<f32>, u16)> = (0..3)
        .map(|i| {
            let i = i % data.len();
            (data.sample(i).to_vec(), data.labels[i])
        })
        .collect();
    check_writes_stay_planned(&plan, &bytes, &inputs);
}

#[test]
fn steps_write_only_their_planned_outputs() {
    let (model, data) = fashion_shift();
    for (scheme, batch, momentum) in [
        (UpdateScheme::All, 1, 0.9),
        (UpdateScheme::LastLayers(5), 2, 0.0),
        (UpdateScheme::BiasOnly(2), 2, 0.9),
    ] {
        let run = Run {
            scheme,
            batch,
            momentum,
            reorder: true,
        };
        check_planned_writes(&model, &run, &data);
    }
    let (model, data, _) = small_plan();
    let run = Run {
        scheme: UpdateScheme::All,
        batch: 1,
        momentum: 0.9,
        reorder: false,
    };
    check_planned_writes(&model, &run, &data);
}

/// A small architecture with every kind of step (conv, depthwise conv, add, max pool, global
/// pool, linear), its float model, data, and its plan file (momentum, batch 2).
fn small_plan() -> (Model, Dataset, Vec<u8>) {
    let arch: Architecture = random_arch(
        [2, 5, 5],
        &[
            (0, 3, true, false, 2),
            (2, 0, true, true, 1),
            (4, 0, false, false, 0),
            (6, 0, false, false, 0),
            (7, 0, false, false, 0),
            (3, 4, false, false, 1),
        ],
        3,
    );
    let data = random_data(&arch, 4, 11);
    let model = zoo::init_float(&arch, 11).unwrap();
    let run = Run {
        scheme: UpdateScheme::All,
        batch: 2,
        momentum: 0.9,
        reorder: true,
    };
    let (_, bytes) = plan_bytes(&model, &run);
    (model, data, bytes.as_slice().to_vec())
}

/// [`parse_and_run`] with the samples of `data` (as many values as the parsed plan declares,
/// at most 2^16).
fn parse_and_run_floats(bytes: &[u8], data: &Dataset, run: bool) -> Result<(), PlanError> {
    parse_and_run(bytes, run, |view, i| {
        let mut input = vec![0.0f32; view.input_len().min(1 << 16)];
        let sample = data.sample(i % data.len());
        input.iter_mut().zip(sample).for_each(|(x, &v)| *x = v);
        (input, data.labels[i % data.len()])
    })
}

#[test]
fn truncated_and_bit_flipped_plans_are_errors() {
    let (_, data, bytes) = small_plan_cached();
    check_truncations_and_bit_flips(bytes, |b| parse_and_run_floats(b, data, true));
}

// Float32: the kernels have no value-dependent limits, so edits anywhere reach the executor.
resealed_corruption_properties!(small_plan, parse_and_run_floats, true);

#[test]
fn float_plans_hold_float_tensors_and_velocities() {
    let (model, _) = fashion_shift();
    for momentum in [0.0, 0.9] {
        let run = Run {
            scheme: UpdateScheme::LastLayers(3),
            batch: 2,
            momentum,
            reorder: true,
        };
        let (plan, bytes) = plan_bytes(&model, &run);
        let view = PlanView::parse(bytes.as_slice()).unwrap();
        let header = view.header();
        assert_eq!(bytes.as_slice()[16], 1, "precision byte");
        assert_eq!(header.config.momentum, momentum);
        assert_eq!(header.arena_bytes as usize, plan.arena_bytes);
        assert_eq!(
            header.state_bytes, 8,
            "sample counter and learning rate only"
        );
        let roles: Vec<file::TensorRole> = (0..view.tensor_count() as u16)
            .map(|id| view.tensor(id).unwrap().role)
            .collect();
        let count = |role| roles.iter().filter(|&&r| r == role).count();
        let velocities = if momentum == 0.0 { 0 } else { 3 };
        assert_eq!(count(file::TensorRole::OptimizerState), velocities);
        assert_eq!(count(file::TensorRole::BiasOptimizerState), velocities);
        for (i, params) in float_params(&model).iter().enumerate() {
            let Some(layer) = view.layer(i).filter(|l| l.kind.has_params()) else {
                continue;
            };
            let weight = view.tensor(layer.weight_tensor).unwrap();
            assert_eq!(weight.bytes as usize, 4 * params.weight.len());
        }
        for (id, tensor) in plan.tensors.iter().enumerate() {
            if tensor.role == TensorRole::Activation {
                let numel: usize = model.arch.shapes().unwrap()[tensor.index].iter().product();
                assert_eq!(view.tensor(id as u16).unwrap().bytes as usize, 4 * numel);
            }
        }
        println!(
            "fashion-shift float32 last:3 batch 2 momentum {momentum}: arena peak {} B, lower bound {} B, state {} B, file {} B",
            plan.arena_bytes,
            plan.lower_bound_bytes,
            header.state_bytes,
            bytes.as_slice().len()
        );
    }
}

#[test]
fn executor_arguments_are_checked() {
    let (model, data, bytes) = small_plan();
    let aligned = AlignedBytes::copy_of(&bytes);
    let view = PlanView::parse(aligned.as_slice()).unwrap();
    let mut storage = AlignedBytes::zeroed(view.arena_required());
    let arena = storage.as_mut_slice();
    exec::init(&view, arena).unwrap();
    let trained = plan_file::trained_model(&view, arena, &model).unwrap();
    assert_eq!(trained.params, model.params, "init keeps the parameters");
    let sample = data.sample(0);
    let codes = vec![0i8; sample.len()];
    assert_eq!(
        exec::train_sample(&view, arena, &codes, 0),
        Err(ExecError::SampleType)
    );
    assert_eq!(
        exec::infer_sample(&view, arena, &codes),
        Err(ExecError::SampleType)
    );
    assert_eq!(
        exec::train_sample(&view, arena, &sample[1..], 0),
        Err(ExecError::SampleLength)
    );
    assert_eq!(
        exec::train_sample(&view, arena, sample, 3),
        Err(ExecError::BadLabel)
    );
    assert_eq!(exec::learning_rate(&view, arena), Some(PEAK_LR));
    exec::set_learning_rate(&view, arena, 0.5).unwrap();
    assert_eq!(exec::learning_rate(&view, arena), Some(0.5));
    assert!(
        exec::layer_params(&view, arena, 0).is_none(),
        "int8 read-back"
    );
    assert!(exec::range_trackers(&view, arena, 0).is_none());
    let classifier = view.layer_count() - 1;
    let read_back = exec::float_layer_params(&view, arena, classifier).unwrap();
    assert_eq!(read_back.bias, &float_params(&model)[classifier].bias[..]);
    // Two samples (one batch) move the parameters; the read-back sees it.
    exec::train_sample(&view, arena, sample, data.labels[0]).unwrap();
    exec::train_sample(&view, arena, data.sample(1), data.labels[1]).unwrap();
    let trained = plan_file::trained_model(&view, arena, &model).unwrap();
    assert_ne!(trained.params, model.params);
    // An int8 plan refuses f32 samples.
    let int8 = mcutrain::quantize::quantize(&model, &data, data.len()).unwrap();
    let updates = UpdateScheme::All.updates(&int8.arch);
    let plan = compile(&int8.arch, &updates, &PlanOptions::new(Precision::Int8)).unwrap();
    let fqt = mcutrain::engine::fqt::FqtConfig::default();
    let int8_bytes = plan_file::write(&plan, &int8, &fqt.plan_config()).unwrap();
    let int8_bytes = AlignedBytes::copy_of(&int8_bytes);
    let int8_view = PlanView::parse(int8_bytes.as_slice()).unwrap();
    let mut int8_arena = AlignedBytes::zeroed(int8_view.arena_required());
    exec::init(&int8_view, int8_arena.as_mut_slice()).unwrap();
    assert_eq!(
        exec::train_sample(&int8_view, int8_arena.as_mut_slice(), sample, 0),
        Err(ExecError::SampleType)
    );
    assert!(exec::float_layer_params(&int8_view, int8_arena.as_slice(), classifier).is_none());
}

#[test]
fn mismatched_models_and_hyper_parameters_are_refused() {
    let (model, data, _) = small_plan();
    let updates = UpdateScheme::All.updates(&model.arch);
    let compiled = |precision, momentum| {
        let options = PlanOptions {
            momentum,
            ..PlanOptions::new(precision)
        };
        compile(&model.arch, &updates, &options).unwrap()
    };
    let sgd = plan_file::float_train_config(0.1, 0.0);
    let int8_plan = compiled(Precision::Int8, false);
    assert_eq!(
        plan_file::write(&int8_plan, &model, &sgd),
        Err(PlanFileError::PrecisionMismatch {
            model: "float32",
            plan: "int8"
        })
    );
    let int8 = mcutrain::quantize::quantize(&model, &data, data.len()).unwrap();
    let float_plan = compiled(Precision::Float32, false);
    assert!(matches!(
        plan_file::write(&float_plan, &int8, &sgd),
        Err(PlanFileError::PrecisionMismatch { .. })
    ));
    // Momentum without velocity buffers, velocity buffers without momentum, partial updates.
    let with_momentum = plan_file::float_train_config(0.1, 0.9);
    assert!(matches!(
        plan_file::write(&float_plan, &model, &with_momentum),
        Err(PlanFileError::FloatConfig(_))
    ));
    let velocity_plan = compiled(Precision::Float32, true);
    assert!(matches!(
        plan_file::write(&velocity_plan, &model, &sgd),
        Err(PlanFileError::FloatConfig(_))
    ));
    let partial = mcutrain_core::plan::TrainConfig {
        partial: Some(mcutrain_core::plan::PartialUpdate {
            lambda_min: 0.5,
            lambda_max: 0.5,
        }),
        ..sgd
    };
    assert!(matches!(
        plan_file::write(&float_plan, &model, &partial),
        Err(PlanFileError::FloatConfig(_))
    ));
    // No error is quantized in float32: exact error ranges are refused when writing, and
    // a float32 plan file that asks for them does not parse.
    let exact = file::TrainConfig {
        error_ranges: file::ErrorRanges::Exact,
        ..sgd
    };
    assert!(matches!(
        plan_file::write(&float_plan, &model, &exact),
        Err(PlanFileError::FloatConfig(_))
    ));
    let mut bytes = plan_file::write(&float_plan, &model, &sgd).unwrap();
    assert!(PlanView::parse(AlignedBytes::copy_of(&bytes).as_slice()).is_ok());
    bytes[17] |= 4; // the header's exact-error-ranges flag
    exec_checks::reseal(&mut bytes);
    assert_eq!(
        PlanView::parse(AlignedBytes::copy_of(&bytes).as_slice()).err(),
        Some(PlanError::BadHeader)
    );
}

#[test]
fn plan_command_writes_a_float_plan_file_the_executor_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan.bin");
    let model_file = "models/fashion-shift/float32.mcut";
    let args = [
        "--update",
        "last:3",
        "--sram",
        "512K",
        "--momentum",
        "--batch",
        "2",
    ];
    let (report, bytes) =
        run_plan_command(model_file, &[&args[..], &["--lr", "0.02"]].concat(), &out);
    assert_eq!(report["precision"], "float32", "{report}");
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    assert_eq!(view.precision(), file::Precision::Float32);
    assert_eq!(
        (view.header().config.lr, view.header().config.momentum),
        (0.02, 0.9)
    );
    assert_eq!(view.header().batch, 2);
    let (model, data) = fashion_shift();
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).unwrap();
    for i in 0..2 {
        let loss = exec::train_sample(&view, arena.as_mut_slice(), data.sample(i), data.labels[i]);
        assert!(loss.unwrap().is_finite());
    }
    let trained = plan_file::trained_model(&view, arena.as_slice(), &model).unwrap();
    assert_ne!(trained.params, model.params);
    // A momentum value, and refusals: partial updates and momentum out of range.
    let (_, bytes) = run_plan_command(
        model_file,
        &[&args[..4], &["--momentum", "0.5"]].concat(),
        &out,
    );
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    assert_eq!(view.header().config.momentum, 0.5);
    let model_path = repo_file(model_file);
    let refused = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mcutrain"))
            .args(["plan", model_path.to_str().unwrap()])
            .args(&args[..4])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{extra:?} accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(refused(&["--partial", "0.1:0.1"]).contains("--partial"));
    assert!(refused(&["--momentum", "1.5"]).contains("[0, 1)"));
}
