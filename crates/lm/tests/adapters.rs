//! Adapters on the model against PEFT's reference outputs (`tests/data/llama/adapter_*`,
//! copied from the project's golden data): logits, loss, every adapter gradient and merged
//! logits for LoRA, rsLoRA and DoRA; injection, loading errors, saving, merging, parameters
//! and memory accounting.

mod common;

use common::{data_dir, io_ids, max_abs_diff, read_f32s, relative};
use std::path::PathBuf;

use lm::{cross_entropy, LlamaConfig, LlamaModel, LmError};
use lora_core::{AdapterSet, LoraConfig};
use ndarray::Array2;

fn base_model() -> LlamaModel {
    LlamaModel::from_pretrained(data_dir().join("base")).unwrap()
}

fn check_against_peft(variant: &str) {
    let io = read_f32s(&data_dir().join("io.safetensors"));
    let (ids, labels) = io_ids();
    let mut model = base_model();
    let adapter_dir = data_dir().join(format!("adapter_{variant}"));
    assert_eq!(model.load_adapter(&adapter_dir, "default", 0).unwrap(), 14);

    let pass = model.forward(ids.view(), None).unwrap();
    let logit_diff = max_abs_diff(pass.logits(), &io[&format!("{variant}_logits")]);
    let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let loss_diff = (ce.loss - io[&format!("{variant}_loss")][[0]]).abs();
    model.backward(pass, ce.grad_logits.view()).unwrap();
    eprintln!("{variant}: max |logits − PEFT| = {logit_diff:e}, |loss − PEFT| = {loss_diff:e}");
    assert!(
        logit_diff <= 1e-4,
        "{variant}: logits differ by {logit_diff}"
    );
    assert!(loss_diff <= 1e-5, "{variant}: loss differs by {loss_diff}");

    let expected = read_f32s(&adapter_dir.join("grads.safetensors"));
    let ours = model.adapter_gradients("default").unwrap();
    assert_eq!(ours.len(), expected.len(), "{variant}: gradient count");
    let mut worst = 0.0f32;
    for (key, grad) in &ours {
        // PEFT's gradient file names the magnitude as its in-memory parameter does.
        let peft_key = if key.ends_with("lora_magnitude_vector") {
            format!("{key}.weight")
        } else {
            key.clone()
        };
        let reference = expected
            .get(&peft_key)
            .unwrap_or_else(|| panic!("{variant}: no reference gradient {peft_key}"));
        assert_eq!(grad.shape(), reference.shape(), "{key}");
        let relative = relative(grad, reference);
        worst = worst.max(relative);
        assert!(
            relative <= 1e-3,
            "{variant} {key}: relative error {relative}"
        );
    }
    eprintln!("{variant}: worst relative gradient error {worst:e}");

    model.merge_adapters().unwrap();
    let merged = model.logits(ids.view(), None).unwrap();
    let merged_diff = max_abs_diff(&merged, &io[&format!("{variant}_merged_logits")]);
    eprintln!("{variant}: max |merged logits − PEFT| = {merged_diff:e}");
    assert!(
        merged_diff <= 1e-4,
        "{variant}: merged logits differ by {merged_diff}"
    );
    model.unmerge_adapters().unwrap();
    let unmerged = model.logits(ids.view(), None).unwrap();
    assert!(max_abs_diff(&unmerged, &io[&format!("{variant}_logits")]) <= 1e-4);
}

#[test]
fn lora_matches_peft() {
    check_against_peft("lora");
}

#[test]
fn rslora_matches_peft() {
    check_against_peft("rslora");
}

#[test]
fn dora_matches_peft() {
    check_against_peft("dora");
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-adapters-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn saved_adapters_reload_bit_identically() {
    for variant in ["lora", "dora"] {
        let mut model = base_model();
        let source = data_dir().join(format!("adapter_{variant}"));
        model.load_adapter(&source, "default", 0).unwrap();
        let dir = temp_dir(variant);
        model.save_adapter(&dir, "default").unwrap();
        let mut reloaded = base_model();
        reloaded.load_adapter(&dir, "default", 0).unwrap();
        assert_eq!(reloaded, model, "{variant}");
        // Same tensors as PEFT wrote, bit for bit.
        let original = read_f32s(&source.join("adapter_model.safetensors"));
        let saved = read_f32s(&dir.join("adapter_model.safetensors"));
        assert_eq!(original, saved, "{variant}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn injection_follows_target_rules_and_matches_an_adapter_set() {
    let mut model = base_model();
    let mut config = LoraConfig::new(2, 4.0, &["q_proj", "down_proj", "lm_head"]);
    config.exclude_modules = Some(lora_core::TargetModules::Names(vec![
        "model.layers.1.self_attn.q_proj".into(),
    ]));
    assert_eq!(model.inject_adapters(&config, "a", 11).unwrap(), 4);
    let adapted: Vec<String> = model
        .linear_modules_mut()
        .filter(|(_, lin)| lin.adapted().is_some())
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        adapted,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.mlp.down_proj",
            "lm_head"
        ]
    );
    // The same seed gives the same matrices as lora-core's adapter set on the same modules.
    let mut set = AdapterSet::new();
    let mut reference = base_model();
    for (path, lin) in reference.linear_modules_mut() {
        set.add_module(&path, lin.base_weight().unwrap().to_owned(), None)
            .unwrap();
    }
    set.add_adapter("a", config.clone(), 11).unwrap();
    for (path, lin) in model.linear_modules_mut() {
        if let Some(layer) = lin.adapted() {
            let ours = layer.adapter("a").unwrap();
            let theirs = set.layer(&path).unwrap().adapter("a").unwrap();
            assert_eq!(ours.a(), theirs.a(), "{path}");
            assert_eq!(ours.b(), theirs.b(), "{path}");
        }
    }
    // A second adapter of the same name, or targets the model lacks, are refused.
    let e = model.inject_adapters(&config, "a", 0).unwrap_err();
    assert!(e.to_string().contains("already has an adapter"), "{e}");
    let e = model
        .inject_adapters(&LoraConfig::new(2, 4.0, &["c_attn"]), "b", 0)
        .unwrap_err();
    assert!(e.to_string().contains("target_modules"), "{e}");
    // A rank too large for one module changes nothing.
    let before = model.clone();
    let e = model
        .inject_adapters(&LoraConfig::new(40, 4.0, &["k_proj"]), "c", 0)
        .unwrap_err();
    assert!(e.to_string().contains("k_proj"), "{e}");
    assert_eq!(model, before);
    assert_eq!(model.adapter_names(), ["a"]);
}

#[test]
fn load_errors_name_what_is_wrong() {
    let mut model = base_model();
    let e = model
        .load_adapter(data_dir().join("no_such_adapter"), "default", 0)
        .unwrap_err();
    assert!(e.to_string().contains("no_such_adapter"), "{e}");

    // A model with one layer has no place for layer 1's tensors.
    let config = LlamaConfig::from_file(data_dir().join("base/config.json")).unwrap();
    let mut one_layer = config.clone();
    one_layer.num_hidden_layers = 1;
    let mut small = LlamaModel::random(one_layer, 0).unwrap();
    let e = small
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap_err();
    assert!(e.to_string().contains("model.layers.1."), "{e}");
    assert!(!small.has_adapters());

    // A file missing one module's tensor.
    let dir = temp_dir("missing");
    std::fs::create_dir_all(&dir).unwrap();
    let source = data_dir().join("adapter_lora");
    std::fs::copy(
        source.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let tensors = read_f32s(&source.join("adapter_model.safetensors"));
    let dropped = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let kept: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() != dropped)
        .map(|(k, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), v.shape().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|(k, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let e = model.load_adapter(&dir, "default", 0).unwrap_err();
    assert!(e.to_string().contains(dropped), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(
        !model.has_adapters(),
        "a failed load leaves the model unchanged"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parameters_name_adapters_as_peft_and_only_active_ones_train() {
    let mut model = base_model();
    model
        .load_adapter(data_dir().join("adapter_dora"), "default", 0)
        .unwrap();
    let mut trainable = Vec::new();
    model
        .visit_trainable_parameters(|name, p| {
            trainable.push((name.to_string(), p.value.len()));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        trainable.len(),
        14 * 3,
        "A, B and m of 14 modules, nothing of the base"
    );
    assert_eq!(
        trainable[0].0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    );
    assert_eq!(
        trainable[2],
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
                .to_string(),
            32
        )
    );
    // An optimizer step through the visitor changes what the model computes.
    let (ids, _) = io_ids();
    let before = model.logits(ids.view(), None).unwrap();
    model
        .visit_trainable_parameters(|name, p| {
            if name.contains("lora_B") {
                p.value.iter_mut().for_each(|v| *v *= 2.0);
            }
            Ok(())
        })
        .unwrap();
    assert_ne!(model.logits(ids.view(), None).unwrap(), before);
    // Merged adapters cannot be visited; counting parameters still works.
    let count = model.num_parameters();
    model.merge_adapters().unwrap();
    let e = model.visit_parameters(|_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("merged"), "{e}");
    assert_eq!(model.num_parameters(), count);
}

#[test]
fn backward_must_follow_its_own_forward_with_adapters() {
    let mut model = base_model();
    model
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap();
    let (ids, labels) = io_ids();
    let pass = model.forward(ids.view(), None).unwrap();
    model.logits(ids.view(), None).unwrap();
    let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let e = model.backward(pass, ce.grad_logits.view()).unwrap_err();
    assert!(matches!(e, LmError::Backward { .. }), "{e}");
}

#[test]
fn memory_report_counts_base_adapters_and_gradients() {
    let config = LlamaConfig::new(64, 16, 32, 2, 4, 2).unwrap();
    let mut model = LlamaModel::random(config, 3).unwrap();
    let base = model.num_parameters();
    let report = model.memory_report();
    assert_eq!(report.base_parameters, base);
    assert_eq!(report.base_bytes_by_kind["f32"], 4 * base);
    assert_eq!(report.gradient_bytes, 0);

    let lora = LoraConfig::new(2, 4.0, &["q_proj", "up_proj"]);
    model.inject_adapters(&lora, "default", 0).unwrap();
    let report = model.memory_report();
    // q: (16, 16), up: (32, 16); r = 2 → A (2, 16) and B (out, 2) per module, two layers.
    let adapter = 2 * ((2 * 16 + 16 * 2) + (2 * 16 + 32 * 2));
    assert_eq!(report.adapter_parameters, adapter);
    assert_eq!(report.adapter_bytes, 4 * adapter);
    assert_eq!(report.gradient_bytes, 4 * adapter);
    assert_eq!(report.base_parameters, base);
    assert_eq!(report.bytes_per_base_parameter(), 4.0);
    assert_eq!(report.total_bytes(), 4 * base + 8 * adapter);

    // A trainable base adds its gradients.
    let mut dense = LlamaModel::random(LlamaConfig::new(64, 16, 32, 2, 4, 2).unwrap(), 3).unwrap();
    dense.set_base_trainable(true);
    assert_eq!(dense.memory_report().gradient_bytes, 4 * base);
}

#[test]
fn generation_runs_through_adapters() {
    let mut model = base_model();
    let plain = model
        .generate(&[1, 2, 3], 6, &lm::Sampling::Greedy, None)
        .unwrap();
    model
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap();
    let adapted = model
        .generate(&[1, 2, 3], 6, &lm::Sampling::Greedy, None)
        .unwrap();
    model.merge_adapters().unwrap();
    let merged = model
        .generate(&[1, 2, 3], 6, &lm::Sampling::Greedy, None)
        .unwrap();
    assert_eq!(adapted, merged);
    assert_eq!(adapted.len(), 6);
    assert_eq!(plain.len(), 6);
}

#[test]
fn dropout_only_in_training_forward() {
    let mut model = base_model();
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "up_proj"]);
    config.lora_dropout = 0.5;
    config.init_lora_weights = lora_core::InitLoraWeights::Random;
    model.inject_adapters(&config, "default", 5).unwrap();
    let (ids, _) = io_ids();
    let eval = model.logits(ids.view(), None).unwrap();
    assert_eq!(model.logits(ids.view(), None).unwrap(), eval);
    assert!(model.is_training());
    let train = model.forward(ids.view(), None).unwrap().into_logits();
    assert_ne!(train, eval, "training forward draws dropout masks");
    model.set_training(false);
    assert_eq!(model.forward(ids.view(), None).unwrap().into_logits(), eval);
}

#[test]
fn a_second_adapter_waits_until_activated() {
    let mut model = base_model();
    let mut config = LoraConfig::new(2, 4.0, &["q_proj"]);
    config.init_lora_weights = lora_core::InitLoraWeights::Random;
    model.inject_adapters(&config, "a", 1).unwrap();
    let (ids, _) = io_ids();
    let with_a = model.logits(ids.view(), None).unwrap();
    let mut second = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    second.init_lora_weights = lora_core::InitLoraWeights::Random;
    model.inject_adapters(&second, "b", 2).unwrap();
    assert_eq!(model.active_adapters(), ["a"]);
    // v_proj holds only "b", which is not active: the model still computes with "a" alone.
    assert_eq!(model.logits(ids.view(), None).unwrap(), with_a);
    let v = model
        .linear_module_mut("model.layers.0.self_attn.v_proj")
        .unwrap();
    assert!(v.adapted().unwrap().active().is_empty());
    model.set_active_adapters(&["b"]).unwrap();
    assert_ne!(model.logits(ids.view(), None).unwrap(), with_a);
    let e = model.set_active_adapters(&["c"]).unwrap_err();
    assert!(e.to_string().contains("\"c\""), "{e}");
    // Only the active adapter's tensors train.
    let mut names = Vec::new();
    model
        .visit_trainable_parameters(|name, _| {
            names.push(name.to_string());
            Ok(())
        })
        .unwrap();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert!(names.iter().all(|n| n.contains(".b.weight")), "{names:?}");
}

#[test]
fn a_merged_model_saves_as_a_plain_checkpoint() {
    let io = read_f32s(&data_dir().join("io.safetensors"));
    let (ids, _) = io_ids();
    let mut model = base_model();
    model
        .load_adapter(data_dir().join("adapter_rslora"), "default", 0)
        .unwrap();
    model.merge_adapters().unwrap();
    let dir = temp_dir("merged");
    model.save_pretrained(&dir).unwrap();
    let mut plain = LlamaModel::from_pretrained(&dir).unwrap();
    assert!(!plain.has_adapters());
    let logits = plain.logits(ids.view(), None).unwrap();
    let diff = max_abs_diff(&logits, &io["rslora_merged_logits"]);
    assert!(diff <= 1e-4, "merged checkpoint logits differ by {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Times a training step (forward, loss, backward) of the frozen base alone and with LoRA
/// r=16 on every projection, at the `lora-qat bench train` size with batch 1. Run with
/// `cargo test --release -p lm --test adapters -- --ignored --nocapture`.
#[test]
#[ignore = "timing report, not a check"]
fn lora_step_overhead_against_the_frozen_base() {
    use rand::{Rng, SeedableRng};
    let config = LlamaConfig::new(4096, 512, 1408, 8, 8, 8).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let ids = Array2::from_shape_simple_fn((1, 256), || rng.random_range(0..4096u32));
    let labels = ids.mapv(i64::from);
    let time_steps = |model: &mut LlamaModel| {
        model
            .loss_and_backward(ids.view(), labels.view(), None)
            .unwrap();
        let mut times: Vec<f64> = (0..3)
            .map(|_| {
                let start = std::time::Instant::now();
                model.zero_grad();
                model
                    .loss_and_backward(ids.view(), labels.view(), None)
                    .unwrap();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[1]
    };
    let mut model = LlamaModel::random(config, 0).unwrap();
    let base_ms = time_steps(&mut model);
    let targets = common::PROJECTIONS;
    model
        .inject_adapters(&LoraConfig::new(16, 32.0, &targets), "default", 0)
        .unwrap();
    let lora_ms = time_steps(&mut model);
    eprintln!(
        "step of 256 tokens: frozen base {base_ms:.1} ms, LoRA r=16 {lora_ms:.1} ms ({:+.1}%)",
        100.0 * (lora_ms / base_ms - 1.0)
    );
}
