//! The `mcutrain` command line: one module per group of commands, over the library's layers
//! (the top of the module graph: it may use every other module, and none uses it).
//!
//! - `train`: `pretrain`, `quantize`, `train` (host twin or device);
//! - `eval`: `eval`, `info`, `model`;
//! - `demo`: the named workload end to end, on the host or a device;
//! - `plan`: the training plan and its memory report, against the device's budget.
//!
//! This module holds what they share: the argument groups (data, output, device budgets),
//! loading models and data, progress bars over device sessions, and the device figures.

mod demo;
mod eval;
mod plan;
mod train;

use crate::compile::RowStreaming;
use crate::data::{self, CorruptionSpec, Dataset, Split};
use crate::device::{self, Budget, Machine, Qemu};
use crate::engine::float::FloatTrainConfig;
use crate::engine::fqt::PartialUpdate;
use crate::model::{format, zoo, Architecture, Model, UpdateScheme};
use crate::report::{pct, progress};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mcutrain",
    version,
    about = "Train fully quantized neural networks for microcontrollers, on the host twin or the device"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a float32 model from scratch (the pretraining engine).
    Pretrain(train::PretrainArgs),
    /// Post-training quantization of a float32 model to int8.
    Quantize(train::QuantizeArgs),
    /// Train (fine-tune) a model: float32 SGD or fully quantized int8 training.
    Train(train::TrainArgs),
    /// Accuracy of a model on a data set.
    Eval(eval::EvalArgs),
    /// The fashion-shift workload end to end: clean accuracy, then adaptation to corruptions.
    Demo(demo::DemoArgs),
    /// Describe a model file: layers, shapes, parameters, MACs.
    Info(eval::InfoArgs),
    /// Write a reference architecture with seeded initial weights.
    Model(eval::ModelArgs),
    /// Compile a training step and print its memory plan (refused over the SRAM budget).
    Plan(plan::PlanArgs),
}

impl Cli {
    /// Run the command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Pretrain(a) => train::pretrain(a),
            Command::Quantize(a) => train::quantize(a),
            Command::Train(a) => train::train(a),
            Command::Eval(a) => eval::eval(a),
            Command::Demo(a) => demo::demo(a),
            Command::Info(a) => eval::info(a),
            Command::Model(a) => eval::model(a),
            Command::Plan(a) => plan::run(a),
        }
    }
}

/// Where samples come from.
#[derive(Args, Clone, Debug)]
pub(crate) struct DataArgs {
    /// Data file (IDX, NPY or UEA/UCR .ts, gzipped or not; recognised by content).
    /// Default: Fashion-MNIST from the dataset-fashion-mnist package.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Labels file (IDX or NPY) when labels are separate from the data.
    #[arg(long)]
    pub(crate) labels: Option<PathBuf>,
    /// Apply a corruption, e.g. `gaussian_noise:5`.
    #[arg(long)]
    pub(crate) corrupt: Option<CorruptionSpec>,
    /// Keep N samples of each class (seeded).
    #[arg(long)]
    pub(crate) per_class: Option<usize>,
    /// Seed of sample selection, corruption noise and sample order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

/// How a command prints its result.
#[derive(Args)]
pub(crate) struct Output {
    /// Print one JSON object on stdout instead of the readable summary.
    #[arg(long)]
    pub(crate) json: bool,
}

/// How `train` trains.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Method {
    /// Fully quantized training of an int8 model.
    Fqt,
    /// float32 SGD of a float model.
    Float,
}

/// Where a command runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// The host twin.
    Host,
    /// The firmware on QEMU's Cortex-M4F (MPS2-AN386).
    QemuM4,
    /// The firmware on QEMU's Cortex-M7 (MPS2-AN500).
    QemuM7,
    /// The firmware on an STM32 Nucleo-F746ZG through probe-rs and its serial port
    /// (`--port`); untested on hardware.
    NucleoF746zg,
}

impl Target {
    /// The name on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Host => "host",
            Target::QemuM4 => Machine::QemuM4.name(),
            Target::QemuM7 => Machine::QemuM7.name(),
            Target::NucleoF746zg => "nucleo-f746zg",
        }
    }
}

/// Memory budgets of the firmware image and how to reach a board (`--on` a device).
#[derive(Args, Clone, Debug)]
pub(crate) struct DeviceArgs {
    /// SRAM budget: static data (the arena included) plus the minimum stack, enforced when
    /// the image links; e.g. 256K, 320KB, 262144.
    #[arg(long, default_value = "256K")]
    pub(crate) sram: String,
    /// Flash budget: code plus constants (the plan included).
    #[arg(long, default_value = "1M")]
    pub(crate) flash: String,
    /// The board's serial port (`--on nucleo-f746zg`), e.g. /dev/ttyACM0.
    #[arg(long)]
    port: Option<PathBuf>,
    /// Row-stream the plan's chains of frozen convolutions on the device (int8): `auto` only
    /// when the plan does not fit --sram otherwise, `on` for the least SRAM, `off` for the
    /// fewest instructions (see `mcutrain plan`).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) row_streaming: RowStreaming,
}

impl DeviceArgs {
    /// The device target of `on` with these budgets (`None` for the host); the device may run
    /// for `samples` streamed samples (two seconds each at most, plus a minute).
    pub(crate) fn target(
        &self,
        on: Target,
        samples: usize,
    ) -> Result<Option<device::adapt::Target>> {
        let timeout = Duration::from_secs(60 + 2 * samples as u64);
        let qemu = |machine| device::Device::Qemu {
            machine,
            qemu: Qemu {
                timeout,
                ..Qemu::default()
            },
        };
        let device = match on {
            Target::Host => return Ok(None),
            Target::QemuM4 => qemu(Machine::QemuM4),
            Target::QemuM7 => qemu(Machine::QemuM7),
            Target::NucleoF746zg => {
                let port = self
                    .port
                    .as_deref()
                    .context("--on nucleo-f746zg needs --port (the ST-LINK's serial port, e.g. /dev/ttyACM0)")?;
                device::Device::NucleoF746zg(device::board::Nucleo::on_port(port, timeout))
            }
        };
        Ok(Some(device::adapt::Target {
            device,
            budget: self.budget()?,
            row_streaming: self.row_streaming,
        }))
    }

    /// The memory budgets (the minimum stack is the firmware's default).
    pub(crate) fn budget(&self) -> Result<Budget> {
        Ok(Budget {
            sram_bytes: device::parse_size(&self.sram)?,
            flash_bytes: device::parse_size(&self.flash)?,
            ..Budget::default()
        })
    }
}

/// Load the data named by `args`, or the Fashion-MNIST `split` by default; then keep
/// `per_class` samples of each class and apply the corruption.
pub(crate) fn load_data(args: &DataArgs, default: Split) -> Result<Dataset> {
    let mut ds = match &args.data {
        Some(path) => data::load(path, args.labels.as_deref())?,
        None => {
            if args.labels.is_some() {
                bail!("--labels needs --data");
            }
            data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), default).context(
                "no --data given and Fashion-MNIST is not installed; install it with `apt-get install dataset-fashion-mnist` or pass --data",
            )?
        }
    };
    if let Some(n) = args.per_class {
        ds = ds.per_class(n, args.seed)?;
    }
    if let Some(spec) = args.corrupt {
        ds = data::corrupt_dataset(&ds, spec, args.seed);
    }
    Ok(ds)
}

/// The evaluation data: `data` (with `labels`), or by default the Fashion-MNIST test set
/// (with the training data's corruption) when training on the default data.
pub(crate) fn load_eval(
    data: &Option<PathBuf>,
    labels: &Option<PathBuf>,
    train_args: &DataArgs,
) -> Result<Option<Dataset>> {
    match data {
        Some(path) => Ok(Some(data::load(path, labels.as_deref())?)),
        None if train_args.data.is_none() => {
            let mut ds = data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), Split::Test)?;
            if let Some(spec) = train_args.corrupt {
                ds = data::corrupt_dataset(&ds, spec, train_args.seed.wrapping_add(1));
            }
            Ok(Some(ds))
        }
        None => Ok(None),
    }
}

/// The data set fits the model: per-sample shape and labels.
pub(crate) fn check_fit(model: &Model, ds: &Dataset) -> Result<()> {
    let [c, h, w] = model.arch.input;
    ds.check_shape(c, h, w)?;
    ds.check_labels(model.arch.classes)?;
    Ok(())
}

/// The model file at `path`.
pub(crate) fn load_model(path: &Path) -> Result<Model> {
    Ok(format::load(path)?)
}

/// The reference architecture `name` (fashion-shift, mbv2-w035-r128).
pub(crate) fn architecture(name: &str) -> Result<Architecture> {
    zoo::reference(name).with_context(|| {
        format!(
            "unknown architecture '{name}'; available: {}",
            zoo::REFERENCES.join(", ")
        )
    })
}

/// A float32 training configuration, its values checked.
pub(crate) fn float_config(
    epochs: usize,
    batch: usize,
    lr: f32,
    momentum: f32,
    scheme: UpdateScheme,
    seed: u64,
) -> Result<FloatTrainConfig> {
    if epochs == 0 || batch == 0 || lr.is_nan() || lr <= 0.0 || !(0.0..1.0).contains(&momentum) {
        bail!("need epochs >= 1, batch >= 1, lr > 0 and 0 <= momentum < 1");
    }
    Ok(FloatTrainConfig {
        epochs,
        batch,
        lr,
        momentum,
        scheme,
        seed,
    })
}

/// `LAMBDA_MIN:LAMBDA_MAX` with `0 < min <= max <= 1` (`--partial`).
pub(crate) fn parse_partial(s: &str) -> Result<PartialUpdate> {
    let bad = || {
        anyhow::anyhow!("--partial takes LAMBDA_MIN:LAMBDA_MAX with 0 < min <= max <= 1, e.g. 0.1:0.1; got '{s}'")
    };
    let (lo, hi) = s.split_once(':').ok_or_else(bad)?;
    let (lambda_min, lambda_max): (f32, f32) = (
        lo.parse().map_err(|_| bad())?,
        hi.parse().map_err(|_| bad())?,
    );
    if !(lambda_min > 0.0 && lambda_min <= lambda_max && lambda_max <= 1.0) {
        return Err(bad());
    }
    Ok(PartialUpdate {
        lambda_min,
        lambda_max,
    })
}

/// A progress bar over a device session: its epochs, then its evaluation samples.
pub(crate) fn session_bar(
    epochs: usize,
    eval_samples: usize,
    device: &str,
    what: &str,
    quiet: bool,
) -> ProgressBar {
    let bar = progress(
        (epochs + eval_samples) as u64,
        &format!("{device} {what}: epochs + evaluations"),
        quiet,
    );
    bar.set_prefix("building the firmware / running");
    bar
}

/// The device's accuracy and measurements into the JSON of `train` or `eval`: `accuracy`
/// becomes the device's, the host twin's (`host_accuracy`, the same weights on every
/// evaluation sample) stays beside it.
pub(crate) fn add_device_figures(
    value: &mut serde_json::Value,
    run: &device::adapt::DeviceRun,
    host: Option<f64>,
) {
    value["accuracy"] = run.results.device_accuracy().into();
    value["device_eval_samples"] = run.results.predictions.len().into();
    value["host_accuracy"] = host.into();
    if let (Some(object), serde_json::Value::Object(report)) =
        (value.as_object_mut(), run.report.json())
    {
        object.extend(report);
    }
}

/// The device's accuracy and measurements, as text.
pub(crate) fn print_device_figures(run: &device::adapt::DeviceRun) {
    if let Some(acc) = run.results.device_accuracy() {
        println!(
            "accuracy measured on the device: {} of {} samples correct ({})",
            run.results.metrics.timing.eval_correct,
            run.results.predictions.len(),
            pct(acc)
        );
    }
    println!("{}", run.report.text());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_updates_parse() {
        let p = parse_partial("0.1:0.5").unwrap();
        assert_eq!((p.lambda_min, p.lambda_max), (0.1, 0.5));
        for bad in ["0.5:0.1", "0:1", "0.1", "a:b", "0.1:1.5"] {
            assert!(parse_partial(bad).is_err(), "{bad}");
        }
    }
}
