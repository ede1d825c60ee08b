//! Every model family against transformers/PEFT reference data (`tests/data/arch/<family>`):
//! base logits (1e-4 abs) and loss (1e-5), LoRA logits, loss and every adapter gradient
//! (1e-3 relative), KV-cache greedy tokens (crossing the sliding windows) equal, a saved
//! adapter loading back equal, and the packed (segmented) forward against separate rows.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{
    arch_batch as ids_and_labels, arch_dir, arch_i64s as i64s, max_abs_diff, read_f32s, relative,
};
use lm::{cross_entropy, LlamaModel, Sampling};
use ndarray::{Array2, ArrayD};

const FAMILIES: [&str; 7] = [
    "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
];

fn dir(family: &str) -> PathBuf {
    arch_dir(family)
}

fn check_family(family: &str) {
    let io = read_f32s(&dir(family).join("io.safetensors"));
    let (ids, labels) = ids_and_labels(family);
    let mut model = LlamaModel::from_pretrained(dir(family).join("base")).unwrap();
    assert_eq!(
        model.config().family().to_string().replace("_text", ""),
        family.replace("llama3", "llama")
    );

    // Base.
    let logits = model.logits(ids.view(), None).unwrap();
    let base_logits = max_abs_diff(&logits, &io["base_logits"]);
    let base_loss =
        (cross_entropy(logits.view(), labels.view()).unwrap().loss - io["base_loss"][[0]]).abs();

    // Greedy continuation with the KV cache.
    let (_, prompt) = i64s(family, "greedy_prompt");
    let (_, expected) = i64s(family, "greedy_tokens");
    let prompt: Vec<u32> = prompt.iter().map(|&v| v as u32).collect();
    // `greedy_tokens` holds the new tokens only (prompt + new runs past the windows).
    let generated = model
        .generate(&prompt, expected.len(), &Sampling::Greedy, None)
        .unwrap();
    let expected_new: Vec<u32> = expected.iter().map(|&v| v as u32).collect();

    // LoRA.
    let adapter = dir(family).join("adapter_lora");
    assert!(model.load_adapter(&adapter, "default", 0).unwrap() > 0);
    let pass = model.forward(ids.view(), None).unwrap();
    let lora_logits = max_abs_diff(pass.logits(), &io["lora_logits"]);
    let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let lora_loss = (ce.loss - io["lora_loss"][[0]]).abs();
    model.backward(pass, ce.grad_logits.view()).unwrap();
    let expected_grads = read_f32s(&adapter.join("grads.safetensors"));
    let ours: BTreeMap<String, ArrayD<f32>> = model
        .adapter_gradients("default")
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ours.len(), expected_grads.len(), "{family}: gradient count");
    let mut worst_grad = 0.0f32;
    for (key, grad) in &ours {
        let reference = expected_grads
            .get(key)
            .unwrap_or_else(|| panic!("{family}: no reference gradient {key}"));
        worst_grad = worst_grad.max(relative(grad, reference));
    }
    eprintln!(
        "{family}: base logits {base_logits:e}, base loss {base_loss:e}, LoRA logits \
         {lora_logits:e}, LoRA loss {lora_loss:e}, worst gradient {worst_grad:e}"
    );
    assert!(
        base_logits <= 1e-4,
        "{family}: base logits differ by {base_logits}"
    );
    assert!(
        base_loss <= 1e-5,
        "{family}: base loss differs by {base_loss}"
    );
    assert_eq!(generated, expected_new, "{family}: greedy tokens");
    assert!(
        lora_logits <= 1e-4,
        "{family}: LoRA logits differ by {lora_logits}"
    );
    assert!(
        lora_loss <= 1e-5,
        "{family}: LoRA loss differs by {lora_loss}"
    );
    assert!(
        worst_grad <= 1e-3,
        "{family}: adapter gradient relative error {worst_grad}"
    );

    // A saved adapter loads back equal.
    let saved = std::env::temp_dir().join(format!("lm-families-{family}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&saved);
    model.save_adapter(&saved, "default").unwrap();
    let mut reloaded = LlamaModel::from_pretrained(dir(family).join("base")).unwrap();
    reloaded.load_adapter(&saved, "default", 0).unwrap();
    assert_eq!(
        reloaded.logits(ids.view(), None).unwrap(),
        model.logits(ids.view(), None).unwrap(),
        "{family}: reloaded adapter"
    );
    std::fs::remove_dir_all(&saved).unwrap();
}

#[test]
fn llama3_matches_transformers() {
    check_family("llama3");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_family("qwen3");
}

#[test]
fn mistral_matches_transformers() {
    check_family("mistral");
}

#[test]
fn gemma2_matches_transformers() {
    check_family("gemma2");
}

#[test]
fn gemma3_matches_transformers() {
    check_family("gemma3");
}

#[test]
fn phi3_matches_transformers() {
    check_family("phi3");
}

#[test]
fn packed_rows_equal_separate_rows_for_every_family() {
    for family in FAMILIES {
        let mut model = LlamaModel::from_pretrained(dir(family).join("base")).unwrap();
        let (ids, _) = ids_and_labels(family);
        let a: Vec<u32> = ids.row(0).iter().take(6).copied().collect();
        let b: Vec<u32> = ids.row(1).iter().take(5).copied().collect();
        let packed = Array2::from_shape_vec((1, 11), [a.clone(), b.clone()].concat()).unwrap();
        let segments =
            Array2::from_shape_vec((1, 11), [vec![7u32; 6], vec![3u32; 5]].concat()).unwrap();
        let pass = model
            .forward_segmented(packed.view(), segments.view(), None)
            .unwrap();
        let alone_a = model
            .logits(Array2::from_shape_vec((1, 6), a).unwrap().view(), None)
            .unwrap();
        let alone_b = model
            .logits(Array2::from_shape_vec((1, 5), b).unwrap().view(), None)
            .unwrap();
        let mut worst = 0.0f32;
        for v in 0..model.config().vocab_size {
            for t in 0..6 {
                worst = worst.max((pass.logits()[[0, t, v]] - alone_a[[0, t, v]]).abs());
            }
            for t in 0..5 {
                worst = worst.max((pass.logits()[[0, 6 + t, v]] - alone_b[[0, t, v]]).abs());
            }
        }
        assert!(worst < 1e-5, "{family}: packed vs separate {worst}");
        // The pass backs up like any other.
        let grad = ndarray::Array3::<f32>::ones(pass.logits().dim());
        model.set_base_trainable(true);
        let pass = model
            .forward_segmented(packed.view(), segments.view(), Some(&[0]))
            .unwrap();
        model.backward(pass, grad.view()).unwrap();
    }
}
