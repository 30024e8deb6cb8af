//! Post-training quantization of a float model to the int8 form that training and the
//! device run.
//!
//! Calibration runs the float model over N samples and records, for every tensor, the real
//! extremes of the activations and of the error tensors of a backward pass (errors in units
//! of each sample's loss gradient, see `engine::fqt::error_unit`), so fully quantized
//! training starts with usable error ranges. Weights are quantized per tensor,
//! asymmetric over their real `[min, max]`; biases become `i32` in the accumulator scale
//! `s_b = s_x * s_w`.

use crate::data::Dataset;
use crate::engine::float::{zeros_like, FloatNet, CHUNK};
use crate::engine::fqt::error_unit;
use crate::model::UpdateScheme;
use crate::model::{FloatLayer, Model, ModelError, Params, QuantLayer, QuantState};
use mcutrain_core::quant::{round_half_up, QParams, RangeEma, RealRange};

/// Quantize `model` (float32) with `samples` calibration samples taken from the start of
/// `calibration`.
pub fn quantize(model: &Model, calibration: &Dataset, samples: usize) -> Result<Model, ModelError> {
    let Params::Float(params) = &model.params else {
        return Err(ModelError::BadParams(
            "the model is already int8; pass a float32 model".into(),
        ));
    };
    let net = FloatNet::new(&model.arch)?;
    let n = model.arch.layers.len();
    let samples = samples.min(calibration.len()).max(1);
    let len = calibration.sample_len();
    let updates = UpdateScheme::All.updates(&model.arch);
    let mut activation_ranges = vec![RealRange::EMPTY; n + 1];
    let mut error_ranges = vec![RealRange::EMPTY; n + 1];
    for start in (0..samples).step_by(CHUNK) {
        let batch = CHUNK.min(samples - start);
        let input = &calibration.samples[start * len..(start + batch) * len];
        let labels = &calibration.labels[start..start + batch];
        let tensors = net.forward(params, input, batch);
        let mut grads = zeros_like(params);
        let back = net.backward(params, &tensors, labels, &updates, &mut grads);
        let classes = model.arch.classes;
        let logit_errors = back.errors[n].as_deref().unwrap_or(&[]);
        for t in 0..=n {
            activation_ranges[t] = activation_ranges[t].merge(RealRange::of(&tensors[t]));
            let Some(e) = &back.errors[t] else { continue };
            // Error ranges are kept in units of each sample's loss gradient (fqt::error_unit).
            let per_sample = e.len() / batch;
            for (j, sample_err) in e.chunks(per_sample).enumerate() {
                let unit = error_unit(RealRange::of(&logit_errors[j * classes..(j + 1) * classes]));
                let r = RealRange::of(sample_err);
                error_ranges[t] = error_ranges[t].merge(RealRange {
                    min: r.min / unit,
                    max: r.max / unit,
                });
            }
        }
    }
    let to_ema = |r: &RealRange| {
        if r.is_empty() {
            RangeEma::new()
        } else {
            RangeEma::from_range(r.min, r.max)
        }
    };
    let activations: Vec<RangeEma> = activation_ranges.iter().map(to_ema).collect();
    let layers = params
        .iter()
        .enumerate()
        .map(|(i, p)| quantize_layer(p, activations[i].qparams()))
        .collect();
    let quantized = Model {
        arch: model.arch.clone(),
        params: Params::Int8(QuantState {
            layers,
            activations,
            errors: error_ranges.iter().map(to_ema).collect(),
        }),
    };
    quantized.validate()?;
    Ok(quantized)
}

/// Per-tensor asymmetric weights over their real range; bias in the accumulator scale
/// `s_x * s_w` (`b_q = round(b / (s_x s_w))`).
fn quantize_layer(p: &FloatLayer, input_q: QParams) -> QuantLayer {
    if p.weight.is_empty() {
        return QuantLayer {
            weight: Vec::new(),
            weight_q: Vec::new(),
            weight_range: RangeEma::new(),
            bias: Vec::new(),
            bias_scale: 1.0,
        };
    }
    let range = RealRange::of(&p.weight);
    let weight_range = RangeEma::from_range(range.min, range.max);
    let weight_q = weight_range.qparams();
    let bias_scale = input_q.scale * weight_q.scale;
    QuantLayer {
        weight: p.weight.iter().map(|&w| weight_q.quantize(w)).collect(),
        weight_q: vec![weight_q],
        weight_range,
        bias: p
            .bias
            .iter()
            .map(|&b| round_half_up(b / bias_scale))
            .collect(),
        bias_scale,
    }
}

/// The float model that an int8 model represents (weights and biases dequantized), e.g. to
/// fine-tune in float from the same starting point.
pub fn dequantize(model: &Model) -> Result<Model, ModelError> {
    let Params::Int8(state) = &model.params else {
        return Ok(model.clone());
    };
    let layers = state
        .layers
        .iter()
        .map(|l| {
            let per_channel = l.weight_q.len() > 1;
            let structure = if l.bias.is_empty() {
                1
            } else {
                l.weight.len() / l.bias.len()
            };
            FloatLayer {
                weight: l
                    .weight
                    .iter()
                    .enumerate()
                    .map(|(k, &w)| {
                        l.weight_q[if per_channel { k / structure } else { 0 }].dequantize(w)
                    })
                    .collect(),
                bias: l.bias.iter().map(|&b| b as f32 * l.bias_scale).collect(),
            }
        })
        .collect();
    Ok(Model {
        arch: model.arch.clone(),
        params: Params::Float(layers),
    })
}
