//! # formats
//!
//! The bottom of lora-qat: file containers that know bytes, not models or quantizers.
//!
//! - [`gguf`]: the GGUF v3 container (typed metadata, tensor infos, aligned data), read by
//!   seeking and written by streaming.
//! - [`ggml_type`]: ggml's tensor type ids with their block sizes (what the container needs to
//!   size a tensor); the quantizers live in `quant_core::ggml`.
//! - [`safetensors_stream`]: safetensors one tensor at a time.
//! - [`io`]: safetensors dtype conversion (f32/f16/bf16 → f32), owned tensors.
//! - [`atomic`]: the one crash-safe write (temporary file in the same directory, write,
//!   fsync the file, rename, fsync the directory) that every writer here uses.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("formats-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("a.txt");
//! formats::atomic::write_atomic(&path, b"whole or nothing").unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"whole or nothing");
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub mod atomic;
pub mod error;
pub mod ggml_type;
pub mod gguf;
pub mod io;
pub mod safetensors_stream;

pub use error::{FormatError, Result};
pub use ggml_type::GgmlType;
