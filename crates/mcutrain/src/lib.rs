//! `mcutrain`: host library behind the `mcutrain` command.
pub mod data;
