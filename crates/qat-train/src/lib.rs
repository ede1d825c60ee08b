//! # qat-train
//!
//! Quantization-aware training: the losses (cross-entropy, knowledge distillation, the
//! chain-of-thought fidelity loss) with their gradients, optimizers (SGD, AdamW) and learning
//! rate schedules, the calibration driver, and the trainer that runs real forward, backward and
//! update steps on an `lm` model with `lora-core` adapters, with resumable checkpoints.
//!
//! [`trainer::Trainer`] runs the loop on an `lm` student (LoRA, DoRA, QLoRA or LoRA-QAT adapters)
//! with an optional frozen teacher: full-precision warm-up, calibration of the quantizer steps,
//! fake-quantized training on the composite objective (task, KD, hidden-state, reasoning), with
//! evaluation, early stopping, metrics callbacks and bit-identical resume. Its pieces:
//!
//! * [`config`] — [`config::TrainConfig`], the run's settings (serde, validated, errors naming
//!   the field).
//! * [`trainer`] — the loop, checkpoints of a run, export of the adapter and quantized weights.
//! * [`loss`] — cross-entropy with ignore index, distillation with temperature, hidden-state
//!   MSE/cosine, the reasoning-fidelity loss and the weighted composite, each returning its
//!   value and the gradient with respect to the student's outputs.
//! * [`params`] — parameters as named `f32` slices with gradients ([`params::ParamVisitor`]),
//!   global gradient norm and clipping.
//! * [`optim`] — SGD and AdamW matching PyTorch, parameter groups by name, gradient
//!   accumulation, optimizer state as named tensors plus JSON.
//! * [`schedule`] — constant, warmup + cosine, warmup + linear learning-rate factors.
//! * [`data`] — pre-tokenized JSONL datasets, seeded per-epoch shuffling, padded batches, a
//!   resumable cursor.
//! * [`data_free`] — data-free distillation data (LLM-QAT): sequences the teacher writes
//!   itself from a random start token, greedy then sampled, under a seed.
//! * [`distributed`] — data-parallel training: the [`distributed::Collective`] a trainer runs
//!   its ranks with (one process by default; MPI with the `mpi` feature).
//! * [`checkpoint`] — a safetensors file plus a JSON file, written crash-safely and verified to
//!   belong together on load; a serializable seeded RNG.
//! * [`metrics`] — per-step and evaluation metrics, a callback trait and a CSV writer.
//! * [`quality`] — a quantized model against its reference as llama.cpp's
//!   `perplexity --kl-divergence` measures it (mean and 99th-percentile KLD, top-1 agreement,
//!   both perplexities).
//!
//! ```
//! use ndarray::array;
//! use qat_train::loss::cross_entropy;
//! use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
//! use qat_train::params::ParamStore;
//!
//! // A 1×3 "model" whose logits are its parameters, trained towards class 2.
//! let mut store = ParamStore::new();
//! store.add("lora_logits", vec![1, 3], vec![0.0; 3]).unwrap();
//! let mut opt = AdamW::new(AdamWConfig::default(), ParamGroups::single(0.1, 0.0).unwrap()).unwrap();
//! let mut first = None;
//! for _ in 0..20 {
//!     let logits = ndarray::Array2::from_shape_vec((1, 3), store.get("lora_logits").unwrap().value.clone()).unwrap();
//!     let out = cross_entropy(logits.view(), &[2]).unwrap();
//!     first.get_or_insert(out.value);
//!     store.set_grad("lora_logits", out.grad.as_slice().unwrap()).unwrap();
//!     opt.step(&mut store, 1.0).unwrap();
//! }
//! let logits = ndarray::Array2::from_shape_vec((1, 3), store.get("lora_logits").unwrap().value.clone()).unwrap();
//! assert!(cross_entropy(logits.view(), &[2]).unwrap().value < first.unwrap() / 4.0);
//! ```

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod data_free;
pub mod distributed;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod quality;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
