//! One module per subcommand.

pub mod bench;
pub mod bench_gemm;
pub mod bench_merge;
pub mod bench_train;
pub mod convert;
pub mod demo;
pub mod distributed;
pub mod eval;
pub mod export_gguf;
pub mod generate;
pub mod grads;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod qat;
pub mod quantize;
pub mod train;

/// Errors of the command-line tool: library errors plus what only a CLI can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From quant-core.
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// From lora-core.
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// A file that cannot be parsed.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    /// From lm (model loading, adapters, forward and backward).
    #[error(transparent)]
    Lm(#[from] lm::LmError),
    /// From the demo (task, teacher, training run, report).
    #[error(transparent)]
    Demo(#[from] lora_qat::demo::DemoError),
    /// From qat-train (configuration, data, training, checkpoints).
    #[error(transparent)]
    Train(#[from] qat_train::TrainError),
    /// From the text layer (tokenizer, chat template, text data, model names).
    #[error(transparent)]
    Text(#[from] lora_qat::text::TextError),
    /// A bad combination of options.
    #[error("{0}")]
    Usage(String),
}

/// The file containers' errors (re-exported by quant-core) arrive as quant-core's.
impl From<quant_core::FormatError> for CliError {
    fn from(e: quant_core::FormatError) -> Self {
        CliError::Quant(e.into())
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

/// `--compute-dtype f32|bf16`: the precision of a model's matrix products
/// (`lm::LlamaModel::set_compute_dtype`); any other name is refused with the supported ones.
pub fn parse_compute_dtype(name: &str) -> Result<quant_core::linalg::ComputeDtype, String> {
    quant_core::linalg::ComputeDtype::from_name(name).map_err(|e| e.to_string())
}

/// The one resolver of every `--model`: a path as it is, else a hub id in the local Hugging
/// Face cache (`lora_qat::text::hub`).
pub fn resolve_model_arg(
    model: &std::path::Path,
    revision: Option<&str>,
) -> CliResult<std::path::PathBuf> {
    let spec = model
        .to_str()
        .ok_or_else(|| CliError::Usage(format!("--model {}: not valid UTF-8", model.display())))?;
    Ok(lora_qat::text::resolve_model(spec, revision)?)
}
