//! `mcutrain eval`, `info` and `model`.

use super::{
    add_device_figures, architecture, check_fit, load_data, load_model, print_device_figures,
    session_bar, DataArgs, DeviceArgs, Output, Target,
};
use crate::adapt::evaluate;
use crate::data::Split;
use crate::device;
use crate::model::{format, zoo};
use crate::report::{pct, table};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `mcutrain eval`.
#[derive(Args)]
pub(crate) struct EvalArgs {
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

/// Arguments of `mcutrain info`.
#[derive(Args)]
pub(crate) struct InfoArgs {
    /// The model file.
    model: PathBuf,
    #[command(flatten)]
    output: Output,
}

/// Arguments of `mcutrain model`.
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Architecture name: `fashion-shift` or `mbv2-w035-r128`.
    name: String,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the model.
    #[arg(long)]
    out: PathBuf,
}

/// `mcutrain eval`: accuracy on the host twin or a device.
pub(crate) fn eval(a: EvalArgs) -> Result<()> {
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

/// `mcutrain info`: layers, shapes, parameters, MACs.
pub(crate) fn info(a: InfoArgs) -> Result<()> {
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
                l.kind.name().to_string(),
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

/// `mcutrain model`: a reference architecture with seeded initial weights.
pub(crate) fn model(a: ModelArgs) -> Result<()> {
    let model = zoo::init_float(&architecture(&a.name)?, a.seed)?;
    format::save(&a.out, &model)?;
    println!(
        "wrote {} ({} parameters)",
        a.out.display(),
        model.arch.param_count()?
    );
    Ok(())
}
