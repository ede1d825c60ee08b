//! Hugging Face safetensors checkpoints: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, read into a name → tensor store that model builders take
//! tensors out of (so anything left over is an unexpected tensor), and atomic saving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::error::{LmError, Result};

/// A tensor as stored: dtype, shape, little-endian bytes and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    pub file: PathBuf,
}

/// All tensors of a checkpoint by name. Builders [`Checkpoint::take_f32`] what they need;
/// [`Checkpoint::finish`] then reports the first tensor nobody took.
///
/// ```
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama/base");
/// let mut ckpt = lm::Checkpoint::open_dir(dir).unwrap();
/// let norm = ckpt.take_f32("model.norm.weight", &[32]).unwrap();
/// assert_eq!(norm.shape(), &[32]);
/// // A wrong shape names the tensor; what nobody took is reported by `finish`.
/// let err = ckpt.take_f32("lm_head.weight", &[32, 64]).unwrap_err();
/// assert!(err.to_string().contains("lm_head.weight"));
/// assert!(ckpt.finish().unwrap_err().to_string().contains("unexpected tensor"));
/// ```
#[derive(Debug, Default)]
pub struct Checkpoint {
    tensors: BTreeMap<String, StoredTensor>,
}

impl Checkpoint {
    /// Reads `dir/model.safetensors`, or every shard named in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            let mut ckpt = Checkpoint::default();
            ckpt.read_file(&single, None)?;
            return Ok(ckpt);
        }
        if !index.is_file() {
            return Err(LmError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| LmError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LmError::Json {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LmError::Json {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        // shard file → the tensor names the index assigns to it
        let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| LmError::Json {
                path: index.clone(),
                reason: format!("weight_map[{name:?}] is not a file name"),
            })?;
            shards
                .entry(file.to_string())
                .or_default()
                .push(name.clone());
        }
        let mut ckpt = Checkpoint::default();
        for (file, names) in shards {
            ckpt.read_file(&dir.join(&file), Some(&names))?;
        }
        Ok(ckpt)
    }

    /// Reads one safetensors file; with `expected`, only those names (as the index says).
    pub fn read_file(&mut self, path: &Path, expected: Option<&[String]>) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| LmError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| LmError::SafeTensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let names: Vec<String> = match expected {
            Some(names) => names.to_vec(),
            None => st.names().into_iter().map(String::from).collect(),
        };
        for name in names {
            let view = st.tensor(&name).map_err(|e| LmError::SafeTensors {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` listed in the index: {e}"),
            })?;
            self.tensors.insert(
                name,
                StoredTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                    file: path.to_path_buf(),
                },
            );
        }
        Ok(())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<&StoredTensor> {
        self.tensors.get(key)
    }

    /// Removes `key` and returns it as `f32` (from F32, F16 or BF16), checking the shape.
    pub fn take_f32(&mut self, key: &str, expected_shape: &[usize]) -> Result<ArrayD<f32>> {
        let stored = self
            .tensors
            .remove(key)
            .ok_or_else(|| LmError::MissingTensor {
                key: key.to_string(),
                expected: expected_shape.to_vec(),
            })?;
        if stored.shape != expected_shape {
            return Err(LmError::TensorShape {
                key: key.to_string(),
                expected: expected_shape.to_vec(),
                got: stored.shape,
            });
        }
        let values = to_f32(key, stored.dtype, &stored.bytes)?;
        ArrayD::from_shape_vec(IxDyn(&stored.shape), values).map_err(|e| LmError::TensorShape {
            key: format!("{key} ({e})"),
            expected: expected_shape.to_vec(),
            got: stored.shape.clone(),
        })
    }

    /// Removes `key` and returns it as stored (dtype, shape, bytes), if present: for builders
    /// of tensors that are not floating point (bitsandbytes' packed 4-bit parts).
    pub fn take(&mut self, key: &str) -> Option<StoredTensor> {
        self.tensors.remove(key)
    }

    /// Removes `key` if present (tensors a builder knows and deliberately ignores).
    pub fn discard(&mut self, key: &str) {
        self.tensors.remove(key);
    }

    /// Errors with the first tensor no builder took.
    pub fn finish(self) -> Result<()> {
        match self.tensors.into_iter().next() {
            Some((key, t)) => Err(LmError::UnexpectedTensor { key, file: t.file }),
            None => Ok(()),
        }
    }

    /// Names of the tensors not yet taken.
    pub fn remaining(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

fn to_f32(key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(LmError::TensorDtype {
                key: key.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// a crash never leaves a half-written file under the final name.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    // The workspace's one crash-safe write: temp file, fsync, rename, directory fsync.
    quant_core::io::write_atomic(path, bytes)
        .map_err(|e| LmError::io(path, std::io::Error::other(e.to_string())))
}

/// Serializes named `f32` tensors (row-major values + shape) as a safetensors file, atomically.
pub fn save_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(encoded.len());
    for (name, shape, bytes) in &encoded {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(
            |e| LmError::SafeTensors {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {e}"),
            },
        )?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| {
        LmError::SafeTensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    write_atomically(path, &bytes)
}
