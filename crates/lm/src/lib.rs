//! # lm
//!
//! One decoder for the Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3
//! families (embedding, RMSNorm, rotary attention with grouped-query heads, gated MLP, LM
//! head; each family a description in [`family`]) with explicit forward and backward passes, loaded from Hugging Face
//! `config.json` + safetensors checkpoints (`f32`/`f16`/`bf16`, single file or sharded) and
//! saved back in the same layout. Every projection is a [`LinearModule`] addressed by its
//! Hugging Face module path (`model.layers.{i}.self_attn.q_proj`, ...): the point where the
//! adapters of `lora-core` and quantized base weights are plugged in. Adapters (LoRA, rsLoRA,
//! DoRA) are injected by PEFT's `target_modules` rules or loaded from a PEFT adapter
//! directory, saved back, merged and unmerged; their gradients and parameters carry PEFT's
//! names, and [`LlamaModel::memory_report`] accounts the resident bytes by kind. bitsandbytes
//! 4-bit checkpoints load with NF4 projections (QLoRA once adapted); LoRA-QAT layers train an
//! adapter through a weight quantizer whose steps are parameters too ([`qat`]); projections
//! can be quantized after training by round-to-nearest ([`quantize`]). It computes
//! logits, the shifted cross-entropy and gradients (of every parameter, of the adapters, or
//! only of the inputs with a frozen base), and decodes with a key/value cache; it knows
//! nothing of training loops or optimizers.
//!
//! ```
//! use lm::{cross_entropy, LlamaModel};
//! use ndarray::array;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama/base");
//! let mut model = LlamaModel::from_pretrained(dir).unwrap();
//! let ids = array![[1u32, 17, 4, 9]];
//! let pass = model.forward(ids.view(), None).unwrap();
//! assert_eq!(pass.logits().dim(), (1, 4, 64));
//! let labels = array![[1i64, 17, 4, 9]];
//! let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
//! // Frozen base: only the gradient into the embedding outputs flows.
//! let grad_embedded = model.backward(pass, ce.grad_logits.view()).unwrap();
//! assert_eq!(grad_embedded.dim(), (1, 4, 32));
//! ```

pub mod adapted;
pub mod adapters;
pub mod attention;
pub mod backward;
pub mod base;
pub mod checkpoint;
mod checkpointing;
pub mod config;
pub mod decoder;
pub mod embedding;
pub mod error;
pub mod family;
pub mod forward;
pub mod generate;
pub mod gguf;
mod gguf_config;
pub mod gguf_model;
pub mod layers;
pub mod lazy_checkpoint;
pub mod linear;
mod linear_params;
pub mod loss;
pub mod memory;
pub mod merge;
pub mod model;
pub mod param;
pub mod profile;
pub mod qat;
pub mod qat_bnb_export;
pub mod qat_export;
pub mod qat_layer;
pub mod quantize;
pub mod rope;
pub mod sampling;
pub mod source;
mod vmath;

pub use adapted::{peft_parameter_name, AdaptedLayer};
pub use adapters::peft_file_key;
pub use base::{DenseLinear, LinearBase};
pub use checkpoint::Checkpoint;
pub use config::LlamaConfig;
pub use error::{LmError, Result};
pub use family::{Architecture, Family};
pub use forward::ForwardPass;
pub use generate::{KvCache, Sampling};
pub use linear::LinearModule;
pub use loss::{cross_entropy, CrossEntropy, IGNORE_INDEX};
pub use memory::MemoryReport;
pub use model::{DecoderLayer, LlamaModel, LAYER_LINEAR_NAMES};
/// The model of every family; [`LlamaModel`] is its historical name.
pub type CausalLm = LlamaModel;
pub use param::{ParamMut, Parameter};
pub use qat_layer::{quantizer_step_name, QatLayer, QAT_STATE_FILE, QUANTIZER_STEP_SUFFIX};
pub use quantize::{LinearQuantization, QuantizationReport};
pub use source::{Bnb4Checkpoint, ModelSource};
