//! # lora-core
//!
//! Low-rank adapters as layers that train. A layer here wraps a frozen base weight `W`
//! (`(out, in)`, the PyTorch/PEFT layout) — in `f32`, or NF4 with double quantization as in
//! QLoRA, or fake-quantized through a differentiable quantizer as in LoRA-QAT — and adds the
//! update `ΔW = s·B·A` (LoRA, rsLoRA, DoRA's magnitude-normalised form). Each layer has an
//! explicit `forward` that keeps what its `backward` needs and a `backward` that returns the
//! input gradient and accumulates the adapter's gradients. Adapter sets group layers by module
//! path and read and write the PEFT file layout. This crate knows nothing of models or training.
