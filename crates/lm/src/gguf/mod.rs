//! GGUF for llama.cpp: export of a checkpoint of any supported family (with an adapter merged,
//! or a PEFT LoRA adapter as a GGUF LoRA), and reading such a file back under Hugging Face
//! names and layouts.
//!
//! - [`names`]: the one per-family table HF tensor name ↔ GGUF tensor name, with the value
//!   transforms (Llama's rotary row permutation, Gemma's `+1` norms), fused tensors and the
//!   extra tensors computed from the config; used in both directions.
//! - [`metadata`]: the `{arch}.*` key names, the metadata the converter writes per family and
//!   the check that refuses what llama.cpp cannot express.
//! - [`tokenizer`]: `tokenizer.ggml.*` from `tokenizer.json`.
//! - [`export`]: [`export_gguf`] and [`export_gguf_lora`].
//! - [`read`]: [`read_gguf`], a file's tensors under Hugging Face names.
//!
//! What is written follows llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`
//! (see docs/FORMATS.md for the list per family).

pub mod export;
pub mod metadata;
pub mod names;
pub mod read;
pub mod tokenizer;

use std::path::PathBuf;

use crate::error::{LmError, Result};

pub use export::{export_gguf, export_gguf_lora, export_gguf_with, TypeMix};
pub use metadata::{check_exportable, file_type, model_metadata};
pub use names::FamilyNames;
pub use read::{read_gguf, GgufTensors};
pub use tokenizer::tokenizer_metadata;

/// A tensor read back: Hugging Face name, row-major shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// What an export wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufExportReport {
    pub path: PathBuf,
    /// `general.architecture` written.
    pub arch: &'static str,
    pub tensors: usize,
    pub metadata_keys: usize,
    /// Tensors written in another type than requested because their rows are not whole
    /// blocks of it (llama.cpp's converter fallback).
    pub f16_fallbacks: Vec<String>,
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
