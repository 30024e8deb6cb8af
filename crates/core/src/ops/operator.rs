//! The operator contract every layer implements: its shapes and flags, its forward kernels,
//! and its backward kernels ([`InputError`], [`Parametric`]), with the parameter views they
//! take. [`crate::layer`] gathers the operators into one [`crate::layer::Layer`] type; see its
//! documentation for the kernels' conventions. This module depends on no operator, so every
//! operator module may implement it.

use crate::ops::{ChannelSet, WeightParts};
use crate::quant::{QParams, QTensor, RealRange, Q_MAX, Q_MIN};

/// Per-sample shape of a tensor: `[channels, height, width]` (a vector is `[n, 1, 1]`).
pub type Shape = [usize; 3];

/// Elements of one sample of a tensor of shape `shape`.
pub fn numel(shape: Shape) -> usize {
    shape[0] * shape[1] * shape[2]
}

/// An element-wise activation, fused into an operator or applied on its own: the clamp an
/// operator's output goes through ([`Operator::output_clamp`]); its kernels are in
/// [`crate::ops::activation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity: `y = x`.
    None,
    /// `y = max(x, 0)`.
    Relu,
    /// `y = min(max(x, 0), 6)`.
    Relu6,
}

impl Activation {
    /// The real interval the activation clamps to: `(-inf, +inf)`, `(0, +inf)` or `(0, 6)`.
    pub fn real_bounds(self) -> (f32, f32) {
        match self {
            Activation::None => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
        }
    }

    /// The same clamp in the code domain of `q`: `(lo, hi)` with
    /// `lo = clamp(z + round(lo_real / s), -128, 127)` and likewise `hi`; an infinite bound maps
    /// to the storage limit. Real 0 is the code `z` exactly.
    pub fn code_bounds(self, q: QParams) -> (i32, i32) {
        let (lo, hi) = self.real_bounds();
        let code = |real: f32, limit: i32| {
            if real.is_finite() {
                q.quantize(real) as i32
            } else {
                limit
            }
        };
        (code(lo, Q_MIN), code(hi, Q_MAX))
    }
}

/// The parameters of a layer: `channels` output channels (bias elements, structures of the
/// updates), each with `structure` weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamShape {
    /// Output channels.
    pub channels: usize,
    /// Weights per output channel.
    pub structure: usize,
}

impl ParamShape {
    /// Elements of the weight tensor: `channels * structure`.
    pub fn weight_len(&self) -> usize {
        self.channels * self.structure
    }
}

/// Float parameters of one forward call (both empty for layers without parameters).
#[derive(Clone, Copy, Debug, Default)]
pub struct FloatParams<'a> {
    /// Weights, output-channel major.
    pub weight: &'a [f32],
    /// Bias, one per output channel.
    pub bias: &'a [f32],
}

/// 8-bit weights: codes (possibly in two parts) and their quantization, one entry (per
/// tensor) or one per output channel.
#[derive(Clone, Copy, Debug)]
pub struct QWeights<'a> {
    /// Weight codes, output-channel major.
    pub codes: WeightParts<'a, i8>,
    /// Weight quantization.
    pub q: &'a [QParams],
}

impl QWeights<'_> {
    /// No weights (layers without parameters).
    pub const NONE: QWeights<'static> = QWeights {
        codes: WeightParts {
            head: &[],
            tail: &[],
        },
        q: &[],
    };
}

/// 8-bit parameters of one forward call.
#[derive(Clone, Copy, Debug)]
pub struct QParameters<'a> {
    /// Weights.
    pub weight: QWeights<'a>,
    /// `i32` bias, `real = bias_scale * b`.
    pub bias: &'a [i32],
    /// Real value of one bias unit.
    pub bias_scale: f32,
}

impl QParameters<'_> {
    /// No parameters (layers without them).
    pub const NONE: QParameters<'static> = QParameters {
        weight: QWeights::NONE,
        bias: &[],
        bias_scale: 0.0,
    };
}

/// One operator at its geometry: shapes, flags and the forward kernels (see the module
/// documentation for the kernels' conventions). Implemented in each operator's module.
pub trait Operator {
    /// Per-sample output shape.
    fn output_shape(&self) -> Shape;

    /// Elements of the input of the whole batch.
    fn input_len(&self) -> usize;

    /// Elements of the output of the whole batch.
    fn output_len(&self) -> usize;

    /// Multiply-accumulates of one forward pass of the whole batch.
    fn macs(&self) -> usize {
        0
    }

    /// Scratch bytes its kernels need (what a static planner reserves; CMSIS-NN's
    /// `get_buffer_size`).
    fn scratch_bytes(&self) -> usize {
        0
    }

    /// True when no accumulator of its 8-bit kernels can overflow at this geometry.
    fn fits_int8_limits(&self) -> bool {
        true
    }

    /// The clamp its output went through (a fused or standalone activation; 8-bit outputs are
    /// also saturated), which the backward pass undoes with an activation mask; `None` for
    /// layers that clamp nothing.
    fn output_clamp(&self) -> Option<Activation> {
        None
    }

    /// The earlier layer whose output the layer also reads (model tensor `skip_from + 1`).
    fn skip_from(&self) -> Option<usize> {
        None
    }

    /// The output keeps the input's codes and quantization (it shares the input's range
    /// tracker).
    fn preserves_codes(&self) -> bool {
        false
    }

    /// The output is the input's buffer reinterpreted: no data moves and no step runs.
    fn aliases_input(&self) -> bool {
        false
    }

    /// `y = f(x, skip, params)` in float, the fused activation included; overwrites `y`.
    /// `skip` and `params` are empty where the layer has none.
    fn forward(&self, x: &[f32], skip: &[f32], params: FloatParams, y: &mut [f32]);

    /// The 8-bit forward: `y` in the quantization `y_q` (ignored by layers that keep their
    /// input's codes, [`Self::preserves_codes`]); returns the real range before saturation
    /// (empty for layers that only move codes). `skip` is empty and `params`
    /// [`QParameters::NONE`] where the layer has none.
    fn forward_q(
        &self,
        x: QTensor,
        skip: QTensor,
        params: QParameters,
        y_q: QParams,
        y: &mut [i8],
    ) -> RealRange;

    /// The kernels that compute the input error; `None` when the (masked) output error is the
    /// error of the input, and of the residual input too.
    fn input_error(&self) -> Option<&dyn InputError> {
        None
    }

    /// The weights and bias with their gradients; `None` for layers without parameters.
    fn parametric(&self) -> Option<&dyn Parametric> {
        None
    }
}

/// The input error of a layer from its (masked) output error, over the selected output
/// channels (every channel for layers without parameters).
pub trait InputError {
    /// The kernels also read the layer's input (max pooling re-derives its argmax).
    fn reads_input(&self) -> bool {
        false
    }

    /// Float input error; overwrites `in_err`. `x` is empty unless [`Self::reads_input`],
    /// `weight` empty for layers without parameters.
    fn input_backward(
        &self,
        x: &[f32],
        weight: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        in_err: &mut [f32],
    );

    /// 8-bit input error in the quantization `in_err_q`; overwrites `in_err` and returns its
    /// real range before saturation.
    #[allow(clippy::too_many_arguments)] // tensors with their quantization, side by side
    fn input_backward_q(
        &self,
        x: QTensor,
        weight: QWeights,
        out_err: QTensor,
        channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange;
}

/// A layer with weights and a bias: their shape and gradients (added into `grad`, over the
/// selected output channels). The bias is per output channel: the output (and its error) is
/// laid out `[batch][channels][plane]` with `channels` = [`ParamShape::channels`].
pub trait Parametric: Operator {
    /// Output channels and weights per channel.
    fn param_shape(&self) -> ParamShape;

    /// `dw += dL/dw` in float.
    fn weight_backward(&self, x: &[f32], out_err: &[f32], channels: ChannelSet, grad: &mut [f32]);

    /// `dw += dL/dw` from 8-bit input and error (real units).
    fn weight_backward_q(
        &self,
        x: QTensor,
        out_err: QTensor,
        channels: ChannelSet,
        grad: &mut [f32],
    );

    /// `db[o] += sum_{n, p} e[n][o][p]` in float, summed in that order. Scratch: none.
    fn bias_backward(&self, out_err: &[f32], channels: ChannelSet, grad: &mut [f32]) {
        let planes = ChannelPlanes::of(self, out_err.len());
        for o in channels.iter(planes.channels) {
            let mut sum = 0.0f32;
            for n in 0..planes.batch {
                for &e in planes.plane(out_err, n, o) {
                    sum += e;
                }
            }
            grad[o] += sum;
        }
    }

    /// `db[o] += s_e * sum_{n, p} (e[n][o][p] - z_e)` from the 8-bit error: an exact `i64` sum
    /// and one float multiply-add per channel. Scratch: none.
    fn bias_backward_q(&self, out_err: QTensor, channels: ChannelSet, grad: &mut [f32]) {
        let planes = ChannelPlanes::of(self, out_err.codes.len());
        let ze = out_err.q.zero_point;
        for o in channels.iter(planes.channels) {
            let mut sum = 0i64;
            for n in 0..planes.batch {
                let plane = planes.plane(out_err.codes, n, o);
                sum += plane.iter().map(|&e| i64::from(e as i32 - ze)).sum::<i64>();
            }
            grad[o] += out_err.q.scale * sum as f32;
        }
    }
}

/// An output tensor of a [`Parametric`] layer seen as `[batch][channels][plane]`.
struct ChannelPlanes {
    batch: usize,
    channels: usize,
    plane: usize,
}

impl ChannelPlanes {
    fn of<L: Parametric + ?Sized>(layer: &L, len: usize) -> ChannelPlanes {
        debug_assert_eq!(len, layer.output_len());
        let channels = layer.param_shape().channels;
        let sample = numel(layer.output_shape());
        debug_assert_eq!(sample % channels, 0);
        ChannelPlanes {
            batch: len / sample,
            channels,
            plane: sample / channels,
        }
    }

    /// The plane of sample `n`, channel `o`.
    fn plane<'a, T>(&self, tensor: &'a [T], n: usize, o: usize) -> &'a [T] {
        &tensor[(n * self.channels + o) * self.plane..][..self.plane]
    }
}
