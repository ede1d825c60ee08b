//! The project's main job, `lora-qat demo`: a small Llama teacher that solves multi-step
//! arithmetic with a written chain of thought, what round-to-nearest post-training
//! quantization does to that skill at 4, 3 and 2 bits, and how much of it LoRA-QAT —
//! trained with distillation and the reasoning loss from the fp32 teacher — wins back.
//!
//! * [`task`] — the embedded task: problems, the character tokenizer, splits and masks.
//! * [`eval`] — exact-match accuracy by greedy generation, perplexity.
//! * [`pretrain`] — training the fp32 teacher from scratch, reproducibly.
//! * [`run`] — the demo run itself: PTQ and LoRA-QAT per bit width, resumable.
//! * [`report`] — the table, `report.md`, the JSON summary and the loss-curve PNG.

pub mod error;
pub mod eval;
pub mod pretrain;
pub mod report;
pub mod run;
pub mod task;

pub use error::{DemoError, Result};

/// Where the committed teacher lives in the source tree (`config.json`, `model.safetensors`).
pub const TEACHER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-teacher");
