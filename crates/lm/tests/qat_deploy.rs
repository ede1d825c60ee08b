//! A LoRA-QAT model deploys as it computed in training: `merge_and_unload` writes the
//! quantized weights even with fake quantization switched off (a warm-up), the streaming
//! merge of a saved LoRA-QAT directory gives the same model, and a GGUF LoRA export refuses
//! it by the file's name.

use std::path::PathBuf;

use lm::merge::{merge_checkpoint, MergeOptions};
use lm::{LlamaConfig, LlamaModel};
use lora_core::{InitLoraWeights, LoraConfig, QatMode};
use ndarray::Array2;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::ggml::GgmlType;
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qat-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn qat_model(mode: QatMode) -> LlamaModel {
    let config = LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap();
    let mut model = LlamaModel::random(config, 5).unwrap();
    let mut lora = LoraConfig::new(2, 4.0, &["q_proj", "v_proj", "down_proj"]);
    lora.init_lora_weights = InitLoraWeights::Random;
    let qat = QatConfig {
        quantizer: QuantizerKind::Uniform,
        bits: 3,
        granularity: Granularity::PerChannel,
        ste: Ste::Lsq,
        pi_k: None,
        symmetric: true,
        incoherence: None,
        init: InitMethod::MseClipSearch,
        double_quant: false,
    };
    model
        .inject_qat_adapters(&lora, &qat, mode, "default", 3)
        .unwrap();
    model
}

fn ids() -> Array2<u32> {
    Array2::from_shape_fn((2, 6), |(b, t)| ((b * 7 + t * 5 + 1) % 32) as u32)
}

fn max_diff(a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>) -> f32 {
    (a - b).iter().fold(0.0f32, |m, d| m.max(d.abs()))
}

#[test]
fn merge_and_unload_quantizes_whatever_the_fake_quant_switch_says() {
    for mode in [QatMode::QuantizeMerged, QatMode::FrozenQuantizedBase] {
        let mut model = qat_model(mode);
        let quantized = model.logits(ids().view(), None).unwrap();
        model.set_fake_quant(false);
        let full_precision = model.logits(ids().view(), None).unwrap();
        assert!(
            max_diff(&quantized, &full_precision) > 1e-3,
            "3 bits change the logits"
        );
        let mut merged = model.clone();
        assert_eq!(merged.merge_and_unload().unwrap(), 3);
        let deployed = merged.logits(ids().view(), None).unwrap();
        assert!(max_diff(&deployed, &quantized) < 1e-4, "{mode:?}");
    }
}

#[test]
fn the_streaming_merge_of_a_lora_qat_directory_is_the_quantized_model() {
    let dir = temp_dir("merge");
    let mut model = qat_model(QatMode::QuantizeMerged);
    let quantized = model.logits(ids().view(), None).unwrap();
    let base = dir.join("base");
    // The base alone: the same seed's random model, before the adapter was injected.
    LlamaModel::random(model.config().clone(), 5)
        .unwrap()
        .save_pretrained(&base)
        .unwrap();
    let adapter = dir.join("adapter");
    model.save_qat_adapter(&adapter, "default").unwrap();
    let out = dir.join("merged");
    let report = merge_checkpoint(&base, Some(&adapter), &out, &MergeOptions::default()).unwrap();
    assert_eq!(report.merged_modules, 3);
    let mut merged = LlamaModel::from_pretrained(&out).unwrap();
    let logits = merged.logits(ids().view(), None).unwrap();
    assert!(max_diff(&logits, &quantized) < 1e-4);

    let err = lm::gguf::export_gguf_lora(&base, &adapter, &dir.join("a.gguf"), GgmlType::F16)
        .unwrap_err()
        .to_string();
    assert!(err.contains(lm::QAT_STATE_FILE), "{err}");
    assert!(!dir.join("a.gguf").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
