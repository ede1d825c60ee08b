//! # lm
//!
//! A Llama-architecture decoder (embedding, RMSNorm, rotary attention with grouped-query heads,
//! SwiGLU MLP, LM head) with explicit forward and backward passes, loaded from Hugging Face
//! `config.json` + safetensors checkpoints (including bitsandbytes 4-bit ones), whose linear
//! layers can be replaced by the adapters of `lora-core` by PEFT's `target_modules` rules.
//! It computes logits, the shifted cross-entropy and gradients; it knows nothing of training.
