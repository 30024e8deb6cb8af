//! `mcutrain-core`: the training kernels shared by the host and the microcontroller.
//!
//! `#![no_std]` and allocation-free: every function works on caller-supplied slices, so the
//! same code runs in the host twin and in the Cortex-M firmware and gives bit-identical
//! results there. Floating-point work uses only IEEE-754 basic operations and the `libm`
//! crate (never the platform's math library), which keeps it deterministic across targets.
//!
//! Layout conventions used by every operator:
//! - activations and error tensors are batch-major NCHW (`[n][c][h][w]`, 1-D signals use `h = 1`);
//! - convolution weights are `[out_c][in_c / groups][k_h][k_w]`, fully connected `[out][in]`;
//! - a quantized tensor stores `q: i8` with [`quant::QParams`] so that `real = s * (q - z)`;
//!   accumulators and biases are `i32`.
#![no_std]
#![deny(missing_docs)]

pub mod checksum;
pub mod codec;
pub mod layer;
pub mod ops;
pub mod plan;
pub mod quant;
pub mod rng;
pub mod selftest;
pub mod session;
pub mod update;
