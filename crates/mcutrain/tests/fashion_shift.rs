//! Checks on the committed fashion-shift models (Fashion-MNIST comes from Debian's
//! `dataset-fashion-mnist`, installed by scripts/setup.sh).

use mcutrain::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
use mcutrain::engine::float::{zeros_like, FloatNet};
use mcutrain::engine::fqt::{ErrorRanges, QuantNet};
use mcutrain::model::UpdateScheme;
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

/// What the int8 backward pass of one error-range mode gave over the test images.
struct Comparison {
    /// `(tensor name, cosine with the float one)` of every error tensor and weight gradient.
    cosines: Vec<(String, f64)>,
    /// Error tensors computed by a kernel, over all images.
    written: usize,
    /// How many of them were recomputed with their exact range.
    recomputed: usize,
}

/// Error tensors and weight gradients of the int8 backward pass (errors quantized under
/// `mode`) against the float backward pass of the same (dequantized) weights and
/// activations, over the first `images` test images.
fn compare_with_float(mode: ErrorRanges, images: usize) -> Comparison {
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
    let trainable = UpdateScheme::All.updates(arch);
    let n = arch.layers.len();
    let mut q_err: Vec<Vec<f64>> = vec![Vec::new(); n + 1];
    let mut f_err: Vec<Vec<f64>> = vec![Vec::new(); n + 1];
    let mut q_grad: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut f_grad: Vec<Vec<f64>> = vec![Vec::new(); n];
    let (mut written, mut recomputed) = (0, 0);
    for i in 0..images {
        let x = test.sample(i);
        let label = test.labels[i];
        let (tensors, _) = qnet.forward(state, qnet.quantize_input(state, x), 1);
        let qb = qnet.backward(state, &tensors, label, &trainable, None, mode);
        written += qb.errors_written;
        recomputed += qb.errors_recomputed;
        let ft: Vec<Vec<f32>> = tensors
            .iter()
            .enumerate()
            .map(|(t, codes)| {
                let q = qnet.activation_q(state, t);
                codes.iter().map(|&c| q.dequantize(c)).collect()
            })
            .collect();
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
    Comparison {
        cosines,
        written,
        recomputed,
    }
}

/// The criterion: with exact error ranges every quantized error tensor and weight
/// gradient has cosine similarity > 0.99 with the float one (64 test images); the tracked
/// ranges alone are printed beside them for comparison.
#[test]
fn quantized_errors_and_gradients_follow_the_float_ones() {
    let images = 64;
    let exact = compare_with_float(ErrorRanges::Exact, images);
    let tracked = compare_with_float(ErrorRanges::Tracked, images);
    println!("cosine with the float backward pass: exact error ranges | tracked ranges");
    for ((name, e), (_, t)) in exact.cosines.iter().zip(&tracked.cosines) {
        println!("{name}: {e:.5} | {t:.5}");
    }
    let worst = |c: &Comparison| {
        c.cosines
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .cloned()
            .expect("some tensors compared")
    };
    let above = |c: &Comparison| c.cosines.iter().filter(|(_, v)| *v > 0.99).count();
    for (mode, c) in [("exact", &exact), ("tracked", &tracked)] {
        let (name, value) = worst(c);
        println!(
            "{mode}: {} of {} above 0.99, worst {name} {value:.5}; {} of {} error tensors \
             recomputed with their exact range ({:.1}%, {:.2} per image)",
            above(c),
            c.cosines.len(),
            c.recomputed,
            c.written,
            100.0 * c.recomputed as f64 / c.written.max(1) as f64,
            c.recomputed as f64 / images as f64,
        );
    }
    assert_eq!(tracked.recomputed, 0, "tracked ranges never recompute");
    let (name, value) = worst(&exact);
    assert!(
        value > 0.99,
        "exact error ranges: {name} has cosine {value}"
    );
}
