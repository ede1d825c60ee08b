//! `lora-qat train` end to end on the tiny reference Llama in `crates/lm/tests/data/llama`:
//! outputs, config file + flag precedence, text data through a tokenizer.json, resume across
//! processes (bit-identical), and continuing from a saved adapter.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{base_model, jsonl_data, s, temp_dir};

fn train(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .arg("train")
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lora-qat train {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `(step, total_loss, grad_norm)` per CSV row (the timing columns differ between runs).
fn metrics(out: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (s, l, g) = (col("step"), col("total_loss"), col("grad_norm"));
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            (cells[s].into(), cells[l].into(), cells[g].into())
        })
        .collect()
}

#[test]
fn resume_across_processes_equals_an_uninterrupted_run() {
    let dir = temp_dir("resume");
    let data = jsonl_data(&dir);
    let model = base_model();
    let common = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--batch-size",
        "3",
        "--seed",
        "5",
        "--dropout",
        "0.1",
        "--lr",
        "0.01",
        "--rank",
        "4",
    ];
    let straight = dir.join("straight");
    train(&[&common[..], &["--max-steps", "7", "--out", s(&straight)]].concat());
    let split = dir.join("split");
    train(&[&common[..], &["--max-steps", "3", "--out", s(&split)]].concat());
    assert_eq!(metrics(&split).len(), 3);
    train(
        &[
            &common[..],
            &["--max-steps", "7", "--out", s(&split), "--resume"],
        ]
        .concat(),
    );

    assert_eq!(metrics(&split), metrics(&straight));
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(split.join("adapter").join(file)).unwrap(),
            std::fs::read(straight.join("adapter").join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(split.join("checkpoint.json").is_file());
    assert!(split.join("train_config.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flags_override_the_config_file() {
    let dir = temp_dir("config");
    let data = jsonl_data(&dir);
    let config = dir.join("train.json");
    std::fs::write(
        &config,
        r#"{"max_steps": 5, "batch_size": 4, "optimizer": {"lr": 0.001}, "schedule": {"kind": "constant"}}"#,
    )
    .unwrap();
    let out = dir.join("out");
    let model = base_model();
    train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--config",
        s(&config),
        "--max-steps",
        "2",
        "--lr",
        "0.05",
        "--out",
        s(&out),
    ]);
    assert_eq!(metrics(&out).len(), 2);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["max_steps"], 2);
    assert_eq!(saved["batch_size"], 4);
    assert!((saved["optimizer"]["lr"].as_f64().unwrap() - 0.05).abs() < 1e-9);

    std::fs::write(&config, r#"{"optimizer": {"lr": "fast"}}"#).unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args(["train", "--quiet", "--model", s(&model), "--data", s(&data)])
        .args(["--config", s(&config), "--out", s(&out)])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("train.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn text_lines_are_tokenized_with_the_models_tokenizer_json() {
    let dir = temp_dir("text");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(base_model().join(file), model.join(file)).unwrap();
    }
    // A word-level tokenizer: "w0".."w62" are ids 0..62, anything else is [UNK] = 63.
    let vocab: Vec<String> = (0..63).map(|i| format!("\"w{i}\": {i}")).collect();
    let tokenizer = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}, "[UNK]": 63}}, "unk_token": "[UNK]"}}}}"#,
        vocab.join(", ")
    );
    std::fs::write(model.join("tokenizer.json"), tokenizer).unwrap();
    let data = dir.join("train.txt");
    std::fs::write(&data, "w1 w2 w3 w4\n\nw5 w6 hello w8 w9\n").unwrap();
    let out = dir.join("out");
    train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        s(&out),
    ]);
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let tokens = header.iter().position(|h| *h == "tokens").unwrap();
    let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row[tokens], "9", "4 + 5 words, the unknown one as [UNK]");

    // Without a tokenizer.json, text data is an error naming the missing file.
    let bad = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args([
            "train",
            "--quiet",
            "--model",
            s(&base_model()),
            "--data",
            s(&data),
        ])
        .args(["--out", s(&out)])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tokenizer.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn init_adapter_continues_from_where_training_stopped() {
    let dir = temp_dir("init");
    let data = dir.join("one.jsonl");
    // One example: every step sees the same batch, so losses are comparable across runs.
    std::fs::write(
        &data,
        "{\"input_ids\": [3, 17, 5, 9, 22, 1, 14, 8, 40, 33]}\n",
    )
    .unwrap();
    let model = base_model();
    let common = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--lr",
        "0.05",
        "--rank",
        "4",
        "--target-modules",
        "q_proj,v_proj,down_proj,lm_head",
    ];
    let long = dir.join("long");
    train(&[&common[..], &["--max-steps", "9", "--out", s(&long)]].concat());
    let first = dir.join("first");
    train(&[&common[..], &["--max-steps", "8", "--out", s(&first)]].concat());
    let cont = dir.join("cont");
    let adapter = first.join("adapter");
    train(
        &[
            &common[..],
            &[
                "--max-steps",
                "1",
                "--init-adapter",
                s(&adapter),
                "--out",
                s(&cont),
            ],
        ]
        .concat(),
    );

    let loss = |rows: &[(String, String, String)], i: usize| rows[i].1.parse::<f64>().unwrap();
    let long_rows = metrics(&long);
    let continued = loss(&metrics(&cont), 0);
    // The restarted run's first loss is the loss after 8 steps (step 9 of the long run),
    // well below where a fresh adapter starts.
    assert!(
        (continued - loss(&long_rows, 8)).abs() <= 1e-5 * continued.abs(),
        "continued {continued}, long run step 9 {}",
        loss(&long_rows, 8)
    );
    assert!(continued < 0.8 * loss(&long_rows, 0), "{long_rows:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_explains_every_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args(["train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--model",
        "--data",
        "--adapter-type",
        "--bits",
        "--quantizer",
        "--ste",
        "--teacher",
        "--lr",
        "--max-steps",
        "--epochs",
        "--batch-size",
        "--config",
        "--resume",
        "--out",
        "--init-adapter",
        "tokenizer.json",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args([
            "train",
            "--quiet",
            "--model",
            s(&base_model()),
            "--data",
            "x.jsonl",
        ])
        .args(["--out", "/nonexistent-dir-for-resume", "--resume"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--resume"));
}

#[test]
fn lora_qat_and_qlora_runs_write_their_adapters_and_quantized_weights() {
    let dir = temp_dir("qat");
    let data = jsonl_data(&dir);
    let model = base_model();
    let qat = dir.join("qat");
    train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--adapter-type",
        "lora-qat",
        "--bits",
        "3",
        "--quantizer",
        "uniform",
        "--ste",
        "lsq",
        "--teacher",
        s(&model),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--out",
        s(&qat),
    ]);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "qat_quantizers.safetensors",
    ] {
        assert!(qat.join("adapter").join(file).is_file(), "{file}");
    }
    assert!(qat.join("quantized.safetensors").is_file());
    let csv = std::fs::read_to_string(qat.join("metrics.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(3).unwrap().split(',').collect();
    assert!(!row[4].is_empty(), "a teacher gives a KD loss: {row:?}");
    // A LoRA-QAT run continues from its own saved adapter (steps included).
    let cont = dir.join("cont");
    let adapter = qat.join("adapter");
    train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--adapter-type",
        "lora-qat",
        "--bits",
        "3",
        "--quantizer",
        "uniform",
        "--init-adapter",
        s(&adapter),
        "--max-steps",
        "1",
        "--out",
        s(&cont),
    ]);

    let qlora = dir.join("qlora");
    train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--adapter-type",
        "qlora",
        "--max-steps",
        "2",
        "--rank",
        "4",
        "--out",
        s(&qlora),
    ]);
    assert!(qlora
        .join("adapter")
        .join("adapter_model.safetensors")
        .is_file());
    assert!(!qlora.join("quantized.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
