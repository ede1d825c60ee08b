//! `lora-qat export-gguf`: a model of any supported family (optionally with a PEFT adapter
//! merged into it) as a GGUF file for llama.cpp under the architecture, tensor names and
//! metadata llama.cpp's converter writes for the family (docs/FORMATS.md), or, with `--lora`,
//! the adapter alone as a GGUF LoRA adapter.

use std::path::PathBuf;

use clap::Args;
use quant_core::ggml::GgmlType;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct ExportGgufArgs {
    /// Hugging Face model directory of a supported family (llama, mistral, qwen2, qwen3,
    /// gemma2, gemma3_text, phi3; config.json + safetensors, f32/f16/bf16 or bitsandbytes
    /// 4-bit), or a llama.cpp GGUF file (decoded; with --lora, the file the adapter was
    /// trained over); an option the family's llama.cpp architecture cannot express is refused.
    /// Its tokenizer.json, when present, becomes tokenizer.ggml.*. A hub id (org/name) in the
    /// local Hugging Face cache is resolved there.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT adapter directory: merged into the weights (W + s·B·A, DoRA too), or, with
    /// `--lora`, written as a GGUF LoRA adapter. A LoRA-QAT directory (with
    /// qat_quantizers.safetensors) merges as its trained weights Q(W + s·B·A); `--lora`
    /// refuses it (a quantized weight is no low-rank delta).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Write the adapter as a llama.cpp LoRA adapter (general.type = adapter) instead of
    /// merging it; the model is read for its shapes and head counts only.
    #[arg(long, requires = "adapter")]
    pub lora: bool,
    /// Output GGUF file (written through a temporary file and renamed when complete).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Tensor type of the 2-D weights: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
    /// q3_k, q4_k, q5_k or q6_k (ggml's reference block quantizers). Norms stay f32; rows that
    /// are not whole blocks take llama.cpp's fallback type for the K types, else f16.
    /// A LoRA adapter takes f32 or f16.
    #[arg(long = "type", value_name = "TYPE", default_value = "f16")]
    pub ty: String,
    /// Which tensors get --type: `pure` every 2-D tensor; `llama-cpp` as `llama-quantize`
    /// without `--pure` — the output matrix (the tied embedding when there is no output
    /// tensor) in Q6_K, or Q8_0 when its rows are not whole 256-value super-blocks, unless
    /// --type is q8_0, q6_k or a float type.
    #[arg(long, value_enum, default_value_t = MixArg::Pure)]
    pub type_mix: MixArg,
}

/// `--type-mix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MixArg {
    Pure,
    LlamaCpp,
}

pub fn run(args: &ExportGgufArgs) -> CliResult {
    let model_dir = super::resolve_model_arg(&args.model, args.revision.as_deref())?;
    let ty = GgmlType::from_name(&args.ty)?;
    if args.lora && args.type_mix != MixArg::Pure {
        return Err(CliError::Usage(
            "--type-mix llama-cpp: a LoRA adapter has no output matrix to choose a type for".into(),
        ));
    }
    if args.lora {
        let adapter = args
            .adapter
            .as_ref()
            .ok_or_else(|| CliError::Usage("--lora needs --adapter DIR".into()))?;
        let report = lm::gguf::export_gguf_lora(&model_dir, adapter, &args.out, ty)?;
        println!(
            "wrote LoRA adapter {} (architecture {}, {} tensors, {} metadata keys, {})",
            report.path.display(),
            report.arch,
            report.tensors,
            report.metadata_keys,
            ty.name()
        );
        return Ok(());
    }
    let mix = match args.type_mix {
        MixArg::Pure => lm::gguf::TypeMix::Pure,
        MixArg::LlamaCpp => lm::gguf::TypeMix::LlamaCpp,
    };
    let report =
        lm::gguf::export_gguf_with(&model_dir, args.adapter.as_deref(), &args.out, ty, mix)?;
    println!(
        "wrote {} (architecture {}, {} tensors, {} metadata keys, {}{})",
        report.path.display(),
        report.arch,
        report.tensors,
        report.metadata_keys,
        ty.name(),
        if args.adapter.is_some() {
            ", adapter merged"
        } else {
            ""
        }
    );
    if !report.f16_fallbacks.is_empty() {
        println!(
            "another type than {} ({}): {}",
            ty.name(),
            match args.type_mix {
                MixArg::Pure => "rows not whole blocks of it",
                MixArg::LlamaCpp => "llama.cpp's type mix, or rows not whole blocks of it",
            },
            report.f16_fallbacks.join(", ")
        );
    }
    Ok(())
}
