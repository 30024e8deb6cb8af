//! Update schemes resolved per layer: which output channels' weights and whether the bias of
//! each layer are trained.
//!
//! Sources: an [`UpdateScheme`] (`all`, `last:K`, `bias:K`), or a scheme file in the sparse
//! update style of Lin et al. (shared/methods.md section 2): JSON, either a list of entries or
//! an object `{"description": "...", "layers": [entries]}`, each entry
//! `{"layer": "block17.expand", "weight": "1/4", "bias": true}`. `weight` is the ratio of
//! output channels whose weights train, one of `0`, `1/8`, `1/4`, `1/2`, `1` (a number or a
//! string; default 0), and `bias` defaults to false. The first `ceil(ratio * out_channels)`
//! channels train. Layers the file does not name are frozen.

use crate::engine::UpdateScheme;
use crate::model::{Architecture, Geometry};
use serde::Deserialize;
use std::path::Path;

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

/// Per-layer updates of `scheme` on `arch` (all output channels of a trained weight).
pub fn from_update_scheme(arch: &Architecture, scheme: UpdateScheme) -> Vec<LayerUpdate> {
    let out_channels = output_channels(arch);
    scheme
        .trainable(arch)
        .iter()
        .zip(out_channels)
        .map(|(t, channels)| LayerUpdate {
            weight_channels: if t.weight { channels } else { 0 },
            bias: t.bias,
        })
        .collect()
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

/// Output channels (structures) of every layer, 0 for layers without parameters.
fn output_channels(arch: &Architecture) -> Vec<usize> {
    let shapes = arch.shapes().unwrap_or_default();
    (0..arch.layers.len())
        .map(|i| match shapes.get(i).map(|&s| arch.geometry(i, s, 1)) {
            Some(Ok(Geometry::Conv(g))) => g.out_channels,
            Some(Ok(Geometry::Linear(g))) => g.out_features,
            _ => 0,
        })
        .collect()
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
    fn update_scheme_matches_trainable() {
        let arch = zoo::fashion_shift_backbone();
        let u = from_update_scheme(&arch, UpdateScheme::BiasOnly(2));
        assert_eq!(u.iter().filter(|l| l.bias).count(), 2);
        assert!(u.iter().all(|l| l.weight_channels == 0));
        let all = from_update_scheme(&arch, UpdateScheme::All);
        let with_params = arch.layers.iter().filter(|l| l.kind.has_params()).count();
        assert_eq!(
            all.iter()
                .filter(|l| l.weight_channels > 0 && l.bias)
                .count(),
            with_params
        );
    }
}
