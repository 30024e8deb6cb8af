//! Helpers shared by the integration tests.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use mcutrain::compile::LayerUpdate;
use mcutrain::model::{zoo, Architecture, Layer, LayerKind, ModelError};
use mcutrain_core::ops::activation::Activation;

/// One random layer: (kind selector, out channels, kernel 1 or 3, stride 1 or 2, activation).
pub type LayerChoice = (u8, usize, bool, bool, u8);

/// A valid architecture from random choices: layers that do not fit the current shape are
/// skipped; a linear classifier ends it.
pub fn random_arch(input: [usize; 3], choices: &[LayerChoice], classes: usize) -> Architecture {
    let activation =
        |a: u8| [Activation::None, Activation::Relu, Activation::Relu6][a as usize % 3];
    let mut arch = Architecture {
        input,
        classes: 0,
        layers: Vec::new(),
    };
    let mut shapes = vec![input];
    for (i, &(kind, out, k3, s2, act)) in choices.iter().enumerate() {
        let shape = *shapes.last().unwrap();
        let (k, s) = (if k3 { 3 } else { 1 }, if s2 { 2 } else { 1 });
        let kind = match kind % 10 {
            0 | 1 => LayerKind::Conv2d {
                out_channels: out,
                kernel: (k, k),
                stride: (s, s),
                padding: (k / 2, k / 2),
                groups: 1,
                activation: activation(act),
            },
            2 => LayerKind::Conv2d {
                out_channels: shape[0],
                kernel: (k, k),
                stride: (s, s),
                padding: (k / 2, k / 2),
                groups: shape[0],
                activation: activation(act),
            },
            3 => LayerKind::Linear {
                out_features: out,
                activation: activation(act),
            },
            4 | 5 => match shapes[..shapes.len() - 1].iter().rposition(|&t| t == shape) {
                Some(t) if t > 0 => LayerKind::Add { skip_from: t - 1 },
                _ => continue,
            },
            6 => LayerKind::MaxPool {
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            },
            7 => [
                LayerKind::GlobalAvgPool,
                LayerKind::Flatten,
                LayerKind::Activation(activation(act)),
                LayerKind::AvgPool {
                    kernel: (3, 3),
                    stride: (1, 1),
                    padding: (1, 1),
                },
            ][act as usize % 4],
            8 => LayerKind::AvgPool {
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            },
            // Upsampling by the stride, `H_out = (H - 1) s - 2p + k + (s - 1) = s H`, up to 16
            // rows and columns (an MCU-sized net).
            _ => {
                let s = if shape[1].max(shape[2]) <= 8 { s } else { 1 };
                LayerKind::ConvTranspose2d {
                    out_channels: out,
                    kernel: (k, k),
                    stride: (s, s),
                    padding: (k / 2, k / 2),
                    output_padding: (s - 1, s - 1),
                    groups: 1,
                    activation: activation(act),
                }
            }
        };
        arch.layers.push(Layer {
            name: format!("l{i}"),
            kind,
        });
        // With 0 classes a valid graph always fails the output check, which reports the
        // new layer's output shape.
        // A layer beyond the int8 kernels' limits is refused by int8 models: skipped too.
        let fits_int8 = |arch: &Architecture| {
            let last = arch.layers.len() - 1;
            let resolved = arch.resolve(last, shape, 1);
            resolved.is_ok_and(|l| l.op().fits_int8_limits())
        };
        match arch.shapes() {
            Err(ModelError::BadOutput { shape, .. }) if fits_int8(&arch) => shapes.push(shape),
            _ => {
                arch.layers.pop();
            }
        }
    }
    arch.layers.push(Layer {
        name: "classifier".into(),
        kind: LayerKind::Linear {
            out_features: classes,
            activation: Activation::None,
        },
    });
    arch.classes = classes;
    arch.shapes().expect("a valid random architecture");
    arch
}

/// One random inverted-residual block: (expansion 1 to 4, output channels, stride 2).
pub type BlockChoice = (usize, usize, bool);

/// A MobileNetV2-style network from random choices (the pattern that row streaming targets):
/// a 3x3 stem (stride 1, ReLU6), inverted-residual blocks (1x1 expand unless the expansion
/// is 1, 3x3 depthwise, 1x1 project, a residual add when the shape is kept), global average
/// pooling and a linear classifier.
pub fn random_mobilenet(input: [usize; 3], blocks: &[BlockChoice], classes: usize) -> Architecture {
    let blocks: Vec<(usize, usize, usize)> = blocks
        .iter()
        .map(|&(expansion, out, stride2)| (expansion, out, if stride2 { 2 } else { 1 }))
        .collect();
    let arch = zoo::mobilenet_v2(input, (4, 1), &blocks, None, classes);
    arch.shapes().expect("a valid random mobilenet");
    arch
}

/// A random per-layer scheme (`None`: frozen, else eighths of the channels and bias) that
/// trains at least the classifier's bias.
pub fn random_updates(arch: &Architecture, picks: &[(u8, bool)]) -> Vec<LayerUpdate> {
    let text: Vec<String> = arch
        .layers
        .iter()
        .zip(picks.iter().cycle())
        .filter(|(l, _)| l.kind.has_params())
        .filter_map(|(l, &(ratio, bias))| {
            let weight = ["0", "1/8", "1/4", "1/2", "1", "0", "0"][ratio as usize % 7];
            let bias = bias || l.name == "classifier";
            (weight != "0" || bias).then(|| {
                format!(
                    r#"{{"layer": "{}", "weight": "{weight}", "bias": {bias}}}"#,
                    l.name
                )
            })
        })
        .collect();
    mcutrain::model::scheme::from_json(arch, &format!("[{}]", text.join(",")), "random")
        .expect("a valid scheme")
}
