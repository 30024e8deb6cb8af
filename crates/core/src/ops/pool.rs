//! Average, max and global average pooling over batch-major NCHW tensors, float and 8-bit.
//!
//! Every `(n, c)` plane is pooled on its own. Windows start at `o * stride - pad` and may hang
//! over the zero padding; padding must be smaller than the kernel, so every window holds at
//! least one real input.
//!
//! Choice: the average counts the padded positions (PyTorch's `count_include_pad = true`), so
//! every window divides by the same `n = kernel_h * kernel_w`. Padding is real 0 and adds nothing
//! to the sum; the constant `n` lets the quantized average use one fixed-point multiplier per
//! call. Max pooling ignores padding.
//!
//! None of these functions needs scratch memory; the input backwards overwrite the input error.

use core::ops::{AddAssign, Range};

use super::{checked_product, ChannelSet, OpError};
use crate::ops::operator::{FloatParams, InputError, Operator, QParameters, QWeights, Shape};
use crate::quant::{QParams, QTensor, RealRange, Requant, Q_MAX, Q_MIN};

/// Shape of a windowed pooling layer (average or max) over `[batch][channels][in_h][in_w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Samples in the batch.
    pub batch: usize,
    /// Channels (pooled independently).
    pub channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Window height.
    pub kernel_h: usize,
    /// Window width.
    pub kernel_w: usize,
    /// Vertical step between windows.
    pub stride_h: usize,
    /// Horizontal step between windows.
    pub stride_w: usize,
    /// Zero rows added above and below; `< kernel_h`.
    pub pad_h: usize,
    /// Zero columns added left and right; `< kernel_w`.
    pub pad_w: usize,
}

impl PoolGeom {
    /// Output height: `(in_h + 2 * pad_h - kernel_h) / stride_h + 1`.
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad_h - self.kernel_h) / self.stride_h + 1
    }

    /// Output width: `(in_w + 2 * pad_w - kernel_w) / stride_w + 1`.
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad_w - self.kernel_w) / self.stride_w + 1
    }

    /// Elements of the input (and of the input error): `batch * channels * in_h * in_w`.
    pub fn input_len(&self) -> usize {
        self.planes() * self.in_h * self.in_w
    }

    /// Elements of the output (and of the output error): `batch * channels * out_h * out_w`.
    pub fn output_len(&self) -> usize {
        self.planes() * self.out_h() * self.out_w()
    }

    /// Positions in one window, padding included: `n = kernel_h * kernel_w`, the divisor of
    /// the average.
    pub fn window_len(&self) -> usize {
        self.kernel_h * self.kernel_w
    }

    /// Check that every size is positive and that the kernel fits the padded input. Padding
    /// must be smaller than the kernel, otherwise a window could lie in the padding alone; that
    /// case is reported as [`OpError::KernelTooLarge`] too.
    pub fn validate(&self) -> Result<(), OpError> {
        let sizes = [
            self.batch,
            self.channels,
            self.in_h,
            self.in_w,
            self.kernel_h,
            self.kernel_w,
            self.stride_h,
            self.stride_w,
        ];
        if sizes.contains(&0) {
            return Err(OpError::ZeroSize);
        }
        // `pad < kernel` (below) keeps the padded sizes within twice the kernel plus the input.
        if self.pad_h >= self.kernel_h || self.pad_w >= self.kernel_w {
            return Err(OpError::KernelTooLarge);
        }
        let padded = |len: usize, pad: usize| pad.checked_mul(2).and_then(|p| p.checked_add(len));
        let (padded_h, padded_w) = (
            padded(self.in_h, self.pad_h).ok_or(OpError::Overflow)?,
            padded(self.in_w, self.pad_w).ok_or(OpError::Overflow)?,
        );
        if self.kernel_h > padded_h || self.kernel_w > padded_w {
            return Err(OpError::KernelTooLarge);
        }
        // Every size the kernels derive fits a `usize`.
        checked_product(&[self.batch, self.channels, self.in_h, self.in_w])?;
        checked_product(&[self.kernel_h, self.kernel_w])?;
        Ok(())
    }

    fn planes(&self) -> usize {
        self.batch * self.channels
    }

    /// Input rows inside window row `oh` (padding excluded).
    fn window_rows(&self, oh: usize) -> Range<usize> {
        clipped_window(oh, self.stride_h, self.kernel_h, self.pad_h, self.in_h)
    }

    /// Input columns inside window column `ow` (padding excluded).
    fn window_cols(&self, ow: usize) -> Range<usize> {
        clipped_window(ow, self.stride_w, self.kernel_w, self.pad_w, self.in_w)
    }

    /// Window rows whose window contains input row `ih`.
    fn covering_rows(&self, ih: usize) -> Range<usize> {
        covering_windows(ih, self.stride_h, self.kernel_h, self.pad_h, self.out_h())
    }

    /// Window columns whose window contains input column `iw`.
    fn covering_cols(&self, iw: usize) -> Range<usize> {
        covering_windows(iw, self.stride_w, self.kernel_w, self.pad_w, self.out_w())
    }
}

/// Shape of a global average pooling layer: `[batch][channels][spatial]` to
/// `[batch][channels]`, with `spatial = h * w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalPoolGeom {
    /// Samples in the batch.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Positions averaged per channel (`h * w`).
    pub spatial: usize,
}

impl GlobalPoolGeom {
    /// Elements of the input: `batch * channels * spatial`.
    pub fn input_len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// Elements of the output: `batch * channels`.
    pub fn output_len(&self) -> usize {
        self.batch * self.channels
    }

    /// Check that every size is positive.
    pub fn validate(&self) -> Result<(), OpError> {
        if self.batch == 0 || self.channels == 0 || self.spatial == 0 {
            return Err(OpError::ZeroSize);
        }
        checked_product(&[self.batch, self.channels, self.spatial])?;
        Ok(())
    }
}

/// Input positions `[o*stride - pad, o*stride - pad + kernel)` clipped to `[0, len)`.
fn clipped_window(o: usize, stride: usize, kernel: usize, pad: usize, len: usize) -> Range<usize> {
    let start = o * stride; // in padded coordinates
    start.max(pad) - pad..(start + kernel).min(pad + len) - pad
}

/// Outputs `o < out_len` with `o*stride <= i + pad < o*stride + kernel` (empty between windows
/// when `stride > kernel`).
fn covering_windows(
    i: usize,
    stride: usize,
    kernel: usize,
    pad: usize,
    out_len: usize,
) -> Range<usize> {
    let padded = i + pad;
    let first = (padded + 1).saturating_sub(kernel).div_ceil(stride);
    let end = (padded / stride + 1).min(out_len);
    first..end.max(first)
}

/// `sum term(x)` over the input positions of window `(oh, ow)` of one plane.
fn window_sum<T: Copy, S: Default + AddAssign>(
    g: &PoolGeom,
    plane: &[T],
    oh: usize,
    ow: usize,
    term: impl Fn(T) -> S,
) -> S {
    let mut sum = S::default();
    for ih in g.window_rows(oh) {
        for iw in g.window_cols(ow) {
            sum += term(plane[ih * g.in_w + iw]);
        }
    }
    sum
}

/// `sum term(e)` over the output errors of one plane whose window contains input `(ih, iw)`.
fn covering_sum<T: Copy, S: Default + AddAssign>(
    g: &PoolGeom,
    err_plane: &[T],
    ih: usize,
    iw: usize,
    term: impl Fn(T) -> S,
) -> S {
    let out_w = g.out_w();
    let mut sum = S::default();
    for oh in g.covering_rows(ih) {
        for ow in g.covering_cols(iw) {
            sum += term(err_plane[oh * out_w + ow]);
        }
    }
    sum
}

/// Plane index of the largest input of window `(oh, ow)`; ties go to the first in row-major
/// scan order.
fn window_argmax<T: Copy + PartialOrd>(g: &PoolGeom, plane: &[T], oh: usize, ow: usize) -> usize {
    let cols = g.window_cols(ow);
    let mut best = g.window_rows(oh).start * g.in_w + cols.start;
    for ih in g.window_rows(oh) {
        for iw in cols.clone() {
            let at = ih * g.in_w + iw;
            if plane[at] > plane[best] {
                best = at;
            }
        }
    }
    best
}

/// Sum of `term(e)` over the output errors of the windows whose argmax is the input `target`,
/// visited in scan order (window `(oh, ow)` must be one of them), or `None` when a window
/// before `(oh, ow)` already has that argmax: every input's routed sum is then formed exactly
/// once, at its first window.
fn routed_sum<T: Copy + PartialOrd, E: Copy, S: Default + AddAssign>(
    g: &PoolGeom,
    plane: &[T],
    err_plane: &[E],
    oh: usize,
    ow: usize,
    target: usize,
    term: impl Fn(E) -> S,
) -> Option<S> {
    let out_w = g.out_w();
    let mut sum = S::default();
    for wh in g.covering_rows(target / g.in_w) {
        for ww in g.covering_cols(target % g.in_w) {
            // The window `(oh, ow)` itself is known to have argmax `target`.
            if (wh, ww) != (oh, ow) && window_argmax(g, plane, wh, ww) != target {
                continue;
            }
            if (wh, ww) < (oh, ow) {
                return None;
            }
            sum += term(err_plane[wh * out_w + ww]);
        }
    }
    Some(sum)
}

/// Requantizes `i32` accumulators to codes, `q = clamp(z + round(m * acc), -128, 127)`, and
/// tracks the accumulator extremes for the real range.
struct AccToCode {
    requant: Requant,
    zero_point: i32,
    min: i32,
    max: i32,
}

impl AccToCode {
    /// `m = numerator / (denominator * count)`, evaluated once in `f64`.
    fn new(numerator: f32, denominator: f32, count: usize, out_q: QParams) -> Self {
        AccToCode {
            requant: Requant::from_real(numerator as f64 / (denominator as f64 * count as f64)),
            zero_point: out_q.zero_point,
            min: i32::MAX,
            max: i32::MIN,
        }
    }

    fn code(&mut self, acc: i32) -> i8 {
        self.min = self.min.min(acc);
        self.max = self.max.max(acc);
        self.requant
            .apply(acc)
            .saturating_add(self.zero_point)
            .clamp(Q_MIN, Q_MAX) as i8
    }

    /// Real range of the accumulators seen, `acc * acc_scale`, before saturation.
    fn real_range(&self, acc_scale: f32) -> RealRange {
        if self.min > self.max {
            return RealRange::EMPTY;
        }
        RealRange {
            min: self.min as f32 * acc_scale,
            max: self.max as f32 * acc_scale,
        }
    }
}

/// Average pooling: `y[o] = (1/n) * sum_{i in window(o)} x[i]`, `n = kernel_h * kernel_w`
/// (padding counts as 0). Scratch: none.
pub fn avg_forward(g: &PoolGeom, input: &[f32], output: &mut [f32]) {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(output.len(), g.output_len());
    let n = g.window_len() as f32;
    let (in_hw, out_w) = (g.in_h * g.in_w, g.out_w());
    let out_hw = g.out_h() * out_w;
    for (plane, out) in input
        .chunks_exact(in_hw)
        .zip(output.chunks_exact_mut(out_hw))
    {
        for (o, y) in out.iter_mut().enumerate() {
            *y = window_sum(g, plane, o / out_w, o % out_w, |x| x) / n;
        }
    }
}

/// Input error of average pooling: `e_x[i] = (1/n) * sum_{o : i in window(o)} e_y[o]`
/// (overwrites `in_err`; inputs in no window get 0). Scratch: none.
pub fn avg_input_backward(g: &PoolGeom, out_err: &[f32], in_err: &mut [f32]) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(in_err.len(), g.input_len());
    let n = g.window_len() as f32;
    let in_hw = g.in_h * g.in_w;
    let out_hw = g.out_h() * g.out_w();
    for (err, ein) in out_err
        .chunks_exact(out_hw)
        .zip(in_err.chunks_exact_mut(in_hw))
    {
        for (i, e) in ein.iter_mut().enumerate() {
            *e = covering_sum(g, err, i / g.in_w, i % g.in_w, |e| e) / n;
        }
    }
}

/// Quantized average pooling, with `n = kernel_h * kernel_w`:
/// `y = clamp(z_y + round((s_x / (s_y * n)) * sum_{window} (x - z_x)), -128, 127)`
/// (padding is `x = z_x`). Returns the real range `s_x / n * sum(x - z_x)` before saturation.
/// Scratch: none.
pub fn avg_forward_q(
    g: &PoolGeom,
    input: &[i8],
    input_q: QParams,
    output_q: QParams,
    output: &mut [i8],
) -> RealRange {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(output.len(), g.output_len());
    let n = g.window_len();
    let mut to_code = AccToCode::new(input_q.scale, output_q.scale, n, output_q);
    let z_x = input_q.zero_point;
    let (in_hw, out_w) = (g.in_h * g.in_w, g.out_w());
    let out_hw = g.out_h() * out_w;
    for (plane, out) in input
        .chunks_exact(in_hw)
        .zip(output.chunks_exact_mut(out_hw))
    {
        for (o, y) in out.iter_mut().enumerate() {
            let acc = window_sum(g, plane, o / out_w, o % out_w, |x| x as i32 - z_x);
            *y = to_code.code(acc);
        }
    }
    to_code.real_range(input_q.scale / n as f32)
}

/// Quantized input error of average pooling:
/// `e_x = clamp(z_ex + round((s_e / (s_ex * n)) * sum_{o : i in window(o)} (e_y[o] - z_e)),
/// -128, 127)` (overwrites `in_err`). Returns the real range before saturation.
/// Scratch: none.
pub fn avg_input_backward_q(
    g: &PoolGeom,
    out_err: &[i8],
    out_err_q: QParams,
    in_err_q: QParams,
    in_err: &mut [i8],
) -> RealRange {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(in_err.len(), g.input_len());
    let n = g.window_len();
    let mut to_code = AccToCode::new(out_err_q.scale, in_err_q.scale, n, in_err_q);
    let z_e = out_err_q.zero_point;
    let in_hw = g.in_h * g.in_w;
    let out_hw = g.out_h() * g.out_w();
    for (err, ein) in out_err
        .chunks_exact(out_hw)
        .zip(in_err.chunks_exact_mut(in_hw))
    {
        for (i, e) in ein.iter_mut().enumerate() {
            let acc = covering_sum(g, err, i / g.in_w, i % g.in_w, |e| e as i32 - z_e);
            *e = to_code.code(acc);
        }
    }
    to_code.real_range(out_err_q.scale / n as f32)
}

/// Max pooling: `y[o] = max_{i in window(o)} x[i]` (padding ignored). Scratch: none.
pub fn max_forward(g: &PoolGeom, input: &[f32], output: &mut [f32]) {
    max_forward_generic(g, input, output);
}

/// Quantized max pooling on codes: `y = max_{window} x`. The output shares the input's qparams
/// (the maximum of codes is the code of the maximum because the scale is positive).
/// Scratch: none.
pub fn max_forward_q(g: &PoolGeom, input: &[i8], output: &mut [i8]) {
    max_forward_generic(g, input, output);
}

fn max_forward_generic<T: Copy + PartialOrd>(g: &PoolGeom, input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(output.len(), g.output_len());
    let (in_hw, out_w) = (g.in_h * g.in_w, g.out_w());
    let out_hw = g.out_h() * out_w;
    for (plane, out) in input
        .chunks_exact(in_hw)
        .zip(output.chunks_exact_mut(out_hw))
    {
        for (o, y) in out.iter_mut().enumerate() {
            *y = plane[window_argmax(g, plane, o / out_w, o % out_w)];
        }
    }
}

/// Input error of max pooling: `e_x[i] = sum_{o : argmax(window(o)) = i} e_y[o]`, 0 for inputs
/// that are no window's maximum (overwrites `in_err`). The argmax is re-derived from `input`
/// (ties: first in scan order). Scratch: none; costs one forward when windows do not overlap.
pub fn max_input_backward(g: &PoolGeom, input: &[f32], out_err: &[f32], in_err: &mut [f32]) {
    in_err.fill(0.0);
    max_route(g, input, out_err, in_err, |e| e, |sum| sum);
}

/// Quantized input error of max pooling: the error code difference is routed to the argmax,
/// `e_x[i] = clamp(z_ex + round((s_e / s_ex) * sum_{o : argmax(window(o)) = i} (e_y[o] - z_e)),
/// -128, 127)`, and `e_x = z_ex` (real 0) elsewhere (overwrites `in_err`). The argmax is
/// re-derived from the input codes. Returns the real range of the routed sums before
/// saturation, widened to contain 0. Scratch: none.
pub fn max_input_backward_q(
    g: &PoolGeom,
    input: &[i8],
    out_err: &[i8],
    out_err_q: QParams,
    in_err_q: QParams,
    in_err: &mut [i8],
) -> RealRange {
    in_err.fill(in_err_q.zero_point as i8);
    let mut to_code = AccToCode::new(out_err_q.scale, in_err_q.scale, 1, in_err_q);
    let z_e = out_err_q.zero_point;
    max_route(
        g,
        input,
        out_err,
        in_err,
        |e| e as i32 - z_e,
        |acc| to_code.code(acc),
    );
    let mut range = to_code.real_range(out_err_q.scale);
    range.include(0.0);
    range
}

/// Writes `finish(sum_{o : argmax(window(o)) = i} term(e_y[o]))` at every input `i` that is the
/// argmax of a window; other inputs are left alone.
fn max_route<T: Copy + PartialOrd, E: Copy, S: Default + AddAssign>(
    g: &PoolGeom,
    input: &[T],
    out_err: &[E],
    in_err: &mut [E],
    term: impl Fn(E) -> S,
    mut finish: impl FnMut(S) -> E,
) {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(in_err.len(), g.input_len());
    let (in_hw, out_w) = (g.in_h * g.in_w, g.out_w());
    let out_hw = g.out_h() * out_w;
    let planes = input
        .chunks_exact(in_hw)
        .zip(out_err.chunks_exact(out_hw))
        .zip(in_err.chunks_exact_mut(in_hw));
    for ((plane, err), ein) in planes {
        for o in 0..out_hw {
            let (oh, ow) = (o / out_w, o % out_w);
            let target = window_argmax(g, plane, oh, ow);
            if let Some(sum) = routed_sum(g, plane, err, oh, ow, target, &term) {
                ein[target] = finish(sum);
            }
        }
    }
}

/// Global average pooling: `y[n][c] = (1/spatial) * sum_i x[n][c][i]`. Scratch: none.
pub fn global_avg_forward(g: &GlobalPoolGeom, input: &[f32], output: &mut [f32]) {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(output.len(), g.output_len());
    let n = g.spatial as f32;
    for (plane, y) in input.chunks_exact(g.spatial).zip(output.iter_mut()) {
        *y = plane.iter().fold(0.0f32, |sum, &x| sum + x) / n;
    }
}

/// Input error of global average pooling: `e_x[n][c][i] = e_y[n][c] / spatial` (overwrites
/// `in_err`). Scratch: none.
pub fn global_avg_input_backward(g: &GlobalPoolGeom, out_err: &[f32], in_err: &mut [f32]) {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(in_err.len(), g.input_len());
    let n = g.spatial as f32;
    for (ein, &e) in in_err.chunks_exact_mut(g.spatial).zip(out_err) {
        ein.fill(e / n);
    }
}

/// Quantized global average pooling, `n = spatial`:
/// `y = clamp(z_y + round((s_x / (s_y * n)) * sum_i (x_i - z_x)), -128, 127)`. Returns the real
/// range `s_x / n * sum(x - z_x)` before saturation. Scratch: none.
pub fn global_avg_forward_q(
    g: &GlobalPoolGeom,
    input: &[i8],
    input_q: QParams,
    output_q: QParams,
    output: &mut [i8],
) -> RealRange {
    debug_assert_eq!(input.len(), g.input_len());
    debug_assert_eq!(output.len(), g.output_len());
    let mut to_code = AccToCode::new(input_q.scale, output_q.scale, g.spatial, output_q);
    let z_x = input_q.zero_point;
    for (plane, y) in input.chunks_exact(g.spatial).zip(output.iter_mut()) {
        *y = to_code.code(plane.iter().map(|&x| x as i32 - z_x).sum());
    }
    to_code.real_range(input_q.scale / g.spatial as f32)
}

/// Quantized input error of global average pooling, `n = spatial`:
/// `e_x = clamp(z_ex + round((s_e / (s_ex * n)) * (e_y - z_e)), -128, 127)`, the same code for
/// every position of the channel (overwrites `in_err`). Returns the real range before
/// saturation. Scratch: none.
pub fn global_avg_input_backward_q(
    g: &GlobalPoolGeom,
    out_err: &[i8],
    out_err_q: QParams,
    in_err_q: QParams,
    in_err: &mut [i8],
) -> RealRange {
    debug_assert_eq!(out_err.len(), g.output_len());
    debug_assert_eq!(in_err.len(), g.input_len());
    let mut to_code = AccToCode::new(out_err_q.scale, in_err_q.scale, g.spatial, in_err_q);
    let z_e = out_err_q.zero_point;
    for (ein, &e) in in_err.chunks_exact_mut(g.spatial).zip(out_err) {
        ein.fill(to_code.code(e as i32 - z_e));
    }
    to_code.real_range(out_err_q.scale / g.spatial as f32)
}

// ---------------------------------------------------------------------------------------------
// The layer contract.

/// Average pooling as a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool(pub PoolGeom);

/// Max pooling as a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool(pub PoolGeom);

impl PoolGeom {
    fn output_shape(&self) -> Shape {
        [self.channels, self.out_h(), self.out_w()]
    }

    /// A window sums at most 2^16 codes in an `i32`.
    fn fits_int8_limits(&self) -> bool {
        (self.kernel_h as u64) * (self.kernel_w as u64) <= 1 << 16
    }
}

impl Operator for AvgPool {
    fn output_shape(&self) -> Shape {
        self.0.output_shape()
    }

    fn input_len(&self) -> usize {
        self.0.input_len()
    }

    fn output_len(&self) -> usize {
        self.0.output_len()
    }

    fn fits_int8_limits(&self) -> bool {
        self.0.fits_int8_limits()
    }

    fn forward(&self, x: &[f32], _skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        avg_forward(&self.0, x, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        _params: QParameters,
        y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        avg_forward_q(&self.0, x.codes, x.q, y_q, y)
    }

    fn input_error(&self) -> Option<&dyn InputError> {
        Some(self)
    }
}

impl InputError for AvgPool {
    fn input_backward(
        &self,
        _x: &[f32],
        _weight: &[f32],
        out_err: &[f32],
        _channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        avg_input_backward(&self.0, out_err, in_err);
    }

    fn input_backward_q(
        &self,
        _x: QTensor,
        _weight: QWeights,
        out_err: QTensor,
        _channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange {
        avg_input_backward_q(&self.0, out_err.codes, out_err.q, in_err_q, in_err)
    }
}

/// The output keeps the input's codes (the maximum of codes is the code of the maximum).
impl Operator for MaxPool {
    fn output_shape(&self) -> Shape {
        self.0.output_shape()
    }

    fn input_len(&self) -> usize {
        self.0.input_len()
    }

    fn output_len(&self) -> usize {
        self.0.output_len()
    }

    fn fits_int8_limits(&self) -> bool {
        self.0.fits_int8_limits()
    }

    fn preserves_codes(&self) -> bool {
        true
    }

    fn forward(&self, x: &[f32], _skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        max_forward(&self.0, x, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        _params: QParameters,
        _y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        max_forward_q(&self.0, x.codes, y);
        RealRange::EMPTY
    }

    fn input_error(&self) -> Option<&dyn InputError> {
        Some(self)
    }
}

impl InputError for MaxPool {
    fn reads_input(&self) -> bool {
        true
    }

    fn input_backward(
        &self,
        x: &[f32],
        _weight: &[f32],
        out_err: &[f32],
        _channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        max_input_backward(&self.0, x, out_err, in_err);
    }

    fn input_backward_q(
        &self,
        x: QTensor,
        _weight: QWeights,
        out_err: QTensor,
        _channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange {
        max_input_backward_q(&self.0, x.codes, out_err.codes, out_err.q, in_err_q, in_err)
    }
}

impl Operator for GlobalPoolGeom {
    fn output_shape(&self) -> Shape {
        [self.channels, 1, 1]
    }

    fn input_len(&self) -> usize {
        GlobalPoolGeom::input_len(self)
    }

    fn output_len(&self) -> usize {
        GlobalPoolGeom::output_len(self)
    }

    /// A channel sums at most 2^23 codes in an `i32`.
    fn fits_int8_limits(&self) -> bool {
        self.spatial as u64 <= 1 << 23
    }

    fn forward(&self, x: &[f32], _skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        global_avg_forward(self, x, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        _params: QParameters,
        y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        global_avg_forward_q(self, x.codes, x.q, y_q, y)
    }

    fn input_error(&self) -> Option<&dyn InputError> {
        Some(self)
    }
}

impl InputError for GlobalPoolGeom {
    fn input_backward(
        &self,
        _x: &[f32],
        _weight: &[f32],
        out_err: &[f32],
        _channels: ChannelSet,
        in_err: &mut [f32],
    ) {
        global_avg_input_backward(self, out_err, in_err);
    }

    fn input_backward_q(
        &self,
        _x: QTensor,
        _weight: QWeights,
        out_err: QTensor,
        _channels: ChannelSet,
        in_err_q: QParams,
        in_err: &mut [i8],
    ) -> RealRange {
        global_avg_input_backward_q(self, out_err.codes, out_err.q, in_err_q, in_err)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ops::contract::check_float_backward_matches_finite_differences;
    use crate::quant::{dequantize_slice, quantize_slice};
    use crate::rng::Rng;
    use std::vec::Vec;

    /// Independent `f64` reference of both windowed pools (`max = false`: average including
    /// padding).
    fn reference_pool(g: &PoolGeom, x: &[f64], max: bool) -> Vec<f64> {
        let mut out = Vec::new();
        for p in 0..g.batch * g.channels {
            for oh in 0..g.out_h() {
                for ow in 0..g.out_w() {
                    let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                    for kh in 0..g.kernel_h {
                        for kw in 0..g.kernel_w {
                            let ih = (oh * g.stride_h + kh) as isize - g.pad_h as isize;
                            let iw = (ow * g.stride_w + kw) as isize - g.pad_w as isize;
                            if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
                                continue;
                            }
                            let v = x[p * g.in_h * g.in_w + ih as usize * g.in_w + iw as usize];
                            acc = if max { acc.max(v) } else { acc + v };
                        }
                    }
                    out.push(if max {
                        acc
                    } else {
                        acc / g.window_len() as f64
                    });
                }
            }
        }
        out
    }

    fn reference_global(g: &GlobalPoolGeom, x: &[f64]) -> Vec<f64> {
        x.chunks(g.spatial)
            .map(|p| p.iter().sum::<f64>() / g.spatial as f64)
            .collect()
    }

    /// Central differences of `L(x) = sum_o w_o * f(x)_o` in `f64` against `analytic`.
    fn assert_gradient(
        f: impl Fn(&[f64]) -> Vec<f64>,
        x: &[f32],
        weights: &[f32],
        analytic: &[f32],
        h: f64,
        what: &str,
    ) {
        let loss =
            |x: &[f64]| -> f64 { f(x).iter().zip(weights).map(|(&y, &w)| y * w as f64).sum() };
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
            let tol = 1e-3 * fd.abs().max(got.abs()) + 1e-9;
            assert!((fd - got).abs() <= tol, "{what} {i}: fd={fd} got={got}");
        }
    }

    fn random_geometries(rng: &mut Rng, count: usize) -> Vec<PoolGeom> {
        let mut out = std::vec![
            // stride 2 with padding and odd size, overlapping windows
            PoolGeom {
                batch: 2,
                channels: 3,
                in_h: 7,
                in_w: 5,
                kernel_h: 3,
                kernel_w: 3,
                stride_h: 2,
                stride_w: 2,
                pad_h: 1,
                pad_w: 1,
            },
            // stride larger than the kernel: some inputs in no window
            PoolGeom {
                batch: 1,
                channels: 2,
                in_h: 7,
                in_w: 6,
                kernel_h: 2,
                kernel_w: 1,
                stride_h: 3,
                stride_w: 2,
                pad_h: 0,
                pad_w: 0,
            },
        ];
        while out.len() < count {
            let kernel_h = 1 + rng.below(3) as usize;
            let kernel_w = 1 + rng.below(3) as usize;
            let g = PoolGeom {
                batch: 1 + rng.below(3) as usize,
                channels: 1 + rng.below(3) as usize,
                in_h: 1 + rng.below(8) as usize,
                in_w: 1 + rng.below(8) as usize,
                kernel_h,
                kernel_w,
                stride_h: 1 + rng.below(3) as usize,
                stride_w: 1 + rng.below(3) as usize,
                pad_h: rng.below(kernel_h as u32) as usize,
                pad_w: rng.below(kernel_w as u32) as usize,
            };
            if g.validate().is_ok() {
                out.push(g);
            }
        }
        out
    }

    fn uniform(rng: &mut Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| lo + (hi - lo) * rng.next_f32()).collect()
    }

    /// Distinct values at least 0.01 apart, in random order, so that no argmax changes under a
    /// perturbation of 1e-3.
    fn distinct(rng: &mut Rng, len: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..len).map(|i| i as f32 * 0.01 - 1.0).collect();
        for i in (1..len).rev() {
            v.swap(i, rng.below(i as u32 + 1) as usize);
        }
        v
    }

    #[test]
    fn geometry_sizes_and_validation() {
        let g = PoolGeom {
            batch: 2,
            channels: 3,
            in_h: 7,
            in_w: 5,
            kernel_h: 3,
            kernel_w: 2,
            stride_h: 2,
            stride_w: 2,
            pad_h: 1,
            pad_w: 0,
        };
        assert_eq!((g.out_h(), g.out_w()), (4, 2));
        assert_eq!((g.input_len(), g.output_len()), (210, 48));
        assert_eq!(g.validate(), Ok(()));
        assert_eq!(
            PoolGeom { stride_w: 0, ..g }.validate(),
            Err(OpError::ZeroSize)
        );
        assert_eq!(
            PoolGeom { kernel_w: 6, ..g }.validate(),
            Err(OpError::KernelTooLarge)
        );
        assert_eq!(
            PoolGeom { pad_h: 3, ..g }.validate(),
            Err(OpError::KernelTooLarge)
        );
    }

    #[test]
    fn covering_windows_invert_clipped_windows() {
        let mut rng = Rng::new(11);
        for g in random_geometries(&mut rng, 40) {
            for ih in 0..g.in_h {
                for oh in 0..g.out_h() {
                    assert_eq!(
                        g.window_rows(oh).contains(&ih),
                        g.covering_rows(ih).contains(&oh),
                        "{g:?} ih={ih} oh={oh}"
                    );
                }
            }
        }
    }

    #[test]
    fn forwards_match_reference() {
        let mut rng = Rng::new(3);
        for g in random_geometries(&mut rng, 30) {
            let x = uniform(&mut rng, g.input_len(), -2.0, 2.0);
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut y = std::vec![0.0f32; g.output_len()];
            for max in [false, true] {
                if max {
                    max_forward(&g, &x, &mut y);
                } else {
                    avg_forward(&g, &x, &mut y);
                }
                for (a, b) in y.iter().zip(reference_pool(&g, &xd, max)) {
                    assert!((*a as f64 - b).abs() <= 1e-5, "{g:?} max={max} {a} {b}");
                }
            }
        }
    }

    #[test]
    fn avg_and_max_backward_match_central_differences() {
        let mut rng = Rng::new(5);
        for g in random_geometries(&mut rng, 25) {
            let w = uniform(&mut rng, g.output_len(), -1.0, 1.0);
            let mut grad = std::vec![7.0f32; g.input_len()];

            let x = uniform(&mut rng, g.input_len(), -2.0, 2.0);
            avg_input_backward(&g, &w, &mut grad);
            assert_gradient(|x| reference_pool(&g, x, false), &x, &w, &grad, 1e-3, "avg");

            let x = distinct(&mut rng, g.input_len());
            grad.fill(7.0);
            max_input_backward(&g, &x, &w, &mut grad);
            assert_gradient(|x| reference_pool(&g, x, true), &x, &w, &grad, 1e-3, "max");
        }
    }

    #[test]
    fn global_avg_forward_and_backward() {
        let mut rng = Rng::new(9);
        let g = GlobalPoolGeom {
            batch: 3,
            channels: 4,
            spatial: 15,
        };
        assert_eq!(g.validate(), Ok(()));
        let x = uniform(&mut rng, g.input_len(), -2.0, 2.0);
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let mut y = std::vec![0.0f32; g.output_len()];
        global_avg_forward(&g, &x, &mut y);
        for (a, b) in y.iter().zip(reference_global(&g, &xd)) {
            assert!((*a as f64 - b).abs() <= 1e-6);
        }
        let w = uniform(&mut rng, g.output_len(), -1.0, 1.0);
        let mut grad = std::vec![7.0f32; g.input_len()];
        global_avg_input_backward(&g, &w, &mut grad);
        assert_gradient(|x| reference_global(&g, x), &x, &w, &grad, 1e-3, "global");
    }

    /// Asserts `|dequantize(q) - clamp(reference)| <= 1 step` element-wise.
    fn assert_within_one_step(q: &[i8], qp: QParams, reference: &[f32], what: &str) {
        let (lo, hi) = qp.representable_range();
        for (i, (&c, &r)) in q.iter().zip(reference).enumerate() {
            let diff = (qp.dequantize(c) - r.clamp(lo, hi)).abs();
            assert!(
                diff <= qp.scale * 1.0001,
                "{what} {i}: {diff} step {}",
                qp.scale
            );
        }
    }

    #[test]
    fn quantized_pools_agree_with_float_on_dequantized_inputs() {
        let mut rng = Rng::new(21);
        let x_q = QParams {
            scale: 0.02,
            zero_point: -7,
        };
        let y_q = QParams {
            scale: 0.013,
            zero_point: 5,
        };
        for g in random_geometries(&mut rng, 25) {
            let raw = uniform(&mut rng, g.input_len(), -2.5, 2.5);
            let mut codes = std::vec![0i8; g.input_len()];
            quantize_slice(&raw, x_q, &mut codes);
            let mut x = std::vec![0.0f32; g.input_len()];
            dequantize_slice(&codes, x_q, &mut x);

            let mut y = std::vec![0.0f32; g.output_len()];
            let mut y_codes = std::vec![0i8; g.output_len()];
            avg_forward(&g, &x, &mut y);
            let range = avg_forward_q(&g, &codes, x_q, y_q, &mut y_codes);
            assert_within_one_step(&y_codes, y_q, &y, "avg_q");
            let float_range = RealRange::of(&y);
            assert!((range.min - float_range.min).abs() < 1e-5);
            assert!((range.max - float_range.max).abs() < 1e-5);

            max_forward(&g, &x, &mut y);
            max_forward_q(&g, &codes, &mut y_codes);
            for (&c, &r) in y_codes.iter().zip(&y) {
                assert_eq!(x_q.dequantize(c), r);
            }

            // Backward: error codes in, float reference on the dequantized error.
            let e_q = QParams {
                scale: 0.01,
                zero_point: 3,
            };
            let ein_q = QParams {
                scale: 0.006,
                zero_point: -2,
            };
            let raw_e = uniform(&mut rng, g.output_len(), -1.2, 1.2);
            let mut e_codes = std::vec![0i8; g.output_len()];
            quantize_slice(&raw_e, e_q, &mut e_codes);
            let mut e = std::vec![0.0f32; g.output_len()];
            dequantize_slice(&e_codes, e_q, &mut e);
            let mut ein = std::vec![0.0f32; g.input_len()];
            let mut ein_codes = std::vec![0i8; g.input_len()];

            avg_input_backward(&g, &e, &mut ein);
            avg_input_backward_q(&g, &e_codes, e_q, ein_q, &mut ein_codes);
            assert_within_one_step(&ein_codes, ein_q, &ein, "avg_backward_q");

            max_input_backward(&g, &x, &e, &mut ein);
            let range = max_input_backward_q(&g, &codes, &e_codes, e_q, ein_q, &mut ein_codes);
            assert_within_one_step(&ein_codes, ein_q, &ein, "max_backward_q");
            let float_range = RealRange::of(&ein);
            assert!((range.min - float_range.min.min(0.0)).abs() < 1e-5);
            assert!((range.max - float_range.max.max(0.0)).abs() < 1e-5);
        }
    }

    #[test]
    fn max_backward_q_ties_route_to_first_in_scan_order() {
        // One 2x2 window, all inputs equal: the whole error goes to the first position.
        let g = PoolGeom {
            batch: 1,
            channels: 1,
            in_h: 2,
            in_w: 2,
            kernel_h: 2,
            kernel_w: 2,
            stride_h: 1,
            stride_w: 1,
            pad_h: 0,
            pad_w: 0,
        };
        let q = QParams {
            scale: 0.1,
            zero_point: 0,
        };
        let mut ein = [9i8; 4];
        max_input_backward_q(&g, &[4, 4, 4, 4], &[20], q, q, &mut ein);
        assert_eq!(ein, [20, 0, 0, 0]);
    }

    #[test]
    fn global_quantized_agrees_with_float() {
        let mut rng = Rng::new(33);
        let g = GlobalPoolGeom {
            batch: 2,
            channels: 5,
            spatial: 49,
        };
        let x_q = QParams {
            scale: 0.03,
            zero_point: 10,
        };
        let y_q = QParams {
            scale: 0.01,
            zero_point: -3,
        };
        let raw = uniform(&mut rng, g.input_len(), -2.0, 2.0);
        let mut codes = std::vec![0i8; g.input_len()];
        quantize_slice(&raw, x_q, &mut codes);
        let mut x = std::vec![0.0f32; g.input_len()];
        dequantize_slice(&codes, x_q, &mut x);
        let mut y = std::vec![0.0f32; g.output_len()];
        let mut y_codes = std::vec![0i8; g.output_len()];
        global_avg_forward(&g, &x, &mut y);
        let range = global_avg_forward_q(&g, &codes, x_q, y_q, &mut y_codes);
        assert_within_one_step(&y_codes, y_q, &y, "global_q");
        assert!((range.max - RealRange::of(&y).max).abs() < 1e-5);

        let e_q = QParams {
            scale: 0.05,
            zero_point: 0,
        };
        let ein_q = QParams {
            scale: 0.001,
            zero_point: 1,
        };
        let e_codes: Vec<i8> = (0..g.output_len()).map(|i| i as i8 * 9 - 40).collect();
        let mut e = std::vec![0.0f32; g.output_len()];
        dequantize_slice(&e_codes, e_q, &mut e);
        let mut ein = std::vec![0.0f32; g.input_len()];
        let mut ein_codes = std::vec![0i8; g.input_len()];
        global_avg_input_backward(&g, &e, &mut ein);
        global_avg_input_backward_q(&g, &e_codes, e_q, ein_q, &mut ein_codes);
        assert_within_one_step(&ein_codes, ein_q, &ein, "global_backward_q");
    }

    /// The pooling layers' input errors, through the layer contract, against finite
    /// differences of the references.
    #[test]
    fn layers_match_finite_differences_through_the_contract() {
        let mut rng = Rng::new(13);
        for (seed, g) in random_geometries(&mut rng, 25).into_iter().enumerate() {
            let seed = seed as u64;
            let avg = |x: &[f64], _: &[f64], _: &[f64], _: &[f64]| reference_pool(&g, x, false);
            check_float_backward_matches_finite_differences(&AvgPool(g), &avg, seed);
            let max = |x: &[f64], _: &[f64], _: &[f64], _: &[f64]| reference_pool(&g, x, true);
            check_float_backward_matches_finite_differences(&MaxPool(g), &max, seed);
        }
        let g = GlobalPoolGeom {
            batch: 2,
            channels: 3,
            spatial: 10,
        };
        let global = |x: &[f64], _: &[f64], _: &[f64], _: &[f64]| reference_global(&g, x);
        check_float_backward_matches_finite_differences(&g, &global, 1);
    }
}
