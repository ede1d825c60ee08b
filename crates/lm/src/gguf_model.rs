//! A llama.cpp GGUF file as a model source: the config of its family read from the
//! metadata (as transformers' GGUF loading reads it), its tensors under Hugging Face names
//! and layouts, and the model built from them — with every projection either dequantized to
//! `f32` or kept in the file's own ggml blocks as a frozen base.
//!
//! What llama.cpp's converter changed is undone here, as transformers undoes it:
//! - architectures `llama` (Mistral too: `general.name` containing "mistral"), `qwen2`, `qwen3`,
//!   `gemma2`, `gemma3`, `phi3` map to their transformers `model_type`;
//! - for `llama`, the rows of `attn_q` / `attn_k` (weights and biases) go back from the
//!   interleaved rotary pairs to Hugging Face's halves. The rows are moved as whole runs of
//!   stored bytes (a row is a whole number of blocks), so a quantized tensor is un-permuted
//!   without being decoded;
//! - Gemma's norms are stored as `1 + w`: 1 is subtracted again;
//! - embeddings are tied when `output.weight` is absent.
//!
//! Every tensor's shape is checked against the sizes the metadata gives before any of its data
//! is read, and errors name the GGUF key or tensor ([`LmError::Gguf`]). The byte ranges of the
//! tensors were checked inside the file when its header was read, so nothing is allocated from
//! an unchecked size.
//!
//! ```
//! use lm::gguf_model::GgufModelFile;
//! use lm::LlamaModel;
//! let dir = std::env::temp_dir().join(format!("lm-gguf-model-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! // A tiny Llama written as GGUF by the exporter, read back as a model source.
//! let base = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama/base");
//! let path = dir.join("tiny.gguf");
//! lm::gguf::export_gguf(base.as_ref(), None, &path, quant_core::ggml::GgmlType::F32).unwrap();
//! let source = GgufModelFile::open(&path).unwrap();
//! assert_eq!(source.config().num_key_value_heads, 2);
//! let from_gguf = source.load_dequantized().unwrap();
//! let from_dir = LlamaModel::from_pretrained(base).unwrap();
//! assert_eq!(from_gguf.embed_tokens(), from_dir.embed_tokens());
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::GgmlBase;
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use quant_core::ggml::{self, GgmlType};
use quant_core::gguf::{GgufFile, TensorInfo};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::embedding::TokenEmbedding;
use crate::error::{LmError, Result};
use crate::family::Family;
use crate::gguf::names::{FamilyNames, HeadGroup, Transform};
use crate::gguf_config::{config_json, family_of, gguf_err};
use crate::linear::LinearModule;
use crate::model::LlamaModel;
use crate::param::Parameter;
use crate::rope::RopeScaling;
use crate::source::ModelSource;

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A GGUF model file opened as a model source (header read, config derived, names mapped,
/// shapes checked; no tensor data read yet).
#[derive(Debug, Clone)]
pub struct GgufModelFile {
    file: GgufFile,
    /// `general.architecture` as written.
    arch: String,
    family: Family,
    config_json: Value,
    config: LlamaConfig,
    /// Hugging Face tensor name → (GGUF tensor name, how its values were changed), for every
    /// tensor of the file (from the one table, [`FamilyNames`]).
    names: BTreeMap<String, (String, Transform)>,
    /// `rope_freqs` divisors no Llama 3 parameters regenerate (the config's rope is then
    /// [`RopeScaling::Factors`] and `config_json` cannot state it).
    explicit_rope_factors: Option<Vec<f32>>,
}

impl GgufModelFile {
    /// Reads the header of `path`, derives the family's config from its metadata and maps and
    /// checks every tensor.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path.as_ref())?;
        let arch = file
            .metadata_str("general.architecture")
            .ok_or_else(|| gguf_err(&file, "general.architecture", "missing (or not a string)"))?
            .to_string();
        let family = family_of(&file, &arch)?;
        let table = FamilyNames::of(family);
        let mut names = BTreeMap::new();
        for info in &file.tensors {
            if table.extra(&info.name).is_some() {
                // Per-frequency rope tensors: read into the config (`gguf_config`).
                continue;
            }
            let mapped = table.to_hf(&info.name).ok_or_else(|| {
                gguf_err(
                    &file,
                    &info.name,
                    format!("a tensor llama.cpp's `{arch}` architecture does not define"),
                )
            })?;
            names.insert(mapped.name, (info.name.clone(), mapped.transform));
        }
        let derived = config_json(&file, &arch, family)?;
        let config_json = derived.json;
        let mut config = LlamaConfig::from_json_value(&config_json).map_err(|e| LmError::Gguf {
            path: file.path.clone(),
            key: format!("{arch}.*"),
            reason: format!("the config derived from the metadata is invalid: {e}"),
        })?;
        let explicit_rope_factors = derived.explicit_rope_factors;
        if let Some(factors) = &explicit_rope_factors {
            // Llama has one rope; it rotates with the stored divisors as llama.cpp does.
            for rope in &mut config.architecture.ropes {
                rope.scaling = RopeScaling::Factors {
                    factors: factors.clone(),
                };
            }
        }
        let source = GgufModelFile {
            file,
            arch,
            family,
            config_json,
            config,
            names,
            explicit_rope_factors,
        };
        source.check_shapes()?;
        Ok(source)
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The parsed header (metadata and tensor infos).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// `general.architecture` as the file says it.
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The model's config (resolved as `config.json` would be).
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The `config.json` of the family derived from the metadata (what `convert` writes).
    /// It states the model's rope exactly unless [`Self::explicit_rope_factors`] is `Some`.
    pub fn config_json(&self) -> &Value {
        &self.config_json
    }

    /// The file's `rope_freqs` divisors when no Llama 3 `rope_parameters` regenerate them bit
    /// for bit: the model rotates with them ([`RopeScaling::Factors`]), and no transformers
    /// config can say so (`convert` and `merge` refuse such a file).
    pub fn explicit_rope_factors(&self) -> Option<&[f32]> {
        self.explicit_rope_factors.as_deref()
    }

    /// The Hugging Face names of the file's tensors, sorted.
    pub fn hf_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The GGUF tensor behind Hugging Face tensor `hf`.
    pub fn tensor_info(&self, hf: &str) -> Result<&TensorInfo> {
        self.names
            .get(hf)
            .and_then(|(g, _)| self.file.tensor(g))
            .ok_or_else(|| LmError::MissingTensor {
                key: format!("{hf} (in {})", self.file.path.display()),
                expected: Vec::new(),
            })
    }

    /// Bytes of tensor data in the file (what a quantized base keeps resident).
    pub fn tensor_bytes(&self) -> u64 {
        self.file.tensors.iter().map(|t| t.size).sum()
    }

    /// The stored blocks of Hugging Face tensor `hf` with Hugging Face's row order restored
    /// (llama's Q/K rows moved as whole runs of bytes; nothing decoded): `(type, row-major
    /// shape, bytes)`.
    pub fn read_blocks(&self, hf: &str) -> Result<(GgmlType, Vec<usize>, Vec<u8>)> {
        let info = self.tensor_info(hf)?;
        let bytes = self.file.read_tensor_bytes(&info.name)?;
        let bytes = match self.rope_heads(hf) {
            Some(heads) => {
                // Rows: the first dimension of a matrix; a bias is a row per element.
                let rows = info.shape[0];
                if info.shape.len() == 1 && info.ty.block_values() != 1 {
                    return Err(gguf_err(
                        &self.file,
                        &info.name,
                        format!("a 1-D rotary bias stored as {} blocks", info.ty.name()),
                    ));
                }
                unpermute_rope_row_runs(&bytes, rows, heads).map_err(|reason| {
                    gguf_err(&self.file, &info.name, format!("{reason} ({heads} heads)"))
                })?
            }
            None => bytes,
        };
        Ok((info.ty, info.shape.clone(), bytes))
    }

    /// Hugging Face tensor `hf` decoded to `f32` (ggml's dequantization), in Hugging Face's
    /// layout and convention (rows un-permuted, Gemma's norms without the stored `+1`).
    pub fn read_f32(&self, hf: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (ty, shape, bytes) = self.read_blocks(hf)?;
        let n: usize = shape.iter().product();
        let mut values = ggml::dequantize(ty, &bytes, n).map_err(|e| {
            gguf_err(
                &self.file,
                &self.names[hf].0,
                format!("dequantizing {}: {e}", ty.name()),
            )
        })?;
        if self.gemma_norm_shift(hf) {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok((shape, values))
    }

    /// The model with every projection dequantized to a dense `f32` weight.
    pub fn load_dequantized(&self) -> Result<LlamaModel> {
        self.load(GgufBase::Dequantized)
    }

    /// The model with every projection a frozen base over the file's own ggml blocks
    /// ([`LinearModule::ggml`]) and the token embedding in its blocks too
    /// ([`TokenEmbedding::Ggml`]): the resident base bytes are about the file's.
    pub fn load_quantized(&self) -> Result<LlamaModel> {
        self.load(GgufBase::Blocks)
    }

    /// The model with projections and the token embedding (hence a tied head) as `base`
    /// says; norms and biases are `f32`.
    pub fn load(&self, base: GgufBase) -> Result<LlamaModel> {
        LlamaModel::from_source(self.config.clone(), &mut GgufSource { file: self, base })
    }

    /// Heads whose rows llama.cpp permuted in tensor `hf` (llama's Q and K), if any.
    fn rope_heads(&self, hf: &str) -> Option<usize> {
        match self.names.get(hf)?.1 {
            Transform::RopeRows(HeadGroup::Query) => Some(self.config.num_attention_heads),
            Transform::RopeRows(HeadGroup::KeyValue) => Some(self.config.num_key_value_heads),
            _ => None,
        }
    }

    /// Whether tensor `hf` is stored as `1 + w` (Gemma's norms).
    fn gemma_norm_shift(&self, hf: &str) -> bool {
        self.names
            .get(hf)
            .is_some_and(|(_, t)| *t == Transform::PlusOne)
    }

    /// Every tensor the model needs is present with the shape the metadata implies, and the
    /// file holds nothing else.
    fn check_shapes(&self) -> Result<()> {
        let expected = expected_shapes(&self.config);
        for (hf, shape) in &expected {
            let Some((gguf, _)) = self.names.get(hf) else {
                return Err(LmError::Gguf {
                    path: self.file.path.clone(),
                    key: gguf_name_hint(self.family, hf),
                    reason: format!("missing (Hugging Face {hf}, shape {shape:?})"),
                });
            };
            let info = self.file.tensor(gguf).expect("names come from the file");
            if &info.shape != shape {
                return Err(gguf_err(
                    &self.file,
                    gguf,
                    format!(
                        "shape {:?} disagrees with the metadata ({hf} must be {shape:?} for \
                         {}.embedding_length = {}, head counts {}/{}, head_dim {}, \
                         feed_forward_length = {}, vocabulary {})",
                        info.shape,
                        self.arch,
                        self.config.hidden_size,
                        self.config.num_attention_heads,
                        self.config.num_key_value_heads,
                        self.config.head_dim,
                        self.config.intermediate_size,
                        self.config.vocab_size
                    ),
                ));
            }
        }
        for (hf, (gguf, _)) in &self.names {
            if !expected.contains_key(hf) {
                return Err(gguf_err(
                    &self.file,
                    gguf,
                    format!("unexpected for this config (as {hf})"),
                ));
            }
        }
        Ok(())
    }
}

impl LlamaModel {
    /// A model from a GGUF file with every projection dequantized to `f32`
    /// ([`GgufModelFile::load_dequantized`]).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        GgufModelFile::open(path)?.load_dequantized()
    }

    /// A model from a Hugging Face directory ([`LlamaModel::from_pretrained`]) or a GGUF file
    /// ([`LlamaModel::from_gguf`]), whichever `path` is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_gguf_file(path) {
            Self::from_gguf(path)
        } else {
            Self::from_pretrained(path)
        }
    }
}

/// What a GGUF file's projections become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufBase {
    /// Decoded to dense `f32` weights (what transformers' GGUF loading does).
    Dequantized,
    /// Kept as the file's ggml blocks ([`GgmlBase`], products tile by tile).
    Blocks,
}

/// A [`GgufModelFile`] as the [`ModelSource`] of a model. Shapes were all checked when the
/// file was opened (and every tensor of the file is one the model takes), so nothing can be
/// left over.
pub struct GgufSource<'a> {
    pub file: &'a GgufModelFile,
    pub base: GgufBase,
}

impl ModelSource for GgufSource<'_> {
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let (stored, values) = self.file.read_f32(name)?;
        if stored != shape {
            return Err(LmError::TensorShape {
                key: format!("{name} (GGUF {})", self.file.names[name].0),
                expected: shape.to_vec(),
                got: stored,
            });
        }
        ArrayD::from_shape_vec(IxDyn(shape), values)
            .map_err(|e| LmError::shape(name, format!("{shape:?}"), e))
    }

    /// Over [`GgufBase::Blocks`] the embedding stays in the file's blocks (rows decoded per
    /// lookup, the tied head a tiled product); otherwise it is decoded to `f32`.
    fn take_embedding(
        &mut self,
        name: &str,
        (vocab, hidden): (usize, usize),
    ) -> Result<TokenEmbedding> {
        let (ty, stored, blocks) = self.file.read_blocks(name)?;
        if stored != [vocab, hidden] {
            return Err(LmError::TensorShape {
                key: format!("{name} (GGUF {})", self.file.names[name].0),
                expected: vec![vocab, hidden],
                got: stored,
            });
        }
        match self.base {
            GgufBase::Blocks => Ok(TokenEmbedding::Ggml(GgmlBase::from_blocks(
                ty, blocks, vocab, hidden, None, name,
            )?)),
            GgufBase::Dequantized => {
                let values = ggml::dequantize(ty, &blocks, vocab * hidden).map_err(|e| {
                    gguf_err(
                        &self.file.file,
                        &self.file.names[name].0,
                        format!("dequantizing {}: {e}", ty.name()),
                    )
                })?;
                let e = Array2::from_shape_vec((vocab, hidden), values)
                    .map_err(|e| LmError::shape(name, format!("({vocab}, {hidden})"), e))?;
                Ok(TokenEmbedding::Dense(Parameter::new(e)))
            }
        }
    }

    fn take_linear(
        &mut self,
        path: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<LinearModule> {
        let key = format!("{path}.weight");
        let bias = if bias {
            let (_, b) = self.file.read_f32(&format!("{path}.bias"))?;
            Some(Array1::from_vec(b))
        } else {
            None
        };
        let (ty, stored, blocks) = self.file.read_blocks(&key)?;
        if stored != [out, inp] {
            return Err(LmError::TensorShape {
                key: format!("{key} (GGUF {})", self.file.names[&key].0),
                expected: vec![out, inp],
                got: stored,
            });
        }
        match self.base {
            GgufBase::Blocks => Ok(LinearModule::ggml(GgmlBase::from_blocks(
                ty, blocks, out, inp, bias, path,
            )?)),
            GgufBase::Dequantized => {
                let values = ggml::dequantize(ty, &blocks, out * inp).map_err(|e| {
                    gguf_err(
                        &self.file.file,
                        &self.file.names[&key].0,
                        format!("dequantizing {}: {e}", ty.name()),
                    )
                })?;
                let w = Array2::from_shape_vec((out, inp), values)
                    .map_err(|e| LmError::shape(&key, format!("({out}, {inp})"), e))?;
                Ok(LinearModule::dense(w, bias))
            }
        }
    }
}

/// The GGUF name of Hugging Face tensor `hf`, to name a missing tensor.
fn gguf_name_hint(family: Family, hf: &str) -> String {
    FamilyNames::of(family)
        .to_gguf(hf)
        .ok()
        .flatten()
        .map(|m| m.name)
        .unwrap_or_else(|| hf.to_string())
}

/// The bytes of `rows` equal runs (rows of whole blocks) with llama.cpp's rotary row order
/// undone: Hugging Face row `h·head + j·half + i` comes from GGUF row `h·head + 2·i + j`.
pub fn unpermute_rope_row_runs(
    bytes: &[u8],
    rows: usize,
    n_head: usize,
) -> std::result::Result<Vec<u8>, String> {
    if n_head == 0 || rows % (2 * n_head) != 0 || rows == 0 || bytes.len() % rows != 0 {
        return Err(format!(
            "{rows} rows of {} bytes cannot be split into heads of pairs of rows",
            bytes.len()
        ));
    }
    let run = bytes.len() / rows;
    let head = rows / n_head;
    let half = head / 2;
    let mut out = Vec::with_capacity(bytes.len());
    for r in 0..rows {
        let (h, rem) = (r / head, r % head);
        let (j, i) = (rem / half, rem % half);
        let from = h * head + 2 * i + j;
        out.extend_from_slice(&bytes[from * run..(from + 1) * run]);
    }
    Ok(out)
}

/// Every tensor of a model of `c` with its shape, by Hugging Face name.
fn expected_shapes(c: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (d, v, hd) = (c.hidden_size, c.vocab_size, c.head_dim);
    let arch = &c.architecture;
    let mut out = BTreeMap::new();
    out.insert("model.embed_tokens.weight".to_string(), vec![v, d]);
    out.insert("model.norm.weight".to_string(), vec![d]);
    for (module, (rows, cols)) in crate::config::projection_shapes(c) {
        if module != "lm_head" {
            let name = module.rsplit_once("layers.").map(|(_, n)| n).unwrap_or("");
            let below = name.split_once('.').map(|(_, n)| n).unwrap_or("");
            if arch.has_bias(below) {
                out.insert(format!("{module}.bias"), vec![rows]);
            }
        }
        out.insert(format!("{module}.weight"), vec![rows, cols]);
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut norms = vec![("input_layernorm", d), ("post_attention_layernorm", d)];
        if arch.sandwich_norms {
            norms.extend([
                ("pre_feedforward_layernorm", d),
                ("post_feedforward_layernorm", d),
            ]);
        }
        if arch.qk_norm {
            norms.extend([("self_attn.q_norm", hd), ("self_attn.k_norm", hd)]);
        }
        for (name, len) in norms {
            out.insert(format!("{p}.{name}.weight"), vec![len]);
        }
    }
    out
}
