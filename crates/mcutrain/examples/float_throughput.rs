//! Pretraining throughput of the host float engine: one epoch of `engine::float::train` on
//! `PER_CLASS` Fashion-MNIST training samples per class (default 500, the first argument),
//! with `mcutrain pretrain`'s defaults (fashion-shift, batch 64, lr 0.05, momentum 0.9, seed
//! 0), and no evaluation. Prints samples per second; the thread count is rayon's
//! (`RAYON_NUM_THREADS`).
//!
//! `cargo run --release --example float_throughput -- 500`

use mcutrain::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
use mcutrain::engine::float::{train, FloatTrainConfig};
use mcutrain::model::zoo;
use mcutrain::model::UpdateScheme;
use std::path::Path;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let per_class: usize = match std::env::args().nth(1) {
        Some(text) => text.parse()?,
        None => 500,
    };
    let data =
        fashion_mnist(Path::new(FASHION_MNIST_DIR), Split::Train)?.per_class(per_class, 0)?;
    let arch = zoo::by_name("fashion-shift", [1, 28, 28], 10).map_err(anyhow::Error::msg)?;
    let mut model = zoo::init_float(&arch, 0)?;
    let cfg = FloatTrainConfig {
        epochs: 1,
        batch: 64,
        lr: 0.05,
        momentum: 0.9,
        scheme: UpdateScheme::All,
        seed: 0,
    };
    let start = Instant::now();
    let losses = train(&mut model, &data, &cfg, |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "float pretraining: {} samples in {seconds:.2} s = {:.0} samples/s ({} threads), epoch loss {:.4}",
        data.len(),
        data.len() as f64 / seconds,
        rayon::current_num_threads(),
        losses[0]
    );
    Ok(())
}
