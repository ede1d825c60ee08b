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

impl From<formats::FormatError> for QuantError {
    /// The container's errors keep their text: I/O and format problems become
    /// [`QuantError::Format`], size disagreements [`QuantError::ShapeMismatch`], refused
    /// values [`QuantError::InvalidParameter`].
    fn from(e: formats::FormatError) -> Self {
        use formats::FormatError as F;
        match e {
            F::Io {
                context,
                action,
                source,
            } => QuantError::Format {
                context,
                reason: format!("{action}: {source}"),
            },
            F::Format { context, reason } => QuantError::Format { context, reason },
            F::Shape {
                context,
                expected,
                got,
            } => QuantError::ShapeMismatch {
                context,
                expected,
                got,
            },
            F::Invalid {
                name,
                value,
                reason,
            } => QuantError::InvalidParameter {
                name,
                value,
                reason,
            },
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
    // Fast path: a non-short-circuiting OR over fixed-size chunks vectorizes; the exact index
    // is searched for only in a chunk that holds a bad value.
    const CHUNK: usize = 256;
    for (c, chunk) in values.chunks(CHUNK).enumerate() {
        let any_bad = chunk.iter().fold(false, |bad, v| {
            bad | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        });
        if any_bad {
            let offset = chunk.iter().position(|v| !v.is_finite()).unwrap_or(0);
            let index = c * CHUNK + offset;
            return Err(QuantError::NonFinite {
                context: context.to_string(),
                index,
                value: values[index],
            });
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_names_the_first_bad_index_in_any_chunk() {
        let mut v = vec![1.0f32; 1000];
        assert!(check_finite("v", &v).is_ok());
        v[700] = f32::NEG_INFINITY;
        v[900] = f32::NAN;
        match check_finite("v", &v).unwrap_err() {
            QuantError::NonFinite { index, value, .. } => {
                assert_eq!(index, 700);
                assert_eq!(value, f32::NEG_INFINITY);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(check_finite("v", &[f32::MAX, f32::MIN_POSITIVE, -0.0]).is_ok());
    }
}
