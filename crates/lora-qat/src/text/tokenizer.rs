//! A model's text side: its tokenizer, chat template, special tokens and stop tokens, read
//! from a Hugging Face directory (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`, `generation_config.json`) or from a GGUF file's metadata.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::{TextError, TextResult};

/// Token ids and, for each, its byte range `(start, end)` in the encoded text.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// Tokenizer, chat template and special tokens of one model.
#[derive(Debug)]
pub struct ModelText {
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Every id generation stops at (tokenizer eos, generation_config.json, GGUF eos/eot).
    eos_ids: Vec<u32>,
    source: PathBuf,
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn special_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` of a config file: a number or a list of numbers.
fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// A `tokenizer.json` document parsed by the `tokenizers` crate. Some malformed documents make
/// that crate panic while deserializing (an `unwrap` in its decoder parsing, 0.22); the panic
/// is caught here, at the one place text enters it, and becomes an error like any other.
pub(crate) fn parse_tokenizer(text: &str) -> Result<Tokenizer, String> {
    match std::panic::catch_unwind(|| text.parse::<Tokenizer>()) {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("malformed tokenizer document ({message})"))
        }
    }
}

fn read_json(path: &Path) -> TextResult<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TextError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

impl ModelText {
    /// Assembles the parts (used by both loaders); the chat template sees the special tokens.
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        extra_eos_ids: &[u32],
        source: PathBuf,
    ) -> TextResult<Self> {
        let mut template = chat_template.map(ChatTemplate::new).transpose()?;
        if let Some(t) = template.take() {
            let mut t = t;
            for (name, value) in [("bos_token", &bos_token), ("eos_token", &eos_token)] {
                if let Some(v) = value {
                    t = t.with_special_token(name, v);
                }
            }
            template = Some(t);
        }
        let mut eos_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        for &id in extra_eos_ids {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Self {
            tokenizer,
            chat_template: template,
            bos_token,
            eos_token,
            eos_ids,
            source,
        })
    }

    /// A model directory, or a `.gguf` file (tokenizer from its metadata).
    pub fn load(path: &Path) -> TextResult<Self> {
        if path.is_file() {
            super::gguf_tokenizer::model_text_from_gguf(path)
        } else {
            Self::from_dir(path)
        }
    }

    /// Reads `dir/tokenizer.json` (required) and, when present, `tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `chat_template` — a string or a list of named templates,
    /// `default` taken), `chat_template.jinja` (preferred, as transformers saves it now) and
    /// `generation_config.json` (`eos_token_id`).
    pub fn from_dir(dir: &Path) -> TextResult<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TextError::File {
                path: tokenizer_path,
                reason: "does not exist: text needs the model's tokenizer (or give token ids)"
                    .into(),
            });
        }
        let tokenizer_text =
            std::fs::read_to_string(&tokenizer_path).map_err(|source| TextError::Io {
                path: tokenizer_path.clone(),
                source,
            })?;
        let tokenizer = parse_tokenizer(&tokenizer_text).map_err(|reason| TextError::File {
            path: tokenizer_path.clone(),
            reason,
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(serde_json::Value::Null);
        let bos = special_token(config.get("bos_token"));
        let eos = special_token(config.get("eos_token"));
        let jinja_path = dir.join("chat_template.jinja");
        let template_path = if jinja_path.is_file() {
            jinja_path.clone()
        } else {
            config_path.clone()
        };
        let template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| TextError::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    let named = |name: &str| {
                        list.iter().find_map(|t| {
                            (t.get("name")?.as_str()? == name)
                                .then(|| t.get("template")?.as_str().map(str::to_string))?
                        })
                    };
                    Some(named("default").ok_or_else(|| TextError::Key {
                        source_name: config_path.display().to_string(),
                        key: "chat_template".into(),
                        reason: "a list of templates without one named `default`".into(),
                    })?)
                }
                Some(other) => {
                    return Err(TextError::Key {
                        source_name: config_path.display().to_string(),
                        key: "chat_template".into(),
                        reason: format!("expected a string or a list, found {other}"),
                    })
                }
            }
        };
        let mut extra_eos = Vec::new();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            extra_eos.extend(token_ids(gen.get("eos_token_id")));
        }
        if let Some(cfg) = read_json(&dir.join("config.json"))? {
            extra_eos.extend(token_ids(cfg.get("eos_token_id")));
        }
        Self::new(
            tokenizer,
            template.as_deref(),
            bos,
            eos,
            &extra_eos,
            dir.to_path_buf(),
        )
        .map_err(|e| match e {
            // A template that does not compile is named by the file it came from.
            TextError::Template(reason) => TextError::File {
                path: template_path,
                reason: format!("chat template: {reason}"),
            },
            other => other,
        })
    }

    /// The `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, when the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The chat template or an error saying the model has none.
    pub fn require_chat_template(&self) -> TextResult<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| TextError::File {
            path: self.source.clone(),
            reason: "the model has no chat template (tokenizer_config.json `chat_template`, \
                     chat_template.jinja or GGUF `tokenizer.chat_template`)"
                .into(),
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Where the tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g.
    /// a leading bos), as transformers' `tokenizer(text)` does. Rendered chat templates are
    /// encoded without it (the template writes its own special tokens).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> TextResult<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// Token ids and each token's byte range in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> TextResult<IdsWithOffsets> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Text of `ids` (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> TextResult<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }
}
