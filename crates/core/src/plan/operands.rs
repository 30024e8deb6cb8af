//! What each step of a layer reads and writes, by position: the one description that the
//! compiler writes plans from, [`super::PlanView::parse`] checks them against and the executor
//! reads its operands by ([`Operands::read_at`]).
//!
//! The steps of the model as a whole ([`StepOp::LoadInput`], [`StepOp::Loss`] and
//! [`StepOp::AccumulateError`]) have fixed operands, described with [`StepOp`].

use super::record::{Precision, StepOp, TensorRole, MAX_READS, MAX_WRITES};
use crate::layer::Operator;
use crate::ops::activation::Activation;

/// One operand of a step of layer `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// The activation of model tensor `i`: the layer's input.
    Input,
    /// The activation of the layer's residual input, model tensor `skip_from + 1`.
    Skip,
    /// The activation of model tensor `i + 1`: the layer's output.
    Output,
    /// The output, or its clamp mask where the plan keeps that instead.
    OutputOrMask,
    /// The 1-bit clamp mask of the output.
    ClampMask,
    /// The output of a row-streamed chain of convolutions that starts at layer `i`: the
    /// activation of its last layer.
    ChainOutput,
    /// The weights.
    Weight,
    /// The bias.
    Bias,
    /// A complete error of the output's size: the layer's (masked) output error.
    OutputError,
    /// A new error of the input, model tensor `i`: complete, or one consumer's part.
    InputError,
    /// The weight gradient of the trained channels.
    WeightGrad,
    /// The bias gradient.
    BiasGrad,
    /// The weight update's state: gradient statistics (int8) or the velocity (float32 with
    /// momentum).
    OptimizerState,
    /// The bias velocity (float32 with momentum).
    BiasOptimizerState,
}

impl Operand {
    /// The role of the plan tensor that holds the operand (for an [`Operand::InputError`] the
    /// complete one; a part is [`TensorRole::ErrorPart`]; for [`Operand::OutputOrMask`] the
    /// activation; a mask is [`TensorRole::ClampMask`]).
    pub fn role(self) -> TensorRole {
        match self {
            Operand::Input | Operand::Skip | Operand::Output => TensorRole::Activation,
            Operand::OutputOrMask | Operand::ChainOutput => TensorRole::Activation,
            Operand::ClampMask => TensorRole::ClampMask,
            Operand::Weight => TensorRole::Weight,
            Operand::Bias => TensorRole::Bias,
            Operand::OutputError | Operand::InputError => TensorRole::Error,
            Operand::WeightGrad => TensorRole::WeightGrad,
            Operand::BiasGrad => TensorRole::BiasGrad,
            Operand::OptimizerState => TensorRole::OptimizerState,
            Operand::BiasOptimizerState => TensorRole::BiasOptimizerState,
        }
    }
}

/// What the steps of one layer depend on besides its operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Training {
    /// Numeric form of the plan.
    pub precision: Precision,
    /// Some weight channels of the layer train.
    pub trains_weight: bool,
    /// The bias trains.
    pub trains_bias: bool,
    /// float32 SGD keeps a momentum velocity per trained parameter.
    pub momentum: bool,
}

/// The operands of one step, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operands {
    /// What the step reads, in order (`None`: the position is unused).
    pub reads: [Option<Operand>; MAX_READS],
    /// What it writes.
    pub writes: [Option<Operand>; MAX_WRITES],
}

impl Operands {
    fn new(reads: &[Operand], writes: &[Operand]) -> Operands {
        let mut out = Operands {
            reads: [None; MAX_READS],
            writes: [None; MAX_WRITES],
        };
        for (slot, &operand) in out.reads.iter_mut().zip(reads) {
            *slot = Some(operand);
        }
        for (slot, &operand) in out.writes.iter_mut().zip(writes) {
            *slot = Some(operand);
        }
        out
    }

    /// The read position of `operand`.
    pub fn read_at(&self, operand: Operand) -> Option<usize> {
        self.reads.iter().position(|&r| r == Some(operand))
    }
}

/// True when the backward pass masks the layer's output error: wherever its output was
/// clamped, in float only by a ReLU or ReLU6 (8-bit outputs are also saturated, so an int8
/// layer masks even without an activation).
pub fn masks(layer: &dyn Operator, precision: Precision) -> bool {
    match (layer.output_clamp(), precision) {
        (None, _) => false,
        (Some(_), Precision::Int8) => true,
        (Some(clamp), Precision::Float32) => clamp != Activation::None,
    }
}

/// The operands of step `op` of a layer with operator `layer`; `None` when the layer has no
/// such step (or the step is not a layer step).
pub fn layer_step(op: StepOp, layer: &dyn Operator, training: Training) -> Option<Operands> {
    use Operand::*;
    let int8 = training.precision == Precision::Int8;
    let params = layer.parametric().is_some();
    let operands = match op {
        StepOp::Forward if layer.aliases_input() => return None,
        StepOp::Forward => {
            let mut reads = [Input; MAX_READS];
            let mut count = 1;
            if layer.skip_from().is_some() {
                reads[count] = Skip;
                count += 1;
            }
            if params {
                reads[count..count + 2].copy_from_slice(&[Weight, Bias]);
                count += 2;
            }
            Operands::new(&reads[..count], &[Output])
        }
        // Row streaming and clamp masks are int8 forms: float32 plans keep every activation a
        // backward step reads.
        StepOp::StreamedForward if int8 => Operands::new(&[Input], &[ChainOutput]),
        StepOp::ClampMask if int8 && layer.output_clamp().is_some() => {
            Operands::new(&[Output], &[ClampMask])
        }
        StepOp::ActivationMask if masks(layer, training.precision) => {
            Operands::new(&[OutputOrMask, OutputError], &[OutputError])
        }
        StepOp::InputError => {
            let kernel = layer.input_error()?;
            let mut reads = [OutputError; MAX_READS];
            let mut count = 0;
            if params {
                reads[count] = Weight;
                count += 1;
            }
            if kernel.reads_input() {
                reads[count] = Input;
                count += 1;
            }
            Operands::new(&reads[..=count], &[InputError])
        }
        StepOp::WeightGrad if params && training.trains_weight => {
            Operands::new(&[Input, OutputError], &[WeightGrad])
        }
        StepOp::BiasGrad if params && training.trains_bias => {
            Operands::new(&[OutputError], &[BiasGrad])
        }
        StepOp::WeightUpdate if params && training.trains_weight => {
            if int8 || training.momentum {
                let state = OptimizerState;
                Operands::new(&[WeightGrad, Weight, state], &[Weight, state])
            } else {
                Operands::new(&[WeightGrad, Weight], &[Weight])
            }
        }
        StepOp::BiasUpdate if params && training.trains_bias => {
            if !int8 && training.momentum {
                let state = BiasOptimizerState;
                Operands::new(&[BiasGrad, Bias, state], &[Bias, state])
            } else {
                Operands::new(&[BiasGrad, Bias], &[Bias])
            }
        }
        _ => return None,
    };
    Some(operands)
}
