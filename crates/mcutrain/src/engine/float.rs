//! float32 reference training: forward, backward with pruning, SGD with momentum.
//!
//! Training has per-sample semantics, the plan executor's (`mcutrain_core::plan::exec` on a
//! float32 plan): every sample runs its forward and backward alone, at batch-1 geometry
//! (samples in parallel), and the batch gradient is the per-sample gradients folded in sample
//! order, `G = ((0 + g_0) + g_1) + ...`, exactly what a device computes with
//! `grad += kernel's batch-1 sum` per sample. The batch loss is the f64 sum of the per-sample
//! f32 losses in sample order. So training equals the device's bit for bit, whatever the
//! number of threads. (Inference and calibration may run batched: the forward kernels give
//! each sample the same bits at any batch size.)

use super::cosine_lr;
use crate::data::Dataset;
use crate::model::scheme::first_trained_layer;
use crate::model::{
    Architecture, FloatLayer, LayerUpdate, Model, ModelError, Params, ResolvedLayer, Shape,
    UpdateScheme,
};
use mcutrain_core::layer::FloatParams;
use mcutrain_core::ops::{activation, loss, ChannelSet};
use mcutrain_core::rng::Rng;
use mcutrain_core::update;
use rayon::prelude::*;

/// Samples per parallel work item of batched inference and calibration. Fixed, so results do
/// not depend on the thread count.
pub const CHUNK: usize = 16;

/// A float model resolved for execution: shapes and per-layer geometries at batch 1.
pub struct FloatNet<'a> {
    arch: &'a Architecture,
    shapes: Vec<Shape>,
}

/// Result of a backward pass over one batch.
pub struct Backward {
    /// Sum of the per-sample losses.
    pub loss: f64,
    /// Error tensors `dL/d tensor` as the consuming layer used them (after its activation
    /// mask); `None` below the lowest trained layer, where nothing is propagated.
    pub errors: Vec<Option<Vec<f32>>>,
}

impl<'a> FloatNet<'a> {
    /// Resolve `arch`; fails if a layer does not fit its input.
    pub fn new(arch: &'a Architecture) -> Result<Self, ModelError> {
        Ok(FloatNet {
            shapes: arch.shapes()?,
            arch,
        })
    }

    /// Per-sample shapes of every tensor.
    pub fn shapes(&self) -> &[Shape] {
        &self.shapes
    }

    /// Layer `i` at `batch` samples.
    fn layer(&self, i: usize, batch: usize) -> ResolvedLayer {
        self.arch
            .resolve(i, self.shapes[i], batch)
            .expect("geometries were validated by Architecture::shapes")
    }

    /// Forward pass of `batch` samples; returns every tensor (index 0 is `input`).
    pub fn forward(&self, params: &[FloatLayer], input: &[f32], batch: usize) -> Vec<Vec<f32>> {
        let mut tensors: Vec<Vec<f32>> = Vec::with_capacity(self.shapes.len());
        tensors.push(input.to_vec());
        for (i, p) in params.iter().enumerate() {
            let layer = self.layer(i, batch);
            let op = layer.op();
            let skip = op.skip_from().map_or(&[][..], |s| &tensors[s + 1]);
            let mut y = vec![0.0f32; op.output_len()];
            let params = FloatParams {
                weight: &p.weight,
                bias: &p.bias,
            };
            op.forward(&tensors[i], skip, params, &mut y);
            tensors.push(y);
        }
        tensors
    }

    /// Backward pass for a batch whose forward produced `tensors`, with softmax cross-entropy
    /// on `labels`. Gradients of the parameters that `updates` trains are *added* to `grads`.
    pub fn backward(
        &self,
        params: &[FloatLayer],
        tensors: &[Vec<f32>],
        labels: &[u16],
        updates: &[LayerUpdate],
        grads: &mut [FloatLayer],
    ) -> Backward {
        let batch = labels.len();
        let n = self.arch.layers.len();
        let mut errors: Vec<Option<Vec<f32>>> = vec![None; n + 1];
        let mut out_err = vec![0.0f32; tensors[n].len()];
        let loss =
            loss::softmax_cross_entropy(&tensors[n], labels, self.arch.classes, &mut out_err);
        errors[n] = Some(out_err);
        let Some(lowest) = first_trained_layer(updates) else {
            return Backward {
                loss: loss as f64,
                errors,
            };
        };
        for i in (lowest..n).rev() {
            let Some(mut err) = errors[i + 1].take() else {
                continue;
            };
            let layer = self.layer(i, batch);
            let op = layer.op();
            let x = &tensors[i];
            if let Some(clamp) = op.output_clamp() {
                activation::backward(clamp, &tensors[i + 1], &mut err);
            }
            if let Some(kernels) = op.parametric() {
                let (update, grad) = (updates[i], &mut grads[i]);
                if update.trains_weight() {
                    kernels.weight_backward(x, &err, ChannelSet::All, &mut grad.weight);
                }
                if update.bias {
                    kernels.bias_backward(&err, ChannelSet::All, &mut grad.bias);
                }
            }
            if let Some(skip) = op.skip_from().filter(|&s| s + 1 > lowest) {
                accumulate(&mut errors[skip + 1], &err);
            }
            if i > lowest {
                match op.input_error() {
                    Some(kernel) => {
                        let mut e = vec![0.0; x.len()];
                        let weight = &params[i].weight;
                        kernel.input_backward(x, weight, &err, ChannelSet::All, &mut e);
                        accumulate(&mut errors[i], &e);
                    }
                    None => accumulate(&mut errors[i], &err),
                }
            }
            errors[i + 1] = Some(err);
        }
        Backward {
            loss: loss as f64,
            errors,
        }
    }

    /// Predicted class of every sample of `data`, in parallel chunks.
    pub fn predict(&self, params: &[FloatLayer], data: &Dataset) -> Vec<usize> {
        let len = data.sample_len();
        let classes = self.arch.classes;
        let chunks: Vec<Vec<usize>> = (0..data.len())
            .collect::<Vec<_>>()
            .par_chunks(CHUNK * 4)
            .map(|idx| {
                let batch = idx.len();
                let input = &data.samples[idx[0] * len..(idx[0] + batch) * len];
                let tensors = self.forward(params, input, batch);
                let logits = tensors.last().expect("at least the input");
                logits.chunks(classes).map(loss::argmax).collect()
            })
            .collect();
        chunks.concat()
    }
}

/// `slot += value`, creating the slot on first use.
fn accumulate(slot: &mut Option<Vec<f32>>, value: &[f32]) {
    match slot {
        Some(acc) => acc.iter_mut().zip(value).for_each(|(a, v)| *a += v),
        None => *slot = Some(value.to_vec()),
    }
}

/// Hyper-parameters of float training.
#[derive(Clone, Debug)]
pub struct FloatTrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Samples per update.
    pub batch: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    pub lr: f32,
    /// SGD momentum (0 disables the velocity buffer).
    pub momentum: f32,
    /// Which parameters are updated.
    pub scheme: UpdateScheme,
    /// Seed of the sample order.
    pub seed: u64,
}

/// Progress of a training run, reported after every batch.
pub struct StepInfo {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Batches done in this epoch.
    pub step: usize,
    /// Batches per epoch.
    pub steps: usize,
    /// Mean loss of the batch just done.
    pub loss: f64,
}

/// Mini-batch SGD of a float model, one batch at a time (what [`train`] runs for every batch,
/// and what a float32 plan's executor reproduces sample by sample).
pub struct FloatTrainer<'a> {
    net: FloatNet<'a>,
    updates: Vec<LayerUpdate>,
    momentum: f32,
    /// Momentum velocity per trained parameter (empty vectors without momentum).
    velocity: Vec<FloatLayer>,
}

impl<'a> FloatTrainer<'a> {
    /// A trainer of the parameters `params` of `arch` that `updates` trains (one entry per
    /// layer), with SGD momentum `momentum` (0: no velocity is kept, as in a plan compiled
    /// without velocity tensors). A weight trains whole: a strict subset of its channels is
    /// refused. Memory: one zeroed velocity per trained parameter with momentum.
    pub fn new(
        arch: &'a Architecture,
        params: &[FloatLayer],
        updates: &[LayerUpdate],
        momentum: f32,
    ) -> Result<Self, ModelError> {
        let net = FloatNet::new(arch)?;
        for (i, (update, p)) in updates.iter().zip(params).enumerate() {
            let channels = p.bias.len();
            if update.trains_weight() && update.weight_channels != channels {
                return Err(ModelError::BadParams(format!(
                    "layer {i} ({}): float32 training updates whole weight tensors, not {} of {channels} channels",
                    arch.layers[i].name, update.weight_channels
                )));
            }
        }
        if updates.len() != params.len() {
            return Err(ModelError::BadParams(format!(
                "the update scheme has {} entries for {} layers",
                updates.len(),
                params.len()
            )));
        }
        let updates = updates.to_vec();
        let velocity = if momentum != 0.0 {
            trained_zeros(params, &updates)
        } else {
            params.iter().map(|_| FloatLayer::default()).collect()
        };
        Ok(FloatTrainer {
            net,
            updates,
            momentum,
            velocity,
        })
    }

    /// One update from the samples `input` (`labels.len()` of them, concatenated) with
    /// learning rate `lr`: the batch gradient `G` of [`batch_gradients`], then for every trained
    /// parameter `v = m v + G / B`, `p -= lr v` ([`update::sgd`]; without momentum
    /// `p -= lr (G / B)`). Returns the sum of the per-sample losses.
    pub fn train_batch(
        &mut self,
        params: &mut [FloatLayer],
        input: &[f32],
        labels: &[u16],
        lr: f32,
    ) -> f64 {
        let (loss, grads) = batch_gradients(&self.net, params, input, labels, &self.updates);
        let grad_scale = 1.0 / labels.len() as f32;
        let momentum = self.momentum;
        let layers = params.iter_mut().zip(&grads).zip(&mut self.velocity);
        for (((p, g), v), t) in layers.zip(&self.updates) {
            if t.trains_weight() {
                update::sgd(
                    &mut p.weight,
                    &g.weight,
                    &mut v.weight,
                    lr,
                    momentum,
                    grad_scale,
                );
            }
            if t.bias {
                update::sgd(&mut p.bias, &g.bias, &mut v.bias, lr, momentum, grad_scale);
            }
        }
        loss
    }
}

/// Train the float parameters of `model` on `data` with mini-batch SGD ([`FloatTrainer`]):
/// each epoch visits the samples in a seeded shuffled order ([`shuffled`]), batch `b`
/// (counted over all epochs, of `total` batches) uses `cosine_lr(cfg.lr, b, total)`; the last
/// batch of an epoch may be smaller. Returns the mean loss of each epoch.
pub fn train(
    model: &mut Model,
    data: &Dataset,
    cfg: &FloatTrainConfig,
    mut progress: impl FnMut(&StepInfo),
) -> Result<Vec<f64>, ModelError> {
    let arch = model.arch.clone();
    let Params::Float(params) = &mut model.params else {
        return Err(ModelError::BadParams(
            "float training needs a float32 model; use --method fqt for an int8 model".into(),
        ));
    };
    let updates = cfg.scheme.updates(&arch);
    let mut trainer = FloatTrainer::new(&arch, params, &updates, cfg.momentum)?;
    let len = data.sample_len();
    let steps = data.len().div_ceil(cfg.batch.max(1));
    let total_steps = (steps * cfg.epochs).max(1);
    let mut epoch_losses = Vec::with_capacity(cfg.epochs);
    for (epoch, order) in epoch_orders(data.len(), cfg.epochs, cfg.seed)
        .into_iter()
        .enumerate()
    {
        let mut epoch_loss = 0.0;
        for (step, batch_idx) in order.chunks(cfg.batch.max(1)).enumerate() {
            let batch_input: Vec<f32> = batch_idx
                .iter()
                .flat_map(|&i| data.samples[i * len..(i + 1) * len].iter().copied())
                .collect();
            let batch_labels: Vec<u16> = batch_idx.iter().map(|&i| data.labels[i]).collect();
            let lr = cosine_lr(cfg.lr, epoch * steps + step, total_steps);
            let loss = trainer.train_batch(params, &batch_input, &batch_labels, lr);
            epoch_loss += loss;
            progress(&StepInfo {
                epoch,
                step: step + 1,
                steps,
                loss: loss / batch_idx.len() as f64,
            });
        }
        epoch_losses.push(epoch_loss / data.len().max(1) as f64);
    }
    Ok(epoch_losses)
}

/// Loss sum and summed gradients of one batch with per-sample semantics (see the module
/// documentation): each sample's forward and backward at batch 1, in parallel, into its own
/// zeroed gradient (`g_s = 0 + sum`, as the kernels add); then `G = 0`, `G += g_s` and
/// `loss += l_s` (f64) for `s` in sample order. Gradients exist for the trained parameters
/// only (empty vectors elsewhere). Memory: one gradient set per sample of the batch.
pub fn batch_gradients(
    net: &FloatNet,
    params: &[FloatLayer],
    input: &[f32],
    labels: &[u16],
    updates: &[LayerUpdate],
) -> (f64, Vec<FloatLayer>) {
    let len = input.len() / labels.len().max(1);
    let per_sample: Vec<(f32, Vec<FloatLayer>)> = labels
        .par_iter()
        .zip(input.par_chunks(len.max(1)))
        .map(|(&label, sample)| {
            let tensors = net.forward(params, sample, 1);
            let mut grads = trained_zeros(params, updates);
            let back = net.backward(params, &tensors, &[label], updates, &mut grads);
            (back.loss as f32, grads)
        })
        .collect();
    let mut loss = 0.0f64;
    let mut grads = trained_zeros(params, updates);
    for (sample_loss, sample_grads) in &per_sample {
        loss += *sample_loss as f64;
        for (acc, part) in grads.iter_mut().zip(sample_grads) {
            add_assign(&mut acc.weight, &part.weight);
            add_assign(&mut acc.bias, &part.bias);
        }
    }
    (loss, grads)
}

/// `acc[j] += part[j]`.
fn add_assign(acc: &mut [f32], part: &[f32]) {
    acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
}

/// Zero gradient buffers for the trained parameters of `params` (empty for frozen ones).
fn trained_zeros(params: &[FloatLayer], updates: &[LayerUpdate]) -> Vec<FloatLayer> {
    params
        .iter()
        .zip(updates)
        .map(|(p, t)| FloatLayer {
            weight: if t.trains_weight() {
                vec![0.0; p.weight.len()]
            } else {
                Vec::new()
            },
            bias: if t.bias {
                vec![0.0; p.bias.len()]
            } else {
                Vec::new()
            },
        })
        .collect()
}

/// Zero buffers with the shapes of `params`.
pub fn zeros_like(params: &[FloatLayer]) -> Vec<FloatLayer> {
    params
        .iter()
        .map(|p| FloatLayer {
            weight: vec![0.0; p.weight.len()],
            bias: vec![0.0; p.bias.len()],
        })
        .collect()
}

/// A seeded permutation of `0..n` (Fisher-Yates).
pub fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u32 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// The sample order of every epoch of a training run over `n` samples: successive
/// [`shuffled`] permutations from `Rng::new(seed)`. Float training, FQT training and the
/// device sessions (which stream the samples in this order) share it.
pub fn epoch_orders(n: usize, epochs: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed);
    (0..epochs).map(|_| shuffled(n, &mut rng)).collect()
}
