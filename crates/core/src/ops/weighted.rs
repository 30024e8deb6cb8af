//! Layers with weights, a bias per output channel and a fused activation (convolutions, plain
//! and transposed, and fully connected layers): their kernels, written once per geometry
//! ([`WeightedKernels`]), and the layer contract implemented once for all of them
//! ([`Weighted`]).
//!
//! The float forward leaves the activation to [`Weighted`] (applied in place after the
//! kernel); the 8-bit forward fuses it into the requantization ([`QLayerParams::activation`]).
//! The bias gradients are the contract's own ([`Parametric::bias_backward`]): the output is
//! laid out `[batch][channels][plane]`. No kernel needs scratch memory (each accumulates in a
//! fixed block on the stack), so [`Operator::scratch_bytes`] keeps its default, 0.

use crate::ops::activation::{self, Activation};
use crate::ops::arith::QLayerParams;
use crate::ops::operator::{
    FloatParams, InputError, Operator, ParamShape, Parametric, QParameters, QWeights, Shape,
};
use crate::ops::{ChannelSet, OpError, WeightParts};
use crate::quant::{QParams, QTensor, RealRange};

/// The geometry of a layer with weights and its kernels. Weights are
/// `[channels][structure]` ([`WeightedKernels::param_shape`]), in two parts where a sparse
/// update keeps the first channels apart ([`WeightParts`]); the kernels' conventions are
/// those of [`crate::ops`].
pub trait WeightedKernels: Copy {
    /// Per-sample output shape `[channels, height, width]`.
    fn output_shape(&self) -> Shape;

    /// Output channels and weights per channel.
    fn param_shape(&self) -> ParamShape;

    /// Elements of the input of the whole batch.
    fn input_len(&self) -> usize;

    /// Elements of the output of the whole batch.
    fn output_len(&self) -> usize;

    /// Multiply-accumulates of one forward pass of the whole batch.
    fn macs(&self) -> usize;

    /// True when no accumulator of the 8-bit kernels can overflow.
    fn fits_int8_limits(&self) -> bool;

    /// Checks that every size is positive and consistent and that the derived sizes fit a
    /// `usize`.
    fn validate(&self) -> Result<(), OpError>;

    /// The geometry of output channels `0..channels` alone, when at batch 1 its input, output
    /// and weights are prefixes of this geometry's; `None` otherwise.
    fn output_prefix(&self, channels: usize) -> Option<Self>;

    /// Float forward without the activation; overwrites `output`.
    fn forward(&self, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]);

    /// 8-bit forward with the activation of `q` fused; overwrites `output` and returns the
    /// real output range after the activation clamp, before 8-bit saturation.
    fn forward_q(
        &self,
        input: &[i8],
        weight: WeightParts<i8>,
        bias: &[i32],
        q: &QLayerParams,
        output: &mut [i8],
    ) -> RealRange;

    /// Float input error over the selected output channels; overwrites `in_err`.
    fn input_backward(
        &self,
        weight: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        in_err: &mut [f32],
    );

    /// 8-bit input error over the selected output channels in the quantization `in_err_q`;
    /// overwrites `in_err` and returns its real range before saturation.
    #[allow(clippy::too_many_arguments)] // tensors with their quantization, side by side
    fn input_backward_q(
        &self,
        weight: WeightParts<i8>,
        weight_q: &[QParams],
        out_err: &[i8],
        out_err_q: QParams,
        channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange;

    /// `dw += dL/dw` in float for the selected output channels.
    fn weight_backward(
        &self,
        input: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        weight_grad: &mut [f32],
    );

    /// `dw += dL/dw` from 8-bit input and error (real units) for the selected output channels.
    #[allow(clippy::too_many_arguments)] // tensors with their quantization, side by side
    fn weight_backward_q(
        &self,
        input: &[i8],
        input_q: QParams,
        out_err: &[i8],
        out_err_q: QParams,
        channels: ChannelSet,
        weight_grad: &mut [f32],
    );

    /// Debug checks of a kernel's slice lengths against a valid geometry.
    fn check_lengths(&self, input: usize, weight: usize, output: usize) {
        debug_assert_eq!(self.validate(), Ok(()));
        debug_assert_eq!(input, self.input_len());
        debug_assert_eq!(weight, self.param_shape().weight_len());
        debug_assert_eq!(output, self.output_len());
    }
}

/// A layer with weights: its geometry and the activation fused into its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted<G> {
    /// Shapes and the kernels' parameters.
    pub geom: G,
    /// Fused activation.
    pub activation: Activation,
}

impl<G: WeightedKernels> Weighted<G> {
    /// The layer restricted to its first `channels` output channels
    /// ([`WeightedKernels::output_prefix`]).
    pub fn channel_prefix(&self, channels: usize) -> Option<Weighted<G>> {
        let geom = self.geom.output_prefix(channels)?;
        Some(Weighted { geom, ..*self })
    }
}

impl<G: WeightedKernels> Operator for Weighted<G> {
    fn output_shape(&self) -> Shape {
        self.geom.output_shape()
    }

    fn input_len(&self) -> usize {
        self.geom.input_len()
    }

    fn output_len(&self) -> usize {
        self.geom.output_len()
    }

    fn macs(&self) -> usize {
        self.geom.macs()
    }

    fn fits_int8_limits(&self) -> bool {
        self.geom.fits_int8_limits()
    }

    fn output_clamp(&self) -> Option<Activation> {
        Some(self.activation)
    }

    fn forward(&self, x: &[f32], _skip: &[f32], params: FloatParams, y: &mut [f32]) {
        self.geom.forward(x, params.weight, params.bias, y);
        activation::forward_in_place(self.activation, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        params: QParameters,
        y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        let q = QLayerParams {
            input: x.q,
            weight: params.weight.q,
            bias_scale: params.bias_scale,
            output: y_q,
            activation: self.activation,
        };
        let weight = params.weight.codes;
        self.geom.forward_q(x.codes, weight, params.bias, &q, y)
    }

    fn input_error(&self) -> Option<&dyn InputError> {
        Some(self)
    }

    fn parametric(&self) -> Option<&dyn Parametric> {
        Some(self)
    }
}

impl<G: WeightedKernels> InputError for Weighted<G> {
    fn input_backward(
        &self,
        _x: &[f32],
        weight: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        self.geom.input_backward(weight, out_err, channels, in_err);
    }

    fn input_backward_q(
        &self,
        _x: QTensor,
        weight: QWeights,
        out_err: QTensor,
        channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange {
        let (w, w_q, e, e_q) = (weight.codes, weight.q, out_err.codes, out_err.q);
        self.geom
            .input_backward_q(w, w_q, e, e_q, channels, in_err_q, in_err)
    }
}

impl<G: WeightedKernels> Parametric for Weighted<G> {
    fn param_shape(&self) -> ParamShape {
        self.geom.param_shape()
    }

    fn weight_backward(&self, x: &[f32], out_err: &[f32], channels: ChannelSet, grad: &mut [f32]) {
        self.geom.weight_backward(x, out_err, channels, grad);
    }

    fn weight_backward_q(
        &self,
        x: QTensor,
        out_err: QTensor,
        channels: ChannelSet,
        grad: &mut [f32],
    ) {
        let (e, e_q) = (out_err.codes, out_err.q);
        self.geom
            .weight_backward_q(x.codes, x.q, e, e_q, channels, grad);
    }
}
