//! Errors of lm: every one says what was wrong and where (config key, tensor key, shape, file).

use std::path::PathBuf;

use thiserror::Error;

/// Shorthand for `Result<T, LmError>`.
pub type Result<T, E = LmError> = std::result::Result<T, E>;

/// Everything a caller of lm can get wrong, and everything a checkpoint can contain that lm
/// cannot use.
#[derive(Debug, Error)]
pub enum LmError {
    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, shard index) that does not parse.
    #[error("invalid JSON in {path}: {reason}")]
    Json { path: PathBuf, reason: String },
    /// An error in the config file at `path` (the inner error names the key).
    #[error("{}: {source}", path.display())]
    ConfigFile {
        path: std::path::PathBuf,
        source: Box<LmError>,
    },
    /// A metadata key or tensor of a GGUF model file that is missing, of the wrong kind, or
    /// disagrees with the rest of the file (`key` is the GGUF key or tensor name).
    #[error("{}: `{key}`: {reason}", path.display())]
    Gguf {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A config key that is missing, has the wrong type or an invalid value.
    #[error("config key `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// A config option that changes the architecture in a way this crate does not implement.
    #[error("unsupported config option `{key}` = {value}: {reason}")]
    Unsupported {
        key: String,
        value: String,
        reason: String,
    },
    /// A safetensors file that cannot be parsed.
    #[error("invalid safetensors file {path}: {reason}")]
    SafeTensors { path: PathBuf, reason: String },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },
    /// A tensor in the checkpoint that the architecture has no place for.
    #[error("unexpected tensor `{key}` in {file}")]
    UnexpectedTensor { key: String, file: PathBuf },
    /// A tensor whose shape is not what the config implies.
    #[error("tensor `{key}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor stored in a dtype that cannot be converted to `f32`.
    #[error("tensor `{key}` has unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    TensorDtype { key: String, dtype: String },
    /// An input array (token ids, labels, mask, gradient) with the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// A token id or label outside the vocabulary, at `(batch, position)`.
    #[error("{what} {value} at (batch {batch}, position {position}) is outside the vocabulary 0..{vocab}")]
    TokenOutOfRange {
        what: String,
        value: i64,
        batch: usize,
        position: usize,
        vocab: usize,
    },
    /// A sequence longer than the model's position table.
    #[error("sequence of {len} positions exceeds max_position_embeddings = {max}")]
    SequenceTooLong { len: usize, max: usize },
    /// Every label is ignored (−100) or has no next-token target, so the mean loss is undefined.
    #[error("no labelled positions: every shifted label is -100 (ignore_index)")]
    NoLabels,
    /// A NaN or infinity in logits, loss or gradients, with where it was found.
    #[error("non-finite value {value} in {what} at {location}")]
    NonFinite {
        what: String,
        location: String,
        value: f32,
    },
    /// A module path or parameter name that does not exist in the model.
    #[error("unknown {what} `{name}`")]
    UnknownName { what: String, name: String },
    /// An argument with an invalid value (temperature, batch layout, ...).
    #[error("invalid {name} = {value}: {reason}")]
    InvalidArgument {
        name: String,
        value: String,
        reason: String,
    },
    /// `backward` called with a forward pass that does not belong to the current model state.
    #[error("backward: {reason}")]
    Backward { reason: String },
    /// An error of the numeric layer below.
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// An error of an adapter layer or adapter file (names the module path, key or file).
    #[error(transparent)]
    Adapter(#[from] lora_core::LoraError),
    /// An operation the model's current adapter state does not allow (merged, unknown name).
    #[error("{operation}: {reason}")]
    AdapterState { operation: String, reason: String },
}

/// The file containers' errors (re-exported by quant-core) arrive as quant-core's.
impl From<quant_core::FormatError> for LmError {
    fn from(e: quant_core::FormatError) -> Self {
        LmError::Quant(e.into())
    }
}

impl LmError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LmError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        LmError::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        LmError::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn invalid(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        LmError::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Errors with the first non-finite value of `values`, its location given by `locate` from the
/// flat index (so a caller can name `(batch, position, vocab)` or a parameter's element).
pub(crate) fn check_finite_at(
    what: &str,
    values: &[f32],
    locate: impl Fn(usize) -> String,
) -> Result<()> {
    if quant_core::error::check_finite(what, values).is_ok() {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(LmError::NonFinite {
            what: what.to_string(),
            location: locate(index),
            value: values[index],
        }),
        None => Ok(()),
    }
}
