//! `mcutrain`: host library behind the `mcutrain` command.
pub mod adapt;
pub mod cli;
pub mod compile;
pub mod data;
pub mod device;
pub mod engine;
pub mod fsutil;
pub mod model;
pub mod quantize;
pub mod report;
pub mod workload;
