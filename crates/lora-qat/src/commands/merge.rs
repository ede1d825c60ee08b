//! `lora-qat merge`: a PEFT adapter merged into its base, written as a transformers-loadable
//! checkpoint one tensor at a time (see `lm::merge`).

use std::path::PathBuf;

use clap::Args;
use lm::merge::{merge_checkpoint, parse_dtype, parse_size, MergeOptions};

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model directory (config.json + model.safetensors or a sharded index; f32, f16,
    /// bf16 or bitsandbytes 4-bit, which is dequantized before the merge), or a llama.cpp
    /// GGUF file (dequantized; the output gets its tokenizer as tokenizer.json). A hub id
    /// (org/name) in the local Hugging Face cache is resolved there.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT adapter directory (LoRA, rsLoRA or DoRA) whose targets must exist in the model;
    /// a LoRA-QAT directory (with qat_quantizers.safetensors) merges as its trained
    /// quantized weights Q(W + s·B·A).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Output directory (created; must not be the model directory). config.json is copied
    /// with quantization_config removed, or set to NF4 with --quantize nf4; tokenizer files
    /// are copied too.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Dtype of the dense output tensors (f32, f16, bf16); default: each tensor's stored
    /// dtype (a 4-bit base's weights take its bnb_4bit_compute_dtype).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Re-quantize the layers' projections to NF4 (blocksize 64, double quant) in the
    /// bitsandbytes layout transformers loads. With a LoRA-QAT adapter trained on the NF4
    /// grid in that layout (`train --adapter-type lora-qat --quantizer nf4 --bnb-layout`)
    /// its projections are written as trained — its codes and double-quantized absmax, not
    /// a re-quantization; any other LoRA-QAT adapter is refused with the reason.
    #[arg(long, value_name = "KIND")]
    pub quantize: Option<String>,
    /// Largest safetensors shard (e.g. 2GB, 500MB); past it the output is sharded with a
    /// model.safetensors.index.json.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
}

pub fn run(args: &MergeArgs) -> CliResult {
    let model_dir = super::resolve_model_arg(&args.model, args.revision.as_deref())?;
    let quantize_nf4 = match args.quantize.as_deref() {
        None => false,
        Some("nf4") => true,
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--quantize {other}: only nf4 is supported"
            )))
        }
    };
    let options = MergeOptions {
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        quantize_nf4,
        max_shard_bytes: parse_size(&args.max_shard_size)?,
    };
    let report = merge_checkpoint(&model_dir, Some(&args.adapter), &args.out, &options)?;
    if lm::gguf_model::is_gguf_file(&model_dir) {
        // A directory's tokenizer files are copied by the merge; a GGUF file's are built.
        lora_qat::text::gguf_tokenizer::write_tokenizer_files(&model_dir, &args.out)?;
    }
    println!(
        "merged {} modules; wrote {} tensors ({:.1} MB) in {} file(s) to {}",
        report.merged_modules,
        report.tensors,
        report.data_bytes as f64 / 1e6,
        report.shards.len(),
        args.out.display()
    );
    Ok(())
}
