//! Model families as descriptions, not code: what a family changes in the one decoder
//! (norm kind, MLP activation, per-layer attention window and rope, q/k norms, biases,
//! sandwich norms, soft caps, embedding scale, module names), read from a Hugging Face
//! `config.json` by its `model_type`. The decoder ([`crate::decoder`]) reads only this.
//!
//! An option a family has but this crate does not implement is refused with its key and
//! value ([`LmError::Unsupported`]).

use serde_json::{Map, Value};

use crate::error::{LmError, Result};
use crate::rope::Rope;

/// The linear projections of a Llama-layout decoder layer, by their path below
/// `model.layers.{i}` (Phi-3 fuses them: see [`Architecture::linear_names`]).
pub const LAYER_LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The families the decoder computes, by their transformers `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// transformers' causal-LM class name (`architectures[0]`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// The family of a `model_type`, or an error naming it.
    pub fn from_model_type(model_type: &Value) -> Result<Family> {
        Ok(match model_type.as_str() {
            Some("llama") => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            Some("gemma2") => Family::Gemma2,
            Some("gemma3_text") => Family::Gemma3,
            Some("phi3") => Family::Phi3,
            _ => {
                return Err(LmError::Unsupported {
                    key: "model_type".into(),
                    value: model_type.to_string(),
                    reason: "supported families: llama, mistral, qwen2, qwen3, gemma2, \
                             gemma3_text, phi3"
                        .into(),
                })
            }
        })
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// How an RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x̂·w` (Llama, Qwen, Mistral, Phi-3).
    Weight,
    /// `x̂·(1 + w)` (Gemma: weights stored around 0).
    OnePlusWeight,
}

/// The gate activation of the gated MLP `down(act(gate)·up)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, GeGLU).
    GeluTanh,
}

/// What one decoder layer's attention sees.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    /// A query at position `i` sees keys `j` with `i − window < j <= i`; `None`: all `j <= i`.
    pub sliding_window: Option<usize>,
    /// Index into [`Architecture::ropes`].
    pub rope: usize,
}

/// Everything the decoder needs to know about a family beyond the sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub family: Family,
    pub norm: NormKind,
    pub activation: Activation,
    /// Per-head RMSNorms of queries and keys before RoPE (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// Gemma's norms after attention and after the MLP (`post_attention_layernorm` applied to
    /// the attention output, `pre_feedforward_layernorm` before the MLP and
    /// `post_feedforward_layernorm` after it).
    pub sandwich_norms: bool,
    /// The embedding rows are multiplied by this (Gemma: √hidden).
    pub embedding_scale: Option<f32>,
    /// The projections (by their name below the layer) that carry a bias.
    pub biases: Vec<&'static str>,
    /// Attention scores are `q·k·query_scale` (`1/√head_dim`, Gemma `query_pre_attn_scalar^-½`).
    pub query_scale: f32,
    /// `cap·tanh(score/cap)` before the softmax (Gemma 2 `attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// `cap·tanh(logit/cap)` on the LM head output (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` instead of q/k/v and gate/up.
    pub fused_projections: bool,
    /// One entry per decoder layer.
    pub layers: Vec<LayerAttention>,
    /// The distinct rotary embeddings the layers use.
    pub ropes: Vec<Rope>,
}

/// The names of a layer's norms: (before attention, the MLP's pre-norm, Gemma's post-attention
/// norm, Gemma's post-MLP norm).
pub const NORM_NAMES: [&str; 4] = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

impl Architecture {
    /// Llama with the default rope of base `theta`, for `layers` layers of `head_dim`.
    pub fn llama(layers: usize, theta: f32, head_dim: usize) -> Architecture {
        Architecture {
            family: Family::Llama,
            norm: NormKind::Weight,
            activation: Activation::Silu,
            qk_norm: false,
            sandwich_norms: false,
            embedding_scale: None,
            biases: Vec::new(),
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            fused_projections: false,
            layers: vec![
                LayerAttention {
                    sliding_window: None,
                    rope: 0
                };
                layers
            ],
            ropes: vec![Rope {
                theta,
                dim: head_dim,
                scaling: crate::rope::RopeScaling::Default,
            }],
        }
    }

    /// The projections of a layer in their order (attention inputs, output, MLP inputs, down),
    /// each with its name below `model.layers.{i}`.
    pub fn linear_names(&self) -> &'static [&'static str] {
        if self.fused_projections {
            &[
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.gate_up_proj",
                "mlp.down_proj",
            ]
        } else {
            &LAYER_LINEAR_NAMES
        }
    }

    /// Whether the module named `name` (below the layer) has a bias.
    pub fn has_bias(&self, name: &str) -> bool {
        self.biases.contains(&name)
    }

    /// Reads the family description from a config object; `head_dim` and `num_layers` come
    /// from the already-parsed sizes.
    pub fn from_config(
        obj: &Map<String, Value>,
        head_dim: usize,
        num_layers: usize,
    ) -> Result<Self> {
        let family = Family::from_model_type(
            obj.get("model_type")
                .ok_or_else(|| LmError::config("model_type", "missing"))?,
        )?;
        let unsupported = |key: &str, value: &Value, reason: &str| LmError::Unsupported {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
        let number = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| LmError::config(key, format!("expected a number, got {v}"))),
            }
        };
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);

        // Activation: `hidden_act` (Gemma: `hidden_activation`, which takes precedence).
        let act_key = if gemma && obj.get("hidden_activation").is_some_and(|v| !v.is_null()) {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let activation = match obj.get(act_key) {
            None | Some(Value::Null) if gemma => Activation::GeluTanh,
            None | Some(Value::Null) => Activation::Silu,
            Some(v) => match v.as_str() {
                Some("silu") | Some("swish") => Activation::Silu,
                Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
                _ => {
                    return Err(unsupported(
                        act_key,
                        v,
                        "implemented activations: silu, gelu_pytorch_tanh",
                    ))
                }
            },
        };
        for key in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
            if let Some(v) = obj.get(key) {
                if !v.is_null() && v.as_f64() != Some(0.0) {
                    return Err(unsupported(key, v, "dropout is not implemented"));
                }
            }
        }
        if let Some(v) = obj.get("partial_rotary_factor") {
            if !v.is_null() && v.as_f64() != Some(1.0) {
                return Err(unsupported(
                    "partial_rotary_factor",
                    v,
                    "only full rotary embeddings are implemented",
                ));
            }
        }
        if let Some(v) = obj.get("use_bidirectional_attention") {
            if v.as_bool() == Some(true) {
                return Err(unsupported(
                    "use_bidirectional_attention",
                    v,
                    "only causal attention is implemented",
                ));
            }
        }
        if let Some(v) = obj.get("pretraining_tp") {
            if !v.is_null() && v.as_u64() != Some(1) {
                return Err(unsupported(
                    "pretraining_tp",
                    v,
                    "only pretraining_tp = 1 is implemented",
                ));
            }
        }

        // Biases.
        let mut biases: Vec<&'static str> = Vec::new();
        let attention_bias = flag("attention_bias");
        match family {
            Family::Qwen2 => {
                biases.extend(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
            }
            Family::Phi3 => {}
            _ if attention_bias => biases.extend([
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ]),
            _ => {}
        }
        if matches!(family, Family::Phi3) && attention_bias {
            return Err(unsupported(
                "attention_bias",
                &Value::Bool(true),
                "Phi-3's fused projections have no biases",
            ));
        }
        if flag("mlp_bias") {
            if family != Family::Llama {
                return Err(unsupported(
                    "mlp_bias",
                    &Value::Bool(true),
                    "MLP biases are a Llama option",
                ));
            }
            biases.extend(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]);
        }

        // Attention windows per layer.
        let window = match obj.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|&w| w > 0).ok_or_else(|| {
                LmError::config(
                    "sliding_window",
                    format!("expected a positive integer, got {v}"),
                )
            })? as usize),
        };
        let layer_types: Vec<bool> = match obj.get("layer_types") {
            Some(Value::Array(items)) => {
                if items.len() != num_layers {
                    return Err(LmError::config(
                        "layer_types",
                        format!("has {} entries for {num_layers} layers", items.len()),
                    ));
                }
                items
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(unsupported(
                            "layer_types",
                            t,
                            "implemented layer types: sliding_attention, full_attention",
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            None | Some(Value::Null) => (0..num_layers)
                .map(|i| match family {
                    Family::Llama | Family::Mistral | Family::Phi3 => window.is_some(),
                    Family::Qwen2 | Family::Qwen3 => {
                        let max_window_layers = obj
                            .get("max_window_layers")
                            .and_then(Value::as_u64)
                            .unwrap_or(28);
                        flag("use_sliding_window")
                            && window.is_some()
                            && i as u64 >= max_window_layers
                    }
                    Family::Gemma2 => (i + 1) % 2 != 0,
                    Family::Gemma3 => {
                        let pattern = obj
                            .get("sliding_window_pattern")
                            .or_else(|| obj.get("_sliding_window_pattern"))
                            .and_then(Value::as_u64)
                            .unwrap_or(6) as usize;
                        (i + 1) % pattern.max(1) != 0
                    }
                })
                .collect(),
            Some(v) => {
                return Err(LmError::config(
                    "layer_types",
                    format!("expected a list, got {v}"),
                ))
            }
        };
        if family == Family::Llama && window.is_some() {
            return Err(unsupported(
                "sliding_window",
                &obj["sliding_window"],
                "Llama has no sliding-window attention (use model_type mistral)",
            ));
        }
        if layer_types.iter().any(|&s| s) && window.is_none() {
            return Err(LmError::config(
                "sliding_window",
                "layer_types has sliding_attention layers but sliding_window is not set",
            ));
        }

        // Rotary embeddings: one for every layer, or (Gemma 3) one per layer type.
        let theta = number("rope_theta")?;
        let rope_dict = |key: &str| -> Result<Option<&Map<String, Value>>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m)),
                Some(v) => Err(LmError::config(key, format!("expected an object, got {v}"))),
            }
        };
        let params = rope_dict("rope_parameters")?;
        let legacy = rope_dict("rope_scaling")?;
        let per_type = params
            .filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
        let (ropes, rope_of): (Vec<Rope>, Box<dyn Fn(bool) -> usize>) = if let Some(p) = per_type {
            let sub = |name: &str| -> Result<Option<&Map<String, Value>>> {
                match p.get(name) {
                    None => Ok(None),
                    Some(Value::Object(m)) => Ok(Some(m)),
                    Some(v) => Err(LmError::config(
                        format!("rope_parameters.{name}"),
                        format!("expected an object, got {v}"),
                    )),
                }
            };
            let full = Rope::parse(
                "rope_parameters.full_attention",
                sub("full_attention")?,
                theta,
                head_dim,
                obj,
            )?;
            let sliding = match sub("sliding_attention")? {
                Some(s) => Rope::parse(
                    "rope_parameters.sliding_attention",
                    Some(s),
                    theta,
                    head_dim,
                    obj,
                )?,
                None => full.clone(),
            };
            (vec![full, sliding], Box::new(usize::from))
        } else if family == Family::Gemma3 {
            // transformers 4 layout: `rope_theta` + `rope_scaling` for global layers,
            // `rope_local_base_freq` for sliding ones.
            let full = Rope::parse("rope_scaling", legacy.or(params), theta, head_dim, obj)?;
            let local = number("rope_local_base_freq")?.unwrap_or(10000.0);
            let sliding = Rope::parse("rope_local_base_freq", None, Some(local), head_dim, obj)?;
            (vec![full, sliding], Box::new(usize::from))
        } else {
            let (key, dict) = match (params, legacy) {
                (Some(p), None) => ("rope_parameters", Some(p)),
                (None, Some(l)) => ("rope_scaling", Some(l)),
                (Some(p), Some(l)) => {
                    // Both present: transformers 5 moved rope_scaling into rope_parameters.
                    if l.get("rope_type")
                        .or_else(|| l.get("type"))
                        .and_then(Value::as_str)
                        .is_some_and(|t| t != "default")
                        && p.get("rope_type").and_then(Value::as_str) == Some("default")
                    {
                        ("rope_scaling", Some(l))
                    } else {
                        ("rope_parameters", Some(p))
                    }
                }
                (None, None) => ("rope_parameters", None),
            };
            let rope = Rope::parse(key, dict, theta, head_dim, obj)?;
            (vec![rope], Box::new(|_| 0))
        };
        let layers = layer_types
            .iter()
            .map(|&sliding| LayerAttention {
                sliding_window: if sliding { window } else { None },
                rope: rope_of(sliding),
            })
            .collect();

        let query_scale = if gemma {
            let scalar = number("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
            if !(scalar.is_finite() && scalar > 0.0) {
                return Err(LmError::config(
                    "query_pre_attn_scalar",
                    format!("{scalar} is invalid"),
                ));
            }
            (scalar as f32).powf(-0.5)
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let cap = |key: &str| -> Result<Option<f32>> {
            match number(key)? {
                None => Ok(None),
                Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
                Some(c) => Err(LmError::config(key, format!("{c} is invalid"))),
            }
        };
        let (attn_softcap, final_softcap) = if gemma {
            (
                cap("attn_logit_softcapping")?,
                cap("final_logit_softcapping")?,
            )
        } else {
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                    return Err(unsupported(key, v, "soft-capping is a Gemma option"));
                }
            }
            (None, None)
        };
        let hidden = obj.get("hidden_size").and_then(Value::as_u64).unwrap_or(0) as f32;
        Ok(Architecture {
            family,
            norm: if gemma {
                NormKind::OnePlusWeight
            } else {
                NormKind::Weight
            },
            activation,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sandwich_norms: gemma,
            embedding_scale: gemma.then(|| hidden.sqrt()),
            biases,
            query_scale,
            attn_softcap,
            final_softcap,
            fused_projections: family == Family::Phi3,
            layers,
            ropes,
        })
    }

    /// Whether the family ties the LM head to the embeddings when the config does not say.
    pub fn ties_by_default(family: Family) -> bool {
        matches!(family, Family::Gemma2 | Family::Gemma3)
    }
}
