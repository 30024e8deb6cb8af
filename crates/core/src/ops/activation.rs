//! Element-wise activations (identity, ReLU, ReLU6), float and 8-bit.
//!
//! Quantized activations keep the qparams of their input: the forward is a clamp of the codes,
//! and the backward masks the error where the activation (or the 8-bit storage) clipped, from
//! the output codes or from a 1-bit clamp mask of them. None of these functions needs scratch
//! memory.

pub use crate::ops::operator::Activation;
use crate::ops::operator::{numel, FloatParams, Operator, QParameters, Shape};
use crate::quant::{QParams, QTensor, RealRange};

/// `output[i] = clamp(input[i], lo, hi)` with `(lo, hi)` = [`Activation::real_bounds`].
/// Scratch: none.
pub fn forward(act: Activation, input: &[f32], output: &mut [f32]) {
    debug_assert_eq!(input.len(), output.len());
    let (lo, hi) = act.real_bounds();
    for (y, &x) in output.iter_mut().zip(input) {
        *y = if x < lo {
            lo
        } else if x > hi {
            hi
        } else {
            x
        };
    }
}

/// [`forward`] in place: `values[i] = clamp(values[i], lo, hi)` (a fused activation after a
/// convolution or fully connected layer). Scratch: none.
pub fn forward_in_place(act: Activation, values: &mut [f32]) {
    if act == Activation::None {
        return;
    }
    let (lo, hi) = act.real_bounds();
    for v in values {
        *v = if *v < lo {
            lo
        } else if *v > hi {
            hi
        } else {
            *v
        };
    }
}

/// In place `err[i] = 0` where `output[i]` sits at an activation bound (`y <= 0` for ReLU,
/// `y <= 0` or `y >= 6` for ReLU6), else unchanged: `dL/dx = dL/dy * [lo < y < hi]`.
/// The identity leaves `err` unchanged. Scratch: none.
pub fn backward(act: Activation, output: &[f32], err: &mut [f32]) {
    debug_assert_eq!(output.len(), err.len());
    if act == Activation::None {
        return;
    }
    let (lo, hi) = act.real_bounds();
    for (e, &y) in err.iter_mut().zip(output) {
        if y <= lo || y >= hi {
            *e = 0.0;
        }
    }
}

/// `output[i] = clamp(input[i], lo, hi)` on codes, with `(lo, hi)` = [`Activation::code_bounds`]
/// of `q`; input and output share the qparams `q`, so no rescaling happens. Scratch: none.
pub fn forward_q(act: Activation, input: &[i8], q: QParams, output: &mut [i8]) {
    debug_assert_eq!(input.len(), output.len());
    let (lo, hi) = act.code_bounds(q);
    for (y, &x) in output.iter_mut().zip(input) {
        *y = (x as i32).clamp(lo, hi) as i8;
    }
}

/// In place `err[i] = z_err` (real 0) wherever `output[i] <= lo` or `output[i] >= hi`, with
/// `(lo, hi)` = [`Activation::code_bounds`] of `output_q`, else unchanged.
///
/// Because the code bounds never pass the storage limits, this masks both the activation's
/// bounds and 8-bit saturation (`-128`, `127`): a saturated (clamped) output passes no gradient,
/// the clipped straight-through estimator. So even [`Activation::None`] masks saturated codes.
/// The error keeps its qparams `err_q`. Scratch: none.
pub fn backward_mask_q(
    act: Activation,
    output: &[i8],
    output_q: QParams,
    err: &mut [i8],
    err_q: QParams,
) {
    debug_assert_eq!(output.len(), err.len());
    let (lo, hi) = act.code_bounds(output_q);
    let zero = err_q.zero_point as i8;
    for (e, &y) in err.iter_mut().zip(output) {
        if clamped(y, lo, hi) {
            *e = zero;
        }
    }
}

/// True where [`backward_mask_q`] zeroes the error: the code sits at a bound `lo` or `hi`.
#[inline(always)]
fn clamped(code: i8, lo: i32, hi: i32) -> bool {
    let code = code as i32;
    code <= lo || code >= hi
}

/// Bytes of a clamp mask of `len` outputs: one bit each, `ceil(len / 8)`.
pub fn clamp_mask_bytes(len: usize) -> usize {
    len.div_ceil(8)
}

/// The clamp mask of `output` (codes in `output_q`): bit `i % 8` of `mask[i / 8]` is 1 where
/// [`backward_mask_q`] would zero the error (the code at a bound of `act` or of the storage),
/// else 0; unused bits of the last byte are 0. Keeping this mask instead of the output cuts a
/// tensor saved for the backward pass to an eighth. `mask` holds [`clamp_mask_bytes`] of
/// `output.len()`. Scratch: none.
pub fn clamp_mask_q(act: Activation, output: &[i8], output_q: QParams, mask: &mut [u8]) {
    debug_assert_eq!(mask.len(), clamp_mask_bytes(output.len()));
    let (lo, hi) = act.code_bounds(output_q);
    for (byte, codes) in mask.iter_mut().zip(output.chunks(8)) {
        *byte = codes
            .iter()
            .enumerate()
            .fold(0, |bits, (b, &y)| bits | (clamped(y, lo, hi) as u8) << b);
    }
}

/// In place `err[i] = z_err` (real 0) where bit `i` of the clamp `mask` ([`clamp_mask_q`]) is
/// set, else unchanged: the same result as [`backward_mask_q`] on the output the mask was
/// made from. Scratch: none.
pub fn backward_mask_bits_q(mask: &[u8], err: &mut [i8], err_q: QParams) {
    debug_assert_eq!(mask.len(), clamp_mask_bytes(err.len()));
    let zero = err_q.zero_point as i8;
    for (errors, &byte) in err.chunks_mut(8).zip(mask) {
        for (b, e) in errors.iter_mut().enumerate() {
            if byte >> b & 1 != 0 {
                *e = zero;
            }
        }
    }
}

/// A standalone activation layer over `batch` samples of shape `shape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationLayer {
    /// The activation.
    pub activation: Activation,
    /// Per-sample shape of input and output.
    pub shape: Shape,
    /// Samples.
    pub batch: usize,
}

/// The output keeps the input's codes, clamped: its quantization is the input's; the backward
/// pass masks the error and passes it to the input.
impl Operator for ActivationLayer {
    fn output_shape(&self) -> Shape {
        self.shape
    }

    fn input_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn output_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn output_clamp(&self) -> Option<Activation> {
        Some(self.activation)
    }

    fn preserves_codes(&self) -> bool {
        true
    }

    fn forward(&self, x: &[f32], _skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        forward(self.activation, x, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        _params: QParameters,
        _y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        forward_q(self.activation, x.codes, x.q, y);
        RealRange::EMPTY
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ops::contract::check_float_backward_matches_finite_differences;
    use proptest::prelude::*;
    use std::vec::Vec;

    const ALL: [Activation; 3] = [Activation::None, Activation::Relu, Activation::Relu6];

    fn reference(act: Activation, x: f64) -> f64 {
        match act {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            Activation::Relu6 => x.clamp(0.0, 6.0),
        }
    }

    #[test]
    fn code_bounds_follow_zero_point_and_six() {
        let q = QParams {
            scale: 0.05,
            zero_point: -100,
        };
        assert_eq!(Activation::None.code_bounds(q), (-128, 127));
        assert_eq!(Activation::Relu.code_bounds(q), (-100, 127));
        assert_eq!(Activation::Relu6.code_bounds(q), (-100, 20));
        // 6.0 beyond the representable range saturates.
        let wide = QParams {
            scale: 0.01,
            zero_point: 0,
        };
        assert_eq!(Activation::Relu6.code_bounds(wide), (0, 127));
    }

    #[test]
    fn float_forward_clamps() {
        let x = [-2.0f32, 0.0, 3.0, 6.0, 9.5];
        let mut y = [0.0f32; 5];
        forward(Activation::Relu6, &x, &mut y);
        assert_eq!(y, [0.0, 0.0, 3.0, 6.0, 6.0]);
        forward(Activation::Relu, &x, &mut y);
        assert_eq!(y, [0.0, 0.0, 3.0, 6.0, 9.5]);
        forward(Activation::None, &x, &mut y);
        assert_eq!(y, x);
    }

    #[test]
    fn backward_matches_central_differences_away_from_kinks() {
        let mut rng = crate::rng::Rng::new(7);
        let n = 64;
        let x: Vec<f32> = (0..n)
            .map(|_| loop {
                let v = -3.0 + 12.0 * rng.next_f32();
                if (v.abs() > 0.05) && ((v - 6.0).abs() > 0.05) {
                    break v;
                }
            })
            .collect();
        let upstream: Vec<f32> = (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect();
        for act in ALL {
            let mut y = std::vec![0.0f32; n];
            forward(act, &x, &mut y);
            let mut err = upstream.clone();
            backward(act, &y, &mut err);
            let h = 1e-3f64;
            for i in 0..n {
                let xi = x[i] as f64;
                let fd = (reference(act, xi + h) - reference(act, xi - h)) / (2.0 * h)
                    * upstream[i] as f64;
                let got = err[i] as f64;
                let tol = 1e-3 * fd.abs().max(got.abs()).max(1e-6);
                assert!((fd - got).abs() <= tol, "{act:?} x={xi} fd={fd} got={got}");
            }
        }
    }

    /// The standalone layer through the layer contract: its output error, masked by its clamp,
    /// is its input error.
    #[test]
    fn layer_matches_finite_differences_through_the_contract() {
        for (seed, activation) in ALL.into_iter().enumerate() {
            let layer = ActivationLayer {
                activation,
                shape: [3, 4, 5],
                batch: 2,
            };
            let identity = |x: &[f64], _: &[f64], _: &[f64], _: &[f64]| x.to_vec();
            check_float_backward_matches_finite_differences(&layer, &identity, seed as u64);
        }
    }

    #[test]
    fn mask_q_zeroes_bounds_and_saturation() {
        let out_q = QParams {
            scale: 0.05,
            zero_point: -100,
        };
        let err_q = QParams {
            scale: 0.01,
            zero_point: 3,
        };
        let output = [-100i8, -99, 19, 20, 127, -128, 0];
        for (act, expect) in [
            (Activation::Relu6, [3i8, 9, 9, 3, 3, 3, 9]),
            (Activation::Relu, [3, 9, 9, 9, 3, 3, 9]),
            (Activation::None, [9, 9, 9, 9, 3, 3, 9]),
        ] {
            let mut err = [9i8; 7];
            backward_mask_q(act, &output, out_q, &mut err, err_q);
            assert_eq!(err, expect, "{act:?}");
        }
    }

    proptest! {
        /// The mask kept as bits zeroes exactly the errors the mask on the output zeroes.
        #[test]
        fn bit_mask_equals_the_mask_on_the_output(
            output in proptest::collection::vec(any::<i8>(), 0..80),
            errors in proptest::collection::vec(any::<i8>(), 80),
            scale in 0.001f32..0.2,
            zero_point in -128i32..=127,
            err_zero in -128i32..=127,
        ) {
            let out_q = QParams { scale, zero_point };
            let err_q = QParams { scale: 0.01, zero_point: err_zero };
            for act in ALL {
                let mut want = errors[..output.len()].to_vec();
                backward_mask_q(act, &output, out_q, &mut want, err_q);
                let mut mask = std::vec![0xFFu8; clamp_mask_bytes(output.len())];
                clamp_mask_q(act, &output, out_q, &mut mask);
                let mut got = errors[..output.len()].to_vec();
                backward_mask_bits_q(&mask, &mut got, err_q);
                prop_assert_eq!(&got, &want);
                let used = output.len() % 8;
                if used != 0 {
                    prop_assert_eq!(mask[mask.len() - 1] >> used, 0, "unused bits are 0");
                }
            }
        }

        #[test]
        fn forward_q_agrees_with_float_on_dequantized_codes(
            codes in proptest::collection::vec(any::<i8>(), 1..64),
            scale in 0.001f32..0.2,
            zero_point in -128i32..=127,
        ) {
            let q = QParams { scale, zero_point };
            for act in ALL {
                let mut out = std::vec![0i8; codes.len()];
                forward_q(act, &codes, q, &mut out);
                for (&c, &o) in codes.iter().zip(&out) {
                    let expect = reference(act, q.dequantize(c) as f64);
                    // The 6.0 bound is representable only up to half a step.
                    prop_assert!((q.dequantize(o) as f64 - expect).abs() <= 0.5 * scale as f64 + 1e-6);
                }
            }
        }
    }
}
