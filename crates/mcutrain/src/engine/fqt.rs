//! Fully quantized training (Deutel et al. 2024, shared/methods.md section 1): 8-bit weights,
//! activations and error tensors with adaptive ranges, gradient standardization, mini-batch
//! accumulation and dynamic partial gradient updates.
//!
//! Order of work, per mini-batch: every sample runs forward and backward with the
//! quantization parameters fixed at the start of the batch, its gradients are added to the
//! batch's `f32` gradient buffers in sample order, then the updates are applied and the range
//! trackers fold in the real extremes observed over the batch.
//!
//! Error tensors: the logits error is quantized with its own range, whose largest magnitude is
//! the sample's error unit ([`error_unit`]); every other error is first computed with its
//! tracker's range in that unit. With [`ErrorRanges::Exact`] (the default) it is computed once
//! more with its exact range when that first guess clipped it or left more than half of the
//! codes unused ([`quantize_error`]): the spread of error magnitudes between samples is wider
//! than any one tracked range fits (on fashion-shift, the errors and weight gradients of the
//! layers furthest from the loss fall below a cosine similarity of 0.99 with the float ones
//! under tracked ranges alone). [`ErrorRanges::Tracked`] is the paper's moving-average rule.

use super::{cosine_lr, first_trained_layer, Trainable, UpdateScheme};
use crate::data::Dataset;
use crate::engine::float::{epoch_orders, zeros_like};
use crate::model::{
    numel, Architecture, FloatLayer, Geometry, LayerKind, Model, ModelError, Params, QuantState,
    Shape,
};
use mcutrain_core::ops::{activation, add, conv2d, linear, loss, pool, ChannelSet};
/// The per-sample error unit and the error quantization rule, shared with the device
/// executor.
pub use mcutrain_core::plan::exec::{error_unit, quantize_error, scale_range, WrittenError};
/// How error tensors get their quantization (a training option, stored in plan files).
pub use mcutrain_core::plan::ErrorRanges;
use mcutrain_core::quant::{QParams, RealRange};
use mcutrain_core::update::{self, FqtUpdateConfig, GradStats};
use rayon::prelude::*;

/// Dynamic partial gradient updates: per layer and sample, only the
/// `k = max(floor((lambda_min + |e / e_max| (lambda_max - lambda_min)) N), 1)` output channels
/// with the largest mean absolute error are back-propagated and updated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialUpdate {
    /// Smallest fraction of structures updated, in `(0, 1]`.
    pub lambda_min: f32,
    /// Largest fraction, in `[lambda_min, 1]`.
    pub lambda_max: f32,
}

/// Hyper-parameters of fully quantized training.
#[derive(Clone, Debug)]
pub struct FqtConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Samples per update (1 needs no gradient accumulation on a device).
    pub batch: usize,
    /// Learning rate of the standardized weight update and of the bias update.
    pub lr: f32,
    /// Which parameters are updated.
    pub scheme: UpdateScheme,
    /// Seed of the sample order.
    pub seed: u64,
    /// Moving-average rate of activation ranges.
    pub activation_rate: f32,
    /// Moving-average rate of error ranges.
    pub error_rate: f32,
    /// Moving-average rate of weight ranges.
    pub weight_rate: f32,
    /// Moving-average rate of the per-structure gradient mean and variance.
    pub stats_rate: f32,
    /// Dynamic partial updates, or `None` to update every structure.
    pub partial: Option<PartialUpdate>,
    /// How error tensors are quantized: the tracked ranges alone, or recomputed with their
    /// exact range where those fit badly ([`ErrorRanges`]).
    pub error_ranges: ErrorRanges,
}

impl Default for FqtConfig {
    fn default() -> Self {
        FqtConfig {
            epochs: 5,
            batch: 16,
            lr: 0.01,
            scheme: UpdateScheme::All,
            seed: 0,
            activation_rate: 0.1,
            error_rate: 0.1,
            weight_rate: 0.001,
            stats_rate: 0.2,
            partial: None,
            error_ranges: ErrorRanges::Exact,
        }
    }
}

/// An int8 model resolved for execution.
pub struct QuantNet<'a> {
    arch: &'a Architecture,
    shapes: Vec<Shape>,
}

/// An error tensor with the quantization it was written in.
#[derive(Clone, Debug)]
pub struct QError {
    /// Codes.
    pub codes: Vec<i8>,
    /// Their quantization.
    pub q: QParams,
}

/// What the backward pass of one sample produced.
pub struct SampleGradients {
    /// Loss of the sample.
    pub loss: f32,
    /// Gradients (real units) of the trainable parameters; empty vectors elsewhere.
    pub grads: Vec<FloatLayer>,
    /// Real range of every error tensor computed (not passed through).
    pub error_ranges: Vec<RealRange>,
    /// Output channels whose gradient was computed, per layer (`None`: all of them).
    pub selected: Vec<Option<Vec<u16>>>,
    /// Mean absolute output error of each trainable layer (real units), for partial updates.
    pub layer_errors: Vec<f32>,
    /// Error tensors as the consuming layers used them.
    pub errors: Vec<Option<QError>>,
    /// Error tensors computed by a kernel in this sample (input errors and sums; the logits
    /// error and pass-through errors are not counted).
    pub errors_written: usize,
    /// How many of them were recomputed with their exact range ([`quantize_error`]).
    pub errors_recomputed: usize,
}

impl<'a> QuantNet<'a> {
    /// Resolve `arch`.
    pub fn new(arch: &'a Architecture) -> Result<Self, ModelError> {
        Ok(QuantNet {
            shapes: arch.shapes()?,
            arch,
        })
    }

    fn geometry(&self, layer: usize, batch: usize) -> Geometry {
        self.arch
            .geometry(layer, self.shapes[layer], batch)
            .expect("geometries were validated by Architecture::shapes")
    }

    /// Layers whose output keeps the codes and quantization of their input.
    fn preserves_codes(kind: &LayerKind) -> bool {
        matches!(
            kind,
            LayerKind::Activation(_) | LayerKind::MaxPool { .. } | LayerKind::Flatten
        )
    }

    /// Index of the tensor whose range tracker quantizes tensor `t` (code-preserving layers
    /// share their input's).
    pub fn range_owner(&self, mut t: usize) -> usize {
        while t > 0 && Self::preserves_codes(&self.arch.layers[t - 1].kind) {
            t -= 1;
        }
        t
    }

    /// Quantization of activation tensor `t`.
    pub fn activation_q(&self, state: &QuantState, t: usize) -> QParams {
        state.activations[self.range_owner(t)].qparams()
    }

    /// Quantize float inputs with the input tensor's parameters.
    pub fn quantize_input(&self, state: &QuantState, input: &[f32]) -> Vec<i8> {
        let q = self.activation_q(state, 0);
        input.iter().map(|&v| q.quantize(v)).collect()
    }

    /// Integer forward pass of `batch` samples; returns every tensor and the real range each
    /// computed tensor had before saturation.
    pub fn forward(
        &self,
        state: &QuantState,
        input: Vec<i8>,
        batch: usize,
    ) -> (Vec<Vec<i8>>, Vec<RealRange>) {
        let n = self.arch.layers.len();
        let mut tensors: Vec<Vec<i8>> = Vec::with_capacity(n + 1);
        let mut ranges = vec![RealRange::EMPTY; n + 1];
        tensors.push(input);
        for (i, layer) in self.arch.layers.iter().enumerate() {
            let x = &tensors[i];
            let in_q = self.activation_q(state, i);
            let out_q = self.activation_q(state, i + 1);
            let p = &state.layers[i];
            let mut y = vec![0i8; batch * numel(self.shapes[i + 1])];
            let range = match (&layer.kind, self.geometry(i, batch)) {
                (
                    LayerKind::Conv2d {
                        activation: act, ..
                    },
                    Geometry::Conv(g),
                ) => {
                    let q = layer_params(in_q, p, out_q, *act);
                    conv2d::forward_q(&g, x, &p.weight, &p.bias, &q, &mut y)
                }
                (
                    LayerKind::Linear {
                        activation: act, ..
                    },
                    Geometry::Linear(g),
                ) => {
                    let q = layer_params(in_q, p, out_q, *act);
                    linear::forward_q(&g, x, &p.weight, &p.bias, &q, &mut y)
                }
                (LayerKind::Activation(act), _) => {
                    activation::forward_q(*act, x, in_q, &mut y);
                    RealRange::EMPTY
                }
                (LayerKind::AvgPool { .. }, Geometry::Pool(g)) => {
                    pool::avg_forward_q(&g, x, in_q, out_q, &mut y)
                }
                (LayerKind::MaxPool { .. }, Geometry::Pool(g)) => {
                    pool::max_forward_q(&g, x, &mut y);
                    RealRange::EMPTY
                }
                (LayerKind::GlobalAvgPool, Geometry::Elementwise { channels, spatial }) => {
                    pool::global_avg_forward_q(
                        &pool::GlobalPoolGeom {
                            batch,
                            channels,
                            spatial,
                        },
                        x,
                        in_q,
                        out_q,
                        &mut y,
                    )
                }
                (LayerKind::Add { skip_from }, _) => {
                    let skip_q = self.activation_q(state, skip_from + 1);
                    add::forward_q(x, in_q, &tensors[skip_from + 1], skip_q, out_q, &mut y)
                }
                (LayerKind::Flatten, _) => {
                    y.copy_from_slice(x);
                    RealRange::EMPTY
                }
                (kind, g) => unreachable!("layer {kind:?} resolved to {g:?}"),
            };
            ranges[i + 1] = range;
            tensors.push(y);
        }
        (tensors, ranges)
    }

    /// Backward pass of one sample (forward `tensors`, `label`), with softmax cross-entropy;
    /// every input error and error sum is quantized by [`quantize_error`] under
    /// `error_ranges`, and its consumers use the quantization it was written with.
    pub fn backward(
        &self,
        state: &QuantState,
        tensors: &[Vec<i8>],
        label: u16,
        trainable: &[Trainable],
        partial: Option<(PartialUpdate, &[f32])>,
        error_ranges_mode: ErrorRanges,
    ) -> SampleGradients {
        let n = self.arch.layers.len();
        let mut errors: Vec<Option<QError>> = vec![None; n + 1];
        let mut error_ranges = vec![RealRange::EMPTY; n + 1];
        let mut selected: Vec<Option<Vec<u16>>> = vec![None; n];
        let mut layer_errors = vec![0.0f32; n];
        let mut grads: Vec<FloatLayer> = state
            .layers
            .iter()
            .zip(trainable)
            .map(|(p, t)| FloatLayer {
                weight: vec![0.0; if t.weight { p.weight.len() } else { 0 }],
                bias: vec![0.0; if t.bias { p.bias.len() } else { 0 }],
            })
            .collect();
        // The loss gradient's exact range (a handful of values) fixes this sample's error
        // unit; every error tracker holds ranges in that unit (see `error_unit`).
        let logits_q = self.activation_q(state, n);
        let mut out_err = vec![0i8; tensors[n].len()];
        let classes = self.arch.classes;
        let (_, loss_range) = loss::softmax_cross_entropy_q(
            &tensors[n],
            logits_q,
            &[label],
            classes,
            QParams::from_range(-1.0, 1.0),
            &mut out_err,
        );
        let unit = error_unit(loss_range);
        // The first guess for an error of tensor `t`: its tracker in this sample's unit.
        let err_q = |t: usize| {
            let q = state.errors[t].qparams();
            QParams {
                scale: q.scale * unit,
                zero_point: q.zero_point,
            }
        };
        let (mut errors_written, mut errors_recomputed) = (0usize, 0usize);
        let mut count = |written: WrittenError| {
            errors_written += 1;
            errors_recomputed += written.recomputed as usize;
            written
        };
        let out_q = QParams::from_range(loss_range.min, loss_range.max);
        let (loss, _) = loss::softmax_cross_entropy_q(
            &tensors[n],
            logits_q,
            &[label],
            classes,
            out_q,
            &mut out_err,
        );
        error_ranges[n] = scale_range(loss_range, 1.0 / unit);
        errors[n] = Some(QError {
            codes: out_err,
            q: out_q,
        });
        let Some(lowest) = first_trained_layer(trainable) else {
            return SampleGradients {
                loss,
                grads,
                error_ranges,
                selected,
                layer_errors,
                errors,
                errors_written,
                errors_recomputed,
            };
        };
        for i in (lowest..n).rev() {
            let Some(QError {
                codes: mut err,
                q: eq,
            }) = errors[i + 1].take()
            else {
                continue;
            };
            let needs_input_err = i > lowest;
            let x = &tensors[i];
            let x_q = self.activation_q(state, i);
            let layer = &self.arch.layers[i];
            let p = &state.layers[i];
            let mut contributions: Vec<(usize, QError, RealRange)> = Vec::new();
            match (&layer.kind, self.geometry(i, 1)) {
                (
                    LayerKind::Conv2d {
                        activation: act, ..
                    }
                    | LayerKind::Linear {
                        activation: act, ..
                    },
                    geometry,
                ) => {
                    activation::backward_mask_q(
                        *act,
                        &tensors[i + 1],
                        self.activation_q(state, i + 1),
                        &mut err,
                        eq,
                    );
                    let (channels_count, spatial) = match geometry {
                        Geometry::Conv(g) => (g.out_channels, g.out_h() * g.out_w()),
                        Geometry::Linear(g) => (g.out_features, 1),
                        other => unreachable!("parametric layer resolved to {other:?}"),
                    };
                    if trainable[i].any() {
                        let mut scores = vec![0.0f32; channels_count];
                        update::structure_error_scores_q(
                            &err,
                            eq,
                            1,
                            channels_count,
                            spatial,
                            &mut scores,
                        );
                        layer_errors[i] = scores.iter().sum::<f32>() / channels_count as f32;
                        if let Some((cfg, error_max)) = partial {
                            let k = update::partial_update_count(
                                cfg.lambda_min,
                                cfg.lambda_max,
                                layer_errors[i],
                                error_max[i].max(layer_errors[i]),
                                channels_count,
                            );
                            let mut picked = vec![0u16; k];
                            let list = update::top_k_structures(&scores, k, &mut picked).to_vec();
                            selected[i] = Some(list);
                        }
                    }
                    let channels = match &selected[i] {
                        Some(list) => ChannelSet::Subset(list),
                        None => ChannelSet::All,
                    };
                    let mut input_err = vec![0i8; if needs_input_err { x.len() } else { 0 }];
                    match geometry {
                        Geometry::Conv(g) => {
                            if trainable[i].weight {
                                conv2d::weight_backward_q(
                                    &g,
                                    x,
                                    x_q,
                                    &err,
                                    eq,
                                    channels,
                                    &mut grads[i].weight,
                                );
                            }
                            if trainable[i].bias {
                                conv2d::bias_backward_q(&g, &err, eq, channels, &mut grads[i].bias);
                            }
                        }
                        Geometry::Linear(g) => {
                            if trainable[i].weight {
                                linear::weight_backward_q(
                                    &g,
                                    x,
                                    x_q,
                                    &err,
                                    eq,
                                    channels,
                                    &mut grads[i].weight,
                                );
                            }
                            if trainable[i].bias {
                                linear::bias_backward_q(&g, &err, eq, channels, &mut grads[i].bias);
                            }
                        }
                        _ => unreachable!(),
                    }
                    if needs_input_err {
                        let (w, wq) = (&p.weight, &p.weight_q);
                        let written = count(quantize_error(error_ranges_mode, err_q(i), |q| {
                            let e = &mut input_err;
                            match geometry {
                                Geometry::Conv(g) => {
                                    conv2d::input_backward_q(&g, w, wq, &err, eq, channels, q, e)
                                }
                                Geometry::Linear(g) => {
                                    linear::input_backward_q(&g, w, wq, &err, eq, channels, q, e)
                                }
                                _ => unreachable!(),
                            }
                        }));
                        contributions.push((
                            i,
                            QError {
                                codes: input_err,
                                q: written.q,
                            },
                            written.range,
                        ));
                    }
                }
                (LayerKind::Activation(act), _) => {
                    activation::backward_mask_q(*act, &tensors[i + 1], x_q, &mut err, eq);
                    contributions.push((
                        i,
                        QError {
                            codes: err.clone(),
                            q: eq,
                        },
                        RealRange::EMPTY,
                    ));
                }
                (LayerKind::AvgPool { .. }, Geometry::Pool(g)) => {
                    let mut e = vec![0i8; x.len()];
                    let written = count(quantize_error(error_ranges_mode, err_q(i), |q| {
                        pool::avg_input_backward_q(&g, &err, eq, q, &mut e)
                    }));
                    contributions.push((
                        i,
                        QError {
                            codes: e,
                            q: written.q,
                        },
                        written.range,
                    ));
                }
                (LayerKind::MaxPool { .. }, Geometry::Pool(g)) => {
                    let mut e = vec![0i8; x.len()];
                    let written = count(quantize_error(error_ranges_mode, err_q(i), |q| {
                        pool::max_input_backward_q(&g, x, &err, eq, q, &mut e)
                    }));
                    contributions.push((
                        i,
                        QError {
                            codes: e,
                            q: written.q,
                        },
                        written.range,
                    ));
                }
                (LayerKind::GlobalAvgPool, Geometry::Elementwise { channels, spatial }) => {
                    let mut e = vec![0i8; x.len()];
                    let g = pool::GlobalPoolGeom {
                        batch: 1,
                        channels,
                        spatial,
                    };
                    let written = count(quantize_error(error_ranges_mode, err_q(i), |q| {
                        pool::global_avg_input_backward_q(&g, &err, eq, q, &mut e)
                    }));
                    contributions.push((
                        i,
                        QError {
                            codes: e,
                            q: written.q,
                        },
                        written.range,
                    ));
                }
                (LayerKind::Add { skip_from }, _) => {
                    contributions.push((
                        skip_from + 1,
                        QError {
                            codes: err.clone(),
                            q: eq,
                        },
                        RealRange::EMPTY,
                    ));
                    contributions.push((
                        i,
                        QError {
                            codes: err.clone(),
                            q: eq,
                        },
                        RealRange::EMPTY,
                    ));
                }
                (LayerKind::Flatten, _) => {
                    contributions.push((
                        i,
                        QError {
                            codes: err.clone(),
                            q: eq,
                        },
                        RealRange::EMPTY,
                    ));
                }
                (kind, g) => unreachable!("layer {kind:?} resolved to {g:?}"),
            }
            for (t, contribution, range) in contributions {
                if t <= lowest {
                    continue;
                }
                error_ranges[t] = error_ranges[t].merge(scale_range(range, 1.0 / unit));
                errors[t] = Some(match errors[t].take() {
                    None => contribution,
                    Some(existing) => {
                        let mut sum = vec![0i8; existing.codes.len()];
                        let written = count(quantize_error(error_ranges_mode, err_q(t), |q| {
                            add::forward_q(
                                &existing.codes,
                                existing.q,
                                &contribution.codes,
                                contribution.q,
                                q,
                                &mut sum,
                            )
                        }));
                        let range = scale_range(written.range, 1.0 / unit);
                        error_ranges[t] = error_ranges[t].merge(range);
                        QError {
                            codes: sum,
                            q: written.q,
                        }
                    }
                });
            }
            errors[i + 1] = Some(QError { codes: err, q: eq });
        }
        SampleGradients {
            loss,
            grads,
            error_ranges,
            selected,
            layer_errors,
            errors,
            errors_written,
            errors_recomputed,
        }
    }

    /// Predicted class of every sample of `data`.
    pub fn predict(&self, state: &QuantState, data: &Dataset) -> Vec<usize> {
        let len = data.sample_len();
        let classes = self.arch.classes;
        let chunks: Vec<Vec<usize>> = (0..data.len())
            .collect::<Vec<_>>()
            .par_chunks(64)
            .map(|idx| {
                let batch = idx.len();
                let input =
                    self.quantize_input(state, &data.samples[idx[0] * len..(idx[0] + batch) * len]);
                let (tensors, _) = self.forward(state, input, batch);
                let logits = tensors.last().expect("at least the input");
                logits.chunks(classes).map(loss::argmax_q).collect()
            })
            .collect();
        chunks.concat()
    }
}

/// The quantized-layer parameters of one conv/linear call.
fn layer_params<'p>(
    input: QParams,
    p: &'p crate::model::QuantLayer,
    output: QParams,
    act: activation::Activation,
) -> mcutrain_core::ops::arith::QLayerParams<'p> {
    mcutrain_core::ops::arith::QLayerParams {
        input,
        weight: &p.weight_q,
        bias_scale: p.bias_scale,
        output,
        activation: act,
    }
}

/// Training state that lives beside the model: gradient statistics and partial-update maxima.
pub struct FqtTrainer {
    trainable: Vec<Trainable>,
    /// Per layer: output channels whose weights train (the first ones). A strict subset trains
    /// under the layer's fixed quantization ([`update::fqt_update_weights_fixed`]), the rule
    /// that lets a device keep only those channels in SRAM.
    weight_channels: Vec<usize>,
    stats: Vec<Vec<GradStats>>,
    error_max: Vec<f32>,
    /// Learning rate of the next batch ([`FqtTrainer::train`] decays it from `cfg.lr`).
    lr: f32,
    cfg: FqtConfig,
}

/// Summary of one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochStats {
    /// Mean training loss.
    pub loss: f64,
    /// Fraction of structures whose gradient was computed, over trainable layers and samples.
    pub computed_fraction: f64,
    /// Fraction of the error tensors computed by a kernel that were computed a second time
    /// with their exact range (0 with [`ErrorRanges::Tracked`]).
    pub recomputed_fraction: f64,
}

/// What one mini-batch did ([`FqtTrainer::train_batch`]), summed over its samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// Sum of the losses.
    pub loss: f64,
    /// Structures whose gradient was computed, over the trainable layers.
    pub computed: usize,
    /// Structures of the trainable layers.
    pub possible: usize,
    /// Error tensors computed by a kernel ([`SampleGradients::errors_written`]).
    pub errors_written: usize,
    /// How many of them were recomputed with their exact range.
    pub errors_recomputed: usize,
}

impl std::ops::AddAssign for BatchStats {
    fn add_assign(&mut self, other: BatchStats) {
        self.loss += other.loss;
        self.computed += other.computed;
        self.possible += other.possible;
        self.errors_written += other.errors_written;
        self.errors_recomputed += other.errors_recomputed;
    }
}

/// `part / whole`, 0 when `whole` is 0.
fn fraction(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl FqtTrainer {
    /// A trainer for `model` under `cfg` (which trains `cfg.scheme`).
    pub fn new(model: &Model, cfg: FqtConfig) -> Result<Self, ModelError> {
        let updates = crate::compile::scheme::from_update_scheme(&model.arch, cfg.scheme);
        Self::with_updates(model, cfg, &updates)
    }

    /// A trainer for `model` that trains what `updates` says per layer (`cfg.scheme` is not
    /// used), for example a sparse scheme of channel ratios. A layer that trains a strict
    /// subset of its weight channels updates them under its fixed weight quantization; that
    /// cannot be combined with dynamic partial updates, which select among all channels.
    pub fn with_updates(
        model: &Model,
        cfg: FqtConfig,
        updates: &[crate::compile::LayerUpdate],
    ) -> Result<Self, ModelError> {
        let Params::Int8(state) = &model.params else {
            return Err(ModelError::BadParams(
                "fully quantized training needs an int8 model; run `mcutrain quantize` first"
                    .into(),
            ));
        };
        for (i, l) in state.layers.iter().enumerate() {
            if l.weight_q.len() > 1 {
                return Err(ModelError::BadParams(format!(
                    "layer {i} ({}) has per-channel weight scales; fully quantized training adapts one weight range per tensor: quantize with per-tensor weights",
                    model.arch.layers[i].name
                )));
            }
        }
        if updates.len() != state.layers.len() {
            return Err(ModelError::BadParams(format!(
                "the update scheme has {} entries for {} layers",
                updates.len(),
                state.layers.len()
            )));
        }
        for (i, (u, l)) in updates.iter().zip(&state.layers).enumerate() {
            let channels = l.bias.len();
            let subset = u.weight_channels > 0 && u.weight_channels < channels;
            if u.weight_channels > channels || (u.bias && channels == 0) {
                return Err(ModelError::BadParams(format!(
                    "layer {i} ({}) cannot train {} weight channels and bias={}: it has {channels} output channels",
                    model.arch.layers[i].name, u.weight_channels, u.bias
                )));
            }
            if subset && cfg.partial.is_some() {
                return Err(ModelError::BadParams(format!(
                    "layer {i} ({}) trains {} of its {channels} weight channels: dynamic partial updates select among all channels, so use one or the other",
                    model.arch.layers[i].name, u.weight_channels
                )));
            }
        }
        let trainable = updates
            .iter()
            .map(|u| Trainable {
                weight: u.weight_channels > 0,
                bias: u.bias,
            })
            .collect();
        let weight_channels = updates.iter().map(|u| u.weight_channels).collect();
        let stats = state
            .layers
            .iter()
            .map(|l| vec![GradStats::default(); l.bias.len()])
            .collect();
        Ok(FqtTrainer {
            error_max: vec![0.0; model.arch.layers.len()],
            lr: cfg.lr,
            stats,
            trainable,
            weight_channels,
            cfg,
        })
    }

    /// One mini-batch: gradients of every sample (in parallel, summed in sample order), the
    /// updates, then range adaptation. Returns the loss sum, the computed-structure count and
    /// the error tensors computed and recomputed.
    pub fn train_batch(
        &mut self,
        model: &mut Model,
        samples: &[&[f32]],
        labels: &[u16],
    ) -> BatchStats {
        let arch = model.arch.clone();
        let net = QuantNet::new(&arch).expect("the trainer was built for a valid model");
        let Params::Int8(state) = &mut model.params else {
            unreachable!("checked by FqtTrainer::new")
        };
        let partial = self.cfg.partial.map(|p| (p, self.error_max.as_slice()));
        let results: Vec<(SampleGradients, Vec<RealRange>)> = samples
            .par_iter()
            .zip(labels)
            .map(|(sample, &label)| {
                let input = net.quantize_input(state, sample);
                let (tensors, act_ranges) = net.forward(state, input, 1);
                let mode = self.cfg.error_ranges;
                let back = net.backward(state, &tensors, label, &self.trainable, partial, mode);
                (back, act_ranges)
            })
            .collect();
        let n = arch.layers.len();
        let mut grads = zeros_like(&results[0].0.grads);
        let mut touched: Vec<Vec<bool>> = state
            .layers
            .iter()
            .map(|l| vec![false; l.bias.len()])
            .collect();
        let mut act_ranges = vec![RealRange::EMPTY; n + 1];
        let mut err_ranges = vec![RealRange::EMPTY; n + 1];
        let mut stats = BatchStats::default();
        for (r, a) in &results {
            stats.loss += r.loss as f64;
            stats.errors_written += r.errors_written;
            stats.errors_recomputed += r.errors_recomputed;
            for (acc, g) in grads.iter_mut().zip(&r.grads) {
                acc.weight
                    .iter_mut()
                    .zip(&g.weight)
                    .for_each(|(a, b)| *a += b);
                acc.bias.iter_mut().zip(&g.bias).for_each(|(a, b)| *a += b);
            }
            for t in 0..=n {
                act_ranges[t] = act_ranges[t].merge(a[t]);
                err_ranges[t] = err_ranges[t].merge(r.error_ranges[t]);
            }
            for (i, layer_touched) in touched.iter_mut().enumerate() {
                if !self.trainable[i].any() {
                    continue;
                }
                stats.possible += layer_touched.len();
                match &r.selected[i] {
                    Some(list) => {
                        stats.computed += list.len();
                        list.iter().for_each(|&c| layer_touched[c as usize] = true);
                    }
                    None => {
                        stats.computed += layer_touched.len();
                        layer_touched.iter_mut().for_each(|t| *t = true);
                    }
                }
                self.error_max[i] = self.error_max[i].max(r.layer_errors[i]);
            }
        }
        let grad_scale = 1.0 / samples.len() as f32;
        let update_cfg = FqtUpdateConfig {
            lr: self.lr,
            stats_rate: self.cfg.stats_rate,
            range_rate: self.cfg.weight_rate,
            eps: 1e-12,
        };
        for i in 0..n {
            let tr = self.trainable[i];
            if !tr.any() {
                continue;
            }
            let list: Vec<u16> = touched[i]
                .iter()
                .enumerate()
                .filter(|(_, t)| **t)
                .map(|(c, _)| c as u16)
                .collect();
            let channels = ChannelSet::Subset(&list);
            let layer = &mut state.layers[i];
            let trained = self.weight_channels[i];
            if tr.weight && trained < layer.bias.len() {
                let structure_len = layer.weight.len() / layer.bias.len();
                let len = trained * structure_len;
                update::fqt_update_weights_fixed(
                    &mut layer.weight[..len],
                    layer.weight_q[0],
                    &grads[i].weight[..len],
                    structure_len,
                    ChannelSet::All,
                    &mut self.stats[i][..trained],
                    &update_cfg,
                );
            } else if tr.weight {
                let structure_len = layer.weight.len() / layer.bias.len();
                update::fqt_update_weights(
                    &mut layer.weight,
                    &mut layer.weight_q[0],
                    &mut layer.weight_range,
                    &grads[i].weight,
                    structure_len,
                    channels,
                    &mut self.stats[i],
                    &update_cfg,
                );
            }
            if tr.bias {
                update::fqt_update_bias(
                    &mut layer.bias,
                    layer.bias_scale,
                    &grads[i].bias,
                    channels,
                    self.lr,
                    grad_scale,
                );
            }
        }
        for t in 1..=n {
            if net.range_owner(t) == t {
                state.activations[t].observe(act_ranges[t], self.cfg.activation_rate);
            }
            state.errors[t].observe(err_ranges[t], self.cfg.error_rate);
        }
        stats
    }

    /// Train `model` on `data` for the configured epochs, with the learning rate decayed from
    /// `cfg.lr` by [`cosine_lr`] over all batches (as float training does).
    pub fn train(
        &mut self,
        model: &mut Model,
        data: &Dataset,
        mut progress: impl FnMut(usize, usize, usize),
    ) -> Vec<EpochStats> {
        let batch = self.cfg.batch.max(1);
        let steps = data.len().div_ceil(batch);
        let mut out = Vec::new();
        let orders = epoch_orders(data.len(), self.cfg.epochs, self.cfg.seed);
        for (epoch, order) in orders.into_iter().enumerate() {
            let mut epoch_stats = BatchStats::default();
            for (step, idx) in order.chunks(batch).enumerate() {
                self.lr = cosine_lr(self.cfg.lr, epoch * steps + step, steps * self.cfg.epochs);
                let samples: Vec<&[f32]> = idx.iter().map(|&i| data.sample(i)).collect();
                let labels: Vec<u16> = idx.iter().map(|&i| data.labels[i]).collect();
                epoch_stats += self.train_batch(model, &samples, &labels);
                progress(epoch, step + 1, steps);
            }
            let s = epoch_stats;
            out.push(EpochStats {
                loss: s.loss / data.len().max(1) as f64,
                computed_fraction: fraction(s.computed, s.possible),
                recomputed_fraction: fraction(s.errors_recomputed, s.errors_written),
            });
        }
        out
    }
}
