//! The layer contract: one description of every operator, used by the model IR, the host
//! engines, the training-graph compiler, the plan files and the plan executor.
//!
//! - [`LayerKind`] is what a layer computes, independent of its input: the operator and its
//!   hyper-parameters. The model IR stores it, and the model and plan files encode it through
//!   [`LayerKind::fields`] and [`LayerKind::from_fields`] (one table, [`KINDS`]).
//! - [`LayerKind::resolve`] applies it to a per-sample input shape at a batch size: a [`Layer`],
//!   which carries the operator's geometry.
//! - [`Layer::op`] gives the layer's [`Operator`]: its shapes and flags, its forward kernels
//!   (float and 8-bit), and through [`Operator::input_error`] and [`Operator::parametric`] its
//!   backward kernels. Engines, compiler and executor call these and never match on the kind.
//!
//! A new operator is its kernel module in [`crate::ops`] with an `Operator` implementation and
//! its tests, plus its entries here: a [`LayerKind`] variant with its row in [`KINDS`] and its
//! arms in [`LayerKind::fields`], [`LayerKind::from_fields`] and [`LayerKind::resolve`], and a
//! [`Layer`] variant with its arm in [`Layer::op`].
//!
//! Conventions of every kernel: the float ones as in [`crate::ops`] (forwards and input errors
//! overwrite, gradients add); the 8-bit forward and input error write codes in the quantization
//! they are given and return the real range of the result before 8-bit saturation, from their
//! accumulators (the range trackers of fully quantized training observe it). Weights are
//! output-channel major: `[channels][structure]`, so that a channel's weights, its bias and its
//! per-channel quantization belong together (the structures of partial and sparse updates).

use crate::ops::activation::{Activation, ActivationLayer};
use crate::ops::add::AddLayer;
use crate::ops::conv2d::{Conv2dGeom, Conv2dLayer};
use crate::ops::conv_transpose2d::{ConvTranspose2dGeom, ConvTranspose2dLayer};
use crate::ops::flatten::Flatten;
use crate::ops::linear::{LinearGeom, LinearLayer};
pub use crate::ops::operator::{
    numel, FloatParams, InputError, Operator, ParamShape, Parametric, QParameters, QWeights, Shape,
};
use crate::ops::pool::{AvgPool, GlobalPoolGeom, MaxPool, PoolGeom};
use crate::ops::weighted::WeightedKernels;
use crate::ops::{checked_product, OpError};

/// What a layer computes: the operator and its hyper-parameters, independent of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    /// A standalone ReLU or ReLU6 (or the identity).
    Activation(Activation),
    /// Average pooling (padding counts as 0 in the mean, see [`crate::ops::pool`]).
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
    /// Transposed 2-D convolution (PyTorch's `ConvTranspose2d`, dilation 1), with a fused
    /// activation; its weights are output-channel major (see [`crate::ops::conv_transpose2d`]).
    ConvTranspose2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel `(height, width)`.
        kernel: (usize, usize),
        /// Stride `(height, width)`.
        stride: (usize, usize),
        /// Rows and columns `(height, width)` cropped from each side of the full output.
        padding: (usize, usize),
        /// Rows and columns `(height, width)` added at the bottom and right of the output,
        /// each below its stride.
        output_padding: (usize, usize),
        /// Channel groups.
        groups: usize,
        /// Fused activation.
        activation: Activation,
    },
}

/// How one kind is stored in the model and plan files: its tag, its name in reports, how many
/// integer fields it has and whether an activation follows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindSpec {
    /// The file tag.
    pub tag: u8,
    /// Operator name in reports.
    pub name: &'static str,
    /// Integer fields, in the order of [`LayerKind::fields`].
    pub fields: usize,
    /// An activation code follows the fields.
    pub activation: bool,
}

/// Every layer kind, by file tag.
pub const KINDS: [KindSpec; 9] = [
    KindSpec {
        tag: 0,
        name: "conv2d",
        fields: 8,
        activation: true,
    },
    KindSpec {
        tag: 1,
        name: "linear",
        fields: 1,
        activation: true,
    },
    KindSpec {
        tag: 2,
        name: "activation",
        fields: 0,
        activation: true,
    },
    KindSpec {
        tag: 3,
        name: "avgpool",
        fields: 6,
        activation: false,
    },
    KindSpec {
        tag: 4,
        name: "maxpool",
        fields: 6,
        activation: false,
    },
    KindSpec {
        tag: 5,
        name: "globalavgpool",
        fields: 0,
        activation: false,
    },
    KindSpec {
        tag: 6,
        name: "add",
        fields: 1,
        activation: false,
    },
    KindSpec {
        tag: 7,
        name: "flatten",
        fields: 0,
        activation: false,
    },
    KindSpec {
        tag: 8,
        name: "conv_transpose2d",
        fields: 10,
        activation: true,
    },
];

/// Most integer fields of one kind (the plan file's layer record has room for this many).
pub const MAX_FIELDS: usize = 10;

/// The integer fields of a kind as stored in files (unused entries are 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindFields {
    /// The kind's file tag ([`KindSpec::tag`]).
    pub tag: u8,
    /// The fields, the first [`KindSpec::fields`] of them used.
    pub values: [usize; MAX_FIELDS],
    /// The activation, for kinds that have one.
    pub activation: Option<Activation>,
}

impl KindFields {
    /// The used fields.
    pub fn used(&self) -> &[usize] {
        let count = KINDS.get(self.tag as usize).map_or(0, |k| k.fields);
        &self.values[..count]
    }
}

/// The fields of a kernel `(h, w)`, stride and padding, in file order.
fn window_fields(k: (usize, usize), s: (usize, usize), p: (usize, usize)) -> [usize; 6] {
    [k.0, k.1, s.0, s.1, p.0, p.1]
}

impl LayerKind {
    /// How this kind is stored ([`KINDS`]).
    pub fn spec(&self) -> KindSpec {
        KINDS[self.fields().tag as usize]
    }

    /// Short operator name used in reports (`conv2d(grouped)`, `conv_transpose2d(grouped)` for
    /// grouped convolutions).
    pub fn name(&self) -> &'static str {
        match self {
            LayerKind::Conv2d { groups, .. } if *groups > 1 => "conv2d(grouped)",
            LayerKind::ConvTranspose2d { groups, .. } if *groups > 1 => "conv_transpose2d(grouped)",
            LayerKind::Activation(Activation::Relu) => "relu",
            LayerKind::Activation(Activation::Relu6) => "relu6",
            LayerKind::Activation(Activation::None) => "identity",
            kind => kind.spec().name,
        }
    }

    /// True for layers with a weight tensor and a bias.
    pub fn has_params(&self) -> bool {
        matches!(
            self,
            LayerKind::Conv2d { .. } | LayerKind::Linear { .. } | LayerKind::ConvTranspose2d { .. }
        )
    }

    /// The earlier layer whose output this layer also reads (an add's residual input).
    pub fn skip_from(&self) -> Option<usize> {
        match self {
            LayerKind::Add { skip_from } => Some(*skip_from),
            _ => None,
        }
    }

    /// The file form: tag, integer fields and activation.
    pub fn fields(&self) -> KindFields {
        let mut values = [0usize; MAX_FIELDS];
        let mut put = |fields: &[usize]| values[..fields.len()].copy_from_slice(fields);
        let (tag, activation) = match *self {
            LayerKind::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                groups,
                activation,
            } => {
                put(&[out_channels]);
                let window = window_fields(kernel, stride, padding);
                values[1..7].copy_from_slice(&window);
                values[7] = groups;
                (0, Some(activation))
            }
            LayerKind::Linear {
                out_features,
                activation,
            } => {
                put(&[out_features]);
                (1, Some(activation))
            }
            LayerKind::Activation(activation) => (2, Some(activation)),
            LayerKind::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                put(&window_fields(kernel, stride, padding));
                (3, None)
            }
            LayerKind::MaxPool {
                kernel,
                stride,
                padding,
            } => {
                put(&window_fields(kernel, stride, padding));
                (4, None)
            }
            LayerKind::GlobalAvgPool => (5, None),
            LayerKind::Add { skip_from } => {
                put(&[skip_from]);
                (6, None)
            }
            LayerKind::Flatten => (7, None),
            LayerKind::ConvTranspose2d {
                out_channels,
                kernel,
                stride,
                padding,
                output_padding,
                groups,
                activation,
            } => {
                put(&[out_channels]);
                values[1..7].copy_from_slice(&window_fields(kernel, stride, padding));
                values[7..10].copy_from_slice(&[output_padding.0, output_padding.1, groups]);
                (8, Some(activation))
            }
        };
        KindFields {
            tag,
            values,
            activation,
        }
    }

    /// The kind of a file's tag, fields and activation (`None` for an unknown tag, a wrong
    /// number of fields, or an activation where the kind has none or none where it has one).
    pub fn from_fields(tag: u8, fields: &[usize], activation: Option<Activation>) -> Option<Self> {
        let spec = KINDS.get(tag as usize)?;
        if fields.len() != spec.fields || activation.is_some() != spec.activation {
            return None;
        }
        let f = |i: usize| fields[i];
        let pair = |i: usize| (fields[i], fields[i + 1]);
        Some(match tag {
            0 => LayerKind::Conv2d {
                out_channels: f(0),
                kernel: pair(1),
                stride: pair(3),
                padding: pair(5),
                groups: f(7),
                activation: activation?,
            },
            1 => LayerKind::Linear {
                out_features: f(0),
                activation: activation?,
            },
            2 => LayerKind::Activation(activation?),
            3 => LayerKind::AvgPool {
                kernel: pair(0),
                stride: pair(2),
                padding: pair(4),
            },
            4 => LayerKind::MaxPool {
                kernel: pair(0),
                stride: pair(2),
                padding: pair(4),
            },
            5 => LayerKind::GlobalAvgPool,
            6 => LayerKind::Add { skip_from: f(0) },
            7 => LayerKind::Flatten,
            8 => LayerKind::ConvTranspose2d {
                out_channels: f(0),
                kernel: pair(1),
                stride: pair(3),
                padding: pair(5),
                output_padding: pair(7),
                groups: f(9),
                activation: activation?,
            },
            _ => return None,
        })
    }

    /// The layer applied to `batch` samples of shape `input`: its operator with the geometry
    /// resolved and validated. An add's residual input is checked by the caller, which knows
    /// the other tensors' shapes.
    pub fn resolve(&self, input: Shape, batch: usize) -> Result<Layer, OpError> {
        let [c, h, w] = input;
        if batch == 0 || c == 0 || h == 0 || w == 0 {
            return Err(OpError::ZeroSize);
        }
        // Sizes of the whole batch fit a `usize` (the geometries check their own).
        let features = checked_product(&[c, h, w])?;
        checked_product(&[batch, features])?;
        let pool = |kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize)| {
            let geom = PoolGeom {
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
            };
            geom.validate().map(|()| geom)
        };
        Ok(match *self {
            LayerKind::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                groups,
                activation,
            } => {
                let geom = Conv2dGeom {
                    batch,
                    in_channels: c,
                    in_h: h,
                    in_w: w,
                    out_channels,
                    kernel_h: kernel.0,
                    kernel_w: kernel.1,
                    stride_h: stride.0,
                    stride_w: stride.1,
                    pad_h: padding.0,
                    pad_w: padding.1,
                    groups,
                };
                geom.validate()?;
                Layer::Conv2d(Conv2dLayer { geom, activation })
            }
            LayerKind::Linear {
                out_features,
                activation,
            } => {
                let geom = LinearGeom {
                    batch,
                    in_features: features,
                    out_features,
                };
                geom.validate()?;
                Layer::Linear(LinearLayer { geom, activation })
            }
            LayerKind::Activation(activation) => Layer::Activation(ActivationLayer {
                activation,
                shape: input,
                batch,
            }),
            LayerKind::AvgPool {
                kernel,
                stride,
                padding,
            } => Layer::AvgPool(AvgPool(pool(kernel, stride, padding)?)),
            LayerKind::MaxPool {
                kernel,
                stride,
                padding,
            } => Layer::MaxPool(MaxPool(pool(kernel, stride, padding)?)),
            LayerKind::GlobalAvgPool => {
                let geom = GlobalPoolGeom {
                    batch,
                    channels: c,
                    spatial: h * w,
                };
                geom.validate()?;
                Layer::GlobalAvgPool(geom)
            }
            LayerKind::Add { skip_from } => Layer::Add(AddLayer {
                skip_from,
                shape: input,
                batch,
            }),
            LayerKind::Flatten => Layer::Flatten(Flatten {
                shape: input,
                batch,
            }),
            LayerKind::ConvTranspose2d {
                out_channels,
                kernel,
                stride,
                padding,
                output_padding,
                groups,
                activation,
            } => {
                let geom = ConvTranspose2dGeom {
                    batch,
                    in_channels: c,
                    in_h: h,
                    in_w: w,
                    out_channels,
                    kernel_h: kernel.0,
                    kernel_w: kernel.1,
                    stride_h: stride.0,
                    stride_w: stride.1,
                    pad_h: padding.0,
                    pad_w: padding.1,
                    output_pad_h: output_padding.0,
                    output_pad_w: output_padding.1,
                    groups,
                };
                geom.validate()?;
                Layer::ConvTranspose2d(ConvTranspose2dLayer { geom, activation })
            }
        })
    }
}

/// A layer resolved against its input: the operator with its geometry at one batch size.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Layer {
    /// Convolution.
    Conv2d(Conv2dLayer),
    /// Fully connected.
    Linear(LinearLayer),
    /// Standalone activation.
    Activation(ActivationLayer),
    /// Average pooling.
    AvgPool(AvgPool),
    /// Max pooling.
    MaxPool(MaxPool),
    /// Global average pooling.
    GlobalAvgPool(GlobalPoolGeom),
    /// Residual addition.
    Add(AddLayer),
    /// Reshape to a vector.
    Flatten(Flatten),
    /// Transposed convolution.
    ConvTranspose2d(ConvTranspose2dLayer),
}

impl Layer {
    /// The layer's operator: shapes, flags and kernels.
    pub fn op(&self) -> &dyn Operator {
        match self {
            Layer::Conv2d(l) => l,
            Layer::Linear(l) => l,
            Layer::Activation(l) => l,
            Layer::AvgPool(l) => l,
            Layer::MaxPool(l) => l,
            Layer::GlobalAvgPool(l) => l,
            Layer::Add(l) => l,
            Layer::Flatten(l) => l,
            Layer::ConvTranspose2d(l) => l,
        }
    }

    /// The convolution geometry of a convolution layer (a possible stage of a row-streamed
    /// chain, [`crate::ops::stream`]).
    pub fn conv(&self) -> Option<&Conv2dLayer> {
        match self {
            Layer::Conv2d(l) => Some(l),
            _ => None,
        }
    }

    /// `(channels, weights per channel)` of a layer with parameters.
    pub fn params(&self) -> Option<ParamShape> {
        self.op().parametric().map(|p| p.param_shape())
    }

    /// The layer restricted to its first `channels` output channels, whose input, output and
    /// weights at batch 1 are prefixes of this layer's (the trained channels of a sparse
    /// update); `None` for a layer without parameters or when the channels do not form such a
    /// layer (say, a part of a channel group).
    pub fn channel_prefix(&self, channels: usize) -> Option<Layer> {
        match self {
            Layer::Conv2d(l) => l.channel_prefix(channels).map(Layer::Conv2d),
            Layer::ConvTranspose2d(l) => l.channel_prefix(channels).map(Layer::ConvTranspose2d),
            Layer::Linear(l) => l.channel_prefix(channels).map(Layer::Linear),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One kind of every tag with distinct field values.
    pub(crate) fn every_kind() -> [LayerKind; 9] {
        [
            LayerKind::Conv2d {
                out_channels: 8,
                kernel: (3, 1),
                stride: (2, 1),
                padding: (1, 0),
                groups: 2,
                activation: Activation::Relu6,
            },
            LayerKind::Linear {
                out_features: 5,
                activation: Activation::None,
            },
            LayerKind::Activation(Activation::Relu),
            LayerKind::AvgPool {
                kernel: (2, 3),
                stride: (2, 1),
                padding: (1, 0),
            },
            LayerKind::MaxPool {
                kernel: (3, 3),
                stride: (1, 2),
                padding: (0, 1),
            },
            LayerKind::GlobalAvgPool,
            LayerKind::Add { skip_from: 3 },
            LayerKind::Flatten,
            LayerKind::ConvTranspose2d {
                out_channels: 6,
                kernel: (3, 2),
                stride: (2, 1),
                padding: (1, 0),
                output_padding: (1, 0),
                groups: 2,
                activation: Activation::Relu,
            },
        ]
    }

    #[test]
    fn fields_round_trip_and_follow_the_table() {
        for (tag, kind) in every_kind().into_iter().enumerate() {
            let f = kind.fields();
            assert_eq!(f.tag as usize, tag);
            assert_eq!(KINDS[tag].tag as usize, tag);
            assert_eq!(f.used().len(), KINDS[tag].fields);
            assert!(f.values[f.used().len()..].iter().all(|&v| v == 0));
            assert_eq!(
                LayerKind::from_fields(f.tag, f.used(), f.activation),
                Some(kind)
            );
            // A missing or extra field, or a wrong activation presence, is refused.
            let mut longer = [0usize; MAX_FIELDS + 1];
            longer[..f.used().len()].copy_from_slice(f.used());
            let extra = &longer[..f.used().len() + 1];
            assert_eq!(LayerKind::from_fields(f.tag, extra, f.activation), None);
            let flipped = match f.activation {
                Some(_) => None,
                None => Some(Activation::None),
            };
            assert_eq!(LayerKind::from_fields(f.tag, f.used(), flipped), None);
        }
        assert_eq!(LayerKind::from_fields(KINDS.len() as u8, &[], None), None);
    }

    #[test]
    fn report_names_mark_grouped_convolutions() {
        for kind in every_kind() {
            let groups = match kind {
                LayerKind::Conv2d { groups, .. } | LayerKind::ConvTranspose2d { groups, .. } => {
                    groups
                }
                _ => 1,
            };
            let table_name = KINDS[kind.fields().tag as usize].name;
            match kind {
                LayerKind::Activation(_) => assert_ne!(kind.name(), table_name),
                _ if groups > 1 => {
                    assert_eq!(kind.name().strip_suffix("(grouped)"), Some(table_name))
                }
                _ => assert_eq!(kind.name(), table_name),
            }
        }
    }

    #[test]
    fn resolved_layers_report_their_shapes_and_parameters() {
        let input = [4, 6, 5];
        let shapes: [(Shape, Option<(usize, usize)>); 9] = [
            ([8, 3, 5], Some((8, 2 * 3))),
            ([5, 1, 1], Some((5, 120))),
            ([4, 6, 5], None),
            ([4, 4, 3], None),
            ([4, 4, 3], None),
            ([4, 1, 1], None),
            ([4, 6, 5], None),
            ([120, 1, 1], None),
            // (6 - 1) * 2 - 2 + 3 + 1 rows, (5 - 1) + 2 columns.
            ([6, 12, 6], Some((6, 2 * 3 * 2))),
        ];
        for (kind, (shape, params)) in every_kind().into_iter().zip(shapes) {
            let layer = kind.resolve(input, 2).expect("valid");
            assert_eq!(layer.op().output_shape(), shape, "{kind:?}");
            let got = layer.params().map(|p| (p.channels, p.structure));
            assert_eq!(got, params, "{kind:?}");
            assert_eq!(kind.has_params(), params.is_some());
            assert_eq!(layer.op().skip_from(), kind.skip_from());
        }
        let bad = LayerKind::Conv2d {
            out_channels: 3,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (0, 0),
            groups: 2,
            activation: Activation::None,
        };
        assert_eq!(bad.resolve(input, 1), Err(OpError::BadGroups));
        let output_padding_at_the_stride = LayerKind::ConvTranspose2d {
            out_channels: 2,
            kernel: (3, 3),
            stride: (2, 1),
            padding: (0, 0),
            output_padding: (2, 0),
            groups: 1,
            activation: Activation::None,
        };
        assert_eq!(
            output_padding_at_the_stride.resolve(input, 1),
            Err(OpError::KernelTooLarge)
        );
        assert_eq!(
            LayerKind::Flatten.resolve([0, 1, 1], 1),
            Err(OpError::ZeroSize)
        );
    }
}
