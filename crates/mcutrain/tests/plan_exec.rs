//! The plan file and the arena executor against the host reference: planned execution of
//! random graphs and of the fashion-shift model equals `FqtTrainer` bit for bit (weights,
//! biases, weight quantization, range trackers, losses), every step writes only its planned
//! outputs and the training state, and corrupt plan files give errors, not panics.

mod common;
use common::random_arch;
use mcutrain::compile::plan_file::{self, AlignedBytes};
use mcutrain::compile::{compile, scheme, LayerUpdate, PlanOptions, Precision, TrainingPlan};
use mcutrain::data::{fashion_mnist, Dataset, Split, FASHION_MNIST_DIR};
use mcutrain::engine::fqt::{FqtConfig, FqtTrainer, PartialUpdate, QuantNet};
use mcutrain::engine::UpdateScheme;
use mcutrain::model::{format, zoo, Architecture, Model, Params};
use mcutrain::quantize::quantize;
use mcutrain_core::checksum::crc32;
use mcutrain_core::plan::exec::{self, ExecError, SampleRun};
use mcutrain_core::plan::{
    PlanError, PlanView, CHECKSUM_START, HEADER_BYTES, LAYER_BYTES, MODEL_TENSOR_BYTES,
};
use mcutrain_core::quant::RangeEma;
use mcutrain_core::rng::Rng;
use proptest::prelude::*;
use std::path::Path;

/// `count` random samples in `[0, 1)` with random labels.
fn random_data(arch: &Architecture, count: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let [channels, height, width] = arch.input;
    let samples = (0..count * channels * height * width)
        .map(|_| rng.next_f32())
        .collect();
    let labels = (0..count)
        .map(|_| (rng.next_u32() % arch.classes as u32) as u16)
        .collect();
    Dataset {
        channels,
        height,
        width,
        samples,
        labels,
        classes: arch.classes,
        name: "random".into(),
    }
}

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
    fn random_graphs_train_bit_for_bit(
        c in 1usize..4, h in 2usize..10, w in 2usize..10,
        choices in proptest::collection::vec(
            (any::<u8>(), 1usize..7, any::<bool>(), any::<bool>(), any::<u8>()), 1..16),
        classes in 2usize..5,
        scheme_kind in 0u8..3,
        k in 1usize..4,
        batch in 1usize..4,
        partial in any::<bool>(),
        reorder in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let arch = random_arch([c, h, w], &choices, classes);
        let data = random_data(&arch, 8, seed);
        let model = int8_model(&arch, &data, seed);
        let scheme = match scheme_kind {
            0 => UpdateScheme::All,
            1 => UpdateScheme::LastLayers(k),
            _ => UpdateScheme::BiasOnly(k),
        };
        let cfg = fqt_config(scheme, batch, partial);
        // 11 samples: batches of 2, 3 and 4 end with a shorter one.
        let order: Vec<usize> = (0..8).chain(0..3).collect();
        let (expected, expected_losses) = reference_run(&model, &cfg, &data, &order);
        let (actual, actual_losses) = planned_run(&model, &cfg, &data, &order, reorder);
        let bits = |l: &[f64]| l.iter().map(|v| (*v as f32).to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&expected_losses), bits(&actual_losses));
        assert_same_bits(&expected, &actual, &format!("{scheme} batch {batch} partial {partial}"));
    }
}

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn fashion_shift() -> (Model, Dataset) {
    let model =
        format::load(&repo_file("models/fashion-shift/int8.mcut")).expect("committed model");
    let test = fashion_mnist(Path::new(FASHION_MNIST_DIR), Split::Test)
        .expect("Fashion-MNIST installed by scripts/setup.sh");
    (model, test.subset(&(0..24).collect::<Vec<_>>()))
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

/// Arena byte ranges `[start, end)` of tensors `ids`.
fn spans(plan: &TrainingPlan, ids: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    ids.into_iter()
        .filter_map(|id| match plan.tensors[id].placement {
            mcutrain::compile::Placement::Arena { offset } => {
                Some((offset, offset + plan.tensors[id].bytes))
            }
            mcutrain::compile::Placement::Flash => None,
        })
        .collect()
}

/// Indices of bytes that differ between `before` and `after` outside `allowed` and outside
/// `[state_start, ..)`.
fn unexpected_changes(
    before: &[u8],
    after: &[u8],
    allowed: &[(usize, usize)],
    state_start: usize,
) -> Vec<usize> {
    (0..before.len().min(state_start))
        .filter(|&b| before[b] != after[b])
        .filter(|&b| !allowed.iter().any(|&(s, e)| s <= b && b < e))
        .collect()
}

/// Fill the arena with a canary, then check that `init` writes only persistent tensors, that
/// every step writes only the tensors it declares (plus the training state), and that bytes
/// of no tensor keep the canary through training.
fn check_writes_stay_planned(model: &Model, cfg: &FqtConfig, data: &Dataset, samples: usize) {
    const CANARY: u8 = 0xA5;
    let (plan, bytes) = plan_bytes(model, cfg, true);
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let state_start = view.state_offset();
    let mut arena = AlignedBytes::zeroed(view.arena_required() + 64);
    arena.as_mut_slice().fill(CANARY);
    let before = arena.as_slice().to_vec();
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let persistent = spans(
        &plan,
        (0..plan.tensors.len()).filter(|&id| plan.tensors[id].persistent),
    );
    let changed = unexpected_changes(&before, arena.as_slice(), &persistent, state_start);
    assert!(
        changed.is_empty(),
        "init wrote outside persistent tensors: {:?} of {} ({:?})",
        &changed[..changed.len().min(8)],
        changed.len(),
        &persistent[..persistent.len().min(8)]
    );
    let end = view.arena_required();
    assert!(
        arena.as_slice()[end..].iter().all(|&b| b == CANARY),
        "init wrote past the arena"
    );
    for i in 0..samples {
        let codes = input_codes(&view, data, i % data.len());
        let label = data.labels[i % data.len()];
        let mut run = SampleRun::begin(&view, arena.as_mut_slice(), &codes, label).unwrap();
        loop {
            let s = run.next_step();
            let before = arena.as_slice().to_vec();
            let more = run.step(arena.as_mut_slice()).unwrap();
            let allowed = spans(&plan, plan.plan_writes(s));
            let changed = unexpected_changes(&before, arena.as_slice(), &allowed, state_start);
            assert!(
                changed.is_empty(),
                "step {s} ({:?} of layer {:?}) wrote bytes {:?}.. outside its outputs",
                plan.steps[s].op,
                plan.steps[s].layer,
                &changed[..changed.len().min(8)]
            );
            if !more {
                break;
            }
        }
        run.finish(arena.as_mut_slice()).unwrap();
    }
    let all = spans(&plan, 0..plan.tensors.len());
    let untouched = unexpected_changes(&before, arena.as_slice(), &all, state_start);
    assert!(
        untouched.is_empty(),
        "bytes of no tensor changed: {:?}",
        &untouched[..untouched.len().min(8)]
    );
    assert!(
        arena.as_slice()[end..].iter().all(|&b| b == CANARY),
        "wrote past the arena"
    );
}

/// The tensors a step writes, in the compiler's terms.
trait StepWrites {
    fn plan_writes(&self, step: usize) -> Vec<usize>;
}

impl StepWrites for TrainingPlan {
    fn plan_writes(&self, step: usize) -> Vec<usize> {
        let s = &self.steps[step];
        s.writes.iter().copied().chain(s.scratch).collect()
    }
}

#[test]
fn steps_write_only_their_planned_outputs() {
    let (model, data) = fashion_shift();
    for (scheme, batch, partial) in [
        (UpdateScheme::All, 1, false),
        (UpdateScheme::LastLayers(5), 1, true),
        (UpdateScheme::BiasOnly(2), 2, true),
    ] {
        check_writes_stay_planned(&model, &fqt_config(scheme, batch, partial), &data, 3);
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
    check_writes_stay_planned(&model, &fqt_config(UpdateScheme::All, 1, true), &data, 3);
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

/// Parse `bytes`; when accepted, initialise and train and infer a few samples. Returns the
/// parse result; panics only if the executor panics.
fn parse_and_run(bytes: &[u8], data: &Dataset, run: bool) -> Result<(), PlanError> {
    let aligned = AlignedBytes::copy_of(bytes);
    let view = PlanView::parse(aligned.as_slice())?;
    if !run {
        return Ok(());
    }
    let mut arena = AlignedBytes::zeroed(view.arena_required().min(1 << 22));
    if exec::init(&view, arena.as_mut_slice()).is_ok() {
        for i in 0..3 {
            let mut codes = vec![0i8; view.input_len().min(1 << 16)];
            let sample = data.sample(i % data.len());
            for (c, &v) in codes.iter_mut().zip(sample) {
                *c = view.input_qparams().quantize(v);
            }
            let _ = exec::train_sample(
                &view,
                arena.as_mut_slice(),
                &codes,
                data.labels[i % data.len()],
            );
            let _ = exec::infer_sample(&view, arena.as_mut_slice(), &codes);
        }
    }
    Ok(())
}

/// Recompute the CRC after an edit, so the edit reaches validation.
fn reseal(bytes: &mut [u8]) {
    let crc = crc32(&bytes[CHECKSUM_START..]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn truncated_and_bit_flipped_plans_are_errors() {
    let (_, data, bytes) = small_plan();
    assert!(parse_and_run(&bytes, &data, true).is_ok());
    for len in 0..bytes.len() {
        assert!(
            parse_and_run(&bytes[..len], &data, true).is_err(),
            "prefix of {len} bytes accepted"
        );
    }
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[byte] ^= 1 << bit;
            assert!(
                parse_and_run(&flipped, &data, true).is_err(),
                "flip of bit {bit} of byte {byte} accepted"
            );
        }
    }
    let mut future = bytes.clone();
    future[4] = 2;
    reseal(&mut future);
    assert_eq!(
        parse_and_run(&future, &data, true),
        Err(PlanError::UnsupportedVersion(2))
    );
    let aligned = AlignedBytes::copy_of(&bytes);
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let shifted = AlignedBytes::copy_of(&shifted);
    assert_eq!(
        PlanView::parse(&shifted.as_slice()[1..]).err(),
        Some(PlanError::Misaligned)
    );
    // Trailing bytes after the file (a flash partition) are fine.
    let mut padded = aligned.as_slice().to_vec();
    padded.extend([0xFF; 8]);
    assert!(parse_and_run(&padded, &data, true).is_ok());
}

/// Byte positions of a plan file's structure: everything after the checksum except the
/// numeric training values (hyper-parameters, bias and weight quantization, range trackers and
/// the parameter blob). Extreme values there are data, not structure: they can overflow the
/// kernels' `i32` accumulators (see the report), which validation cannot rule out.
fn structural_positions(bytes: &[u8]) -> Vec<usize> {
    let aligned = AlignedBytes::copy_of(bytes);
    let view = PlanView::parse(aligned.as_slice()).unwrap();
    let layers = view.layer_count();
    let layer_at = |i: usize| HEADER_BYTES + i * LAYER_BYTES;
    let tensor_at = |t: usize| layer_at(layers) + t * MODEL_TENSOR_BYTES;
    (CHECKSUM_START..view.header().blob_offset as usize)
        .filter(|b| {
            let config = (56..88).contains(b);
            let layer_values = (0..layers).any(|i| (layer_at(i) + 32..layer_at(i + 1)).contains(b));
            let trackers = (0..=layers).any(|t| (tensor_at(t) + 8..tensor_at(t + 1)).contains(b));
            !(config || layer_values || trackers)
        })
        .collect()
}

/// Apply `edits` at `positions` (set, flip a bit, increment) and fix the checksum.
fn corrupt(bytes: &[u8], positions: &[usize], edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    let mut corrupt = bytes.to_vec();
    for (at, value, mode) in edits {
        let i = positions[at.index(positions.len())];
        match mode {
            0 => corrupt[i] = *value,
            1 => corrupt[i] ^= 1 << (value % 8),
            _ => corrupt[i] = corrupt[i].wrapping_add(1),
        }
    }
    reseal(&mut corrupt);
    corrupt
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Structural edits that keep a valid checksum reach the validation and the executor:
    /// the result is an error or a run, never a panic.
    #[test]
    fn resealed_structure_corruptions_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..3),
    ) {
        let (_, data, bytes) = small_plan_cached();
        let corrupt = corrupt(bytes, &structural_positions(bytes), &edits);
        let _ = parse_and_run(&corrupt, data, true);
    }

    /// Edits anywhere (values included) never make the validation panic.
    #[test]
    fn resealed_corruptions_never_panic_the_parser(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let (_, data, bytes) = small_plan_cached();
        let positions: Vec<usize> = (CHECKSUM_START..bytes.len()).collect();
        let _ = parse_and_run(&corrupt(bytes, &positions, &edits), data, false);
    }
}

fn small_plan_cached() -> &'static (Model, Dataset, Vec<u8>) {
    static PLAN: std::sync::OnceLock<(Model, Dataset, Vec<u8>)> = std::sync::OnceLock::new();
    PLAN.get_or_init(small_plan)
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
    let model_path = repo_file("models/fashion-shift/int8.mcut");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args([
            "plan",
            model_path.to_str().unwrap(),
            "--update",
            "last:3",
            "--json",
        ])
        .args([
            "--partial",
            "0.2:0.6",
            "--lr",
            "0.02",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let bytes = AlignedBytes::copy_of(&std::fs::read(&out).unwrap());
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    assert_eq!(report["plan_file_bytes"], bytes.as_slice().len());
    assert_eq!(report["arena_required_bytes"], view.arena_required());
    assert_eq!(report["peak_bytes"], view.header().arena_bytes);
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
    assert!(String::from_utf8_lossy(&refused.stderr).contains("int8 model file"));
}
