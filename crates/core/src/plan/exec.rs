//! The plan executor: training of one sample at a time over one caller-supplied arena,
//! following a plan's steps: fully quantized training (shared/methods.md section 1) for an
//! int8 plan, float32 SGD for a float32 plan. Both precisions share the entry points, the step
//! walk, the batch bookkeeping, the learning rate and the operand resolution; only the
//! kernels a step calls differ (the float32 ones are in `exec_float.rs`, documented there:
//! the host float engine's kernels at batch 1, gradients folded in sample order).
//!
//! For an int8 plan it calls the same `mcutrain-core` kernels as the host reference
//! (`engine::fqt` of the `mcutrain` crate) with the same quantization parameters, so after
//! the same samples in the same order both hold the same bits. Per sample: the forward and the backward run with the
//! range trackers fixed at the start of the batch; the logits error is quantized with its
//! own range, which also fixes the sample's error unit (see [`error_unit`]); update steps run
//! during the last sample of a batch (right after their gradient when the plan is
//! reordered); the trackers fold in the real ranges seen over the batch when it ends.
//!
//! Arena: the planned tensors at their offsets, then the training-state region at
//! [`PlanView::state_offset`] (layout in [`crate::plan`]'s constants): the samples trained in
//! the current batch and the learning rate (8 bytes, both precisions); int8 only: per model
//! tensor its activation and error trackers and the ranges seen in the batch, per trained
//! layer its weight quantization and range tracker, the largest mean error seen (partial
//! updates) and the selected channels. Trained weights and biases, gradient statistics or
//! momentum velocities, and gradients live in planned tensors; frozen parameters are read from
//! the plan bytes.
//!
//! Error quantization (int8): every error but the logits error is computed with its tracker's
//! quantization in the sample's error unit and, with exact error ranges
//! ([`ErrorRanges::Exact`]), a second time with its exact range where that one fits badly
//! ([`quantize_error`]). Its readers use the quantization it was written with, which the state
//! region keeps during the sample (after the model tensors' state: per model tensor, for its
//! complete error and for its error part; [`crate::plan::error_q_at`]).
//!
//! Supported: int8 and float32 plans, any batch, reordered or not, every layer kind of the
//! model IR; int8 with partial updates on or off, float32 with momentum on or off. int8 plans
//! also run row-streamed forward steps over frozen convolutions ([`crate::ops::stream`]),
//! activation masks from 1-bit clamp masks, and layers that train a strict subset of their
//! weight channels (the sparse update of Lin et al.): only those channels are in the arena, the
//! others are read from the plan, and the trained ones are updated under the layer's fixed
//! quantization ([`update::fqt_update_weights_fixed`]; the standardized update with range
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

use super::typed::{
    bytes_of, codes, codes_mut, grad_stats_mut, read_u32, split_disjoint, words, words_mut,
    write_u32, zero_grad_stats_padding, Span,
};
use super::{error_q_at, ErrorRanges};
use super::{
    Geometry, LayerKind, LayerRecord, PlanView, Precision, StepOp, StepRecord, TensorRecord,
    TensorRole, LAYER_STATE_BYTES, LOSS_QUANT, STATE_HEADER_BYTES, TENSOR_STATE_BYTES,
};
use crate::ops::arith::QLayerParams;
use crate::ops::conv2d;
use crate::ops::linear::LinearGeom;
use crate::ops::{activation, add, linear, loss, pool, stream, ChannelSet, WeightParts};
use crate::quant::{QParams, RangeEma, RealRange};
use crate::update::{self, FqtUpdateConfig};

#[path = "exec_float.rs"]
mod float;

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

/// The error unit of one sample: the largest magnitude of its loss gradient `dL/d logits`
/// (1 when that is 0 or not finite).
///
/// Back-propagation is linear in the loss gradient, so error range trackers hold ranges in
/// this unit and the error tensor of model tensor `t` is quantized with
/// `(s_tracked(t) * unit, z_tracked(t))`: the 8-bit codes follow each sample's magnitude
/// instead of a fixed range that would round the errors of well-classified samples to zero.
/// Where the paper leaves the error scale to the moving average alone, this keeps the moving
/// average (over normalized ranges) and adds one multiplication per tensor.
pub fn error_unit(loss_gradient: RealRange) -> f32 {
    let magnitude = loss_gradient.min.abs().max(loss_gradient.max.abs());
    if magnitude > 0.0 && magnitude.is_finite() {
        magnitude
    } else {
        1.0
    }
}

/// `range * factor` (empty stays empty).
pub fn scale_range(range: RealRange, factor: f32) -> RealRange {
    if range.is_empty() {
        range
    } else {
        RealRange {
            min: range.min * factor,
            max: range.max * factor,
        }
    }
}

/// An error tensor as written: the quantization of its codes, its real range before
/// saturation, and whether it was computed a second time ([`quantize_error`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WrittenError {
    /// Quantization of the codes.
    pub q: QParams,
    /// Real range of the values before saturation (the same in both computations).
    pub range: RealRange,
    /// True when the tensor was recomputed with its exact range.
    pub recomputed: bool,
}

/// Write an error tensor under `mode`. `write(q)` computes the tensor into its buffer in the
/// quantization `q` and returns its real range before saturation (from the accumulators, so
/// independent of `q`). It runs with `tracked` (the tracker's quantization times the error
/// unit) and, under [`ErrorRanges::Exact`], a second time when [`exact_error_q`] asks for it.
/// Shared by the host reference and this executor so that both decide alike. Scratch: none
/// (the second call overwrites the first result).
pub fn quantize_error(
    mode: ErrorRanges,
    tracked: QParams,
    mut write: impl FnMut(QParams) -> RealRange,
) -> WrittenError {
    let range = write(tracked);
    let exact = match mode {
        ErrorRanges::Exact => exact_error_q(tracked, range),
        ErrorRanges::Tracked => None,
    };
    match exact {
        Some(q) => {
            write(q);
            WrittenError {
                q,
                range,
                recomputed: true,
            }
        }
        None => WrittenError {
            q: tracked,
            range,
            recomputed: false,
        },
    }
}

/// Under [`ErrorRanges::Exact`], the fraction of the tracked scale below which an error tensor
/// is recomputed: its exact range would use fewer than about `255 * MIN_CODE_USE` codes of
/// the tracked quantization.
pub const MIN_CODE_USE: f32 = 0.5;

/// The quantization to recompute an error tensor with, or `None` to keep `tracked`:
/// `q = QParams::from_range(exact)` when the tensor's real range `exact` leaves `tracked`'s
/// representable range (codes were saturated) or when `s_q < MIN_CODE_USE * s_tracked` (most
/// codes unused, so rounding noise is large against the values). An empty range or one of
/// only zeros keeps `tracked`, which represents 0 exactly.
pub fn exact_error_q(tracked: QParams, exact: RealRange) -> Option<QParams> {
    if exact.is_empty() || (exact.min == 0.0 && exact.max == 0.0) {
        return None;
    }
    let (lo, hi) = tracked.representable_range();
    let q = QParams::from_range(exact.min, exact.max);
    let clipped = exact.min < lo || exact.max > hi;
    (clipped || q.scale < MIN_CODE_USE * tracked.scale).then_some(q)
}

/// Which tracker of a model tensor.
#[derive(Clone, Copy)]
enum Track {
    Activation = 0,
    Error = 1,
}

/// Byte offset of model tensor `t`'s state in the state region.
fn tensor_state_at(t: usize) -> usize {
    STATE_HEADER_BYTES + t * TENSOR_STATE_BYTES
}

fn read_f32(bytes: &[u8], at: usize) -> Option<f32> {
    read_u32(bytes, at).map(f32::from_bits)
}

fn write_f32(bytes: &mut [u8], at: usize, value: f32) -> Option<()> {
    write_u32(bytes, at, value.to_bits())
}

fn read_ema(bytes: &[u8], at: usize) -> Option<RangeEma> {
    Some(RangeEma {
        min: read_f32(bytes, at)?,
        max: read_f32(bytes, at + 4)?,
        initialized: read_u32(bytes, at + 8)? != 0,
    })
}

fn write_ema(bytes: &mut [u8], at: usize, ema: &RangeEma) -> Option<()> {
    write_f32(bytes, at, ema.min)?;
    write_f32(bytes, at + 4, ema.max)?;
    write_u32(bytes, at + 8, ema.initialized as u32)
}

/// Range tracker `which` of model tensor `t`.
fn tracker(state: &[u8], t: usize, which: Track) -> Option<RangeEma> {
    read_ema(state, tensor_state_at(t) + 12 * which as usize)
}

fn set_tracker(state: &mut [u8], t: usize, which: Track, ema: &RangeEma) -> Option<()> {
    write_ema(state, tensor_state_at(t) + 12 * which as usize, ema)
}

/// The range of kind `which` seen for model tensor `t` in the current batch.
fn seen(state: &[u8], t: usize, which: Track) -> Option<RealRange> {
    let at = tensor_state_at(t) + 24 + 8 * which as usize;
    Some(RealRange {
        min: read_f32(state, at)?,
        max: read_f32(state, at + 4)?,
    })
}

fn set_seen(state: &mut [u8], t: usize, which: Track, range: RealRange) -> Option<()> {
    let at = tensor_state_at(t) + 24 + 8 * which as usize;
    write_f32(state, at, range.min)?;
    write_f32(state, at + 4, range.max)
}

fn merge_seen(state: &mut [u8], t: usize, which: Track, range: RealRange) -> Option<()> {
    let merged = seen(state, t, which)?.merge(range);
    set_seen(state, t, which, merged)
}

/// Samples of the current batch already trained.
fn samples_in_batch(state: &[u8]) -> Option<u32> {
    read_u32(state, 0)
}

/// Samples in the current batch, counting the one in progress: the `1 / batch` of its
/// updates (a shorter last batch has fewer than the plan's batch size).
fn samples_this_batch(state: &[u8]) -> Option<f32> {
    Some((samples_in_batch(state)? + 1) as f32)
}

/// Byte offset of the learning rate in the state region.
const LEARNING_RATE_AT: usize = 4;

/// The learning rate the next updates use.
pub fn learning_rate(view: &PlanView, arena: &[u8]) -> Option<f32> {
    read_f32(arena.get(view.state_offset()..)?, LEARNING_RATE_AT)
}

/// Set the learning rate of the next updates (for a schedule such as cosine decay; [`init`]
/// starts from the plan's).
pub fn set_learning_rate(view: &PlanView, arena: &mut [u8], lr: f32) -> Result<(), ExecError> {
    let state = arena
        .get_mut(view.state_offset()..)
        .ok_or(ExecError::ArenaTooSmall)?;
    write_f32(state, LEARNING_RATE_AT, lr).ok_or(ExecError::ArenaTooSmall)
}

/// The fixed state of a trained layer (at its record's `state_offset`).
#[derive(Clone, Copy)]
struct LayerState {
    weight_q: QParams,
    weight_range: RangeEma,
    /// Largest mean absolute output error seen in earlier batches.
    error_max: f32,
    /// Largest in the current batch.
    batch_error_max: f32,
    /// Channels selected for the current sample (partial updates).
    selected: u32,
}

impl LayerState {
    fn read(state: &[u8], at: usize) -> Option<LayerState> {
        Some(LayerState {
            weight_q: QParams {
                scale: read_f32(state, at)?,
                zero_point: read_u32(state, at + 4)? as i32,
            },
            weight_range: read_ema(state, at + 8)?,
            error_max: read_f32(state, at + 20)?,
            batch_error_max: read_f32(state, at + 24)?,
            selected: read_u32(state, at + 28)?,
        })
    }

    fn write(&self, state: &mut [u8], at: usize) -> Option<()> {
        write_f32(state, at, self.weight_q.scale)?;
        write_u32(state, at + 4, self.weight_q.zero_point as u32)?;
        write_ema(state, at + 8, &self.weight_range)?;
        write_f32(state, at + 20, self.error_max)?;
        write_f32(state, at + 24, self.batch_error_max)?;
        write_u32(state, at + 28, self.selected)
    }
}

/// The selected-channel list of a trained layer with `channels` channels.
fn selection_span(layer: &LayerRecord, channels: usize) -> Span {
    Span {
        start: layer.state_offset as usize + LAYER_STATE_BYTES,
        len: channels * 2,
    }
}

/// The touched-channel bits (one per channel, `u32` words) of a trained layer.
fn touched_span(layer: &LayerRecord, channels: usize) -> Span {
    Span {
        start: layer.state_offset as usize + LAYER_STATE_BYTES + (channels * 2).div_ceil(4) * 4,
        len: channels.div_ceil(32) * 4,
    }
}

fn region(bytes: &[u8], span: Span) -> Option<&[u8]> {
    bytes.get(span.start..span.start.checked_add(span.len)?)
}

fn region_mut(bytes: &mut [u8], span: Span) -> Option<&mut [u8]> {
    bytes.get_mut(span.start..span.start.checked_add(span.len)?)
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
        if trains_channel_subset(&layer) && !channel_subset_supported(view, i, &layer) {
            return Err(ExecError::Unsupported);
        }
    }
    Ok(())
}

/// True when layer `layer` trains the weights of some but not all of its output channels.
fn trains_channel_subset(layer: &LayerRecord) -> bool {
    layer.weight_channels != 0 && layer.weight_channels != layer.out_channels
}

/// A strict subset of weight channels trains with the weights under their fixed deployed
/// quantization ([`update::fqt_update_weights_fixed`]): the trained channels live in the arena,
/// the frozen ones stay in the plan. Supported for fully connected layers and for
/// convolutions whose trained channels are whole groups ([`Conv2dGeom::output_prefix`]),
/// without dynamic partial updates (which select among all channels), in int8 plans only.
fn channel_subset_supported(view: &PlanView, i: usize, layer: &LayerRecord) -> bool {
    let whole_groups = match view.geometry(i) {
        Some(Geometry::Conv(g)) => g.output_prefix(layer.weight_channels as usize).is_some(),
        Some(Geometry::Linear(_)) => true,
        _ => false,
    };
    whole_groups && view.header().config.partial.is_none() && view.precision() == Precision::Int8
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
    state.fill(0);
    write_f32(state, LEARNING_RATE_AT, view.header().config.lr).ok_or(ExecError::BadPlan)?;
    if view.precision() == Precision::Float32 {
        return Ok(()); // no range trackers, no layer state
    }
    for t in 0..=view.layer_count() {
        let record = view.model_tensor(t).ok_or(ExecError::BadPlan)?;
        set_tracker(state, t, Track::Activation, &record.activation).ok_or(ExecError::BadPlan)?;
        set_tracker(state, t, Track::Error, &record.error).ok_or(ExecError::BadPlan)?;
        for which in [Track::Activation, Track::Error] {
            set_seen(state, t, which, RealRange::EMPTY).ok_or(ExecError::BadPlan)?;
        }
    }
    for i in 0..view.layer_count() {
        let layer = view.layer(i).ok_or(ExecError::BadPlan)?;
        if layer.trains() {
            let fresh = LayerState {
                weight_q: layer.weight_q,
                weight_range: layer.weight_range,
                error_max: 0.0,
                batch_error_max: 0.0,
                selected: 0,
            };
            fresh
                .write(state, layer.state_offset as usize)
                .ok_or(ExecError::BadPlan)?;
        }
    }
    Ok(())
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
        write_u32(state, 0, if end_of_batch { 0 } else { done }).ok_or(ExecError::BadPlan)?;
        if end_of_batch {
            end_batch(view, state).ok_or(ExecError::BadPlan)?;
        }
        Ok(self.loss)
    }

    /// Quantization of the activation of model tensor `t`.
    fn activation_q(&self, state: &[u8], t: usize) -> Option<QParams> {
        Some(tracker(state, self.view.range_owner(t), Track::Activation)?.qparams())
    }

    /// Quantization of an error tensor: the sample's loss range for the logits error; else,
    /// with exact error ranges, the one it was written with ([`Self::write_error`]), with
    /// tracked ones [`Self::tracked_error_q`].
    fn error_q(&self, state: &[u8], tensor: &TensorRecord) -> Option<QParams> {
        if tensor.quant == LOSS_QUANT {
            return Some(self.loss_q);
        }
        match self.view.header().config.error_ranges {
            ErrorRanges::Exact => {
                let at = self.written_q_at(tensor);
                let q = QParams {
                    scale: read_f32(state, at)?,
                    zero_point: read_u32(state, at + 4)? as i32,
                };
                let valid =
                    q.scale.is_finite() && q.scale > 0.0 && (-128..=127).contains(&q.zero_point);
                valid.then_some(q)
            }
            ErrorRanges::Tracked => self.tracked_error_q(state, tensor),
        }
    }

    /// The tracked quantization of an error tensor: the error tracker of its quantization
    /// source scaled by the sample's error unit.
    fn tracked_error_q(&self, state: &[u8], tensor: &TensorRecord) -> Option<QParams> {
        let q = tracker(state, tensor.quant as usize, Track::Error)?.qparams();
        Some(QParams {
            scale: q.scale * self.unit,
            zero_point: q.zero_point,
        })
    }

    /// Where the quantization an error tensor was written with is kept (exact error ranges):
    /// per quantization source, one for complete errors and one for error parts. Each error
    /// of a plan is written with its source's model tensor in backward order and an error
    /// sum reads its operands before it writes, so no later write replaces a quantization
    /// that a live error still needs.
    fn written_q_at(&self, tensor: &TensorRecord) -> usize {
        let part = tensor.role == TensorRole::ErrorPart;
        error_q_at(self.view.layer_count() + 1, tensor.quant as usize, part)
    }

    /// Compute an error tensor with `write` ([`quantize_error`] under the plan's error
    /// ranges, from the first guess `tracked`, its [`Self::tracked_error_q`]).
    fn compute_error(
        &self,
        tracked: QParams,
        write: impl FnMut(QParams) -> RealRange,
    ) -> WrittenError {
        quantize_error(self.view.header().config.error_ranges, tracked, write)
    }

    /// After [`Self::compute_error`] wrote `tensor`: keep the quantization it was written with
    /// (exact error ranges) and record its range for model tensor `t`.
    fn keep_error(
        &self,
        state: &mut [u8],
        tensor: &TensorRecord,
        t: usize,
        written: WrittenError,
    ) -> Option<()> {
        if self.view.header().config.error_ranges == ErrorRanges::Exact {
            let at = self.written_q_at(tensor);
            write_f32(state, at, written.q.scale)?;
            write_u32(state, at + 4, written.q.zero_point as u32)?;
        }
        self.see_error(state, t, written.range)
    }

    /// Record the real range of an error of model tensor `t` (in error units).
    fn see_error(&self, state: &mut [u8], t: usize, range: RealRange) -> Option<()> {
        merge_seen(state, t, Track::Error, scale_range(range, 1.0 / self.unit))
    }

    /// Run one step; `None` for a plan inconsistency, `Some(Err)` for an executor error.
    fn run(
        &mut self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<Result<(), ExecError>> {
        let view = self.view;
        let tensor = |position: u16| view.tensor(position);
        match step.op {
            StepOp::LoadInput => {
                let input = arena_span(&tensor(step.writes[0])?, self.sample.len()).ok()?;
                region_mut(tensors, input)?.copy_from_slice(self.sample);
            }
            _ if view.precision() == Precision::Float32 => {
                return self.run_float(step, tensors, state).map(Ok);
            }
            StepOp::Forward => self.forward(step, tensors, state)?,
            StepOp::StreamedForward => self.streamed_forward(step, tensors, state)?,
            StepOp::ClampMask => self.clamp_mask(step, tensors, state)?,
            StepOp::Loss => self.loss(step, tensors, state)?,
            StepOp::ActivationMask => self.mask(step, tensors, state)?,
            StepOp::InputError => self.input_error(step, tensors, state)?,
            StepOp::AccumulateError => {
                let (a, b, sum) = (
                    tensor(step.reads[0])?,
                    tensor(step.reads[1])?,
                    tensor(step.writes[0])?,
                );
                let len = sum.bytes as usize;
                let (a_codes, b_codes, out) = two_reads_one_write(
                    tensors,
                    arena_span(&a, len).ok()?,
                    arena_span(&b, len).ok()?,
                    arena_span(&sum, len).ok()?,
                )?;
                let (a_q, b_q) = (self.error_q(state, &a)?, self.error_q(state, &b)?);
                let (a_codes, b_codes, out) = (codes(a_codes), codes(b_codes), codes_mut(out));
                let written = self.compute_error(self.tracked_error_q(state, &sum)?, |q| {
                    add::forward_q(a_codes, a_q, b_codes, b_q, q, out)
                });
                self.keep_error(state, &sum, sum.index as usize, written)?;
            }
            StepOp::WeightGrad | StepOp::BiasGrad => self.gradient(step, tensors, state)?,
            StepOp::WeightUpdate => return self.weight_update(step, tensors, state),
            StepOp::BiasUpdate => self.bias_update(step, tensors, state)?,
        }
        Some(Ok(()))
    }

    /// Forward of one layer; records the output's real range when training.
    fn forward(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let geometry = view.geometry(i)?;
        let (in_len, out_len) = (view.numel(i)?, view.numel(i + 1)?);
        let x = arena_span(&view.tensor(step.reads[0])?, in_len).ok()?;
        let y = arena_span(&view.tensor(step.writes[0])?, out_len).ok()?;
        let (in_q, out_q) = (
            self.activation_q(state, i)?,
            self.activation_q(state, i + 1)?,
        );
        let range = match (layer.kind, geometry) {
            (LayerKind::Conv2d | LayerKind::Linear, _) => {
                let (channels, structure) = geometry.params()?;
                let (weight, frozen) = self.weights(&layer, channels, structure)?;
                let bias = self.param(step.reads[2], channels * 4)?;
                let [x, w, b, y] = split_disjoint(tensors, [x, weight.span(), bias.span(), y])?;
                let weight_q = [self.weight_q(&layer, state)?];
                let q = QLayerParams {
                    input: in_q,
                    weight: &weight_q,
                    bias_scale: layer.bias_scale,
                    output: out_q,
                    activation: layer.activation,
                };
                let w = WeightParts {
                    head: codes(weight.bytes(w)),
                    tail: codes(frozen),
                };
                let (x, b, y) = (codes(x), words::<i32>(bias.bytes(b))?, codes_mut(y));
                match geometry {
                    Geometry::Conv(g) => conv2d::forward_parts_q(&g, x, w, b, &q, y),
                    Geometry::Linear(g) => linear::forward_parts_q(&g, x, w, b, &q, y),
                    _ => return None,
                }
            }
            (LayerKind::Add, _) => {
                let skip_t = layer.skip_from as usize + 1;
                let skip = arena_span(&view.tensor(step.reads[1])?, out_len).ok()?;
                let skip_q = self.activation_q(state, skip_t)?;
                let (x, skip, y) = two_reads_one_write(tensors, x, skip, y)?;
                add::forward_q(codes(x), in_q, codes(skip), skip_q, out_q, codes_mut(y))
            }
            (kind, geometry) => {
                let [x, y] = split_disjoint(tensors, [x, y])?;
                let (x, y) = (codes(x), codes_mut(y));
                match (kind, geometry) {
                    (LayerKind::Activation, _) => {
                        activation::forward_q(layer.activation, x, in_q, y);
                        RealRange::EMPTY
                    }
                    (LayerKind::AvgPool, Geometry::Pool(g)) => {
                        pool::avg_forward_q(&g, x, in_q, out_q, y)
                    }
                    (LayerKind::MaxPool, Geometry::Pool(g)) => {
                        pool::max_forward_q(&g, x, y);
                        RealRange::EMPTY
                    }
                    (LayerKind::GlobalAvgPool, Geometry::GlobalPool(g)) => {
                        pool::global_avg_forward_q(&g, x, in_q, out_q, y)
                    }
                    _ => return None,
                }
            }
        };
        if self.mode != Mode::Infer {
            merge_seen(state, i + 1, Track::Activation, range)?;
        }
        Some(())
    }

    /// Row-streamed forward of the frozen convolutions `first..=last` of the step
    /// ([`stream::forward_q`], windows in the step's scratch); records every stage's output
    /// range when training, as the layer-by-layer forward does.
    fn streamed_forward(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<()> {
        let view = self.view;
        let first = step.layer as usize;
        let (last, window_bytes) = view.streamed_chain(step)?;
        let count = last - first + 1;
        let mut weight_q = [[QParams::from_range(0.0, 0.0)]; stream::MAX_STAGES];
        for (j, q) in weight_q.iter_mut().enumerate().take(count) {
            *q = [view.layer(first + j)?.weight_q];
        }
        let mut stages: [Option<stream::Stage>; stream::MAX_STAGES] = [None; stream::MAX_STAGES];
        for (j, slot) in stages.iter_mut().enumerate().take(count) {
            let i = first + j;
            let layer = view.layer(i)?;
            let Geometry::Conv(geom) = view.geometry(i)? else {
                return None;
            };
            // Validation keeps the chain's parameters in flash.
            let weight = view.flash(&view.tensor(layer.weight_tensor)?, geom.weight_len())?;
            let bias = view.flash(&view.tensor(layer.bias_tensor)?, geom.out_channels * 4)?;
            *slot = Some(stream::Stage {
                geom,
                weight: codes(weight),
                bias: words::<i32>(bias)?,
                q: QLayerParams {
                    input: self.activation_q(state, i)?,
                    weight: &weight_q[j],
                    bias_scale: layer.bias_scale,
                    output: self.activation_q(state, i + 1)?,
                    activation: layer.activation,
                },
            });
        }
        let head = stages[0]?;
        let stages: [stream::Stage; stream::MAX_STAGES] =
            core::array::from_fn(|j| stages[j].unwrap_or(head));
        let x = arena_span(&view.tensor(step.reads[0])?, view.numel(first)?).ok()?;
        let y = arena_span(&view.tensor(step.writes[0])?, view.numel(last + 1)?).ok()?;
        let windows = arena_span(&view.tensor(step.scratch)?, window_bytes).ok()?;
        let [x, y, windows] = split_disjoint(tensors, [x, y, windows])?;
        let mut ranges = [RealRange::EMPTY; stream::MAX_STAGES];
        stream::forward_q(
            &stages[..count],
            codes(x),
            codes_mut(y),
            codes_mut(windows),
            &mut ranges[..count],
        );
        if self.mode != Mode::Infer {
            for (j, range) in ranges.iter().enumerate().take(count) {
                merge_seen(state, first + j + 1, Track::Activation, *range)?;
            }
        }
        Some(())
    }

    /// The clamp mask of layer `i`'s output, which its activation mask step reads.
    fn clamp_mask(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let len = view.numel(i + 1)?;
        let output = arena_span(&view.tensor(step.reads[0])?, len).ok()?;
        let bits = activation::clamp_mask_bytes(len);
        let mask = arena_span(&view.tensor(step.writes[0])?, bits).ok()?;
        let [output, mask] = split_disjoint(tensors, [output, mask])?;
        let output_q = self.activation_q(state, i + 1)?;
        activation::clamp_mask_q(layer.activation, codes(output), output_q, mask);
        Some(())
    }

    /// Softmax cross-entropy: a first pass finds the loss gradient's range, which fixes the
    /// sample's error unit and the logits error's quantization `from_range(min, max)`; the
    /// second pass writes the error with it.
    fn loss(&mut self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let n = view.layer_count();
        let classes = view.header().classes as usize;
        let logits = arena_span(&view.tensor(step.reads[0])?, classes).ok()?;
        let err = arena_span(&view.tensor(step.writes[0])?, classes).ok()?;
        let logits_q = self.activation_q(state, n)?;
        let [logits, err] = split_disjoint(tensors, [logits, err])?;
        let (logits, err) = (codes(logits), codes_mut(err));
        let labels = [self.label];
        let probe_q = QParams::from_range(-1.0, 1.0);
        let (_, range) =
            loss::softmax_cross_entropy_q(logits, logits_q, &labels, classes, probe_q, err);
        self.unit = error_unit(range);
        self.loss_q = QParams::from_range(range.min, range.max);
        let (value, _) =
            loss::softmax_cross_entropy_q(logits, logits_q, &labels, classes, self.loss_q, err);
        self.loss = value;
        self.see_error(state, n, range)
    }

    /// The activation mask of layer `i` (into a copy when the plan says so); for a trained
    /// layer with partial updates, then the channel selection.
    fn mask(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let len = view.numel(i + 1)?;
        let error = view.tensor(step.reads[1])?;
        let error_q = self.error_q(state, &error)?;
        let from_bits = view.tensor(step.reads[0])?.role == TensorRole::ClampMask;
        let output_len = if from_bits {
            activation::clamp_mask_bytes(len)
        } else {
            len
        };
        let [output, masked] = mask_operands(view, step, tensors, output_len, len)?;
        if from_bits {
            activation::backward_mask_bits_q(output, codes_mut(masked), error_q);
        } else {
            let output_q = self.activation_q(state, i + 1)?;
            activation::backward_mask_q(
                layer.activation,
                codes(output),
                output_q,
                codes_mut(masked),
                error_q,
            );
        }
        match view.header().config.partial {
            Some(partial) if layer.trains() => {
                self.select_channels(&layer, i, codes(masked), error_q, partial, state)
            }
            _ => Some(()),
        }
    }

    /// Partial updates: score every channel by its mean absolute error, keep the top
    /// `partial_update_count` of them for this sample's backward of layer `i` (and mark them
    /// touched in the batch at batch > 1).
    #[allow(clippy::too_many_arguments)] // the masked error with its qparams, and the state
    fn select_channels(
        &self,
        layer: &LayerRecord,
        i: usize,
        error: &[i8],
        error_q: QParams,
        partial: super::PartialUpdate,
        state: &mut [u8],
    ) -> Option<()> {
        let geometry = self.view.geometry(i)?;
        let (channels, _) = geometry.params()?;
        let at = layer.state_offset as usize;
        let mut layer_state = LayerState::read(state, at)?;
        let scores = Span {
            start: self.view.header().scores_offset as usize,
            len: channels * 4,
        };
        let touched = if self.view.header().batch > 1 {
            touched_span(layer, channels)
        } else {
            Span::EMPTY
        };
        let [scores, list, touched] =
            split_disjoint(state, [scores, selection_span(layer, channels), touched])?;
        let scores = words_mut::<f32>(scores)?;
        let spatial = geometry.out_spatial();
        update::structure_error_scores_q(error, error_q, 1, channels, spatial, scores);
        let mean_error = scores.iter().sum::<f32>() / channels as f32;
        let count = update::partial_update_count(
            partial.lambda_min,
            partial.lambda_max,
            mean_error,
            layer_state.error_max.max(mean_error),
            channels,
        );
        let picked = update::top_k_structures(scores, count, words_mut::<u16>(list)?);
        let touched = words_mut::<u32>(touched)?;
        if !touched.is_empty() {
            for &c in picked.iter() {
                *touched.get_mut(c as usize / 32)? |= 1 << (c % 32);
            }
        }
        layer_state.selected = picked.len() as u32;
        layer_state.batch_error_max = layer_state.batch_error_max.max(mean_error);
        layer_state.write(state, at)
    }

    /// The channels the backward of layer `i` works on in this sample.
    fn channels<'a>(
        &self,
        i: usize,
        layer: &LayerRecord,
        state: &'a [u8],
    ) -> Option<ChannelSet<'a>> {
        if self.view.header().config.partial.is_none() || !layer.trains() {
            return Some(ChannelSet::All);
        }
        let (channels, _) = self.view.geometry(i)?.params()?;
        let selected = LayerState::read(state, layer.state_offset as usize)?.selected as usize;
        let list = words::<u16>(region(state, selection_span(layer, channels))?)?;
        Some(ChannelSet::Subset(list.get(..selected)?))
    }

    /// Current weight quantization of a layer: adapted when its weights train (`None` when the
    /// state holds no valid parameters: a corrupt arena).
    fn weight_q(&self, layer: &LayerRecord, state: &[u8]) -> Option<QParams> {
        if layer.weight_channels == 0 {
            return Some(layer.weight_q);
        }
        let q = LayerState::read(state, layer.state_offset as usize)?.weight_q;
        let valid = q.scale.is_finite() && q.scale > 0.0 && (-128..=127).contains(&q.zero_point);
        valid.then_some(q)
    }

    /// Where the weights of a layer with `channels` structures of `structure` weights are: the
    /// whole tensor (in the arena when it trains, else in the plan), or, when a strict subset
    /// of its channels trains, the trained channels in the arena and the frozen rest in the
    /// plan (second part; empty otherwise).
    fn weights(
        &self,
        layer: &LayerRecord,
        channels: usize,
        structure: usize,
    ) -> Option<(Source<'p>, &'p [u8])> {
        if !trains_channel_subset(layer) {
            return Some((self.param(layer.weight_tensor, channels * structure)?, &[]));
        }
        let tensor = self.view.tensor(layer.weight_tensor)?;
        let trained = layer.weight_channels as usize * structure;
        let head = arena_span(&tensor, trained).ok()?;
        let all = self.view.flash(&tensor, channels * structure)?;
        Some((Source::Arena(head), all.get(trained..)?))
    }

    /// Where parameter tensor `id`'s first `len` bytes are.
    fn param(&self, id: u16, len: usize) -> Option<Source<'p>> {
        let tensor = self.view.tensor(id)?;
        if tensor.arena_offset.is_some() {
            return arena_span(&tensor, len).ok().map(Source::Arena);
        }
        self.view.flash(&tensor, len).map(Source::Flash)
    }

    /// Input error of layer `i` from its (masked) output error, over the selected channels.
    fn input_error(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let geometry = view.geometry(i)?;
        let (in_len, out_len) = (view.numel(i)?, view.numel(i + 1)?);
        let part = view.tensor(step.writes[0])?;
        let part_span = arena_span(&part, in_len).ok()?;
        let tracked = self.tracked_error_q(state, &part)?;
        let error_at = if matches!(layer.kind, LayerKind::AvgPool | LayerKind::GlobalAvgPool) {
            0
        } else {
            1
        };
        let error = view.tensor(step.reads[error_at])?;
        let error_span = arena_span(&error, out_len).ok()?;
        let error_q = self.error_q(state, &error)?;
        let written = match geometry {
            Geometry::Conv(_) | Geometry::Linear(_) => {
                let (channels, structure) = geometry.params()?;
                let (weight, frozen) = self.weights(&layer, channels, structure)?;
                let [w, e, p] = split_disjoint(tensors, [weight.span(), error_span, part_span])?;
                let weight_q = [self.weight_q(&layer, state)?];
                let w = WeightParts {
                    head: codes(weight.bytes(w)),
                    tail: codes(frozen),
                };
                let (e, p) = (codes(e), codes_mut(p));
                let selected = self.channels(i, &layer, state)?;
                let q = (&weight_q[..], error_q, selected);
                self.compute_error(tracked, |part_q| match geometry {
                    Geometry::Conv(g) => {
                        conv2d::input_backward_parts_q(&g, w, q.0, e, q.1, q.2, part_q, p)
                    }
                    Geometry::Linear(g) => {
                        linear::input_backward_parts_q(&g, w, q.0, e, q.1, q.2, part_q, p)
                    }
                    _ => RealRange::EMPTY, // this arm is for conv and linear layers only
                })
            }
            Geometry::Pool(g) if layer.kind == LayerKind::MaxPool => {
                let x = arena_span(&view.tensor(step.reads[0])?, in_len).ok()?;
                let [x, e, p] = split_disjoint(tensors, [x, error_span, part_span])?;
                let (x, e, p) = (codes(x), codes(e), codes_mut(p));
                self.compute_error(tracked, |part_q| {
                    pool::max_input_backward_q(&g, x, e, error_q, part_q, p)
                })
            }
            Geometry::Pool(g) => {
                let [e, p] = split_disjoint(tensors, [error_span, part_span])?;
                let (e, p) = (codes(e), codes_mut(p));
                self.compute_error(tracked, |part_q| {
                    pool::avg_input_backward_q(&g, e, error_q, part_q, p)
                })
            }
            Geometry::GlobalPool(g) => {
                let [e, p] = split_disjoint(tensors, [error_span, part_span])?;
                let (e, p) = (codes(e), codes_mut(p));
                self.compute_error(tracked, |part_q| {
                    pool::global_avg_input_backward_q(&g, e, error_q, part_q, p)
                })
            }
            Geometry::Elementwise(_) => return None,
        };
        self.keep_error(state, &part, i, written)
    }

    /// Weight or bias gradient of layer `i` over the selected channels, added into the
    /// gradient tensor (zeroed first at batch 1; at batch > 1 it accumulates over the batch).
    fn gradient(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let geometry = view.geometry(i)?;
        let (channels, structure) = geometry.params()?;
        let is_weight = step.op == StepOp::WeightGrad;
        // The weight gradient of the trained channels: those of the geometry restricted to
        // them, whose input and output are prefixes of the layer's at batch 1.
        let geometry = match geometry {
            Geometry::Conv(g) if is_weight => {
                Geometry::Conv(g.output_prefix(layer.weight_channels as usize)?)
            }
            Geometry::Linear(g) if is_weight => Geometry::Linear(LinearGeom {
                out_features: layer.weight_channels as usize,
                ..g
            }),
            other => other,
        };
        let (in_len, out_len) = match geometry {
            Geometry::Conv(g) => (g.input_len(), g.output_len()),
            Geometry::Linear(g) => (g.input_len(), g.output_len()),
            _ => return None,
        };
        let error = view.tensor(step.reads[if is_weight { 1 } else { 0 }])?;
        let error_q = self.error_q(state, &error)?;
        let error_span = arena_span(&error, out_len).ok()?;
        let grad_len = if is_weight {
            layer.weight_channels as usize * structure
        } else {
            channels
        } * 4;
        let grad_span = arena_span(&view.tensor(step.writes[0])?, grad_len).ok()?;
        let input_span = if is_weight {
            arena_span(&view.tensor(step.reads[0])?, in_len).ok()?
        } else {
            Span::EMPTY
        };
        let selected = self.channels(i, &layer, state)?;
        let [x, e, grad] = split_disjoint(tensors, [input_span, error_span, grad_span])?;
        let grad = words_mut::<f32>(grad)?;
        if view.header().batch == 1 {
            grad.fill(0.0);
        }
        let (x, e) = (codes(x), codes(e));
        match (geometry, is_weight) {
            (Geometry::Conv(g), true) => {
                let x_q = self.activation_q(state, i)?;
                conv2d::weight_backward_q(&g, x, x_q, e, error_q, selected, grad);
            }
            (Geometry::Linear(g), true) => {
                let x_q = self.activation_q(state, i)?;
                linear::weight_backward_q(&g, x, x_q, e, error_q, selected, grad);
            }
            (Geometry::Conv(g), false) => conv2d::bias_backward_q(&g, e, error_q, selected, grad),
            (Geometry::Linear(g), false) => linear::bias_backward_q(&g, e, error_q, selected, grad),
            _ => return None,
        }
        Some(())
    }

    /// The channels an update of layer `i` applies to: those selected in this sample at batch
    /// 1, those touched by any sample of the batch at batch > 1 (listed in ascending order in
    /// the score scratch, which is free outside the mask step), every channel without partial
    /// updates.
    fn update_channels<'a>(
        &self,
        i: usize,
        layer: &LayerRecord,
        state: &'a mut [u8],
    ) -> Option<ChannelSet<'a>> {
        let view = self.view;
        if view.header().batch == 1 || view.header().config.partial.is_none() {
            return self.channels(i, layer, state);
        }
        let (channels, _) = view.geometry(i)?.params()?;
        let list = Span {
            start: view.header().scores_offset as usize,
            len: channels * 2,
        };
        let [list, touched] = split_disjoint(state, [list, touched_span(layer, channels)])?;
        let (list, touched) = (words_mut::<u16>(list)?, words::<u32>(touched)?);
        let mut count = 0;
        for c in 0..channels {
            if touched.get(c / 32)? & 1 << (c % 32) != 0 {
                *list.get_mut(count)? = c as u16;
                count += 1;
            }
        }
        let list: &'a [u16] = list;
        Some(ChannelSet::Subset(list.get(..count)?))
    }

    /// The standardized FQT weight update of layer `i`
    /// ([`update::fqt_update_weights`]): gradient statistics in place, new weight quantization
    /// and range tracker into the layer's state. A layer that trains a strict subset of its
    /// channels updates them under its fixed quantization
    /// ([`update::fqt_update_weights_fixed`]), leaving its state as it is.
    fn weight_update(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<Result<(), ExecError>> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let (_, structure) = view.geometry(i)?.params()?;
        let channels = layer.weight_channels as usize;
        let grad = arena_span(&view.tensor(step.reads[0])?, channels * structure * 4).ok()?;
        let weight = arena_span(&view.tensor(step.reads[1])?, channels * structure).ok()?;
        let stats_tensor = view.tensor(step.reads[2])?;
        let stats = arena_span(&stats_tensor, stats_tensor.bytes as usize).ok()?;
        let at = layer.state_offset as usize;
        let mut layer_state = LayerState::read(state, at)?;
        let config = view.header().config;
        let update_config = FqtUpdateConfig {
            lr: read_f32(state, LEARNING_RATE_AT)?,
            stats_rate: config.stats_rate,
            range_rate: config.weight_rate,
            eps: config.eps,
        };
        let [grad, weight, stats] = split_disjoint(tensors, [grad, weight, stats])?;
        {
            let selected = self.update_channels(i, &layer, state)?;
            let Some(stats) = grad_stats_mut(stats) else {
                return Some(Err(ExecError::CorruptArena));
            };
            if stats.len() != channels {
                return None;
            }
            let (weight, grad) = (codes_mut(weight), words::<f32>(grad)?);
            if trains_channel_subset(&layer) {
                let q = layer_state.weight_q;
                let cfg = &update_config;
                update::fqt_update_weights_fixed(weight, q, grad, structure, selected, stats, cfg);
            } else {
                update::fqt_update_weights(
                    weight,
                    &mut layer_state.weight_q,
                    &mut layer_state.weight_range,
                    grad,
                    structure,
                    selected,
                    stats,
                    &update_config,
                );
            }
        }
        zero_grad_stats_padding(stats);
        layer_state.write(state, at)?;
        Some(Ok(()))
    }

    /// The FQT bias update of layer `i` ([`update::fqt_update_bias`]) with the gradient scaled
    /// by `1 / samples in the batch` (this one included).
    fn bias_update(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let (channels, _) = view.geometry(i)?.params()?;
        let grad = arena_span(&view.tensor(step.reads[0])?, channels * 4).ok()?;
        let bias = arena_span(&view.tensor(step.reads[1])?, channels * 4).ok()?;
        let [grad, bias] = split_disjoint(tensors, [grad, bias])?;
        let lr = read_f32(state, LEARNING_RATE_AT)?;
        let batch = samples_this_batch(state)?;
        let selected = self.update_channels(i, &layer, state)?;
        update::fqt_update_bias(
            words_mut::<i32>(bias)?,
            layer.bias_scale,
            words::<f32>(grad)?,
            selected,
            lr,
            1.0 / batch,
        );
        Some(())
    }
}

/// Start of a batch: forget the ranges seen, zero the gradient accumulators (batch > 1), the
/// touched channels and each layer's largest error of the batch.
fn start_batch(view: &PlanView, arena: &mut [u8]) -> Result<(), ExecError> {
    let (tensors, state) = arena.split_at_mut(view.state_offset());
    let int8 = view.precision() == Precision::Int8;
    let tracked = if int8 { view.layer_count() + 1 } else { 0 };
    for t in 0..tracked {
        for which in [Track::Activation, Track::Error] {
            set_seen(state, t, which, RealRange::EMPTY).ok_or(ExecError::BadPlan)?;
        }
    }
    if view.header().batch > 1 {
        for id in 0..view.tensor_count() as u16 {
            let tensor = view.tensor(id).ok_or(ExecError::BadPlan)?;
            if matches!(tensor.role, TensorRole::WeightGrad | TensorRole::BiasGrad) {
                let span = arena_span(&tensor, tensor.bytes as usize)?;
                region_mut(tensors, span).ok_or(ExecError::BadPlan)?.fill(0);
            }
        }
    }
    for i in 0..view.layer_count() {
        let layer = view.layer(i).ok_or(ExecError::BadPlan)?;
        if !layer.trains() || !int8 {
            continue;
        }
        let at = layer.state_offset as usize;
        let mut layer_state = LayerState::read(state, at).ok_or(ExecError::BadPlan)?;
        layer_state.batch_error_max = 0.0;
        layer_state.write(state, at).ok_or(ExecError::BadPlan)?;
        if view.header().config.partial.is_some() {
            let touched = touched_span(&layer, layer.out_channels as usize);
            region_mut(state, touched)
                .ok_or(ExecError::BadPlan)?
                .fill(0);
        }
    }
    Ok(())
}

/// End of a batch: every tracker folds in the range seen (activations only where the tensor
/// owns its tracker), and each trained layer's largest mean error folds in the batch's.
fn end_batch(view: &PlanView, state: &mut [u8]) -> Option<()> {
    if view.precision() == Precision::Float32 {
        return Some(()); // nothing tracked
    }
    let config = view.header().config;
    for t in 1..=view.layer_count() {
        if view.range_owner(t) == t {
            let mut ema = tracker(state, t, Track::Activation)?;
            ema.observe(seen(state, t, Track::Activation)?, config.activation_rate);
            set_tracker(state, t, Track::Activation, &ema)?;
        }
        let mut ema = tracker(state, t, Track::Error)?;
        ema.observe(seen(state, t, Track::Error)?, config.error_rate);
        set_tracker(state, t, Track::Error, &ema)?;
    }
    for i in 0..view.layer_count() {
        let layer = view.layer(i)?;
        if layer.trains() {
            let at = layer.state_offset as usize;
            let mut layer_state = LayerState::read(state, at)?;
            layer_state.error_max = layer_state.error_max.max(layer_state.batch_error_max);
            layer_state.write(state, at)?;
        }
    }
    Some(())
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
    let (channels, structure) = view.geometry(i)?.params()?;
    let bytes = |id: u16, len: usize| param_bytes(view, arena, id, len);
    let state = arena.get(view.state_offset()..)?;
    let (weight_q, weight_range) = if layer.weight_channels > 0 {
        let trained = LayerState::read(state, layer.state_offset as usize)?;
        (trained.weight_q, trained.weight_range)
    } else {
        (layer.weight_q, layer.weight_range)
    };
    let (weight, frozen_weight) = if trains_channel_subset(&layer) {
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
    /// Weights, `[out][in / groups][kernel_h][kernel_w]` (linear: `[out][in]`).
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
    let (channels, structure) = view.geometry(i)?.params()?;
    let floats = |id: u16, len: usize| words::<f32>(param_bytes(view, arena, id, len * 4)?);
    Some(FloatLayerParams {
        weight: floats(layer.weight_tensor, channels * structure)?,
        bias: floats(layer.bias_tensor, channels)?,
    })
}

/// The current activation and error range trackers of model tensor `t` of an int8 plan
/// (`None` for a float32 plan, which tracks no ranges).
pub fn range_trackers(view: &PlanView, arena: &[u8], t: usize) -> Option<(RangeEma, RangeEma)> {
    if t > view.layer_count() || view.precision() != Precision::Int8 {
        return None;
    }
    let state = arena.get(view.state_offset()..)?;
    Some((
        tracker(state, t, Track::Activation)?,
        tracker(state, t, Track::Error)?,
    ))
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

    #[test]
    fn exact_ranges_recompute_clipped_and_underused_errors() {
        let tracked = QParams::from_range(-1.0, 1.0); // s = 2/255, codes cover [-1, 1]
        let range = |min, max| RealRange { min, max };
        // 85% of the codes used, nothing clipped: kept.
        assert_eq!(exact_error_q(tracked, range(-0.9, 0.8)), None);
        // Exactly half of the codes: kept; less: recomputed with the exact range.
        assert_eq!(exact_error_q(tracked, range(-0.5, 0.5)), None);
        let narrow = range(-0.3, 0.4);
        assert_eq!(
            exact_error_q(tracked, narrow),
            Some(QParams::from_range(-0.3, 0.4))
        );
        // Saturated on one side even though the span fits: recomputed.
        assert_eq!(
            exact_error_q(tracked, range(-0.2, 1.2)),
            Some(QParams::from_range(-0.2, 1.2))
        );
        // Nothing, or only zeros, which every quantization represents exactly: kept.
        assert_eq!(exact_error_q(tracked, RealRange::EMPTY), None);
        assert_eq!(exact_error_q(tracked, range(0.0, 0.0)), None);
        // The kernel runs once with the tracked quantization, a second time with the exact
        // one when that is needed, and never again under tracked ranges.
        for (mode, exact, calls) in [
            (ErrorRanges::Exact, narrow, 2),
            (ErrorRanges::Exact, range(-0.9, 0.8), 1),
            (ErrorRanges::Tracked, narrow, 1),
        ] {
            let mut seen = [None; 2];
            let mut count = 0;
            let written = quantize_error(mode, tracked, |q| {
                seen[count] = Some(q);
                count += 1;
                exact
            });
            assert_eq!(count, calls);
            assert_eq!(seen[0], Some(tracked));
            assert_eq!(written.recomputed, calls == 2);
            assert_eq!(written.q, seen[calls - 1].unwrap());
            assert_eq!(written.range, exact);
        }
    }

    #[test]
    fn error_unit_is_the_largest_loss_gradient() {
        let unit = |min, max| error_unit(RealRange { min, max });
        assert_eq!(unit(-0.25, 0.5), 0.5);
        assert_eq!(unit(-0.75, 0.5), 0.75);
        assert_eq!(unit(0.0, 0.0), 1.0);
        assert_eq!(unit(f32::NAN, f32::NAN), 1.0);
        assert_eq!(error_unit(RealRange::EMPTY), 1.0);
    }
}
