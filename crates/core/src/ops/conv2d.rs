//! 2-D convolution, float and 8-bit: forward, input error and weight gradient, the
//! [`WeightedKernels`] of [`Conv2dGeom`] (the bias gradient is the layer contract's,
//! [`Parametric::bias_backward`](crate::ops::operator::Parametric::bias_backward)).
//!
//! One geometry covers the standard, the grouped and the depthwise (`groups == in_channels`)
//! convolution, and the 1-D convolution (`in_h = kernel_h = 1`, `pad_h = 0`). Padding is zero
//! padding: real 0, which is the code `z_x` in the 8-bit forms, so a padded tap adds `(z_x - z_x) *
//! (w - z_w) = 0` and simply drops out of every sum.
//!
//! Notation: `G = groups`, `C_i = in_channels / G` and `C_o = out_channels / G` channels per group;
//! output channel `o` belongs to group `g = o / C_o` and reads input channels `g*C_i + i` for `i <
//! C_i`; a tap `(kh, kw)` of output `(oh, ow)` reads input `(ih, iw) = (oh*stride_h + kh - pad_h,
//! ow*stride_w + kw - pad_w)`.
//!
//! Kernels. The float and the 8-bit forms run the same loops, written once over the `Term`/`Acc`
//! traits of [`crate::ops::arith`]: an `f32` enters a sum as itself, an `i8` code as `q - z` in an
//! `i32` (or `i64`) accumulator. Every result is accumulated in a block of at most `BLOCK` values
//! on the stack and handed to a store step (copy, requantize, or add to a gradient), so no kernel
//! needs scratch memory (the layer's
//! [`Operator::scratch_bytes`](crate::ops::operator::Operator::scratch_bytes) is 0). Inner loops
//! run along a row (output width, or the whole plane for 1x1), so float code vectorizes. Fast
//! paths: the pointwise convolution (1x1, stride 1, no padding: a GEMM per group) for every pass,
//! and the depthwise 3x3 forward; a general path covers everything else. Float sums are evaluated
//! in a fixed order, so the host and the MCU get the same bits.
//!
//! 8-bit accumulators are `i32`: one sum may hold at most 33 025 products (`33 025 * 255^2 <
//! 2^31`), i.e. `C_i * kernel_h * kernel_w` (forward) and `C_o * kernel_h * kernel_w` (input error)
//! up to 33 025; weight and bias gradients sum rows into `i64` and have no such limit.

use core::ops::Range;

use crate::ops::arith::{
    axpy, blocks, convolution_fits_int8_limits, dot_wide, intersect, requantize_input_error,
    tap_input, tap_output, valid_outputs, Acc, AccRange, InputErrorKernel, OutputChannel,
    QLayerParams, Term, BLOCK,
};
use crate::ops::operator::{ParamShape, Shape};
use crate::ops::weighted::{Weighted, WeightedKernels};
use crate::ops::{checked_product, ChannelSet, OpError, WeightParts};
use crate::quant::{QParams, RealRange};

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
    /// A geometry with a square kernel, stride and padding (`k x k`, `s x s`, `p x p`).
    #[allow(clippy::too_many_arguments)] // the geometry's fields in order
    pub const fn square(
        batch: usize,
        in_channels: usize,
        in_h: usize,
        in_w: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Self {
        Conv2dGeom {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h: kernel,
            kernel_w: kernel,
            stride_h: stride,
            stride_w: stride,
            pad_h: pad,
            pad_w: pad,
            groups,
        }
    }

    /// Output height: `(in_h + 2 * pad_h - kernel_h) / stride_h + 1` (of a valid geometry).
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad_h - self.kernel_h) / self.stride_h + 1
    }

    /// Output width: `(in_w + 2 * pad_w - kernel_w) / stride_w + 1` (of a valid geometry).
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad_w - self.kernel_w) / self.stride_w + 1
    }

    /// Elements of the weight tensor:
    /// `out_channels * (in_channels / groups) * kernel_h * kernel_w`.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.taps()
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

// ---------------------------------------------------------------------------------------------
// Shapes and kernels: what the layer contract needs ([`Weighted`]).

impl WeightedKernels for Conv2dGeom {
    fn output_shape(&self) -> Shape {
        [self.out_channels, self.out_h(), self.out_w()]
    }

    fn param_shape(&self) -> ParamShape {
        ParamShape {
            channels: self.out_channels,
            structure: self.taps(),
        }
    }

    /// Elements of the input (and of the input error): `batch * in_channels * in_h * in_w`.
    fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_plane()
    }

    /// Elements of the output (and of the output error): `batch * out_channels * out_h * out_w`.
    fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_plane()
    }

    /// Multiply-accumulates of one forward pass (and of each backward pass over all
    /// channels): `output_len * (in_channels / groups) * kernel_h * kernel_w`, padding included.
    fn macs(&self) -> usize {
        self.output_len() * self.taps()
    }

    /// Checks that every size is positive, that both channel counts divide into `groups`, and
    /// that the kernel fits in the padded input.
    fn validate(&self) -> Result<(), OpError> {
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
        if !self.in_channels.is_multiple_of(self.groups)
            || !self.out_channels.is_multiple_of(self.groups)
        {
            return Err(OpError::BadGroups);
        }
        let padded = |len: usize, pad: usize| pad.checked_mul(2).and_then(|p| p.checked_add(len));
        let (padded_h, padded_w) = (
            padded(self.in_h, self.pad_h).ok_or(OpError::Overflow)?,
            padded(self.in_w, self.pad_w).ok_or(OpError::Overflow)?,
        );
        if self.kernel_h > padded_h || self.kernel_w > padded_w {
            return Err(OpError::KernelTooLarge);
        }
        // Every size the kernels and the planner derive fits a `usize`.
        let taps = checked_product(&[self.in_per_group(), self.kernel_h, self.kernel_w])?;
        let outputs = [self.batch, self.out_channels, self.out_h(), self.out_w()];
        checked_product(&[self.batch, self.in_channels, self.in_h, self.in_w])?;
        checked_product(&[self.out_channels, taps])?;
        checked_product(&[checked_product(&outputs)?, taps])?;
        Ok(())
    }

    /// The geometry of output channels `0..channels` alone, when they are whole groups (or
    /// `groups == 1`): it reads the first `in_channels * groups' / groups` input channels, and
    /// at batch 1 its input, output and weights are prefixes of this geometry's. `None` when
    /// `channels` is 0, above `out_channels`, or splits a group of several channels.
    fn output_prefix(&self, channels: usize) -> Option<Conv2dGeom> {
        if channels == 0 || channels > self.out_channels {
            return None;
        }
        if self.groups == 1 {
            return Some(Conv2dGeom {
                out_channels: channels,
                ..*self
            });
        }
        let per_group = self.out_per_group();
        channels.is_multiple_of(per_group).then(|| {
            let groups = channels / per_group;
            Conv2dGeom {
                in_channels: groups * self.in_per_group(),
                out_channels: channels,
                groups,
                ..*self
            }
        })
    }

    /// [`convolution_fits_int8_limits`] of the geometry.
    fn fits_int8_limits(&self) -> bool {
        convolution_fits_int8_limits(
            (self.in_per_group(), self.out_per_group()),
            (self.kernel_h, self.kernel_w),
            (self.out_h(), self.out_w()),
        )
    }

    // -----------------------------------------------------------------------------------------
    // Float forms.

    /// `y[n][o][oh][ow] = b[o] + sum_{i<C_i, kh, kw} x[n][g*C_i + i][ih][iw] * w[o][i][kh][kw]`,
    /// padded taps skipped; overwrites `output`. Scratch: none.
    fn forward(&self, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
        let g = self;
        g.check_lengths(input.len(), weight.len(), output.len());
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
    /// `e_x[n][c][ih][iw] = sum_{o in S, kh, kw} w[o][c - g*C_i][kh][kw] * e[n][o][oh][ow]`
    /// (`o` in `c`'s group `g`)
    /// over the taps with `oh*stride_h = ih + pad_h - kh`, `ow*stride_w = iw + pad_w - kw`;
    /// overwrites `in_err` (channels of a group without selected outputs get 0). Scratch: none.
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

    /// `dw[o][i][kh][kw] += sum_{n, oh, ow} x[n][g*C_i + i][ih][iw] * e[n][o][oh][ow]` for the
    /// selected output channels `o` (padded taps add nothing). Scratch: none.
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

    /// Quantized forward, per output channel `o` (accumulator scale `s_a = s_x * s_w[o]`):
    /// `acc = sum_{i, kh, kw} (x - z_x)(w - z_w[o]) + requant(b[o], bias_scale / s_a)`,
    /// `y = clamp(z_y + round(acc * s_a / s_y), act_lo, act_hi)` where `act_lo, act_hi` are the
    /// activation's bounds as codes, within `[-128, 127]`. Padding is the code `z_x`.
    ///
    /// Returns the real output range after the activation clamp but before 8-bit saturation, exact
    /// from the accumulators: `[clamp(s_a * min acc), clamp(s_a * max acc)]` merged over channels.
    /// Overwrites `output`. Scratch: none.
    ///
    /// The bias is added to the sum of products last, with `i32` saturation: the sum cannot
    /// overflow, while the bias in accumulator units may be anywhere in `i32`.
    ///
    /// The weights come in two parts ([`WeightParts`]: the first output channels in
    /// `weight.head`, the rest in `weight.tail`); the sums are those of one tensor.
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
        debug_assert_eq!(bias.len(), g.out_channels);
        debug_assert!(q.weight.len() == 1 || q.weight.len() == g.out_channels);
        let out_plane = g.out_plane();
        let mut range = RealRange::EMPTY;
        for (oc, &b) in bias.iter().enumerate() {
            let channel = OutputChannel::new(q, oc, b);
            let mut accs = AccRange::EMPTY;
            let taps = weight.structure(oc, g.taps());
            for n in 0..g.batch {
                let out = &mut output[Conv2dGeom::plane(n, oc, g.out_channels, out_plane)];
                let input = g.group_input(input, n, oc);
                let (zx, zw) = (q.input.zero_point, channel.weight_zero);
                forward_plane(g, input, zx, taps, zw, 0, &mut |at, block| {
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
    /// `i32` form. Distinct per-channel scales use a deterministic integer scheme: output channel
    /// `o`'s terms are weighted by the integer ratio `r_o = floor(s_w[o] / 2^E)` (at most 24 bits,
    /// read from the float's bits; `2^E` is the unit of the largest scale's mantissa, so that scale
    /// is exact) and summed in `i64`; the sum is narrowed to `i32` by a round-half-up right shift
    /// `k` fixed by the geometry (so it cannot overflow) and requantized by
    /// `2^(E+k) * s_e / s_ex`. Extra error over the exact form: half a narrowed unit,
    /// `2^(E+k-1) * s_e`, plus below `2^E * s_e` per unit of `sum |(w - z_w)(e - z_e)|` (the ratio
    /// truncation, under `2^-23` of the largest scale).
    ///
    /// Returns the real range before saturation, from the accumulators times their scale.
    /// Scratch: none.
    ///
    /// The weights come in two parts ([`WeightParts`]: the first output channels in
    /// `weight.head`, the rest in `weight.tail`); the sums are those of one tensor.
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
        weight_sums(g, input, zx, out_err, ze, channels, &mut |at, sum: i64| {
            weight_grad[at] += scale * sum as f32;
        });
    }
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

/// Input-error accumulators of every input element,
/// `sum_{o in S, kh, kw} (term(w[o][...]) * factor_o) * term(e[n][o][oh][ow])` with
/// `(z_w, factor) = channel(o)`, handed to `emit(index in in_err, block)`.
fn input_error<X: Term<A>, A: Acc>(
    g: &Conv2dGeom,
    weight: WeightParts<X>,
    err: &[X],
    ze: A,
    channels: ChannelSet,
    channel: impl Fn(usize) -> (A, A),
    emit: &mut impl FnMut(usize, &[A]),
) {
    let (c_in, c_out, taps) = (g.in_per_group(), g.out_per_group(), g.taps());
    let sample_len = g.out_channels * g.out_plane();
    for n in 0..g.batch {
        let err = &err[n * sample_len..][..sample_len];
        for c in 0..g.in_channels {
            let group = c / c_in;
            let outputs = channels.within(group * c_out..(group + 1) * c_out);
            let plane = ErrorPlane {
                geom: g,
                weight,
                err,
                ze,
                local: c % c_in,
                taps,
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
    weight: WeightParts<'a, X>,
    err: &'a [X],
    ze: A,
    local: usize,
    /// Weights per output channel ([`Conv2dGeom::taps`], computed once).
    taps: usize,
}

impl<X: Term<A>, A: Acc> ErrorPlane<'_, X, A> {
    /// The tap weight `term(w[o][local][kh][kw]) * factor_o`.
    #[inline(always)]
    fn weight(&self, o: usize, tap: usize, channel: &impl Fn(usize) -> (A, A)) -> A {
        let g = self.geom;
        let kernel = g.kernel_h * g.kernel_w;
        let (zw, factor) = channel(o);
        self.weight.structure(o, self.taps)[self.local * kernel + tap].term(zw) * factor
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
    // The geometry's derived sizes, computed once (each holds a division).
    let (in_plane, out_plane, out_w) = (g.in_plane(), g.out_plane(), g.out_w());
    let (c_in, c_out, taps) = (g.in_per_group(), g.out_per_group(), g.taps());
    let kernel = g.kernel_h * g.kernel_w;
    let pointwise = g.is_pointwise();
    for o in channels.iter(g.out_channels) {
        let first_input = o / c_out * c_in;
        for i in 0..c_in {
            let channel = first_input + i;
            for kh in 0..g.kernel_h {
                for kw in 0..g.kernel_w {
                    let valid = match pointwise {
                        true => 0..0,
                        false => valid_outputs(out_w, g.in_w, kw, g.stride_w, g.pad_w),
                    };
                    let mut sum = W::default();
                    for n in 0..g.batch {
                        let x = &input[(n * g.in_channels + channel) * in_plane..][..in_plane];
                        let e = &err[Conv2dGeom::plane(n, o, g.out_channels, out_plane)];
                        if pointwise {
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
                    emit(o * taps + i * kernel + kh * g.kernel_w + kw, sum);
                }
            }
        }
    }
}

struct ConvInputError<'a> {
    geom: &'a Conv2dGeom,
    weight: WeightParts<'a, i8>,
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

/// A convolution layer: its geometry and the activation fused into its output.
pub type Conv2dLayer = Weighted<Conv2dGeom>;

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
    use crate::rng::Rng;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// Standard, depthwise (any kernel and 3x3), grouped and pointwise shapes; each may be 1-D.
    fn geometry() -> impl Strategy<Value = Conv2dGeom> {
        let sizes = (1usize..=2, 1usize..=3, 1usize..=3, 1usize..=5, 1usize..=37);
        let kernel = (
            1usize..=3,
            1usize..=3,
            1usize..=2,
            1usize..=2,
            0usize..=2,
            0usize..=2,
        );
        (0usize..5, any::<bool>(), sizes, kernel).prop_filter_map(
            "kernel larger than the padded input",
            |(shape, one_d, (batch, c_in, c_out, in_h, in_w), (kh, kw, sh, sw, ph, pw))| {
                let (groups, c_in, c_out, kh, kw, sh, sw, ph, pw) = match shape {
                    0 => (1, c_in, c_out, kh, kw, sh, sw, ph, pw),
                    1 => (c_in + 1, 1, 1, kh, kw, sh, sw, ph, pw),
                    2 => (c_in + 1, 1, 1, 3, 3, sh, sw, ph, pw),
                    3 => (2, c_in, c_out, kh, kw, sh, sw, ph, pw),
                    _ => (c_in % 2 + 1, c_in, c_out, 1, 1, 1, 1, 0, 0),
                };
                let (in_h, kh, ph) = if one_d && shape != 2 {
                    (1, 1, 0)
                } else {
                    (in_h, kh, ph)
                };
                let g = Conv2dGeom {
                    batch,
                    in_channels: groups * c_in,
                    in_h,
                    in_w,
                    out_channels: groups * c_out,
                    kernel_h: kh,
                    kernel_w: kw,
                    stride_h: sh,
                    stride_w: sw,
                    pad_h: ph,
                    pad_w: pw,
                    groups,
                };
                g.validate().ok().map(|_| g)
            },
        )
    }

    fn layer(geom: Conv2dGeom, activation: Activation) -> Conv2dLayer {
        Conv2dLayer { geom, activation }
    }

    // -- Reference kernels: the plain loops over every (output, tap) pair. ------------------

    /// The plain-loop forward in `f64`, as the contract checks take it.
    fn reference(g: Conv2dGeom) -> impl Fn(&[f64], &[f64], &[f64], &[f64]) -> Vec<f64> {
        move |x, _skip, w, b| ref_forward(&g, x, 0.0, w, &|_| 0.0, &|o| b[o])
    }

    /// Calls `f(input index, weight index, output index)` for every non-padded tap of every
    /// output, in the order `n, o, oh, ow, i, kh, kw`.
    fn for_each_tap(g: &Conv2dGeom, mut f: impl FnMut(usize, usize, usize)) {
        let (out_h, out_w) = (g.out_h() as isize, g.out_w() as isize);
        let (c_in, c_out) = (g.in_per_group(), g.out_per_group());
        let (kh_n, kw_n) = (g.kernel_h as isize, g.kernel_w as isize);
        let (in_h, in_w) = (g.in_h as isize, g.in_w as isize);
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for oh in 0..out_h {
                    for ow in 0..out_w {
                        let y = ((n * g.out_channels + o) as isize * out_h + oh) * out_w + ow;
                        for i in 0..c_in {
                            let c = o / c_out * c_in + i;
                            for kh in 0..kh_n {
                                for kw in 0..kw_n {
                                    let ih = oh * g.stride_h as isize + kh - g.pad_h as isize;
                                    let iw = ow * g.stride_w as isize + kw - g.pad_w as isize;
                                    if ih < 0 || iw < 0 || ih >= in_h || iw >= in_w {
                                        continue;
                                    }
                                    let x =
                                        ((n * g.in_channels + c) as isize * in_h + ih) * in_w + iw;
                                    let w = ((o * c_in + i) as isize * kh_n + kh) * kw_n + kw;
                                    f(x as usize, w as usize, y as usize);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn ref_forward<X: Term<A>, A: Acc>(
        g: &Conv2dGeom,
        x: &[X],
        zx: A,
        w: &[X],
        zw: &dyn Fn(usize) -> A,
        init: &dyn Fn(usize) -> A,
    ) -> Vec<A> {
        let plane = g.out_plane();
        let mut y: Vec<A> = (0..g.output_len())
            .map(|k| init(k / plane % g.out_channels))
            .collect();
        let taps = g.taps();
        for_each_tap(g, |xi, wi, yi| {
            y[yi] += x[xi].term(zx) * w[wi].term(zw(wi / taps))
        });
        y
    }

    fn ref_input_error<X: Term<A>, A: Acc>(
        g: &Conv2dGeom,
        w: &[X],
        e: &[X],
        ze: A,
        wterm: &dyn Fn(usize, X) -> A,
    ) -> Vec<A> {
        let mut ex = vec![A::default(); g.input_len()];
        let taps = g.taps();
        for_each_tap(g, |xi, wi, yi| {
            ex[xi] += wterm(wi / taps, w[wi]) * e[yi].term(ze)
        });
        ex
    }

    fn ref_weight_grad<X: Term<A>, A: Acc>(
        g: &Conv2dGeom,
        x: &[X],
        zx: A,
        e: &[X],
        ze: A,
    ) -> Vec<A> {
        let mut dw = vec![A::default(); g.weight_len()];
        for_each_tap(g, |xi, wi, yi| dw[wi] += x[xi].term(zx) * e[yi].term(ze));
        dw
    }

    /// Accumulators of every output plane from the dispatched kernel, or forced general path.
    fn forward_accs<X: Term<A>, A: Acc>(
        g: &Conv2dGeom,
        x: &[X],
        zx: A,
        w: &[X],
        zw: &dyn Fn(usize) -> A,
        init: &dyn Fn(usize) -> A,
        general: bool,
    ) -> Vec<A> {
        let mut y = vec![A::default(); g.output_len()];
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                let out = &mut y[Conv2dGeom::plane(n, o, g.out_channels, g.out_plane())];
                let mut emit = |at: usize, block: &[A]| {
                    out[at..at + block.len()].copy_from_slice(block);
                };
                let (input, taps) = (g.group_input(x, n, o), &w[o * g.taps()..][..g.taps()]);
                if general {
                    forward_plane_general(g, input, zx, taps, zw(o), init(o), &mut emit);
                } else {
                    forward_plane(g, input, zx, taps, zw(o), init(o), &mut emit);
                }
            }
        }
        y
    }

    /// Input-error accumulators from the dispatched kernel, or forced general path.
    fn input_error_accs<X: Term<A>, A: Acc>(
        g: &Conv2dGeom,
        w: &[X],
        e: &[X],
        ze: A,
        channel: &dyn Fn(usize) -> (A, A),
        general: bool,
    ) -> Vec<A> {
        let mut ex = vec![A::default(); g.input_len()];
        let mut emit = |at: usize, block: &[A]| ex[at..at + block.len()].copy_from_slice(block);
        if !general {
            input_error(
                g,
                WeightParts::whole(w),
                e,
                ze,
                ChannelSet::All,
                channel,
                &mut emit,
            );
            return ex;
        }
        let sample = g.out_channels * g.out_plane();
        for n in 0..g.batch {
            for c in 0..g.in_channels {
                let group = c / g.in_per_group() * g.out_per_group();
                let plane = ErrorPlane {
                    geom: g,
                    weight: WeightParts::whole(w),
                    err: &e[n * sample..][..sample],
                    ze,
                    local: c % g.in_per_group(),
                    taps: g.taps(),
                };
                let base = Conv2dGeom::plane(n, c, g.in_channels, g.in_plane()).start;
                let outputs = group..group + g.out_per_group();
                plane.general(outputs, &channel, &mut |at, block| emit(base + at, block));
            }
        }
        ex
    }

    // -- Unit tests. -----------------------------------------------------------------------

    #[test]
    fn geometry_sizes_and_validation() {
        let g = Conv2dGeom {
            batch: 2,
            in_channels: 4,
            in_h: 7,
            in_w: 5,
            out_channels: 6,
            kernel_h: 3,
            kernel_w: 2,
            stride_h: 2,
            stride_w: 1,
            pad_h: 1,
            pad_w: 0,
            groups: 2,
        };
        assert_eq!(g.validate(), Ok(()));
        assert_eq!((g.out_h(), g.out_w()), (4, 4));
        assert_eq!(g.input_len(), 2 * 4 * 7 * 5);
        assert_eq!(g.output_len(), 2 * 6 * 4 * 4);
        assert_eq!(g.weight_len(), 6 * 2 * 3 * 2);
        assert_eq!(g.macs(), 2 * 6 * 4 * 4 * 2 * 3 * 2);
        let bad_groups = Conv2dGeom { groups: 3, ..g };
        assert_eq!(bad_groups.validate(), Err(OpError::BadGroups));
        let too_large = Conv2dGeom { kernel_w: 6, ..g };
        assert_eq!(too_large.validate(), Err(OpError::KernelTooLarge));
        let padded = Conv2dGeom {
            pad_w: 1,
            ..too_large
        };
        assert_eq!(padded.validate(), Ok(()));
        assert_eq!(
            Conv2dGeom { stride_h: 0, ..g }.validate(),
            Err(OpError::ZeroSize)
        );
    }

    #[test]
    fn one_d_forward_by_hand() {
        // x = [1, 2, 3, 4], kernel [1, 0, -1], padding 1: y[t] = x[t-1] - x[t+1] + 0.5.
        let g = Conv2dGeom {
            batch: 1,
            in_channels: 1,
            in_h: 1,
            in_w: 4,
            out_channels: 1,
            kernel_h: 1,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 1,
            pad_h: 0,
            pad_w: 1,
            groups: 1,
        };
        let mut y = [0.0f32; 4];
        g.forward(&[1.0, 2.0, 3.0, 4.0], &[1.0, 0.0, -1.0], &[0.5], &mut y);
        assert_eq!(y, [-1.5, -1.5, -1.5, 3.5]);
        // The transpose: e_x[t] = e[t+1] - e[t-1].
        let mut ex = [0.0f32; 4];
        g.input_backward(
            &[1.0, 0.0, -1.0],
            &[1.0, 10.0, 100.0, 1000.0],
            ChannelSet::All,
            &mut ex,
        );
        assert_eq!(ex, [10.0, 99.0, 990.0, -100.0]);
    }

    #[test]
    fn quantized_forward_by_hand() {
        // 1x1: acc = (x - 2) * 3 + 4 with s_a = 0.5 * 0.25 = bias_scale, output step 0.25.
        let g = Conv2dGeom {
            batch: 1,
            in_channels: 1,
            in_h: 1,
            in_w: 2,
            out_channels: 1,
            kernel_h: 1,
            kernel_w: 1,
            stride_h: 1,
            stride_w: 1,
            pad_h: 0,
            pad_w: 0,
            groups: 1,
        };
        let weight_q = [QParams {
            scale: 0.25,
            zero_point: 0,
        }];
        let mut q = QLayerParams {
            input: QParams {
                scale: 0.5,
                zero_point: 2,
            },
            weight: &weight_q,
            bias_scale: 0.125,
            output: QParams {
                scale: 0.25,
                zero_point: -10,
            },
            activation: Activation::None,
        };
        let mut y = [0i8; 2];
        // acc 28 -> 3.5 -> code 14 - 10; acc -17 -> -2.125 -> round(-8.5) = -8 -> code -18.
        let range = g.forward_q(&[10, -5], WeightParts::whole(&[3]), &[4], &q, &mut y);
        assert_eq!(y, [4, -18]);
        assert_eq!(
            range,
            RealRange {
                min: -2.125,
                max: 3.5
            }
        );
        q.activation = Activation::Relu;
        let range = g.forward_q(&[10, -5], WeightParts::whole(&[3]), &[4], &q, &mut y);
        assert_eq!(y, [4, -10]);
        assert_eq!(range, RealRange { min: 0.0, max: 3.5 });
    }

    // -- Property tests. -------------------------------------------------------------------

    proptest! {
        #[test]
        fn weight_parts_give_the_whole_tensor_result(
            g in geometry(), seed in any::<u64>(), split in any::<prop::sample::Index>(),
        ) {
            let layer = layer(g, Activation::Relu);
            check_weight_parts_give_the_whole_tensor_result(
                &layer,
                Conv2dLayer::channel_prefix,
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
            let terms = g.out_per_group() * g.kernel_h * g.kernel_w;
            check_input_backward_q_matches_float(&layer(g, Activation::None), seed, per_channel, terms);
        }

        #[test]
        fn gradient_q_matches_float(g in geometry(), seed in any::<u64>()) {
            check_gradient_q_matches_float(&layer(g, Activation::None), seed);
        }
    }

    /// Fast paths and the general path against the plain loops: float within 1e-5 of the
    /// sum of absolute terms, integers exactly.
    fn check_kernels_match_the_reference(g: Conv2dGeom, seed: u64) {
        let mut rng = Rng::new(seed);
        let (x, w, b) = (
            floats(&mut rng, g.input_len()),
            floats(&mut rng, g.weight_len()),
            floats(&mut rng, g.out_channels),
        );
        let e = floats(&mut rng, g.output_len());
        let (ax, aw, ab, ae) = (abs(&x), abs(&w), abs(&b), abs(&e));
        let no_zero = |_: usize| 0.0f32;
        let want = ref_forward(&g, &x, 0.0, &w, &no_zero, &|o| b[o]);
        let mag = ref_forward(&g, &ax, 0.0, &aw, &no_zero, &|o| ab[o]);
        for general in [false, true] {
            let got = forward_accs(&g, &x, 0.0, &w, &no_zero, &|o| b[o], general);
            assert_close(&got, &want, &mag, 1e-5);
        }
        let mut y = vec![0.0; g.output_len()];
        g.forward(&x, &w, &b, &mut y);
        assert_close(&y, &want, &mag, 1e-5);

        let want = ref_input_error(&g, &w, &e, 0.0, &|_, v| v);
        let mag = ref_input_error(&g, &aw, &ae, 0.0, &|_, v| v);
        for general in [false, true] {
            let got = input_error_accs(&g, &w, &e, 0.0, &|_| (0.0, 1.0), general);
            assert_close(&got, &want, &mag, 1e-5);
        }
        let want = ref_weight_grad(&g, &x, 0.0, &e, 0.0);
        let mag = ref_weight_grad(&g, &ax, 0.0, &ae, 0.0);
        let mut dw = vec![0.0; g.weight_len()];
        g.weight_backward(&x, &e, ChannelSet::All, &mut dw);
        assert_close(&dw, &want, &mag, 1e-5);

        // 8-bit: per-channel zero points, i32 and i64 (with per-channel factors) sums.
        let (xq, wq, eq) = (
            codes(&mut rng, g.input_len()),
            codes(&mut rng, g.weight_len()),
            codes(&mut rng, g.output_len()),
        );
        let (zx, ze) = (zero_point(&mut rng), zero_point(&mut rng));
        let zw: Vec<i32> = (0..g.out_channels).map(|_| zero_point(&mut rng)).collect();
        let init: Vec<i32> = (0..g.out_channels)
            .map(|_| rng.below(2001) as i32 - 1000)
            .collect();
        let factor: Vec<i64> = (0..g.out_channels)
            .map(|_| rng.below(1 << 24) as i64)
            .collect();
        let want = ref_forward(&g, &xq, zx, &wq, &|o| zw[o], &|o| init[o]);
        for general in [false, true] {
            let got = forward_accs(&g, &xq, zx, &wq, &|o| zw[o], &|o| init[o], general);
            assert_eq!(&got, &want);
        }
        let want = ref_input_error(&g, &wq, &eq, ze, &|o, v| v.term(zw[o]));
        let want64 = ref_input_error(&g, &wq, &eq, ze as i64, &|o, v| {
            v.term(zw[o] as i64) * factor[o]
        });
        for general in [false, true] {
            let got = input_error_accs(&g, &wq, &eq, ze, &|o| (zw[o], 1), general);
            assert_eq!(&got, &want);
            let channel = |o: usize| (zw[o] as i64, factor[o]);
            let got = input_error_accs(&g, &wq, &eq, ze as i64, &channel, general);
            assert_eq!(&got, &want64);
        }
        let want: Vec<i64> = ref_weight_grad(&g, &xq, zx as i64, &eq, ze as i64);
        let mut got = vec![0i64; g.weight_len()];
        weight_sums(&g, &xq, zx, &eq, ze, ChannelSet::All, &mut |k, s: i64| {
            got[k] += s
        });
        assert_eq!(got, want);
    }
}
