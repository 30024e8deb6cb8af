//! The training-graph compiler and the arena planner, checked from the outside: an independent
//! liveness checker over plans of random graphs and schemes, the pruning rules, operator
//! reordering, the memory report's sums, and the `mcutrain plan` command.

mod common;
use common::random_arch;
use mcutrain::compile::plan_file::PlanSizes;
use mcutrain::compile::report::MemoryReport;
use mcutrain::compile::{
    compile, compile_streaming, Category, LayerUpdate, Placement, PlanOptions, Precision,
    RowStreaming, StepOp, TensorRole, TrainingPlan,
};
use mcutrain::device::firmware::check_plan;
use mcutrain::device::Budget;
use mcutrain::model::UpdateScheme;
use mcutrain::model::{zoo, Architecture, LayerKind};
use proptest::prelude::*;
use std::process::Command;

/// Recomputes every arena tensor's live steps from the step list alone (not with the
/// compiler's liveness code) and checks: offsets aligned and inside the arena, no two tensors
/// live at a common step share a byte (so a step's writes, in place or into a reused region,
/// only ever overwrite bytes of tensors that are dead), every read tensor was written before
/// (or is a parameter or persistent), and the plan's lower bound is the true maximum of live
/// bytes.
fn check_liveness(plan: &TrainingPlan) {
    let steps = plan.steps.len();
    let mut first = vec![usize::MAX; plan.tensors.len()];
    let mut last = vec![0usize; plan.tensors.len()];
    let mut written = vec![false; plan.tensors.len()];
    for (s, step) in plan.steps.iter().enumerate() {
        for &r in &step.reads {
            let t = &plan.tensors[r];
            let is_param = matches!(t.role, TensorRole::Weight | TensorRole::Bias);
            assert!(
                written[r] || is_param || t.persistent,
                "step {s} ({:?}) reads tensor {r} ({:?}) before any step wrote it",
                step.op,
                t.role
            );
        }
        for &id in step
            .reads
            .iter()
            .chain(&step.writes)
            .chain(step.scratch.iter())
        {
            first[id] = first[id].min(s);
            last[id] = last[id].max(s);
        }
        for &w in &step.writes {
            assert_ne!(
                plan.tensors[w].placement,
                Placement::Flash,
                "step {s} writes flash"
            );
            written[w] = true;
        }
    }
    // (first, last, offset, size, id)
    let mut live: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
    for (id, t) in plan.tensors.iter().enumerate() {
        let Placement::Arena { offset } = t.placement else {
            assert_eq!(t.category, Category::FrozenWeight, "tensor {id} in flash");
            continue;
        };
        let size = t.bytes.div_ceil(4) * 4;
        let span = if t.persistent {
            (0, steps - 1)
        } else {
            assert!(
                first[id] != usize::MAX,
                "tensor {id} ({:?}) is never used",
                t.role
            );
            (first[id], last[id])
        };
        assert_eq!(offset % 4, 0, "tensor {id} misaligned");
        assert!(
            offset + size <= plan.arena_bytes,
            "tensor {id} beyond the arena"
        );
        live.push((span.0, span.1, offset, size, id));
    }
    for (i, a) in live.iter().enumerate() {
        for b in &live[i + 1..] {
            let same_time = a.0 <= b.1 && b.0 <= a.1;
            let same_bytes = a.2 < b.2 + b.3 && b.2 < a.2 + a.3;
            assert!(
                !(same_time && same_bytes),
                "live tensors overlap: {a:?} {b:?}"
            );
        }
    }
    // Every byte a step writes belongs to the written tensor alone at that step.
    for (s, step) in plan.steps.iter().enumerate() {
        for &w in step.writes.iter().chain(step.scratch.iter()) {
            let Some(target) = live.iter().find(|t| t.4 == w) else {
                continue;
            };
            for other in live.iter().filter(|t| t.4 != w && t.0 <= s && s <= t.1) {
                let same_bytes = target.2 < other.2 + other.3 && other.2 < target.2 + target.3;
                assert!(
                    !same_bytes,
                    "step {s} ({:?}) writes tensor {w} over live tensor {}",
                    step.op, other.4
                );
            }
        }
    }
    let bound = (0..steps)
        .map(|s| {
            live.iter()
                .filter(|t| t.0 <= s && s <= t.1)
                .map(|t| t.3)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    assert_eq!(plan.lower_bound_bytes, bound);
    assert!(plan.arena_bytes >= bound);
}

/// The pruning rules: no backward step below the lowest trained layer, gradients only for
/// trained parameters (and their size follows the trained channels), frozen parameters in
/// flash, and an activation saved only when a backward step reads it.
fn check_pruning(plan: &TrainingPlan) {
    let lowest = plan
        .updates
        .iter()
        .position(|u| u.any())
        .expect("trains something");
    for step in plan.steps.iter().filter(|s| s.op.is_backward()) {
        let layer = step.layer.expect("backward steps belong to a layer");
        assert!(
            layer >= lowest,
            "{:?} of layer {layer} below {lowest}",
            step.op
        );
        let u = plan.updates[layer];
        match step.op {
            StepOp::WeightGrad | StepOp::WeightUpdate => assert!(u.weight_channels > 0),
            StepOp::BiasGrad | StepOp::BiasUpdate => assert!(u.bias),
            StepOp::InputError => assert!(layer > lowest),
            _ => {}
        }
    }
    for (id, t) in plan.tensors.iter().enumerate() {
        let index = t.index;
        match t.role {
            TensorRole::Error | TensorRole::ErrorPart => {
                assert!(index > lowest, "error of tensor {index}, lowest {lowest}")
            }
            TensorRole::WeightGrad | TensorRole::OptimizerState => {
                assert!(plan.updates[index].any())
            }
            TensorRole::BiasGrad | TensorRole::BiasOptimizerState => {
                assert!(plan.updates[index].bias)
            }
            TensorRole::Weight => assert_eq!(
                t.category == Category::FrozenWeight,
                plan.updates[index].weight_channels == 0
            ),
            TensorRole::Bias => {
                assert_eq!(
                    t.category == Category::FrozenWeight,
                    !plan.updates[index].bias
                )
            }
            TensorRole::Activation => {
                let read_backward = plan
                    .steps
                    .iter()
                    .any(|s| s.op.is_backward() && s.reads.contains(&id));
                assert_eq!(read_backward, t.category == Category::SavedActivation);
            }
            TensorRole::Scratch => {}
            TensorRole::ClampMask => {
                assert_eq!(t.category, Category::SavedActivation);
                let readers: Vec<&mcutrain::compile::Step> = plan
                    .steps
                    .iter()
                    .filter(|s| s.reads.contains(&id))
                    .collect();
                assert_eq!(readers.len(), 1, "clamp mask {id} read once");
                assert_eq!(readers[0].op, StepOp::ActivationMask);
            }
        }
    }
    let weight_grads = plan
        .steps
        .iter()
        .filter(|s| s.op == StepOp::WeightGrad)
        .count();
    let trained_weights = plan
        .updates
        .iter()
        .filter(|u| u.weight_channels > 0)
        .count();
    assert_eq!(weight_grads, trained_weights);
}

/// The memory-saving steps, checked against the architecture (shapes recomputed here):
/// - a row-streamed forward covers at least two frozen convolutions; none of its intermediate
///   activations is stored, each has the next convolution as its only consumer, and its
///   scratch is exactly the stages' row windows `sum in_channels * kernel_h * in_w`;
/// - a clamp mask is one bit per element of the activation it replaces, written right after
///   that activation by the layer that produced it, and no backward step reads that activation;
/// - int8 plans miss no clamp mask (no activation is read in the backward by its activation
///   mask alone), and float plans use neither step.
fn check_memory_ops(arch: &Architecture, plan: &TrainingPlan) {
    let shapes = arch.shapes().unwrap();
    let stored = |t: usize| {
        plan.tensors
            .iter()
            .any(|x| (x.role, x.index) == (TensorRole::Activation, t))
    };
    for (s, step) in plan.steps.iter().enumerate() {
        match step.op {
            StepOp::StreamedForward => {
                assert_eq!(plan.precision, Precision::Int8);
                let first = step.layer.unwrap();
                let written = &plan.tensors[step.writes[0]];
                assert_eq!(
                    written.role,
                    TensorRole::Activation,
                    "a streamed forward writes an activation"
                );
                let end = written.index;
                let last = end - 1;
                assert!(last > first, "a chain of one layer at step {s}");
                let mut windows = 0;
                for (j, [channels, _, width]) in shapes.iter().enumerate().take(end).skip(first) {
                    let LayerKind::Conv2d { kernel, .. } = arch.layers[j].kind else {
                        panic!("layer {j} in a chain is not a convolution");
                    };
                    assert!(!plan.updates[j].any(), "layer {j} in a chain trains");
                    windows += channels * kernel.0 * width;
                    if j > first {
                        assert!(!stored(j), "streamed tensor {j} is stored");
                        let readers = arch.layers.iter().enumerate().filter(|(i, l)| {
                            *i == j
                                || matches!(l.kind, LayerKind::Add { skip_from } if skip_from + 1 == j)
                        });
                        assert_eq!(readers.count(), 1, "streamed tensor {j} has other readers");
                    }
                }
                let scratch = step.scratch.expect("a streamed forward has row windows");
                assert_eq!(plan.tensors[scratch].bytes, windows);
            }
            StepOp::ClampMask => {
                assert_eq!(plan.precision, Precision::Int8);
                let (output, mask) = (step.reads[0], step.writes[0]);
                let tensor = plan.tensors[output].index;
                assert_eq!(
                    plan.tensors[output].role,
                    TensorRole::Activation,
                    "a clamp mask reads an activation"
                );
                let mask_role = (plan.tensors[mask].role, plan.tensors[mask].index);
                assert_eq!(mask_role, (TensorRole::ClampMask, tensor));
                assert_eq!(step.layer, Some(tensor - 1));
                assert_eq!(
                    plan.tensors[mask].bytes,
                    plan.tensors[output].bytes.div_ceil(8)
                );
                assert!(
                    plan.steps[s - 1].writes.contains(&output),
                    "the clamp mask follows the forward"
                );
                assert!(plan
                    .steps
                    .iter()
                    .all(|b| !(b.op.is_backward() && b.reads.contains(&output))));
            }
            _ => {}
        }
    }
    for (id, t) in plan.tensors.iter().enumerate() {
        if !matches!(t.role, TensorRole::Activation) {
            continue;
        }
        let mut readers = plan
            .steps
            .iter()
            .filter(|s| s.op.is_backward() && s.reads.contains(&id))
            .peekable();
        let only_masks =
            readers.peek().is_some() && readers.all(|s| s.op == StepOp::ActivationMask);
        assert!(
            !(only_masks && plan.precision == Precision::Int8),
            "tensor {id} ({:?}) is kept whole for its activation mask only",
            t.role
        );
    }
}

/// The report's category and layer sums equal the lower bound.
fn check_report(arch: &Architecture, plan: &TrainingPlan) {
    let report = MemoryReport::new(arch, plan);
    assert_eq!(
        report.categories.iter().sum::<usize>(),
        report.lower_bound_bytes
    );
    assert_eq!(
        report.layers.iter().map(|l| l.total()).sum::<usize>(),
        report.lower_bound_bytes
    );
    for (c, (total, category)) in report.categories.iter().zip(Category::SRAM).enumerate() {
        assert_eq!(
            report.layers.iter().map(|l| l.at_peak[c]).sum::<usize>(),
            *total
        );
        let all_bytes: usize = plan
            .tensors
            .iter()
            .filter(|t| t.category == category)
            .map(|t| t.bytes.div_ceil(4) * 4)
            .sum();
        assert_eq!(
            report.layers.iter().map(|l| l.tensors[c]).sum::<usize>(),
            all_bytes
        );
    }
    assert_eq!(report.peak_bytes, plan.arena_bytes);
    assert_eq!(report.flash_bytes(), plan.flash_bytes());
    assert!(report.forward_bytes <= report.lower_bound_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_graphs_plan_without_overlap(
        c in 1usize..5, h in 1usize..10, w in 1usize..10,
        choices in proptest::collection::vec(
            (any::<u8>(), 1usize..9, any::<bool>(), any::<bool>(), any::<u8>()), 1..14),
        picks in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..8),
        classes in 1usize..5,
        int8 in any::<bool>(),
        batch in 1usize..4,
        uniform in 0u8..4,
        k in 1usize..6,
        row_streaming in any::<bool>(),
    ) {
        let arch = random_arch([c, h, w], &choices, classes);
        let updates = match uniform {
            0 => UpdateScheme::All.updates(&arch),
            1 => UpdateScheme::LastLayers(k).updates(&arch),
            2 => UpdateScheme::BiasOnly(k).updates(&arch),
            _ => common::random_updates(&arch, &picks),
        };
        let precision = if int8 { Precision::Int8 } else { Precision::Float32 };
        let mut peaks = Vec::new();
        for reorder in [true, false] {
            let momentum = !int8 && batch > 1;
            let options = PlanOptions { precision, batch, reorder, momentum, row_streaming };
            let plan = compile(&arch, &updates, &options).expect("compiles");
            check_liveness(&plan);
            check_pruning(&plan);
            check_memory_ops(&arch, &plan);
            check_report(&arch, &plan);
            peaks.push((plan.arena_bytes, plan.lower_bound_bytes));
        }
        prop_assert!(peaks[0].1 <= peaks[1].1, "reordering raised the lower bound: {peaks:?}");
        prop_assert!(peaks[0].0 <= peaks[1].0, "reordering raised the peak: {peaks:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// MobileNetV2-style nets, where frozen blocks stream (with row streaming) and trained
    /// blocks keep clamp masks, under the independent checks.
    #[test]
    fn random_mobilenets_stream_and_plan_without_overlap(
        c in 1usize..4, h in 4usize..20, w in 4usize..20,
        blocks in proptest::collection::vec((1usize..5, 1usize..9, any::<bool>()), 1..6),
        picks in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..8),
        batch in 1usize..3,
        uniform in 0u8..3,
        k in 1usize..5,
        row_streaming in any::<bool>(),
    ) {
        let arch = common::random_mobilenet([c, h, w], &blocks, 3);
        let updates = match uniform {
            0 => UpdateScheme::LastLayers(k).updates(&arch),
            1 => UpdateScheme::BiasOnly(k).updates(&arch),
            _ => common::random_updates(&arch, &picks),
        };
        for reorder in [true, false] {
            let options = PlanOptions { batch, reorder, row_streaming, ..PlanOptions::new(Precision::Int8) };
            let plan = compile(&arch, &updates, &options).expect("compiles");
            check_liveness(&plan);
            check_pruning(&plan);
            check_memory_ops(&arch, &plan);
            check_report(&arch, &plan);
            let streams = plan.steps.iter().any(|s| s.op == StepOp::StreamedForward);
            prop_assert!(row_streaming || !streams, "streamed without row streaming");
        }
    }
}

fn mbv2_plan(updates: &[LayerUpdate], reorder: bool) -> TrainingPlan {
    let options = PlanOptions {
        reorder,
        ..PlanOptions::new(Precision::Int8)
    };
    compile(&zoo::mbv2_w035_r128(), updates, &options).expect("compiles")
}

/// The sparse scheme of `workloads/mbv2-sparse.json`.
fn mbv2_sparse(arch: &Architecture) -> Vec<LayerUpdate> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workloads/mbv2-sparse.json"),
    )
    .unwrap();
    mcutrain::model::scheme::from_json(arch, &text, "mbv2-sparse.json").unwrap()
}

fn layer_index(arch: &Architecture, name: &str) -> usize {
    arch.layers.iter().position(|l| l.name == name).unwrap()
}

#[test]
fn bias_only_layer_keeps_no_input_activation() {
    let arch = zoo::fashion_shift_backbone();
    for precision in [Precision::Int8, Precision::Float32] {
        let bias_only = UpdateScheme::BiasOnly(1).updates(&arch);
        let plan = compile(&arch, &bias_only, &PlanOptions::new(precision)).unwrap();
        let classifier = layer_index(&arch, "classifier");
        let input = |plan: &TrainingPlan| {
            plan.tensors
                .iter()
                .find(|t| (t.role, t.index) == (TensorRole::Activation, classifier))
                .unwrap()
                .category
        };
        assert_eq!(input(&plan), Category::ForwardActivation, "{precision:?}");
        let last = UpdateScheme::LastLayers(1).updates(&arch);
        let plan = compile(&arch, &last, &PlanOptions::new(precision)).unwrap();
        assert_eq!(input(&plan), Category::SavedActivation, "{precision:?}");
    }
}

#[test]
fn frozen_layers_get_no_gradient_and_nothing_runs_below_the_lowest() {
    let arch = zoo::mbv2_w035_r128();
    let updates = UpdateScheme::LastLayers(5).updates(&arch);
    let plan = mbv2_plan(&updates, true);
    let lowest = layer_index(&arch, "block17.expand");
    assert_eq!(updates.iter().position(|u| u.any()), Some(lowest));
    let gradient_layers: Vec<usize> = plan
        .tensors
        .iter()
        .filter(|t| t.category == Category::GradientAndState)
        .map(|t| t.layer.unwrap())
        .collect();
    assert!(!gradient_layers.is_empty());
    assert!(gradient_layers.iter().all(|&l| updates[l].any()));
    let flash: usize = plan
        .tensors
        .iter()
        .filter(|t| t.placement == Placement::Flash)
        .map(|t| t.layer.unwrap())
        .max()
        .unwrap();
    assert!(flash < lowest, "a trained layer's parameters are in flash");
    assert!(plan
        .steps
        .iter()
        .filter(|s| s.op.is_backward())
        .all(|s| s.layer.unwrap() >= lowest));
    assert!(!plan
        .steps
        .iter()
        .any(|s| s.op == StepOp::InputError && s.layer == Some(lowest)));
    // Only tensors at and above the lowest trained layer's input are saved.
    assert!(plan
        .tensors
        .iter()
        .filter(|t| t.category == Category::SavedActivation)
        .all(
            |t| matches!(t.role, TensorRole::Activation | TensorRole::ClampMask)
                && t.index >= lowest
        ));
    check_liveness(&plan);
    check_pruning(&plan);
}

#[test]
fn reordering_frees_gradients_at_batch_one_only() {
    let arch = zoo::fashion_shift_backbone();
    let all = UpdateScheme::All.updates(&arch);
    let peak = |batch: usize, reorder: bool| {
        let options = PlanOptions {
            batch,
            reorder,
            ..PlanOptions::new(Precision::Int8)
        };
        compile(&arch, &all, &options).unwrap()
    };
    let (reordered, naive) = (peak(1, true), peak(1, false));
    assert!(reordered.arena_bytes < naive.arena_bytes);
    let updates_after = |plan: &TrainingPlan| {
        let last_backward = plan
            .steps
            .iter()
            .rposition(|s| matches!(s.op, StepOp::WeightGrad | StepOp::InputError))
            .unwrap();
        plan.steps[last_backward..]
            .iter()
            .filter(|s| s.op == StepOp::WeightUpdate)
            .count()
    };
    assert_eq!(updates_after(&reordered), 1);
    assert_eq!(
        updates_after(&naive),
        all.iter().filter(|u| u.weight_channels > 0).count()
    );
    // At batch 2 gradients accumulate over the batch: persistent either way.
    let (b2, b2_naive) = (peak(2, true), peak(2, false));
    assert!(b2
        .tensors
        .iter()
        .filter(|t| matches!(t.role, TensorRole::WeightGrad))
        .all(|t| t.persistent));
    assert_eq!(b2.lower_bound_bytes, b2_naive.lower_bound_bytes);
    assert!(b2.arena_bytes >= naive.arena_bytes);
}

#[test]
fn channel_ratio_sizes_the_gradient() {
    let arch = zoo::mbv2_w035_r128();
    let updates = mbv2_sparse(&arch);
    let plan = mbv2_plan(&updates, true);
    let expand = layer_index(&arch, "block17.expand");
    assert_eq!(updates[expand].weight_channels, 336 / 2);
    let grad = plan
        .tensors
        .iter()
        .find(|t| (t.role, t.index) == (TensorRole::WeightGrad, expand))
        .unwrap();
    assert_eq!(grad.bytes, 168 * 56 * 4);
    let weights = plan
        .tensors
        .iter()
        .find(|t| (t.role, t.index) == (TensorRole::Weight, expand))
        .unwrap();
    assert_eq!(weights.bytes, 168 * 56, "the trained channels are in SRAM");
    assert_eq!(
        weights.flash_bytes,
        336 * 56,
        "the whole tensor is in flash"
    );
    // Float plans keep the whole tensor in SRAM (their executor re-codes nothing, but does not
    // read a split tensor yet).
    let options = PlanOptions::new(Precision::Float32);
    let float = compile(&arch, &updates, &options).unwrap();
    let float_weights = float
        .tensors
        .iter()
        .find(|t| (t.role, t.index) == (TensorRole::Weight, expand))
        .unwrap();
    assert_eq!(float_weights.bytes, 336 * 56 * 4);
    check_liveness(&plan);
    check_report(&arch, &plan);
}

#[test]
fn mbv2_sparse_streams_its_frozen_blocks_and_masks_its_trained_ones() {
    let arch = zoo::mbv2_w035_r128();
    let updates = mbv2_sparse(&arch);
    let plan = mbv2_plan(&updates, true);
    check_liveness(&plan);
    check_memory_ops(&arch, &plan);
    let report = MemoryReport::new(&arch, &plan);
    let chains: Vec<&str> = report.streamed.iter().map(|c| c.layers.as_str()).collect();
    assert_eq!(chains[0], "stem..block2.project");
    assert_eq!(chains.last(), Some(&"block10.expand..block10.project"));
    // The 64x64x48 expand output of block2 is never stored.
    let expand = layer_index(&arch, "block2.expand");
    assert!(!plan
        .tensors
        .iter()
        .any(|t| (t.role, t.index) == (TensorRole::Activation, expand + 1)));
    // block12.depthwise trains its bias only: its output is kept as a clamp mask.
    let depthwise = layer_index(&arch, "block12.depthwise");
    let mask = plan
        .tensors
        .iter()
        .find(|t| (t.role, t.index) == (TensorRole::ClampMask, depthwise + 1))
        .expect("a clamp mask");
    assert_eq!(mask.bytes, 192 * 8 * 8 / 8);
    assert!(report
        .peak_step_name
        .starts_with("row-streamed forward of stem"));
}

#[test]
fn row_streaming_is_an_option_and_auto_streams_only_what_does_not_fit() {
    let arch = zoo::mbv2_w035_r128();
    let updates = mbv2_sparse(&arch);
    let options = PlanOptions::new(Precision::Int8);
    let plan = |streaming, fits: bool| {
        compile_streaming(&arch, &updates, &options, streaming, |_| fits).expect("compiles")
    };
    let streams = |p: &TrainingPlan| p.steps.iter().any(|s| s.op == StepOp::StreamedForward);
    let masks = |p: &TrainingPlan| p.steps.iter().filter(|s| s.op == StepOp::ClampMask).count();
    let (on, off) = (plan(RowStreaming::On, true), plan(RowStreaming::Off, false));
    assert!(streams(&on) && !streams(&off));
    // Clamp masks do not depend on streaming.
    assert_eq!(masks(&on), masks(&off));
    assert!(masks(&off) > 0);
    assert!(on.arena_bytes < off.arena_bytes);
    for p in [&on, &off] {
        check_liveness(p);
        check_memory_ops(&arch, p);
    }
    assert_eq!(plan(RowStreaming::Auto, true).arena_bytes, off.arena_bytes);
    assert_eq!(plan(RowStreaming::Auto, false).arena_bytes, on.arena_bytes);
}

#[test]
fn mbv2_figures() {
    let arch = zoo::mbv2_w035_r128();
    assert_eq!(arch.param_count().unwrap(), 391_650);
    assert_eq!(arch.forward_macs().unwrap(), 18_943_232);
    let all = UpdateScheme::All.updates(&arch);
    let (reordered, naive) = (mbv2_plan(&all, true), mbv2_plan(&all, false));
    assert!(reordered.arena_bytes < naive.arena_bytes);
    for plan in [&reordered, &naive] {
        assert!(plan.arena_bytes as f64 <= 1.05 * plan.lower_bound_bytes as f64);
        check_liveness(plan);
    }
}

#[test]
fn over_budget_is_refused_with_the_contributors() {
    let out = mcutrain(&[
        "plan",
        "mbv2-w035-r128",
        "--update",
        "all",
        "--sram",
        "256K",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("over the budget of 256.0 KB"), "{message}");
    assert!(
        message.contains("weight gradient of head.pointwise"),
        "{message}"
    );
}

/// `plan --sram` decides as a device run does: the planned tensors, the training state and
/// the firmware's minimum stack, the sizes of the file it writes; a budget one byte short of
/// that is refused by both.
#[test]
fn plan_counts_the_bytes_the_device_checks() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.bin");
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/fashion-shift/int8.mcut");
    let plan = |sram: &str| {
        mcutrain(&[
            "plan",
            model.to_str().unwrap(),
            "--update",
            "last:3",
            "--batch",
            "4",
            "--partial",
            "0.1:0.5",
            "--row-streaming",
            "off",
            "--sram",
            sram,
            "--json",
            "--out",
            file.to_str().unwrap(),
        ])
    };
    let out = plan("4M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written = std::fs::read(&file).unwrap();
    let sizes = PlanSizes::of(&written).unwrap();
    let budget = Budget::default();
    assert_eq!(v["plan_file_bytes"], sizes.file_bytes);
    assert_eq!(v["arena_required_bytes"], sizes.arena_bytes());
    assert_eq!(v["state_bytes"], sizes.state_bytes);
    let sram = sizes.arena_bytes() + budget.min_stack_bytes;
    assert_eq!(v["sram_bytes"], sram);
    for (bytes, fits) in [(sram, true), (sram - 1, false)] {
        let out = plan(&bytes.to_string());
        assert_eq!(out.status.success(), fits, "{bytes}");
        let device_budget = Budget {
            sram_bytes: bytes,
            ..budget
        };
        assert_eq!(check_plan(&sizes, &device_budget).is_ok(), fits, "{bytes}");
    }
}

fn mcutrain(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args(args)
        .output()
        .expect("run mcutrain")
}

#[test]
fn plan_command_reports_and_refuses() {
    let out = mcutrain(&[
        "plan",
        "mbv2-w035-r128",
        "--update",
        "last:5",
        "--sram",
        "4M",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["peak_bytes", "lower_bound_bytes", "flash_bytes"] {
        assert!(v[key].as_u64().unwrap() > 0, "{key}: {v}");
    }
    assert_eq!(v["fits"], true);
    assert_eq!(v["analytic"], true);

    let out = mcutrain(&[
        "plan",
        "mbv2-w035-r128",
        "--update",
        "all",
        "--sram",
        "256K",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("saved activations"), "{stdout}");
    assert!(stderr.contains("over the budget of 256.0 KB"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let sparse =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workloads/mbv2-sparse.json");
    let sparse_plan = |sram: &str, more: &[&str]| {
        let mut args = vec![
            "plan",
            "mbv2-w035-r128",
            "--update",
            sparse.to_str().unwrap(),
            "--sram",
            sram,
        ];
        args.extend(more);
        mcutrain(&args)
    };
    // 256 KB needs row streaming (the plan without it takes about 292 KB), 4 MB does not.
    let out = sparse_plan("256K", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("row streaming on (auto: the plan does not fit the budget without it)")
            && stdout
                .contains("row-streamed forward, intermediate activations never stored: stem..")
            && stdout.contains("clamp masks: "),
        "{stdout}"
    );
    let sparse_json = |streaming: &str| {
        let out = sparse_plan("4M", &["--row-streaming", streaming, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (auto, on, off) = (sparse_json("auto"), sparse_json("on"), sparse_json("off"));
    assert_eq!(auto, off);
    assert_eq!(
        (on["row_streaming"].clone(), off["row_streaming"].clone()),
        (true.into(), false.into())
    );
    assert!(
        on["peak_bytes"].as_u64() < off["peak_bytes"].as_u64(),
        "{on} {off}"
    );

    let out = mcutrain(&["plan", "mbv2-w035-r128", "--update", "nonsense.json"]);
    assert_eq!(out.status.code(), Some(2));
}
