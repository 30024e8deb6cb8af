//! Named reference workloads, defined by the JSON files under `workloads/` (the compiled-in
//! copy is the default; `--workload FILE` reads another).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fashion-shift workload file.
pub const FASHION_SHIFT_JSON: &str = include_str!("../../../workloads/fashion-shift.json");

/// Float training hyper-parameters of a workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FloatSettings {
    /// Passes over the data.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Peak learning rate (cosine decay).
    pub lr: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// Seed of the sample order (pretraining only).
    #[serde(default)]
    pub seed: u64,
    /// Update scheme (`all`, `last:K`, `bias:K`).
    #[serde(default = "all")]
    pub scheme: String,
}

/// Fully quantized training hyper-parameters of a workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FqtSettings {
    /// Passes over the data.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Learning rate.
    pub lr: f32,
    /// Weight of a new observation in the gradient statistics' moving average.
    pub grad_stats_rate: f32,
    /// Update scheme.
    #[serde(default = "all")]
    pub scheme: String,
}

fn all() -> String {
    "all".into()
}

/// Post-training quantization settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSettings {
    /// Calibration samples from the training set.
    pub calibration_samples: usize,
}

/// Domain-shift adaptation settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptSettings {
    /// Corrupted training samples per class.
    pub per_class: usize,
    /// Seed of the sample choice and of the corruption noise.
    pub seed: u64,
    /// Corruption severity (1 to 5).
    pub severity: u8,
    /// Corruptions evaluated.
    pub corruptions: Vec<String>,
    /// Float fine-tuning with the optimizer of FQT (plain SGD): the like-for-like baseline.
    pub float: FloatSettings,
    /// Float fine-tuning with momentum: the best float reference, reported beside it.
    pub float_momentum: Option<FloatSettings>,
    /// Fully quantized fine-tuning.
    pub fqt: FqtSettings,
    /// Fully quantized fine-tuning on the device (`mcutrain demo --on qemu-m4`): the update
    /// scheme and batch whose training plan fits the SRAM budget.
    #[serde(default)]
    pub fqt_device: Option<FqtSettings>,
}

impl FqtSettings {
    /// The FQT configuration of these settings, with sample order seed `seed`.
    pub fn config(&self, seed: u64) -> anyhow::Result<crate::engine::fqt::FqtConfig> {
        Ok(crate::engine::fqt::FqtConfig {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            scheme: self.scheme.parse().map_err(anyhow::Error::msg)?,
            seed,
            stats_rate: self.grad_stats_rate,
            ..Default::default()
        })
    }
}

/// Where the pretrained models of a workload live, relative to the repository root.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// The float32 model.
    pub float: String,
    /// The int8 model.
    pub int8: String,
}

/// A domain-shift workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShiftWorkload {
    /// Workload name.
    pub name: String,
    /// What it is.
    pub description: String,
    /// Architecture name (see `mcutrain model --list`).
    pub architecture: String,
    /// Float pretraining.
    pub pretrain: FloatSettings,
    /// Quantization.
    pub quantize: QuantizeSettings,
    /// Adaptation.
    pub adapt: AdaptSettings,
    /// Model files.
    pub models: ModelPaths,
}

impl ShiftWorkload {
    /// The built-in fashion-shift definition.
    pub fn fashion_shift() -> Self {
        serde_json::from_str(FASHION_SHIFT_JSON)
            .expect("workloads/fashion-shift.json is valid (tested)")
    }

    /// Read a workload file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read workload file {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid workload file: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_workload_parses() {
        let w = super::ShiftWorkload::fashion_shift();
        assert_eq!(w.name, "fashion-shift");
        assert!(w.adapt.corruptions.len() >= 3);
        let device = w.adapt.fqt_device.expect("on-device settings");
        assert_eq!(device.config(1).unwrap().scheme.to_string(), device.scheme);
    }
}
