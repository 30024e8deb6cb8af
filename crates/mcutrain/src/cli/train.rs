//! `mcutrain pretrain`, `quantize` and `train`.

use super::{
    add_device_figures, check_fit, float_config, load_data, load_eval, load_model, parse_partial,
    print_device_figures, session_bar, DataArgs, DeviceArgs, Method, Output, Target,
};
use crate::adapt::{evaluate, float_finetune, fqt_finetune};
use crate::data::{self, Dataset, Split};
use crate::device;
use crate::engine::fqt::{ErrorRanges, FqtConfig};
use crate::model::{format, zoo, Model, Params, UpdateScheme};
use crate::report::{milestone, pct, progress};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Arguments of `mcutrain pretrain`.
#[derive(Args)]
pub(crate) struct PretrainArgs {
    /// Architecture: `fashion-shift` (1x28x28 images), `cnn1d` (time series), `mlp` (any shape).
    #[arg(long, default_value = "fashion-shift")]
    arch: String,
    #[command(flatten)]
    data: DataArgs,
    /// Evaluation data after training (default: Fashion-MNIST test set when training on the default data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Labels of the evaluation data.
    #[arg(long)]
    eval_labels: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Where to write the float32 model.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    output: Output,
}

/// Arguments of `mcutrain quantize`.
#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// The float32 model.
    model: PathBuf,
    /// Calibration data (default: Fashion-MNIST training set).
    #[command(flatten)]
    data: DataArgs,
    /// Calibration samples.
    #[arg(long, default_value_t = 512)]
    calibration_samples: usize,
    /// Where to write the int8 model.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    output: Output,
}

/// Arguments of `mcutrain train`.
#[derive(Args)]
pub(crate) struct TrainArgs {
    /// The model to train (int8 for fqt, float32 for float).
    model: PathBuf,
    #[arg(long, value_enum)]
    method: Method,
    /// Where training runs.
    #[arg(long, value_enum, default_value = "host")]
    on: Target,
    #[command(flatten)]
    data: DataArgs,
    /// Evaluate on this data after training.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Labels of the evaluation data.
    #[arg(long)]
    eval_labels: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// SGD momentum (float only).
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Parameters to update: all, last:K, bias:K.
    #[arg(long, default_value = "all")]
    update: UpdateScheme,
    /// Dynamic partial updates `LAMBDA_MIN:LAMBDA_MAX` (fqt only), e.g. 0.1:0.1.
    #[arg(long)]
    partial: Option<String>,
    /// Weight of a new observation in the moving average of the per-structure gradient
    /// mean and variance (fqt gradient standardization).
    #[arg(long, default_value_t = FqtConfig::default().stats_rate)]
    grad_stats_rate: f32,
    /// How error tensors are quantized (fqt): `tracked` (the moving-average ranges alone, as
    /// in the paper) or `exact` (recomputed with the sample's exact range where the tracked
    /// one clips or leaves most codes unused; the default).
    #[arg(long)]
    error_ranges: Option<ErrorRanges>,
    /// Where to write the trained model.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    budget: DeviceArgs,
    /// On a device: evaluate only the first N evaluation samples there (the host twin
    /// evaluates all of them with the weights the device trained).
    #[arg(long)]
    eval_limit: Option<usize>,
    #[command(flatten)]
    output: Output,
}

/// `mcutrain pretrain`: float32 training from scratch.
pub(crate) fn pretrain(a: PretrainArgs) -> Result<()> {
    let ds = load_data(&a.data, Split::Train)?;
    let arch = zoo::by_name(&a.arch, [ds.channels, ds.height, ds.width], ds.classes)
        .map_err(anyhow::Error::msg)?;
    let eval_ds = load_eval(&a.eval_data, &a.eval_labels, &a.data)?;
    let mut model = zoo::init_float(&arch, a.data.seed)?;
    check_fit(&model, &ds)?;
    let cfg = float_config(
        a.epochs,
        a.batch,
        a.lr,
        a.momentum,
        UpdateScheme::All,
        a.data.seed,
    )?;
    let steps = ds.len().div_ceil(a.batch) * a.epochs;
    let bar = progress(steps as u64, "pretraining (float32)", false);
    let losses = crate::engine::float::train(&mut model, &ds, &cfg, |s| {
        bar.inc(1);
        bar.set_prefix(format!("epoch {} loss {:.4}", s.epoch + 1, s.loss));
        if s.step == s.steps {
            milestone(
                &bar,
                false,
                &format!("epoch {}/{} done", s.epoch + 1, a.epochs),
            );
        }
    })?;
    bar.finish_and_clear();
    format::save(&a.out, &model)?;
    let accuracy = eval_ds.as_ref().map(|d| evaluate(&model, d)).transpose()?;
    if a.output.json {
        println!(
            "{}",
            json!({"model": a.out, "epochs": a.epochs, "train_samples": ds.len(), "epoch_losses": losses, "accuracy": accuracy, "eval_samples": eval_ds.as_ref().map(|d| d.len())})
        );
    } else {
        println!(
            "pretrained {} on {} samples ({} epochs); losses per epoch: {}",
            a.arch,
            ds.len(),
            a.epochs,
            losses
                .iter()
                .map(|l| format!("{l:.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if let (Some(acc), Some(d)) = (accuracy, &eval_ds) {
            println!("accuracy on {} evaluation samples: {}", d.len(), pct(acc));
        }
        println!("wrote {}", a.out.display());
    }
    Ok(())
}

/// `mcutrain quantize`: post-training quantization to int8.
pub(crate) fn quantize(a: QuantizeArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let calib = load_data(&a.data, Split::Train)?;
    check_fit(&model, &calib)?;
    let quantized = crate::quantize::quantize(&model, &calib, a.calibration_samples)?;
    format::save(&a.out, &quantized)?;
    let test = if a.data.data.is_none() {
        Some(data::fashion_mnist(
            Path::new(data::FASHION_MNIST_DIR),
            Split::Test,
        )?)
    } else {
        None
    };
    let accs = test
        .as_ref()
        .map(|t| -> Result<(f64, f64)> { Ok((evaluate(&model, t)?, evaluate(&quantized, t)?)) })
        .transpose()?;
    if a.output.json {
        println!(
            "{}",
            json!({"model": a.out, "calibration_samples": a.calibration_samples.min(calib.len()), "float_accuracy": accs.map(|x| x.0), "int8_accuracy": accs.map(|x| x.1), "samples": test.as_ref().map(|t| t.len())})
        );
    } else {
        if let Some((f, q)) = accs {
            println!(
                "test accuracy: float32 {}, int8 {} ({:+.2} pp)",
                pct(f),
                pct(q),
                100.0 * (q - f)
            );
        }
        println!("wrote {}", a.out.display());
    }
    Ok(())
}

/// The FQT configuration of `train`'s arguments.
fn fqt_config(a: &TrainArgs) -> Result<FqtConfig> {
    if a.epochs == 0 || a.batch == 0 || a.lr.is_nan() || a.lr <= 0.0 {
        bail!("need epochs >= 1, batch >= 1 and lr > 0");
    }
    Ok(FqtConfig {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        scheme: a.update,
        seed: a.data.seed,
        partial: a.partial.as_deref().map(parse_partial).transpose()?,
        stats_rate: a.grad_stats_rate,
        error_ranges: a.error_ranges.unwrap_or_default(),
        ..FqtConfig::default()
    })
}

/// What `train` produced: on the host the model, its epoch losses and (FQT) the fraction of
/// error tensors recomputed with their exact range per epoch; or a device run.
enum Outcome {
    Host(Model, Vec<f64>, Option<Vec<f64>>),
    Device(Box<device::adapt::DeviceRun>),
}

impl Outcome {
    /// The trained model, the epoch losses and the recomputed fractions (host FQT only).
    fn parts(&self) -> (&Model, &[f64], Option<&[f64]>) {
        match self {
            Outcome::Host(model, losses, recomputed) => (model, losses, recomputed.as_deref()),
            Outcome::Device(run) => (&run.model, &run.results.epoch_losses, None),
        }
    }

    fn device_run(&self) -> Option<&device::adapt::DeviceRun> {
        match self {
            Outcome::Host(..) => None,
            Outcome::Device(run) => Some(run),
        }
    }
}

/// A training session on a device, reporting its progress to the callback it is given.
type DeviceTraining<'a> = dyn FnMut(
        &mut dyn FnMut(device::session::Progress),
    ) -> Result<device::adapt::DeviceRun, device::DeviceError>
    + 'a;

/// What one `train` run trains on and where.
struct Run<'a> {
    args: &'a TrainArgs,
    model: &'a Model,
    data: &'a Dataset,
    /// The evaluation samples a device evaluates (`--eval-limit` of them).
    device_eval: Option<Dataset>,
    /// The device (`None`: the host twin).
    target: Option<device::adapt::Target>,
}

impl Run<'_> {
    /// Training steps of the whole run.
    fn steps(&self) -> u64 {
        (self.data.len().div_ceil(self.args.batch.max(1)) * self.args.epochs) as u64
    }

    /// A device session behind a progress bar over its epochs and evaluations.
    fn on_device(&self, label: &str, train: &mut DeviceTraining) -> Result<Outcome> {
        let eval_n = self.device_eval.as_ref().map_or(0, Dataset::len);
        let bar = session_bar(self.args.epochs, eval_n, self.args.on.name(), label, false);
        let run = train(&mut |p| bar.set_position((p.epochs + p.eval_samples) as u64))?;
        bar.finish_and_clear();
        Ok(Outcome::Device(Box::new(run)))
    }

    /// float32 SGD of a float32 model.
    fn float(&self) -> Result<Outcome> {
        let a = self.args;
        if matches!(self.model.params, Params::Int8(_)) {
            bail!("{} is an int8 model; --method float trains float32 models (use --method fqt, or the float model)", a.model.display());
        }
        if a.partial.is_some() || a.error_ranges.is_some() {
            bail!("--partial and --error-ranges apply to --method fqt only");
        }
        let cfg = float_config(a.epochs, a.batch, a.lr, a.momentum, a.update, a.data.seed)?;
        let (model, data, eval) = (self.model, self.data, self.device_eval.as_ref());
        match &self.target {
            None => {
                let bar = progress(self.steps(), "training (float32)", false);
                let (tuned, losses) = float_finetune(model, data, &cfg, |_| bar.inc(1))?;
                bar.finish_and_clear();
                Ok(Outcome::Host(tuned, losses, None))
            }
            Some(target) => self.on_device("float32", &mut |p| {
                device::adapt::float_finetune(model, data, eval, &cfg, target, p)
            }),
        }
    }

    /// Fully quantized training of an int8 model.
    fn fqt(&self) -> Result<Outcome> {
        let a = self.args;
        if matches!(self.model.params, Params::Float(_)) {
            bail!("{} is a float32 model; --method fqt trains int8 models: run `mcutrain quantize` first", a.model.display());
        }
        let cfg = fqt_config(a)?;
        let (model, data, eval) = (self.model, self.data, self.device_eval.as_ref());
        match &self.target {
            None => {
                let bar = progress(self.steps(), "training (int8 FQT)", false);
                let (tuned, stats) = fqt_finetune(model, data, &cfg, |_, _, _| bar.inc(1))?;
                bar.finish_and_clear();
                let losses = stats.iter().map(|s| s.loss).collect();
                let recomputed = stats.iter().map(|s| s.recomputed_fraction).collect();
                Ok(Outcome::Host(tuned, losses, Some(recomputed)))
            }
            Some(target) => self.on_device("int8 FQT", &mut |p| {
                device::adapt::fqt_finetune(model, data, eval, &cfg, target, p)
            }),
        }
    }
}

/// `mcutrain train`: fine-tuning on the host twin or a device.
pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let ds = load_data(&a.data, Split::Train)?;
    check_fit(&model, &ds)?;
    let eval_ds = load_eval(&a.eval_data, &a.eval_labels, &a.data)?;
    let before = eval_ds.as_ref().map(|d| evaluate(&model, d)).transpose()?;
    if a.on == Target::Host && a.eval_limit.is_some() {
        bail!("--eval-limit applies to training on a device (--on qemu-m4 or qemu-m7)");
    }
    let device_eval = eval_ds.as_ref().map(|d| {
        let n = a.eval_limit.unwrap_or(d.len()).min(d.len());
        d.subset(&(0..n).collect::<Vec<_>>())
    });
    let eval_n = device_eval.as_ref().map_or(0, Dataset::len);
    let run = Run {
        args: &a,
        model: &model,
        data: &ds,
        target: a.budget.target(a.on, ds.len() * a.epochs + eval_n)?,
        device_eval,
    };
    let (outcome, method) = match a.method {
        Method::Float => (run.float()?, "float"),
        Method::Fqt => (run.fqt()?, "fqt"),
    };
    let (trained, losses, recomputed) = outcome.parts();
    if let Some(out) = &a.out {
        format::save(out, trained)?;
    }
    let after = eval_ds.as_ref().map(|d| evaluate(trained, d)).transpose()?;
    let error_ranges = (method == "fqt").then(|| a.error_ranges.unwrap_or_default());
    let on = a.on.name();
    let device_run = outcome.device_run();
    if a.output.json {
        let mut value = json!({"method": method, "on": on, "train_samples": ds.len(), "epochs": a.epochs, "update": a.update.to_string(), "error_ranges": error_ranges.map(ErrorRanges::name), "epoch_losses": losses, "epoch_errors_recomputed": recomputed, "accuracy_before": before, "accuracy": after, "eval_samples": eval_ds.as_ref().map(|d| d.len()), "out": a.out});
        if let Some(run) = device_run {
            add_device_figures(&mut value, run, after);
        }
        println!("{value}");
        return Ok(());
    }
    let joined = |values: &[f64], show: &dyn Fn(f64) -> String| {
        values
            .iter()
            .map(|&v| show(v))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{method} training on {on}, {} samples, {} epochs, update {}; losses per epoch: {}",
        ds.len(),
        a.epochs,
        a.update,
        joined(losses, &|l| format!("{l:.4}"))
    );
    if let (Some(fractions), Some(mode)) = (recomputed, error_ranges) {
        println!(
            "{mode} error ranges; error tensors recomputed with their exact range per epoch: {}",
            joined(fractions, &pct)
        );
    }
    if let (Some(b), Some(f), Some(d)) = (before, after, &eval_ds) {
        let whose = if device_run.is_some() {
            " (host twin; after: with the weights trained on the device)"
        } else {
            ""
        };
        println!(
            "accuracy on {} evaluation samples{whose}: before {}, after {}",
            d.len(),
            pct(b),
            pct(f)
        );
    }
    if let Some(run) = device_run {
        print_device_figures(run);
    }
    if let Some(out) = &a.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}
