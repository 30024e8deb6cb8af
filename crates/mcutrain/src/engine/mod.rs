//! The host twin: reference execution of forward, backward and update over plain vectors.
//!
//! Both engines call only `mcutrain-core` kernels, in a fixed order, so a device executor that
//! calls the same kernels in the same order reproduces them bit for bit. Every sample is
//! processed by the same sequence of kernel calls whatever the number of host threads:
//! parallel work is split into fixed chunks and reduced in chunk order.

pub mod float;
pub mod fqt;

use crate::model::{Architecture, LayerKind};

/// Which parameters a training run updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateScheme {
    /// Every weight and bias.
    All,
    /// Weights and biases of the last `k` layers that have parameters.
    LastLayers(usize),
    /// Only the biases of the last `k` layers that have parameters.
    BiasOnly(usize),
}

/// What one layer trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trainable {
    /// The weights are updated.
    pub weight: bool,
    /// The bias is updated.
    pub bias: bool,
}

impl Trainable {
    /// True when anything of the layer is updated.
    pub fn any(self) -> bool {
        self.weight || self.bias
    }
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
    /// What each layer of `arch` trains under this scheme.
    pub fn trainable(self, arch: &Architecture) -> Vec<Trainable> {
        let with_params: Vec<usize> = arch
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.kind.has_params())
            .map(|(i, _)| i)
            .collect();
        let mut out = vec![Trainable::default(); arch.layers.len()];
        let (k, weight) = match self {
            UpdateScheme::All => (with_params.len(), true),
            UpdateScheme::LastLayers(k) => (k, true),
            UpdateScheme::BiasOnly(k) => (k, false),
        };
        for &i in with_params.iter().rev().take(k) {
            out[i] = Trainable { weight, bias: true };
        }
        out
    }
}

/// Index of the first layer that trains anything; errors are propagated down to its output
/// and no further (`None` when nothing trains).
pub fn first_trained_layer(trainable: &[Trainable]) -> Option<usize> {
    trainable.iter().position(|t| t.any())
}

/// The layers that read tensor `t` (tensor `i` is the input of layer `i`, and Add layers also
/// read the output of `skip_from`).
pub fn consumers(arch: &Architecture, tensor: usize) -> Vec<usize> {
    arch.layers
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            *i == tensor
                || matches!(l.kind, LayerKind::Add { skip_from } if skip_from + 1 == tensor)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Cosine learning-rate decay, shared with the device (`mcutrain_core::update::cosine_lr`).
pub use mcutrain_core::update::cosine_lr;

/// Fraction of `labels` equal to the argmax `predictions`.
pub fn accuracy(predictions: &[usize], labels: &[u16]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == **l as usize)
        .count();
    hits as f64 / labels.len() as f64
}
