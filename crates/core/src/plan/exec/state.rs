//! The training-state region of the arena: its layout (which the plan writer and the
//! validator use too) and its accessors.
//!
//! The region starts at [`PlanView::state_offset`]. Layout:
//! - header, [`STATE_HEADER_BYTES`]: samples trained in the current batch (`u32`), the learning
//!   rate in use (`f32`);
//! - int8 plans only: per model tensor, [`TENSOR_STATE_BYTES`]: its activation and error range
//!   trackers and the ranges seen in the current batch; with exact error ranges then, per model
//!   tensor, [`ERROR_Q_BYTES`]: the quantization its error and its error part were written
//!   with in the current sample ([`error_q_at`]);
//! - int8 plans only: per trained layer, at its record's `state_offset`,
//!   [`layer_state_bytes`]: a `LayerState` and, with partial updates, the selected channels
//!   and the channels touched in the batch; then the partial-update score scratch (one `f32`
//!   per channel of the widest layer, at the header's `scores_offset`).
//!
//! Every accessor returns `None` out of bounds (an inconsistent plan or arena) instead of
//! panicking.

use super::super::typed::{read_u32, write_u32, Span};
use super::super::{LayerRecord, PlanView, Precision, TensorRole};
use super::{arena_span, ExecError};
use crate::quant::{ErrorRanges, QParams, RangeEma, RealRange};

/// Bytes of the state-region header: samples trained in the current batch (`u32`) and the
/// learning rate in use (`f32`, initially the plan's; see [`set_learning_rate`]).
pub const STATE_HEADER_BYTES: usize = 8;
/// Bytes of one model tensor's state: activation and error trackers (12 bytes each: `f32`
/// min, max, `u32` initialized) and the activation and error ranges seen in the current
/// batch (8 bytes each: `f32` min, max).
pub const TENSOR_STATE_BYTES: usize = 40;
/// Bytes of a trained layer's fixed state: weight quantization (`f32`, `i32`), weight range
/// tracker (12), largest mean error seen and largest of the current batch (`f32` each),
/// selected channel count (`u32`).
pub const LAYER_STATE_BYTES: usize = 32;

/// Bytes of the state of a trained layer with `out_channels` channels: the fixed part, plus
/// with partial updates the selected channel list (`u16` each, padded to 4 bytes) and the
/// channels touched in the batch (one bit each, in `u32` words).
pub fn layer_state_bytes(out_channels: usize, partial: bool) -> usize {
    let lists = if partial {
        (out_channels * 2).div_ceil(4) * 4 + out_channels.div_ceil(32) * 4
    } else {
        0
    };
    LAYER_STATE_BYTES + lists
}

/// Bytes of one model tensor's error quantization with [`ErrorRanges::Exact`]: the
/// quantization (`f32` scale, `i32` zero point) its complete error and then its error part
/// ([`TensorRole::ErrorPart`]) were written with in the current sample.
pub const ERROR_Q_BYTES: usize = 16;

/// Offset of the error quantization of model tensor `t` in the state region of a plan with
/// `model_tensors` model tensors (exact error ranges; `part`: of its error part): after the
/// model tensor states.
pub fn error_q_at(model_tensors: usize, t: usize, part: bool) -> usize {
    STATE_HEADER_BYTES + model_tensors * TENSOR_STATE_BYTES + t * ERROR_Q_BYTES + 8 * part as usize
}

/// Bytes of an int8 plan's state region before the layers' state: header, model tensor
/// states and, with exact error ranges, their error quantization.
pub fn tensor_state_end(model_tensors: usize, error_ranges: ErrorRanges) -> usize {
    let error_q = match error_ranges {
        ErrorRanges::Exact => model_tensors * ERROR_Q_BYTES,
        ErrorRanges::Tracked => 0,
    };
    STATE_HEADER_BYTES + model_tensors * TENSOR_STATE_BYTES + error_q
}

/// Smallest state region of a plan: [`tensor_state_end`] for int8 (range trackers per model
/// tensor, and the error quantization with exact error ranges), the [`STATE_HEADER_BYTES`]
/// alone for float32 (no trackers, no layer state; the velocities are planned tensors).
pub fn state_bytes_at_least(
    precision: Precision,
    model_tensors: usize,
    error_ranges: ErrorRanges,
) -> usize {
    match precision {
        Precision::Int8 => tensor_state_end(model_tensors, error_ranges),
        Precision::Float32 => STATE_HEADER_BYTES,
    }
}

/// Which tracker of a model tensor.
#[derive(Clone, Copy)]
pub(super) enum Track {
    Activation = 0,
    Error = 1,
}

/// Byte offset of model tensor `t`'s state in the state region.
fn tensor_state_at(t: usize) -> usize {
    STATE_HEADER_BYTES + t * TENSOR_STATE_BYTES
}

pub(super) fn read_f32(bytes: &[u8], at: usize) -> Option<f32> {
    read_u32(bytes, at).map(f32::from_bits)
}

pub(super) fn write_f32(bytes: &mut [u8], at: usize, value: f32) -> Option<()> {
    write_u32(bytes, at, value.to_bits())
}

/// A quantization stored as `f32` scale and `i32` zero point.
pub(super) fn read_qparams(bytes: &[u8], at: usize) -> Option<QParams> {
    Some(QParams {
        scale: read_f32(bytes, at)?,
        zero_point: read_u32(bytes, at + 4)? as i32,
    })
}

pub(super) fn write_qparams(bytes: &mut [u8], at: usize, q: QParams) -> Option<()> {
    write_f32(bytes, at, q.scale)?;
    write_u32(bytes, at + 4, q.zero_point as u32)
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
pub(super) fn tracker(state: &[u8], t: usize, which: Track) -> Option<RangeEma> {
    read_ema(state, tensor_state_at(t) + 12 * which as usize)
}

pub(super) fn set_tracker(state: &mut [u8], t: usize, which: Track, ema: &RangeEma) -> Option<()> {
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

pub(super) fn set_seen(state: &mut [u8], t: usize, which: Track, range: RealRange) -> Option<()> {
    let at = tensor_state_at(t) + 24 + 8 * which as usize;
    write_f32(state, at, range.min)?;
    write_f32(state, at + 4, range.max)
}

pub(super) fn merge_seen(state: &mut [u8], t: usize, which: Track, range: RealRange) -> Option<()> {
    let merged = seen(state, t, which)?.merge(range);
    set_seen(state, t, which, merged)
}

/// Samples of the current batch already trained.
pub(super) fn samples_in_batch(state: &[u8]) -> Option<u32> {
    read_u32(state, 0)
}

/// Samples in the current batch, counting the one in progress: the `1 / batch` of its
/// updates (a shorter last batch has fewer than the plan's batch size).
pub(super) fn samples_this_batch(state: &[u8]) -> Option<f32> {
    Some((samples_in_batch(state)? + 1) as f32)
}

/// Byte offset of the learning rate in the state region.
pub(super) const LEARNING_RATE_AT: usize = 4;

/// The learning rate the next updates use.
pub fn learning_rate(view: &PlanView, arena: &[u8]) -> Option<f32> {
    read_f32(arena.get(view.state_offset()..)?, LEARNING_RATE_AT)
}

/// Set the learning rate of the next updates (for a schedule such as cosine decay;
/// [`super::init`] starts from the plan's).
pub fn set_learning_rate(view: &PlanView, arena: &mut [u8], lr: f32) -> Result<(), ExecError> {
    let state = arena
        .get_mut(view.state_offset()..)
        .ok_or(ExecError::ArenaTooSmall)?;
    write_f32(state, LEARNING_RATE_AT, lr).ok_or(ExecError::ArenaTooSmall)
}

/// The fixed state of a trained layer (at its record's `state_offset`).
#[derive(Clone, Copy)]
pub(super) struct LayerState {
    pub(super) weight_q: QParams,
    pub(super) weight_range: RangeEma,
    /// Largest mean absolute output error seen in earlier batches.
    pub(super) error_max: f32,
    /// Largest in the current batch.
    pub(super) batch_error_max: f32,
    /// Channels selected for the current sample (partial updates).
    pub(super) selected: u32,
}

impl LayerState {
    pub(super) fn read(state: &[u8], at: usize) -> Option<LayerState> {
        Some(LayerState {
            weight_q: read_qparams(state, at)?,
            weight_range: read_ema(state, at + 8)?,
            error_max: read_f32(state, at + 20)?,
            batch_error_max: read_f32(state, at + 24)?,
            selected: read_u32(state, at + 28)?,
        })
    }

    pub(super) fn write(&self, state: &mut [u8], at: usize) -> Option<()> {
        write_qparams(state, at, self.weight_q)?;
        write_ema(state, at + 8, &self.weight_range)?;
        write_f32(state, at + 20, self.error_max)?;
        write_f32(state, at + 24, self.batch_error_max)?;
        write_u32(state, at + 28, self.selected)
    }
}

/// The selected-channel list of a trained layer with `channels` channels.
pub(super) fn selection_span(layer: &LayerRecord, channels: usize) -> Span {
    Span {
        start: layer.state_offset as usize + LAYER_STATE_BYTES,
        len: channels * 2,
    }
}

/// The touched-channel bits (one per channel, `u32` words) of a trained layer.
pub(super) fn touched_span(layer: &LayerRecord, channels: usize) -> Span {
    Span {
        start: layer.state_offset as usize + LAYER_STATE_BYTES + (channels * 2).div_ceil(4) * 4,
        len: channels.div_ceil(32) * 4,
    }
}

pub(super) fn region(bytes: &[u8], span: Span) -> Option<&[u8]> {
    bytes.get(span.start..span.start.checked_add(span.len)?)
}

pub(super) fn region_mut(bytes: &mut [u8], span: Span) -> Option<&mut [u8]> {
    bytes.get_mut(span.start..span.start.checked_add(span.len)?)
}

/// The state of a fresh arena: the plan's learning rate and, int8, its initial trackers and
/// each trained layer's initial weight quantization.
pub(super) fn init_state(view: &PlanView, state: &mut [u8]) -> Option<()> {
    state.fill(0);
    write_f32(state, LEARNING_RATE_AT, view.header().config.lr)?;
    if view.precision() == Precision::Float32 {
        return Some(()); // no range trackers, no layer state
    }
    for t in 0..=view.layer_count() {
        let record = view.model_tensor(t)?;
        set_tracker(state, t, Track::Activation, &record.activation)?;
        set_tracker(state, t, Track::Error, &record.error)?;
        for which in [Track::Activation, Track::Error] {
            set_seen(state, t, which, RealRange::EMPTY)?;
        }
    }
    for i in 0..view.layer_count() {
        let layer = view.layer(i)?;
        if layer.trains() {
            let fresh = LayerState {
                weight_q: layer.weight_q,
                weight_range: layer.weight_range,
                error_max: 0.0,
                batch_error_max: 0.0,
                selected: 0,
            };
            fresh.write(state, layer.state_offset as usize)?;
        }
    }
    Some(())
}

/// Start of a batch: forget the ranges seen, zero the gradient accumulators (batch > 1), the
/// touched channels and each layer's largest error of the batch.
pub(super) fn start_batch(view: &PlanView, arena: &mut [u8]) -> Result<(), ExecError> {
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
            let channels = trained_channels(view, i).ok_or(ExecError::BadPlan)?;
            let touched = touched_span(&layer, channels);
            region_mut(state, touched)
                .ok_or(ExecError::BadPlan)?
                .fill(0);
        }
    }
    Ok(())
}

/// Output channels of trained layer `i` (the size of its partial-update lists).
pub(super) fn trained_channels(view: &PlanView, i: usize) -> Option<usize> {
    Some(view.resolve(i)?.params()?.channels)
}

/// End of a batch: every tracker folds in the range seen (activations only where the tensor
/// owns its tracker), and each trained layer's largest mean error folds in the batch's.
pub(super) fn end_batch(view: &PlanView, state: &mut [u8]) -> Option<()> {
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
