//! Arithmetic shared by the operator kernels: the accumulator and term types that let one loop
//! serve the float and the 8-bit forms, the row helpers (`axpy`, `dot`), the index arithmetic
//! of strided windows, the channel sums of bias gradients, and the 8-bit requantization of
//! outputs (`OutputChannel`) and input errors (`requantize_input_error`).
//!
//! A float enters a sum as itself, an `i8` code as `q - z` in an `i32` (or `i64`) accumulator
//! (`Term`, `Acc`). Results are accumulated in blocks of at most `BLOCK` values on the
//! stack, so no kernel built on these helpers needs scratch memory. Float sums run in a fixed
//! order, so the host and the MCU get the same bits.

use core::ops::{Add, AddAssign, Mul, Range};

use crate::ops::activation::Activation;
use crate::quant::{QParams, RealRange, Requant, Q_MAX, Q_MIN};

// ---------------------------------------------------------------------------------------------
// Arguments.

/// Quantized parameters of one convolution or fully connected call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QLayerParams<'a> {
    /// Input activations `x`.
    pub input: QParams,
    /// Weights: one entry (per tensor) or one per output channel (per channel).
    pub weight: &'a [QParams],
    /// Real value of one bias unit: `bias_real = bias_scale * b` for the `i32` bias `b`.
    pub bias_scale: f32,
    /// Output activations `y`.
    pub output: QParams,
    /// Activation fused into the output clamp.
    pub activation: Activation,
}

// ---------------------------------------------------------------------------------------------
// Accumulation.

/// Accumulator of the shared kernels: `f32` for the float forms, `i32` (or `i64` where a
/// fixed-point factor is folded in, and for long gradient sums) for the 8-bit forms.
pub(crate) trait Acc:
    Copy + Default + Add<Output = Self> + AddAssign + Mul<Output = Self>
{
}

impl Acc for f32 {}
impl Acc for i32 {}
impl Acc for i64 {}

/// A stored element as an accumulator term: `value - zero` (a float's zero point is 0, so a
/// float is its own term).
pub(crate) trait Term<A>: Copy {
    /// `self - zero` in the accumulator type.
    fn term(self, zero: A) -> A;
}

impl Term<f32> for f32 {
    #[inline(always)]
    fn term(self, _zero: f32) -> f32 {
        self
    }
}

impl Term<i32> for i8 {
    #[inline(always)]
    fn term(self, zero: i32) -> i32 {
        self as i32 - zero
    }
}

impl Term<i64> for i8 {
    #[inline(always)]
    fn term(self, zero: i64) -> i64 {
        self as i64 - zero
    }
}

/// Most products one `i32` accumulator of the 8-bit kernels may sum (`33 025 * 255^2 < 2^31`).
pub const MAX_ACCUMULATED_TERMS: usize = 33_025;

/// True when the 8-bit sums of a convolution (plain or transposed) stay in range: forward sums
/// of at most `in_per_group * kernel_h * kernel_w` products and input-error sums of
/// `out_per_group * kernel_h * kernel_w`, each up to [`MAX_ACCUMULATED_TERMS`], and fewer than
/// 2^24 output positions per channel (the partial-update scores).
pub fn convolution_fits_int8_limits(
    (in_per_group, out_per_group): (usize, usize),
    (kernel_h, kernel_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> bool {
    // In `u64`: on a 32-bit target the products of `u16` fields may not fit a `usize`.
    let wide = |v: usize| v as u64;
    let taps = wide(kernel_h) * wide(kernel_w);
    let max_terms = MAX_ACCUMULATED_TERMS as u64;
    wide(in_per_group) * taps <= max_terms
        && wide(out_per_group) * taps <= max_terms
        && wide(out_h) * wide(out_w) < 1 << 24
}

/// Results accumulated at once on the stack (one register block).
pub(crate) const BLOCK: usize = 16;

/// Partial sums of [`dot`]: eight independent chains let float dot products vectorize.
const LANES: usize = 8;

/// Elements per `i32` partial sum in [`dot_wide`]: `4096 * 255^2 < 2^31`.
const DOT_CHUNK: usize = 4096;

/// `0..len` cut into blocks of at most [`BLOCK`].
pub(crate) fn blocks(len: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len)
        .step_by(BLOCK)
        .map(move |start| start..(start + BLOCK).min(len))
}

/// `acc[j] += term(x[j * stride]) * w` for every `j < acc.len()`.
#[inline(always)]
pub(crate) fn axpy<X: Term<A>, A: Acc>(acc: &mut [A], x: &[X], stride: usize, zx: A, w: A) {
    if stride == 1 {
        let x = &x[..acc.len()];
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v.term(zx) * w;
        }
    } else {
        for (a, &v) in acc.iter_mut().zip(x.iter().step_by(stride)) {
            *a += v.term(zx) * w;
        }
    }
}

/// `sum_j term(a[j * a_stride]) * term(b[j])` over `j < b.len()`, in [`LANES`] interleaved
/// partial sums added in a fixed order.
pub(crate) fn dot<X: Term<A>, A: Acc>(a: &[X], a_stride: usize, za: A, b: &[X], zb: A) -> A {
    if a_stride != 1 {
        let mut sum = A::default();
        for (&p, &q) in a.iter().step_by(a_stride).zip(b) {
            sum += p.term(za) * q.term(zb);
        }
        return sum;
    }
    let a = &a[..b.len()];
    let mut lanes = [A::default(); LANES];
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (pa, pb) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((lane, &p), &q) in lanes.iter_mut().zip(pa).zip(pb) {
            *lane += p.term(za) * q.term(zb);
        }
    }
    let mut sum = lanes.iter().fold(A::default(), |s, &l| s + l);
    for (&p, &q) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        sum += p.term(za) * q.term(zb);
    }
    sum
}

/// [`dot`] in chunks of [`DOT_CHUNK`] elements, totalled in the wide type `W` (`i64` for the
/// 8-bit forms, so that long sums cannot overflow).
pub(crate) fn dot_wide<X: Term<A>, A: Acc, W: Acc + From<A>>(
    a: &[X],
    a_stride: usize,
    za: A,
    b: &[X],
    zb: A,
) -> W {
    let mut total = W::default();
    for (k, chunk) in b.chunks(DOT_CHUNK).enumerate() {
        total += W::from(dot(&a[k * DOT_CHUNK * a_stride..], a_stride, za, chunk, zb));
    }
    total
}

/// Output positions `o < out_len` whose tap `k` reads a real input:
/// `0 <= o*stride + k - pad < in_len`.
pub(crate) fn valid_outputs(
    out_len: usize,
    in_len: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Range<usize> {
    let start = if pad > k {
        (pad - k).div_ceil(stride)
    } else {
        0
    };
    let end = if in_len + pad > k {
        ((in_len - 1 + pad - k) / stride + 1).min(out_len)
    } else {
        0
    };
    start.min(end)..end
}

/// The input position `o*stride + k - pad` of output `o`'s tap `k`, if it is not padding.
pub(crate) fn tap_input(
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    in_len: usize,
) -> Option<usize> {
    let p = (o * stride + k).checked_sub(pad)?;
    (p < in_len).then_some(p)
}

/// The output `o` whose tap `k` reads input `i` (`o*stride = i + pad - k`), if there is one.
pub(crate) fn tap_output(
    i: usize,
    k: usize,
    stride: usize,
    pad: usize,
    out_len: usize,
) -> Option<usize> {
    let t = (i + pad).checked_sub(k)?;
    (t % stride == 0 && t / stride < out_len).then_some(t / stride)
}

pub(crate) fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end)
}

// ---------------------------------------------------------------------------------------------
// Requantization.

/// Weight qparams of output channel `channel`: the single entry (per tensor) or its own.
pub(crate) fn channel_qparams(weight_q: &[QParams], channel: usize) -> QParams {
    if weight_q.len() == 1 {
        weight_q[0]
    } else {
        weight_q[channel]
    }
}

/// Extremes of the `i32` accumulators of one tensor (or channel).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AccRange {
    min: i32,
    max: i32,
}

impl AccRange {
    /// No accumulator seen yet.
    pub(crate) const EMPTY: AccRange = AccRange {
        min: i32::MAX,
        max: i32::MIN,
    };

    #[inline(always)]
    pub(crate) fn include(&mut self, acc: i32) {
        self.min = self.min.min(acc);
        self.max = self.max.max(acc);
    }

    /// `[unit * min, unit * max]`, or the empty range.
    fn real(self, unit: f64) -> RealRange {
        if self.min > self.max {
            return RealRange::EMPTY;
        }
        RealRange {
            min: (self.min as f64 * unit) as f32,
            max: (self.max as f64 * unit) as f32,
        }
    }
}

/// Forward requantization of one output channel `o` with bias `b`, set up once per channel:
/// `s_a = s_x * s_w[o]`, bias `b_a = requant(b, bias_scale / s_a)`, output
/// `clamp(z_y + requant(sat(acc + b_a), s_a / s_y), act_lo, act_hi)`.
///
/// The kernels' 8-bit accumulators start from 0, not from the bias: their sums of products
/// cannot overflow (at most [`MAX_ACCUMULATED_TERMS`] products), and the bias, which may be
/// anywhere in `i32` (a tiny `s_a` makes it large), is added with saturation when the sum is
/// stored. Results equal the bias-first sum wherever that one does not overflow.
pub(crate) struct OutputChannel {
    /// `z_w[o]`.
    pub(crate) weight_zero: i32,
    bias: i32,
    output: Requant,
    output_zero: i32,
    codes: (i32, i32),
    reals: (f32, f32),
    acc_scale: f64,
}

impl OutputChannel {
    pub(crate) fn new(q: &QLayerParams, channel: usize, bias: i32) -> Self {
        let wq = channel_qparams(q.weight, channel);
        let acc_scale = q.input.scale as f64 * wq.scale as f64;
        OutputChannel {
            weight_zero: wq.zero_point,
            bias: Requant::from_real(q.bias_scale as f64 / acc_scale).apply(bias),
            output: Requant::from_real(acc_scale / q.output.scale as f64),
            output_zero: q.output.zero_point,
            codes: q.activation.code_bounds(q.output),
            reals: q.activation.real_bounds(),
            acc_scale,
        }
    }

    /// Add the bias to a block of sums of products, requantize them into `out` and widen
    /// `accs` by them.
    #[inline(always)]
    pub(crate) fn store(&self, out: &mut [i8], block: &[i32], accs: &mut AccRange) {
        for (y, &sum) in out.iter_mut().zip(block) {
            let acc = sum.saturating_add(self.bias);
            accs.include(acc);
            let code = self.output_zero.saturating_add(self.output.apply(acc));
            *y = code.clamp(self.codes.0, self.codes.1) as i8;
        }
    }

    /// Real range of the accumulators `accs` after the activation clamp.
    pub(crate) fn real_range(&self, accs: AccRange) -> RealRange {
        let r = accs.real(self.acc_scale);
        if r.is_empty() {
            return r;
        }
        let (lo, hi) = self.reals;
        RealRange {
            min: r.min.max(lo).min(hi),
            max: r.max.max(lo).min(hi),
        }
    }
}

/// An 8-bit input-error kernel, run with the accumulator type and per-channel weight factor
/// that the weight qparams call for (see [`requantize_input_error`]).
pub(crate) trait InputErrorKernel {
    /// Hand every input element's `sum_{o, taps} term(w) * term(e) * factor_o` to
    /// `emit(index in in_err, block)`, with `(z_w[o], factor_o) = channel(o)`.
    fn run<A: Acc>(
        &self,
        ze: A,
        channel: impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) where
        i8: Term<A>;
}

/// `e_x = z_ex + round(M * acc)`, saturated, for the accumulators of `kernel`; see
/// [`Conv2dGeom::input_backward_q`](super::conv2d::Conv2dGeom::input_backward_q) for the two
/// schemes. `max_terms` bounds the products in one sum.
pub(crate) fn requantize_input_error(
    kernel: &impl InputErrorKernel,
    weight_q: &[QParams],
    out_err_q: QParams,
    in_err_q: QParams,
    max_terms: usize,
    in_err: &mut [i8],
) -> RealRange {
    let s_e = out_err_q.scale as f64;
    let ze = out_err_q.zero_point;
    // Per tensor, one zero point for every channel (no lookup per channel).
    let (per_tensor, zero) = (weight_q.len() == 1, weight_q[0].zero_point);
    let zw = |o: usize| {
        if per_tensor {
            zero
        } else {
            weight_q[o].zero_point
        }
    };
    let first = weight_q[0].scale;
    if weight_q.iter().all(|wq| wq.scale == first) {
        let mut out = ErrorStore::new(first as f64 * s_e, in_err_q);
        kernel.run(ze, |o| (zw(o), 1), &mut |at, block: &[i32]| {
            out.store(&mut in_err[at..], block.iter().copied());
        });
        out.range()
    } else {
        let ratios = ScaleRatios::new(weight_q, max_terms);
        let mut out = ErrorStore::new(ratios.unit() * s_e, in_err_q);
        let channel = |o: usize| (zw(o) as i64, ratios.ratio(weight_q[o].scale));
        kernel.run(ze as i64, channel, &mut |at, block: &[i64]| {
            out.store(
                &mut in_err[at..],
                block.iter().map(|&acc| ratios.narrow(acc)),
            );
        });
        out.range()
    }
}

/// Requantizes `i32` input-error sums of real unit `unit`: `z + requant(acc, unit / s)`.
struct ErrorStore {
    requant: Requant,
    zero: i32,
    unit: f64,
    accs: AccRange,
}

impl ErrorStore {
    fn new(unit: f64, q: QParams) -> Self {
        ErrorStore {
            requant: Requant::from_real(unit / q.scale as f64),
            zero: q.zero_point,
            unit,
            accs: AccRange::EMPTY,
        }
    }

    #[inline(always)]
    fn store(&mut self, out: &mut [i8], accs: impl Iterator<Item = i32>) {
        for (e, acc) in out.iter_mut().zip(accs) {
            self.accs.include(acc);
            *e = self
                .zero
                .saturating_add(self.requant.apply(acc))
                .clamp(Q_MIN, Q_MAX) as i8;
        }
    }

    fn range(&self) -> RealRange {
        self.accs.real(self.unit)
    }
}

/// Distinct per-channel weight scales as integer ratios to one power of two:
/// `s_w[o] ~= r_o * 2^E` where `r_o = m_o >> (E - e_o)` for `s_w[o] = m_o * 2^e_o` (`m_o` the
/// 24-bit mantissa, read from the float bits) and `E` the largest `e_o`. The largest scale is
/// exact; smaller ones lose the bits below `2^E` (relative error below `2^-23` of the largest).
/// The `i64` sums of `r_o`-weighted terms are brought back to `i32` by a rounding right shift
/// chosen from `max_terms` so that no sum can overflow.
pub(crate) struct ScaleRatios {
    pub(crate) exponent: i32,
    shift: u32,
}

impl ScaleRatios {
    pub(crate) fn new(weight_q: &[QParams], max_terms: usize) -> Self {
        let exponent = weight_q
            .iter()
            .map(|wq| split_f32(wq.scale).1)
            .max()
            .unwrap_or(0);
        // |sum| <= max_terms * 255 * 255 * 2^24.
        let bound = ((max_terms as u128) * 255 * 255) << 24;
        let bits = 128 - bound.leading_zeros();
        ScaleRatios {
            exponent,
            shift: bits.saturating_sub(31),
        }
    }

    /// `r_o` for a channel of scale `scale`.
    #[inline(always)]
    fn ratio(&self, scale: f32) -> i64 {
        let (mantissa, exponent) = split_f32(scale);
        let drop = self.exponent - exponent;
        if drop >= 24 {
            0
        } else {
            mantissa >> drop
        }
    }

    /// `round(acc / 2^shift)`, half up, as `i32`.
    #[inline(always)]
    fn narrow(&self, acc: i64) -> i32 {
        let rounded = if self.shift == 0 {
            acc
        } else {
            (acc + (1i64 << (self.shift - 1))) >> self.shift
        };
        rounded.clamp(i32::MIN as i64, i32::MAX as i64) as i32
    }

    /// Real weight unit of one narrowed sum: `2^(E + shift)`.
    pub(crate) fn unit(&self) -> f64 {
        libm::ldexp(1.0, self.exponent + self.shift as i32)
    }
}

/// `(m, e)` with `x = m * 2^e` exactly, `m < 2^24`, for a finite `x >= 0`.
#[inline(always)]
pub(crate) fn split_f32(x: f32) -> (i64, i32) {
    let bits = x.to_bits();
    let biased = ((bits >> 23) & 0xff) as i32;
    let fraction = (bits & 0x7f_ffff) as i64;
    if biased == 0 {
        (fraction, -149)
    } else {
        (fraction | 0x80_0000, biased - 150)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_ratios_read_the_float_bits() {
        assert_eq!(split_f32(1.0), (1 << 23, -23));
        assert_eq!(split_f32(0.75), (3 << 22, -24));
        let wq = |scale| QParams {
            scale,
            zero_point: 0,
        };
        let ratios = ScaleRatios::new(&[wq(1.0), wq(0.75), wq(0.25)], 1);
        assert_eq!(ratios.ratio(1.0), 1 << 23);
        assert_eq!(ratios.ratio(0.75), 3 << 21);
        assert_eq!(ratios.ratio(0.25), 1 << 21);
        // One product needs 16 + 24 bits: narrowed by 9 bits.
        assert_eq!(ratios.shift, 9);
        assert_eq!(ratios.unit(), libm::ldexp(1.0, -23 + 9));
        assert_eq!(ratios.narrow(256), 1);
        assert_eq!(ratios.narrow(255), 0);
        assert_eq!(ratios.narrow(-256), 0);
        assert_eq!(ratios.narrow(-257), -1);
    }
}
