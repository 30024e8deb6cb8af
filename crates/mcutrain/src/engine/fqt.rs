//! Fully quantized training (Deutel et al., IEEE TCAD 2024): 8-bit weights,
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

use super::cosine_lr;
use crate::data::Dataset;
use crate::engine::float::{epoch_orders, zeros_like};
use crate::model::scheme::first_trained_layer;
use crate::model::{
    Architecture, FloatLayer, LayerUpdate, Model, ModelError, Params, QuantLayer, QuantState,
    ResolvedLayer, Shape, UpdateScheme,
};
use mcutrain_core::layer::{QParameters, QWeights};
use mcutrain_core::ops::{activation, add, loss, ChannelSet, WeightParts};
/// Dynamic partial gradient updates (a training option, stored in plan headers).
pub use mcutrain_core::plan::PartialUpdate;
use mcutrain_core::plan::TrainConfig;
/// How error tensors get their quantization, the per-sample error unit and the error
/// quantization rule: the core's, shared with the device executor.
pub use mcutrain_core::quant::{
    error_unit, quantize_error, scale_range, ErrorRanges, WrittenError,
};
use mcutrain_core::quant::{QParams, QTensor, RealRange};
use mcutrain_core::update::{self, FqtUpdateConfig, GradStats};
use rayon::prelude::*;

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

/// Added to the gradient variance before the square root of the standardized update.
pub const STATS_EPS: f32 = 1e-12;

impl FqtConfig {
    /// The plan-file hyper-parameters of this configuration (the same learning rate,
    /// moving-average rates, partial updates and error ranges), so that a device trains as
    /// the host twin does.
    pub fn plan_config(&self) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            activation_rate: self.activation_rate,
            error_rate: self.error_rate,
            weight_rate: self.weight_rate,
            stats_rate: self.stats_rate,
            eps: STATS_EPS,
            partial: self.partial,
            momentum: 0.0,
            error_ranges: self.error_ranges,
        }
    }
}

/// An int8 model resolved for execution.
pub struct QuantNet<'a> {
    arch: &'a Architecture,
    shapes: Vec<Shape>,
    /// Per model tensor, the tensor whose activation tracker quantizes it.
    range_owners: Vec<usize>,
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
            range_owners: arch.range_owners()?,
            arch,
        })
    }

    /// Layer `i` at `batch` samples.
    fn layer(&self, i: usize, batch: usize) -> ResolvedLayer {
        self.arch
            .resolve(i, self.shapes[i], batch)
            .expect("geometries were validated by Architecture::shapes")
    }

    /// Quantization of activation tensor `t` (code-preserving layers share their input's).
    pub fn activation_q(&self, state: &QuantState, t: usize) -> QParams {
        state.activations[self.range_owners[t]].qparams()
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
        for (i, p) in state.layers.iter().enumerate() {
            let layer = self.layer(i, batch);
            let op = layer.op();
            let x = QTensor {
                codes: &tensors[i],
                q: self.activation_q(state, i),
            };
            let skip = match op.skip_from() {
                Some(s) => QTensor {
                    codes: &tensors[s + 1],
                    q: self.activation_q(state, s + 1),
                },
                None => QTensor::EMPTY,
            };
            let mut y = vec![0i8; op.output_len()];
            let out_q = self.activation_q(state, i + 1);
            ranges[i + 1] = op.forward_q(x, skip, parameters(p), out_q, &mut y);
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
        updates: &[LayerUpdate],
        partial: Option<(PartialUpdate, &[f32])>,
        error_ranges: ErrorRanges,
    ) -> SampleGradients {
        let mut pass = BackwardPass::new(self, state, tensors, updates, error_ranges);
        let loss = pass.loss(label);
        if let Some(lowest) = first_trained_layer(updates) {
            for i in (lowest..self.arch.layers.len()).rev() {
                pass.layer(i, lowest, partial);
            }
        }
        pass.finish(loss)
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

/// The 8-bit parameters of one layer as its kernels take them (none for a layer without).
fn parameters(p: &QuantLayer) -> QParameters<'_> {
    if p.bias.is_empty() {
        return QParameters::NONE;
    }
    QParameters {
        weight: QWeights {
            codes: WeightParts::whole(&p.weight),
            q: &p.weight_q,
        },
        bias: &p.bias,
        bias_scale: p.bias_scale,
    }
}

/// The backward pass of one sample in progress: the errors pending per model tensor and what
/// the sample has produced so far.
struct BackwardPass<'n, 'a> {
    net: &'n QuantNet<'a>,
    state: &'n QuantState,
    tensors: &'n [Vec<i8>],
    updates: &'n [LayerUpdate],
    mode: ErrorRanges,
    /// The sample's error unit (after [`Self::loss`]).
    unit: f32,
    errors: Vec<Option<QError>>,
    error_ranges: Vec<RealRange>,
    selected: Vec<Option<Vec<u16>>>,
    layer_errors: Vec<f32>,
    grads: Vec<FloatLayer>,
    errors_written: usize,
    errors_recomputed: usize,
}

impl<'n, 'a> BackwardPass<'n, 'a> {
    fn new(
        net: &'n QuantNet<'a>,
        state: &'n QuantState,
        tensors: &'n [Vec<i8>],
        updates: &'n [LayerUpdate],
        mode: ErrorRanges,
    ) -> Self {
        let n = net.arch.layers.len();
        let grads = state
            .layers
            .iter()
            .zip(updates)
            .map(|(p, u)| FloatLayer {
                weight: vec![0.0; if u.trains_weight() { p.weight.len() } else { 0 }],
                bias: vec![0.0; if u.bias { p.bias.len() } else { 0 }],
            })
            .collect();
        BackwardPass {
            net,
            state,
            tensors,
            updates,
            mode,
            unit: 1.0,
            errors: vec![None; n + 1],
            error_ranges: vec![RealRange::EMPTY; n + 1],
            selected: vec![None; n],
            layer_errors: vec![0.0; n],
            grads,
            errors_written: 0,
            errors_recomputed: 0,
        }
    }

    /// Softmax cross-entropy of the logits: the loss gradient's exact range (a handful of
    /// values) fixes this sample's error unit, and the logits error is quantized with it;
    /// every error tracker holds ranges in that unit (see [`error_unit`]).
    fn loss(&mut self, label: u16) -> f32 {
        let n = self.net.arch.layers.len();
        let logits = &self.tensors[n];
        let logits_q = self.net.activation_q(self.state, n);
        let classes = self.net.arch.classes;
        let mut out_err = vec![0i8; logits.len()];
        let probe_q = QParams::from_range(-1.0, 1.0);
        let (_, range) = loss::softmax_cross_entropy_q(
            logits,
            logits_q,
            &[label],
            classes,
            probe_q,
            &mut out_err,
        );
        self.unit = error_unit(range);
        let out_q = QParams::from_range(range.min, range.max);
        let (loss, _) =
            loss::softmax_cross_entropy_q(logits, logits_q, &[label], classes, out_q, &mut out_err);
        self.error_ranges[n] = scale_range(range, 1.0 / self.unit);
        self.errors[n] = Some(QError {
            codes: out_err,
            q: out_q,
        });
        loss
    }

    /// Compute an error of model tensor `t` with `write`: first with its tracker's range in
    /// this sample's unit, then as [`quantize_error`] decides; counted.
    fn write_error(&mut self, t: usize, write: impl FnMut(QParams) -> RealRange) -> WrittenError {
        let q = self.state.errors[t].qparams();
        let tracked = QParams {
            scale: q.scale * self.unit,
            zero_point: q.zero_point,
        };
        let written = quantize_error(self.mode, tracked, write);
        self.errors_written += 1;
        self.errors_recomputed += written.recomputed as usize;
        written
    }

    /// The backward of layer `i`: mask its output error, select its channels (partial
    /// updates), add its gradients, and pass its input error (and an add's residual error)
    /// down to the tensors above the lowest trained layer.
    fn layer(&mut self, i: usize, lowest: usize, partial: Option<(PartialUpdate, &[f32])>) {
        let Some(QError {
            codes: mut err,
            q: eq,
        }) = self.errors[i + 1].take()
        else {
            return;
        };
        let layer = self.net.layer(i, 1);
        let op = layer.op();
        if let Some(clamp) = op.output_clamp() {
            let out_q = self.net.activation_q(self.state, i + 1);
            activation::backward_mask_q(clamp, &self.tensors[i + 1], out_q, &mut err, eq);
        }
        let error = QTensor { codes: &err, q: eq };
        if self.updates[i].any() {
            self.select_channels(i, &layer, error, partial);
        }
        let selected = self.selected[i].take();
        let channels = match &selected {
            Some(list) => ChannelSet::Subset(list),
            None => ChannelSet::All,
        };
        self.gradients(i, &layer, error, channels);
        // Contributions to the errors of the layer's inputs: (model tensor, error, real range
        // of a computed one).
        let mut contributions: Vec<(usize, QError, RealRange)> = Vec::new();
        let passed = || QError {
            codes: err.clone(),
            q: eq,
        };
        if let Some(skip) = op.skip_from() {
            contributions.push((skip + 1, passed(), RealRange::EMPTY));
        }
        if i > lowest {
            match op.input_error() {
                Some(kernel) => {
                    let p = &self.state.layers[i];
                    let weight = QWeights {
                        codes: WeightParts::whole(&p.weight),
                        q: &p.weight_q,
                    };
                    let x = QTensor {
                        codes: &self.tensors[i],
                        q: self.net.activation_q(self.state, i),
                    };
                    let mut input_err = vec![0i8; op.input_len()];
                    let written = self.write_error(i, |q| {
                        kernel.input_backward_q(x, weight, error, channels, q, &mut input_err)
                    });
                    let q = written.q;
                    let codes = input_err;
                    contributions.push((i, QError { codes, q }, written.range));
                }
                None => contributions.push((i, passed(), RealRange::EMPTY)),
            }
        }
        for (t, contribution, range) in contributions {
            if t > lowest {
                self.contribute(t, contribution, range);
            }
        }
        self.selected[i] = selected;
        self.errors[i + 1] = Some(QError { codes: err, q: eq });
    }

    /// Score the channels of trained layer `i` by their mean absolute output error; with
    /// partial updates keep the top `partial_update_count` of them for this sample.
    fn select_channels(
        &mut self,
        i: usize,
        layer: &ResolvedLayer,
        error: QTensor,
        partial: Option<(PartialUpdate, &[f32])>,
    ) {
        let Some(params) = layer.params() else {
            return;
        };
        let channels = params.channels;
        let [_, out_h, out_w] = layer.op().output_shape();
        let mut scores = vec![0.0f32; channels];
        update::structure_error_scores_q(
            error.codes,
            error.q,
            1,
            channels,
            out_h * out_w,
            &mut scores,
        );
        self.layer_errors[i] = scores.iter().sum::<f32>() / channels as f32;
        if let Some((cfg, error_max)) = partial {
            let k = update::partial_update_count(
                cfg.lambda_min,
                cfg.lambda_max,
                self.layer_errors[i],
                error_max[i].max(self.layer_errors[i]),
                channels,
            );
            let mut picked = vec![0u16; k];
            let list = update::top_k_structures(&scores, k, &mut picked).to_vec();
            self.selected[i] = Some(list);
        }
    }

    /// The weight and bias gradients of layer `i` that train, over `channels`.
    fn gradients(&mut self, i: usize, layer: &ResolvedLayer, error: QTensor, channels: ChannelSet) {
        let Some(kernels) = layer.op().parametric() else {
            return;
        };
        let (update, grad) = (self.updates[i], &mut self.grads[i]);
        if update.trains_weight() {
            let x = QTensor {
                codes: &self.tensors[i],
                q: self.net.activation_q(self.state, i),
            };
            kernels.weight_backward_q(x, error, channels, &mut grad.weight);
        }
        if update.bias {
            kernels.bias_backward_q(error, channels, &mut grad.bias);
        }
    }

    /// Add a contribution (with the real range it was computed with, empty when passed
    /// through) to the error of model tensor `t`: the first one is kept as it is, a second
    /// one is summed into a new error written like every other.
    fn contribute(&mut self, t: usize, contribution: QError, range: RealRange) {
        let range = scale_range(range, 1.0 / self.unit);
        self.error_ranges[t] = self.error_ranges[t].merge(range);
        let sum = match self.errors[t].take() {
            None => contribution,
            Some(existing) => {
                let mut sum = vec![0i8; existing.codes.len()];
                let written = self.write_error(t, |q| {
                    add::forward_q(
                        &existing.codes,
                        existing.q,
                        &contribution.codes,
                        contribution.q,
                        q,
                        &mut sum,
                    )
                });
                let range = scale_range(written.range, 1.0 / self.unit);
                self.error_ranges[t] = self.error_ranges[t].merge(range);
                QError {
                    codes: sum,
                    q: written.q,
                }
            }
        };
        self.errors[t] = Some(sum);
    }

    fn finish(self, loss: f32) -> SampleGradients {
        SampleGradients {
            loss,
            grads: self.grads,
            error_ranges: self.error_ranges,
            selected: self.selected,
            layer_errors: self.layer_errors,
            errors: self.errors,
            errors_written: self.errors_written,
            errors_recomputed: self.errors_recomputed,
        }
    }
}

/// Training state that lives beside the model: gradient statistics and partial-update maxima.
pub struct FqtTrainer {
    /// Per layer, what trains. A strict subset of a layer's weight channels (the first ones)
    /// trains under the layer's fixed quantization ([`update::fqt_update_weights_fixed`]), the
    /// rule that lets a device keep only those channels in SRAM.
    updates: Vec<LayerUpdate>,
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
        let updates = cfg.scheme.updates(&model.arch);
        Self::with_updates(model, cfg, &updates)
    }

    /// A trainer for `model` that trains what `updates` says per layer (`cfg.scheme` is not
    /// used), for example a sparse scheme of channel ratios. A layer that trains a strict
    /// subset of its weight channels updates them under its fixed weight quantization; that
    /// cannot be combined with dynamic partial updates, which select among all channels.
    pub fn with_updates(
        model: &Model,
        cfg: FqtConfig,
        updates: &[LayerUpdate],
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
        let stats = state
            .layers
            .iter()
            .map(|l| vec![GradStats::default(); l.bias.len()])
            .collect();
        Ok(FqtTrainer {
            error_max: vec![0.0; model.arch.layers.len()],
            lr: cfg.lr,
            stats,
            updates: updates.to_vec(),
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
                let back = net.backward(state, &tensors, label, &self.updates, partial, mode);
                (back, act_ranges)
            })
            .collect();
        let batch = self.fold_samples(state, &results);
        self.update(state, &batch.grads, &batch.touched, samples.len());
        for t in 1..=arch.layers.len() {
            if net.range_owners[t] == t {
                state.activations[t].observe(batch.act_ranges[t], self.cfg.activation_rate);
            }
            state.errors[t].observe(batch.err_ranges[t], self.cfg.error_rate);
        }
        batch.stats
    }

    /// The batch's gradient (the samples' summed in sample order), the channels any sample
    /// touched per layer, the ranges seen, the statistics; folds each layer's largest mean
    /// error into the partial-update maxima.
    fn fold_samples(
        &mut self,
        state: &QuantState,
        results: &[(SampleGradients, Vec<RealRange>)],
    ) -> FoldedBatch {
        let n = state.layers.len();
        let mut batch = FoldedBatch {
            grads: zeros_like(&results[0].0.grads),
            touched: state
                .layers
                .iter()
                .map(|l| vec![false; l.bias.len()])
                .collect(),
            act_ranges: vec![RealRange::EMPTY; n + 1],
            err_ranges: vec![RealRange::EMPTY; n + 1],
            stats: BatchStats::default(),
        };
        for (r, a) in results {
            let stats = &mut batch.stats;
            stats.loss += r.loss as f64;
            stats.errors_written += r.errors_written;
            stats.errors_recomputed += r.errors_recomputed;
            for (acc, g) in batch.grads.iter_mut().zip(&r.grads) {
                acc.weight
                    .iter_mut()
                    .zip(&g.weight)
                    .for_each(|(a, b)| *a += b);
                acc.bias.iter_mut().zip(&g.bias).for_each(|(a, b)| *a += b);
            }
            for (seen, &range) in batch.act_ranges.iter_mut().zip(a) {
                *seen = seen.merge(range);
            }
            for (seen, &range) in batch.err_ranges.iter_mut().zip(&r.error_ranges) {
                *seen = seen.merge(range);
            }
            for (i, layer_touched) in batch.touched.iter_mut().enumerate() {
                if !self.updates[i].any() {
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
        batch
    }

    /// The FQT updates of every trained layer from the batch gradient `grads` of `samples`
    /// samples, on the channels some sample `touched`: the standardized weight update with
    /// range adaptation (or, for a strict subset of channels, under the fixed quantization)
    /// and the bias update.
    fn update(
        &mut self,
        state: &mut QuantState,
        grads: &[FloatLayer],
        touched: &[Vec<bool>],
        samples: usize,
    ) {
        let grad_scale = 1.0 / samples as f32;
        let update_cfg = FqtUpdateConfig {
            lr: self.lr,
            stats_rate: self.cfg.stats_rate,
            range_rate: self.cfg.weight_rate,
            eps: STATS_EPS,
        };
        for (i, layer) in state.layers.iter_mut().enumerate() {
            let update = self.updates[i];
            if !update.any() {
                continue;
            }
            let list: Vec<u16> = touched[i]
                .iter()
                .enumerate()
                .filter(|(_, t)| **t)
                .map(|(c, _)| c as u16)
                .collect();
            let channels = ChannelSet::Subset(&list);
            let structure_len = layer.weight.len() / layer.bias.len().max(1);
            let trained = update.weight_channels;
            if update.trains_weight() && trained < layer.bias.len() {
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
            } else if update.trains_weight() {
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
            if update.bias {
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

/// What the samples of one batch produced, summed in sample order.
struct FoldedBatch {
    grads: Vec<FloatLayer>,
    /// Per layer, the channels some sample computed a gradient for.
    touched: Vec<Vec<bool>>,
    act_ranges: Vec<RealRange>,
    err_ranges: Vec<RealRange>,
    stats: BatchStats,
}
