//! # qat-train
//!
//! Quantization-aware training: the losses (cross-entropy, knowledge distillation, the
//! chain-of-thought fidelity loss) with their gradients, optimizers (SGD, AdamW) and learning
//! rate schedules, the calibration driver, and the trainer that runs real forward, backward and
//! update steps on an `lm` model with `lora-core` adapters, with resumable checkpoints.
