//! The fixed-size records of a plan file and their little-endian encoding.
//!
//! Each record type is written once here, as a struct with `encode` (host writer) and
//! `decode` (device reader), so the two sides share one description of the layout. Field
//! offsets follow the order of the `encode`/`decode` bodies; every record size is a multiple
//! of 4 bytes so that sections stay 4-byte aligned. Enumerations are stored as `u8` codes,
//! absent indices as [`NONE`], absent offsets as [`NO_OFFSET`].

use super::PlanError;
use crate::ops::activation::Activation;
use crate::quant::{QParams, RangeEma};

/// File signature, the first four bytes.
pub const MAGIC: [u8; 4] = *b"MCTP";
/// Format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// An absent layer, tensor or step index.
pub const NONE: u16 = u16::MAX;
/// An absent byte offset.
pub const NO_OFFSET: u32 = u32::MAX;
/// [`TensorRecord::quant`] of the logits error: quantized with the sample's own loss range.
pub const LOSS_QUANT: u16 = u16::MAX - 1;

/// Bytes of the [`Header`].
pub const HEADER_BYTES: usize = 96;
/// Bytes of a [`LayerRecord`].
pub const LAYER_BYTES: usize = 56;
/// Bytes of a [`ModelTensorRecord`].
pub const MODEL_TENSOR_BYTES: usize = 32;
/// Bytes of a [`TensorRecord`].
pub const TENSOR_BYTES: usize = 24;
/// Bytes of a [`StepRecord`].
pub const STEP_BYTES: usize = 16;
/// The header bytes before the checksummed part: magic, version, header size, file size, CRC.
pub const CHECKSUM_START: usize = 16;

/// Sequential little-endian reads from one record; reading past the end yields zeros (the
/// caller hands in exactly one record, so this never happens for well-formed calls).
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.array())
    }

    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.array())
    }

    fn skip(&mut self, bytes: usize) {
        self.at += bytes;
    }

    fn range_ema(&mut self) -> RangeEma {
        RangeEma {
            min: self.f32(),
            max: self.f32(),
            initialized: self.u32() != 0,
        }
    }
}

/// Sequential little-endian writes into a record-sized array.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Writer { out, at: 0 }
    }

    fn bytes(&mut self, value: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + value.len()) {
            dst.copy_from_slice(value);
        }
        self.at += value.len();
    }

    fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }

    fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }

    fn i32(&mut self, value: i32) {
        self.bytes(&value.to_le_bytes());
    }

    fn f32(&mut self, value: f32) {
        self.bytes(&value.to_le_bytes());
    }

    fn skip(&mut self, bytes: usize) {
        self.at += bytes;
    }

    fn range_ema(&mut self, value: &RangeEma) {
        self.f32(value.min);
        self.f32(value.max);
        self.u32(value.initialized as u32);
    }
}

/// Dynamic partial gradient updates (shared/methods.md section 1): per layer and sample only
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
}

/// Hyper-parameters of training, stored in the plan so that the device needs nothing else.
/// A float32 plan uses `lr` and `momentum` only (the other rates are 0 and `partial` is
/// `None`); an int8 plan everything but `momentum`, which is 0.
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
}

/// The first record: what the plan holds and where its sections are.
///
/// Layout (96 bytes): magic `MCTP`, version `u16`, header size `u16`, file size `u32`, CRC-32
/// of the bytes from offset 16 to the end of the file `u32`; precision `u8` (0: int8, 1:
/// float32), flags `u8` (bit 0 reordered, bit 1 partial updates), batch `u16`; layer, tensor,
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
        let mut out = [0u8; HEADER_BYTES];
        let mut w = Writer::new(&mut out);
        w.bytes(&MAGIC);
        w.u16(self.version);
        w.u16(HEADER_BYTES as u16);
        w.u32(self.file_bytes);
        w.u32(self.crc);
        w.u8(code_of(&Precision::ALL, self.precision));
        w.u8(self.reorder as u8 | (self.config.partial.is_some() as u8) << 1);
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
        out
    }

    /// Decode and check the fixed fields (magic, version, header size, precision, flags).
    pub fn decode(bytes: &[u8]) -> Result<Header, PlanError> {
        if bytes.len() < HEADER_BYTES {
            return Err(PlanError::Truncated);
        }
        let mut r = Reader::new(bytes);
        if r.array::<4>() != MAGIC {
            return Err(PlanError::BadMagic);
        }
        let version = r.u16();
        if version != VERSION {
            return Err(PlanError::UnsupportedVersion(version));
        }
        if r.u16() as usize != HEADER_BYTES {
            return Err(PlanError::BadHeader);
        }
        let file_bytes = r.u32();
        let crc = r.u32();
        let precision = *Precision::ALL
            .get(r.u8() as usize)
            .ok_or(PlanError::Unsupported)?;
        let flags = r.u8();
        if flags & !3 != 0 {
            return Err(PlanError::BadHeader);
        }
        let batch = r.u16();
        let (layer_count, tensor_count, step_count) = (r.u16(), r.u16(), r.u16());
        let (classes, lowest_layer) = (r.u16(), r.u16());
        r.skip(2);
        let (arena_bytes, lower_bound_bytes, state_bytes) = (r.u32(), r.u32(), r.u32());
        let (scores_offset, blob_offset, blob_bytes) = (r.u32(), r.u32(), r.u32());
        let (lr, activation_rate, error_rate) = (r.f32(), r.f32(), r.f32());
        let (weight_rate, stats_rate, eps) = (r.f32(), r.f32(), r.f32());
        let (lambda_min, lambda_max, momentum) = (r.f32(), r.f32(), r.f32());
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
            },
        })
    }
}

/// What a layer computes (the model IR's layer kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Convolution with a fused activation.
    Conv2d,
    /// Fully connected layer over the flattened input, with a fused activation.
    Linear,
    /// A standalone activation.
    Activation,
    /// Average pooling.
    AvgPool,
    /// Max pooling.
    MaxPool,
    /// Mean over height and width.
    GlobalAvgPool,
    /// Sum of the previous tensor and the output of layer `skip_from`.
    Add,
    /// Reshape to a vector; no data moves and no step runs.
    Flatten,
}

impl LayerKind {
    const ALL: [LayerKind; 8] = [
        LayerKind::Conv2d,
        LayerKind::Linear,
        LayerKind::Activation,
        LayerKind::AvgPool,
        LayerKind::MaxPool,
        LayerKind::GlobalAvgPool,
        LayerKind::Add,
        LayerKind::Flatten,
    ];

    /// True for layers with weights and a bias.
    pub fn has_params(self) -> bool {
        matches!(self, LayerKind::Conv2d | LayerKind::Linear)
    }

    /// True for layers whose output keeps the codes and the quantization of their input.
    pub fn preserves_codes(self) -> bool {
        matches!(
            self,
            LayerKind::Activation | LayerKind::MaxPool | LayerKind::Flatten
        )
    }
}

/// One layer: kind, geometry, what trains, and its parameters' quantization.
///
/// Layout (56 bytes): kind, activation (0 none, 1 ReLU, 2 ReLU6), flags (bit 0: the bias
/// trains), a spare byte; `u16` out channels, kernel h/w, stride h/w, padding h/w, groups,
/// skip source, trained weight channels, weight tensor, bias tensor; `u32` state offset;
/// `f32` bias scale, weight scale, `i32` weight zero point; weight range tracker (`f32` min,
/// `f32` max, `u32` initialized). The input and output shapes are the model tensor records
/// `i` and `i + 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerRecord {
    /// What the layer computes.
    pub kind: LayerKind,
    /// Fused activation (conv, linear) or the activation itself.
    pub activation: Activation,
    /// The bias trains.
    pub trains_bias: bool,
    /// Output channels (conv) or features (linear); 0 for other layers.
    pub out_channels: u16,
    /// Kernel `(height, width)` of a convolution or pooling.
    pub kernel: (u16, u16),
    /// Stride `(height, width)`.
    pub stride: (u16, u16),
    /// Zero padding `(height, width)` on each side.
    pub padding: (u16, u16),
    /// Channel groups of a convolution.
    pub groups: u16,
    /// The earlier layer whose output an add reads ([`NONE`] otherwise).
    pub skip_from: u16,
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
    /// The 56 record bytes.
    pub fn encode(&self) -> [u8; LAYER_BYTES] {
        let mut out = [0u8; LAYER_BYTES];
        let mut w = Writer::new(&mut out);
        w.u8(code_of(&LayerKind::ALL, self.kind));
        w.u8(code_of(&ACTIVATIONS, self.activation));
        w.u8(self.trains_bias as u8);
        w.skip(1);
        for value in [
            self.out_channels,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
            self.padding.0,
            self.padding.1,
            self.groups,
            self.skip_from,
            self.weight_channels,
            self.weight_tensor,
            self.bias_tensor,
        ] {
            w.u16(value);
        }
        w.u32(self.state_offset);
        w.f32(self.bias_scale);
        w.f32(self.weight_q.scale);
        w.i32(self.weight_q.zero_point);
        w.range_ema(&self.weight_range);
        out
    }

    /// Decode one record (`None` for unknown codes).
    pub fn decode(bytes: &[u8]) -> Option<LayerRecord> {
        let mut r = Reader::new(bytes);
        let kind = *LayerKind::ALL.get(r.u8() as usize)?;
        let activation = *ACTIVATIONS.get(r.u8() as usize)?;
        let flags = r.u8();
        if flags > 1 {
            return None;
        }
        r.skip(1);
        Some(LayerRecord {
            kind,
            activation,
            trains_bias: flags == 1,
            out_channels: r.u16(),
            kernel: (r.u16(), r.u16()),
            stride: (r.u16(), r.u16()),
            padding: (r.u16(), r.u16()),
            groups: r.u16(),
            skip_from: r.u16(),
            weight_channels: r.u16(),
            weight_tensor: r.u16(),
            bias_tensor: r.u16(),
            state_offset: r.u32(),
            bias_scale: r.f32(),
            weight_q: QParams {
                scale: r.f32(),
                zero_point: r.i32(),
            },
            weight_range: r.range_ema(),
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
        let mut out = [0u8; MODEL_TENSOR_BYTES];
        let mut w = Writer::new(&mut out);
        for value in self.shape {
            w.u16(value);
        }
        w.u16(self.range_owner);
        w.range_ema(&self.activation);
        w.range_ema(&self.error);
        out
    }

    /// Decode one record.
    pub fn decode(bytes: &[u8]) -> ModelTensorRecord {
        let mut r = Reader::new(bytes);
        ModelTensorRecord {
            shape: [r.u16(), r.u16(), r.u16()],
            range_owner: r.u16(),
            activation: r.range_ema(),
            error: r.range_ema(),
        }
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
}

impl TensorRole {
    const ALL: [TensorRole; 10] = [
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
        let mut out = [0u8; TENSOR_BYTES];
        let mut w = Writer::new(&mut out);
        w.u8(code_of(&TensorRole::ALL, self.role));
        w.skip(3);
        w.u16(self.index);
        w.u16(self.quant);
        w.u32(self.bytes);
        w.u32(self.arena_offset.unwrap_or(NO_OFFSET));
        w.u32(self.flash_offset.unwrap_or(NO_OFFSET));
        let (first, last) = self.lifetime.unwrap_or((NONE, NONE));
        w.u16(first);
        w.u16(last);
        out
    }

    /// Decode one record (`None` for an unknown role).
    pub fn decode(bytes: &[u8]) -> Option<TensorRecord> {
        let mut r = Reader::new(bytes);
        let role = *TensorRole::ALL.get(r.u8() as usize)?;
        r.skip(3);
        let offset = |v: u32| (v != NO_OFFSET).then_some(v);
        let (index, quant, bytes) = (r.u16(), r.u16(), r.u32());
        let (arena_offset, flash_offset) = (offset(r.u32()), offset(r.u32()));
        let (first, last) = (r.u16(), r.u16());
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
}

impl StepOp {
    const ALL: [StepOp; 10] = [
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
    ];

    /// True for the update steps, which run once per batch.
    pub fn is_update(self) -> bool {
        matches!(self, StepOp::WeightUpdate | StepOp::BiasUpdate)
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
        let mut out = [0u8; STEP_BYTES];
        let mut w = Writer::new(&mut out);
        w.u8(code_of(&StepOp::ALL, self.op));
        w.skip(1);
        w.u16(self.layer);
        for id in self.reads.iter().chain(&self.writes) {
            w.u16(*id);
        }
        w.u16(self.scratch);
        out
    }

    /// Decode one record (`None` for an unknown operation).
    pub fn decode(bytes: &[u8]) -> Option<StepRecord> {
        let mut r = Reader::new(bytes);
        let op = *StepOp::ALL.get(r.u8() as usize)?;
        r.skip(1);
        Some(StepRecord {
            op,
            layer: r.u16(),
            reads: [r.u16(), r.u16(), r.u16()],
            writes: [r.u16(), r.u16()],
            scratch: r.u16(),
        })
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
            flag in any::<bool>(), code in 0usize..8,
        ) {
            let layer = LayerRecord {
                kind: LayerKind::ALL[code],
                activation: ACTIVATIONS[code % 3],
                trains_bias: flag,
                out_channels: a,
                kernel: (b, a),
                stride: (1, b),
                padding: (a, 2),
                groups: b,
                skip_from: NONE,
                weight_channels: a,
                weight_tensor: b,
                bias_tensor: a,
                state_offset: c,
                bias_scale: x,
                weight_q: QParams { scale: x, zero_point: -(a as i32) },
                weight_range: ema(x, -x, flag),
            };
            prop_assert_eq!(LayerRecord::decode(&layer.encode()), Some(layer));
            let tensor = ModelTensorRecord {
                shape: [a, b, 3],
                range_owner: b,
                activation: ema(-x, x, flag),
                error: ema(x, x, !flag),
            };
            prop_assert_eq!(ModelTensorRecord::decode(&tensor.encode()), tensor);
            let record = TensorRecord {
                role: TensorRole::ALL[code],
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
                precision: Precision::ALL[code % 2],
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
                },
            };
            prop_assert_eq!(Header::decode(&header.encode()), Ok(header));
        }
    }

    #[test]
    fn unknown_codes_are_rejected() {
        let mut layer = [0u8; LAYER_BYTES];
        layer[0] = 8;
        assert_eq!(LayerRecord::decode(&layer), None);
        layer[0] = 0;
        layer[1] = 3;
        assert_eq!(LayerRecord::decode(&layer), None);
        let mut tensor = [0u8; TENSOR_BYTES];
        tensor[0] = 10;
        assert_eq!(TensorRecord::decode(&tensor), None);
        let mut step = [0u8; STEP_BYTES];
        step[0] = 10;
        assert_eq!(StepRecord::decode(&step), None);
        let mut header = Header::decode(&[0u8; HEADER_BYTES]);
        assert_eq!(header, Err(PlanError::BadMagic));
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..4].copy_from_slice(&MAGIC);
        bytes[4] = 2;
        header = Header::decode(&bytes);
        assert_eq!(header, Err(PlanError::UnsupportedVersion(2)));
        bytes[4] = VERSION as u8;
        bytes[6] = HEADER_BYTES as u8;
        bytes[16] = 2; // precision
        assert_eq!(Header::decode(&bytes), Err(PlanError::Unsupported));
    }
}
