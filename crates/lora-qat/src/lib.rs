//! # lora-qat
//!
//! The facade: one dependency that re-exports the workspace's crates — [`quant_core`],
//! [`lora_core`], [`lm`] and [`qat_train`] — and a [`prelude`] of the names most programs use.
//! The `lora-qat` binary built from this crate is the command-line tool.

pub mod demo;

pub use lm;
pub use lora_core;
pub use qat_train;
pub use quant_core;

/// The names most programs need, under one `use`.
pub mod prelude {
    pub use quant_core::linalg::{gemm, matmul};
    pub use quant_core::{QuantError, Result as QuantResult};
}

/// The README's Rust examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
