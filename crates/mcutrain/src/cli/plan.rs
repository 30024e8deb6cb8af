//! `mcutrain plan MODEL --update SCHEME --sram 256K [--flash 1M] [--batch N] [--no-reorder]
//! [--momentum [M]] [--row-streaming auto|on|off] [--json] [--out PLAN.bin [--lr LR]
//! [--partial MIN:MAX] [--error-ranges tracked|exact]]`: compile the training step and print
//! its memory report; a plan over the budget is refused (an error, so exit code 2) after the
//! report. The budget is the device's, counted as `train --on` counts it
//! ([`device::firmware::check_plan`] over [`PlanSizes`]: the planned tensors, the training
//! state and the firmware's minimum stack in SRAM, the plan file in flash), so a plan that
//! `plan` accepts is never refused by a device run. With `--out`, a plan that fits is written
//! as a plan file for the device ([`plan_file::write`]; MODEL must then be a model file: an
//! int8 one gives an FQT plan, a float32 one an SGD plan, with momentum `M` when `--momentum`
//! is given).

use super::parse_partial;
use crate::compile::plan_file::{self, PlanSizes};
use crate::compile::report::{kb, MemoryReport};
use crate::compile::{
    compile_streaming, PlanOptions, Precision, RowStreaming, StepOp, TrainingPlan,
};
use crate::device::{self, Budget};
use crate::engine::fqt::{ErrorRanges, FqtConfig};
use crate::model::{format, scheme, zoo, Architecture, LayerUpdate, Model, Params, UpdateScheme};
use anyhow::{bail, Context, Result};
use mcutrain_core::plan::TrainConfig;
use std::path::{Path, PathBuf};

/// Element sizes to plan for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum PrecisionArg {
    /// int8 activations, errors and weights (fully quantized training).
    Int8,
    /// float32 everything.
    Float32,
}

/// Arguments of `mcutrain plan`.
#[derive(clap::Args, Debug)]
pub(crate) struct PlanArgs {
    /// A model file, or a reference architecture: fashion-shift, mbv2-w035-r128.
    pub(crate) model: String,
    /// Parameters to update: all, last:K, bias:K, or a JSON scheme file of
    /// {"layer", "weight" (0, 1/8, 1/4, 1/2, 1), "bias"} entries.
    #[arg(long, default_value = "all")]
    pub(crate) update: String,
    /// SRAM budget of the device, e.g. 256K, 1M, 320KB or a byte count (K = 1024 B): the
    /// arena (planned tensors and training state) plus the firmware's minimum stack must fit,
    /// as `train --on` checks it.
    #[arg(long, default_value = "256K")]
    pub(crate) sram: String,
    /// Flash budget of the device: the plan file must fit (code comes on top).
    #[arg(long, default_value = "1M")]
    pub(crate) flash: String,
    /// Samples per update (gradients accumulate over the batch).
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Keep every gradient until the end of the backward (the naive baseline).
    #[arg(long)]
    pub(crate) no_reorder: bool,
    /// Row-stream chains of frozen convolutions (int8): `on` gives the smallest plan, `off`
    /// the fewest instructions, `auto` streams only when the plan does not fit --sram
    /// otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) row_streaming: RowStreaming,
    /// Element sizes (default: the model file's; int8 for an architecture name).
    #[arg(long, value_enum)]
    pub(crate) precision: Option<PrecisionArg>,
    /// float32 SGD with momentum M (default 0.9): a velocity buffer per trained parameter.
    #[arg(long, value_name = "M", num_args = 0..=1, default_missing_value = "0.9")]
    pub(crate) momentum: Option<f32>,
    /// Print one JSON object on stdout instead of the readable report.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write the plan file for the device here (MODEL must be an int8 or float32 model file).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Learning rate stored in the plan file (the peak of a cosine schedule the device may
    /// apply with `exec::set_learning_rate`).
    #[arg(long, default_value_t = FqtConfig::default().lr)]
    pub(crate) lr: f32,
    /// Dynamic partial updates `LAMBDA_MIN:LAMBDA_MAX` stored in the plan file, e.g. 0.1:0.1
    /// (int8 only).
    #[arg(long)]
    pub(crate) partial: Option<String>,
    /// How the device quantizes error tensors, stored in the plan file (int8 only): `tracked`
    /// or `exact` (the default; needs 16 B of training state per model tensor), see
    /// `mcutrain train --error-ranges`.
    #[arg(long)]
    pub(crate) error_ranges: Option<ErrorRanges>,
}

/// Run `mcutrain plan`.
pub(crate) fn run(args: PlanArgs) -> Result<()> {
    if args.out.is_some() && !Path::new(&args.model).is_file() {
        bail!(
            "--out writes the model's parameters into the plan: pass an int8 or float32 model file, not '{}'",
            args.model
        );
    }
    let (arch, model) = load(&args.model)?;
    let precision = match (args.precision, &model) {
        (Some(PrecisionArg::Int8), _) => Precision::Int8,
        (Some(PrecisionArg::Float32), _) => Precision::Float32,
        (None, Some(m)) if matches!(m.params, Params::Float(_)) => Precision::Float32,
        (None, _) => Precision::Int8,
    };
    let budget = Budget {
        sram_bytes: device::parse_size(&args.sram)?,
        flash_bytes: device::parse_size(&args.flash)?,
        ..Budget::default()
    };
    let updates = parse_scheme(&arch, &args.update)?;
    let config = train_config(&args, precision)?;
    let options = PlanOptions {
        precision,
        batch: args.batch,
        reorder: !args.no_reorder,
        momentum: config.momentum != 0.0,
        row_streaming: true,
    };
    let fits = |p: &TrainingPlan| {
        PlanSizes::planned(&arch, p, &config)
            .is_ok_and(|sizes| device::firmware::check_plan(&sizes, &budget).is_ok())
    };
    let plan = compile_streaming(&arch, &updates, &options, args.row_streaming, fits)?;
    let sizes = PlanSizes::planned(&arch, &plan, &config)?;
    let fit = device::firmware::check_plan(&sizes, &budget).is_ok();
    let streamed = plan.steps.iter().any(|s| s.op == StepOp::StreamedForward);
    let report = MemoryReport::new(&arch, &plan);
    let written = match (&args.out, &model, fit) {
        (Some(path), Some(model), true) => {
            Some(write_plan_file(path, &plan, model, &config, &sizes)?)
        }
        _ => None,
    };
    let sram = sizes.arena_bytes() + budget.min_stack_bytes;
    if args.json {
        let mut value = report.json();
        value["model"] = args.model.clone().into();
        value["update"] = args.update.clone().into();
        value["budget_bytes"] = budget.sram_bytes.into();
        value["flash_budget_bytes"] = budget.flash_bytes.into();
        value["state_bytes"] = sizes.state_bytes.into();
        value["arena_required_bytes"] = sizes.arena_bytes().into();
        value["min_stack_bytes"] = budget.min_stack_bytes.into();
        value["sram_bytes"] = sram.into();
        value["plan_file_bytes"] = sizes.file_bytes.into();
        value["fits"] = fit.into();
        value["row_streaming"] = streamed.into();
        if let Some(path) = &written {
            value["plan_file"] = path.display().to_string().into();
        }
        println!("{value}");
    } else {
        println!("model {}, update {}", args.model, args.update);
        println!("{}", streaming_line(args.row_streaming, streamed));
        print!("{}", report.text());
        println!(
            "on the device: SRAM {} + {} minimum stack = {}; flash: plan file {} ({})",
            sizes.describe_arena(),
            budget.min_stack_bytes,
            kb(sram as usize),
            kb(sizes.file_bytes as usize),
            state_contents(plan.precision, config.error_ranges),
        );
        if fit {
            println!(
                "fits the SRAM budget of {} ({} free) and the flash budget of {}",
                kb(budget.sram_bytes as usize),
                kb((budget.sram_bytes - sram) as usize),
                kb(budget.flash_bytes as usize)
            );
        }
        if let Some(path) = &written {
            println!("wrote {} ({} B)", path.display(), sizes.file_bytes);
        }
    }
    if !fit {
        bail!(
            "refused: the plan needs {} of SRAM on the device ({} + {} minimum stack), over the budget of {}, and a plan file of {} for a flash budget of {}; biggest contributors at the peak ({}): {}",
            kb(sram as usize),
            sizes.describe_arena(),
            budget.min_stack_bytes,
            kb(budget.sram_bytes as usize),
            kb(sizes.file_bytes as usize),
            kb(budget.flash_bytes as usize),
            report.peak_step_name,
            report.contributors_text(5)
        );
    }
    Ok(())
}

/// What the training state holds, in words.
fn state_contents(precision: Precision, error_ranges: ErrorRanges) -> &'static str {
    match (precision, error_ranges) {
        (Precision::Int8, ErrorRanges::Exact) => "training state: sample counter, learning rate, range trackers, the errors' quantization (exact error ranges), weight quantization, partial-update lists",
        (Precision::Int8, ErrorRanges::Tracked) => "training state: sample counter, learning rate, range trackers, weight quantization, partial-update lists",
        (Precision::Float32, _) => "training state: sample counter and learning rate",
    }
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

/// The plan's hyper-parameters: int8, `--lr`, `--partial` and `--error-ranges` with the other
/// rates at their FQT defaults; float32, `--lr` and `--momentum`. They size the training
/// state, so they are known before the plan is checked against the budget.
fn train_config(args: &PlanArgs, precision: Precision) -> Result<TrainConfig> {
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }
    match precision {
        Precision::Int8 => {
            if args.momentum.is_some() {
                bail!("--momentum applies to float32 plans; the int8 (FQT) update keeps gradient statistics instead");
            }
            let config = FqtConfig {
                lr: args.lr,
                partial: args.partial.as_deref().map(parse_partial).transpose()?,
                error_ranges: args.error_ranges.unwrap_or_default(),
                ..FqtConfig::default()
            };
            Ok(config.plan_config())
        }
        Precision::Float32 => {
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
            Ok(plan_file::float_train_config(args.lr, momentum))
        }
    }
}

/// Write the plan file of `plan` with `model`'s parameters and `config` to `path`
/// (atomically), after checking that its sizes are the `planned` ones the budget was checked
/// with.
fn write_plan_file(
    path: &Path,
    plan: &TrainingPlan,
    model: &Model,
    config: &TrainConfig,
    planned: &PlanSizes,
) -> Result<PathBuf> {
    let bytes = plan_file::write(plan, model, config).context("writing the plan file")?;
    let sizes = PlanSizes::of(&bytes)?;
    if sizes != *planned {
        bail!("the written plan file has sizes {sizes:?}, the budget was checked with {planned:?}");
    }
    crate::fsutil::write_atomically(path, &bytes)?;
    Ok(path.to_path_buf())
}

/// The architecture named `model` and, for a model file, the model: a file, or a reference
/// architecture.
fn load(model: &str) -> Result<(Architecture, Option<Model>)> {
    let path = Path::new(model);
    if path.exists() {
        let m = format::load(path).with_context(|| format!("reading {model}"))?;
        return Ok((m.arch.clone(), Some(m)));
    }
    let arch = zoo::reference(model).with_context(|| {
        format!(
            "'{model}' is neither a model file nor a reference architecture ({})",
            zoo::REFERENCES.join(", ")
        )
    })?;
    Ok((arch, None))
}

/// `all`, `last:K`, `bias:K`, or a scheme file.
fn parse_scheme(arch: &Architecture, text: &str) -> Result<Vec<LayerUpdate>> {
    if Path::new(text).is_file() {
        return Ok(scheme::from_file(arch, Path::new(text))?);
    }
    let scheme: UpdateScheme = text.parse().map_err(|e: String| {
        anyhow::anyhow!("{e}, or the path of a JSON scheme file (no such file: {text})")
    })?;
    Ok(scheme.updates(arch))
}

#[cfg(test)]
mod tests {
    use super::*;

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
