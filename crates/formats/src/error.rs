//! Errors of the file containers: each names the file, tensor or key that was wrong.

use thiserror::Error;

/// Shorthand for `Result<T, FormatError>`.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// What can go wrong reading or writing a file container.
#[derive(Debug, Error)]
pub enum FormatError {
    /// An operating-system error on a file (`context` names the file).
    #[error("{context}: {action}: {source}")]
    Io {
        context: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// Content that is corrupt, truncated, unsupported or inconsistent.
    #[error("invalid format in {context}: {reason}")]
    Format { context: String, reason: String },
    /// A size or shape that disagrees with what the container declares.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        context: String,
        expected: String,
        got: String,
    },
    /// A parameter with a value this crate does not accept (type id, dtype, name).
    #[error("invalid {name} = {value}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
}

impl FormatError {
    /// A [`FormatError::Format`].
    pub fn format(context: impl Into<String>, reason: impl Into<String>) -> Self {
        FormatError::Format {
            context: context.into(),
            reason: reason.into(),
        }
    }

    /// A [`FormatError::Shape`] from anything printable.
    pub fn shape(
        context: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        FormatError::Shape {
            context: context.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// A [`FormatError::Invalid`] from anything printable.
    pub fn invalid(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        FormatError::Invalid {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// A [`FormatError::Io`] on `path`.
    pub fn io(path: &std::path::Path, action: impl Into<String>, source: std::io::Error) -> Self {
        FormatError::Io {
            context: format!("file {}", path.display()),
            action: action.into(),
            source,
        }
    }
}
