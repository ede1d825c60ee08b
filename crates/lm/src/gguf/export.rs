//! Writing a checkpoint (optionally with an adapter merged) or a PEFT LoRA adapter as GGUF for
//! llama.cpp, following the family's row of [`super::names`]:
//! - every checkpoint tensor is mapped by the table (an unknown tensor is an error naming it;
//!   a missing one too), its values transformed (Llama's Q/K row permutation, Gemma's `+1`);
//! - the extra tensors the converter computes (Llama 3 `rope_freqs`, Phi-3
//!   `rope_factors_long/short`) are written first, in `F32`, as the converter does;
//! - 1-D tensors (norms, biases) in `F32`; 2-D tensors in the requested type, falling back as
//!   the converter does when a row is not whole blocks of it;
//! - metadata from [`super::metadata::model_metadata`] and, when the model directory holds a
//!   `tokenizer.json`, [`super::tokenizer_metadata`].
//!
//! Tensors are read, merged, transformed, quantized and written one at a time.

use std::path::Path;

use quant_core::ggml::{self, GgmlType};
use quant_core::gguf::{GgufValue, GgufWriter, TensorSpec};

use super::metadata::{check_exportable, model_metadata};
use super::names::{FamilyNames, Transform};
use super::tokenizer::tokenizer_metadata;
use super::GgufExportReport;
use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::merge::MergedSource;

/// The Hugging Face tensors a checkpoint of `config` holds, in the order they are written.
fn expected_hf_names(config: &LlamaConfig, names: &FamilyNames) -> Vec<String> {
    let arch = &config.architecture;
    let mut out = vec!["model.embed_tokens.weight".to_string()];
    for layer in 0..config.num_hidden_layers {
        for t in names.layer {
            out.push(format!("model.layers.{layer}.{}.weight", t.hf));
            if arch.has_bias(t.hf) {
                out.push(format!("model.layers.{layer}.{}.bias", t.hf));
            }
        }
    }
    out.push("model.norm.weight".into());
    if !config.tie_word_embeddings {
        out.push("lm_head.weight".into());
    }
    out
}

/// Which type each 2-D tensor of an export gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TypeMix {
    /// Every 2-D tensor in the requested type (its fallback where rows do not divide).
    #[default]
    Pure,
    /// What `llama-quantize` does without `--pure` for the 32-value block types and the K
    /// types alike (`llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp`): the output
    /// matrix — `output.weight`, or `token_embd.weight` when the embeddings are tied and
    /// serve as the output — goes to Q6_K (to Q8_0 when its rows are not whole 256-value
    /// super-blocks, as for SmolLM2's width 576) unless the requested type is Q8_0 or not
    /// quantized at all; every other tensor keeps the requested type. (The K-type mixes'
    /// per-layer choices, `Q4_K_M` and the like, are not modelled: `--type q4_k` is a pure
    /// type here.) Checked against llama.cpp's own Q4_0, Q4_1 and Q5_0 files of SmolLM2.
    LlamaCpp,
}

fn tensor_type(
    requested: GgmlType,
    shape: &[usize],
    output_matrix: bool,
    mix: TypeMix,
) -> GgmlType {
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    let requested = match mix {
        TypeMix::LlamaCpp
            if output_matrix
                && !requested.is_float()
                && !matches!(requested, GgmlType::Q8_0 | GgmlType::Q6_K) =>
        {
            GgmlType::Q6_K
        }
        _ => requested,
    };
    let row = *shape.last().expect("2-D");
    if row % requested.block_values() != 0 {
        // llama.cpp's converter rule for the K types (Q4_K → Q5_0, Q6_K → Q8_0, ...); rows
        // that are not whole 32-blocks either, and the 32-value types, are written as f16.
        quant_core::ggml::fallback_type(requested, row).unwrap_or(GgmlType::F16)
    } else {
        requested
    }
}

/// The checkpoint directory's name, for `general.name`.
fn model_name(model_dir: &Path) -> String {
    model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

/// The bytes of one tensor in the file. Every tensor is quantized here from the f32 values
/// `source` returns (for a LoRA-QAT adapter: the trained `Q(W + s·B·A)`); this is the one
/// place where a LoRA-QAT adapter's own integer codes and steps would be written instead, so
/// that the file holds exactly the grid training used.
fn encode_tensor(spec: &TensorSpec, hf_name: &str, values: &[f32]) -> Result<Vec<u8>> {
    ggml::quantize(spec.ty, values).map_err(|e| LmError::InvalidArgument {
        name: format!("tensor {hf_name} as {}", spec.ty.name()),
        value: format!("{:?}", spec.shape),
        reason: e.to_string(),
    })
}

/// Writes the model in `model_dir` (with the adapter in `adapter_dir` merged, if given) as a
/// GGUF file at `out` in type `ty`, under the architecture of its family.
///
/// ```
/// use quant_core::ggml::GgmlType;
/// let tmp = std::env::temp_dir().join(format!("lm-gguf-doc-{}", std::process::id()));
/// let model = lm::LlamaModel::random(lm::LlamaConfig::new(32, 32, 64, 1, 4, 2).unwrap(), 3).unwrap();
/// model.save_pretrained(&tmp).unwrap();
/// let out = tmp.join("m.gguf");
/// let report = lm::gguf::export_gguf(&tmp, None, &out, GgmlType::Q8_0).unwrap();
/// assert_eq!(report.arch, "llama");
/// let file = quant_core::gguf::GgufFile::open(&out).unwrap();
/// assert_eq!(file.metadata_str("general.architecture"), Some("llama"));
/// assert_eq!(file.tensor("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q8_0);
/// assert_eq!(file.tensor("blk.0.attn_norm.weight").unwrap().ty, GgmlType::F32);
/// std::fs::remove_dir_all(&tmp).unwrap();
/// ```
pub fn export_gguf(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    out: &Path,
    ty: GgmlType,
) -> Result<GgufExportReport> {
    export_gguf_with(model_dir, adapter_dir, out, ty, TypeMix::Pure)
}

/// [`export_gguf`] with the tensor types chosen by `mix` ([`TypeMix::LlamaCpp`]: the file
/// `llama-quantize` would write from the same weights).
pub fn export_gguf_with(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    out: &Path,
    ty: GgmlType,
    mix: TypeMix,
) -> Result<GgufExportReport> {
    let source = MergedSource::open(model_dir, adapter_dir)?;
    let config = source.checkpoint.config.clone();
    check_exportable(&config)?;
    let names = FamilyNames::of(config.architecture.family);
    let hf_names = expected_hf_names(&config, names);
    // Every stored tensor must have a place: anything else is an option llama.cpp ignores.
    for t in source.checkpoint.tensors() {
        if names.to_gguf(&t.name)?.is_some() && !hf_names.contains(&t.name) {
            return Err(LmError::UnexpectedTensor {
                key: t.name.clone(),
                file: model_dir.to_path_buf(),
            });
        }
    }
    let heads = (config.num_attention_heads, config.num_key_value_heads);
    let global_rope = &config.architecture.ropes[0];
    let extras: Vec<(String, Vec<f32>)> = names
        .extras
        .iter()
        .filter_map(|e| e.values(global_rope).map(|v| (e.gguf.to_string(), v)))
        .collect();
    let mut specs = Vec::new();
    let mut report = GgufExportReport {
        path: out.to_path_buf(),
        arch: names.arch,
        tensors: extras.len() + hf_names.len(),
        metadata_keys: 0,
        f16_fallbacks: Vec::new(),
    };
    for (name, values) in &extras {
        specs.push(TensorSpec::new(
            name.clone(),
            vec![values.len()],
            GgmlType::F32,
        ));
    }
    let mut plan = Vec::new();
    for name in &hf_names {
        let t = source
            .checkpoint
            .tensor(name)
            .ok_or_else(|| LmError::MissingTensor {
                key: name.clone(),
                expected: vec![],
            })?;
        let mapped = names.to_gguf(name)?.ok_or_else(|| LmError::UnknownName {
            what: format!("`{}` tensor", names.arch),
            name: name.clone(),
        })?;
        let output_matrix = mapped.name == "output.weight"
            || (config.tie_word_embeddings && mapped.name == "token_embd.weight");
        let tensor_ty = tensor_type(ty, &t.shape, output_matrix, mix);
        if t.shape.len() >= 2 && tensor_ty != ty {
            report.f16_fallbacks.push(mapped.name.clone());
        }
        specs.push(TensorSpec::new(
            mapped.name.clone(),
            t.shape.clone(),
            tensor_ty,
        ));
        plan.push((name.clone(), mapped.transform));
    }
    let mut metadata = model_metadata(&config, &model_name(model_dir), ty);
    match source.checkpoint.gguf() {
        // A GGUF source keeps its own tokenizer (and chat template) keys.
        Some(gguf) => metadata.extend(
            gguf.gguf()
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned(),
        ),
        None => metadata.extend(tokenizer_metadata(model_dir, &config)?),
    }
    report.metadata_keys = metadata.len();
    let mut writer = GgufWriter::create(out, &metadata, &specs)?;
    for (spec, (_, values)) in specs.iter().zip(&extras) {
        writer.write_tensor(&spec.name, &encode_tensor(spec, &spec.name, values)?)?;
    }
    for (spec, (name, transform)) in specs[extras.len()..].iter().zip(&plan) {
        // A LoRA-QAT adapter on a ggml grid: the blocks it trained, as they are.
        if let Some(bytes) =
            crate::qat_export::trained_gguf_blocks(&source, name, spec.ty, *transform, heads)?
        {
            writer.write_tensor(&spec.name, &bytes)?;
            continue;
        }
        let values = source.read_f32(name)?;
        let values = transform.to_gguf(values, &spec.shape, heads)?;
        let bytes = encode_tensor(spec, name, &values)?;
        drop(values);
        writer.write_tensor(&spec.name, &bytes)?;
    }
    writer.finish()?;
    Ok(report)
}

/// Writes the PEFT LoRA adapter in `adapter_dir` (for the model in `model_dir`) as a GGUF
/// LoRA adapter llama.cpp loads with `--lora`: `general.architecture` of the family,
/// `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per module
/// `<gguf name>.weight.lora_a` (`[r, in]` row-major, ggml `ne = [in, r]`) and `.lora_b`
/// (`[out, r]`, rows of Q/K permuted as the base weight's for `llama`). A fused Phi-3 target
/// (`qkv_proj`, `gate_up_proj`) spans the fused tensor (`attn_qkv`, `ffn_up`). llama.cpp
/// scales by `alpha / r` with one alpha for the file, so every module's scale times its rank
/// must agree (rsLoRA is written with `alpha·√r`); DoRA has no GGUF form and is an error.
/// `ty` is `F32` or `F16`.
pub fn export_gguf_lora(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    ty: GgmlType,
) -> Result<GgufExportReport> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16) {
        return Err(LmError::InvalidArgument {
            name: "type".into(),
            value: ty.name().into(),
            reason: "a GGUF LoRA adapter is written in f32 or f16".into(),
        });
    }
    let source = MergedSource::open(model_dir, Some(adapter_dir))?;
    if let Some(file) = source.qat_state_file() {
        return Err(LmError::Unsupported {
            key: file.display().to_string(),
            value: "LoRA-QAT adapter".into(),
            reason: "its trained weights are Q(W + s·B·A), a quantized weight that no low-rank \
                     delta B·A added to W expresses; write the model with the adapter merged \
                     (export-gguf --model M --adapter DIR without --lora, or merge)"
                .into(),
        });
    }
    let config = source.checkpoint.config.clone();
    check_exportable(&config)?;
    let names = FamilyNames::of(config.architecture.family);
    let heads = (config.num_attention_heads, config.num_key_value_heads);
    let adapter = source.adapter.as_ref().expect("opened with an adapter");
    if adapter.config.use_dora {
        return Err(LmError::Unsupported {
            key: "use_dora".into(),
            value: "true".into(),
            reason: "llama.cpp's LoRA adapters have no magnitude vector; merge the DoRA \
                     adapter (export-gguf --model --adapter without --lora) instead"
                .into(),
        });
    }
    let mut alpha: Option<(f64, String)> = None;
    let mut plan = Vec::new();
    for (module, w) in &adapter.modules {
        let r = w.a.nrows();
        let effective = adapter.config.scale_for(module) * r as f64;
        match &alpha {
            None => alpha = Some((effective, module.clone())),
            Some((a, first)) if (a - effective).abs() > 1e-9 * a.abs().max(1.0) => {
                return Err(LmError::Unsupported {
                    key: "rank_pattern/alpha_pattern".into(),
                    value: format!("{module}: scale·r = {effective}, {first}: {a}"),
                    reason: "llama.cpp applies one alpha to every module (scale = alpha / r)"
                        .into(),
                })
            }
            Some(_) => {}
        }
        let mapped =
            names
                .to_gguf(&format!("{module}.weight"))?
                .ok_or_else(|| LmError::Unsupported {
                    key: "target module".into(),
                    value: module.clone(),
                    reason: format!("not a tensor of llama.cpp's `{}`", names.arch),
                })?;
        if mapped.transform == Transform::PlusOne {
            return Err(LmError::Unsupported {
                key: "target module".into(),
                value: module.clone(),
                reason: "a LoRA on a norm has no GGUF form".into(),
            });
        }
        plan.push((module.clone(), mapped));
    }
    let alpha = alpha.map(|(a, _)| a).unwrap_or(0.0);
    let metadata = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(names.arch.into()),
        ),
        ("general.type".into(), GgufValue::String("adapter".into())),
        ("general.alignment".into(), GgufValue::U32(32)),
        ("adapter.type".into(), GgufValue::String("lora".into())),
        ("adapter.lora.alpha".into(), GgufValue::F32(alpha as f32)),
    ];
    let mut tensor_specs = Vec::new();
    for (module, mapped) in &plan {
        let w = &adapter.modules[module];
        tensor_specs.push(TensorSpec::new(
            format!("{}.lora_a", mapped.name),
            w.a.shape().to_vec(),
            ty,
        ));
        tensor_specs.push(TensorSpec::new(
            format!("{}.lora_b", mapped.name),
            w.b.shape().to_vec(),
            ty,
        ));
    }
    let mut writer = GgufWriter::create(out, &metadata, &tensor_specs)?;
    for ((module, mapped), pair) in plan.iter().zip(tensor_specs.chunks(2)) {
        let w = &adapter.modules[module];
        let a: Vec<f32> = w.a.iter().copied().collect();
        let b: Vec<f32> = w.b.iter().copied().collect();
        // B's rows are the output rows of the base weight: the same row transform applies.
        let b = mapped.transform.to_gguf(b, w.b.shape(), heads)?;
        writer.write_tensor(&pair[0].name, &encode_tensor(&pair[0], module, &a)?)?;
        writer.write_tensor(&pair[1].name, &encode_tensor(&pair[1], module, &b)?)?;
    }
    writer.finish()?;
    Ok(GgufExportReport {
        path: out.to_path_buf(),
        arch: names.arch,
        tensors: tensor_specs.len(),
        metadata_keys: metadata.len(),
        f16_fallbacks: Vec::new(),
    })
}
