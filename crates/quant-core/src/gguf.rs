//! The GGUF container (the `formats` crate's [`formats::gguf`], re-exported here under its old
//! path) plus what needs ggml's quantizers: reading a tensor as `f32` and writing `f32` values
//! as the declared type ([`ReadTensorF32`], [`WriteTensorF32`]).
//!
//! ```
//! use quant_core::ggml::GgmlType;
//! use quant_core::gguf::{GgufFile, GgufValue, GgufWriter, ReadTensorF32, TensorSpec, WriteTensorF32};
//! let dir = std::env::temp_dir().join(format!("qc-gguf-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("t.gguf");
//! let meta = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
//! let specs = vec![TensorSpec::new("w", vec![2, 32], GgmlType::Q8_0)];
//! let mut writer = GgufWriter::create(&path, &meta, &specs).unwrap();
//! let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
//! writer.write_tensor_f32("w", &values).unwrap();
//! writer.finish().unwrap();
//! let file = GgufFile::open(&path).unwrap();
//! assert_eq!(file.tensor("w").unwrap().shape, vec![2, 32]);
//! let back = file.read_tensor_f32("w").unwrap();
//! assert!((back[63] - 63.0 / 8.0).abs() < 0.05);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub use formats::gguf::*;

use crate::error::{QuantError, Result};
use crate::ggml::{self, GgmlType};

/// Reading a GGUF tensor decoded to `f32` (ggml's dequantization of its blocks).
pub trait ReadTensorF32 {
    /// Tensor `name` decoded to `f32`, row-major.
    fn read_tensor_f32(&self, name: &str) -> Result<Vec<f32>>;
}

impl ReadTensorF32 for GgufFile {
    fn read_tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let bytes = self.read_tensor_bytes(name)?;
        let info = self.tensor(name).expect("read above");
        ggml::dequantize(info.ty, &bytes, info.shape.iter().product())
            .map_err(|e| QuantError::format(format!("GGUF tensor {name}"), e.to_string()))
    }
}

/// Writing `f32` values into a GGUF file as the tensor's declared type.
pub trait WriteTensorF32 {
    /// Encodes `values` as the declared type of tensor `name` (ggml's reference quantizer)
    /// and appends them; `name` must be the next tensor declared.
    fn write_tensor_f32(&mut self, name: &str, values: &[f32]) -> Result<()>;
}

impl WriteTensorF32 for GgufWriter {
    fn write_tensor_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let ty = self
            .next_tensor()
            .filter(|i| i.name == name)
            .map(|i| i.ty)
            .unwrap_or(GgmlType::F32);
        let bytes = ggml::quantize(ty, values)
            .map_err(|e| QuantError::format(format!("GGUF tensor {name}"), e.to_string()))?;
        Ok(self.write_tensor(name, &bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_tensors_round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("qc-gguf-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.gguf");
        let specs = vec![
            TensorSpec::new("n", vec![3], GgmlType::F32),
            TensorSpec::new("q", vec![2, 32], GgmlType::Q4_0),
        ];
        let mut w = GgufWriter::create(&path, &[], &specs).unwrap();
        w.write_tensor_f32("n", &[1.0, 2.0, 3.0]).unwrap();
        let q: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 4.0).collect();
        w.write_tensor_f32("q", &q).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.read_tensor_f32("n").unwrap(), vec![1.0, 2.0, 3.0]);
        let expected = ggml::dequantize(
            GgmlType::Q4_0,
            &ggml::quantize(GgmlType::Q4_0, &q).unwrap(),
            64,
        )
        .unwrap();
        assert_eq!(f.read_tensor_f32("q").unwrap(), expected);
        assert!(f.read_tensor_f32("missing").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
