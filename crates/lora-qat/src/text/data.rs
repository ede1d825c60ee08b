//! Training data by content, as TRL reads it, turned into labelled token examples:
//!
//! | first line | format | loss on |
//! | --- | --- | --- |
//! | `{"input_ids": [...]}` | pre-tokenized (qat-train's JSONL) | its `labels`, else every token |
//! | `{"messages": [{"role", "content"}, ...]}` | conversational | assistant turns only |
//! | `{"prompt": ..., "completion": ...}` | prompt–completion (strings or message lists) | the completion |
//! | `{"text": ...}` | language modelling | every token |
//! | anything else | plain text, one example per line | every token |
//!
//! Assistant turns: with `{% generation %}` blocks in the template, the tokens of those
//! blocks (transformers' `return_assistant_tokens_mask`); otherwise, for each assistant
//! message `i`, the text between the rendering of `messages[..i]` with the generation prompt
//! and the rendering of `messages[..=i]` (the turn the model must produce, its end-of-turn
//! token included). A token is trained on when its characters overlap such a span.
//! Rendered conversations are tokenized without adding special tokens (the template writes
//! them), as `apply_chat_template` does. Plain text and completions get the eos token
//! appended when the tokenizer has one, as TRL's SFT does.

use std::ops::Range;
use std::path::Path;

use qat_train::data::{Dataset, Example};
use qat_train::loss::IGNORE_INDEX;
use serde_json::Value;

use super::tokenizer::ModelText;
use super::{TextError, TextResult};

/// Which format a data file was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    PreTokenized,
    Chat,
    PromptCompletion,
    Text,
    PlainLines,
}

impl DataFormat {
    /// The format of a JSONL line's object, by its keys.
    fn of_object(obj: &serde_json::Map<String, Value>) -> Option<Self> {
        if obj.contains_key("input_ids") {
            Some(Self::PreTokenized)
        } else if obj.contains_key("messages") {
            Some(Self::Chat)
        } else if obj.contains_key("prompt") && obj.contains_key("completion") {
            Some(Self::PromptCompletion)
        } else if obj.contains_key("text") {
            Some(Self::Text)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PreTokenized => "pre-tokenized JSONL",
            Self::Chat => "chat JSONL (messages)",
            Self::PromptCompletion => "prompt-completion JSONL",
            Self::Text => "text JSONL",
            Self::PlainLines => "plain text",
        }
    }
}

/// A dataset and the format it was read as.
#[derive(Debug)]
pub struct TextData {
    pub dataset: Dataset,
    pub format: DataFormat,
}

/// Reads `path` by content (see the module docs); `load_text` gives the model's tokenizer and
/// chat template, called only when the format needs them.
pub fn examples_from_file(
    path: &Path,
    load_text: impl FnOnce() -> TextResult<ModelText>,
) -> TextResult<TextData> {
    let content = std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.display().to_string();
    let first = content.lines().find(|l| !l.trim().is_empty());
    let Some(first) = first else {
        return Err(TextError::File {
            path: path.to_path_buf(),
            reason: "holds no example (the file is empty)".into(),
        });
    };
    let format = match serde_json::from_str::<Value>(first) {
        Ok(Value::Object(obj)) => DataFormat::of_object(&obj).ok_or_else(|| TextError::Line {
            source_name: name.clone(),
            line: 1 + content
                .lines()
                .position(|l| !l.trim().is_empty())
                .unwrap_or(0),
            reason: format!(
                "a JSON object with none of the keys a format is known by (input_ids, \
                 messages, prompt + completion, text); keys: {:?}",
                obj.keys().collect::<Vec<_>>()
            ),
        })?,
        _ => DataFormat::PlainLines,
    };
    if format == DataFormat::PreTokenized {
        let dataset = Dataset::from_jsonl_str(&content, &name).map_err(|e| TextError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        return Ok(TextData { dataset, format });
    }
    let text = load_text()?;
    let mut examples = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_error = |reason: String| TextError::Line {
            source_name: name.clone(),
            line: i + 1,
            reason,
        };
        let example = if format == DataFormat::PlainLines {
            text_example(&text, line)
        } else {
            let value: Value = serde_json::from_str(line).map_err(|e| line_error(e.to_string()))?;
            let obj = value
                .as_object()
                .ok_or_else(|| line_error("not a JSON object".into()))?;
            match DataFormat::of_object(obj) {
                Some(f) if f == format => {}
                other => {
                    return Err(line_error(format!(
                        "a {} line in a file whose first line is {}",
                        other.map_or("unrecognised", DataFormat::name),
                        format.name()
                    )))
                }
            }
            match format {
                DataFormat::Chat => chat_example(&text, &obj["messages"]),
                DataFormat::PromptCompletion => {
                    prompt_completion_example(&text, &obj["prompt"], &obj["completion"])
                }
                _ => match obj["text"].as_str() {
                    Some(s) => text_example(&text, s),
                    None => Err(TextError::Template("`text` is not a string".into())),
                },
            }
        };
        let example = example.map_err(|e| line_error(e.to_string()))?;
        if example.input_ids.is_empty() {
            return Err(line_error("tokenizes to no tokens".into()));
        }
        examples.push(example);
    }
    let dataset = Dataset::new(examples).map_err(|e| TextError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(TextData { dataset, format })
}

/// Every token trained on: the text (with the tokenizer's special tokens, and eos).
pub fn text_example(text: &ModelText, s: &str) -> TextResult<Example> {
    let mut ids = text.encode(&with_eos(text, s), true)?;
    ids.shrink_to_fit();
    Ok(Example::new(ids))
}

fn with_eos(text: &ModelText, s: &str) -> String {
    match text.eos_token() {
        Some(eos) if !s.ends_with(eos) => format!("{s}{eos}"),
        _ => s.to_string(),
    }
}

/// A conversation with labels on the assistant turns only (see the module docs).
pub fn chat_example(text: &ModelText, messages: &Value) -> TextResult<Example> {
    let (rendered, spans) = assistant_spans(text, messages)?;
    let (ids, offsets) = text.encode_with_offsets(&rendered, false)?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, end))| {
            let trained = spans.iter().any(|s| start < s.end && s.start < end);
            if trained {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(Example {
        input_ids: ids,
        labels: Some(labels),
        step_mask: None,
        answer_mask: None,
        segment_ids: None,
    })
}

/// The rendered conversation and the byte ranges of its assistant turns.
pub fn assistant_spans(
    text: &ModelText,
    messages: &Value,
) -> TextResult<(String, Vec<Range<usize>>)> {
    let list = check_messages(messages)?;
    let template = text.require_chat_template()?;
    let none = serde_json::Map::new();
    let (full, spans) = template.render_json(messages, false, &none)?;
    if template.has_generation_blocks() {
        return Ok((full, spans));
    }
    let mut spans = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if m["role"] != "assistant" {
            continue;
        }
        let (prompt, _) = template.render_json(&Value::Array(list[..i].to_vec()), true, &none)?;
        let (upto, _) = template.render_json(&Value::Array(list[..=i].to_vec()), false, &none)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
            return Err(TextError::Template(format!(
                "message {i}: the template's rendering of the conversation up to this \
                 assistant turn does not extend its rendering of the turns before it, so the \
                 turn's tokens cannot be found (a template with {{% generation %}} blocks \
                 marks them explicitly)"
            )));
        }
        spans.push(prompt.len()..upto.len());
    }
    Ok((full, spans))
}

fn check_messages(messages: &Value) -> TextResult<&Vec<Value>> {
    let list = messages
        .as_array()
        .ok_or_else(|| TextError::Template("`messages` is not a list".into()))?;
    if list.is_empty() {
        return Err(TextError::Template("`messages` is empty".into()));
    }
    for (i, m) in list.iter().enumerate() {
        if !m["role"].is_string() {
            return Err(TextError::Template(format!(
                "message {i} has no string `role`"
            )));
        }
    }
    Ok(list)
}

/// Loss on the completion only. Strings: `tokenize(prompt)` against `tokenize(prompt +
/// completion + eos)`; message lists: the prompt rendered with the generation prompt against
/// prompt and completion rendered together.
pub fn prompt_completion_example(
    text: &ModelText,
    prompt: &Value,
    completion: &Value,
) -> TextResult<Example> {
    let (prompt_ids, ids) = match (prompt, completion) {
        (Value::String(p), Value::String(c)) => (
            text.encode(p, true)?,
            text.encode(&with_eos(text, &format!("{p}{c}")), true)?,
        ),
        (Value::Array(p), Value::Array(c)) => {
            check_messages(prompt)?;
            check_messages(completion)?;
            let template = text.require_chat_template()?;
            let none = serde_json::Map::new();
            let (prompt_text, _) = template.render_json(prompt, true, &none)?;
            let all: Vec<Value> = p.iter().chain(c).cloned().collect();
            let (full, _) = template.render_json(&Value::Array(all), false, &none)?;
            if !full.starts_with(&prompt_text) {
                return Err(TextError::Template(
                    "the rendered prompt is not the start of the rendered conversation".into(),
                ));
            }
            (
                text.encode(&prompt_text, false)?,
                text.encode(&full, false)?,
            )
        }
        _ => {
            return Err(TextError::Template(
                "`prompt` and `completion` must both be strings or both lists of messages".into(),
            ))
        }
    };
    let n_prompt = prompt_ids.len().min(ids.len());
    let labels = ids
        .iter()
        .enumerate()
        .map(|(t, &id)| {
            if t < n_prompt {
                IGNORE_INDEX
            } else {
                i64::from(id)
            }
        })
        .collect();
    Ok(Example {
        input_ids: ids,
        labels: Some(labels),
        step_mask: None,
        answer_mask: None,
        segment_ids: None,
    })
}
