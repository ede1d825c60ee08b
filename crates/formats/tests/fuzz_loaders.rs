//! Mutation fuzzing of the safetensors header reader and the GGUF reader: valid files
//! written by this crate, then truncated, bit-flipped, given lying sizes, offsets and counts
//! (`support/mutate.rs`). Every result is a value or an error naming the file — never a
//! panic, never an allocation sized by an unchecked number (a test process that tried one
//! would abort). CI runs a few hundred cases per loader; the ignored tests run thousands:
//! `cargo test --release -p formats --test fuzz_loaders -- --ignored`.

#[path = "support/mutate.rs"]
mod mutate;

use formats::gguf::{GgufArray, GgufFile, GgufValue, GgufWriter, TensorSpec};
use formats::safetensors_stream::SafetensorsReader;
use formats::GgmlType;
use mutate::{apply, cases, mutations, scratch, without_panic};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use safetensors::{tensor::TensorView, Dtype};

fn valid_safetensors() -> Vec<u8> {
    let a: Vec<u8> = (0..24u32)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..8u16)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    let c: Vec<u8> = (0..5u8).collect();
    let views = vec![
        (
            "model.a".to_string(),
            TensorView::new(Dtype::F32, vec![4, 6], &a).unwrap(),
        ),
        (
            "model.b".to_string(),
            TensorView::new(Dtype::F16, vec![8], &b).unwrap(),
        ),
        (
            "model.c".to_string(),
            TensorView::new(Dtype::U8, vec![5, 1], &c).unwrap(),
        ),
    ];
    let meta = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn valid_gguf(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("valid.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        ("general.alignment".to_string(), GgufValue::U32(32)),
        ("llama.block_count".to_string(), GgufValue::U32(2)),
        ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(GgufArray::String(vec![
                "<s>".into(),
                "a".into(),
                "bc".into(),
            ])),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            GgufValue::Array(GgufArray::F32(vec![0.0, -1.0, -2.0])),
        ),
        ("general.size".to_string(), GgufValue::U64(1234)),
    ];
    let specs = vec![
        TensorSpec::new("token_embd.weight", vec![2, 32], GgmlType::F32),
        TensorSpec::new("blk.0.attn_q.weight", vec![2, 32], GgmlType::Q8_0),
        TensorSpec::new("output_norm.weight", vec![32], GgmlType::F16),
    ];
    let mut w = GgufWriter::create(&path, &meta, &specs).unwrap();
    let f32s: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.write_tensor("token_embd.weight", &f32s).unwrap();
    w.write_tensor("blk.0.attn_q.weight", &[1u8; 2 * 34])
        .unwrap();
    w.write_tensor("output_norm.weight", &[0u8; 64]).unwrap();
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

/// Runs `n` mutated copies of `valid` through `load` (written to `file`), requiring no panic
/// and an error naming the file; returns how many were rejected.
fn fuzz<E: std::fmt::Display>(
    n: u32,
    valid: &[u8],
    file: &std::path::Path,
    load: impl Fn(&std::path::Path) -> Result<(), E>,
) -> u32 {
    let rejected = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    runner
        .run(&mutations(), |ms| {
            std::fs::write(file, apply(valid, &ms)).unwrap();
            if let Err(e) = without_panic(&name, &ms, || load(file)) {
                let text = e.to_string();
                prop_assert!(
                    text.contains(&name),
                    "error does not name the file: {text} ({ms:?})"
                );
                rejected.set(rejected.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    rejected.get()
}

fn read_every_safetensors_tensor(path: &std::path::Path) -> formats::Result<()> {
    let reader = SafetensorsReader::open(path)?;
    for (name, info) in &reader.tensors {
        let bytes = reader.read_bytes(name)?;
        assert_eq!(bytes.len() as u64, info.len);
        if matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            reader.read_f32(name)?;
        }
    }
    Ok(())
}

fn read_every_gguf_tensor(path: &std::path::Path) -> formats::Result<()> {
    let file = GgufFile::open(path)?;
    for t in file.tensors.clone() {
        let bytes = file.read_tensor_bytes(&t.name)?;
        assert_eq!(bytes.len() as u64, t.size);
        if let Some(&rows) = t.shape.first() {
            file.read_tensor_rows_bytes(&t.name, 0..rows.min(1))?;
        }
    }
    Ok(())
}

fn safetensors_cases(n: u32) {
    let dir = scratch("formats-st");
    let valid = valid_safetensors();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, &valid).unwrap();
    read_every_safetensors_tensor(&path).unwrap();
    let rejected = fuzz(n, &valid, &path, read_every_safetensors_tensor);
    eprintln!("safetensors: {rejected} of {n} mutated files rejected with an error");
    assert!(rejected > n / 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn gguf_cases(n: u32) {
    let dir = scratch("formats-gguf");
    let valid = valid_gguf(&dir);
    let path = dir.join("model.gguf");
    std::fs::write(&path, &valid).unwrap();
    read_every_gguf_tensor(&path).unwrap();
    let rejected = fuzz(n, &valid, &path, read_every_gguf_tensor);
    eprintln!("gguf: {rejected} of {n} mutated files rejected with an error");
    assert!(rejected > n / 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_safetensors_headers_are_errors_naming_the_file() {
    safetensors_cases(cases(400));
}

#[test]
fn mutated_gguf_files_are_errors_naming_the_file() {
    gguf_cases(cases(400));
}

/// A header that claims 2^60 bytes fails on the file length before anything is allocated.
#[test]
fn absurd_claimed_sizes_fail_before_allocating() {
    let dir = scratch("formats-absurd");
    let mut st = valid_safetensors();
    st[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let path = dir.join("huge.safetensors");
    std::fs::write(&path, &st).unwrap();
    let err = SafetensorsReader::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("huge.safetensors") && err.contains("header length"),
        "{err}"
    );

    let mut gguf = valid_gguf(&dir);
    // The metadata count (bytes 16..24) claims 2^60 entries.
    gguf[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let path = dir.join("huge.gguf");
    std::fs::write(&path, &gguf).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("huge.gguf"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Thousands of cases: `cargo test --release -p formats --test fuzz_loaders -- --ignored`.
#[test]
#[ignore = "long: 5000 mutated files per loader"]
fn thousands_of_mutated_files() {
    safetensors_cases(5000);
    gguf_cases(5000);
}
