//! A LoRA-QAT adapter trained by `lora-qat train` reaches every command that reads an
//! adapter as the quantized weights `Q(W + s·B·A)` it was trained with: `logits --adapter`
//! equals the logits of the `merge`d model, `generate` and `eval` agree with the merge,
//! `eval --reference` prints llama.cpp's KL-divergence statistics, `grads` reports the steps'
//! gradients, `export-gguf --lora` refuses it by name, and a
//! warm-up as long as the run is refused. On the tiny Llama of `crates/lm/tests/data/llama`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use safetensors::Dtype;

mod common;
use common::{base_model, jsonl_data, max_abs_diff, ok, read_f32s, run, s, temp_dir};

/// Every f32 tensor of a safetensors file by name, without its shape.
fn f32_values(path: &Path) -> BTreeMap<String, Vec<f32>> {
    read_f32s(path)
        .into_iter()
        .map(|(name, (_, v))| (name, v))
        .collect()
}

/// A tokens file of two sequences of eight ids, with labels.
fn tokens_file(dir: &Path) -> PathBuf {
    let ids: Vec<i64> = (0..16).map(|i| (i * 5 + 3) % 64).collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::I64, vec![2, 8], &bytes).unwrap();
    let labels = safetensors::tensor::TensorView::new(Dtype::I64, vec![2, 8], &bytes).unwrap();
    let path = dir.join("tokens.safetensors");
    safetensors::serialize_to_file([("input_ids", view), ("labels", labels)], None, &path).unwrap();
    path
}

/// Trains a 3-bit uniform LoRA-QAT adapter for three steps; returns its adapter directory.
fn train_qat(dir: &Path, extra: &[&str]) -> Output {
    let data = jsonl_data(dir);
    let model = base_model();
    let out = dir.join("run");
    let mut args = vec![
        "train",
        "--quiet",
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
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--lr",
        "0.05",
        "--out",
        s(&out),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

#[test]
fn a_lora_qat_adapter_is_used_as_its_quantized_weights_everywhere() {
    let dir = temp_dir("all");
    // The learned steps of a tiny model are ~1e-3: at the adapters' rate AdamW would push
    // them below zero, so they train at their own, smaller rate.
    let config = dir.join("config.json");
    std::fs::write(&config, r#"{"optimizer": {"quantizer_lr": 1e-5}}"#).unwrap();
    let trained = train_qat(&dir, &["--config", s(&config)]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let adapter = dir.join("run").join("adapter");
    let model = base_model();
    let tokens = tokens_file(&dir);

    // logits --adapter == logits of the merged model.
    let merged = dir.join("merged");
    ok(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    let with_adapter = dir.join("with_adapter.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--tokens",
        s(&tokens),
        "--out",
        s(&with_adapter),
    ]);
    let of_merged = dir.join("of_merged.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&merged),
        "--tokens",
        s(&tokens),
        "--out",
        s(&of_merged),
    ]);
    let (a, m) = (f32_values(&with_adapter), f32_values(&of_merged));
    let diff = max_abs_diff(&a["logits"], &m["logits"]);
    assert!(diff < 1e-5, "logits --adapter vs merged model: {diff}");

    // The same adapter read as plain LoRA (without its steps) computes something else: the
    // quantization is really applied.
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), plain.join(f)).unwrap();
    }
    let of_plain = dir.join("of_plain.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&model),
        "--adapter",
        s(&plain),
        "--tokens",
        s(&tokens),
        "--out",
        s(&of_plain),
    ]);
    let p = f32_values(&of_plain);
    assert!(
        max_abs_diff(&a["logits"], &p["logits"]) > 1e-3,
        "3-bit weights change logits"
    );

    // The merged projections are on the trained 3-bit grid: at most 8 levels per row.
    let w = f32_values(&merged.join("model.safetensors"));
    let q = &w["model.layers.0.self_attn.q_proj.weight"];
    let row: std::collections::BTreeSet<u32> = q[..16].iter().map(|v| v.to_bits()).collect();
    assert!(
        row.len() <= 8,
        "a row of Q(W + s·B·A) has {} values",
        row.len()
    );

    // generate --adapter == generate on the merged model (greedy).
    let gen = |args: &[&str]| {
        let mut all = vec![
            "generate",
            "--prompt-ids",
            "1,2,3",
            "--max-new",
            "5",
            "--ignore-eos",
        ];
        all.extend_from_slice(args);
        ok(&all).into_bytes()
    };
    assert_eq!(
        gen(&["--model", s(&model), "--adapter", s(&adapter)]),
        gen(&["--model", s(&merged)])
    );

    // eval --adapter == eval of the merged model.
    let data = dir.join("train.jsonl");
    let eval = |args: &[&str]| {
        let mut all = vec!["eval", "--data", s(&data)];
        all.extend_from_slice(args);
        ok(&all)
    };
    assert_eq!(
        eval(&["--model", s(&model), "--adapter", s(&adapter)]),
        eval(&["--model", s(&merged)])
    );

    // eval --reference: llama.cpp's KL-divergence statistics, the quantized model against
    // full precision; the base against itself diverges by nothing.
    let vs_base = eval(&[
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--reference",
        s(&model),
        "--ctx",
        "6",
    ]);
    for field in [
        "Mean    KLD:",
        "99.0%   KLD:",
        "Same top p:",
        "Mean PPL(Q)",
        "Mean PPL(base)",
    ] {
        assert!(vs_base.contains(field), "{vs_base}");
    }
    let mean_kld = |text: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with("Mean    KLD:"))
            .unwrap();
        line["Mean    KLD:".len()..]
            .split('±')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(mean_kld(&vs_base) > 0.0, "{vs_base}");
    let itself = eval(&["--model", s(&model), "--reference", s(&model), "--ctx", "6"]);
    assert_eq!(mean_kld(&itself), 0.0, "{itself}");
    assert!(itself.contains("Same top p: 100.000"), "{itself}");

    // grads: through the quantizer, the steps' gradients included.
    let grads = dir.join("grads.safetensors");
    ok(&[
        "grads",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--tokens",
        s(&tokens),
        "--out",
        s(&grads),
    ]);
    let g = f32_values(&grads);
    let step_key = "base_model.model.model.layers.0.self_attn.q_proj.quantizer.step";
    assert!(
        g.contains_key(step_key),
        "{:?}",
        g.keys().collect::<Vec<_>>()
    );
    assert!(g[step_key].iter().any(|v| *v != 0.0));
    let loss = g["loss"][0];
    // The loss is the one of the quantized (merged) model.
    assert!(
        (loss - m["loss"][0]).abs() < 1e-5,
        "{loss} vs {}",
        m["loss"][0]
    );

    // export-gguf of the model with the adapter merges the quantized weights (f32: exact).
    let gguf = dir.join("model.gguf");
    ok(&[
        "export-gguf",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--type",
        "f32",
        "--out",
        s(&gguf),
    ]);
    let bytes = std::fs::read(&gguf).unwrap();
    let down = &w["model.layers.0.mlp.down_proj.weight"];
    let needle: Vec<u8> = down.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(
        bytes
            .windows(needle.len())
            .any(|win| win == needle.as_slice()),
        "the GGUF holds the merged quantized down_proj bit for bit"
    );

    // export-gguf --lora refuses it, naming the file and pointing to the merge.
    let refused = run(&[
        "export-gguf",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--lora",
        "--out",
        s(&dir.join("lora.gguf")),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("qat_quantizers.safetensors"), "{err}");
    assert!(err.contains("without --lora"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_warm_up_as_long_as_the_run_is_refused() {
    let dir = temp_dir("warmup");
    let config = dir.join("config.json");
    std::fs::write(&config, r#"{"quant_warmup_steps": 3}"#).unwrap();
    let out = train_qat(&dir, &["--config", s(&config)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quant_warmup_steps"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
