//! The architecture hyper-parameters, read from (and written as) a Hugging Face `config.json`:
//! the sizes, and the family description ([`Architecture`]) that says what the one decoder
//! computes for this `model_type`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{LmError, Result};
use crate::family::{Architecture, Family};

/// The hyper-parameters of a decoder of one of the supported families (see
/// [`crate::family`]): Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3.
///
/// Options a family has that are not implemented (dropout, partial rotary embeddings, an
/// unknown rope type or activation, another `model_type`) are rejected with an error naming
/// the key and its value.
///
/// ```
/// use lm::LlamaConfig;
/// let json = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
///     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
///     "num_key_value_heads": 2, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}"#;
/// let config = LlamaConfig::from_json_str(json).unwrap();
/// assert_eq!(config.head_dim, 8);
/// assert_eq!(config.rope_theta, 500000.0);
/// let bad = json.replace("\"llama\"", "\"llama\", \"hidden_act\": \"relu\"");
/// assert!(LlamaConfig::from_json_str(&bad).unwrap_err().to_string().contains("hidden_act"));
/// let qwen = json.replace("\"llama\"", "\"qwen2\"");
/// assert_eq!(LlamaConfig::from_json_str(&qwen).unwrap().family().to_string(), "qwen2");
/// ```
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads; each serves `num_attention_heads / num_key_value_heads` query heads.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// When true there is no `lm_head.weight`: the LM head uses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation (`initializer_range`, default 0.02).
    pub initializer_range: f32,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (`eos_token_id` may be one id or a list in Hugging Face configs).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The checkpoint's `quantization_config`, kept verbatim for the quantized-weight loaders.
    pub quantization_config: Option<Value>,
    /// What the family changes in the decoder (norms, activation, rope per layer, windows,
    /// biases, soft caps, fused projections).
    pub architecture: Architecture,
    /// The `config.json` this was read from (written back by `save_pretrained`, so a family's
    /// own keys survive); `None` for a config made by [`LlamaConfig::new`].
    pub source: Option<Value>,
}

/// Configs are equal when they describe the same model; the `config.json` text they were read
/// from (`source`) is not compared.
impl PartialEq for LlamaConfig {
    fn eq(&self, o: &Self) -> bool {
        self.vocab_size == o.vocab_size
            && self.hidden_size == o.hidden_size
            && self.intermediate_size == o.intermediate_size
            && self.num_hidden_layers == o.num_hidden_layers
            && self.num_attention_heads == o.num_attention_heads
            && self.num_key_value_heads == o.num_key_value_heads
            && self.head_dim == o.head_dim
            && self.rms_norm_eps == o.rms_norm_eps
            && self.rope_theta == o.rope_theta
            && self.max_position_embeddings == o.max_position_embeddings
            && self.tie_word_embeddings == o.tie_word_embeddings
            && self.initializer_range == o.initializer_range
            && self.bos_token_id == o.bos_token_id
            && self.eos_token_ids == o.eos_token_ids
            && self.pad_token_id == o.pad_token_id
            && self.quantization_config == o.quantization_config
            && self.architecture == o.architecture
    }
}

impl LlamaConfig {
    /// A config with Llama defaults for everything but the sizes (untied, θ = 10000, eps 1e-6).
    ///
    /// ```
    /// let c = lm::LlamaConfig::new(64, 32, 64, 2, 4, 2).unwrap();
    /// assert_eq!((c.head_dim, c.max_position_embeddings), (8, 2048));
    /// assert!(lm::LlamaConfig::new(64, 30, 64, 2, 4, 3).is_err());
    /// ```
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Result<Self> {
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size.checked_div(num_attention_heads).unwrap_or(0),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
            quantization_config: None,
            architecture: Architecture::llama(
                num_hidden_layers,
                10000.0,
                hidden_size.checked_div(num_attention_heads).unwrap_or(0),
            ),
            source: None,
        };
        if num_attention_heads > 0 && hidden_size % num_attention_heads != 0 {
            return Err(LmError::config(
                "hidden_size",
                format!(
                    "{hidden_size} is not divisible by num_attention_heads = {num_attention_heads}"
                ),
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| LmError::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_json_value(&value).map_err(|e| LmError::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| LmError::Json {
            path: "<config.json text>".into(),
            reason: e.to_string(),
        })?;
        Self::from_json_value(&value)
    }

    /// Parses a `config.json` already read as JSON. Unknown keys are ignored.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| LmError::config("<root>", "config.json must be a JSON object"))?;
        let num_attention_heads = get_usize(obj, "num_attention_heads", None)?;
        let hidden_size = get_usize(obj, "hidden_size", None)?;
        let head_dim = match obj.get("head_dim") {
            Some(v) if !v.is_null() => as_usize("head_dim", v)?,
            _ => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(LmError::config(
                        "head_dim",
                        format!(
                            "absent, and hidden_size = {hidden_size} is not divisible by \
                             num_attention_heads = {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_hidden_layers = get_usize(obj, "num_hidden_layers", None)?;
        let architecture = Architecture::from_config(obj, head_dim, num_hidden_layers)?;
        // The global layers' base (Gemma 3: the `full_attention` rope).
        let rope_theta = architecture.ropes[0].theta as f64;
        let config = LlamaConfig {
            vocab_size: get_usize(obj, "vocab_size", None)?,
            hidden_size,
            intermediate_size: get_usize(obj, "intermediate_size", None)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: get_usize(obj, "num_key_value_heads", Some(num_attention_heads))?,
            head_dim,
            rms_norm_eps: get_f64(obj, "rms_norm_eps", Some(1e-6))? as f32,
            rope_theta: rope_theta as f32,
            max_position_embeddings: get_usize(obj, "max_position_embeddings", Some(2048))?,
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => Architecture::ties_by_default(architecture.family),
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(LmError::config(
                        "tie_word_embeddings",
                        format!("expected a boolean, got {v}"),
                    ))
                }
            },
            initializer_range: get_f64(obj, "initializer_range", Some(0.02))? as f32,
            bos_token_id: get_token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: get_token_ids(obj, "eos_token_id")?,
            pad_token_id: get_token_ids(obj, "pad_token_id")?.first().copied(),
            quantization_config: obj
                .get("quantization_config")
                .filter(|v| !v.is_null())
                .cloned(),
            architecture,
            source: Some(value.clone()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between sizes (GQA divisibility, non-zero sizes, finite eps/θ).
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(LmError::config(key, "must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(LmError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(LmError::config(
                "head_dim",
                format!("{} is odd; rotary embeddings rotate pairs", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(LmError::config(
                "rms_norm_eps",
                format!("{} is invalid", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(LmError::config(
                "rope_theta",
                format!("{} is invalid", self.rope_theta),
            ));
        }
        let uniform = self.architecture.layers.windows(2).all(|w| w[0] == w[1]);
        if self.architecture.layers.len() != self.num_hidden_layers && !uniform {
            return Err(LmError::config(
                "num_hidden_layers",
                format!(
                    "{} layers but the family description has {}",
                    self.num_hidden_layers,
                    self.architecture.layers.len()
                ),
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(LmError::config(
                "initializer_range",
                format!("{} is invalid", self.initializer_range),
            ));
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The config with one family layer entry per decoder layer: a family whose layers are
    /// all alike (Llama, Qwen, Phi-3) follows a changed `num_hidden_layers`.
    pub(crate) fn resolved(mut self) -> Self {
        if self.architecture.layers.len() != self.num_hidden_layers {
            if let Some(first) = self.architecture.layers.first().cloned() {
                self.architecture.layers = vec![first; self.num_hidden_layers];
            }
        }
        self
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.architecture.family
    }

    /// The config as Hugging Face writes it: the `config.json` it was read from (with `dtype`
    /// float32), or for a config made by [`LlamaConfig::new`] the `LlamaForCausalLM` layout
    /// (transformers 5, `rope_parameters`). `quantization_config` is left out: saved weights
    /// are `f32`.
    pub fn to_json_value(&self) -> Value {
        if let Some(Value::Object(source)) = &self.source {
            let mut out = source.clone();
            // The sizes as they are now (a caller may have changed them).
            for (key, value) in [
                ("vocab_size", json!(self.vocab_size)),
                ("hidden_size", json!(self.hidden_size)),
                ("intermediate_size", json!(self.intermediate_size)),
                ("num_hidden_layers", json!(self.num_hidden_layers)),
                ("num_attention_heads", json!(self.num_attention_heads)),
                ("num_key_value_heads", json!(self.num_key_value_heads)),
                ("head_dim", json!(self.head_dim)),
                (
                    "max_position_embeddings",
                    json!(self.max_position_embeddings),
                ),
                ("tie_word_embeddings", json!(self.tie_word_embeddings)),
            ] {
                out.insert(key.into(), value);
            }
            out.remove("quantization_config");
            out.insert("dtype".into(), json!("float32"));
            out.remove("torch_dtype");
            return Value::Object(out);
        }
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_act": "silu",
            "dtype": "float32",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps as f64,
            "rope_parameters": {"rope_theta": self.rope_theta as f64, "rope_type": "default"},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range as f64,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "use_cache": true,
        })
    }
}

fn as_usize(key: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| LmError::config(key, format!("expected a non-negative integer, got {v}")))
}

fn as_f64(key: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| LmError::config(key, format!("expected a number, got {v}")))
}

fn get_usize(obj: &Map<String, Value>, key: &str, default: Option<usize>) -> Result<usize> {
    match (obj.get(key), default) {
        (Some(v), _) if !v.is_null() => as_usize(key, v),
        (_, Some(d)) => Ok(d),
        (_, None) => Err(LmError::config(key, "missing")),
    }
}

fn get_f64(obj: &Map<String, Value>, key: &str, default: Option<f64>) -> Result<f64> {
    match (obj.get(key), default) {
        (Some(v), _) if !v.is_null() => as_f64(key, v),
        (_, Some(d)) => Ok(d),
        (_, None) => Err(LmError::config(key, "missing")),
    }
}

/// A token id field that may be absent/null, one integer, or a list of integers.
fn get_token_ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| LmError::config(key, format!("expected a token id, got {v}")))
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// `(out, in)` of the layer's projections in the family's order (q, k, v, o, gate, up, down;
/// Phi-3: qkv, o, gate_up, down).
pub(crate) fn linear_shapes(c: &LlamaConfig) -> Vec<[usize; 2]> {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    if c.architecture.fused_projections {
        vec![[q + 2 * kv, d], [d, q], [2 * i, d], [d, i]]
    } else {
        vec![[q, d], [kv, d], [kv, d], [d, q], [i, d], [i, d], [d, i]]
    }
}

/// `(out, in)` of every projection of a config (with the family's module names: Phi-3's
/// fused `qkv_proj`/`gate_up_proj`), by module path.
pub fn projection_shapes(c: &LlamaConfig) -> BTreeMap<String, (usize, usize)> {
    let d = c.hidden_size;
    let shapes = linear_shapes(c);
    let mut out = BTreeMap::new();
    for layer in 0..c.num_hidden_layers {
        for (name, shape) in c.architecture.linear_names().iter().zip(&shapes) {
            out.insert(format!("model.layers.{layer}.{name}"), (shape[0], shape[1]));
        }
    }
    if !c.tie_word_embeddings {
        out.insert("lm_head".to_string(), (c.vocab_size, d));
    }
    out
}
