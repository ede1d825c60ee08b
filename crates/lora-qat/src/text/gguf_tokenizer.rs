//! A `tokenizers` tokenizer built from GGUF metadata alone (`tokenizer.ggml.*`), so a .gguf
//! file is all a prompt or text dataset needs.
//!
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE over `tokens` and `merges`; the text is
//!   first split by the regular expressions llama.cpp uses for `tokenizer.ggml.pre` (each
//!   expression splits the pieces of the one before, matches and gaps both kept), then mapped
//!   to GPT-2's byte alphabet.
//! - `tokenizer.ggml.model = llama`: SentencePiece BPE: `▁` for spaces (and a leading one when
//!   `add_space_prefix`), merges ranked by the merged token's score, byte fallback to the
//!   `<0xXX>` tokens.
//!
//! Token types (llama.cpp's): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
//! 6 byte. Control and user-defined tokens are added tokens (matched whole before the model
//! runs); control ones are special (skipped when decoding with `skip_special_tokens`).

use std::collections::HashMap;
use std::path::Path;

use quant_core::gguf::{GgufArray, GgufFile, GgufValue};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::tokenizer::ModelText;
use super::{TextError, TextResult};

const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's split expressions for a `tokenizer.ggml.pre` name, and whether whole words
/// found in the vocabulary skip the merges (`ignore_merges`, Llama 3).
fn pre_tokenizer_patterns(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (vec![LLAMA3_PATTERN], true),
        "dbrx" | "smaug-bpe" => (vec![LLAMA3_PATTERN], false),
        // SmolLM's own tokenizer.json is plain byte-level (GPT-2's expression) and its
        // vocabulary has no multi-digit tokens, so digits come out one by one without
        // llama.cpp's extra `\p{N}` split — which would also cut a run of spaces before a
        // digit differently ("   4": transformers `ĠĠ`,`Ġ`,`4`; the split `ĠĠĠ`,`4`).
        // transformers' tokenization is the one the model was trained on.
        "smollm" => (vec![GPT2_PATTERN], false),
        "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_PATTERN], false)
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" => (vec![GPT2_PATTERN], false),
        "qwen2" | "stablelm2" | "hunyuan" => (vec![QWEN2_PATTERN], false),
        "chatglm-bpe" => (vec![LLAMA3_PATTERN], false),
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_PATTERN,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        _ => return None,
    })
}

/// Reads the tokenizer keys of one GGUF file.
struct Meta<'a> {
    file: &'a GgufFile,
    name: String,
}

impl Meta<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> TextError {
        TextError::Key {
            source_name: self.name.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn strings(&self, key: &str) -> TextResult<&[String]> {
        match self.file.metadata(key) {
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(v),
            Some(other) => Err(self.err(
                key,
                format!("expected an array of strings, found {}", other.summary()),
            )),
            None => Err(self.err(key, "missing")),
        }
    }

    fn opt_i32s(&self, key: &str) -> TextResult<Option<Vec<i32>>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::I32(v))) => Ok(Some(v.clone())),
            Some(GgufValue::Array(GgufArray::U32(v))) => {
                Ok(Some(v.iter().map(|&x| x as i32).collect()))
            }
            Some(other) => Err(self.err(
                key,
                format!("expected an array of integers, found {}", other.summary()),
            )),
        }
    }

    fn opt_f32s(&self, key: &str) -> TextResult<Option<Vec<f32>>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::F32(v))) => Ok(Some(v.clone())),
            Some(other) => Err(self.err(
                key,
                format!("expected an array of f32, found {}", other.summary()),
            )),
        }
    }

    fn opt_id(&self, key: &str, vocab: usize) -> TextResult<Option<u32>> {
        let Some(v) = self.file.metadata(key) else {
            return Ok(None);
        };
        // llama.cpp writes -1 (as a signed value) for "no such token".
        if matches!(v, GgufValue::I32(-1) | GgufValue::I64(-1)) {
            return Ok(None);
        }
        let id = v
            .as_u64()
            .ok_or_else(|| self.err(key, format!("expected a token id, found {}", v.summary())))?;
        if id as usize >= vocab {
            return Err(self.err(
                key,
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(Some(id as u32))
    }

    fn opt_bool(&self, key: &str) -> TextResult<Option<bool>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => {
                Err(self.err(key, format!("expected a bool, found {}", other.summary())))
            }
        }
    }
}

/// The parts of a GGUF tokenizer beyond `tokenizer.json` itself.
pub struct GgufTokenizer {
    /// A `tokenizer.json` document equivalent to the metadata.
    pub tokenizer_json: Value,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// eos and end-of-turn ids (`eos_token_id`, `eot_token_id`, `eom_token_id`).
    pub stop_ids: Vec<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

/// Builds the tokenizer description of `file`'s metadata (`source_name` names it in errors).
pub fn tokenizer_from_gguf(file: &GgufFile, source_name: &str) -> TextResult<GgufTokenizer> {
    let meta = Meta {
        file,
        name: source_name.to_string(),
    };
    let model = file.metadata_str("tokenizer.ggml.model").ok_or_else(|| {
        meta.err(
            "tokenizer.ggml.model",
            "missing (the file has no tokenizer)",
        )
    })?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    if n == 0 {
        return Err(meta.err("tokenizer.ggml.tokens", "empty"));
    }
    let types = meta
        .opt_i32s("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![1; n]);
    if types.len() != n {
        return Err(meta.err(
            "tokenizer.ggml.token_type",
            format!("{} entries but {n} tokens", types.len()),
        ));
    }
    let bos = meta.opt_id("tokenizer.ggml.bos_token_id", n)?;
    let eos = meta.opt_id("tokenizer.ggml.eos_token_id", n)?;
    let unk = meta.opt_id("tokenizer.ggml.unknown_token_id", n)?;
    let mut stop_ids: Vec<u32> = eos.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta.opt_id(key, n)? {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    // Vocabulary: the first id of a string wins when a file repeats one.
    let mut vocab = serde_json::Map::new();
    let mut index: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        if !index.contains_key(t.as_str()) {
            index.insert(t, id as u32);
            vocab.insert(t.clone(), json!(id));
        }
    }
    let added_tokens: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .map(|(id, &t)| {
            json!({
                "id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == TYPE_CONTROL,
            })
        })
        .collect();
    let token_of = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let (tokenizer_json, add_bos_default) = match model {
        "gpt2" => {
            let merges = meta.strings("tokenizer.ggml.merges")?;
            let mut pairs = Vec::with_capacity(merges.len());
            for (i, m) in merges.iter().enumerate() {
                let Some((a, b)) = m.split_once(' ') else {
                    return Err(meta.err(
                        "tokenizer.ggml.merges",
                        format!("entry {i} {m:?} is not two tokens separated by a space"),
                    ));
                };
                pairs.push(json!([a, b]));
            }
            let pre = file.metadata_str("tokenizer.ggml.pre").unwrap_or("default");
            let (patterns, ignore_merges) = pre_tokenizer_patterns(pre).ok_or_else(|| {
                meta.err(
                    "tokenizer.ggml.pre",
                    format!(
                        "pre-tokenizer {pre:?} is not supported (known: llama-bpe, smollm, \
                         gpt2, qwen2, default and their llama.cpp aliases)"
                    ),
                )
            })?;
            let mut pretokenizers: Vec<Value> = patterns
                .iter()
                .map(|p| {
                    json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false})
                })
                .collect();
            pretokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
            let doc = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                    "vocab": vocab, "merges": pairs,
                },
            });
            (doc, false)
        }
        "llama" => {
            let scores = meta.opt_f32s("tokenizer.ggml.scores")?.ok_or_else(|| {
                meta.err(
                    "tokenizer.ggml.scores",
                    "missing (SentencePiece needs scores)",
                )
            })?;
            if scores.len() != n {
                return Err(meta.err(
                    "tokenizer.ggml.scores",
                    format!("{} entries but {n} tokens", scores.len()),
                ));
            }
            let merges = spm_merges(tokens, &types, &scores, &index);
            let add_space_prefix = meta
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let unk_token = token_of(unk.or_else(|| {
                types
                    .iter()
                    .position(|&t| t == TYPE_UNKNOWN)
                    .map(|i| i as u32)
            }));
            let mut normalizers = Vec::new();
            if add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let doc = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk_token,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges,
                },
            });
            (doc, true)
        }
        other => {
            return Err(meta.err(
                "tokenizer.ggml.model",
                format!("tokenizer model {other:?} is not supported (gpt2 and llama are)"),
            ))
        }
    };
    let add_bos_token = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(add_bos_default);
    let mut tokenizer_json = tokenizer_json;
    if add_bos_token {
        let bos_id = bos.ok_or_else(|| {
            meta.err(
                "tokenizer.ggml.bos_token_id",
                "missing, but add_bos_token is true",
            )
        })?;
        let bos_text = &tokens[bos_id as usize];
        tokenizer_json["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_text.as_str(): {"id": bos_text, "ids": [bos_id], "tokens": [bos_text]}},
        });
    }
    Ok(GgufTokenizer {
        tokenizer_json,
        bos_token: token_of(bos),
        eos_token: token_of(eos),
        stop_ids,
        add_bos_token,
        chat_template: file
            .metadata_str("tokenizer.chat_template")
            .map(str::to_string),
    })
}

/// SentencePiece as BPE: every split of a normal token into two vocabulary pieces is a merge,
/// ranked by the merged token's score (highest first), so applying merges by rank merges the
/// adjacent pair whose result scores highest, as SentencePiece (and llama.cpp) do.
fn spm_merges(
    tokens: &[String],
    types: &[i32],
    scores: &[f32],
    index: &HashMap<&str, u32>,
) -> Vec<Value> {
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (index.get(left), index.get(right)) {
                merges.push((scores[id], id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect()
}

/// The tokenizer, chat template and special tokens of a GGUF file.
pub fn model_text_from_gguf(path: &Path) -> TextResult<ModelText> {
    let file = GgufFile::open(path)?;
    let name = path.display().to_string();
    let parts = tokenizer_from_gguf(&file, &name)?;
    let tokenizer = tokenizer_from_json(&parts.tokenizer_json, &name)?;
    ModelText::new(
        tokenizer,
        parts.chat_template.as_deref(),
        parts.bos_token,
        parts.eos_token,
        &parts.stop_ids,
        path.to_path_buf(),
    )
}

/// A tokenizer from a `tokenizer.json` document.
pub fn tokenizer_from_json(doc: &Value, source_name: &str) -> TextResult<Tokenizer> {
    let text = doc.to_string();
    super::tokenizer::parse_tokenizer(&text).map_err(|e| {
        TextError::Tokenizer(format!(
            "{source_name}: the tokenizer built from the metadata: {e}"
        ))
    })
}

/// Writes the tokenizer of the GGUF file at `path` as a transformers directory holds it:
/// `tokenizer.json` (the document [`tokenizer_from_gguf`] builds) and `tokenizer_config.json`
/// (bos/eos/unk/pad tokens, `add_bos_token`, `chat_template` from `tokenizer.chat_template`),
/// each written atomically. Returns the files written: none when the file has no tokenizer
/// (no `tokenizer.ggml.model`).
///
/// The pre-tokenizer is the split of `tokenizer.ggml.pre` (llama.cpp's expressions, except
/// `smollm`, whose own tokenizer.json is plain byte-level: see `pre_tokenizer_patterns`), where
/// transformers' own GGUF conversion always uses plain byte-level splitting; the two can differ
/// where a `pre`'s expressions split further than byte-level does (digit groups).
pub fn write_tokenizer_files(path: &Path, out_dir: &Path) -> TextResult<Vec<std::path::PathBuf>> {
    let file = GgufFile::open(path)?;
    if file.metadata("tokenizer.ggml.model").is_none() {
        return Ok(Vec::new());
    }
    let name = path.display().to_string();
    let parts = tokenizer_from_gguf(&file, &name)?;
    // Checked to build before anything is written.
    tokenizer_from_json(&parts.tokenizer_json, &name)?;
    let meta = Meta {
        file: &file,
        name: name.clone(),
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let token = |key: &str| -> TextResult<Option<String>> {
        Ok(meta
            .opt_id(key, tokens.len())?
            .map(|id| tokens[id as usize].clone()))
    };
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(parts.add_bos_token));
    for (key, value) in [
        ("bos_token", parts.bos_token.clone()),
        ("eos_token", parts.eos_token.clone()),
        ("unk_token", token("tokenizer.ggml.unknown_token_id")?),
        ("pad_token", token("tokenizer.ggml.padding_token_id")?),
    ] {
        if let Some(v) = value {
            config.insert(key.into(), json!(v));
        }
    }
    if let Some(template) = &parts.chat_template {
        config.insert("chat_template".into(), json!(template));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| TextError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for (file_name, doc) in [
        ("tokenizer.json", parts.tokenizer_json),
        ("tokenizer_config.json", Value::Object(config)),
    ] {
        let out = out_dir.join(file_name);
        let text = serde_json::to_string_pretty(&doc).expect("JSON value");
        quant_core::io::write_atomic(&out, text.as_bytes())?;
        written.push(out);
    }
    Ok(written)
}
