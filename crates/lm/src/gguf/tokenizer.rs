//! `tokenizer.ggml.*` metadata from a Hugging Face `tokenizer.json`, as llama.cpp's converter
//! writes it for the tokenizer kinds it maps without running the tokenizer (see
//! [`tokenizer_metadata`]).

use std::path::Path;

use quant_core::gguf::{GgufArray, GgufValue};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};

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
