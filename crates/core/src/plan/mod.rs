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
//! - a [`LayerRecord`] per layer: its [`crate::layer::LayerKind`] (the operator and its
//!   hyper-parameters, as the layer contract encodes them), what trains, bias scale and weight
//!   quantization (int8: the frozen value, or the initial value of a trained layer; unused in
//!   float32);
//! - a [`ModelTensorRecord`] per model tensor (0: input, `i + 1`: output of layer `i`): shape
//!   and initial activation and error range trackers (empty in float32);
//! - a [`TensorRecord`] per plan tensor: role, size, arena offset and/or flash contents;
//! - a [`StepRecord`] per kernel call of one sample, naming its tensors by position, as
//!   [`operands`] describes them (a row-streamed forward names the chain's input and output;
//!   the layers between are those of the layer records, and their activations have no plan
//!   tensor);
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
//! ranges seen in the current batch, with exact error ranges the quantization each error was
//! written with in the current sample, per trained layer its weight quantization and
//! partial-update bookkeeping (the layout is [`exec::state`]'s).
//!
//! [`PlanView::parse`] validates everything once (in `validate.rs`), for both precisions: bounds, record codes,
//! shapes against the layer geometries, the int8 kernels' accumulator limits, tensor sizes
//! against their roles and the precision, the hyper-parameters the precision allows (float32:
//! no partial updates, no exact error ranges, momentum in `[0, 1)` with velocities exactly
//! when it is not 0), the state region's layout (room for the errors' quantization with exact
//! error ranges), each step's operands by position (an error part is only ever summed), that
//! no two parameter tensors share a byte of the blob, and the arena plan itself: every operand
//! is live at its step, tensors kept across samples are live at every step, and no two
//! tensors live at a common step share a byte (an independent check of the planner,
//! `O(tensors^2)` once). So no file can make the accessors or the executor panic or overwrite
//! a live tensor; parameter values themselves (weights, biases, scales, range trackers) are
//! data and not checked.

pub mod exec;
pub mod operands;
mod record;
mod typed;
mod validate;

/// How FQT error tensors get their quantization (a training option, stored in plan headers).
pub use crate::quant::ErrorRanges;
pub use exec::state::{
    error_q_at, layer_state_bytes, state_bytes_at_least, tensor_state_end, ERROR_Q_BYTES,
    LAYER_STATE_BYTES, STATE_HEADER_BYTES, TENSOR_STATE_BYTES,
};
pub use operands::{Operand, Operands, Training};
pub use record::{
    Header, LayerRecord, ModelTensorRecord, PartialUpdate, Precision, StepOp, StepRecord,
    TensorRecord, TensorRole, TrainConfig, CHECKSUM_START, HEADER_BYTES, LAYER_BYTES, LOSS_QUANT,
    MAGIC, MAX_READS, MAX_WRITES, MODEL_TENSOR_BYTES, NONE, NO_OFFSET, STEP_BYTES, TENSOR_BYTES,
    VERSION,
};

use crate::checksum::crc32;
use crate::layer::Layer;
use crate::quant::QParams;

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

impl core::error::Error for PlanError {}

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

/// A validated plan file, read in place.
#[derive(Clone, Copy, Debug)]
pub struct PlanView<'a> {
    /// The file, `header.file_bytes` long.
    bytes: &'a [u8],
    header: Header,
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
    pub fn element_bytes(&self) -> usize {
        self.header.precision.element_bytes()
    }

    /// True for a float32 plan with a momentum velocity per trained parameter.
    pub fn has_velocity(&self) -> bool {
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
        ModelTensorRecord::decode(bytes)
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

    /// Bytes of a parameter tensor's flash contents: its size, except for the weights of a
    /// layer that trains a strict subset of its output channels, whose arena tensor holds the
    /// trained channels and whose flash contents the whole weight tensor (the frozen channels
    /// are read there). `None` when the tensor's layer is invalid.
    pub fn flash_bytes(&self, tensor: &TensorRecord) -> Option<usize> {
        if tensor.role != TensorRole::Weight {
            return Some(tensor.bytes as usize);
        }
        let params = self.resolve(tensor.index as usize)?.params()?;
        params.channels.checked_mul(params.structure)
    }

    /// Elements of one sample of model tensor `t`.
    pub fn numel(&self, t: usize) -> Option<usize> {
        self.model_tensor(t)?.numel()
    }

    /// Bytes of one sample of model tensor `t` as an activation or error.
    pub(crate) fn tensor_bytes(&self, t: usize) -> Option<u64> {
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

    /// Layer `i` resolved against its input at batch 1 (`None` when its record or geometry is
    /// invalid): its operator, which the executor calls.
    pub fn resolve(&self, i: usize) -> Option<Layer> {
        let layer = self.layer(i)?;
        let input = self.model_tensor(i)?.shape.map(usize::from);
        layer.kind.resolve(input, 1).ok()
    }

    /// What the steps of layer `i` depend on besides its operator ([`operands::layer_step`]).
    pub fn training(&self, i: usize) -> Option<Training> {
        let layer = self.layer(i)?;
        Some(Training {
            precision: self.precision(),
            trains_weight: layer.weight_channels > 0,
            trains_bias: layer.trains_bias,
            momentum: self.has_velocity(),
        })
    }

    /// The model tensor whose activation tracker quantizes model tensor `t`.
    pub fn range_owner(&self, t: usize) -> usize {
        self.model_tensor(t)
            .map_or(0, |record| record.range_owner as usize)
    }

    /// The model tensor whose activation buffer holds model tensor `t` (a flatten output is
    /// its input's buffer).
    pub(crate) fn buffer_of(&self, mut t: usize) -> usize {
        while t > 0 && self.resolve(t - 1).is_some_and(|l| l.op().aliases_input()) {
            t -= 1;
        }
        t
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::LayerKind;
    use crate::ops::activation::Activation;
    use crate::ops::linear::{LinearGeom, LinearLayer};
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
            state_bytes: (tensor_state_end(2, ErrorRanges::Tracked) + layer_state_bytes(2, false))
                as u32,
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
                error_ranges: ErrorRanges::Tracked,
            },
        };
        let layer = LayerRecord {
            kind: LayerKind::Linear {
                out_features: 2,
                activation: Activation::None,
            },
            trains_bias: true,
            weight_channels: 0,
            weight_tensor: 2,
            bias_tensor: 3,
            state_offset: tensor_state_end(2, ErrorRanges::Tracked) as u32,
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
        put(&layer.encode().expect("fits"));
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
        let linear = LayerKind::Linear {
            out_features: 2,
            activation: Activation::None,
        };
        assert_eq!(view.layer(0).unwrap().kind, linear);
        let weight = view.tensor(2).unwrap();
        assert_eq!(view.flash(&weight, 4), Some(&[64u8, 0, 0, 64][..]));
        let geom = LinearGeom {
            batch: 1,
            in_features: 2,
            out_features: 2,
        };
        assert_eq!(
            view.resolve(0),
            Some(Layer::Linear(LinearLayer {
                geom,
                activation: Activation::None
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
        // The bias read from the weights' bytes.
        let bias = HEADER_BYTES + LAYER_BYTES + 2 * MODEL_TENSOR_BYTES + 3 * TENSOR_BYTES;
        assert_eq!(edited(|f| f[bias + 16] -= 4), Err(PlanError::BadTensor(3)));
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
    fn exact_error_ranges_need_their_state() {
        // The tiny plan has tracked error ranges: its layer state starts right after the
        // model tensors' state, where exact ranges keep the errors' quantization.
        assert_eq!(edited(|f| f[17] |= 4), Err(PlanError::BadLayer(0)));
        let header = Header::decode(&tiny_plan().0 .0).unwrap();
        assert_eq!(header.config.error_ranges, ErrorRanges::Tracked);
        assert_eq!(
            tensor_state_end(2, ErrorRanges::Exact),
            tensor_state_end(2, ErrorRanges::Tracked) + 2 * ERROR_Q_BYTES
        );
        // Unknown flags are refused (float32 plans with exact ranges: tests/plan_exec_float).
        assert_eq!(edited(|f| f[17] |= 8), Err(PlanError::BadHeader));
        assert_eq!("exact".parse(), Ok(ErrorRanges::Exact));
        assert_eq!("tracked".parse(), Ok(ErrorRanges::Tracked));
        assert!("exactly".parse::<ErrorRanges>().is_err());
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
