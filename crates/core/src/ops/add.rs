//! Element-wise addition of two tensors of the same shape (residual connections), float and
//! 8-bit. The quantized form also sums two quantized error tensors where a tensor feeds two
//! consumers. No function here needs scratch memory.

use crate::ops::operator::{numel, FloatParams, Operator, QParameters, Shape};
use crate::quant::{QParams, QTensor, RealRange, Requant, Q_MAX, Q_MIN};

/// Left shift applied to both zero-centred inputs before rescaling, so that rescaling them to
/// a common scale keeps 20 fractional bits (TFLite's `left_shift`).
const ADD_LEFT_SHIFT: i32 = 20;

/// `out[i] = a[i] + b[i]`. Scratch: none.
pub fn forward(a: &[f32], b: &[f32], out: &mut [f32]) {
    debug_assert_eq!(a.len(), b.len());
    debug_assert_eq!(a.len(), out.len());
    for ((y, &x1), &x2) in out.iter_mut().zip(a).zip(b) {
        *y = x1 + x2;
    }
}

/// Quantized addition, `y = z_y + round((s_a/s_y)(a - z_a) + (s_b/s_y)(b - z_b))`, in integers
/// the TFLite way so host and MCU agree bit for bit. With `s_2 = 2 * max(s_a, s_b)`:
/// - `a' = R_a((a - z_a) << 20)` with `R_a` the [`Requant`] of `s_a / s_2` (at most 1/2),
///   likewise `b'` with `s_b / s_2`; 20 fractional bits keep the rounding error of each
///   rescaled input below `2^-20` of a step, and `|a'| + |b'| < 2^28` cannot overflow;
/// - `y = clamp(z_y + R_y(a' + b'), -128, 127)` with `R_y` the [`Requant`] of
///   `s_2 / (2^20 * s_y)`.
///
/// The three multipliers are computed once per call. Returns the real range of the sum,
/// `(a' + b') * s_2 / 2^20`, before saturation. Scratch: none.
pub fn forward_q(
    a: &[i8],
    a_q: QParams,
    b: &[i8],
    b_q: QParams,
    out_q: QParams,
    out: &mut [i8],
) -> RealRange {
    debug_assert_eq!(a.len(), b.len());
    debug_assert_eq!(a.len(), out.len());
    let twice_max_scale = 2.0 * (a_q.scale.max(b_q.scale) as f64);
    let shift_scale = (1i64 << ADD_LEFT_SHIFT) as f64;
    let rescale_a = Requant::from_real(a_q.scale as f64 / twice_max_scale);
    let rescale_b = Requant::from_real(b_q.scale as f64 / twice_max_scale);
    let rescale_out = Requant::from_real(twice_max_scale / (shift_scale * out_q.scale as f64));
    let (mut sum_min, mut sum_max) = (i32::MAX, i32::MIN);
    for ((y, &qa), &qb) in out.iter_mut().zip(a).zip(b) {
        let sa = rescale_a.apply((qa as i32 - a_q.zero_point) << ADD_LEFT_SHIFT);
        let sb = rescale_b.apply((qb as i32 - b_q.zero_point) << ADD_LEFT_SHIFT);
        let sum = sa + sb;
        sum_min = sum_min.min(sum);
        sum_max = sum_max.max(sum);
        *y = rescale_out
            .apply(sum)
            .saturating_add(out_q.zero_point)
            .clamp(Q_MIN, Q_MAX) as i8;
    }
    if out.is_empty() {
        return RealRange::EMPTY;
    }
    let sum_scale = (twice_max_scale / shift_scale) as f32;
    RealRange {
        min: sum_min as f32 * sum_scale,
        max: sum_max as f32 * sum_scale,
    }
}

/// A residual addition over `batch` samples of shape `shape`: the previous tensor plus the
/// output of layer `skip_from`. The backward pass gives both inputs the output error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddLayer {
    /// The earlier layer whose output is added.
    pub skip_from: usize,
    /// Per-sample shape of both inputs and the output.
    pub shape: Shape,
    /// Samples.
    pub batch: usize,
}

impl Operator for AddLayer {
    fn output_shape(&self) -> Shape {
        self.shape
    }

    fn input_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn output_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn skip_from(&self) -> Option<usize> {
        Some(self.skip_from)
    }

    fn forward(&self, x: &[f32], skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        forward(x, skip, y);
    }

    fn forward_q(
        &self,
        x: QTensor,
        skip: QTensor,
        _params: QParameters,
        y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        forward_q(x.codes, x.q, skip.codes, skip.q, y_q, y)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ops::contract::check_float_backward_matches_finite_differences;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn params() -> impl Strategy<Value = QParams> {
        (1e-3f32..0.5, -128i32..=127).prop_map(|(scale, zero_point)| QParams { scale, zero_point })
    }

    #[test]
    fn float_forward() {
        let mut y = [0.0f32; 3];
        forward(&[1.0, -2.0, 0.5], &[0.25, 2.0, -1.5], &mut y);
        assert_eq!(y, [1.25, 0.0, -1.0]);
    }

    /// Through the layer contract: both inputs get the output error.
    #[test]
    fn layer_matches_finite_differences_through_the_contract() {
        let layer = AddLayer {
            skip_from: 0,
            shape: [2, 3, 4],
            batch: 2,
        };
        let sum = |x: &[f64], skip: &[f64], _: &[f64], _: &[f64]| -> Vec<f64> {
            x.iter().zip(skip).map(|(a, b)| a + b).collect()
        };
        check_float_backward_matches_finite_differences(&layer, &sum, 5);
    }

    #[test]
    fn adding_real_zero_keeps_codes() {
        let q = QParams {
            scale: 0.037,
            zero_point: -11,
        };
        let zero_q = QParams {
            scale: 0.01,
            zero_point: 4,
        };
        let a: Vec<i8> = (-128..=127).map(|v| v as i8).collect();
        let b = std::vec![4i8; a.len()];
        let mut y = std::vec![0i8; a.len()];
        let range = forward_q(&a, q, &b, zero_q, q, &mut y);
        assert_eq!(y, a);
        assert_eq!(range.min, q.dequantize(-128));
        assert_eq!(range.max, q.dequantize(127));
    }

    #[test]
    fn hand_computed_sum() {
        // 0.5 * (10 - 0) + 0.25 * (-4 - 2) = 3.5 -> 0.1 steps: 35 + z_y(-5) = 30.
        let a_q = QParams {
            scale: 0.5,
            zero_point: 0,
        };
        let b_q = QParams {
            scale: 0.25,
            zero_point: 2,
        };
        let out_q = QParams {
            scale: 0.1,
            zero_point: -5,
        };
        let mut y = [0i8; 1];
        let range = forward_q(&[10], a_q, &[-4], b_q, out_q, &mut y);
        assert_eq!(y, [30]);
        assert_eq!((range.min, range.max), (3.5, 3.5));
    }

    proptest! {
        #[test]
        fn forward_q_within_one_code_of_f64_reference(
            a_q in params(),
            b_q in params(),
            out_q in params(),
            pairs in proptest::collection::vec((any::<i8>(), any::<i8>()), 1..64),
        ) {
            let a: Vec<i8> = pairs.iter().map(|p| p.0).collect();
            let b: Vec<i8> = pairs.iter().map(|p| p.1).collect();
            let mut y = std::vec![0i8; a.len()];
            let range = forward_q(&a, a_q, &b, b_q, out_q, &mut y);
            let mut real_range = RealRange::EMPTY;
            for i in 0..a.len() {
                let real = a_q.scale as f64 * (a[i] as i32 - a_q.zero_point) as f64
                    + b_q.scale as f64 * (b[i] as i32 - b_q.zero_point) as f64;
                real_range.include(real as f32);
                let expect = (out_q.zero_point as f64 + (real / out_q.scale as f64 + 0.5).floor())
                    .clamp(-128.0, 127.0);
                prop_assert!((y[i] as f64 - expect).abs() <= 1.0, "{} vs {}", y[i], expect);
            }
            let tol = 1e-5 * (1.0 + real_range.max.abs().max(real_range.min.abs()));
            prop_assert!((range.min - real_range.min).abs() <= tol);
            prop_assert!((range.max - real_range.max).abs() <= tol);
        }
    }
}
