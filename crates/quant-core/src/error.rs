//! Errors of quant-core: every one says what was wrong and where.

use thiserror::Error;

/// Shorthand for `Result<T, QuantError>`.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// Everything a caller of quant-core can get wrong.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    /// Two shapes that must agree do not.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    ShapeMismatch {
        context: String,
        expected: String,
        got: String,
    },
    /// An input that must not be empty is.
    #[error("empty input in {context}")]
    Empty { context: String },
    /// A bit width outside what the quantizer supports.
    #[error("{bits} bits is out of range for {context}: supported {min}..={max}")]
    BitsOutOfRange {
        context: String,
        bits: u32,
        min: u32,
        max: u32,
    },
    /// A parameter with an invalid value (block size, clip ratio, percentile, ...).
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        name: String,
        value: String,
        reason: String,
    },
    /// A NaN or infinity in an input, at the first bad flat index.
    #[error("non-finite value {value} in {context} at index {index}")]
    NonFinite {
        context: String,
        index: usize,
        value: f32,
    },
    /// A stored artifact (quant state JSON, packed tensor, config) that cannot be read.
    #[error("invalid format in {context}: {reason}")]
    Format { context: String, reason: String },
}

impl QuantError {
    /// A [`QuantError::ShapeMismatch`] from anything printable.
    pub fn shape(
        context: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        QuantError::ShapeMismatch {
            context: context.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// A [`QuantError::InvalidParameter`] from anything printable.
    pub fn invalid(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        QuantError::InvalidParameter {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// A [`QuantError::Format`].
    pub fn format(context: impl Into<String>, reason: impl Into<String>) -> Self {
        QuantError::Format {
            context: context.into(),
            reason: reason.into(),
        }
    }
}

/// Returns an error naming the first non-finite element of `values` (flat index), if any.
///
/// ```
/// use quant_core::error::check_finite;
/// assert!(check_finite("w", &[1.0, 2.0]).is_ok());
/// let err = check_finite("w", &[1.0, f32::NAN]).unwrap_err();
/// assert!(err.to_string().contains("index 1"));
/// ```
pub fn check_finite(context: &str, values: &[f32]) -> Result<()> {
    // Fast path: a sum over finite values is finite unless it overflows, which is rare;
    // fall back to a scan only when the sum says something may be wrong.
    let mut acc = 0.0f32;
    for &v in values {
        acc += v * 0.0;
    }
    if acc == 0.0 {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            context: context.to_string(),
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Errors unless `values` is non-empty.
pub fn check_non_empty(context: &str, len: usize) -> Result<()> {
    if len == 0 {
        Err(QuantError::Empty {
            context: context.to_string(),
        })
    } else {
        Ok(())
    }
}

/// Errors unless `min <= bits <= max`.
pub fn check_bits(context: &str, bits: u32, min: u32, max: u32) -> Result<()> {
    if (min..=max).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::BitsOutOfRange {
            context: context.to_string(),
            bits,
            min,
            max,
        })
    }
}
