//! The checks [`PlanView::parse`] runs once on a plan file (listed in the module documentation
//! of [`crate::plan`]), so that no file can make the accessors or the executor panic or
//! overwrite a live tensor.

use super::operands::{layer_step, Operand};
use super::{
    layer_state_bytes, state_bytes_at_least, tensor_state_end, ErrorRanges, PlanError, PlanView,
    Precision, StepOp, StepRecord, TensorRecord, TensorRole, LOSS_QUANT, MAX_READS, MAX_WRITES,
    NONE, NO_OFFSET, STEP_BYTES,
};
use crate::layer::Shape;
use crate::ops::{activation, stream};
use crate::update::GradStats;

/// An operand a step must have at one position.
#[derive(Clone, Copy)]
enum Expected {
    /// Nothing at this position.
    Absent,
    /// An operand of the step's layer `i`.
    Of(Operand, usize),
    /// The activation buffer of model tensor `t` (a flatten output shares its input's).
    Activation(usize),
    /// Exactly this role and index.
    Exactly(TensorRole, usize),
    /// An error buffer, complete or partial (any index), of model tensor `t`'s size: what an
    /// error sum reads.
    Contribution(usize),
}

impl<'a> PlanView<'a> {
    pub(super) fn validate(&self) -> Result<(), PlanError> {
        let h = &self.header;
        let layers = self.layer_count();
        let bad_header = Err(PlanError::BadHeader);
        if h.batch == 0
            || layers == 0
            || h.step_count == 0
            || layers + 1 >= LOSS_QUANT as usize
            || h.tensor_count >= LOSS_QUANT
        {
            return bad_header;
        }
        let steps_end = self.steps_at() + self.step_count() * STEP_BYTES;
        let blob_start = h.blob_offset as usize;
        let blob_end = blob_start.checked_add(h.blob_bytes as usize);
        if !blob_start.is_multiple_of(4)
            || blob_start < steps_end
            || blob_end != Some(self.bytes.len())
        {
            return bad_header;
        }
        let shared_state_end = state_bytes_at_least(h.precision, layers + 1, h.config.error_ranges);
        if (h.state_bytes as usize) < shared_state_end
            || self
                .state_offset()
                .checked_add(h.state_bytes as usize)
                .is_none()
        {
            return bad_header;
        }
        for t in 0..=layers {
            self.validate_model_tensor(t)
                .ok_or(PlanError::BadModelTensor(t as u16))?;
        }
        for i in 0..layers {
            self.validate_layer(i)
                .ok_or(PlanError::BadLayer(i as u16))?;
        }
        let logits = self.model_tensor(layers).ok_or(PlanError::BadHeader)?;
        let lowest = (0..layers).find(|&i| self.layer(i).is_some_and(|l| l.trains()));
        if h.classes == 0
            || logits.shape != [h.classes, 1, 1]
            || lowest != Some(h.lowest_layer as usize)
        {
            return bad_header;
        }
        // Float32 plans run plain SGD: no partial updates, no error quantization, a momentum
        // in [0, 1) (and int8 plans none).
        let momentum_ok = match h.precision {
            Precision::Int8 => h.config.momentum == 0.0,
            Precision::Float32 => (0.0..1.0).contains(&h.config.momentum),
        };
        let float_extras =
            h.config.partial.is_some() || h.config.error_ranges != ErrorRanges::Tracked;
        if !momentum_ok || (h.precision == Precision::Float32 && float_extras) {
            return bad_header;
        }
        if let Some(partial) = h.config.partial {
            let scores_end = (h.scores_offset as usize).checked_add(self.widest_layer() * 4);
            let fractions_ok = partial.lambda_min > 0.0
                && partial.lambda_min <= partial.lambda_max
                && partial.lambda_max <= 1.0;
            if !fractions_ok
                || !(h.scores_offset as usize).is_multiple_of(4)
                || (h.scores_offset as usize) < shared_state_end
                || scores_end.is_none_or(|end| end > h.state_bytes as usize)
            {
                return bad_header;
            }
        }
        self.validate_state_layout().map_err(PlanError::BadLayer)?;
        for id in 0..h.tensor_count {
            self.validate_tensor(id).ok_or(PlanError::BadTensor(id))?;
        }
        self.validate_flash_layout().map_err(PlanError::BadTensor)?;
        self.validate_liveness().map_err(PlanError::BadTensor)?;
        for s in 0..self.step_count() {
            self.validate_step(s).ok_or(PlanError::BadStep(s as u16))?;
        }
        Ok(())
    }

    /// Most output channels of a layer with parameters (the partial-update score scratch holds
    /// one score per channel).
    pub(crate) fn widest_layer(&self) -> usize {
        (0..self.layer_count())
            .filter_map(|i| self.resolve(i)?.params())
            .map(|p| p.channels)
            .max()
            .unwrap_or(0)
    }

    fn validate_model_tensor(&self, t: usize) -> Option<()> {
        let record = self.model_tensor(t)?;
        let numel = record.numel()?;
        let owner = if t > 0 && self.resolve(t - 1)?.op().preserves_codes() {
            self.model_tensor(t - 1)?.range_owner as usize
        } else {
            t
        };
        (numel > 0 && numel <= u32::MAX as usize && record.range_owner as usize == owner)
            .then_some(())
    }

    fn shape(&self, t: usize) -> Option<Shape> {
        Some(self.model_tensor(t)?.shape.map(usize::from))
    }

    fn validate_layer(&self, i: usize) -> Option<()> {
        let layer = self.layer(i)?;
        let resolved = self.resolve(i)?;
        let op = resolved.op();
        let input = self.shape(i)?;
        let skip_ok = match op.skip_from() {
            Some(skip) => skip < i && self.shape(skip + 1)? == input,
            None => true,
        };
        let int8 = self.header.precision == Precision::Int8;
        if op.output_shape() != self.shape(i + 1)? || !skip_ok {
            return None;
        }
        if int8 && !op.fits_int8_limits() {
            return None;
        }
        let Some(params) = resolved.params() else {
            let no_params = layer.weight_tensor == NONE
                && layer.bias_tensor == NONE
                && !layer.trains()
                && layer.state_offset == NO_OFFSET;
            return no_params.then_some(());
        };
        let weight = self.tensor(layer.weight_tensor)?;
        let bias = self.tensor(layer.bias_tensor)?;
        let positive = |s: f32| s.is_finite() && s > 0.0;
        // The quantization fields mean nothing in a float32 plan (and are not read there).
        let quantization_ok = !int8
            || (positive(layer.bias_scale)
                && positive(layer.weight_q.scale)
                && (-128..=127).contains(&layer.weight_q.zero_point));
        let params_ok = (weight.role, weight.index as usize) == (TensorRole::Weight, i)
            && (bias.role, bias.index as usize) == (TensorRole::Bias, i)
            && layer.weight_channels as usize <= params.channels
            && quantization_ok;
        // Float32 layers keep no state outside their planned tensors.
        let state_ok = if layer.trains() && int8 {
            let start = layer.state_offset as usize;
            let partial = self.header.config.partial.is_some();
            start.is_multiple_of(4)
                && start
                    >= tensor_state_end(self.layer_count() + 1, self.header.config.error_ranges)
                && start
                    .checked_add(layer_state_bytes(params.channels, partial))
                    .is_some_and(|end| end <= self.header.state_bytes as usize)
        } else {
            layer.state_offset == NO_OFFSET
        };
        (params_ok && state_ok).then_some(())
    }

    /// Expected bytes of a tensor with `role` and `index` (`None`: the index does not fit the
    /// role; `Some(None)`: any size).
    /// In `u64`, since a gradient's size need not fit a 32-bit `usize`.
    fn role_bytes(&self, role: TensorRole, index: usize) -> Option<Option<u64>> {
        if role == TensorRole::Scratch {
            return (index < self.step_count()).then_some(None);
        }
        if role == TensorRole::ClampMask {
            return Some(Some(activation::clamp_mask_bytes(self.numel(index)?) as u64));
        }
        if matches!(
            role,
            TensorRole::Activation | TensorRole::Error | TensorRole::ErrorPart
        ) {
            return Some(Some(self.tensor_bytes(index)?));
        }
        let layer = self.layer(index)?;
        let params = self.resolve(index)?.params()?;
        let (channels, structure) = (params.channels as u64, params.structure as u64);
        let trained = layer.weight_channels as u64;
        let element = self.element_bytes() as u64;
        let int8 = self.header.precision == Precision::Int8;
        let velocity = self.has_velocity();
        let bytes = match role {
            // The trained channels only, when a strict subset trains (see `flash_bytes`).
            TensorRole::Weight if trained > 0 && trained < channels => {
                trained * structure * element
            }
            TensorRole::Weight => channels * structure * element,
            TensorRole::Bias => channels * 4,
            TensorRole::WeightGrad if trained > 0 => trained * structure * 4,
            TensorRole::BiasGrad if layer.trains_bias => channels * 4,
            TensorRole::OptimizerState if trained > 0 && int8 => {
                trained * core::mem::size_of::<GradStats>() as u64
            }
            TensorRole::OptimizerState if trained > 0 && velocity => trained * structure * 4,
            TensorRole::BiasOptimizerState if layer.trains_bias && velocity => channels * 4,
            _ => return None,
        };
        Some(Some(bytes))
    }

    fn validate_tensor(&self, id: u16) -> Option<()> {
        let tensor = self.tensor(id)?;
        let index = tensor.index as usize;
        if let Some(bytes) = self.role_bytes(tensor.role, index)? {
            if tensor.bytes as u64 != bytes {
                return None;
            }
        }
        let (in_flash, in_arena) = match tensor.role {
            TensorRole::Weight => (true, self.layer(index)?.weight_channels > 0),
            TensorRole::Bias => (true, self.layer(index)?.trains_bias),
            _ => (false, true),
        };
        let layer_ids_ok = match tensor.role {
            TensorRole::Weight => self.layer(index)?.weight_tensor == id,
            TensorRole::Bias => self.layer(index)?.bias_tensor == id,
            _ => true,
        };
        let flash_ok = match tensor.flash_offset {
            Some(offset) => {
                in_flash
                    && offset.is_multiple_of(4)
                    && self.flash(&tensor, self.flash_bytes(&tensor)?).is_some()
            }
            None => !in_flash,
        };
        let arena_ok = match tensor.arena_offset {
            Some(offset) => {
                in_arena
                    && offset.is_multiple_of(4)
                    && (offset as usize)
                        .checked_add(tensor.bytes as usize)
                        .is_some_and(|end| end <= self.header.arena_bytes as usize)
            }
            None => !in_arena,
        };
        let quant_ok = match self.header.precision {
            Precision::Int8 => {
                !tensor.role.is_error()
                    || tensor.quant == LOSS_QUANT
                    || (tensor.quant as usize) <= self.layer_count()
            }
            Precision::Float32 => tensor.quant == NONE,
        };
        let last_step = self.step_count() as u16 - 1;
        let kept = match tensor.role {
            TensorRole::Weight
            | TensorRole::Bias
            | TensorRole::OptimizerState
            | TensorRole::BiasOptimizerState => true,
            TensorRole::WeightGrad | TensorRole::BiasGrad => self.header.batch > 1,
            _ => false,
        };
        let lifetime_ok = match (tensor.arena_offset, tensor.lifetime) {
            (Some(_), Some((first, last))) => {
                first <= last && last <= last_step && (!kept || (first, last) == (0, last_step))
            }
            (None, None) => true,
            _ => false,
        };
        (layer_ids_ok && flash_ok && arena_ok && quant_ok && lifetime_ok).then_some(())
    }

    /// The training state of each trained layer overlaps neither another layer's nor the
    /// partial-update score scratch (`Err(i)`: the later layer of such a pair).
    fn validate_state_layout(&self) -> Result<(), u16> {
        let partial = self.header.config.partial.is_some();
        let state_of = |i: u16| {
            let int8 = self.header.precision == Precision::Int8;
            let layer = self.layer(i as usize).filter(|l| l.trains() && int8)?;
            let channels = self.resolve(i as usize)?.params()?.channels;
            let start = layer.state_offset as usize;
            Some((start, start + layer_state_bytes(channels, partial)))
        };
        let scores_start = self.header.scores_offset as usize;
        let scores = partial.then_some((scores_start, scores_start + self.widest_layer() * 4));
        let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        for i in 0..self.header.layer_count {
            let Some(region) = state_of(i) else {
                continue;
            };
            let clashes = (0..i).filter_map(state_of).chain(scores);
            if clashes.into_iter().any(|other| overlap(region, other)) {
                return Err(i);
            }
        }
        Ok(())
    }

    /// No two parameter tensors share a byte of the blob (`Err(id)`: the later tensor of such a
    /// pair), so a moved flash offset cannot make one layer read another's bytes (say weight
    /// codes as an `i32` bias, which can overflow the accumulators). `O(tensors^2)` once.
    fn validate_flash_layout(&self) -> Result<(), u16> {
        let span = |t: &TensorRecord| {
            let start = t.flash_offset? as u64;
            Some((start, start + self.flash_bytes(t)? as u64))
        };
        for a in 0..self.header.tensor_count {
            let Some((a_start, a_end)) = self.tensor(a).as_ref().and_then(span) else {
                continue;
            };
            for b in a + 1..self.header.tensor_count {
                let Some((b_start, b_end)) = self.tensor(b).as_ref().and_then(span) else {
                    continue;
                };
                if a_start < b_end && b_start < a_end {
                    return Err(b);
                }
            }
        }
        Ok(())
    }

    /// No two arena tensors live at a common step share a byte (`Err(id)`: the later tensor of
    /// such a pair).
    fn validate_liveness(&self) -> Result<(), u16> {
        let span = |t: &TensorRecord| {
            let start = t.arena_offset? as u64;
            Some((start, start + t.bytes as u64, t.lifetime?))
        };
        for a in 0..self.header.tensor_count {
            let Some((a_start, a_end, (a_first, a_last))) = self.tensor(a).as_ref().and_then(span)
            else {
                continue;
            };
            for b in a + 1..self.header.tensor_count {
                let Some((b_start, b_end, (b_first, b_last))) =
                    self.tensor(b).as_ref().and_then(span)
                else {
                    continue;
                };
                let same_time = a_first <= b_last && b_first <= a_last;
                let same_bytes = a_start < b_end && b_start < a_end;
                if same_time && same_bytes {
                    return Err(b);
                }
            }
        }
        Ok(())
    }

    /// The operands step `step` must have, by position (`None`: invalid operation/layer): the
    /// model's steps here, a layer's from [`layer_step`].
    fn expected_operands(
        &self,
        step: &StepRecord,
    ) -> Option<([Expected; MAX_READS], [Expected; MAX_WRITES])> {
        use Expected::{Absent, Exactly};
        let layers = self.layer_count();
        let without_layer = matches!(step.op, StepOp::LoadInput | StepOp::Loss);
        if without_layer != (step.layer == NONE) {
            return None;
        }
        match step.op {
            StepOp::LoadInput => {
                return Some(([Absent; 3], [Exactly(TensorRole::Activation, 0), Absent]));
            }
            StepOp::Loss => {
                let logits = Expected::Activation(layers);
                return Some((
                    [logits, Absent, Absent],
                    [Exactly(TensorRole::Error, layers), Absent],
                ));
            }
            StepOp::AccumulateError => {
                self.layer(step.layer as usize)?;
                let t = self.tensor(step.writes[0])?.index as usize;
                let part = Expected::Contribution(t);
                return Some((
                    [part, part, Absent],
                    [Exactly(TensorRole::Error, t), Absent],
                ));
            }
            _ => {}
        }
        let i = step.layer as usize;
        let layer = self.resolve(i)?;
        let operands = layer_step(step.op, layer.op(), self.training(i)?)?;
        let expect = |slot: Option<Operand>| slot.map_or(Absent, |o| Expected::Of(o, i));
        Some((operands.reads.map(expect), operands.writes.map(expect)))
    }

    /// The last layer and the window bytes of a streamed forward step: its layer is the first
    /// of 2 to [`stream::MAX_STAGES`] frozen convolutions forming a chain
    /// ([`stream::validate`]), the last being the layer whose output activation it writes.
    pub fn streamed_chain(&self, step: &StepRecord) -> Option<(usize, usize)> {
        let first = step.layer as usize;
        let output = self.tensor(step.writes[0])?;
        let last = (output.index as usize).checked_sub(1)?;
        let count = last.checked_sub(first)? + 1;
        if output.role != TensorRole::Activation || !(2..=stream::MAX_STAGES).contains(&count) {
            return None;
        }
        let geometry = |j: usize| {
            let frozen = !self.layer(j)?.trains();
            frozen.then_some(self.resolve(j)?.conv()?.geom)
        };
        let head = geometry(first)?;
        let mut geoms = [head; stream::MAX_STAGES];
        for (j, slot) in geoms.iter_mut().enumerate().take(count) {
            *slot = geometry(first + j)?;
        }
        let chain = &geoms[..count];
        stream::validate(chain).ok()?;
        Some((last, stream::scratch_bytes(chain)))
    }

    /// Whether tensor `id` is the operand `expected` of `step`.
    fn operand_ok(&self, expected: Expected, step: &StepRecord, id: u16) -> Option<()> {
        if let Expected::Absent = expected {
            return (id == NONE).then_some(());
        }
        let tensor = self.tensor(id)?;
        let index = tensor.index as usize;
        let activation =
            |t: usize| tensor.role == TensorRole::Activation && index == self.buffer_of(t);
        let ok = match expected {
            Expected::Absent => false,
            Expected::Activation(t) => activation(t),
            Expected::Exactly(role, t) => tensor.role == role && index == t,
            Expected::Contribution(t) => {
                tensor.role.is_error() && Some(tensor.bytes as u64) == self.tensor_bytes(t)
            }
            Expected::Of(operand, i) => match operand {
                Operand::Input => activation(i),
                Operand::Skip => activation(self.resolve(i)?.op().skip_from()? + 1),
                Operand::Output => activation(i + 1),
                Operand::OutputOrMask => {
                    activation(i + 1) || (tensor.role == TensorRole::ClampMask && index == i + 1)
                }
                Operand::ClampMask => tensor.role == TensorRole::ClampMask && index == i + 1,
                Operand::ChainOutput => {
                    let (last, _) = self.streamed_chain(step)?;
                    tensor.role == TensorRole::Activation && index == last + 1
                }
                // What masks, input errors and gradients read is a complete error (an error part
                // is only ever summed).
                Operand::OutputError => {
                    tensor.role == TensorRole::Error
                        && Some(tensor.bytes as u64) == self.tensor_bytes(i + 1)
                }
                Operand::InputError => tensor.role.is_error() && index == i,
                Operand::Weight
                | Operand::Bias
                | Operand::WeightGrad
                | Operand::BiasGrad
                | Operand::OptimizerState
                | Operand::BiasOptimizerState => tensor.role == operand.role() && index == i,
            },
        };
        ok.then_some(())
    }

    fn validate_step(&self, s: usize) -> Option<()> {
        let step = self.step(s)?;
        let (reads, writes) = self.expected_operands(&step)?;
        for (expected, id) in reads.iter().zip(step.reads) {
            self.operand_ok(*expected, &step, id)?;
        }
        for (expected, id) in writes.iter().zip(step.writes) {
            self.operand_ok(*expected, &step, id)?;
            if id != NONE {
                self.tensor(id)?.arena_offset?;
            }
        }
        if step.scratch != NONE {
            let scratch = self.tensor(step.scratch)?;
            if (scratch.role, scratch.index as usize) != (TensorRole::Scratch, s) {
                return None;
            }
        }
        if step.op == StepOp::StreamedForward {
            let (_, windows) = self.streamed_chain(&step)?;
            let scratch = self.tensor(step.scratch)?;
            if (scratch.bytes as usize) < windows || scratch.arena_offset.is_none() {
                return None;
            }
        }
        // Every arena operand is live at this step.
        for id in step.touched() {
            let tensor = self.tensor(id)?;
            if tensor.arena_offset.is_some() {
                let (first, last) = tensor.lifetime?;
                if !(first as usize <= s && s <= last as usize) {
                    return None;
                }
            }
        }
        Some(())
    }
}
