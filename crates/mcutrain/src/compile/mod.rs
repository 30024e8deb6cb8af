//! The training-graph compiler and static memory planner (the "Tiny Training Engine" of
//! Lin et al., "On-Device Training Under 256KB Memory", NeurIPS 2022).
//!
//! A model plus an update scheme is compiled ahead of time into a [`TrainingPlan`]: the ordered
//! kernel calls of one training sample (forward, loss, pruned backward, updates), the tensors
//! they read and write, and an offset for every SRAM tensor in one arena. The plan's peak is
//! known exactly before anything runs.
//!
//! - [`graph`]: the compiler (backward derivation, pruning, operator reordering);
//! - [`liveness`]: tensor lifetimes over the step list and the lower bound of any arena;
//! - [`arena`]: offsets that minimise the arena's peak;
//! - [`report`]: the memory report of `mcutrain plan`;
//! - [`plan_file`]: the plan file the device executor runs, its sizes, and the trained
//!   parameters read back from an arena.
//!
//! The plan is plain data (vectors of steps holding tensor ids, a tensor table with sizes and
//! offsets) in the vocabulary of the plan files ([`StepOp`], [`TensorRole`], [`Precision`] are
//! `mcutrain-core`'s), so that [`plan_file`] writes it as it is. What each step reads and
//! writes comes from the layer contract ([`mcutrain_core::plan::operands`]), the same
//! description the plan validator and the executor use.

pub mod arena;
pub mod graph;
pub mod liveness;
pub mod plan_file;
pub mod report;

pub use crate::model::LayerUpdate;
pub use graph::{compile, compile_streaming, CompileError, PlanOptions, RowStreaming};
pub use mcutrain_core::plan::{Precision, StepOp, TensorRole};

/// Arena offsets and sizes are multiples of this many bytes.
pub const ALIGN: usize = 4;

/// `bytes` rounded up to [`ALIGN`].
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Index of a tensor in [`TrainingPlan::tensors`].
pub type TensorId = usize;

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
    /// The model tensor, layer or step the role refers to (see [`TensorRole`]).
    pub index: usize,
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
