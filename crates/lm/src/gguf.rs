//! GGUF export of Llama checkpoints and PEFT LoRA adapters for llama.cpp (architecture
//! `llama`), and the reader that maps such a file back to Hugging Face names and layouts.
//!
//! What is written follows llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`:
//! - tensor names `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|
//!   ffn_down|attn_norm|ffn_norm`, `output_norm`, `output` (absent with tied embeddings),
//!   each with the `.weight` suffix;
//! - the rows of `attn_q` and `attn_k` permuted from Hugging Face's rotary layout (first half
//!   of each head's dimensions, then second half) to the interleaved pairs llama.cpp rotates:
//!   `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2)`, with `n_head` the key/value
//!   head count for `attn_k` (for a LoRA adapter, the rows of `lora_b`);
//! - 1-D tensors (norms) in `F32`; 2-D tensors in the requested type, falling back to `F16`
//!   when a row is not a whole number of 32-value blocks (as the converter does);
//! - metadata: `general.*`, `llama.*` hyperparameters and, when the model directory holds a
//!   `tokenizer.json`, `tokenizer.ggml.*` (see [`tokenizer_metadata`]).
//!
//! Tensors are read, merged (with `--adapter`), permuted, quantized and written one at a time.

use std::path::{Path, PathBuf};

use quant_core::ggml::{self, GgmlType};
use quant_core::gguf::{GgufArray, GgufFile, GgufValue, GgufWriter, ReadTensorF32, TensorSpec};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::merge::MergedSource;
use crate::model::LAYER_LINEAR_NAMES;

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

/// llama.cpp's names of a layer's projections, in [`LAYER_LINEAR_NAMES`] order.
const GGUF_LINEAR_NAMES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// The GGUF name of a Hugging Face Llama tensor; `None` for tensors llama.cpp does not use
/// (`rotary_emb.inv_freq`); an error for anything else it cannot place.
///
/// ```
/// use lm::gguf::{gguf_tensor_name, hf_tensor_name};
/// let g = gguf_tensor_name("model.layers.3.self_attn.o_proj.weight").unwrap().unwrap();
/// assert_eq!(g, "blk.3.attn_output.weight");
/// assert_eq!(hf_tensor_name(&g).unwrap(), "model.layers.3.self_attn.o_proj.weight");
/// assert!(gguf_tensor_name("model.layers.0.self_attn.q_proj.bias").is_err());
/// ```
pub fn gguf_tensor_name(hf: &str) -> Result<Option<String>> {
    let unsupported = || LmError::Unsupported {
        key: "tensor".into(),
        value: hf.to_string(),
        reason: "has no place in llama.cpp's `llama` architecture".into(),
    };
    Ok(Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.").ok_or_else(unsupported)?;
            let (layer, tail) = rest.split_once('.').ok_or_else(unsupported)?;
            let layer: usize = layer.parse().map_err(|_| unsupported())?;
            if tail == "self_attn.rotary_emb.inv_freq" {
                return Ok(None);
            }
            let module = tail.strip_suffix(".weight").ok_or_else(unsupported)?;
            let short = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                _ => LAYER_LINEAR_NAMES
                    .iter()
                    .position(|n| *n == module)
                    .map(|i| GGUF_LINEAR_NAMES[i])
                    .ok_or_else(unsupported)?,
            };
            format!("blk.{layer}.{short}.weight")
        }
    }))
}

/// The Hugging Face name of a GGUF Llama tensor name (inverse of [`gguf_tensor_name`]).
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, tail) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let short = tail.strip_suffix(".weight")?;
            let module = match short {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => GGUF_LINEAR_NAMES
                    .iter()
                    .position(|n| *n == short)
                    .map(|i| LAYER_LINEAR_NAMES[i])?,
            };
            format!("model.layers.{layer}.{module}.weight")
        }
    })
}

/// The rows of `(rows, cols)` `values` reordered as llama.cpp's converter does for Q and K:
/// within each of `n_head` heads, row `j·(d/2) + i` (half `j`, pair `i`) moves to `2·i + j`.
/// Errors when `rows` is not a multiple of `2·n_head`.
///
/// ```
/// // One head of 4 rows [a0, a1, b0, b1] becomes [a0, b0, a1, b1].
/// let w: Vec<f32> = vec![0.0, 1.0, 2.0, 3.0];
/// let p = lm::gguf::permute_rope_rows(&w, 4, 1, 1).unwrap();
/// assert_eq!(p, vec![0.0, 2.0, 1.0, 3.0]);
/// assert_eq!(lm::gguf::unpermute_rope_rows(&p, 4, 1, 1).unwrap(), w);
/// ```
pub fn permute_rope_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    rope_rows(values, rows, cols, n_head, false)
}

/// The inverse of [`permute_rope_rows`].
pub fn unpermute_rope_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    rope_rows(values, rows, cols, n_head, true)
}

fn rope_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    inverse: bool,
) -> Result<Vec<f32>> {
    if n_head == 0 || rows % (2 * n_head) != 0 || values.len() != rows * cols {
        return Err(LmError::shape(
            "rotary row permutation",
            format!("{n_head} heads of an even number of rows, {rows}×{cols} values"),
            values.len(),
        ));
    }
    let head = rows / n_head;
    let half = head / 2;
    let mut out = vec![0.0f32; values.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head + j * half + i;
                let gg_row = h * head + 2 * i + j;
                let (from, to) = if inverse {
                    (gg_row, hf_row)
                } else {
                    (hf_row, gg_row)
                };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Heads whose rows are permuted for the tensor of Hugging Face module `module`, if any.
fn rope_heads(config: &LlamaConfig, module: &str) -> Option<usize> {
    if module.ends_with(".self_attn.q_proj") {
        Some(config.num_attention_heads)
    } else if module.ends_with(".self_attn.k_proj") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// The `general.*` and `llama.*` metadata of a model of `config` (no tokenizer keys).
pub fn llama_metadata(config: &LlamaConfig, name: &str, ty: GgmlType) -> Vec<(String, GgufValue)> {
    let u32v = |v: usize| GgufValue::U32(v as u32);
    vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.into())),
        ("general.alignment".into(), GgufValue::U32(32)),
        ("general.file_type".into(), GgufValue::U32(file_type(ty))),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        ("llama.vocab_size".into(), u32v(config.vocab_size)),
        (
            "llama.context_length".into(),
            u32v(config.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32v(config.hidden_size)),
        ("llama.block_count".into(), u32v(config.num_hidden_layers)),
        (
            "llama.feed_forward_length".into(),
            u32v(config.intermediate_size),
        ),
        ("llama.rope.dimension_count".into(), u32v(config.head_dim)),
        (
            "llama.attention.head_count".into(),
            u32v(config.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(config.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u32v(config.head_dim)),
        ("llama.attention.value_length".into(), u32v(config.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(config.rms_norm_eps),
        ),
        (
            "llama.rope.freq_base".into(),
            GgufValue::F32(config.rope_theta),
        ),
    ]
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_BYTE: i32 = 6;

/// `tokenizer.ggml.*` metadata from `dir/tokenizer.json` (empty when there is none), as
/// llama.cpp's converter writes it for the two tokenizer kinds it maps without running the
/// tokenizer:
/// - a byte-level BPE (`model.type` `BPE` without `byte_fallback`): model `gpt2`, the tokens by
///   id (ids missing from the vocabulary padded as `[PAD{id}]`, type unused), token types
///   (added special tokens control, other added tokens user-defined), and the merges;
/// - a BPE with `byte_fallback` (Llama 2 style): model `llama`, scores −1000 (as the
///   converter's `LlamaHfVocab`), `<0xXX>` tokens typed byte, special added tokens control.
///
/// `tokenizer.ggml.pre` is `default`: the converter identifies a pre-tokenizer by hashing its
/// output on a fixed text, which needs the tokenizer itself. Special ids come from
/// `config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`) and the tokens named
/// `unk_token` / `add_bos_token` / `add_eos_token` in `tokenizer_config.json`. Other tokenizer
/// models (Unigram, WordPiece, WordLevel) are an error.
pub fn tokenizer_metadata(dir: &Path, config: &LlamaConfig) -> Result<Vec<(String, GgufValue)>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bad = |reason: String| LmError::Json {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| LmError::io(&path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let model = json.get("model").ok_or_else(|| bad("no `model`".into()))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("");
    if model_type != "BPE" {
        return Err(LmError::Unsupported {
            key: "tokenizer.json model.type".into(),
            value: model_type.to_string(),
            reason:
                "GGUF export maps BPE tokenizers only (byte-level BPE as `gpt2`, byte-fallback \
                     BPE as `llama`)"
                    .into(),
        });
    }
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `model.vocab` object".into()))?;
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![TOKEN_NORMAL; n];
    let mut place = |id: u64, text: &str| -> Result<usize> {
        let id = id as usize;
        if id >= n {
            return Err(bad(format!(
                "token {text:?} has id {id}, outside the model's vocabulary of {n}"
            )));
        }
        tokens[id] = Some(text.to_string());
        Ok(id)
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab[{text:?}] is not an id")))?;
        let id = place(id, text)?;
        if byte_fallback && is_byte_token(text) {
            types[id] = TOKEN_BYTE;
        }
    }
    let mut special_by_text = std::collections::HashMap::new();
    for added in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(Value::as_u64),
            added.get("content").and_then(Value::as_str),
        ) else {
            return Err(bad(format!("malformed added token {added}")));
        };
        let id = place(id, content)?;
        let special = added
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        types[id] = if special {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        special_by_text.insert(content.to_string(), id as u32);
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            t.unwrap_or_else(|| {
                types[id] = TOKEN_UNUSED;
                format!("[PAD{id}]")
            })
        })
        .collect();

    let mut out: Vec<(String, GgufValue)> = Vec::new();
    let s = |v: &str| GgufValue::String(v.to_string());
    if byte_fallback {
        out.push(("tokenizer.ggml.model".into(), s("llama")));
        out.push(("tokenizer.ggml.pre".into(), s("default")));
        out.push((
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ));
        out.push((
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(GgufArray::F32(vec![-1000.0; n])),
        ));
        out.push((
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ));
    } else {
        let merges: Vec<String> = model
            .get("merges")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 => match (&pair[0], &pair[1]) {
                    (Value::String(a), Value::String(b)) => Ok(format!("{a} {b}")),
                    _ => Err(bad(format!("malformed merge {m}"))),
                },
                _ => Err(bad(format!("malformed merge {m}"))),
            })
            .collect::<Result<_>>()?;
        out.push(("tokenizer.ggml.model".into(), s("gpt2")));
        out.push(("tokenizer.ggml.pre".into(), s("default")));
        out.push((
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ));
        out.push((
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ));
        out.push((
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(merges)),
        ));
    }
    if let Some(bos) = config.bos_token_id {
        out.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(bos)));
    }
    if let Some(&eos) = config.eos_token_ids.first() {
        out.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(eos)));
    }
    let tok_config_path = dir.join("tokenizer_config.json");
    let tok_config: Option<Value> = std::fs::read_to_string(&tok_config_path)
        .ok()
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| LmError::Json {
            path: tok_config_path.clone(),
            reason: e.to_string(),
        })?;
    let named = |key: &str| -> Option<u32> {
        let v = tok_config.as_ref()?.get(key)?;
        let text = v
            .as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))?;
        special_by_text
            .get(text)
            .copied()
            .or_else(|| vocab.get(text).and_then(Value::as_u64).map(|id| id as u32))
    };
    if let Some(unk) = named("unk_token") {
        out.push((
            "tokenizer.ggml.unknown_token_id".into(),
            GgufValue::U32(unk),
        ));
    }
    if let Some(pad) = config.pad_token_id.or_else(|| named("pad_token")) {
        out.push((
            "tokenizer.ggml.padding_token_id".into(),
            GgufValue::U32(pad),
        ));
    }
    for (key, gguf_key) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        if let Some(b) = tok_config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(Value::as_bool)
        {
            out.push((gguf_key.into(), GgufValue::Bool(b)));
        }
    }
    Ok(out)
}

fn is_byte_token(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// A tensor read back: Hugging Face name, row-major shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// What an export wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufExportReport {
    pub path: PathBuf,
    pub tensors: usize,
    pub metadata_keys: usize,
    /// Tensors written in `F16` because their rows are not whole 32-value blocks.
    pub f16_fallbacks: Vec<String>,
}

/// Hugging Face tensor names of a Llama checkpoint in llama.cpp's order.
/// The GGUF writer maps the Llama layout only (llama.cpp's `llama` architecture with the
/// default rope): other families and rope scalings are refused by name rather than written
/// under names llama.cpp would misread.
fn check_exportable(config: &LlamaConfig) -> Result<()> {
    let arch = &config.architecture;
    if arch.family != crate::family::Family::Llama {
        return Err(LmError::Unsupported {
            key: "model_type".into(),
            value: format!("{:?}", arch.family.model_type()),
            reason: "GGUF export is implemented for the llama family only".into(),
        });
    }
    if let Some(rope) = arch.ropes.iter().find(|r| r.type_name() != "default") {
        return Err(LmError::Unsupported {
            key: "rope_parameters.rope_type".into(),
            value: format!("{:?}", rope.type_name()),
            reason: "GGUF export writes the default rotary embedding only".into(),
        });
    }
    if let Some(b) = arch.biases.first() {
        return Err(LmError::Unsupported {
            key: "attention_bias / mlp_bias".into(),
            value: format!("true ({b})"),
            reason: "GGUF export of projection biases is not implemented".into(),
        });
    }
    Ok(())
}

fn ordered_hf_names(config: &LlamaConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        names.push(format!("{p}.input_layernorm.weight"));
        for lin in LAYER_LINEAR_NAMES {
            names.push(format!("{p}.{lin}.weight"));
        }
        names.push(format!("{p}.post_attention_layernorm.weight"));
    }
    names.push("model.norm.weight".into());
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

fn tensor_type(requested: GgmlType, shape: &[usize]) -> GgmlType {
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    let row = *shape.last().expect("2-D");
    if row % requested.block_values() != 0 {
        // llama.cpp's converter rule for the K types (Q4_K → Q5_0, Q6_K → Q8_0, ...); rows
        // that are not whole 32-blocks either, and the 32-value types, are written as f16.
        quant_core::ggml::fallback_type(requested, row).unwrap_or(GgmlType::F16)
    } else {
        requested
    }
}

/// Writes the model in `model_dir` (with the adapter in `adapter_dir` merged, if given) as a
/// GGUF file at `out` in type `ty`.
///
/// ```
/// use quant_core::ggml::GgmlType;
/// let tmp = std::env::temp_dir().join(format!("lm-gguf-doc-{}", std::process::id()));
/// let model = lm::LlamaModel::random(lm::LlamaConfig::new(32, 32, 64, 1, 4, 2).unwrap(), 3).unwrap();
/// model.save_pretrained(&tmp).unwrap();
/// let out = tmp.join("m.gguf");
/// lm::gguf::export_gguf(&tmp, None, &out, GgmlType::Q8_0).unwrap();
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
    let source = MergedSource::open(model_dir, adapter_dir)?;
    let config = source.checkpoint.config.clone();
    check_exportable(&config)?;
    let names = ordered_hf_names(&config);
    // Every stored tensor must have a place: anything else means options llama.cpp ignores.
    for t in source.checkpoint.tensors() {
        if gguf_tensor_name(&t.name)?.is_some() && !names.contains(&t.name) {
            return Err(LmError::UnexpectedTensor {
                key: t.name.clone(),
                file: model_dir.to_path_buf(),
            });
        }
    }
    let mut specs = Vec::new();
    let mut report = GgufExportReport {
        path: out.to_path_buf(),
        tensors: names.len(),
        metadata_keys: 0,
        f16_fallbacks: Vec::new(),
    };
    for name in &names {
        let t = source
            .checkpoint
            .tensor(name)
            .ok_or_else(|| LmError::MissingTensor {
                key: name.clone(),
                expected: vec![],
            })?;
        let gg = gguf_tensor_name(name)?.expect("mapped names");
        let tensor_ty = tensor_type(ty, &t.shape);
        if t.shape.len() >= 2 && tensor_ty != ty {
            report.f16_fallbacks.push(gg.clone());
        }
        specs.push(TensorSpec::new(gg, t.shape.clone(), tensor_ty));
    }
    let model_name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut metadata = llama_metadata(&config, &model_name, ty);
    metadata.extend(tokenizer_metadata(model_dir, &config)?);
    report.metadata_keys = metadata.len();
    let mut writer = GgufWriter::create(out, &metadata, &specs)?;
    for (name, spec) in names.iter().zip(&specs) {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        // A LoRA-QAT adapter on a ggml grid: the blocks it trained, as they are.
        let heads = rope_heads(&config, module);
        if let Some(bytes) = crate::qat_export::trained_gguf_blocks(&source, name, spec.ty, heads)?
        {
            writer.write_tensor(&spec.name, &bytes)?;
            continue;
        }
        let mut values = source.read_f32(name)?;
        if let Some(heads) = rope_heads(&config, module) {
            values = permute_rope_rows(&values, spec.shape[0], spec.shape[1], heads)?;
        }
        let bytes = ggml::quantize(spec.ty, &values).map_err(|e| LmError::InvalidArgument {
            name: format!("tensor {name} as {}", spec.ty.name()),
            value: format!("{:?}", spec.shape),
            reason: e.to_string(),
        })?;
        drop(values);
        writer.write_tensor(&spec.name, &bytes)?;
    }
    writer.finish()?;
    Ok(report)
}

/// Writes the PEFT LoRA adapter in `adapter_dir` (for the model in `model_dir`) as a GGUF
/// LoRA adapter llama.cpp loads with `--lora`: `general.type = adapter`, `adapter.type =
/// lora`, `adapter.lora.alpha`, and per module `<gguf name>.lora_a` (`[r, in]` row-major,
/// ggml `ne = [in, r]`) and `<gguf name>.lora_b` (`[out, r]`, rows of Q/K permuted as the base
/// weight's). llama.cpp scales by `alpha / r` with one alpha for the file, so every module's
/// scale times its rank must agree (rsLoRA is written with `alpha·√r`); DoRA has no GGUF form
/// and is an error. `ty` is `F32` or `F16`.
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
    let mut specs = Vec::new();
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
        let gg =
            gguf_tensor_name(&format!("{module}.weight"))?.ok_or_else(|| LmError::Unsupported {
                key: "target module".into(),
                value: module.clone(),
                reason: "not a llama.cpp tensor".into(),
            })?;
        specs.push((
            module.clone(),
            format!("{gg}.lora_a"),
            format!("{gg}.lora_b"),
        ));
    }
    let alpha = alpha.map(|(a, _)| a).unwrap_or(0.0);
    let metadata = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        ("general.type".into(), GgufValue::String("adapter".into())),
        ("general.alignment".into(), GgufValue::U32(32)),
        ("adapter.type".into(), GgufValue::String("lora".into())),
        ("adapter.lora.alpha".into(), GgufValue::F32(alpha as f32)),
    ];
    let mut tensor_specs = Vec::new();
    for (module, a_name, b_name) in &specs {
        let w = &adapter.modules[module];
        tensor_specs.push(TensorSpec::new(a_name.clone(), w.a.shape().to_vec(), ty));
        tensor_specs.push(TensorSpec::new(b_name.clone(), w.b.shape().to_vec(), ty));
    }
    let mut writer = GgufWriter::create(out, &metadata, &tensor_specs)?;
    for (module, a_name, b_name) in &specs {
        let w = &adapter.modules[module];
        let a: Vec<f32> = w.a.iter().copied().collect();
        let mut b: Vec<f32> = w.b.iter().copied().collect();
        if let Some(heads) = rope_heads(&config, module) {
            b = permute_rope_rows(&b, w.b.nrows(), w.b.ncols(), heads)?;
        }
        writer.write_tensor(a_name, &ggml::quantize(ty, &a)?)?;
        writer.write_tensor(b_name, &ggml::quantize(ty, &b)?)?;
    }
    writer.finish()?;
    Ok(GgufExportReport {
        path: out.to_path_buf(),
        tensors: tensor_specs.len(),
        metadata_keys: metadata.len(),
        f16_fallbacks: Vec::new(),
    })
}

/// The tensors of a Llama GGUF file under their Hugging Face names, dequantized to `f32` and
/// with the Q/K rows put back in Hugging Face's order: `(name, row-major shape, values)`.
/// The head counts come from the file's `llama.attention.head_count[_kv]`.
pub fn read_llama_gguf(path: &Path) -> Result<Vec<NamedTensor>> {
    let file = GgufFile::open(path)?;
    if file.metadata_str("general.architecture") != Some("llama") {
        return Err(LmError::Unsupported {
            key: "general.architecture".into(),
            value: format!("{:?}", file.metadata_str("general.architecture")),
            reason: "this reader maps llama files".into(),
        });
    }
    let count = |key: &str| -> Result<usize> {
        file.metadata(key)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| LmError::Config {
                key: key.into(),
                reason: format!("missing from {}", path.display()),
            })
    };
    let (heads, kv_heads) = (
        count("llama.attention.head_count")?,
        count("llama.attention.head_count_kv")?,
    );
    let mut out = Vec::new();
    for info in &file.tensors {
        let hf = hf_tensor_name(&info.name).ok_or_else(|| LmError::UnknownName {
            what: "GGUF llama tensor".into(),
            name: info.name.clone(),
        })?;
        let mut values = file.read_tensor_f32(&info.name)?;
        let n_head = if hf.ends_with("self_attn.q_proj.weight") {
            Some(heads)
        } else if hf.ends_with("self_attn.k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        if let Some(h) = n_head {
            values = unpermute_rope_rows(&values, info.shape[0], info.shape[1], h)?;
        }
        out.push((hf, info.shape.clone(), values));
    }
    Ok(out)
}
