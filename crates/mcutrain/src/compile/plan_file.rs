//! Plan files for the device: a [`TrainingPlan`] and an int8 or float32 [`Model`] written in
//! the format of [`mcutrain_core::plan`], their sizes ([`PlanSizes`], the numbers every budget
//! check counts), and the trained parameters read back from an arena.
//!
//! The bytes are deterministic (equal inputs give equal files). The record layouts and the
//! vocabulary (steps, tensor roles, precision, layer kinds) are the core crate's, so the plan
//! is written as it is:
//! - the precision byte is the model's (0 int8, 1 float32); the blob holds int8 weight codes
//!   and `i32` biases, or `f32` weights and biases (little-endian, each 4-byte aligned);
//! - every layer gets its kind as the layer contract encodes it;
//! - every model tensor gets its shape, range owner and the model's initial trackers (empty
//!   trackers in a float32 plan, which tracks no ranges);
//! - every arena tensor gets its lifetime (the compiler's liveness: first to last step that
//!   touches it, every step for tensors kept across samples), which the reader checks;
//! - every error tensor of an int8 plan gets its quantization source, found by following the
//!   steps: the loss writes the logits error in the sample's loss range, an input error or a
//!   sum of contributions to model tensor `t` is written with `t`'s error tracker, and a
//!   masked copy keeps the quantization of the error it copies ([`NONE`] in a float32 plan);
//! - int8: the training state of each trained layer is placed after the model tensors' state
//!   (with exact error ranges, after their error quantization too), then the partial-update
//!   score scratch (sized for the widest layer); float32: the state region is the 8-byte
//!   header alone (sample counter, learning rate) ([`StateLayout`]).

use super::{liveness, Placement, TrainingPlan};
use crate::model::{Architecture, LayerUpdate, Model, Params, QuantLayer, ResolvedLayer};
use mcutrain_core::plan::{
    self as file, exec, layer_state_bytes, state_bytes_at_least, ErrorRanges, Header, LayerRecord,
    ModelTensorRecord, PlanView, Precision, StepOp, StepRecord, TensorRecord, TensorRole,
    TrainConfig, HEADER_BYTES, LOSS_QUANT, MAX_READS, MAX_WRITES, NONE, NO_OFFSET, VERSION,
};
use mcutrain_core::quant::{QParams, RangeEma};

/// Why a plan file cannot be written or read back.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum PlanFileError {
    /// The model's and the plan's precisions differ.
    #[error("the model is {model} but the plan was compiled for {plan}; compile with --precision {model} (or pass a {plan} model)")]
    PrecisionMismatch {
        /// The model's precision name.
        model: &'static str,
        /// The plan's.
        plan: &'static str,
    },
    /// The model or the hyper-parameters ask for something a float32 plan does not do.
    #[error("float32 plans: {0}")]
    FloatConfig(String),
    /// A layer has per-channel weight quantization.
    #[error("layer {0} has per-channel weight scales; fully quantized training needs one weight range per tensor")]
    PerChannel(usize),
    /// The plan does not belong to the model.
    #[error("the plan does not fit the model: {0}")]
    Mismatch(String),
    /// A count, size or dimension exceeds the format's fields.
    #[error("the plan exceeds the file format: {0}")]
    TooLarge(String),
    /// The file or arena could not be read.
    #[error("reading the plan: {0}")]
    Read(String),
    /// A plan file does not validate.
    #[error("the plan file is not valid: {0}")]
    Invalid(#[from] mcutrain_core::plan::PlanError),
}

/// The plan-file hyper-parameters of float32 SGD (`engine::float::FloatTrainConfig`'s peak
/// learning rate and momentum; momentum 0 for a plan compiled without velocities).
pub fn float_train_config(lr: f32, momentum: f32) -> TrainConfig {
    TrainConfig {
        lr,
        activation_rate: 0.0,
        error_rate: 0.0,
        weight_rate: 0.0,
        stats_rate: 0.0,
        eps: 0.0,
        partial: None,
        momentum,
        error_ranges: ErrorRanges::Tracked,
    }
}

/// The precision of a model's parameters.
fn params_precision(params: &Params) -> Precision {
    match params {
        Params::Float(_) => Precision::Float32,
        Params::Int8(_) => Precision::Int8,
    }
}

fn narrow<T: TryFrom<usize>>(value: usize, what: &str) -> Result<T, PlanFileError> {
    T::try_from(value).map_err(|_| PlanFileError::TooLarge(format!("{what} = {value}")))
}

/// Where the training state of each layer lies in the state region of a plan, and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLayout {
    /// Per layer, its state offset ([`NO_OFFSET`] when it keeps none).
    pub layer_offsets: Vec<u32>,
    /// Offset of the partial-update score scratch ([`NO_OFFSET`] without partial updates).
    pub scores_offset: u32,
    /// Bytes of the region.
    pub bytes: usize,
}

impl StateLayout {
    /// The state region of a plan of `precision` over `layers` (at batch 1) that trains what
    /// `updates` says, with the hyper-parameters `config`: int8 model tensors' trackers (and
    /// error quantization with exact error ranges), then each trained layer's state, then the
    /// score scratch; float32 the header alone.
    pub fn of(
        precision: Precision,
        layers: &[ResolvedLayer],
        updates: &[LayerUpdate],
        config: &TrainConfig,
    ) -> Result<StateLayout, PlanFileError> {
        let partial = config.partial.is_some();
        let mut bytes = state_bytes_at_least(precision, layers.len() + 1, config.error_ranges);
        let mut layer_offsets = vec![NO_OFFSET; layers.len()];
        let channels = |l: &ResolvedLayer| l.params().map_or(0, |p| p.channels);
        if precision == Precision::Int8 {
            for (i, (layer, update)) in layers.iter().zip(updates).enumerate() {
                if update.any() {
                    layer_offsets[i] = narrow(bytes, "state offset")?;
                    bytes += layer_state_bytes(channels(layer), partial);
                }
            }
        }
        let scores_offset = if partial {
            let at = bytes;
            bytes += layers.iter().map(channels).max().unwrap_or(0) * 4;
            narrow(at, "score offset")?
        } else {
            NO_OFFSET
        };
        Ok(StateLayout {
            layer_offsets,
            scores_offset,
            bytes,
        })
    }
}

/// Offsets of the sections of a plan file with `layers` layers, `tensors` tensors and `steps`
/// steps; the parameter blob starts at `blob`.
struct Sections {
    blob: usize,
}

impl Sections {
    fn of(layers: usize, tensors: usize, steps: usize) -> Sections {
        let tensors_at = HEADER_BYTES
            + layers * file::LAYER_BYTES
            + (layers + 1) * file::MODEL_TENSOR_BYTES
            + tensors * file::TENSOR_BYTES;
        Sections {
            blob: tensors_at + steps * file::STEP_BYTES,
        }
    }
}

/// The memory a plan takes on the device: its file in flash, its arena in SRAM. The budget
/// checks of `mcutrain plan` and of a device run count these same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSizes {
    /// Bytes of the plan file (embedded as a constant).
    pub file_bytes: u64,
    /// Bytes of the planned tensors (the plan's peak, rounded up to 4).
    pub tensor_bytes: u64,
    /// Bytes of the training state after them (range trackers, weight quantization, partial
    /// update lists).
    pub state_bytes: u64,
}

impl PlanSizes {
    /// The sizes of a plan file.
    pub fn of(plan: &[u8]) -> Result<PlanSizes, PlanFileError> {
        let aligned = AlignedBytes::copy_of(plan);
        let view = PlanView::parse(aligned.as_slice())?;
        Ok(PlanSizes {
            file_bytes: plan.len() as u64,
            tensor_bytes: view.state_offset() as u64,
            state_bytes: view.header().state_bytes as u64,
        })
    }

    /// The sizes of the plan file [`write()`] makes of `plan`, compiled for `arch`, with the
    /// hyper-parameters `config` (whatever the parameter values).
    pub fn planned(
        arch: &Architecture,
        plan: &TrainingPlan,
        config: &TrainConfig,
    ) -> Result<PlanSizes, PlanFileError> {
        let layers = arch
            .resolved(1)
            .map_err(|e| PlanFileError::Mismatch(e.to_string()))?;
        let state = StateLayout::of(plan.precision, &layers, &plan.updates, config)?;
        let element = plan.precision.element_bytes();
        let blob: usize = layers
            .iter()
            .filter_map(|l| l.params())
            .map(|p| (p.weight_len() * element).div_ceil(4) * 4 + p.channels * 4)
            .sum();
        let sections = Sections::of(layers.len(), plan.tensors.len(), plan.steps.len());
        Ok(PlanSizes {
            file_bytes: (sections.blob + blob) as u64,
            tensor_bytes: super::aligned(plan.arena_bytes) as u64,
            state_bytes: state.bytes as u64,
        })
    }

    /// Bytes of the static arena: planned tensors and training state.
    pub fn arena_bytes(&self) -> u64 {
        self.tensor_bytes + self.state_bytes
    }

    /// `arena N (planned tensors T + training state S)`.
    pub fn describe_arena(&self) -> String {
        format!(
            "arena {} (planned tensors {} + training state {})",
            self.arena_bytes(),
            self.tensor_bytes,
            self.state_bytes
        )
    }
}

/// The plan file of `plan` (compiled for `model`'s architecture) with `model`'s parameters and
/// the hyper-parameters `config`.
pub fn write(
    plan: &TrainingPlan,
    model: &Model,
    config: &TrainConfig,
) -> Result<Vec<u8>, PlanFileError> {
    let precision = params_precision(&model.params);
    if plan.precision != precision {
        return Err(PlanFileError::PrecisionMismatch {
            model: precision.name(),
            plan: plan.precision.name(),
        });
    }
    let mismatch = |e: crate::model::ModelError| PlanFileError::Mismatch(e.to_string());
    model.validate().map_err(mismatch)?;
    let arch = &model.arch;
    let n = arch.layers.len();
    if plan.updates.len() != n {
        return Err(PlanFileError::Mismatch(format!(
            "{} layer updates for {n} layers",
            plan.updates.len()
        )));
    }
    if precision == Precision::Float32 {
        check_float_config(plan, config)?;
    }
    let layers = arch.resolved(1).map_err(mismatch)?;
    let state = StateLayout::of(precision, &layers, &plan.updates, config)?;
    let sections = Sections::of(n, plan.tensors.len(), plan.steps.len());
    let (blob, contents) = parameter_blob(&model.params, sections.blob)?;
    let tensors = tensor_records(plan, &contents)?;
    let quant_layers = match &model.params {
        Params::Int8(state) => Some(&state.layers),
        Params::Float(_) => None,
    };
    let mut layer_records = Vec::with_capacity(n * file::LAYER_BYTES);
    for (i, layer) in arch.layers.iter().enumerate() {
        let q = quant_layers.map(|layers| &layers[i]);
        let update = plan.updates[i];
        let ids = tensors.param_ids[i];
        let record = layer_record(layer.kind, q, update, ids, state.layer_offsets[i])?;
        let bytes = record.encode().ok_or_else(|| {
            PlanFileError::TooLarge(format!(
                "layer {i} ({}) has a field above 65535",
                layer.name
            ))
        })?;
        layer_records.extend(bytes);
    }
    let step_records = step_records(plan)?;
    let lowest = plan
        .updates
        .iter()
        .position(|u| u.any())
        .ok_or_else(|| PlanFileError::Mismatch("the plan trains nothing".into()))?;
    let file_bytes = sections.blob + blob.len();
    let header = Header {
        version: VERSION,
        file_bytes: narrow(file_bytes, "file bytes")?,
        crc: 0,
        precision,
        batch: narrow(plan.batch, "batch")?,
        reorder: plan.reorder,
        layer_count: narrow(n, "layers")?,
        tensor_count: narrow(plan.tensors.len(), "tensors")?,
        step_count: narrow(plan.steps.len(), "steps")?,
        classes: narrow(arch.classes, "classes")?,
        lowest_layer: narrow(lowest, "layer")?,
        arena_bytes: narrow(plan.arena_bytes, "arena bytes")?,
        lower_bound_bytes: narrow(plan.lower_bound_bytes, "lower bound")?,
        state_bytes: narrow(state.bytes, "state bytes")?,
        scores_offset: state.scores_offset,
        blob_offset: narrow(sections.blob, "blob offset")?,
        blob_bytes: narrow(blob.len(), "blob bytes")?,
        config: *config,
    };
    if header.layer_count as usize + 1 >= LOSS_QUANT as usize || header.tensor_count >= LOSS_QUANT {
        return Err(PlanFileError::TooLarge(format!(
            "{n} layers and {} tensors",
            plan.tensors.len()
        )));
    }
    let mut bytes = Vec::with_capacity(file_bytes);
    bytes.extend(header.encode());
    bytes.extend(layer_records);
    bytes.extend(model_tensor_records(model)?);
    bytes.extend(tensors.bytes);
    bytes.extend(step_records);
    bytes.extend(blob);
    debug_assert_eq!(bytes.len(), file_bytes);
    file::seal(&mut bytes).ok_or_else(|| PlanFileError::TooLarge("file size".into()))?;
    Ok(bytes)
}

/// File offsets of one layer's weights and bias in the blob.
#[derive(Clone, Copy)]
struct ParamOffsets {
    weight: usize,
    bias: usize,
}

/// The parameter blob, which starts at file offset `at`: weights then bias of every layer with
/// parameters, each 4-byte aligned; and per layer the file offsets of its weights and bias.
fn parameter_blob(
    params: &Params,
    at: usize,
) -> Result<(Vec<u8>, Vec<Option<ParamOffsets>>), PlanFileError> {
    let mut blob: Vec<u8> = Vec::new();
    let mut contents = Vec::new();
    for layer in parameter_blobs(params)? {
        let Some(layer) = layer else {
            contents.push(None);
            continue;
        };
        let weight = at + blob.len();
        blob.extend(&layer.weight);
        blob.resize(blob.len().div_ceil(4) * 4, 0);
        let bias = at + blob.len();
        blob.extend(&layer.bias);
        contents.push(Some(ParamOffsets { weight, bias }));
    }
    Ok((blob, contents))
}

/// The tensor records of a plan, and per layer the ids of its weight and bias tensors
/// ([`NONE`] without parameters).
struct TensorSection {
    bytes: Vec<u8>,
    param_ids: Vec<(u16, u16)>,
}

/// The tensor records of `plan`: parameters at their blob `contents`, the error tensors of an
/// int8 plan with their quantization source.
fn tensor_records(
    plan: &TrainingPlan,
    contents: &[Option<ParamOffsets>],
) -> Result<TensorSection, PlanFileError> {
    let quant = match plan.precision {
        Precision::Int8 => error_quantization(plan)?,
        Precision::Float32 => vec![NONE; plan.tensors.len()],
    };
    let lifetimes = liveness::lifetimes(&plan.tensors, &plan.steps);
    let mut param_ids = vec![(NONE, NONE); plan.updates.len()];
    let mut bytes = Vec::with_capacity(plan.tensors.len() * file::TENSOR_BYTES);
    for (id, tensor) in plan.tensors.iter().enumerate() {
        let param = |which: fn(ParamOffsets) -> usize| match contents.get(tensor.index) {
            Some(Some(offsets)) => Ok(which(*offsets)),
            _ => Err(PlanFileError::Mismatch(format!(
                "tensor {id} holds parameters of a layer without any"
            ))),
        };
        let flash_offset = match tensor.role {
            TensorRole::Weight => {
                param_ids[tensor.index].0 = narrow(id, "tensor id")?;
                Some(narrow(param(|o| o.weight)?, "blob offset")?)
            }
            TensorRole::Bias => {
                param_ids[tensor.index].1 = narrow(id, "tensor id")?;
                Some(narrow(param(|o| o.bias)?, "blob offset")?)
            }
            _ => None,
        };
        let arena_offset = match tensor.placement {
            Placement::Arena { offset } => Some(narrow(offset, "arena offset")?),
            Placement::Flash => None,
        };
        let lifetime = match lifetimes[id] {
            Some(life) => Some((narrow(life.first, "step")?, narrow(life.last, "step")?)),
            None => None,
        };
        let record = TensorRecord {
            role: tensor.role,
            index: narrow(tensor.index, "tensor index")?,
            quant: quant[id],
            bytes: narrow(tensor.bytes, "tensor bytes")?,
            arena_offset,
            flash_offset,
            lifetime,
        };
        bytes.extend(record.encode());
    }
    Ok(TensorSection { bytes, param_ids })
}

/// The model tensor records: shapes, range owners and the int8 model's initial trackers.
fn model_tensor_records(model: &Model) -> Result<Vec<u8>, PlanFileError> {
    let arch = &model.arch;
    let mismatch = |e: crate::model::ModelError| PlanFileError::Mismatch(e.to_string());
    let shapes = arch.shapes().map_err(mismatch)?;
    let owners = arch.range_owners().map_err(mismatch)?;
    let trackers = |t: usize| match &model.params {
        Params::Int8(state) => (state.activations[t], state.errors[t]),
        Params::Float(_) => (RangeEma::new(), RangeEma::new()),
    };
    let mut bytes = Vec::with_capacity(shapes.len() * file::MODEL_TENSOR_BYTES);
    for (t, shape) in shapes.iter().enumerate() {
        let (activation, error) = trackers(t);
        let record = ModelTensorRecord {
            shape: [
                narrow(shape[0], "channels")?,
                narrow(shape[1], "height")?,
                narrow(shape[2], "width")?,
            ],
            range_owner: narrow(owners[t], "tensor index")?,
            activation,
            error,
        };
        bytes.extend(record.encode());
    }
    Ok(bytes)
}

/// The step records of `plan`.
fn step_records(plan: &TrainingPlan) -> Result<Vec<u8>, PlanFileError> {
    let mut bytes = Vec::with_capacity(plan.steps.len() * file::STEP_BYTES);
    for (s, step) in plan.steps.iter().enumerate() {
        let mut reads = [NONE; MAX_READS];
        let mut writes = [NONE; MAX_WRITES];
        if step.reads.len() > MAX_READS || step.writes.len() > MAX_WRITES {
            return Err(PlanFileError::TooLarge(format!(
                "step {s} has {} reads and {} writes",
                step.reads.len(),
                step.writes.len()
            )));
        }
        for (slot, &id) in reads.iter_mut().zip(&step.reads) {
            *slot = narrow(id, "tensor id")?;
        }
        for (slot, &id) in writes.iter_mut().zip(&step.writes) {
            *slot = narrow(id, "tensor id")?;
        }
        let record = StepRecord {
            op: step.op,
            layer: step.layer.map_or(Ok(NONE), |l| narrow(l, "layer"))?,
            reads,
            writes,
            scratch: step
                .scratch
                .map_or(Ok(NONE), |id| narrow(id, "tensor id"))?,
        };
        bytes.extend(record.encode());
    }
    Ok(bytes)
}

/// One layer's parameters as blob bytes.
struct LayerBlob {
    /// Weight codes, or little-endian `f32` weights.
    weight: Vec<u8>,
    /// Little-endian `i32` or `f32` bias.
    bias: Vec<u8>,
}

/// The blob bytes of every layer with parameters (`None` for the others); int8 layers must
/// have one weight range per tensor.
fn parameter_blobs(params: &Params) -> Result<Vec<Option<LayerBlob>>, PlanFileError> {
    let floats = |values: &[f32]| values.iter().flat_map(|v| v.to_le_bytes()).collect();
    match params {
        Params::Int8(state) => state
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                if layer.bias.is_empty() {
                    return Ok(None);
                }
                if layer.weight_q.len() != 1 {
                    return Err(PlanFileError::PerChannel(i));
                }
                Ok(Some(LayerBlob {
                    weight: layer.weight.iter().map(|&w| w as u8).collect(),
                    bias: layer.bias.iter().flat_map(|b| b.to_le_bytes()).collect(),
                }))
            })
            .collect(),
        Params::Float(layers) => Ok(layers
            .iter()
            .map(|layer| {
                (!layer.bias.is_empty()).then(|| LayerBlob {
                    weight: floats(&layer.weight),
                    bias: floats(&layer.bias),
                })
            })
            .collect()),
    }
}

/// A float32 plan runs SGD without partial updates or error quantization, with a velocity per
/// trained parameter exactly when the momentum is not 0, and a momentum in `[0, 1)`.
fn check_float_config(plan: &TrainingPlan, config: &TrainConfig) -> Result<(), PlanFileError> {
    if config.partial.is_some() {
        return Err(PlanFileError::FloatConfig(
            "dynamic partial updates are an int8 (FQT) feature; drop --partial".into(),
        ));
    }
    if config.error_ranges != ErrorRanges::Tracked {
        return Err(PlanFileError::FloatConfig(
            "exact error ranges apply to int8 (FQT) errors; float32 errors are not quantized (use ErrorRanges::Tracked)".into(),
        ));
    }
    if !(0.0..1.0).contains(&config.momentum) {
        return Err(PlanFileError::FloatConfig(format!(
            "the momentum must be in [0, 1), got {}",
            config.momentum
        )));
    }
    let has_velocity = plan.tensors.iter().any(|t| {
        matches!(
            t.role,
            TensorRole::OptimizerState | TensorRole::BiasOptimizerState
        )
    });
    if has_velocity != (config.momentum != 0.0) {
        return Err(PlanFileError::FloatConfig(format!(
            "momentum {} needs a plan compiled {} velocity buffers (PlanOptions::momentum = {})",
            config.momentum,
            if has_velocity { "without" } else { "with" },
            !has_velocity
        )));
    }
    Ok(())
}

/// The layer record of one layer; `q` is its int8 quantization (`None` in a float32 plan,
/// whose records hold neutral values there: bias scale 1, weight scale 1, zero point 0, an
/// empty range tracker).
fn layer_record(
    kind: mcutrain_core::layer::LayerKind,
    q: Option<&QuantLayer>,
    update: LayerUpdate,
    (weight_tensor, bias_tensor): (u16, u16),
    state_offset: u32,
) -> Result<LayerRecord, PlanFileError> {
    Ok(LayerRecord {
        kind,
        trains_bias: update.bias,
        weight_channels: narrow(update.weight_channels, "weight channels")?,
        weight_tensor,
        bias_tensor,
        state_offset,
        bias_scale: q.map_or(1.0, |q| q.bias_scale),
        weight_q: q
            .and_then(|q| q.weight_q.first().copied())
            .unwrap_or(QParams {
                scale: 1.0,
                zero_point: 0,
            }),
        weight_range: match q {
            Some(q) if !q.bias.is_empty() => q.weight_range,
            _ => RangeEma::new(),
        },
    })
}

/// The quantization source of every tensor ([`TensorRecord::quant`]), following the steps
/// (see the module documentation); [`NONE`] for tensors that are not errors.
fn error_quantization(plan: &TrainingPlan) -> Result<Vec<u16>, PlanFileError> {
    let mut quant = vec![NONE; plan.tensors.len()];
    for step in &plan.steps {
        let Some(&written) = step.writes.first() else {
            continue;
        };
        let tensor = &plan.tensors[written];
        let source = match step.op {
            StepOp::Loss => LOSS_QUANT,
            StepOp::InputError | StepOp::AccumulateError if tensor.role.is_error() => {
                narrow(tensor.index, "tensor index")?
            }
            StepOp::ActivationMask => quant[step.reads[1]],
            _ => continue,
        };
        quant[written] = source;
    }
    let missing = plan
        .tensors
        .iter()
        .zip(&quant)
        .position(|(t, &q)| t.role.is_error() && q == NONE);
    match missing {
        Some(id) => Err(PlanFileError::Mismatch(format!(
            "error tensor {id} is never written"
        ))),
        None => Ok(quant),
    }
}

/// `base` with the parameters and range trackers trained on a device: trained weights,
/// biases, weight quantization and range trackers (int8) or weights and biases (float32) from
/// `arena` (prepared by [`exec::init`] for `view` and trained since), frozen ones as they are
/// in the plan.
pub fn trained_model(view: &PlanView, arena: &[u8], base: &Model) -> Result<Model, PlanFileError> {
    let mut model = base.clone();
    let plan_precision = view.precision();
    let model_precision = params_precision(&model.params);
    if plan_precision != model_precision {
        return Err(PlanFileError::PrecisionMismatch {
            model: model_precision.name(),
            plan: plan_precision.name(),
        });
    }
    let n = view.layer_count();
    let layers = match &model.params {
        Params::Int8(state) => state.layers.len(),
        Params::Float(layers) => layers.len(),
    };
    if layers != n {
        return Err(PlanFileError::Mismatch(format!(
            "the plan has {n} layers, the model {layers}"
        )));
    }
    if arena.len() < view.arena_required() {
        return Err(PlanFileError::Read(format!(
            "the arena has {} bytes, the plan needs {}",
            arena.len(),
            view.arena_required()
        )));
    }
    let other_sizes = |i: usize| {
        PlanFileError::Mismatch(format!("layer {i} has other parameter sizes in the plan"))
    };
    let unreadable = |i: usize| PlanFileError::Read(format!("layer {i}'s parameters"));
    let state = match &mut model.params {
        Params::Int8(state) => state,
        Params::Float(layers) => {
            for (i, layer) in layers.iter_mut().enumerate() {
                if layer.bias.is_empty() {
                    continue;
                }
                let params =
                    exec::float_layer_params(view, arena, i).ok_or_else(|| unreadable(i))?;
                if params.weight.len() != layer.weight.len()
                    || params.bias.len() != layer.bias.len()
                {
                    return Err(other_sizes(i));
                }
                layer.weight = params.weight.to_vec();
                layer.bias = params.bias.to_vec();
            }
            return Ok(model);
        }
    };
    for (i, layer) in state.layers.iter_mut().enumerate() {
        if layer.bias.is_empty() {
            continue;
        }
        let params = exec::layer_params(view, arena, i).ok_or_else(|| unreadable(i))?;
        let weight_len = params.weight.len() + params.frozen_weight.len();
        if weight_len != layer.weight.len() || params.bias.len() != layer.bias.len() {
            return Err(other_sizes(i));
        }
        layer.weight = [params.weight, params.frozen_weight].concat();
        layer.weight_q = vec![params.weight_q];
        layer.weight_range = params.weight_range;
        layer.bias = params.bias.to_vec();
        layer.bias_scale = params.bias_scale;
    }
    for t in 0..=n {
        let (activation, error) = exec::range_trackers(view, arena, t)
            .ok_or_else(|| PlanFileError::Read(format!("tensor {t}'s range trackers")))?;
        state.activations[t] = activation;
        state.errors[t] = error;
    }
    Ok(model)
}

/// Bytes that start at a 4-byte aligned address, as plan files and arenas must (they hold
/// `i32` and `f32` values read in place).
#[derive(Debug)]
pub struct AlignedBytes {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + 3];
        let start = (4 - storage.as_ptr() as usize % 4) % 4;
        AlignedBytes {
            storage,
            start,
            len,
        }
    }

    /// A 4-byte aligned copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut aligned = AlignedBytes::zeroed(bytes.len());
        aligned.as_mut_slice().copy_from_slice(bytes);
        aligned
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Clone for AlignedBytes {
    /// A copy in new storage, aligned again (a plain copy of the storage could move the
    /// aligned start).
    fn clone(&self) -> Self {
        AlignedBytes::copy_of(self.as_slice())
    }
}
