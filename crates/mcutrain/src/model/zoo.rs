//! Reference architectures of the named workloads (shared/workloads.md) and their seeded
//! initialisation.

use super::{Architecture, FloatLayer, Layer, LayerKind, Model, ModelError, Params};
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

    fn conv(&mut self, name: String, out: usize, k: usize, stride: usize, groups: usize, act: Activation) {
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
            self.conv(format!("block{index}.expand"), hidden, 1, 1, 1, Activation::Relu6);
        }
        self.conv(format!("block{index}.depthwise"), hidden, 3, stride, hidden, Activation::Relu6);
        self.conv(format!("block{index}.project"), out, 1, 1, 1, Activation::None);
        if stride == 1 && cin == out {
            let skip_from = input_layer.expect("a block follows the stem");
            self.push(format!("block{index}.add"), LayerKind::Add { skip_from });
        }
    }
}

/// The fashion-shift backbone: MobileNetV2-style for 1x28x28 inputs and 10 classes
/// (about 60k parameters, 3.3M MACs per forward pass).
pub fn fashion_shift_backbone() -> Architecture {
    let mut b = Builder {
        layers: Vec::new(),
        channels: 1,
    };
    b.conv("stem".into(), 16, 3, 2, 1, Activation::Relu6);
    // (expansion, output channels, stride): 14x14 -> 7x7.
    let blocks = [(4, 16, 1), (4, 32, 2), (4, 32, 1), (4, 48, 1), (4, 48, 1)];
    for (i, &(t, c, s)) in blocks.iter().enumerate() {
        b.inverted_residual(i + 1, t, c, s);
    }
    b.conv("head.pointwise".into(), 192, 1, 1, 1, Activation::Relu6);
    b.push("head.pool".into(), LayerKind::GlobalAvgPool);
    b.push(
        "classifier".into(),
        LayerKind::Linear {
            out_features: 10,
            activation: Activation::None,
        },
    );
    Architecture {
        input: [1, 28, 28],
        classes: 10,
        layers: b.layers,
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
        .filter_map(|(i, l)| matches!(l.kind, LayerKind::Add { .. }).then(|| i - 1))
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
