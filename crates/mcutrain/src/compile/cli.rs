//! `mcutrain plan MODEL --update SCHEME --sram 256K [--batch N] [--no-reorder] [--json]`:
//! compile the training step and print its memory report; a plan over the SRAM budget is
//! refused (an error, so exit code 2) after the report.

use super::report::{check_budget, MemoryReport};
use super::{compile, scheme, LayerUpdate, PlanOptions, Precision};
use crate::engine::UpdateScheme;
use crate::model::{format, zoo, Architecture, Params};
use anyhow::{bail, Context, Result};
use std::path::Path;

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
    /// Element sizes (default: the model file's; int8 for an architecture name).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// float32 SGD with momentum (a velocity buffer per trained parameter).
    #[arg(long)]
    pub momentum: bool,
    /// Print one JSON object on stdout instead of the readable report.
    #[arg(long)]
    pub json: bool,
}

/// Run `mcutrain plan`.
pub fn run(args: PlanArgs) -> Result<()> {
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
        momentum: args.momentum,
    };
    let plan = compile(&arch, &updates, &options)?;
    let report = MemoryReport::new(&arch, &plan);
    let verdict = check_budget(&report, budget);
    if args.json {
        let mut value = report.json();
        value["model"] = args.model.clone().into();
        value["update"] = args.update.clone().into();
        value["budget_bytes"] = budget.into();
        value["fits"] = verdict.is_ok().into();
        println!("{value}");
    } else {
        println!("model {}, update {}", args.model, args.update);
        print!("{}", report.text());
        if verdict.is_ok() {
            println!(
                "fits the SRAM budget of {} ({} free)",
                super::report::kb(budget),
                super::report::kb(budget - report.peak_bytes)
            );
        }
    }
    verdict.context("refused")?;
    Ok(())
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
    let upper = text.trim().to_ascii_uppercase();
    let number = upper.strip_suffix('B').unwrap_or(&upper);
    let (digits, unit) = match number.chars().last() {
        Some('K') => (&number[..number.len() - 1], 1024),
        Some('M') => (&number[..number.len() - 1], 1024 * 1024),
        _ => (number, 1),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
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
