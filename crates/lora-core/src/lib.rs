//! # lora-core
//!
//! Low-rank adapters as layers that train. A layer here wraps a frozen base weight `W`
//! (`(out, in)`, the PyTorch/PEFT layout) — in `f32`, or NF4 with double quantization as in
//! QLoRA, or fake-quantized through a differentiable quantizer as in LoRA-QAT — and adds the
//! update `ΔW = s·B·A` (LoRA, rsLoRA, DoRA's magnitude-normalised form). Each layer has an
//! explicit `forward` that keeps what its `backward` needs and a `backward` that returns the
//! input gradient and accumulates the adapter's gradients. Adapter sets group layers by module
//! path and read and write the PEFT file layout. This crate knows nothing of models or training.
//! The `f32` base is [`base::DenseBase`]; the NF4 base is [`qlora::Nf4Base`] (QLoRA, with
//! LoftQ initialisation in [`qlora::loftq_init`]); LoRA-QAT, where the quantizer sees
//! `W + s·B·A` and its steps train, is [`qat::LoraQatLinear`]. A base kept in a GGUF file's
//! ggml blocks (every llama.cpp type of `quant_core::ggml`) is [`ggml_base::GgmlBase`].
//!
//! ## Design
//!
//! * [`base::FrozenBase`] is the base product `x·Wᵀ`, its transpose `dy·W`, and `W` as `f32`
//!   when an operation needs it (DoRA's row norms, merging, PiSSA). [`base::DenseBase`] is the
//!   `f32` implementation; [`qlora::Nf4Base`] computes both products from NF4 codes one
//!   dequantized tile at a time, never holding the whole `f32` weight.
//! * [`qat::LoraQatLinear`] has its own forward/backward: it quantizes the merged weight through
//!   a quant-core differentiable quantizer (or, QLoRA-style, a frozen `Q(W)` under an `f32`
//!   adapter).
//! * [`LoraAdapter`] is everything of one adapter except the base: `A`, `B`, DoRA's `m`, their
//!   gradients, the scale, a seeded dropout and the forward/backward of the low-rank path
//!   (`x·Aᵀ` then `·Bᵀ`; `ΔW` is never formed for LoRA).
//! * [`LoraLinear`] holds a base and named adapters, some active; its `forward` runs the base
//!   product once and adds each active adapter's contribution; `backward` returns `dx` and
//!   accumulates adapter gradients (`+=`, cleared by `zero_grad`).
//! * [`AdapterSet`] holds layers by module path (`model.layers.0.self_attn.q_proj`) and the
//!   config of each named adapter; it creates, activates, merges and combines adapters
//!   ([`combine`]) and reads and writes PEFT's files ([`peft`]).
//!
//! Layout: `f32` row-major; `A: (r, in)`, `B: (out, r)`, DoRA's `m: (out)`; `s = α/r`
//! (`α/√r` for rsLoRA). Every random choice comes from a caller-given seed (ChaCha8).
//!
//! ```
//! use lora_core::{AdapterSet, LoraConfig};
//! use ndarray::Array2;
//!
//! let mut set = AdapterSet::new();
//! set.add_module("model.layers.0.self_attn.q_proj", Array2::eye(8), None).unwrap();
//! set.add_module("model.layers.0.mlp.up_proj", Array2::ones((16, 8)), None).unwrap();
//! set.add_adapter("default", LoraConfig::new(2, 4.0, &["q_proj"]), 0).unwrap();
//! let summary = set.summary();
//! assert_eq!(summary.trainable_parameters, 2 * 8 + 8 * 2);
//! assert_eq!(summary.frozen_parameters, 64 + 128);
//! ```

pub mod adapter;
pub mod base;
pub mod combine;
pub mod config;
pub mod error;
pub mod ggml_base;
pub mod linear;
pub mod peft;
pub mod qat;
pub mod qlora;
pub mod qlora_layer;
pub mod set;
pub mod svd;
mod tiled;

pub use adapter::{AdapterOptions, DropoutState, LoraAdapter};
pub use base::{DenseBase, FrozenBase};
pub use combine::{Combination, CombinationType};
pub use config::{InitLoraWeights, LoraConfig, TargetModules};
pub use error::{LoraError, Result};
pub use ggml_base::GgmlBase;
pub use linear::LoraLinear;
pub use qat::{LoraQatLinear, QatMode};
pub use qlora::{Nf4Base, Nf4Options};
pub use qlora_layer::QLoraLinear;
pub use set::{AdapterSet, SetSummary};
