//! The config of a GGUF model file's family from its metadata (`config.json` as transformers'
//! GGUF loading derives it; docs/FORMATS.md lists the keys), for [`crate::gguf_model`].

use quant_core::gguf::{GgufArray, GgufFile, GgufValue, ReadTensorF32};
use serde_json::{json, Map, Value};

use crate::error::{LmError, Result};
use crate::family::Family;
use crate::gguf::metadata::keys;
use crate::rope::RopeScaling;

/// The family of `general.architecture` (Mistral is `llama` in GGUF, told apart by name).
pub(crate) fn family_of(file: &GgufFile, arch: &str) -> Result<Family> {
    Ok(match arch {
        "llama" => {
            let name = file.metadata_str("general.name").unwrap_or("");
            if name.to_lowercase().contains("mistral") {
                Family::Mistral
            } else {
                Family::Llama
            }
        }
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma2" => Family::Gemma2,
        "gemma3" => Family::Gemma3,
        "phi3" => Family::Phi3,
        other => {
            return Err(gguf_err(
                file,
                "general.architecture",
                format!("{other:?} is not supported (llama, qwen2, qwen3, gemma2, gemma3, phi3)"),
            ))
        }
    })
}

/// Reads metadata values of one file, erring with the key.
struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => {
                // Per-layer values (llama.cpp allows them): only a uniform one is a config.
                let values: Vec<u64> = match a {
                    GgufArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
                    GgufArray::I32(v) => v
                        .iter()
                        .map(|&x| u64::try_from(x).unwrap_or(u64::MAX))
                        .collect(),
                    _ => Vec::new(),
                };
                match values.first() {
                    Some(&first) if values.iter().all(|&x| x == first) => Ok(Some(first as usize)),
                    _ => Err(gguf_err(
                        self.file,
                        key,
                        format!("per-layer values {} are not supported", a.len()),
                    )),
                }
            }
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| gguf_err(self.file, key, format!("expected an integer, got {v:?}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| gguf_err(self.file, key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| gguf_err(self.file, key, format!("expected a float, got {v:?}"))),
        }
    }
}

/// A config derived from a GGUF file: the `config.json` and, when the file's `rope_freqs`
/// divisors are not those of any Llama 3 rope a config can state, the divisors themselves
/// (the model then rotates with [`crate::rope::RopeScaling::Factors`]).
pub(crate) struct DerivedConfig {
    pub json: Value,
    pub explicit_rope_factors: Option<Vec<f32>>,
}

/// The family's `config.json` from the metadata: transformers' `GGUF_CONFIG_MAPPING` keys,
/// token ids from `tokenizer.ggml.*`, `tie_word_embeddings` from the absence of `output.weight`,
/// the rope's scaling from the `{arch}.rope.scaling.*` keys and the per-frequency tensors
/// (`rope_freqs`: Llama 3, `rope_factors_long/short`: Phi-3 LongRoPE).
pub(crate) fn config_json(file: &GgufFile, arch: &str, family: Family) -> Result<DerivedConfig> {
    let m = Meta { file, arch };
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let hidden = m.usize(&m.key("embedding_length"))?;
    let heads = m.usize(&m.key("attention.head_count"))?;
    let kv_heads = m
        .opt_usize(&m.key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let layers = m.usize(&m.key("block_count"))?;
    if heads == 0 {
        return Err(gguf_err(file, &m.key("attention.head_count"), "is 0"));
    }
    let rope_dim = m.opt_usize(&m.key("rope.dimension_count"))?;
    let head_dim = match m.opt_usize(&m.key("attention.key_length"))? {
        Some(k) => k,
        None if matches!(family, Family::Llama | Family::Mistral) && rope_dim.is_some() => {
            rope_dim.unwrap_or(0)
        }
        None => hidden / heads,
    };
    if let Some(r) = rope_dim {
        if r != head_dim {
            return Err(LmError::Gguf {
                path: file.path.clone(),
                key: m.key("rope.dimension_count"),
                reason: format!(
                    "{r} rotary dimensions for heads of {head_dim}: partial rotary embeddings \
                     are not implemented"
                ),
            });
        }
    }
    if let Some(v) = m.opt_usize(&m.key("attention.value_length"))? {
        if v != head_dim {
            return Err(gguf_err(
                file,
                &m.key("attention.value_length"),
                format!("{v} differs from the key length {head_dim}"),
            ));
        }
    }
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| gguf_err(file, "token_embd.weight", "missing"))?;
    let vocab = match m.opt_usize(&m.key("vocab_size"))? {
        Some(v) => v,
        None => embd.shape[0],
    };
    let theta = m.opt_f64(&m.key("rope.freq_base"))?.unwrap_or(10000.0);
    let eps = m
        .opt_f64(&m.key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| gguf_err(file, &m.key("attention.layer_norm_rms_epsilon"), "missing"))?;
    let (mut scaling, explicit_rope_factors) = match rope_from_tensors(&m, family, head_dim, theta)?
    {
        FileRope::Config(v) => (Some(v), None),
        FileRope::Factors(f) => (None, Some(f)),
        FileRope::None => (None, None),
    };
    if scaling.is_none() {
        scaling = rope_scaling(&m)?;
    }

    let mut c = Map::new();
    c.insert("architectures".into(), json!([family.architecture()]));
    c.insert("model_type".into(), json!(family.model_type()));
    if let Some(name) = file.metadata_str("general.name") {
        c.insert("_model_name_or_path".into(), json!(name));
    }
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(m.usize(&m.key("feed_forward_length"))?),
    );
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    c.insert("head_dim".into(), json!(head_dim));
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert(
        "max_position_embeddings".into(),
        json!(m.usize(&m.key("context_length"))?),
    );
    c.insert("vocab_size".into(), json!(vocab));
    c.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    if gemma {
        c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    } else {
        c.insert("hidden_act".into(), json!("silu"));
    }
    if family == Family::Gemma3 {
        // transformers 4's Gemma 3 layout: global rope + scaling, local base 10000 (what
        // llama.cpp uses for the sliding layers).
        c.insert("rope_theta".into(), json!(theta));
        c.insert("rope_scaling".into(), scaling.unwrap_or(Value::Null));
        c.insert("rope_local_base_freq".into(), json!(10000.0));
    } else {
        let mut rope = scaling.unwrap_or_else(|| json!({"rope_type": "default"}));
        rope["rope_theta"] = json!(theta);
        c.insert("rope_parameters".into(), rope);
    }
    if matches!(family, Family::Llama | Family::Mistral) {
        let has = |t: &str| file.tensor(t).is_some();
        c.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
        c.insert("mlp_bias".into(), json!(has("blk.0.ffn_gate.bias")));
    }
    if family == Family::Phi3 {
        // Phi-3 keeps its pretrained length at the config's top level (LongRoPE reads it).
        if let Some(o) = m.opt_usize(&m.key(keys::ROPE_SCALING_ORIG_CTX_LEN))? {
            c.insert("original_max_position_embeddings".into(), json!(o));
        }
    }
    if let Some(w) = m.opt_usize(&m.key("attention.sliding_window"))? {
        if w > 0
            && matches!(
                family,
                Family::Mistral | Family::Phi3 | Family::Gemma2 | Family::Gemma3
            )
        {
            c.insert("sliding_window".into(), json!(w));
        }
    } else if gemma {
        return Err(gguf_err(
            file,
            &m.key("attention.sliding_window"),
            "missing",
        ));
    }
    if gemma {
        // llama.cpp scales scores by 1/√head_dim, except for the 27B models (46 / 62 layers)
        // which use 1/√(hidden/heads).
        let big = (family == Family::Gemma2 && layers == 46)
            || (family == Family::Gemma3 && layers == 62);
        let scalar = if big { hidden / heads } else { head_dim };
        c.insert("query_pre_attn_scalar".into(), json!(scalar));
    }
    if family == Family::Gemma2 {
        for (key, default) in [
            ("attn_logit_softcapping", 50.0),
            ("final_logit_softcapping", 30.0),
        ] {
            let v = m.opt_f64(&m.key(key))?.unwrap_or(default);
            c.insert(key.into(), json!(v));
        }
    }
    if family == Family::Gemma3 {
        if let Some(v) = m.opt_f64(&m.key("final_logit_softcapping"))? {
            c.insert("final_logit_softcapping".into(), json!(v));
        }
        let key = m.key("attention.sliding_window_pattern");
        match file.metadata(&key) {
            None => {
                c.insert("sliding_window_pattern".into(), json!(6));
            }
            Some(GgufValue::Array(GgufArray::Other(7, flags))) => {
                let types: Vec<Value> = flags
                    .iter()
                    .map(|f| match f {
                        GgufValue::Bool(true) => json!("sliding_attention"),
                        _ => json!("full_attention"),
                    })
                    .collect();
                c.insert("layer_types".into(), Value::Array(types));
            }
            Some(v) => match v.as_u64() {
                Some(p) => {
                    c.insert("sliding_window_pattern".into(), json!(p));
                }
                None => return Err(gguf_err(file, &key, format!("unexpected value {v:?}"))),
            },
        }
    }
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
    ] {
        match m.opt_usize(gguf_key)? {
            Some(id) => {
                c.insert(hf_key.into(), json!(id));
            }
            // Absent ids are stated as absent: a family default (Phi-3's 32000) may lie outside
            // the vocabulary.
            None if hf_key != "unk_token_id" => {
                c.insert(hf_key.into(), Value::Null);
            }
            None => {}
        }
    }
    Ok(DerivedConfig {
        json: Value::Object(c),
        explicit_rope_factors,
    })
}

/// What the per-frequency rope tensors of a file say.
enum FileRope {
    /// None in the file.
    None,
    /// A `rope_parameters` dict that regenerates them exactly.
    Config(Value),
    /// Llama 3 divisors no searched parameters regenerate (used as they are).
    Factors(Vec<f32>),
}

/// One per-frequency tensor of `head_dim / 2` finite positive values, if the file has it.
fn frequency_tensor(m: &Meta<'_>, name: &str, head_dim: usize) -> Result<Option<Vec<f32>>> {
    let Some(info) = m.file.tensor(name) else {
        return Ok(None);
    };
    if info.shape != [head_dim / 2] {
        return Err(gguf_err(
            m.file,
            name,
            format!(
                "shape {:?}, expected [{}] (head_dim / 2)",
                info.shape,
                head_dim / 2
            ),
        ));
    }
    let values = m.file.read_tensor_f32(name)?;
    if let Some(i) = values.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(gguf_err(
            m.file,
            name,
            format!(
                "value {} at index {i} is not a positive finite number",
                values[i]
            ),
        ));
    }
    Ok(Some(values))
}

/// The rope scaling the file's per-frequency tensors stand for (docs/FORMATS.md): Llama 3's
/// `rope_freqs` as `llama3` parameters when [`recover_llama3`] finds ones regenerating every
/// divisor bit for bit, else the divisors; Phi-3's `rope_factors_long/short` with
/// `rope.scaling.attn_factor` and `rope.scaling.original_context_length` as `longrope`.
///
/// [`recover_llama3`]: crate::rope::factors::recover_llama3
fn rope_from_tensors(
    m: &Meta<'_>,
    family: Family,
    head_dim: usize,
    theta: f64,
) -> Result<FileRope> {
    let orig = m.opt_usize(&m.key(keys::ROPE_SCALING_ORIG_CTX_LEN))?;
    if let Some(freqs) = frequency_tensor(m, "rope_freqs.weight", head_dim)? {
        if !matches!(family, Family::Llama | Family::Mistral) {
            return Err(gguf_err(
                m.file,
                "rope_freqs.weight",
                format!(
                    "per-frequency divisors are read for llama only, not {}",
                    m.arch
                ),
            ));
        }
        let recovered = crate::rope::factors::recover_llama3(theta as f32, head_dim, &freqs, orig);
        return Ok(match recovered {
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            }) => FileRope::Config(json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max,
            })),
            _ => FileRope::Factors(freqs),
        });
    }
    let long = frequency_tensor(m, "rope_factors_long.weight", head_dim)?;
    let short = frequency_tensor(m, "rope_factors_short.weight", head_dim)?;
    match (long, short) {
        (None, None) => Ok(FileRope::None),
        (Some(long), Some(short)) if family == Family::Phi3 => {
            let orig_key = m.key(keys::ROPE_SCALING_ORIG_CTX_LEN);
            let original =
                orig.ok_or_else(|| gguf_err(m.file, &orig_key, "missing for LongRoPE factors"))?;
            let mut rope = json!({
                "rope_type": "longrope",
                "long_factor": long,
                "short_factor": short,
                "original_max_position_embeddings": original,
            });
            if let Some(a) = m.opt_f64(&m.key(keys::ROPE_SCALING_ATTN_FACTOR))? {
                rope["attention_factor"] = json!(a);
            }
            Ok(FileRope::Config(rope))
        }
        (Some(_), Some(_)) => Err(gguf_err(
            m.file,
            "rope_factors_long.weight",
            format!("LongRoPE factors are read for phi3 only, not {}", m.arch),
        )),
        (Some(_), None) => Err(gguf_err(
            m.file,
            "rope_factors_short.weight",
            "missing (rope_factors_long.weight is present)",
        )),
        (None, Some(_)) => Err(gguf_err(
            m.file,
            "rope_factors_long.weight",
            "missing (rope_factors_short.weight is present)",
        )),
    }
}

/// `{arch}.rope.scaling.*` as a transformers rope dict (`None`: no scaling).
fn rope_scaling(m: &Meta<'_>) -> Result<Option<Value>> {
    let key = m.key("rope.scaling.type");
    let kind = match m.file.metadata(&key) {
        None => return Ok(None),
        Some(GgufValue::String(s)) => s.as_str(),
        Some(v) => {
            return Err(gguf_err(
                m.file,
                &key,
                format!("expected a string, got {v:?}"),
            ))
        }
    };
    match kind {
        "none" => Ok(None),
        "linear" => {
            let factor_key = m.key("rope.scaling.factor");
            let factor = m
                .opt_f64(&factor_key)?
                .ok_or_else(|| gguf_err(m.file, &factor_key, "missing for linear scaling"))?;
            Ok(Some(json!({"rope_type": "linear", "factor": factor})))
        }
        "yarn" => {
            // What the exporter (and llama.cpp's converter) writes for YaRN: the factor, the
            // original context, and beta fast/slow (llama.cpp's defaults 32 and 1 when absent).
            // An attention factor is written only when it differs from YaRN's default
            // `0.1·ln(factor) + 1`, which transformers then computes itself.
            let factor_key = m.key("rope.scaling.factor");
            let factor = m
                .opt_f64(&factor_key)?
                .ok_or_else(|| gguf_err(m.file, &factor_key, "missing for yarn scaling"))?;
            let original_key = m.key("rope.scaling.original_context_length");
            let original = m
                .opt_usize(&original_key)?
                .ok_or_else(|| gguf_err(m.file, &original_key, "missing for yarn scaling"))?;
            let beta_fast = m
                .opt_f64(&m.key("rope.scaling.yarn_beta_fast"))?
                .unwrap_or(32.0);
            let beta_slow = m
                .opt_f64(&m.key("rope.scaling.yarn_beta_slow"))?
                .unwrap_or(1.0);
            let mut rope = json!({
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
            });
            if let Some(attention) = m.opt_f64(&m.key("rope.scaling.attn_factor"))? {
                let default = if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                };
                if (attention - default).abs() > 1e-6 {
                    rope["attention_factor"] = json!(attention);
                }
            }
            Ok(Some(rope))
        }
        other => Err(gguf_err(
            m.file,
            &key,
            format!("{other:?} is not implemented for GGUF sources (none, linear, yarn)"),
        )),
    }
}

/// An error about metadata `key` of `file` (named with its path).
pub(crate) fn gguf_err(file: &GgufFile, key: &str, reason: impl Into<String>) -> LmError {
    LmError::Gguf {
        path: file.path.clone(),
        key: key.to_string(),
        reason: reason.into(),
    }
}
