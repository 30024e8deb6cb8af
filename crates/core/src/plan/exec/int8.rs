//! The int8 steps of the plan executor: fully quantized training of one sample (see the parent
//! module for the scheme). Every kernel is the layer's own ([`crate::layer::Operator`]),
//! called with the same quantization parameters as the host twin's (`engine::fqt` of the
//! `mcutrain` crate), so both hold the same bits after the same samples.

use super::state::{
    merge_seen, read_f32, read_qparams, samples_this_batch, selection_span, touched_span, tracker,
    write_qparams, LayerState, Track, LEARNING_RATE_AT,
};
use super::{
    arena_span, mask_operands, trains_channel_subset, two_reads_one_write, Mode, SampleRun, Source,
};
use crate::layer::{Layer, QParameters, QWeights};
use crate::ops::{activation, loss, stream, ChannelSet, WeightParts};
use crate::plan::operands::{layer_step, Operand};
use crate::plan::typed::{
    codes, codes_mut, grad_stats_mut, split_disjoint, words, words_mut, zero_grad_stats_padding,
    Span,
};
use crate::plan::{
    error_q_at, ErrorRanges, LayerRecord, PartialUpdate, StepOp, StepRecord, TensorRecord,
    TensorRole, LOSS_QUANT,
};
use crate::quant::{
    error_unit, quantize_error, scale_range, QParams, QTensor, RealRange, WrittenError,
};
use crate::update::{self, FqtUpdateConfig};

use super::ExecError;

/// Where a layer's 8-bit parameters are, and its current weight quantization.
#[derive(Clone, Copy)]
struct ParamSources<'p> {
    /// The weights: whole, or the trained channels of a strict subset.
    weight: Source<'p>,
    /// The frozen channels of such a subset, in the plan (empty otherwise).
    frozen: &'p [u8],
    /// The bias.
    bias: Source<'p>,
    /// Current weight quantization.
    weight_q: QParams,
}

impl<'p> SampleRun<'_, 'p, '_> {
    /// Run one step of an int8 plan other than loading the input; `None` for a plan
    /// inconsistency, `Some(Err)` for an executor error.
    pub(super) fn run_int8(
        &mut self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<Result<(), ExecError>> {
        match step.op {
            StepOp::LoadInput => return None, // the shared step walk loads the input
            StepOp::Forward => self.forward(step, tensors, state)?,
            StepOp::StreamedForward => self.streamed_forward(step, tensors, state)?,
            StepOp::ClampMask => self.clamp_mask(step, tensors, state)?,
            StepOp::Loss => self.loss(step, tensors, state)?,
            StepOp::ActivationMask => self.mask(step, tensors, state)?,
            StepOp::InputError => self.input_error(step, tensors, state)?,
            StepOp::AccumulateError => self.accumulate_error(step, tensors, state)?,
            StepOp::WeightGrad | StepOp::BiasGrad => self.gradient(step, tensors, state)?,
            StepOp::WeightUpdate => return self.weight_update(step, tensors, state),
            StepOp::BiasUpdate => self.bias_update(step, tensors, state)?,
        }
        Some(Ok(()))
    }

    /// Quantization of the activation of model tensor `t`.
    fn activation_q(&self, state: &[u8], t: usize) -> Option<QParams> {
        Some(tracker(state, self.view.range_owner(t), Track::Activation)?.qparams())
    }

    /// Quantization of an error tensor: the sample's loss range for the logits error; else,
    /// with exact error ranges, the one it was written with ([`Self::keep_error`]), with
    /// tracked ones [`Self::tracked_error_q`].
    fn error_q(&self, state: &[u8], tensor: &TensorRecord) -> Option<QParams> {
        if tensor.quant == LOSS_QUANT {
            return Some(self.loss_q);
        }
        match self.view.header().config.error_ranges {
            ErrorRanges::Exact => {
                let q = read_qparams(state, self.written_q_at(tensor))?;
                let valid =
                    q.scale.is_finite() && q.scale > 0.0 && (-128..=127).contains(&q.zero_point);
                valid.then_some(q)
            }
            ErrorRanges::Tracked => self.tracked_error_q(state, tensor),
        }
    }

    /// The tracked quantization of an error tensor: the error tracker of its quantization
    /// source scaled by the sample's error unit.
    fn tracked_error_q(&self, state: &[u8], tensor: &TensorRecord) -> Option<QParams> {
        let q = tracker(state, tensor.quant as usize, Track::Error)?.qparams();
        Some(QParams {
            scale: q.scale * self.unit,
            zero_point: q.zero_point,
        })
    }

    /// Where the quantization an error tensor was written with is kept (exact error ranges):
    /// per quantization source, one for complete errors and one for error parts. Each error
    /// of a plan is written with its source's model tensor in backward order and an error
    /// sum reads its operands before it writes, so no later write replaces a quantization
    /// that a live error still needs.
    fn written_q_at(&self, tensor: &TensorRecord) -> usize {
        let part = tensor.role == TensorRole::ErrorPart;
        error_q_at(self.view.layer_count() + 1, tensor.quant as usize, part)
    }

    /// Compute an error tensor with `write` ([`quantize_error`] under the plan's error
    /// ranges, from the first guess `tracked`, its [`Self::tracked_error_q`]).
    fn compute_error(
        &self,
        tracked: QParams,
        write: impl FnMut(QParams) -> RealRange,
    ) -> WrittenError {
        quantize_error(self.view.header().config.error_ranges, tracked, write)
    }

    /// After [`Self::compute_error`] wrote `tensor`: keep the quantization it was written with
    /// (exact error ranges) and record its range for model tensor `t`.
    fn keep_error(
        &self,
        state: &mut [u8],
        tensor: &TensorRecord,
        t: usize,
        written: WrittenError,
    ) -> Option<()> {
        if self.view.header().config.error_ranges == ErrorRanges::Exact {
            write_qparams(state, self.written_q_at(tensor), written.q)?;
        }
        self.see_error(state, t, written.range)
    }

    /// Record the real range of an error of model tensor `t` (in error units).
    fn see_error(&self, state: &mut [u8], t: usize, range: RealRange) -> Option<()> {
        merge_seen(state, t, Track::Error, scale_range(range, 1.0 / self.unit))
    }

    /// The 8-bit parameters of a layer for its kernels (`Some(None)` for a layer without
    /// parameters; `None` for an inconsistent plan or arena).
    fn param_sources(
        &self,
        layer: &LayerRecord,
        resolved: &Layer,
        state: &[u8],
    ) -> Option<Option<ParamSources<'p>>> {
        let Some(params) = resolved.params() else {
            return Some(None);
        };
        let (weight, frozen) = self.weights(layer, params.channels, params.structure)?;
        Some(Some(ParamSources {
            weight,
            frozen,
            bias: self.param(layer.bias_tensor, params.channels * 4)?,
            weight_q: self.weight_q(layer, state)?,
        }))
    }

    /// Forward of one layer through its operator; records the output's real range when
    /// training.
    fn forward(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let resolved = view.resolve(i)?;
        let op = resolved.op();
        let operands = layer_step(StepOp::Forward, op, view.training(i)?)?;
        let x = arena_span(&view.tensor(step.reads[0])?, op.input_len()).ok()?;
        let y = arena_span(&view.tensor(step.writes[0])?, op.output_len()).ok()?;
        let skip = match operands.read_at(Operand::Skip) {
            Some(at) => arena_span(&view.tensor(step.read(at))?, op.output_len()).ok()?,
            None => Span::EMPTY,
        };
        let sources = self.param_sources(&layer, &resolved, state)?;
        let (weight, bias) = match sources {
            Some(p) => (p.weight.span(), p.bias.span()),
            None => (Span::EMPTY, Span::EMPTY),
        };
        // An add may read one tensor by both paths.
        let same = skip == x && skip != Span::EMPTY;
        let spans = [x, if same { Span::EMPTY } else { skip }, weight, bias, y];
        let [x_bytes, skip_bytes, w_bytes, b_bytes, y_bytes] = split_disjoint(tensors, spans)?;
        let x_bytes: &[u8] = x_bytes;
        let skip_bytes: &[u8] = if same { x_bytes } else { skip_bytes };
        let weight_q = [sources.map_or(QTensor::EMPTY.q, |p| p.weight_q)];
        let params = match sources {
            Some(p) => QParameters {
                weight: QWeights {
                    codes: WeightParts {
                        head: codes(p.weight.bytes(w_bytes)),
                        tail: codes(p.frozen),
                    },
                    q: &weight_q,
                },
                bias: words::<i32>(p.bias.bytes(b_bytes))?,
                bias_scale: layer.bias_scale,
            },
            None => QParameters::NONE,
        };
        let skip_q = match op.skip_from() {
            Some(s) => self.activation_q(state, s + 1)?,
            None => QTensor::EMPTY.q,
        };
        let x = QTensor {
            codes: codes(x_bytes),
            q: self.activation_q(state, i)?,
        };
        let skip = QTensor {
            codes: codes(skip_bytes),
            q: skip_q,
        };
        let out_q = self.activation_q(state, i + 1)?;
        let range = op.forward_q(x, skip, params, out_q, codes_mut(y_bytes));
        if self.mode != Mode::Infer {
            merge_seen(state, i + 1, Track::Activation, range)?;
        }
        Some(())
    }

    /// Row-streamed forward of the frozen convolutions `first..=last` of the step
    /// ([`stream::forward_q`], windows in the step's scratch); records every stage's output
    /// range when training, as the layer-by-layer forward does.
    fn streamed_forward(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<()> {
        let view = self.view;
        let first = step.layer as usize;
        let (last, window_bytes) = view.streamed_chain(step)?;
        let count = last - first + 1;
        let mut weight_q = [[QParams::from_range(0.0, 0.0)]; stream::MAX_STAGES];
        for (j, q) in weight_q.iter_mut().enumerate().take(count) {
            *q = [view.layer(first + j)?.weight_q];
        }
        let mut stages: [Option<stream::Stage>; stream::MAX_STAGES] = [None; stream::MAX_STAGES];
        for (j, slot) in stages.iter_mut().enumerate().take(count) {
            let i = first + j;
            let layer = view.layer(i)?;
            let conv = *view.resolve(i)?.conv()?;
            let geom = conv.geom;
            // Validation keeps the chain's parameters in flash.
            let weight = view.flash(&view.tensor(layer.weight_tensor)?, geom.weight_len())?;
            let bias = view.flash(&view.tensor(layer.bias_tensor)?, geom.out_channels * 4)?;
            *slot = Some(stream::Stage {
                geom,
                weight: codes(weight),
                bias: words::<i32>(bias)?,
                q: crate::ops::arith::QLayerParams {
                    input: self.activation_q(state, i)?,
                    weight: &weight_q[j],
                    bias_scale: layer.bias_scale,
                    output: self.activation_q(state, i + 1)?,
                    activation: conv.activation,
                },
            });
        }
        let head = stages[0]?;
        let stages: [stream::Stage; stream::MAX_STAGES] =
            core::array::from_fn(|j| stages[j].unwrap_or(head));
        let x = arena_span(&view.tensor(step.reads[0])?, view.numel(first)?).ok()?;
        let y = arena_span(&view.tensor(step.writes[0])?, view.numel(last + 1)?).ok()?;
        let windows = arena_span(&view.tensor(step.scratch)?, window_bytes).ok()?;
        let [x, y, windows] = split_disjoint(tensors, [x, y, windows])?;
        let mut ranges = [RealRange::EMPTY; stream::MAX_STAGES];
        stream::forward_q(
            &stages[..count],
            codes(x),
            codes_mut(y),
            codes_mut(windows),
            &mut ranges[..count],
        );
        if self.mode != Mode::Infer {
            for (j, range) in ranges.iter().enumerate().take(count) {
                merge_seen(state, first + j + 1, Track::Activation, *range)?;
            }
        }
        Some(())
    }

    /// The clamp mask of layer `i`'s output, which its activation mask step reads.
    fn clamp_mask(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let clamp = view.resolve(i)?.op().output_clamp()?;
        let len = view.numel(i + 1)?;
        let output = arena_span(&view.tensor(step.reads[0])?, len).ok()?;
        let bits = activation::clamp_mask_bytes(len);
        let mask = arena_span(&view.tensor(step.writes[0])?, bits).ok()?;
        let [output, mask] = split_disjoint(tensors, [output, mask])?;
        let output_q = self.activation_q(state, i + 1)?;
        activation::clamp_mask_q(clamp, codes(output), output_q, mask);
        Some(())
    }

    /// Softmax cross-entropy: a first pass finds the loss gradient's range, which fixes the
    /// sample's error unit and the logits error's quantization `from_range(min, max)`; the
    /// second pass writes the error with it.
    fn loss(&mut self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let n = view.layer_count();
        let classes = view.header().classes as usize;
        let logits = arena_span(&view.tensor(step.reads[0])?, classes).ok()?;
        let err = arena_span(&view.tensor(step.writes[0])?, classes).ok()?;
        let logits_q = self.activation_q(state, n)?;
        let [logits, err] = split_disjoint(tensors, [logits, err])?;
        let (logits, err) = (codes(logits), codes_mut(err));
        let labels = [self.label];
        let probe_q = QParams::from_range(-1.0, 1.0);
        let (_, range) =
            loss::softmax_cross_entropy_q(logits, logits_q, &labels, classes, probe_q, err);
        self.unit = error_unit(range);
        self.loss_q = QParams::from_range(range.min, range.max);
        let (value, _) =
            loss::softmax_cross_entropy_q(logits, logits_q, &labels, classes, self.loss_q, err);
        self.loss = value;
        self.see_error(state, n, range)
    }

    /// The activation mask of layer `i` (into a copy when the plan says so); for a trained
    /// layer with partial updates, then the channel selection.
    fn mask(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let resolved = view.resolve(i)?;
        let clamp = resolved.op().output_clamp()?;
        let len = view.numel(i + 1)?;
        let error = view.tensor(step.reads[1])?;
        let error_q = self.error_q(state, &error)?;
        let from_bits = view.tensor(step.reads[0])?.role == TensorRole::ClampMask;
        let output_len = if from_bits {
            activation::clamp_mask_bytes(len)
        } else {
            len
        };
        let [output, masked] = mask_operands(view, step, tensors, output_len, len)?;
        if from_bits {
            activation::backward_mask_bits_q(output, codes_mut(masked), error_q);
        } else {
            let output_q = self.activation_q(state, i + 1)?;
            let (output, masked) = (codes(output), codes_mut(masked));
            activation::backward_mask_q(clamp, output, output_q, masked, error_q);
        }
        match view.header().config.partial {
            Some(partial) if layer.trains() => {
                let error = QTensor {
                    codes: codes(masked),
                    q: error_q,
                };
                self.select_channels(&layer, &resolved, error, partial, state)
            }
            _ => Some(()),
        }
    }

    /// Partial updates: score every channel by its mean absolute error, keep the top
    /// `partial_update_count` of them for this sample's backward of the layer (and mark them
    /// touched in the batch at batch > 1).
    fn select_channels(
        &self,
        layer: &LayerRecord,
        resolved: &Layer,
        error: QTensor,
        partial: PartialUpdate,
        state: &mut [u8],
    ) -> Option<()> {
        let channels = resolved.params()?.channels;
        let [_, out_h, out_w] = resolved.op().output_shape();
        let at = layer.state_offset as usize;
        let mut layer_state = LayerState::read(state, at)?;
        let scores = Span {
            start: self.view.header().scores_offset as usize,
            len: channels * 4,
        };
        let touched = if self.view.header().batch > 1 {
            touched_span(layer, channels)
        } else {
            Span::EMPTY
        };
        let [scores, list, touched] =
            split_disjoint(state, [scores, selection_span(layer, channels), touched])?;
        let scores = words_mut::<f32>(scores)?;
        let (codes, q) = (error.codes, error.q);
        update::structure_error_scores_q(codes, q, 1, channels, out_h * out_w, scores);
        let mean_error = scores.iter().sum::<f32>() / channels as f32;
        let count = update::partial_update_count(
            partial.lambda_min,
            partial.lambda_max,
            mean_error,
            layer_state.error_max.max(mean_error),
            channels,
        );
        let picked = update::top_k_structures(scores, count, words_mut::<u16>(list)?);
        let touched = words_mut::<u32>(touched)?;
        if !touched.is_empty() {
            for &c in picked.iter() {
                *touched.get_mut(c as usize / 32)? |= 1 << (c % 32);
            }
        }
        layer_state.selected = picked.len() as u32;
        layer_state.batch_error_max = layer_state.batch_error_max.max(mean_error);
        layer_state.write(state, at)
    }

    /// The channels the backward of layer `i` works on in this sample.
    fn channels<'a>(
        &self,
        i: usize,
        layer: &LayerRecord,
        state: &'a [u8],
    ) -> Option<ChannelSet<'a>> {
        if self.view.header().config.partial.is_none() || !layer.trains() {
            return Some(ChannelSet::All);
        }
        let channels = self.view.resolve(i)?.params()?.channels;
        let selected = LayerState::read(state, layer.state_offset as usize)?.selected as usize;
        let list = words::<u16>(super::state::region(
            state,
            selection_span(layer, channels),
        )?)?;
        Some(ChannelSet::Subset(list.get(..selected)?))
    }

    /// Current weight quantization of a layer: adapted when its weights train (`None` when the
    /// state holds no valid parameters: a corrupt arena).
    fn weight_q(&self, layer: &LayerRecord, state: &[u8]) -> Option<QParams> {
        if layer.weight_channels == 0 {
            return Some(layer.weight_q);
        }
        let q = LayerState::read(state, layer.state_offset as usize)?.weight_q;
        let valid = q.scale.is_finite() && q.scale > 0.0 && (-128..=127).contains(&q.zero_point);
        valid.then_some(q)
    }

    /// Input error of layer `i` from its (masked) output error through its operator's
    /// input-error kernel, over the selected channels.
    fn input_error(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let resolved = view.resolve(i)?;
        let op = resolved.op();
        let kernel = op.input_error()?;
        let operands = layer_step(StepOp::InputError, op, view.training(i)?)?;
        let part = view.tensor(step.writes[0])?;
        let part_span = arena_span(&part, op.input_len()).ok()?;
        let tracked = self.tracked_error_q(state, &part)?;
        let error = view.tensor(step.read(operands.read_at(Operand::OutputError)?))?;
        let error_span = arena_span(&error, op.output_len()).ok()?;
        let error_q = self.error_q(state, &error)?;
        let x_span = match operands.read_at(Operand::Input) {
            Some(at) => arena_span(&view.tensor(step.read(at))?, op.input_len()).ok()?,
            None => Span::EMPTY,
        };
        let sources = self.param_sources(&layer, &resolved, state)?;
        let w_span = sources.map_or(Span::EMPTY, |p| p.weight.span());
        let [w, x, e, p] = split_disjoint(tensors, [w_span, x_span, error_span, part_span])?;
        let weight_q = [sources.map_or(QTensor::EMPTY.q, |p| p.weight_q)];
        let weights = match sources {
            Some(source) => QWeights {
                codes: WeightParts {
                    head: codes(source.weight.bytes(w)),
                    tail: codes(source.frozen),
                },
                q: &weight_q,
            },
            None => QWeights::NONE,
        };
        let x = QTensor {
            codes: codes(x),
            q: self.activation_q(state, i)?,
        };
        let e = QTensor {
            codes: codes(e),
            q: error_q,
        };
        let (p, selected) = (codes_mut(p), self.channels(i, &layer, state)?);
        let written = self.compute_error(tracked, |part_q| {
            kernel.input_backward_q(x, weights, e, selected, part_q, p)
        });
        self.keep_error(state, &part, i, written)
    }

    /// The sum of two contributions to one tensor's error.
    fn accumulate_error(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<()> {
        let view = self.view;
        let tensor = |position: u16| view.tensor(position);
        let (a, b, sum) = (
            tensor(step.reads[0])?,
            tensor(step.reads[1])?,
            tensor(step.writes[0])?,
        );
        let len = sum.bytes as usize;
        let (a_codes, b_codes, out) = two_reads_one_write(
            tensors,
            arena_span(&a, len).ok()?,
            arena_span(&b, len).ok()?,
            arena_span(&sum, len).ok()?,
        )?;
        let (a_q, b_q) = (self.error_q(state, &a)?, self.error_q(state, &b)?);
        let (a_codes, b_codes, out) = (codes(a_codes), codes(b_codes), codes_mut(out));
        let written = self.compute_error(self.tracked_error_q(state, &sum)?, |q| {
            crate::ops::add::forward_q(a_codes, a_q, b_codes, b_q, q, out)
        });
        self.keep_error(state, &sum, sum.index as usize, written)
    }

    /// Weight or bias gradient of layer `i` over the selected channels, added into the
    /// gradient tensor (zeroed first at batch 1; at batch > 1 it accumulates over the batch).
    fn gradient(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let resolved = view.resolve(i)?;
        let params = resolved.params()?;
        let is_weight = step.op == StepOp::WeightGrad;
        let operands = layer_step(step.op, resolved.op(), view.training(i)?)?;
        // The weight gradient of the trained channels: that of the layer restricted to them,
        // whose input and output are prefixes of the layer's at batch 1.
        let target = if is_weight {
            let trained = layer.weight_channels as usize;
            resolved.channel_prefix(trained)?
        } else {
            resolved
        };
        let op = target.op();
        let error = view.tensor(step.read(operands.read_at(Operand::OutputError)?))?;
        let error_q = self.error_q(state, &error)?;
        let error_span = arena_span(&error, op.output_len()).ok()?;
        let grad_len = if is_weight {
            layer.weight_channels as usize * params.structure
        } else {
            params.channels
        } * 4;
        let grad_span = arena_span(&view.tensor(step.writes[0])?, grad_len).ok()?;
        let input_span = match operands.read_at(Operand::Input) {
            Some(at) => arena_span(&view.tensor(step.read(at))?, op.input_len()).ok()?,
            None => Span::EMPTY,
        };
        let selected = self.channels(i, &layer, state)?;
        let [x, e, grad] = split_disjoint(tensors, [input_span, error_span, grad_span])?;
        let grad = words_mut::<f32>(grad)?;
        if view.header().batch == 1 {
            grad.fill(0.0);
        }
        let e = QTensor {
            codes: codes(e),
            q: error_q,
        };
        let kernels = op.parametric()?;
        if is_weight {
            let x = QTensor {
                codes: codes(x),
                q: self.activation_q(state, i)?,
            };
            kernels.weight_backward_q(x, e, selected, grad);
        } else {
            kernels.bias_backward_q(e, selected, grad);
        }
        Some(())
    }

    /// The channels an update of layer `i` applies to: those selected in this sample at batch
    /// 1, those touched by any sample of the batch at batch > 1 (listed in ascending order in
    /// the score scratch, which is free outside the mask step), every channel without partial
    /// updates.
    fn update_channels<'a>(
        &self,
        i: usize,
        layer: &LayerRecord,
        state: &'a mut [u8],
    ) -> Option<ChannelSet<'a>> {
        let view = self.view;
        if view.header().batch == 1 || view.header().config.partial.is_none() {
            return self.channels(i, layer, state);
        }
        let channels = view.resolve(i)?.params()?.channels;
        let list = Span {
            start: view.header().scores_offset as usize,
            len: channels * 2,
        };
        let [list, touched] = split_disjoint(state, [list, touched_span(layer, channels)])?;
        let (list, touched) = (words_mut::<u16>(list)?, words::<u32>(touched)?);
        let mut count = 0;
        for c in 0..channels {
            if touched.get(c / 32)? & 1 << (c % 32) != 0 {
                *list.get_mut(count)? = c as u16;
                count += 1;
            }
        }
        let list: &'a [u16] = list;
        Some(ChannelSet::Subset(list.get(..count)?))
    }

    /// The standardized FQT weight update of layer `i`
    /// ([`update::fqt_update_weights`]): gradient statistics in place, new weight quantization
    /// and range tracker into the layer's state. A layer that trains a strict subset of its
    /// channels updates them under its fixed quantization
    /// ([`update::fqt_update_weights_fixed`]), leaving its state as it is.
    fn weight_update(
        &self,
        step: &StepRecord,
        tensors: &mut [u8],
        state: &mut [u8],
    ) -> Option<Result<(), ExecError>> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let params = view.resolve(i)?.params()?;
        let structure = params.structure;
        let channels = layer.weight_channels as usize;
        let grad = arena_span(&view.tensor(step.reads[0])?, channels * structure * 4).ok()?;
        let weight = arena_span(&view.tensor(step.reads[1])?, channels * structure).ok()?;
        let stats_tensor = view.tensor(step.reads[2])?;
        let stats = arena_span(&stats_tensor, stats_tensor.bytes as usize).ok()?;
        let at = layer.state_offset as usize;
        let mut layer_state = LayerState::read(state, at)?;
        let config = view.header().config;
        let update_config = FqtUpdateConfig {
            lr: read_f32(state, LEARNING_RATE_AT)?,
            stats_rate: config.stats_rate,
            range_rate: config.weight_rate,
            eps: config.eps,
        };
        let [grad, weight, stats] = split_disjoint(tensors, [grad, weight, stats])?;
        {
            let selected = self.update_channels(i, &layer, state)?;
            let Some(stats) = grad_stats_mut(stats) else {
                return Some(Err(ExecError::CorruptArena));
            };
            if stats.len() != channels {
                return None;
            }
            let (weight, grad) = (codes_mut(weight), words::<f32>(grad)?);
            if trains_channel_subset(&layer, params.channels) {
                let q = layer_state.weight_q;
                let cfg = &update_config;
                update::fqt_update_weights_fixed(weight, q, grad, structure, selected, stats, cfg);
            } else {
                update::fqt_update_weights(
                    weight,
                    &mut layer_state.weight_q,
                    &mut layer_state.weight_range,
                    grad,
                    structure,
                    selected,
                    stats,
                    &update_config,
                );
            }
        }
        zero_grad_stats_padding(stats);
        layer_state.write(state, at)?;
        Some(Ok(()))
    }

    /// The FQT bias update of layer `i` ([`update::fqt_update_bias`]) with the gradient scaled
    /// by `1 / samples in the batch` (this one included).
    fn bias_update(&self, step: &StepRecord, tensors: &mut [u8], state: &mut [u8]) -> Option<()> {
        let view = self.view;
        let i = step.layer as usize;
        let layer = view.layer(i)?;
        let channels = view.resolve(i)?.params()?.channels;
        let grad = arena_span(&view.tensor(step.reads[0])?, channels * 4).ok()?;
        let bias = arena_span(&view.tensor(step.reads[1])?, channels * 4).ok()?;
        let [grad, bias] = split_disjoint(tensors, [grad, bias])?;
        let lr = read_f32(state, LEARNING_RATE_AT)?;
        let batch = samples_this_batch(state)?;
        let selected = self.update_channels(i, &layer, state)?;
        update::fqt_update_bias(
            words_mut::<i32>(bias)?,
            layer.bias_scale,
            words::<f32>(grad)?,
            selected,
            lr,
            1.0 / batch,
        );
        Some(())
    }
}
