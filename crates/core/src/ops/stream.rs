//! Row-streamed forward of a chain of 8-bit convolutions: the intermediate tensors of the chain are
//! never stored whole, only a window of rows of each (MCUNetV2-style row-based execution, without
//! recomputation).
//!
//! A chain is `n` convolutions (batch 1) where stage `j + 1` reads the output of stage `j`, for
//! example an inverted residual block's expand 1x1 -> depthwise 3x3 -> project 1x1, or the stem of
//! a network and its first blocks. Only the chain's input and final output are whole tensors. Stage
//! `j` owns an input window of `kernel_h` rows of its input, `[in_channels][kernel_h][in_w]` codes
//! (see [`window_bytes`]): to compute its output row `r` it needs input rows `r*stride_h - pad_h
//! .. + kernel_h`, rows outside the input being the padding code `z_x` (real 0). A window advances
//! one row at a time (the rows shift up, the new row enters at the bottom) and pulls that row from
//! the previous stage, which computes it straight into the window; the first stage copies rows of
//! the chain input. Every row of every stage is computed exactly once, including rows that the next
//! stage skips, so each stage's range covers its whole output.
//!
//! Exactness: each output row of one channel is one call of
//! [`Conv2dGeom::forward_q`](WeightedKernels::forward_q) on a one-row geometry (`in_h = kernel_h`,
//! no vertical padding) over the window, with the layer's weights, bias and quantization. A
//! materialized padding row holds `z_x`, so its taps add `(z_x - z_x)(w - z_w) = 0`, exactly what
//! the whole-tensor kernel gets by skipping them; the `i32` sums are exact, so every code equals
//! the whole-layer kernel's. The range of a stage is the merge of the calls' ranges: the per-call
//! range is a monotone function of the accumulator extremes (a positive scale, then the activation
//! clamp), so the merge is the whole layer's range bit for bit.
//!
//! Memory: the chain input and output, and [`scratch_bytes`] of windows. Work: the layers' MACs
//! plus, per stage, copying `kernel_h - 1` rows of the window per row pushed.

use crate::ops::arith::QLayerParams;
use crate::ops::conv2d::Conv2dGeom;
use crate::ops::weighted::WeightedKernels;
use crate::ops::{OpError, WeightParts};
use crate::quant::RealRange;

/// Most convolutions in one streamed chain.
pub const MAX_STAGES: usize = 8;

/// One convolution of a chain: its full-size geometry (batch 1) and parameters.
#[derive(Clone, Copy, Debug)]
pub struct Stage<'a> {
    /// Geometry of the whole layer.
    pub geom: Conv2dGeom,
    /// Weights `[out_channels][in_channels / groups][kernel_h][kernel_w]`.
    pub weight: &'a [i8],
    /// `i32` bias, one per output channel.
    pub bias: &'a [i32],
    /// Quantization of input, weights (per tensor or per channel) and output, and the fused
    /// activation; `input` of stage `j + 1` is `output` of stage `j`.
    pub q: QLayerParams<'a>,
}

/// Bytes of the input window of a stage with geometry `g`: `in_channels * kernel_h * in_w`.
pub fn window_bytes(g: &Conv2dGeom) -> usize {
    g.in_channels * g.kernel_h * g.in_w
}

/// Scratch bytes of a streamed chain: the sum of its stages' [`window_bytes`].
pub fn scratch_bytes<'g>(geoms: impl IntoIterator<Item = &'g Conv2dGeom>) -> usize {
    geoms.into_iter().map(window_bytes).sum()
}

/// Checks that `geoms` form a chain: 1 to [`MAX_STAGES`] valid geometries of batch 1, each
/// stage's input shape the previous stage's output shape.
pub fn validate(geoms: &[Conv2dGeom]) -> Result<(), OpError> {
    if geoms.is_empty() || geoms.len() > MAX_STAGES {
        return Err(OpError::BadChain);
    }
    for g in geoms {
        g.validate()?;
        if g.batch != 1 {
            return Err(OpError::BadChain);
        }
    }
    for pair in geoms.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if (a.out_channels, a.out_h(), a.out_w()) != (b.in_channels, b.in_h, b.in_w) {
            return Err(OpError::BadChain);
        }
    }
    Ok(())
}

/// Row-streamed forward of the chain `stages` (validated by [`validate`]): `output` gets the last
/// stage's output and `ranges[j]` the real output range of stage `j`, both bit for bit what
/// [`Conv2dGeom::forward_q`](WeightedKernels::forward_q) gives layer by layer. `scratch` holds at
/// least [`scratch_bytes`]; its contents on return are unspecified.
pub fn forward_q(
    stages: &[Stage],
    input: &[i8],
    output: &mut [i8],
    scratch: &mut [i8],
    ranges: &mut [RealRange],
) {
    debug_assert!(!stages.is_empty() && stages.len() <= MAX_STAGES);
    debug_assert_eq!(ranges.len(), stages.len());
    debug_assert_eq!(input.len(), stages[0].geom.input_len());
    debug_assert_eq!(output.len(), stages[stages.len() - 1].geom.output_len());
    let mut chain = Chain {
        stages,
        input,
        pushed: [0; MAX_STAGES],
        next: [0; MAX_STAGES],
        window_at: [0; MAX_STAGES],
    };
    let mut at = 0;
    for (j, stage) in stages.iter().enumerate() {
        chain.window_at[j] = at;
        let len = window_bytes(&stage.geom);
        // Rows above the input: padding.
        scratch[at..at + len].fill(stage.q.input.zero_point as i8);
        at += len;
    }
    debug_assert!(scratch.len() >= at);
    for range in ranges.iter_mut() {
        *range = RealRange::EMPTY;
    }
    let last = stages.len() - 1;
    for _ in 0..stages[last].geom.out_h() {
        chain.compute_row(last, scratch, output, ranges);
    }
    // Rows no later stage needed still count in their stage's range.
    for j in (1..stages.len()).rev() {
        while chain.pushed[j] < stages[j].geom.in_h {
            chain.push(j, scratch, output, ranges);
        }
    }
}

/// Progress of a chain: window `j` holds input rows `pushed[j] - kernel_h .. pushed[j]` of
/// stage `j` (rows below 0 are padding), and `next[j]` is stage `j`'s next output row.
struct Chain<'s, 'a> {
    stages: &'s [Stage<'a>],
    input: &'s [i8],
    pushed: [usize; MAX_STAGES],
    next: [usize; MAX_STAGES],
    window_at: [usize; MAX_STAGES],
}

impl Chain<'_, '_> {
    /// Compute output row `next[j]` of stage `j`, into the bottom row of window `j + 1` (which
    /// the caller has just shifted) or, for the last stage, into `output`.
    fn compute_row(
        &mut self,
        j: usize,
        scratch: &mut [i8],
        output: &mut [i8],
        ranges: &mut [RealRange],
    ) {
        let stage = self.stages[j];
        let g = stage.geom;
        let row = self.next[j];
        let needed = (row * g.stride_h + g.kernel_h).saturating_sub(g.pad_h);
        while self.pushed[j] < needed {
            self.push(j, scratch, output, ranges);
        }
        let (c_in, c_out) = (g.in_channels / g.groups, g.out_channels / g.groups);
        let (k, w) = (g.kernel_h, g.in_w);
        let one_row = Conv2dGeom {
            batch: 1,
            in_channels: c_in,
            in_h: k,
            in_w: w,
            out_channels: 1,
            kernel_h: k,
            kernel_w: g.kernel_w,
            stride_h: 1,
            stride_w: g.stride_w,
            pad_h: 0,
            pad_w: g.pad_w,
            groups: 1,
        };
        let out_w = g.out_w();
        let taps = one_row.weight_len();
        let is_last = j + 1 == self.stages.len();
        let (before, after) = if is_last {
            (&mut scratch[..], &mut [][..])
        } else {
            scratch.split_at_mut(self.window_at[j + 1])
        };
        let window = &before[self.window_at[j]..][..window_bytes(&g)];
        let next_k = if is_last {
            1
        } else {
            self.stages[j + 1].geom.kernel_h
        };
        for c in 0..g.out_channels {
            let x = &window[c / c_out * c_in * k * w..][..c_in * k * w];
            let weight_q = if stage.q.weight.len() == 1 {
                stage.q.weight
            } else {
                &stage.q.weight[c..c + 1]
            };
            let q = QLayerParams {
                weight: weight_q,
                ..stage.q
            };
            let y = if is_last {
                &mut output[(c * g.out_h() + row) * out_w..][..out_w]
            } else {
                &mut after[(c * next_k + next_k - 1) * out_w..][..out_w]
            };
            let weight = &stage.weight[c * taps..][..taps];
            let weight = WeightParts::whole(weight);
            let range = one_row.forward_q(x, weight, &stage.bias[c..c + 1], &q, y);
            ranges[j] = ranges[j].merge(range);
        }
        self.next[j] += 1;
    }

    /// Advance window `j` by one row: shift its rows up and bring in input row `pushed[j]`
    /// (copied from the chain input, computed by stage `j - 1`, or padding below the input).
    fn push(&mut self, j: usize, scratch: &mut [i8], output: &mut [i8], ranges: &mut [RealRange]) {
        let g = self.stages[j].geom;
        let (k, w) = (g.kernel_h, g.in_w);
        let at = self.window_at[j];
        for c in 0..g.in_channels {
            let rows = at + c * k * w;
            scratch.copy_within(rows + w..rows + k * w, rows);
        }
        let row = self.pushed[j];
        if row >= g.in_h {
            let pad = self.stages[j].q.input.zero_point as i8;
            for c in 0..g.in_channels {
                scratch[at + (c * k + k - 1) * w..][..w].fill(pad);
            }
        } else if j == 0 {
            for c in 0..g.in_channels {
                let source = &self.input[(c * g.in_h + row) * w..][..w];
                scratch[at + (c * k + k - 1) * w..][..w].copy_from_slice(source);
            }
        } else {
            debug_assert_eq!(self.next[j - 1], row);
            self.compute_row(j - 1, scratch, output, ranges);
        }
        self.pushed[j] += 1;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::ops::activation::Activation;
    use crate::quant::QParams;
    use crate::rng::Rng;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// One random stage kind over an input of `channels` channels: (kernel, stride, pad,
    /// groups, out channels).
    fn stage_geom(
        choice: (u8, u8, u8, usize),
        in_shape: (usize, usize, usize),
    ) -> Option<Conv2dGeom> {
        let (kind, stride, pad, out) = choice;
        let (c, h, w) = in_shape;
        let stride = 1 + stride as usize % 2;
        let (kernel, pad, groups, out_channels) = match kind % 4 {
            // Pointwise.
            0 => (1, 0, 1, out),
            // Depthwise 3x3, the fast path.
            1 => (3, 1, c, c),
            // A standard convolution of any small kernel and padding.
            2 => (1 + pad as usize % 3, pad as usize % 3, 1, out),
            // Grouped.
            _ if c % 2 == 0 => (3, pad as usize % 2, 2, 2 * out),
            _ => (2, 0, 1, out),
        };
        let g = Conv2dGeom::square(1, c, h, w, out_channels, kernel, stride, pad, groups);
        g.validate().ok().map(|_| g)
    }

    fn random_q(rng: &mut Rng) -> QParams {
        QParams {
            scale: 0.01 + 0.05 * rng.next_f32(),
            zero_point: rng.below(201) as i32 - 100,
        }
    }

    fn codes(rng: &mut Rng, len: usize) -> Vec<i8> {
        (0..len)
            .map(|_| (rng.below(256) as i32 - 128) as i8)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Streamed output and every stage's range equal the layer-by-layer kernel's, bit for
        /// bit, on random chains of pointwise, depthwise, standard and grouped convolutions.
        #[test]
        fn streamed_chains_match_layer_by_layer(
            c in 1usize..5, h in 1usize..12, w in 1usize..12,
            choices in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), 1usize..5), 1..6),
            per_channel in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut rng = Rng::new(seed);
            let mut geoms = Vec::new();
            let mut shape = (c, h, w);
            for &choice in &choices {
                if let Some(g) = stage_geom(choice, shape) {
                    shape = (g.out_channels, g.out_h(), g.out_w());
                    geoms.push(g);
                }
            }
            prop_assume!(!geoms.is_empty());
            prop_assert_eq!(validate(&geoms), Ok(()));
            let mut qs = vec![random_q(&mut rng)];
            let mut weights = Vec::new();
            let mut weight_qs = Vec::new();
            let mut biases = Vec::new();
            let mut acts = Vec::new();
            for g in &geoms {
                qs.push(random_q(&mut rng));
                weights.push(codes(&mut rng, g.weight_len()));
                let count = if per_channel { g.out_channels } else { 1 };
                weight_qs.push((0..count).map(|_| random_q(&mut rng)).collect::<Vec<_>>());
                biases.push((0..g.out_channels).map(|_| rng.below(4001) as i32 - 2000).collect::<Vec<_>>());
                acts.push([Activation::None, Activation::Relu, Activation::Relu6][rng.below(3) as usize]);
            }
            let stages: Vec<Stage> = geoms.iter().enumerate().map(|(j, g)| Stage {
                geom: *g,
                weight: &weights[j],
                bias: &biases[j],
                q: QLayerParams {
                    input: qs[j],
                    weight: &weight_qs[j],
                    bias_scale: qs[j].scale * weight_qs[j][0].scale * 0.5,
                    output: qs[j + 1],
                    activation: acts[j],
                },
            }).collect();
            let input = codes(&mut rng, geoms[0].input_len());
            let mut tensor = input.clone();
            let mut want = Vec::new();
            for stage in &stages {
                let mut y = vec![0i8; stage.geom.output_len()];
                want.push(stage.geom.forward_q(&tensor, WeightParts::whole(stage.weight), stage.bias, &stage.q, &mut y));
                tensor = y;
            }
            let mut output = vec![0i8; tensor.len()];
            let mut scratch = vec![0x55i8; scratch_bytes(&geoms)];
            let mut ranges = vec![RealRange { min: 1.0, max: 2.0 }; stages.len()];
            forward_q(&stages, &input, &mut output, &mut scratch, &mut ranges);
            prop_assert_eq!(&output, &tensor);
            let bits = |r: &[RealRange]| r.iter().map(|r| (r.min.to_bits(), r.max.to_bits())).collect::<Vec<_>>();
            prop_assert_eq!(bits(&ranges), bits(&want));
        }
    }

    #[test]
    fn windows_are_kernel_rows_of_the_input() {
        let g = |c, hw, kernel, stride, pad, out, groups| {
            Conv2dGeom::square(1, c, hw, hw, out, kernel, stride, pad, groups)
        };
        // mbv2-w035-r128's block2: expand 8 -> 48 at 64x64, depthwise stride 2, project.
        let expand = g(8, 64, 1, 1, 0, 48, 1);
        let depthwise = g(48, 64, 3, 2, 1, 48, 48);
        let project = g(48, 32, 1, 1, 0, 8, 1);
        let chain = [expand, depthwise, project];
        assert_eq!(validate(&chain), Ok(()));
        assert_eq!(scratch_bytes(&chain), 8 * 64 + 48 * 3 * 64 + 48 * 32);
        assert_eq!(validate(&[expand, project]), Err(OpError::BadChain));
        assert_eq!(validate(&[]), Err(OpError::BadChain));
        let same = g(8, 4, 1, 1, 0, 8, 1);
        assert_eq!(validate(&[same; MAX_STAGES]), Ok(()));
        assert_eq!(validate(&[same; MAX_STAGES + 1]), Err(OpError::BadChain));
    }
}
