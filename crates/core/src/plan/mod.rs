//! Plan files: the compiled training step of a model, read in place (from flash) by the
//! executor in [`exec`].
//!
//! A plan file is little-endian, versioned and checksummed (CRC-32 of everything after the
//! first 16 bytes, [`crate::checksum`]). It holds fixed-size records that [`PlanView`] decodes
//! on access, never into heap structures:
//!
//! ```text
//! [header 96 B][layer records][model tensor records][tensor records][step records][blob]
//! ```
//!
//! - a [`Header`]: the [`Precision`] (int8 or float32), counts, the planned arena size and
//!   its lower bound, the size of the training-state region, and the hyper-parameters
//!   ([`TrainConfig`]);
//! - a [`LayerRecord`] per layer: kind, geometry, what trains, bias scale and weight
//!   quantization (int8: the frozen value, or the initial value of a trained layer; unused in
//!   float32);
//! - a [`ModelTensorRecord`] per model tensor (0: input, `i + 1`: output of layer `i`): shape
//!   and initial activation and error range trackers (empty in float32);
//! - a [`TensorRecord`] per plan tensor: role, size, arena offset and/or flash contents;
//! - a [`StepRecord`] per kernel call of one sample, naming its tensors by position;
//! - the parameter blob: weight codes and `i32` biases (int8) or `f32` weights and biases
//!   (float32) of every layer with parameters, each 4-byte aligned (frozen ones are read
//!   there, trained ones are copied to the arena by [`exec::init`]).
//!
//! Tensor sizes follow the precision: activations and errors `numel` bytes (int8) or
//! `4 * numel` (float32), weights 1 or 4 bytes each, biases, gradients and velocities 4 bytes
//! per element; the weight update's state is the gradient statistics (int8) or the momentum
//! velocity (float32 with momentum, also one per trained bias).
//!
//! Memory at run time is one caller-supplied arena: the planned tensors in
//! `[0, arena_bytes)`, then, from [`PlanView::state_offset`], the training-state region
//! (`state_bytes`): the sample counter and learning rate; int8 also range trackers, the
//! ranges seen in the current batch, per trained layer its weight quantization and
//! partial-update bookkeeping (see [`exec`]).
//!
//! [`PlanView::parse`] validates everything once, for both precisions: bounds, record codes,
//! shapes against the layer geometries, the int8 kernels' accumulator limits, tensor sizes
//! against their roles and the precision, the hyper-parameters the precision allows (float32:
//! no partial updates, momentum in `[0, 1)` with velocities exactly when it is not 0), each
//! step's operands by position, and the arena plan itself: every operand is live at its step,
//! tensors kept across samples are live at every step, and no two tensors live at a common
//! step share a byte (an independent check of the planner, `O(tensors^2)` once). So no file can
//! make the accessors or the executor panic or overwrite a live tensor; parameter values
//! themselves (weights, biases, scales, range trackers) are data and not checked.

pub mod exec;
mod record;
mod typed;

pub use record::{
    Header, LayerKind, LayerRecord, ModelTensorRecord, PartialUpdate, Precision, StepOp,
    StepRecord, TensorRecord, TensorRole, TrainConfig, CHECKSUM_START, HEADER_BYTES, LAYER_BYTES,
    LOSS_QUANT, MAGIC, MAX_READS, MAX_WRITES, MODEL_TENSOR_BYTES, NONE, NO_OFFSET, STEP_BYTES,
    TENSOR_BYTES, VERSION,
};

use crate::checksum::crc32;
use crate::ops::conv2d::Conv2dGeom;
use crate::ops::linear::LinearGeom;
use crate::ops::pool::{GlobalPoolGeom, PoolGeom};
use crate::quant::QParams;
use crate::update::GradStats;

#[cfg(target_endian = "big")]
compile_error!("plan files and arenas hold little-endian i32/f32 values read in place");

/// Why a plan file cannot be used. Small and non-exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// Shorter than its header or than the size the header declares.
    Truncated,
    /// Not a plan file.
    BadMagic,
    /// Written by another format version.
    UnsupportedVersion(u16),
    /// The header's sizes, counts or flags are inconsistent.
    BadHeader,
    /// The CRC-32 does not match: the file is corrupt.
    Checksum,
    /// The bytes do not start at a 4-byte aligned address (biases are read in place).
    Misaligned,
    /// Layer record `n` is invalid (unknown code, geometry, shapes, parameters, limits).
    BadLayer(u16),
    /// Model tensor record `n` is invalid (shape, range owner).
    BadModelTensor(u16),
    /// Tensor record `n` is invalid (role, size, placement).
    BadTensor(u16),
    /// Step record `n` is invalid (operation, layer, operands, overlapping operands).
    BadStep(u16),
    /// A valid plan this version cannot run (for example float32 precision).
    Unsupported,
}

impl core::fmt::Display for PlanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlanError::Truncated => f.write_str("the plan file is truncated"),
            PlanError::BadMagic => f.write_str("not a plan file (bad magic)"),
            PlanError::UnsupportedVersion(v) => {
                write!(f, "plan format version {v}, expected {VERSION}")
            }
            PlanError::BadHeader => f.write_str("inconsistent plan header"),
            PlanError::Checksum => f.write_str("plan checksum mismatch (corrupt file)"),
            PlanError::Misaligned => f.write_str("plan bytes are not 4-byte aligned"),
            PlanError::BadLayer(n) => write!(f, "invalid layer record {n}"),
            PlanError::BadModelTensor(n) => write!(f, "invalid model tensor record {n}"),
            PlanError::BadTensor(n) => write!(f, "invalid tensor record {n}"),
            PlanError::BadStep(n) => write!(f, "invalid step record {n}"),
            PlanError::Unsupported => f.write_str("the plan uses a feature this build cannot run"),
        }
    }
}

/// Most products one `i32` accumulator of the 8-bit kernels may sum (`33 025 * 255^2 < 2^31`).
pub const MAX_ACCUMULATED_TERMS: usize = 33_025;

/// Bytes of the state-region header: samples trained in the current batch (`u32`) and the
/// learning rate in use (`f32`, initially the plan's; see [`exec::set_learning_rate`]).
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

/// Bytes of the state region before the layers' state: header and model tensor states.
pub fn tensor_state_end(model_tensors: usize) -> usize {
    STATE_HEADER_BYTES + model_tensors * TENSOR_STATE_BYTES
}

/// Smallest state region of a plan: [`tensor_state_end`] for int8 (range trackers per model
/// tensor), the [`STATE_HEADER_BYTES`] alone for float32 (no trackers, no layer state; the
/// velocities are planned tensors).
pub fn state_bytes_at_least(precision: Precision, model_tensors: usize) -> usize {
    match precision {
        Precision::Int8 => tensor_state_end(model_tensors),
        Precision::Float32 => STATE_HEADER_BYTES,
    }
}

/// Complete a plan file whose bytes are all written: set the header's file size and the CRC-32
/// of everything after the first 16 bytes. `None` when `file` is shorter than a header or
/// longer than `u32::MAX` bytes.
pub fn seal(file: &mut [u8]) -> Option<()> {
    if file.len() < HEADER_BYTES {
        return None;
    }
    let file_bytes = u32::try_from(file.len()).ok()?;
    file[8..12].copy_from_slice(&file_bytes.to_le_bytes());
    let crc = crc32(&file[CHECKSUM_START..]);
    file[12..16].copy_from_slice(&crc.to_le_bytes());
    Some(())
}

/// The operator geometry of one layer at batch 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Geometry {
    /// Convolution.
    Conv(Conv2dGeom),
    /// Fully connected.
    Linear(LinearGeom),
    /// Average or max pooling.
    Pool(PoolGeom),
    /// Global average pooling.
    GlobalPool(GlobalPoolGeom),
    /// Element-wise layers (activation, add, flatten): elements per sample.
    Elementwise(usize),
}

impl Geometry {
    /// `(out_channels, weights per channel)` of a layer with parameters.
    pub fn params(&self) -> Option<(usize, usize)> {
        match self {
            Geometry::Conv(g) => Some((g.out_channels, g.weight_len() / g.out_channels)),
            Geometry::Linear(g) => Some((g.out_features, g.in_features)),
            _ => None,
        }
    }

    /// Output positions per channel (the "spatial" size of partial-update scores).
    pub fn out_spatial(&self) -> usize {
        match self {
            Geometry::Conv(g) => g.out_h() * g.out_w(),
            _ => 1,
        }
    }

    /// True when no accumulator of the 8-bit kernels can overflow: the forward and input-error
    /// sums of conv and linear layers hold at most [`MAX_ACCUMULATED_TERMS`] products, pooling
    /// windows at most 2^16 codes, global pooling at most 2^23 positions, and partial-update
    /// scores sum under 2^24 positions per channel.
    fn within_kernel_limits(&self) -> bool {
        // In `u64`: the factors are `u16` values, whose products may not fit a 32-bit `usize`.
        let wide = |v: usize| v as u64;
        let max_terms = MAX_ACCUMULATED_TERMS as u64;
        match self {
            Geometry::Conv(g) => {
                let taps = wide(g.kernel_h) * wide(g.kernel_w);
                let in_terms = wide(g.in_channels / g.groups) * taps;
                let out_terms = wide(g.out_channels / g.groups) * taps;
                in_terms <= max_terms
                    && out_terms <= max_terms
                    && wide(g.out_h()) * wide(g.out_w()) < 1 << 24
            }
            Geometry::Linear(g) => {
                wide(g.in_features) <= max_terms && wide(g.out_features) <= max_terms
            }
            Geometry::Pool(g) => wide(g.kernel_h) * wide(g.kernel_w) <= 1 << 16,
            Geometry::GlobalPool(g) => wide(g.spatial) <= 1 << 23,
            Geometry::Elementwise(_) => true,
        }
    }
}

/// A validated plan file, read in place.
#[derive(Clone, Copy, Debug)]
pub struct PlanView<'a> {
    /// The file, `header.file_bytes` long.
    bytes: &'a [u8],
    header: Header,
}

/// An expected operand of a step, by position.
#[derive(Clone, Copy)]
enum Operand {
    /// Nothing at this position.
    Absent,
    /// The activation buffer of model tensor `t` (a flatten output shares its input's).
    Activation(usize),
    /// An error buffer (complete or partial, any role index) of model tensor `t`'s size.
    Error(usize),
    /// A new error of model tensor `t`: role `Error` or `ErrorPart` with index `t`.
    ErrorOf(usize),
    /// Exactly this role and index.
    Exactly(TensorRole, usize),
}

impl<'a> PlanView<'a> {
    /// Check and validate a plan file (see the module documentation); `bytes` must start at a
    /// 4-byte aligned address and may extend past the file (for example a flash partition).
    pub fn parse(bytes: &'a [u8]) -> Result<PlanView<'a>, PlanError> {
        let header = Header::decode(bytes)?;
        let file_bytes = header.file_bytes as usize;
        if file_bytes < HEADER_BYTES {
            return Err(PlanError::BadHeader);
        }
        let bytes = bytes.get(..file_bytes).ok_or(PlanError::Truncated)?;
        if crc32(&bytes[CHECKSUM_START..]) != header.crc {
            return Err(PlanError::Checksum);
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(4) {
            return Err(PlanError::Misaligned);
        }
        let view = PlanView { bytes, header };
        view.validate()?;
        Ok(view)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Numeric form of the plan (the executor dispatches on it).
    pub fn precision(&self) -> Precision {
        self.header.precision
    }

    /// Bytes of one activation or error element: 1 (int8) or 4 (float32).
    fn element_bytes(&self) -> usize {
        self.header.precision.element_bytes()
    }

    /// True for a float32 plan with a momentum velocity per trained parameter.
    fn has_velocity(&self) -> bool {
        self.header.precision == Precision::Float32 && self.header.config.momentum != 0.0
    }

    /// The file bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of layers.
    pub fn layer_count(&self) -> usize {
        self.header.layer_count as usize
    }

    /// Number of plan tensors.
    pub fn tensor_count(&self) -> usize {
        self.header.tensor_count as usize
    }

    /// Number of steps of one sample.
    pub fn step_count(&self) -> usize {
        self.header.step_count as usize
    }

    fn record(&self, section: usize, size: usize, index: usize, count: usize) -> Option<&'a [u8]> {
        if index >= count {
            return None;
        }
        self.bytes
            .get(section + index * size..section + (index + 1) * size)
    }

    fn model_tensors_at(&self) -> usize {
        HEADER_BYTES + self.layer_count() * LAYER_BYTES
    }

    fn tensors_at(&self) -> usize {
        self.model_tensors_at() + (self.layer_count() + 1) * MODEL_TENSOR_BYTES
    }

    fn steps_at(&self) -> usize {
        self.tensors_at() + self.tensor_count() * TENSOR_BYTES
    }

    /// Layer record `i`.
    pub fn layer(&self, i: usize) -> Option<LayerRecord> {
        let bytes = self.record(HEADER_BYTES, LAYER_BYTES, i, self.layer_count())?;
        LayerRecord::decode(bytes)
    }

    /// Model tensor record `t` (`0..=layer_count`).
    pub fn model_tensor(&self, t: usize) -> Option<ModelTensorRecord> {
        let at = self.model_tensors_at();
        let bytes = self.record(at, MODEL_TENSOR_BYTES, t, self.layer_count() + 1)?;
        Some(ModelTensorRecord::decode(bytes))
    }

    /// Plan tensor record `id`.
    pub fn tensor(&self, id: u16) -> Option<TensorRecord> {
        let at = self.tensors_at();
        let bytes = self.record(at, TENSOR_BYTES, id as usize, self.tensor_count())?;
        TensorRecord::decode(bytes)
    }

    /// Step record `s`.
    pub fn step(&self, s: usize) -> Option<StepRecord> {
        let bytes = self.record(self.steps_at(), STEP_BYTES, s, self.step_count())?;
        StepRecord::decode(bytes)
    }

    /// The flash contents of a parameter tensor (`len` bytes at its flash offset).
    pub fn flash(&self, tensor: &TensorRecord, len: usize) -> Option<&'a [u8]> {
        let start = tensor.flash_offset? as usize;
        let blob_start = self.header.blob_offset as usize;
        if start < blob_start {
            return None;
        }
        self.bytes.get(start..start.checked_add(len)?)
    }

    /// Elements of one sample of model tensor `t`.
    pub fn numel(&self, t: usize) -> Option<usize> {
        self.model_tensor(t)?.numel()
    }

    /// Bytes of one sample of model tensor `t` as an activation or error.
    fn tensor_bytes(&self, t: usize) -> Option<u64> {
        Some(self.numel(t)? as u64 * self.element_bytes() as u64)
    }

    /// Elements of one input sample (codes of an int8 plan, `f32` values of a float32 one).
    pub fn input_len(&self) -> usize {
        self.numel(0).unwrap_or(0)
    }

    /// Quantization of the input of an int8 plan (the input's tracker never adapts):
    /// quantize float samples with it before [`exec::train_sample`].
    pub fn input_qparams(&self) -> QParams {
        self.model_tensor(0)
            .map_or(QParams::from_range(0.0, 0.0), |t| t.activation.qparams())
    }

    /// Arena offset of the training-state region: the planned arena rounded up to 4 bytes.
    pub fn state_offset(&self) -> usize {
        (self.header.arena_bytes as usize).div_ceil(4) * 4
    }

    /// Bytes the caller's arena must have: planned tensors plus the training state.
    pub fn arena_required(&self) -> usize {
        self.state_offset() + self.header.state_bytes as usize
    }

    /// The operator geometry of layer `i` at batch 1 (`None` when it is not a valid one).
    pub fn geometry(&self, i: usize) -> Option<Geometry> {
        let layer = self.layer(i)?;
        let input = self.model_tensor(i)?;
        let [c, h, w] = input.shape.map(usize::from);
        let numel = input.numel()?;
        let (kernel, stride, pad) = (layer.kernel, layer.stride, layer.padding);
        let geometry = match layer.kind {
            LayerKind::Conv2d => {
                let g = Conv2dGeom {
                    batch: 1,
                    in_channels: c,
                    in_h: h,
                    in_w: w,
                    out_channels: layer.out_channels as usize,
                    kernel_h: kernel.0 as usize,
                    kernel_w: kernel.1 as usize,
                    stride_h: stride.0 as usize,
                    stride_w: stride.1 as usize,
                    pad_h: pad.0 as usize,
                    pad_w: pad.1 as usize,
                    groups: layer.groups as usize,
                };
                g.validate().ok()?;
                Geometry::Conv(g)
            }
            LayerKind::Linear => {
                let g = LinearGeom {
                    batch: 1,
                    in_features: numel,
                    out_features: layer.out_channels as usize,
                };
                g.validate().ok()?;
                Geometry::Linear(g)
            }
            LayerKind::AvgPool | LayerKind::MaxPool => {
                let g = PoolGeom {
                    batch: 1,
                    channels: c,
                    in_h: h,
                    in_w: w,
                    kernel_h: kernel.0 as usize,
                    kernel_w: kernel.1 as usize,
                    stride_h: stride.0 as usize,
                    stride_w: stride.1 as usize,
                    pad_h: pad.0 as usize,
                    pad_w: pad.1 as usize,
                };
                g.validate().ok()?;
                Geometry::Pool(g)
            }
            LayerKind::GlobalAvgPool => Geometry::GlobalPool(GlobalPoolGeom {
                batch: 1,
                channels: c,
                spatial: h * w,
            }),
            LayerKind::Activation | LayerKind::Add | LayerKind::Flatten => {
                Geometry::Elementwise(numel)
            }
        };
        Some(geometry)
    }

    /// The model tensor whose activation tracker quantizes model tensor `t`.
    pub fn range_owner(&self, t: usize) -> usize {
        self.model_tensor(t)
            .map_or(0, |record| record.range_owner as usize)
    }

    /// The model tensor whose activation buffer holds model tensor `t` (a flatten output is
    /// its input's buffer).
    fn buffer_of(&self, mut t: usize) -> usize {
        while t > 0
            && self
                .layer(t - 1)
                .is_some_and(|l| l.kind == LayerKind::Flatten)
        {
            t -= 1;
        }
        t
    }

    fn validate(&self) -> Result<(), PlanError> {
        let h = &self.header;
        let layers = self.layer_count();
        let bad_header = Err(PlanError::BadHeader);
        if h.batch == 0
            || layers == 0
            || h.step_count == 0
            || layers + 1 >= LOSS_QUANT as usize
            || h.tensor_count >= LOSS_QUANT
        {
            return bad_header;
        }
        let steps_end = self.steps_at() + self.step_count() * STEP_BYTES;
        let blob_start = h.blob_offset as usize;
        let blob_end = blob_start.checked_add(h.blob_bytes as usize);
        if !blob_start.is_multiple_of(4)
            || blob_start < steps_end
            || blob_end != Some(self.bytes.len())
        {
            return bad_header;
        }
        if (h.state_bytes as usize) < state_bytes_at_least(h.precision, layers + 1)
            || self
                .state_offset()
                .checked_add(h.state_bytes as usize)
                .is_none()
        {
            return bad_header;
        }
        for t in 0..=layers {
            self.validate_model_tensor(t)
                .ok_or(PlanError::BadModelTensor(t as u16))?;
        }
        for i in 0..layers {
            self.validate_layer(i)
                .ok_or(PlanError::BadLayer(i as u16))?;
        }
        let logits = self.model_tensor(layers).ok_or(PlanError::BadHeader)?;
        let lowest = (0..layers).find(|&i| self.layer(i).is_some_and(|l| l.trains()));
        if h.classes == 0
            || logits.shape != [h.classes, 1, 1]
            || lowest != Some(h.lowest_layer as usize)
        {
            return bad_header;
        }
        // Float32 plans run plain SGD: no partial updates, a momentum in [0, 1) (and int8
        // plans none).
        let momentum_ok = match h.precision {
            Precision::Int8 => h.config.momentum == 0.0,
            Precision::Float32 => (0.0..1.0).contains(&h.config.momentum),
        };
        if !momentum_ok || (h.precision == Precision::Float32 && h.config.partial.is_some()) {
            return bad_header;
        }
        if let Some(partial) = h.config.partial {
            let widest = (0..layers)
                .filter_map(|i| self.layer(i))
                .map(|l| l.out_channels as usize)
                .max()
                .unwrap_or(0);
            let scores_end = (h.scores_offset as usize).checked_add(widest * 4);
            let fractions_ok = partial.lambda_min > 0.0
                && partial.lambda_min <= partial.lambda_max
                && partial.lambda_max <= 1.0;
            if !fractions_ok
                || !(h.scores_offset as usize).is_multiple_of(4)
                || (h.scores_offset as usize) < tensor_state_end(layers + 1)
                || scores_end.is_none_or(|end| end > h.state_bytes as usize)
            {
                return bad_header;
            }
        }
        self.validate_state_layout().map_err(PlanError::BadLayer)?;
        for id in 0..h.tensor_count {
            self.validate_tensor(id).ok_or(PlanError::BadTensor(id))?;
        }
        self.validate_liveness().map_err(PlanError::BadTensor)?;
        for s in 0..self.step_count() {
            self.validate_step(s).ok_or(PlanError::BadStep(s as u16))?;
        }
        Ok(())
    }

    fn validate_model_tensor(&self, t: usize) -> Option<()> {
        let record = self.model_tensor(t)?;
        let numel = record.numel()?;
        let owner = if t > 0 && self.layer(t - 1)?.kind.preserves_codes() {
            self.model_tensor(t - 1)?.range_owner as usize
        } else {
            t
        };
        (numel > 0 && numel <= u32::MAX as usize && record.range_owner as usize == owner)
            .then_some(())
    }

    fn validate_layer(&self, i: usize) -> Option<()> {
        let layer = self.layer(i)?;
        let geometry = self.geometry(i)?;
        let input = self.model_tensor(i)?.shape.map(usize::from);
        let output = self.model_tensor(i + 1)?.shape.map(usize::from);
        let expected = match geometry {
            Geometry::Conv(g) => [g.out_channels, g.out_h(), g.out_w()],
            Geometry::Linear(g) => [g.out_features, 1, 1],
            Geometry::Pool(g) => [g.channels, g.out_h(), g.out_w()],
            Geometry::GlobalPool(g) => [g.channels, 1, 1],
            Geometry::Elementwise(n) if layer.kind == LayerKind::Flatten => [n, 1, 1],
            Geometry::Elementwise(_) => input,
        };
        let skip_ok = match layer.kind {
            LayerKind::Add => {
                let skip = layer.skip_from as usize;
                skip < i && self.model_tensor(skip + 1)?.shape.map(usize::from) == input
            }
            _ => layer.skip_from == NONE,
        };
        let activation_ok = matches!(
            layer.kind,
            LayerKind::Conv2d | LayerKind::Linear | LayerKind::Activation
        ) || layer.activation == crate::ops::activation::Activation::None;
        let int8 = self.header.precision == Precision::Int8;
        if expected != output || !skip_ok || !activation_ok {
            return None;
        }
        if int8 && !geometry.within_kernel_limits() {
            return None;
        }
        let Some((out_channels, _)) = geometry.params() else {
            let no_params = layer.weight_tensor == NONE
                && layer.bias_tensor == NONE
                && !layer.trains()
                && layer.state_offset == NO_OFFSET;
            return no_params.then_some(());
        };
        let weight = self.tensor(layer.weight_tensor)?;
        let bias = self.tensor(layer.bias_tensor)?;
        let positive = |s: f32| s.is_finite() && s > 0.0;
        // The quantization fields mean nothing in a float32 plan (and are not read there).
        let quantization_ok = !int8
            || (positive(layer.bias_scale)
                && positive(layer.weight_q.scale)
                && (-128..=127).contains(&layer.weight_q.zero_point));
        let params_ok = (weight.role, weight.index as usize) == (TensorRole::Weight, i)
            && (bias.role, bias.index as usize) == (TensorRole::Bias, i)
            && layer.weight_channels as usize <= out_channels
            && quantization_ok;
        // Float32 layers keep no state outside their planned tensors.
        let state_ok = if layer.trains() && int8 {
            let start = layer.state_offset as usize;
            let partial = self.header.config.partial.is_some();
            start.is_multiple_of(4)
                && start >= tensor_state_end(self.layer_count() + 1)
                && start
                    .checked_add(layer_state_bytes(out_channels, partial))
                    .is_some_and(|end| end <= self.header.state_bytes as usize)
        } else {
            layer.state_offset == NO_OFFSET
        };
        (params_ok && state_ok).then_some(())
    }

    /// Expected bytes of a tensor with `role` and `index` (`None`: the index does not fit the
    /// role; `Some(None)`: any size).
    /// In `u64`, since a gradient's size need not fit a 32-bit `usize`.
    fn role_bytes(&self, role: TensorRole, index: usize) -> Option<Option<u64>> {
        if role == TensorRole::Scratch {
            return (index < self.step_count()).then_some(None);
        }
        if matches!(
            role,
            TensorRole::Activation | TensorRole::Error | TensorRole::ErrorPart
        ) {
            return Some(Some(self.tensor_bytes(index)?));
        }
        let layer = self.layer(index)?;
        let (channels, structure) = self.geometry(index)?.params()?;
        let (channels, structure) = (channels as u64, structure as u64);
        let trained = layer.weight_channels as u64;
        let element = self.element_bytes() as u64;
        let int8 = self.header.precision == Precision::Int8;
        let velocity = self.has_velocity();
        let bytes = match role {
            TensorRole::Weight => channels * structure * element,
            TensorRole::Bias => channels * 4,
            TensorRole::WeightGrad if trained > 0 => trained * structure * 4,
            TensorRole::BiasGrad if layer.trains_bias => channels * 4,
            TensorRole::OptimizerState if trained > 0 && int8 => {
                trained * core::mem::size_of::<GradStats>() as u64
            }
            TensorRole::OptimizerState if trained > 0 && velocity => trained * structure * 4,
            TensorRole::BiasOptimizerState if layer.trains_bias && velocity => channels * 4,
            _ => return None,
        };
        Some(Some(bytes))
    }

    fn validate_tensor(&self, id: u16) -> Option<()> {
        let tensor = self.tensor(id)?;
        let index = tensor.index as usize;
        if let Some(bytes) = self.role_bytes(tensor.role, index)? {
            if tensor.bytes as u64 != bytes {
                return None;
            }
        }
        let (in_flash, in_arena) = match tensor.role {
            TensorRole::Weight => (true, self.layer(index)?.weight_channels > 0),
            TensorRole::Bias => (true, self.layer(index)?.trains_bias),
            _ => (false, true),
        };
        let layer_ids_ok = match tensor.role {
            TensorRole::Weight => self.layer(index)?.weight_tensor == id,
            TensorRole::Bias => self.layer(index)?.bias_tensor == id,
            _ => true,
        };
        let flash_ok = match tensor.flash_offset {
            Some(offset) => {
                in_flash
                    && offset.is_multiple_of(4)
                    && self.flash(&tensor, tensor.bytes as usize).is_some()
            }
            None => !in_flash,
        };
        let arena_ok = match tensor.arena_offset {
            Some(offset) => {
                in_arena
                    && offset.is_multiple_of(4)
                    && (offset as usize)
                        .checked_add(tensor.bytes as usize)
                        .is_some_and(|end| end <= self.header.arena_bytes as usize)
            }
            None => !in_arena,
        };
        let quant_ok = match self.header.precision {
            Precision::Int8 => {
                !tensor.role.is_error()
                    || tensor.quant == LOSS_QUANT
                    || (tensor.quant as usize) <= self.layer_count()
            }
            Precision::Float32 => tensor.quant == NONE,
        };
        let last_step = self.step_count() as u16 - 1;
        let kept = match tensor.role {
            TensorRole::Weight
            | TensorRole::Bias
            | TensorRole::OptimizerState
            | TensorRole::BiasOptimizerState => true,
            TensorRole::WeightGrad | TensorRole::BiasGrad => self.header.batch > 1,
            _ => false,
        };
        let lifetime_ok = match (tensor.arena_offset, tensor.lifetime) {
            (Some(_), Some((first, last))) => {
                first <= last && last <= last_step && (!kept || (first, last) == (0, last_step))
            }
            (None, None) => true,
            _ => false,
        };
        (layer_ids_ok && flash_ok && arena_ok && quant_ok && lifetime_ok).then_some(())
    }

    /// The training state of each trained layer overlaps neither another layer's nor the
    /// partial-update score scratch (`Err(i)`: the later layer of such a pair).
    fn validate_state_layout(&self) -> Result<(), u16> {
        let partial = self.header.config.partial.is_some();
        let state_of = |i: u16| {
            let int8 = self.header.precision == Precision::Int8;
            let layer = self.layer(i as usize).filter(|l| l.trains() && int8)?;
            let start = layer.state_offset as usize;
            Some((
                start,
                start + layer_state_bytes(layer.out_channels as usize, partial),
            ))
        };
        let widest = (0..self.layer_count())
            .filter_map(|i| self.layer(i))
            .map(|l| l.out_channels as usize)
            .max()
            .unwrap_or(0);
        let scores_start = self.header.scores_offset as usize;
        let scores = partial.then_some((scores_start, scores_start + widest * 4));
        let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        for i in 0..self.header.layer_count {
            let Some(region) = state_of(i) else {
                continue;
            };
            let clashes = (0..i).filter_map(state_of).chain(scores);
            if clashes.into_iter().any(|other| overlap(region, other)) {
                return Err(i);
            }
        }
        Ok(())
    }

    /// No two arena tensors live at a common step share a byte (`Err(id)`: the later tensor of
    /// such a pair).
    fn validate_liveness(&self) -> Result<(), u16> {
        let span = |t: &TensorRecord| {
            let start = t.arena_offset? as u64;
            Some((start, start + t.bytes as u64, t.lifetime?))
        };
        for a in 0..self.header.tensor_count {
            let Some((a_start, a_end, (a_first, a_last))) = self.tensor(a).as_ref().and_then(span)
            else {
                continue;
            };
            for b in a + 1..self.header.tensor_count {
                let Some((b_start, b_end, (b_first, b_last))) =
                    self.tensor(b).as_ref().and_then(span)
                else {
                    continue;
                };
                let same_time = a_first <= b_last && b_first <= a_last;
                let same_bytes = a_start < b_end && b_start < a_end;
                if same_time && same_bytes {
                    return Err(b);
                }
            }
        }
        Ok(())
    }

    /// The operands step `step` must have, by position (`None`: invalid operation/layer).
    fn expected_operands(
        &self,
        step: &StepRecord,
    ) -> Option<([Operand; MAX_READS], [Operand; MAX_WRITES])> {
        use Operand::{Absent, Activation as Act, Error, ErrorOf, Exactly};
        let layers = self.layer_count();
        let i = step.layer as usize;
        let without_layer = matches!(step.op, StepOp::LoadInput | StepOp::Loss);
        if without_layer != (step.layer == NONE) {
            return None;
        }
        if step.op == StepOp::LoadInput {
            return Some(([Absent; 3], [Exactly(TensorRole::Activation, 0), Absent]));
        }
        if step.op == StepOp::Loss {
            return Some((
                [Act(layers), Absent, Absent],
                [Exactly(TensorRole::Error, layers), Absent],
            ));
        }
        let layer = self.layer(i)?;
        let weight = Exactly(TensorRole::Weight, i);
        let weight_grad = Exactly(TensorRole::WeightGrad, i);
        let bias_grad = Exactly(TensorRole::BiasGrad, i);
        // The weight update's state: gradient statistics (int8) or the velocity (float32 with
        // momentum); the bias update keeps state only as a float32 velocity.
        let (state, bias_state) = match self.header.precision {
            Precision::Int8 => (Exactly(TensorRole::OptimizerState, i), Absent),
            Precision::Float32 if self.has_velocity() => (
                Exactly(TensorRole::OptimizerState, i),
                Exactly(TensorRole::BiasOptimizerState, i),
            ),
            Precision::Float32 => (Absent, Absent),
        };
        // Float32 masks only where an activation clamps (int8 also masks 8-bit saturation).
        let masks = self.header.precision == Precision::Int8
            || layer.activation != crate::ops::activation::Activation::None;
        let bias = Exactly(TensorRole::Bias, i);
        let output = Exactly(TensorRole::Activation, i + 1);
        let params = layer.kind.has_params();
        let trains_weight = layer.weight_channels > 0;
        let operands = match (step.op, layer.kind) {
            (StepOp::Forward, LayerKind::Flatten) => return None,
            (StepOp::Forward, LayerKind::Add) => (
                [Act(i), Act(layer.skip_from as usize + 1), Absent],
                [output, Absent],
            ),
            (StepOp::Forward, _) if params => ([Act(i), weight, bias], [output, Absent]),
            (StepOp::Forward, _) => ([Act(i), Absent, Absent], [output, Absent]),
            // In place, or into a copy of the error's size.
            (
                StepOp::ActivationMask,
                LayerKind::Conv2d | LayerKind::Linear | LayerKind::Activation,
            ) if masks => ([Act(i + 1), Error(i + 1), Absent], [Error(i + 1), Absent]),
            (StepOp::InputError, _) if params => {
                ([weight, Error(i + 1), Absent], [ErrorOf(i), Absent])
            }
            (StepOp::InputError, LayerKind::AvgPool | LayerKind::GlobalAvgPool) => {
                ([Error(i + 1), Absent, Absent], [ErrorOf(i), Absent])
            }
            (StepOp::InputError, LayerKind::MaxPool) => {
                ([Act(i), Error(i + 1), Absent], [ErrorOf(i), Absent])
            }
            (StepOp::AccumulateError, _) => {
                let sum = self.tensor(step.writes[0])?;
                let t = sum.index as usize;
                (
                    [Error(t), Error(t), Absent],
                    [Exactly(TensorRole::Error, t), Absent],
                )
            }
            (StepOp::WeightGrad, _) if trains_weight => {
                ([Act(i), Error(i + 1), Absent], [weight_grad, Absent])
            }
            (StepOp::BiasGrad, _) if layer.trains_bias => {
                ([Error(i + 1), Absent, Absent], [bias_grad, Absent])
            }
            (StepOp::WeightUpdate, _) if trains_weight => {
                ([weight_grad, weight, state], [weight, state])
            }
            (StepOp::BiasUpdate, _) if layer.trains_bias => {
                ([bias_grad, bias, bias_state], [bias, bias_state])
            }
            _ => return None,
        };
        Some(operands)
    }

    fn operand_ok(&self, expected: Operand, id: u16) -> Option<()> {
        if let Operand::Absent = expected {
            return (id == NONE).then_some(());
        }
        let tensor = self.tensor(id)?;
        let index = tensor.index as usize;
        let ok = match expected {
            Operand::Absent => false,
            Operand::Activation(t) => {
                tensor.role == TensorRole::Activation && index == self.buffer_of(t)
            }
            Operand::Error(t) => {
                tensor.role.is_error() && Some(tensor.bytes as u64) == self.tensor_bytes(t)
            }
            Operand::ErrorOf(t) => tensor.role.is_error() && index == t,
            Operand::Exactly(role, t) => tensor.role == role && index == t,
        };
        ok.then_some(())
    }

    fn validate_step(&self, s: usize) -> Option<()> {
        let step = self.step(s)?;
        let (reads, writes) = self.expected_operands(&step)?;
        for (expected, id) in reads.iter().zip(step.reads) {
            self.operand_ok(*expected, id)?;
        }
        for (expected, id) in writes.iter().zip(step.writes) {
            self.operand_ok(*expected, id)?;
            if id != NONE {
                self.tensor(id)?.arena_offset?;
            }
        }
        if step.scratch != NONE {
            let scratch = self.tensor(step.scratch)?;
            if (scratch.role, scratch.index as usize) != (TensorRole::Scratch, s) {
                return None;
            }
        }
        // Every arena operand is live at this step.
        for id in step.touched() {
            let tensor = self.tensor(id)?;
            if tensor.arena_offset.is_some() {
                let (first, last) = tensor.lifetime?;
                if !(first as usize <= s && s <= last as usize) {
                    return None;
                }
            }
        }
        Some(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::activation::Activation;
    use crate::quant::RangeEma;

    /// Bytes at a 4-byte aligned address.
    #[repr(align(4))]
    pub(crate) struct Aligned<const N: usize>(pub [u8; N]);

    /// A plan file written record by record: a 2-input, 2-class linear layer (identity weights
    /// `1/64 * 64`, frozen in flash) whose bias trains; input range `[-2, 127/64]` (`s = 1/64`,
    /// `z = 0`), logits range `[-4, 127/32]` (`s = 1/32`, `z = 0`), learning rate 0.1. Arena:
    /// input and logits error at 0, logits at 4, bias at 8, bias gradient at 16 (24 bytes),
    /// then the training state.
    pub(crate) fn tiny_plan() -> (Aligned<512>, usize) {
        let tensors = [
            // (role, index, quant, bytes, arena, flash, lifetime)
            (
                TensorRole::Activation,
                0,
                NONE,
                2,
                Some(0),
                None,
                Some((0, 1)),
            ),
            (
                TensorRole::Activation,
                1,
                NONE,
                2,
                Some(4),
                None,
                Some((1, 3)),
            ),
            (TensorRole::Weight, 0, NONE, 4, None, Some(0), None),
            (TensorRole::Bias, 0, NONE, 8, Some(8), Some(4), Some((0, 5))),
            (
                TensorRole::Error,
                1,
                LOSS_QUANT,
                2,
                Some(0),
                None,
                Some((2, 4)),
            ),
            (
                TensorRole::BiasGrad,
                0,
                NONE,
                8,
                Some(16),
                None,
                Some((4, 5)),
            ),
        ];
        let steps = [
            (StepOp::LoadInput, NONE, [NONE; 3], 0),
            (StepOp::Forward, 0, [0, 2, 3], 1),
            (StepOp::Loss, NONE, [1, NONE, NONE], 4),
            (StepOp::ActivationMask, 0, [1, 4, NONE], 4),
            (StepOp::BiasGrad, 0, [4, NONE, NONE], 5),
            (StepOp::BiasUpdate, 0, [5, 3, NONE], 3),
        ];
        let blob_offset = HEADER_BYTES
            + LAYER_BYTES
            + 2 * MODEL_TENSOR_BYTES
            + tensors.len() * TENSOR_BYTES
            + steps.len() * STEP_BYTES;
        let blob: [u8; 12] = [64, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0];
        let input_range = RangeEma::from_range(-2.0, 127.0 / 64.0);
        let input_q = input_range.qparams();
        let weight_q = QParams {
            scale: 1.0 / 64.0,
            zero_point: 0,
        };
        let header = Header {
            version: VERSION,
            file_bytes: 0,
            crc: 0,
            precision: Precision::Int8,
            batch: 1,
            reorder: true,
            layer_count: 1,
            tensor_count: tensors.len() as u16,
            step_count: steps.len() as u16,
            classes: 2,
            lowest_layer: 0,
            arena_bytes: 24,
            lower_bound_bytes: 24,
            state_bytes: (tensor_state_end(2) + layer_state_bytes(2, false)) as u32,
            scores_offset: NO_OFFSET,
            blob_offset: blob_offset as u32,
            blob_bytes: blob.len() as u32,
            config: TrainConfig {
                lr: 0.1,
                activation_rate: 0.1,
                error_rate: 0.1,
                weight_rate: 0.001,
                stats_rate: 0.8,
                eps: 1e-12,
                partial: None,
                momentum: 0.0,
            },
        };
        let layer = LayerRecord {
            kind: LayerKind::Linear,
            activation: Activation::None,
            trains_bias: true,
            out_channels: 2,
            kernel: (0, 0),
            stride: (0, 0),
            padding: (0, 0),
            groups: 0,
            skip_from: NONE,
            weight_channels: 0,
            weight_tensor: 2,
            bias_tensor: 3,
            state_offset: tensor_state_end(2) as u32,
            bias_scale: input_q.scale * weight_q.scale,
            weight_q,
            weight_range: RangeEma::from_range(-1.0, 1.0),
        };
        let model_tensor = |owner, activation, error| ModelTensorRecord {
            shape: [2, 1, 1],
            range_owner: owner,
            activation,
            error,
        };
        let mut out = Aligned([0u8; 512]);
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out.0[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&header.encode());
        put(&layer.encode());
        put(&model_tensor(0, input_range, RangeEma::new()).encode());
        let logits_ranges = (
            RangeEma::from_range(-4.0, 127.0 / 32.0),
            RangeEma::from_range(-1.0, 1.0),
        );
        put(&model_tensor(1, logits_ranges.0, logits_ranges.1).encode());
        for (role, index, quant, bytes, arena, flash, lifetime) in tensors {
            let flash = flash.map(|f: usize| (blob_offset + f) as u32);
            let record = TensorRecord {
                role,
                index,
                quant,
                bytes,
                arena_offset: arena,
                flash_offset: flash,
                lifetime,
            };
            put(&record.encode());
        }
        for (op, layer, reads, write) in steps {
            let record = StepRecord {
                op,
                layer,
                reads,
                writes: [write, NONE],
                scratch: NONE,
            };
            put(&record.encode());
        }
        put(&blob);
        let len = at;
        seal(&mut out.0[..len]).expect("a whole file");
        (out, len)
    }

    /// Re-seal after an edit so that validation, not the checksum, sees it.
    fn edited(edit: impl FnOnce(&mut [u8])) -> Result<(), PlanError> {
        let (mut file, len) = tiny_plan();
        edit(&mut file.0[..len]);
        seal(&mut file.0[..len]);
        PlanView::parse(&file.0[..len]).map(|_| ())
    }

    #[test]
    fn a_hand_written_plan_parses_and_reads_in_place() {
        let (file, len) = tiny_plan();
        let view = PlanView::parse(&file.0[..len]).expect("valid");
        assert_eq!(view.layer_count(), 1);
        assert_eq!(view.input_len(), 2);
        assert_eq!(view.state_offset(), 24);
        assert_eq!(view.arena_required(), 24 + 8 + 2 * 40 + 32);
        assert_eq!(view.layer(0).unwrap().kind, LayerKind::Linear);
        let weight = view.tensor(2).unwrap();
        assert_eq!(view.flash(&weight, 4), Some(&[64u8, 0, 0, 64][..]));
        assert_eq!(
            view.geometry(0),
            Some(Geometry::Linear(LinearGeom {
                batch: 1,
                in_features: 2,
                out_features: 2
            }))
        );
        assert!(view.step(6).is_none() && view.tensor(6).is_none() && view.layer(1).is_none());
    }

    #[test]
    fn damaged_files_are_refused_with_their_reason() {
        let (file, len) = tiny_plan();
        let bytes = &file.0[..len];
        assert_eq!(
            PlanView::parse(&bytes[..50]).err(),
            Some(PlanError::Truncated)
        );
        assert_eq!(
            PlanView::parse(&bytes[..len - 1]).err(),
            Some(PlanError::Truncated)
        );
        let mut flipped = Aligned([0u8; 512]);
        flipped.0[..len].copy_from_slice(bytes);
        flipped.0[200] ^= 4;
        assert_eq!(
            PlanView::parse(&flipped.0[..len]).err(),
            Some(PlanError::Checksum)
        );
        assert_eq!(edited(|f| f[0] = b'X'), Err(PlanError::BadMagic));
        // The logits error placed over the live logits.
        let error_offset = HEADER_BYTES + LAYER_BYTES + 2 * MODEL_TENSOR_BYTES + 4 * TENSOR_BYTES;
        assert_eq!(
            edited(|f| f[error_offset + 12] = 4),
            Err(PlanError::BadTensor(4))
        );
        // A layer that outputs 3 classes into a 2-element tensor.
        assert_eq!(
            edited(|f| f[HEADER_BYTES + 4] = 3),
            Err(PlanError::BadLayer(0))
        );
        // The forward reading the bias gradient as its bias.
        let forward =
            HEADER_BYTES + LAYER_BYTES + 2 * MODEL_TENSOR_BYTES + 6 * TENSOR_BYTES + STEP_BYTES;
        assert_eq!(edited(|f| f[forward + 8] = 5), Err(PlanError::BadStep(1)));
        // The bias gradient declared live only after its first use.
        let grad = HEADER_BYTES + LAYER_BYTES + 2 * MODEL_TENSOR_BYTES + 5 * TENSOR_BYTES;
        assert_eq!(edited(|f| f[grad + 20] = 5), Err(PlanError::BadStep(4)));
        let mut shifted = Aligned([0u8; 512]);
        shifted.0[1..=len].copy_from_slice(bytes);
        assert_eq!(
            PlanView::parse(&shifted.0[1..=len]).err(),
            Some(PlanError::Misaligned)
        );
    }

    #[test]
    fn seal_writes_size_and_checksum() {
        let mut short = [0u8; 10];
        assert_eq!(seal(&mut short), None);
        let (file, len) = tiny_plan();
        let header = Header::decode(&file.0[..len]).unwrap();
        assert_eq!(header.file_bytes as usize, len);
        assert_eq!(header.crc, crc32(&file.0[CHECKSUM_START..len]));
    }
}
