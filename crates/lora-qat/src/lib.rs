//! # lora-qat
//!
//! The facade: one dependency that re-exports the workspace's crates — [`quant_core`],
//! [`lora_core`], [`lm`] and [`qat_train`] — and a [`prelude`] of the names most programs use.
//! The `lora-qat` binary built from this crate is the command-line tool.

pub mod demo;
pub mod text;

pub use lm;
pub use lora_core;
pub use qat_train;
pub use quant_core;

/// The names most programs need, under one `use`: a model, its adapters and quantizer
/// configuration, and the trainer.
///
/// ```
/// use lora_qat::prelude::*;
///
/// let mut model = LlamaModel::random(LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap(), 0).unwrap();
/// let lora = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
/// let n = model
///     .inject_qat_adapters(&lora, &QatConfig::piq3(), QatMode::QuantizeMerged, "default", 1)
///     .unwrap();
/// assert_eq!(n, 4); // q_proj and v_proj of both layers
/// ```
pub mod prelude {
    pub use lm::{LlamaConfig, LlamaModel};
    pub use lora_core::{AdapterOptions, LoraConfig, LoraLinear, LoraQatLinear, QatMode};
    pub use qat_train::config::TrainConfig;
    pub use qat_train::data::{Dataset, Example};
    pub use qat_train::metrics::MetricsLog;
    pub use qat_train::trainer::Trainer;
    pub use quant_core::config::QatConfig;
    pub use quant_core::linalg::{gemm, matmul};
    pub use quant_core::{QuantError, Result as QuantResult};
}

/// The README's Rust examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
