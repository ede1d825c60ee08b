//! `lora-qat logits`: the logits (and the loss, given labels) of a model, optionally with a
//! PEFT adapter, for token ids read from a safetensors file. Also the helpers the other model
//! commands share: loading a model with an adapter, reading token files, writing tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use lm::{cross_entropy, LlamaModel};
use ndarray::Array2;
use safetensors::{Dtype, SafeTensors};

use super::{CliError, CliResult};

/// The adapter name the commands give a loaded adapter (PEFT's default).
pub const ADAPTER_NAME: &str = "default";

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), or
    /// a llama.cpp GGUF file (dequantized). A hub id (org/name) in the local Hugging Face
    /// cache is resolved there.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Adapter directory to apply: a PEFT adapter (adapter_config.json +
    /// adapter_model.safetensors), or a LoRA-QAT one (also qat_quantizers.safetensors),
    /// applied as the quantized weights Q(W + s·B·A) it was trained with.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Safetensors file with I64 `input_ids` [batch, seq] and, optionally, I64 `labels`
    /// [batch, seq] (-100 = ignored; shifted by one inside, as transformers does).
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// Output safetensors file: F32 `logits` [batch, seq, vocab], and F32 `loss` [1] (mean
    /// cross-entropy over labelled positions) when the tokens file has `labels`.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Precision of the matrix products: f32, or bf16 (operands rounded to bf16, sums in
    /// f32, as PyTorch's CPU autocast; weights, norms, softmax and loss stay f32).
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: quant_core::linalg::ComputeDtype,
}

/// Token ids and optional labels as read from a tokens file.
pub struct Tokens {
    pub input_ids: Array2<u32>,
    pub labels: Option<Array2<i64>>,
}

/// Whether `dir` is a LoRA-QAT adapter directory (it holds [`lm::qat::QAT_STATE_FILE`]).
pub fn is_qat_adapter(dir: &Path) -> bool {
    dir.join(lm::qat::QAT_STATE_FILE).is_file()
}

/// Reads the model in `model_dir` and, if given, the adapter in `adapter_dir` as it is
/// deployed: a PEFT adapter as its LoRA layers, a LoRA-QAT directory (with
/// `qat_quantizers.safetensors`) loaded with its trained steps and merged to the quantized
/// weights `Q(W + s·B·A)` its training computed with.
pub fn load_model(model_dir: &Path, adapter_dir: Option<&Path>) -> CliResult<LlamaModel> {
    let mut model = load_with_adapter_layers(model_dir, adapter_dir)?;
    if adapter_dir.is_some_and(is_qat_adapter) {
        model.merge_and_unload()?;
    }
    Ok(model)
}

/// As [`load_model`] but a LoRA-QAT adapter stays as its layers (quantizer steps included),
/// so that gradients reach `A`, `B` and the steps; evaluation mode.
pub fn load_with_adapter_layers(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
) -> CliResult<LlamaModel> {
    let is_gguf = lm::gguf_model::is_gguf_file(model_dir);
    if !model_dir.is_dir() && !is_gguf {
        return Err(CliError::File {
            path: model_dir.display().to_string(),
            reason: "neither a directory (a Hugging Face model) nor a GGUF file".into(),
        });
    }
    let mut model = LlamaModel::open(model_dir)?;
    match adapter_dir {
        Some(dir) if is_qat_adapter(dir) => {
            model.load_qat_adapter(dir, ADAPTER_NAME)?;
        }
        Some(dir) => {
            model.load_adapter(dir, ADAPTER_NAME, 0)?;
        }
        None => {}
    }
    // These commands evaluate: no adapter dropout.
    model.set_training(false);
    Ok(model)
}

fn read_i64_2d(st: &SafeTensors<'_>, path: &Path, key: &str) -> CliResult<Option<Array2<i64>>> {
    let err = |reason: String| CliError::File {
        path: path.display().to_string(),
        reason: format!("tensor `{key}`: {reason}"),
    };
    let Ok(view) = st.tensor(key) else {
        return Ok(None);
    };
    if view.dtype() != Dtype::I64 {
        return Err(err(format!("dtype {:?}, expected I64", view.dtype())));
    }
    let &[batch, seq] = view.shape() else {
        return Err(err(format!(
            "shape {:?}, expected [batch, seq]",
            view.shape()
        )));
    };
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Array2::from_shape_vec((batch, seq), values)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// Reads `input_ids` (required) and `labels` (optional) from a safetensors file.
pub fn read_tokens(path: &Path) -> CliResult<Tokens> {
    let file_err = |reason: String| CliError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
    let ids = read_i64_2d(&st, path, "input_ids")?.ok_or_else(|| {
        file_err("no tensor `input_ids` (I64 [batch, seq]) in the tokens file".into())
    })?;
    if let Some(((b, t), &id)) = ids
        .indexed_iter()
        .find(|(_, &id)| id < 0 || id > u32::MAX as i64)
    {
        return Err(file_err(format!(
            "tensor `input_ids`: id {id} at (batch {b}, position {t}) is not a token id"
        )));
    }
    let labels = read_i64_2d(&st, path, "labels")?;
    if let Some(l) = &labels {
        if l.dim() != ids.dim() {
            return Err(file_err(format!(
                "tensor `labels` has shape {:?}, `input_ids` {:?}; they must agree",
                l.shape(),
                ids.shape()
            )));
        }
    }
    Ok(Tokens {
        input_ids: ids.mapv(|v| v as u32),
        labels,
    })
}

/// Writes `tensors` (name, shape, values) as F32 to a safetensors file.
pub fn write_f32_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> CliResult {
    let err = |reason: String| CliError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| err(e.to_string()))
}

pub fn run(args: &LogitsArgs) -> CliResult {
    let model_dir = super::resolve_model_arg(&args.model, args.revision.as_deref())?;
    let mut model = load_model(&model_dir, args.adapter.as_deref())?;
    model.set_compute_dtype(args.compute_dtype);
    let tokens = read_tokens(&args.tokens)?;
    let logits = model.logits(tokens.input_ids.view(), None)?;
    let mut out = vec![(
        "logits".to_string(),
        logits.shape().to_vec(),
        logits.iter().copied().collect(),
    )];
    if let Some(labels) = &tokens.labels {
        let ce = cross_entropy(logits.view(), labels.view())?;
        out.push(("loss".to_string(), vec![1], vec![ce.loss]));
    }
    write_f32_tensors(&args.out, &out)
}
