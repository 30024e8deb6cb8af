//! The fixed-size records of a plan file and their little-endian encoding.
//!
//! Each record type is written once here, as a struct with `encode` (host writer) and
//! `decode` (device reader), so the two sides share one description of the layout. Field
//! offsets follow the order of the `encode`/`decode` bodies; every record size is a multiple
//! of 4 bytes so that sections stay 4-byte aligned. Enumerations are stored as `u8` codes,
//! absent indices as [`NONE`], absent offsets as [`NO_OFFSET`].

use super::PlanError;
use crate::codec::{Reader, Writer};
use crate::layer::{LayerKind, KINDS, MAX_FIELDS};
use crate::ops::activation::Activation;
use crate::quant::{ErrorRanges, QParams, RangeEma};

/// File signature, the first four bytes.
pub const MAGIC: [u8; 4] = *b"MCTP";
/// Format version this crate reads and writes.
pub const VERSION: u16 = 2;
/// An absent layer, tensor or step index.
pub const NONE: u16 = u16::MAX;
/// An absent byte offset.
pub const NO_OFFSET: u32 = u32::MAX;
/// [`TensorRecord::quant`] of the logits error: quantized with the sample's own loss range.
pub const LOSS_QUANT: u16 = u16::MAX - 1;

/// Bytes of the [`Header`].
pub const HEADER_BYTES: usize = 96;
/// Bytes of a [`LayerRecord`].
pub const LAYER_BYTES: usize = 60;
/// Bytes of a [`ModelTensorRecord`].
pub const MODEL_TENSOR_BYTES: usize = 32;
/// Bytes of a [`TensorRecord`].
pub const TENSOR_BYTES: usize = 24;
/// Bytes of a [`StepRecord`].
pub const STEP_BYTES: usize = 16;
/// The header bytes before the checksummed part: magic, version, header size, file size, CRC.
pub const CHECKSUM_START: usize = 16;

/// A range tracker: `f32` min, `f32` max, `u32` initialized.
fn read_ema(r: &mut Reader) -> Option<RangeEma> {
    Some(RangeEma {
        min: r.f32()?,
        max: r.f32()?,
        initialized: r.u32()? != 0,
    })
}

fn write_ema(w: &mut Writer, value: &RangeEma) {
    w.f32(value.min);
    w.f32(value.max);
    w.u32(value.initialized as u32);
}

/// The bytes of a record of `N` bytes written by `write` (every record fits its size).
fn record<const N: usize>(write: impl FnOnce(&mut Writer)) -> [u8; N] {
    let mut out = [0u8; N];
    let mut w = Writer::new(&mut out);
    write(&mut w);
    debug_assert_eq!(w.finish(), Some(N));
    out
}

/// Dynamic partial gradient updates (Deutel et al., IEEE TCAD 2024): per layer and sample only
/// the `k = max(floor((lambda_min + |e / e_max| (lambda_max - lambda_min)) N), 1)` output
/// channels with the largest mean absolute error are back-propagated and updated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialUpdate {
    /// Smallest fraction of structures updated, in `(0, 1]`.
    pub lambda_min: f32,
    /// Largest fraction, in `[lambda_min, 1]`.
    pub lambda_max: f32,
}

/// Numeric form of a plan: what its activations, errors and parameters hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Fully quantized training: `i8` activations, errors and weights, `i32` biases, `f32`
    /// gradients.
    Int8,
    /// float32 SGD: `f32` activations, errors, weights, biases, gradients and velocities.
    Float32,
}

impl Precision {
    const ALL: [Precision; 2] = [Precision::Int8, Precision::Float32];

    /// Bytes of one activation, error or weight element (`i8` or `f32`).
    pub fn element_bytes(self) -> usize {
        match self {
            Precision::Int8 => 1,
            Precision::Float32 => 4,
        }
    }

    /// Bytes of one bias element (`i32` or `f32`) and of one gradient or velocity element
    /// (always `f32`).
    pub const WORD_BYTES: usize = 4;

    /// "int8" or "float32".
    pub fn name(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::Float32 => "float32",
        }
    }
}

/// Hyper-parameters of training, stored in the plan so that the device needs nothing else.
/// A float32 plan uses `lr` and `momentum` only (the other rates are 0, `partial` is `None`
/// and `error_ranges` is [`ErrorRanges::Tracked`], since no error is quantized); an int8 plan
/// everything but `momentum`, which is 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// Learning rate of the weight and bias updates (the standardized FQT update, or SGD).
    pub lr: f32,
    /// Moving-average rate of activation ranges.
    pub activation_rate: f32,
    /// Moving-average rate of error ranges.
    pub error_rate: f32,
    /// Moving-average rate of weight ranges.
    pub weight_rate: f32,
    /// Moving-average rate of the per-structure gradient mean and variance.
    pub stats_rate: f32,
    /// Added to the gradient variance before the square root.
    pub eps: f32,
    /// Dynamic partial updates, or `None` to update every structure.
    pub partial: Option<PartialUpdate>,
    /// SGD momentum of a float32 plan, in `[0, 1)`: `v = momentum * v + g / batch`,
    /// `p -= lr * v` ([`crate::update::sgd`]); 0 keeps no velocity.
    pub momentum: f32,
    /// How error tensors are quantized (int8).
    pub error_ranges: ErrorRanges,
}

/// The first record: what the plan holds and where its sections are.
///
/// Layout (96 bytes): magic `MCTP`, version `u16`, header size `u16`, file size `u32`, CRC-32
/// of the bytes from offset 16 to the end of the file `u32`; precision `u8` (0: int8, 1:
/// float32), flags `u8` (bit 0 reordered, bit 1 partial updates, bit 2 exact error ranges),
/// batch `u16`; layer, tensor,
/// step counts, classes and the lowest trained layer (`u16` each, one spare); arena,
/// lower-bound, state bytes, score-scratch offset, blob offset and blob size (`u32` each); the
/// eight `f32` of [`TrainConfig`] (lambdas 0 without partial updates); `f32` momentum; 4 spare
/// bytes.
///
/// Sections follow the header in this order, each record size a multiple of 4: `layer_count`
/// [`LayerRecord`]s, `layer_count + 1` [`ModelTensorRecord`]s, `tensor_count`
/// [`TensorRecord`]s, `step_count` [`StepRecord`]s; the parameter blob starts at
/// `blob_offset`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// File size in bytes (the CRC covers `CHECKSUM_START..file_bytes`).
    pub file_bytes: u32,
    /// CRC-32 of the checksummed part.
    pub crc: u32,
    /// Numeric form of tensors and parameters.
    pub precision: Precision,
    /// Samples per update.
    pub batch: u16,
    /// Each update runs right after its gradient (operator reordering).
    pub reorder: bool,
    /// Layers of the model.
    pub layer_count: u16,
    /// Plan tensors.
    pub tensor_count: u16,
    /// Steps of one sample.
    pub step_count: u16,
    /// Classes of the classifier.
    pub classes: u16,
    /// The lowest layer that trains anything.
    pub lowest_layer: u16,
    /// Bytes of the planned arena (the plan's peak).
    pub arena_bytes: u32,
    /// Largest sum of bytes live at one step.
    pub lower_bound_bytes: u32,
    /// Bytes of the training-state region that follows the planned arena.
    pub state_bytes: u32,
    /// Offset of the partial-update score scratch in the state region ([`NO_OFFSET`] without
    /// partial updates).
    pub scores_offset: u32,
    /// File offset of the parameter blob (a multiple of 4).
    pub blob_offset: u32,
    /// Bytes of the parameter blob.
    pub blob_bytes: u32,
    /// Training hyper-parameters.
    pub config: TrainConfig,
}

impl Header {
    /// The 96 header bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        record(|w| self.write(w))
    }

    fn write(&self, w: &mut Writer) {
        w.bytes(&MAGIC);
        w.u16(self.version);
        w.u16(HEADER_BYTES as u16);
        w.u32(self.file_bytes);
        w.u32(self.crc);
        w.u8(code_of(&Precision::ALL, self.precision));
        let exact = self.config.error_ranges == ErrorRanges::Exact;
        w.u8(self.reorder as u8 | (self.config.partial.is_some() as u8) << 1 | (exact as u8) << 2);
        w.u16(self.batch);
        for count in [
            self.layer_count,
            self.tensor_count,
            self.step_count,
            self.classes,
            self.lowest_layer,
            0,
        ] {
            w.u16(count);
        }
        for value in [
            self.arena_bytes,
            self.lower_bound_bytes,
            self.state_bytes,
            self.scores_offset,
            self.blob_offset,
            self.blob_bytes,
        ] {
            w.u32(value);
        }
        let c = &self.config;
        let (lambda_min, lambda_max) = c
            .partial
            .map_or((0.0, 0.0), |p| (p.lambda_min, p.lambda_max));
        for value in [
            c.lr,
            c.activation_rate,
            c.error_rate,
            c.weight_rate,
            c.stats_rate,
            c.eps,
            lambda_min,
            lambda_max,
            c.momentum,
        ] {
            w.f32(value);
        }
        w.zeros(4);
    }

    /// Decode and check the fixed fields (magic, version, header size, precision, flags).
    pub fn decode(bytes: &[u8]) -> Result<Header, PlanError> {
        let bytes = bytes.get(..HEADER_BYTES).ok_or(PlanError::Truncated)?;
        let mut r = Reader::new(bytes);
        if r.array::<4>() != Some(MAGIC) {
            return Err(PlanError::BadMagic);
        }
        let version = r.u16().ok_or(PlanError::Truncated)?;
        if version != VERSION {
            return Err(PlanError::UnsupportedVersion(version));
        }
        let raw = (|| {
            let header_bytes = r.u16()?;
            let (file_bytes, crc) = (r.u32()?, r.u32()?);
            let (precision, flags) = (r.u8()?, r.u8()?);
            // batch, layers, tensors, steps, classes, lowest trained layer, a spare
            let mut counts = [0u16; 7];
            for v in &mut counts {
                *v = r.u16()?;
            }
            // arena, lower bound, state, scores offset, blob offset, blob size
            let mut sizes = [0u32; 6];
            for v in &mut sizes {
                *v = r.u32()?;
            }
            // the learning rate and rates, eps, the lambdas, the momentum
            let mut config = [0f32; 9];
            for v in &mut config {
                *v = r.f32()?;
            }
            Some((
                header_bytes,
                file_bytes,
                crc,
                precision,
                flags,
                counts,
                sizes,
                config,
            ))
        })();
        let (header_bytes, file_bytes, crc, precision, flags, counts, sizes, config) =
            raw.ok_or(PlanError::Truncated)?;
        if header_bytes as usize != HEADER_BYTES {
            return Err(PlanError::BadHeader);
        }
        let precision = *Precision::ALL
            .get(precision as usize)
            .ok_or(PlanError::Unsupported)?;
        if flags & !7 != 0 {
            return Err(PlanError::BadHeader);
        }
        let [batch, layer_count, tensor_count, step_count, classes, lowest_layer, _] = counts;
        let [arena_bytes, lower_bound_bytes, state_bytes, scores_offset, blob_offset, blob_bytes] =
            sizes;
        let [lr, activation_rate, error_rate, weight_rate, stats_rate, eps, lambda_min, lambda_max, momentum] =
            config;
        Ok(Header {
            version,
            file_bytes,
            crc,
            precision,
            batch,
            reorder: flags & 1 != 0,
            layer_count,
            tensor_count,
            step_count,
            classes,
            lowest_layer,
            arena_bytes,
            lower_bound_bytes,
            state_bytes,
            scores_offset,
            blob_offset,
            blob_bytes,
            config: TrainConfig {
                lr,
                activation_rate,
                error_rate,
                weight_rate,
                stats_rate,
                eps,
                partial: (flags & 2 != 0).then_some(PartialUpdate {
                    lambda_min,
                    lambda_max,
                }),
                momentum,
                error_ranges: if flags & 4 != 0 {
                    ErrorRanges::Exact
                } else {
                    ErrorRanges::Tracked
                },
            },
        })
    }
}

/// One layer: what it computes, what trains, and its parameters' quantization.
///
/// Layout (60 bytes): the kind's tag `u8` ([`crate::layer::KINDS`]), its activation `u8` (0
/// none, 1 ReLU, 2 ReLU6; 0 for kinds without one), flags `u8` (bit 0: the bias trains), a
/// spare byte; the kind's fields as `u16` ([`LayerKind::fields`], [`MAX_FIELDS`] slots, unused
/// ones 0); `u16` trained weight channels, weight tensor, bias tensor, a spare `u16`; `u32`
/// state offset; `f32` bias scale, weight scale, `i32` weight zero point; weight range tracker
/// (`f32` min, `f32` max, `u32` initialized). The input and output shapes are the model
/// tensor records `i` and `i + 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerRecord {
    /// What the layer computes.
    pub kind: LayerKind,
    /// The bias trains.
    pub trains_bias: bool,
    /// Output channels whose weights train (the first ones; 0: frozen weights).
    pub weight_channels: u16,
    /// Plan tensor of the weights ([`NONE`] without parameters).
    pub weight_tensor: u16,
    /// Plan tensor of the bias ([`NONE`] without parameters).
    pub bias_tensor: u16,
    /// Offset of the layer's training state in the state region ([`NO_OFFSET`] when nothing
    /// of the layer trains).
    pub state_offset: u32,
    /// Real value of one bias unit.
    pub bias_scale: f32,
    /// Weight quantization (per tensor): frozen, or the initial value of a trained layer.
    pub weight_q: QParams,
    /// Weight range tracker (initial value of a trained layer).
    pub weight_range: RangeEma,
}

impl LayerRecord {
    /// The 60 record bytes; `None` when a field of the kind does not fit a `u16`.
    pub fn encode(&self) -> Option<[u8; LAYER_BYTES]> {
        let fields = self.kind.fields();
        let mut narrow = [0u16; MAX_FIELDS];
        for (slot, &value) in narrow.iter_mut().zip(&fields.values) {
            *slot = u16::try_from(value).ok()?;
        }
        Some(record(|w| {
            w.u8(fields.tag);
            w.u8(fields.activation.map_or(0, |a| code_of(&ACTIVATIONS, a)));
            w.u8(self.trains_bias as u8);
            w.zeros(1);
            for value in narrow {
                w.u16(value);
            }
            for value in [
                self.weight_channels,
                self.weight_tensor,
                self.bias_tensor,
                0,
            ] {
                w.u16(value);
            }
            w.u32(self.state_offset);
            w.f32(self.bias_scale);
            w.f32(self.weight_q.scale);
            w.i32(self.weight_q.zero_point);
            write_ema(w, &self.weight_range);
        }))
    }

    /// Decode one record (`None` for unknown codes, flags, or fields the kind does not have).
    pub fn decode(bytes: &[u8]) -> Option<LayerRecord> {
        let mut r = Reader::new(bytes);
        let tag = r.u8()?;
        let spec = KINDS.get(tag as usize)?;
        let activation_code = r.u8()?;
        let flags = r.u8()?;
        if flags > 1 {
            return None;
        }
        r.skip(1)?;
        let mut fields = [0usize; MAX_FIELDS];
        for field in &mut fields {
            *field = r.u16()? as usize;
        }
        let activation = match spec.activation {
            true => Some(*ACTIVATIONS.get(activation_code as usize)?),
            false if activation_code == 0 => None,
            false => return None,
        };
        if fields[spec.fields..].iter().any(|&f| f != 0) {
            return None;
        }
        let kind = LayerKind::from_fields(tag, &fields[..spec.fields], activation)?;
        let (weight_channels, weight_tensor, bias_tensor) = (r.u16()?, r.u16()?, r.u16()?);
        r.skip(2)?;
        Some(LayerRecord {
            kind,
            trains_bias: flags == 1,
            weight_channels,
            weight_tensor,
            bias_tensor,
            state_offset: r.u32()?,
            bias_scale: r.f32()?,
            weight_q: QParams {
                scale: r.f32()?,
                zero_point: r.i32()?,
            },
            weight_range: read_ema(&mut r)?,
        })
    }

    /// True when any parameter of the layer trains.
    pub fn trains(&self) -> bool {
        self.weight_channels > 0 || self.trains_bias
    }
}

/// Activation codes in file order.
const ACTIVATIONS: [Activation; 3] = [Activation::None, Activation::Relu, Activation::Relu6];

/// Position of `value` in `table` (its file code).
fn code_of<T: PartialEq>(table: &[T], value: T) -> u8 {
    table.iter().position(|t| *t == value).unwrap_or(0) as u8
}

/// A model tensor (0: the input, `i + 1`: output of layer `i`): its per-sample shape and the
/// initial values of its activation and error range trackers.
///
/// Layout (32 bytes): `u16` channels, height, width, range owner; activation tracker and error
/// tracker (`f32` min, `f32` max, `u32` initialized each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelTensorRecord {
    /// `[channels, height, width]`.
    pub shape: [u16; 3],
    /// The tensor whose activation tracker quantizes this one (code-preserving layers share
    /// their input's).
    pub range_owner: u16,
    /// Initial activation range tracker.
    pub activation: RangeEma,
    /// Initial error range tracker (in units of the sample's loss gradient).
    pub error: RangeEma,
}

impl ModelTensorRecord {
    /// The 32 record bytes.
    pub fn encode(&self) -> [u8; MODEL_TENSOR_BYTES] {
        record(|w| {
            for value in self.shape {
                w.u16(value);
            }
            w.u16(self.range_owner);
            write_ema(w, &self.activation);
            write_ema(w, &self.error);
        })
    }

    /// Decode one record (`None` when `bytes` is shorter than a record).
    pub fn decode(bytes: &[u8]) -> Option<ModelTensorRecord> {
        let mut r = Reader::new(bytes);
        Some(ModelTensorRecord {
            shape: [r.u16()?, r.u16()?, r.u16()?],
            range_owner: r.u16()?,
            activation: read_ema(&mut r)?,
            error: read_ema(&mut r)?,
        })
    }

    /// Elements of one sample (`None` on overflow).
    pub fn numel(&self) -> Option<usize> {
        let [c, h, w] = self.shape.map(usize::from);
        c.checked_mul(h)?.checked_mul(w)
    }
}

/// What a plan tensor holds; `index` of its [`TensorRecord`] names the model tensor, layer or
/// step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Activation codes of model tensor `index`.
    Activation,
    /// Complete error of model tensor `index`.
    Error,
    /// One consumer's contribution to the error of model tensor `index`.
    ErrorPart,
    /// Weight codes of layer `index`.
    Weight,
    /// `i32` bias of layer `index`.
    Bias,
    /// `f32` weight gradient of the trained channels of layer `index`.
    WeightGrad,
    /// `f32` bias gradient of layer `index`.
    BiasGrad,
    /// State of the weight update of the trained channels of layer `index`: gradient
    /// statistics ([`crate::update::GradStats`]) in an int8 plan, the `f32` momentum velocity
    /// in a float32 plan.
    OptimizerState,
    /// Kernel scratch of step `index`.
    Scratch,
    /// `f32` momentum velocity of the bias of layer `index` (float32 plans with momentum; the
    /// weights' velocity is the layer's [`TensorRole::OptimizerState`]).
    BiasOptimizerState,
    /// Clamp mask of the activation of model tensor `index`: one bit per element
    /// ([`crate::ops::activation::clamp_mask_q`]), kept for the backward pass instead of the
    /// activation when only the activation mask reads it.
    ClampMask,
}

impl TensorRole {
    const ALL: [TensorRole; 11] = [
        TensorRole::Activation,
        TensorRole::Error,
        TensorRole::ErrorPart,
        TensorRole::Weight,
        TensorRole::Bias,
        TensorRole::WeightGrad,
        TensorRole::BiasGrad,
        TensorRole::OptimizerState,
        TensorRole::Scratch,
        TensorRole::BiasOptimizerState,
        TensorRole::ClampMask,
    ];

    /// True for error tensors (complete or partial).
    pub fn is_error(self) -> bool {
        matches!(self, TensorRole::Error | TensorRole::ErrorPart)
    }
}

/// One plan tensor: role, size, arena offset and lifetime, and/or flash contents.
///
/// Layout (24 bytes): role `u8`, 3 spare bytes; `u16` index, `u16` quantization source; `u32`
/// bytes, arena offset, flash offset; `u16` first and last live step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorRecord {
    /// What it holds.
    pub role: TensorRole,
    /// Model tensor, layer or step it belongs to (see [`TensorRole`]).
    pub index: u16,
    /// For error tensors: the model tensor whose error tracker (times the sample's error unit)
    /// quantizes it, or [`LOSS_QUANT`]; [`NONE`] for other roles.
    pub quant: u16,
    /// Exact size in bytes.
    pub bytes: u32,
    /// Offset in the arena (a multiple of 4), `None` for frozen parameters read from flash.
    pub arena_offset: Option<u32>,
    /// File offset of the contents in the parameter blob: frozen parameters, and the initial
    /// values of trained ones; `None` for other tensors.
    pub flash_offset: Option<u32>,
    /// Steps `(first, last)` during which an arena tensor keeps its bytes (every step for
    /// tensors kept across samples); `None` for flash tensors. No two arena tensors with
    /// overlapping lifetimes share a byte.
    pub lifetime: Option<(u16, u16)>,
}

impl TensorRecord {
    /// The 24 record bytes.
    pub fn encode(&self) -> [u8; TENSOR_BYTES] {
        record(|w| {
            w.u8(code_of(&TensorRole::ALL, self.role));
            w.zeros(3);
            w.u16(self.index);
            w.u16(self.quant);
            w.u32(self.bytes);
            w.u32(self.arena_offset.unwrap_or(NO_OFFSET));
            w.u32(self.flash_offset.unwrap_or(NO_OFFSET));
            let (first, last) = self.lifetime.unwrap_or((NONE, NONE));
            w.u16(first);
            w.u16(last);
        })
    }

    /// Decode one record (`None` for an unknown role).
    pub fn decode(bytes: &[u8]) -> Option<TensorRecord> {
        let mut r = Reader::new(bytes);
        let role = *TensorRole::ALL.get(r.u8()? as usize)?;
        r.skip(3)?;
        let offset = |v: u32| (v != NO_OFFSET).then_some(v);
        let (index, quant, bytes) = (r.u16()?, r.u16()?, r.u32()?);
        let (arena_offset, flash_offset) = (offset(r.u32()?), offset(r.u32()?));
        let (first, last) = (r.u16()?, r.u16()?);
        Some(TensorRecord {
            role,
            index,
            quant,
            bytes,
            arena_offset,
            flash_offset,
            lifetime: (first != NONE || last != NONE).then_some((first, last)),
        })
    }
}

/// The kernel call of a step (the compiler's step operations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOp {
    /// Copy the sample's codes into the input tensor.
    LoadInput,
    /// Forward of a layer.
    Forward,
    /// Softmax cross-entropy: logits to the output error.
    Loss,
    /// Zero the error where the layer's output sits at its clamp bounds.
    ActivationMask,
    /// Input error of a layer from its output error.
    InputError,
    /// Sum two contributions to one tensor's error.
    AccumulateError,
    /// Weight gradient of the trained channels (adds into the gradient).
    WeightGrad,
    /// Bias gradient (adds into the gradient).
    BiasGrad,
    /// Weight update (after the last sample of a batch).
    WeightUpdate,
    /// Bias update (after the last sample of a batch).
    BiasUpdate,
    /// Row-streamed forward of the frozen convolutions from the step's layer to the layer
    /// whose output the step writes ([`crate::ops::stream`]): the intermediate activations
    /// exist only as row windows in the step's scratch.
    StreamedForward,
    /// The clamp mask of the layer's output ([`crate::ops::activation::clamp_mask_q`]), which
    /// its activation mask step reads instead of the output.
    ClampMask,
}

impl StepOp {
    const ALL: [StepOp; 12] = [
        StepOp::LoadInput,
        StepOp::Forward,
        StepOp::Loss,
        StepOp::ActivationMask,
        StepOp::InputError,
        StepOp::AccumulateError,
        StepOp::WeightGrad,
        StepOp::BiasGrad,
        StepOp::WeightUpdate,
        StepOp::BiasUpdate,
        StepOp::StreamedForward,
        StepOp::ClampMask,
    ];

    /// True for the update steps, which run once per batch.
    pub fn is_update(self) -> bool {
        matches!(self, StepOp::WeightUpdate | StepOp::BiasUpdate)
    }

    /// True for the steps after the forward pass and the loss.
    pub fn is_backward(self) -> bool {
        !matches!(
            self,
            StepOp::LoadInput
                | StepOp::Forward
                | StepOp::StreamedForward
                | StepOp::ClampMask
                | StepOp::Loss
        )
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            StepOp::LoadInput => "load input",
            StepOp::Forward => "forward",
            StepOp::Loss => "loss",
            StepOp::ActivationMask => "activation mask",
            StepOp::InputError => "input error",
            StepOp::AccumulateError => "accumulate error",
            StepOp::WeightGrad => "weight gradient",
            StepOp::BiasGrad => "bias gradient",
            StepOp::WeightUpdate => "weight update",
            StepOp::BiasUpdate => "bias update",
            StepOp::StreamedForward => "row-streamed forward",
            StepOp::ClampMask => "clamp mask",
        }
    }
}

/// Most tensors a step reads.
pub const MAX_READS: usize = 3;
/// Most tensors a step writes.
pub const MAX_WRITES: usize = 2;

/// One kernel call: operation, layer, and the tensors it reads and writes by position.
///
/// Layout (16 bytes): op `u8`, a spare byte, `u16` layer; `u16` reads x3, writes x2,
/// scratch (unused positions [`NONE`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    /// What runs.
    pub op: StepOp,
    /// The layer it belongs to ([`NONE`] for loading the input and the loss).
    pub layer: u16,
    /// Tensors read, in the order the operation defines.
    pub reads: [u16; MAX_READS],
    /// Tensors written.
    pub writes: [u16; MAX_WRITES],
    /// Kernel scratch tensor ([`NONE`] without).
    pub scratch: u16,
}

impl StepRecord {
    /// The 16 record bytes.
    pub fn encode(&self) -> [u8; STEP_BYTES] {
        record(|w| {
            w.u8(code_of(&StepOp::ALL, self.op));
            w.zeros(1);
            w.u16(self.layer);
            for id in self.reads.iter().chain(&self.writes) {
                w.u16(*id);
            }
            w.u16(self.scratch);
        })
    }

    /// Decode one record (`None` for an unknown operation).
    pub fn decode(bytes: &[u8]) -> Option<StepRecord> {
        let mut r = Reader::new(bytes);
        let op = *StepOp::ALL.get(r.u8()? as usize)?;
        r.skip(1)?;
        Some(StepRecord {
            op,
            layer: r.u16()?,
            reads: [r.u16()?, r.u16()?, r.u16()?],
            writes: [r.u16()?, r.u16()?],
            scratch: r.u16()?,
        })
    }

    /// The tensor at read position `at` ([`NONE`] past the reads).
    pub fn read(&self, at: usize) -> u16 {
        self.reads.get(at).copied().unwrap_or(NONE)
    }

    /// The tensors the step touches (reads, writes, scratch), without [`NONE`] entries;
    /// a tensor both read and written appears twice.
    pub fn touched(&self) -> impl Iterator<Item = u16> + '_ {
        self.reads
            .iter()
            .chain(&self.writes)
            .chain(core::iter::once(&self.scratch))
            .copied()
            .filter(|&id| id != NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ema(min: f32, max: f32, initialized: bool) -> RangeEma {
        RangeEma {
            min,
            max,
            initialized,
        }
    }

    proptest! {
        #[test]
        fn records_round_trip(
            a in any::<u16>(), b in any::<u16>(), c in any::<u32>(), x in -1e6f32..1e6,
            flag in any::<bool>(), code in 0usize..StepOp::ALL.len(),
        ) {
            let spec = KINDS[code % KINDS.len()];
            let fields: [usize; MAX_FIELDS] =
                core::array::from_fn(|i| if i % 2 == 0 { a as usize } else { b as usize });
            let activation = spec.activation.then_some(ACTIVATIONS[code % 3]);
            let kind = LayerKind::from_fields(spec.tag, &fields[..spec.fields], activation)
                .expect("a kind of every tag");
            let layer = LayerRecord {
                kind,
                trains_bias: flag,
                weight_channels: a,
                weight_tensor: b,
                bias_tensor: a,
                state_offset: c,
                bias_scale: x,
                weight_q: QParams { scale: x, zero_point: -(a as i32) },
                weight_range: ema(x, -x, flag),
            };
            prop_assert_eq!(LayerRecord::decode(&layer.encode().unwrap()), Some(layer));
            let tensor = ModelTensorRecord {
                shape: [a, b, 3],
                range_owner: b,
                activation: ema(-x, x, flag),
                error: ema(x, x, !flag),
            };
            prop_assert_eq!(ModelTensorRecord::decode(&tensor.encode()), Some(tensor));
            let record = TensorRecord {
                role: TensorRole::ALL[code % TensorRole::ALL.len()],
                index: a,
                quant: b,
                bytes: c,
                arena_offset: flag.then_some(c / 2),
                flash_offset: (!flag).then_some(c / 3),
                lifetime: flag.then_some((a, b)),
            };
            prop_assert_eq!(TensorRecord::decode(&record.encode()), Some(record));
            let step = StepRecord {
                op: StepOp::ALL[code],
                layer: a,
                reads: [a, b, NONE],
                writes: [b, NONE],
                scratch: a,
            };
            prop_assert_eq!(StepRecord::decode(&step.encode()), Some(step));
            let header = Header {
                version: VERSION,
                file_bytes: c,
                crc: c ^ 5,
                precision: Precision::ALL[code % Precision::ALL.len()],
                batch: a,
                reorder: flag,
                layer_count: a,
                tensor_count: b,
                step_count: a ^ b,
                classes: b,
                lowest_layer: a,
                arena_bytes: c,
                lower_bound_bytes: c / 2,
                state_bytes: c / 3,
                scores_offset: NO_OFFSET,
                blob_offset: c / 4,
                blob_bytes: c / 5,
                config: TrainConfig {
                    lr: x,
                    activation_rate: 0.1,
                    error_rate: 0.2,
                    weight_rate: 0.3,
                    stats_rate: 0.4,
                    eps: 1e-12,
                    partial: flag.then_some(PartialUpdate { lambda_min: 0.1, lambda_max: x }),
                    momentum: x / 2.0,
                    error_ranges: if code % 3 == 0 { ErrorRanges::Exact } else { ErrorRanges::Tracked },
                },
            };
            prop_assert_eq!(Header::decode(&header.encode()), Ok(header));
        }
    }

    #[test]
    fn unknown_codes_are_rejected() {
        let mut layer = [0u8; LAYER_BYTES];
        layer[0] = KINDS.len() as u8;
        assert_eq!(LayerRecord::decode(&layer), None);
        layer[0] = 0;
        layer[1] = 3; // no such activation
        assert_eq!(LayerRecord::decode(&layer), None);
        layer[0] = 5; // global average pooling: no activation, no fields
        layer[1] = 1;
        assert_eq!(LayerRecord::decode(&layer), None);
        layer[1] = 0;
        assert!(LayerRecord::decode(&layer).is_some());
        layer[4] = 1; // a field the kind does not have
        assert_eq!(LayerRecord::decode(&layer), None);
        let too_wide = LayerRecord {
            kind: LayerKind::Add { skip_from: 1 << 16 },
            ..LayerRecord::decode(&[0u8; LAYER_BYTES]).unwrap()
        };
        assert_eq!(too_wide.encode(), None);
        let mut tensor = [0u8; TENSOR_BYTES];
        tensor[0] = TensorRole::ALL.len() as u8;
        assert_eq!(TensorRecord::decode(&tensor), None);
        let mut step = [0u8; STEP_BYTES];
        step[0] = 12;
        assert_eq!(StepRecord::decode(&step), None);
        let mut header = Header::decode(&[0u8; HEADER_BYTES]);
        assert_eq!(header, Err(PlanError::BadMagic));
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4] = 1;
        header = Header::decode(&bytes);
        assert_eq!(header, Err(PlanError::UnsupportedVersion(1)));
        bytes[4] = VERSION as u8;
        bytes[6] = HEADER_BYTES as u8;
        bytes[16] = 2; // precision
        assert_eq!(Header::decode(&bytes), Err(PlanError::Unsupported));
    }
}
