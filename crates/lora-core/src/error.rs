//! Errors of lora-core: every one says what was wrong and where (module, key, file, shape).

use std::path::PathBuf;

use thiserror::Error;

/// Shorthand for `Result<T, LoraError>`.
pub type Result<T, E = LoraError> = std::result::Result<T, E>;

/// Everything a caller of lora-core can get wrong.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoraError {
    /// An error from the numeric layer (GEMM shapes, non-finite values, ...).
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// A configuration value that is out of range or not supported.
    #[error("invalid LoRA option {option} = {value}: {reason}")]
    InvalidOption {
        option: String,
        value: String,
        reason: String,
    },
    /// Two shapes that must agree do not.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        context: String,
        expected: String,
        got: String,
    },
    /// A NaN or infinity where a finite value is required.
    #[error("non-finite value {value} in {context} at flat index {index}")]
    NonFinite {
        context: String,
        index: usize,
        value: f32,
    },
    /// A named adapter that the layer or set does not hold.
    #[error("unknown adapter {name:?} in {context}; known: {known:?}")]
    UnknownAdapter {
        name: String,
        context: String,
        known: Vec<String>,
    },
    /// An adapter name that is already taken.
    #[error("adapter {name:?} already exists in {context}")]
    DuplicateAdapter { name: String, context: String },
    /// A module path that the adapter set does not hold.
    #[error("unknown module {module:?}")]
    UnknownModule { module: String },
    /// An operation that is not valid in the layer's current state (merged, no forward yet, ...).
    #[error("{operation} is not possible in {context}: {reason}")]
    State {
        operation: String,
        context: String,
        reason: String,
    },
    /// A tensor key in an adapter file that is missing, unexpected or malformed.
    #[error("adapter file {file}: key {key:?}: {reason}")]
    Key {
        file: PathBuf,
        key: String,
        reason: String,
    },
    /// An adapter directory or file that cannot be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file whose contents cannot be parsed.
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// The file containers' errors (re-exported by quant-core) arrive as quant-core's.
impl From<quant_core::FormatError> for LoraError {
    fn from(e: quant_core::FormatError) -> Self {
        LoraError::Quant(e.into())
    }
}

impl LoraError {
    /// A [`LoraError::InvalidOption`] from anything printable.
    pub fn option(
        option: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        LoraError::InvalidOption {
            option: option.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// A [`LoraError::Shape`] from anything printable.
    pub fn shape(
        context: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        LoraError::Shape {
            context: context.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// A [`LoraError::State`].
    pub fn state(
        operation: impl Into<String>,
        context: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        LoraError::State {
            operation: operation.into(),
            context: context.into(),
            reason: reason.into(),
        }
    }
}

/// Errors naming the first non-finite element of `values` (flat, logical order), if any.
pub(crate) fn check_finite<'a, I>(context: impl FnOnce() -> String, values: I) -> Result<()>
where
    I: IntoIterator<Item = &'a f32>,
    I::IntoIter: Clone,
{
    let values = values.into_iter();
    // Every layer input and output gradient passes here: a fold without early exit (ndarray's
    // iterators fold a contiguous view as a slice) vectorises; the index of a bad value is
    // searched for only when there is one.
    let all_finite = values.clone().fold(true, |ok, v| {
        ok & (v.to_bits() & 0x7f80_0000 != 0x7f80_0000)
    });
    if all_finite {
        return Ok(());
    }
    match values.enumerate().find(|(_, v)| !v.is_finite()) {
        Some((index, &value)) => Err(LoraError::NonFinite {
            context: context(),
            index,
            value,
        }),
        None => Ok(()),
    }
}
