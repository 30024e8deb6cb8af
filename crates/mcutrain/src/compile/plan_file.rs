//! Plan files for the device: a [`TrainingPlan`] and an int8 or float32 [`Model`] written in
//! the format of [`mcutrain_core::plan`], and the trained parameters read back from an arena.
//!
//! The bytes are deterministic (equal inputs give equal files). The record layouts are the
//! core crate's; this module only maps the compiler's plan onto them:
//! - the precision byte is the model's (0 int8, 1 float32); the blob holds int8 weight codes
//!   and `i32` biases, or `f32` weights and biases (little-endian, each 4-byte aligned);
//! - every model tensor gets its shape, range owner and the model's initial trackers (empty
//!   trackers in a float32 plan, which tracks no ranges);
//! - every arena tensor gets its lifetime (the compiler's liveness: first to last step that
//!   touches it, every step for tensors kept across samples), which the reader checks;
//! - every error tensor of an int8 plan gets its quantization source, found by following the
//!   steps: the loss writes the logits error in the sample's loss range, an input error or a
//!   sum of contributions to model tensor `t` is written with `t`'s error tracker, and a
//!   masked copy keeps the quantization of the error it copies ([`NONE`] in a float32 plan);
//! - the optimizer state of a bias update (a float32 momentum velocity) becomes the file's
//!   `BiasOptimizerState`, that of a weight update its `OptimizerState`;
//! - int8: the training state of each trained layer is placed after the model tensors' state,
//!   then the partial-update score scratch (sized for the widest layer); float32: the state
//!   region is the 8-byte header alone (sample counter, learning rate).

use super::{liveness, Placement, Precision, StepOp, TensorRole, TrainingPlan};
use crate::engine::fqt::{FqtConfig, QuantNet};
use crate::model::{LayerKind, Model, Params, QuantLayer};
use mcutrain_core::plan::{
    self as file, exec, layer_state_bytes, state_bytes_at_least, Header, LayerRecord,
    ModelTensorRecord, PartialUpdate, PlanView, StepRecord, TensorRecord, TrainConfig,
    HEADER_BYTES, LOSS_QUANT, MAX_READS, MAX_WRITES, NONE, NO_OFFSET, VERSION,
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
}

/// The plan-file hyper-parameters of a host FQT configuration (the same learning rate,
/// moving-average rates and partial updates; `eps` is the reference trainer's `1e-12`).
pub fn train_config(cfg: &FqtConfig) -> TrainConfig {
    TrainConfig {
        lr: cfg.lr,
        activation_rate: cfg.activation_rate,
        error_rate: cfg.error_rate,
        weight_rate: cfg.weight_rate,
        stats_rate: cfg.stats_rate,
        eps: 1e-12,
        partial: cfg.partial.map(|p| PartialUpdate {
            lambda_min: p.lambda_min,
            lambda_max: p.lambda_max,
        }),
        momentum: 0.0,
    }
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
    }
}

/// The precision name of a model's parameters.
fn params_precision(params: &Params) -> Precision {
    match params {
        Params::Float(_) => Precision::Float32,
        Params::Int8(_) => Precision::Int8,
    }
}

fn narrow<T: TryFrom<usize>>(value: usize, what: &str) -> Result<T, PlanFileError> {
    T::try_from(value).map_err(|_| PlanFileError::TooLarge(format!("{what} = {value}")))
}

/// The plan file of `plan` (compiled for `model`'s architecture) with `model`'s parameters and
/// the hyper-parameters `config`.
pub fn write(
    plan: &TrainingPlan,
    model: &Model,
    config: &TrainConfig,
) -> Result<Vec<u8>, PlanFileError> {
    let model_precision = params_precision(&model.params);
    if plan.precision != model_precision {
        return Err(PlanFileError::PrecisionMismatch {
            model: model_precision.name(),
            plan: plan.precision.name(),
        });
    }
    let precision = match plan.precision {
        Precision::Int8 => file::Precision::Int8,
        Precision::Float32 => file::Precision::Float32,
    };
    model
        .validate()
        .map_err(|e| PlanFileError::Mismatch(e.to_string()))?;
    let arch = &model.arch;
    let n = arch.layers.len();
    if plan.updates.len() != n {
        return Err(PlanFileError::Mismatch(format!(
            "{} layer updates for {n} layers",
            plan.updates.len()
        )));
    }
    let net = QuantNet::new(arch).map_err(|e| PlanFileError::Mismatch(e.to_string()))?;
    let shapes = arch
        .shapes()
        .map_err(|e| PlanFileError::Mismatch(e.to_string()))?;

    let blobs = parameter_blobs(&model.params)?;
    // Which optimizer states belong to a bias update (the rest to weight updates).
    let bias_states: Vec<usize> = plan
        .steps
        .iter()
        .filter(|s| s.op == StepOp::BiasUpdate)
        .filter_map(|s| s.writes.get(1).copied())
        .collect();
    if precision == file::Precision::Float32 {
        check_float_config(plan, config)?;
    }

    // Training state (int8): model tensors, then each trained layer, then the score scratch.
    let partial = config.partial.is_some();
    let int8 = precision == file::Precision::Int8;
    let mut state_bytes = state_bytes_at_least(precision, n + 1);
    let mut state_offsets = vec![NO_OFFSET; n];
    for (i, (update, blob)) in plan.updates.iter().zip(&blobs).enumerate() {
        if let (true, true, Some(blob)) = (int8, update.any(), blob) {
            state_offsets[i] = narrow(state_bytes, "state offset")?;
            state_bytes += layer_state_bytes(blob.channels, partial);
        }
    }
    let widest = blobs
        .iter()
        .flatten()
        .map(|b| b.channels)
        .max()
        .unwrap_or(0);
    let scores_offset = if partial {
        let at = state_bytes;
        state_bytes += widest * 4;
        narrow(at, "score offset")?
    } else {
        NO_OFFSET
    };

    // Parameter blob: weights then bias of every layer with parameters, 4-byte aligned.
    let tensors_at = HEADER_BYTES
        + n * file::LAYER_BYTES
        + (n + 1) * file::MODEL_TENSOR_BYTES
        + plan.tensors.len() * file::TENSOR_BYTES;
    let blob_offset = tensors_at + plan.steps.len() * file::STEP_BYTES;
    let mut blob: Vec<u8> = Vec::new();
    let mut contents: Vec<Option<(usize, usize)>> = vec![None; n]; // (weight, bias) offsets
    for (i, layer) in blobs.iter().enumerate() {
        let Some(layer) = layer else {
            continue;
        };
        let weight_at = blob_offset + blob.len();
        blob.extend(&layer.weight);
        blob.resize(blob.len().div_ceil(4) * 4, 0);
        let bias_at = blob_offset + blob.len();
        blob.extend(&layer.bias);
        contents[i] = Some((weight_at, bias_at));
    }

    let quant = match precision {
        file::Precision::Int8 => error_quantization(plan)?,
        file::Precision::Float32 => vec![NONE; plan.tensors.len()],
    };
    let lifetimes = liveness::lifetimes(&plan.tensors, &plan.steps);
    let mut param_ids = vec![(NONE, NONE); n];
    let mut tensor_bytes = Vec::with_capacity(plan.tensors.len() * file::TENSOR_BYTES);
    for (id, tensor) in plan.tensors.iter().enumerate() {
        let (role, index) = match role_of(tensor.role) {
            (file::TensorRole::OptimizerState, i) if bias_states.contains(&id) => {
                (file::TensorRole::BiasOptimizerState, i)
            }
            role => role,
        };
        let flash_offset = match (tensor.role, tensor.layer.and_then(|l| contents[l])) {
            (TensorRole::Weight { layer }, Some((weight_at, _))) => {
                param_ids[layer].0 = narrow(id, "tensor id")?;
                Some(narrow(weight_at, "blob offset")?)
            }
            (TensorRole::Bias { layer }, Some((_, bias_at))) => {
                param_ids[layer].1 = narrow(id, "tensor id")?;
                Some(narrow(bias_at, "blob offset")?)
            }
            (TensorRole::Weight { .. } | TensorRole::Bias { .. }, None) => {
                return Err(PlanFileError::Mismatch(format!(
                    "tensor {id} holds parameters of a layer without any"
                )))
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
            role,
            index: narrow(index, "tensor index")?,
            quant: quant[id],
            bytes: narrow(tensor.bytes, "tensor bytes")?,
            arena_offset,
            flash_offset,
            lifetime,
        };
        tensor_bytes.extend(record.encode());
    }

    let quant_layers = match &model.params {
        Params::Int8(state) => Some(&state.layers),
        Params::Float(_) => None,
    };
    let mut layer_bytes = Vec::with_capacity(n * file::LAYER_BYTES);
    for (i, layer) in arch.layers.iter().enumerate() {
        let q = quant_layers.map(|layers| &layers[i]);
        let record = layer_record(
            &layer.kind,
            q,
            plan.updates[i],
            param_ids[i],
            state_offsets[i],
        )?;
        layer_bytes.extend(record.encode());
    }
    let trackers = |t: usize| match &model.params {
        Params::Int8(state) => (state.activations[t], state.errors[t]),
        Params::Float(_) => (RangeEma::new(), RangeEma::new()),
    };
    let mut model_tensor_bytes = Vec::with_capacity((n + 1) * file::MODEL_TENSOR_BYTES);
    for (t, shape) in shapes.iter().enumerate() {
        let record = ModelTensorRecord {
            shape: [
                narrow(shape[0], "channels")?,
                narrow(shape[1], "height")?,
                narrow(shape[2], "width")?,
            ],
            range_owner: narrow(net.range_owner(t), "tensor index")?,
            activation: trackers(t).0,
            error: trackers(t).1,
        };
        model_tensor_bytes.extend(record.encode());
    }
    let mut step_bytes = Vec::with_capacity(plan.steps.len() * file::STEP_BYTES);
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
            op: op_of(step.op),
            layer: step.layer.map_or(Ok(NONE), |l| narrow(l, "layer"))?,
            reads,
            writes,
            scratch: step
                .scratch
                .map_or(Ok(NONE), |id| narrow(id, "tensor id"))?,
        };
        step_bytes.extend(record.encode());
    }

    let lowest = plan
        .updates
        .iter()
        .position(|u| u.any())
        .ok_or_else(|| PlanFileError::Mismatch("the plan trains nothing".into()))?;
    let file_bytes = blob_offset + blob.len();
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
        state_bytes: narrow(state_bytes, "state bytes")?,
        scores_offset,
        blob_offset: narrow(blob_offset, "blob offset")?,
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
    bytes.extend(layer_bytes);
    bytes.extend(model_tensor_bytes);
    bytes.extend(tensor_bytes);
    bytes.extend(step_bytes);
    bytes.extend(blob);
    debug_assert_eq!(bytes.len(), file_bytes);
    file::seal(&mut bytes).ok_or_else(|| PlanFileError::TooLarge("file size".into()))?;
    Ok(bytes)
}

/// One layer's parameters as blob bytes.
struct LayerBlob {
    /// Output channels (bias elements).
    channels: usize,
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
                    channels: layer.bias.len(),
                    weight: layer.weight.iter().map(|&w| w as u8).collect(),
                    bias: layer.bias.iter().flat_map(|b| b.to_le_bytes()).collect(),
                }))
            })
            .collect(),
        Params::Float(layers) => Ok(layers
            .iter()
            .map(|layer| {
                (!layer.bias.is_empty()).then(|| LayerBlob {
                    channels: layer.bias.len(),
                    weight: floats(&layer.weight),
                    bias: floats(&layer.bias),
                })
            })
            .collect()),
    }
}

/// A float32 plan runs SGD without partial updates, with a velocity per trained parameter
/// exactly when the momentum is not 0, and a momentum in `[0, 1)`.
fn check_float_config(plan: &TrainingPlan, config: &TrainConfig) -> Result<(), PlanFileError> {
    if config.partial.is_some() {
        return Err(PlanFileError::FloatConfig(
            "dynamic partial updates are an int8 (FQT) feature; drop --partial".into(),
        ));
    }
    if !(0.0..1.0).contains(&config.momentum) {
        return Err(PlanFileError::FloatConfig(format!(
            "the momentum must be in [0, 1), got {}",
            config.momentum
        )));
    }
    let has_velocity = plan
        .tensors
        .iter()
        .any(|t| matches!(t.role, TensorRole::OptimizerState { .. }));
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
    kind: &LayerKind,
    q: Option<&QuantLayer>,
    update: super::LayerUpdate,
    (weight_tensor, bias_tensor): (u16, u16),
    state_offset: u32,
) -> Result<LayerRecord, PlanFileError> {
    use mcutrain_core::ops::activation::Activation;
    let pair = |p: (usize, usize), what: &str| -> Result<(u16, u16), PlanFileError> {
        Ok((narrow(p.0, what)?, narrow(p.1, what)?))
    };
    let mut record = LayerRecord {
        kind: file::LayerKind::Flatten,
        activation: Activation::None,
        trains_bias: update.bias,
        out_channels: 0,
        kernel: (0, 0),
        stride: (0, 0),
        padding: (0, 0),
        groups: 0,
        skip_from: NONE,
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
    };
    match kind {
        LayerKind::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            groups,
            activation,
        } => {
            record.kind = file::LayerKind::Conv2d;
            record.activation = *activation;
            record.out_channels = narrow(*out_channels, "channels")?;
            record.kernel = pair(*kernel, "kernel")?;
            record.stride = pair(*stride, "stride")?;
            record.padding = pair(*padding, "padding")?;
            record.groups = narrow(*groups, "groups")?;
        }
        LayerKind::Linear {
            out_features,
            activation,
        } => {
            record.kind = file::LayerKind::Linear;
            record.activation = *activation;
            record.out_channels = narrow(*out_features, "features")?;
        }
        LayerKind::Activation(activation) => {
            record.kind = file::LayerKind::Activation;
            record.activation = *activation;
        }
        LayerKind::AvgPool {
            kernel,
            stride,
            padding,
        }
        | LayerKind::MaxPool {
            kernel,
            stride,
            padding,
        } => {
            record.kind = if matches!(kind, LayerKind::AvgPool { .. }) {
                file::LayerKind::AvgPool
            } else {
                file::LayerKind::MaxPool
            };
            record.kernel = pair(*kernel, "kernel")?;
            record.stride = pair(*stride, "stride")?;
            record.padding = pair(*padding, "padding")?;
        }
        LayerKind::GlobalAvgPool => record.kind = file::LayerKind::GlobalAvgPool,
        LayerKind::Add { skip_from } => {
            record.kind = file::LayerKind::Add;
            record.skip_from = narrow(*skip_from, "layer")?;
        }
        LayerKind::Flatten => {}
    }
    Ok(record)
}

/// The file role and index of a plan tensor role.
fn role_of(role: TensorRole) -> (file::TensorRole, usize) {
    match role {
        TensorRole::Activation { tensor } => (file::TensorRole::Activation, tensor),
        TensorRole::Error { tensor } => (file::TensorRole::Error, tensor),
        TensorRole::ErrorPart { tensor } => (file::TensorRole::ErrorPart, tensor),
        TensorRole::Weight { layer } => (file::TensorRole::Weight, layer),
        TensorRole::Bias { layer } => (file::TensorRole::Bias, layer),
        TensorRole::WeightGrad { layer } => (file::TensorRole::WeightGrad, layer),
        TensorRole::BiasGrad { layer } => (file::TensorRole::BiasGrad, layer),
        TensorRole::OptimizerState { layer } => (file::TensorRole::OptimizerState, layer),
        TensorRole::Scratch { step } => (file::TensorRole::Scratch, step),
    }
}

/// The file operation of a step operation.
fn op_of(op: StepOp) -> file::StepOp {
    match op {
        StepOp::LoadInput => file::StepOp::LoadInput,
        StepOp::Forward => file::StepOp::Forward,
        StepOp::Loss => file::StepOp::Loss,
        StepOp::ActivationMask => file::StepOp::ActivationMask,
        StepOp::InputError => file::StepOp::InputError,
        StepOp::AccumulateError => file::StepOp::AccumulateError,
        StepOp::WeightGrad => file::StepOp::WeightGrad,
        StepOp::BiasGrad => file::StepOp::BiasGrad,
        StepOp::WeightUpdate => file::StepOp::WeightUpdate,
        StepOp::BiasUpdate => file::StepOp::BiasUpdate,
    }
}

/// The quantization source of every tensor ([`TensorRecord::quant`]), following the steps
/// (see the module documentation); [`NONE`] for tensors that are not errors.
fn error_quantization(plan: &TrainingPlan) -> Result<Vec<u16>, PlanFileError> {
    let mut quant = vec![NONE; plan.tensors.len()];
    for step in &plan.steps {
        let Some(&written) = step.writes.first() else {
            continue;
        };
        let source = match (step.op, plan.tensors[written].role) {
            (StepOp::Loss, _) => LOSS_QUANT,
            (
                StepOp::InputError | StepOp::AccumulateError,
                TensorRole::Error { tensor } | TensorRole::ErrorPart { tensor },
            ) => narrow(tensor, "tensor index")?,
            (StepOp::ActivationMask, _) => quant[step.reads[1]],
            _ => continue,
        };
        quant[written] = source;
    }
    let missing = plan.tensors.iter().zip(&quant).position(|(t, &q)| {
        matches!(
            t.role,
            TensorRole::Error { .. } | TensorRole::ErrorPart { .. }
        ) && q == NONE
    });
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
    let plan_precision = match view.precision() {
        file::Precision::Int8 => Precision::Int8,
        file::Precision::Float32 => Precision::Float32,
    };
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
        if params.weight.len() != layer.weight.len() || params.bias.len() != layer.bias.len() {
            return Err(other_sizes(i));
        }
        layer.weight = params.weight.to_vec();
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
