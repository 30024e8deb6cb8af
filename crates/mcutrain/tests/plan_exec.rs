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
use mcutrain::compile::{compile, LayerUpdate, PlanOptions, Precision, StepOp, TrainingPlan};
use mcutrain::data::Dataset;
use mcutrain::engine::fqt::{ErrorRanges, FqtConfig, FqtTrainer, PartialUpdate, QuantNet};
use mcutrain::model::UpdateScheme;
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

/// `cfg` with exact error ranges, or tracked ones.
fn with_error_ranges(cfg: FqtConfig, exact: bool) -> FqtConfig {
    let error_ranges = if exact {
        ErrorRanges::Exact
    } else {
        ErrorRanges::Tracked
    };
    FqtConfig {
        error_ranges,
        ..cfg
    }
}

/// What `cfg.scheme` trains per layer of `model`.
fn scheme_updates(model: &Model, cfg: &FqtConfig) -> Vec<LayerUpdate> {
    cfg.scheme.updates(&model.arch)
}

/// A plan file of `model` under `cfg`, copied to aligned storage.
fn plan_bytes(model: &Model, cfg: &FqtConfig, reorder: bool) -> (TrainingPlan, AlignedBytes) {
    plan_bytes_with(model, &scheme_updates(model, cfg), cfg, reorder)
}

/// A plan file of `model` training `updates` with the hyper-parameters of `cfg`.
fn plan_bytes_with(
    model: &Model,
    updates: &[LayerUpdate],
    cfg: &FqtConfig,
    reorder: bool,
) -> (TrainingPlan, AlignedBytes) {
    let options = PlanOptions {
        batch: cfg.batch,
        reorder,
        ..PlanOptions::new(Precision::Int8)
    };
    let plan = compile(&model.arch, updates, &options).expect("compiles");
    let bytes = plan_file::write(&plan, model, &cfg.plan_config()).expect("writes");
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
    updates: &[LayerUpdate],
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
) -> (Model, Vec<f64>) {
    let mut model = model.clone();
    let mut trainer =
        FqtTrainer::with_updates(&model, cfg.clone(), updates).expect("per-tensor int8 model");
    let losses = order
        .chunks(cfg.batch)
        .map(|idx| {
            let samples: Vec<&[f32]> = idx.iter().map(|&i| data.sample(i)).collect();
            let labels: Vec<u16> = idx.iter().map(|&i| data.labels[i]).collect();
            trainer.train_batch(&mut model, &samples, &labels).loss
        })
        .collect();
    (model, losses)
}

/// The executor over the same samples, batch by batch as `reference_run` cuts them (a shorter
/// last batch ends early); the trained model and the loss of every batch.
fn planned_run(
    model: &Model,
    updates: &[LayerUpdate],
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
    reorder: bool,
) -> (Model, Vec<f64>) {
    let (_, bytes) = plan_bytes_with(model, updates, cfg, reorder);
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

/// Planned and reference execution agree bit for bit (losses, parameters, trackers); returns
/// the trained reference model.
fn assert_runs_agree(
    model: &Model,
    updates: &[LayerUpdate],
    cfg: &FqtConfig,
    data: &Dataset,
    order: &[usize],
    reorder: bool,
    what: &str,
) -> Model {
    let (expected, expected_losses) = reference_run(model, updates, cfg, data, order);
    let (actual, actual_losses) = planned_run(model, updates, cfg, data, order, reorder);
    let bits = |l: &[f64]| l.iter().map(|v| (*v as f32).to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&expected_losses),
        bits(&actual_losses),
        "{what}: losses"
    );
    assert_same_bits(&expected, &actual, what);
    expected
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
    let updates = scheme_updates(model, cfg);
    let expected = assert_runs_agree(model, &updates, cfg, data, order, reorder, what);
    assert_ne!(
        expected.params, model.params,
        "{what}: training changed nothing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_graphs_train_bit_for_bit(t in random_training(), exact in any::<bool>()) {
        let (scheme, batch, partial) = (t.scheme, t.batch, t.option);
        let data = random_data(&t.arch, 8, t.seed);
        let model = int8_model(&t.arch, &data, t.seed);
        let cfg = with_error_ranges(fqt_config(scheme, batch, partial), exact);
        let order = RandomTraining::ORDER;
        let what = format!("{scheme} batch {batch} partial {partial} {}", cfg.error_ranges);
        let updates = scheme_updates(&model, &cfg);
        assert_runs_agree(&model, &updates, &cfg, &data, &order, t.reorder, &what);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// MobileNetV2-style nets whose frozen blocks run as row-streamed chains and whose trained
    /// blocks keep clamp masks: planned execution still equals the reference bit for bit.
    #[test]
    fn streamed_mobilenets_train_bit_for_bit(
        c in 1usize..4, h in 4usize..12, w in 4usize..12,
        blocks in proptest::collection::vec((1usize..5, 1usize..7, any::<bool>()), 2..5),
        classes in 2usize..4,
        bias_only in any::<bool>(),
        k in 1usize..3,
        batch in 1usize..3,
        partial in any::<bool>(),
        reorder in any::<bool>(),
        exact in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let arch = common::random_mobilenet([c, h, w], &blocks, classes);
        let data = random_data(&arch, 6, seed);
        let model = int8_model(&arch, &data, seed);
        let scheme = if bias_only { UpdateScheme::BiasOnly(k) } else { UpdateScheme::LastLayers(k) };
        let cfg = with_error_ranges(fqt_config(scheme, batch, partial), exact);
        let (plan, _) = plan_bytes(&model, &cfg, reorder);
        let has = |op: StepOp| plan.steps.iter().any(|s| s.op == op);
        prop_assert!(has(StepOp::StreamedForward), "the stem and first block stream");
        prop_assert!(has(StepOp::ClampMask));
        let order: Vec<usize> = (0..6).chain(0..6).collect();
        let what = format!("{scheme} batch {batch} partial {partial}");
        let updates = scheme_updates(&model, &cfg);
        assert_runs_agree(&model, &updates, &cfg, &data, &order, reorder, &what);
    }
}

/// A tensor read by three layers (a convolution and two residual adds): its error is a sum of
/// two sums, whose parts are written and read with their own quantization in both modes.
#[test]
fn errors_of_three_consumers_train_bit_for_bit() {
    use mcutrain::model::{Layer, LayerKind};
    use mcutrain_core::ops::activation::Activation;
    let conv = |name: &str| Layer {
        name: name.into(),
        kind: LayerKind::Conv2d {
            out_channels: 3,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 1),
            groups: 1,
            activation: Activation::Relu,
        },
    };
    let add = |name: &str| Layer {
        name: name.into(),
        kind: LayerKind::Add { skip_from: 0 },
    };
    let classifier = Layer {
        name: "classifier".into(),
        kind: LayerKind::Linear {
            out_features: 3,
            activation: Activation::None,
        },
    };
    let arch = Architecture {
        input: [2, 5, 5],
        classes: 3,
        layers: vec![conv("a"), conv("b"), add("c"), add("d"), classifier],
    };
    assert_eq!(arch.consumers(1), [1, 2, 3]);
    let data = random_data(&arch, 6, 5);
    let model = int8_model(&arch, &data, 5);
    let order: Vec<usize> = (0..6).chain(0..6).collect();
    for (batch, exact) in [(1, true), (2, true), (1, false)] {
        let cfg = with_error_ranges(fqt_config(UpdateScheme::All, batch, false), exact);
        let what = format!("three consumers batch {batch} {}", cfg.error_ranges);
        check_equal_runs(&model, &cfg, &data, &order, true, &what);
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
    // The paper's moving-average rule alone, and exact ranges at a batch (their trackers
    // observe the exact ranges over the batch).
    let tracked = with_error_ranges(fqt_config(UpdateScheme::All, 1, true), false);
    check_equal_runs(
        &model,
        &tracked,
        &data,
        &order,
        true,
        "fashion-shift tracked",
    );
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
    for exact in [true, false] {
        let cfg = with_error_ranges(fqt_config(UpdateScheme::All, 4, true), exact);
        let what = format!("fashion-shift batch 4 {}", cfg.error_ranges);
        check_equal_runs(&model, &cfg, &data, &order, true, &what);
    }
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
    // Row-streamed forward steps write only their output and their row windows.
    let (model, data, _) = streamed_small_plan();
    let cfg = fqt_config(UpdateScheme::LastLayers(2), 1, false);
    check_planned_writes(&model, &cfg, &data, 3);
}

/// A small plan file with a row-streamed forward and clamp masks, and its model.
fn streamed_small_plan() -> (Model, Dataset, Vec<u8>) {
    let arch = common::random_mobilenet([1, 6, 5], &[(2, 3, false), (1, 3, true)], 3);
    let data = random_data(&arch, 4, 13);
    let model = int8_model(&arch, &data, 13);
    let cfg = fqt_config(UpdateScheme::LastLayers(2), 2, true);
    let (plan, bytes) = plan_bytes(&model, &cfg, true);
    assert!(plan.steps.iter().any(|s| s.op == StepOp::StreamedForward));
    (model, data, bytes.as_slice().to_vec())
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
    for (_, data, bytes) in [small_plan(), streamed_small_plan()] {
        check_truncations_and_bit_flips(&bytes, |b| parse_and_run_codes(b, &data, true));
    }
}

// Int8: edits of values may overflow the kernels' `i32` accumulators (data, not structure),
// so edits anywhere only reach the validation.
resealed_corruption_properties!(small_plan, parse_and_run_codes, false);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Structural edits of a plan with a row-streamed forward and clamp masks: an error or a
    /// run, never a panic.
    #[test]
    fn resealed_structure_corruptions_of_streamed_plans_never_panic(edits in edits(2)) {
        static PLAN: std::sync::OnceLock<(Model, Dataset, Vec<u8>)> = std::sync::OnceLock::new();
        let (_, data, bytes) = PLAN.get_or_init(streamed_small_plan);
        let _ = parse_and_run_codes(&resealed_corruption(bytes, &edits, true), data, true);
    }
}

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Sparse updates with channel ratios: the trained channels in the arena, the frozen ones
    /// in the plan, updated under a fixed quantization by both the executor and the
    /// reference, bit for bit.
    #[test]
    fn sparse_channel_ratios_train_bit_for_bit(
        c in 1usize..4, h in 4usize..10, w in 4usize..10,
        blocks in proptest::collection::vec((1usize..5, 1usize..9, any::<bool>()), 1..4),
        picks in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..8),
        batch in 1usize..3,
        reorder in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let arch = common::random_mobilenet([c, h, w], &blocks, 3);
        let data = random_data(&arch, 6, seed);
        let model = int8_model(&arch, &data, seed);
        let updates = common::random_updates(&arch, &picks);
        let cfg = fqt_config(UpdateScheme::All, batch, false);
        let order: Vec<usize> = (0..6).chain(0..6).collect();
        let what = format!("sparse {updates:?} batch {batch}");
        assert_runs_agree(&model, &updates, &cfg, &data, &order, reorder, &what);
    }
}

/// The mbv2-w035-r128 sparse workload itself (`workloads/mbv2-sparse.json`, seeded weights
/// calibrated on random images): planned execution over its arena equals the reference.
#[test]
fn mbv2_sparse_workload_trains_bit_for_bit() {
    let arch = zoo::mbv2_w035_r128();
    let data = random_data(&arch, 4, 3);
    let model = int8_model(&arch, &data, 3);
    let text = std::fs::read_to_string(repo_file("workloads/mbv2-sparse.json")).unwrap();
    let updates = mcutrain::model::scheme::from_json(&arch, &text, "mbv2-sparse.json").unwrap();
    let cfg = fqt_config(UpdateScheme::All, 1, false);
    let (plan, bytes) = plan_bytes_with(&model, &updates, &cfg, true);
    assert!(plan.steps.iter().any(|s| s.op == StepOp::StreamedForward));
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    println!(
        "mbv2-w035-r128 sparse: planned arena {} B, with training state {} B",
        plan.arena_bytes,
        view.arena_required()
    );
    let order = [0, 1, 2, 3];
    let trained = assert_runs_agree(&model, &updates, &cfg, &data, &order, true, "mbv2 sparse");
    assert_ne!(trained.params, model.params);
}

#[test]
fn sparse_channel_ratios_keep_the_frozen_channels_in_flash() {
    let (model, data) = fashion_shift();
    let mut updates = UpdateScheme::LastLayers(2).updates(&model.arch);
    let classifier = updates.len() - 1;
    let head = classifier - 2;
    updates[classifier].weight_channels = 5; // half of the 10 outputs
    updates[head].weight_channels = 192 / 4;
    let cfg = fqt_config(UpdateScheme::All, 1, false);
    let (plan, _) = plan_bytes_with(&model, &updates, &cfg, true);
    let weights = |layer: usize| {
        plan.tensors
            .iter()
            .find(|t| (t.role, t.index) == (mcutrain::compile::TensorRole::Weight, layer))
            .unwrap()
    };
    assert_eq!(weights(classifier).bytes, 5 * 192);
    assert_eq!(weights(classifier).flash_bytes, 10 * 192);
    assert_eq!(weights(head).bytes, 48 * 48);
    let order: Vec<usize> = (0..data.len()).collect();
    let trained = assert_runs_agree(&model, &updates, &cfg, &data, &order, true, "fashion-shift");
    let Params::Int8(before) = &model.params else {
        unreachable!()
    };
    let Params::Int8(after) = &trained.params else {
        unreachable!()
    };
    let (b, a) = (&before.layers[classifier], &after.layers[classifier]);
    assert_ne!(
        a.weight[..5 * 192],
        b.weight[..5 * 192],
        "trained channels moved"
    );
    assert_eq!(
        a.weight[5 * 192..],
        b.weight[5 * 192..],
        "frozen channels kept"
    );
    assert_eq!(a.weight_q, b.weight_q, "the quantization is fixed");
    // Dynamic partial updates select among all channels: refused with a channel subset.
    let partial = fqt_config(UpdateScheme::All, 1, true);
    assert!(FqtTrainer::with_updates(&model, partial.clone(), &updates).is_err());
    let (_, bytes_partial) = plan_bytes_with(&model, &updates, &partial, true);
    let view = PlanView::parse(bytes_partial.as_slice()).expect("the format holds it");
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
        // Exact error ranges need no arena bytes and exactly 16 B of state per model tensor.
        let tracked_cfg = with_error_ranges(cfg.clone(), false);
        let (tracked_plan, tracked) = plan_bytes(&model, &tracked_cfg, true);
        let tracked = PlanView::parse(tracked.as_slice()).unwrap();
        assert_eq!(tracked_plan.arena_bytes, plan.arena_bytes);
        assert_eq!(
            view.header().state_bytes - tracked.header().state_bytes,
            (16 * (model.arch.layers.len() + 1)) as u32
        );
        println!(
            "fashion-shift {scheme}: arena peak {} B, lower bound {} B, training state {} B \
             ({} B with tracked error ranges), file {} B",
            plan.arena_bytes,
            plan.lower_bound_bytes,
            view.header().state_bytes,
            tracked.header().state_bytes,
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
    assert_eq!(config.error_ranges, ErrorRanges::Exact, "the default");
    let tracked_args = ["--update", "last:3", "--error-ranges", "tracked"];
    let (_, tracked) = run_plan_command("models/fashion-shift/int8.mcut", &tracked_args, &out);
    let tracked = PlanView::parse(tracked.as_slice()).unwrap();
    assert_eq!(tracked.header().config.error_ranges, ErrorRanges::Tracked);
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

/// A sample whose loss gradient vanishes (a denormal `dL/d logits`, here with exact error
/// ranges, partial updates and batch 2) counts as a zero gradient on both sides, instead of
/// a zero error scale that the executor refused as an inconsistent plan.
#[test]
fn a_vanishing_loss_gradient_trains_alike() {
    use mcutrain::model::Layer;
    use mcutrain_core::layer::LayerKind;
    use mcutrain_core::ops::activation::Activation;
    let pointwise = |out_channels| LayerKind::Conv2d {
        out_channels,
        kernel: (1, 1),
        stride: (1, 1),
        padding: (0, 0),
        groups: 1,
        activation: Activation::None,
    };
    let layer = |name: &str, kind| Layer {
        name: name.into(),
        kind,
    };
    let arch = Architecture {
        input: [3, 5, 8],
        classes: 2,
        layers: vec![
            layer("l0", pointwise(3)),
            layer("l1", LayerKind::Activation(Activation::Relu)),
            layer("l2", LayerKind::GlobalAvgPool),
            layer("l3", pointwise(1)),
            layer(
                "classifier",
                LayerKind::Linear {
                    out_features: 2,
                    activation: Activation::None,
                },
            ),
        ],
    };
    // The seed of the random net where the executor first failed.
    let seed = 12047006314779890692;
    let data = random_data(&arch, 8, seed);
    let model = int8_model(&arch, &data, seed);
    let cfg = with_error_ranges(fqt_config(UpdateScheme::All, 2, true), true);
    let updates = scheme_updates(&model, &cfg);
    let order = RandomTraining::ORDER;
    assert_runs_agree(
        &model,
        &updates,
        &cfg,
        &data,
        &order,
        false,
        "vanishing gradient",
    );
}
