//! Every adapter kind on every model family (`tests/data/arch/<family>`):
//!
//! * rsLoRA and DoRA adapters made by PEFT (`adapter_rslora/`, `adapter_dora/`, reference
//!   logits and loss in `adapters_io.safetensors`, gradients in `grads.safetensors`; made by
//!   `tools/interop/make_family_adapters.py`): logits 1e-4 absolute, loss 1e-5, every adapter
//!   gradient 1e-3 relative; saved and loaded back equal.
//! * QLoRA: the projections quantized to NF4, adapters injected by PEFT's `target_modules`
//!   rules: forward and backward equal LoRA over the dequantized NF4 weights; saved and loaded
//!   back equal.
//! * LoRA-QAT injected by the same rules: forward, backward (adapter and step gradients
//!   finite, steps trained), saved and loaded back equal.
//! * Central finite differences of adapter gradients (DoRA and QLoRA) on Gemma 2, the family
//!   with the most options in play (soft caps, sandwich norms, `1 + w` norms, windows).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{arch_batch, arch_dir, read_f32s, relative};
use lm::{cross_entropy, LinearModule, LlamaModel};
use lora_core::{FrozenBase, InitLoraWeights, LoraConfig, Nf4Options, QatMode};
use ndarray::{Array2, ArrayD};
use quant_core::config::QatConfig;

const FAMILIES: [&str; 7] = [
    "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
];

fn dir(family: &str) -> PathBuf {
    arch_dir(family)
}

fn base(family: &str) -> LlamaModel {
    LlamaModel::from_pretrained(dir(family).join("base")).unwrap()
}

fn batch(family: &str) -> (Array2<u32>, Array2<i64>) {
    arch_batch(family)
}

/// PEFT's `target_modules` of the family: every projection it has (Phi-3's are fused).
fn targets(family: &str) -> Vec<&'static str> {
    if family == "phi3" {
        vec!["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    } else {
        common::PROJECTIONS.to_vec()
    }
}

fn max_abs(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    common::max_abs(a.view(), b.view())
}

fn temp_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lm-family-adapters-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Logits, loss and adapter gradients of `model` on the family's batch.
fn run(
    model: &mut LlamaModel,
    family: &str,
    name: &str,
) -> (ArrayD<f32>, f32, BTreeMap<String, ArrayD<f32>>) {
    let (ids, labels) = batch(family);
    model.zero_grad();
    let pass = model.forward(ids.view(), None).unwrap();
    let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let logits = pass.logits().clone().into_dyn();
    model.backward(pass, ce.grad_logits.view()).unwrap();
    let grads = model.adapter_gradients(name).unwrap().into_iter().collect();
    (logits, ce.loss, grads)
}

/// A PEFT adapter (`adapter_<variant>`) against PEFT's logits, loss and gradients, then saved
/// and loaded back equal.
fn check_peft_variant(family: &str, variant: &str) {
    let io = read_f32s(&dir(family).join("adapters_io.safetensors"));
    let adapter = dir(family).join(format!("adapter_{variant}"));
    let mut model = base(family);
    let count = model.load_adapter(&adapter, variant, 0).unwrap();
    assert_eq!(count, 2 * targets(family).len(), "{family} {variant}");
    let (logits, loss, grads) = run(&mut model, family, variant);
    let logits_err = max_abs(&logits, &io[&format!("{variant}_logits")]);
    let loss_err = (loss - io[&format!("{variant}_loss")][[0]]).abs();
    let reference = read_f32s(&adapter.join("grads.safetensors"));
    assert_eq!(
        grads.len(),
        reference.len(),
        "{family} {variant}: gradient count"
    );
    let mut worst = 0.0f32;
    for (key, grad) in &grads {
        // PEFT's gradient file names the magnitude as its in-memory parameter does.
        let peft_key = if key.ends_with("lora_magnitude_vector") {
            format!("{key}.weight")
        } else {
            key.clone()
        };
        let expected = reference
            .get(&peft_key)
            .unwrap_or_else(|| panic!("{family} {variant}: no reference gradient {peft_key}"));
        worst = worst.max(relative(grad, expected));
    }
    eprintln!(
        "{family} {variant}: logits {logits_err:e}, loss {loss_err:e}, worst gradient {worst:e}"
    );
    assert!(
        logits_err <= 1e-4,
        "{family} {variant}: logits {logits_err}"
    );
    assert!(loss_err <= 1e-5, "{family} {variant}: loss {loss_err}");
    assert!(worst <= 1e-3, "{family} {variant}: gradient {worst}");

    let saved = temp_dir(&format!("{family}-{variant}"));
    model.save_adapter(&saved, variant).unwrap();
    let mut reloaded = base(family);
    reloaded.load_adapter(&saved, variant, 0).unwrap();
    assert_eq!(
        reloaded.adapter_config(variant).unwrap().use_dora,
        variant == "dora"
    );
    assert_eq!(
        reloaded.adapter_config(variant).unwrap().use_rslora,
        variant == "rslora"
    );
    let (again, _, _) = run(&mut reloaded, family, variant);
    assert_eq!(again, logits, "{family} {variant}: reloaded adapter");
    std::fs::remove_dir_all(&saved).unwrap();
}

#[test]
fn rslora_matches_peft_on_every_family() {
    for family in FAMILIES {
        check_peft_variant(family, "rslora");
    }
}

#[test]
fn dora_matches_peft_on_every_family() {
    for family in FAMILIES {
        check_peft_variant(family, "dora");
    }
}

fn random_lora(family: &str) -> LoraConfig {
    let mut config = LoraConfig::new(4, 8.0, &targets(family));
    config.init_lora_weights = InitLoraWeights::Random;
    config
}

/// QLoRA over NF4 projections computes what LoRA over the dequantized NF4 weights computes,
/// and its adapter saves and loads back equal.
#[test]
fn qlora_on_every_family_equals_lora_over_the_dequantized_base() {
    for family in FAMILIES {
        let mut qlora = base(family);
        let quantized = qlora.quantize_linears_nf4(&Nf4Options::default()).unwrap();
        assert_eq!(quantized, 2 * targets(family).len(), "{family}");
        let mut twin = qlora.clone();
        for (path, lin) in twin.linear_modules_mut() {
            if let Some(base) = lin.base().filter(|b| b.kind() == "NF4") {
                let w = base.dense_weight().unwrap().into_owned();
                let bias = base.bias().map(|b| b.to_owned());
                *lin = LinearModule::dense(w, bias);
            } else {
                assert_eq!(path, "lm_head", "{family}: {path} not NF4");
            }
        }
        let config = random_lora(family);
        for model in [&mut qlora, &mut twin] {
            let n = model.inject_adapters(&config, "default", 9).unwrap();
            assert_eq!(n, 2 * targets(family).len(), "{family}");
        }
        assert!(qlora
            .linear_modules_mut()
            .filter(|(p, _)| p != "lm_head")
            .all(|(_, l)| l.kind() == "QLoRA"));
        let (la, loss_a, ga) = run(&mut qlora, family, "default");
        let (lb, loss_b, gb) = run(&mut twin, family, "default");
        let logits = max_abs(&la, &lb);
        let mut worst = 0.0f32;
        for (key, g) in &ga {
            assert!(g.iter().all(|v| v.is_finite()), "{family}: {key}");
            worst = worst.max(relative(g, &gb[key]));
        }
        eprintln!("{family} QLoRA vs dequantized LoRA: logits {logits:e}, gradients {worst:e}");
        assert!(logits <= 1e-4, "{family}: {logits}");
        assert!((loss_a - loss_b).abs() <= 1e-5, "{family}");
        assert!(worst <= 1e-3, "{family}: {worst}");
        assert!(ga.values().any(|g| g.iter().any(|&v| v != 0.0)));

        let saved = temp_dir(&format!("{family}-qlora"));
        qlora.save_adapter(&saved, "default").unwrap();
        let mut reloaded = base(family);
        reloaded
            .quantize_linears_nf4(&Nf4Options::default())
            .unwrap();
        reloaded.load_adapter(&saved, "default", 0).unwrap();
        let (again, _, _) = run(&mut reloaded, family, "default");
        assert_eq!(again, la, "{family}: reloaded QLoRA adapter");
        std::fs::remove_dir_all(&saved).unwrap();
    }
}

/// LoRA-QAT injected by the family's targets trains (finite, non-zero adapter and step
/// gradients) and saves and loads back equal, quantizer steps included.
#[test]
fn lora_qat_on_every_family_trains_and_round_trips() {
    for family in FAMILIES {
        let mut model = base(family);
        let config = random_lora(family);
        let n = model
            .inject_qat_adapters(
                &config,
                &QatConfig::piq3(),
                QatMode::QuantizeMerged,
                "qat",
                4,
            )
            .unwrap();
        assert_eq!(n, 2 * targets(family).len(), "{family}");
        let (logits, loss, grads) = run(&mut model, family, "qat");
        assert!(loss.is_finite() && logits.iter().all(|v| v.is_finite()));
        assert!(grads.values().all(|g| g.iter().all(|v| v.is_finite())));
        assert!(
            grads.values().any(|g| g.iter().any(|&v| v != 0.0)),
            "{family}"
        );
        let steps = model.quantizer_gradients("qat").unwrap();
        assert_eq!(steps.len(), n);
        assert!(steps.iter().all(|(_, g)| g.iter().all(|v| v.is_finite())));
        assert!(
            steps.iter().any(|(_, g)| g.iter().any(|&v| v != 0.0)),
            "{family}"
        );

        let saved = temp_dir(&format!("{family}-qat"));
        model.save_qat_adapter(&saved, "qat").unwrap();
        let mut reloaded = base(family);
        assert_eq!(reloaded.load_qat_adapter(&saved, "qat").unwrap(), n);
        assert_eq!(reloaded, model, "{family}: reloaded LoRA-QAT model");
        let (again, _, _) = run(&mut reloaded, family, "qat");
        assert_eq!(again, logits, "{family}: reloaded LoRA-QAT logits");
        std::fs::remove_dir_all(&saved).unwrap();
    }
}

const EPS: f32 = 1e-2;

/// Sets element `index` of trainable parameter `name`; returns the old value.
fn set(model: &mut LlamaModel, name: &str, index: usize, value: f32) -> f32 {
    let mut old = f32::NAN;
    model
        .visit_trainable_parameters(|n, p| {
            if n == name {
                old = std::mem::replace(&mut p.value[index], value);
            }
            Ok(())
        })
        .unwrap();
    old
}

/// The largest-gradient element and one more of every adapter tensor `keep` selects, against
/// central differences of the loss.
fn finite_difference_check(
    model: &mut LlamaModel,
    family: &str,
    name: &str,
    keep: impl Fn(&str) -> bool,
) -> usize {
    let (ids, labels) = batch(family);
    model.set_training(false);
    run(model, family, name);
    // By in-memory name (`...lora_A.<adapter>.weight`), the names `set` addresses.
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    model
        .visit_trainable_parameters(|n, p| {
            grads.push((n.to_string(), p.grad.expect("trainable").to_vec()));
            Ok(())
        })
        .unwrap();
    let mut checked = 0;
    for (key, flat) in grads.iter().filter(|(k, _)| keep(k)) {
        let largest = (0..flat.len())
            .max_by(|&a, &b| flat[a].abs().total_cmp(&flat[b].abs()))
            .unwrap();
        for i in [largest, (checked * 7919 + 13) % flat.len()] {
            let mut central = |h: f32| -> f64 {
                let orig = set(model, key, i, 0.0);
                set(model, key, i, orig + h);
                let plus = model.loss(ids.view(), labels.view(), None).unwrap() as f64;
                set(model, key, i, orig - h);
                let minus = model.loss(ids.view(), labels.view(), None).unwrap() as f64;
                set(model, key, i, orig);
                (plus - minus) / (2.0 * h as f64)
            };
            // Richardson's extrapolation of two central differences cancels their h² error.
            let (coarse, fine) = (central(EPS), central(EPS / 2.0));
            let numeric = (4.0 * fine - coarse) / 3.0;
            let analytic = flat[i] as f64;
            assert!(
                (numeric - analytic).abs() <= 1e-3 + 3e-2 * analytic.abs(),
                "{family} {name}: {key}[{i}] analytic {analytic}, numeric {numeric}"
            );
            checked += 1;
        }
    }
    checked
}

/// DoRA's `A` and `B` gradients hold the row norm `‖W + s·B·A‖` constant, as PEFT's do
/// (checked against PEFT above), so they are not the loss's derivative; its magnitude
/// gradient is, and so is every gradient of rsLoRA and of QLoRA: those are checked against
/// finite differences.
#[test]
fn adapter_gradients_match_finite_differences_on_gemma2() {
    let family = "gemma2";
    let mut dora = base(family);
    dora.load_adapter(dir(family).join("adapter_dora"), "dora", 0)
        .unwrap();
    let magnitude = |k: &str| k.contains("lora_magnitude_vector");
    // The magnitudes of 14 projections, two elements each.
    assert_eq!(
        finite_difference_check(&mut dora, family, "dora", magnitude),
        14 * 2
    );

    // Freshly initialised adapters: the reference ones' B is scaled up to move the logits,
    // which curves the loss too much within a finite-difference step.
    let mut rslora = base(family);
    let mut config = LoraConfig::new(8, 16.0, &targets(family));
    config.init_lora_weights = InitLoraWeights::Random;
    config.use_rslora = true;
    rslora.inject_adapters(&config, "rslora", 6).unwrap();
    assert_eq!(
        finite_difference_check(&mut rslora, family, "rslora", |_| true),
        14 * 2 * 2
    );

    let mut qlora = base(family);
    qlora.quantize_linears_nf4(&Nf4Options::default()).unwrap();
    qlora
        .inject_adapters(&random_lora(family), "default", 2)
        .unwrap();
    assert_eq!(
        finite_difference_check(&mut qlora, family, "default", |_| true),
        14 * 2 * 2
    );
}
