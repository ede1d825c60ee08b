//! The demo's error type: the library errors it passes through, plus what only the demo can
//! get wrong (a task string that does not parse, a missing teacher, an interrupted run).

use std::path::PathBuf;

/// Shorthand for `Result<T, DemoError>`.
pub type Result<T, E = DemoError> = std::result::Result<T, E>;

/// Errors of the embedded task, the teacher's pretraining and the demo run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// From quant-core.
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// From lora-core.
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// From lm (model loading, forward, backward, generation).
    #[error(transparent)]
    Lm(#[from] lm::LmError),
    /// From qat-train (losses, optimizer, data, checkpoints).
    #[error(transparent)]
    Train(#[from] qat_train::TrainError),
    /// A file that cannot be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value outside what the task or the demo accepts.
    #[error("invalid {name} = {value}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
    /// Text that is not in the task's alphabet or format.
    #[error("cannot tokenize {text:?}: {reason}")]
    Tokenize { text: String, reason: String },
    /// The run was stopped (Ctrl-C) after saving a checkpoint; `--resume` continues it.
    #[error("interrupted: checkpoint saved to {checkpoint}; rerun with --resume to continue")]
    Interrupted { checkpoint: PathBuf },
    /// Rendering the loss-curve picture failed.
    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
}

/// The file containers' errors (re-exported by quant-core) arrive as quant-core's.
impl From<quant_core::FormatError> for DemoError {
    fn from(e: quant_core::FormatError) -> Self {
        DemoError::Quant(e.into())
    }
}

impl DemoError {
    pub(crate) fn invalid(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        DemoError::Invalid {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DemoError::Io {
            path: path.into(),
            source,
        }
    }
}
