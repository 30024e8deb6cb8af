//! `mcutrain demo`: a named shift workload end to end. On the host: the committed (or
//! retrained) float32 and int8 models on the clean test set, then for each corruption the
//! adaptation by float32 fine-tuning (with and without momentum) and by fully quantized
//! training, evaluated on the whole corrupted test set. On a device: the int8 adaptation
//! wholly on the device, measured, beside the host twin.

use super::{architecture, float_config, load_model, session_bar, DeviceArgs, Output, Target};
use crate::adapt::{evaluate, float_finetune, fqt_finetune};
use crate::data::{self, CorruptionSpec, Dataset, Split};
use crate::device;
use crate::engine::float::FloatTrainConfig;
use crate::engine::fqt::{ErrorRanges, FqtConfig};
use crate::model::{format, zoo, Model, UpdateScheme};
use crate::report::{milestone, pct, progress, table};
use crate::workload::{FloatSettings, ShiftWorkload};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Arguments of `mcutrain demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
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

/// `mcutrain demo`: the workload on the host, or its adaptation on a device (`--on`).
pub(crate) fn demo(a: DemoArgs) -> Result<()> {
    let w = match &a.workload {
        Some(p) => ShiftWorkload::load(p)?,
        None => ShiftWorkload::fashion_shift(),
    };
    let root = match &a.root {
        Some(r) => r.clone(),
        None => find_root()?,
    };
    let train = data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), Split::Train)
        .context("the demo needs Fashion-MNIST: `apt-get install dataset-fashion-mnist`")?;
    let test = data::fashion_mnist(Path::new(data::FASHION_MNIST_DIR), Split::Test)?;
    if a.on != Target::Host {
        return device_demo(&a, &w, &root, &train, &test);
    }
    if a.eval_limit.is_some() {
        bail!("--eval-limit applies to the demo on a device (--on qemu-m4 or qemu-m7)");
    }
    let (float_model, int8_model) = workload_models(&a, &w, &root, &train)?;
    let clean = (
        evaluate(&float_model, &test)?,
        evaluate(&int8_model, &test)?,
    );
    let methods = HostMethods::of(&w, a.error_ranges)?;
    let adapt_pool = train.per_class(w.adapt.per_class, w.adapt.seed)?;
    let mut results = Vec::new();
    for name in corruptions(&a, &w) {
        let shift = Shift::new(&name, &w, &adapt_pool, &test)?;
        let models = (&float_model, &int8_model);
        results.push(adapt_on_host(&shift, models, &methods, a.output.json)?);
    }
    if a.output.json {
        let shift: Vec<Value> = results.iter().map(HostResult::json).collect();
        let ad = &w.adapt;
        println!(
            "{}",
            json!({"workload": w.name, "clean_float_acc": clean.0, "clean_int8_acc": clean.1, "test_samples": test.len(), "adapt_samples": adapt_pool.len(), "settings": ad, "error_ranges": a.error_ranges.name(), "shift": shift})
        );
    } else {
        print_host_table(
            &w,
            clean,
            test.len(),
            adapt_pool.len(),
            a.error_ranges,
            &results,
        );
    }
    Ok(())
}

/// The corruptions to adapt to: `--corruptions`, or the workload's list.
fn corruptions(a: &DemoArgs, w: &ShiftWorkload) -> Vec<String> {
    a.corruptions
        .clone()
        .unwrap_or_else(|| w.adapt.corruptions.clone())
}

/// The workload's float32 and int8 models: the files under `root`, or (missing, or with
/// `--retrain`) pretrained and quantized as the workload says, and written there.
fn workload_models(
    a: &DemoArgs,
    w: &ShiftWorkload,
    root: &Path,
    train: &Dataset,
) -> Result<(Model, Model)> {
    let float_path = root.join(&w.models.float);
    let int8_path = root.join(&w.models.int8);
    if !a.retrain && float_path.exists() && int8_path.exists() {
        return Ok((load_model(&float_path)?, load_model(&int8_path)?));
    }
    let quiet = a.output.json;
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
    crate::engine::float::train(&mut model, train, &cfg, |s| {
        bar.inc(1);
        bar.set_prefix(format!("epoch {} loss {:.4}", s.epoch + 1, s.loss));
        if s.step == s.steps {
            let done = format!("pretraining: epoch {}/{} done", s.epoch + 1, p.epochs);
            milestone(&bar, quiet, &done);
        }
    })?;
    bar.finish_and_clear();
    let quantized = crate::quantize::quantize(&model, train, w.quantize.calibration_samples)?;
    format::save(&float_path, &model)?;
    format::save(&int8_path, &quantized)?;
    Ok((model, quantized))
}

/// The adaptation methods of a workload on the host: float32 fine-tuning (and with
/// momentum, when the workload has those settings) and fully quantized training.
struct HostMethods {
    float: FloatTrainConfig,
    float_momentum: Option<FloatTrainConfig>,
    fqt: FqtConfig,
}

impl HostMethods {
    fn of(w: &ShiftWorkload, error_ranges: ErrorRanges) -> Result<HostMethods> {
        let ad = &w.adapt;
        let float = |f: &FloatSettings| -> Result<FloatTrainConfig> {
            let scheme = f.scheme.parse().map_err(anyhow::Error::msg)?;
            float_config(f.epochs, f.batch, f.lr, f.momentum, scheme, ad.seed)
        };
        Ok(HostMethods {
            float: float(&ad.float)?,
            float_momentum: ad.float_momentum.as_ref().map(float).transpose()?,
            fqt: FqtConfig {
                error_ranges,
                ..ad.fqt.config(ad.seed)?
            },
        })
    }
}

/// One corruption of a workload: its adaptation samples and its corrupted test set.
struct Shift {
    name: String,
    severity: u8,
    adapt: Dataset,
    test: Dataset,
}

impl Shift {
    fn new(name: &str, w: &ShiftWorkload, adapt_pool: &Dataset, test: &Dataset) -> Result<Shift> {
        let ad = &w.adapt;
        let spec: CorruptionSpec = format!("{name}:{}", ad.severity)
            .parse()
            .map_err(anyhow::Error::msg)?;
        Ok(Shift {
            name: name.to_string(),
            severity: ad.severity,
            adapt: data::corrupt_dataset(adapt_pool, spec, ad.seed),
            test: data::corrupt_dataset(test, spec, ad.seed.wrapping_add(1)),
        })
    }

    /// Steps of a training run with `batch` and `epochs` over the adaptation samples.
    fn steps(&self, batch: usize, epochs: usize) -> u64 {
        (self.adapt.len().div_ceil(batch) * epochs) as u64
    }
}

/// The accuracies of one corruption on the host.
struct HostResult {
    name: String,
    severity: u8,
    before_float: f64,
    before: f64,
    float_ft: f64,
    float_ft_momentum: Option<f64>,
    fqt_ft: f64,
    /// Fraction of the FQT error tensors recomputed with their exact range.
    fqt_recomputed: f64,
}

impl HostResult {
    fn json(&self) -> Value {
        json!({"corruption": self.name, "severity": self.severity, "before": self.before, "before_float": self.before_float, "float_ft": self.float_ft, "fqt_ft": self.fqt_ft, "float_ft_momentum": self.float_ft_momentum, "fqt_errors_recomputed": self.fqt_recomputed})
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.severity.to_string(),
            pct(self.before_float),
            pct(self.before),
            pct(self.float_ft),
            pct(self.fqt_ft),
            format!("{:+.2}", 100.0 * (self.fqt_ft - self.float_ft)),
            self.float_ft_momentum.map_or_else(|| "-".into(), pct),
        ]
    }
}

/// The `(float32, int8)` models adapted to `shift` by every host method, evaluated.
fn adapt_on_host(
    shift: &Shift,
    (float_model, int8_model): (&Model, &Model),
    methods: &HostMethods,
    quiet: bool,
) -> Result<HostResult> {
    let name = &shift.name;
    let float_run = |cfg: &FloatTrainConfig, label: &str| -> Result<f64> {
        let bar = progress(
            shift.steps(cfg.batch, cfg.epochs),
            &format!("{name}: {label}"),
            quiet,
        );
        let (tuned, _) = float_finetune(float_model, &shift.adapt, cfg, |_| bar.inc(1))?;
        bar.finish_and_clear();
        Ok(evaluate(&tuned, &shift.test)?)
    };
    let float_ft = float_run(&methods.float, "float32 fine-tuning")?;
    let float_ft_momentum = methods
        .float_momentum
        .as_ref()
        .map(|cfg| float_run(cfg, "float32 + momentum"))
        .transpose()?;
    let fqt = &methods.fqt;
    let steps = shift.steps(fqt.batch, fqt.epochs);
    let bar = progress(steps, &format!("{name}: int8 FQT fine-tuning"), quiet);
    let (fqt_tuned, fqt_stats) = fqt_finetune(int8_model, &shift.adapt, fqt, |_, _, _| bar.inc(1))?;
    bar.finish_and_clear();
    // Every epoch computes as many error tensors, so this is the fraction over the run.
    let fqt_recomputed = fqt_stats.iter().map(|s| s.recomputed_fraction).sum::<f64>()
        / fqt_stats.len().max(1) as f64;
    let result = HostResult {
        name: name.clone(),
        severity: shift.severity,
        before_float: evaluate(float_model, &shift.test)?,
        before: evaluate(int8_model, &shift.test)?,
        float_ft,
        float_ft_momentum,
        fqt_ft: evaluate(&fqt_tuned, &shift.test)?,
        fqt_recomputed,
    };
    milestone(
        &bar,
        quiet,
        &format!(
            "{name}: before {}, float fine-tuned {}, FQT fine-tuned {}",
            pct(result.before),
            pct(result.float_ft),
            pct(result.fqt_ft)
        ),
    );
    Ok(result)
}

/// The host demo's table.
fn print_host_table(
    w: &ShiftWorkload,
    (clean_float, clean_int8): (f64, f64),
    test_samples: usize,
    adapt_samples: usize,
    error_ranges: ErrorRanges,
    results: &[HostResult],
) {
    let ad = &w.adapt;
    println!(
        "{}: clean test accuracy ({test_samples} samples): float32 {}, int8 {} ({:+.2} pp)",
        w.name,
        pct(clean_float),
        pct(clean_int8),
        100.0 * (clean_int8 - clean_float)
    );
    println!(
        "adaptation with {adapt_samples} corrupted samples ({} per class), {} epochs each, evaluated on the corrupted test set; float ft: SGD as in FQT (lr {}, momentum {}), fqt ft: fully quantized training (lr {}, {error_ranges} error ranges), both updating {}:\n",
        ad.per_class,
        ad.fqt.epochs,
        ad.float.lr,
        ad.float.momentum,
        ad.fqt.lr,
        ad.fqt.scheme
    );
    let rows: Vec<Vec<String>> = results.iter().map(HostResult::row).collect();
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
    let eval_n = a.eval_limit.unwrap_or(test.len()).min(test.len());
    let target = a
        .budget
        .target(a.on, adapt_pool.len() * cfg.epochs + eval_n)?
        .context("the device demo needs a device")?;
    let mut results = Vec::new();
    for name in corruptions(a, w) {
        let shift = Shift::new(&name, w, &adapt_pool, test)?;
        results.push(adapt_on_device(&shift, &model, &cfg, &target, a, eval_n)?);
    }
    let machine = a.on.name();
    if a.output.json {
        let shift: Vec<Value> = results.iter().map(|r| r.json.clone()).collect();
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
    let rows: Vec<Vec<String>> = results.iter().map(|r| r.row.clone()).collect();
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
    if let Some(last) = results.last() {
        println!("\nmeasurements of the last run:\n{}", last.report);
    }
    Ok(())
}

/// One corruption adapted on a device: its table row, its JSON and the measurements' text.
struct DeviceResult {
    row: Vec<String>,
    json: Value,
    report: String,
}

/// The int8 `model` adapted to `shift` on the device of `target` (evaluated there on the
/// first `eval_n` corrupted test samples), the host twin's accuracy with the device's weights,
/// and whether the host twin trains the same model.
fn adapt_on_device(
    shift: &Shift,
    model: &Model,
    cfg: &FqtConfig,
    target: &device::adapt::Target,
    a: &DemoArgs,
    eval_n: usize,
) -> Result<DeviceResult> {
    let (quiet, machine, name) = (a.output.json, a.on.name(), &shift.name);
    let device_eval = shift.test.subset(&(0..eval_n).collect::<Vec<_>>());
    let before = evaluate(model, &shift.test)?;
    let bar = session_bar(cfg.epochs, eval_n, machine, name, quiet);
    let started = std::time::Instant::now();
    let run =
        device::adapt::fqt_finetune(model, &shift.adapt, Some(&device_eval), cfg, target, |p| {
            bar.set_position((p.epochs + p.eval_samples) as u64)
        })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let host_twin = evaluate(&run.model, &shift.test)?;
    let (twin_model, _) = fqt_finetune(model, &shift.adapt, cfg, |_, _, _| {})?;
    let encode = |m: &Model| format::encode(m).map_err(anyhow::Error::msg);
    let same = encode(&twin_model)? == encode(&run.model)?;
    let device_acc = run.results.device_accuracy().unwrap_or(0.0);
    milestone(
        &ProgressBar::hidden(),
        quiet,
        &format!(
            "{name}: before {}, after on {machine} {} ({eval_n} samples), host twin {} ({} samples), same model as the host twin: {same} ({seconds:.0} s)",
            pct(before),
            pct(device_acc),
            pct(host_twin),
            shift.test.len()
        ),
    );
    let r = &run.report;
    let row = vec![
        name.clone(),
        pct(before),
        pct(device_acc),
        pct(host_twin),
        if same { "yes" } else { "NO" }.into(),
        format!("{:.0}", r.per_sample),
        r.sram.total().to_string(),
        r.footprint.flash_bytes().to_string(),
    ];
    let mut json = json!({"corruption": name, "severity": shift.severity, "before": before, "device_accuracy": device_acc, "device_eval_samples": eval_n, "host_twin_accuracy": host_twin, "eval_samples": shift.test.len(), "same_model_as_host_twin": same, "epoch_losses": run.results.epoch_losses, "wall_seconds": seconds});
    if let (Some(object), Value::Object(report)) = (json.as_object_mut(), r.json()) {
        object.extend(report);
    }
    Ok(DeviceResult {
        row,
        json,
        report: r.text(),
    })
}
