//! Fully connected layer, float and 8-bit: forward, input error, weight gradient and bias
//! gradient.
//!
//! Inputs `[batch][in_features]`, weights `[out_features][in_features]`, bias
//! `[out_features]`, outputs `[batch][out_features]`; a [`ChannelSet`] selects output features.
//! The loops are small GEMMs of their own (a dot product per output, row updates for the
//! input error and the weight gradient), written once for the float and the 8-bit forms over
//! the arithmetic of [`conv2d`](super::conv2d), which also holds the shared quantization
//! ([`QLayerParams`], output requantization, the per-channel input-error scheme). No function
//! needs scratch memory.
//!
//! 8-bit accumulators are `i32`: `in_features` (forward), `out_features` (input error) and
//! `batch` (weight gradient) up to 33 025 (`33 025 * 255^2 < 2^31`).

use super::conv2d::{
    axpy, blocks, channel_sums, dot, requantize_input_error, Acc, AccRange, InputErrorKernel,
    OutputChannel, QLayerParams, Term, BLOCK,
};
use super::{ChannelSet, OpError};
use crate::quant::{QParams, RealRange};

/// Shape of a fully connected layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearGeom {
    /// Samples in the batch.
    pub batch: usize,
    /// Inputs per sample.
    pub in_features: usize,
    /// Outputs per sample.
    pub out_features: usize,
}

impl LinearGeom {
    /// Elements of the input (and of the input error): `batch * in_features`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_features
    }

    /// Elements of the output (and of the output error): `batch * out_features`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_features
    }

    /// Elements of the weight matrix: `out_features * in_features`.
    pub fn weight_len(&self) -> usize {
        self.out_features * self.in_features
    }

    /// Multiply-accumulates of one forward pass (and of each backward pass over all outputs):
    /// `batch * out_features * in_features`.
    pub fn macs(&self) -> usize {
        self.batch * self.weight_len()
    }

    /// Checks that every size is positive.
    pub fn validate(&self) -> Result<(), OpError> {
        if self.batch == 0 || self.in_features == 0 || self.out_features == 0 {
            return Err(OpError::ZeroSize);
        }
        Ok(())
    }

    /// Scratch bytes that the kernels of this module need: always 0.
    pub fn scratch_bytes(&self) -> usize {
        0
    }

    fn check_lengths(&self, input: usize, weight: usize, output: usize) {
        debug_assert_eq!(self.validate(), Ok(()));
        debug_assert_eq!(input, self.input_len());
        debug_assert_eq!(weight, self.weight_len());
        debug_assert_eq!(output, self.output_len());
    }
}

/// `y[n][o] = b[o] + sum_i w[o][i] * x[n][i]`; overwrites `output`. Scratch: none.
pub fn forward(g: &LinearGeom, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    g.check_lengths(input.len(), weight.len(), output.len());
    debug_assert_eq!(bias.len(), g.out_features);
    for (o, &b) in bias.iter().enumerate() {
        let row = &weight[o * g.in_features..][..g.in_features];
        forward_feature(g, input, 0.0, row, 0.0, b, |n, acc| {
            output[n * g.out_features + o] = acc;
        });
    }
}

/// `e_x[n][i] = sum_{o in S} w[o][i] * e[n][o]` over the selected outputs `S`; overwrites
/// `in_err`. Scratch: none.
pub fn input_backward(
    g: &LinearGeom,
    weight: &[f32],
    out_err: &[f32],
    channels: ChannelSet,
    in_err: &mut [f32],
) {
    g.check_lengths(in_err.len(), weight.len(), out_err.len());
    input_error(
        g,
        weight,
        out_err,
        0.0,
        channels,
        |_| (0.0, 1.0),
        &mut |at, block: &[f32]| in_err[at..at + block.len()].copy_from_slice(block),
    );
}

/// `dw[o][i] += sum_n x[n][i] * e[n][o]` for the selected outputs. Scratch: none.
pub fn weight_backward(
    g: &LinearGeom,
    input: &[f32],
    out_err: &[f32],
    channels: ChannelSet,
    weight_grad: &mut [f32],
) {
    g.check_lengths(input.len(), weight_grad.len(), out_err.len());
    weight_sums(g, input, 0.0, out_err, 0.0, channels, &mut |at, sum: f32| {
        weight_grad[at] += sum;
    });
}

/// `db[o] += sum_n e[n][o]` for the selected outputs. Scratch: none.
pub fn bias_backward(g: &LinearGeom, out_err: &[f32], channels: ChannelSet, bias_grad: &mut [f32]) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(bias_grad.len(), g.out_features);
    let (batch, count) = (g.batch, g.out_features);
    channel_sums(batch, count, 1, out_err, 0.0, channels, &mut |o, sum: f32| {
        bias_grad[o] += sum;
    });
}

/// Quantized forward, per output `o` (accumulator scale `s_a = s_x * s_w[o]`):
/// `acc = sum_i (x - z_x)(w - z_w[o]) + requant(b[o], bias_scale / s_a)`,
/// `y = clamp(z_y + round(acc * s_a / s_y), act_lo, act_hi)` (activation bounds as codes, within
/// `[-128, 127]`). Returns the real output range after the activation clamp but before 8-bit
/// saturation, exact from the accumulators. Overwrites `output`. Scratch: none.
pub fn forward_q(
    g: &LinearGeom,
    input: &[i8],
    weight: &[i8],
    bias: &[i32],
    q: &QLayerParams,
    output: &mut [i8],
) -> RealRange {
    g.check_lengths(input.len(), weight.len(), output.len());
    debug_assert_eq!(bias.len(), g.out_features);
    debug_assert!(q.weight.len() == 1 || q.weight.len() == g.out_features);
    let mut range = RealRange::EMPTY;
    for (o, &b) in bias.iter().enumerate() {
        let channel = OutputChannel::new(q, o);
        let mut accs = AccRange::EMPTY;
        let row = &weight[o * g.in_features..][..g.in_features];
        let (zx, zw, init) = (q.input.zero_point, channel.weight_zero, channel.bias_acc(b));
        forward_feature(g, input, zx, row, zw, init, |n, acc| {
            let at = n * g.out_features + o;
            channel.store(&mut output[at..at + 1], &[acc], &mut accs);
        });
        range = range.merge(channel.real_range(accs));
    }
    range
}

/// Quantized input error over the selected outputs `S`:
/// `e_x = z_ex + round((s_w * s_e / s_ex) * sum_{o in S} (w - z_w[o])(e - z_e))`, saturated to
/// `[-128, 127]`; overwrites `in_err`. One weight scale gives the exact `i32` form; distinct
/// per-channel scales use the fixed-point ratio scheme described at
/// [`conv2d::input_backward_q`](super::conv2d::input_backward_q). Returns the real range
/// before saturation. Scratch: none.
#[allow(clippy::too_many_arguments)] // the operator convention: tensor and qparams side by side
pub fn input_backward_q(
    g: &LinearGeom,
    weight: &[i8],
    weight_q: &[QParams],
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    in_err_q: QParams,
    in_err: &mut [i8],
) -> RealRange {
    g.check_lengths(in_err.len(), weight.len(), out_err.len());
    debug_assert!(weight_q.len() == 1 || weight_q.len() == g.out_features);
    let kernel = LinearInputError {
        geom: g,
        weight,
        out_err,
        channels,
    };
    requantize_input_error(&kernel, weight_q, out_err_q, in_err_q, g.out_features, in_err)
}

/// `dw[o][i] += s_x * s_e * sum_n (x - z_x)(e - z_e)` for the selected outputs: an exact `i32`
/// sum and one float multiply-add per weight. Scratch: none.
pub fn weight_backward_q(
    g: &LinearGeom,
    input: &[i8],
    input_q: QParams,
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    weight_grad: &mut [f32],
) {
    g.check_lengths(input.len(), weight_grad.len(), out_err.len());
    let scale = input_q.scale * out_err_q.scale;
    let (zx, ze) = (input_q.zero_point, out_err_q.zero_point);
    weight_sums(g, input, zx, out_err, ze, channels, &mut |at, sum: i32| {
        weight_grad[at] += scale * sum as f32;
    });
}

/// `db[o] += s_e * sum_n (e - z_e)` for the selected outputs (exact integer sum, one float
/// multiply-add per output). Scratch: none.
pub fn bias_backward_q(
    g: &LinearGeom,
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    bias_grad: &mut [f32],
) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(bias_grad.len(), g.out_features);
    let (batch, count, ze) = (g.batch, g.out_features, out_err_q.zero_point);
    channel_sums(batch, count, 1, out_err, ze, channels, &mut |o, sum: i64| {
        bias_grad[o] += out_err_q.scale * sum as f32;
    });
}

/// `emit(n, init + sum_i term(w[i]) * term(x[n][i]))` for one output feature's weight row.
fn forward_feature<X: Term<A>, A: Acc>(
    g: &LinearGeom,
    input: &[X],
    zx: A,
    row: &[X],
    zw: A,
    init: A,
    mut emit: impl FnMut(usize, A),
) {
    for n in 0..g.batch {
        let x = &input[n * g.in_features..][..g.in_features];
        emit(n, init + dot(row, 1, zw, x, zx));
    }
}

/// Input-error accumulators `sum_{o in S} term(w[o][i]) * (term(e[n][o]) * factor_o)` with
/// `(z_w[o], factor_o) = channel(o)`, handed to `emit(index in in_err, block)`.
fn input_error<X: Term<A>, A: Acc>(
    g: &LinearGeom,
    weight: &[X],
    err: &[X],
    ze: A,
    channels: ChannelSet,
    channel: impl Fn(usize) -> (A, A),
    emit: &mut impl FnMut(usize, &[A]),
) {
    for n in 0..g.batch {
        let err = &err[n * g.out_features..][..g.out_features];
        for block in blocks(g.in_features) {
            let mut acc = [A::default(); BLOCK];
            let acc = &mut acc[..block.len()];
            for o in channels.iter(g.out_features) {
                let (zw, factor) = channel(o);
                let row = &weight[o * g.in_features + block.start..];
                axpy(acc, row, 1, zw, err[o].term(ze) * factor);
            }
            emit(n * g.in_features + block.start, acc);
        }
    }
}

/// Weight-gradient sums `sum_n term(x[n][i]) * term(e[n][o])` of the selected outputs, handed
/// to `emit(weight index, sum)`.
fn weight_sums<X: Term<A>, A: Acc>(
    g: &LinearGeom,
    input: &[X],
    zx: A,
    err: &[X],
    ze: A,
    channels: ChannelSet,
    emit: &mut impl FnMut(usize, A),
) {
    for o in channels.iter(g.out_features) {
        for block in blocks(g.in_features) {
            let mut acc = [A::default(); BLOCK];
            let acc = &mut acc[..block.len()];
            for n in 0..g.batch {
                let x = &input[n * g.in_features + block.start..];
                axpy(acc, x, 1, zx, err[n * g.out_features + o].term(ze));
            }
            for (i, &sum) in block.zip(acc.iter()) {
                emit(o * g.in_features + i, sum);
            }
        }
    }
}

struct LinearInputError<'a> {
    geom: &'a LinearGeom,
    weight: &'a [i8],
    out_err: &'a [i8],
    channels: ChannelSet<'a>,
}

impl InputErrorKernel for LinearInputError<'_> {
    fn run<A: Acc>(
        &self,
        ze: A,
        channel: impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) where
        i8: Term<A>,
    {
        input_error(self.geom, self.weight, self.out_err, ze, self.channels, channel, emit);
    }
}
