//! The plan executor: training of one sample at a time over one caller-supplied arena,
//! following a plan's steps: fully quantized training (Deutel et al., IEEE TCAD 2024) for an
//! int8 plan, float32 SGD for a float32 plan. Both precisions share the entry points, the step
//! walk, the batch bookkeeping, the learning rate and the operand resolution (this module;
//! the training-state region is [`state`]'s); the steps themselves are in `int8.rs` and
//! `float.rs` (documented there: the host float engine's kernels at batch 1, gradients folded
//! in sample order). A step calls its layer's kernels through the layer contract
//! ([`crate::layer::Operator`]) and finds its operands by the positions of
//! [`crate::plan::operands`], so that every operator of the contract runs without code here.
//!
//! For an int8 plan it calls the same `mcutrain-core` kernels as the host reference
//! (`engine::fqt` of the `mcutrain` crate) with the same quantization parameters, so after
//! the same samples in the same order both hold the same bits. Per sample: the forward and the backward run with the
//! range trackers fixed at the start of the batch; the logits error is quantized with its
//! own range, which also fixes the sample's error unit (see [`crate::quant::error_unit`]);
//! update steps run
//! during the last sample of a batch (right after their gradient when the plan is
//! reordered); the trackers fold in the real ranges seen over the batch when it ends.
//!
//! Arena: the planned tensors at their offsets, then the training-state region at
//! [`PlanView::state_offset`] (layout in [`state`]): the samples trained in
//! the current batch and the learning rate (8 bytes, both precisions); int8 only: per model
//! tensor its activation and error trackers and the ranges seen in the batch, per trained
//! layer its weight quantization and range tracker, the largest mean error seen (partial
//! updates) and the selected channels. Trained weights and biases, gradient statistics or
//! momentum velocities, and gradients live in planned tensors; frozen parameters are read from
//! the plan bytes.
//!
//! Error quantization (int8): every error but the logits error is computed with its tracker's
//! quantization in the sample's error unit and, with exact error ranges
//! ([`ErrorRanges::Exact`](crate::quant::ErrorRanges::Exact)), a second time with its exact range where that one fits badly
//! ([`crate::quant::quantize_error`]). Its readers use the quantization it was written with,
//! which the state region keeps during the sample (after the model tensors' state: per model
//! tensor, for its complete error and for its error part; [`state::error_q_at`]).
//!
//! Supported: int8 and float32 plans, any batch, reordered or not, every layer of the layer
//! contract; int8 with partial updates on or off, float32 with momentum on or off. int8 plans
//! also run row-streamed forward steps over frozen convolutions ([`crate::ops::stream`]),
//! activation masks from 1-bit clamp masks, and layers that train a strict subset of their
//! weight channels (the sparse update of Lin et al.): only those channels are in the arena, the
//! others are read from the plan, and the trained ones are updated under the layer's fixed
//! quantization ([`crate::update::fqt_update_weights_fixed`]; the standardized update with range
//! adaptation re-codes the whole tensor, which would need every channel in SRAM). Not supported
//! ([`ExecError::Unsupported`]): such a subset with dynamic partial updates, or one that splits
//! a group of a grouped convolution; in float32 plans, channel subsets, streamed steps and
//! clamp masks (the float kernels write every channel's gradient; see [`init`]).
//!
//! Use (the firmware's loop; `arena` is 4-byte aligned, [`PlanView::arena_required`] long):
//!
//! ```text
//! let view = PlanView::parse(plan_in_flash)?;        // validated once
//! exec::init(&view, arena)?;                          // parameters and state into SRAM
//! for (b, batch) in batches.enumerate() {             // view.header().batch samples each
//!     exec::set_learning_rate(&view, arena, update::cosine_lr(peak, b, total))?;
//!     for (sample, label) in batch {                  // &[i8] codes (int8 plan, quantized
//!         let loss = exec::train_sample(&view, arena, sample, label)?; // with
//!     }                                               // view.input_qparams()) or &[f32]
//! }
//! let class = exec::infer_sample(&view, arena, sample)?;
//! ```

mod float;
mod int8;
pub mod state;

pub use state::{learning_rate, range_trackers, set_learning_rate};

use super::typed::{bytes_of, codes, split_disjoint, words, Span};
use super::{LayerRecord, PlanView, Precision, StepOp, StepRecord, TensorRecord, TensorRole};
use crate::ops::loss;
use crate::quant::{QParams, RangeEma};
use state::{end_batch, init_state, region, region_mut, samples_in_batch, start_batch, LayerState};

/// Why a sample could not run. Small and non-exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecError {
    /// The arena is smaller than [`PlanView::arena_required`].
    ArenaTooSmall,
    /// The arena does not start at a 4-byte aligned address.
    ArenaMisaligned,
    /// The sample does not have [`PlanView::input_len`] codes.
    SampleLength,
    /// The label is not below the number of classes.
    BadLabel,
    /// The plan needs something this executor does not do (see the module documentation).
    Unsupported,
    /// The arena's training state is not one [`init`] and this executor wrote.
    CorruptArena,
    /// The plan is inconsistent (cannot happen for a plan [`PlanView::parse`] accepted).
    BadPlan,
    /// [`SampleRun::finish`] before every step ran.
    Unfinished,
    /// The sample's element type is not the plan's input type (`i8` codes for an int8 plan,
    /// `f32` values for a float32 plan).
    SampleType,
}

impl core::error::Error for ExecError {}

impl core::fmt::Display for ExecError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ExecError::ArenaTooSmall => "the arena is smaller than the plan requires",
            ExecError::ArenaMisaligned => "the arena is not 4-byte aligned",
            ExecError::SampleLength => "the sample length does not match the model input",
            ExecError::BadLabel => "the label is not below the number of classes",
            ExecError::Unsupported => {
                "the plan trains a subset of a layer's weight channels with partial updates or across a channel group"
            }
            ExecError::CorruptArena => "the arena's training state is corrupt",
            ExecError::BadPlan => "the plan is inconsistent",
            ExecError::Unfinished => "the sample's steps did not all run",
            ExecError::SampleType => {
                "the sample is not of the plan's input type (i8 codes for int8, f32 for float32)"
            }
        })
    }
}

/// The arena is large enough and aligned, and every layer that trains a strict subset of its
/// weight channels is one this executor can train so ([`trains_channel_subset`]).
fn check_arena(view: &PlanView, arena: &[u8]) -> Result<(), ExecError> {
    if arena.len() < view.arena_required() {
        return Err(ExecError::ArenaTooSmall);
    }
    if !(arena.as_ptr() as usize).is_multiple_of(4) {
        return Err(ExecError::ArenaMisaligned);
    }
    for i in 0..view.layer_count() {
        let layer = view.layer(i).ok_or(ExecError::BadPlan)?;
        let Some(params) = view.resolve(i).ok_or(ExecError::BadPlan)?.params() else {
            continue;
        };
        if trains_channel_subset(&layer, params.channels)
            && !channel_subset_supported(view, i, &layer)
        {
            return Err(ExecError::Unsupported);
        }
    }
    Ok(())
}

/// True when `layer`, with `channels` output channels, trains the weights of some but not all
/// of them.
fn trains_channel_subset(layer: &LayerRecord, channels: usize) -> bool {
    layer.weight_channels != 0 && layer.weight_channels as usize != channels
}

/// A strict subset of weight channels trains with the weights under their fixed deployed
/// quantization ([`crate::update::fqt_update_weights_fixed`]): the trained channels live in
/// the arena, the frozen ones stay in the plan. Supported where the trained channels form a
/// layer of their own ([`crate::layer::Layer::channel_prefix`]: any fully connected
/// layer, whole groups of a convolution), without dynamic partial updates (which select among
/// all channels), in int8 plans only.
fn channel_subset_supported(view: &PlanView, i: usize, layer: &LayerRecord) -> bool {
    let prefix = view
        .resolve(i)
        .and_then(|l| l.channel_prefix(layer.weight_channels as usize));
    prefix.is_some()
        && view.header().config.partial.is_none()
        && view.precision() == Precision::Int8
}

/// Prepare `arena` for training with `view`: copy the trained weights and biases from the plan,
/// zero the gradient statistics, and set the training state to the plan's initial trackers
/// and weight quantization. Writes only persistent tensors and the state region (gradients
/// are zeroed when a batch starts).
///
/// Fails with [`ExecError::Unsupported`] when a layer trains a strict subset of its weight
/// channels in a way this executor does not support (see the module documentation).
pub fn init(view: &PlanView, arena: &mut [u8]) -> Result<(), ExecError> {
    check_arena(view, arena)?;
    let (tensors, state) = arena.split_at_mut(view.state_offset());
    for id in 0..view.tensor_count() as u16 {
        let tensor = view.tensor(id).ok_or(ExecError::BadPlan)?;
        let Some(offset) = tensor.arena_offset else {
            continue;
        };
        let span = Span {
            start: offset as usize,
            len: tensor.bytes as usize,
        };
        let target = region_mut(tensors, span).ok_or(ExecError::BadPlan)?;
        match tensor.role {
            TensorRole::Weight | TensorRole::Bias => {
                let source = view.flash(&tensor, span.len).ok_or(ExecError::BadPlan)?;
                target.copy_from_slice(source);
            }
            TensorRole::OptimizerState | TensorRole::BiasOptimizerState => target.fill(0),
            _ => {}
        }
    }
    let state = state
        .get_mut(..view.header().state_bytes as usize)
        .ok_or(ExecError::BadPlan)?;
    init_state(view, state).ok_or(ExecError::BadPlan)
}

/// The element type of a plan's input samples: `i8` codes for an int8 plan (quantized with
/// [`PlanView::input_qparams`]), `f32` values for a float32 plan. Sealed.
pub trait InputElement: sealed::Sealed + Copy {
    /// The precision of the plans that take this input.
    const PRECISION: Precision;
    /// The sample's bytes as the input tensor holds them (little-endian).
    fn sample_bytes(sample: &[Self]) -> &[u8];
}

impl InputElement for i8 {
    const PRECISION: Precision = Precision::Int8;
    fn sample_bytes(sample: &[i8]) -> &[u8] {
        bytes_of(sample)
    }
}

impl InputElement for f32 {
    const PRECISION: Precision = Precision::Float32;
    fn sample_bytes(sample: &[f32]) -> &[u8] {
        bytes_of(sample)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for i8 {}
    impl Sealed for f32 {}
}

/// The bytes of `sample` after checking its element type and length against the plan.
fn sample_bytes<'s, T: InputElement>(
    view: &PlanView,
    sample: &'s [T],
) -> Result<&'s [u8], ExecError> {
    if T::PRECISION != view.precision() {
        return Err(ExecError::SampleType);
    }
    if sample.len() != view.input_len() {
        return Err(ExecError::SampleLength);
    }
    Ok(T::sample_bytes(sample))
}

/// Train one sample over an arena prepared by [`init`]; returns the sample's loss. `sample`
/// holds [`PlanView::input_len`] elements of the plan's input type ([`InputElement`]: `i8`
/// codes quantized with [`PlanView::input_qparams`], or `f32` values). The parameters change
/// during the last sample of each batch of the plan's batch size, with the learning rate
/// [`learning_rate`] holds then. Scratch: none beyond the arena.
pub fn train_sample<T: InputElement>(
    view: &PlanView,
    arena: &mut [u8],
    sample: &[T],
    label: u16,
) -> Result<f32, ExecError> {
    let mut run = SampleRun::begin(view, arena, sample, label)?;
    while run.step(arena)? {}
    run.finish(arena)
}

/// [`train_sample`], then end the batch after this sample even when it holds fewer samples
/// than the plan's batch size (the shorter last batch of an epoch, as the host trainer's
/// `order.chunks(batch)` makes it): the updates run, the bias gradient scaled by
/// `1 / samples in the batch` (int8 bias update, float32 SGD), and the range trackers fold in
/// the batch's ranges.
pub fn train_sample_ending_batch<T: InputElement>(
    view: &PlanView,
    arena: &mut [u8],
    sample: &[T],
    label: u16,
) -> Result<f32, ExecError> {
    let mut run = SampleRun::begin_ending_batch(view, arena, sample, label)?;
    while run.step(arena)? {}
    run.finish(arena)
}

/// The predicted class of one sample: the forward steps of the plan over `arena` (prepared by
/// [`init`]), then the argmax of the logits. Changes only activation tensors, so it may run
/// between the samples of a batch. `sample` as for [`train_sample`].
pub fn infer_sample<T: InputElement>(
    view: &PlanView,
    arena: &mut [u8],
    sample: &[T],
) -> Result<usize, ExecError> {
    check_arena(view, arena)?;
    let sample = sample_bytes(view, sample)?;
    let mut run = SampleRun {
        view,
        sample,
        label: 0,
        next: 0,
        mode: Mode::Infer,
        loss: 0.0,
        unit: 1.0,
        loss_q: QParams::from_range(-1.0, 1.0),
    };
    loop {
        let step = view.step(run.next).ok_or(ExecError::BadPlan)?;
        if step.op == StepOp::Loss {
            let logits = view.tensor(step.reads[0]).ok_or(ExecError::BadPlan)?;
            let classes = view.header().classes as usize;
            let span = arena_span(&logits, classes * view.precision().element_bytes())?;
            let logits = region(arena, span).ok_or(ExecError::BadPlan)?;
            return match view.precision() {
                Precision::Int8 => Ok(loss::argmax_q(codes(logits))),
                Precision::Float32 => words::<f32>(logits)
                    .map(loss::argmax)
                    .ok_or(ExecError::BadPlan),
            };
        }
        run.step(arena)?;
    }
}

/// What a [`SampleRun`] does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Training; updates run when `updates` (the last sample of a batch).
    Train { updates: bool },
    /// Forward steps only, no range bookkeeping.
    Infer,
}

/// One sample in progress, step by step (for profiling and for checking which bytes each step
/// writes); [`train_sample`] runs it to the end.
pub struct SampleRun<'v, 'p, 's> {
    view: &'v PlanView<'p>,
    /// The input sample's bytes (codes, or little-endian `f32`).
    sample: &'s [u8],
    label: u16,
    /// Index of the next step.
    next: usize,
    mode: Mode,
    /// Loss of the sample (after the loss step).
    loss: f32,
    /// Error unit of the sample (after the loss step).
    unit: f32,
    /// Quantization of the logits error (after the loss step).
    loss_q: QParams,
}

/// The arena bytes `[offset, offset + len)` of an arena tensor (`len` at most its size).
fn arena_span(tensor: &TensorRecord, len: usize) -> Result<Span, ExecError> {
    match tensor.arena_offset {
        Some(offset) if len <= tensor.bytes as usize => Ok(Span {
            start: offset as usize,
            len,
        }),
        _ => Err(ExecError::BadPlan),
    }
}

/// Two regions read (possibly the same tensor twice: a tensor that reaches an add by both
/// paths, or two equal error contributions) and one region written.
fn two_reads_one_write(
    tensors: &mut [u8],
    a: Span,
    b: Span,
    out: Span,
) -> Option<(&[u8], &[u8], &mut [u8])> {
    if a == b {
        let [a, out] = split_disjoint(tensors, [a, out])?;
        let a: &[u8] = a;
        return Some((a, a, out));
    }
    let [a, b, out] = split_disjoint(tensors, [a, b, out])?;
    Some((a, b, out))
}

/// The layer output (or its clamp mask), `output_bytes`, and the error to mask, `bytes`, of an
/// activation-mask step: the error in place, or first copied into the step's output when the
/// plan masks into a copy.
fn mask_operands<'t>(
    view: &PlanView,
    step: &StepRecord,
    tensors: &'t mut [u8],
    output_bytes: usize,
    bytes: usize,
) -> Option<[&'t mut [u8]; 2]> {
    let output = arena_span(&view.tensor(step.reads[0])?, output_bytes).ok()?;
    let masked = arena_span(&view.tensor(step.writes[0])?, bytes).ok()?;
    if step.writes[0] != step.reads[1] {
        let source = arena_span(&view.tensor(step.reads[1])?, bytes).ok()?;
        let [from, to] = split_disjoint(tensors, [source, masked])?;
        to.copy_from_slice(from);
    }
    split_disjoint(tensors, [output, masked])
}

/// Where a parameter's bytes are: in the arena (trained) or in the plan (frozen).
#[derive(Clone, Copy)]
enum Source<'p> {
    Arena(Span),
    Flash(&'p [u8]),
}

impl<'p> Source<'p> {
    /// The arena span to borrow (empty for flash).
    fn span(&self) -> Span {
        match self {
            Source::Arena(span) => *span,
            Source::Flash(_) => Span::EMPTY,
        }
    }

    /// The bytes, given the borrowed arena region.
    fn bytes<'a>(&self, borrowed: &'a [u8]) -> &'a [u8]
    where
        'p: 'a,
    {
        match self {
            Source::Arena(_) => borrowed,
            Source::Flash(bytes) => bytes,
        }
    }
}

impl<'v, 'p, 's> SampleRun<'v, 'p, 's> {
    /// Start training one sample over an arena prepared by [`init`] (`sample` as for
    /// [`train_sample`]).
    pub fn begin<T: InputElement>(
        view: &'v PlanView<'p>,
        arena: &mut [u8],
        sample: &'s [T],
        label: u16,
    ) -> Result<Self, ExecError> {
        Self::start(view, arena, sample, label, false)
    }

    /// Start training one sample that ends its batch whatever the batch's sample count (see
    /// [`train_sample_ending_batch`]).
    pub fn begin_ending_batch<T: InputElement>(
        view: &'v PlanView<'p>,
        arena: &mut [u8],
        sample: &'s [T],
        label: u16,
    ) -> Result<Self, ExecError> {
        Self::start(view, arena, sample, label, true)
    }

    fn start<T: InputElement>(
        view: &'v PlanView<'p>,
        arena: &mut [u8],
        sample: &'s [T],
        label: u16,
        ends_batch: bool,
    ) -> Result<Self, ExecError> {
        check_arena(view, arena)?;
        let sample = sample_bytes(view, sample)?;
        if label >= view.header().classes {
            return Err(ExecError::BadLabel);
        }
        let batch = view.header().batch as u32;
        let state = arena
            .get(view.state_offset()..)
            .ok_or(ExecError::ArenaTooSmall)?;
        let done = samples_in_batch(state).ok_or(ExecError::BadPlan)?;
        if done >= batch {
            return Err(ExecError::CorruptArena);
        }
        if done == 0 {
            start_batch(view, arena)?;
        }
        Ok(SampleRun {
            view,
            sample,
            label,
            next: 0,
            mode: Mode::Train {
                updates: ends_batch || done + 1 == batch,
            },
            loss: 0.0,
            unit: 1.0,
            loss_q: QParams::from_range(-1.0, 1.0),
        })
    }

    /// Index of the step the next [`SampleRun::step`] runs.
    pub fn next_step(&self) -> usize {
        self.next
    }

    /// Run the next step; returns whether steps remain. Update steps are skipped except in
    /// the last sample of a batch.
    pub fn step(&mut self, arena: &mut [u8]) -> Result<bool, ExecError> {
        let view = self.view;
        let step = view.step(self.next).ok_or(ExecError::BadPlan)?;
        let skip = step.op.is_update() && self.mode != (Mode::Train { updates: true });
        if !skip {
            let (tensors, state) = arena
                .get_mut(..view.arena_required())
                .ok_or(ExecError::ArenaTooSmall)?
                .split_at_mut(view.state_offset());
            self.run(&step, tensors, state)
                .ok_or(ExecError::BadPlan)
                .and_then(|result| result)?;
        }
        self.next += 1;
        Ok(self.next < view.step_count())
    }

    /// End the sample after its last step; returns its loss. At the end of a batch the range
    /// trackers fold in the ranges seen over the batch (activations of tensors that own their
    /// tracker, errors of every tensor), and each trained layer's largest mean error too.
    pub fn finish(self, arena: &mut [u8]) -> Result<f32, ExecError> {
        let view = self.view;
        if self.next < view.step_count() || self.mode == Mode::Infer {
            return Err(ExecError::Unfinished);
        }
        let state = arena
            .get_mut(view.state_offset()..)
            .ok_or(ExecError::ArenaTooSmall)?;
        let done = samples_in_batch(state).ok_or(ExecError::BadPlan)? + 1;
        let end_of_batch = self.mode == (Mode::Train { updates: true });
        super::typed::write_u32(state, 0, if end_of_batch { 0 } else { done })
            .ok_or(ExecError::BadPlan)?;
        if end_of_batch {
            end_batch(view, state).ok_or(ExecError::BadPlan)?;
        }
        Ok(self.loss)
    }

    /// Run one step; `None` for a plan inconsistency, `Some(Err)` for an executor error.
    fn run(
        &mut self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<Result<(), ExecError>> {
        if step.op == StepOp::LoadInput {
            let input = arena_span(&self.view.tensor(step.writes[0])?, self.sample.len()).ok()?;
            region_mut(tensors, input)?.copy_from_slice(self.sample);
            return Some(Ok(()));
        }
        match self.view.precision() {
            Precision::Int8 => self.run_int8(step, tensors, state),
            Precision::Float32 => self.run_float(step, tensors, state).map(Ok),
        }
    }

    /// Where parameter tensor `id`'s first `len` bytes are.
    fn param(&self, id: u16, len: usize) -> Option<Source<'p>> {
        let tensor = self.view.tensor(id)?;
        if tensor.arena_offset.is_some() {
            return arena_span(&tensor, len).ok().map(Source::Arena);
        }
        self.view.flash(&tensor, len).map(Source::Flash)
    }

    /// Where the weights of a layer with `channels` structures of `structure` elements of
    /// `element` bytes are: the whole tensor (in the arena when it trains, else in the plan),
    /// or, when a strict subset of its channels trains, the trained channels in the arena and
    /// the frozen rest in the plan (second part; empty otherwise).
    fn weights(
        &self,
        layer: &LayerRecord,
        channels: usize,
        structure: usize,
    ) -> Option<(Source<'p>, &'p [u8])> {
        let element = self.view.precision().element_bytes();
        let len = channels * structure * element;
        if !trains_channel_subset(layer, channels) {
            return Some((self.param(layer.weight_tensor, len)?, &[]));
        }
        let tensor = self.view.tensor(layer.weight_tensor)?;
        let trained = layer.weight_channels as usize * structure * element;
        let head = arena_span(&tensor, trained).ok()?;
        let all = self.view.flash(&tensor, len)?;
        Some((Source::Arena(head), all.get(trained..)?))
    }
}

/// The current parameters of one layer with parameters.
#[derive(Clone, Copy, Debug)]
pub struct LayerParams<'a> {
    /// Weight codes (of the trained channels only when a strict subset of them trains).
    pub weight: &'a [i8],
    /// Weight codes of the frozen channels, read from the plan, when a strict subset of the
    /// channels trains (they follow `weight`); empty otherwise.
    pub frozen_weight: &'a [i8],
    /// Weight quantization.
    pub weight_q: QParams,
    /// Weight range tracker.
    pub weight_range: RangeEma,
    /// `i32` bias.
    pub bias: &'a [i32],
    /// Real value of one bias unit.
    pub bias_scale: f32,
}

/// The first `len` bytes of parameter tensor `id`: from the arena when it trains, from the plan
/// when it is frozen.
fn param_bytes<'a>(view: &PlanView<'a>, arena: &'a [u8], id: u16, len: usize) -> Option<&'a [u8]> {
    let tensor = view.tensor(id)?;
    match tensor.arena_offset {
        Some(_) => region(arena, arena_span(&tensor, len).ok()?),
        None => view.flash(&tensor, len),
    }
}

/// The current parameters of layer `i` of an int8 plan (trained ones from the arena, frozen
/// ones from the plan); `None` for layers without parameters, a float32 plan (see
/// [`float_layer_params`]) or an inconsistent arena.
pub fn layer_params<'a>(view: &PlanView<'a>, arena: &'a [u8], i: usize) -> Option<LayerParams<'a>> {
    if view.precision() != Precision::Int8 {
        return None;
    }
    let layer = view.layer(i)?;
    let params = view.resolve(i)?.params()?;
    let (channels, structure) = (params.channels, params.structure);
    let bytes = |id: u16, len: usize| param_bytes(view, arena, id, len);
    let state = arena.get(view.state_offset()..)?;
    let (weight_q, weight_range) = if layer.weight_channels > 0 {
        let trained = LayerState::read(state, layer.state_offset as usize)?;
        (trained.weight_q, trained.weight_range)
    } else {
        (layer.weight_q, layer.weight_range)
    };
    let (weight, frozen_weight) = if trains_channel_subset(&layer, channels) {
        let trained = layer.weight_channels as usize * structure;
        let all = view.flash(&view.tensor(layer.weight_tensor)?, channels * structure)?;
        (bytes(layer.weight_tensor, trained)?, all.get(trained..)?)
    } else {
        (bytes(layer.weight_tensor, channels * structure)?, &[][..])
    };
    Some(LayerParams {
        weight: codes(weight),
        frozen_weight: codes(frozen_weight),
        weight_q,
        weight_range,
        bias: words::<i32>(bytes(layer.bias_tensor, channels * 4)?)?,
        bias_scale: layer.bias_scale,
    })
}

/// The current parameters of one layer of a float32 plan.
#[derive(Clone, Copy, Debug)]
pub struct FloatLayerParams<'a> {
    /// Weights, output-channel major.
    pub weight: &'a [f32],
    /// Bias, `[out]`.
    pub bias: &'a [f32],
}

/// The current parameters of layer `i` of a float32 plan (trained ones from the arena, frozen
/// ones from the plan); `None` for layers without parameters, an int8 plan (see
/// [`layer_params`]) or an inconsistent arena.
pub fn float_layer_params<'a>(
    view: &PlanView<'a>,
    arena: &'a [u8],
    i: usize,
) -> Option<FloatLayerParams<'a>> {
    if view.precision() != Precision::Float32 {
        return None;
    }
    let layer = view.layer(i)?;
    let params = view.resolve(i)?.params()?;
    let floats = |id: u16, len: usize| words::<f32>(param_bytes(view, arena, id, len * 4)?);
    Some(FloatLayerParams {
        weight: floats(layer.weight_tensor, params.weight_len())?,
        bias: floats(layer.bias_tensor, params.channels)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{tiny_plan, Aligned};

    /// Codes of the input `[0.5, -0.25]` in the plan's input quantization (`s = 1/64`,
    /// `z = 0`): `[32, -16]`.
    fn sample(view: &PlanView) -> [i8; 2] {
        let q = view.input_qparams();
        [q.quantize(0.5), q.quantize(-0.25)]
    }

    #[test]
    fn one_sample_by_hand() {
        let (file, len) = tiny_plan();
        let view = PlanView::parse(&file.0[..len]).unwrap();
        let mut arena = Aligned([0xA5u8; 256]);
        let arena = &mut arena.0[..view.arena_required()];
        init(&view, arena).unwrap();
        let input = sample(&view);
        assert_eq!(input, [32, -16]);
        // Logits: acc = 64 x = [2048, -1024] at s_a = 1/4096, i.e. [0.5, -0.25], codes at
        // s = 1/32: [16, -8], so class 0.
        assert_eq!(infer_sample(&view, arena, &input), Ok(0));
        assert_eq!(codes(&arena[4..6]), &[16, -8]);
        let loss = train_sample(&view, arena, &input, 0).unwrap();
        // softmax([0.5, -0.25]): p0 = 1 / (1 + e^-0.75) = 0.679179, loss = -ln p0.
        assert!((loss - 0.386_871).abs() < 1e-5, "{loss}");
        // Error [p0 - 1, p1] = [-0.320821, 0.320821] in its own range (s_e = 0.641642/255,
        // z = 0): codes [-127, 127]; db = s_e * [-127, 127] = [-0.319563, 0.319563];
        // b -= round(0.1 * db / s_b) with s_b = 1/4096: round(-+130.89).
        let params = layer_params(&view, arena, 0).unwrap();
        assert_eq!(params.bias, &[131, -131]);
        assert_eq!(params.weight, &[64, 0, 0, 64], "frozen weights");
        // Trackers at rate 0.1: the logits activation folds in [-0.25, 0.5] into
        // [-4, 127/32]; the logits error [-1, 1] (error units) into [-1, 1]; the input stays.
        let (activation, error) = range_trackers(&view, arena, 1).unwrap();
        assert_eq!(activation.min, -3.625);
        assert!((activation.max - 3.621_875).abs() < 1e-6, "{activation:?}");
        assert!((error.min + 1.0).abs() < 1e-6 && (error.max - 1.0).abs() < 1e-6);
        let input_range = range_trackers(&view, arena, 0).unwrap().0;
        assert_eq!(input_range, RangeEma::from_range(-2.0, 127.0 / 64.0));
        assert_eq!(learning_rate(&view, arena), Some(0.1));
        // A tenth of the learning rate moves the bias by about a tenth.
        set_learning_rate(&view, arena, 0.01).unwrap();
        train_sample(&view, arena, &input, 0).unwrap();
        let bias = layer_params(&view, arena, 0).unwrap().bias;
        assert!(
            bias[0] > 135 && bias[0] < 145 && bias[1] == -bias[0],
            "{bias:?}"
        );
    }

    #[test]
    fn arguments_and_step_order_are_checked() {
        let (file, len) = tiny_plan();
        let view = PlanView::parse(&file.0[..len]).unwrap();
        let mut storage = Aligned([0u8; 256]);
        let needed = view.arena_required();
        assert_eq!(
            init(&view, &mut storage.0[..needed - 1]),
            Err(ExecError::ArenaTooSmall)
        );
        assert_eq!(
            init(&view, &mut storage.0[1..needed + 1]),
            Err(ExecError::ArenaMisaligned)
        );
        let arena = &mut storage.0[..needed];
        init(&view, arena).unwrap();
        let input = sample(&view);
        assert_eq!(
            train_sample(&view, arena, &input[..1], 0),
            Err(ExecError::SampleLength)
        );
        assert_eq!(
            train_sample(&view, arena, &input, 2),
            Err(ExecError::BadLabel)
        );
        let mut run = SampleRun::begin(&view, arena, &input, 1).unwrap();
        assert_eq!(run.next_step(), 0);
        assert_eq!(run.step(arena), Ok(true));
        assert_eq!(run.next_step(), 1);
        assert_eq!(run.finish(arena), Err(ExecError::Unfinished));
        // A sample counter beyond the batch is a corrupt arena.
        arena[view.state_offset()] = 9;
        assert_eq!(
            SampleRun::begin(&view, arena, &input, 1).err(),
            Some(ExecError::CorruptArena)
        );
    }
}
