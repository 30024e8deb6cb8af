//! `mcutrain plan MODEL --update SCHEME --sram 256K [--batch N] [--no-reorder] [--momentum [M]]
//! [--row-streaming auto|on|off]
//! [--json] [--out PLAN.bin [--lr LR] [--partial MIN:MAX] [--error-ranges tracked|exact]]`: compile the training step and
//! print its memory report; a plan over the SRAM budget is refused (an error, so exit code 2)
//! after the report. With `--out`, a plan that fits is written as a plan file for the device
//! ([`super::plan_file`]; MODEL must then be a model file: an int8 one gives an FQT plan, a
//! float32 one an SGD plan, with momentum `M` when `--momentum` is given).

use super::report::{check_budget, MemoryReport};
use super::{
    compile_streaming, plan_file, scheme, LayerUpdate, PlanOptions, Precision, RowStreaming,
    StepOp, TrainingPlan,
};
use crate::engine::fqt::{ErrorRanges, FqtConfig, PartialUpdate};
use crate::engine::UpdateScheme;
use crate::model::{format, zoo, Architecture, Params};
use anyhow::{bail, Context, Result};
use mcutrain_core::plan::PlanView;
use std::path::{Path, PathBuf};

/// Element sizes to plan for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PrecisionArg {
    /// int8 activations, errors and weights (fully quantized training).
    Int8,
    /// float32 everything.
    Float32,
}

/// Arguments of `mcutrain plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A model file, or a reference architecture: fashion-shift, mbv2-w035-r128.
    pub model: String,
    /// Parameters to update: all, last:K, bias:K, or a JSON scheme file of
    /// {"layer", "weight" (0, 1/8, 1/4, 1/2, 1), "bias"} entries.
    #[arg(long, default_value = "all")]
    pub update: String,
    /// SRAM budget for the arena, e.g. 256K, 1M, 320KB or a byte count (K = 1024 B).
    #[arg(long, default_value = "256K")]
    pub sram: String,
    /// Samples per update (gradients accumulate over the batch).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Keep every gradient until the end of the backward (the naive baseline).
    #[arg(long)]
    pub no_reorder: bool,
    /// Row-stream chains of frozen convolutions (int8): `on` gives the smallest plan, `off`
    /// the fewest instructions, `auto` streams only when the plan does not fit --sram
    /// otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub row_streaming: RowStreaming,
    /// Element sizes (default: the model file's; int8 for an architecture name).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// float32 SGD with momentum M (default 0.9): a velocity buffer per trained parameter.
    #[arg(long, value_name = "M", num_args = 0..=1, default_missing_value = "0.9")]
    pub momentum: Option<f32>,
    /// Print one JSON object on stdout instead of the readable report.
    #[arg(long)]
    pub json: bool,
    /// Write the plan file for the device here (MODEL must be an int8 or float32 model file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Learning rate stored in the plan file (the peak of a cosine schedule the device may
    /// apply with `exec::set_learning_rate`).
    #[arg(long, default_value_t = FqtConfig::default().lr)]
    pub lr: f32,
    /// Dynamic partial updates `LAMBDA_MIN:LAMBDA_MAX` stored in the plan file, e.g. 0.1:0.1
    /// (int8 only).
    #[arg(long)]
    pub partial: Option<String>,
    /// How the device quantizes error tensors, stored in the plan file (int8 only): `tracked`
    /// or `exact` (the default; needs 16 B of training state per model tensor), see
    /// `mcutrain train --error-ranges`.
    #[arg(long)]
    pub error_ranges: Option<ErrorRanges>,
}

/// Run `mcutrain plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    if args.out.is_some() && !Path::new(&args.model).is_file() {
        bail!(
            "--out writes the model's parameters into the plan: pass an int8 or float32 model file, not '{}'",
            args.model
        );
    }
    let (arch, file_precision) = load_architecture(&args.model)?;
    let precision = match args.precision {
        Some(PrecisionArg::Int8) => Precision::Int8,
        Some(PrecisionArg::Float32) => Precision::Float32,
        None => file_precision,
    };
    let budget = parse_bytes(&args.sram)?;
    let updates = parse_scheme(&arch, &args.update)?;
    let options = PlanOptions {
        precision,
        batch: args.batch,
        reorder: !args.no_reorder,
        momentum: args.momentum.is_some(),
        row_streaming: true,
    };
    let plan = compile_streaming(&arch, &updates, &options, args.row_streaming, |p| {
        check_budget(&MemoryReport::new(&arch, p), budget).is_ok()
    })?;
    let streamed = plan.steps.iter().any(|s| s.op == StepOp::StreamedForward);
    let report = MemoryReport::new(&arch, &plan);
    let verdict = check_budget(&report, budget);
    let written = match (&args.out, verdict.is_ok()) {
        (Some(path), true) => Some(write_plan_file(&args, &plan, path)?),
        _ => None,
    };
    if args.json {
        let mut value = report.json();
        value["model"] = args.model.clone().into();
        value["update"] = args.update.clone().into();
        value["budget_bytes"] = budget.into();
        value["fits"] = verdict.is_ok().into();
        value["row_streaming"] = streamed.into();
        if let (Some(path), Some(file)) = (&args.out, &written) {
            value["plan_file"] = path.display().to_string().into();
            value["plan_file_bytes"] = file.file_bytes.into();
            value["arena_required_bytes"] = file.arena_required.into();
        }
        println!("{value}");
    } else {
        println!("model {}, update {}", args.model, args.update);
        println!("{}", streaming_line(args.row_streaming, streamed));
        print!("{}", report.text());
        if verdict.is_ok() {
            println!(
                "fits the SRAM budget of {} ({} free)",
                super::report::kb(budget),
                super::report::kb(budget - report.peak_bytes)
            );
        }
        if let (Some(path), Some(file)) = (&args.out, &written) {
            println!(
                "wrote {} ({} B); the device arena needs {} B: the planned {} B plus {} B of training state ({})",
                path.display(),
                file.file_bytes,
                file.arena_required,
                plan.arena_bytes,
                file.arena_required - file.state_offset,
                match (plan.precision, file.error_ranges) {
                    (Precision::Int8, ErrorRanges::Exact) => "sample counter, learning rate, range trackers, the errors' quantization (exact error ranges), weight quantization, partial-update lists",
                    (Precision::Int8, ErrorRanges::Tracked) => "sample counter, learning rate, range trackers, weight quantization, partial-update lists",
                    (Precision::Float32, _) => "sample counter and learning rate",
                },
            );
        }
    }
    verdict.context("refused")?;
    Ok(())
}

/// What `--row-streaming` chose, e.g. `row streaming off (auto: the plan fits without it)`.
fn streaming_line(asked: RowStreaming, streamed: bool) -> String {
    let state = if streamed { "on" } else { "off" };
    let why = match (asked, streamed) {
        (RowStreaming::Auto, false) => {
            " (auto: the plan fits the budget without it; --row-streaming on gives the smallest plan)"
        }
        (RowStreaming::Auto, true) => " (auto: the plan does not fit the budget without it)",
        (RowStreaming::On, false) => " (no frozen convolution chain qualifies)",
        _ => "",
    };
    format!("row streaming {state}{why}")
}

/// Sizes of a written plan file.
struct WrittenPlan {
    file_bytes: usize,
    state_offset: usize,
    arena_required: usize,
    error_ranges: ErrorRanges,
}

/// Write the plan file of `plan` (atomically) with the model file `args.model` and the plan's
/// hyper-parameters: int8, `--lr` and `--partial` with the other rates at their FQT defaults;
/// float32, `--lr` and `--momentum`.
fn write_plan_file(args: &PlanArgs, plan: &TrainingPlan, path: &Path) -> Result<WrittenPlan> {
    let model =
        format::load(Path::new(&args.model)).with_context(|| format!("reading {}", args.model))?;
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }
    let config = match model.params {
        Params::Int8(_) => plan_file::train_config(&FqtConfig {
            lr: args.lr,
            partial: args.partial.as_deref().map(parse_partial).transpose()?,
            error_ranges: args.error_ranges.unwrap_or_default(),
            ..FqtConfig::default()
        }),
        Params::Float(_) => {
            if args.partial.is_some() {
                bail!(
                    "--partial applies to int8 models (FQT); a float32 plan updates every channel"
                );
            }
            if args.error_ranges.is_some() {
                bail!(
                    "--error-ranges applies to int8 models (FQT); float32 errors are not quantized"
                );
            }
            let momentum = args.momentum.unwrap_or(0.0);
            if !(0.0..1.0).contains(&momentum) {
                bail!("--momentum must be in [0, 1), got {momentum}");
            }
            plan_file::float_train_config(args.lr, momentum)
        }
    };
    let bytes = plan_file::write(plan, &model, &config)
        .with_context(|| format!("writing the plan file of {}", args.model))?;
    let aligned = plan_file::AlignedBytes::copy_of(&bytes);
    let view = PlanView::parse(aligned.as_slice())
        .map_err(|e| anyhow::anyhow!("the written plan file does not validate: {e}"))?;
    let written = WrittenPlan {
        file_bytes: bytes.len(),
        state_offset: view.state_offset(),
        arena_required: view.arena_required(),
        error_ranges: view.header().config.error_ranges,
    };
    crate::fsutil::write_atomically(path, &bytes)?;
    Ok(written)
}

/// `LAMBDA_MIN:LAMBDA_MAX` with `0 < min <= max <= 1` (as `mcutrain train --partial`).
pub fn parse_partial(text: &str) -> Result<PartialUpdate> {
    let bad = || {
        anyhow::anyhow!(
            "--partial takes LAMBDA_MIN:LAMBDA_MAX with 0 < min <= max <= 1, e.g. 0.1:0.1; got '{text}'"
        )
    };
    let (lo, hi) = text.split_once(':').ok_or_else(bad)?;
    let lambda_min: f32 = lo.parse().map_err(|_| bad())?;
    let lambda_max: f32 = hi.parse().map_err(|_| bad())?;
    if !(lambda_min > 0.0 && lambda_min <= lambda_max && lambda_max <= 1.0) {
        return Err(bad());
    }
    Ok(PartialUpdate {
        lambda_min,
        lambda_max,
    })
}

/// The architecture named `model` (a file, or a reference architecture) and the precision the
/// file stores (int8 for a reference architecture).
pub fn load_architecture(model: &str) -> Result<(Architecture, Precision)> {
    let path = Path::new(model);
    if path.exists() {
        let m = format::load(path).with_context(|| format!("reading {model}"))?;
        let precision = match m.params {
            Params::Float(_) => Precision::Float32,
            Params::Int8(_) => Precision::Int8,
        };
        return Ok((m.arch, precision));
    }
    let arch = match model {
        "fashion-shift" => zoo::fashion_shift_backbone(),
        "mbv2-w035-r128" => zoo::mbv2_w035_r128(),
        other => bail!(
            "'{other}' is neither a model file nor a reference architecture (fashion-shift, mbv2-w035-r128)"
        ),
    };
    Ok((arch, Precision::Int8))
}

/// `all`, `last:K`, `bias:K`, or a scheme file.
pub fn parse_scheme(arch: &Architecture, text: &str) -> Result<Vec<LayerUpdate>> {
    if Path::new(text).is_file() {
        return Ok(scheme::from_file(arch, Path::new(text))?);
    }
    let scheme: UpdateScheme = text.parse().map_err(|e: String| {
        anyhow::anyhow!("{e}, or the path of a JSON scheme file (no such file: {text})")
    })?;
    Ok(scheme::from_update_scheme(arch, scheme))
}

/// `256K`, `256KB`, `1M`, `1MB` or a byte count; K = 1024, M = 1024 * 1024.
pub fn parse_bytes(text: &str) -> Result<usize> {
    crate::device::parse_size(text)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .with_context(|| format!("--sram takes a size like 256K, 1M or 262144; got '{text}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("256K").unwrap(), 262_144);
        assert_eq!(parse_bytes("320kb").unwrap(), 327_680);
        assert_eq!(parse_bytes("1M").unwrap(), 1_048_576);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("K").is_err());
    }

    #[test]
    fn partial_updates_parse() {
        let p = parse_partial("0.1:0.5").unwrap();
        assert_eq!((p.lambda_min, p.lambda_max), (0.1, 0.5));
        for bad in ["0.5:0.1", "0:1", "0.1", "a:b", "0.1:1.5"] {
            assert!(parse_partial(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schemes_parse() {
        let arch = zoo::fashion_shift_backbone();
        assert_eq!(
            parse_scheme(&arch, "bias:3")
                .unwrap()
                .iter()
                .filter(|u| u.bias)
                .count(),
            3
        );
        let err = parse_scheme(&arch, "nonsense").unwrap_err().to_string();
        assert!(err.contains("scheme file"), "{err}");
    }
}
