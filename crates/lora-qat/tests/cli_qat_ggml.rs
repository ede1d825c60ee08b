//! `lora-qat train --adapter-type lora-qat --quantizer q4_0` trains on ggml's Q4_0 grid, and
//! `export-gguf --type q4_0` of the run writes exactly the blocks it trained: the GGUF
//! tensors of the adapted projections are byte-identical to the run's `quantized.safetensors`
//! blocks (after llama.cpp's Q/K row order) and decode to the `merge`d weights bit for bit.
//! A disagreeing `--bits` or `--ste` and another export type are refused by name. On the tiny
//! Llama of `crates/lm/tests/data/llama`.

use std::path::Path;
use std::process::Output;

use quant_core::ggml::{dequantize, GgmlType};
use quant_core::gguf::GgufFile;
use safetensors::SafeTensors;

mod common;
use common::{base_model, jsonl_data, ok, run, s, temp_dir};

fn train(dir: &Path, extra: &[&str]) -> Output {
    let data = jsonl_data(dir);
    let model = base_model();
    let out = dir.join("run");
    let mut args: Vec<&str> = vec![
        "train",
        "--quiet",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--adapter-type",
        "lora-qat",
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
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn export_gguf_of_a_q4_0_run_writes_the_trained_blocks() {
    let dir = temp_dir("q4_0");
    let config = dir.join("config.json");
    std::fs::write(&config, r#"{"optimizer": {"quantizer_lr": 1e-4}}"#).unwrap();
    let trained = train(&dir, &["--quantizer", "q4_0", "--config", s(&config)]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let run_dir = dir.join("run");
    let adapter = run_dir.join("adapter");
    let model = base_model();
    let gguf = dir.join("m.gguf");
    ok(&[
        "export-gguf",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&gguf),
        "--type",
        "q4_0",
    ]);
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

    let packed = std::fs::read(run_dir.join("quantized.safetensors")).unwrap();
    let packed = SafeTensors::deserialize(&packed).unwrap();
    let merged_bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let merged_st = SafeTensors::deserialize(&merged_bytes).unwrap();
    let file = GgufFile::open(&gguf).unwrap();
    let mut checked = 0;
    for (module, heads) in [
        ("model.layers.0.self_attn.q_proj", Some(4)),
        ("model.layers.0.self_attn.v_proj", None),
    ] {
        let Ok(qweight) = packed.tensor(&format!("{module}.qweight")) else {
            continue;
        };
        let state = packed.tensor(&format!("{module}.qstate")).unwrap();
        let state: serde_json::Value = serde_json::from_slice(state.data()).unwrap();
        assert_eq!(state["type"], "q4_0");
        let name = lm::gguf::FamilyNames::for_arch("llama")
            .unwrap()
            .to_gguf(&format!("{module}.weight"))
            .unwrap()
            .unwrap()
            .name;
        assert_eq!(file.tensor(&name).unwrap().ty, GgmlType::Q4_0);
        let in_gguf = file.read_tensor_bytes(&name).unwrap();
        let merged_w = merged_st.tensor(&format!("{module}.weight")).unwrap();
        let (rows, cols) = (merged_w.shape()[0], merged_w.shape()[1]);
        // The run's blocks in Hugging Face row order; the GGUF's in llama.cpp's.
        let mut decoded = dequantize(GgmlType::Q4_0, &in_gguf, rows * cols).unwrap();
        if let Some(h) = heads {
            decoded = lm::gguf::unpermute_rope_rows(&decoded, rows, cols, h).unwrap();
        }
        let trained = dequantize(GgmlType::Q4_0, qweight.data(), rows * cols).unwrap();
        assert_eq!(decoded, trained, "{module}: GGUF blocks vs the run's");
        let merged_values = quant_core::io::tensor_to_f32("w", &merged_w).unwrap();
        for (i, (a, b)) in decoded.iter().zip(&merged_values).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{module} value {i}: {a} vs {b}");
        }
        if heads.is_none() {
            assert_eq!(in_gguf, qweight.data(), "{module}: the bytes themselves");
        }
        checked += 1;
    }
    assert_eq!(
        checked, 2,
        "q_proj and v_proj are LoRA-QAT targets by default"
    );

    let err = run(&[
        "export-gguf",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&dir.join("x.gguf")),
        "--type",
        "q8_0",
    ]);
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(!err.status.success() && text.contains("q4_0"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_ggml_grid_refuses_bits_and_ste_it_does_not_have() {
    let dir = temp_dir("refuse");
    for (extra, named) in [
        (["--quantizer", "q4_0", "--bits", "3"], "--bits 3"),
        (["--quantizer", "q5_1", "--ste", "standard"], "--ste"),
    ] {
        let out = train(&dir, &extra);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(named), "{text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
