//! GGUF metadata per architecture: the key names (llama.cpp's `gguf-py/gguf/constants.py`,
//! `Keys.LLM` / `Keys.Attention` / `Keys.Rope`, each below the `{arch}.` prefix), what the
//! converter writes for each family (`TextModel.set_gguf_parameters` and the family classes'
//! overrides in `convert_hf_to_gguf.py`), and the check that refuses, by name and value, an
//! option of a model that llama.cpp's architecture cannot express.
//!
//! ```
//! use lm::gguf::metadata::{arch_key, keys};
//! assert_eq!(arch_key("qwen3", keys::HEAD_COUNT_KV), "qwen3.attention.head_count_kv");
//! ```

use quant_core::ggml::GgmlType;
use quant_core::gguf::{GgufArray, GgufValue};
use serde_json::Value;

use super::names::FamilyNames;
use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::family::{Activation, Family};
use crate::rope::{Rope, RopeScaling};

/// Key names below `{arch}.` (see [`arch_key`]).
pub mod keys {
    pub const VOCAB_SIZE: &str = "vocab_size";
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const LAYER_NORM_RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const SLIDING_WINDOW: &str = "attention.sliding_window";
    pub const SLIDING_WINDOW_PATTERN: &str = "attention.sliding_window_pattern";
    pub const ATTN_LOGIT_SOFTCAPPING: &str = "attn_logit_softcapping";
    pub const FINAL_LOGIT_SOFTCAPPING: &str = "final_logit_softcapping";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const ROPE_FREQ_BASE_SWA: &str = "rope.freq_base_swa";
    pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
    pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
    pub const ROPE_SCALING_ATTN_FACTOR: &str = "rope.scaling.attn_factor";
    pub const ROPE_SCALING_ORIG_CTX_LEN: &str = "rope.scaling.original_context_length";
    pub const ROPE_SCALING_YARN_BETA_FAST: &str = "rope.scaling.yarn_beta_fast";
    pub const ROPE_SCALING_YARN_BETA_SLOW: &str = "rope.scaling.yarn_beta_slow";
}

/// `{arch}.{key}`.
pub fn arch_key(arch: &str, key: &str) -> String {
    format!("{arch}.{key}")
}

/// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`) of a model written in `ty`.
pub fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2_K => 10,
        GgmlType::Q3_K => 11,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
    }
}

fn refuse(key: &str, value: impl std::fmt::Display, reason: String) -> LmError {
    LmError::Unsupported {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    }
}

/// The sliding-window layers llama.cpp assumes for an architecture without a per-layer key:
/// Gemma 2 alternates (`set_swa_pattern(2)`: even layers slide), Gemma 3 slides five layers of
/// six (`set_swa_pattern(6)`), unless the file says otherwise with
/// `{arch}.attention.sliding_window_pattern`.
fn default_swa_layer(family: Family, layer: usize) -> bool {
    match family {
        Family::Gemma2 => layer % 2 == 0,
        Family::Gemma3 => layer % 6 < 5,
        _ => false,
    }
}

/// The one window of the sliding layers, and which layers slide.
fn windows(config: &LlamaConfig) -> (Option<usize>, Vec<bool>) {
    let layers = &config.architecture.layers;
    let window = layers.iter().find_map(|l| l.sliding_window);
    (
        window,
        layers.iter().map(|l| l.sliding_window.is_some()).collect(),
    )
}

/// Refuses, by name and value, what llama.cpp's architecture for this family cannot compute
/// as our decoder does.
pub fn check_exportable(config: &LlamaConfig) -> Result<()> {
    let arch = &config.architecture;
    let family = arch.family;
    let names = FamilyNames::of(family);
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let expected_act = if gemma {
        Activation::GeluTanh
    } else {
        Activation::Silu
    };
    if arch.activation != expected_act {
        return Err(refuse(
            "hidden_act",
            format!("{:?}", arch.activation),
            format!("llama.cpp's `{}` uses {expected_act:?}", names.arch),
        ));
    }
    // Projection biases: Qwen2's q/k/v are part of its architecture; others are refused.
    let allowed_biases: &[&str] = match family {
        Family::Qwen2 => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        _ => &[],
    };
    if let Some(b) = arch.biases.iter().find(|b| !allowed_biases.contains(b)) {
        return Err(refuse(
            "attention_bias / mlp_bias",
            format!("true ({b})"),
            format!(
                "GGUF export of a `{b}` bias is not implemented for `{}`",
                names.arch
            ),
        ));
    }
    if !config.tie_word_embeddings && !names.untied_head {
        return Err(refuse(
            "tie_word_embeddings",
            "false",
            format!(
                "llama.cpp's `{}` always uses token_embd as the LM head (the converter drops lm_head)",
                names.arch
            ),
        ));
    }
    // Attention scale: llama.cpp's Gemma uses 1/√head_dim (27B-sized models excepted), the
    // others 1/√head_dim always.
    let standard = 1.0 / (config.head_dim as f32).sqrt();
    if (arch.query_scale - standard).abs() > 1e-6 * standard {
        return Err(refuse(
            "query_pre_attn_scalar",
            1.0 / (arch.query_scale * arch.query_scale),
            format!(
                "llama.cpp's `{}` scales attention by 1/√head_dim = 1/√{}",
                names.arch, config.head_dim
            ),
        ));
    }
    match family {
        Family::Gemma2 if arch.attn_softcap.is_none() || arch.final_softcap.is_none() => {
            return Err(refuse(
                "attn_logit_softcapping / final_logit_softcapping",
                "null",
                "llama.cpp's `gemma2` soft-caps always (50 and 30 when the file has no value)"
                    .into(),
            ))
        }
        Family::Gemma3 if arch.attn_softcap.is_some() => {
            return Err(refuse(
                "attn_logit_softcapping",
                arch.attn_softcap.unwrap_or_default(),
                "llama.cpp's `gemma3` has no attention soft-capping".into(),
            ))
        }
        _ => {}
    }

    // Sliding windows.
    let (window, sliding) = windows(config);
    if let Some(w) = window {
        if arch
            .layers
            .iter()
            .any(|l| l.sliding_window.is_some_and(|x| x != w))
        {
            return Err(refuse(
                "sliding_window",
                "different per layer",
                "GGUF has one sliding_window for every sliding layer".into(),
            ));
        }
        match family {
            // A window as long as the context never hides a key: nothing to express.
            // llama.cpp's `phi3` reads `attention.sliding_window` but attends to every key
            // (checked with llama-cpp-python 0.3.36: its logits are transformers' with the
            // window removed).
            Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3 | Family::Phi3
                if w < config.max_position_embeddings =>
            {
                return Err(refuse(
                    "sliding_window",
                    w,
                    format!(
                        "llama.cpp's `{}` computes no sliding-window attention; a window of at \
                         least max_position_embeddings = {} would export",
                        names.arch, config.max_position_embeddings
                    ),
                ))
            }
            Family::Gemma2 => {
                let pattern: Vec<bool> = (0..sliding.len())
                    .map(|i| default_swa_layer(family, i))
                    .collect();
                if sliding != pattern {
                    return Err(refuse(
                        "layer_types",
                        format!("{sliding:?}"),
                        "llama.cpp's `gemma2` slides the even layers".into(),
                    ));
                }
            }
            _ => {}
        }
    } else if gemma {
        return Err(refuse(
            "sliding_window",
            "null",
            format!("llama.cpp's `{}` always has sliding layers", names.arch),
        ));
    }

    // Rotary embeddings.
    for (i, rope) in arch.ropes.iter().enumerate() {
        let global = i == 0;
        let ok = match (&rope.scaling, family) {
            (RopeScaling::Default, _) => true,
            (RopeScaling::Linear { .. }, Family::Gemma2) => false,
            (RopeScaling::Linear { .. }, _) => global,
            (
                RopeScaling::Llama3 { .. } | RopeScaling::Factors { .. },
                Family::Llama | Family::Mistral,
            ) => true,
            (RopeScaling::LongRope { .. }, Family::Phi3) => true,
            (
                RopeScaling::Yarn {
                    truncate: true,
                    factor,
                    attention_factor,
                    ..
                },
                Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3,
            ) => (attention_factor - yarn_default_attention(*factor)).abs() < 1e-6,
            _ => false,
        };
        if !ok {
            return Err(refuse(
                "rope_parameters.rope_type",
                rope.type_name(),
                format!(
                    "llama.cpp's `{}` (as the converter writes it) cannot express this rope{}",
                    names.arch,
                    if global { "" } else { " on the sliding layers" }
                ),
            ));
        }
        if rope.dim != config.head_dim {
            return Err(refuse(
                "partial_rotary_factor",
                rope.dim as f32 / config.head_dim as f32,
                "GGUF export writes full rotary embeddings only".into(),
            ));
        }
    }
    if family == Family::Gemma2 && arch.ropes.len() > 1 && arch.ropes[1] != arch.ropes[0] {
        return Err(refuse(
            "rope_parameters.sliding_attention",
            arch.ropes[1].type_name(),
            "llama.cpp's `gemma2` uses one rope for every layer".into(),
        ));
    }
    Ok(())
}

/// GGUF value type of a boolean (`GGUF_TYPE_BOOL`).
const GGUF_TYPE_BOOL: u32 = 7;

/// YaRN's default attention factor `0.1·ln(factor) + 1`, which llama.cpp computes itself.
fn yarn_default_attention(factor: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * factor.ln() + 1.0
    }
}

/// `original_max_position_embeddings` of the config (top level or in the rope parameters).
fn original_context(config: &LlamaConfig) -> Option<u64> {
    let src = config.source.as_ref()?;
    src.get("original_max_position_embeddings")
        .or_else(|| {
            src.get("rope_parameters")?
                .get("original_max_position_embeddings")
        })
        .or_else(|| {
            src.get("rope_scaling")?
                .get("original_max_position_embeddings")
        })
        .and_then(Value::as_u64)
}

/// The `general.*` and `{arch}.*` metadata of a model of `config` written in `ty` (no
/// tokenizer keys), as llama.cpp's converter writes them for the family; call
/// [`check_exportable`] first.
pub fn model_metadata(config: &LlamaConfig, name: &str, ty: GgmlType) -> Vec<(String, GgufValue)> {
    let family = config.architecture.family;
    let arch = FamilyNames::of(family).arch;
    let mut out: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.into())),
        ("general.alignment".into(), GgufValue::U32(32)),
        ("general.file_type".into(), GgufValue::U32(file_type(ty))),
        ("general.quantization_version".into(), GgufValue::U32(2)),
    ];
    let mut put = |key: &str, v: GgufValue| out.push((arch_key(arch, key), v));
    let u = |v: usize| GgufValue::U32(v as u32);
    use keys::*;
    if matches!(family, Family::Llama | Family::Mistral) {
        put(VOCAB_SIZE, u(config.vocab_size));
    }
    put(CONTEXT_LENGTH, u(config.max_position_embeddings));
    put(EMBEDDING_LENGTH, u(config.hidden_size));
    put(BLOCK_COUNT, u(config.num_hidden_layers));
    put(FEED_FORWARD_LENGTH, u(config.intermediate_size));
    put(HEAD_COUNT, u(config.num_attention_heads));
    put(HEAD_COUNT_KV, u(config.num_key_value_heads));
    put(KEY_LENGTH, u(config.head_dim));
    put(VALUE_LENGTH, u(config.head_dim));
    put(LAYER_NORM_RMS_EPS, GgufValue::F32(config.rms_norm_eps));
    let arch_desc = &config.architecture;
    let global: &Rope = &arch_desc.ropes[0];
    // Gemma 2's converter writes no rope base (llama.cpp's default is 10000); it is written
    // here too so that a model with another base is read as it computes.
    put(ROPE_FREQ_BASE, GgufValue::F32(global.theta));
    if matches!(family, Family::Llama | Family::Mistral | Family::Phi3) {
        put(ROPE_DIMENSION_COUNT, u(global.dim));
    }
    match &global.scaling {
        RopeScaling::Linear { factor } => {
            put(ROPE_SCALING_TYPE, GgufValue::String("linear".into()));
            put(ROPE_SCALING_FACTOR, GgufValue::F32(*factor));
        }
        RopeScaling::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            ..
        } => {
            put(ROPE_SCALING_TYPE, GgufValue::String("yarn".into()));
            put(ROPE_SCALING_FACTOR, GgufValue::F32(*factor));
            put(ROPE_SCALING_ORIG_CTX_LEN, u(*original_max));
            put(ROPE_SCALING_YARN_BETA_FAST, GgufValue::F32(*beta_fast));
            put(ROPE_SCALING_YARN_BETA_SLOW, GgufValue::F32(*beta_slow));
        }
        RopeScaling::LongRope {
            attention_factor,
            original_max,
            ..
        } => {
            // Phi-3's converter: the attention factor and the original context; the factors
            // are the `rope_factors_long/short` tensors.
            put(ROPE_SCALING_ATTN_FACTOR, GgufValue::F32(*attention_factor));
            put(ROPE_SCALING_ORIG_CTX_LEN, u(*original_max));
        }
        RopeScaling::Default
        | RopeScaling::Llama3 { .. }
        | RopeScaling::Factors { .. }
        | RopeScaling::Dynamic { .. } => {}
    }
    if family == Family::Phi3 && !matches!(global.scaling, RopeScaling::LongRope { .. }) {
        let orig = original_context(config).unwrap_or(config.max_position_embeddings as u64);
        put(ROPE_SCALING_ORIG_CTX_LEN, GgufValue::U32(orig as u32));
    }
    if let Some(local) = arch_desc.ropes.get(1).filter(|_| family == Family::Gemma3) {
        put(ROPE_FREQ_BASE_SWA, GgufValue::F32(local.theta));
    }
    let (window, sliding) = windows(config);
    match family {
        Family::Gemma2 => {
            put(
                ATTN_LOGIT_SOFTCAPPING,
                GgufValue::F32(arch_desc.attn_softcap.unwrap_or_default()),
            );
            put(
                FINAL_LOGIT_SOFTCAPPING,
                GgufValue::F32(arch_desc.final_softcap.unwrap_or_default()),
            );
            put(SLIDING_WINDOW, u(window.unwrap_or(0)));
        }
        Family::Gemma3 => {
            if let Some(cap) = arch_desc.final_softcap {
                put(FINAL_LOGIT_SOFTCAPPING, GgufValue::F32(cap));
            }
            put(SLIDING_WINDOW, u(window.unwrap_or(0)));
            let default: Vec<bool> = (0..sliding.len())
                .map(|i| default_swa_layer(family, i))
                .collect();
            if sliding != default {
                // llama.cpp reads a per-layer pattern when the file has one.
                put(
                    SLIDING_WINDOW_PATTERN,
                    GgufValue::Array(GgufArray::Other(
                        GGUF_TYPE_BOOL,
                        sliding.iter().map(|&s| GgufValue::Bool(s)).collect(),
                    )),
                );
            }
        }
        Family::Phi3 => put(SLIDING_WINDOW, u(window.unwrap_or(0))),
        // `check_exportable` lets through only windows that never hide a key.
        Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3 => {}
    }
    out
}
