//! A GGUF file as `--model` through the binary, on the tiny reference Llama exported to GGUF
//! by `export-gguf` (projections Q8_0): logits equal to those of the directory `convert`
//! makes from it, `convert --dtype bf16`, `inspect` naming the family, `train` over the
//! quantized blocks (default) and over f32 (`--dequantize-base`, refused for a directory),
//! the adapter applied with `logits --adapter` and exported with `export-gguf --lora`.
//! The real-model test (ignored) trains over SmolLM2's Q4_1 file.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

mod common;
use common::{fails, lm_data, ok, temp_dir};

fn data(rel: &str) -> String {
    lm_data(rel).display().to_string()
}

fn logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tokens_file(dir: &Path) -> PathBuf {
    let ids: Vec<i64> = vec![1, 17, 4, 9, 33, 2, 60, 12];
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 8], &bytes).unwrap();
    let path = dir.join("tokens.safetensors");
    safetensors::serialize_to_file([("input_ids", view)], None, &path).unwrap();
    path
}

#[test]
fn gguf_as_model_everywhere() {
    let tmp = temp_dir("flow");
    let gguf = tmp.join("tiny.gguf");
    let g = gguf.to_str().unwrap();
    ok(&[
        "export-gguf",
        "--model",
        &data("base"),
        "--out",
        g,
        "--type",
        "q8_0",
    ]);

    let report = ok(&["inspect", g]);
    assert!(
        report.contains("model: llama (GGUF `llama`), 2 layers"),
        "{report}"
    );

    // convert: a transformers directory in bf16, and one in f32 computing as the GGUF.
    let bf16 = tmp.join("bf16");
    let out = ok(&["convert", g, bf16.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(out.contains("bf16"), "{out}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["dtype"], "bfloat16");
    let report = ok(&["inspect", bf16.to_str().unwrap()]);
    assert!(report.contains("BF16"), "{report}");
    let f32_dir = tmp.join("f32");
    ok(&["convert", g, f32_dir.to_str().unwrap()]);
    let tokens = tokens_file(&tmp);
    let t = tokens.to_str().unwrap();
    let from_gguf = tmp.join("gguf_logits.safetensors");
    let from_dir = tmp.join("dir_logits.safetensors");
    ok(&[
        "logits",
        "--model",
        g,
        "--tokens",
        t,
        "--out",
        from_gguf.to_str().unwrap(),
    ]);
    ok(&[
        "logits",
        "--model",
        f32_dir.to_str().unwrap(),
        "--tokens",
        t,
        "--out",
        from_dir.to_str().unwrap(),
    ]);
    assert_eq!(logits(&from_gguf), logits(&from_dir));

    // train over the Q8_0 blocks (the default), then over f32: the same losses up to the
    // products' summation order.
    let data_path = tmp.join("train.jsonl");
    std::fs::write(
        &data_path,
        "{\"input_ids\": [1, 17, 4, 9, 33, 2, 60, 12]}\n{\"input_ids\": [5, 6, 7, 8, 9, 10]}\n",
    )
    .unwrap();
    let d = data_path.to_str().unwrap();
    let quantized = tmp.join("run_q");
    let dense = tmp.join("run_f32");
    let common = [
        "--data",
        d,
        "--rank",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--quiet",
    ];
    let mut args = vec!["train", "--model", g, "--out", quantized.to_str().unwrap()];
    args.extend(common);
    ok(&args);
    let mut args = vec![
        "train",
        "--model",
        g,
        "--dequantize-base",
        "--out",
        dense.to_str().unwrap(),
    ];
    args.extend(common);
    ok(&args);
    let last_loss = |dir: &Path| -> f64 {
        let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let line = text.lines().last().unwrap();
        line.split(',').nth(2).unwrap().parse().unwrap()
    };
    let (lq, ld) = (last_loss(&quantized), last_loss(&dense));
    assert!((lq - ld).abs() <= 1e-4 * ld.abs().max(1.0), "{lq} vs {ld}");

    // The adapter over the same file, and as a llama.cpp LoRA for it.
    let adapter = quantized.join("adapter");
    let a = adapter.to_str().unwrap();
    let with_adapter = tmp.join("adapter_logits.safetensors");
    ok(&[
        "logits",
        "--model",
        g,
        "--adapter",
        a,
        "--tokens",
        t,
        "--out",
        with_adapter.to_str().unwrap(),
    ]);
    assert_ne!(logits(&with_adapter), logits(&from_gguf));
    let lora = tmp.join("lora.gguf");
    let out = ok(&[
        "export-gguf",
        "--model",
        g,
        "--adapter",
        a,
        "--lora",
        "--out",
        lora.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    assert!(out.contains("LoRA adapter"), "{out}");

    // --dequantize-base only means something for a GGUF file.
    let base_dir = data("base");
    let mut args = vec![
        "train",
        "--model",
        &base_dir,
        "--dequantize-base",
        "--out",
        dense.to_str().unwrap(),
    ];
    args.extend(common);
    let err = fails(&args);
    assert!(err.contains("--dequantize-base"), "{err}");

    // A file that is not GGUF is named.
    let err = fails(&["convert", t, tmp.join("x").to_str().unwrap()]);
    assert!(err.contains("not a GGUF file"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// LoRA trained over SmolLM2-135M-Instruct's Q4_1 blocks: the loss falls and the adapter is
/// read back over the same file. Run with `cargo xtask real-model`.
#[test]
#[ignore = "needs the real model: cargo xtask real-model"]
fn real_model_lora_over_the_q4_1_file() {
    let gguf = std::env::var("LORA_QAT_REAL_MODEL").expect("LORA_QAT_REAL_MODEL");
    let tmp = temp_dir("real");
    let data_path = tmp.join("chat.jsonl");
    let mut text = String::new();
    for i in 0..8 {
        text += &format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"Say hello number {i}.\"}}, \
             {{\"role\": \"assistant\", \"content\": \"Hello {i}!\"}}]}}\n"
        );
    }
    std::fs::write(&data_path, text).unwrap();
    let out = tmp.join("run");
    ok(&[
        "train",
        "--model",
        &gguf,
        "--data",
        data_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--max-steps",
        "8",
        "--batch-size",
        "4",
        "--lr",
        "0.002",
        "--seed",
        "3",
        "--quiet",
    ]);
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    eprintln!("SmolLM2 Q4_1 LoRA losses {losses:?}");
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
    let answer = ok(&[
        "generate",
        "--model",
        &gguf,
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--chat",
        "--prompt",
        "Say hello number 3.",
        "--max-new",
        "8",
    ]);
    eprintln!("adapted answer: {answer}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The tokenizer built from SmolLM2's GGUF metadata alone (its `tokenizer.ggml.pre` is
/// `smollm`: digits split one by one), and the `tokenizer.json` `convert` writes from it, give
/// the ids transformers gives with the model's own tokenizer directory on a corpus of digits,
/// spaces, unicode, code and chat markup (tests/data/gguf_tokenizer/smollm2_ids.json, made by
/// tools/interop/make_tokenizer_reference.py). Run with `cargo xtask real-model`.
#[test]
#[ignore = "needs the real model: cargo xtask real-model"]
fn real_model_tokenizer_from_metadata_equals_transformers() {
    let gguf = std::env::var("LORA_QAT_REAL_MODEL").expect("LORA_QAT_REAL_MODEL");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/gguf_tokenizer/smollm2_ids.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let text = lora_qat::text::gguf_tokenizer::model_text_from_gguf(Path::new(&gguf)).unwrap();
    let tmp = temp_dir("tokenizer");
    let written =
        lora_qat::text::gguf_tokenizer::write_tokenizer_files(Path::new(&gguf), &tmp).unwrap();
    assert!(!written.is_empty());
    let converted = tokenizers::Tokenizer::from_file(tmp.join("tokenizer.json")).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let mut differing = Vec::new();
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ours = text.encode(s, false).unwrap();
        let from_file = converted.encode(s, false).unwrap().get_ids().to_vec();
        if ours != expected || from_file != expected {
            differing.push(format!(
                "{s:?}: ours {ours:?} / tokenizer.json {from_file:?} / transformers {expected:?}"
            ));
        }
    }
    assert!(
        differing.is_empty(),
        "{} of {} texts differ:\n{}",
        differing.len(),
        cases.len(),
        differing.join("\n")
    );
}

/// DoRA and LoRA-QAT trained over small GGUF bases (Q4_0 and Q8_0 blocks; K types need rows of
/// 256, wider than this model): the saved adapter loads back over the same file and over the
/// file converted to f32 with the same logits (up to the blocks' product order), the PEFT
/// directory says what it is, and `export-gguf --lora` writes a LoRA (DoRA's magnitude and
/// LoRA-QAT's quantizer have no llama.cpp LoRA form: refused by name, their merged
/// `export-gguf` is the deployable file).
#[test]
fn dora_and_lora_qat_over_gguf_bases_save_load_and_export() {
    let tmp = temp_dir("adapters");
    let data_path = tmp.join("train.jsonl");
    std::fs::write(
        &data_path,
        "{\"input_ids\": [1, 17, 4, 9, 33, 2, 60, 12]}\n{\"input_ids\": [5, 6, 7, 8, 9, 10]}\n",
    )
    .unwrap();
    let tokens = tokens_file(&tmp);
    let t = tokens.to_str().unwrap();
    for ty in ["q4_0", "q8_0"] {
        let gguf = tmp.join(format!("{ty}.gguf"));
        let g = gguf.to_str().unwrap();
        ok(&[
            "export-gguf",
            "--model",
            &data("base"),
            "--out",
            g,
            "--type",
            ty,
        ]);
        let f32_dir = tmp.join(format!("{ty}-f32"));
        ok(&["convert", g, f32_dir.to_str().unwrap()]);
        for (kind, extra) in [
            ("dora", vec!["--adapter-type", "dora"]),
            (
                "lora-qat",
                vec!["--adapter-type", "lora-qat", "--quantizer", "q8_0"],
            ),
        ] {
            let run = tmp.join(format!("{ty}-{kind}"));
            let mut args = vec![
                "train",
                "--model",
                g,
                "--out",
                run.to_str().unwrap(),
                "--data",
                data_path.to_str().unwrap(),
                "--rank",
                "4",
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--lr",
                "0.01",
                "--seed",
                "5",
                "--quiet",
            ];
            args.extend(&extra);
            ok(&args);
            let adapter = run.join("adapter");
            let a = adapter.to_str().unwrap();
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["use_dora"], kind == "dora", "{ty} {kind}: {config}");
            assert!(adapter.join("adapter_model.safetensors").is_file());
            let over = |model: &str, out: &str| -> Vec<f32> {
                let path = tmp.join(out);
                ok(&[
                    "logits",
                    "--model",
                    model,
                    "--adapter",
                    a,
                    "--tokens",
                    t,
                    "--out",
                    path.to_str().unwrap(),
                ]);
                logits(&path)
            };
            let from_gguf = over(g, &format!("{ty}-{kind}-gguf.safetensors"));
            let from_dir = over(
                f32_dir.to_str().unwrap(),
                &format!("{ty}-{kind}-dir.safetensors"),
            );
            let base_path = tmp.join(format!("{ty}-base.safetensors"));
            ok(&[
                "logits",
                "--model",
                g,
                "--tokens",
                t,
                "--out",
                base_path.to_str().unwrap(),
            ]);
            let base = logits(&base_path);
            let diff = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max)
            };
            let err = diff(&from_gguf, &from_dir);
            assert!(
                err <= 1e-4,
                "{ty} {kind}: GGUF vs f32 directory differ by {err}"
            );
            assert!(
                diff(&from_gguf, &base) > 1e-4,
                "{ty} {kind}: the adapter does nothing"
            );

            let lora = tmp.join(format!("{ty}-{kind}-lora.gguf"));
            let export = [
                "export-gguf",
                "--model",
                g,
                "--adapter",
                a,
                "--lora",
                "--out",
                lora.to_str().unwrap(),
                "--type",
                "f32",
            ];
            let merged = tmp.join(format!("{ty}-{kind}-merged.gguf"));
            // LoRA-QAT's merged file holds its trained q8_0 blocks (the grid it trained on).
            let merged_type = if kind == "dora" { "f32" } else { "q8_0" };
            let merge_args = [
                "export-gguf",
                "--model",
                g,
                "--adapter",
                a,
                "--out",
                merged.to_str().unwrap(),
                "--type",
                merged_type,
            ];
            match kind {
                "dora" => {
                    let err = fails(&export);
                    assert!(err.to_lowercase().contains("dora"), "{ty}: {err}");
                    assert!(!lora.exists());
                }
                _ => {
                    let err = fails(&export);
                    assert!(err.to_lowercase().contains("qat"), "{ty}: {err}");
                }
            }
            ok(&merge_args);
            // The merged file computes what the adapter over the file computes.
            let merged_logits = tmp.join(format!("{ty}-{kind}-merged.safetensors"));
            ok(&[
                "logits",
                "--model",
                merged.to_str().unwrap(),
                "--tokens",
                t,
                "--out",
                merged_logits.to_str().unwrap(),
            ]);
            // Exact but for LoRA-QAT over Q4_0: the merged q8_0 file re-encodes the Q4_0
            // embedding (and tied head) in q8_0 blocks, which is not lossless.
            let tol = if kind == "lora-qat" && ty == "q4_0" {
                1e-2
            } else {
                1e-4
            };
            let err = diff(&logits(&merged_logits), &from_gguf);
            assert!(err <= tol, "{ty} {kind}: merged file differs by {err}");
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
