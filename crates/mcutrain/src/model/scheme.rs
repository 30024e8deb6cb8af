//! Update schemes: which parameters of each layer train ([`LayerUpdate`], the one description
//! the engines, the compiler and the device use).
//!
//! Sources: an [`UpdateScheme`] (`all`, `last:K`, `bias:K`), or a scheme file in the sparse
//! update style of Lin et al. ("On-Device Training Under 256KB Memory", NeurIPS 2022): JSON, either a list of entries or
//! an object `{"description": "...", "layers": [entries]}`, each entry
//! `{"layer": "block17.expand", "weight": "1/4", "bias": true}`. `weight` is the ratio of
//! output channels whose weights train, one of `0`, `1/8`, `1/4`, `1/2`, `1` (a number or a
//! string; default 0), and `bias` defaults to false. The first `ceil(ratio * out_channels)`
//! channels train. Layers the file does not name are frozen.

use super::Architecture;
use serde::Deserialize;
use std::path::Path;

/// Which parameters a training run updates, by layer position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateScheme {
    /// Every weight and bias.
    All,
    /// Weights and biases of the last `k` layers that have parameters.
    LastLayers(usize),
    /// Only the biases of the last `k` layers that have parameters.
    BiasOnly(usize),
}

impl std::str::FromStr for UpdateScheme {
    type Err = String;
    /// `all`, `last:K` or `bias:K`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "update scheme '{s}' is not one of: all, last:K, bias:K (K a positive layer count)"
            )
        };
        if s == "all" {
            return Ok(UpdateScheme::All);
        }
        let (kind, k) = s.split_once(':').ok_or_else(bad)?;
        let k: usize = k.parse().map_err(|_| bad())?;
        if k == 0 {
            return Err(bad());
        }
        match kind {
            "last" => Ok(UpdateScheme::LastLayers(k)),
            "bias" => Ok(UpdateScheme::BiasOnly(k)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for UpdateScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateScheme::All => write!(f, "all"),
            UpdateScheme::LastLayers(k) => write!(f, "last:{k}"),
            UpdateScheme::BiasOnly(k) => write!(f, "bias:{k}"),
        }
    }
}

impl UpdateScheme {
    /// What each layer of `arch` trains under this scheme (every output channel of a trained
    /// weight).
    pub fn updates(self, arch: &Architecture) -> Vec<LayerUpdate> {
        let channels = output_channels(arch);
        let with_params: Vec<usize> = (0..arch.layers.len())
            .filter(|&i| channels[i] > 0)
            .collect();
        let (k, weight) = match self {
            UpdateScheme::All => (with_params.len(), true),
            UpdateScheme::LastLayers(k) => (k, true),
            UpdateScheme::BiasOnly(k) => (k, false),
        };
        let mut out = vec![LayerUpdate::default(); arch.layers.len()];
        for &i in with_params.iter().rev().take(k) {
            out[i] = LayerUpdate {
                weight_channels: if weight { channels[i] } else { 0 },
                bias: true,
            };
        }
        out
    }
}

/// What one layer trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerUpdate {
    /// Output channels (structures) whose weights train: the first `weight_channels`
    /// (0: frozen weights).
    pub weight_channels: usize,
    /// The bias trains.
    pub bias: bool,
}

impl LayerUpdate {
    /// True when anything of the layer trains.
    pub fn any(self) -> bool {
        self.weight_channels > 0 || self.bias
    }

    /// True when some weights train.
    pub fn trains_weight(self) -> bool {
        self.weight_channels > 0
    }
}

/// Index of the first layer that trains anything; errors are propagated down to its output
/// and no further (`None` when nothing trains).
pub fn first_trained_layer(updates: &[LayerUpdate]) -> Option<usize> {
    updates.iter().position(|u| u.any())
}

/// Why a scheme does not fit a model.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SchemeError {
    /// The scheme file could not be read or parsed.
    #[error("scheme file {path}: {problem}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A named layer is not in the model.
    #[error("the scheme names layer '{0}', which the model does not have")]
    UnknownLayer(String),
    /// A named layer has no parameters.
    #[error("the scheme trains layer '{0}', which has no parameters (only conv and linear layers train)")]
    NoParams(String),
    /// A ratio outside the allowed set.
    #[error("layer '{layer}': weight ratio {ratio} is not one of 0, 1/8, 1/4, 1/2, 1")]
    BadRatio {
        /// The layer.
        layer: String,
        /// The ratio as written.
        ratio: String,
    },
    /// A layer named twice.
    #[error("the scheme names layer '{0}' twice")]
    Repeated(String),
}

/// A weight ratio as written in a scheme file.
#[derive(Deserialize)]
#[serde(untagged)]
enum RatioText {
    Number(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    layer: String,
    #[serde(default)]
    weight: Option<RatioText>,
    #[serde(default)]
    bias: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SchemeFile {
    List(Vec<Entry>),
    /// `{"description": ..., "layers": [...]}`; the description is for the reader only.
    Described {
        layers: Vec<Entry>,
    },
}

/// Per-layer updates from the JSON scheme `text` (see the module documentation).
pub fn from_json(
    arch: &Architecture,
    text: &str,
    origin: &str,
) -> Result<Vec<LayerUpdate>, SchemeError> {
    let file: SchemeFile = serde_json::from_str(text).map_err(|e| SchemeError::File {
        path: origin.to_string(),
        problem: format!(
            "{e}; expected a list of {{\"layer\": NAME, \"weight\": RATIO, \"bias\": BOOL}}"
        ),
    })?;
    let entries = match file {
        SchemeFile::List(entries)
        | SchemeFile::Described {
            layers: entries, ..
        } => entries,
    };
    let out_channels = output_channels(arch);
    let mut updates = vec![LayerUpdate::default(); arch.layers.len()];
    let mut named = vec![false; arch.layers.len()];
    for entry in entries {
        let index = arch
            .layers
            .iter()
            .position(|l| l.name == entry.layer)
            .ok_or_else(|| SchemeError::UnknownLayer(entry.layer.clone()))?;
        if std::mem::replace(&mut named[index], true) {
            return Err(SchemeError::Repeated(entry.layer));
        }
        if !arch.layers[index].kind.has_params() {
            return Err(SchemeError::NoParams(entry.layer));
        }
        let eighths = match &entry.weight {
            None => 0,
            Some(ratio) => ratio_eighths(ratio).ok_or_else(|| SchemeError::BadRatio {
                layer: entry.layer.clone(),
                ratio: match ratio {
                    RatioText::Number(x) => x.to_string(),
                    RatioText::Text(s) => s.clone(),
                },
            })?,
        };
        updates[index] = LayerUpdate {
            weight_channels: (out_channels[index] * eighths).div_ceil(8),
            bias: entry.bias,
        };
    }
    Ok(updates)
}

/// Per-layer updates from a scheme file.
pub fn from_file(arch: &Architecture, path: &Path) -> Result<Vec<LayerUpdate>, SchemeError> {
    let text = std::fs::read_to_string(path).map_err(|e| SchemeError::File {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    from_json(arch, &text, &path.display().to_string())
}

/// A ratio in eighths: 0, 1, 2, 4 or 8 (for 0, 1/8, 1/4, 1/2, 1).
fn ratio_eighths(ratio: &RatioText) -> Option<usize> {
    let value = match ratio {
        RatioText::Number(x) => *x,
        RatioText::Text(s) => match s.trim().split_once('/') {
            Some((num, den)) => num.trim().parse::<f64>().ok()? / den.trim().parse::<f64>().ok()?,
            None => s.trim().parse().ok()?,
        },
    };
    [0usize, 1, 2, 4, 8]
        .into_iter()
        .find(|&e| (value * 8.0 - e as f64).abs() < 1e-9)
}

/// Output channels (structures) of every layer, 0 for layers without parameters (and for
/// every layer of an invalid architecture, which the compiler and the engines refuse).
fn output_channels(arch: &Architecture) -> Vec<usize> {
    match arch.resolved(1) {
        Ok(layers) => layers
            .iter()
            .map(|l| l.params().map_or(0, |p| p.channels))
            .collect(),
        Err(_) => vec![0; arch.layers.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::zoo;

    #[test]
    fn ratios_and_defaults() {
        let arch = zoo::fashion_shift_backbone();
        let text = r#"[{"layer": "head.pointwise", "weight": "1/4", "bias": true},
                       {"layer": "classifier", "weight": 1},
                       {"layer": "block5.expand", "bias": true}]"#;
        let u = from_json(&arch, text, "test").unwrap();
        let idx = |name: &str| arch.layers.iter().position(|l| l.name == name).unwrap();
        assert_eq!(
            u[idx("head.pointwise")],
            LayerUpdate {
                weight_channels: 48,
                bias: true
            }
        );
        assert_eq!(
            u[idx("classifier")],
            LayerUpdate {
                weight_channels: 10,
                bias: false
            }
        );
        assert_eq!(
            u[idx("block5.expand")],
            LayerUpdate {
                weight_channels: 0,
                bias: true
            }
        );
        assert_eq!(u.iter().filter(|l| l.any()).count(), 3);
    }

    #[test]
    fn described_form_and_errors() {
        let arch = zoo::fashion_shift_backbone();
        let ok = r#"{"description": "x", "layers": [{"layer": "classifier", "weight": "1/2"}]}"#;
        assert_eq!(
            from_json(&arch, ok, "t")
                .unwrap()
                .last()
                .unwrap()
                .weight_channels,
            5
        );
        let bad = |text: &str| from_json(&arch, text, "t").unwrap_err();
        assert!(matches!(
            bad(r#"[{"layer": "nope"}]"#),
            SchemeError::UnknownLayer(_)
        ));
        assert!(matches!(
            bad(r#"[{"layer": "head.pool", "bias": true}]"#),
            SchemeError::NoParams(_)
        ));
        assert!(matches!(
            bad(r#"[{"layer": "classifier", "weight": 0.3}]"#),
            SchemeError::BadRatio { .. }
        ));
        assert!(matches!(
            bad(r#"[{"layer": "classifier"}, {"layer": "classifier"}]"#),
            SchemeError::Repeated(_)
        ));
        assert!(matches!(bad("{"), SchemeError::File { .. }));
    }

    #[test]
    fn update_schemes_resolve_per_layer() {
        let arch = zoo::fashion_shift_backbone();
        let u = UpdateScheme::BiasOnly(2).updates(&arch);
        assert_eq!(u.iter().filter(|l| l.bias).count(), 2);
        assert!(u.iter().all(|l| l.weight_channels == 0));
        let all = UpdateScheme::All.updates(&arch);
        let with_params = arch.layers.iter().filter(|l| l.kind.has_params()).count();
        assert_eq!(
            all.iter()
                .filter(|l| l.weight_channels > 0 && l.bias)
                .count(),
            with_params
        );
    }
}
