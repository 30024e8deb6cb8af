//! Flatten: `[c, h, w] -> [c * h * w, 1, 1]`. The output is the input's buffer read as a
//! vector, so a plan runs no step for it; the host engines copy. No kernel needs scratch.

use crate::ops::operator::{numel, FloatParams, Operator, QParameters, Shape};
use crate::quant::{QParams, QTensor, RealRange};

/// A flatten layer over `batch` samples of shape `shape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flatten {
    /// Per-sample input shape.
    pub shape: Shape,
    /// Samples.
    pub batch: usize,
}

/// The output is the input: same codes, same quantization, and the output error is the input
/// error.
impl Operator for Flatten {
    fn output_shape(&self) -> Shape {
        [numel(self.shape), 1, 1]
    }

    fn input_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn output_len(&self) -> usize {
        self.batch * numel(self.shape)
    }

    fn preserves_codes(&self) -> bool {
        true
    }

    fn aliases_input(&self) -> bool {
        true
    }

    fn forward(&self, x: &[f32], _skip: &[f32], _params: FloatParams, y: &mut [f32]) {
        y.copy_from_slice(x);
    }

    fn forward_q(
        &self,
        x: QTensor,
        _skip: QTensor,
        _params: QParameters,
        _y_q: QParams,
        y: &mut [i8],
    ) -> RealRange {
        y.copy_from_slice(x.codes);
        RealRange::EMPTY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::contract::check_float_backward_matches_finite_differences;

    /// Through the layer contract: the output error is the input error.
    #[test]
    fn layer_matches_finite_differences_through_the_contract() {
        let layer = Flatten {
            shape: [2, 3, 4],
            batch: 2,
        };
        let identity = |x: &[f64], _: &[f64], _: &[f64], _: &[f64]| x.to_vec();
        check_float_backward_matches_finite_differences(&layer, &identity, 3);
    }
}
