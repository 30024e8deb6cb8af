//! The float32 steps of the plan executor: the kernels that [`SampleRun::step`] calls for a
//! float32 plan. The step walk, the batch bookkeeping, the learning rate, loading the input
//! and the operand resolution (arena spans, frozen parameters in flash, disjoint borrows) are
//! the parent module's.
//!
//! Each step calls the float kernel of its layer's operator ([`crate::layer::Operator`]) that
//! the host float engine (`engine::float` of the `mcutrain` crate) calls for one sample, at
//! batch-1 geometry and with the same operands, so both get the same bits:
//! - forward: the operator's forward (the fused activation clamp included);
//! - loss: `softmax_cross_entropy` of the sample, `e = softmax(l) - onehot(label)`;
//! - mask: `e = 0` where the output sits at a ReLU/ReLU6 bound ([`activation::backward`]);
//! - input error, error sums: the operator's input-error kernel, `e = e_1 + e_2`;
//! - gradients: `g += kernel's batch-1 sum` (`g` zeroed at the start of each batch; at batch 1
//!   before every sample), so a batch's gradient is `((0 + g_0) + g_1) + ...` in sample order;
//! - updates (last sample of a batch): [`update::sgd`] with the arena's learning rate, the
//!   plan's momentum and `grad_scale = 1 / B`, `B` the samples of the batch (the plan's batch
//!   size, fewer in a shorter last batch): `v = m v + g / B`, `p -= lr v` (with a velocity
//!   tensor), `p -= lr (g / B)` without one (momentum 0).
//!
//! Memory: nothing beyond the planned tensors (`4 * numel` bytes per activation and error,
//! `4 *` parameters per trained weight, gradient and velocity) and the 8-byte state header.

use super::state::{read_f32, samples_this_batch, LEARNING_RATE_AT};
use super::{arena_span, mask_operands, two_reads_one_write, SampleRun};
use crate::layer::FloatParams;
use crate::ops::{activation, add, loss, ChannelSet};
use crate::plan::operands::{layer_step, Operand};
use crate::plan::typed::{split_disjoint, words, words_mut, Span};
use crate::plan::{PlanView, StepOp, StepRecord, NONE};
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
                let clamp = view.resolve(i)?.op().output_clamp()?;
                let bytes = view.numel(i + 1)? * 4;
                let [output, masked] = mask_operands(view, step, tensors, bytes, bytes)?;
                activation::backward(clamp, words::<f32>(output)?, words_mut::<f32>(masked)?);
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

    /// Forward of one layer at batch 1 through its operator.
    fn float_forward(&self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let resolved = view.resolve(i)?;
        let op = resolved.op();
        let operands = layer_step(StepOp::Forward, op, view.training(i)?)?;
        let x = floats(view, step.reads[0], op.input_len())?;
        let y = floats(view, step.writes[0], op.output_len())?;
        let skip = match operands.read_at(Operand::Skip) {
            Some(at) => floats(view, step.read(at), op.output_len())?,
            None => Span::EMPTY,
        };
        let (weight, bias) = match resolved.params() {
            Some(p) => (
                Some(self.weights(&layer, p.channels, p.structure)?.0),
                Some(self.param(layer.bias_tensor, p.channels * 4)?),
            ),
            None => (None, None),
        };
        let span = |source: Option<super::Source>| source.map_or(Span::EMPTY, |s| s.span());
        // An add may read one tensor by both paths.
        let same = skip == x && skip != Span::EMPTY;
        let spans = [
            x,
            if same { Span::EMPTY } else { skip },
            span(weight),
            span(bias),
            y,
        ];
        let [x, skip, w, b, y] = split_disjoint(tensors, spans)?;
        let x: &[u8] = x;
        let skip: &[u8] = if same { x } else { skip };
        let params = FloatParams {
            weight: weight.map_or(Some(&[][..]), |s| words(s.bytes(w)))?,
            bias: bias.map_or(Some(&[][..]), |s| words(s.bytes(b)))?,
        };
        op.forward(words(x)?, words(skip)?, params, words_mut(y)?);
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
        let resolved = view.resolve(i)?;
        let op = resolved.op();
        let kernel = op.input_error()?;
        let operands = layer_step(StepOp::InputError, op, view.training(i)?)?;
        let part = floats(view, step.writes[0], op.input_len())?;
        let error_at = operands.read_at(Operand::OutputError)?;
        let error = floats(view, step.read(error_at), op.output_len())?;
        let x = match operands.read_at(Operand::Input) {
            Some(at) => floats(view, step.read(at), op.input_len())?,
            None => Span::EMPTY,
        };
        let weight = match resolved.params() {
            Some(p) => Some(self.weights(&layer, p.channels, p.structure)?.0),
            None => None,
        };
        let w_span = weight.map_or(Span::EMPTY, |s| s.span());
        let [w, x, e, p] = split_disjoint(tensors, [w_span, x, error, part])?;
        let w = weight.map_or(Some(&[][..]), |s| words(s.bytes(w)))?;
        kernel.input_backward(words(x)?, w, words(e)?, ChannelSet::All, words_mut(p)?);
        Some(())
    }

    /// Weight or bias gradient of layer `i` added into its gradient tensor (zeroed first at
    /// batch 1; at batch > 1 the batch start zeroed it).
    fn float_gradient(&self, step: &StepRecord, tensors: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let resolved = view.resolve(i)?;
        let op = resolved.op();
        let params = resolved.params()?;
        let is_weight = step.op == StepOp::WeightGrad;
        let operands = layer_step(step.op, op, view.training(i)?)?;
        let error_at = operands.read_at(Operand::OutputError)?;
        let error = floats(view, step.read(error_at), op.output_len())?;
        let (input, grad_len) = match operands.read_at(Operand::Input) {
            Some(at) => (
                floats(view, step.read(at), op.input_len())?,
                params.weight_len(),
            ),
            None => (Span::EMPTY, params.channels),
        };
        let grad = floats(view, step.writes[0], grad_len)?;
        let [x, e, grad] = split_disjoint(tensors, [input, error, grad])?;
        let (x, e, grad) = (words::<f32>(x)?, words::<f32>(e)?, words_mut::<f32>(grad)?);
        if view.header().batch == 1 {
            grad.fill(0.0);
        }
        let kernels = op.parametric()?;
        if is_weight {
            kernels.weight_backward(x, e, ChannelSet::All, grad);
        } else {
            kernels.bias_backward(e, ChannelSet::All, grad);
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
        let params = view.resolve(step.layer as usize)?.params()?;
        let len = if step.op == StepOp::WeightUpdate {
            params.weight_len()
        } else {
            params.channels
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
