//! The GGUF container (version 3, little-endian), as llama.cpp and gguf-py read and write it:
//! a header (magic `GGUF`, version, tensor count, metadata count), typed metadata key/values,
//! tensor infos (name, dimensions innermost first, [`GgmlType`] id, offset into the data
//! section), zero padding up to `general.alignment` (32 when absent), then the tensor data,
//! each tensor starting at an aligned offset.
//!
//! [`GgufWriter`] streams: it computes every offset from the declared shapes and types, writes
//! the header to a temporary file next to the target, takes the tensors' bytes one at a time
//! in the declared order and renames the file into place only when all were written, so an
//! interrupted or failed export never leaves a half-written file under the final name.
//! [`GgufFile`] reads the header and fetches single tensors (or bands of their rows) by
//! seeking. This module knows nothing of models or quantizers: names and metadata are the
//! caller's, and decoding blocks to `f32` is `quant_core::ggml`'s (which also adds
//! `read_tensor_f32` / `write_tensor_f32` to these types, in `quant_core::gguf`).
//!
//! Shapes in this API are row-major (`[rows, cols]`, as numpy and safetensors); the file
//! stores them reversed (`ne[0]` = the contiguous dimension), as ggml does.
//!
//! ```
//! use formats::GgmlType;
//! use formats::gguf::{GgufFile, GgufValue, GgufWriter, TensorSpec};
//! let dir = std::env::temp_dir().join(format!("formats-gguf-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("t.gguf");
//! let meta = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
//! let specs = vec![TensorSpec::new("w", vec![2, 3], GgmlType::F32)];
//! let mut writer = GgufWriter::create(&path, &meta, &specs).unwrap();
//! let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
//! writer.write_tensor("w", &bytes).unwrap();
//! writer.finish().unwrap();
//! let file = GgufFile::open(&path).unwrap();
//! assert_eq!(file.metadata_str("general.architecture"), Some("llama"));
//! assert_eq!(file.tensor("w").unwrap().shape, vec![2, 3]);
//! assert_eq!(file.read_tensor_bytes("w").unwrap(), bytes);
//! // Rows 1..2 only, read by seeking:
//! assert_eq!(file.read_tensor_rows_bytes("w", 1..2).unwrap(), bytes[12..]);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::atomic::AtomicFile;
use crate::error::{FormatError, Result};
use crate::ggml_type::GgmlType;

/// `GGUF` as the first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this module writes (it reads 2 and 3, which share the layout).
pub const VERSION: u32 = 3;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

mod reader;
mod value;
mod writer;

pub use reader::GgufFile;
pub use value::{GgufArray, GgufValue};
pub use writer::GgufWriter;

/// A tensor to be written: name, row-major shape, type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, ty: GgmlType) -> Self {
        TensorSpec {
            name: name.into(),
            shape,
            ty,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tensor as listed in a file: its spec, data offset (relative to the data section) and size.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (the file's dimensions reversed).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the first byte relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::format(
        format!("GGUF file {}", path.display()),
        format!("{what}: {e}"),
    )
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

fn alignment_of(metadata: &[(String, GgufValue)], context: &str) -> Result<u64> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, GgufValue::U32(a))) if *a > 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(FormatError::format(
            context,
            format!("{ALIGNMENT_KEY} is {v:?}, expected a power-of-two u32"),
        )),
    }
}

#[cfg(test)]
mod tests;
