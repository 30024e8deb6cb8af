//! The float32 steps of the plan executor: the kernels that [`SampleRun::step`] calls for a
//! float32 plan. The step walk, the batch bookkeeping, the learning rate, loading the input
//! and the operand resolution (arena spans, frozen parameters in flash, disjoint borrows) are
//! the int8 executor's (see the parent module).
//!
//! Each step calls the float kernel the host float engine (`engine::float` of the `mcutrain`
//! crate) calls for one sample, at batch-1 geometry and with the same operands, so both get the
//! same bits:
//! - forward: `conv2d::forward` / `linear::forward` then the fused activation clamp
//!   ([`activation::forward_in_place`]), the pooling, add and activation forwards;
//! - loss: `softmax_cross_entropy` of the sample, `e = softmax(l) - onehot(label)`;
//! - mask: `e = 0` where the output sits at a ReLU/ReLU6 bound ([`activation::backward`]);
//! - input error, error sums: the float backward kernels, `e = e_1 + e_2`;
//! - gradients: `g += kernel's batch-1 sum` (`g` zeroed at the start of each batch; at batch 1
//!   before every sample), so a batch's gradient is `((0 + g_0) + g_1) + ...` in sample order;
//! - updates (last sample of a batch): [`update::sgd`] with the arena's learning rate, the
//!   plan's momentum and `grad_scale = 1 / B`, `B` the samples of the batch (the plan's batch
//!   size, fewer in a shorter last batch): `v = m v + g / B`, `p -= lr v` (with a velocity
//!   tensor), `p -= lr (g / B)` without one (momentum 0).
//!
//! Memory: nothing beyond the planned tensors (`4 * numel` bytes per activation and error,
//! `4 *` parameters per trained weight, gradient and velocity) and the 8-byte state header.

use super::read_f32;
use super::{
    arena_span, mask_operands, samples_this_batch, two_reads_one_write, SampleRun, LEARNING_RATE_AT,
};
use crate::ops::{activation, add, conv2d, linear, loss, pool, ChannelSet};
use crate::plan::typed::{split_disjoint, words, words_mut, Span};
use crate::plan::{Geometry, LayerKind, PlanView, StepOp, StepRecord, NONE};
use crate::update;

/// The arena span of the first `count` `f32` values of tensor `id` (empty for [`NONE`]).
fn floats(view: &PlanView, id: u16, count: usize) -> Option<Span> {
    if id == NONE {
        return Some(Span::EMPTY);
    }
    arena_span(&view.tensor(id)?, count * 4).ok()
}

impl SampleRun<'_, '_, '_> {
    /// Run one step of a float32 plan other than loading the input; `None` for a plan
    /// inconsistency.
    pub(super) fn run_float(
        &mut self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<()> {
        match step.op {
            // Loaded by the shared step walk; streamed chains and clamp masks are int8 only
            // (validation refuses them in float32 plans).
            StepOp::LoadInput | StepOp::StreamedForward | StepOp::ClampMask => None,
            StepOp::Forward => self.float_forward(step, tensors),
            StepOp::Loss => self.float_loss(step, tensors),
            StepOp::ActivationMask => {
                let view = self.view;
                let i = step.layer as usize;
                let bytes = view.numel(i + 1)? * 4;
                let [output, masked] = mask_operands(view, step, tensors, bytes, bytes)?;
                let act = view.layer(i)?.activation;
                activation::backward(act, words::<f32>(output)?, words_mut::<f32>(masked)?);
                Some(())
            }
            StepOp::InputError => self.float_input_error(step, tensors),
            StepOp::AccumulateError => {
                let view = self.view;
                let len = view.tensor(step.writes[0])?.bytes as usize / 4;
                let (a, b, sum) = two_reads_one_write(
                    tensors,
                    floats(view, step.reads[0], len)?,
                    floats(view, step.reads[1], len)?,
                    floats(view, step.writes[0], len)?,
                )?;
                add::forward(words(a)?, words(b)?, words_mut(sum)?);
                Some(())
            }
            StepOp::WeightGrad | StepOp::BiasGrad => self.float_gradient(step, tensors),
            StepOp::WeightUpdate | StepOp::BiasUpdate => {
                let lr = read_f32(state, LEARNING_RATE_AT)?;
                self.float_update(step, tensors, lr, samples_this_batch(state)?)
            }
        }
    }

    /// Forward of one layer at batch 1; a convolution or fully connected layer clamps its
    /// output to its fused activation.
    fn float_forward(&self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let geometry = view.geometry(i)?;
        let x = floats(view, step.reads[0], view.numel(i)?)?;
        let y = floats(view, step.writes[0], view.numel(i + 1)?)?;
        if let Some((channels, structure)) = geometry.params() {
            let weight = self.param(step.reads[1], channels * structure * 4)?;
            let bias = self.param(step.reads[2], channels * 4)?;
            let [x, w, b, y] = split_disjoint(tensors, [x, weight.span(), bias.span(), y])?;
            let (x, y) = (words::<f32>(x)?, words_mut::<f32>(y)?);
            let (w, b) = (words(weight.bytes(w))?, words(bias.bytes(b))?);
            match geometry {
                Geometry::Conv(g) => conv2d::forward(&g, x, w, b, y),
                Geometry::Linear(g) => linear::forward(&g, x, w, b, y),
                _ => return None,
            }
            activation::forward_in_place(layer.activation, y);
            return Some(());
        }
        if layer.kind == LayerKind::Add {
            let skip = floats(view, step.reads[1], view.numel(i + 1)?)?;
            let (x, skip, y) = two_reads_one_write(tensors, x, skip, y)?;
            add::forward(words(x)?, words(skip)?, words_mut(y)?);
            return Some(());
        }
        let [x, y] = split_disjoint(tensors, [x, y])?;
        let (x, y) = (words::<f32>(x)?, words_mut::<f32>(y)?);
        match (layer.kind, geometry) {
            (LayerKind::Activation, _) => activation::forward(layer.activation, x, y),
            (LayerKind::AvgPool, Geometry::Pool(g)) => pool::avg_forward(&g, x, y),
            (LayerKind::MaxPool, Geometry::Pool(g)) => pool::max_forward(&g, x, y),
            (LayerKind::GlobalAvgPool, Geometry::GlobalPool(g)) => {
                pool::global_avg_forward(&g, x, y)
            }
            _ => return None,
        }
        Some(())
    }

    /// Softmax cross-entropy of the sample's logits: the loss, and the logits error
    /// `softmax(l) - onehot(label)`.
    fn float_loss(&mut self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let classes = view.header().classes as usize;
        let logits = floats(view, step.reads[0], classes)?;
        let err = floats(view, step.writes[0], classes)?;
        let [logits, err] = split_disjoint(tensors, [logits, err])?;
        let labels = [self.label];
        self.loss = loss::softmax_cross_entropy(words(logits)?, &labels, classes, words_mut(err)?);
        Some(())
    }

    /// Input error of layer `i` from its (masked) output error, over every channel.
    fn float_input_error(&self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let geometry = view.geometry(i)?;
        let (in_len, out_len) = (view.numel(i)?, view.numel(i + 1)?);
        let part = floats(view, step.writes[0], in_len)?;
        let reads_input = layer.kind == LayerKind::MaxPool || geometry.params().is_some();
        let error = floats(view, step.reads[usize::from(reads_input)], out_len)?;
        if let Some((channels, structure)) = geometry.params() {
            let weight = self.param(step.reads[0], channels * structure * 4)?;
            let [w, e, p] = split_disjoint(tensors, [weight.span(), error, part])?;
            let (w, e, p) = (words(weight.bytes(w))?, words(e)?, words_mut(p)?);
            match geometry {
                Geometry::Conv(g) => conv2d::input_backward(&g, w, e, ChannelSet::All, p),
                Geometry::Linear(g) => linear::input_backward(&g, w, e, ChannelSet::All, p),
                _ => return None,
            }
            return Some(());
        }
        let x = if layer.kind == LayerKind::MaxPool {
            floats(view, step.reads[0], in_len)?
        } else {
            Span::EMPTY
        };
        let [x, e, p] = split_disjoint(tensors, [x, error, part])?;
        let (x, e, p) = (words::<f32>(x)?, words::<f32>(e)?, words_mut::<f32>(p)?);
        match (layer.kind, geometry) {
            (LayerKind::MaxPool, Geometry::Pool(g)) => pool::max_input_backward(&g, x, e, p),
            (LayerKind::AvgPool, Geometry::Pool(g)) => pool::avg_input_backward(&g, e, p),
            (LayerKind::GlobalAvgPool, Geometry::GlobalPool(g)) => {
                pool::global_avg_input_backward(&g, e, p)
            }
            _ => return None,
        }
        Some(())
    }

    /// Weight or bias gradient of layer `i` added into its gradient tensor (zeroed first at
    /// batch 1; at batch > 1 the batch start zeroed it).
    fn float_gradient(&self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let geometry = view.geometry(i)?;
        let (channels, structure) = geometry.params()?;
        let is_weight = step.op == StepOp::WeightGrad;
        let out_len = view.numel(i + 1)?;
        let error = floats(view, step.reads[usize::from(is_weight)], out_len)?;
        let (input, grad_len) = if is_weight {
            let input = floats(view, step.reads[0], view.numel(i)?)?;
            (input, channels * structure)
        } else {
            (Span::EMPTY, channels)
        };
        let grad = floats(view, step.writes[0], grad_len)?;
        let [x, e, grad] = split_disjoint(tensors, [input, error, grad])?;
        let (x, e, grad) = (words::<f32>(x)?, words::<f32>(e)?, words_mut::<f32>(grad)?);
        if view.header().batch == 1 {
            grad.fill(0.0);
        }
        match (geometry, is_weight) {
            (Geometry::Conv(g), true) => conv2d::weight_backward(&g, x, e, ChannelSet::All, grad),
            (Geometry::Linear(g), true) => linear::weight_backward(&g, x, e, ChannelSet::All, grad),
            (Geometry::Conv(g), false) => conv2d::bias_backward(&g, e, ChannelSet::All, grad),
            (Geometry::Linear(g), false) => linear::bias_backward(&g, e, ChannelSet::All, grad),
            _ => return None,
        }
        Some(())
    }

    /// SGD of a layer's weights or bias from the gradient of the `batch` samples of the batch
    /// ([`update::sgd`], `grad_scale = 1 / batch`), with the velocity tensor the plan has for
    /// momentum.
    fn float_update(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        lr: f32,
        batch: f32,
    ) -> Option<()> {
        let view = self.view;
        let (channels, structure) = view.geometry(step.layer as usize)?.params()?;
        let len = if step.op == StepOp::WeightUpdate {
            channels * structure
        } else {
            channels
        };
        let spans = [step.reads[0], step.reads[1], step.reads[2]].map(|id| floats(view, id, len));
        let [grad, param, velocity] = split_disjoint(tensors, [spans[0]?, spans[1]?, spans[2]?])?;
        let header = view.header();
        update::sgd(
            words_mut::<f32>(param)?,
            words::<f32>(grad)?,
            words_mut::<f32>(velocity)?,
            lr,
            header.config.momentum,
            1.0 / batch,
        );
        Some(())
    }
}
