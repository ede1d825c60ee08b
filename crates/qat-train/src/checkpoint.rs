//! Resumable checkpoints: one safetensors file of named `f32` tensors (adapter weights,
//! quantizer steps, optimizer moments) and one JSON file (step, config, RNG state, data cursor,
//! optimizer metadata, anything else), plus a seeded RNG whose state can be saved.
//!
//! ## Crash safety
//!
//! The JSON file is the checkpoint's name and its commit point. [`Checkpoint::save`] writes the
//! tensors to `{stem}.{id}.safetensors` next to it (through a temporary file and a rename),
//! then the JSON (same way), and only then deletes the tensor file the previous JSON named. A
//! save that fails at any point leaves the previous JSON, and so the previous pair, whole.
//!
//! ## Pairing
//!
//! The id is `step{step}-{hash}` with a 64-bit FNV-1a hash of the tensors' names, shapes and
//! bytes. Both files carry it (`checkpoint_id` in the safetensors metadata); [`Checkpoint::load`]
//! errors when they differ, and when the tensors read back do not hash to it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::data::DataCursor;
use crate::error::{check_finite, Result, TrainError};
use crate::optim::OptimizerState;
use crate::params::ParamVisitor;

/// A ChaCha8 generator whose position can be saved and restored, for every random choice of a
/// training run (dropout masks, sampling).
///
/// ```
/// use qat_train::checkpoint::TrainRng;
/// use rand::Rng;
/// let mut rng = TrainRng::new(7);
/// let _: u64 = rng.random();
/// let state = rng.state();
/// let next: [u32; 4] = rng.random();
/// let mut restored = TrainRng::from_state(&state);
/// assert_eq!(restored.random::<[u32; 4]>(), next);
/// ```
#[derive(Debug, Clone)]
pub struct TrainRng {
    seed: u64,
    stream: u64,
    rng: ChaCha8Rng,
}

/// The serializable position of a [`TrainRng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// Seed given to `ChaCha8Rng::seed_from_u64`.
    pub seed: u64,
    /// ChaCha stream.
    pub stream: u64,
    /// Position in the key stream, in 32-bit words.
    pub word_pos: u128,
}

impl TrainRng {
    /// A generator from `seed`, stream 0.
    pub fn new(seed: u64) -> Self {
        Self::with_stream(seed, 0)
    }

    /// A generator from `seed` on ChaCha stream `stream` (independent sequences per purpose).
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self { seed, stream, rng }
    }

    /// The current position.
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.stream,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// The generator at a saved position: it continues with the draws the saved one would
    /// have made.
    pub fn from_state(state: &RngState) -> Self {
        let mut rng = Self::with_stream(state.seed, state.stream);
        rng.rng.set_word_pos(state.word_pos);
        rng
    }
}

impl RngCore for TrainRng {
    fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.rng.fill_bytes(dst)
    }
}

/// A named row-major `f32` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Unique name within the checkpoint.
    pub name: String,
    /// Shape; its product is `values.len()`.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f32>,
}

/// Prefix of optimizer buffers among a checkpoint's tensors.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Everything needed to resume a run.
///
/// ```
/// use qat_train::checkpoint::{Checkpoint, TrainRng};
/// let dir = std::env::temp_dir().join(format!("qat-ckpt-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let mut ckpt = Checkpoint::new(10, TrainRng::new(1).state());
/// ckpt.add_tensor("q_proj.lora_A", vec![2, 3], vec![0.5; 6]).unwrap();
/// ckpt.config = serde_json::json!({"lora_lr": 2e-4});
/// let path = dir.join("last.json");
/// ckpt.save(&path).unwrap();
/// assert_eq!(Checkpoint::load(&path).unwrap(), ckpt);
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// Tensors in order.
    pub tensors: Vec<NamedTensor>,
    /// The run's configuration.
    pub config: serde_json::Value,
    /// The training RNG's position.
    pub rng: RngState,
    /// The data loader's position.
    pub data_cursor: DataCursor,
    /// The optimizer's metadata ([`OptimizerState::meta_json`]); its buffers are the tensors
    /// under [`OPTIMIZER_PREFIX`].
    pub optimizer: Option<serde_json::Value>,
    /// Anything else the caller wants back (metrics so far, accumulation state…).
    pub extra: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointJson {
    format: String,
    version: u32,
    checkpoint_id: String,
    step: u64,
    tensor_file: String,
    tensor_names: Vec<String>,
    config: serde_json::Value,
    rng: RngState,
    data_cursor: DataCursor,
    optimizer: Option<serde_json::Value>,
    extra: serde_json::Value,
}

const FORMAT: &str = "qat-train-checkpoint";
const VERSION: u32 = 1;

/// The files a checkpoint was saved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    /// The JSON file (the checkpoint's name).
    pub json: PathBuf,
    /// The tensor file it names.
    pub tensors: PathBuf,
}

impl Checkpoint {
    /// An empty checkpoint at `step` (null config and extra, cursor at the start).
    pub fn new(step: u64, rng: RngState) -> Self {
        Self {
            step,
            tensors: Vec::new(),
            config: serde_json::Value::Null,
            rng,
            data_cursor: DataCursor::default(),
            optimizer: None,
            extra: serde_json::Value::Null,
        }
    }

    /// Adds a tensor; errors on a duplicate name, a shape that does not fit or a non-finite
    /// value (a diverged run must not overwrite a good checkpoint).
    pub fn add_tensor(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) -> Result<()> {
        if self.tensor(name).is_some() {
            return Err(TrainError::invalid(
                "checkpoint tensor name",
                name,
                "already in the checkpoint",
            ));
        }
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(TrainError::shape(
                format!("checkpoint tensor `{name}`"),
                format!("{expected} values for shape {shape:?}"),
                values.len(),
            ));
        }
        check_finite(&format!("checkpoint tensor `{name}`"), &values)?;
        self.tensors.push(NamedTensor {
            name: name.to_string(),
            shape,
            values,
        });
        Ok(())
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Adds every visited parameter's values as a 1-D tensor under its name.
    pub fn add_params(&mut self, params: &mut dyn ParamVisitor) -> Result<()> {
        let mut collected = Vec::new();
        params.visit_params(&mut |name, value, _| {
            collected.push((name.to_string(), value.to_vec()));
            Ok(())
        })?;
        for (name, values) in collected {
            self.add_tensor(&name, vec![values.len()], values)?;
        }
        Ok(())
    }

    /// Copies the tensors into the visited parameters of the same name; errors naming the
    /// parameter when its tensor is missing or has another length.
    pub fn restore_params(&self, params: &mut dyn ParamVisitor) -> Result<()> {
        params.visit_params(&mut |name, value, _| {
            let t = self.tensor(name).ok_or_else(|| {
                TrainError::invalid(
                    "parameter",
                    name,
                    "the checkpoint has no tensor of that name",
                )
            })?;
            if t.values.len() != value.len() {
                return Err(TrainError::shape(
                    format!("checkpoint tensor `{name}`"),
                    value.len(),
                    t.values.len(),
                ));
            }
            value.copy_from_slice(&t.values);
            Ok(())
        })
    }

    /// Stores an optimizer state: its buffers as tensors under [`OPTIMIZER_PREFIX`] (replacing
    /// earlier ones) and its metadata in [`optimizer`](Self::optimizer).
    pub fn set_optimizer(&mut self, state: &OptimizerState) -> Result<()> {
        self.tensors
            .retain(|t| !t.name.starts_with(OPTIMIZER_PREFIX));
        for (name, values) in &state.tensors {
            self.add_tensor(
                &format!("{OPTIMIZER_PREFIX}{name}"),
                vec![values.len()],
                values.clone(),
            )?;
        }
        self.optimizer = Some(state.meta_json());
        Ok(())
    }

    /// The optimizer state stored by [`set_optimizer`](Self::set_optimizer), if any.
    pub fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        let Some(meta) = &self.optimizer else {
            return Ok(None);
        };
        let tensors = self
            .tensors
            .iter()
            .filter_map(|t| {
                t.name
                    .strip_prefix(OPTIMIZER_PREFIX)
                    .map(|n| (n.to_string(), t.values.clone()))
            })
            .collect();
        OptimizerState::from_parts(meta, tensors).map(Some)
    }

    /// `step{step}-{16 hex digits}`: the step and a hash of the tensors (see the module docs).
    pub fn id(&self) -> String {
        let mut hash = Fnv1a::new();
        for t in &self.tensors {
            hash.write(t.name.as_bytes());
            hash.write(&[0]);
            for &d in &t.shape {
                hash.write(&(d as u64).to_le_bytes());
            }
            for v in &t.values {
                hash.write(&v.to_le_bytes());
            }
        }
        format!("step{}-{:016x}", self.step, hash.0)
    }

    /// Writes the pair crash-safely (see the module docs) and returns the two paths. The tensor
    /// file is `{json stem}.{id}.safetensors` in the JSON file's directory.
    pub fn save(&self, json_path: &Path) -> Result<CheckpointFiles> {
        let mut names = BTreeSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(TrainError::invalid(
                    "checkpoint tensor name",
                    &t.name,
                    "appears twice",
                ));
            }
            check_finite(&format!("checkpoint tensor `{}`", t.name), &t.values)?;
        }
        let id = self.id();
        let stem = json_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| TrainError::Checkpoint {
                file: json_path.to_path_buf(),
                key: "path".into(),
                reason: "the checkpoint path has no file name".into(),
            })?;
        let tensor_file = format!("{stem}.{id}.safetensors");
        let dir = json_path.parent().unwrap_or(Path::new(""));
        let tensor_path = dir.join(&tensor_file);
        let previous_tensor_file = read_json(json_path).ok().map(|j| j.tensor_file);

        let owned = self
            .tensors
            .iter()
            .map(|t| {
                quant_core::io::OwnedTensor::f32(t.shape.clone(), &t.values)
                    .map(|o| (t.name.clone(), o))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            ("checkpoint_id".to_string(), id.clone()),
            ("step".to_string(), self.step.to_string()),
        ]);
        quant_core::io::write_safetensors(&tensor_path, &owned, Some(metadata))?;

        let json = CheckpointJson {
            format: FORMAT.into(),
            version: VERSION,
            checkpoint_id: id,
            step: self.step,
            tensor_file: tensor_file.clone(),
            tensor_names: self.tensors.iter().map(|t| t.name.clone()).collect(),
            config: self.config.clone(),
            rng: self.rng,
            data_cursor: self.data_cursor,
            optimizer: self.optimizer.clone(),
            extra: self.extra.clone(),
        };
        let text = serde_json::to_string_pretty(&json).map_err(|e| TrainError::Checkpoint {
            file: json_path.to_path_buf(),
            key: "json".into(),
            reason: e.to_string(),
        })?;
        quant_core::io::write_atomic(json_path, text.as_bytes())?;
        if let Some(old) = previous_tensor_file.filter(|old| *old != tensor_file) {
            if is_plain_file_name(&old) {
                // Best effort: an orphaned old tensor file is harmless, just wasted space.
                let _ = std::fs::remove_file(dir.join(old));
            }
        }
        Ok(CheckpointFiles {
            json: json_path.to_path_buf(),
            tensors: tensor_path,
        })
    }

    /// Reads a pair written by [`save`](Self::save); errors name the file and key when a file
    /// is missing or malformed, the two files carry different ids or steps, a listed tensor is
    /// missing, or the tensors do not hash to the id.
    pub fn load(json_path: &Path) -> Result<Self> {
        let json = read_json(json_path)?;
        let err = |file: &Path, key: &str, reason: String| TrainError::Checkpoint {
            file: file.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if json.format != FORMAT || json.version != VERSION {
            return Err(err(
                json_path,
                "format",
                format!(
                    "expected {FORMAT} version {VERSION}, found {} version {}",
                    json.format, json.version
                ),
            ));
        }
        if !is_plain_file_name(&json.tensor_file) {
            return Err(err(
                json_path,
                "tensor_file",
                format!(
                    "`{}` must be a file name in the checkpoint's directory",
                    json.tensor_file
                ),
            ));
        }
        let tensor_path = json_path
            .parent()
            .unwrap_or(Path::new(""))
            .join(&json.tensor_file);
        let bytes = std::fs::read(&tensor_path).map_err(|source| TrainError::Io {
            path: tensor_path.clone(),
            source,
        })?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(&tensor_path, "header", e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(&tensor_path, "header", e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        for (key, expected) in [
            ("checkpoint_id", json.checkpoint_id.clone()),
            ("step", json.step.to_string()),
        ] {
            match meta.get(key) {
                Some(found) if *found == expected => {}
                found => {
                    return Err(err(
                        &tensor_path,
                        key,
                        format!(
                            "{} does not match {} ({expected}): the files are not one checkpoint",
                            found.map_or("missing".to_string(), |f| format!("`{f}`")),
                            json_path.display()
                        ),
                    ))
                }
            }
        }
        let mut tensors = Vec::with_capacity(json.tensor_names.len());
        for name in &json.tensor_names {
            let view = st
                .tensor(name)
                .map_err(|e| err(&tensor_path, name, e.to_string()))?;
            let values = quant_core::io::tensor_to_f32(name, &view)
                .map_err(|e| err(&tensor_path, name, e.to_string()))?;
            tensors.push(NamedTensor {
                name: name.clone(),
                shape: view.shape().to_vec(),
                values,
            });
        }
        if st.len() != tensors.len() {
            return Err(err(
                &tensor_path,
                "tensors",
                format!(
                    "{} tensors in the file, {} listed in {}",
                    st.len(),
                    tensors.len(),
                    json_path.display()
                ),
            ));
        }
        let ckpt = Checkpoint {
            step: json.step,
            tensors,
            config: json.config,
            rng: json.rng,
            data_cursor: json.data_cursor,
            optimizer: json.optimizer,
            extra: json.extra,
        };
        if ckpt.id() != json.checkpoint_id {
            return Err(err(
                &tensor_path,
                "checkpoint_id",
                format!(
                    "the tensors hash to {} but the checkpoint is {}: the file is corrupted",
                    ckpt.id(),
                    json.checkpoint_id
                ),
            ));
        }
        Ok(ckpt)
    }
}

fn read_json(path: &Path) -> Result<CheckpointJson> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        file: path.to_path_buf(),
        key: "json".into(),
        reason: e.to_string(),
    })
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\\')
}

/// 64-bit FNV-1a: a content fingerprint for pairing files, not a defence against tampering.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests;
