//! Checks of the plan executor shared by the int8 (`plan_exec`) and the float32
//! (`plan_exec_float`) tests: data, the canary check of planned writes, and corrupt files.

use crate::common::random_arch;
use mcutrain::compile::plan_file::AlignedBytes;
use mcutrain::compile::{Placement, TrainingPlan};
use mcutrain::data::{fashion_mnist, Dataset, Split, FASHION_MNIST_DIR};
use mcutrain::model::Architecture;
use mcutrain::model::UpdateScheme;
use mcutrain_core::checksum::crc32;
use mcutrain_core::plan::exec::{self, InputElement, SampleRun};
use mcutrain_core::plan::{
    PlanError, PlanView, CHECKSUM_START, HEADER_BYTES, LAYER_BYTES, MODEL_TENSOR_BYTES,
};
use mcutrain_core::rng::Rng;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// `count` random samples in `[0, 1)` with random labels.
pub fn random_data(arch: &Architecture, count: usize, seed: u64) -> Dataset {
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

/// A random training setup of the executor tests.
#[derive(Clone, Debug)]
pub struct RandomTraining {
    /// A random architecture ([`random_arch`]).
    pub arch: Architecture,
    /// All, last:K or bias:K (K in 1..4).
    pub scheme: UpdateScheme,
    /// 1 to 4 samples per update (each divides the 12 samples of [`RandomTraining::ORDER`]).
    pub batch: usize,
    /// Operator reordering.
    pub reorder: bool,
    /// The precision's own option: int8 partial updates, float32 momentum.
    pub option: bool,
    /// Seed of the data and the parameters.
    pub seed: u64,
}

impl RandomTraining {
    /// The samples trained, in order: 8 random samples, then the first 4 again.
    pub const ORDER: [usize; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3];
}

/// Random training setups.
pub fn random_training() -> impl Strategy<Value = RandomTraining> {
    let layer = (
        any::<u8>(),
        1usize..7,
        any::<bool>(),
        any::<bool>(),
        any::<u8>(),
    );
    let shape = (1usize..4, 2usize..10, 2usize..10);
    let arch = (shape, proptest::collection::vec(layer, 1..16), 2usize..5)
        .prop_map(|((c, h, w), choices, classes)| random_arch([c, h, w], &choices, classes));
    let scheme = (0u8..3, 1usize..4).prop_map(|(kind, k)| match kind {
        0 => UpdateScheme::All,
        1 => UpdateScheme::LastLayers(k),
        _ => UpdateScheme::BiasOnly(k),
    });
    (
        arch,
        scheme,
        1usize..5,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(arch, scheme, batch, reorder, option, seed)| RandomTraining {
                arch,
                scheme,
                batch,
                reorder,
                option,
                seed,
            },
        )
}

/// A file of the repository.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// The first `count` samples of the Fashion-MNIST test set.
pub fn fashion_test_samples(count: usize) -> Dataset {
    let test = fashion_mnist(Path::new(FASHION_MNIST_DIR), Split::Test)
        .expect("Fashion-MNIST installed by scripts/setup.sh");
    test.subset(&(0..count).collect::<Vec<_>>())
}

/// Run `mcutrain plan MODEL ARGS --json --out OUT` (MODEL a repository file) and check that
/// it succeeds and that its report gives the written file's size, arena and peak; returns the
/// report and the file in aligned storage.
pub fn run_plan_command(
    model: &str,
    args: &[&str],
    out: &Path,
) -> (serde_json::Value, AlignedBytes) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args(["plan", repo_file(model).to_str().unwrap(), "--json"])
        .args(args)
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let bytes = AlignedBytes::copy_of(&std::fs::read(out).unwrap());
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    assert_eq!(report["plan_file_bytes"], bytes.as_slice().len());
    assert_eq!(report["arena_required_bytes"], view.arena_required());
    assert_eq!(report["peak_bytes"], view.header().arena_bytes);
    (report, bytes)
}

/// Arena byte ranges `[start, end)` of tensors `ids`.
fn spans(plan: &TrainingPlan, ids: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    ids.into_iter()
        .filter_map(|id| match plan.tensors[id].placement {
            Placement::Arena { offset } => Some((offset, offset + plan.tensors[id].bytes)),
            Placement::Flash => None,
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

/// The tensors step `step` writes (its outputs and scratch), in the compiler's terms.
fn plan_writes(plan: &TrainingPlan, step: usize) -> Vec<usize> {
    let s = &plan.steps[step];
    s.writes.iter().copied().chain(s.scratch).collect()
}

/// Fill the arena with a canary, then check that `init` writes only persistent tensors, that
/// every step of training `samples` writes only the tensors it declares (plus the training
/// state), and that bytes of no tensor keep the canary through training. `bytes` is the plan
/// file of `plan`.
pub fn check_writes_stay_planned<T: InputElement>(
    plan: &TrainingPlan,
    bytes: &AlignedBytes,
    samples: &[(Vec<T>, u16)],
) {
    const CANARY: u8 = 0xA5;
    let view = PlanView::parse(bytes.as_slice()).unwrap();
    let state_start = view.state_offset();
    let mut arena = AlignedBytes::zeroed(view.arena_required() + 64);
    arena.as_mut_slice().fill(CANARY);
    let before = arena.as_slice().to_vec();
    exec::init(&view, arena.as_mut_slice()).unwrap();
    let persistent = spans(
        plan,
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
    for (sample, label) in samples {
        let mut run = SampleRun::begin(&view, arena.as_mut_slice(), sample, *label).unwrap();
        loop {
            let s = run.next_step();
            let before = arena.as_slice().to_vec();
            let more = run.step(arena.as_mut_slice()).unwrap();
            let allowed = spans(plan, plan_writes(plan, s));
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
    let all = spans(plan, 0..plan.tensors.len());
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

/// Parse `bytes`; when accepted and `run`, initialise, then train and infer the samples that
/// `sample(view, i)` gives for `i` in `0..3`. Returns the parse result; panics only if the
/// executor panics.
pub fn parse_and_run<T: InputElement>(
    bytes: &[u8],
    run: bool,
    sample: impl Fn(&PlanView, usize) -> (Vec<T>, u16),
) -> Result<(), PlanError> {
    let aligned = AlignedBytes::copy_of(bytes);
    let view = PlanView::parse(aligned.as_slice())?;
    if !run {
        return Ok(());
    }
    let mut arena = AlignedBytes::zeroed(view.arena_required().min(1 << 22));
    if exec::init(&view, arena.as_mut_slice()).is_ok() {
        for i in 0..3 {
            let (input, label) = sample(&view, i);
            let _ = exec::train_sample(&view, arena.as_mut_slice(), &input, label);
            let _ = exec::infer_sample(&view, arena.as_mut_slice(), &input);
        }
    }
    Ok(())
}

/// Recompute the CRC after an edit, so the edit reaches validation.
pub fn reseal(bytes: &mut [u8]) {
    let crc = crc32(&bytes[CHECKSUM_START..]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// `parse_and_run` (as `accepts`) takes the valid plan `bytes`, refuses every truncation,
/// every single bit flip, a future version and a misaligned start, and takes trailing bytes
/// after the file (a flash partition).
pub fn check_truncations_and_bit_flips(
    bytes: &[u8],
    accepts: impl Fn(&[u8]) -> Result<(), PlanError>,
) {
    assert!(accepts(bytes).is_ok());
    for len in 0..bytes.len() {
        assert!(
            accepts(&bytes[..len]).is_err(),
            "prefix of {len} bytes accepted"
        );
    }
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.to_vec();
            flipped[byte] ^= 1 << bit;
            assert!(
                accepts(&flipped).is_err(),
                "flip of bit {bit} of byte {byte} accepted"
            );
        }
    }
    let mut future = bytes.to_vec();
    let other = mcutrain_core::plan::VERSION + 1;
    future[4..6].copy_from_slice(&other.to_le_bytes());
    reseal(&mut future);
    assert_eq!(accepts(&future), Err(PlanError::UnsupportedVersion(other)));
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(bytes);
    let shifted = AlignedBytes::copy_of(&shifted);
    assert_eq!(
        PlanView::parse(&shifted.as_slice()[1..]).err(),
        Some(PlanError::Misaligned)
    );
    let mut padded = bytes.to_vec();
    padded.extend([0xFF; 8]);
    assert!(accepts(&padded).is_ok());
}

/// A single-byte edit at a chosen position: set to a value (mode 0), flip a bit (1), or
/// increment (2).
pub type Edit = (prop::sample::Index, u8, u8);

/// Between 1 and `most` edits.
pub fn edits(most: usize) -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        (any::<prop::sample::Index>(), any::<u8>(), 0u8..3),
        1..most + 1,
    )
}

/// Byte positions of a plan file's structure: everything after the checksum except the
/// numeric training values (hyper-parameters, bias and weight quantization, range trackers and
/// the parameter blob). Extreme values there are data, not structure: they can overflow the
/// int8 kernels' `i32` accumulators (see the report), which validation cannot rule out.
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

/// `bytes` with `edits` applied at structural positions only (`structure`) or anywhere after
/// the checksum, and the checksum fixed, so that the edits reach the validation.
pub fn resealed_corruption(bytes: &[u8], edits: &[Edit], structure: bool) -> Vec<u8> {
    let positions: Vec<usize> = if structure {
        structural_positions(bytes)
    } else {
        (CHECKSUM_START..bytes.len()).collect()
    };
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

/// The resealed-corruption properties of an executor test crate (400 cases each), over the
/// plan `$small_plan()` returns (`(Model, Dataset, Vec<u8>)`, built once) and
/// `$parse_and_run(bytes, data, run)`: structural edits reach the validation and the
/// executor, and edits anywhere (values included) reach the validation and, when
/// `$run_anywhere`, the executor; the result is an error or a run, never a panic.
macro_rules! resealed_corruption_properties {
    ($small_plan:ident, $parse_and_run:ident, $run_anywhere:expr) => {
        fn small_plan_cached() -> &'static (Model, Dataset, Vec<u8>) {
            static PLAN: std::sync::OnceLock<(Model, Dataset, Vec<u8>)> =
                std::sync::OnceLock::new();
            PLAN.get_or_init($small_plan)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn resealed_structure_corruptions_never_panic(edits in edits(2)) {
                let (_, data, bytes) = small_plan_cached();
                let _ = $parse_and_run(&resealed_corruption(bytes, &edits, true), data, true);
            }

            #[test]
            fn resealed_corruptions_never_panic(edits in edits(5)) {
                let (_, data, bytes) = small_plan_cached();
                let corrupt = resealed_corruption(bytes, &edits, false);
                let _ = $parse_and_run(&corrupt, data, $run_anywhere);
            }
        }
    };
}
