//! Checks on the committed fashion-shift models (Fashion-MNIST comes from Debian's
//! `dataset-fashion-mnist`, installed by scripts/setup.sh).

use mcutrain::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
use mcutrain::engine::float::{zeros_like, FloatNet};
use mcutrain::engine::fqt::QuantNet;
use mcutrain::engine::UpdateScheme;
use mcutrain::model::{format, Params};
use mcutrain::quantize::dequantize;
use std::path::{Path, PathBuf};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Error tensors and weight gradients of the int8 backward pass against the float backward
/// pass of the same (dequantized) weights and activations, over 64 test images.
#[test]
fn quantized_errors_and_gradients_follow_the_float_ones() {
    let int8 =
        format::load(&repo_file("models/fashion-shift/int8.mcut")).expect("committed int8 model");
    let float = dequantize(&int8).unwrap();
    let test = fashion_mnist(Path::new(FASHION_MNIST_DIR), Split::Test)
        .expect("Fashion-MNIST installed by scripts/setup.sh");
    let arch = &int8.arch;
    let (Params::Int8(state), Params::Float(fparams)) = (&int8.params, &float.params) else {
        unreachable!()
    };
    let qnet = QuantNet::new(arch).unwrap();
    let fnet = FloatNet::new(arch).unwrap();
    let trainable = UpdateScheme::All.trainable(arch);
    let n = arch.layers.len();
    let mut q_err: Vec<Vec<f64>> = vec![Vec::new(); n + 1];
    let mut f_err: Vec<Vec<f64>> = vec![Vec::new(); n + 1];
    let mut q_grad: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut f_grad: Vec<Vec<f64>> = vec![Vec::new(); n];
    for i in 0..64 {
        let x = test.sample(i);
        let label = test.labels[i];
        let (tensors, _) = qnet.forward(state, qnet.quantize_input(state, x), 1);
        let qb = qnet.backward(state, &tensors, label, &trainable, None);
        let ft: Vec<Vec<f32>> = if std::env::var("FLOAT_FORWARD").is_ok() {
            fnet.forward(fparams, x, 1)
        } else {
            tensors
                .iter()
                .enumerate()
                .map(|(t, codes)| {
                    let q = qnet.activation_q(state, t);
                    codes.iter().map(|&c| q.dequantize(c)).collect()
                })
                .collect()
        };
        let mut fg = zeros_like(fparams);
        let fb = fnet.backward(fparams, &ft, &[label], &trainable, &mut fg);
        for t in 1..=n {
            if let (Some(q), Some(f)) = (&qb.errors[t], &fb.errors[t]) {
                q_err[t].extend(q.codes.iter().map(|&c| q.q.dequantize(c) as f64));
                f_err[t].extend(f.iter().map(|&v| v as f64));
            }
        }
        for l in 0..n {
            q_grad[l].extend(qb.grads[l].weight.iter().map(|&g| g as f64));
            f_grad[l].extend(fg[l].weight.iter().map(|&g| g as f64));
        }
    }
    let mut cosines: Vec<(String, f64)> = Vec::new();
    for t in 1..=n {
        if !q_err[t].is_empty() && f_err[t].iter().any(|&v| v != 0.0) {
            let name = format!("error of tensor {t} ({})", arch.layers[t - 1].name);
            cosines.push((name, cosine(&q_err[t], &f_err[t])));
        }
    }
    for l in 0..n {
        if !q_grad[l].is_empty() {
            let name = format!("weight gradient of layer {l} ({})", arch.layers[l].name);
            cosines.push((name, cosine(&q_grad[l], &f_grad[l])));
        }
    }
    for (name, c) in &cosines {
        println!("{name}: cosine {c:.5}");
    }
    // Measured (64 images, committed model): 39 of 42 above 0.99; the exceptions are the
    // layers furthest from the loss: block1.expand error 0.990, stem and block1.expand weight
    // gradients 0.984 and 0.980 (rounding noise of ~20 requantized error tensors compounds).
    let (worst_name, worst) = cosines
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("some tensors compared");
    assert!(*worst > 0.97, "{worst_name}: cosine {worst}");
    let above = cosines.iter().filter(|(_, c)| *c > 0.99).count();
    assert!(
        above * 10 >= cosines.len() * 8,
        "only {above} of {} tensors have cosine > 0.99",
        cosines.len()
    );
}
