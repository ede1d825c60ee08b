//! Gradient checkpointing (issue 14) gives bit for bit the gradients of the stored-activation
//! path, for every adapter kind (LoRA, rsLoRA, DoRA, QLoRA, LoRA over ggml blocks, LoRA-QAT in
//! both modes and on the uniform, NF4 and ggml grids), full fine-tuning, adapter dropout
//! (the recomputation must draw the forward's masks, over several steps), padding masks,
//! packed segments and extra hidden-state gradients.

mod common;

use lm::{LinearModule, LlamaConfig, LlamaModel};
use lora_core::{GgmlBase, LoraConfig, Nf4Options, QatMode};
use ndarray::{array, Array2};
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::ggml::GgmlType;
use quant_core::uniform::Granularity;

use common::PROJECTIONS as TARGETS;

/// A tiny GQA model whose widths divide into NF4 and ggml blocks (32, 64).
fn tiny_model(tied: bool) -> LlamaModel {
    let mut config = LlamaConfig::new(40, 32, 64, 2, 4, 2).unwrap();
    config.tie_word_embeddings = tied;
    config.initializer_range = 0.3;
    config.max_position_embeddings = 16;
    LlamaModel::random(config, 3).unwrap()
}

fn lora(dropout: f64) -> LoraConfig {
    let mut c = LoraConfig::new(4, 8.0, &TARGETS);
    c.lora_dropout = dropout;
    c.init_lora_weights = lora_core::InitLoraWeights::Random;
    c
}

fn batch() -> (Array2<u32>, Array2<i64>) {
    let ids = array![[1u32, 4, 7, 2, 9, 11, 30, 5], [3, 5, 0, 13, 6, 8, 39, 21]];
    let labels = ids.mapv(i64::from);
    (ids, labels)
}

/// Every trainable gradient (in visiting order) after one `step` from zeroed gradients.
fn grads_after(
    model: &mut LlamaModel,
    step: &dyn Fn(&mut LlamaModel) -> f32,
) -> (f32, Vec<(String, Vec<f32>)>) {
    model.zero_grad();
    let loss = step(model);
    let mut grads = Vec::new();
    model
        .visit_trainable_parameters(|name, p| {
            grads.push((name.to_string(), p.grad.unwrap().to_vec()));
            Ok(())
        })
        .unwrap();
    (loss, grads)
}

/// Runs `steps` training steps on a copy with checkpointing and on one without, and asserts
/// loss and every gradient equal bit for bit at each step.
fn assert_same_gradients(
    model: LlamaModel,
    steps: usize,
    step: &dyn Fn(&mut LlamaModel) -> f32,
    what: &str,
) {
    let mut stored = model.clone();
    let mut checkpointed = model;
    checkpointed.set_gradient_checkpointing(true);
    for s in 0..steps {
        let (loss_a, a) = grads_after(&mut stored, step);
        let (loss_b, b) = grads_after(&mut checkpointed, step);
        assert_eq!(
            loss_a.to_bits(),
            loss_b.to_bits(),
            "{what}: loss at step {s}"
        );
        assert!(!a.is_empty(), "{what}: nothing trains");
        assert_eq!(a.len(), b.len(), "{what}");
        for ((name, ga), (_, gb)) in a.iter().zip(&b) {
            assert!(
                ga.iter().zip(gb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: gradient of {name} differs at step {s}"
            );
            assert!(
                ga.iter().any(|&g| g != 0.0) || name.contains("lora_B"),
                "{what}: {name} has no gradient"
            );
        }
    }
}

fn plain_step(model: &mut LlamaModel) -> f32 {
    let (ids, labels) = batch();
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap()
}

#[test]
fn full_fine_tuning_tied_and_untied() {
    for tied in [true, false] {
        let mut model = tiny_model(tied);
        model.set_base_trainable(true);
        assert_same_gradients(model, 1, &plain_step, &format!("full, tied {tied}"));
    }
}

#[test]
fn lora_rslora_dora_with_dropout_over_steps() {
    for (rs, dora) in [(false, false), (true, false), (false, true)] {
        let mut config = lora(0.25);
        config.use_rslora = rs;
        config.use_dora = dora;
        let mut model = tiny_model(false);
        model.inject_adapters(&config, "default", 7).unwrap();
        // Several steps: the RNG must also stand where it would after each step.
        assert_same_gradients(
            model,
            3,
            &plain_step,
            &format!("LoRA rslora {rs} dora {dora}"),
        );
    }
}

#[test]
fn qlora_and_lora_over_ggml_blocks() {
    let mut model = tiny_model(true);
    model.quantize_linears_nf4(&Nf4Options::default()).unwrap();
    model.inject_adapters(&lora(0.1), "default", 1).unwrap();
    assert_same_gradients(model, 2, &plain_step, "QLoRA");

    let mut model = tiny_model(true);
    let paths: Vec<String> = model.linear_modules_mut().map(|(p, _)| p).collect();
    for path in paths {
        let lin = model.linear_module_mut(&path).unwrap();
        let w = lin.base_weight().unwrap().to_owned();
        *lin =
            LinearModule::ggml(GgmlBase::quantize(w.view(), None, GgmlType::Q4_0, &path).unwrap());
    }
    model.inject_adapters(&lora(0.1), "default", 1).unwrap();
    assert_same_gradients(model, 2, &plain_step, "LoRA over q4_0 blocks");
}

#[test]
fn lora_qat_both_modes_every_grid_kind() {
    let nf4 = QatConfig {
        quantizer: QuantizerKind::Nf4,
        bits: 4,
        pi_k: None,
        granularity: Granularity::PerBlock { size: 32 },
        ..QatConfig::piq3()
    };
    let grids = [
        ("piq3", QatConfig::piq3()),
        ("nf4", nf4),
        ("q4_0", QatConfig::ggml(GgmlType::Q4_0).unwrap()),
    ];
    for (name, qat) in grids {
        for mode in [QatMode::QuantizeMerged, QatMode::FrozenQuantizedBase] {
            // The merged mode has no separate input to drop; the frozen-base mode draws.
            let dropout = if mode == QatMode::QuantizeMerged {
                0.0
            } else {
                0.2
            };
            let mut model = tiny_model(false);
            model
                .inject_qat_adapters(&lora(dropout), &qat, mode, "qat", 5)
                .unwrap();
            assert_same_gradients(model, 2, &plain_step, &format!("LoRA-QAT {name} {mode:?}"));
        }
    }
}

#[test]
fn padding_mask_segments_and_hidden_gradients() {
    let mut model = tiny_model(false);
    model.inject_adapters(&lora(0.1), "default", 2).unwrap();
    let masked = |m: &mut LlamaModel| {
        let (ids, labels) = batch();
        let mask = ids.mapv(|id| id != 39 && id != 30);
        m.loss_and_backward(ids.view(), labels.view(), Some(mask.view()))
            .unwrap()
    };
    assert_same_gradients(model.clone(), 1, &masked, "padding mask");

    let packed = |m: &mut LlamaModel| {
        let (ids, labels) = batch();
        let segments = array![[0u32, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]];
        let pass = m
            .forward_segmented(ids.view(), segments.view(), None)
            .unwrap();
        let ce = lm::cross_entropy(pass.logits().view(), labels.view()).unwrap();
        // An extra gradient on layer 0's output, as hidden-state distillation adds.
        let grad_h = pass.hidden_state(0).unwrap().mapv(|h| 0.01 * h);
        m.backward_with_hidden(pass, ce.grad_logits.view(), &[(0, grad_h.view())])
            .unwrap();
        ce.loss
    };
    assert_same_gradients(model, 2, &packed, "packed segments + hidden gradient");
}

#[test]
fn evaluation_and_logits_unchanged() {
    let mut model = tiny_model(false);
    model.inject_adapters(&lora(0.0), "default", 2).unwrap();
    let (ids, _) = batch();
    let plain = model.forward(ids.view(), None).unwrap().into_logits();
    model.set_gradient_checkpointing(true);
    let checkpointed = model.forward(ids.view(), None).unwrap().into_logits();
    assert_eq!(plain, checkpointed);
    assert_eq!(model.logits(ids.view(), None).unwrap(), plain);
}
