//! The checks every layer passes through the layer contract ([`Operator`], [`InputError`],
//! [`Parametric`]), written once for all operators; each operator's tests call them on its
//! geometries, with an `f64` reference of its forward where a check needs one ([`Reference`]).
//! The operator-specific checks (kernels against plain loops, hand-computed cases, geometry
//! validation) stay with the operator.
//!
//! - Float backward ([`check_float_backward_matches_finite_differences`]): the input error (and
//!   the residual input's), the weight and the bias gradients equal central differences of
//!   `L = sum(r * clamp(f(x, skip, w, b)))` for a random probe `r`, the clamp being the
//!   layer's [`Operator::output_clamp`] and the output error masked by it as the executor does.
//! - Channel subsets ([`check_channel_subset_restricts_the_full_result`]), weight parts and
//!   channel prefixes ([`check_weight_parts_give_the_whole_tensor_result`]), equal per-channel
//!   scales ([`check_equal_channel_scales_are_the_per_tensor_form`]).
//! - 8-bit against float: the forward ([`check_forward_q_matches_float_forward`]), the input
//!   error ([`check_input_backward_q_matches_float`]) and the gradients
//!   ([`check_gradient_q_matches_float`]).

extern crate std;

use proptest::prelude::*;
use proptest::sample::Index;
use std::vec;
use std::vec::Vec;

use crate::ops::activation::{self, Activation};
use crate::ops::arith::{channel_qparams, Acc, ScaleRatios, Term};
use crate::ops::operator::{
    numel, FloatParams, InputError, Operator, ParamShape, Parametric, QParameters, QWeights,
};
use crate::ops::{ChannelSet, WeightParts};
use crate::quant::{QParams, QTensor, RealRange};
use crate::rng::Rng;

impl Acc for f64 {}

impl Term<f64> for f64 {
    fn term(self, _zero: f64) -> f64 {
        self
    }
}

/// An `f64` reference of a layer's forward before its output clamp:
/// `(x, skip, weight, bias) -> y` (`skip`, `weight` and `bias` empty where the layer has none).
pub(crate) type Reference<'a> = &'a dyn Fn(&[f64], &[f64], &[f64], &[f64]) -> Vec<f64>;

// ---------------------------------------------------------------------------------------------
// Random tensors and comparisons.

/// Uniform in `[-1, 1)`.
pub(crate) fn floats(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| 2.0 * rng.next_f32() - 1.0).collect()
}

/// Uniform codes in `[-128, 127]`.
pub(crate) fn codes(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len)
        .map(|_| (rng.below(256) as i32 - 128) as i8)
        .collect()
}

/// A zero point in `[-30, 30]`.
pub(crate) fn zero_point(rng: &mut Rng) -> i32 {
    rng.below(61) as i32 - 30
}

pub(crate) fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

pub(crate) fn dequantize(codes: &[i8], q: QParams) -> Vec<f32> {
    codes.iter().map(|&c| q.dequantize(c)).collect()
}

/// `|got - want| <= rel * magnitude` element-wise.
pub(crate) fn assert_close(got: &[f32], want: &[f32], magnitude: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len());
    for k in 0..got.len() {
        let tol = rel * magnitude[k] + 1e-30;
        assert!(
            (got[k] - want[k]).abs() <= tol,
            "at {k}: {} vs {}",
            got[k],
            want[k]
        );
    }
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// The fused activations, for layers that take one.
pub(crate) fn activations() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        Just(Activation::Relu6)
    ]
}

/// About half of `0..count`, shuffled.
fn shuffled_subset(rng: &mut Rng, count: usize) -> Vec<u16> {
    let mut subset: Vec<u16> = (0..count as u16).filter(|_| rng.below(2) == 0).collect();
    for k in (1..subset.len()).rev() {
        subset.swap(k, rng.below(k as u32 + 1) as usize);
    }
    subset
}

// ---------------------------------------------------------------------------------------------
// The contract's kernels, called the way the executor calls them.

fn parametric(op: &dyn Operator) -> &dyn Parametric {
    op.parametric().expect("a layer with parameters")
}

fn input_error(op: &dyn Operator) -> &dyn InputError {
    op.input_error()
        .expect("a layer with an input-error kernel")
}

/// The output channel of element `k` of the output.
fn output_channel(op: &dyn Operator, k: usize) -> usize {
    let [channels, h, w] = op.output_shape();
    k / (h * w) % channels
}

/// `v` with the elements of unselected output channels replaced by `zero`.
fn keep_channels<T: Copy>(
    op: &dyn Operator,
    v: &[T],
    chosen: impl Fn(usize) -> bool,
    zero: T,
) -> Vec<T> {
    let channel = |k: usize| output_channel(op, k);
    v.iter()
        .enumerate()
        .map(|(k, &e)| if chosen(channel(k)) { e } else { zero })
        .collect()
}

/// Dequantized weights with per-channel (or per-tensor) qparams.
fn dequantize_weights(shape: ParamShape, w: &[i8], wq: &[QParams]) -> Vec<f32> {
    (0..w.len())
        .map(|k| channel_qparams(wq, k / shape.structure).dequantize(w[k]))
        .collect()
}

/// The float input error of an input `x` (given to kernels that read it), written over NaN so
/// that an element the kernel does not write fails every comparison.
fn input_backward(
    ie: &dyn InputError,
    x: &[f32],
    w: &[f32],
    err: &[f32],
    channels: ChannelSet,
) -> Vec<f32> {
    let mut ex = vec![f32::NAN; x.len()];
    let x = if ie.reads_input() { x } else { &[] };
    ie.input_backward(x, w, err, channels, &mut ex);
    ex
}

/// The 8-bit input error and its range, for an input of `len` elements, written over `fill`
/// (two results compared with different fills show that every element is written).
fn input_backward_q(
    ie: &dyn InputError,
    len: usize,
    fill: i8,
    weight: QWeights,
    err: QTensor,
    channels: ChannelSet,
    ex_q: QParams,
) -> (Vec<i8>, RealRange) {
    let mut ex = vec![fill; len];
    let range = ie.input_backward_q(QTensor::EMPTY, weight, err, channels, ex_q, &mut ex);
    (ex, range)
}

/// `[dL/dx, dL/dskip, dL/dw, dL/db]` for the output error `err` (after the clamp's mask),
/// through the contract; empty where the layer has no such input or parameter. `x` goes to an
/// input-error kernel that reads the input, `x_weights` to the weight gradient.
fn gradients(
    op: &dyn Operator,
    x: &[f32],
    x_weights: &[f32],
    w: &[f32],
    err: &[f32],
) -> [Vec<f32>; 4] {
    let ex = match op.input_error() {
        Some(ie) => input_backward(ie, x, w, err, ChannelSet::All),
        None => err.to_vec(),
    };
    let eskip = match op.skip_from() {
        Some(_) => err.to_vec(),
        None => Vec::new(),
    };
    let (mut dw, mut db) = (vec![0.0; w.len()], Vec::new());
    if let Some(p) = op.parametric() {
        db = vec![0.0; p.param_shape().channels];
        p.weight_backward(x_weights, err, ChannelSet::All, &mut dw);
        p.bias_backward(err, ChannelSet::All, &mut db);
    }
    [ex, eskip, dw, db]
}

// ---------------------------------------------------------------------------------------------
// Float.

/// Each float gradient against central differences of
/// `L = sum(r * clamp(reference(x, skip, w, b)))` in `f64`: relative error below 1e-3 of the
/// largest of the difference and the magnitude of its terms (the backward of the absolute
/// values), at six random elements of every tensor. The step is `1e-3`, or down to `1e-6`
/// where `L` has a kink within it (an output crosses a clamp bound, or the one-sided
/// differences disagree by over 1e-4 of that scale: a change of the max-pooling argmax); an
/// element with a kink within every step is replaced by another, and every tensor gets at
/// least one.
pub(crate) fn check_float_backward_matches_finite_differences(
    op: &dyn Operator,
    reference: Reference,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let params = op.parametric().map(|p| p.param_shape());
    let x = floats(&mut rng, op.input_len());
    let skip = floats(&mut rng, op.skip_from().map_or(0, |_| op.output_len()));
    let w = floats(&mut rng, params.map_or(0, |s| s.weight_len()));
    let b = floats(&mut rng, params.map_or(0, |s| s.channels));
    let r = floats(&mut rng, op.output_len());

    let clamp = op.output_clamp().unwrap_or(Activation::None);
    let mut y = vec![0.0; op.output_len()];
    let params_f = FloatParams {
        weight: &w,
        bias: &b,
    };
    op.forward(&x, &skip, params_f, &mut y);
    let mut err = r.clone();
    activation::backward(clamp, &y, &mut err);
    let analytic = gradients(op, &x, &x, &w, &err);
    let magnitude = gradients(op, &x, &abs(&x), &abs(&w), &abs(&err));

    let (lo, hi) = clamp.real_bounds();
    let (lo, hi) = (lo as f64, hi as f64);
    // The reference outputs before the clamp, and the clamp's piece of each (below, inside,
    // above its bounds).
    let raw = |p: &[Vec<f64>; 4]| reference(&p[0], &p[1], &p[2], &p[3]);
    let clamped = |y: &[f64]| -> Vec<f64> { y.iter().map(|&v| v.max(lo).min(hi)).collect() };
    let piece = |v: f64| (v > lo) as u8 + (v >= hi) as u8;
    // The change of L between two outputs, summed per output: the outputs a step leaves alone
    // are the same bits and drop out, so the rounding of L's other terms does not enter.
    let r64 = wide(&r);
    let change = |a: &[f64], b: &[f64]| -> f64 {
        a.iter()
            .zip(b)
            .zip(&r64)
            .map(|((a, b), r)| (a - b) * r)
            .sum()
    };
    let point = [wide(&x), wide(&skip), wide(&w), wide(&b)];
    let raw_at = raw(&point);
    let at = clamped(&raw_at);
    for (which, (analytic, magnitude)) in analytic.iter().zip(&magnitude).enumerate() {
        if analytic.is_empty() {
            continue;
        }
        let mut checked = 0;
        for _ in 0..24 {
            if checked == 6 {
                break;
            }
            let k = rng.below(analytic.len() as u32) as usize;
            let moved = |step: f64| {
                let mut p = point.clone();
                p[which][k] += step;
                raw(&p)
            };
            // The central difference of the largest step over which L has no kink: no output
            // crosses a clamp bound (crossings on both sides could cancel in the one-sided
            // differences), and the one-sided differences agree (other kinks, such as a change
            // of the max-pooling argmax).
            let differentiable = [1e-3, 1e-4, 1e-5, 1e-6].into_iter().find_map(|h| {
                let (raw_up, raw_down) = (moved(h), moved(-h));
                let crosses = (0..raw_at.len()).any(|o| {
                    let at = piece(raw_at[o]);
                    piece(raw_up[o]) != at || piece(raw_down[o]) != at
                });
                let (up, down) = (clamped(&raw_up), clamped(&raw_down));
                let fd = change(&up, &down) / (2.0 * h);
                let scale = fd.abs().max(magnitude[k] as f64).max(1e-6);
                let kink = (change(&up, &at) - change(&at, &down)).abs() / h > 1e-4 * scale;
                (!crosses && !kink).then_some((fd, scale))
            });
            let Some((fd, scale)) = differentiable else {
                continue;
            };
            let err = (analytic[k] as f64 - fd).abs() / scale;
            assert!(err < 1e-3, "tensor {which} at {k}: {} vs {fd}", analytic[k]);
            checked += 1;
        }
        assert!(checked > 0, "tensor {which}: no differentiable element");
    }
}

/// A channel subset gives exactly the full gradients on its channels and leaves the others'
/// alone; its input error is the full input error of the error with the other channels
/// zeroed (float within 1e-5 of the magnitude, 8-bit exactly with per-tensor and per-channel
/// weight scales, ranges included).
pub(crate) fn check_channel_subset_restricts_the_full_result(op: &dyn Operator, seed: u64) {
    let (p, ie) = (parametric(op), input_error(op));
    let shape = p.param_shape();
    let mut rng = Rng::new(seed);
    let subset = shuffled_subset(&mut rng, shape.channels);
    let chosen = |o: usize| subset.contains(&(o as u16));
    let some = ChannelSet::Subset(&subset);
    let (x, w, e) = (
        floats(&mut rng, op.input_len()),
        floats(&mut rng, shape.weight_len()),
        floats(&mut rng, op.output_len()),
    );
    let (dw0, db0) = (
        floats(&mut rng, shape.weight_len()),
        floats(&mut rng, shape.channels),
    );
    // Gradients over the subset: the full ones on its channels, the others untouched.
    let check_restricted = |weight: &dyn Fn(ChannelSet, &mut [f32]),
                            bias: &dyn Fn(ChannelSet, &mut [f32])| {
        let (mut dw_all, mut dw_some) = (dw0.clone(), dw0.clone());
        weight(ChannelSet::All, &mut dw_all);
        weight(some, &mut dw_some);
        for k in 0..dw0.len() {
            let chosen = chosen(k / shape.structure);
            assert_eq!(dw_some[k], if chosen { dw_all[k] } else { dw0[k] });
        }
        let (mut db_all, mut db_some) = (db0.clone(), db0.clone());
        bias(ChannelSet::All, &mut db_all);
        bias(some, &mut db_some);
        for o in 0..db0.len() {
            assert_eq!(db_some[o], if chosen(o) { db_all[o] } else { db0[o] });
        }
    };
    check_restricted(
        &|set, grad| p.weight_backward(&x, &e, set, grad),
        &|set, grad| p.bias_backward(&e, set, grad),
    );
    let masked = keep_channels(op, &e, chosen, 0.0);
    let ex_all = input_backward(ie, &x, &w, &masked, ChannelSet::All);
    let ex_some = input_backward(ie, &x, &w, &e, some);
    let magnitude = input_backward(ie, &x, &abs(&w), &abs(&e), ChannelSet::All);
    assert_close(&ex_some, &ex_all, &magnitude, 1e-5);

    // 8-bit.
    let (xq, wq, eq) = (
        codes(&mut rng, op.input_len()),
        codes(&mut rng, shape.weight_len()),
        codes(&mut rng, op.output_len()),
    );
    let (x_q, e_q) = (
        QParams::from_range(-1.0, 3.0),
        QParams::from_range(-0.2, 0.1),
    );
    let ex_q = QParams::from_range(-0.5, 0.5);
    let eq_masked = keep_channels(op, &eq, chosen, e_q.zero_point as i8);
    let per_channel: Vec<QParams> = (0..shape.channels)
        .map(|o| QParams {
            scale: 0.001 * (1 + o) as f32,
            zero_point: o as i32 - 1,
        })
        .collect();
    for weight_q in [&per_channel[..1], &per_channel[..]] {
        let weight = QWeights {
            codes: WeightParts::whole(&wq),
            q: weight_q,
        };
        let len = op.input_len();
        let masked = QTensor {
            codes: &eq_masked,
            q: e_q,
        };
        let all = input_backward_q(ie, len, 0, weight, masked, ChannelSet::All, ex_q);
        let err = QTensor { codes: &eq, q: e_q };
        assert_eq!(input_backward_q(ie, len, 1, weight, err, some, ex_q), all);
    }
    let (xt, et) = (
        QTensor { codes: &xq, q: x_q },
        QTensor { codes: &eq, q: e_q },
    );
    check_restricted(
        &|set, grad| p.weight_backward_q(xt, et, set, grad),
        &|set, grad| p.bias_backward_q(et, set, grad),
    );
}

// ---------------------------------------------------------------------------------------------
// Weights in parts, channel prefixes, per-channel scales.

/// Weights split into two parts at output channel `split` give exactly the whole-tensor
/// 8-bit forward and input error (all channels and a subset), ranges included. At batch 1,
/// when the first `split` channels form a layer (`channel_prefix`, the operator's inherent
/// method of that name), its 8-bit
/// forward and weight gradient on the prefixes of the input and error are the prefixes of
/// the whole layer's.
pub(crate) fn check_weight_parts_give_the_whole_tensor_result<L: Operator>(
    layer: &L,
    channel_prefix: impl Fn(&L, usize) -> Option<L>,
    seed: u64,
    split: Index,
) {
    let op: &dyn Operator = layer;
    let (p, ie) = (parametric(op), input_error(op));
    let shape = p.param_shape();
    let mut rng = Rng::new(seed);
    let (w, e) = (
        codes(&mut rng, shape.weight_len()),
        codes(&mut rng, op.output_len()),
    );
    let wq = [QParams {
        scale: 0.02,
        zero_point: zero_point(&mut rng),
    }];
    let e_q = QParams::from_range(-1.0, 0.7);
    let ex_q = QParams::from_range(-2.0, 2.5);
    let subset: Vec<u16> = (0..shape.channels as u16)
        .filter(|_| rng.below(3) > 0)
        .collect();
    let channels = split.index(shape.channels + 1);
    let at = channels * shape.structure;
    let whole = QWeights {
        codes: WeightParts::whole(&w),
        q: &wq,
    };
    let parts = QWeights {
        codes: WeightParts {
            head: &w[..at],
            tail: &w[at..],
        },
        q: &wq,
    };
    let err = QTensor { codes: &e, q: e_q };
    for set in [ChannelSet::All, ChannelSet::Subset(&subset)] {
        let len = op.input_len();
        assert_eq!(
            input_backward_q(ie, len, 1, parts, err, set, ex_q),
            input_backward_q(ie, len, 0, whole, err, set, ex_q)
        );
    }
    let x = codes(&mut rng, op.input_len());
    let input = QTensor {
        codes: &x,
        q: QParams {
            scale: 0.03,
            zero_point: zero_point(&mut rng),
        },
    };
    let bias: Vec<i32> = (0..shape.channels)
        .map(|_| rng.below(2001) as i32 - 1000)
        .collect();
    let y_q = QParams::from_range(-3.0, 4.0);
    let forward = |op: &dyn Operator, input, weight, bias, fill| {
        let params = QParameters {
            weight,
            bias,
            bias_scale: 0.0005,
        };
        let mut y = vec![fill; op.output_len()];
        let range = op.forward_q(input, QTensor::EMPTY, params, y_q, &mut y);
        (y, range)
    };
    let (y, range) = forward(op, input, whole, &bias, 0);
    assert_eq!(forward(op, input, parts, &bias, 1), (y.clone(), range));

    let batch = op.output_len() / numel(op.output_shape());
    let Some(prefix) = channel_prefix(layer, channels).filter(|_| batch == 1) else {
        return;
    };
    let prefix: &dyn Operator = &prefix;
    assert_eq!(parametric(prefix).param_shape().weight_len(), at);
    let x_part = QTensor {
        codes: &x[..prefix.input_len()],
        ..input
    };
    let head = QWeights {
        codes: WeightParts::whole(&w[..at]),
        q: &wq,
    };
    let (y_part, _) = forward(prefix, x_part, head, &bias[..channels], 1);
    assert_eq!(&y_part, &y[..prefix.output_len()]);
    let e_part = QTensor {
        codes: &e[..prefix.output_len()],
        q: e_q,
    };
    let mut full = vec![0.0f32; shape.weight_len()];
    p.weight_backward_q(input, err, ChannelSet::All, &mut full);
    let mut part = vec![0.0f32; at];
    parametric(prefix).weight_backward_q(x_part, e_part, ChannelSet::All, &mut part);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&part), bits(&full[..at]));
}

/// A bias that saturates the accumulator (a tiny `s_a = s_x * s_w` makes any bias large) plus
/// the largest sums of products neither overflows nor wraps: with the largest positive
/// products every output is the top code under a bias of `+inf` and the bottom code under
/// `-inf`, and the real range reports the saturated accumulator.
pub(crate) fn check_a_saturated_bias_saturates_the_output(op: &dyn Operator) {
    let shape = parametric(op).param_shape();
    // Codes 127 with zero point -128: every product is 255 * 255.
    let top = QParams {
        scale: 1.0,
        zero_point: -128,
    };
    let (x, w) = (vec![127i8; op.input_len()], vec![127i8; shape.weight_len()]);
    let y_q = QParams {
        scale: 1.0,
        zero_point: 0,
    };
    for (bias, code) in [(i32::MAX, 127), (i32::MIN, -128)] {
        let params = QParameters {
            weight: QWeights {
                codes: WeightParts::whole(&w),
                q: &[top],
            },
            bias: &vec![bias; shape.channels],
            bias_scale: 1e6,
        };
        let mut y = vec![0i8; op.output_len()];
        let x = QTensor { codes: &x, q: top };
        let range = op.forward_q(x, QTensor::EMPTY, params, y_q, &mut y);
        assert!(y.iter().all(|&c| c == code), "bias {bias}: {y:?}");
        if bias == i32::MAX {
            assert_eq!(range.max, i32::MAX as f32);
        }
    }
}

/// Per-channel weight qparams that all have one scale give exactly the per-tensor input
/// error (the exact `i32` form, not the ratio scheme).
pub(crate) fn check_equal_channel_scales_are_the_per_tensor_form(op: &dyn Operator, seed: u64) {
    let (p, ie) = (parametric(op), input_error(op));
    let shape = p.param_shape();
    let mut rng = Rng::new(seed);
    let (w, e) = (
        codes(&mut rng, shape.weight_len()),
        codes(&mut rng, op.output_len()),
    );
    let one = QParams {
        scale: 0.013,
        zero_point: 0,
    };
    let err = QTensor {
        codes: &e,
        q: QParams::from_range(-1.0, 0.7),
    };
    let ex_q = QParams::from_range(-2.0, 2.5);
    let run = |q: &[QParams], fill| {
        let weight = QWeights {
            codes: WeightParts::whole(&w),
            q,
        };
        input_backward_q(ie, op.input_len(), fill, weight, err, ChannelSet::All, ex_q)
    };
    assert_eq!(run(&[one], 0), run(&vec![one; shape.channels], 1));
}

// ---------------------------------------------------------------------------------------------
// 8-bit against float.

/// The 8-bit forward against the reference forward on the dequantized tensors. Bound, in
/// output steps: 1/2 (output rounding) + `s_a / (2 s_y)` (the bias requantized to the
/// accumulator scale `s_a` is off by at most half a unit) + 1e-5 of the sum of absolute terms
/// (float rounding) + 1e-6 relative (fixed-point multipliers). The range is the float one
/// after the clamp within the same real error.
pub(crate) fn check_forward_q_matches_float_forward(
    op: &dyn Operator,
    reference: Reference,
    seed: u64,
    per_channel: bool,
    bias_ratio: f32,
) {
    let shape = parametric(op).param_shape();
    let activation = op.output_clamp().unwrap_or(Activation::None);
    let mut rng = Rng::new(seed);
    let (x, w) = (
        codes(&mut rng, op.input_len()),
        codes(&mut rng, shape.weight_len()),
    );
    let x_q = QParams {
        scale: 0.005 + 0.05 * rng.next_f32(),
        zero_point: zero_point(&mut rng),
    };
    let channels = if per_channel { shape.channels } else { 1 };
    let weight_q: Vec<QParams> = (0..channels)
        .map(|_| QParams {
            scale: 0.002 + 0.02 * rng.next_f32(),
            zero_point: zero_point(&mut rng) / 4,
        })
        .collect();
    let bias: Vec<i32> = (0..shape.channels)
        .map(|_| rng.below(20001) as i32 - 10000)
        .collect();
    let bias_scale = x_q.scale * weight_q[0].scale * bias_ratio;
    let (xf, wf) = (
        dequantize(&x, x_q),
        dequantize_weights(shape, &w, &weight_q),
    );
    let bf: Vec<f32> = bias.iter().map(|&b| bias_scale * b as f32).collect();
    let single = |v: Vec<f64>| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let yf = single(reference(&wide(&xf), &[], &wide(&wf), &wide(&bf)));
    let (ax, aw, ab) = (wide(&abs(&xf)), wide(&abs(&wf)), wide(&abs(&bf)));
    let mag = single(reference(&ax, &[], &aw, &ab));
    let float_range = RealRange::of(&yf);
    let y_q = QParams::from_range(0.8 * float_range.min, 0.8 * float_range.max);
    let params = QParameters {
        weight: QWeights {
            codes: WeightParts::whole(&w),
            q: &weight_q,
        },
        bias: &bias,
        bias_scale,
    };
    let mut y = vec![0i8; op.output_len()];
    let input = QTensor { codes: &x, q: x_q };
    let range = op.forward_q(input, QTensor::EMPTY, params, y_q, &mut y);

    let (code_lo, code_hi) = activation.code_bounds(y_q);
    let (real_lo, real_hi) = activation.real_bounds();
    let mut want_range = RealRange::EMPTY;
    let mut range_tol = 0.0f32;
    for k in 0..y.len() {
        let s_a = x_q.scale * channel_qparams(&weight_q, output_channel(op, k)).scale;
        let exact = y_q.zero_point as f32 + yf[k] / y_q.scale;
        let want = exact.clamp(code_lo as f32, code_hi as f32);
        let bound =
            0.5 + 0.5 * s_a / y_q.scale * 1.000_01 + 1e-5 * mag[k] / y_q.scale + 1e-6 * exact.abs();
        assert!(
            (y[k] as f32 - want).abs() <= bound,
            "at {}: {} vs {} (bound {})",
            k,
            y[k],
            want,
            bound
        );
        want_range.include(yf[k].max(real_lo).min(real_hi));
        range_tol = range_tol.max(0.5 * s_a * 1.000_01 + 1e-5 * mag[k]);
    }
    assert!(
        (range.min - want_range.min).abs() <= range_tol,
        "{:?} {:?}",
        range,
        want_range
    );
    assert!(
        (range.max - want_range.max).abs() <= range_tol,
        "{:?} {:?}",
        range,
        want_range
    );
}

/// The 8-bit input error against the float one on dequantized tensors. Per-tensor bound: 1/2
/// step + 1e-5 of the absolute terms + 1e-6 relative. Per channel, the ratio scheme adds half
/// a narrowed unit `2^(E+shift) * s_e` and one unit `2^E * s_e` per unit of
/// `sum |(w - z_w)(e - z_e)|` (each ratio is truncated by under 1); `error_terms` is the bound
/// on the products of one sum that the kernel gives the scheme (it fixes the shift).
pub(crate) fn check_input_backward_q_matches_float(
    op: &dyn Operator,
    seed: u64,
    per_channel: bool,
    error_terms: usize,
) {
    let (shape, ie) = (parametric(op).param_shape(), input_error(op));
    let mut rng = Rng::new(seed);
    let (w, e) = (
        codes(&mut rng, shape.weight_len()),
        codes(&mut rng, op.output_len()),
    );
    let channels = if per_channel { shape.channels } else { 1 };
    let weight_q: Vec<QParams> = (0..channels)
        .map(|_| QParams {
            scale: libm::ldexpf(0.5 + 0.5 * rng.next_f32(), rng.below(7) as i32 - 9),
            zero_point: zero_point(&mut rng) / 4,
        })
        .collect();
    let e_q = QParams {
        scale: 0.001 + 0.01 * rng.next_f32(),
        zero_point: zero_point(&mut rng),
    };
    let (wf, ef) = (
        dequantize_weights(shape, &w, &weight_q),
        dequantize(&e, e_q),
    );
    let no_input = vec![0.0; op.input_len()];
    let exf = input_backward(ie, &no_input, &wf, &ef, ChannelSet::All);
    let mag = input_backward(ie, &no_input, &abs(&wf), &abs(&ef), ChannelSet::All);
    // sum |(w - z_w)(e - z_e)| of every input element: integer terms, summed exactly in f32
    // (every sum of the tested geometries stays below 2^24).
    let zw = |k: usize| channel_qparams(&weight_q, k / shape.structure).zero_point;
    let w_abs: Vec<f32> = (0..w.len())
        .map(|k| (w[k] as i32 - zw(k)).abs() as f32)
        .collect();
    let e_abs: Vec<f32> = e
        .iter()
        .map(|&v| (v as i32 - e_q.zero_point).abs() as f32)
        .collect();
    let int_abs = input_backward(ie, &no_input, &w_abs, &e_abs, ChannelSet::All);
    let float_range = RealRange::of(&exf);
    let ex_q = QParams::from_range(0.8 * float_range.min, 0.8 * float_range.max);
    let weight = QWeights {
        codes: WeightParts::whole(&w),
        q: &weight_q,
    };
    let err = QTensor { codes: &e, q: e_q };
    let len = op.input_len();
    let (ex, range) = input_backward_q(ie, len, 0, weight, err, ChannelSet::All, ex_q);

    let distinct = weight_q.iter().any(|q| q.scale != weight_q[0].scale);
    let ratios = ScaleRatios::new(&weight_q, error_terms);
    let s_e = e_q.scale as f64;
    let mut range_tol = 0.0f64;
    for k in 0..ex.len() {
        let mut real_err = 1e-5 * mag[k] as f64;
        if distinct {
            real_err += 0.5 * ratios.unit() * s_e
                + libm::ldexp(1.0, ratios.exponent) * s_e * int_abs[k] as f64;
        }
        let exact = ex_q.zero_point as f64 + exf[k] as f64 / ex_q.scale as f64;
        let want = exact.clamp(-128.0, 127.0);
        let bound = 0.5 + real_err / ex_q.scale as f64 + 1e-6 * exact.abs();
        assert!(
            (ex[k] as f64 - want).abs() <= bound,
            "at {}: {} vs {} (bound {})",
            k,
            ex[k],
            want,
            bound
        );
        range_tol = range_tol.max(real_err * 1.000_01);
    }
    assert!((range.min as f64 - float_range.min as f64).abs() <= range_tol + 1e-30);
    assert!((range.max as f64 - float_range.max as f64).abs() <= range_tol + 1e-30);
}

/// 8-bit weight and bias gradients equal the float ones on dequantized tensors up to float
/// rounding (1e-5 of the magnitude: they are exact integer sums times one scale).
pub(crate) fn check_gradient_q_matches_float(op: &dyn Operator, seed: u64) {
    let p = parametric(op);
    let shape = p.param_shape();
    let mut rng = Rng::new(seed);
    let (x, e) = (
        codes(&mut rng, op.input_len()),
        codes(&mut rng, op.output_len()),
    );
    let x_q = QParams {
        scale: 0.02 * rng.next_f32() + 0.001,
        zero_point: zero_point(&mut rng),
    };
    let e_q = QParams {
        scale: 0.002 * rng.next_f32() + 1e-4,
        zero_point: zero_point(&mut rng),
    };
    let (xf, ef) = (dequantize(&x, x_q), dequantize(&e, e_q));
    let (xt, et) = (QTensor { codes: &x, q: x_q }, QTensor { codes: &e, q: e_q });
    let (dw0, db0) = (
        floats(&mut rng, shape.weight_len()),
        floats(&mut rng, shape.channels),
    );
    let (mut dw, mut dwf) = (dw0.clone(), dw0.clone());
    p.weight_backward_q(xt, et, ChannelSet::All, &mut dw);
    p.weight_backward(&xf, &ef, ChannelSet::All, &mut dwf);
    let mut mag = abs(&dw0);
    p.weight_backward(&abs(&xf), &abs(&ef), ChannelSet::All, &mut mag);
    assert_close(&dw, &dwf, &mag, 1e-5);
    let (mut db, mut dbf) = (db0.clone(), db0.clone());
    p.bias_backward_q(et, ChannelSet::All, &mut db);
    p.bias_backward(&ef, ChannelSet::All, &mut dbf);
    let mut mag = abs(&db0);
    p.bias_backward(&abs(&ef), ChannelSet::All, &mut mag);
    assert_close(&db, &dbf, &mag, 1e-5);
}
