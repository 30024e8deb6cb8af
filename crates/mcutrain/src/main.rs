//! The `mcutrain` command: pretrain, quantize, train, evaluate and demonstrate on-device
//! training of quantized networks.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use mcutrain::adapt::{evaluate, float_finetune, fqt_finetune};
use mcutrain::compile::RowStreaming;
use mcutrain::data::{self, CorruptionSpec, Dataset, Split};
use mcutrain::device::{self, Budget, Machine, Qemu};
use mcutrain::engine::float::FloatTrainConfig;
use mcutrain::engine::fqt::{ErrorRanges, FqtConfig, PartialUpdate};
use mcutrain::engine::UpdateScheme;
use mcutrain::model::{format, zoo, Model, Params};
use mcutrain::report::{milestone, pct, progress, table};
use mcutrain::workload::ShiftWorkload;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mcutrain",
    version,
    about = "Train fully quantized neural networks for microcontrollers, on the host twin or the device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a float32 model from scratch (the pretraining engine).
    Pretrain(PretrainArgs),
    /// Post-training quantization of a float32 model to int8.
    Quantize(QuantizeArgs),
    /// Train (fine-tune) a model: float32 SGD or fully quantized int8 training.
    Train(TrainArgs),
    /// Accuracy of a model on a data set.
    Eval(EvalArgs),
    /// The fashion-shift workload end to end: clean accuracy, then adaptation to corruptions.
    Demo(DemoArgs),
    /// Describe a model file: layers, shapes, parameters, MACs.
    Info(InfoArgs),
    /// Write a reference architecture with seeded initial weights.
    Model(ModelArgs),
    /// Compile a training step and print its memory plan (refused over the SRAM budget).
    Plan(mcutrain::compile::cli::PlanArgs),
}

/// Where samples come from.
#[derive(Args, Clone, Debug)]
struct DataArgs {
    /// Data file (IDX, NPY or UEA/UCR .ts, gzipped or not; recognised by content).
    /// Default: Fashion-MNIST from the dataset-fashion-mnist package.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Labels file (IDX or NPY) when labels are separate from the data.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Apply a corruption, e.g. `gaussian_noise:5`.
    #[arg(long)]
    corrupt: Option<CorruptionSpec>,
    /// Keep N samples of each class (seeded).
    #[arg(long)]
    per_class: Option<usize>,
    /// Seed of sample selection, corruption noise and sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct Output {
    /// Print one JSON object on stdout instead of the readable summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PretrainArgs {
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

#[derive(Args)]
struct QuantizeArgs {
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

#[derive(Clone, Copy, ValueEnum)]
enum Method {
    /// Fully quantized training of an int8 model.
    Fqt,
    /// float32 SGD of a float model.
    Float,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
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
    fn name(self) -> &'static str {
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
struct DeviceArgs {
    /// SRAM budget: static data (the arena included) plus the minimum stack, enforced when
    /// the image links; e.g. 256K, 320KB, 262144.
    #[arg(long, default_value = "256K")]
    sram: String,
    /// Flash budget: code plus constants (the plan included).
    #[arg(long, default_value = "1M")]
    flash: String,
    /// The board's serial port (`--on nucleo-f746zg`), e.g. /dev/ttyACM0.
    #[arg(long)]
    port: Option<PathBuf>,
    /// Row-stream the plan's chains of frozen convolutions on the device (int8): `auto` only
    /// when the plan does not fit --sram otherwise, `on` for the least SRAM, `off` for the
    /// fewest instructions (see `mcutrain plan`).
    #[arg(long, value_enum, default_value = "auto")]
    row_streaming: RowStreaming,
}

impl DeviceArgs {
    /// The device target of `on` with these budgets (`None` for the host); the device may run
    /// for `samples` streamed samples (two seconds each at most, plus a minute).
    fn target(&self, on: Target, samples: usize) -> Result<Option<device::adapt::Target>> {
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
        let budget = Budget {
            sram_bytes: device::parse_size(&self.sram)?,
            flash_bytes: device::parse_size(&self.flash)?,
            ..Budget::default()
        };
        Ok(Some(device::adapt::Target {
            device,
            budget,
            row_streaming: self.row_streaming,
        }))
    }
}

#[derive(Args)]
struct TrainArgs {
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

#[derive(Args)]
struct EvalArgs {
    /// The model (float32 or int8).
    model: PathBuf,
    /// Evaluation data (default: Fashion-MNIST test set).
    #[command(flatten)]
    data: DataArgs,
    /// Where evaluation runs (a device evaluates int8 models).
    #[arg(long, value_enum, default_value = "host")]
    on: Target,
    #[command(flatten)]
    budget: DeviceArgs,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct DemoArgs {
    /// Workload file (default: the built-in workloads/fashion-shift.json).
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Directory the workload's model paths are relative to (default: the repository root,
    /// found from the current directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Pretrain and quantize even if the model files exist (and overwrite them).
    #[arg(long)]
    retrain: bool,
    /// Only these corruptions (comma-separated names), instead of the workload's list.
    #[arg(long, value_delimiter = ',')]
    corruptions: Option<Vec<String>>,
    /// How FQT quantizes error tensors: `tracked` or `exact` (see `mcutrain train`).
    #[arg(long, default_value_t = FqtConfig::default().error_ranges)]
    error_ranges: ErrorRanges,
    /// Where the adaptation runs: the host (float32 and FQT fine-tuning, the workload's
    /// settings), or a device (FQT with the workload's `fqt_device` settings, measured).
    #[arg(long, value_enum, default_value = "host")]
    on: Target,
    #[command(flatten)]
    budget: DeviceArgs,
    /// On a device: evaluate only the first N corrupted test samples there (the host twin
    /// evaluates all of them with the weights the device trained).
    #[arg(long)]
    eval_limit: Option<usize>,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct InfoArgs {
    model: PathBuf,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct ModelArgs {
    /// Architecture name: `fashion-shift` or `mbv2-w035-r128`.
    name: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    restore_default_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pretrain(a) => pretrain(a),
        Command::Quantize(a) => quantize(a),
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Demo(a) => demo(a),
        Command::Info(a) => info(a),
        Command::Model(a) => model_cmd(a),
        Command::Plan(a) => mcutrain::compile::cli::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// End quietly, as other command-line tools do, when the reader of stdout goes away
/// (`mcutrain plan ... | head`): Rust ignores SIGPIPE, which turns the next write into a panic.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first in `main`, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Load the data named by `args`, or the Fashion-MNIST `split` by default; then keep
/// `per_class` samples of each class and apply the corruption.
fn load_data(args: &DataArgs, default: Split) -> Result<Dataset> {
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

fn load_eval(
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

fn check_fit(model: &Model, ds: &Dataset) -> Result<()> {
    let [c, h, w] = model.arch.input;
    ds.check_shape(c, h, w)?;
    ds.check_labels(model.arch.classes)?;
    Ok(())
}

fn load_model(path: &Path) -> Result<Model> {
    Ok(format::load(path)?)
}

fn architecture(name: &str) -> Result<mcutrain::model::Architecture> {
    match name {
        "fashion-shift" => Ok(zoo::fashion_shift_backbone()),
        "mbv2-w035-r128" => Ok(zoo::mbv2_w035_r128()),
        other => bail!(
            "unknown architecture '{other}' for `model`; available: fashion-shift, mbv2-w035-r128"
        ),
    }
}

fn float_config(
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

fn pretrain(a: PretrainArgs) -> Result<()> {
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
    let losses = mcutrain::engine::float::train(&mut model, &ds, &cfg, |s| {
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

fn quantize(a: QuantizeArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let calib = load_data(&a.data, Split::Train)?;
    check_fit(&model, &calib)?;
    let quantized = mcutrain::quantize::quantize(&model, &calib, a.calibration_samples)?;
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

fn parse_partial(s: &str) -> Result<PartialUpdate> {
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

/// A progress bar over a device session: its epochs, then its evaluation samples.
fn session_bar(
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

/// What `train` produced: on the host the model, its epoch losses and (FQT) the fraction of
/// error tensors recomputed with their exact range per epoch; or a device run.
enum Outcome {
    Host(Model, Vec<f64>, Option<Vec<f64>>),
    Device(Box<device::adapt::DeviceRun>),
}

/// A training session on a device, reporting its progress to the callback it is given.
type DeviceTraining<'a> = dyn FnMut(
        &mut dyn FnMut(device::session::Progress),
    ) -> Result<device::adapt::DeviceRun, device::DeviceError>
    + 'a;

fn train(a: TrainArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let ds = load_data(&a.data, Split::Train)?;
    check_fit(&model, &ds)?;
    let eval_ds = load_eval(&a.eval_data, &a.eval_labels, &a.data)?;
    let before = eval_ds.as_ref().map(|d| evaluate(&model, d)).transpose()?;
    let steps = ds.len().div_ceil(a.batch.max(1)) * a.epochs;
    if a.on == Target::Host && a.eval_limit.is_some() {
        bail!("--eval-limit applies to training on a device (--on qemu-m4 or qemu-m7)");
    }
    let device_eval = eval_ds.as_ref().map(|d| {
        let n = a.eval_limit.unwrap_or(d.len()).min(d.len());
        d.subset(&(0..n).collect::<Vec<_>>())
    });
    let eval_n = device_eval.as_ref().map_or(0, Dataset::len);
    let device_target = a.budget.target(a.on, ds.len() * a.epochs + eval_n)?;
    // A device session behind a progress bar over its epochs and evaluations.
    let on_device = |label: &str, train: &mut DeviceTraining| -> Result<device::adapt::DeviceRun> {
        let bar = session_bar(a.epochs, eval_n, a.on.name(), label, false);
        let run = train(&mut |p| bar.set_position((p.epochs + p.eval_samples) as u64))?;
        bar.finish_and_clear();
        Ok(run)
    };
    let (outcome, method) = match a.method {
        Method::Float => {
            if matches!(model.params, Params::Int8(_)) {
                bail!("{} is an int8 model; --method float trains float32 models (use --method fqt, or the float model)", a.model.display());
            }
            if a.partial.is_some() || a.error_ranges.is_some() {
                bail!("--partial and --error-ranges apply to --method fqt only");
            }
            let cfg = float_config(a.epochs, a.batch, a.lr, a.momentum, a.update, a.data.seed)?;
            match &device_target {
                None => {
                    let bar = progress(steps as u64, "training (float32)", false);
                    let r = float_finetune(&model, &ds, &cfg, |_| bar.inc(1))?;
                    bar.finish_and_clear();
                    (Outcome::Host(r.0, r.1, None), "float")
                }
                Some(target) => {
                    let run = on_device("float32", &mut |p| {
                        let eval = device_eval.as_ref();
                        device::adapt::float_finetune(&model, &ds, eval, &cfg, target, p)
                    })?;
                    (Outcome::Device(Box::new(run)), "float")
                }
            }
        }
        Method::Fqt => {
            if matches!(model.params, Params::Float(_)) {
                bail!("{} is a float32 model; --method fqt trains int8 models: run `mcutrain quantize` first", a.model.display());
            }
            let cfg = fqt_config(&a)?;
            match &device_target {
                None => {
                    let bar = progress(steps as u64, "training (int8 FQT)", false);
                    let (tuned, stats) = fqt_finetune(&model, &ds, &cfg, |_, _, _| bar.inc(1))?;
                    bar.finish_and_clear();
                    let losses = stats.iter().map(|s| s.loss).collect();
                    let recomputed = stats.iter().map(|s| s.recomputed_fraction).collect();
                    (Outcome::Host(tuned, losses, Some(recomputed)), "fqt")
                }
                Some(target) => {
                    let run = on_device("int8 FQT", &mut |p| {
                        let eval = device_eval.as_ref();
                        device::adapt::fqt_finetune(&model, &ds, eval, &cfg, target, p)
                    })?;
                    (Outcome::Device(Box::new(run)), "fqt")
                }
            }
        }
    };
    let (trained, losses, recomputed, device_run) = match &outcome {
        Outcome::Host(model, losses, recomputed) => (model, losses, recomputed.as_ref(), None),
        Outcome::Device(run) => (&run.model, &run.results.epoch_losses, None, Some(run)),
    };
    let error_ranges = (method == "fqt").then(|| a.error_ranges.unwrap_or_default());
    if let Some(out) = &a.out {
        format::save(out, trained)?;
    }
    let after = eval_ds.as_ref().map(|d| evaluate(trained, d)).transpose()?;
    let on = a.on.name();
    if a.output.json {
        let mut value = json!({"method": method, "on": on, "train_samples": ds.len(), "epochs": a.epochs, "update": a.update.to_string(), "error_ranges": error_ranges.map(ErrorRanges::name), "epoch_losses": losses, "epoch_errors_recomputed": recomputed, "accuracy_before": before, "accuracy": after, "eval_samples": eval_ds.as_ref().map(|d| d.len()), "out": a.out});
        if let Some(run) = &device_run {
            add_device_figures(&mut value, run, after);
        }
        println!("{value}");
    } else {
        println!(
            "{method} training on {on}, {} samples, {} epochs, update {}; losses per epoch: {}",
            ds.len(),
            a.epochs,
            a.update,
            losses
                .iter()
                .map(|l| format!("{l:.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if let (Some(fractions), Some(mode)) = (recomputed, error_ranges) {
            println!(
                "{mode} error ranges; error tensors recomputed with their exact range per epoch: {}",
                fractions
                    .iter()
                    .map(|f| pct(*f))
                    .collect::<Vec<_>>()
                    .join(" ")
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
        if let Some(run) = &device_run {
            print_device_figures(run);
        }
        if let Some(out) = &a.out {
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

/// The device's accuracy and measurements into the JSON of `train` or `eval`: `accuracy`
/// becomes the device's, the host twin's (`host_accuracy`, the same weights on every
/// evaluation sample) stays beside it.
fn add_device_figures(
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

fn print_device_figures(run: &device::adapt::DeviceRun) {
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

fn eval(a: EvalArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let ds = load_data(&a.data, Split::Test)?;
    check_fit(&model, &ds)?;
    let Some(target) = a.budget.target(a.on, ds.len())? else {
        let acc = evaluate(&model, &ds)?;
        if a.output.json {
            println!(
                "{}",
                json!({"accuracy": acc, "samples": ds.len(), "precision": model.precision(), "on": "host"})
            );
        } else {
            println!(
                "{} model, {} samples: accuracy {}",
                model.precision(),
                ds.len(),
                pct(acc)
            );
        }
        return Ok(());
    };
    let on = a.on.name();
    let bar = session_bar(0, ds.len(), on, model.precision(), a.output.json);
    let run = device::adapt::evaluate(&model, &ds, &target, |p| {
        bar.set_position(p.eval_samples as u64)
    })?;
    bar.finish_and_clear();
    let host = evaluate(&model, &ds)?;
    if a.output.json {
        let mut value = json!({"samples": ds.len(), "precision": model.precision(), "on": on});
        add_device_figures(&mut value, &run, Some(host));
        println!("{value}");
    } else {
        println!(
            "{} model, {} samples on {on} (host twin: {})",
            model.precision(),
            ds.len(),
            pct(host)
        );
        print_device_figures(&run);
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let shapes = model.arch.shapes()?;
    let lens = model.arch.param_lens()?;
    let rows: Vec<Vec<String>> = model
        .arch
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            vec![
                i.to_string(),
                l.name.clone(),
                l.kind.op_name().to_string(),
                format!("{:?}", shapes[i + 1]),
                (lens[i].0 + lens[i].1).to_string(),
            ]
        })
        .collect();
    let params = model.arch.param_count()?;
    let macs = model.arch.forward_macs()?;
    if a.output.json {
        println!(
            "{}",
            json!({"precision": model.precision(), "input": model.arch.input, "classes": model.arch.classes, "layers": model.arch.layers.len(), "parameters": params, "forward_macs": macs})
        );
    } else {
        println!(
            "{}",
            table(&["#", "layer", "op", "output", "params"], &rows)
        );
        println!(
            "{} model: input {:?}, {} classes, {} parameters, {} MACs per forward pass",
            model.precision(),
            model.arch.input,
            model.arch.classes,
            params,
            macs
        );
    }
    Ok(())
}

fn model_cmd(a: ModelArgs) -> Result<()> {
    let model = zoo::init_float(&architecture(&a.name)?, a.seed)?;
    format::save(&a.out, &model)?;
    println!(
        "wrote {} ({} parameters)",
        a.out.display(),
        model.arch.param_count()?
    );
    Ok(())
}

/// The repository root: the nearest ancestor of the current directory holding `workloads/`.
fn find_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("workloads").is_dir())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find the repository root (a folder with workloads/) above {}; pass --root",
                cwd.display()
            )
        })
}

fn demo(a: DemoArgs) -> Result<()> {
    let w = match &a.workload {
        Some(p) => ShiftWorkload::load(p)?,
        None => ShiftWorkload::fashion_shift(),
    };
    let root = match &a.root {
        Some(r) => r.clone(),
        None => find_root()?,
    };
    let quiet = a.output.json;
    let train = data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), Split::Train)
        .context("the demo needs Fashion-MNIST: `apt-get install dataset-fashion-mnist`")?;
    let test = data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), Split::Test)?;
    if a.on != Target::Host {
        return device_demo(&a, &w, &root, &train, &test);
    }
    if a.eval_limit.is_some() {
        bail!("--eval-limit applies to the demo on a device (--on qemu-m4 or qemu-m7)");
    }
    let float_path = root.join(&w.models.float);
    let int8_path = root.join(&w.models.int8);
    let (float_model, int8_model) = if !a.retrain && float_path.exists() && int8_path.exists() {
        (load_model(&float_path)?, load_model(&int8_path)?)
    } else {
        let p = &w.pretrain;
        let arch = architecture(&w.architecture)?;
        let mut model = zoo::init_float(&arch, p.seed)?;
        let cfg = float_config(
            p.epochs,
            p.batch,
            p.lr,
            p.momentum,
            UpdateScheme::All,
            p.seed,
        )?;
        let bar = progress(
            (train.len().div_ceil(p.batch) * p.epochs) as u64,
            "pretraining (float32)",
            quiet,
        );
        mcutrain::engine::float::train(&mut model, &train, &cfg, |s| {
            bar.inc(1);
            bar.set_prefix(format!("epoch {} loss {:.4}", s.epoch + 1, s.loss));
            if s.step == s.steps {
                milestone(
                    &bar,
                    quiet,
                    &format!("pretraining: epoch {}/{} done", s.epoch + 1, p.epochs),
                );
            }
        })?;
        bar.finish_and_clear();
        let quantized =
            mcutrain::quantize::quantize(&model, &train, w.quantize.calibration_samples)?;
        format::save(&float_path, &model)?;
        format::save(&int8_path, &quantized)?;
        (model, quantized)
    };
    let clean_float = evaluate(&float_model, &test)?;
    let clean_int8 = evaluate(&int8_model, &test)?;
    let ad = &w.adapt;
    let corruptions = a
        .corruptions
        .clone()
        .unwrap_or_else(|| ad.corruptions.clone());
    let float_cfg = float_config(
        ad.float.epochs,
        ad.float.batch,
        ad.float.lr,
        ad.float.momentum,
        ad.float.scheme.parse().map_err(anyhow::Error::msg)?,
        ad.seed,
    )?;
    let float_momentum_cfg = ad
        .float_momentum
        .as_ref()
        .map(|f| -> Result<FloatTrainConfig> {
            float_config(
                f.epochs,
                f.batch,
                f.lr,
                f.momentum,
                f.scheme.parse().map_err(anyhow::Error::msg)?,
                ad.seed,
            )
        })
        .transpose()?;
    let fqt_cfg = FqtConfig {
        error_ranges: a.error_ranges,
        ..ad.fqt.config(ad.seed)?
    };
    let adapt_pool = train.per_class(ad.per_class, ad.seed)?;
    let mut shift = Vec::new();
    let mut rows = Vec::new();
    for name in &corruptions {
        let spec: CorruptionSpec = format!("{name}:{}", ad.severity)
            .parse()
            .map_err(anyhow::Error::msg)?;
        let adapt_set = data::corrupt_dataset(&adapt_pool, spec, ad.seed);
        let test_set = data::corrupt_dataset(&test, spec, ad.seed.wrapping_add(1));
        let before_float = evaluate(&float_model, &test_set)?;
        let before = evaluate(&int8_model, &test_set)?;
        let steps = adapt_set.len().div_ceil(ad.float.batch) * ad.float.epochs;
        let bar = progress(steps as u64, &format!("{name}: float32 fine-tuning"), quiet);
        let (float_tuned, _) =
            float_finetune(&float_model, &adapt_set, &float_cfg, |_| bar.inc(1))?;
        bar.finish_and_clear();
        let float_ft = evaluate(&float_tuned, &test_set)?;
        let float_ft_momentum = match (&ad.float_momentum, &float_momentum_cfg) {
            (Some(settings), Some(cfg)) => {
                let steps = adapt_set.len().div_ceil(settings.batch) * settings.epochs;
                let bar = progress(steps as u64, &format!("{name}: float32 + momentum"), quiet);
                let (tuned, _) = float_finetune(&float_model, &adapt_set, cfg, |_| bar.inc(1))?;
                bar.finish_and_clear();
                Some(evaluate(&tuned, &test_set)?)
            }
            _ => None,
        };
        let steps = adapt_set.len().div_ceil(ad.fqt.batch) * ad.fqt.epochs;
        let bar = progress(
            steps as u64,
            &format!("{name}: int8 FQT fine-tuning"),
            quiet,
        );
        let (fqt_tuned, fqt_stats) =
            fqt_finetune(&int8_model, &adapt_set, &fqt_cfg, |_, _, _| bar.inc(1))?;
        // Every epoch computes as many error tensors, so this is the fraction over the run.
        let fqt_recomputed = fqt_stats.iter().map(|s| s.recomputed_fraction).sum::<f64>()
            / fqt_stats.len().max(1) as f64;
        bar.finish_and_clear();
        let fqt_ft = evaluate(&fqt_tuned, &test_set)?;
        milestone(
            &bar,
            quiet,
            &format!(
                "{name}: before {}, float fine-tuned {}, FQT fine-tuned {}",
                pct(before),
                pct(float_ft),
                pct(fqt_ft)
            ),
        );
        rows.push(vec![
            name.clone(),
            ad.severity.to_string(),
            pct(before_float),
            pct(before),
            pct(float_ft),
            pct(fqt_ft),
            format!("{:+.2}", 100.0 * (fqt_ft - float_ft)),
            float_ft_momentum.map_or_else(|| "-".into(), pct),
        ]);
        shift.push(json!({"corruption": name, "severity": ad.severity, "before": before, "before_float": before_float, "float_ft": float_ft, "fqt_ft": fqt_ft, "float_ft_momentum": float_ft_momentum, "fqt_errors_recomputed": fqt_recomputed}));
    }
    if a.output.json {
        println!(
            "{}",
            json!({"workload": w.name, "clean_float_acc": clean_float, "clean_int8_acc": clean_int8, "test_samples": test.len(), "adapt_samples": adapt_pool.len(), "settings": ad, "error_ranges": a.error_ranges.name(), "shift": shift})
        );
    } else {
        println!(
            "{}: clean test accuracy ({} samples): float32 {}, int8 {} ({:+.2} pp)",
            w.name,
            test.len(),
            pct(clean_float),
            pct(clean_int8),
            100.0 * (clean_int8 - clean_float)
        );
        println!(
            "adaptation with {} corrupted samples ({} per class), {} epochs each, evaluated on the corrupted test set; float ft: SGD as in FQT (lr {}, momentum {}), fqt ft: fully quantized training (lr {}, {} error ranges), both updating {}:\n",
            adapt_pool.len(),
            ad.per_class,
            ad.fqt.epochs,
            ad.float.lr,
            ad.float.momentum,
            ad.fqt.lr,
            a.error_ranges,
            ad.fqt.scheme
        );
        println!(
            "{}",
            table(
                &[
                    "corruption",
                    "sev",
                    "float before",
                    "int8 before",
                    "float ft",
                    "fqt ft",
                    "fqt-float pp",
                    "float ft m=0.9"
                ],
                &rows
            )
        );
    }
    Ok(())
}

/// `demo --on MACHINE`: for each corruption, fully quantized adaptation of the committed int8
/// model on the device with the workload's `fqt_device` settings (training wholly on the
/// device, evaluation there on the first `--eval-limit` corrupted test samples), the host
/// twin's accuracy on the whole corrupted test set with the weights the device trained, and
/// whether the host twin trained the same model file byte for byte.
fn device_demo(
    a: &DemoArgs,
    w: &ShiftWorkload,
    root: &Path,
    train: &Dataset,
    test: &Dataset,
) -> Result<()> {
    let quiet = a.output.json;
    let ad = &w.adapt;
    let settings = ad.fqt_device.as_ref().with_context(|| {
        format!(
            "the workload {} has no fqt_device settings for the device",
            w.name
        )
    })?;
    let cfg = FqtConfig {
        error_ranges: a.error_ranges,
        ..settings.config(ad.seed)?
    };
    let model = load_model(&root.join(&w.models.int8))?;
    let adapt_pool = train.per_class(ad.per_class, ad.seed)?;
    let corruptions = a
        .corruptions
        .clone()
        .unwrap_or_else(|| ad.corruptions.clone());
    let eval_n = a.eval_limit.unwrap_or(test.len()).min(test.len());
    let machine = a.on.name();
    let target = a
        .budget
        .target(a.on, adapt_pool.len() * cfg.epochs + eval_n)?
        .context("the device demo needs a device")?;
    let (mut rows, mut shift) = (Vec::new(), Vec::new());
    let mut last_report = None;
    for name in &corruptions {
        let spec: CorruptionSpec = format!("{name}:{}", ad.severity)
            .parse()
            .map_err(anyhow::Error::msg)?;
        let adapt_set = data::corrupt_dataset(&adapt_pool, spec, ad.seed);
        let test_set = data::corrupt_dataset(test, spec, ad.seed.wrapping_add(1));
        let device_eval = test_set.subset(&(0..eval_n).collect::<Vec<_>>());
        let before = evaluate(&model, &test_set)?;
        let bar = session_bar(cfg.epochs, eval_n, machine, name, quiet);
        let started = std::time::Instant::now();
        let run = device::adapt::fqt_finetune(
            &model,
            &adapt_set,
            Some(&device_eval),
            &cfg,
            &target,
            |p| bar.set_position((p.epochs + p.eval_samples) as u64),
        )?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let host_twin = evaluate(&run.model, &test_set)?;
        let (twin_model, _) = fqt_finetune(&model, &adapt_set, &cfg, |_, _, _| {})?;
        let encode = |m: &Model| format::encode(m).map_err(anyhow::Error::msg);
        let same = encode(&twin_model)? == encode(&run.model)?;
        let device_acc = run.results.device_accuracy().unwrap_or(0.0);
        milestone(
            &ProgressBar::hidden(),
            quiet,
            &format!(
                "{name}: before {}, after on {machine} {} ({} samples), host twin {} ({} samples), same model as the host twin: {same} ({seconds:.0} s)",
                pct(before),
                pct(device_acc),
                eval_n,
                pct(host_twin),
                test_set.len()
            ),
        );
        let r = &run.report;
        rows.push(vec![
            name.clone(),
            pct(before),
            pct(device_acc),
            pct(host_twin),
            if same { "yes" } else { "NO" }.into(),
            format!("{:.0}", r.per_sample),
            r.sram.total().to_string(),
            r.footprint.flash_bytes().to_string(),
        ]);
        let mut entry = json!({"corruption": name, "severity": ad.severity, "before": before, "device_accuracy": device_acc, "device_eval_samples": eval_n, "host_twin_accuracy": host_twin, "eval_samples": test_set.len(), "same_model_as_host_twin": same, "epoch_losses": run.results.epoch_losses, "wall_seconds": seconds});
        if let (Some(object), serde_json::Value::Object(report)) = (entry.as_object_mut(), r.json())
        {
            object.extend(report);
        }
        shift.push(entry);
        last_report = Some(run.report);
    }
    if a.output.json {
        println!(
            "{}",
            json!({"workload": w.name, "on": machine, "adapt_samples": adapt_pool.len(), "settings": settings, "shift": shift})
        );
        return Ok(());
    }
    println!(
        "{} on {machine}: int8 model adapted wholly on the device to each corruption (severity {}) with {} samples ({} per class), {} epochs, batch {}, lr {}, update {}; accuracy measured on the device over the first {eval_n} corrupted test samples, and by the host twin with the device's weights over all {}\n",
        w.name,
        ad.severity,
        adapt_pool.len(),
        ad.per_class,
        cfg.epochs,
        cfg.batch,
        cfg.lr,
        cfg.scheme,
        test.len()
    );
    println!(
        "{}",
        table(
            &[
                "corruption",
                "int8 before",
                "device after",
                "host twin after",
                "same model",
                "instr/sample",
                "SRAM B",
                "flash B"
            ],
            &rows
        )
    );
    if let Some(report) = last_report {
        println!("\nmeasurements of the last run:\n{}", report.text());
    }
    Ok(())
}
