//! The plan file and the arena executor against the host reference: planned execution of
//! random graphs and of the fashion-shift model equals `FqtTrainer` bit for bit (weights,
//! biases, weight quantization, range trackers, losses), every step writes only its planned
//! outputs and the training state, and corrupt plan files give errors, not panics.

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
use mcutrain::compile::plan_file::{self, AlignedBytes};
use mcutrain::compile::{compile, scheme, LayerUpdate, PlanOptions, Precision, TrainingPlan};
use mcutrain::data::Dataset;
use mcutrain::engine::fqt::{FqtConfig, FqtTrainer, PartialUpdate, QuantNet};
use mcutrain::engine::UpdateScheme;
use mcutrain::model::{format, zoo, Architecture, Model, Params};
use mcutrain::quantize::quantize;
use mcutrain_core::plan::exec::{self, ExecError};
use mcutrain_core::plan::{PlanError, PlanView};
use mcutrain_core::quant::RangeEma;
use proptest::prelude::*;

/// An int8 model of `arch`: random float weights, calibrated on `data`.
fn int8_model(arch: &Architecture, data: &Dataset, seed: u64) -> Model {
    let float = zoo::init_float(arch, seed).expect("valid architecture");
    quantize(&float, data, data.len()).expect("quantizes")
}

fn fqt_config(scheme: UpdateScheme, batch: usize, partial: bool) -> FqtConfig {
    FqtConfig {
        epochs: 1,
        batch,
        lr: 0.05,
        scheme,
        partial: partial.then_some(PartialUpdate {
            lambda_min: 0.25,
            lambda_max: 0.75,
        }),
        ..FqtConfig::default()
    }
}

/// A plan file of `model` under `cfg`, copied to aligned storage.
fn plan_bytes(model: &Model, cfg: &FqtConfig, reorder: bool) -> (TrainingPlan, AlignedBytes) {
    let updates = scheme::from_update_scheme(&model.arch, cfg.scheme);
    let options = PlanOptions {
        batch: cfg.batch,
        reorder,
        ..PlanOptions::new(Precision::Int8)
    };
    let plan = compile(&model.arch, &updates, &options).expect("compiles");
    let bytes = plan_file::write(&plan, model, &plan_file::train_config(cfg)).expect("writes");
    (plan, AlignedBytes::copy_of(&bytes))
}

/// Input codes of sample `i` with the plan's input quantization.
fn input_codes(view: &PlanView, data: &Dataset, i: usize) -> Vec<i8> {
    let q = view.input_qparams();
    data.sample(i).iter().map(|&v| q.quantize(v)).collect()
}

/// The reference: `FqtTrainer` over the samples in order, `cfg.batch` at a time; the loss of
/// every batch.
fn reference_run(
    model: &Model,
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
) -> (Model, Vec<f64>) {
    let mut model = model.clone();
    let mut trainer = FqtTrainer::new(&model, cfg.clone()).expect("per-tensor int8 model");
    let losses = order
        .chunks(cfg.batch)
        .map(|idx| {
            let samples: Vec<&[f32]> = idx.iter().map(|&i| data.sample(i)).collect();
            let labels: Vec<u16> = idx.iter().map(|&i| data.labels[i]).collect();
            trainer.train_batch(&mut model, &samples, &labels).0
        })
        .collect();
    (model, losses)
}

/// The executor over the same samples, batch by batch as `reference_run` cuts them (a shorter
/// last batch ends early); the trained model and the loss of every batch.
fn planned_run(
    model: &Model,
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
    reorder: bool,
) -> (Model, Vec<f64>) {
    let (_, bytes) = plan_bytes(model, cfg, reorder);
    let view = PlanView::parse(bytes.as_slice()).expect("parses");
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).expect("init");
    let losses = order
        .chunks(cfg.batch)
        .map(|idx| {
            idx.iter()
                .enumerate()
                .map(|(k, &i)| {
                    let codes = input_codes(&view, data, i);
                    let train = if k + 1 == idx.len() {
                        exec::train_sample_ending_batch
                    } else {
                        exec::train_sample
                    };
                    train(&view, arena.as_mut_slice(), &codes, data.labels[i]).expect("trains")
                        as f64
                })
                .sum()
        })
        .collect();
    let trained = plan_file::trained_model(&view, arena.as_slice(), model).expect("reads back");
    (trained, losses)
}

fn ema_bits(e: &RangeEma) -> (u32, u32, bool) {
    (e.min.to_bits(), e.max.to_bits(), e.initialized)
}

/// Weights, biases, weight quantization and every range tracker agree bit for bit.
fn assert_same_bits(expected: &Model, actual: &Model, what: &str) {
    let (Params::Int8(e), Params::Int8(a)) = (&expected.params, &actual.params) else {
        panic!("int8 models expected");
    };
    for (i, (le, la)) in e.layers.iter().zip(&a.layers).enumerate() {
        assert_eq!(le.weight, la.weight, "{what}: weights of layer {i}");
        assert_eq!(le.bias, la.bias, "{what}: bias of layer {i}");
        let q = |l: &mcutrain::model::QuantLayer| {
            l.weight_q
                .iter()
                .map(|q| (q.scale.to_bits(), q.zero_point))
                .collect::<Vec<_>>()
        };
        assert_eq!(q(le), q(la), "{what}: weight qparams of layer {i}");
        assert_eq!(
            ema_bits(&le.weight_range),
            ema_bits(&la.weight_range),
            "{what}: weight range of layer {i}"
        );
        assert_eq!(le.bias_scale.to_bits(), la.bias_scale.to_bits());
    }
    for t in 0..e.activations.len() {
        assert_eq!(
            ema_bits(&e.activations[t]),
            ema_bits(&a.activations[t]),
            "{what}: activation range of tensor {t}"
        );
        assert_eq!(
            ema_bits(&e.errors[t]),
            ema_bits(&a.errors[t]),
            "{what}: error range of tensor {t}"
        );
    }
}

/// Planned and reference execution agree, and training changed something.
fn check_equal_runs(
    model: &Model,
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
    reorder: bool,
    what: &str,
) {
    let (expected, expected_losses) = reference_run(model, cfg, data, order);
    let (actual, actual_losses) = planned_run(model, cfg, data, order, reorder);
    let bits = |l: &[f64]| l.iter().map(|v| (*v as f32).to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&expected_losses),
        bits(&actual_losses),
        "{what}: losses"
    );
    assert_same_bits(&expected, &actual, what);
    assert_ne!(
        expected.params, model.params,
        "{what}: training changed nothing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_graphs_train_bit_for_bit(t in random_training()) {
        let (scheme, batch, partial) = (t.scheme, t.batch, t.option);
        let data = random_data(&t.arch, 8, t.seed);
        let model = int8_model(&t.arch, &data, t.seed);
        let cfg = fqt_config(scheme, batch, partial);
        let order = RandomTraining::ORDER;
        let (expected, expected_losses) = reference_run(&model, &cfg, &data, &order);
        let (actual, actual_losses) = planned_run(&model, &cfg, &data, &order, t.reorder);
        let bits = |l: &[f64]| l.iter().map(|v| (*v as f32).to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&expected_losses), bits(&actual_losses));
        assert_same_bits(&expected, &actual, &format!("{scheme} batch {batch} partial {partial}"));
    }
}

fn fashion_shift() -> (Model, Dataset) {
    let model =
        format::load(&repo_file("models/fashion-shift/int8.mcut")).expect("committed model");
    (model, fashion_test_samples(24))
}

#[test]
fn fashion_shift_trains_bit_for_bit() {
    let (model, data) = fashion_shift();
    let order: Vec<usize> = (0..data.len()).collect();
    for scheme in [
        UpdateScheme::All,
        UpdateScheme::LastLayers(3),
        UpdateScheme::BiasOnly(2),
    ] {
        for partial in [false, true] {
            let cfg = fqt_config(scheme, 1, partial);
            let what = format!("fashion-shift {scheme} partial {partial}");
            check_equal_runs(&model, &cfg, &data, &order, true, &what);
        }
    }
    // Without reordering (updates after the whole backward) and with mini-batches.
    let cfg = fqt_config(UpdateScheme::LastLayers(3), 1, false);
    check_equal_runs(
        &model,
        &cfg,
        &data,
        &order,
        false,
        "fashion-shift naive order",
    );
    let cfg = fqt_config(UpdateScheme::All, 4, true);
    check_equal_runs(&model, &cfg, &data, &order, true, "fashion-shift batch 4");
    // 22 samples in batches of 8: the last batch has 6.
    let cfg = fqt_config(UpdateScheme::LastLayers(5), 8, false);
    check_equal_runs(
        &model,
        &cfg,
        &data,
        &order[..22],
        true,
        "fashion-shift shorter last batch",
    );
}

#[test]
fn inference_matches_the_reference_prediction() {
    let (model, data) = fashion_shift();
    let cfg = fqt_config(UpdateScheme::LastLayers(3), 1, false);
    let (_, bytes) = plan_bytes(&model, &cfg, true);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let Params::Int8(state) = &model.params else {
        unreachable!()
    };
    let expected = QuantNet::new(&model.arch).unwrap().predict(state, &data);
    let actual: Vec<usize> = (0..data.len())
        .map(|i| {
            exec::infer_sample(&view, arena.as_mut_slice(), &input_codes(&view, &data, i)).unwrap()
        })
        .collect();
    assert_eq!(expected, actual);
    assert!(
        actual
            .iter()
            .zip(&data.labels)
            .filter(|(p, l)| **p == **l as usize)
            .count()
            > 12
    );
}

/// [`check_writes_stay_planned`] of the plan of `model` under `cfg` over `samples` samples.
fn check_planned_writes(model: &Model, cfg: &FqtConfig, data: &Dataset, samples: usize) {
    let (plan, bytes) = plan_bytes(model, cfg, true);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let inputs: Vec<(Vec<i8>, u16)> = (0..samples)
        .map(|i| {
            let i = i % data.len();
            (input_codes(&view, data, i), data.labels[i])
        })
        .collect();
    check_writes_stay_planned(&plan, &bytes, &inputs);
}

#[test]
fn steps_write_only_their_planned_outputs() {
    let (model, data) = fashion_shift();
    for (scheme, batch, partial) in [
        (UpdateScheme::All, 1, false),
        (UpdateScheme::LastLayers(5), 1, true),
        (UpdateScheme::BiasOnly(2), 2, true),
    ] {
        check_planned_writes(&model, &fqt_config(scheme, batch, partial), &data, 3);
    }
    let arch = random_arch(
        [2, 6, 6],
        &[
            (0, 4, true, false, 1),
            (4, 0, false, false, 0),
            (6, 0, false, false, 0),
            (7, 0, false, false, 1),
            (3, 5, false, false, 2),
        ],
        3,
    );
    let data = random_data(&arch, 4, 7);
    let model = int8_model(&arch, &data, 7);
    check_planned_writes(&model, &fqt_config(UpdateScheme::All, 1, true), &data, 3);
}

/// A small plan file and the model it was written for.
fn small_plan() -> (Model, Dataset, Vec<u8>) {
    let arch = random_arch(
        [2, 5, 5],
        &[
            (0, 3, true, false, 2),
            (2, 0, true, true, 1),
            (4, 0, false, false, 0),
            (7, 0, false, false, 0),
            (3, 4, false, false, 1),
        ],
        3,
    );
    let data = random_data(&arch, 4, 11);
    let model = int8_model(&arch, &data, 11);
    let cfg = fqt_config(UpdateScheme::All, 2, true);
    let (_, bytes) = plan_bytes(&model, &cfg, true);
    (model, data, bytes.as_slice().to_vec())
}

/// [`parse_and_run`] with the samples of `data` quantized by the parsed plan (as many codes
/// as it declares, at most 2^16).
fn parse_and_run_codes(bytes: &[u8], data: &Dataset, run: bool) -> Result<(), PlanError> {
    parse_and_run(bytes, run, |view, i| {
        let mut codes = vec![0i8; view.input_len().min(1 << 16)];
        let sample = data.sample(i % data.len());
        for (c, &v) in codes.iter_mut().zip(sample) {
            *c = view.input_qparams().quantize(v);
        }
        (codes, data.labels[i % data.len()])
    })
}

#[test]
fn truncated_and_bit_flipped_plans_are_errors() {
    let (_, data, bytes) = small_plan();
    check_truncations_and_bit_flips(&bytes, |b| parse_and_run_codes(b, &data, true));
}

// Int8: edits of values may overflow the kernels' `i32` accumulators (data, not structure),
// so edits anywhere only reach the validation.
resealed_corruption_properties!(small_plan, parse_and_run_codes, false);

#[test]
fn executor_arguments_and_arena_state_are_checked() {
    let (model, data, bytes) = small_plan();
    let aligned = AlignedBytes::copy_of(&bytes);
    let view = PlanView::parse(aligned.as_slice()).unwrap();
    let mut small = AlignedBytes::zeroed(view.arena_required() - 1);
    assert_eq!(
        exec::init(&view, small.as_mut_slice()),
        Err(ExecError::ArenaTooSmall)
    );
    let mut storage = AlignedBytes::zeroed(view.arena_required() + 4);
    assert_eq!(
        exec::init(&view, &mut storage.as_mut_slice()[1..]),
        Err(ExecError::ArenaMisaligned)
    );
    let arena = storage.as_mut_slice();
    exec::init(&view, arena).unwrap();
    let trained = plan_file::trained_model(&view, arena, &model).unwrap();
    assert_eq!(trained.params, model.params, "init keeps the parameters");
    let codes = input_codes(&view, &data, 0);
    assert_eq!(
        exec::train_sample(&view, arena, &codes[1..], 0),
        Err(ExecError::SampleLength)
    );
    assert_eq!(
        exec::train_sample(&view, arena, &codes, 3),
        Err(ExecError::BadLabel)
    );
    assert_eq!(exec::learning_rate(&view, arena), Some(0.05));
    exec::set_learning_rate(&view, arena, 0.5).unwrap();
    assert_eq!(exec::learning_rate(&view, arena), Some(0.5));
    // A gradient-statistics flag that is neither 0 nor 1 is reported, not trusted.
    let stats = (0..view.tensor_count() as u16)
        .filter_map(|id| view.tensor(id))
        .find(|t| t.role == mcutrain_core::plan::TensorRole::OptimizerState)
        .expect("the plan trains weights");
    let flag = std::mem::offset_of!(mcutrain_core::update::GradStats, initialized);
    arena[stats.arena_offset.unwrap() as usize + flag] = 7;
    assert!(
        exec::train_sample(&view, arena, &codes, 0).is_ok(),
        "no update in the first sample of a batch"
    );
    assert_eq!(
        exec::train_sample(&view, arena, &codes, 0),
        Err(ExecError::CorruptArena)
    );
}

#[test]
fn sparse_channel_ratios_are_refused_by_the_executor() {
    let (model, _) = fashion_shift();
    let mut updates: Vec<LayerUpdate> =
        scheme::from_update_scheme(&model.arch, UpdateScheme::LastLayers(1));
    let classifier = updates.len() - 1;
    updates[classifier].weight_channels = 5; // half of the 10 outputs
    let plan = compile(&model.arch, &updates, &PlanOptions::new(Precision::Int8)).unwrap();
    let cfg = fqt_config(UpdateScheme::LastLayers(1), 1, false);
    let bytes = plan_file::write(&plan, &model, &plan_file::train_config(&cfg)).unwrap();
    let bytes = AlignedBytes::copy_of(&bytes);
    let view = PlanView::parse(bytes.as_slice()).expect("the file format holds channel ratios");
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    assert_eq!(
        exec::init(&view, arena.as_mut_slice()),
        Err(ExecError::Unsupported)
    );
}

#[test]
fn plan_files_are_deterministic_and_report_their_arena() {
    let (model, _) = fashion_shift();
    for scheme in [UpdateScheme::All, UpdateScheme::LastLayers(5)] {
        let cfg = fqt_config(scheme, 1, false);
        let (plan, first) = plan_bytes(&model, &cfg, true);
        let (_, second) = plan_bytes(&model, &cfg, true);
        assert_eq!(first.as_slice(), second.as_slice());
        let view = PlanView::parse(first.as_slice()).unwrap();
        assert_eq!(view.header().arena_bytes as usize, plan.arena_bytes);
        assert!(view.arena_required() > plan.arena_bytes);
        println!(
            "fashion-shift {scheme}: arena peak {} B, lower bound {} B, training state {} B, file {} B",
            plan.arena_bytes,
            plan.lower_bound_bytes,
            view.header().state_bytes,
            first.as_slice().len()
        );
    }
}

#[test]
fn plan_command_writes_a_plan_file_the_executor_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan.bin");
    let args = ["--update", "last:3", "--partial", "0.2:0.6", "--lr", "0.02"];
    let (_, bytes) = run_plan_command("models/fashion-shift/int8.mcut", &args, &out);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let config = view.header().config;
    assert_eq!(config.lr, 0.02);
    assert_eq!(
        config.partial.map(|p| (p.lambda_min, p.lambda_max)),
        Some((0.2, 0.6))
    );
    let (model, data) = fashion_shift();
    let mut arena = AlignedBytes::zeroed(view.arena_required());
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let loss = exec::train_sample(
        &view,
        arena.as_mut_slice(),
        &input_codes(&view, &data, 0),
        data.labels[0],
    );
    assert!(loss.unwrap().is_finite());
    let trained = plan_file::trained_model(&view, arena.as_slice(), &model).unwrap();
    assert_ne!(trained.params, model.params);
    // An architecture name has no parameters to write.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args(["plan", "fashion-shift", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("int8 or float32 model file"));
}
