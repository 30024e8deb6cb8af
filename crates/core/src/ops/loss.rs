//! Losses with their output errors (`dL/d prediction`), and the argmax used for accuracy.
//!
//! Losses are computed in float on both targets (`libm::expf`/`libm::logf`, so host and MCU
//! agree); the quantized forms dequantize their inputs, run the same float code and quantize
//! the error. Every loss returns the SUM over the batch and its error is NOT divided by the
//! batch size: the caller scales (for example by the learning rate or `1 / batch`).
//! No function here needs scratch memory.

use crate::quant::{QParams, RealRange};

/// Softmax cross-entropy of one sample; `write_err(j, softmax_j - [j == label])` for every
/// class. Stable: `L = log(sum_j exp(l_j - m)) - (l_label - m)` with `m = max_j l_j`.
fn softmax_ce_sample(
    classes: usize,
    label: usize,
    logit: impl Fn(usize) -> f32,
    mut write_err: impl FnMut(usize, f32),
) -> f32 {
    debug_assert!(label < classes, "label {label} >= classes {classes}");
    let max = (0..classes).map(&logit).fold(f32::NEG_INFINITY, f32::max);
    let sum = (0..classes).fold(0.0f32, |s, j| s + libm::expf(logit(j) - max));
    for j in 0..classes {
        let onehot = if j == label { 1.0 } else { 0.0 };
        write_err(j, libm::expf(logit(j) - max) / sum - onehot);
    }
    libm::logf(sum) - (logit(label) - max)
}

/// Softmax cross-entropy over `[batch][classes]` logits, `batch = labels.len()`:
/// `L = sum_n ( log(sum_j exp(l_nj)) - l_n,label_n )`, computed with the per-sample maximum
/// subtracted. Writes `err[n][j] = softmax(l_n)_j - [j == label_n]` (not divided by the batch)
/// and returns `L`, the sum of the per-sample losses. Scratch: none.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u16],
    classes: usize,
    err: &mut [f32],
) -> f32 {
    debug_assert_eq!(logits.len(), labels.len() * classes);
    debug_assert_eq!(err.len(), logits.len());
    let mut total = 0.0f32;
    for ((sample, e), &label) in logits
        .chunks_exact(classes)
        .zip(err.chunks_exact_mut(classes))
        .zip(labels)
    {
        total += softmax_ce_sample(classes, label as usize, |j| sample[j], |j, v| e[j] = v);
    }
    total
}

/// Softmax cross-entropy of quantized logits: the float loss of the dequantized logits
/// `l = s_l * (q_l - z_l)`, with the error quantized to `err_q`,
/// `err = clamp(z_err + round((softmax_j - [j == label]) / s_err), -128, 127)`.
/// Returns `(L, range)`: the loss sum and the real range of the error before quantization
/// (within `[-1, 1]`). Scratch: none.
pub fn softmax_cross_entropy_q(
    logits: &[i8],
    logits_q: QParams,
    labels: &[u16],
    classes: usize,
    err_q: QParams,
    err: &mut [i8],
) -> (f32, RealRange) {
    debug_assert_eq!(logits.len(), labels.len() * classes);
    debug_assert_eq!(err.len(), logits.len());
    let mut total = 0.0f32;
    let mut range = RealRange::EMPTY;
    for ((sample, e), &label) in logits
        .chunks_exact(classes)
        .zip(err.chunks_exact_mut(classes))
        .zip(labels)
    {
        total += softmax_ce_sample(
            classes,
            label as usize,
            |j| logits_q.dequantize(sample[j]),
            |j, v| {
                range.include(v);
                e[j] = err_q.quantize(v);
            },
        );
    }
    (total, range)
}

/// Mean squared error of `[batch][per_sample]` predictions:
/// `L = sum_n (1/per_sample) * sum_i (p_ni - t_ni)^2` (mean over a sample's elements, summed
/// over the batch). Writes `err = 2 (p - t) / per_sample` and returns `L`. Scratch: none.
pub fn mean_squared_error(pred: &[f32], target: &[f32], per_sample: usize, err: &mut [f32]) -> f32 {
    debug_assert_eq!(pred.len(), target.len());
    debug_assert_eq!(pred.len(), err.len());
    debug_assert!(per_sample > 0);
    debug_assert_eq!(pred.len() % per_sample, 0);
    squared_error_sum(
        pred.len(),
        per_sample,
        |i| (pred[i], target[i]),
        |i, v| err[i] = v,
    )
}

/// Mean squared error of quantized predictions against quantized targets (for example the
/// input image of an autoencoder): the float loss of `p = s_p (q_p - z_p)` and
/// `t = s_t (q_t - z_t)`, with the error `2 (p - t) / per_sample` quantized to `err_q`.
/// Returns `(L, range)`: the loss sum and the real range of the error before quantization.
/// Scratch: none.
pub fn mean_squared_error_q(
    pred: &[i8],
    pred_q: QParams,
    target: &[i8],
    target_q: QParams,
    per_sample: usize,
    err_q: QParams,
    err: &mut [i8],
) -> (f32, RealRange) {
    debug_assert_eq!(pred.len(), target.len());
    debug_assert_eq!(pred.len(), err.len());
    debug_assert!(per_sample > 0);
    debug_assert_eq!(pred.len() % per_sample, 0);
    let mut range = RealRange::EMPTY;
    let total = squared_error_sum(
        pred.len(),
        per_sample,
        |i| (pred_q.dequantize(pred[i]), target_q.dequantize(target[i])),
        |i, v| {
            range.include(v);
            err[i] = err_q.quantize(v);
        },
    );
    (total, range)
}

/// `sum_i (p_i - t_i)^2 / per_sample` over `len` elements given by `pair(i) = (p_i, t_i)`;
/// `write_err(i, 2 (p_i - t_i) / per_sample)`.
fn squared_error_sum(
    len: usize,
    per_sample: usize,
    pair: impl Fn(usize) -> (f32, f32),
    mut write_err: impl FnMut(usize, f32),
) -> f32 {
    let n = per_sample as f32;
    let mut total = 0.0f32;
    for i in 0..len {
        let (p, t) = pair(i);
        let d = p - t;
        total += d * d / n;
        write_err(i, 2.0 * d / n);
    }
    total
}

/// Index of the first largest value (0 for an empty slice); NaN never wins over a number
/// before it. Scratch: none.
pub fn argmax(values: &[f32]) -> usize {
    first_max(values)
}

/// Index of the first largest code (0 for an empty slice); with one positive scale this is
/// also the argmax of the real values. Scratch: none.
pub fn argmax_q(values: &[i8]) -> usize {
    first_max(values)
}

fn first_max<T: Copy + PartialOrd>(values: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate().skip(1) {
        if v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::quant::{dequantize_slice, quantize_slice};
    use crate::rng::Rng;
    use std::vec::Vec;

    fn uniform(rng: &mut Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| lo + (hi - lo) * rng.next_f32()).collect()
    }

    fn reference_ce(logits: &[f64], labels: &[u16], classes: usize) -> f64 {
        logits
            .chunks(classes)
            .zip(labels)
            .map(|(l, &y)| l.iter().map(|v| v.exp()).sum::<f64>().ln() - l[y as usize])
            .sum()
    }

    fn reference_mse(pred: &[f64], target: &[f32], per_sample: usize) -> f64 {
        pred.iter()
            .zip(target)
            .map(|(&p, &t)| (p - t as f64) * (p - t as f64) / per_sample as f64)
            .sum()
    }

    /// Central differences of the `f64` reference `loss` at `x` against `analytic`.
    fn assert_gradient(loss: impl Fn(&[f64]) -> f64, x: &[f32], analytic: &[f32]) {
        let h = 1e-4;
        let mut xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for i in 0..x.len() {
            let keep = xd[i];
            xd[i] = keep + h;
            let up = loss(&xd);
            xd[i] = keep - h;
            let down = loss(&xd);
            xd[i] = keep;
            let fd = (up - down) / (2.0 * h);
            let got = analytic[i] as f64;
            assert!(
                (fd - got).abs() <= 1e-3 * fd.abs().max(got.abs()) + 1e-6,
                "{i}: fd={fd} got={got}"
            );
        }
    }

    #[test]
    fn cross_entropy_gradient_and_value() {
        let mut rng = Rng::new(1);
        let (batch, classes) = (3, 7);
        // Large offsets check the max subtraction.
        let mut logits = uniform(&mut rng, batch * classes, -4.0, 4.0);
        logits[3] += 80.0;
        let labels = [2u16, 6, 0];
        let mut err = std::vec![0.0f32; logits.len()];
        let loss = softmax_cross_entropy(&logits, &labels, classes, &mut err);
        let ld: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let expect = reference_ce(&ld, &labels, classes);
        assert!(
            (loss as f64 - expect).abs() <= 1e-4 * expect.abs(),
            "{loss} {expect}"
        );
        assert_gradient(|x| reference_ce(x, &labels, classes), &logits, &err);
        for sample in err.chunks(classes) {
            assert!(sample.iter().sum::<f32>().abs() < 1e-6);
        }
    }

    #[test]
    fn cross_entropy_of_equal_logits_is_log_classes() {
        let mut err = [0.0f32; 4];
        let loss = softmax_cross_entropy(&[0.5; 4], &[1], 4, &mut err);
        assert!((loss - libm::logf(4.0)).abs() < 1e-6);
        assert_eq!(err, [0.25, -0.75, 0.25, 0.25]);
    }

    #[test]
    fn cross_entropy_q_is_float_math_on_dequantized_logits() {
        let mut rng = Rng::new(2);
        let (batch, classes) = (4, 10);
        let logits_q = QParams {
            scale: 0.08,
            zero_point: -3,
        };
        let err_q = QParams::from_range(-1.0, 1.0);
        let raw = uniform(&mut rng, batch * classes, -6.0, 6.0);
        let mut codes = std::vec![0i8; raw.len()];
        quantize_slice(&raw, logits_q, &mut codes);
        let mut logits = std::vec![0.0f32; raw.len()];
        dequantize_slice(&codes, logits_q, &mut logits);
        let labels = [0u16, 9, 4, 4];

        let mut err = std::vec![0.0f32; raw.len()];
        let loss = softmax_cross_entropy(&logits, &labels, classes, &mut err);
        let mut err_codes = std::vec![0i8; raw.len()];
        let (loss_q, range) =
            softmax_cross_entropy_q(&codes, logits_q, &labels, classes, err_q, &mut err_codes);
        assert_eq!(loss_q, loss);
        assert_eq!(range, RealRange::of(&err));
        for (&c, &e) in err_codes.iter().zip(&err) {
            assert!((err_q.dequantize(c) - e).abs() <= 0.5 * err_q.scale + 1e-6);
        }
    }

    #[test]
    fn mse_gradient_value_and_quantized_form() {
        let mut rng = Rng::new(4);
        let per_sample = 6;
        let pred = uniform(&mut rng, 3 * per_sample, -2.0, 2.0);
        let target = uniform(&mut rng, pred.len(), -2.0, 2.0);
        let mut err = std::vec![0.0f32; pred.len()];
        let loss = mean_squared_error(&pred, &target, per_sample, &mut err);
        let pd: Vec<f64> = pred.iter().map(|&v| v as f64).collect();
        let expect = reference_mse(&pd, &target, per_sample);
        assert!((loss as f64 - expect).abs() <= 1e-5 * expect);
        assert_gradient(|x| reference_mse(x, &target, per_sample), &pred, &err);

        let q = QParams::from_range(-2.0, 2.0);
        let err_q = QParams::from_range(-1.4, 1.4);
        let (mut pc, mut tc) = (std::vec![0i8; pred.len()], std::vec![0i8; pred.len()]);
        quantize_slice(&pred, q, &mut pc);
        quantize_slice(&target, q, &mut tc);
        let (mut pf, mut tf) = (std::vec![0.0f32; pred.len()], std::vec![0.0f32; pred.len()]);
        dequantize_slice(&pc, q, &mut pf);
        dequantize_slice(&tc, q, &mut tf);
        let loss_f = mean_squared_error(&pf, &tf, per_sample, &mut err);
        let mut err_codes = std::vec![0i8; pred.len()];
        let (loss_q, range) =
            mean_squared_error_q(&pc, q, &tc, q, per_sample, err_q, &mut err_codes);
        assert_eq!(loss_q, loss_f);
        assert_eq!(range, RealRange::of(&err));
        for (&c, &e) in err_codes.iter().zip(&err) {
            assert!((err_q.dequantize(c) - e).abs() <= 0.5 * err_q.scale + 1e-6);
        }
    }

    #[test]
    fn mse_hand_computed() {
        let mut err = [0.0f32; 4];
        // Two samples of two: ((1-0)^2 + (2-4)^2)/2 + ((0-0)^2 + (-1-1)^2)/2 = 2.5 + 2 = 4.5.
        let loss = mean_squared_error(&[1.0, 2.0, 0.0, -1.0], &[0.0, 4.0, 0.0, 1.0], 2, &mut err);
        assert_eq!(loss, 4.5);
        assert_eq!(err, [1.0, -2.0, 0.0, -2.0]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax_q(&[-128, 7, 7, 6]), 1);
        assert_eq!(argmax_q(&[-5, -6, 100]), 2);
    }
}
