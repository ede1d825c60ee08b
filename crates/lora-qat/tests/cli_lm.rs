//! End-to-end tests of `lora-qat logits`, `grads`, `generate` and `bench train` through the
//! binary, on the tiny reference Llama and PEFT adapters in `crates/lm/tests/data/llama`.

use std::path::{Path, PathBuf};
use std::process::Output;

use safetensors::{Dtype, SafeTensors};

mod common;
use common::{lm_data, max_abs_diff, read_f32s, run, s, temp_dir};

/// Writes the reference `input_ids` (and `labels` when asked) to a tokens file.
fn tokens_file(dir: &Path, with_labels: bool) -> PathBuf {
    let bytes = std::fs::read(lm_data("io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut keys = vec!["input_ids"];
    if with_labels {
        keys.push("labels");
    }
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> =
        keys.iter().map(|&k| (k, st.tensor(k).unwrap())).collect();
    let path = dir.join(if with_labels {
        "tokens.safetensors"
    } else {
        "ids.safetensors"
    });
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn logits_and_loss_equal_the_reference_with_and_without_adapter() {
    let dir = temp_dir("logits");
    let tokens = tokens_file(&dir, true);
    let io = read_f32s(&lm_data("io.safetensors"));
    // The bitsandbytes 4-bit checkpoint loads with NF4 projections; QLoRA on top of it.
    for (model, adapter, prefix) in [
        ("base", None, "base"),
        ("base", Some("adapter_dora"), "dora"),
        ("base_bnb4", None, "bnb4"),
        ("base_bnb4", Some("adapter_qlora"), "qlora"),
    ] {
        let out = dir.join(format!("{prefix}.safetensors"));
        let base = lm_data(model);
        let mut args = vec![
            "logits",
            "--model",
            s(&base),
            "--tokens",
            s(&tokens),
            "--out",
            s(&out),
        ];
        let adapter_dir = adapter.map(lm_data);
        if let Some(a) = &adapter_dir {
            args.extend(["--adapter", s(a)]);
        }
        let output = run(&args);
        assert!(output.status.success(), "{output:?}");
        let got = read_f32s(&out);
        let (shape, logits) = &got["logits"];
        assert_eq!(shape, &[2, 8, 64]);
        let diff = max_abs_diff(logits, &io[&format!("{prefix}_logits")].1);
        assert!(diff <= 1e-4, "{prefix}: logits differ by {diff}");
        let loss = got["loss"].1[0];
        let reference = io[&format!("{prefix}_loss")].1[0];
        assert!(
            (loss - reference).abs() <= 1e-5,
            "{prefix}: {loss} vs {reference}"
        );
    }
    // Without labels there is no loss.
    let ids = tokens_file(&dir, false);
    let out = dir.join("ids_out.safetensors");
    let base = lm_data("base");
    let output = run(&[
        "logits",
        "--model",
        s(&base),
        "--tokens",
        s(&ids),
        "--out",
        s(&out),
    ]);
    assert!(output.status.success(), "{output:?}");
    let got = read_f32s(&out);
    assert!(got.contains_key("logits") && !got.contains_key("loss"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn grads_equal_the_reference() {
    let dir = temp_dir("grads");
    let tokens = tokens_file(&dir, true);
    for (model, variant) in [("base", "lora"), ("base", "dora"), ("base_bnb4", "qlora")] {
        let adapter = lm_data(&format!("adapter_{variant}"));
        let out = dir.join(format!("{variant}_grads.safetensors"));
        let base = lm_data(model);
        let output = run(&[
            "grads",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--tokens",
            s(&tokens),
            "--out",
            s(&out),
        ]);
        assert!(output.status.success(), "{output:?}");
        let got = read_f32s(&out);
        let expected = read_f32s(&adapter.join("grads.safetensors"));
        // Every reference tensor plus the loss.
        assert_eq!(got.len(), expected.len() + 1, "{variant}");
        for (key, (shape, values)) in &expected {
            // PEFT's gradient file names the magnitude with `.weight`, the adapter file without.
            let ours = key
                .strip_suffix(".lora_magnitude_vector.weight")
                .map_or_else(
                    || key.clone(),
                    |module| format!("{module}.lora_magnitude_vector"),
                );
            let (got_shape, got_values) = &got[&ours];
            assert_eq!(got_shape, shape, "{key}");
            let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = got_values
                .iter()
                .zip(values)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(err <= 1e-3 * norm, "{variant} {key}: {err} vs norm {norm}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_prints_ids_and_is_seeded() {
    let base = lm_data("base");
    let adapter = lm_data("adapter_lora");
    let args = [
        "generate",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--prompt-ids",
        "1,2,3",
        "--max-new",
        "6",
        "--ignore-eos",
        "--temperature",
        "0.8",
        "--seed",
        "7",
    ];
    let first = run(&args);
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8(first.stdout.clone()).unwrap();
    let ids: Vec<u32> = text.trim().split(',').map(|s| s.parse().unwrap()).collect();
    assert_eq!(ids.len(), 6);
    assert!(ids.iter().all(|&id| id < 64));
    assert_eq!(run(&args).stdout, first.stdout, "same seed, same ids");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = temp_dir("errors");
    let base = lm_data("base");
    let adapter = lm_data("adapter_lora");
    let ids_only = tokens_file(&dir, false);
    let out = dir.join("out.safetensors");
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // grads without labels.
    let o = run(&[
        "grads",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--tokens",
        s(&ids_only),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("labels"), "{}", stderr(&o));

    // input_ids stored as f32.
    let wrong = dir.join("f32_ids.safetensors");
    let values: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 2], &values).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &wrong).unwrap();
    let o = run(&[
        "logits",
        "--model",
        s(&base),
        "--tokens",
        s(&wrong),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("input_ids") && e.contains("F32") && e.contains("I64"),
        "{e}"
    );

    // A model directory that does not exist.
    let missing = dir.join("no_such_model");
    let o = run(&[
        "logits",
        "--model",
        s(&missing),
        "--tokens",
        s(&ids_only),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no_such_model"), "{}", stderr(&o));

    // An adapter directory that does not exist.
    let o = run(&[
        "generate",
        "--model",
        s(&base),
        "--adapter",
        s(&missing),
        "--prompt-ids",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no_such_model"), "{}", stderr(&o));

    // A prompt id outside the vocabulary.
    let o = run(&["generate", "--model", s(&base), "--prompt-ids", "1,64"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("64"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_train_small_prints_one_json_object() {
    let o = run(&["bench", "train", "--small", "--json", "--runs", "1"]);
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["bench"], "train_lora_r4");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["ms_per_step"].as_f64().unwrap() > 0.0);
    assert_eq!(v["runs"], 1);
    assert!(v.get("bytes_per_quantized_parameter").is_none());
    // QLoRA: NF4 bases under the adapters, with the memory figure.
    let o = run(&[
        "bench", "train", "--small", "--qlora", "--json", "--runs", "1",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(v["bench"], "train_qlora_r4");
    // The tiny model's tensors are small: the per-tensor maps weigh more than at scale.
    assert!(v["bytes_per_quantized_parameter"].as_f64().unwrap() > 0.5);
}

#[test]
fn every_option_has_help() {
    for cmd in [
        &["logits"][..],
        &["grads"],
        &["generate"],
        &["bench", "train"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let o = run(&args);
        assert!(o.status.success(), "{cmd:?}");
        let text = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.trim_start().starts_with("--") {
                continue;
            }
            let same_line = line
                .trim_start()
                .split("  ")
                .filter(|s| !s.is_empty())
                .count()
                > 1;
            // When some help text is long, clap puts every description on the next line.
            let next_line = lines.get(i + 1).is_some_and(|next| {
                let next = next.trim_start();
                !next.is_empty() && !next.starts_with('-')
            });
            assert!(
                same_line || next_line,
                "{cmd:?}: option without help: {line}"
            );
        }
    }
}

#[test]
fn generate_runs_on_the_bnb4_model_with_qlora() {
    let base = lm_data("base_bnb4");
    let adapter = lm_data("adapter_qlora");
    let output = run(&[
        "generate",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--prompt-ids",
        "1,2,3",
        "--max-new",
        "5",
        "--ignore-eos",
    ]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let ids: Vec<u32> = text.trim().split(',').map(|t| t.parse().unwrap()).collect();
    assert_eq!(ids.len(), 5, "{text}");
    assert!(ids.iter().all(|&t| t < 64));
}
