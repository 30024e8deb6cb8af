//! Model intermediate representation: a sequence of layers over tensors, its shapes, and the
//! float or 8-bit parameters.
//!
//! Tensor `0` is the model input and tensor `i + 1` is the output of layer `i`. Every layer
//! reads the tensor just before it; an [`LayerKind::Add`] also reads the output of an earlier
//! layer (a residual connection). This covers MobileNetV2-style networks, 1-D CNNs and MLPs
//! while keeping shapes and lifetimes trivial to derive.

pub mod format;
pub mod scheme;
pub mod zoo;

/// A layer resolved against its input: the operator with its geometry (the layer contract of
/// `mcutrain-core`).
pub use mcutrain_core::layer::Layer as ResolvedLayer;
pub use mcutrain_core::layer::{numel, LayerKind, Shape};
use mcutrain_core::ops::arith::MAX_ACCUMULATED_TERMS;
pub use scheme::{LayerUpdate, UpdateScheme};

use mcutrain_core::quant::{QParams, RangeEma};

/// A named layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// Unique name, used by reports and update schemes.
    pub name: String,
    /// What the layer computes.
    pub kind: LayerKind,
}

/// The graph of a model without its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    /// Per-sample input shape `[channels, height, width]`.
    pub input: Shape,
    /// Number of classes (the size of the last layer's output).
    pub classes: usize,
    /// Layers in execution order.
    pub layers: Vec<Layer>,
}

/// Why a model is unusable; each message says what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ModelError {
    /// A layer's geometry does not fit its input.
    #[error("layer {index} ({name}): {problem}")]
    BadLayer {
        /// Layer index.
        index: usize,
        /// Layer name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The last layer's output is not a vector of `classes` values.
    #[error("the model ends in shape {shape:?} but declares {classes} classes; the last layer must output [{classes}, 1, 1]")]
    BadOutput {
        /// Shape of the last tensor.
        shape: Shape,
        /// Declared classes.
        classes: usize,
    },
    /// Parameters do not match the architecture.
    #[error("parameters do not match the architecture: {0}")]
    BadParams(String),
}

impl Architecture {
    /// Per-sample shape of every tensor (`layers.len() + 1` entries), validating each layer:
    /// its geometry against its input, and an add's residual input (an earlier tensor of the
    /// same shape).
    pub fn shapes(&self) -> Result<Vec<Shape>, ModelError> {
        let mut shapes = vec![self.input];
        if numel(self.input) == 0 {
            return Err(ModelError::BadLayer {
                index: 0,
                name: "input".into(),
                problem: "the input shape has a zero dimension".into(),
            });
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let input = shapes[index];
            let bad = |problem: String| ModelError::BadLayer {
                index,
                name: layer.name.clone(),
                problem,
            };
            let resolved = self.resolve(index, input, 1).map_err(&bad)?;
            if let Some(skip_from) = layer.kind.skip_from() {
                if skip_from >= index {
                    return Err(bad(format!(
                        "adds the output of layer {skip_from}, which does not come before it"
                    )));
                }
                let skip = shapes[skip_from + 1];
                if skip != input {
                    return Err(bad(format!(
                        "adds shape {skip:?} (layer {skip_from}) to shape {input:?}; the shapes must be equal"
                    )));
                }
            }
            shapes.push(resolved.op().output_shape());
        }
        let last = *shapes.last().expect("shapes holds the input");
        if last != [self.classes, 1, 1] {
            return Err(ModelError::BadOutput {
                shape: last,
                classes: self.classes,
            });
        }
        Ok(shapes)
    }

    /// Layer `index` applied to `batch` samples of the per-sample shape `input` (its geometry
    /// validated; the message says what does not fit).
    pub fn resolve(
        &self,
        index: usize,
        input: Shape,
        batch: usize,
    ) -> Result<ResolvedLayer, String> {
        self.layers[index]
            .kind
            .resolve(input, batch)
            .map_err(|e| format!("{e} (input shape {input:?})"))
    }

    /// Every layer resolved at batch `batch`, validating the architecture.
    pub fn resolved(&self, batch: usize) -> Result<Vec<ResolvedLayer>, ModelError> {
        let shapes = self.shapes()?;
        (0..self.layers.len())
            .map(|i| {
                self.resolve(i, shapes[i], batch)
                    .map_err(|problem| ModelError::BadLayer {
                        index: i,
                        name: self.layers[i].name.clone(),
                        problem,
                    })
            })
            .collect()
    }

    /// `(weight length, bias length)` of every layer (zeros for layers without parameters).
    pub fn param_lens(&self) -> Result<Vec<(usize, usize)>, ModelError> {
        Ok(self
            .resolved(1)?
            .iter()
            .map(|l| l.params().map_or((0, 0), |p| (p.weight_len(), p.channels)))
            .collect())
    }

    /// Total parameter count.
    pub fn param_count(&self) -> Result<usize, ModelError> {
        Ok(self.param_lens()?.iter().map(|(w, b)| w + b).sum())
    }

    /// Multiply-accumulates of one forward pass of one sample.
    pub fn forward_macs(&self) -> Result<usize, ModelError> {
        Ok(self.resolved(1)?.iter().map(|l| l.op().macs()).sum())
    }

    /// The layers that read model tensor `t`: layer `t`, and every add whose residual input
    /// it is (tensor `i + 1` is the output of layer `i`).
    pub fn consumers(&self, t: usize) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(i, l)| *i == t || l.kind.skip_from().is_some_and(|s| s + 1 == t))
            .map(|(i, _)| i)
            .collect()
    }

    /// The model tensor whose activation range quantizes each tensor (`layers.len() + 1`
    /// entries): a layer that keeps its input's codes (activation, max pooling, flatten)
    /// shares its input's.
    pub fn range_owners(&self) -> Result<Vec<usize>, ModelError> {
        let mut owners = vec![0];
        for (i, layer) in self.resolved(1)?.iter().enumerate() {
            let t = i + 1;
            owners.push(if layer.op().preserves_codes() {
                owners[i]
            } else {
                t
            });
        }
        Ok(owners)
    }
}

/// Float parameters of one layer (both empty for layers without parameters).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FloatLayer {
    /// Weights in the core operator layout.
    pub weight: Vec<f32>,
    /// Bias, one per output channel or feature.
    pub bias: Vec<f32>,
}

/// 8-bit parameters of one layer and the weight range tracker used by training.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLayer {
    /// Weight codes.
    pub weight: Vec<i8>,
    /// Weight quantization: one entry (per tensor) or one per output channel.
    pub weight_q: Vec<QParams>,
    /// Moving average of the real weight range (fully quantized training adapts `weight_q`).
    pub weight_range: RangeEma,
    /// Bias as `i32` codes with `real = bias_scale * b`.
    pub bias: Vec<i32>,
    /// Real value of one bias step.
    pub bias_scale: f32,
}

/// 8-bit state of a model: parameters and the quantization of every tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    /// Per layer (layers without parameters have empty vectors).
    pub layers: Vec<QuantLayer>,
    /// Activation range of every tensor (`layers.len() + 1`), tensor 0 is the input.
    pub activations: Vec<RangeEma>,
    /// Error (dL/d tensor) range of every tensor, calibrated at quantization, adapted by training.
    pub errors: Vec<RangeEma>,
}

/// Parameters of a model in one of its two numeric forms.
#[derive(Clone, Debug, PartialEq)]
pub enum Params {
    /// float32.
    Float(Vec<FloatLayer>),
    /// int8 with per-tensor quantization state.
    Int8(QuantState),
}

/// An architecture with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The graph.
    pub arch: Architecture,
    /// The parameters.
    pub params: Params,
}

impl Model {
    /// Check that the parameters fit the architecture.
    pub fn validate(&self) -> Result<(), ModelError> {
        let lens = self.arch.param_lens()?;
        let n = self.arch.layers.len();
        match &self.params {
            Params::Float(layers) => {
                if layers.len() != n {
                    return Err(ModelError::BadParams(format!(
                        "{} parameter entries for {n} layers",
                        layers.len()
                    )));
                }
                for (i, (p, (wl, bl))) in layers.iter().zip(&lens).enumerate() {
                    if p.weight.len() != *wl || p.bias.len() != *bl {
                        return Err(ModelError::BadParams(format!(
                            "layer {i} ({}) has {} weights and {} biases, expected {wl} and {bl}",
                            self.arch.layers[i].name,
                            p.weight.len(),
                            p.bias.len()
                        )));
                    }
                    if p.weight.iter().chain(&p.bias).any(|v| !v.is_finite()) {
                        return Err(ModelError::BadParams(format!(
                            "layer {i} ({}) has a non-finite parameter",
                            self.arch.layers[i].name
                        )));
                    }
                }
            }
            Params::Int8(state) => {
                self.check_int8_limits()?;
                if state.layers.len() != n
                    || state.activations.len() != n + 1
                    || state.errors.len() != n + 1
                {
                    return Err(ModelError::BadParams(format!(
                        "int8 state has {} layers, {} activation and {} error ranges for {n} layers",
                        state.layers.len(),
                        state.activations.len(),
                        state.errors.len()
                    )));
                }
                for (i, (p, (wl, bl))) in state.layers.iter().zip(&lens).enumerate() {
                    let out_channels = *bl;
                    let q_ok = if *wl == 0 {
                        p.weight_q.is_empty()
                    } else {
                        p.weight_q.len() == 1 || p.weight_q.len() == out_channels
                    };
                    if p.weight.len() != *wl || p.bias.len() != *bl || !q_ok {
                        return Err(ModelError::BadParams(format!(
                            "layer {i} ({}): {} weights, {} biases, {} weight scales; expected {wl}, {bl}, 1 or {bl}",
                            self.arch.layers[i].name,
                            p.weight.len(),
                            p.bias.len(),
                            p.weight_q.len()
                        )));
                    }
                    let scales_ok = p
                        .weight_q
                        .iter()
                        .all(|q| q.scale.is_finite() && q.scale > 0.0)
                        && (*wl == 0 || (p.bias_scale.is_finite() && p.bias_scale > 0.0));
                    if !scales_ok {
                        return Err(ModelError::BadParams(format!(
                            "layer {i} ({}) has a non-positive or non-finite scale",
                            self.arch.layers[i].name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every layer's 8-bit sums fit the kernels' `i32` accumulators
    /// ([`Operator::fits_int8_limits`](mcutrain_core::layer::Operator::fits_int8_limits)):
    /// a layer beyond them cannot run in int8, on the host twin or on the device.
    fn check_int8_limits(&self) -> Result<(), ModelError> {
        let resolved = self.arch.resolved(1)?;
        match resolved.iter().position(|l| !l.op().fits_int8_limits()) {
            None => Ok(()),
            Some(index) => Err(ModelError::BadLayer {
                index,
                name: self.arch.layers[index].name.clone(),
                problem: format!(
                    "too large for the int8 kernels: one 8-bit sum would add more than {} \
                     products (channels per group times the kernel area), or a channel has 2^24 \
                     output positions or more, beyond the i32 accumulators; keep the model \
                     float32, or split the layer into groups",
                    MAX_ACCUMULATED_TERMS
                ),
            }),
        }
    }

    /// "float32" or "int8".
    pub fn precision(&self) -> &'static str {
        match self.params {
            Params::Float(_) => "float32",
            Params::Int8(_) => "int8",
        }
    }
}
