//! Smoke test of the CLI on non-Llama families (tiny transformers models copied into
//! `crates/lm/tests/data/arch`): `inspect` names the family, `train` runs two LoRA steps and
//! saves a PEFT adapter, `merge` folds it in, `generate` decodes from the merged model,
//! `export-gguf` writes the merged model and the adapter (`--lora`) under the family's
//! llama.cpp architecture, and `inspect` names the family of both files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lora-qat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn base(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../lm/tests/data/arch/{family}/base"))
}

/// The first directory under `dir` holding an `adapter_config.json`.
fn find_adapter(dir: &Path) -> Option<PathBuf> {
    if dir.join("adapter_config.json").is_file() {
        return Some(dir.to_path_buf());
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .find_map(|e| find_adapter(&e.path()))
}

fn smoke(family: &str, targets: &str, architecture: &str) {
    let tmp = std::env::temp_dir().join(format!(
        "lora-qat-cli-families-{family}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&base(family));

    let inspect = String::from_utf8(run(&["inspect", &model]).stdout).unwrap();
    assert!(inspect.contains(architecture), "{inspect}");

    let data = tmp.join("train.jsonl");
    let lines: Vec<String> = (0..6u32)
        .map(|a| {
            let ids: Vec<u32> = (0..7 + a % 3).map(|i| (a * 11 + i * 5) % 101).collect();
            format!("{{\"input_ids\": {ids:?}}}")
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.join("run");
    run(&[
        "train",
        "--quiet",
        "--model",
        &model,
        "--data",
        &s(&data),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--target-modules",
        targets,
        "--out",
        &s(&out),
    ]);
    let adapter = find_adapter(&out).expect("train saved a PEFT adapter");

    let merged = tmp.join("merged");
    run(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&merged),
    ]);
    let generated = String::from_utf8(
        run(&[
            "generate",
            "--model",
            &s(&merged),
            "--prompt-ids",
            "3,1,4,1,5",
            "--max-new",
            "8",
            "--ignore-eos",
        ])
        .stdout,
    )
    .unwrap();
    let ids: Vec<u32> = generated
        .trim()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 8);
    // The merged model decodes as the base with the adapter does.
    let with_adapter = String::from_utf8(
        run(&[
            "generate",
            "--model",
            &model,
            "--adapter",
            &s(&adapter),
            "--prompt-ids",
            "3,1,4,1,5",
            "--max-new",
            "8",
            "--ignore-eos",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(generated, with_adapter, "{family}");

    let gguf_arch = if family == "gemma3_text" {
        "gemma3"
    } else {
        family
    };
    let model_gguf = s(&tmp.join("merged.gguf"));
    let lora_gguf = s(&tmp.join("lora.gguf"));
    let wrote = String::from_utf8(
        run(&[
            "export-gguf",
            "--model",
            &s(&merged),
            "--out",
            &model_gguf,
            "--type",
            "q8_0",
        ])
        .stdout,
    )
    .unwrap();
    assert!(
        wrote.contains(&format!("architecture {gguf_arch}")),
        "{wrote}"
    );
    run(&[
        "export-gguf",
        "--model",
        &model,
        "--adapter",
        &s(&adapter),
        "--lora",
        "--out",
        &lora_gguf,
        "--type",
        "f16",
    ]);
    let inspect = String::from_utf8(run(&["inspect", &model_gguf]).stdout).unwrap();
    assert!(
        inspect.contains(&format!("model of family {family}")),
        "{inspect}"
    );
    let inspect = String::from_utf8(run(&["inspect", &lora_gguf]).stdout).unwrap();
    assert!(
        inspect.contains(&format!("LoRA adapter of family {family}")),
        "{inspect}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn gemma2_trains_merges_and_generates() {
    smoke("gemma2", "q_proj,v_proj,down_proj", "Gemma2ForCausalLM");
}

#[test]
fn phi3_trains_merges_and_generates() {
    smoke("phi3", "qkv_proj,gate_up_proj", "Phi3ForCausalLM");
}
