//! Transposed 2-D convolution (PyTorch's `ConvTranspose2d` with dilation 1), float and 8-bit:
//! forward, input error and weight gradient, the [`WeightedKernels`] of
//! [`ConvTranspose2dGeom`] (the bias gradient is the layer contract's,
//! [`Parametric::bias_backward`](crate::ops::operator::Parametric::bias_backward)).
//!
//! Shapes: input `[batch][C_in][H][W]`, weights `[C_out][C_in / G][kernel_h][kernel_w]`, bias
//! `[C_out]`, output `[batch][C_out][H_out][W_out]` with `H_out = (H - 1)*stride_h - 2*pad_h +
//! kernel_h + output_pad_h` (likewise `W_out`). The weights are output-channel major like those of
//! every layer with parameters, so that a channel's weights, bias and per-channel quantization
//! belong together; PyTorch and ONNX store them `[C_in][C_out / G][kernel_h][kernel_w]`, and an
//! importer permutes `w_onnx[g*C_i + i][o][kh][kw]` into `w[g*C_o + o][i][kh][kw]`.
//!
//! Notation: `G = groups`, `C_i = C_in / G` and `C_o = C_out / G` channels per group; output
//! channel `o` belongs to group `g = o / C_o` and reads input channels `g*C_i + i` for `i < C_i`.
//! Input `(ih, iw)` reaches through tap `(kh, kw)` the output `(oh, ow) = (ih*stride_h + kh -
//! pad_h, iw*stride_w + kw - pad_w)`; taps that land outside the output (cropped by the padding)
//! drop out. The layer is the adjoint of a convolution: its forward is the input error of the
//! [`Conv2dGeom`](super::conv2d::Conv2dGeom) with `C_out` input and `C_in` output channels of size
//! `H_out x W_out` (same kernel, stride, padding and groups) and the permuted weights, and its
//! input error is that convolution's forward.
//!
//! Kernels. Written once over the `Term`/`Acc` traits of [`crate::ops::arith`] for the float and
//! the 8-bit forms; every result is accumulated in a block of at most `BLOCK` values on the stack
//! and handed to a store step, so no kernel needs scratch memory. The forward runs per output row
//! block: through a tap `(kh, kw)`, consecutive input columns reach every `stride_w`-th output
//! column of the block. The input error runs per input row block: a tap reads every `stride_w`-th
//! column of an error row (a strided convolution). Float sums run in a fixed order (`kh, kw`, then
//! the channel), so the host and the MCU get the same bits.
//!
//! 8-bit accumulators are `i32`: one sum holds at most `C_i * kernel_h * kernel_w` products
//! (forward) and `C_o * kernel_h * kernel_w` (input error), each up to
//! [`MAX_ACCUMULATED_TERMS`](crate::ops::arith::MAX_ACCUMULATED_TERMS); weight and bias gradients
//! sum rows into `i64`.

use core::ops::Range;

use crate::ops::arith::{
    axpy, blocks, convolution_fits_int8_limits, dot_wide, intersect, requantize_input_error,
    tap_input, tap_output, valid_outputs, Acc, AccRange, InputErrorKernel, OutputChannel,
    QLayerParams, Term, BLOCK,
};
use crate::ops::operator::{ParamShape, Shape};
use crate::ops::weighted::{Weighted, WeightedKernels};
use crate::ops::{ChannelSet, OpError, WeightParts};
use crate::quant::{QParams, RealRange};

/// Shape of a transposed convolution over a batch-major NCHW input
/// `[batch][in_channels][in_h][in_w]`, with weights
/// `[out_channels][in_channels / groups][kernel_h][kernel_w]` and bias `[out_channels]`,
/// producing `[batch][out_channels][out_h][out_w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dGeom {
    /// Samples in the batch.
    pub batch: usize,
    /// Input channels, all groups together.
    pub in_channels: usize,
    /// Input height (1 for a 1-D layer).
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output channels, all groups together.
    pub out_channels: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Vertical step between the output rows of consecutive input rows.
    pub stride_h: usize,
    /// Horizontal step between the output columns of consecutive input columns.
    pub stride_w: usize,
    /// Rows cropped from the top and the bottom of the full output.
    pub pad_h: usize,
    /// Columns cropped from the left and the right of the full output.
    pub pad_w: usize,
    /// Rows added at the bottom of the output (below `stride_h`).
    pub output_pad_h: usize,
    /// Columns added at the right of the output (below `stride_w`).
    pub output_pad_w: usize,
    /// Channel groups (1: standard, `in_channels == out_channels`: depthwise).
    pub groups: usize,
}

impl ConvTranspose2dGeom {
    /// Output height: `(in_h - 1)*stride_h - 2*pad_h + kernel_h + output_pad_h` (of a valid
    /// geometry).
    pub fn out_h(&self) -> usize {
        (self.in_h - 1) * self.stride_h + self.kernel_h + self.output_pad_h - 2 * self.pad_h
    }

    /// Output width: `(in_w - 1)*stride_w - 2*pad_w + kernel_w + output_pad_w` (of a valid
    /// geometry).
    pub fn out_w(&self) -> usize {
        (self.in_w - 1) * self.stride_w + self.kernel_w + self.output_pad_w - 2 * self.pad_w
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

    /// The `C_i` input planes that output channel `o` of sample `n` reads.
    fn group_input<'a, X>(&self, input: &'a [X], n: usize, o: usize) -> &'a [X] {
        let first = n * self.in_channels + o / self.out_per_group() * self.in_per_group();
        &input[first * self.in_plane()..][..self.in_per_group() * self.in_plane()]
    }

    /// Index range of the output plane `(n, o)`.
    fn out_plane_at(&self, n: usize, o: usize) -> Range<usize> {
        let start = (n * self.out_channels + o) * self.out_plane();
        start..start + self.out_plane()
    }

    /// The input columns whose tap `kw` reaches an output column of `block`
    /// (`ow = iw*stride_w + kw - pad_w`), and the offset in the block of the first one's
    /// output; consecutive inputs reach every `stride_w`-th column. `None` when none does.
    fn reaching_columns(&self, kw: usize, block: &Range<usize>) -> Option<(Range<usize>, usize)> {
        let (stride, pad) = (self.stride_w, self.pad_w);
        // ow >= block.start and ow < block.end, with ow = iw*stride + kw - pad.
        let first = (block.start + pad).saturating_sub(kw).div_ceil(stride);
        let end = ((block.end + pad).checked_sub(kw + 1)? / stride + 1).min(self.in_w);
        (first < end).then(|| (first..end, first * stride + kw - pad - block.start))
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes and kernels: what the layer contract needs ([`Weighted`]).

impl WeightedKernels for ConvTranspose2dGeom {
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
    /// channels): every input element times every weight of its group's output channels,
    /// `input_len * (out_channels / groups) * kernel_h * kernel_w`, cropped taps included.
    fn macs(&self) -> usize {
        self.input_len() * self.out_per_group() * self.kernel_h * self.kernel_w
    }

    /// Checks that every size is positive and both channel counts divide into `groups`
    /// ([`OpError::ZeroSize`], [`OpError::BadGroups`]), and that the padding leaves an output
    /// and each output padding is below its stride ([`OpError::KernelTooLarge`], the error of
    /// a window and padding that do not fit the sizes).
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
        let full_h = (self.in_h - 1) * self.stride_h + self.kernel_h + self.output_pad_h;
        let full_w = (self.in_w - 1) * self.stride_w + self.kernel_w + self.output_pad_w;
        if self.output_pad_h >= self.stride_h
            || self.output_pad_w >= self.stride_w
            || full_h <= 2 * self.pad_h
            || full_w <= 2 * self.pad_w
        {
            return Err(OpError::KernelTooLarge);
        }
        Ok(())
    }

    /// The geometry of output channels `0..channels` alone, when they are whole groups (or
    /// `groups == 1`): it reads the first `in_channels * groups' / groups` input channels, and
    /// at batch 1 its input, output and weights are prefixes of this geometry's. `None` when
    /// `channels` is 0, above `out_channels`, or splits a group of several channels.
    fn output_prefix(&self, channels: usize) -> Option<ConvTranspose2dGeom> {
        if channels == 0 || channels > self.out_channels {
            return None;
        }
        if self.groups == 1 {
            return Some(ConvTranspose2dGeom {
                out_channels: channels,
                ..*self
            });
        }
        channels.is_multiple_of(self.out_per_group()).then(|| {
            let groups = channels / self.out_per_group();
            ConvTranspose2dGeom {
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

    /// `y[n][o][oh][ow] = b[o] + sum_{i<C_i, kh, kw} x[n][g*C_i + i][ih][iw] * w[o][i][kh][kw]`
    /// over the inputs with `oh = ih*stride_h + kh - pad_h`, `ow = iw*stride_w + kw - pad_w`;
    /// overwrites `output`. Scratch: none.
    fn forward(&self, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
        let g = self;
        g.check_lengths(input.len(), weight.len(), output.len());
        debug_assert_eq!(bias.len(), g.out_channels);
        for n in 0..g.batch {
            for (o, &b) in bias.iter().enumerate() {
                let out = &mut output[g.out_plane_at(n, o)];
                let taps = &weight[o * g.taps()..][..g.taps()];
                let input = g.group_input(input, n, o);
                forward_plane(g, input, 0.0, taps, 0.0, b, &mut |at, block: &[f32]| {
                    out[at..at + block.len()].copy_from_slice(block);
                });
            }
        }
    }

    /// Input error over the selected output channels `S`, a strided convolution of the error:
    /// `e_x[n][c][ih][iw] = sum_{o in S, kh, kw} w[o][c - g*C_i][kh][kw] * e[n][o][oh][ow]`
    /// (`o` in `c`'s group `g`, `oh = ih*stride_h + kh - pad_h`, `ow = iw*stride_w + kw - pad_w`
    /// inside the output); overwrites `in_err` (channels of a group without selected outputs get
    /// 0). Scratch: none.
    fn input_backward(
        &self,
        weight: &[f32],
        out_err: &[f32],
        channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        let g = self;
        g.check_lengths(in_err.len(), weight.len(), out_err.len());
        let kernel = ErrorKernel {
            geom: g,
            weight: WeightParts::whole(weight),
            out_err,
            channels,
        };
        kernel.accumulate(0.0, |_| (0.0, 1.0), &mut |at, block: &[f32]| {
            in_err[at..at + block.len()].copy_from_slice(block);
        });
    }

    /// `dw[o][i][kh][kw] += sum_{n, ih, iw} x[n][g*C_i + i][ih][iw] * e[n][o][oh][ow]` for the
    /// selected output channels `o`, over the inputs whose tap lands inside the output.
    /// Scratch: none.
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
    /// `acc = sum_{i, kh, kw} (x - z_x)(w - z_w[o]) + requant(b[o], bias_scale / s_a)` over the
    /// inputs that reach the output, `y = clamp(z_y + round(acc * s_a / s_y), act_lo, act_hi)`
    /// with the activation's bounds as codes, within `[-128, 127]`.
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
        let mut range = RealRange::EMPTY;
        for (o, &b) in bias.iter().enumerate() {
            let channel = OutputChannel::new(q, o, b);
            let mut accs = AccRange::EMPTY;
            let taps = weight.structure(o, g.taps());
            let (zx, zw) = (q.input.zero_point, channel.weight_zero);
            for n in 0..g.batch {
                let out = &mut output[g.out_plane_at(n, o)];
                let input = g.group_input(input, n, o);
                forward_plane(g, input, zx, taps, zw, 0, &mut |at, block| {
                    channel.store(&mut out[at..], block, &mut accs);
                });
            }
            range = range.merge(channel.real_range(accs));
        }
        range
    }

    /// Quantized input error over the selected output channels `S`: `e_x = z_ex + round((s_w * s_e
    /// / s_ex) * sum_{o in S, kh, kw} (w - z_w[o])(e - z_e))`, saturated to `[-128, 127]`;
    /// overwrites `in_err`. One weight scale gives the exact `i32` form; distinct per-channel
    /// scales use the integer ratio scheme described at
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
        debug_assert!(weight_q.len() == 1 || weight_q.len() == g.out_channels);
        let kernel = ErrorKernel {
            geom: g,
            weight,
            out_err,
            channels,
        };
        let max_terms = g.out_per_group() * g.kernel_h * g.kernel_w;
        requantize_input_error(&kernel, weight_q, out_err_q, in_err_q, max_terms, in_err)
    }

    /// `dw[o][i][kh][kw] += s_x * s_e * sum_{n, ih, iw} (x - z_x)(e - z_e)` for the selected output
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
// Loops shared by the float and the 8-bit kernels.

/// `acc[j * stride] += term(x[j]) * w` for every `j < x.len()`: a row update whose results are
/// every `stride`-th accumulator.
#[inline(always)]
fn axpy_spread<X: Term<A>, A: Acc>(acc: &mut [A], stride: usize, x: &[X], zx: A, w: A) {
    if stride == 1 {
        axpy(&mut acc[..x.len()], x, 1, zx, w);
    } else {
        for (a, &v) in acc.iter_mut().step_by(stride).zip(x) {
            *a += v.term(zx) * w;
        }
    }
}

/// Accumulators of one output plane: `init + sum_{i, kh, kw} term(x[i][ih][iw]) * term(w)`
/// over the inputs that reach each output, handed to `emit(offset in the plane, block)` in row
/// blocks. `input` holds the `C_i` planes of the group, `weight` the channel's
/// `C_i * kernel_h * kernel_w` taps. Per block, the order is `kh, kw, i`.
fn forward_plane<X: Term<A>, A: Acc>(
    g: &ConvTranspose2dGeom,
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
                // The input row whose tap kh reaches output row oh, if any.
                let Some(ih) = tap_output(oh, kh, g.stride_h, g.pad_h, g.in_h) else {
                    continue;
                };
                for kw in 0..g.kernel_w {
                    let Some((columns, offset)) = g.reaching_columns(kw, &block) else {
                        continue;
                    };
                    let taps = weight[kh * g.kernel_w + kw..].iter().step_by(kernel);
                    for (i, &w) in taps.enumerate() {
                        let x = &input[i * in_plane + ih * g.in_w..][columns.clone()];
                        axpy_spread(&mut acc[offset..], g.stride_w, x, zx, w.term(zw));
                    }
                }
            }
            emit(oh * out_w + block.start, acc);
        }
    }
}

/// The input error of the selected output channels, for the float form and (as an
/// [`InputErrorKernel`]) the 8-bit one.
struct ErrorKernel<'a, X> {
    geom: &'a ConvTranspose2dGeom,
    weight: WeightParts<'a, X>,
    out_err: &'a [X],
    channels: ChannelSet<'a>,
}

impl<X> ErrorKernel<'_, X> {
    /// Every input element's `sum_{o in S, kh, kw} (term(w[o][i][kh][kw]) * factor_o) *
    /// term(e[n][o][oh][ow])` (`i` the input channel's index in its group, `o` in its group)
    /// with `(z_w[o], factor_o) = channel(o)`, handed to `emit(index in in_err, block)`.
    fn accumulate<A: Acc>(
        &self,
        ze: A,
        channel: impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) where
        X: Term<A>,
    {
        let g = self.geom;
        let (c_in, c_out) = (g.in_per_group(), g.out_per_group());
        let sample_len = g.out_channels * g.out_plane();
        for n in 0..g.batch {
            let err = &self.out_err[n * sample_len..][..sample_len];
            for c in 0..g.in_channels {
                let group = c / c_in;
                let outputs = self.channels.within(group * c_out..(group + 1) * c_out);
                let base = (n * g.in_channels + c) * g.in_plane();
                let plane = ErrorPlane {
                    kernel: self,
                    err,
                    ze,
                    local: c % c_in,
                };
                plane.accumulate(outputs, &channel, &mut |at, block| emit(base + at, block));
            }
        }
    }
}

impl InputErrorKernel for ErrorKernel<'_, i8> {
    fn run<A: Acc>(
        &self,
        ze: A,
        channel: impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) where
        i8: Term<A>,
    {
        self.accumulate(ze, channel, emit);
    }
}

/// One input-error plane: input channel `local` of its group, one sample's error `err`.
struct ErrorPlane<'a, X, A> {
    kernel: &'a ErrorKernel<'a, X>,
    err: &'a [X],
    ze: A,
    local: usize,
}

impl<X: Term<A>, A: Acc> ErrorPlane<'_, X, A> {
    /// Per input row block and tap `(kh, kw)`: the block's columns whose tap lands inside the
    /// output read every `stride_w`-th column of error row `oh = ih*stride_h + kh - pad_h`,
    /// one strided row update per selected output channel (order `kh, kw, o`).
    fn accumulate(
        &self,
        outputs: impl Iterator<Item = usize> + Clone,
        channel: &impl Fn(usize) -> (A, A),
        emit: &mut impl FnMut(usize, &[A]),
    ) {
        let g = self.kernel.geom;
        let (out_h, out_w, out_plane) = (g.out_h(), g.out_w(), g.out_plane());
        let first_tap = self.local * g.kernel_h * g.kernel_w;
        for ih in 0..g.in_h {
            for block in blocks(g.in_w) {
                let mut acc = [A::default(); BLOCK];
                let acc = &mut acc[..block.len()];
                for kh in 0..g.kernel_h {
                    let Some(oh) = tap_input(ih, kh, g.stride_h, g.pad_h, out_h) else {
                        continue;
                    };
                    for kw in 0..g.kernel_w {
                        let inside = valid_outputs(g.in_w, out_w, kw, g.stride_w, g.pad_w);
                        let part = intersect(&inside, &block);
                        if part.is_empty() {
                            continue;
                        }
                        let ow = part.start * g.stride_w + kw - g.pad_w;
                        let acc = &mut acc[part.start - block.start..part.end - block.start];
                        let tap = first_tap + kh * g.kernel_w + kw;
                        for o in outputs.clone() {
                            let (zw, factor) = channel(o);
                            let w = self.kernel.weight.structure(o, g.taps())[tap];
                            let e = &self.err[o * out_plane + oh * out_w + ow..];
                            axpy(acc, e, g.stride_w, self.ze, w.term(zw) * factor);
                        }
                    }
                }
                emit(ih * g.in_w + block.start, acc);
            }
        }
    }
}

/// Weight-gradient sums `sum_{n, ih, iw} term(x[n][g*C_i + i][ih][iw]) * term(e[n][o][oh][ow])`
/// of every selected channel's weights, totalled in `W` and handed to `emit(weight index, sum)`.
fn weight_sums<X: Term<A>, A: Acc, W: Acc + From<A>>(
    g: &ConvTranspose2dGeom,
    input: &[X],
    zx: A,
    err: &[X],
    ze: A,
    channels: ChannelSet,
    emit: &mut impl FnMut(usize, W),
) {
    let (in_plane, out_h, out_w) = (g.in_plane(), g.out_h(), g.out_w());
    let kernel = g.kernel_h * g.kernel_w;
    for o in channels.iter(g.out_channels) {
        for i in 0..g.in_per_group() {
            for kh in 0..g.kernel_h {
                for kw in 0..g.kernel_w {
                    // The input columns whose tap kw lands inside the output.
                    let inside = valid_outputs(g.in_w, out_w, kw, g.stride_w, g.pad_w);
                    let mut sum = W::default();
                    let samples = if inside.is_empty() { 0 } else { g.batch };
                    for n in 0..samples {
                        let x = &g.group_input(input, n, o)[i * in_plane..][..in_plane];
                        let e = &err[g.out_plane_at(n, o)];
                        for ih in 0..g.in_h {
                            let Some(oh) = tap_input(ih, kh, g.stride_h, g.pad_h, out_h) else {
                                continue;
                            };
                            let x = &x[ih * g.in_w..][inside.clone()];
                            let ow = inside.start * g.stride_w + kw - g.pad_w;
                            sum += dot_wide(&e[oh * out_w + ow..], g.stride_w, ze, x, zx);
                        }
                    }
                    emit(o * g.taps() + i * kernel + kh * g.kernel_w + kw, sum);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The layer contract.

/// A transposed convolution layer: its geometry and the activation fused into its output.
pub type ConvTranspose2dLayer = Weighted<ConvTranspose2dGeom>;

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
    use crate::ops::conv2d::Conv2dGeom;
    use crate::ops::operator::{Operator, Parametric};
    use crate::rng::Rng;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::vec;
    use std::vec::Vec;

    /// Standard, depthwise-like (`groups = C_in = C_out`) and grouped shapes, strides 1 to 3
    /// with padding and any output padding below the stride; each may be 1-D
    /// (`in_h = kernel_h = 1`).
    fn geometry() -> impl Strategy<Value = ConvTranspose2dGeom> {
        let sizes = (1usize..=2, 1usize..=3, 1usize..=3, 1usize..=4, 1usize..=12);
        let window = (
            1usize..=3,
            1usize..=4,
            1usize..=3,
            1usize..=3,
            0usize..=2,
            0usize..=2,
        );
        let output_padding = (any::<Index>(), any::<Index>());
        (0usize..3, any::<bool>(), sizes, window, output_padding).prop_filter_map(
            "padding leaves no output",
            |(shape, one_d, (batch, c_in, c_out, in_h, in_w), (kh, kw, sh, sw, ph, pw), op)| {
                let (groups, c_in, c_out) = match shape {
                    0 => (1, c_in, c_out),
                    1 => (c_in + 1, 1, 1),
                    _ => (2, c_in, c_out),
                };
                let (in_h, kh, sh, ph) = if one_d {
                    (1, 1, 1, 0)
                } else {
                    (in_h, kh, sh, ph)
                };
                let g = ConvTranspose2dGeom {
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
                    output_pad_h: op.0.index(sh),
                    output_pad_w: op.1.index(sw),
                    groups,
                };
                g.validate().ok().map(|_| g)
            },
        )
    }

    fn layer(geom: ConvTranspose2dGeom, activation: Activation) -> ConvTranspose2dLayer {
        ConvTranspose2dLayer { geom, activation }
    }

    // -- Reference kernels: the plain loops over every (input, tap) pair. -------------------

    /// Every product of the layer as `[input index, weight index, output index]`, in the order
    /// `n, o, i, ih, iw, kh, kw`; taps outside the output are skipped.
    fn products(g: &ConvTranspose2dGeom) -> Vec<[usize; 3]> {
        let (out_h, out_w) = (g.out_h() as isize, g.out_w() as isize);
        let (c_in, c_out) = (g.in_per_group(), g.out_per_group());
        let mut all = Vec::new();
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for i in 0..c_in {
                    let c = o / c_out * c_in + i;
                    for ih in 0..g.in_h {
                        for iw in 0..g.in_w {
                            for kh in 0..g.kernel_h {
                                for kw in 0..g.kernel_w {
                                    let oh = (ih * g.stride_h + kh) as isize - g.pad_h as isize;
                                    let ow = (iw * g.stride_w + kw) as isize - g.pad_w as isize;
                                    if oh < 0 || ow < 0 || oh >= out_h || ow >= out_w {
                                        continue;
                                    }
                                    let x = ((n * g.in_channels + c) * g.in_h + ih) * g.in_w + iw;
                                    let w = ((o * c_in + i) * g.kernel_h + kh) * g.kernel_w + kw;
                                    let y = ((n * g.out_channels + o) as isize * out_h + oh)
                                        * out_w
                                        + ow;
                                    all.push([x, w, y as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
        all
    }

    fn ref_forward<X: Term<A>, A: Acc>(
        g: &ConvTranspose2dGeom,
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
        for [xi, wi, yi] in products(g) {
            y[yi] += x[xi].term(zx) * w[wi].term(zw(wi / g.taps()));
        }
        y
    }

    fn ref_input_error<X: Term<A>, A: Acc>(
        g: &ConvTranspose2dGeom,
        w: &[X],
        e: &[X],
        ze: A,
        wterm: &dyn Fn(usize, X) -> A,
    ) -> Vec<A> {
        let mut ex = vec![A::default(); g.input_len()];
        for [xi, wi, yi] in products(g) {
            ex[xi] += wterm(wi / g.taps(), w[wi]) * e[yi].term(ze);
        }
        ex
    }

    fn ref_weight_grad<X: Term<A>, A: Acc>(
        g: &ConvTranspose2dGeom,
        x: &[X],
        zx: A,
        e: &[X],
        ze: A,
    ) -> Vec<A> {
        let mut dw = vec![A::default(); g.weight_len()];
        for [xi, wi, yi] in products(g) {
            dw[wi] += x[xi].term(zx) * e[yi].term(ze);
        }
        dw
    }

    /// The plain-loop forward in `f64`, as the contract checks take it.
    fn reference(g: ConvTranspose2dGeom) -> impl Fn(&[f64], &[f64], &[f64], &[f64]) -> Vec<f64> {
        move |x, _skip, w, b| ref_forward(&g, x, 0.0, w, &|_| 0.0, &|o| b[o])
    }

    /// Accumulators of every output plane from the forward kernel.
    fn forward_accs<X: Term<A>, A: Acc>(
        g: &ConvTranspose2dGeom,
        x: &[X],
        zx: A,
        w: &[X],
        zw: &dyn Fn(usize) -> A,
        init: &dyn Fn(usize) -> A,
    ) -> Vec<A> {
        let mut y = vec![A::default(); g.output_len()];
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                let out = &mut y[g.out_plane_at(n, o)];
                let (input, taps) = (g.group_input(x, n, o), &w[o * g.taps()..][..g.taps()]);
                forward_plane(g, input, zx, taps, zw(o), init(o), &mut |at, block| {
                    out[at..at + block.len()].copy_from_slice(block);
                });
            }
        }
        y
    }

    /// Input-error accumulators from the kernel, over every output channel.
    fn input_error_accs<X: Term<A>, A: Acc>(
        g: &ConvTranspose2dGeom,
        w: &[X],
        e: &[X],
        ze: A,
        channel: &dyn Fn(usize) -> (A, A),
    ) -> Vec<A> {
        let mut ex = vec![A::default(); g.input_len()];
        let kernel = ErrorKernel {
            geom: g,
            weight: WeightParts::whole(w),
            out_err: e,
            channels: ChannelSet::All,
        };
        kernel.accumulate(ze, channel, &mut |at, block| {
            ex[at..at + block.len()].copy_from_slice(block);
        });
        ex
    }

    // -- Unit tests. -----------------------------------------------------------------------

    #[test]
    fn geometry_sizes_and_validation() {
        let g = ConvTranspose2dGeom {
            batch: 2,
            in_channels: 4,
            in_h: 3,
            in_w: 5,
            out_channels: 6,
            kernel_h: 3,
            kernel_w: 2,
            stride_h: 2,
            stride_w: 1,
            pad_h: 1,
            pad_w: 0,
            output_pad_h: 1,
            output_pad_w: 0,
            groups: 2,
        };
        assert_eq!(g.validate(), Ok(()));
        // (3 - 1) * 2 - 2 + 3 + 1 rows, (5 - 1) + 2 columns.
        assert_eq!((g.out_h(), g.out_w()), (6, 6));
        assert_eq!(g.input_len(), 2 * 4 * 3 * 5);
        assert_eq!(g.output_len(), 2 * 6 * 6 * 6);
        assert_eq!(g.weight_len(), 6 * 2 * 3 * 2);
        assert_eq!(g.macs(), 2 * 4 * 3 * 5 * 3 * 3 * 2);
        let invalid = [
            (ConvTranspose2dGeom { stride_w: 0, ..g }, OpError::ZeroSize),
            (ConvTranspose2dGeom { in_w: 0, ..g }, OpError::ZeroSize),
            (ConvTranspose2dGeom { groups: 3, ..g }, OpError::BadGroups),
            (
                ConvTranspose2dGeom {
                    out_channels: 5,
                    ..g
                },
                OpError::BadGroups,
            ),
            (
                ConvTranspose2dGeom {
                    output_pad_h: 2,
                    ..g
                },
                OpError::KernelTooLarge,
            ),
            (
                ConvTranspose2dGeom {
                    output_pad_w: 1,
                    ..g
                },
                OpError::KernelTooLarge,
            ),
            // The full output is (5 - 1) + 2 = 6 columns: cropping 3 on each side leaves none.
            (
                ConvTranspose2dGeom { pad_w: 3, ..g },
                OpError::KernelTooLarge,
            ),
        ];
        for (geom, error) in invalid {
            assert_eq!(geom.validate(), Err(error), "{geom:?}");
        }
        let cropped = ConvTranspose2dGeom { pad_w: 2, ..g };
        assert_eq!((cropped.validate(), cropped.out_w()), (Ok(()), 2));

        // Prefixes are whole groups of three output channels.
        let prefix = g.output_prefix(3).expect("one group");
        assert_eq!((prefix.in_channels, prefix.groups), (2, 1));
        assert_eq!([2, 0, 7].map(|c| g.output_prefix(c)), [None; 3]);
        let standard = ConvTranspose2dGeom { groups: 1, ..g };
        assert_eq!(standard.output_prefix(2).map(|p| p.in_channels), Some(4));

        assert!(layer(g, Activation::None).fits_int8_limits());
        let long_kernel = ConvTranspose2dGeom {
            kernel_w: 33_026,
            ..standard
        };
        assert!(!layer(long_kernel, Activation::None).fits_int8_limits());
    }

    #[test]
    fn one_d_passes_by_hand() {
        // x = [1, 2], kernel [1, 10, 100], stride 2: the full output [1, 10, 102, 20, 200, 0]
        // (output padding 1) cropped by 1 on each side, plus the bias 0.5.
        let g = ConvTranspose2dGeom {
            batch: 1,
            in_channels: 1,
            in_h: 1,
            in_w: 2,
            out_channels: 1,
            kernel_h: 1,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 2,
            pad_h: 0,
            pad_w: 1,
            output_pad_h: 0,
            output_pad_w: 1,
            groups: 1,
        };
        let (x, w) = ([1.0f32, 2.0], [1.0f32, 10.0, 100.0]);
        let mut y = [0.0f32; 4];
        g.forward(&x, &w, &[0.5], &mut y);
        assert_eq!(y, [10.5, 102.5, 20.5, 200.5]);
        // e_x[i] = sum_k w[k] * e[2i + k - 1].
        let e = [1.0f32, 2.0, 3.0, 4.0];
        let mut ex = [0.0f32; 2];
        g.input_backward(&w, &e, ChannelSet::All, &mut ex);
        assert_eq!(ex, [210.0, 432.0]);
        // dw[k] = sum_i x[i] * e[2i + k - 1].
        let mut dw = [0.0f32; 3];
        g.weight_backward(&x, &e, ChannelSet::All, &mut dw);
        assert_eq!(dw, [4.0, 7.0, 10.0]);
        let mut db = [0.0f32; 1];
        let layer = ConvTranspose2dLayer {
            geom: g,
            activation: Activation::None,
        };
        layer.bias_backward(&e, ChannelSet::All, &mut db);
        assert_eq!(db, [10.0]);
    }

    // -- Property tests. -------------------------------------------------------------------

    proptest! {
        #[test]
        fn kernels_match_the_reference(g in geometry(), seed in any::<u64>()) {
            check_kernels_match_the_reference(g, seed);
        }

        #[test]
        fn forward_is_the_input_error_of_the_matching_convolution(
            g in geometry(), seed in any::<u64>(),
        ) {
            check_forward_is_the_input_error_of_the_matching_convolution(g, seed);
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
        fn weight_parts_give_the_whole_tensor_result(
            g in geometry(), seed in any::<u64>(), split in any::<Index>(),
        ) {
            let layer = layer(g, Activation::Relu);
            check_weight_parts_give_the_whole_tensor_result(
                &layer,
                ConvTranspose2dLayer::channel_prefix,
                seed,
                split,
            );
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

    /// The kernels against the plain loops: float within 1e-5 of the sum of absolute terms,
    /// integers exactly (per-channel zero points; `i32`, and `i64` with per-channel factors).
    fn check_kernels_match_the_reference(g: ConvTranspose2dGeom, seed: u64) {
        let mut rng = Rng::new(seed);
        let (x, w, b) = (
            floats(&mut rng, g.input_len()),
            floats(&mut rng, g.weight_len()),
            floats(&mut rng, g.out_channels),
        );
        let e = floats(&mut rng, g.output_len());
        let (ax, aw, ab, ae) = (abs(&x), abs(&w), abs(&b), abs(&e));
        let no_zero = |_: usize| 0.0f32;
        let mut y = vec![0.0; g.output_len()];
        g.forward(&x, &w, &b, &mut y);
        let want = ref_forward(&g, &x, 0.0, &w, &no_zero, &|o| b[o]);
        let mag = ref_forward(&g, &ax, 0.0, &aw, &no_zero, &|o| ab[o]);
        assert_close(&y, &want, &mag, 1e-5);
        let mut ex = vec![0.0; g.input_len()];
        g.input_backward(&w, &e, ChannelSet::All, &mut ex);
        let want = ref_input_error(&g, &w, &e, 0.0, &|_, v| v);
        let mag = ref_input_error(&g, &aw, &ae, 0.0, &|_, v| v);
        assert_close(&ex, &want, &mag, 1e-5);
        let mut dw = vec![0.0; g.weight_len()];
        g.weight_backward(&x, &e, ChannelSet::All, &mut dw);
        let want = ref_weight_grad(&g, &x, 0.0, &e, 0.0);
        let mag = ref_weight_grad(&g, &ax, 0.0, &ae, 0.0);
        assert_close(&dw, &want, &mag, 1e-5);

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
        assert_eq!(
            forward_accs(&g, &xq, zx, &wq, &|o| zw[o], &|o| init[o]),
            ref_forward(&g, &xq, zx, &wq, &|o| zw[o], &|o| init[o])
        );
        assert_eq!(
            input_error_accs(&g, &wq, &eq, ze, &|o| (zw[o], 1)),
            ref_input_error(&g, &wq, &eq, ze, &|o, v| v.term(zw[o]))
        );
        let channel = |o: usize| (zw[o] as i64, factor[o]);
        let weighted = |o: usize, v: i8| v.term(zw[o] as i64) * factor[o];
        assert_eq!(
            input_error_accs(&g, &wq, &eq, ze as i64, &channel),
            ref_input_error(&g, &wq, &eq, ze as i64, &weighted)
        );
        let mut got = vec![0i64; g.weight_len()];
        weight_sums(&g, &xq, zx, &eq, ze, ChannelSet::All, &mut |k, s: i64| {
            got[k] += s
        });
        assert_eq!(got, ref_weight_grad(&g, &xq, zx as i64, &eq, ze as i64));
    }

    /// The forward equals the float input error of the convolution with `C_out` input and
    /// `C_in` output channels of size `out_h x out_w` (same kernel, stride, padding and groups;
    /// its output is `in_h x in_w` since the output padding is below the stride), with the
    /// weights permuted to the ONNX layout `[C_in][C_out / G][kh][kw]`; within 1e-5 of the
    /// sum of absolute terms.
    fn check_forward_is_the_input_error_of_the_matching_convolution(
        g: ConvTranspose2dGeom,
        seed: u64,
    ) {
        let conv = Conv2dGeom {
            batch: g.batch,
            in_channels: g.out_channels,
            in_h: g.out_h(),
            in_w: g.out_w(),
            out_channels: g.in_channels,
            kernel_h: g.kernel_h,
            kernel_w: g.kernel_w,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            pad_h: g.pad_h,
            pad_w: g.pad_w,
            groups: g.groups,
        };
        assert_eq!(conv.validate(), Ok(()));
        assert_eq!((conv.out_h(), conv.out_w()), (g.in_h, g.in_w));
        let mut rng = Rng::new(seed);
        let (x, w) = (
            floats(&mut rng, g.input_len()),
            floats(&mut rng, g.weight_len()),
        );
        let (c_in, c_out, kernel) = (g.in_per_group(), g.out_per_group(), g.kernel_h * g.kernel_w);
        let mut onnx = vec![0.0f32; w.len()];
        for o in 0..g.out_channels {
            let (group, local) = (o / c_out, o % c_out);
            for i in 0..c_in {
                let from = (o * c_in + i) * kernel;
                let to = ((group * c_in + i) * c_out + local) * kernel;
                onnx[to..to + kernel].copy_from_slice(&w[from..from + kernel]);
            }
        }
        let no_bias = vec![0.0f32; g.out_channels];
        let mut y = vec![0.0f32; g.output_len()];
        g.forward(&x, &w, &no_bias, &mut y);
        let mut via_conv = vec![0.0f32; g.output_len()];
        conv.input_backward(&onnx, &x, ChannelSet::All, &mut via_conv);
        let mut mag = vec![0.0f32; g.output_len()];
        g.forward(&abs(&x), &abs(&w), &no_bias, &mut mag);
        assert_close(&y, &via_conv, &mag, 1e-5);
    }
}
