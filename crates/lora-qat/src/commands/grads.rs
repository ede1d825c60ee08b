//! `lora-qat grads`: the gradient of the loss for every tensor of a PEFT adapter, or of a
//! LoRA-QAT adapter through its quantizer (its steps' gradients included).

use std::path::PathBuf;

use clap::Args;

use super::logits::{
    is_qat_adapter, load_with_adapter_layers, read_tokens, write_f32_tensors, ADAPTER_NAME,
};
use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct GradsArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), or
    /// a llama.cpp GGUF file (dequantized). A hub id (org/name) in the local Hugging Face
    /// cache is resolved there.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Adapter directory whose tensors get gradients: PEFT LoRA/DoRA, or LoRA-QAT (with
    /// qat_quantizers.safetensors: the loss of Q(W + s·B·A), gradients through its
    /// straight-through estimator, plus `<module>.quantizer.step`).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Safetensors file with I64 `input_ids` [batch, seq] and I64 `labels` [batch, seq]
    /// (-100 = ignored; shifted by one inside, as transformers does).
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// Output safetensors file: F32 d(loss)/d(tensor) under the adapter file's keys
    /// (`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
    /// `.lora_magnitude_vector`; LoRA-QAT also `.quantizer.step`), and F32 `loss` [1].
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: &GradsArgs) -> CliResult {
    let model_dir = super::resolve_model_arg(&args.model, args.revision.as_deref())?;
    let tokens = read_tokens(&args.tokens)?;
    let labels = tokens.labels.ok_or_else(|| CliError::File {
        path: args.tokens.display().to_string(),
        reason: "no tensor `labels` (I64 [batch, seq]): gradients need a loss".into(),
    })?;
    let mut model = load_with_adapter_layers(&model_dir, Some(&args.adapter))?;
    let loss = model.loss_and_backward(tokens.input_ids.view(), labels.view(), None)?;
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .adapter_gradients(ADAPTER_NAME)?
        .into_iter()
        .map(|(key, grad)| (key, grad.shape().to_vec(), grad.iter().copied().collect()))
        .collect();
    if is_qat_adapter(&args.adapter) {
        for (key, grad) in model.quantizer_gradients(ADAPTER_NAME)? {
            out.push((key, vec![grad.len()], grad));
        }
    }
    out.push(("loss".to_string(), vec![1], vec![loss]));
    write_f32_tensors(&args.out, &out)
}
