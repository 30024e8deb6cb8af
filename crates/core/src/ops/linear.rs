//! Fully connected layer, float and 8-bit: forward, input error and weight gradient, the
//! [`WeightedKernels`] of [`LinearGeom`] (the bias gradient is the layer contract's,
//! [`Parametric::bias_backward`](crate::ops::operator::Parametric::bias_backward)).
//!
//! Inputs `[batch][in_features]`, weights `[out_features][in_features]`, bias
//! `[out_features]`, outputs `[batch][out_features]`; a [`ChannelSet`] selects output features.
//! The loops are small GEMMs of their own (a dot product per output, row updates for the
//! input error and the weight gradient), written once for the float and the 8-bit forms over
//! the arithmetic of [`crate::ops::arith`], which also holds the shared quantization
//! ([`QLayerParams`], output requantization, the per-channel input-error scheme). No kernel
//! needs scratch memory.
//!
//! 8-bit accumulators are `i32`: `in_features` (forward), `out_features` (input error) and
//! `batch` (weight gradient) up to 33 025 (`33 025 * 255^2 < 2^31`).

use super::arith::MAX_ACCUMULATED_TERMS;
use super::arith::{
    axpy, blocks, dot, requantize_input_error, Acc, AccRange, InputErrorKernel, OutputChannel,
    QLayerParams, Term, BLOCK,
};
use super::{checked_product, ChannelSet, OpError, WeightParts};
use crate::ops::operator::{ParamShape, Shape};
use crate::ops::weighted::{Weighted, WeightedKernels};
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
    /// Elements of the weight matrix: `out_features * in_features`.
    pub fn weight_len(&self) -> usize {
        self.out_features * self.in_features
    }
}

impl WeightedKernels for LinearGeom {
    fn output_shape(&self) -> Shape {
        [self.out_features, 1, 1]
    }

    fn param_shape(&self) -> ParamShape {
        ParamShape {
            channels: self.out_features,
            structure: self.in_features,
        }
    }

    /// Elements of the input (and of the input error): `batch * in_features`.
    fn input_len(&self) -> usize {
        self.batch * self.in_features
    }

    /// Elements of the output (and of the output error): `batch * out_features`.
    fn output_len(&self) -> usize {
        self.batch * self.out_features
    }

    /// Multiply-accumulates of one forward pass (and of each backward pass over all outputs):
    /// `batch * out_features * in_features`.
    fn macs(&self) -> usize {
        self.batch * self.weight_len()
    }

    /// Checks that every size is positive.
    fn validate(&self) -> Result<(), OpError> {
        if self.batch == 0 || self.in_features == 0 || self.out_features == 0 {
            return Err(OpError::ZeroSize);
        }
        // Every size the kernels and the planner derive fits a `usize`.
        checked_product(&[self.batch, self.in_features, self.out_features])?;
        Ok(())
    }

    /// Forward sums hold `in_features` products, input-error sums `out_features`, each at most
    /// [`MAX_ACCUMULATED_TERMS`].
    fn fits_int8_limits(&self) -> bool {
        self.in_features <= MAX_ACCUMULATED_TERMS && self.out_features <= MAX_ACCUMULATED_TERMS
    }

    /// The first `channels` outputs (`None` for 0 or more than it has).
    fn output_prefix(&self, channels: usize) -> Option<LinearGeom> {
        (channels > 0 && channels <= self.out_features).then_some(LinearGeom {
            out_features: channels,
            ..*self
        })
    }

    // -----------------------------------------------------------------------------------------
    // Float forms.

    /// `y[n][o] = b[o] + sum_i w[o][i] * x[n][i]`; overwrites `output`. Scratch: none.
    fn forward(&self, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
        let g = self;
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
    fn input_backward(
        &self,
        weight: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        let g = self;
        g.check_lengths(in_err.len(), weight.len(), out_err.len());
        input_error(
            g,
            WeightParts::whole(weight),
            out_err,
            0.0,
            channels,
            |_| (0.0, 1.0),
            &mut |at, block: &[f32]| in_err[at..at + block.len()].copy_from_slice(block),
        );
    }

    /// `dw[o][i] += sum_n x[n][i] * e[n][o]` for the selected outputs. Scratch: none.
    fn weight_backward(
        &self,
        input: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        weight_grad: &mut [f32],
    ) {
        let g = self;
        g.check_lengths(input.len(), weight_grad.len(), out_err.len());
        weight_sums(
            g,
            input,
            0.0,
            out_err,
            0.0,
            channels,
            &mut |at, sum: f32| {
                weight_grad[at] += sum;
            },
        );
    }

    // -----------------------------------------------------------------------------------------
    // 8-bit forms.

    /// Quantized forward, per output `o` (accumulator scale `s_a = s_x * s_w[o]`): `acc = sum_i
    /// (x - z_x)(w - z_w[o]) + requant(b[o], bias_scale / s_a)`, `y = clamp(z_y + round(acc * s_a /
    /// s_y), act_lo, act_hi)` (activation bounds as codes, within `[-128, 127]`). Returns the real
    /// output range after the activation clamp but before 8-bit saturation, exact from the
    /// accumulators. Overwrites `output`. Scratch: none.
    ///
    /// The bias is added to the sum of products last, with `i32` saturation: the sum cannot
    /// overflow, while the bias in accumulator units may be anywhere in `i32`.
    ///
    /// The weights come in two parts ([`WeightParts`]: the first output channels in `weight.head`,
    /// the rest in `weight.tail`); the sums are those of one tensor.
    fn forward_q(
        &self,
        input: &[i8],
        weight: WeightParts<i8>,
        bias: &[i32],
        q: &QLayerParams,
        output: &mut [i8],
    ) -> RealRange {
        let g = self;
        g.check_lengths(input.len(), weight.len(), output.len());
        debug_assert_eq!(bias.len(), g.out_features);
        debug_assert!(q.weight.len() == 1 || q.weight.len() == g.out_features);
        let mut range = RealRange::EMPTY;
        for (o, &b) in bias.iter().enumerate() {
            let channel = OutputChannel::new(q, o, b);
            let mut accs = AccRange::EMPTY;
            let row = weight.structure(o, g.in_features);
            let (zx, zw) = (q.input.zero_point, channel.weight_zero);
            forward_feature(g, input, zx, row, zw, 0, |n, acc| {
                let at = n * g.out_features + o;
                channel.store(&mut output[at..at + 1], &[acc], &mut accs);
            });
            range = range.merge(channel.real_range(accs));
        }
        range
    }

    /// Quantized input error over the selected outputs `S`: `e_x = z_ex + round((s_w * s_e /
    /// s_ex) * sum_{o in S} (w - z_w[o])(e - z_e))`, saturated to `[-128, 127]`; overwrites
    /// `in_err`. One weight scale gives the exact `i32` form; distinct per-channel scales use the
    /// fixed-point ratio scheme described at
    /// [`Conv2dGeom::input_backward_q`](super::conv2d::Conv2dGeom::input_backward_q). Returns the
    /// real range before saturation. Scratch: none.
    ///
    /// The weights come in two parts ([`WeightParts`]: the first output channels in `weight.head`,
    /// the rest in `weight.tail`); the sums are those of one tensor.
    #[allow(clippy::too_many_arguments)] // the operator convention: tensor and qparams side by side
    fn input_backward_q(
        &self,
        weight: WeightParts<i8>,
        weight_q: &[QParams],
        out_err: &[i8],
        out_err_q: QParams,
        channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange {
        let g = self;
        g.check_lengths(in_err.len(), weight.len(), out_err.len());
        debug_assert!(weight_q.len() == 1 || weight_q.len() == g.out_features);
        let kernel = LinearInputError {
            geom: g,
            weight,
            out_err,
            channels,
        };
        requantize_input_error(
            &kernel,
            weight_q,
            out_err_q,
            in_err_q,
            g.out_features,
            in_err,
        )
    }

    /// `dw[o][i] += s_x * s_e * sum_n (x - z_x)(e - z_e)` for the selected outputs: an exact `i32`
    /// sum and one float multiply-add per weight. Scratch: none.
    fn weight_backward_q(
        &self,
        input: &[i8],
        input_q: QParams,
        out_err: &[i8],
        out_err_q: QParams,
        channels: ChannelSet,
        weight_grad: &mut [f32],
    ) {
        let g = self;
        g.check_lengths(input.len(), weight_grad.len(), out_err.len());
        let scale = input_q.scale * out_err_q.scale;
        let (zx, ze) = (input_q.zero_point, out_err_q.zero_point);
        weight_sums(g, input, zx, out_err, ze, channels, &mut |at, sum: i32| {
            weight_grad[at] += scale * sum as f32;
        });
    }
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
    weight: WeightParts<X>,
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
                let row = &weight.structure(o, g.in_features)[block.start..];
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
    weight: WeightParts<'a, i8>,
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
        input_error(
            self.geom,
            self.weight,
            self.out_err,
            ze,
            self.channels,
            channel,
            emit,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The layer contract.

/// A fully connected layer: its geometry and the activation fused into its output.
pub type LinearLayer = Weighted<LinearGeom>;

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::ops::activation::Activation;
    use crate::ops::contract::{
        abs, activations, assert_close, check_a_saturated_bias_saturates_the_output,
        check_channel_subset_restricts_the_full_result,
        check_equal_channel_scales_are_the_per_tensor_form,
        check_float_backward_matches_finite_differences, check_forward_q_matches_float_forward,
        check_gradient_q_matches_float, check_input_backward_q_matches_float,
        check_weight_parts_give_the_whole_tensor_result, codes, floats, zero_point,
    };
    use crate::ops::operator::Parametric;
    use crate::rng::Rng;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn geometry() -> impl Strategy<Value = LinearGeom> {
        (1usize..=3, 1usize..=40, 1usize..=6).prop_map(|(batch, in_features, out_features)| {
            LinearGeom {
                batch,
                in_features,
                out_features,
            }
        })
    }

    /// Calls `f(input index, weight index, output index)` for every product, in the order
    /// `n, o, i`.
    fn for_each_product(g: &LinearGeom, mut f: impl FnMut(usize, usize, usize)) {
        for n in 0..g.batch {
            for o in 0..g.out_features {
                for i in 0..g.in_features {
                    f(
                        n * g.in_features + i,
                        o * g.in_features + i,
                        n * g.out_features + o,
                    );
                }
            }
        }
    }

    fn ref_forward<X: Term<A>, A: Acc>(
        g: &LinearGeom,
        x: &[X],
        zx: A,
        w: &[X],
        zw: &dyn Fn(usize) -> A,
        init: &dyn Fn(usize) -> A,
    ) -> Vec<A> {
        let mut y: Vec<A> = (0..g.output_len())
            .map(|k| init(k % g.out_features))
            .collect();
        let n_in = g.in_features;
        for_each_product(g, |xi, wi, yi| {
            y[yi] += x[xi].term(zx) * w[wi].term(zw(wi / n_in))
        });
        y
    }

    fn ref_input_error<X: Term<A>, A: Acc>(
        g: &LinearGeom,
        w: &[X],
        e: &[X],
        ze: A,
        wterm: &dyn Fn(usize, X) -> A,
    ) -> Vec<A> {
        let mut ex = vec![A::default(); g.input_len()];
        let n_in = g.in_features;
        for_each_product(g, |xi, wi, yi| {
            ex[xi] += wterm(wi / n_in, w[wi]) * e[yi].term(ze)
        });
        ex
    }

    fn ref_weight_grad<X: Term<A>, A: Acc>(
        g: &LinearGeom,
        x: &[X],
        zx: A,
        e: &[X],
        ze: A,
    ) -> Vec<A> {
        let mut dw = vec![A::default(); g.weight_len()];
        for_each_product(g, |xi, wi, yi| dw[wi] += x[xi].term(zx) * e[yi].term(ze));
        dw
    }

    fn layer(geom: LinearGeom, activation: Activation) -> LinearLayer {
        LinearLayer { geom, activation }
    }

    /// The plain-loop forward in `f64`, as the contract checks take it.
    fn reference(g: LinearGeom) -> impl Fn(&[f64], &[f64], &[f64], &[f64]) -> Vec<f64> {
        move |x, _skip, w, b| ref_forward(&g, x, 0.0, w, &|_| 0.0, &|o| b[o])
    }

    #[test]
    fn geometry_sizes_and_validation() {
        let g = LinearGeom {
            batch: 3,
            in_features: 5,
            out_features: 2,
        };
        assert_eq!(g.validate(), Ok(()));
        assert_eq!((g.input_len(), g.output_len(), g.weight_len()), (15, 6, 10));
        assert_eq!(g.macs(), 30);
        assert_eq!(
            LinearGeom { batch: 0, ..g }.validate(),
            Err(OpError::ZeroSize)
        );
        assert_eq!(
            LinearGeom {
                in_features: 0,
                ..g
            }
            .validate(),
            Err(OpError::ZeroSize)
        );
    }

    #[test]
    fn float_passes_by_hand() {
        // w = [[1, 2, 3], [-1, 0, 1]], b = [0.5, -1], two samples.
        let g = LinearGeom {
            batch: 2,
            in_features: 3,
            out_features: 2,
        };
        let w = [1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0];
        let x = [1.0f32, 1.0, 1.0, 2.0, 0.0, -1.0];
        let mut y = [0.0f32; 4];
        g.forward(&x, &w, &[0.5, -1.0], &mut y);
        assert_eq!(y, [6.5, -1.0, -0.5, -4.0]);
        let e = [1.0f32, 10.0, 0.5, -2.0];
        let mut ex = [0.0f32; 6];
        g.input_backward(&w, &e, ChannelSet::All, &mut ex);
        assert_eq!(ex, [-9.0, 2.0, 13.0, 2.5, 1.0, -0.5]);
        g.input_backward(&w, &e, ChannelSet::Subset(&[1]), &mut ex);
        assert_eq!(ex, [-10.0, 0.0, 10.0, 2.0, 0.0, -2.0]);
        let mut dw = [1.0f32; 6];
        g.weight_backward(&x, &e, ChannelSet::Subset(&[0]), &mut dw);
        assert_eq!(dw, [3.0, 2.0, 1.5, 1.0, 1.0, 1.0]);
        let mut db = [0.0f32; 2];
        let layer = LinearLayer {
            geom: g,
            activation: Activation::None,
        };
        layer.bias_backward(&e, ChannelSet::All, &mut db);
        assert_eq!(db, [1.5, 8.0]);
    }

    proptest! {
        #[test]
        fn weight_parts_give_the_whole_tensor_result(
            g in geometry(), seed in any::<u64>(), split in any::<prop::sample::Index>(),
        ) {
            let layer = layer(g, Activation::Relu6);
            check_weight_parts_give_the_whole_tensor_result(
                &layer,
                LinearLayer::channel_prefix,
                seed,
                split,
            );
        }

        #[test]
        fn kernels_match_the_reference(g in geometry(), seed in any::<u64>()) {
            check_kernels_match_the_reference(g, seed);
        }

        #[test]
        fn float_backward_matches_finite_differences(
            g in geometry(), activation in activations(), seed in any::<u64>(),
        ) {
            let layer = layer(g, activation);
            check_float_backward_matches_finite_differences(&layer, &reference(g), seed);
        }

        #[test]
        fn channel_subset_restricts_the_full_result(g in geometry(), seed in any::<u64>()) {
            check_channel_subset_restricts_the_full_result(&layer(g, Activation::None), seed);
        }

        #[test]
        fn equal_channel_scales_are_the_per_tensor_form(g in geometry(), seed in any::<u64>()) {
            check_equal_channel_scales_are_the_per_tensor_form(&layer(g, Activation::None), seed);
        }

        #[test]
        fn a_saturated_bias_saturates_the_output(g in geometry()) {
            check_a_saturated_bias_saturates_the_output(&layer(g, Activation::None));
        }

        #[test]
        fn forward_q_matches_float_forward(
            g in geometry(),
            seed in any::<u64>(),
            per_channel in any::<bool>(),
            activation in activations(),
            bias_ratio in prop_oneof![Just(1.0f32), 0.1f32..3.0],
        ) {
            let layer = layer(g, activation);
            check_forward_q_matches_float_forward(&layer, &reference(g), seed, per_channel, bias_ratio);
        }

        #[test]
        fn input_backward_q_matches_float(
            g in geometry(),
            seed in any::<u64>(),
            per_channel in any::<bool>(),
        ) {
            let layer = layer(g, Activation::None);
            check_input_backward_q_matches_float(&layer, seed, per_channel, g.out_features);
        }

        #[test]
        fn gradient_q_matches_float(g in geometry(), seed in any::<u64>()) {
            check_gradient_q_matches_float(&layer(g, Activation::None), seed);
        }
    }

    /// The kernels against the plain loops: float within 1e-5 of the sum of absolute
    /// terms, integers exactly (i32 and i64 with per-channel factors).
    fn check_kernels_match_the_reference(g: LinearGeom, seed: u64) {
        let mut rng = Rng::new(seed);
        let (x, w, b) = (
            floats(&mut rng, g.input_len()),
            floats(&mut rng, g.weight_len()),
            floats(&mut rng, g.out_features),
        );
        let e = floats(&mut rng, g.output_len());
        let (ax, aw, ab, ae) = (abs(&x), abs(&w), abs(&b), abs(&e));
        let no_zero = |_: usize| 0.0f32;
        let mut y = vec![0.0; g.output_len()];
        g.forward(&x, &w, &b, &mut y);
        let want = ref_forward(&g, &x, 0.0, &w, &no_zero, &|o| b[o]);
        assert_close(
            &y,
            &want,
            &ref_forward(&g, &ax, 0.0, &aw, &no_zero, &|o| ab[o]),
            1e-5,
        );
        let mut ex = vec![0.0; g.input_len()];
        g.input_backward(&w, &e, ChannelSet::All, &mut ex);
        let want = ref_input_error(&g, &w, &e, 0.0, &|_, v| v);
        let mag = ref_input_error(&g, &aw, &ae, 0.0, &|_, v| v);
        assert_close(&ex, &want, &mag, 1e-5);
        let mut dw = vec![0.0; g.weight_len()];
        g.weight_backward(&x, &e, ChannelSet::All, &mut dw);
        assert_close(
            &dw,
            &ref_weight_grad(&g, &x, 0.0, &e, 0.0),
            &ref_weight_grad(&g, &ax, 0.0, &ae, 0.0),
            1e-5,
        );

        let (xq, wq, eq) = (
            codes(&mut rng, g.input_len()),
            codes(&mut rng, g.weight_len()),
            codes(&mut rng, g.output_len()),
        );
        let (zx, ze) = (zero_point(&mut rng), zero_point(&mut rng));
        let zw: Vec<i32> = (0..g.out_features).map(|_| zero_point(&mut rng)).collect();
        let init: Vec<i32> = (0..g.out_features)
            .map(|_| rng.below(2001) as i32 - 1000)
            .collect();
        let factor: Vec<i64> = (0..g.out_features)
            .map(|_| rng.below(1 << 24) as i64)
            .collect();
        let mut got = vec![0i32; g.output_len()];
        for o in 0..g.out_features {
            let row = &wq[o * g.in_features..][..g.in_features];
            forward_feature(&g, &xq, zx, row, zw[o], init[o], |n, acc| {
                got[n * g.out_features + o] = acc
            });
        }
        assert_eq!(got, ref_forward(&g, &xq, zx, &wq, &|o| zw[o], &|o| init[o]));
        let mut got = vec![0i32; g.input_len()];
        let mut emit = |at: usize, block: &[i32]| got[at..at + block.len()].copy_from_slice(block);
        let parts = WeightParts::whole(&wq[..]);
        input_error(
            &g,
            parts,
            &eq,
            ze,
            ChannelSet::All,
            |o| (zw[o], 1),
            &mut emit,
        );
        assert_eq!(
            got,
            ref_input_error(&g, &wq, &eq, ze, &|o, v| v.term(zw[o]))
        );
        let mut got = vec![0i64; g.input_len()];
        let mut emit = |at: usize, block: &[i64]| got[at..at + block.len()].copy_from_slice(block);
        let channel = |o: usize| (zw[o] as i64, factor[o]);
        input_error(
            &g,
            parts,
            &eq,
            ze as i64,
            ChannelSet::All,
            channel,
            &mut emit,
        );
        let want = ref_input_error(&g, &wq, &eq, ze as i64, &|o, v| {
            v.term(zw[o] as i64) * factor[o]
        });
        assert_eq!(got, want);
        let mut got = vec![0i32; g.weight_len()];
        weight_sums(&g, &xq, zx, &eq, ze, ChannelSet::All, &mut |k, s| {
            got[k] += s
        });
        assert_eq!(got, ref_weight_grad(&g, &xq, zx, &eq, ze));
    }
}
