//! A LoRA-QAT adapter's three files commit as one: `qat_quantizers.safetensors` records the
//! SHA-256 of `adapter_model.safetensors` and `adapter_config.json` and is renamed in first
//! (`formats::atomic::write_atomic_group`), so a save stopped between two renames — injected
//! here with `formats::atomic::fault` — leaves a directory the loader refuses by name, never
//! one that loads as a mixture of two saves.

use std::path::{Path, PathBuf};

use formats::atomic::fault::fail_group_rename_after;
use lm::{LlamaConfig, LlamaModel};
use lora_core::{InitLoraWeights, LoraConfig, QatMode};
use quant_core::config::QatConfig;

fn model_with_qat(seed: u64, alpha: f64) -> LlamaModel {
    let config = LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap();
    let mut model = LlamaModel::random(config, 1).unwrap();
    let mut lora = LoraConfig::new(2, alpha, &["q_proj", "v_proj"]);
    lora.init_lora_weights = InitLoraWeights::Random;
    model
        .inject_qat_adapters(
            &lora,
            &QatConfig::piq3(),
            QatMode::QuantizeMerged,
            "qat",
            seed,
        )
        .unwrap();
    model
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qat-pair-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn load(dir: &Path) -> Result<LlamaModel, String> {
    let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 1).unwrap();
    model
        .load_qat_adapter(dir, "qat")
        .map(|_| model)
        .map_err(|e| e.to_string())
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_save_stopped_between_files_is_refused_by_name_and_leaves_no_temporaries() {
    let dir = temp_dir("overwrite");
    let old = model_with_qat(7, 4.0);
    old.save_qat_adapter(&dir, "qat").unwrap();
    assert_eq!(load(&dir).unwrap(), old);
    let new = model_with_qat(8, 4.0);

    // Stopped before the first rename: the old adapter, whole.
    fail_group_rename_after(Some(0));
    assert!(new.save_qat_adapter(&dir, "qat").is_err());
    assert_eq!(load(&dir).unwrap(), old);

    // Stopped after the quantizer file: its recorded hash names the old weights file.
    fail_group_rename_after(Some(1));
    let err = new.save_qat_adapter(&dir, "qat").unwrap_err().to_string();
    assert!(err.contains("injected failure"), "{err}");
    let err = load(&dir).unwrap_err();
    assert!(
        err.contains(lm::QAT_STATE_FILE) && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    assert!(err.contains("half-saved"), "{err}");
    assert_eq!(
        file_names(&dir),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            lm::QAT_STATE_FILE
        ],
        "no temporary file is left behind"
    );

    // A complete save repairs the directory.
    new.save_qat_adapter(&dir, "qat").unwrap();
    assert_eq!(load(&dir).unwrap(), new);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_save_stopped_before_the_config_is_refused_when_the_config_changed() {
    let dir = temp_dir("config");
    model_with_qat(7, 4.0)
        .save_qat_adapter(&dir, "qat")
        .unwrap();
    let new = model_with_qat(8, 8.0);
    fail_group_rename_after(Some(2));
    assert!(new.save_qat_adapter(&dir, "qat").is_err());
    let err = load(&dir).unwrap_err();
    assert!(
        err.contains(lm::QAT_STATE_FILE) && err.contains("adapter_config.json"),
        "{err}"
    );
    // With an unchanged config the same stop leaves a consistent directory: the new adapter.
    let same_config = model_with_qat(9, 8.0);
    new.save_qat_adapter(&dir, "qat").unwrap();
    fail_group_rename_after(Some(2));
    assert!(same_config.save_qat_adapter(&dir, "qat").is_err());
    assert_eq!(load(&dir).unwrap(), same_config);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_first_save_stopped_after_the_quantizer_file_is_not_a_plain_adapter() {
    let dir = temp_dir("fresh");
    fail_group_rename_after(Some(1));
    assert!(model_with_qat(7, 4.0)
        .save_qat_adapter(&dir, "qat")
        .is_err());
    // The quantizer file is there, so commands treat the directory as LoRA-QAT; its PEFT
    // files are missing: an error naming the missing file.
    assert_eq!(file_names(&dir), [lm::QAT_STATE_FILE]);
    let err = load(&dir).unwrap_err();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_plain_adapter_saved_over_a_qat_one_leaves_a_refused_quantizer_file() {
    let dir = temp_dir("stale");
    let model = model_with_qat(7, 4.0);
    model.save_qat_adapter(&dir, "qat").unwrap();
    // Another adapter's PEFT files written over the directory (a plain LoRA save).
    let options = lora_core::AdapterOptions::new(2, 4.0);
    let adapter = lora_core::LoraAdapter::new(&options, 16, 32, 3, "x").unwrap();
    lora_core::peft::save_adapters(
        &dir,
        &LoraConfig::new(2, 4.0, &["q_proj"]),
        [("model.layers.0.self_attn.q_proj", &adapter)],
    )
    .unwrap();
    let err = load(&dir).unwrap_err();
    assert!(err.contains("half-saved or mixed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
