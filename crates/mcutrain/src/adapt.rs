//! Domain-shift adaptation runs shared by `mcutrain train` and `mcutrain demo`: float
//! fine-tuning and fully quantized fine-tuning, each followed by evaluation.

use crate::data::Dataset;
use crate::engine::accuracy;
use crate::engine::float::{self, FloatNet, FloatTrainConfig};
use crate::engine::fqt::{EpochStats, FqtConfig, FqtTrainer, QuantNet};
use crate::model::{Model, ModelError, Params};

/// Accuracy of `model` (float or int8) on `data`.
pub fn evaluate(model: &Model, data: &Dataset) -> Result<f64, ModelError> {
    let predictions = match &model.params {
        Params::Float(p) => FloatNet::new(&model.arch)?.predict(p, data),
        Params::Int8(s) => QuantNet::new(&model.arch)?.predict(s, data),
    };
    Ok(accuracy(&predictions, &data.labels))
}

/// Fine-tune a copy of a float model; returns it and the mean loss of each epoch.
pub fn float_finetune(
    model: &Model,
    data: &Dataset,
    cfg: &FloatTrainConfig,
    progress: impl FnMut(&float::StepInfo),
) -> Result<(Model, Vec<f64>), ModelError> {
    let mut tuned = model.clone();
    let losses = float::train(&mut tuned, data, cfg, progress)?;
    Ok((tuned, losses))
}

/// Fine-tune a copy of an int8 model with fully quantized training; returns it and the
/// statistics (mean loss, ...) of each epoch.
pub fn fqt_finetune(
    model: &Model,
    data: &Dataset,
    cfg: &FqtConfig,
    progress: impl FnMut(usize, usize, usize),
) -> Result<(Model, Vec<EpochStats>), ModelError> {
    let mut tuned = model.clone();
    let mut trainer = FqtTrainer::new(&tuned, cfg.clone())?;
    let stats = trainer.train(&mut tuned, data, progress);
    Ok((tuned, stats))
}
