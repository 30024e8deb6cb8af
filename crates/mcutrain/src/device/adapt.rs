//! Fine-tuning and evaluation on a device, the device side of `mcutrain train --on` and
//! `mcutrain eval --on`: compile the plan for the model and the training settings, run the
//! session on the machine ([`session::run`]: build cached, budget enforced before anything
//! runs), rebuild the trained model and report the measurements.
//!
//! The plan carries the same hyper-parameters as the host trainer's configuration and the
//! session streams the samples in the host trainer's order, so the trained model equals the
//! host twin's bit for bit.

use super::firmware::check_plan;
use super::report::DeviceReport;
use super::session::{self, Progress, Session, SessionResults};
use super::{Budget, Device, DeviceError};
use crate::compile::plan_file::{self, PlanSizes};
use crate::compile::{
    compile_streaming, LayerUpdate, PlanOptions, Precision, RowStreaming, TrainingPlan,
};
use crate::data::Dataset;
use crate::engine::float::FloatTrainConfig;
use crate::engine::fqt::FqtConfig;
use crate::model::{Model, Params, UpdateScheme};
use mcutrain_core::plan::TrainConfig;

/// Where and within which budgets a session runs.
#[derive(Clone, Debug)]
pub struct Target {
    /// The device.
    pub device: Device,
    /// Memory budgets, enforced when the image links.
    pub budget: Budget,
    /// When the plan row-streams frozen convolution chains (`Auto`: only when the plan does
    /// not fit the budget without it, by [`check_plan`]).
    pub row_streaming: RowStreaming,
}

/// A finished session: the model after it, what came back and the measurements.
#[derive(Clone, Debug)]
pub struct DeviceRun {
    /// The trained model (the input model after an evaluation-only session).
    pub model: Model,
    /// What the device sent back.
    pub results: SessionResults,
    /// The measurements.
    pub report: DeviceReport,
    /// The plan file the image embedded.
    pub plan: Vec<u8>,
}

/// The plan file of training `model` under `updates` at `batch` samples per update with
/// `config`'s hyper-parameters, in the model's precision (float32 with a velocity buffer
/// when `config.momentum` is not 0), with operator reordering and row streaming as `target`
/// says.
fn plan_file_for(
    model: &Model,
    updates: &[LayerUpdate],
    batch: usize,
    config: &TrainConfig,
    target: &Target,
) -> Result<Vec<u8>, DeviceError> {
    let precision = match model.params {
        Params::Int8(_) => Precision::Int8,
        Params::Float(_) => Precision::Float32,
    };
    let options = PlanOptions {
        batch,
        momentum: config.momentum != 0.0,
        ..PlanOptions::new(precision)
    };
    let fits = |plan: &TrainingPlan| {
        PlanSizes::planned(&model.arch, plan, config)
            .is_ok_and(|sizes| check_plan(&sizes, &target.budget).is_ok())
    };
    let plan = compile_streaming(&model.arch, updates, &options, target.row_streaming, fits)
        .map_err(|e| DeviceError::Plan(e.to_string()))?;
    plan_file::write(&plan, model, config).map_err(|e| DeviceError::Plan(e.to_string()))
}

/// What a session trains with: the plan's settings and the sample stream.
struct Training<'a> {
    /// What trains.
    scheme: UpdateScheme,
    /// Samples per update.
    batch: usize,
    /// The plan's hyper-parameters.
    config: TrainConfig,
    /// Passes over `train`.
    epochs: usize,
    /// Seed of the sample order.
    seed: u64,
    /// Training samples.
    train: Option<&'a Dataset>,
    /// Evaluation samples.
    eval: Option<&'a Dataset>,
}

/// Compiles the plan of `training` for `model`, runs its session on `target` and rebuilds
/// the model.
fn run_training(
    model: &Model,
    training: Training,
    target: &Target,
    progress: impl FnMut(Progress),
) -> Result<DeviceRun, DeviceError> {
    let updates = training.scheme.updates(&model.arch);
    let plan = plan_file_for(model, &updates, training.batch, &training.config, target)?;
    let session = Session {
        plan: &plan,
        epochs: training.epochs,
        seed: training.seed,
        train: training.train,
        eval: training.eval,
    };
    let results = session::run(&target.device, &target.budget, &session, progress)?;
    let trained = results.trained_model(&plan, model)?;
    let report = DeviceReport::new(target.device.name(), &results, &plan, &model.arch)?;
    Ok(DeviceRun {
        model: trained,
        results,
        report,
        plan,
    })
}

/// Fully quantized fine-tuning of the int8 `model` on `data` on the device as `cfg` says
/// (epochs, batch, learning rate with cosine decay, scheme, partial updates, order seed),
/// then the evaluation of `eval` there.
pub fn fqt_finetune(
    model: &Model,
    data: &Dataset,
    eval: Option<&Dataset>,
    cfg: &FqtConfig,
    target: &Target,
    progress: impl FnMut(Progress),
) -> Result<DeviceRun, DeviceError> {
    if !matches!(model.params, Params::Int8(_)) {
        return Err(DeviceError::Plan(
            "fully quantized training needs an int8 model; run `mcutrain quantize` first".into(),
        ));
    }
    let training = Training {
        scheme: cfg.scheme,
        batch: cfg.batch,
        config: cfg.plan_config(),
        epochs: cfg.epochs,
        seed: cfg.seed,
        train: Some(data),
        eval,
    };
    run_training(model, training, target, progress)
}

/// float32 SGD fine-tuning of the float32 `model` on `data` on the device as `cfg` says
/// (epochs, batch, learning rate with cosine decay, momentum, scheme, order seed), then the
/// evaluation of `eval` there.
pub fn float_finetune(
    model: &Model,
    data: &Dataset,
    eval: Option<&Dataset>,
    cfg: &FloatTrainConfig,
    target: &Target,
    progress: impl FnMut(Progress),
) -> Result<DeviceRun, DeviceError> {
    if !matches!(model.params, Params::Float(_)) {
        return Err(DeviceError::Plan(
            "float32 training needs a float32 model; train an int8 model with --method fqt".into(),
        ));
    }
    let training = Training {
        scheme: cfg.scheme,
        batch: cfg.batch,
        config: plan_file::float_train_config(cfg.lr, cfg.momentum),
        epochs: cfg.epochs,
        seed: cfg.seed,
        train: Some(data),
        eval,
    };
    run_training(model, training, target, progress)
}

/// Accuracy of `model` (int8 or float32) on `eval`, measured on the device. The plan trains
/// only the classifier's bias (the smallest training plan; a plan must train something), and
/// nothing is trained: the session has no training samples.
pub fn evaluate(
    model: &Model,
    eval: &Dataset,
    target: &Target,
    progress: impl FnMut(Progress),
) -> Result<DeviceRun, DeviceError> {
    let training = Training {
        scheme: UpdateScheme::BiasOnly(1),
        batch: 1,
        config: match model.params {
            Params::Int8(_) => FqtConfig::default().plan_config(),
            Params::Float(_) => plan_file::float_train_config(FqtConfig::default().lr, 0.0),
        },
        epochs: 0,
        seed: 0,
        train: None,
        eval: Some(eval),
    };
    run_training(model, training, target, progress)
}
