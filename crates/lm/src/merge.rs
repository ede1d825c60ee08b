//! Streaming merge of a PEFT adapter into a checkpoint: each weight is read (a bitsandbytes
//! 4-bit weight dequantized), `W + s·B·A` added (DoRA: rows rescaled to `m / ‖W + s·B·A‖`),
//! converted and written before the next one is read, so peak memory is about one weight
//! matrix and its `ΔW`, not the model. Output shards are planned from the shapes before any
//! data is written; a shard is one safetensors file written header-first
//! ([`quant_core::safetensors_stream`]) through a temporary name, and
//! `model.safetensors.index.json` lists them when there is more than one. `config.json` is
//! copied with `quantization_config` removed (dense output) or set to the NF4 settings
//! written (`--quantize nf4`). Every file goes to a temporary name first and all are renamed
//! into place together at the end (`formats::atomic::commit_in_order`: shards, tokenizer
//! files, index, config last; the directory fsynced), so an interrupted or failed merge never
//! leaves a loadable half model and never replaces an earlier output before the new one is
//! complete.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use formats::atomic::AtomicFile;
use lora_core::peft::{load_adapter, LoadedAdapter};
use ndarray::{Array2, ArrayView2, Axis};
use quant_core::linalg::gemm;
use quant_core::nf4::bnb_layout::{to_bnb_tensors, BnbDtype};
use quant_core::nf4::{FourBitTensor, FourBitType};
use quant_core::safetensors_stream::StreamingSafetensorsWriter;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::error::{LmError, Result};
use crate::lazy_checkpoint::{LazyCheckpoint, StoredAs};
use crate::model::LAYER_LINEAR_NAMES;
use crate::qat::{read_qat_state, QatState, QAT_STATE_FILE};
use crate::qat_bnb_export::trained_bnb4_tensor;

mod encoding;
use encoding::torch_dtype_name;
pub use encoding::{encode_float, parse_dtype, parse_size};

/// A checkpoint and, optionally, an adapter to merge into it, read one tensor at a time.
/// A LoRA-QAT adapter directory (one holding [`QAT_STATE_FILE`]) merges as the weights its
/// training computed with: `Q(W + s·B·A)` with the trained steps (`Q(W) + s·B·A` in the
/// frozen-base mode), not `W + s·B·A`.
#[derive(Clone, Debug)]
pub struct MergedSource {
    pub checkpoint: LazyCheckpoint,
    pub adapter: Option<LoadedAdapter>,
    /// The quantizer state of a LoRA-QAT adapter, and the file it came from.
    qat: Option<(QatState, PathBuf)>,
}

impl MergedSource {
    /// The frozen weight `name` (`MODULE.weight`) of an adapted module, as the `(out, in)`
    /// matrix its adapter's `B·A` has: what the exports of trained codes (GGUF blocks,
    /// bitsandbytes 4-bit) run the LoRA-QAT layer on again. `what` names the export in errors.
    pub(crate) fn adapted_base_weight(
        &self,
        name: &str,
        weights: &lora_core::peft::AdapterWeights,
        what: &str,
    ) -> Result<Array2<f32>> {
        let (rows, cols) = (weights.b.nrows(), weights.a.ncols());
        let values = self.checkpoint.read_f32(name)?;
        Array2::from_shape_vec((rows, cols), values)
            .map_err(|e| LmError::shape(format!("{name} ({what})"), format!("({rows}, {cols})"), e))
    }

    /// Opens `model_dir` lazily and reads the adapter in `adapter_dir` (small: loaded whole),
    /// checking that every module it targets exists in the model with its shape; a
    /// [`QAT_STATE_FILE`] beside it is read too.
    pub fn open(model_dir: &Path, adapter_dir: Option<&Path>) -> Result<Self> {
        let checkpoint = LazyCheckpoint::open(model_dir)?;
        let (adapter, qat) = match adapter_dir {
            None => (None, None),
            Some(dir) => {
                let adapter = load_adapter(dir, &checkpoint.linear_shapes())?;
                let state_file = dir.join(QAT_STATE_FILE);
                let qat = if state_file.is_file() {
                    Some((read_qat_state(&state_file)?, state_file))
                } else {
                    None
                };
                (Some(adapter), qat)
            }
        };
        Ok(MergedSource {
            checkpoint,
            adapter,
            qat,
        })
    }

    /// The quantizer state of a LoRA-QAT adapter and its file (`crate::qat_export`).
    pub(crate) fn qat_state(&self) -> Option<(&QatState, &Path)> {
        self.qat.as_ref().map(|(s, f)| (s, f.as_path()))
    }

    /// The [`QAT_STATE_FILE`] of a LoRA-QAT adapter, `None` for a plain PEFT adapter.
    pub fn qat_state_file(&self) -> Option<&Path> {
        self.qat.as_ref().map(|(_, file)| file.as_path())
    }

    /// The adapter's scale `s` for `module`.
    pub fn scale(&self, module: &str) -> Option<f64> {
        self.adapter
            .as_ref()
            .filter(|a| a.modules.contains_key(module))
            .map(|a| a.config.scale_for(module))
    }

    /// Tensor `name` as `f32`, with the adapter merged when it targets the module.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let values = self.checkpoint.read_f32(name)?;
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(values);
        };
        let Some(weights) = self.adapter.as_ref().and_then(|a| a.modules.get(module)) else {
            return Ok(values);
        };
        let scale = self.scale(module).expect("module has an adapter") as f32;
        let (out, inp) = (weights.b.nrows(), weights.a.ncols());
        let mut w = Array2::from_shape_vec((out, inp), values)
            .map_err(|e| LmError::shape(format!("{name} (merge)"), format!("({out}, {inp})"), e))?;
        if let (Some((state, file)), Some(adapter)) = (&self.qat, &self.adapter) {
            let q = state.quantized_weight(w, weights, &adapter.config, module, file)?;
            return Ok(q.into_raw_vec_and_offset().0);
        }
        merge_into(
            &mut w,
            weights.a.view(),
            weights.b.view(),
            weights.magnitude.as_ref().map(|m| m.view()),
            scale,
            module,
        )?;
        Ok(w.into_raw_vec_and_offset().0)
    }

    /// Number of modules the adapter merges into.
    pub fn merged_modules(&self) -> usize {
        self.adapter.as_ref().map_or(0, |a| a.modules.len())
    }
}

/// `W ← W + s·B·A`, and for DoRA `W ← (m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A)` (PEFT's merge).
pub fn merge_into(
    w: &mut Array2<f32>,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    magnitude: Option<ndarray::ArrayView1<'_, f32>>,
    scale: f32,
    module: &str,
) -> Result<()> {
    gemm(scale, b, a, 1.0, w.view_mut())?;
    if let Some(m) = magnitude {
        for (row, (mut w_row, &m_row)) in w.axis_iter_mut(Axis(0)).zip(m.iter()).enumerate() {
            let norm = w_row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt() as f32;
            let factor = m_row / norm;
            if !factor.is_finite() {
                return Err(LmError::NonFinite {
                    what: format!("DoRA merge factor m/‖W + ΔW‖ of {module}"),
                    location: format!("row {row}"),
                    value: factor,
                });
            }
            w_row.mapv_inplace(|v| v * factor);
        }
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(LmError::NonFinite {
            what: format!("merged weight of {module}"),
            location: format!("flat index {i}"),
            value: w.as_slice().map_or(f32::NAN, |s| s[i]),
        });
    }
    Ok(())
}

/// What `merge_checkpoint` writes.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeOptions {
    /// Dtype of the dense output tensors; `None` keeps each tensor's stored dtype
    /// (a dequantized 4-bit weight takes `bnb_4bit_compute_dtype`, f32 by default).
    pub dtype: Option<Dtype>,
    /// Re-quantize the layers' projections to NF4 (blocksize 64, double quantization) in
    /// transformers' bitsandbytes layout.
    pub quantize_nf4: bool,
    /// Start a new shard before a tensor that would take the current one past this size.
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            dtype: None,
            quantize_nf4: false,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What a merge wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeReport {
    /// Logical tensors written (a 4-bit weight counts once).
    pub tensors: usize,
    /// Modules the adapter was merged into.
    pub merged_modules: usize,
    /// Safetensors files written.
    pub shards: Vec<PathBuf>,
    /// Bytes of tensor data written.
    pub data_bytes: u64,
}

fn is_layer_projection(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(|m| m.strip_prefix("model.layers."))
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(layer, lin)| {
            layer.parse::<usize>().is_ok()
                && (LAYER_LINEAR_NAMES.contains(&lin)
                    // Phi-3's fused projections.
                    || lin == "self_attn.qkv_proj"
                    || lin == "mlp.gate_up_proj")
        })
}

/// One planned output tensor.
struct Planned {
    name: String,
    /// `Some(dtype)`: dense; `None`: NF4 in bnb layout.
    dtype: Option<Dtype>,
    shape: Vec<usize>,
    estimated_bytes: u64,
}

/// The bnb quantization settings written with `--quantize nf4` (QLoRA's defaults).
const NF4_BLOCKSIZE: usize = 64;

fn nf4_quantization_config(compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Merges the adapter in `adapter_dir` (if any) into the checkpoint in `model_dir` and writes
/// the result to `out_dir` (see the module docs). `out_dir` must differ from `model_dir`.
///
/// ```
/// use lm::merge::{merge_checkpoint, MergeOptions};
/// let tmp = std::env::temp_dir().join(format!("lm-merge-doc-{}", std::process::id()));
/// let model = lm::LlamaModel::random(lm::LlamaConfig::new(32, 16, 32, 1, 2, 1).unwrap(), 1).unwrap();
/// model.save_pretrained(tmp.join("base")).unwrap();
/// let opts = MergeOptions { max_shard_bytes: 4000, ..MergeOptions::default() };
/// let report = merge_checkpoint(&tmp.join("base"), None, &tmp.join("out"), &opts).unwrap();
/// assert!(report.shards.len() > 1, "small shards: an index is written");
/// assert_eq!(lm::LlamaModel::from_pretrained(tmp.join("out")).unwrap(), model);
/// std::fs::remove_dir_all(&tmp).unwrap();
/// ```
pub fn merge_checkpoint(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<MergeReport> {
    if let (Ok(a), Ok(b)) = (model_dir.canonicalize(), out_dir.canonicalize()) {
        if a == b {
            return Err(LmError::InvalidArgument {
                name: "out".into(),
                value: out_dir.display().to_string(),
                reason: "is the model directory: the merge reads it while writing".into(),
            });
        }
    }
    let source = MergedSource::open(model_dir, adapter_dir)?;
    let ckpt = &source.checkpoint;
    let compute_dtype = ckpt
        .config
        .quantization_config
        .as_ref()
        .and_then(|q| q.get("bnb_4bit_compute_dtype"))
        .and_then(Value::as_str)
        .map(parse_dtype)
        .transpose()?
        .unwrap_or(Dtype::F32);

    let mut plan = Vec::new();
    for t in ckpt.tensors() {
        if t.name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let n: u64 = t.shape.iter().product::<usize>() as u64;
        if options.quantize_nf4 && is_layer_projection(&t.name) {
            let blocks = n.div_ceil(NF4_BLOCKSIZE as u64);
            plan.push(Planned {
                name: t.name.clone(),
                dtype: None,
                shape: t.shape.clone(),
                estimated_bytes: n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 1100 + 300,
            });
        } else {
            let dtype = options.dtype.unwrap_or(match t.stored {
                StoredAs::Float(d) => d,
                StoredAs::Bnb4 => compute_dtype,
            });
            plan.push(Planned {
                name: t.name.clone(),
                dtype: Some(dtype),
                shape: t.shape.clone(),
                estimated_bytes: n * (dtype.bitsize() / 8) as u64,
            });
        }
    }
    // Shards: a new one before a tensor that would overflow a non-empty shard.
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new()];
    let mut current = 0u64;
    for p in plan {
        if current + p.estimated_bytes > options.max_shard_bytes
            && !shards.last().expect("one").is_empty()
        {
            shards.push(Vec::new());
            current = 0;
        }
        current += p.estimated_bytes;
        shards.last_mut().expect("one").push(p);
    }

    std::fs::create_dir_all(out_dir).map_err(|e| LmError::io(out_dir, e))?;
    // Every output file is written under a temporary name and renamed into place only when
    // all are complete (shards, tokenizer files, index, then config.json), so a failed or
    // interrupted merge leaves an earlier output in `out_dir` whole.
    let mut staged: Vec<AtomicFile> = Vec::new();
    let stage = |path: PathBuf, bytes: &[u8]| -> Result<AtomicFile> {
        let mut file = AtomicFile::create(&path)?;
        file.write_bytes(bytes)?;
        Ok(file)
    };
    let n_shards = shards.len();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut weight_map = BTreeMap::new();
    let mut report = MergeReport {
        tensors: 0,
        merged_modules: source.merged_modules(),
        shards: Vec::new(),
        data_bytes: 0,
    };
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", i + 1)
        };
        let path = out_dir.join(&file_name);
        let (written, file) = if shard.iter().all(|p| p.dtype.is_some()) {
            write_dense_shard(&source, shard, &path, &metadata)?
        } else {
            write_spilled_shard(&source, shard, &path, &metadata)?
        };
        staged.push(file);
        for (name, bytes) in written {
            weight_map.insert(name, file_name.clone());
            report.data_bytes += bytes;
        }
        report.tensors += shard.len();
        report.shards.push(path);
    }

    for extra in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "generation_config.json",
    ] {
        let from = model_dir.join(extra);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| LmError::io(&from, e))?;
            staged.push(stage(out_dir.join(extra), &bytes)?);
        }
    }
    if n_shards > 1 {
        let index = json!({
            "metadata": {"total_size": report.data_bytes},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("JSON of strings and numbers");
        staged.push(stage(
            out_dir.join("model.safetensors.index.json"),
            text.as_bytes(),
        )?);
    }
    let mut config = ckpt.config_json.clone();
    let obj = config.as_object_mut().ok_or_else(|| LmError::Json {
        path: model_dir.join("config.json"),
        reason: "not a JSON object".into(),
    })?;
    if options.quantize_nf4 {
        let compute = options.dtype.unwrap_or(compute_dtype);
        obj.insert(
            "quantization_config".into(),
            nf4_quantization_config(torch_dtype_name(compute)),
        );
    } else {
        obj.remove("quantization_config");
    }
    if let Some(dtype) = options.dtype {
        let key = if obj.contains_key("torch_dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        obj.insert(key.into(), json!(torch_dtype_name(dtype)));
    }
    let text = serde_json::to_string_pretty(&config).expect("JSON value");
    staged.push(stage(out_dir.join("config.json"), text.as_bytes())?);
    formats::atomic::commit_in_order(staged)?;
    // A previous checkpoint in out_dir would shadow or mix with this one; it is removed only
    // now that the new one is complete (a crash before here leaves the old one loadable),
    // and the removal is made durable like the renames.
    let stale = if n_shards > 1 {
        "model.safetensors"
    } else {
        "model.safetensors.index.json"
    };
    let stale = out_dir.join(stale);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| LmError::io(&stale, e))?;
        formats::atomic::sync_dir(out_dir)?;
    }
    Ok(report)
}

/// Writes a shard of dense tensors straight into its file: the header from the plan, then
/// each merged tensor as it is computed. Returns (name, bytes) of what was written and the
/// file, still under its temporary name.
fn write_dense_shard(
    source: &MergedSource,
    shard: &[Planned],
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<(Vec<(String, u64)>, AtomicFile)> {
    let specs: Vec<(String, Dtype, Vec<usize>)> = shard
        .iter()
        .map(|p| (p.name.clone(), p.dtype.expect("dense"), p.shape.clone()))
        .collect();
    let mut writer = StreamingSafetensorsWriter::create(path, &specs, Some(metadata))?;
    let mut written = Vec::new();
    for p in shard {
        let values = source.read_f32(&p.name)?;
        let bytes = encode_float(&p.name, &values, p.dtype.expect("dense"))?;
        drop(values);
        writer.write_tensor(&p.name, &bytes)?;
        written.push((p.name.clone(), bytes.len() as u64));
    }
    Ok((written, writer.finish_uncommitted()?))
}

/// Writes a shard holding NF4 weights, whose quant-state sizes are only known once quantized:
/// the tensors' bytes go to a temporary body file first, then the header is written and the
/// body copied after it. Returns what [`write_dense_shard`] does.
fn write_spilled_shard(
    source: &MergedSource,
    shard: &[Planned],
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<(Vec<(String, u64)>, AtomicFile)> {
    let body_path = path.with_file_name(format!(
        ".{}.body-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let file = std::fs::File::create(&body_path).map_err(|e| LmError::io(&body_path, e))?;
        let mut body = BufWriter::new(file);
        let mut specs: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
        for p in shard {
            let parts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = match p.dtype {
                Some(dtype) => {
                    let values = source.read_f32(&p.name)?;
                    let bytes = encode_float(&p.name, &values, dtype)?;
                    vec![(p.name.clone(), dtype, p.shape.clone(), bytes)]
                }
                None => {
                    // A LoRA-QAT projection on the NF4 grid: the trained codes and scales.
                    let tensor = match trained_bnb4_tensor(source, &p.name)? {
                        Some(trained) => trained,
                        None => FourBitTensor::quantize(
                            &source.read_f32(&p.name)?,
                            &p.shape,
                            NF4_BLOCKSIZE,
                            FourBitType::Nf4,
                            true,
                        )?,
                    };
                    to_bnb_tensors(&p.name, &tensor)
                        .into_iter()
                        .map(|(name, t)| {
                            let dtype = match t.dtype {
                                BnbDtype::U8 => Dtype::U8,
                                BnbDtype::F32 => Dtype::F32,
                            };
                            (name, dtype, t.shape, t.bytes)
                        })
                        .collect()
                }
            };
            for (name, dtype, shape, bytes) in parts {
                body.write_all(&bytes)
                    .map_err(|e| LmError::io(&body_path, e))?;
                specs.push((name, dtype, shape));
            }
        }
        body.flush().map_err(|e| LmError::io(&body_path, e))?;
        drop(body);
        let mut writer = StreamingSafetensorsWriter::create(path, &specs, Some(metadata))?;
        let mut reader = std::io::BufReader::new(
            std::fs::File::open(&body_path).map_err(|e| LmError::io(&body_path, e))?,
        );
        let mut written = Vec::new();
        for (name, dtype, shape) in &specs {
            let n: usize = shape.iter().product();
            let mut buf = vec![0u8; n * dtype.bitsize() / 8];
            reader
                .read_exact(&mut buf)
                .map_err(|e| LmError::io(&body_path, e))?;
            writer.write_tensor(name, &buf)?;
            written.push((name.clone(), buf.len() as u64));
        }
        Ok((written, writer.finish_uncommitted()?))
    })();
    let _ = std::fs::remove_file(&body_path);
    result
}
