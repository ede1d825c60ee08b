//! `lora-qat convert IN.gguf OUT_DIR`: a llama.cpp GGUF file as a transformers directory —
//! `config.json` of its family, `model.safetensors` (sharded past --max-shard-size) in the
//! dtype asked for, `tokenizer.json` and `tokenizer_config.json` with the chat template.
//! Tensors are decoded (ggml's dequantization), un-permuted and written one at a time
//! (`lm::merge::merge_checkpoint` over the GGUF source, no adapter).

use std::path::PathBuf;

use clap::Args;
use lm::merge::{merge_checkpoint, parse_dtype, parse_size, MergeOptions};

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The GGUF model file (architectures llama, qwen2, qwen3, gemma2, gemma3, phi3).
    #[arg(value_name = "IN.gguf")]
    pub input: PathBuf,
    /// Output directory (created; a checkpoint already there is replaced when the new one is
    /// complete).
    #[arg(value_name = "OUT_DIR")]
    pub out: PathBuf,
    /// Tensor dtype of model.safetensors: f32, f16 or bf16.
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Largest shard (e.g. 5GB, 500MB); more than one writes model.safetensors.index.json.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
}

pub fn run(args: &ConvertArgs) -> CliResult {
    if !lm::gguf_model::is_gguf_file(&args.input) {
        return Err(CliError::File {
            path: args.input.display().to_string(),
            reason: "not a GGUF file (no GGUF magic)".into(),
        });
    }
    let dtype = parse_dtype(&args.dtype)?;
    let options = MergeOptions {
        dtype: Some(dtype),
        quantize_nf4: false,
        max_shard_bytes: parse_size(&args.max_shard_size)?,
    };
    let report = merge_checkpoint(&args.input, None, &args.out, &options)?;
    let tokenizer = lora_qat::text::gguf_tokenizer::write_tokenizer_files(&args.input, &args.out)?;
    println!(
        "wrote {} tensors ({:.1} MB, {}) in {} file(s), config.json and {} to {}",
        report.tensors,
        report.data_bytes as f64 / 1e6,
        args.dtype,
        report.shards.len(),
        if tokenizer.is_empty() {
            "no tokenizer files (the GGUF file has no tokenizer.ggml.model)".to_string()
        } else {
            format!("{} tokenizer files", tokenizer.len())
        },
        args.out.display()
    );
    Ok(())
}
