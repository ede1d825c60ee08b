//! A checkpoint directory opened without loading it: only `config.json` and the safetensors
//! headers are read; each tensor is fetched (and, for a bitsandbytes 4-bit base, dequantized)
//! when asked for. This is what the streaming merge and the GGUF export walk through, one
//! tensor at a time, so their peak memory is about one weight matrix, not the model.
//! A GGUF model file opens the same way ([`crate::gguf_model`]): its tensors appear under
//! their Hugging Face names as `f32` (decoded when read) with the family's `config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use quant_core::nf4::bnb_layout::{from_bnb_tensors, BnbDtype, BnbTensor};
use quant_core::nf4::FourBitTensor;
use quant_core::safetensors_stream::SafetensorsReader;
use safetensors::Dtype;
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::gguf_model::{is_gguf_file, GgufModelFile};
use crate::linear::LinearModule;
use crate::source::{bias_of, nf4_linear, take_matrix, ModelSource};

/// How a logical weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredAs {
    /// A floating-point tensor (F32, F16 or BF16).
    Float(Dtype),
    /// A bitsandbytes 4-bit weight (`X`, `X.absmax`, `X.quant_map`, ... `X.quant_state.*`).
    Bnb4,
}

/// One logical tensor of the checkpoint: a float tensor or a whole bnb 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LogicalTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub stored: StoredAs,
    shard: usize,
}

/// The headers of a checkpoint directory (see the module docs).
///
/// ```
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama/base");
/// let ckpt = lm::lazy_checkpoint::LazyCheckpoint::open(dir).unwrap();
/// assert_eq!(ckpt.tensor("model.norm.weight").unwrap().shape, vec![32]);
/// assert_eq!(ckpt.read_f32("model.norm.weight").unwrap().len(), 32);
/// assert_eq!(ckpt.linear_shapes()["model.layers.0.self_attn.k_proj"], (16, 32));
/// ```
#[derive(Clone, Debug)]
pub struct LazyCheckpoint {
    pub dir: PathBuf,
    /// `config.json` parsed as a Llama config.
    pub config: LlamaConfig,
    /// `config.json` as written (unknown keys kept, for copying).
    pub config_json: Value,
    shards: Vec<SafetensorsReader>,
    tensors: BTreeMap<String, LogicalTensor>,
    /// Set when the source is a GGUF file (then `shards` is empty).
    gguf: Option<Box<GgufModelFile>>,
}

const BNB_PARTS: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

impl LazyCheckpoint {
    /// Reads `dir/config.json` and the headers of `model.safetensors` or of every shard of
    /// `model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if is_gguf_file(dir) {
            return Self::open_gguf(dir);
        }
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| LmError::io(&config_path, e))?;
        let config_json: Value = serde_json::from_str(&text).map_err(|e| LmError::Json {
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
        let config = LlamaConfig::from_json_value(&config_json)?;
        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for file in files {
            let reader = SafetensorsReader::open(&file)?;
            let shard = shards.len();
            // bnb weights first: their parts are hidden behind the weight's name.
            let mut hidden = std::collections::BTreeSet::new();
            for name in reader.tensors.keys() {
                let Some(weight) = name
                    .strip_suffix(".quant_state.bitsandbytes__nf4")
                    .or_else(|| name.strip_suffix(".quant_state.bitsandbytes__fp4"))
                else {
                    continue;
                };
                let state = reader.read_bytes(name)?;
                let json: Value = serde_json::from_slice(&state).map_err(|e| LmError::Json {
                    path: file.clone(),
                    reason: format!("{name}: {e}"),
                })?;
                let shape: Vec<usize> = json
                    .get("shape")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .ok_or_else(|| LmError::Json {
                        path: file.clone(),
                        reason: format!("{name}: no integer list \"shape\""),
                    })?;
                hidden.insert(name.clone());
                hidden.insert(weight.to_string());
                for part in BNB_PARTS {
                    hidden.insert(format!("{weight}{part}"));
                }
                tensors.insert(
                    weight.to_string(),
                    LogicalTensor {
                        name: weight.to_string(),
                        shape,
                        stored: StoredAs::Bnb4,
                        shard,
                    },
                );
            }
            for (name, info) in &reader.tensors {
                if hidden.contains(name) {
                    continue;
                }
                if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    return Err(LmError::TensorDtype {
                        key: name.clone(),
                        dtype: format!("{:?}", info.dtype),
                    });
                }
                tensors.insert(
                    name.clone(),
                    LogicalTensor {
                        name: name.clone(),
                        shape: info.shape.clone(),
                        stored: StoredAs::Float(info.dtype),
                        shard,
                    },
                );
            }
            shards.push(reader);
        }
        Ok(LazyCheckpoint {
            dir: dir.to_path_buf(),
            config,
            config_json,
            shards,
            tensors,
            gguf: None,
        })
    }

    /// A GGUF model file: tensors under their Hugging Face names, each decoded to `f32` (rows
    /// un-permuted, Gemma norms shifted back) when read.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let source = GgufModelFile::open(path)?;
        if source.explicit_rope_factors().is_some() {
            return Err(LmError::Gguf {
                path: path.to_path_buf(),
                key: "rope_freqs.weight".into(),
                reason: "these per-frequency rope divisors are not those of any Llama 3 \
                         rope_parameters (searched: low/high_freq_factor pairs, whole \
                         original_max_position_embeddings), so no config.json can state them"
                    .into(),
            });
        }
        let mut tensors = BTreeMap::new();
        for name in source.hf_names() {
            let info = source.tensor_info(name)?;
            tensors.insert(
                name.to_string(),
                LogicalTensor {
                    name: name.to_string(),
                    shape: info.shape.clone(),
                    stored: StoredAs::Float(Dtype::F32),
                    shard: 0,
                },
            );
        }
        Ok(LazyCheckpoint {
            dir: path.to_path_buf(),
            config: source.config().clone(),
            config_json: source.config_json().clone(),
            shards: Vec::new(),
            tensors,
            gguf: Some(Box::new(source)),
        })
    }

    /// The GGUF file this checkpoint reads, if it is one.
    pub fn gguf(&self) -> Option<&GgufModelFile> {
        self.gguf.as_deref()
    }

    /// The logical tensors by name (sorted).
    pub fn tensors(&self) -> impl Iterator<Item = &LogicalTensor> {
        self.tensors.values()
    }

    pub fn tensor(&self, name: &str) -> Option<&LogicalTensor> {
        self.tensors.get(name)
    }

    /// Whether any weight is stored as bnb 4-bit.
    pub fn has_bnb4(&self) -> bool {
        self.tensors.values().any(|t| t.stored == StoredAs::Bnb4)
    }

    /// Total stored bytes of the tensor files (for memory reports).
    pub fn stored_bytes(&self) -> u64 {
        if let Some(g) = &self.gguf {
            return g.tensor_bytes();
        }
        self.shards
            .iter()
            .flat_map(|s| s.tensors.values())
            .map(|t| t.len)
            .sum()
    }

    /// `(out, in)` of every projection by module path (`model.layers.{i}.self_attn.q_proj`,
    /// ..., and `lm_head` when untied), from the config.
    pub fn linear_shapes(&self) -> BTreeMap<String, (usize, usize)> {
        linear_shapes(&self.config)
    }

    /// Tensor `name` as `f32` values, row-major (a bnb weight dequantized).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| LmError::MissingTensor {
            key: name.to_string(),
            expected: vec![],
        })?;
        if let Some(g) = &self.gguf {
            return Ok(g.read_f32(name)?.1);
        }
        let reader = &self.shards[t.shard];
        match t.stored {
            StoredAs::Float(_) => Ok(reader.read_f32(name)?),
            StoredAs::Bnb4 => Ok(self
                .read_bnb4(name)?
                .dequantize()
                .into_raw_vec_and_offset()
                .0),
        }
    }

    /// The 4-bit weight `name` as stored.
    pub fn read_bnb4(&self, name: &str) -> Result<FourBitTensor> {
        let t = self.tensor(name).ok_or_else(|| LmError::MissingTensor {
            key: name.to_string(),
            expected: vec![],
        })?;
        if self.gguf.is_some() {
            return Err(LmError::Gguf {
                path: self.dir.clone(),
                key: name.to_string(),
                reason: "a GGUF tensor is not a bitsandbytes 4-bit weight".into(),
            });
        }
        let reader = &self.shards[t.shard];
        let mut failure: Option<LmError> = None;
        let result = from_bnb_tensors(name, |key| {
            let info = reader.info(key)?;
            let dtype = match info.dtype {
                Dtype::U8 => BnbDtype::U8,
                Dtype::F32 => BnbDtype::F32,
                _ => return None,
            };
            match reader.read_bytes(key) {
                Ok(bytes) => Some(BnbTensor {
                    dtype,
                    shape: info.shape.clone(),
                    bytes,
                }),
                Err(e) => {
                    failure.get_or_insert(e.into());
                    None
                }
            }
        });
        match (result, failure) {
            (Err(_), Some(e)) => Err(e),
            (r, _) => Ok(r?),
        }
    }
}

pub use crate::config::projection_shapes as linear_shapes;

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| {
        LmError::io(
            &index,
            std::io::Error::new(
                e.kind(),
                format!("neither model.safetensors nor a readable index: {e}"),
            ),
        )
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| LmError::Json {
        path: index.clone(),
        reason: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| LmError::Json {
            path: index.clone(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut files = std::collections::BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| LmError::Json {
            path: index.clone(),
            reason: format!("weight_map[{name:?}] is not a file name"),
        })?;
        files.insert(file.to_string());
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// A lazily opened checkpoint: each tensor is read from its shard when taken; a projection
/// the file stores as bnb 4-bit becomes an NF4 base, any other a dense `f32` one. Nothing is
/// removed (the files are read-only), so taking a tensor twice reads it twice.
impl ModelSource for LazyCheckpoint {
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let t = self.tensor(name).ok_or_else(|| LmError::MissingTensor {
            key: name.to_string(),
            expected: shape.to_vec(),
        })?;
        if t.shape != shape {
            return Err(LmError::TensorShape {
                key: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        let values = self.read_f32(name)?;
        ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| LmError::TensorShape {
            key: format!("{name} ({e})"),
            expected: shape.to_vec(),
            got: shape.to_vec(),
        })
    }

    fn take_linear(
        &mut self,
        path: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<LinearModule> {
        let weight_key = format!("{path}.weight");
        let bnb4 = self
            .tensor(&weight_key)
            .is_some_and(|t| t.stored == StoredAs::Bnb4);
        if !bnb4 {
            let weight = take_matrix(self, &weight_key, [out, inp])?;
            let bias = bias_of(self, path, out, bias)?;
            return Ok(LinearModule::dense(weight, bias));
        }
        let tensor = self.read_bnb4(&weight_key)?;
        nf4_linear(self, tensor, path, (out, inp), bias)
    }
}
