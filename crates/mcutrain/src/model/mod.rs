//! Model intermediate representation: a sequence of layers over tensors, its shapes, and the
//! float or 8-bit parameters.
//!
//! Tensor `0` is the model input and tensor `i + 1` is the output of layer `i`. Every layer
//! reads the tensor just before it; an [`LayerKind::Add`] also reads the output of an earlier
//! layer (a residual connection). This covers MobileNetV2-style networks, 1-D CNNs and MLPs
//! while keeping shapes and lifetimes trivial to derive.

pub mod format;
pub mod zoo;

use mcutrain_core::ops::activation::Activation;
use mcutrain_core::ops::conv2d::Conv2dGeom;
use mcutrain_core::ops::linear::LinearGeom;
use mcutrain_core::ops::pool::PoolGeom;
use mcutrain_core::quant::{QParams, RangeEma};

/// Shape of one sample of a tensor: `[channels, height, width]` (a flat vector is `[n, 1, 1]`).
pub type Shape = [usize; 3];

/// Number of elements of a per-sample shape.
pub fn numel(shape: Shape) -> usize {
    shape[0] * shape[1] * shape[2]
}

/// One operator of the model.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// 2-D convolution (1-D when the input height and the kernel height are 1), with a fused
    /// activation; `groups == in_channels == out_channels` is a depthwise convolution.
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel `(height, width)`.
        kernel: (usize, usize),
        /// Stride `(height, width)`.
        stride: (usize, usize),
        /// Zero padding `(height, width)` on each side.
        padding: (usize, usize),
        /// Channel groups.
        groups: usize,
        /// Fused activation.
        activation: Activation,
    },
    /// Fully connected layer over the flattened input, with a fused activation.
    Linear {
        /// Output features.
        out_features: usize,
        /// Fused activation.
        activation: Activation,
    },
    /// A standalone ReLU or ReLU6.
    Activation(Activation),
    /// Average pooling (padding excluded from the mean, see the core operator).
    AvgPool {
        /// Window `(height, width)`.
        kernel: (usize, usize),
        /// Stride `(height, width)`.
        stride: (usize, usize),
        /// Padding `(height, width)`.
        padding: (usize, usize),
    },
    /// Max pooling.
    MaxPool {
        /// Window `(height, width)`.
        kernel: (usize, usize),
        /// Stride `(height, width)`.
        stride: (usize, usize),
        /// Padding `(height, width)`.
        padding: (usize, usize),
    },
    /// Mean over height and width: `[c, h, w] -> [c, 1, 1]`.
    GlobalAvgPool,
    /// Element-wise sum of the previous tensor and the output of layer `skip_from`.
    Add {
        /// Index of the earlier layer whose output is added.
        skip_from: usize,
    },
    /// `[c, h, w] -> [c * h * w, 1, 1]`; no data moves.
    Flatten,
}

impl LayerKind {
    /// True for layers with a weight tensor and a bias.
    pub fn has_params(&self) -> bool {
        matches!(self, LayerKind::Conv2d { .. } | LayerKind::Linear { .. })
    }

    /// Short operator name used in reports.
    pub fn op_name(&self) -> &'static str {
        match self {
            LayerKind::Conv2d { groups, .. } if *groups > 1 => "conv2d(grouped)",
            LayerKind::Conv2d { .. } => "conv2d",
            LayerKind::Linear { .. } => "linear",
            LayerKind::Activation(Activation::Relu) => "relu",
            LayerKind::Activation(Activation::Relu6) => "relu6",
            LayerKind::Activation(Activation::None) => "identity",
            LayerKind::AvgPool { .. } => "avgpool",
            LayerKind::MaxPool { .. } => "maxpool",
            LayerKind::GlobalAvgPool => "globalavgpool",
            LayerKind::Add { .. } => "add",
            LayerKind::Flatten => "flatten",
        }
    }
}

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

/// Geometry of one layer, resolved against its input shape, for a batch of `batch` samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Geometry {
    /// Convolution.
    Conv(Conv2dGeom),
    /// Fully connected.
    Linear(LinearGeom),
    /// Average or max pooling.
    Pool(PoolGeom),
    /// Layers that need only the element count per sample (activation, add, flatten) or the
    /// channel/spatial split (global average pooling).
    Elementwise {
        /// Channels per sample.
        channels: usize,
        /// Height * width per sample.
        spatial: usize,
    },
}

impl Architecture {
    /// Per-sample shape of every tensor (`layers.len() + 1` entries), validating each layer.
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
            let out = match &layer.kind {
                LayerKind::Conv2d { .. }
                | LayerKind::AvgPool { .. }
                | LayerKind::MaxPool { .. } => {
                    match self.geometry(index, input, 1).map_err(&bad)? {
                        Geometry::Conv(g) => [g.out_channels, g.out_h(), g.out_w()],
                        Geometry::Pool(g) => [g.channels, g.out_h(), g.out_w()],
                        _ => unreachable!("conv and pool layers resolve to their geometry"),
                    }
                }
                LayerKind::Linear { out_features, .. } => {
                    self.geometry(index, input, 1).map_err(&bad)?;
                    [*out_features, 1, 1]
                }
                LayerKind::Activation(_) => input,
                LayerKind::GlobalAvgPool => [input[0], 1, 1],
                LayerKind::Flatten => [numel(input), 1, 1],
                LayerKind::Add { skip_from } => {
                    if *skip_from >= index {
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
                    input
                }
            };
            shapes.push(out);
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

    /// The core-operator geometry of layer `index` applied to a per-sample `input` shape.
    pub fn geometry(&self, index: usize, input: Shape, batch: usize) -> Result<Geometry, String> {
        let [c, h, w] = input;
        let geometry = match &self.layers[index].kind {
            LayerKind::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                groups,
                ..
            } => Geometry::Conv(Conv2dGeom {
                batch,
                in_channels: c,
                in_h: h,
                in_w: w,
                out_channels: *out_channels,
                kernel_h: kernel.0,
                kernel_w: kernel.1,
                stride_h: stride.0,
                stride_w: stride.1,
                pad_h: padding.0,
                pad_w: padding.1,
                groups: *groups,
            }),
            LayerKind::Linear { out_features, .. } => Geometry::Linear(LinearGeom {
                batch,
                in_features: c * h * w,
                out_features: *out_features,
            }),
            LayerKind::AvgPool {
                kernel,
                stride,
                padding,
            }
            | LayerKind::MaxPool {
                kernel,
                stride,
                padding,
            } => Geometry::Pool(PoolGeom {
                batch,
                channels: c,
                in_h: h,
                in_w: w,
                kernel_h: kernel.0,
                kernel_w: kernel.1,
                stride_h: stride.0,
                stride_w: stride.1,
                pad_h: padding.0,
                pad_w: padding.1,
            }),
            _ => Geometry::Elementwise {
                channels: c,
                spatial: h * w,
            },
        };
        let check = match &geometry {
            Geometry::Conv(g) => g.validate(),
            Geometry::Linear(g) => g.validate(),
            Geometry::Pool(g) => g.validate(),
            Geometry::Elementwise { .. } => Ok(()),
        };
        check.map_err(|e| format!("{e} (input shape {input:?})"))?;
        Ok(geometry)
    }

    /// `(weight length, bias length)` of every layer (zeros for layers without parameters).
    pub fn param_lens(&self) -> Result<Vec<(usize, usize)>, ModelError> {
        let shapes = self.shapes()?;
        Ok(self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| match self.geometry(i, shapes[i], 1) {
                Ok(Geometry::Conv(g)) => (g.weight_len(), g.out_channels),
                Ok(Geometry::Linear(g)) => (g.in_features * g.out_features, g.out_features),
                _ => {
                    debug_assert!(!layer.kind.has_params());
                    (0, 0)
                }
            })
            .collect())
    }

    /// Total parameter count.
    pub fn param_count(&self) -> Result<usize, ModelError> {
        Ok(self.param_lens()?.iter().map(|(w, b)| w + b).sum())
    }

    /// Multiply-accumulates of one forward pass of one sample.
    pub fn forward_macs(&self) -> Result<usize, ModelError> {
        let shapes = self.shapes()?;
        Ok((0..self.layers.len())
            .map(|i| match self.geometry(i, shapes[i], 1) {
                Ok(Geometry::Conv(g)) => g.macs(),
                Ok(Geometry::Linear(g)) => g.macs(),
                _ => 0,
            })
            .sum())
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

    /// "float32" or "int8".
    pub fn precision(&self) -> &'static str {
        match self.params {
            Params::Float(_) => "float32",
            Params::Int8(_) => "int8",
        }
    }
}
