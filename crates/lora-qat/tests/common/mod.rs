//! Set-up shared by the binary's integration tests: running `lora-qat`, the tiny reference
//! Llama of `crates/lm/tests/data/llama`, a fresh scratch directory per call, a small JSONL
//! data set and reading safetensors outputs. Each test file is its own crate and uses only
//! part of this module, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::{Dtype, SafeTensors};

/// The `lora-qat` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-qat"))
}

/// Runs `lora-qat ARGS` and returns what it did, success or not.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Runs `lora-qat ARGS`, asserts it succeeded (printing its stderr if not), returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "lora-qat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `lora-qat ARGS`, asserts it failed, returns stderr (the error message).
pub fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "lora-qat {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A file or directory of the tiny reference Llama's data (`crates/lm/tests/data/llama/REL`).
pub fn lm_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lm/tests/data/llama")
        .join(rel)
}

/// The tiny reference Llama's model directory.
pub fn base_model() -> PathBuf {
    lm_data("base")
}

/// A new, empty scratch directory. The name holds the test binary, the tag, the process id
/// and a per-process counter, so tests running in parallel (in one binary or several) never
/// share or delete each other's directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "lora-qat-{binary}-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Ten pre-tokenized examples (ids below the tiny model's vocabulary of 64) as `train.jsonl`.
pub fn jsonl_data(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let lines: Vec<String> = (0..10u32)
        .map(|a| {
            let ids: Vec<u32> = (0..6 + a % 4).map(|i| (a * 7 + i * 3) % 64).collect();
            format!("{{\"input_ids\": {ids:?}}}")
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Every f32 tensor of a safetensors file: name → (shape, values).
pub fn read_f32s(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == Dtype::F32)
        .map(|(name, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (v.shape().to_vec(), values))
        })
        .collect()
}

/// The largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
