//! Float encodings of the merge's output: the dtype and shard-size arguments as the CLI and
//! transformers spell them, and `f32` values encoded as F32/F16/BF16 with out-of-range values
//! reported by position.

use half::{bf16, f16};
use safetensors::Dtype;

use crate::error::{LmError, Result};

/// Parses `f32`, `f16` or `bf16` (also `float32`, `float16`, `bfloat16`).
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    match name {
        "f32" | "float32" => Ok(Dtype::F32),
        "f16" | "float16" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::BF16),
        other => Err(LmError::InvalidArgument {
            name: "dtype".into(),
            value: other.into(),
            reason: "expected f32, f16 or bf16".into(),
        }),
    }
}

pub(crate) fn torch_dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Parses a size such as `2GB`, `500MB`, `10KB` or a byte count (decimal units, as
/// transformers' `max_shard_size`; `GiB`/`MiB`/`KiB` are binary).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| LmError::InvalidArgument {
        name: "size".into(),
        value: text.into(),
        reason: "expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)".into(),
    })?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(LmError::InvalidArgument {
                name: "size".into(),
                value: text.into(),
                reason: format!("unknown unit {other}"),
            })
        }
    };
    let bytes = value * mult;
    // `value` parsed from digits and dots is never NaN.
    if bytes < 1.0 {
        return Err(LmError::InvalidArgument {
            name: "size".into(),
            value: text.into(),
            reason: "must be at least one byte".into(),
        });
    }
    Ok(bytes as u64)
}

/// Encodes `f32` values as `dtype` (little-endian), erroring on values outside its range.
pub fn encode_float(name: &str, values: &[f32], dtype: Dtype) -> Result<Vec<u8>> {
    let overflow = |i: usize| LmError::NonFinite {
        what: format!("{name} converted to {dtype:?}"),
        location: format!("flat index {i}"),
        value: values[i],
    };
    Ok(match dtype {
        Dtype::F32 => quant_core::io::f32_to_le_bytes(values),
        Dtype::F16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for (i, &v) in values.iter().enumerate() {
                let h = f16::from_f32(v);
                if !h.is_finite() {
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            out
        }
        Dtype::BF16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for (i, &v) in values.iter().enumerate() {
                let h = bf16::from_f32(v);
                if !h.is_finite() {
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            out
        }
        other => {
            return Err(LmError::TensorDtype {
                key: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}
