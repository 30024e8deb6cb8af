//! Reference architectures of the named workloads (`workloads/`) and their seeded
//! initialisation.

use super::{Architecture, FloatLayer, Layer, LayerKind, Model, ModelError, Params, Shape};
use mcutrain_core::ops::activation::Activation;
use mcutrain_core::rng::Rng;

/// Builder for MobileNetV2-style networks: stem, inverted-residual blocks, head.
struct Builder {
    layers: Vec<Layer>,
    channels: usize,
}

impl Builder {
    fn push(&mut self, name: String, kind: LayerKind) -> usize {
        self.layers.push(Layer { name, kind });
        self.layers.len() - 1
    }

    fn conv(
        &mut self,
        name: String,
        out: usize,
        k: usize,
        stride: usize,
        groups: usize,
        act: Activation,
    ) {
        self.push(
            name,
            LayerKind::Conv2d {
                out_channels: out,
                kernel: (k, k),
                stride: (stride, stride),
                padding: (k / 2, k / 2),
                groups,
                activation: act,
            },
        );
        self.channels = out;
    }

    /// Inverted residual block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 project
    /// (linear), plus a residual add when the shape is kept.
    fn inverted_residual(&mut self, index: usize, expand: usize, out: usize, stride: usize) {
        let input_layer = self.layers.len().checked_sub(1);
        let cin = self.channels;
        let hidden = cin * expand;
        if expand != 1 {
            self.conv(
                format!("block{index}.expand"),
                hidden,
                1,
                1,
                1,
                Activation::Relu6,
            );
        }
        self.conv(
            format!("block{index}.depthwise"),
            hidden,
            3,
            stride,
            hidden,
            Activation::Relu6,
        );
        self.conv(
            format!("block{index}.project"),
            out,
            1,
            1,
            1,
            Activation::None,
        );
        if stride == 1 && cin == out {
            let skip_from = input_layer.expect("a block follows the stem");
            self.push(format!("block{index}.add"), LayerKind::Add { skip_from });
        }
    }
}

/// A MobileNetV2-style network: a 3x3 `stem` (output channels, stride; ReLU6), the
/// inverted-residual `blocks` (expansion, output channels, stride) named `block1`, `block2`,
/// ..., an optional 1x1 `head_pointwise` conv of that many channels (ReLU6), global average
/// pooling (`head.pool`) and a linear `classifier` with `classes` outputs.
pub fn mobilenet_v2(
    input: Shape,
    stem: (usize, usize),
    blocks: &[(usize, usize, usize)],
    head_pointwise: Option<usize>,
    classes: usize,
) -> Architecture {
    let mut b = Builder {
        layers: Vec::new(),
        channels: input[0],
    };
    b.conv("stem".into(), stem.0, 3, stem.1, 1, Activation::Relu6);
    for (i, &(expand, out, stride)) in blocks.iter().enumerate() {
        b.inverted_residual(i + 1, expand, out, stride);
    }
    if let Some(channels) = head_pointwise {
        b.conv(
            "head.pointwise".into(),
            channels,
            1,
            1,
            1,
            Activation::Relu6,
        );
    }
    b.push("head.pool".into(), LayerKind::GlobalAvgPool);
    b.push(
        "classifier".into(),
        LayerKind::Linear {
            out_features: classes,
            activation: Activation::None,
        },
    );
    Architecture {
        input,
        classes,
        layers: b.layers,
    }
}

/// The fashion-shift backbone: MobileNetV2-style for 1x28x28 inputs and 10 classes
/// (about 60k parameters, 3.3M MACs per forward pass).
pub fn fashion_shift_backbone() -> Architecture {
    // (expansion, output channels, stride): 14x14 -> 7x7.
    let blocks = [(4, 16, 1), (4, 32, 2), (4, 32, 1), (4, 48, 1), (4, 48, 1)];
    mobilenet_v2([1, 28, 28], (16, 2), &blocks, Some(192), 10)
}

/// A small 1-D CNN for multichannel time series `[channels, 1, length]`: two convolutions
/// (kernel 5, ReLU) with a max pool between them, global average pooling and a classifier.
pub fn cnn1d(input: Shape, classes: usize) -> Architecture {
    let conv = |name: &str, out: usize| Layer {
        name: name.into(),
        kind: LayerKind::Conv2d {
            out_channels: out,
            kernel: (1, 5),
            stride: (1, 1),
            padding: (0, 2),
            groups: 1,
            activation: Activation::Relu,
        },
    };
    let mut layers = vec![conv("conv1", 16)];
    if input[2] >= 4 {
        layers.push(Layer {
            name: "pool1".into(),
            kind: LayerKind::MaxPool {
                kernel: (1, 2),
                stride: (1, 2),
                padding: (0, 0),
            },
        });
    }
    layers.push(conv("conv2", 32));
    layers.push(Layer {
        name: "pool".into(),
        kind: LayerKind::GlobalAvgPool,
    });
    layers.push(Layer {
        name: "classifier".into(),
        kind: LayerKind::Linear {
            out_features: classes,
            activation: Activation::None,
        },
    });
    Architecture {
        input,
        classes,
        layers,
    }
}

/// A two-layer perceptron (128 hidden ReLU units) for any input shape.
pub fn mlp(input: Shape, classes: usize) -> Architecture {
    let linear = |name: &str, out: usize, activation| Layer {
        name: name.into(),
        kind: LayerKind::Linear {
            out_features: out,
            activation,
        },
    };
    Architecture {
        input,
        classes,
        layers: vec![
            linear("hidden", 128, Activation::Relu),
            linear("classifier", classes, Activation::None),
        ],
    }
}

/// The reference architectures of the named workloads, by name ([`REFERENCES`]).
pub fn reference(name: &str) -> Option<Architecture> {
    match name {
        "fashion-shift" => Some(fashion_shift_backbone()),
        "mbv2-w035-r128" => Some(mbv2_w035_r128()),
        _ => None,
    }
}

/// Names accepted by [`reference()`].
pub const REFERENCES: &[&str] = &["fashion-shift", "mbv2-w035-r128"];

/// Names accepted by [`by_name`].
pub const ARCHITECTURES: &[&str] = &["fashion-shift", "cnn1d", "mlp"];

/// The architecture `name` for data of per-sample shape `input` with `classes` classes.
/// `fashion-shift` is fixed to 1x28x28 inputs and 10 classes; the others adapt.
pub fn by_name(name: &str, input: Shape, classes: usize) -> Result<Architecture, String> {
    match name {
        "fashion-shift" => {
            let arch = fashion_shift_backbone();
            if input != arch.input || classes > arch.classes {
                return Err(format!(
                    "fashion-shift takes 1x28x28 inputs and up to 10 classes, the data has {input:?} and {classes} classes; use --arch cnn1d or mlp"
                ));
            }
            Ok(arch)
        }
        "cnn1d" if input[1] == 1 => Ok(cnn1d(input, classes)),
        "cnn1d" => Err(format!(
            "cnn1d takes time series [channels, 1, length]; the data has {input:?}"
        )),
        "mlp" => Ok(mlp(input, classes)),
        other => Err(format!(
            "unknown architecture '{other}'; available: {}",
            ARCHITECTURES.join(", ")
        )),
    }
}

/// `mbv2-w035-r128`: MobileNetV2 at width multiplier 0.35 for 3x128x128
/// inputs and 2 classes, the model of the 256KB paper's memory figures. The standard block
/// table `(t, c, n, s)` = (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1),
/// (6,160,3,2), (6,320,1,1) with channels `make_divisible(c * 0.35, 8)` as in the
/// torchvision/TF reference, a 16-channel stride-2 stem, a 1280-channel last pointwise conv
/// (the reference does not shrink it below width 1.0), global average pooling and a linear
/// classifier; ReLU6 everywhere but the projections, batch norm folded away.
/// 17 blocks (`block1` .. `block17`), 391 650 parameters and 18.9M MACs per forward pass
/// (the published 59M MACs of MobileNetV2-0.35 at 224x224, scaled by `(128/224)^2`, less the
/// 1000-class classifier).
pub fn mbv2_w035_r128() -> Architecture {
    const WIDTH: f64 = 0.35;
    let table = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let blocks: Vec<(usize, usize, usize)> = table
        .iter()
        .flat_map(|&(t, c, n, s)| {
            let out = make_divisible(c as f64 * WIDTH);
            (0..n).map(move |repeat| (t, out, if repeat == 0 { s } else { 1 }))
        })
        .collect();
    let stem = (make_divisible(32.0 * WIDTH), 2);
    mobilenet_v2([3, 128, 128], stem, &blocks, Some(1280), 2)
}

/// The reference `_make_divisible(v, 8)`: `v` rounded to the nearest multiple of 8 (at least
/// 8), one step up when rounding lost more than 10%.
fn make_divisible(v: f64) -> usize {
    let rounded = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * v {
        rounded + 8
    } else {
        rounded
    }
}

/// Seeded float initialisation: He-normal weights (`std = sqrt(2 / fan_in)`), zero biases,
/// and zero weights for the last convolution of every residual branch, so that each residual
/// block starts as the identity (trainable without batch normalisation).
pub fn init_float(arch: &Architecture, seed: u64) -> Result<Model, ModelError> {
    let lens = arch.param_lens()?;
    let mut rng = Rng::new(seed);
    let residual_ends: Vec<usize> = arch
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.kind, LayerKind::Add { .. }))
        .map(|(i, _)| i - 1)
        .collect();
    let params = lens
        .iter()
        .enumerate()
        .map(|(i, &(weight_len, bias_len))| {
            if weight_len == 0 {
                return FloatLayer::default();
            }
            let fan_in = weight_len / bias_len;
            let std = if residual_ends.contains(&i) {
                0.0
            } else {
                (2.0 / fan_in as f32).sqrt()
            };
            FloatLayer {
                weight: (0..weight_len).map(|_| rng.normal() * std).collect(),
                bias: vec![0.0; bias_len],
            }
        })
        .collect();
    Ok(Model {
        arch: arch.clone(),
        params: Params::Float(params),
    })
}
