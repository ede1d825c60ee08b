//! Issue 13 item 2: a LoRA-QAT adapter trained on the NF4 grid in bitsandbytes' layout
//! (per-block absmax, double-quantized in the forward) merges (`merge --quantize nf4`) into
//! a transformers bitsandbytes 4-bit checkpoint holding exactly the trained codes and
//! scales: loading it back gives the layers' fake-quant weights bit for bit; its tensor
//! names, dtypes and quantization config are those of the checkpoint transformers itself
//! saved for the same model (`tests/data/llama/base_bnb4`); adapters it cannot export so are
//! refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lm::merge::{merge_checkpoint, MergeOptions};
use lm::{LinearModule, LlamaModel};
use lora_core::{InitLoraWeights, LoraConfig, QatMode};
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::ggml::GgmlType;
use quant_core::uniform::Granularity;
use safetensors::SafeTensors;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qat-bnb-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// NF4 in blocks of 32 (the tiny model's rows are 32 and 64 wide) with double quantization.
fn nf4_bnb(double_quant: bool, granularity: Granularity) -> QatConfig {
    QatConfig {
        quantizer: QuantizerKind::Nf4,
        bits: 4,
        pi_k: None,
        granularity,
        double_quant,
        ..QatConfig::piq3()
    }
}

/// The tiny Llama with LoRA-QAT on every projection, the trained scales moved off their
/// initial absmax (as training moves them), saved as a LoRA-QAT directory in `dir`.
fn trained_adapter(qat: &QatConfig, mode: QatMode, dir: &Path) -> LlamaModel {
    let mut model = LlamaModel::from_pretrained(format!("{DATA}/base")).unwrap();
    let mut lora = LoraConfig::new(4, 8.0, &common::PROJECTIONS);
    lora.init_lora_weights = InitLoraWeights::Random;
    model
        .inject_qat_adapters(&lora, qat, mode, "default", 11)
        .unwrap();
    let mut k = 0usize;
    model
        .visit_trainable_parameters(|name, p| {
            if name.ends_with("quantizer.step") {
                for v in p.value.iter_mut() {
                    k += 1;
                    *v *= 0.85 + 0.3 * ((k * 37 % 17) as f32 / 17.0);
                }
            }
            Ok(())
        })
        .unwrap();
    model.save_qat_adapter(dir, "default").unwrap();
    model
}

fn merge_nf4(adapter: &Path, out: &Path) -> lm::Result<lm::merge::MergeReport> {
    let options = MergeOptions {
        quantize_nf4: true,
        ..MergeOptions::default()
    };
    merge_checkpoint(
        Path::new(&format!("{DATA}/base")),
        Some(adapter),
        out,
        &options,
    )
}

/// name → (dtype, shape) of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect()
}

#[test]
fn trained_codes_and_double_quantized_absmax_load_back_bit_for_bit() {
    let dir = temp_dir("exact");
    let qat = nf4_bnb(true, Granularity::PerBlock { size: 32 });
    let mut model = trained_adapter(&qat, QatMode::QuantizeMerged, &dir.join("adapter"));
    let out = dir.join("merged");
    let report = merge_nf4(&dir.join("adapter"), &out).unwrap();
    assert_eq!(report.merged_modules, 14);

    let loaded = LlamaModel::from_pretrained(&out).unwrap();
    let mut compared = 0;
    for (i, layer) in loaded.layers().iter().enumerate() {
        for (name, lin) in layer.linears() {
            assert_eq!(lin.kind(), "NF4", "{name}");
            let deployed = lin.base_weight().unwrap().to_owned();
            let path = format!("model.layers.{i}.{name}");
            let LinearModule::Qat(q) = model.linear_module_mut(&path).unwrap() else {
                panic!("{path} is not LoRA-QAT");
            };
            let trained = q.layer_mut().effective_weight().unwrap();
            assert!(
                deployed
                    .iter()
                    .zip(trained.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path}: the exported NF4 weight is not the fake-quant weight"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 14);

    // The layout transformers + bitsandbytes save: the same tensors with the same dtypes
    // and, but for the absmax codes (blocks of 32 here against bnb's 64) and the quant-state
    // JSON that says so, the same shapes.
    let ours = layout(&out.join("model.safetensors"));
    let theirs = layout(Path::new(&format!("{DATA}/base_bnb4/model.safetensors")));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, (dtype, shape)) in &theirs {
        let (our_dtype, our_shape) = &ours[name];
        assert_eq!(our_dtype, dtype, "{name}");
        if name.ends_with(".absmax") {
            assert_eq!(our_shape[0], 2 * shape[0], "{name}: twice the blocks");
        } else if !name.contains("quant_state") {
            assert_eq!(our_shape, shape, "{name}");
        }
    }
    let config = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["quantization_config"].clone()
    };
    assert_eq!(
        config(&out),
        config(Path::new(&format!("{DATA}/base_bnb4")))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapters_without_a_bitsandbytes_form_are_refused_by_name() {
    let dir = temp_dir("refuse");
    let cases = [
        (
            nf4_bnb(false, Granularity::PerChannel),
            QatMode::QuantizeMerged,
            "double quantization",
        ),
        (
            nf4_bnb(true, Granularity::PerBlock { size: 32 }),
            QatMode::FrozenQuantizedBase,
            "frozen-base",
        ),
        (
            QatConfig::ggml(GgmlType::Q4_0).unwrap(),
            QatMode::QuantizeMerged,
            "Q4_0",
        ),
    ];
    for (k, (qat, mode, expected)) in cases.into_iter().enumerate() {
        let adapter = dir.join(format!("adapter{k}"));
        trained_adapter(&qat, mode, &adapter);
        let out = dir.join(format!("out{k}"));
        let err = merge_nf4(&adapter, &out).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        assert!(err.contains("model.layers.0."), "{err}");
        assert!(!out.join("model.safetensors").exists());
    }
    // Per-block NF4 whose blocks are not bitsandbytes' (48 is no power of two).
    let qat = QatConfig {
        granularity: Granularity::PerBlock { size: 48 },
        ..nf4_bnb(true, Granularity::PerBlock { size: 32 })
    };
    let adapter = dir.join("adapter48");
    trained_adapter(&qat, QatMode::QuantizeMerged, &adapter);
    let err = merge_nf4(&adapter, &dir.join("out48"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("48"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn double_quant_is_refused_outside_the_nf4_block_grid() {
    let per_channel = nf4_bnb(true, Granularity::PerChannel).validate();
    assert!(per_channel
        .unwrap_err()
        .to_string()
        .contains("double_quant"));
    let uniform = QatConfig {
        double_quant: true,
        ..QatConfig::piq3()
    };
    assert!(uniform
        .validate()
        .unwrap_err()
        .to_string()
        .contains("double_quant"));
}
