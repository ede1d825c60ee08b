//! Reading and writing safetensors files: dtype conversion to `f32` and crash-safe saves.
//!
//! Every crate above reads weights through [`tensor_to_f32`] (f32, f16 and bf16 are accepted,
//! as Hugging Face checkpoints use all three) and writes files through [`write_atomic`] (the
//! crash-safe write of [`crate::atomic`]), so a failed or interrupted save never leaves a
//! half-written file under the final name.

use std::path::Path;

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::{TensorView, View};
use safetensors::Dtype;

use crate::error::{FormatError, Result};

pub use crate::atomic::{sha256_hex, write_atomic, write_atomic_group, write_atomic_with};

/// The elements of a floating-point tensor as `f32` (f32 copied, f16/bf16 widened exactly).
///
/// ```
/// use safetensors::{tensor::TensorView, Dtype};
/// let bytes: Vec<u8> = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
///     .iter().flat_map(|h| h.to_le_bytes()).collect();
/// let view = TensorView::new(Dtype::F16, vec![2], &bytes).unwrap();
/// assert_eq!(formats::io::tensor_to_f32("w", &view).unwrap(), vec![1.5, -2.0]);
/// ```
pub fn tensor_to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(FormatError::format(
                format!("tensor `{name}`"),
                format!(
                "dtype {other:?} is not a floating-point type this crate reads (f32, f16, bf16)"
            ),
            ))
        }
    };
    Ok(values)
}

/// Little-endian bytes of `f32` values, as safetensors stores them.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor that owns its little-endian bytes, ready to be written to a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// An `f32` tensor; errors when `values.len()` is not the product of `shape`.
    ///
    /// ```
    /// let t = formats::io::OwnedTensor::f32(vec![2], &[1.0, 2.0]).unwrap();
    /// assert_eq!(t.data.len(), 8);
    /// ```
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(FormatError::shape(
                "OwnedTensor::f32",
                format!("{expected} values for shape {shape:?}"),
                values.len(),
            ));
        }
        Ok(Self {
            dtype: Dtype::F32,
            shape,
            data: f32_to_le_bytes(values),
        })
    }

    /// A `u8` tensor; errors when `bytes.len()` is not the product of `shape`.
    pub fn u8(shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != bytes.len() {
            return Err(FormatError::shape(
                "OwnedTensor::u8",
                format!("{expected} bytes for shape {shape:?}"),
                bytes.len(),
            ));
        }
        Ok(Self {
            dtype: Dtype::U8,
            shape,
            data: bytes,
        })
    }

    /// A copy of a tensor read from a file.
    pub fn from_view(view: &TensorView<'_>) -> Self {
        Self {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        }
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serializes named tensors (and optional `__metadata__`) into safetensors bytes.
pub fn serialize_safetensors(
    tensors: &[(String, OwnedTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| FormatError::format("safetensors serialization", e.to_string()))
}

/// Serializes and writes a safetensors file crash-safely (see [`write_atomic`]).
///
/// ```
/// use formats::io::{write_safetensors, OwnedTensor};
/// let dir = std::env::temp_dir().join(format!("formats-st-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("t.safetensors");
/// let t = OwnedTensor::f32(vec![1, 2], &[0.5, -1.0]).unwrap();
/// write_safetensors(&path, &[("w".to_string(), t)], None).unwrap();
/// let bytes = std::fs::read(&path).unwrap();
/// let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
/// assert_eq!(st.tensor("w").unwrap().shape(), &[1, 2]);
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, OwnedTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = serialize_safetensors(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Reads a whole file, with an error that names it.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| FormatError::io(path, "cannot read", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_tensors_are_rejected_with_their_name() {
        let bytes = [0u8; 8];
        let view = TensorView::new(Dtype::I64, vec![1], &bytes).unwrap();
        let err = tensor_to_f32("input_ids", &view).unwrap_err();
        assert!(err.to_string().contains("input_ids"), "{err}");
    }
}
