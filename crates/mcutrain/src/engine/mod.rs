//! The host twin: reference execution of forward, backward and update over plain vectors.
//!
//! Both engines call only `mcutrain-core` kernels, through the layer contract
//! ([`mcutrain_core::layer::Operator`]: no engine code per operator), in a fixed order, so a
//! device executor that calls the same kernels in the same order reproduces them bit for bit. Every sample is
//! processed by the same sequence of kernel calls whatever the number of host threads:
//! parallel work is split into fixed chunks and reduced in chunk order.

pub mod float;
pub mod fqt;

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
