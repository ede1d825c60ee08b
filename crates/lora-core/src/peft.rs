//! PEFT's adapter files: `adapter_config.json` and `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module>.lora_A.weight` `[r, in]`,
//! `base_model.model.<module>.lora_B.weight` `[out, r]` and, for DoRA,
//! `base_model.model.<module>.lora_magnitude_vector` `[out]` (no `.weight` suffix in the
//! adapter file). Tensors are little-endian `f32`, `f16` or `bf16` — most published adapters
//! are stored in half precision — and are widened to `f32` exactly on reading; saving writes
//! the [`SaveDtype`] asked for (`f32` by default; `f16`/`bf16` round to nearest even, and a
//! finite value outside `f16`'s range is an error naming the key). Saving writes each file to a
//! temporary name in the same directory and renames it over the old one, so a failed save
//! leaves the previous files whole.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use ndarray::{Array1, Array2};
use safetensors::{Dtype, SafeTensors};

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::base::FrozenBase;
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::linear::LoraLinear;
use crate::set::AdapterSet;

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every key.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The element type [`save_adapters_as`] writes the adapter tensors in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SaveDtype {
    /// Little-endian `f32`, exact.
    #[default]
    F32,
    /// IEEE half, round to nearest even (PEFT's `torch_dtype=float16` files).
    F16,
    /// bfloat16, round to nearest even.
    Bf16,
}

impl SaveDtype {
    /// `"f32"`, `"f16"` or `"bf16"` (also `float32`, `float16`, `bfloat16`).
    ///
    /// ```
    /// use lora_core::peft::SaveDtype;
    /// assert_eq!(SaveDtype::from_name("bf16").unwrap(), SaveDtype::Bf16);
    /// assert!(SaveDtype::from_name("f8").unwrap_err().to_string().contains("save_dtype"));
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(SaveDtype::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(SaveDtype::F16),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            _ => Err(LoraError::option(
                "save_dtype",
                format!("{name:?}"),
                "must be f32, f16 or bf16",
            )),
        }
    }

    /// The name `from_name` reads.
    pub fn name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "f32",
            SaveDtype::F16 => "f16",
            SaveDtype::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this type; a finite value that overflows `f16` is
    /// an error naming `key` and the index.
    fn encode(self, key: &str, file: &Path, values: &[f32]) -> Result<Vec<u8>> {
        match self {
            SaveDtype::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            SaveDtype::Bf16 => Ok(values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect()),
            SaveDtype::F16 => {
                let mut out = Vec::with_capacity(values.len() * 2);
                for (i, &v) in values.iter().enumerate() {
                    let h = half::f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        return Err(LoraError::Key {
                            file: file.to_path_buf(),
                            key: key.to_string(),
                            reason: format!(
                                "value {v} at flat index {i} is outside f16's range (±65504); \
                                 save as bf16 or f32"
                            ),
                        });
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
                Ok(out)
            }
        }
    }
}

/// The weights of one module's adapter as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterWeights {
    /// `lora_A`, `(r, in)`.
    pub a: Array2<f32>,
    /// `lora_B`, `(out, r)`.
    pub b: Array2<f32>,
    /// `lora_magnitude_vector`, `(out)`, for DoRA.
    pub magnitude: Option<Array1<f32>>,
}

/// A read adapter: its config and weights by module path.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedAdapter {
    /// The config as read (unknown fields kept).
    pub config: LoraConfig,
    /// Weights by module path (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, AdapterWeights>,
}

fn key_a(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}
fn key_b(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}
fn key_m(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_magnitude_vector")
}

/// Reads the adapter in `dir` for modules of the given `(out, in)` shapes: every module the
/// config targets must have its tensors, with the shapes the config's rank and the module
/// imply; a missing key, an extra key, a wrong shape or dtype, a non-finite value or an
/// unsupported option is an error naming it.
///
/// ```
/// use std::collections::BTreeMap;
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/adapter_lora");
/// // The tiny Llama of the reference data: hidden 32, 2 kv heads of 8, MLP 64, 2 layers.
/// let mut shapes = BTreeMap::new();
/// for layer in 0..2 {
///     for (module, shape) in [("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)),
///         ("self_attn.v_proj", (16, 32)), ("self_attn.o_proj", (32, 32)),
///         ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)), ("mlp.down_proj", (32, 64))] {
///         shapes.insert(format!("model.layers.{layer}.{module}"), shape);
///     }
/// }
/// let loaded = lora_core::peft::load_adapter(dir.as_ref(), &shapes).unwrap();
/// assert_eq!(loaded.modules.len(), 14);
/// assert_eq!(loaded.modules["model.layers.1.mlp.down_proj"].a.dim(), (4, 64));
/// // Without layer 1's modules, its tensors are extra keys: an error naming one.
/// shapes.retain(|k, _| k.starts_with("model.layers.0."));
/// let err = lora_core::peft::load_adapter(dir.as_ref(), &shapes).unwrap_err();
/// assert!(err.to_string().contains("model.layers.1."), "{err}");
/// ```
pub fn load_adapter(
    dir: &Path,
    shapes: &BTreeMap<String, (usize, usize)>,
) -> Result<LoadedAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|source| LoraError::Io {
        action: "reading",
        path: config_path.clone(),
        source,
    })?;
    let config: LoraConfig = serde_json::from_str(&text).map_err(|e| LoraError::Parse {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    config.validate()?;
    check_fan_in_fan_out(&config, &config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&weights_path).map_err(|source| LoraError::Io {
        action: "reading",
        path: weights_path.clone(),
        source,
    })?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| LoraError::Parse {
        path: weights_path.clone(),
        reason: e.to_string(),
    })?;
    let mut unused: std::collections::BTreeSet<String> =
        tensors.names().into_iter().map(String::from).collect();
    let mut modules = BTreeMap::new();
    for (module, &(out_features, in_features)) in shapes {
        if !config.matches(module) {
            continue;
        }
        let r = config.rank_for(module);
        let mut take = |key: String, shape: &[usize]| -> Result<Vec<f32>> {
            unused.remove(&key);
            read_f32(&tensors, &weights_path, &key, shape)
        };
        let a = take(key_a(module), &[r, in_features])?;
        let b = take(key_b(module), &[out_features, r])?;
        let magnitude = if config.use_dora {
            Some(Array1::from_vec(take(key_m(module), &[out_features])?))
        } else {
            None
        };
        modules.insert(
            module.clone(),
            AdapterWeights {
                a: Array2::from_shape_vec((r, in_features), a).expect("length checked"),
                b: Array2::from_shape_vec((out_features, r), b).expect("length checked"),
                magnitude,
            },
        );
    }
    if let Some(extra) = unused.into_iter().next() {
        return Err(LoraError::Key {
            file: weights_path,
            key: extra,
            reason: "unexpected: no targeted module of the given shapes uses it".into(),
        });
    }
    if modules.is_empty() {
        return Err(LoraError::option(
            "target_modules",
            format!("{:?}", config.target_modules),
            format!("matches none of the given modules ({})", dir.display()),
        ));
    }
    Ok(LoadedAdapter { config, modules })
}

/// PEFT's `fan_in_fan_out` says the *base* weight is stored `(in, out)` (GPT-2's `Conv1D`);
/// the adapter tensors keep their layout and only the merge is transposed. The modules given
/// here are `nn.Linear` weights `(out, in)`, for which PEFT itself resets the flag to false
/// with a warning; rather than guess, a file saying `true` is refused by name.
fn check_fan_in_fan_out(config: &LoraConfig, path: &Path) -> Result<()> {
    if config.fan_in_fan_out {
        return Err(LoraError::option(
            "fan_in_fan_out",
            true,
            format!(
                "{}: the adapter was made for a base stored (in, out) (GPT-2 Conv1D); the \
                 modules here are (out, in) nn.Linear weights — transpose such a base with \
                 DenseBase::from_stored and set fan_in_fan_out to false",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn read_f32(
    tensors: &SafeTensors<'_>,
    file: &Path,
    key: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let err = |reason: String| LoraError::Key {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let view = tensors
        .tensor(key)
        .map_err(|_| err("missing".to_string()))?;
    if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(err(format!(
            "dtype {:?}, only F32, F16 and BF16 are supported",
            view.dtype()
        )));
    }
    if view.shape() != shape {
        return Err(err(format!("shape {:?}, expected {shape:?}", view.shape())));
    }
    let values = quant_core::io::tensor_to_f32(key, &view).map_err(|e| err(e.to_string()))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(err(format!(
            "non-finite value {} at flat index {i}",
            values[i]
        )));
    }
    Ok(values)
}

/// Writes adapter `name` of `set` to `dir` (created if missing) in PEFT's layout.
///
/// ```
/// use lora_core::{AdapterSet, LoraConfig, peft};
/// use ndarray::Array2;
/// let mut set = AdapterSet::new();
/// set.add_module("model.layers.0.self_attn.q_proj", Array2::eye(4), None).unwrap();
/// set.add_adapter("default", LoraConfig::new(2, 4.0, &["q_proj"]), 9).unwrap();
/// let dir = std::env::temp_dir().join(format!("lora-core-doc-{}", std::process::id()));
/// peft::save_adapter(&dir, &set, "default").unwrap();
/// let loaded = peft::load_adapter(&dir, &set.shapes()).unwrap();
/// let layer = set.layer("model.layers.0.self_attn.q_proj").unwrap();
/// assert_eq!(&loaded.modules["model.layers.0.self_attn.q_proj"].a, layer.adapter("default").unwrap().a());
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn save_adapter<B: FrozenBase + Clone>(
    dir: &Path,
    set: &AdapterSet<B>,
    name: &str,
) -> Result<()> {
    let config = set.config(name)?;
    let modules = set
        .layers()
        .filter_map(|(module, layer)| layer.adapter(name).ok().map(|a| (module, a)));
    save_adapters(dir, config, modules)
}

/// Writes `config` and the adapters of `modules` (module path, adapter) to `dir` (created if
/// missing) in PEFT's layout: what [`save_adapter`] does for a set, for adapters held
/// elsewhere (e.g. inside a model's own layers).
///
/// ```
/// use lora_core::{peft, AdapterOptions, LoraAdapter, LoraConfig};
/// let adapter = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 4, 4, 1, "q").unwrap();
/// let dir = std::env::temp_dir().join(format!("lora-core-doc-adapters-{}", std::process::id()));
/// let config = LoraConfig::new(2, 4.0, &["q_proj"]);
/// peft::save_adapters(&dir, &config, [("model.layers.0.self_attn.q_proj", &adapter)]).unwrap();
/// let shapes = [("model.layers.0.self_attn.q_proj".to_string(), (4, 4))].into();
/// let loaded = peft::load_adapter(&dir, &shapes).unwrap();
/// assert_eq!(&loaded.modules["model.layers.0.self_attn.q_proj"].a, adapter.a());
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn save_adapters<'a>(
    dir: &Path,
    config: &LoraConfig,
    modules: impl IntoIterator<Item = (&'a str, &'a LoraAdapter)>,
) -> Result<()> {
    save_adapters_as(dir, config, modules, SaveDtype::F32)
}

/// [`save_adapters`] with the tensors stored as `dtype` (what `--save-dtype` chooses).
///
/// ```
/// use lora_core::{peft, peft::SaveDtype, AdapterOptions, LoraAdapter, LoraConfig};
/// let adapter = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 4, 4, 1, "q").unwrap();
/// let dir = std::env::temp_dir().join(format!("lora-core-doc-bf16-{}", std::process::id()));
/// let config = LoraConfig::new(2, 4.0, &["q_proj"]);
/// let module = "model.layers.0.self_attn.q_proj";
/// peft::save_adapters_as(&dir, &config, [(module, &adapter)], SaveDtype::Bf16).unwrap();
/// let loaded = peft::load_adapter(&dir, &[(module.to_string(), (4, 4))].into()).unwrap();
/// let a = &loaded.modules[module].a;
/// assert!(a.iter().zip(adapter.a()).all(|(x, y)| (x - y).abs() <= y.abs() / 256.0));
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn save_adapters_as<'a>(
    dir: &Path,
    config: &LoraConfig,
    modules: impl IntoIterator<Item = (&'a str, &'a LoraAdapter)>,
    dtype: SaveDtype,
) -> Result<()> {
    let files = encode_adapter(dir, config, modules, dtype)?;
    write_adapter_files(dir, files.into_files(dir))
}

/// The bytes of an adapter directory's two PEFT files, before anything is written: what
/// [`save_adapters_as`] writes, for a caller that commits them together with files of its own
/// (a LoRA-QAT adapter records their SHA-256 in its quantizer file, see `docs/FORMATS.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFiles {
    /// `adapter_model.safetensors`.
    pub weights: Vec<u8>,
    /// `adapter_config.json`.
    pub config: Vec<u8>,
}

impl AdapterFiles {
    /// (path, bytes) of both files in `dir`, weights first, for
    /// `formats::atomic::write_atomic_group`.
    pub fn into_files(self, dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        vec![
            (dir.join(WEIGHTS_FILE), self.weights),
            (dir.join(CONFIG_FILE), self.config),
        ]
    }
}

/// Encodes `config` and the adapters of `modules` as [`save_adapters_as`] would write them to
/// `dir` (only named in errors); nothing is written.
///
/// ```
/// use lora_core::{peft, peft::SaveDtype, AdapterOptions, LoraAdapter, LoraConfig};
/// let adapter = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 4, 4, 1, "q").unwrap();
/// let config = LoraConfig::new(2, 4.0, &["q_proj"]);
/// let dir = std::path::Path::new("unused");
/// let files = peft::encode_adapter(dir, &config, [("model.layers.0.self_attn.q_proj", &adapter)], SaveDtype::F32).unwrap();
/// assert!(String::from_utf8(files.config).unwrap().contains("q_proj"));
/// ```
pub fn encode_adapter<'a>(
    dir: &Path,
    config: &LoraConfig,
    modules: impl IntoIterator<Item = (&'a str, &'a LoraAdapter)>,
    dtype: SaveDtype,
) -> Result<AdapterFiles> {
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (module, adapter) in modules {
        let mut push = |key: String, shape: Vec<usize>, values: Vec<f32>| -> Result<()> {
            let bytes = dtype.encode(&key, &weights_path, &values)?;
            tensors.push((key, dtype.dtype(), shape, bytes));
            Ok(())
        };
        push(
            key_a(module),
            adapter.a().shape().to_vec(),
            adapter.a().iter().copied().collect(),
        )?;
        push(
            key_b(module),
            adapter.b().shape().to_vec(),
            adapter.b().iter().copied().collect(),
        )?;
        if let Some(m) = adapter.magnitude() {
            push(key_m(module), vec![m.len()], m.iter().copied().collect())?;
        }
    }
    let views = tensors
        .iter()
        .map(|(k, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| LoraError::Parse {
            path: weights_path.clone(),
            reason: format!("building tensors: {e}"),
        })?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let weights = safetensors::serialize(views, Some(metadata)).map_err(|e| LoraError::Parse {
        path: weights_path.clone(),
        reason: format!("serializing: {e}"),
    })?;
    let json = serde_json::to_string_pretty(config).map_err(|e| LoraError::Parse {
        path: dir.join(CONFIG_FILE),
        reason: e.to_string(),
    })?;
    Ok(AdapterFiles {
        weights,
        config: json.into_bytes(),
    })
}

/// Creates `dir` if missing and writes `files` (path, bytes) through the workspace's one
/// crash-safe writer, `formats::atomic::write_atomic_group`: every file under a temporary name
/// and fsynced, then renamed in the given order, then the directory fsynced — a failed save
/// leaves the old files whole.
pub fn write_adapter_files(dir: &Path, files: Vec<(std::path::PathBuf, Vec<u8>)>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| LoraError::Io {
        action: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    quant_core::io::write_atomic_group(&files).map_err(|e| LoraError::Io {
        action: "writing",
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl<B: FrozenBase + Clone> AdapterSet<B> {
    /// Reads the adapter in `dir` for this set's modules and adds it as `name` (`seed` drives
    /// its dropout). See [`load_adapter`] for what is checked.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, seed: u64) -> Result<()> {
        let loaded = load_adapter(dir, &self.shapes())?;
        let mut adapters = Vec::new();
        for (module, weights) in loaded.modules {
            let options = AdapterOptions::from_config(&loaded.config, &module);
            let adapter = LoraAdapter::from_weights(
                weights.a,
                weights.b,
                weights.magnitude,
                &options,
                LoraLinear::<B>::derive_seed(seed, &module),
                &module,
            )?;
            adapters.push((module, adapter));
        }
        self.insert_adapter_layers(name, loaded.config, adapters)
    }
}
