//! The cost of exact error ranges in fully quantized training: the committed fashion-shift
//! int8 model fine-tuned on `PER_CLASS` corrupted Fashion-MNIST training samples per class
//! (default 100, the first argument; corruption `gaussian_noise:5`, the second) for `EPOCHS`
//! epochs (default 2, the third) with the workload's FQT settings (batch 16, lr 0.004,
//! gradient statistics rate 0.2, all layers), once with tracked and once with exact error
//! ranges. Prints, per mode, the wall time and the fraction of error tensors recomputed with
//! their exact range in each epoch; the thread count is rayon's (`RAYON_NUM_THREADS`, 1 for
//! stable timings).
//!
//! `RAYON_NUM_THREADS=1 cargo run --release --example fqt_error_ranges -- 100 gaussian_noise:5 2`

use mcutrain::adapt::fqt_finetune;
use mcutrain::data::{corrupt_dataset, fashion_mnist, CorruptionSpec, Split, FASHION_MNIST_DIR};
use mcutrain::engine::fqt::{ErrorRanges, FqtConfig};
use mcutrain::model::format;
use mcutrain::model::UpdateScheme;
use std::path::Path;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let per_class: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let spec: CorruptionSpec = args
        .next()
        .unwrap_or_else(|| "gaussian_noise:5".into())
        .parse()?;
    let epochs: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = format::load(&root.join("models/fashion-shift/int8.mcut"))?;
    let train = fashion_mnist(Path::new(FASHION_MNIST_DIR), Split::Train)?;
    let data = corrupt_dataset(&train.per_class(per_class, 7)?, spec, 7);
    let mut seconds = Vec::new();
    for mode in [ErrorRanges::Tracked, ErrorRanges::Exact] {
        let cfg = FqtConfig {
            epochs,
            batch: 16,
            lr: 0.004,
            scheme: UpdateScheme::All,
            seed: 7,
            stats_rate: 0.2,
            error_ranges: mode,
            ..FqtConfig::default()
        };
        let start = Instant::now();
        let (_, stats) = fqt_finetune(&model, &data, &cfg, |_, _, _| {})?;
        let elapsed = start.elapsed().as_secs_f64();
        let fractions: Vec<String> = stats
            .iter()
            .map(|s| format!("{:.1}%", 100.0 * s.recomputed_fraction))
            .collect();
        println!(
            "{mode} error ranges: {} samples x {epochs} epochs in {elapsed:.2} s ({:.2} ms per \
             sample, {} threads); error tensors recomputed per epoch: {}; final epoch loss {:.4}",
            data.len(),
            1e3 * elapsed / (data.len() * epochs) as f64,
            rayon::current_num_threads(),
            fractions.join(" "),
            stats.last().map_or(f64::NAN, |s| s.loss),
        );
        seconds.push(elapsed);
    }
    println!(
        "exact / tracked training time: {:.3}",
        seconds[1] / seconds[0]
    );
    Ok(())
}
