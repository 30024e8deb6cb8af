//! Parameter update rules: float SGD with momentum, the fully quantized update with gradient
//! standardization and range adaptation (Deutel et al.), dynamic partial updates (how many and
//! which structures to train), and quantization-aware scaling of gradients (Lin et al.).
//!
//! A "structure" is an output channel of a convolution or an output row of a fully connected
//! layer: `structure_len` consecutive weights. None of these functions needs scratch memory.

use crate::ops::ChannelSet;
use crate::quant::{round_half_up, QParams, RangeEma, RealRange};

/// SGD with momentum: `v = momentum * v + grad_scale * g; p -= lr * v`.
///
/// `grad_scale` folds a factor into the gradient (for example `1 / batch`). `velocity` may be
/// an empty slice when `momentum == 0`: then no state is kept and `p -= lr * grad_scale * g`.
/// Scratch: none.
pub fn sgd(
    params: &mut [f32],
    grads: &[f32],
    velocity: &mut [f32],
    lr: f32,
    momentum: f32,
    grad_scale: f32,
) {
    debug_assert_eq!(params.len(), grads.len());
    if velocity.is_empty() {
        debug_assert!(momentum == 0.0, "momentum needs a velocity buffer");
        for (p, &g) in params.iter_mut().zip(grads) {
            *p -= lr * (grad_scale * g);
        }
        return;
    }
    debug_assert_eq!(velocity.len(), params.len());
    for ((p, &g), v) in params.iter_mut().zip(grads).zip(velocity.iter_mut()) {
        *v = momentum * *v + grad_scale * g;
        *p -= lr * *v;
    }
}

/// Cosine learning-rate decay: `lr = peak * (1 + cos(pi * done / total)) / 2`, from `peak`
/// at the first step towards 0 at the last (libm, so host and device compute the same value;
/// `total` 0 counts as 1).
pub fn cosine_lr(peak: f32, done: usize, total: usize) -> f32 {
    let t = done as f32 / total.max(1) as f32;
    peak * 0.5 * (1.0 + libm::cosf(core::f32::consts::PI * t))
}

/// Moving statistics of one structure's gradient, for gradient standardization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradStats {
    /// Smoothed mean of the structure's gradient elements.
    pub mean: f32,
    /// Smoothed (population) variance of the structure's gradient elements.
    pub var: f32,
    /// False until the first gradient was folded in.
    pub initialized: bool,
}

impl GradStats {
    /// Statistics with no observation yet.
    pub const fn new() -> Self {
        GradStats {
            mean: 0.0,
            var: 0.0,
            initialized: false,
        }
    }

    /// Fold in one structure gradient `g` (length `L`): with `m = (1/L) sum g_i` and
    /// `v = (1/L) sum (g_i - m)^2`, `mean <- (1 - rate) mean + rate m`, `var <- (1 - rate) var +
    /// rate v` (the convention of [`RangeEma`]: `rate` weighs the new observation); the first
    /// observation is taken as it is.
    pub fn observe(&mut self, grads: &[f32], rate: f32) {
        if grads.is_empty() {
            return;
        }
        let n = grads.len() as f32;
        let mean = grads.iter().fold(0.0f32, |s, &g| s + g) / n;
        let var = grads
            .iter()
            .fold(0.0f32, |s, &g| s + (g - mean) * (g - mean))
            / n;
        if self.initialized {
            self.mean = (1.0 - rate) * self.mean + rate * mean;
            self.var = (1.0 - rate) * self.var + rate * var;
        } else {
            *self = GradStats {
                mean,
                var,
                initialized: true,
            };
        }
    }
}

impl Default for GradStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Hyper-parameters of [`fqt_update_weights`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FqtUpdateConfig {
    /// Learning rate applied to the standardized gradient.
    pub lr: f32,
    /// Moving-average rate of the gradient statistics ([`GradStats::observe`]), about 0.7-0.85.
    pub stats_rate: f32,
    /// Moving-average rate of the weight range ([`RangeEma::observe`]), about 0.001.
    pub range_rate: f32,
    /// Added to the variance before the square root, `sigma = sqrt(var + eps)`.
    pub eps: f32,
}

/// Whether structure `c` is selected (`O(k)` for a subset of `k` structures).
fn is_selected(channels: ChannelSet<'_>, c: usize) -> bool {
    match channels {
        ChannelSet::All => true,
        ChannelSet::Subset(list) => list.iter().any(|&s| s as usize == c),
    }
}

/// What [`fqt_update_weights`] needs to recompute the new real weights in each pass.
struct StandardizedStep<'a> {
    old_q: QParams,
    structure_len: usize,
    channels: ChannelSet<'a>,
    stats: &'a [GradStats],
    lr: f32,
    eps: f32,
}

impl StandardizedStep<'_> {
    /// Calls `visit(code, new_real, updated)` for every weight: `new_real = s_w (w - z_w) - lr
    /// (g - mu) / sigma` in the selected structures (`updated`), `s_w (w - z_w)` in the others.
    fn for_each_new_real(
        &self,
        weights: &mut [i8],
        grads: &[f32],
        mut visit: impl FnMut(&mut i8, f32, bool),
    ) {
        let structures = weights
            .chunks_exact_mut(self.structure_len)
            .zip(grads.chunks_exact(self.structure_len))
            .zip(self.stats);
        for (c, ((w, g), stats)) in structures.enumerate() {
            if is_selected(self.channels, c) {
                let step = self.lr / libm::sqrtf(stats.var + self.eps);
                for (w, &g) in w.iter_mut().zip(g) {
                    let real = self.old_q.dequantize(*w) - step * (g - stats.mean);
                    visit(w, real, true);
                }
            } else {
                for w in w.iter_mut() {
                    let real = self.old_q.dequantize(*w);
                    visit(w, real, false);
                }
            }
        }
    }
}

/// Fully quantized weight update with gradient standardization, per structure `c` in
/// `channels`:
/// `w' = (1/s_w') * [ (w - z_w) * s_w - lr * (g - mu_c) / sigma_c ] + z_w'`, rounded and
/// clamped to 8 bits, with `sigma_c = sqrt(var_c + eps)`.
///
/// 1. `stats[c]` folds in the structure's gradient ([`GradStats::observe`] with
///    `cfg.stats_rate`), then the new real weights of the selected structures and the current
///    real weights of the others give the tensor's real range, which `w_range` folds in with
///    `cfg.range_rate`; `(s_w', z_w') = w_range.qparams()`.
/// 2. Every weight is written under the new qparams: selected structures get their new value
///    with unbiased dithered rounding (`dithered_quantize`: updates smaller than a step are
///    applied with the right probability instead of being rounded away, which is what lets
///    8-bit weights learn at small learning rates), the others keep their real value, re-coded
///    to the nearest code (within half a new step while inside the new range). `w_q` becomes
///    `(s_w', z_w')`.
///
/// The new real values are recomputed in the second pass instead of stored. Membership of a
/// structure in a subset costs `O(k)`. `stats.len()` is the number of structures and
/// `grads` is `[structures][structure_len]` like `weights`. Scratch: none.
#[allow(clippy::too_many_arguments)] // the layer's state is several separate buffers
pub fn fqt_update_weights(
    weights: &mut [i8],
    w_q: &mut QParams,
    w_range: &mut RangeEma,
    grads: &[f32],
    structure_len: usize,
    channels: ChannelSet<'_>,
    stats: &mut [GradStats],
    cfg: &FqtUpdateConfig,
) {
    debug_assert!(structure_len > 0);
    debug_assert_eq!(weights.len(), stats.len() * structure_len);
    debug_assert_eq!(grads.len(), weights.len());
    for c in channels.iter(stats.len()) {
        stats[c].observe(
            &grads[c * structure_len..(c + 1) * structure_len],
            cfg.stats_rate,
        );
    }
    let step = StandardizedStep {
        old_q: *w_q,
        structure_len,
        channels,
        stats,
        lr: cfg.lr,
        eps: cfg.eps,
    };
    let mut range = RealRange::EMPTY;
    step.for_each_new_real(weights, grads, |_, real, _| range.include(real));
    w_range.observe(range, cfg.range_rate);
    let new_q = w_range.qparams();
    let mut index = 0u32;
    step.for_each_new_real(weights, grads, |w, real, updated| {
        *w = if updated {
            dithered_quantize(new_q, real, index)
        } else {
            new_q.quantize(real)
        };
        index = index.wrapping_add(1);
    });
    *w_q = new_q;
}

/// Unbiased ("stochastic") rounding without random state:
/// `q = clamp(floor(r / s + u) + z)` with the dither `u` in `[0, 1)` taken from a hash of the
/// value's bits and its index, so `E[s (q - z)] = r` over changing values while the result
/// stays a pure function of its inputs (bit-identical on every target).
fn dithered_quantize(q: QParams, real: f32, index: u32) -> i8 {
    let mut h = real.to_bits() ^ index.wrapping_mul(0x9E37_79B9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    let dither = (h >> 8) as f32 * (1.0 / 16_777_216.0);
    let code = libm::floorf(real / q.scale + dither) as i32 + q.zero_point;
    code.clamp(crate::quant::Q_MIN, crate::quant::Q_MAX) as i8
}

/// Fully quantized bias update, plain scaled SGD (no gradient standardization: a bias is one
/// value per structure, so its statistics would be degenerate): for `c` in `channels`,
/// `b'_c = b_c - round(lr * grad_scale * g_c / s_b)`, saturating. The bias keeps its scale
/// `s_b` (`= s_w * s_x`) and zero point 0. Scratch: none.
pub fn fqt_update_bias(
    bias: &mut [i32],
    bias_scale: f32,
    grads: &[f32],
    channels: ChannelSet<'_>,
    lr: f32,
    grad_scale: f32,
) {
    debug_assert_eq!(bias.len(), grads.len());
    let factor = lr * grad_scale / bias_scale;
    for c in channels.iter(bias.len()) {
        bias[c] = bias[c].saturating_sub(round_half_up(factor * grads[c]));
    }
}

/// Number of structures a dynamic partial update trains:
/// `k = max(floor((lambda_min + |e / e_max| * (lambda_max - lambda_min)) * N), 1)`, clamped
/// to `N` (0 when `N = 0`). `e` is the layer's current mean absolute error, `e_max` the largest
/// seen so far; `e_max <= 0` (nothing seen yet) gives `lambda_max`. Scratch: none.
pub fn partial_update_count(
    lambda_min: f32,
    lambda_max: f32,
    error: f32,
    error_max: f32,
    structures: usize,
) -> usize {
    let fraction = if error_max > 0.0 {
        lambda_min + (error / error_max).abs() * (lambda_max - lambda_min)
    } else {
        lambda_max
    };
    let k = libm::floorf(fraction * structures as f32);
    // `as` saturates: NaN and negatives give 0, huge values usize::MAX.
    (k as usize).max(1).min(structures)
}

/// The `min(k, N)` indices of the largest `scores` (ties go to the lower index, NaN counts as
/// `-inf`), written to the front of `out` in ascending index order and returned.
///
/// `O(N * k)` by insertion into a ranked prefix of `out`, then an `O(k log k)` sort by index.
/// `out.len() >= min(k, N)`, `N <= 65536`. Scratch: none (uses `out`).
pub fn top_k_structures<'a>(scores: &[f32], k: usize, out: &'a mut [u16]) -> &'a [u16] {
    let k = k.min(scores.len());
    debug_assert!(out.len() >= k);
    debug_assert!(scores.len() <= u16::MAX as usize + 1);
    let key = |i: u16| {
        let s = scores[i as usize];
        if s.is_nan() {
            f32::NEG_INFINITY
        } else {
            s
        }
    };
    let mut taken = 0;
    for i in 0..scores.len() {
        let index = i as u16;
        let score = key(index);
        // Earlier indices win ties, so a later index must be strictly better to move up.
        let mut at = taken;
        while at > 0 && score > key(out[at - 1]) {
            at -= 1;
        }
        if at >= k {
            continue;
        }
        let end = if taken < k { taken + 1 } else { k };
        out.copy_within(at..end - 1, at + 1);
        out[at] = index;
        taken = end;
    }
    let selected = &mut out[..k];
    selected.sort_unstable();
    selected
}

/// Score of each channel for partial updates, the mean absolute error in real units:
/// `score_c = s_e / (batch * spatial) * sum_{n, i} |e[n][c][i] - z_e|` over the
/// `[batch][channels][spatial]` error codes (overwrites `scores`; integer sums, so
/// `batch * spatial` must stay below 2^24). Scratch: none.
pub fn structure_error_scores_q(
    err: &[i8],
    err_q: QParams,
    batch: usize,
    channels: usize,
    spatial: usize,
    scores: &mut [f32],
) {
    debug_assert_eq!(err.len(), batch * channels * spatial);
    debug_assert_eq!(scores.len(), channels);
    let z = err_q.zero_point;
    for (c, score) in scores.iter_mut().enumerate() {
        let mut sum = 0u32;
        for n in 0..batch {
            let start = (n * channels + c) * spatial;
            for &e in &err[start..start + spatial] {
                sum += (e as i32 - z).unsigned_abs();
            }
        }
        *score = err_q.scale * (sum as f32 / (batch * spatial) as f32);
    }
}

/// Quantization-aware scaling of weight gradients: `G_c <- G_c / s_w,c^2` for each structure
/// `c` (one [`QParams`] per structure in `w_q`, `grads` is `[structures][structure_len]`).
/// Scratch: none.
pub fn qas_scale_weight_grads(grads: &mut [f32], w_q: &[QParams], structure_len: usize) {
    debug_assert_eq!(grads.len(), w_q.len() * structure_len);
    for (structure, q) in grads.chunks_exact_mut(structure_len).zip(w_q) {
        let factor = inverse_square(q.scale);
        for g in structure {
            *g *= factor;
        }
    }
}

/// Quantization-aware scaling of bias gradients: `G_b,c <- G_b,c / s_b,c^2` with
/// `s_b,c = s_w,c * s_x` the scale of bias `c` (`bias_scales` has one entry per bias).
/// Scratch: none.
pub fn qas_scale_bias_grads(grads: &mut [f32], bias_scales: &[f32]) {
    debug_assert_eq!(grads.len(), bias_scales.len());
    for (g, &s) in grads.iter_mut().zip(bias_scales) {
        *g *= inverse_square(s);
    }
}

/// `1 / s^2`, the QAS factor.
fn inverse_square(scale: f32) -> f32 {
    1.0 / (scale * scale)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    #[test]
    fn sgd_with_momentum_by_hand() {
        let mut p = [1.0f32, -2.0];
        let mut v = [0.1f32, -0.2];
        sgd(&mut p, &[0.5, 1.0], &mut v, 0.1, 0.9, 0.5);
        // v = 0.9*0.1 + 0.25 = 0.34, 0.9*-0.2 + 0.5 = 0.32; p = 1 - 0.034, -2 - 0.032.
        assert!(
            (v[0] - 0.34).abs() < 1e-6 && (v[1] - 0.32).abs() < 1e-6,
            "{v:?}"
        );
        assert!(
            (p[0] - 0.966).abs() < 1e-6 && (p[1] + 2.032).abs() < 1e-6,
            "{p:?}"
        );
        sgd(&mut p, &[0.0, -1.0], &mut v, 0.1, 0.9, 0.5);
        // v = 0.306, 0.288 - 0.5 = -0.212; p = 0.966 - 0.0306, -2.032 + 0.0212.
        assert!(
            (v[0] - 0.306).abs() < 1e-6 && (v[1] + 0.212).abs() < 1e-6,
            "{v:?}"
        );
        assert!(
            (p[0] - 0.9354).abs() < 1e-6 && (p[1] + 2.0108).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn sgd_without_velocity() {
        let mut p = [1.0f32, 0.0];
        sgd(&mut p, &[2.0, -4.0], &mut [], 0.5, 0.0, 0.25);
        assert_eq!(p, [0.75, 0.5]);
    }

    #[test]
    fn grad_stats_first_then_moving_average() {
        let mut s = GradStats::new();
        s.observe(&[1.0, 3.0], 0.75);
        assert_eq!((s.mean, s.var, s.initialized), (2.0, 1.0, true));
        s.observe(&[-2.0, -2.0], 0.75);
        assert_eq!((s.mean, s.var), (-1.0, 0.25));
    }

    fn layer() -> (Vec<i8>, QParams, RangeEma) {
        // 3 structures of 4 weights, real range [-1, 1].
        let q = QParams::from_range(-1.0, 1.0);
        let reals = [
            -1.0f32, -0.5, 0.25, 0.9, 0.1, 0.2, -0.3, 0.4, 0.6, -0.7, 0.8, 1.0,
        ];
        let codes = reals.iter().map(|&r| q.quantize(r)).collect();
        (codes, q, RangeEma::from_range(-1.0, 1.0))
    }

    #[test]
    fn fqt_update_moves_against_the_gradient_and_recodes_skipped_structures() {
        let (mut w, mut w_q, mut range) = layer();
        let old_w = w.clone();
        let old_q = w_q;
        // Zero-mean gradients: the standardized step has the gradient's sign.
        let grads = [
            0.0f32, 0.0, 0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let mut stats = [GradStats::new(); 3];
        let cfg = FqtUpdateConfig {
            lr: 0.1,
            stats_rate: 0.8,
            range_rate: 0.5,
            eps: 1e-8,
        };
        fqt_update_weights(
            &mut w,
            &mut w_q,
            &mut range,
            &grads,
            4,
            ChannelSet::Subset(&[1]),
            &mut stats,
            &cfg,
        );
        assert!(stats[1].initialized && !stats[0].initialized && !stats[2].initialized);
        assert_eq!((stats[1].mean, stats[1].var), (0.0, 2.5));
        // Range: old range EMA [-1, 1] folded with the new real range at rate 0.5.
        assert_eq!(w_q, range.qparams());
        let sigma = libm::sqrtf(2.5 + 1e-8);
        for i in 0..12 {
            let before = old_q.dequantize(old_w[i]);
            let after = w_q.dequantize(w[i]);
            let expect = if (4..8).contains(&i) {
                before - 0.1 * grads[i] / sigma
            } else {
                before
            };
            // Updated weights are rounded with a dither (within one step), the others to the
            // nearest code (within half a step).
            let tolerance = if (4..8).contains(&i) { 1.0 } else { 0.5 };
            assert!(
                (after - expect).abs() <= tolerance * w_q.scale + 1e-6,
                "{i}: {before} -> {after}, expected {expect}"
            );
            if grads[i] != 0.0 {
                assert!(
                    (after - before) * grads[i] < 0.0,
                    "{i} moved with the gradient"
                );
            }
        }
    }

    #[test]
    fn dithered_rounding_is_unbiased_and_deterministic() {
        let q = QParams {
            scale: 0.1,
            zero_point: 3,
        };
        for &real in &[0.0123f32, -0.271, 0.35, 1.0, -0.049] {
            let n = 4096;
            let mean = (0..n)
                .map(|i| q.dequantize(dithered_quantize(q, real, i)) as f64)
                .sum::<f64>()
                / n as f64;
            assert!((mean - real as f64).abs() < 0.004, "{real}: mean {mean}");
            for i in 0..n {
                let code = dithered_quantize(q, real, i);
                assert_eq!(code, dithered_quantize(q, real, i));
                assert!((q.dequantize(code) - real).abs() < q.scale + 1e-6);
            }
        }
    }

    #[test]
    fn fqt_update_widens_the_range_when_weights_grow() {
        let (mut w, mut w_q, mut range) = layer();
        let grads = [
            -8.0f32, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let mut stats = [GradStats::new(); 3];
        let cfg = FqtUpdateConfig {
            lr: 1.0,
            stats_rate: 0.8,
            range_rate: 1.0,
            eps: 1e-5,
        };
        let (old_w, old_q) = (w.clone(), w_q);
        fqt_update_weights(
            &mut w,
            &mut w_q,
            &mut range,
            &grads,
            4,
            ChannelSet::All,
            &mut stats,
            &cfg,
        );
        // Structure 0: mean 0, var 32, weight 1 (real -0.5) moves by -8/sqrt(32) to -1.914,
        // the new minimum; with rate 1 the range is the new real range.
        let expect = old_q.dequantize(old_w[1]) - 8.0 / libm::sqrtf(32.0 + 1e-5);
        assert!((expect + 1.916).abs() < 1e-3);
        assert!((range.min - expect).abs() < 1e-5, "{range:?}");
        assert!(w_q.scale > old_q.scale);
        assert!((w_q.dequantize(w[1]) - expect).abs() <= 0.5 * w_q.scale + 1e-6);
    }

    #[test]
    fn fqt_bias_is_scaled_sgd_on_selected_channels() {
        let mut b = [100i32, -50, 7];
        fqt_update_bias(
            &mut b,
            0.01,
            &[0.3, 0.2, -1.0],
            ChannelSet::Subset(&[0, 2]),
            0.5,
            0.1,
        );
        // round(0.5*0.1*0.3/0.01) = round(1.5) = 2; round(0.5*0.1*-1/0.01) = -5.
        assert_eq!(b, [98, -50, 12]);
    }

    #[test]
    fn partial_update_count_cases() {
        // (0.125 + 0.5 * 0.5) * 16 = 6.
        assert_eq!(partial_update_count(0.125, 0.625, 0.5, 1.0, 16), 6);
        // Largest error: lambda_max. 0.625 * 10 = 6.25 -> 6.
        assert_eq!(partial_update_count(0.125, 0.625, 2.0, 2.0, 10), 6);
        // Negative error uses |e / e_max|: (0.25 + 0.25 * 0.5) * 8 = 3.
        assert_eq!(partial_update_count(0.25, 0.75, -0.5, 2.0, 8), 3);
        // No error: floor(0.125 * 4) = 0 -> at least 1.
        assert_eq!(partial_update_count(0.125, 0.5, 0.0, 1.0, 4), 1);
        // e_max = 0: lambda_max.
        assert_eq!(partial_update_count(0.1, 0.5, 0.3, 0.0, 20), 10);
        // e > e_max clamps to N.
        assert_eq!(partial_update_count(0.5, 1.0, 5.0, 1.0, 12), 12);
        assert_eq!(partial_update_count(1.0, 1.0, 0.3, 1.0, 7), 7);
        assert_eq!(partial_update_count(0.1, 0.5, 0.3, 1.0, 0), 0);
        assert_eq!(partial_update_count(0.1, 0.5, f32::NAN, 1.0, 9), 1);
    }

    #[test]
    fn top_k_ties_and_order() {
        let mut out = [0u16; 8];
        assert_eq!(
            top_k_structures(&[1.0, 5.0, 5.0, 0.0, 5.0], 2, &mut out),
            &[1, 2]
        );
        assert_eq!(
            top_k_structures(&[3.0, f32::NAN, 2.0], 3, &mut out),
            &[0, 1, 2]
        );
        assert_eq!(
            top_k_structures(&[f32::NAN, 0.0, -1.0], 2, &mut out),
            &[1, 2]
        );
        assert_eq!(top_k_structures(&[0.5, 0.25], 5, &mut out), &[0, 1]);
        assert!(top_k_structures(&[0.5, 0.25], 0, &mut out).is_empty());
    }

    proptest! {
        #[test]
        fn top_k_matches_sort_reference(
            scores in proptest::collection::vec(-4i8..4, 0..40),
            k in 0usize..45,
        ) {
            // Small integer scores force many ties.
            let scores: Vec<f32> = scores.iter().map(|&s| s as f32 * 0.5).collect();
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
            let mut expect: Vec<u16> = order.iter().take(k).map(|&i| i as u16).collect();
            expect.sort_unstable();
            let mut out = std::vec![0u16; k.min(scores.len())];
            prop_assert_eq!(top_k_structures(&scores, k, &mut out), &expect[..]);
        }
    }

    #[test]
    fn error_scores_are_mean_absolute_real_errors() {
        let q = QParams {
            scale: 0.5,
            zero_point: 2,
        };
        // batch 2, channels 2, spatial 2: [n][c][i].
        let err = [2i8, 6, -2, 2, 0, 2, 3, 5];
        let mut scores = [9.0f32; 2];
        structure_error_scores_q(&err, q, 2, 2, 2, &mut scores);
        // c0: |0|+|4|+|-2|+|0| = 6 -> 0.5 * 6/4 = 0.75; c1: 4+0+1+3 = 8 -> 1.0.
        assert_eq!(scores, [0.75, 1.0]);
    }

    #[test]
    fn qas_scaling_numbers() {
        let mut g = [1.0f32, -2.0, 0.5, 3.0];
        let w_q = [
            QParams {
                scale: 0.5,
                zero_point: 0,
            },
            QParams {
                scale: 0.25,
                zero_point: 0,
            },
        ];
        qas_scale_weight_grads(&mut g, &w_q, 2);
        assert_eq!(g, [4.0, -8.0, 8.0, 48.0]);
        let mut gb = [1.0f32, -0.5];
        qas_scale_bias_grads(&mut gb, &[0.125, 2.0]);
        assert_eq!(gb, [64.0, -0.125]);
    }
}
