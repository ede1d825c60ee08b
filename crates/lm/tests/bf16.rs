//! `--compute-dtype bf16` (bf16 operands, f32 sums, f32 master weights): against PyTorch's CPU
//! autocast on the tiny reference Llama with PEFT's LoRA (`tests/data/llama/
//! bf16_autocast.safetensors`, made by `tools/interop/make_bf16_autocast.py`), against our own
//! f32 path over every base (dense, NF4, ggml, LoRA-QAT, tied head), and the same on the
//! portable kernel (the test binary re-runs itself with `LORA_QAT_BF16_KERNEL=portable`).
//!
//! Tolerances. Against the torch emulation of exactly our arithmetic (every product's
//! operands rounded to bf16, sums and outputs f32, forward and backward) only the f32
//! summation order differs: logits and loss within 1e-5, gradients within 1e-4 relative
//! (seen: 3e-8 and 4e-8). Against autocast and against our f32 path the bf16 roundings
//! themselves count; on this model PyTorch's own autocast moves the logits (|logit| ≤ 0.4) by
//! 5.4e-3 and the adapter gradients by up to 4.0e-2 (relative Frobenius error per tensor)
//! from its f32 result, and ours moves them by 1.1e-2 and 5.6e-2 (autocast also rounds every
//! product's output to bf16, we keep outputs f32, so the two bf16 results differ from each
//! other by about as much as each from f32). The bf16-level tolerances are therefore 2e-2 on
//! logits, 2e-3 on the loss and 1e-1 on gradients, about twice what either side moves.

mod common;

use common::{data_dir, io_ids, read_f32s};

use lm::{cross_entropy, LinearModule, LlamaConfig, LlamaModel};
use lora_core::{FrozenBase, GgmlBase, InitLoraWeights, LoraConfig, QatMode};
use ndarray::ArrayD;
use quant_core::config::QatConfig;
use quant_core::ggml::GgmlType;
use quant_core::linalg::{Bf16Kernel, ComputeDtype, BF16_KERNEL_ENV};

/// Against the torch emulation of our arithmetic (see the module docs).
const EMULATED_LOGITS_TOL: f32 = 1e-5;
const EMULATED_LOSS_TOL: f32 = 1e-5;
const EMULATED_GRAD_TOL: f32 = 1e-4;
/// Largest |logit| difference against autocast, and of bf16 against f32.
const AUTOCAST_LOGITS_TOL: f32 = 2e-2;
/// |loss − autocast loss|.
const AUTOCAST_LOSS_TOL: f32 = 2e-3;
/// Relative Frobenius error of each adapter gradient against autocast's, and bf16 against f32.
const AUTOCAST_GRAD_TOL: f32 = 1e-1;

fn max_abs(a: impl IntoIterator<Item = f32>, b: impl IntoIterator<Item = f32>) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits, loss and adapter gradients of one step of `model` on the reference batch.
struct Step {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<(String, ArrayD<f32>)>,
}

fn step(model: &mut LlamaModel, adapter: &str) -> Step {
    let (ids, labels) = io_ids();
    model.zero_grad();
    let pass = model.forward(ids.view(), None).unwrap();
    let logits = pass.logits().iter().copied().collect();
    let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
    model.backward(pass, ce.grad_logits.view()).unwrap();
    Step {
        logits,
        loss: ce.loss,
        grads: model.adapter_gradients(adapter).unwrap(),
    }
}

/// Under `LORA_QAT_BF16_KERNEL` (the portable re-run) the products run on the kernel it names.
fn check_selected_kernel() {
    if let Ok(name) = std::env::var(BF16_KERNEL_ENV) {
        assert_eq!(Bf16Kernel::selected().unwrap().name(), name);
    }
}

#[test]
fn bf16_logits_and_lora_gradients_match_pytorch_autocast() {
    check_selected_kernel();
    let reference = read_f32s(&data_dir().join("bf16_autocast.safetensors"));
    let io = read_f32s(&data_dir().join("io.safetensors"));
    let mut model = LlamaModel::from_pretrained(data_dir().join("base")).unwrap();
    model
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap();
    let f32_step = step(&mut model, "default");
    model.set_compute_dtype(ComputeDtype::Bf16);
    assert_eq!(model.compute_dtype(), ComputeDtype::Bf16);
    let bf16_step = step(&mut model, "default");

    let logits_vs_autocast = max_abs(
        bf16_step.logits.iter().copied(),
        reference["logits"].iter().copied(),
    );
    let f32_vs_autocast = max_abs(
        f32_step.logits.iter().copied(),
        reference["logits"].iter().copied(),
    );
    let f32_vs_peft = max_abs(
        f32_step.logits.iter().copied(),
        io["lora_logits"].iter().copied(),
    );
    let loss_vs_autocast = (bf16_step.loss - reference["loss"][[0]]).abs();
    eprintln!(
        "max |logits − autocast|: bf16 {logits_vs_autocast:.3e}, f32 {f32_vs_autocast:.3e} \
         (f32 vs PEFT f32 {f32_vs_peft:.3e}); |loss − autocast| {loss_vs_autocast:.3e}"
    );
    assert!(f32_vs_peft <= 1e-4, "the f32 path moved: {f32_vs_peft}");
    assert!(
        logits_vs_autocast <= AUTOCAST_LOGITS_TOL,
        "bf16 logits differ from autocast by {logits_vs_autocast}"
    );
    assert!(
        loss_vs_autocast <= AUTOCAST_LOSS_TOL,
        "bf16 loss {} vs autocast {}",
        bf16_step.loss,
        reference["loss"][[0]]
    );
    // The bf16 path is taken: its logits are not the f32 ones.
    assert!(max_abs(bf16_step.logits.clone(), f32_step.logits.clone()) > 0.0);

    // The bf16 arithmetic itself, rebuilt in torch (bf16-rounded operands of every product,
    // forward and backward, f32 sums): only the summation order differs from ours.
    let logits_vs_emulated = max_abs(
        bf16_step.logits.iter().copied(),
        reference["emulated_logits"].iter().copied(),
    );
    let loss_vs_emulated = (bf16_step.loss - reference["emulated_loss"][[0]]).abs();
    let grads_vs_emulated = bf16_step
        .grads
        .iter()
        .map(|(key, grad)| common::relative(grad, &reference[&format!("emulated_grad.{key}")]))
        .fold(0.0, f32::max);
    eprintln!(
        "against the torch emulation of bf16 operands + f32 sums: max |logits| {logits_vs_emulated:.3e}, \
         |loss| {loss_vs_emulated:.3e}, worst relative gradient {grads_vs_emulated:.3e}"
    );
    assert!(
        logits_vs_emulated <= EMULATED_LOGITS_TOL,
        "{logits_vs_emulated}"
    );
    assert!(loss_vs_emulated <= EMULATED_LOSS_TOL, "{loss_vs_emulated}");
    assert!(
        grads_vs_emulated <= EMULATED_GRAD_TOL,
        "{grads_vs_emulated}"
    );

    assert_eq!(bf16_step.grads.len(), 28);
    let (mut worst, mut worst_f32) = (0.0f32, 0.0f32);
    for ((key, grad), (_, grad_f32)) in bf16_step.grads.iter().zip(&f32_step.grads) {
        let expected = &reference[&format!("grad.{key}")];
        let relative = common::relative(grad, expected);
        worst = worst.max(relative);
        worst_f32 = worst_f32.max(common::relative(grad_f32, expected));
        assert!(
            relative <= AUTOCAST_GRAD_TOL,
            "{key}: relative error against autocast {relative}"
        );
    }
    eprintln!(
        "worst relative adapter-gradient error against autocast: bf16 {worst:.3e}, \
         f32 {worst_f32:.3e}"
    );
}

/// bf16 against f32 on one model: largest logit difference and worst relative gradient error.
fn bf16_against_f32(mut model: LlamaModel, adapter: &str) -> (f32, f32) {
    let f32_step = step(&mut model, adapter);
    model.set_compute_dtype(ComputeDtype::Bf16);
    let bf16_step = step(&mut model, adapter);
    let logits = max_abs(bf16_step.logits, f32_step.logits);
    let loss = (bf16_step.loss - f32_step.loss).abs();
    let grads = bf16_step
        .grads
        .iter()
        .zip(&f32_step.grads)
        .map(|((k, a), (k2, b))| {
            assert_eq!(k, k2);
            common::relative(a, b)
        })
        .fold(0.0, f32::max);
    assert!(loss <= AUTOCAST_LOSS_TOL, "loss moved by {loss}");
    (logits, grads)
}

fn lora(r: usize) -> LoraConfig {
    let mut config = LoraConfig::new(r, 2.0 * r as f64, &common::PROJECTIONS);
    config.init_lora_weights = InitLoraWeights::Random;
    config
}

#[test]
fn bf16_stays_within_bf16_tolerance_of_f32_over_every_base() {
    check_selected_kernel();
    let base = || LlamaModel::from_pretrained(data_dir().join("base")).unwrap();
    let mut cases: Vec<(&str, LlamaModel, &str)> = Vec::new();

    let mut dense = base();
    dense
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap();
    cases.push(("LoRA over f32", dense, "default"));

    let mut nf4 = LlamaModel::from_pretrained(data_dir().join("base_bnb4")).unwrap();
    nf4.load_adapter(data_dir().join("adapter_qlora"), "default", 0)
        .unwrap();
    cases.push(("QLoRA over NF4", nf4, "default"));

    let mut ggml = base();
    for (path, module) in ggml.linear_modules_mut() {
        let w = module.base_weight().unwrap().to_owned();
        let bias = module.base_bias().map(|b| b.to_owned());
        *module =
            LinearModule::ggml(GgmlBase::quantize(w.view(), bias, GgmlType::Q8_0, &path).unwrap());
    }
    ggml.inject_adapters(&lora(4), "default", 3).unwrap();
    cases.push(("LoRA over ggml Q8_0", ggml, "default"));

    let mut qat = base();
    qat.inject_qat_adapters(
        &lora(4),
        &QatConfig::piq3(),
        QatMode::QuantizeMerged,
        "qat",
        5,
    )
    .unwrap();
    cases.push(("LoRA-QAT (pi 3-bit, merged)", qat, "qat"));

    // Tied embeddings: the head's product is the model's own, not a module's.
    let mut config = LlamaConfig::new(64, 32, 64, 2, 4, 2).unwrap();
    config.tie_word_embeddings = true;
    let mut tied = LlamaModel::random(config, 11).unwrap();
    tied.inject_adapters(&lora(4), "default", 7).unwrap();
    cases.push(("LoRA, tied head", tied, "default"));

    for (what, model, adapter) in cases {
        let (logits, grads) = bf16_against_f32(model, adapter);
        eprintln!(
            "{what}: max |logits bf16 − f32| {logits:.3e}, worst relative gradient {grads:.3e}"
        );
        assert!(logits > 0.0, "{what}: the bf16 path was not taken");
        assert!(
            logits <= AUTOCAST_LOGITS_TOL,
            "{what}: logits moved by {logits}"
        );
        assert!(
            grads <= AUTOCAST_GRAD_TOL,
            "{what}: gradients moved by {grads}"
        );
    }
}

#[test]
fn every_module_follows_the_model_dtype_including_later_adapters() {
    let mut model = LlamaModel::from_pretrained(data_dir().join("base")).unwrap();
    model.set_compute_dtype(ComputeDtype::Bf16);
    for (path, module) in model.linear_modules_mut() {
        assert_eq!(module.compute_dtype(), ComputeDtype::Bf16, "{path}");
    }
    // Adapters injected after the switch compute in bf16 from the next pass on.
    model.inject_adapters(&lora(2), "late", 0).unwrap();
    let (ids, _) = io_ids();
    model.logits(ids.view(), None).unwrap();
    for (path, module) in model.linear_modules_mut() {
        assert_eq!(module.compute_dtype(), ComputeDtype::Bf16, "{path}");
        if path == "lm_head" {
            continue; // not a target
        }
        let layer = module.adapted().unwrap();
        assert_eq!(
            layer.adapter("late").unwrap().compute_dtype(),
            ComputeDtype::Bf16,
            "{path}"
        );
    }
    model.set_compute_dtype(ComputeDtype::F32);
    for (path, module) in model.linear_modules_mut() {
        assert_eq!(module.compute_dtype(), ComputeDtype::F32, "{path}");
    }
    let base = model
        .linear_module_mut("model.layers.0.mlp.up_proj")
        .unwrap();
    assert_eq!(base.base().unwrap().compute_dtype(), ComputeDtype::F32);
}

/// The two tests above again on the portable kernel (rounded copies, then the f32 kernel), in a
/// child process of this test binary: the kernel choice is read once per process.
#[test]
fn portable_kernel_gives_the_same_agreement() {
    if std::env::var(BF16_KERNEL_ENV).is_ok() {
        return; // the child itself
    }
    let exe = std::env::current_exe().unwrap();
    for test in [
        "bf16_logits_and_lora_gradients_match_pytorch_autocast",
        "bf16_stays_within_bf16_tolerance_of_f32_over_every_base",
    ] {
        let out = std::process::Command::new(&exe)
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(BF16_KERNEL_ENV, Bf16Kernel::Portable.name())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("portable kernel, {test}:\n{stderr}");
        assert!(
            out.status.success(),
            "{test} on the portable kernel failed:\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("1 passed"), "{test} did not run:\n{stdout}");
    }
}
