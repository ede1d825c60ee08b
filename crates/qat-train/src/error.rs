//! The one error type of this crate: every failure says what was wrong and where.

use std::path::PathBuf;

/// Errors of losses, optimizers, data loading, checkpoints and metrics.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Two inputs disagree on a shape or length.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        /// The operation and argument.
        context: String,
        /// What was needed.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A NaN or infinity in an input, a loss or a gradient.
    #[error("non-finite value {value} in {context} at {location}")]
    NonFinite {
        /// The tensor or quantity.
        context: String,
        /// Where inside it (index, row/column or parameter name).
        location: String,
        /// The offending value.
        value: f64,
    },
    /// A configuration value or argument out of its domain.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidArgument {
        /// The argument or field.
        name: String,
        /// Its value, printed.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A line of a dataset file that cannot be used.
    #[error("{source_name} line {line}: {reason}")]
    Data {
        /// The file (or other source) the line came from.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint file that is missing a key, malformed or does not match its pair.
    #[error("checkpoint {file}: {key}: {reason}")]
    Checkpoint {
        /// The file.
        file: PathBuf,
        /// The key (tensor name, JSON field) concerned.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O failure on a named file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A failure inside `quant-core` (GEMM shapes, atomic writes).
    #[error(transparent)]
    Quant(#[from] quant_core::error::QuantError),
    /// A failure inside `lm` (model forward/backward, parameter traversal).
    #[error(transparent)]
    Lm(#[from] lm::LmError),
    /// A failure inside `lora-core` (adapter layers and sets).
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
}

/// The file containers' errors (re-exported by quant-core) arrive as quant-core's.
impl From<quant_core::FormatError> for TrainError {
    fn from(e: quant_core::FormatError) -> Self {
        TrainError::Quant(e.into())
    }
}

/// Result with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn shape(
        context: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Self::Shape {
            context: context.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn invalid(
        name: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn non_finite(
        context: impl Into<String>,
        location: impl Into<String>,
        value: f64,
    ) -> Self {
        Self::NonFinite {
            context: context.into(),
            location: location.into(),
            value,
        }
    }
}

/// Errors with the first non-finite element of `values` (flat index in the message).
pub(crate) fn check_finite(context: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(TrainError::non_finite(
            context,
            format!("index {i}"),
            f64::from(values[i]),
        )),
        None => Ok(()),
    }
}

/// Errors with the first non-finite element of a row-major `[rows, cols]` matrix, by row and column.
pub(crate) fn check_finite_2d(context: &str, values: &[f32], cols: usize) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(TrainError::non_finite(
            context,
            format!("row {}, column {}", i / cols.max(1), i % cols.max(1)),
            f64::from(values[i]),
        )),
        None => Ok(()),
    }
}
