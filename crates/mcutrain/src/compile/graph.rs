//! The compiler: model + update scheme -> [`TrainingPlan`].
//!
//! Steps, per sample: load the input, the forward of every layer, the loss, then the backward
//! from the last layer down to the lowest trained layer. Every layer is handled through the
//! layer contract (its operator's flags and kernels, [`mcutrain_core::layer`]) and every
//! step's operands come from [`layer_step`], the description the plan validator and the
//! executor share, so a new operator needs nothing here. The backward of a layer is, in order:
//! - the activation mask (reads the layer's OUTPUT, or its clamp mask: codes at the clamp
//!   bounds; int8 layers always mask, since even the identity masks 8-bit saturation, float
//!   layers only for ReLU and ReLU6), in place unless another tensor's pending error shares
//!   the buffer;
//! - the input error (reads the weights, which are still the old ones, and the input where the
//!   operator's kernel needs it), not for the lowest trained layer; a layer without an
//!   input-error kernel (activation, add, flatten) passes its error on unchanged;
//! - the bias gradient and, with reordering, the bias update;
//! - the weight gradient (reads the layer's INPUT) and, with reordering, the weight update.
//!
//! Pruning: nothing below the lowest trained layer runs backward; frozen parameters get no
//! gradient and stay in flash (in int8 plans, so do the frozen channels of a layer that trains
//! a strict subset of its weight channels: the int8 executor updates those channels under the
//! layer's fixed quantization, so the others never change); an activation is kept after the
//! forward only when a backward step reads it (a bias-only layer keeps no input activation). Errors of a tensor read by two
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
use super::{arena, Category, Placement, PlanTensor, Step, TensorId, TrainingPlan};
use crate::model::{numel, Architecture, LayerUpdate, ModelError, ResolvedLayer};
use mcutrain_core::ops::{activation, stream};
use mcutrain_core::plan::operands::{layer_step, masks, Operand, Training};
use mcutrain_core::plan::{Precision, StepOp, TensorRole};
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
            if tensor.role != TensorRole::Activation {
                continue;
            }
            let t = tensor.index;
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
    let layers = arch.resolved(1)?;
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
    for (i, (update, layer)) in updates.iter().zip(&layers).enumerate() {
        let out_channels = layer.params().map_or(0, |p| p.channels);
        if update.weight_channels > out_channels || (update.bias && out_channels == 0) {
            return Err(CompileError::BadLayerUpdate {
                layer: i,
                name: arch.layers[i].name.clone(),
                channels: update.weight_channels,
                bias: update.bias,
                out_channels,
            });
        }
    }
    let lowest = updates
        .iter()
        .position(|u| u.any())
        .ok_or(CompileError::NothingTrained)?;
    let mut compiler = Compiler {
        arch,
        layers: &layers,
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

/// The weight and bias tensors of a layer with parameters.
#[derive(Clone, Copy)]
struct ParamTensors {
    weight: TensorId,
    bias: TensorId,
}

/// The tensors bound to the operands of one step ([`Operand`]); unbound ones are `None`.
#[derive(Clone, Copy, Default)]
struct Bindings {
    input: Option<TensorId>,
    skip: Option<TensorId>,
    output: Option<TensorId>,
    clamp_mask: Option<TensorId>,
    chain_output: Option<TensorId>,
    params: Option<ParamTensors>,
    output_error: Option<TensorId>,
    input_error: Option<TensorId>,
    gradient: Option<TensorId>,
    state: Option<TensorId>,
}

impl Bindings {
    fn get(&self, operand: Operand) -> Option<TensorId> {
        match operand {
            Operand::Input => self.input,
            Operand::Skip => self.skip,
            Operand::Output => self.output,
            Operand::OutputOrMask => self.clamp_mask.or(self.output),
            Operand::ClampMask => self.clamp_mask,
            Operand::ChainOutput => self.chain_output,
            Operand::Weight => self.params.map(|p| p.weight),
            Operand::Bias => self.params.map(|p| p.bias),
            Operand::OutputError => self.output_error,
            Operand::InputError => self.input_error,
            Operand::WeightGrad | Operand::BiasGrad => self.gradient,
            Operand::OptimizerState | Operand::BiasOptimizerState => self.state,
        }
    }
}

/// The plan under construction.
struct Compiler<'a> {
    arch: &'a Architecture,
    /// Every layer at batch 1 (the steps process one sample at a time).
    layers: &'a [ResolvedLayer],
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
        (role, index): (TensorRole, usize),
        category: Category,
        layer: Option<usize>,
        bytes: usize,
    ) -> TensorId {
        let persistent = match role {
            TensorRole::Weight
            | TensorRole::Bias
            | TensorRole::OptimizerState
            | TensorRole::BiasOptimizerState => true,
            TensorRole::WeightGrad | TensorRole::BiasGrad => self.options.batch > 1,
            _ => false,
        };
        let placement = if category == Category::FrozenWeight {
            Placement::Flash
        } else {
            Placement::Arena { offset: 0 }
        };
        let flash_bytes = match role {
            TensorRole::Weight | TensorRole::Bias => bytes,
            _ => 0,
        };
        self.tensors.push(PlanTensor {
            role,
            index,
            category,
            layer,
            bytes,
            flash_bytes,
            persistent,
            placement,
        });
        self.tensors.len() - 1
    }

    /// Step `op` of layer `i` with the operands of its schema ([`layer_step`]) bound to
    /// tensors: `reads` and `writes` (which differ only where a step writes a new version of
    /// what it reads, the masked copy of an error). A scratch tensor is added when the layer's
    /// kernels need one.
    fn layer_step(&mut self, op: StepOp, i: usize, reads: &Bindings, writes: &Bindings) -> Step {
        let layer = self.layers[i].op();
        let update = self.updates[i];
        let training = Training {
            precision: self.options.precision,
            trains_weight: update.trains_weight(),
            trains_bias: update.bias,
            momentum: self.options.momentum,
        };
        let schema = layer_step(op, layer, training)
            .expect("the compiler asks only for the steps of the layer's schema");
        let bind = |bindings: &Bindings, operands: &[Option<Operand>]| -> Vec<TensorId> {
            operands
                .iter()
                .flatten()
                .map(|&o| {
                    bindings
                        .get(o)
                        .expect("the compiler binds every operand of the schema")
                })
                .collect()
        };
        let kernel_step = matches!(
            op,
            StepOp::Forward | StepOp::InputError | StepOp::WeightGrad | StepOp::BiasGrad
        );
        let scratch_bytes = if kernel_step {
            layer.scratch_bytes()
        } else {
            0
        };
        let scratch = (scratch_bytes > 0).then(|| {
            let step = self.steps.len();
            self.tensor(
                (TensorRole::Scratch, step),
                Category::Scratch,
                Some(i),
                scratch_bytes,
            )
        });
        Step {
            op,
            layer: Some(i),
            reads: bind(reads, &schema.reads),
            writes: bind(writes, &schema.writes),
            scratch,
        }
    }

    /// Append step `op` of layer `i` with the same tensors read and written.
    fn push_layer_step(&mut self, op: StepOp, i: usize, bindings: &Bindings) {
        let step = self.layer_step(op, i, bindings, bindings);
        self.steps.push(step);
    }

    /// Append a step of the model as a whole (loading the input, the loss, an error sum).
    fn push_step(
        &mut self,
        op: StepOp,
        layer: Option<usize>,
        reads: Vec<TensorId>,
        writes: Vec<TensorId>,
    ) {
        self.steps.push(Step {
            op,
            layer,
            reads,
            writes,
            scratch: None,
        });
    }

    /// Bytes of model tensor `t` as an activation or error.
    fn tensor_bytes(&self, t: usize) -> usize {
        let shape = if t == 0 {
            self.arch.input
        } else {
            self.layers[t - 1].op().output_shape()
        };
        numel(shape) * self.options.precision.element_bytes()
    }

    /// Load the input and run every layer's forward; returns the activation buffer of every
    /// model tensor (a layer that aliases its input shares its buffer; `None`: streamed, never
    /// stored).
    fn forward(&mut self) -> Vec<Option<TensorId>> {
        let input_bytes = self.tensor_bytes(0);
        let input = self.tensor(
            (TensorRole::Activation, 0),
            Category::ForwardActivation,
            None,
            input_bytes,
        );
        self.push_step(StepOp::LoadInput, None, vec![], vec![input]);
        let mut activations = vec![Some(input)];
        for i in 0..self.layers.len() {
            let params = self.create_param_tensors(i);
            self.param_tensors.push(params);
        }
        let mut i = 0;
        while i < self.layers.len() {
            let op = self.layers[i].op();
            if op.aliases_input() {
                activations.push(activations[i]);
                i += 1;
                continue;
            }
            let last = self.chain_end(i);
            let bytes = self.tensor_bytes(last + 1);
            let output = self.tensor(
                (TensorRole::Activation, last + 1),
                Category::ForwardActivation,
                Some(last),
                bytes,
            );
            let bindings = Bindings {
                input: Some(stored(&activations, i)),
                skip: op.skip_from().map(|s| stored(&activations, s + 1)),
                output: Some(output),
                chain_output: Some(output),
                params: self.param_tensors[i],
                ..Bindings::default()
            };
            if last > i {
                let stages = self.layers[i..=last].iter().filter_map(|l| l.conv());
                let windows = stream::scratch_bytes(stages.map(|c| &c.geom));
                let mut step = self.layer_step(StepOp::StreamedForward, i, &bindings, &bindings);
                step.scratch = Some(self.tensor(
                    (TensorRole::Scratch, self.steps.len()),
                    Category::Scratch,
                    Some(i),
                    windows,
                ));
                self.steps.push(step);
                activations.extend(std::iter::repeat_n(None, last - i));
            } else {
                self.push_layer_step(StepOp::Forward, i, &bindings);
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
        let stage = |j: usize| self.layers[j].conv().filter(|_| !self.updates[j].any());
        if stage(i).is_none() {
            return i;
        }
        let mut last = i;
        while last + 1 < self.layers.len() && last + 1 - i < stream::MAX_STAGES {
            let next = last + 1;
            let Some(conv) = stage(next) else {
                break;
            };
            let streamable = self.memory.forward_only(next)
                && self.arch.consumers(next) == [next]
                && stream::window_bytes(&conv.geom) < self.tensor_bytes(next);
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
        let bytes = activation::clamp_mask_bytes(numel(self.layers[layer].op().output_shape()));
        let mask = self.tensor(
            (TensorRole::ClampMask, t),
            Category::SavedActivation,
            Some(layer),
            bytes,
        );
        let bindings = Bindings {
            output: Some(output),
            clamp_mask: Some(mask),
            ..Bindings::default()
        };
        self.push_layer_step(StepOp::ClampMask, layer, &bindings);
        self.clamp_masks[t] = Some(mask);
    }

    /// Create the weight and bias tensors of layer `i` (trained ones in SRAM, frozen ones in
    /// flash); `None` for layers without parameters.
    fn create_param_tensors(&mut self, i: usize) -> Option<ParamTensors> {
        let params = self.layers[i].params()?;
        let update = self.updates[i];
        let category = |trained: bool| {
            if trained {
                Category::TrainedWeight
            } else {
                Category::FrozenWeight
            }
        };
        let precision = self.options.precision;
        let weight_bytes = params.weight_len() * precision.element_bytes();
        // int8 layers that train a strict subset of their channels keep only those in SRAM
        // (they update under a fixed quantization; see the module documentation).
        let subset = update.trains_weight() && update.weight_channels < params.channels;
        let sram_bytes = if subset && precision == Precision::Int8 {
            update.weight_channels * params.structure * precision.element_bytes()
        } else {
            weight_bytes
        };
        let weight = self.tensor(
            (TensorRole::Weight, i),
            category(update.trains_weight()),
            Some(i),
            sram_bytes,
        );
        self.tensors[weight].flash_bytes = weight_bytes;
        let bias = self.tensor(
            (TensorRole::Bias, i),
            category(update.bias),
            Some(i),
            params.channels * Precision::WORD_BYTES,
        );
        Some(ParamTensors { weight, bias })
    }

    /// Loss and backward from the last layer down to the lowest trained one.
    fn backward(&mut self, activations: &[Option<TensorId>]) {
        let n = self.layers.len();
        let logits_error = self.tensor(
            (TensorRole::Error, n),
            Category::Error,
            Some(n - 1),
            self.tensor_bytes(n),
        );
        let logits = stored(activations, n);
        self.push_step(StepOp::Loss, None, vec![logits], vec![logits_error]);
        self.pending[n] = Some(logits_error);
        for i in (self.lowest..n).rev() {
            let Some(error) = self.pending[i + 1].take() else {
                continue;
            };
            let op = self.layers[i].op();
            let error = if masks(op, self.options.precision) {
                self.mask(i, stored(activations, i + 1), error)
            } else {
                error
            };
            // The input activation, for the steps that read it (it may be streamed otherwise).
            let input = || stored(activations, i);
            match op.input_error() {
                Some(kernel) if i > self.lowest => {
                    self.input_error(i, kernel.reads_input().then(input), error);
                }
                Some(_) => {}
                None => self.contribute(i, i, error),
            }
            if let Some(skip) = op.skip_from() {
                self.contribute(i, skip + 1, error);
            }
            if let Some(params) = self.param_tensors[i] {
                let input = self.updates[i].trains_weight().then(input);
                self.parametric_backward(i, params, input, error);
            }
        }
    }

    /// The activation mask of layer `i` on its output error; returns the masked error buffer
    /// (the error itself, or a copy when another tensor's pending error shares its buffer).
    fn mask(&mut self, i: usize, output: TensorId, error: TensorId) -> TensorId {
        let shared = self.pending.contains(&Some(error));
        let masked = if shared {
            let bytes = self.tensors[error].bytes;
            self.tensor((TensorRole::Error, i + 1), Category::Error, Some(i), bytes)
        } else {
            error
        };
        let reads = Bindings {
            output: Some(output),
            clamp_mask: self.clamp_masks[i + 1],
            output_error: Some(error),
            ..Bindings::default()
        };
        let writes = Bindings {
            output_error: Some(masked),
            ..Bindings::default()
        };
        let step = self.layer_step(StepOp::ActivationMask, i, &reads, &writes);
        self.steps.push(step);
        masked
    }

    /// Input error of layer `i` from its masked output `error` (and its `input` where its
    /// kernel reads it), contributed to tensor `i`.
    fn input_error(&mut self, i: usize, input: Option<TensorId>, error: TensorId) {
        let role = if self.arch.consumers(i).len() > 1 {
            TensorRole::ErrorPart
        } else {
            TensorRole::Error
        };
        let bytes = self.tensor_bytes(i);
        let part = self.tensor((role, i), Category::Error, i.checked_sub(1), bytes);
        let bindings = Bindings {
            input,
            params: self.param_tensors[i],
            output_error: Some(error),
            input_error: Some(part),
            ..Bindings::default()
        };
        self.push_layer_step(StepOp::InputError, i, &bindings);
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
                    (TensorRole::Error, t),
                    Category::Error,
                    t.checked_sub(1),
                    bytes,
                );
                self.push_step(
                    StepOp::AccumulateError,
                    Some(by),
                    vec![previous, part],
                    vec![sum],
                );
                sum
            }
        });
    }

    /// Gradients and updates of the parameters of layer `i` from its masked output `error`
    /// (and its `input`, when its weights train): the bias first, then the weights of the
    /// trained channels.
    fn parametric_backward(
        &mut self,
        i: usize,
        params: ParamTensors,
        input: Option<TensorId>,
        error: TensorId,
    ) {
        let update = self.updates[i];
        let shape = self.layers[i]
            .params()
            .expect("a layer with parameter tensors has parameters");
        let word = Precision::WORD_BYTES;
        if update.bias {
            let grad = self.tensor(
                (TensorRole::BiasGrad, i),
                Category::GradientAndState,
                Some(i),
                shape.channels * word,
            );
            let bindings = Bindings {
                output_error: Some(error),
                gradient: Some(grad),
                params: Some(params),
                state: self.velocity(TensorRole::BiasOptimizerState, i, shape.channels),
                ..Bindings::default()
            };
            self.push_layer_step(StepOp::BiasGrad, i, &bindings);
            self.update(StepOp::BiasUpdate, i, &bindings);
        }
        if update.trains_weight() {
            let trained_len = update.weight_channels * shape.structure;
            let grad = self.tensor(
                (TensorRole::WeightGrad, i),
                Category::GradientAndState,
                Some(i),
                trained_len * word,
            );
            let state = match self.options.precision {
                Precision::Int8 => Some(self.tensor(
                    (TensorRole::OptimizerState, i),
                    Category::GradientAndState,
                    Some(i),
                    update.weight_channels * std::mem::size_of::<GradStats>(),
                )),
                Precision::Float32 => self.velocity(TensorRole::OptimizerState, i, trained_len),
            };
            let bindings = Bindings {
                input,
                output_error: Some(error),
                gradient: Some(grad),
                params: Some(params),
                state,
                ..Bindings::default()
            };
            self.push_layer_step(StepOp::WeightGrad, i, &bindings);
            self.update(StepOp::WeightUpdate, i, &bindings);
        }
    }

    /// The float momentum velocity (`role`) of `len` trained parameters of layer `i`, if
    /// momentum is on.
    fn velocity(&mut self, role: TensorRole, i: usize, len: usize) -> Option<TensorId> {
        self.options.momentum.then(|| {
            let bytes = len * Precision::WORD_BYTES;
            self.tensor((role, i), Category::GradientAndState, Some(i), bytes)
        })
    }

    /// An update step: now (reordering) or after the backward.
    fn update(&mut self, op: StepOp, i: usize, bindings: &Bindings) {
        let step = self.layer_step(op, i, bindings, bindings);
        if self.options.reorder {
            self.steps.push(step);
        } else {
            self.deferred.push(step);
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
