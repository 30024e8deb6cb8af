//! The training-graph compiler and static memory planner (the "Tiny Training Engine" of
//! shared/methods.md section 2).
//!
//! A model plus an update scheme is compiled ahead of time into a [`TrainingPlan`]: the ordered
//! kernel calls of one training sample (forward, loss, pruned backward, updates), the tensors
//! they read and write, and an offset for every SRAM tensor in one arena. The plan's peak is
//! known exactly before anything runs.
//!
//! - [`scheme`]: what each layer trains (`all`, `last:K`, `bias:K`, per-layer channel ratios);
//! - [`graph`]: the compiler (backward derivation, pruning, operator reordering);
//! - [`liveness`]: tensor lifetimes over the step list and the lower bound of any arena;
//! - [`arena`]: offsets that minimise the arena's peak;
//! - [`report`]: the memory report of `mcutrain plan`;
//! - [`cli`]: the `mcutrain plan` command.
//!
//! The plan is plain data (vectors of steps holding tensor ids, a tensor table with sizes and
//! offsets) so that a later plan file for the firmware can serialise it as it is.

pub mod arena;
pub mod cli;
pub mod graph;
pub mod liveness;
pub mod plan_file;
pub mod report;
pub mod scheme;

pub use graph::{compile, compile_streaming, CompileError, PlanOptions, RowStreaming};
pub use scheme::LayerUpdate;

/// Arena offsets and sizes are multiples of this many bytes.
pub const ALIGN: usize = 4;

/// `bytes` rounded up to [`ALIGN`].
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Numeric form of the trained model, which fixes the element sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 activations, errors, weights, biases and gradients.
    Float32,
    /// Fully quantized: int8 activations, errors and weights, `i32` biases, `f32` gradients
    /// (the FQT update needs the whole real gradient of a tensor for its per-tensor range).
    Int8,
}

impl Precision {
    /// Bytes of one activation or error element (and of one weight).
    pub fn element_bytes(self) -> usize {
        match self {
            Precision::Float32 => 4,
            Precision::Int8 => 1,
        }
    }

    /// Bytes of one bias element (`f32` or `i32`).
    pub fn bias_bytes(self) -> usize {
        4
    }

    /// Bytes of one gradient element (always `f32`).
    pub fn gradient_bytes(self) -> usize {
        4
    }

    /// "float32" or "int8".
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Int8 => "int8",
        }
    }
}

/// Index of a tensor in [`TrainingPlan::tensors`].
pub type TensorId = usize;

/// What a plan tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Model tensor `tensor` (0: the input, `i + 1`: output of layer `i`); a flatten layer's
    /// output shares its input's buffer.
    Activation {
        /// Model tensor index.
        tensor: usize,
    },
    /// Error `dL/d tensor`, complete (all consumers' contributions summed).
    Error {
        /// Model tensor index.
        tensor: usize,
    },
    /// One consumer's contribution to `dL/d tensor`, summed into an [`TensorRole::Error`] by an
    /// [`StepOp::AccumulateError`] step.
    ErrorPart {
        /// Model tensor index.
        tensor: usize,
    },
    /// Weights of a layer.
    Weight {
        /// Layer index.
        layer: usize,
    },
    /// Bias of a layer.
    Bias {
        /// Layer index.
        layer: usize,
    },
    /// Weight gradient of the trained channels of a layer (`f32`).
    WeightGrad {
        /// Layer index.
        layer: usize,
    },
    /// Bias gradient of a layer (`f32`).
    BiasGrad {
        /// Layer index.
        layer: usize,
    },
    /// Optimizer state of a layer's weights: FQT gradient statistics per trained channel, or
    /// the float momentum velocity.
    OptimizerState {
        /// Layer index.
        layer: usize,
    },
    /// Kernel scratch of one step (the row windows of a [`StepOp::StreamedForward`]).
    Scratch {
        /// Step index.
        step: usize,
    },
    /// The clamp mask of an activation (one bit per element), kept for the backward pass
    /// instead of the activation when only the activation mask reads it.
    ClampMask {
        /// Model tensor index.
        tensor: usize,
    },
}

/// Memory report categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Activations that some backward step reads (kept from the forward pass).
    SavedActivation,
    /// Activations only the forward pass (or the loss) reads.
    ForwardActivation,
    /// Error tensors and error contributions.
    Error,
    /// Trained weights and biases (SRAM copies).
    TrainedWeight,
    /// Gradient buffers and optimizer state.
    GradientAndState,
    /// Kernel scratch buffers.
    Scratch,
    /// Frozen weights and biases, read in place from flash.
    FrozenWeight,
}

impl Category {
    /// The categories held in SRAM, in report order.
    pub const SRAM: [Category; 6] = [
        Category::SavedActivation,
        Category::ForwardActivation,
        Category::Error,
        Category::TrainedWeight,
        Category::GradientAndState,
        Category::Scratch,
    ];

    /// Name used in reports and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Category::SavedActivation => "saved_activations",
            Category::ForwardActivation => "forward_activations",
            Category::Error => "error_tensors",
            Category::TrainedWeight => "trained_weights",
            Category::GradientAndState => "gradients_and_optimizer_state",
            Category::Scratch => "scratch",
            Category::FrozenWeight => "frozen_weights",
        }
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In the SRAM arena at `offset`.
    Arena {
        /// Byte offset in the arena, a multiple of [`ALIGN`].
        offset: usize,
    },
    /// Read in place from flash (frozen parameters).
    Flash,
}

/// One tensor of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanTensor {
    /// What it holds.
    pub role: TensorRole,
    /// Report category.
    pub category: Category,
    /// Layer it belongs to (`None`: the model input and its error).
    pub layer: Option<usize>,
    /// Exact size in bytes (in the arena, or in flash for a frozen parameter).
    pub bytes: usize,
    /// Bytes of its contents in flash: a frozen parameter, or the initial value of a trained
    /// one, which for an int8 layer that trains a strict subset of its weight channels is the
    /// whole weight tensor while only the trained channels (`bytes`) are in the arena; 0 for
    /// tensors that are not parameters.
    pub flash_bytes: usize,
    /// Kept across samples and batches (trained parameters, optimizer state, and gradient
    /// accumulators at batch > 1): live over the whole plan.
    pub persistent: bool,
    /// Arena offset or flash.
    pub placement: Placement,
}

/// The kernel call of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOp {
    /// Copy (quantize) one sample into the input tensor.
    LoadInput,
    /// Forward of a layer.
    Forward,
    /// Softmax cross-entropy: logits to the output error.
    Loss,
    /// Zero the error where the layer's output sits at its clamp bounds (in place, or into a
    /// copy when the error buffer is shared).
    ActivationMask,
    /// Input error of a layer from its output error.
    InputError,
    /// Sum two contributions to one tensor's error (a tensor read by two layers).
    AccumulateError,
    /// Weight gradient of the trained channels (adds into the gradient buffer).
    WeightGrad,
    /// Bias gradient (adds into the gradient buffer).
    BiasGrad,
    /// Weight update from the gradient (runs after the last sample of a batch).
    WeightUpdate,
    /// Bias update from the gradient (runs after the last sample of a batch).
    BiasUpdate,
    /// Forward of a chain of frozen convolutions, from the step's layer to the layer whose
    /// output it writes, computed a few rows at a time: the intermediate activations exist
    /// only as row windows in the step's scratch (`mcutrain_core::ops::stream`).
    StreamedForward,
    /// The 1-bit clamp mask of the layer's output, which its activation mask step reads
    /// instead of the output.
    ClampMask,
}

impl StepOp {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            StepOp::LoadInput => "load input",
            StepOp::Forward => "forward",
            StepOp::Loss => "loss",
            StepOp::ActivationMask => "activation mask",
            StepOp::InputError => "input error",
            StepOp::AccumulateError => "accumulate error",
            StepOp::WeightGrad => "weight gradient",
            StepOp::BiasGrad => "bias gradient",
            StepOp::WeightUpdate => "weight update",
            StepOp::BiasUpdate => "bias update",
            StepOp::StreamedForward => "row-streamed forward",
            StepOp::ClampMask => "clamp mask",
        }
    }

    /// True for the steps after the forward pass and the loss.
    pub fn is_backward(self) -> bool {
        !matches!(
            self,
            StepOp::LoadInput
                | StepOp::Forward
                | StepOp::StreamedForward
                | StepOp::ClampMask
                | StepOp::Loss
        )
    }
}

/// One kernel call of the training step of a sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What runs.
    pub op: StepOp,
    /// The layer it belongs to (`None` for loading the input and the loss).
    pub layer: Option<usize>,
    /// Tensors read.
    pub reads: Vec<TensorId>,
    /// Tensors written (a tensor both read and written is updated in place).
    pub writes: Vec<TensorId>,
    /// The step's kernel scratch buffer, if its kernel needs one.
    pub scratch: Option<TensorId>,
}

/// A compiled training step: run `steps` in order for every sample of a batch (update steps
/// only after the last sample), with every arena tensor at its offset.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPlan {
    /// Element sizes.
    pub precision: Precision,
    /// Samples per update.
    pub batch: usize,
    /// Updates applied as soon as their gradient exists (operator reordering).
    pub reorder: bool,
    /// What each layer trains.
    pub updates: Vec<LayerUpdate>,
    /// Tensor table.
    pub tensors: Vec<PlanTensor>,
    /// Kernel calls in order.
    pub steps: Vec<Step>,
    /// Arena size: the highest `offset + aligned(bytes)` of the arena tensors.
    pub arena_bytes: usize,
    /// Largest sum of aligned bytes live at one step: no arena can be smaller.
    pub lower_bound_bytes: usize,
}

impl TrainingPlan {
    /// Bytes read from flash: frozen weights and biases, plus the initial values of the
    /// trained ones (copied to SRAM at start). Code size is not included.
    pub fn flash_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.flash_bytes).sum()
    }
}
