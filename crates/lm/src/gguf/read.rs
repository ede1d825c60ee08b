//! Reading a GGUF model file back under Hugging Face names and layouts, with the family's row
//! of [`super::names`] in the inverse direction (Q/K rows un-permuted, Gemma norms `−1`, which
//! returns the exported f32 weight to within f32 spacing around 1, 2^-23).

use std::path::Path;

use quant_core::gguf::{GgufFile, GgufValue, ReadTensorF32};

use super::metadata::{arch_key, keys};
use super::names::FamilyNames;
use super::NamedTensor;
use crate::error::{LmError, Result};

/// A GGUF model's tensors under Hugging Face names.
#[derive(Debug, Clone)]
pub struct GgufTensors {
    /// The file's `general.architecture`.
    pub arch: String,
    /// The table row it was read with (`llama` reads as [`crate::Family::Llama`]).
    pub names: &'static FamilyNames,
    /// `(Hugging Face name, row-major shape, f32 values)` in file order.
    pub tensors: Vec<NamedTensor>,
    /// The extra tensors (`rope_freqs.weight`, ...) under their GGUF names, as stored.
    pub extras: Vec<NamedTensor>,
}

/// The tensors of a GGUF model file of one of the table's architectures, dequantized to `f32`
/// and put back in Hugging Face's layout. The head counts for the row permutation come from
/// the file's `{arch}.attention.head_count[_kv]`. A tensor the table has no row for is an
/// error naming it.
pub fn read_gguf(path: &Path) -> Result<GgufTensors> {
    let file = GgufFile::open(path)?;
    let arch = file
        .metadata_str("general.architecture")
        .ok_or_else(|| LmError::Config {
            key: "general.architecture".into(),
            reason: format!("missing from {}", path.display()),
        })?
        .to_string();
    let names = FamilyNames::for_arch(&arch).ok_or_else(|| LmError::Unsupported {
        key: "general.architecture".into(),
        value: arch.clone(),
        reason: format!(
            "architectures read: {}",
            FamilyNames::architectures().join(", ")
        ),
    })?;
    let count = |key: &str| -> Result<usize> {
        let key = arch_key(&arch, key);
        file.metadata(&key)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| LmError::Config {
                key: key.clone(),
                reason: format!("missing from {}", path.display()),
            })
    };
    let heads = (count(keys::HEAD_COUNT)?, count(keys::HEAD_COUNT_KV)?);
    let mut out = GgufTensors {
        arch: arch.clone(),
        names,
        tensors: Vec::new(),
        extras: Vec::new(),
    };
    for info in &file.tensors {
        if names.extra(&info.name).is_some() {
            let values = file.read_tensor_f32(&info.name)?;
            out.extras
                .push((info.name.clone(), info.shape.clone(), values));
            continue;
        }
        let mapped = names
            .to_hf(&info.name)
            .ok_or_else(|| LmError::UnknownName {
                what: format!("GGUF `{arch}` tensor"),
                name: info.name.clone(),
            })?;
        let values = file.read_tensor_f32(&info.name)?;
        let values = mapped.transform.to_hf(values, &info.shape, heads)?;
        out.tensors.push((mapped.name, info.shape.clone(), values));
    }
    Ok(out)
}
