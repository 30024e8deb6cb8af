//! 2-D convolution, float and 8-bit: forward, input error, weight gradient and bias gradient.
//!
//! One geometry covers the standard, the grouped and the depthwise (`groups == in_channels`)
//! convolution, and the 1-D convolution (`in_h = kernel_h = 1`, `pad_h = 0`). Padding is zero
//! padding: real 0, which is the code `z_x` in the 8-bit forms, so a padded tap adds
//! `(z_x - z_x) * (w - z_w) = 0` and simply drops out of every sum.
//!
//! Notation: `G = groups`, `C_i = in_channels / G` and `C_o = out_channels / G` channels per
//! group; output channel `o` belongs to group `g = o / C_o` and reads input channels
//! `g*C_i + i` for `i < C_i`; a tap `(kh, kw)` of output `(oh, ow)` reads input
//! `(ih, iw) = (oh*stride_h + kh - pad_h, ow*stride_w + kw - pad_w)`.
//!
//! Kernels. The float and the 8-bit forms run the same loops, written once over the private
//! `Term`/`Acc` traits: an `f32` enters a sum as itself, an `i8` code as `q - z` in an `i32`
//! (or `i64`) accumulator. Every result is accumulated in a block of at most `BLOCK` values on
//! the stack and handed to a store step (copy, requantize, or add to a gradient), so no kernel
//! needs scratch memory and [`Conv2dGeom::scratch_bytes`] is 0. Inner loops run along a row
//! (output width, or the whole plane for 1x1), so float code vectorizes. Fast paths: the
//! pointwise convolution (1x1, stride 1, no padding: a GEMM per group) for every pass, and the
//! depthwise 3x3 forward; a general path covers everything else. Float sums are evaluated in a
//! fixed order, so the host and the MCU get the same bits.
//!
//! 8-bit accumulators are `i32`: one sum may hold at most 33 025 products
//! (`33 025 * 255^2 < 2^31`), i.e. `C_i * kernel_h * kernel_w` (forward) and
//! `C_o * kernel_h * kernel_w` (input error) up to 33 025; weight and bias gradients sum rows
//! into `i64` and have no such limit.

use core::ops::{Add, AddAssign, Mul, Range};

use crate::ops::activation::Activation;
use crate::ops::{ChannelSet, OpError};
use crate::quant::{QParams, RealRange, Requant, Q_MAX, Q_MIN};

/// Shape of a convolution over a batch-major NCHW input `[batch][in_channels][in_h][in_w]`,
/// with weights `[out_channels][in_channels / groups][kernel_h][kernel_w]` and bias
/// `[out_channels]`, producing `[batch][out_channels][out_h][out_w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Samples in the batch.
    pub batch: usize,
    /// Input channels, all groups together.
    pub in_channels: usize,
    /// Input height (1 for a 1-D convolution).
    pub in_h: usize,
    /// Input width (the length of a 1-D signal).
    pub in_w: usize,
    /// Output channels, all groups together.
    pub out_channels: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Vertical step between outputs.
    pub stride_h: usize,
    /// Horizontal step between outputs.
    pub stride_w: usize,
    /// Zero rows added above and below the input.
    pub pad_h: usize,
    /// Zero columns added left and right of the input.
    pub pad_w: usize,
    /// Channel groups (1: standard, `in_channels`: depthwise).
    pub groups: usize,
}

impl Conv2dGeom {
    /// Output height: `(in_h + 2 * pad_h - kernel_h) / stride_h + 1` (of a valid geometry).
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad_h - self.kernel_h) / self.stride_h + 1
    }

    /// Output width: `(in_w + 2 * pad_w - kernel_w) / stride_w + 1` (of a valid geometry).
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad_w - self.kernel_w) / self.stride_w + 1
    }

    /// Elements of the input (and of the input error): `batch * in_channels * in_h * in_w`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_plane()
    }

    /// Elements of the output (and of the output error): `batch * out_channels * out_h * out_w`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_plane()
    }

    /// Elements of the weight tensor: `out_channels * (in_channels / groups) * kernel_h * kernel_w`.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.taps()
    }

    /// Multiply-accumulates of one forward pass (and of each backward pass over all
    /// channels): `output_len * (in_channels / groups) * kernel_h * kernel_w`, padding included.
    pub fn macs(&self) -> usize {
        self.output_len() * self.taps()
    }

    /// Checks that every size is positive, that both channel counts divide into `groups`, and
    /// that the kernel fits in the padded input.
    pub fn validate(&self) -> Result<(), OpError> {
        let sizes = [
            self.batch,
            self.in_channels,
            self.in_h,
            self.in_w,
            self.out_channels,
            self.kernel_h,
            self.kernel_w,
            self.stride_h,
            self.stride_w,
            self.groups,
        ];
        if sizes.contains(&0) {
            return Err(OpError::ZeroSize);
        }
        if self.in_channels % self.groups != 0 || self.out_channels % self.groups != 0 {
            return Err(OpError::BadGroups);
        }
        if self.kernel_h > self.in_h + 2 * self.pad_h || self.kernel_w > self.in_w + 2 * self.pad_w
        {
            return Err(OpError::KernelTooLarge);
        }
        Ok(())
    }

    /// Scratch bytes that the kernels of this module need (the planner's CMSIS-NN style
    /// `get_buffer_size`): always 0, since every kernel accumulates in a fixed block of at most
    /// 16 values on the stack.
    pub fn scratch_bytes(&self) -> usize {
        0
    }

    /// `C_i`: input channels per group.
    fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    /// `C_o`: output channels per group.
    fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Weights per output channel: `C_i * kernel_h * kernel_w`.
    fn taps(&self) -> usize {
        self.in_per_group() * self.kernel_h * self.kernel_w
    }

    /// 1x1, stride 1, no padding: every output plane is a weighted sum of input planes.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1
            && self.kernel_w == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.pad_h == 0
            && self.pad_w == 0
    }

    /// Depthwise (one input and one output channel per group) with a 3x3 kernel.
    fn is_depthwise_3x3(&self) -> bool {
        self.groups == self.in_channels
            && self.out_channels == self.in_channels
            && self.kernel_h == 3
            && self.kernel_w == 3
    }

    /// The `C_i` input planes that output channel `oc` of sample `n` reads.
    fn group_input<'a, X>(&self, input: &'a [X], n: usize, oc: usize) -> &'a [X] {
        let first = n * self.in_channels + oc / self.out_per_group() * self.in_per_group();
        &input[first * self.in_plane()..][..self.in_per_group() * self.in_plane()]
    }

    /// Index range of plane `(n, c)` in a tensor with `channels` planes of `plane` elements.
    fn plane(n: usize, c: usize, channels: usize, plane: usize) -> Range<usize> {
        let start = (n * channels + c) * plane;
        start..start + plane
    }
}

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
// Float forms.

/// `y[n][o][oh][ow] = b[o] + sum_{i<C_i, kh, kw} x[n][g*C_i + i][ih][iw] * w[o][i][kh][kw]`,
/// padded taps skipped; overwrites `output`. Scratch: none.
pub fn forward(g: &Conv2dGeom, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    check_lengths(g, input.len(), weight.len(), output.len());
    debug_assert_eq!(bias.len(), g.out_channels);
    let out_plane = g.out_plane();
    for n in 0..g.batch {
        for (oc, &b) in bias.iter().enumerate() {
            let out = &mut output[Conv2dGeom::plane(n, oc, g.out_channels, out_plane)];
            let taps = &weight[oc * g.taps()..][..g.taps()];
            let input = g.group_input(input, n, oc);
            forward_plane(g, input, 0.0, taps, 0.0, b, &mut |at, block: &[f32]| {
                out[at..at + block.len()].copy_from_slice(block);
            });
        }
    }
}

/// Input error, the transposed convolution over the selected output channels `S`:
/// `e_x[n][c][ih][iw] = sum_{o in S of c's group, kh, kw} w[o][c - g*C_i][kh][kw] * e[n][o][oh][ow]`
/// over the taps with `oh*stride_h = ih + pad_h - kh`, `ow*stride_w = iw + pad_w - kw`;
/// overwrites `in_err` (channels of a group without selected outputs get 0). Scratch: none.
pub fn input_backward(
    g: &Conv2dGeom,
    weight: &[f32],
    out_err: &[f32],
    channels: ChannelSet,
    in_err: &mut [f32],
) {
    check_lengths(g, in_err.len(), weight.len(), out_err.len());
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

/// `dw[o][i][kh][kw] += sum_{n, oh, ow} x[n][g*C_i + i][ih][iw] * e[n][o][oh][ow]` for the
/// selected output channels `o` (padded taps add nothing). Scratch: none.
pub fn weight_backward(
    g: &Conv2dGeom,
    input: &[f32],
    out_err: &[f32],
    channels: ChannelSet,
    weight_grad: &mut [f32],
) {
    check_lengths(g, input.len(), weight_grad.len(), out_err.len());
    weight_sums(g, input, 0.0, out_err, 0.0, channels, &mut |at, sum: f32| {
        weight_grad[at] += sum;
    });
}

/// `db[o] += sum_{n, oh, ow} e[n][o][oh][ow]` for the selected output channels. Scratch: none.
pub fn bias_backward(g: &Conv2dGeom, out_err: &[f32], channels: ChannelSet, bias_grad: &mut [f32]) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(bias_grad.len(), g.out_channels);
    let (count, plane) = (g.out_channels, g.out_plane());
    channel_sums(g.batch, count, plane, out_err, 0.0, channels, &mut |o, sum: f32| {
        bias_grad[o] += sum;
    });
}

// ---------------------------------------------------------------------------------------------
// 8-bit forms.

/// Quantized forward, per output channel `o` (accumulator scale `s_a = s_x * s_w[o]`):
/// `acc = sum_{i, kh, kw} (x - z_x)(w - z_w[o]) + requant(b[o], bias_scale / s_a)`,
/// `y = clamp(z_y + round(acc * s_a / s_y), act_lo, act_hi)` where `act_lo, act_hi` are the
/// activation's bounds as codes, within `[-128, 127]`. Padding is the code `z_x`.
///
/// Returns the real output range after the activation clamp but before 8-bit saturation, exact
/// from the accumulators: `[clamp(s_a * min acc), clamp(s_a * max acc)]` merged over channels.
/// Overwrites `output`. Scratch: none.
pub fn forward_q(
    g: &Conv2dGeom,
    input: &[i8],
    weight: &[i8],
    bias: &[i32],
    q: &QLayerParams,
    output: &mut [i8],
) -> RealRange {
    check_lengths(g, input.len(), weight.len(), output.len());
    debug_assert_eq!(bias.len(), g.out_channels);
    debug_assert!(q.weight.len() == 1 || q.weight.len() == g.out_channels);
    let out_plane = g.out_plane();
    let mut range = RealRange::EMPTY;
    for (oc, &b) in bias.iter().enumerate() {
        let channel = OutputChannel::new(q, oc);
        let mut accs = AccRange::EMPTY;
        let taps = &weight[oc * g.taps()..][..g.taps()];
        for n in 0..g.batch {
            let out = &mut output[Conv2dGeom::plane(n, oc, g.out_channels, out_plane)];
            let input = g.group_input(input, n, oc);
            let (zx, zw) = (q.input.zero_point, channel.weight_zero);
            forward_plane(g, input, zx, taps, zw, channel.bias_acc(b), &mut |at, block| {
                channel.store(&mut out[at..], block, &mut accs);
            });
        }
        range = range.merge(channel.real_range(accs));
    }
    range
}

/// Quantized input error over the selected output channels `S`:
/// `e_x = z_ex + round((s_w * s_e / s_ex) * sum_{o in S, kh, kw} (w - z_w[o])(e - z_e))`,
/// saturated to `[-128, 127]`; overwrites `in_err`.
///
/// With one weight scale (per tensor, or per channel with all scales equal) this is the exact
/// `i32` form. Distinct per-channel scales use the fixed-point scheme of `ScaleRatios`: each
/// channel's term is weighted by the integer `r_o = s_w[o] / 2^E` (24 bits, read from the
/// float bits, `2^E` the unit of the largest scale's mantissa) in an `i64` sum, which is rounded
/// down by a fixed shift to `i32` and requantized by `2^(E+shift) * s_e / s_ex`: at most half a
/// step plus `2^(shift-1)` sum units (and `2^-23` of the largest scale) of extra error.
///
/// Returns the real range before saturation, from the accumulators times their scale.
/// Scratch: none.
#[allow(clippy::too_many_arguments)] // the operator convention: tensor and qparams side by side
pub fn input_backward_q(
    g: &Conv2dGeom,
    weight: &[i8],
    weight_q: &[QParams],
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    in_err_q: QParams,
    in_err: &mut [i8],
) -> RealRange {
    check_lengths(g, in_err.len(), weight.len(), out_err.len());
    debug_assert!(weight_q.len() == 1 || weight_q.len() == g.out_channels);
    let kernel = ConvInputError {
        geom: g,
        weight,
        out_err,
        channels,
    };
    let max_terms = g.out_per_group() * g.kernel_h * g.kernel_w;
    requantize_input_error(&kernel, weight_q, out_err_q, in_err_q, max_terms, in_err)
}

/// `dw[o][i][kh][kw] += s_x * s_e * sum_{n, oh, ow} (x - z_x)(e - z_e)` for the selected output
/// channels: an exact integer sum (`i32` per row, `i64` in total) and one float multiply-add
/// per weight. Scratch: none.
pub fn weight_backward_q(
    g: &Conv2dGeom,
    input: &[i8],
    input_q: QParams,
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    weight_grad: &mut [f32],
) {
    check_lengths(g, input.len(), weight_grad.len(), out_err.len());
    let scale = input_q.scale * out_err_q.scale;
    let (zx, ze) = (input_q.zero_point, out_err_q.zero_point);
    weight_sums(g, input, zx, out_err, ze, channels, &mut |at, sum: i64| {
        weight_grad[at] += scale * sum as f32;
    });
}

/// `db[o] += s_e * sum_{n, oh, ow} (e - z_e)` for the selected output channels (exact `i64`
/// sum, one float multiply-add per channel). Scratch: none.
pub fn bias_backward_q(
    g: &Conv2dGeom,
    out_err: &[i8],
    out_err_q: QParams,
    channels: ChannelSet,
    bias_grad: &mut [f32],
) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(bias_grad.len(), g.out_channels);
    let (count, plane, ze) = (g.out_channels, g.out_plane(), out_err_q.zero_point);
    channel_sums(g.batch, count, plane, out_err, ze, channels, &mut |o, sum: i64| {
        bias_grad[o] += out_err_q.scale * sum as f32;
    });
}

fn check_lengths(g: &Conv2dGeom, input: usize, weight: usize, output: usize) {
    debug_assert_eq!(g.validate(), Ok(()));
    debug_assert_eq!(input, g.input_len());
    debug_assert_eq!(weight, g.weight_len());
    debug_assert_eq!(output, g.output_len());
}

// ---------------------------------------------------------------------------------------------
// Arithmetic shared by the float and the 8-bit kernels (also used by `linear`).

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
fn valid_outputs(out_len: usize, in_len: usize, k: usize, stride: usize, pad: usize) -> Range<usize> {
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
fn tap_input(o: usize, k: usize, stride: usize, pad: usize, in_len: usize) -> Option<usize> {
    let p = (o * stride + k).checked_sub(pad)?;
    (p < in_len).then_some(p)
}

/// The output `o` whose tap `k` reads input `i` (`o*stride = i + pad - k`), if there is one.
fn tap_output(i: usize, k: usize, stride: usize, pad: usize, out_len: usize) -> Option<usize> {
    let t = (i + pad).checked_sub(k)?;
    (t % stride == 0 && t / stride < out_len).then_some(t / stride)
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end)
}

// ---------------------------------------------------------------------------------------------
// Forward kernels: one output plane `(n, o)` at a time.

/// Accumulators of one output plane: `init + sum_{i, kh, kw} term(x) * term(w)` over the
/// non-padded taps, handed to `emit(offset in the plane, block)` in row blocks. `input` holds
/// the `C_i` planes of the group, `weight` the channel's `C_i * kh * kw` taps.
fn forward_plane<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    input: &[X],
    zx: A,
    weight: &[X],
    zw: A,
    init: A,
    emit: &mut impl FnMut(usize, &[A]),
) {
    if g.is_pointwise() {
        forward_plane_pointwise(g, input, zx, weight, zw, init, emit);
    } else if g.is_depthwise_3x3() {
        forward_plane_depthwise_3x3(g, input, zx, weight, zw, init, emit);
    } else {
        forward_plane_general(g, input, zx, weight, zw, init, emit);
    }
}

/// 1x1 stride 1: `y[p] = init + sum_i w[i] * x[i][p]`, a GEMM row over the flattened plane.
fn forward_plane_pointwise<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    input: &[X],
    zx: A,
    weight: &[X],
    zw: A,
    init: A,
    emit: &mut impl FnMut(usize, &[A]),
) {
    let plane = g.in_plane();
    for block in blocks(plane) {
        let mut acc = [init; BLOCK];
        let acc = &mut acc[..block.len()];
        for (i, &w) in weight.iter().enumerate() {
            axpy(acc, &input[i * plane + block.start..], 1, zx, w.term(zw));
        }
        emit(block.start, acc);
    }
}

/// Depthwise 3x3 (one input plane): the nine weights and the valid columns of each kernel
/// column are set up once per plane; blocks inside every kernel column's valid range (the
/// interior) run nine unchecked row updates. Sum order `kh`, `kw`, as the general path.
fn forward_plane_depthwise_3x3<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    input: &[X],
    zx: A,
    weight: &[X],
    zw: A,
    init: A,
    emit: &mut impl FnMut(usize, &[A]),
) {
    let (out_h, out_w, in_w, stride, pad) = (g.out_h(), g.out_w(), g.in_w, g.stride_w, g.pad_w);
    let w: [A; 9] = core::array::from_fn(|t| weight[t].term(zw));
    let cols: [Range<usize>; 3] =
        core::array::from_fn(|kw| valid_outputs(out_w, in_w, kw, stride, pad));
    let interior = cols[0].start..cols[2].end;
    for oh in 0..out_h {
        let rows: [Option<&[X]>; 3] = core::array::from_fn(|kh| {
            tap_input(oh, kh, g.stride_h, g.pad_h, g.in_h).map(|ih| &input[ih * in_w..][..in_w])
        });
        for block in blocks(out_w) {
            let mut acc = [init; BLOCK];
            let acc = &mut acc[..block.len()];
            let inside = interior.start <= block.start && block.end <= interior.end;
            for (kh, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                for (kw, valid) in cols.iter().enumerate() {
                    let part = if inside {
                        block.clone()
                    } else {
                        intersect(valid, &block)
                    };
                    if part.is_empty() {
                        continue;
                    }
                    let first = part.start * stride + kw - pad;
                    let acc = &mut acc[part.start - block.start..part.end - block.start];
                    axpy(acc, &row[first..], stride, zx, w[kh * 3 + kw]);
                }
            }
            emit(oh * out_w + block.start, acc);
        }
    }
}

/// Any geometry: per output row block, for each tap `(kh, kw)` the block's valid columns are
/// found once and every input channel of the group adds one row update (order `kh, kw, i`).
fn forward_plane_general<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    input: &[X],
    zx: A,
    weight: &[X],
    zw: A,
    init: A,
    emit: &mut impl FnMut(usize, &[A]),
) {
    let (out_h, out_w) = (g.out_h(), g.out_w());
    let (in_plane, kernel) = (g.in_plane(), g.kernel_h * g.kernel_w);
    for oh in 0..out_h {
        for block in blocks(out_w) {
            let mut acc = [init; BLOCK];
            let acc = &mut acc[..block.len()];
            for kh in 0..g.kernel_h {
                let Some(ih) = tap_input(oh, kh, g.stride_h, g.pad_h, g.in_h) else {
                    continue;
                };
                for kw in 0..g.kernel_w {
                    let valid = valid_outputs(out_w, g.in_w, kw, g.stride_w, g.pad_w);
                    let part = intersect(&valid, &block);
                    if part.is_empty() {
                        continue;
                    }
                    let first = ih * g.in_w + part.start * g.stride_w + kw - g.pad_w;
                    let acc = &mut acc[part.start - block.start..part.end - block.start];
                    let taps = weight[kh * g.kernel_w + kw..].iter().step_by(kernel);
                    for (i, &w) in taps.enumerate() {
                        let x = &input[i * in_plane + first..];
                        axpy(acc, x, g.stride_w, zx, w.term(zw));
                    }
                }
            }
            emit(oh * out_w + block.start, acc);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Input error kernels: one input-error plane `(n, c)` at a time.

/// Output channels of `group` that `channels` selects, in ascending order for `All` and in
/// list order for a subset.
pub(crate) fn group_channels<'a>(
    channels: ChannelSet<'a>,
    group: Range<usize>,
) -> impl Iterator<Item = usize> + Clone + 'a {
    let (all, list): (Range<usize>, &[u16]) = match channels {
        ChannelSet::All => (group.clone(), &[]),
        ChannelSet::Subset(list) => (0..0, list),
    };
    all.chain(
        list.iter()
            .map(|&c| c as usize)
            .filter(move |c| group.contains(c)),
    )
}

/// Input-error accumulators of every input element,
/// `sum_{o in S, kh, kw} (term(w[o][...]) * factor_o) * term(e[n][o][oh][ow])` with
/// `(z_w, factor) = channel(o)`, handed to `emit(index in in_err, block)`.
fn input_error<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    weight: &[X],
    err: &[X],
    ze: A,
    channels: ChannelSet,
    channel: impl Fn(usize) -> (A, A),
    emit: &mut impl FnMut(usize, &[A]),
) {
    let (c_in, c_out) = (g.in_per_group(), g.out_per_group());
    let sample_len = g.out_channels * g.out_plane();
    for n in 0..g.batch {
        let err = &err[n * sample_len..][..sample_len];
        for c in 0..g.in_channels {
            let group = c / c_in;
            let outputs = group_channels(channels, group * c_out..(group + 1) * c_out);
            let plane = ErrorPlane {
                geom: g,
                weight,
                err,
                ze,
                local: c % c_in,
            };
            let base = Conv2dGeom::plane(n, c, g.in_channels, g.in_plane()).start;
            let emit = &mut |at: usize, block: &[A]| emit(base + at, block);
            if g.is_pointwise() {
                plane.pointwise(outputs, &channel, emit);
            } else {
                plane.general(outputs, &channel, emit);
            }
        }
    }
}

/// One input-error plane: input channel `local` of its group, one sample's error `err`.
struct ErrorPlane<'a, X, A> {
    geom: &'a Conv2dGeom,
    weight: &'a [X],
    err: &'a [X],
    ze: A,
    local: usize,
}

impl<X: Term<A>, A: Acc> ErrorPlane<'_, X, A> {
    /// The tap weight `term(w[o][local][kh][kw]) * factor_o`.
    #[inline(always)]
    fn weight(&self, o: usize, tap: usize, channel: &impl Fn(usize) -> (A, A)) -> A {
        let g = self.geom;
        let kernel = g.kernel_h * g.kernel_w;
        let (zw, factor) = channel(o);
        self.weight[o * g.taps() + self.local * kernel + tap].term(zw) * factor
    }

    /// 1x1 stride 1: `e_x[p] = sum_o w[o][local] * e[o][p]`.
    fn pointwise(
        &self,
        outputs: impl Iterator<Item = usize> + Clone,
        channel: &impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) {
        let plane = self.geom.in_plane();
        for block in blocks(plane) {
            let mut acc = [A::default(); BLOCK];
            let acc = &mut acc[..block.len()];
            for o in outputs.clone() {
                let e = &self.err[o * plane + block.start..];
                axpy(acc, e, 1, self.ze, self.weight(o, 0, channel));
            }
            emit(block.start, acc);
        }
    }

    /// Any geometry: per input row block and tap `(kh, kw)`, the input columns that some
    /// output reads through that tap are `iw = ow*stride_w + kw - pad_w`, every `stride_w`-th
    /// column of the block, fed by consecutive outputs `ow`; every selected output channel adds
    /// one strided row update (order `kh, kw, o`).
    fn general(
        &self,
        outputs: impl Iterator<Item = usize> + Clone,
        channel: &impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) {
        let g = self.geom;
        let (out_h, out_w, out_plane) = (g.out_h(), g.out_w(), g.out_plane());
        let stride = g.stride_w;
        for ih in 0..g.in_h {
            for block in blocks(g.in_w) {
                let mut acc = [A::default(); BLOCK];
                let acc = &mut acc[..block.len()];
                for kh in 0..g.kernel_h {
                    let Some(oh) = tap_output(ih, kh, g.stride_h, g.pad_h, out_h) else {
                        continue;
                    };
                    for kw in 0..g.kernel_w {
                        let valid = valid_outputs(out_w, g.in_w, kw, stride, g.pad_w);
                        // Outputs `ow` whose tap kw lands in the block.
                        let Some(last) = (block.end - 1 + g.pad_w).checked_sub(kw) else {
                            continue;
                        };
                        let end = valid.end.min(last / stride + 1);
                        let below = (block.start + g.pad_w).saturating_sub(kw);
                        let first = valid.start.max(below.div_ceil(stride));
                        if first >= end {
                            continue;
                        }
                        let iw = first * stride + kw - g.pad_w;
                        let acc = &mut acc[iw - block.start..];
                        for o in outputs.clone() {
                            let e = &self.err[o * out_plane + oh * out_w + first..][..end - first];
                            let w = self.weight(o, kh * g.kernel_w + kw, channel);
                            if stride == 1 {
                                axpy(&mut acc[..e.len()], e, 1, self.ze, w);
                            } else {
                                for (a, &v) in acc.iter_mut().step_by(stride).zip(e) {
                                    *a += v.term(self.ze) * w;
                                }
                            }
                        }
                    }
                }
                emit(ih * g.in_w + block.start, acc);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient sums.

/// Weight-gradient sums `sum_{n, oh, ow} term(x[n][g*C_i + i][ih][iw]) * term(e[n][o][oh][ow])`
/// of every selected channel's weights, totalled in `W` and handed to `emit(weight index, sum)`.
fn weight_sums<X: Term<A>, A: Acc, W: Acc + From<A>>(
    g: &Conv2dGeom,
    input: &[X],
    zx: A,
    err: &[X],
    ze: A,
    channels: ChannelSet,
    emit: &mut impl FnMut(usize, W),
) {
    let (in_plane, out_plane, out_w) = (g.in_plane(), g.out_plane(), g.out_w());
    let kernel = g.kernel_h * g.kernel_w;
    for o in channels.iter(g.out_channels) {
        for i in 0..g.in_per_group() {
            for kh in 0..g.kernel_h {
                for kw in 0..g.kernel_w {
                    let valid = valid_outputs(out_w, g.in_w, kw, g.stride_w, g.pad_w);
                    let mut sum = W::default();
                    for n in 0..g.batch {
                        let x = &g.group_input(input, n, o)[i * in_plane..][..in_plane];
                        let e = &err[Conv2dGeom::plane(n, o, g.out_channels, out_plane)];
                        if g.is_pointwise() {
                            // The whole plane is one row.
                            sum += dot_wide(x, 1, zx, e, ze);
                            continue;
                        }
                        if valid.is_empty() {
                            continue;
                        }
                        for oh in 0..g.out_h() {
                            let Some(ih) = tap_input(oh, kh, g.stride_h, g.pad_h, g.in_h) else {
                                continue;
                            };
                            let x = &x[ih * g.in_w + valid.start * g.stride_w + kw - g.pad_w..];
                            let e = &e[oh * out_w..][valid.clone()];
                            sum += dot_wide(x, g.stride_w, zx, e, ze);
                        }
                    }
                    emit(o * g.taps() + i * kernel + kh * g.kernel_w + kw, sum);
                }
            }
        }
    }
}

/// Per selected channel `o`: `sum_{n, p} term(e[n][o][p])` over a `[batch][count][plane]`
/// tensor, totalled in `W` and handed to `emit(o, sum)`.
pub(crate) fn channel_sums<X: Term<A>, A: Acc, W: Acc + From<A>>(
    batch: usize,
    count: usize,
    plane: usize,
    err: &[X],
    ze: A,
    channels: ChannelSet,
    emit: &mut impl FnMut(usize, W),
) {
    for o in channels.iter(count) {
        let mut sum = W::default();
        for n in 0..batch {
            for &e in &err[Conv2dGeom::plane(n, o, count, plane)] {
                sum += W::from(e.term(ze));
            }
        }
        emit(o, sum);
    }
}

// ---------------------------------------------------------------------------------------------
// Requantization shared with `linear`.

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

/// Forward requantization of one output channel `o`, set up once per channel:
/// `s_a = s_x * s_w[o]`, bias `requant(b, bias_scale / s_a)`, output
/// `clamp(z_y + requant(acc, s_a / s_y), act_lo, act_hi)`.
pub(crate) struct OutputChannel {
    /// `z_w[o]`.
    pub(crate) weight_zero: i32,
    bias: Requant,
    output: Requant,
    output_zero: i32,
    codes: (i32, i32),
    reals: (f32, f32),
    acc_scale: f64,
}

impl OutputChannel {
    pub(crate) fn new(q: &QLayerParams, channel: usize) -> Self {
        let wq = channel_qparams(q.weight, channel);
        let acc_scale = q.input.scale as f64 * wq.scale as f64;
        OutputChannel {
            weight_zero: wq.zero_point,
            bias: Requant::from_real(q.bias_scale as f64 / acc_scale),
            output: Requant::from_real(acc_scale / q.output.scale as f64),
            output_zero: q.output.zero_point,
            codes: q.activation.code_bounds(q.output),
            reals: q.activation.real_bounds(),
            acc_scale,
        }
    }

    /// The bias in accumulator units: `requant(b, bias_scale / s_a)`.
    pub(crate) fn bias_acc(&self, bias: i32) -> i32 {
        self.bias.apply(bias)
    }

    /// Requantize a block of accumulators into `out` and widen `accs` by them.
    #[inline(always)]
    pub(crate) fn store(&self, out: &mut [i8], block: &[i32], accs: &mut AccRange) {
        for (y, &acc) in out.iter_mut().zip(block) {
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

struct ConvInputError<'a> {
    geom: &'a Conv2dGeom,
    weight: &'a [i8],
    out_err: &'a [i8],
    channels: ChannelSet<'a>,
}

impl InputErrorKernel for ConvInputError<'_> {
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

/// `e_x = z_ex + round(M * acc)`, saturated, for the accumulators of `kernel`; see
/// [`input_backward_q`] for the two schemes. `max_terms` bounds the products in one sum.
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
    let zw = |o: usize| channel_qparams(weight_q, o).zero_point;
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
            out.store(&mut in_err[at..], block.iter().map(|&acc| ratios.narrow(acc)));
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
            *e = self.zero.saturating_add(self.requant.apply(acc)).clamp(Q_MIN, Q_MAX) as i8;
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
struct ScaleRatios {
    exponent: i32,
    shift: u32,
}

impl ScaleRatios {
    fn new(weight_q: &[QParams], max_terms: usize) -> Self {
        let exponent = weight_q.iter().map(|wq| split_f32(wq.scale).1).max().unwrap_or(0);
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
    fn unit(&self) -> f64 {
        libm::ldexp(1.0, self.exponent + self.shift as i32)
    }
}

/// `(m, e)` with `x = m * 2^e` exactly, `m < 2^24`, for a finite `x >= 0`.
#[inline(always)]
fn split_f32(x: f32) -> (i64, i32) {
    let bits = x.to_bits();
    let biased = ((bits >> 23) & 0xff) as i32;
    let fraction = (bits & 0x7f_ffff) as i64;
    if biased == 0 {
        (fraction, -149)
    } else {
        (fraction | 0x80_0000, biased - 150)
    }
}
