//! The compiler: model + update scheme -> [`TrainingPlan`].
//!
//! Steps, per sample: load the input, the forward of every layer, the loss, then the backward
//! from the last layer down to the lowest trained layer. The backward of a layer is, in order:
//! - the activation mask (reads the layer's OUTPUT, or its clamp mask: codes at the clamp
//!   bounds; int8 layers always mask, since even the identity masks 8-bit saturation, float
//!   layers only for ReLU and ReLU6), in place unless another tensor's pending error shares
//!   the buffer;
//! - the input error (reads the weights, which are still the old ones), not for the lowest
//!   trained layer;
//! - the bias gradient and, with reordering, the bias update;
//! - the weight gradient (reads the layer's INPUT) and, with reordering, the weight update.
//!
//! Pruning: nothing below the lowest trained layer runs backward; frozen parameters get no
//! gradient and stay in flash (in int8 plans, so do the frozen channels of a layer that trains
//! a strict subset of its weight channels: the int8 executor updates those channels under the
//! layer's fixed quantization, so the others never change); an activation is kept after the forward only when a backward
//! step reads it (a bias-only layer keeps no input activation). Errors of a tensor read by two
//! layers are summed out of place ([`StepOp::AccumulateError`]); an add passes its output error
//! to both inputs without a copy, a flatten passes it through.
//!
//! Memory-saving steps of int8 plans (the int8 executor runs them; float plans keep plain
//! steps until the float executor does), found from a first build without them:
//! - row streaming: a run of frozen convolutions whose intermediate activations nothing but
//!   the next convolution reads (no backward step, one consumer) becomes one
//!   [`StepOp::StreamedForward`] step; the intermediates are never stored, only row windows
//!   of them in the step's scratch ([`stream::scratch_bytes`]). A stage joins a chain only when
//!   its window is smaller than the tensor it replaces. It costs instructions, so it is an
//!   option ([`PlanOptions::row_streaming`]; [`compile_streaming`] streams only a plan that
//!   does not fit otherwise);
//! - clamp masks: an activation that in the backward pass only its activation mask reads is
//!   reduced right after its forward to a 1-bit mask ([`StepOp::ClampMask`]), which the mask
//!   step reads instead (an eighth of the bytes kept for the backward pass).
//!
//! Reordering (Tiny Training Engine): each update right after its gradient, so at batch 1 no
//! gradient buffer outlives its layer. Without it (the naive baseline) every update runs after
//! the whole backward and all gradients live until then. At batch > 1 the gradient buffers
//! accumulate over the samples of the batch and are persistent; updates run once per batch.

use super::liveness;
use super::scheme::LayerUpdate;
use super::{
    arena, Category, Placement, PlanTensor, Precision, Step, StepOp, TensorId, TensorRole,
    TrainingPlan,
};
use crate::engine::consumers;
use crate::model::{numel, Architecture, Geometry, LayerKind, ModelError, Shape};
use mcutrain_core::ops::activation::{self, Activation};
use mcutrain_core::ops::conv2d::Conv2dGeom;
use mcutrain_core::ops::stream;
use mcutrain_core::update::GradStats;

/// How to compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Element sizes of the model.
    pub precision: Precision,
    /// Samples per update (>= 1); the steps process one sample at a time.
    pub batch: usize,
    /// Apply each update as soon as its gradient exists.
    pub reorder: bool,
    /// float32 SGD with momentum: a velocity buffer per trained parameter (persistent).
    pub momentum: bool,
    /// Row-stream the chains of frozen convolutions (int8 plans): less SRAM, more
    /// instructions (the streamed kernel calls the convolution once per row and channel).
    pub row_streaming: bool,
}

impl PlanOptions {
    /// Batch 1, reordering on, no momentum, row streaming on (the smallest plan).
    pub fn new(precision: Precision) -> Self {
        PlanOptions {
            precision,
            batch: 1,
            reorder: true,
            momentum: false,
            row_streaming: true,
        }
    }
}

/// When to row-stream frozen convolution chains ([`PlanOptions::row_streaming`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RowStreaming {
    /// Only when the plan does not fit its budget without it.
    #[default]
    Auto,
    /// Wherever a chain qualifies: the smallest plan.
    On,
    /// Never: the fewest instructions.
    Off,
}

/// [`compile`] with row streaming as `streaming` says; with [`RowStreaming::Auto`] the plan
/// without streaming when `fits` accepts it, else the streamed one.
pub fn compile_streaming(
    arch: &Architecture,
    updates: &[LayerUpdate],
    options: &PlanOptions,
    streaming: RowStreaming,
    fits: impl Fn(&TrainingPlan) -> bool,
) -> Result<TrainingPlan, CompileError> {
    let with = |row_streaming| {
        let options = PlanOptions {
            row_streaming,
            ..*options
        };
        compile(arch, updates, &options)
    };
    match streaming {
        RowStreaming::On => with(true),
        RowStreaming::Off => with(false),
        RowStreaming::Auto => {
            let plain = with(false)?;
            if fits(&plain) {
                Ok(plain)
            } else {
                with(true)
            }
        }
    }
}

/// Why a model and scheme cannot be compiled.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum CompileError {
    /// The architecture is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The per-layer scheme does not fit the architecture.
    #[error("the update scheme has {updates} entries for {layers} layers")]
    SchemeLength {
        /// Entries given.
        updates: usize,
        /// Layers of the model.
        layers: usize,
    },
    /// A layer trains more channels than it has, or trains without parameters.
    #[error("layer {layer} ({name}) cannot train {channels} weight channels and bias={bias}: it has {out_channels} output channels")]
    BadLayerUpdate {
        /// Layer index.
        layer: usize,
        /// Layer name.
        name: String,
        /// Weight channels asked for.
        channels: usize,
        /// Bias asked for.
        bias: bool,
        /// Output channels of the layer (0 without parameters).
        out_channels: usize,
    },
    /// The scheme trains nothing.
    #[error("the update scheme trains no parameter; nothing to plan")]
    NothingTrained,
    /// Batch 0.
    #[error("the batch size must be at least 1")]
    ZeroBatch,
    /// Momentum asked for an int8 model.
    #[error(
        "momentum applies to float32 models; the int8 update keeps gradient statistics instead"
    )]
    MomentumNeedsFloat,
}

/// Compile `arch` trained by `updates` (one entry per layer) into a plan with its arena.
pub fn compile(
    arch: &Architecture,
    updates: &[LayerUpdate],
    options: &PlanOptions,
) -> Result<TrainingPlan, CompileError> {
    let memory = MemoryOps::find(arch, updates, options)?;
    let (mut tensors, steps) = build(arch, updates, options, &memory)?;
    let lifetimes = liveness::lifetimes(&tensors, &steps);
    let (lower_bound_bytes, _) = liveness::lower_bound(&tensors, &lifetimes, steps.len());
    let (ids, blocks) = arena_blocks(&tensors, &lifetimes);
    let mut layout = arena::place(&blocks);
    if options.reorder {
        // Reordering only shortens gradient lifetimes, so any two tensors live together here
        // are live together in the naive plan (same tensors, same ids): its layout is valid
        // here too. Keep it when smaller, since the greedy planner is not monotone.
        let naive_options = PlanOptions {
            reorder: false,
            ..*options
        };
        let (naive_tensors, naive_steps) = build(arch, updates, &naive_options, &memory)?;
        let naive_lifetimes = liveness::lifetimes(&naive_tensors, &naive_steps);
        let (naive_ids, naive_blocks) = arena_blocks(&naive_tensors, &naive_lifetimes);
        let naive = arena::place(&naive_blocks);
        if naive.peak < layout.peak && naive_ids == ids && arena::is_valid(&blocks, &naive.offsets)
        {
            layout = naive;
        }
    }
    for (id, offset) in ids.iter().zip(&layout.offsets) {
        tensors[*id].placement = Placement::Arena { offset: *offset };
    }
    Ok(TrainingPlan {
        precision: options.precision,
        batch: options.batch,
        reorder: options.reorder,
        updates: updates.to_vec(),
        tensors,
        steps,
        arena_bytes: layout.peak,
        lower_bound_bytes,
    })
}

/// Which activations the memory-saving steps apply to (see the module documentation), per
/// model tensor; found from the plan built without them. Empty for float plans; no streaming
/// without [`PlanOptions::row_streaming`].
#[derive(Clone, Debug, Default)]
struct MemoryOps {
    /// No backward step reads the activation: it may be streamed.
    forward_only: Vec<bool>,
    /// In the backward pass only activation mask steps read it: keep its clamp mask instead.
    mask_only: Vec<bool>,
}

impl MemoryOps {
    fn find(
        arch: &Architecture,
        updates: &[LayerUpdate],
        options: &PlanOptions,
    ) -> Result<Self, CompileError> {
        if options.precision != Precision::Int8 {
            return Ok(MemoryOps::default());
        }
        let (tensors, steps) = build(arch, updates, options, &MemoryOps::default())?;
        let mut memory = MemoryOps {
            forward_only: vec![false; arch.layers.len() + 1],
            mask_only: vec![false; arch.layers.len() + 1],
        };
        for (id, tensor) in tensors.iter().enumerate() {
            let TensorRole::Activation { tensor: t } = tensor.role else {
                continue;
            };
            let mut readers = steps
                .iter()
                .filter(|s| s.op.is_backward() && s.reads.contains(&id))
                .peekable();
            let forward_only = readers.peek().is_none();
            memory.forward_only[t] = options.row_streaming && forward_only;
            memory.mask_only[t] = !forward_only
                && readers.all(|s| s.op == StepOp::ActivationMask && s.reads[0] == id);
        }
        Ok(memory)
    }

    fn forward_only(&self, t: usize) -> bool {
        self.forward_only.get(t).copied().unwrap_or(false)
    }

    fn mask_only(&self, t: usize) -> bool {
        self.mask_only.get(t).copied().unwrap_or(false)
    }
}

/// The tensors and steps of the plan, before arena placement.
fn build(
    arch: &Architecture,
    updates: &[LayerUpdate],
    options: &PlanOptions,
    memory: &MemoryOps,
) -> Result<(Vec<PlanTensor>, Vec<Step>), CompileError> {
    let shapes = arch.shapes()?;
    if updates.len() != arch.layers.len() {
        return Err(CompileError::SchemeLength {
            updates: updates.len(),
            layers: arch.layers.len(),
        });
    }
    if options.batch == 0 {
        return Err(CompileError::ZeroBatch);
    }
    if options.momentum && options.precision == Precision::Int8 {
        return Err(CompileError::MomentumNeedsFloat);
    }
    let params = layer_params(arch, &shapes)?;
    for (layer, (update, p)) in updates.iter().zip(&params).enumerate() {
        if update.weight_channels > p.out_channels || (update.bias && p.out_channels == 0) {
            return Err(CompileError::BadLayerUpdate {
                layer,
                name: arch.layers[layer].name.clone(),
                channels: update.weight_channels,
                bias: update.bias,
                out_channels: p.out_channels,
            });
        }
    }
    let lowest = updates
        .iter()
        .position(|u| u.any())
        .ok_or(CompileError::NothingTrained)?;
    let mut compiler = Compiler {
        arch,
        shapes: &shapes,
        params: &params,
        updates,
        options: *options,
        memory,
        lowest,
        tensors: Vec::new(),
        steps: Vec::new(),
        deferred: Vec::new(),
        pending: vec![None; arch.layers.len() + 1],
        param_tensors: Vec::new(),
        clamp_masks: vec![None; arch.layers.len() + 1],
    };
    let activations = compiler.forward();
    compiler.backward(&activations);
    let Compiler {
        mut tensors,
        mut steps,
        deferred,
        ..
    } = compiler;
    steps.extend(deferred);
    mark_saved_activations(&mut tensors, &steps);
    Ok((tensors, steps))
}

/// The arena tensors' ids and their blocks (aligned size, lifetime).
fn arena_blocks(
    tensors: &[PlanTensor],
    lifetimes: &[Option<liveness::Lifetime>],
) -> (Vec<TensorId>, Vec<arena::Block>) {
    lifetimes
        .iter()
        .enumerate()
        .filter_map(|(id, life)| {
            life.map(|l| {
                let block = arena::Block {
                    bytes: super::aligned(tensors[id].bytes),
                    first: l.first,
                    last: l.last,
                };
                (id, block)
            })
        })
        .unzip()
}

/// Parameter geometry of one layer.
struct LayerParams {
    /// Weight elements (0 without parameters).
    weight_len: usize,
    /// Output channels = bias elements (0 without parameters).
    out_channels: usize,
    /// Kernel scratch bytes of the layer's conv/linear kernels.
    scratch: usize,
    /// The geometry of a convolution (a possible stage of a streamed chain).
    conv: Option<Conv2dGeom>,
}

fn layer_params(arch: &Architecture, shapes: &[Shape]) -> Result<Vec<LayerParams>, ModelError> {
    (0..arch.layers.len())
        .map(|i| {
            let geometry =
                arch.geometry(i, shapes[i], 1)
                    .map_err(|problem| ModelError::BadLayer {
                        index: i,
                        name: arch.layers[i].name.clone(),
                        problem,
                    })?;
            Ok(match geometry {
                Geometry::Conv(g) => LayerParams {
                    weight_len: g.weight_len(),
                    out_channels: g.out_channels,
                    scratch: g.scratch_bytes(),
                    conv: Some(g),
                },
                Geometry::Linear(g) => LayerParams {
                    weight_len: g.weight_len(),
                    out_channels: g.out_features,
                    scratch: g.scratch_bytes(),
                    conv: None,
                },
                // The pooling, activation, add and loss kernels need no scratch (see their
                // module documentation).
                Geometry::Pool(_) | Geometry::Elementwise { .. } => LayerParams {
                    weight_len: 0,
                    out_channels: 0,
                    scratch: 0,
                    conv: None,
                },
            })
        })
        .collect()
}

/// The weight and bias tensors of a layer with parameters.
#[derive(Clone, Copy)]
struct ParamTensors {
    weight: TensorId,
    bias: TensorId,
}

/// The plan under construction.
struct Compiler<'a> {
    arch: &'a Architecture,
    shapes: &'a [Shape],
    params: &'a [LayerParams],
    updates: &'a [LayerUpdate],
    options: PlanOptions,
    /// Where the memory-saving steps apply.
    memory: &'a MemoryOps,
    /// The lowest layer that trains anything: the backward stops there.
    lowest: usize,
    tensors: Vec<PlanTensor>,
    steps: Vec<Step>,
    /// Update steps held back until the end of the backward (no reordering).
    deferred: Vec<Step>,
    /// Per model tensor: the buffer holding the error contributions summed so far.
    pending: Vec<Option<TensorId>>,
    /// Per layer: its weight and bias tensors (`None` without parameters).
    param_tensors: Vec<Option<ParamTensors>>,
    /// Per model tensor: the clamp mask kept instead of its activation.
    clamp_masks: Vec<Option<TensorId>>,
}

impl Compiler<'_> {
    /// Add a tensor: parameters and optimizer state persist, so do gradients at batch > 1
    /// (they accumulate over the batch); frozen parameters go to flash.
    fn tensor(
        &mut self,
        role: TensorRole,
        category: Category,
        layer: Option<usize>,
        bytes: usize,
    ) -> TensorId {
        let persistent = match role {
            TensorRole::Weight { .. }
            | TensorRole::Bias { .. }
            | TensorRole::OptimizerState { .. } => true,
            TensorRole::WeightGrad { .. } | TensorRole::BiasGrad { .. } => self.options.batch > 1,
            _ => false,
        };
        let placement = if category == Category::FrozenWeight {
            Placement::Flash
        } else {
            Placement::Arena { offset: 0 }
        };
        let flash_bytes = match role {
            TensorRole::Weight { .. } | TensorRole::Bias { .. } => bytes,
            _ => 0,
        };
        self.tensors.push(PlanTensor {
            role,
            category,
            layer,
            bytes,
            flash_bytes,
            persistent,
            placement,
        });
        self.tensors.len() - 1
    }

    /// Append a step of `layer`, with a scratch tensor when the layer's kernel needs one.
    fn step(
        &mut self,
        op: StepOp,
        layer: Option<usize>,
        reads: Vec<TensorId>,
        writes: Vec<TensorId>,
    ) {
        let scratch_bytes = match (op, layer) {
            (
                StepOp::Forward | StepOp::InputError | StepOp::WeightGrad | StepOp::BiasGrad,
                Some(l),
            ) => self.params[l].scratch,
            _ => 0,
        };
        self.step_with_scratch(op, layer, reads, writes, scratch_bytes);
    }

    /// Append a step with a scratch tensor of `scratch_bytes` (none when 0).
    fn step_with_scratch(
        &mut self,
        op: StepOp,
        layer: Option<usize>,
        reads: Vec<TensorId>,
        writes: Vec<TensorId>,
        scratch_bytes: usize,
    ) {
        let scratch = (scratch_bytes > 0).then(|| {
            let step = self.steps.len();
            self.tensor(
                TensorRole::Scratch { step },
                Category::Scratch,
                layer,
                scratch_bytes,
            )
        });
        self.steps.push(Step {
            op,
            layer,
            reads,
            writes,
            scratch,
        });
    }

    /// Bytes of model tensor `t` as an activation or error.
    fn tensor_bytes(&self, t: usize) -> usize {
        numel(self.shapes[t]) * self.options.precision.element_bytes()
    }

    /// Load the input and run every layer's forward; returns the activation buffer of every
    /// model tensor (a flatten output shares its input's; `None`: streamed, never stored).
    fn forward(&mut self) -> Vec<Option<TensorId>> {
        let input_bytes = self.tensor_bytes(0);
        let input = self.tensor(
            TensorRole::Activation { tensor: 0 },
            Category::ForwardActivation,
            None,
            input_bytes,
        );
        self.step(StepOp::LoadInput, None, vec![], vec![input]);
        let mut activations = vec![Some(input)];
        for i in 0..self.arch.layers.len() {
            let params = self.create_param_tensors(i);
            self.param_tensors.push(params);
        }
        let arch = self.arch;
        let mut i = 0;
        while i < arch.layers.len() {
            let layer = &arch.layers[i];
            if layer.kind == LayerKind::Flatten {
                activations.push(activations[i]);
                i += 1;
                continue;
            }
            let last = self.chain_end(i);
            let mut reads = vec![stored(&activations, i)];
            let bytes = self.tensor_bytes(last + 1);
            let output = self.tensor(
                TensorRole::Activation { tensor: last + 1 },
                Category::ForwardActivation,
                Some(last),
                bytes,
            );
            if last > i {
                let windows = stream::scratch_bytes(
                    self.params[i..=last].iter().filter_map(|p| p.conv.as_ref()),
                );
                self.step_with_scratch(
                    StepOp::StreamedForward,
                    Some(i),
                    reads,
                    vec![output],
                    windows,
                );
                activations.extend(std::iter::repeat_n(None, last - i));
            } else {
                if let LayerKind::Add { skip_from } = layer.kind {
                    reads.push(stored(&activations, skip_from + 1));
                }
                if let Some(p) = self.param_tensors[i] {
                    reads.extend([p.weight, p.bias]);
                }
                self.step(StepOp::Forward, Some(i), reads, vec![output]);
            }
            activations.push(Some(output));
            self.keep_clamp_mask(last, output);
            i = last + 1;
        }
        activations
    }

    /// The last layer of the streamed chain that starts at layer `i` (`i` itself when none
    /// does): frozen convolutions, each intermediate activation read by no backward step and
    /// by no layer but the next, each window smaller than the activation it replaces, at most
    /// [`stream::MAX_STAGES`] of them.
    fn chain_end(&self, i: usize) -> usize {
        let stage = |j: usize| self.params[j].conv.filter(|_| !self.updates[j].any());
        if stage(i).is_none() {
            return i;
        }
        let mut last = i;
        while last + 1 < self.arch.layers.len() && last + 1 - i < stream::MAX_STAGES {
            let next = last + 1;
            let Some(g) = stage(next) else {
                break;
            };
            let streamable = self.memory.forward_only(next)
                && consumers(self.arch, next) == [next]
                && stream::window_bytes(&g) < self.tensor_bytes(next);
            if !streamable {
                break;
            }
            last = next;
        }
        last
    }

    /// After the forward of `layer` wrote `output`: when in the backward pass only the
    /// activation mask reads it, keep its clamp mask (one bit per element) for that step.
    fn keep_clamp_mask(&mut self, layer: usize, output: TensorId) {
        let t = layer + 1;
        if !self.memory.mask_only(t) {
            return;
        }
        let bytes = activation::clamp_mask_bytes(numel(self.shapes[t]));
        let mask = self.tensor(
            TensorRole::ClampMask { tensor: t },
            Category::SavedActivation,
            Some(layer),
            bytes,
        );
        self.step(StepOp::ClampMask, Some(layer), vec![output], vec![mask]);
        self.clamp_masks[t] = Some(mask);
    }

    /// Create the weight and bias tensors of layer `i` (trained ones in SRAM, frozen ones in
    /// flash); `None` for layers without parameters.
    fn create_param_tensors(&mut self, i: usize) -> Option<ParamTensors> {
        let p = &self.params[i];
        if p.out_channels == 0 {
            return None;
        }
        let (weight_len, out_channels) = (p.weight_len, p.out_channels);
        let update = self.updates[i];
        let category = |trained: bool| {
            if trained {
                Category::TrainedWeight
            } else {
                Category::FrozenWeight
            }
        };
        let precision = self.options.precision;
        let weight_bytes = weight_len * precision.element_bytes();
        // int8 layers that train a strict subset of their channels keep only those in SRAM
        // (they update under a fixed quantization; see the module documentation).
        let subset = update.weight_channels > 0 && update.weight_channels < out_channels;
        let sram_bytes = if subset && precision == Precision::Int8 {
            weight_bytes / out_channels * update.weight_channels
        } else {
            weight_bytes
        };
        let weight = self.tensor(
            TensorRole::Weight { layer: i },
            category(update.weight_channels > 0),
            Some(i),
            sram_bytes,
        );
        self.tensors[weight].flash_bytes = weight_bytes;
        let bias = self.tensor(
            TensorRole::Bias { layer: i },
            category(update.bias),
            Some(i),
            out_channels * precision.bias_bytes(),
        );
        Some(ParamTensors { weight, bias })
    }

    /// Loss and backward from the last layer down to the lowest trained one.
    fn backward(&mut self, activations: &[Option<TensorId>]) {
        let arch = self.arch;
        let n = arch.layers.len();
        let logits_error = self.tensor(
            TensorRole::Error { tensor: n },
            Category::Error,
            Some(n - 1),
            self.tensor_bytes(n),
        );
        self.step(
            StepOp::Loss,
            None,
            vec![stored(activations, n)],
            vec![logits_error],
        );
        self.pending[n] = Some(logits_error);
        for i in (self.lowest..n).rev() {
            let Some(error) = self.pending[i + 1].take() else {
                continue;
            };
            match arch.layers[i].kind {
                LayerKind::Conv2d { activation, .. } | LayerKind::Linear { activation, .. } => {
                    let error = self.mask(i, activation, stored(activations, i + 1), error);
                    self.parametric_backward(i, stored(activations, i), error);
                }
                LayerKind::Activation(activation) => {
                    let error = self.mask(i, activation, stored(activations, i + 1), error);
                    self.contribute(i, i, error);
                }
                LayerKind::AvgPool { .. } | LayerKind::GlobalAvgPool => {
                    self.input_error(i, vec![error]);
                }
                LayerKind::MaxPool { .. } => {
                    self.input_error(i, vec![stored(activations, i), error])
                }
                LayerKind::Add { skip_from } => {
                    self.contribute(i, i, error);
                    self.contribute(i, skip_from + 1, error);
                }
                LayerKind::Flatten => self.contribute(i, i, error),
            }
        }
    }

    /// The activation mask of layer `i` on its output error; returns the masked error buffer.
    fn mask(
        &mut self,
        i: usize,
        activation: Activation,
        output: TensorId,
        error: TensorId,
    ) -> TensorId {
        let masks = match self.options.precision {
            Precision::Int8 => true,
            Precision::Float32 => activation != Activation::None,
        };
        if !masks {
            return error;
        }
        let shared = self.pending.contains(&Some(error));
        let masked = if shared {
            let bytes = self.tensors[error].bytes;
            self.tensor(
                TensorRole::Error { tensor: i + 1 },
                Category::Error,
                Some(i),
                bytes,
            )
        } else {
            error
        };
        let output = self.clamp_masks[i + 1].unwrap_or(output);
        self.step(
            StepOp::ActivationMask,
            Some(i),
            vec![output, error],
            vec![masked],
        );
        masked
    }

    /// Input error of layer `i` from `reads`, contributed to tensor `i`.
    fn input_error(&mut self, i: usize, reads: Vec<TensorId>) {
        let role = if consumers(self.arch, i).len() > 1 {
            TensorRole::ErrorPart { tensor: i }
        } else {
            TensorRole::Error { tensor: i }
        };
        let bytes = self.tensor_bytes(i);
        let layer = i.checked_sub(1);
        let part = self.tensor(role, Category::Error, layer, bytes);
        self.step(StepOp::InputError, Some(i), reads, vec![part]);
        self.contribute(i, i, part);
    }

    /// Add `part` to the error of model tensor `t` (computed by layer `by`); errors at or below
    /// the lowest trained layer's input are pruned.
    fn contribute(&mut self, by: usize, t: usize, part: TensorId) {
        if t <= self.lowest {
            return;
        }
        self.pending[t] = Some(match self.pending[t] {
            None => part,
            Some(previous) => {
                let bytes = self.tensor_bytes(t);
                let sum = self.tensor(
                    TensorRole::Error { tensor: t },
                    Category::Error,
                    t.checked_sub(1),
                    bytes,
                );
                self.step(
                    StepOp::AccumulateError,
                    Some(by),
                    vec![previous, part],
                    vec![sum],
                );
                sum
            }
        });
    }

    /// Input error, gradients and updates of conv/linear layer `i` from its masked `error`.
    fn parametric_backward(&mut self, i: usize, input: TensorId, error: TensorId) {
        let params = self.param_tensors[i].expect("conv and linear layers have parameters");
        if i > self.lowest {
            self.input_error(i, vec![params.weight, error]);
        }
        let update = self.updates[i];
        let grad_bytes = self.options.precision.gradient_bytes();
        let out_channels = self.params[i].out_channels;
        if update.bias {
            let grad = self.tensor(
                TensorRole::BiasGrad { layer: i },
                Category::GradientAndState,
                Some(i),
                out_channels * grad_bytes,
            );
            self.step(StepOp::BiasGrad, Some(i), vec![error], vec![grad]);
            let state = self.velocity(i, out_channels);
            self.update(StepOp::BiasUpdate, i, grad, params.bias, state);
        }
        if update.weight_channels > 0 {
            let structure_len = self.params[i].weight_len / out_channels;
            let trained_len = update.weight_channels * structure_len;
            let grad = self.tensor(
                TensorRole::WeightGrad { layer: i },
                Category::GradientAndState,
                Some(i),
                trained_len * grad_bytes,
            );
            self.step(StepOp::WeightGrad, Some(i), vec![input, error], vec![grad]);
            let state = match self.options.precision {
                Precision::Int8 => Some(self.tensor(
                    TensorRole::OptimizerState { layer: i },
                    Category::GradientAndState,
                    Some(i),
                    update.weight_channels * std::mem::size_of::<GradStats>(),
                )),
                Precision::Float32 => self.velocity(i, trained_len),
            };
            self.update(StepOp::WeightUpdate, i, grad, params.weight, state);
        }
    }

    /// The float momentum velocity of `len` trained parameters of layer `i`, if momentum is on.
    fn velocity(&mut self, i: usize, len: usize) -> Option<TensorId> {
        self.options.momentum.then(|| {
            let bytes = len * self.options.precision.gradient_bytes();
            self.tensor(
                TensorRole::OptimizerState { layer: i },
                Category::GradientAndState,
                Some(i),
                bytes,
            )
        })
    }

    /// The update of `param` from `grad`: now (reordering) or after the backward.
    fn update(
        &mut self,
        op: StepOp,
        i: usize,
        grad: TensorId,
        param: TensorId,
        state: Option<TensorId>,
    ) {
        let mut reads = vec![grad, param];
        let mut writes = vec![param];
        if let Some(state) = state {
            reads.push(state);
            writes.push(state);
        }
        if self.options.reorder {
            self.step(op, Some(i), reads, writes);
        } else {
            self.deferred.push(Step {
                op,
                layer: Some(i),
                reads,
                writes,
                scratch: None,
            });
        }
    }
}

/// The buffer of model tensor `t` (streamed activations are never stored, and only their
/// chain reads them).
fn stored(activations: &[Option<TensorId>], t: usize) -> TensorId {
    activations[t].expect("only its streamed chain reads a streamed activation")
}

/// Activations read by a backward step become [`Category::SavedActivation`].
fn mark_saved_activations(tensors: &mut [PlanTensor], steps: &[Step]) {
    for step in steps.iter().filter(|s| s.op.is_backward()) {
        for &id in &step.reads {
            if tensors[id].category == Category::ForwardActivation {
                tensors[id].category = Category::SavedActivation;
            }
        }
    }
}
