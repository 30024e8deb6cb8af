//! The host twin end to end on small networks: float gradients of the whole graph against
//! finite differences, learning on a separable problem in float and in int8, determinism,
//! thread-count independence and backward pruning.

use mcutrain::adapt::evaluate;
use mcutrain::data::Dataset;
use mcutrain::engine::float::{train, zeros_like, FloatNet, FloatTrainConfig};
use mcutrain::engine::fqt::{ErrorRanges, FqtConfig, FqtTrainer, QuantNet};
use mcutrain::model::UpdateScheme;
use mcutrain::model::{zoo, Architecture, Layer, LayerKind, Model, Params};
use mcutrain::quantize::quantize;
use mcutrain_core::ops::activation::Activation;
use mcutrain_core::rng::Rng;

fn conv(name: &str, out: usize, k: usize, stride: usize, groups: usize, act: Activation) -> Layer {
    Layer {
        name: name.into(),
        kind: LayerKind::Conv2d {
            out_channels: out,
            kernel: (k, k),
            stride: (stride, stride),
            padding: (k / 2, k / 2),
            groups,
            activation: act,
        },
    }
}

/// Every layer kind once: conv, depthwise conv with stride 2, residual add, pools, flatten,
/// standalone activation, linear.
fn small_arch() -> Architecture {
    let layer = |name: &str, kind| Layer {
        name: name.into(),
        kind,
    };
    Architecture {
        input: [2, 7, 7],
        classes: 3,
        layers: vec![
            conv("c0", 4, 3, 1, 1, Activation::Relu6),
            conv("c1", 4, 1, 1, 1, Activation::None),
            layer("add", LayerKind::Add { skip_from: 0 }),
            conv("dw", 4, 3, 2, 4, Activation::Relu),
            layer(
                "avg",
                LayerKind::AvgPool {
                    kernel: (2, 2),
                    stride: (1, 1),
                    padding: (0, 0),
                },
            ),
            layer(
                "max",
                LayerKind::MaxPool {
                    kernel: (2, 2),
                    stride: (1, 1),
                    padding: (1, 1),
                },
            ),
            layer("relu", LayerKind::Activation(Activation::Relu)),
            layer("gap", LayerKind::GlobalAvgPool),
            layer("flat", LayerKind::Flatten),
            layer(
                "fc",
                LayerKind::Linear {
                    out_features: 3,
                    activation: Activation::None,
                },
            ),
        ],
    }
}

/// A separable 3-class problem: the class decides which quadrant of channel 0 is bright.
fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut samples = Vec::with_capacity(n * 98);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 3) as u16;
        for c in 0..2 {
            for y in 0..7 {
                for x in 0..7 {
                    let bright = c == 0
                        && match class {
                            0 => y < 3 && x < 3,
                            1 => y >= 4 && x >= 4,
                            _ => y < 3 && x >= 4,
                        };
                    let base = if bright { 0.8 } else { 0.1 };
                    samples.push((base + 0.1 * rng.next_f32()).min(1.0));
                }
            }
        }
        labels.push(class);
    }
    Dataset {
        channels: 2,
        height: 7,
        width: 7,
        samples,
        labels,
        classes: 3,
        name: "synthetic".into(),
    }
}

fn float_params(model: &Model) -> &Vec<mcutrain::model::FloatLayer> {
    match &model.params {
        Params::Float(p) => p,
        Params::Int8(_) => panic!("expected a float model"),
    }
}

#[test]
fn whole_graph_float_gradients_match_finite_differences() {
    let arch = small_arch();
    let mut model = zoo::init_float(&arch, 3).unwrap();
    // Non-zero residual branch and biases, so every path carries gradient.
    if let Params::Float(p) = &mut model.params {
        let mut rng = Rng::new(9);
        for l in p.iter_mut() {
            l.weight.iter_mut().for_each(|w| *w += 0.2 * rng.normal());
            l.bias.iter_mut().for_each(|b| *b = 0.1 * rng.normal());
        }
    }
    let data = synthetic(2, 5);
    let net = FloatNet::new(&arch).unwrap();
    let params = float_params(&model).clone();
    let trainable = UpdateScheme::All.updates(&arch);
    let loss_of = |p: &[mcutrain::model::FloatLayer]| -> f64 {
        let t = net.forward(p, &data.samples, 2);
        let mut g = zeros_like(p);
        net.backward(
            p,
            &t,
            &data.labels,
            &UpdateScheme::BiasOnly(1).updates(&arch),
            &mut g,
        )
        .loss
    };
    let tensors = net.forward(&params, &data.samples, 2);
    let mut grads = zeros_like(&params);
    net.backward(&params, &tensors, &data.labels, &trainable, &mut grads);
    let mut checked = 0;
    for (li, layer) in params.iter().enumerate() {
        for k in (0..layer.weight.len()).step_by(7) {
            let h = 1e-2f32;
            let mut plus = params.clone();
            plus[li].weight[k] += h;
            let mut minus = params.clone();
            minus[li].weight[k] -= h;
            let numeric = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h as f64);
            let analytic = grads[li].weight[k] as f64;
            // ReLU kinks make a few finite differences meaningless: skip where the two
            // one-sided slopes disagree.
            let base = loss_of(&params);
            let right = (loss_of(&plus) - base) / h as f64;
            let left = (base - loss_of(&minus)) / h as f64;
            if (right - left).abs() > 1e-2 * (1.0 + right.abs()) {
                continue;
            }
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "layer {li} weight {k}: numeric {numeric} analytic {analytic}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} weights checked");
}

#[test]
fn float_training_learns_a_separable_problem() {
    let arch = small_arch();
    let mut model = zoo::init_float(&arch, 1).unwrap();
    let data = synthetic(300, 2);
    let before = evaluate(&model, &data).unwrap();
    let cfg = FloatTrainConfig {
        epochs: 15,
        batch: 10,
        lr: 0.1,
        momentum: 0.9,
        scheme: UpdateScheme::All,
        seed: 4,
    };
    let losses = train(&mut model, &data, &cfg, |_| {}).unwrap();
    let after = evaluate(&model, &data).unwrap();
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    assert!(after > 0.95, "accuracy {before} -> {after}");
}

fn pretrained_small() -> (Model, Dataset) {
    let arch = small_arch();
    let mut model = zoo::init_float(&arch, 1).unwrap();
    let data = synthetic(300, 2);
    let cfg = FloatTrainConfig {
        epochs: 15,
        batch: 10,
        lr: 0.1,
        momentum: 0.9,
        scheme: UpdateScheme::All,
        seed: 4,
    };
    train(&mut model, &data, &cfg, |_| {}).unwrap();
    (model, data)
}

#[test]
fn fqt_recovers_from_a_domain_shift_and_is_deterministic() {
    let (float_model, data) = pretrained_small();
    let int8 = quantize(&float_model, &data, 64).unwrap();
    // Shift: swap the roles of two classes' patterns, so the model must re-learn.
    let mut shifted = data.clone();
    shifted.labels.iter_mut().for_each(|l| {
        *l = match *l {
            0 => 1,
            1 => 0,
            c => c,
        }
    });
    let before = evaluate(&int8, &shifted).unwrap();
    let cfg = FqtConfig {
        epochs: 6,
        batch: 4,
        lr: 0.01,
        scheme: UpdateScheme::All,
        seed: 3,
        ..FqtConfig::default()
    };
    let run = || {
        let mut m = int8.clone();
        let mut t = FqtTrainer::new(&m, cfg.clone()).unwrap();
        t.train(&mut m, &shifted, |_, _, _| {});
        m
    };
    let a = run();
    let after = evaluate(&a, &shifted).unwrap();
    assert!(
        before < 0.5 && after > 0.9,
        "int8 accuracy {before} -> {after}"
    );
    assert_eq!(a, run(), "two identical FQT runs differ");
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    assert_eq!(a, single, "FQT result depends on the thread count");
}

#[test]
fn float_training_is_independent_of_thread_count() {
    let run = || pretrained_small().0;
    let a = run();
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    assert_eq!(a, single);
}

#[test]
fn frozen_layers_get_no_gradient_and_no_error_below_them() {
    let (model, data) = pretrained_small();
    let arch = &model.arch;
    let int8 = quantize(&model, &data, 32).unwrap();
    let Params::Int8(state) = &int8.params else {
        unreachable!()
    };
    let net = QuantNet::new(arch).unwrap();
    let trainable = UpdateScheme::LastLayers(1).updates(arch);
    let input = net.quantize_input(state, data.sample(0));
    let (tensors, _) = net.forward(state, input, 1);
    let back = net.backward(
        state,
        &tensors,
        data.labels[0],
        &trainable,
        None,
        ErrorRanges::Exact,
    );
    let fc = arch.layers.len() - 1;
    assert!(back.grads[..fc]
        .iter()
        .all(|g| g.weight.is_empty() && g.bias.is_empty()));
    assert!(!back.grads[fc].weight.is_empty());
    assert!(
        back.errors[..=fc].iter().all(Option::is_none),
        "errors propagated below the trained layer"
    );

    let fnet = FloatNet::new(arch).unwrap();
    let p = float_params(&model);
    let t = fnet.forward(p, data.sample(0), 1);
    let mut g = zeros_like(p);
    let b = fnet.backward(
        p,
        &t,
        &data.labels[..1],
        &UpdateScheme::BiasOnly(1).updates(arch),
        &mut g,
    );
    assert!(g[fc].weight.iter().all(|&w| w == 0.0) && g[fc].bias.iter().any(|&b| b != 0.0));
    assert!(b.errors[..=fc].iter().all(Option::is_none));
}
