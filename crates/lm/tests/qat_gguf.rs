//! A LoRA-QAT adapter trained on a ggml grid exports to GGUF as exactly the blocks training
//! computed with (issue 13): after θ, `A` and `B` moved, every adapted tensor of the GGUF
//! file decodes (and un-permutes, for Q and K) to the layer's fake-quant weight bit for bit,
//! the K types' fallback for rows of 64 is used in training and export alike, and a GGUF type
//! other than the trained one is refused by name.

use std::path::PathBuf;

use lm::{LinearModule, LlamaConfig, LlamaModel};
use lora_core::{InitLoraWeights, LoraConfig, QatMode};
use ndarray::Array2;
use quant_core::config::QatConfig;
use quant_core::ggml::{dequantize, GgmlType};
use quant_core::gguf::GgufFile;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qat-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "down_proj"];

fn config() -> LlamaConfig {
    LlamaConfig::new(32, 64, 64, 1, 2, 1).unwrap()
}

/// A trained-looking LoRA-QAT model on `grid`: θ and the adapters moved off their init.
/// Returns it with every adapted module's fake-quant weight.
fn trained(grid: GgmlType) -> (LlamaModel, Vec<(String, Array2<f32>)>) {
    let mut model = LlamaModel::random(config(), 5).unwrap();
    let mut lora = LoraConfig::new(2, 4.0, &MODULES);
    lora.init_lora_weights = InitLoraWeights::Random;
    let qat = QatConfig::ggml(grid).unwrap();
    model
        .inject_qat_adapters(&lora, &qat, QatMode::QuantizeMerged, "default", 3)
        .unwrap();
    let mut used = Vec::new();
    for (i, (path, lin)) in model.linear_modules_mut().enumerate() {
        let LinearModule::Qat(q) = lin else { continue };
        let layer = q.layer_mut();
        for (k, p) in layer.quantizer_params_mut().iter_mut().enumerate() {
            *p *= 1.0 + 0.05 * (((i * 31 + k * 7) % 9) as f32 - 4.0) / 4.0;
        }
        let a = layer.adapter().a().mapv(|v| v * 1.7);
        let b = layer.adapter().b().mapv(|v| v - 0.02);
        layer
            .adapter_mut()
            .set_weights(a.view(), b.view(), None)
            .unwrap();
        used.push((path, layer.effective_weight().unwrap()));
    }
    assert_eq!(used.len(), MODULES.len());
    (model, used)
}

fn gguf_name(module: &str) -> String {
    lm::gguf::FamilyNames::for_arch("llama")
        .unwrap()
        .to_gguf(&format!("{module}.weight"))
        .unwrap()
        .unwrap()
        .name
}

#[test]
fn the_gguf_holds_the_trained_blocks_bit_for_bit() {
    for (grid, stored) in [
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::Q4_1, GgmlType::Q4_1),
        (GgmlType::Q5_0, GgmlType::Q5_0),
        (GgmlType::Q8_0, GgmlType::Q8_0),
        // Rows of 64 are not whole super-blocks: llama.cpp's fallback, in training too.
        (GgmlType::Q4_K, GgmlType::Q5_0),
        (GgmlType::Q6_K, GgmlType::Q8_0),
    ] {
        let dir = temp_dir(grid.name());
        let (model, used) = trained(grid);
        let base = dir.join("base");
        LlamaModel::random(config(), 5)
            .unwrap()
            .save_pretrained(&base)
            .unwrap();
        let adapter = dir.join("adapter");
        model.save_qat_adapter(&adapter, "default").unwrap();
        let out = dir.join("m.gguf");
        lm::gguf::export_gguf(&base, Some(&adapter), &out, grid).unwrap();
        let file = GgufFile::open(&out).unwrap();
        let cfg = config();
        for (module, weight) in &used {
            let name = gguf_name(module);
            let info = file.tensor(&name).unwrap();
            assert_eq!(info.ty, stored, "{grid} {module}");
            let bytes = file.read_tensor_bytes(&name).unwrap();
            let (rows, cols) = weight.dim();
            let mut values = dequantize(stored, &bytes, rows * cols).unwrap();
            let heads = if module.ends_with("q_proj") {
                Some(cfg.num_attention_heads)
            } else if module.ends_with("k_proj") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                values = lm::gguf::unpermute_rope_rows(&values, rows, cols, h).unwrap();
            }
            for (i, (a, b)) in values.iter().zip(weight.iter()).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{grid} {module} value {i}: {a} vs {b}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn another_gguf_type_than_the_trained_one_is_refused_by_name() {
    let dir = temp_dir("mismatch");
    let (model, _) = trained(GgmlType::Q4_0);
    let base = dir.join("base");
    LlamaModel::random(config(), 5)
        .unwrap()
        .save_pretrained(&base)
        .unwrap();
    let adapter = dir.join("adapter");
    model.save_qat_adapter(&adapter, "default").unwrap();
    let out = dir.join("m.gguf");
    let err = lm::gguf::export_gguf(&base, Some(&adapter), &out, GgmlType::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q4_0") && err.contains("q8_0"), "{err}");
    assert!(!out.exists(), "no half-written file");
    std::fs::remove_dir_all(&dir).unwrap();
}
