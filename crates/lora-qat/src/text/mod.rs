//! Text in, text out: a model's tokenizer and chat template (from a Hugging Face directory or
//! from GGUF metadata alone), Hugging Face hub ids resolved in the local cache, chat /
//! prompt–completion / plain-text training data turned into labelled token examples, and
//! incremental detokenization for streaming.
//!
//! Why here and not in `lm`: the tokenizer (`tokenizers`) and the template engine (`minijinja`)
//! are text concerns; `lm` stays a model over token ids, and `qat-train` a trainer over
//! [`Example`](qat_train::data::Example)s. This module is the one place text becomes ids.

pub mod chat;
pub mod data;
pub mod gguf_tokenizer;
pub mod hub;
pub mod stream;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use data::{examples_from_file, DataFormat, TextData};
pub use hub::resolve_model;
pub use stream::TextStreamer;
pub use tokenizer::ModelText;

use std::path::PathBuf;

/// What went wrong turning text into tokens (or back), naming the file, key or line.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file that could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content is wrong.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A metadata key (GGUF `tokenizer.ggml.*`, tokenizer_config.json fields) that is missing
    /// or of the wrong kind.
    #[error("{source_name}: key `{key}`: {reason}")]
    Key {
        source_name: String,
        key: String,
        reason: String,
    },
    /// A line of a data file.
    #[error("{source_name} line {line}: {reason}")]
    Line {
        source_name: String,
        line: usize,
        reason: String,
    },
    /// A chat template that does not compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// From the `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model name that is neither a directory, a file nor a cached hub id.
    #[error("{0}")]
    Model(String),
    /// From quant-core (GGUF reading).
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// From the file containers (GGUF reading).
    #[error(transparent)]
    Format(#[from] quant_core::FormatError),
}

/// Results of this module.
pub type TextResult<T> = std::result::Result<T, TextError>;
