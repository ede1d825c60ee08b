//! Whole-model gradients against central finite differences of the loss, with the base
//! trainable (every parameter kind, tied and untied heads) and frozen (input gradient only).

use std::collections::HashMap;

use lm::{LlamaConfig, LlamaModel};
use ndarray::{array, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f32 = 1e-2;

/// A tiny GQA model with weights large enough for non-trivial gradients and norms away from 1.
fn tiny_model(tied: bool, seed: u64) -> LlamaModel {
    let mut config = LlamaConfig::new(16, 8, 12, 2, 2, 1).unwrap();
    config.tie_word_embeddings = tied;
    config.initializer_range = 0.4;
    config.max_position_embeddings = 16;
    let mut model = LlamaModel::random(config, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    model
        .visit_parameters(|name, p| {
            if name.contains("norm") {
                p.value
                    .iter_mut()
                    .for_each(|v| *v = rng.random_range(0.5..1.5));
            }
            Ok(())
        })
        .unwrap();
    model
}

fn batch() -> (Array2<u32>, Array2<i64>) {
    let ids = array![[1u32, 4, 7, 2, 9, 11], [3, 5, 0, 13, 6, 8]];
    let labels = array![[1i64, 4, 7, -100, 9, 11], [3, 5, 0, 13, 6, -100]];
    (ids, labels)
}

/// Sets element `index` of parameter `name` to `value`; returns the old value.
fn set(model: &mut LlamaModel, name: &str, index: usize, value: f32) -> f32 {
    let mut old = f32::NAN;
    model
        .visit_parameters(|n, p| {
            if n == name {
                old = std::mem::replace(&mut p.value[index], value);
            }
            Ok(())
        })
        .unwrap();
    old
}

/// Central difference of the loss in element `index` of `name`; the element is restored exactly.
fn numeric_grad(
    model: &mut LlamaModel,
    name: &str,
    index: usize,
    ids: &Array2<u32>,
    labels: &Array2<i64>,
) -> f64 {
    numeric_grad_masked(model, name, index, ids, labels, None)
}

fn numeric_grad_masked(
    model: &mut LlamaModel,
    name: &str,
    index: usize,
    ids: &Array2<u32>,
    labels: &Array2<i64>,
    mask: Option<&Array2<bool>>,
) -> f64 {
    let orig = set(model, name, index, 0.0);
    set(model, name, index, orig + EPS);
    let plus = model
        .loss(ids.view(), labels.view(), mask.map(|m| m.view()))
        .unwrap() as f64;
    set(model, name, index, orig - EPS);
    let minus = model
        .loss(ids.view(), labels.view(), mask.map(|m| m.view()))
        .unwrap() as f64;
    set(model, name, index, orig);
    (plus - minus) / (2.0 * EPS as f64)
}

fn grads(model: &mut LlamaModel) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    model
        .visit_parameters(|name, p| {
            if let Some(g) = p.grad {
                out.insert(name.to_string(), g.to_vec());
            }
            Ok(())
        })
        .unwrap();
    out
}

fn check_parameters(tied: bool) {
    let mut model = tiny_model(tied, 11);
    let (ids, labels) = batch();
    model.set_base_trainable(true);
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let analytic = grads(&mut model);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut names: Vec<&String> = analytic.keys().collect();
    names.sort();
    let mut checked = 0;
    for name in names {
        let g = &analytic[name];
        // Three random elements of every parameter, plus its largest-gradient element.
        let largest = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let picks = [
            largest,
            rng.random_range(0..g.len()),
            rng.random_range(0..g.len()),
        ];
        for &i in &picks {
            let numeric = numeric_grad(&mut model, name, i, &ids, &labels);
            let a = g[i] as f64;
            assert!(
                (numeric - a).abs() <= 1e-3 + 3e-2 * a.abs(),
                "{name}[{i}] (tied = {tied}): analytic {a}, numeric {numeric}"
            );
            checked += 1;
        }
    }
    let kinds = if tied { 1 + 2 * 9 + 1 } else { 1 + 2 * 9 + 2 };
    assert_eq!(checked, 3 * kinds);
}

#[test]
fn full_parameter_gradients_match_finite_differences() {
    check_parameters(false);
}

#[test]
fn tied_embedding_gradient_sums_both_uses() {
    check_parameters(true);
}

#[test]
fn frozen_base_passes_correct_input_gradient_without_weight_gradients() {
    let mut model = tiny_model(false, 5);
    let (ids, labels) = batch();
    let pass = model.forward(ids.view(), None).unwrap();
    let ce = lm::cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let grad_in = model.backward(pass, ce.grad_logits.view()).unwrap();
    assert!(
        grads(&mut model).is_empty(),
        "a frozen base allocates no gradient buffers"
    );
    // Every id occurs once, so d loss / d embedding row `id` is the input gradient at its position.
    let hidden = model.config().hidden_size;
    for ((b, t), &id) in ids.indexed_iter() {
        for d in [0, 3, hidden - 1] {
            let index = id as usize * hidden + d;
            let numeric = numeric_grad(
                &mut model,
                "model.embed_tokens.weight",
                index,
                &ids,
                &labels,
            );
            let a = grad_in[[b, t, d]] as f64;
            assert!(
                (numeric - a).abs() <= 1e-3 + 3e-2 * a.abs(),
                "input gradient at ({b}, {t}, {d}): analytic {a}, numeric {numeric}"
            );
        }
    }
    // The same input gradient flows when the base trains.
    model.set_base_trainable(true);
    let pass = model.forward(ids.view(), None).unwrap();
    let ce = lm::cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let trained = model.backward(pass, ce.grad_logits.view()).unwrap();
    assert_eq!(trained, grad_in);
}

#[test]
fn gradients_accumulate_until_zeroed() {
    let mut model = tiny_model(false, 7);
    let (ids, labels) = batch();
    model.set_base_trainable(true);
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let once = grads(&mut model);
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let twice = grads(&mut model);
    for (name, g) in &once {
        for (a, b) in g.iter().zip(&twice[name]) {
            assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{name}");
        }
    }
    model.zero_grad();
    assert!(grads(&mut model)
        .values()
        .all(|g| g.iter().all(|&v| v == 0.0)));
}

#[test]
fn right_padded_batch_gradients_match_finite_differences() {
    let mut model = tiny_model(false, 13);
    let (mut ids, mut labels) = batch();
    let mut mask = Array2::from_elem(ids.dim(), true);
    for t in 4..6 {
        ids[[1, t]] = 15;
        labels[[1, t]] = -100;
        mask[[1, t]] = false;
    }
    model.set_base_trainable(true);
    model
        .loss_and_backward(ids.view(), labels.view(), Some(mask.view()))
        .unwrap();
    let analytic = grads(&mut model);
    // Padding never influences the loss: the padded token's embedding row gets no gradient.
    let hidden = model.config().hidden_size;
    let embed = &analytic["model.embed_tokens.weight"];
    assert!(embed[15 * hidden..16 * hidden].iter().all(|&g| g == 0.0));
    for (name, index) in [
        ("model.layers.0.self_attn.k_proj.weight", 5),
        ("model.layers.1.self_attn.v_proj.weight", 17),
        ("model.layers.0.mlp.down_proj.weight", 40),
        ("model.embed_tokens.weight", 13 * hidden + 2),
    ] {
        let numeric = numeric_grad_masked(&mut model, name, index, &ids, &labels, Some(&mask));
        let a = analytic[name][index] as f64;
        assert!(
            (numeric - a).abs() <= 1e-3 + 3e-2 * a.abs(),
            "{name}[{index}]: analytic {a}, numeric {numeric}"
        );
    }
}

/// `L = CE + Σ_k Σ c_k ⊙ h_{layer_k} + ½·Σ h_0²`: a loss reading decoder layers' outputs
/// (layer 0 twice, as when hidden-state KD and the reasoning loss both read it).
fn hidden_objective(
    model: &mut LlamaModel,
    ids: &Array2<u32>,
    labels: &Array2<i64>,
    weights: &[(usize, Array2<f32>)],
) -> f64 {
    let layers: Vec<usize> = weights.iter().map(|(l, _)| *l).collect();
    let (logits, hidden) = model
        .logits_and_hidden_states(ids.view(), None, &layers)
        .unwrap();
    let mut loss = lm::cross_entropy(logits.view(), labels.view())
        .unwrap()
        .loss as f64;
    for ((_, c), h) in weights.iter().zip(&hidden) {
        loss += c
            .iter()
            .zip(h.iter())
            .map(|(&c, &h)| c as f64 * h as f64)
            .sum::<f64>();
    }
    let h0 = model
        .logits_and_hidden_states(ids.view(), None, &[0])
        .unwrap()
        .1;
    loss + 0.5 * h0[0].iter().map(|&h| (h as f64).powi(2)).sum::<f64>() * 0.01
}

#[test]
fn hidden_state_gradients_match_finite_differences() {
    let mut model = tiny_model(false, 13);
    let (ids, labels) = batch();
    model.set_base_trainable(true);
    let n = ids.len();
    let hidden = model.config().hidden_size;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut draw = || Array2::from_shape_fn((n, hidden), |_| rng.random_range(-0.3f32..0.3));
    let weights = vec![(0, draw()), (1, draw()), (0, draw())];

    let pass = model.forward(ids.view(), None).unwrap();
    let ce = lm::cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let h0_grad = pass.hidden_state(0).unwrap().mapv(|h| 0.01 * h);
    let mut extra: Vec<(usize, ndarray::ArrayView2<'_, f32>)> =
        weights.iter().map(|(l, c)| (*l, c.view())).collect();
    extra.push((0, h0_grad.view()));
    model
        .backward_with_hidden(pass, ce.grad_logits.view(), &extra)
        .unwrap();
    let analytic = grads(&mut model);

    let mut checked = 0;
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ] {
        let g = &analytic[name];
        let largest = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for i in [largest, rng_pick(g.len(), checked)] {
            let orig = set(&mut model, name, i, 0.0);
            set(&mut model, name, i, orig + EPS);
            let plus = hidden_objective(&mut model, &ids, &labels, &weights);
            set(&mut model, name, i, orig - EPS);
            let minus = hidden_objective(&mut model, &ids, &labels, &weights);
            set(&mut model, name, i, orig);
            let numeric = (plus - minus) / (2.0 * EPS as f64);
            let a = g[i] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 + 3e-2 * a.abs(),
                "{name}[{i}]: analytic {a}, numeric {numeric}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

fn rng_pick(len: usize, salt: usize) -> usize {
    (salt * 7919 + 13) % len
}

#[test]
fn hidden_state_gradients_are_checked() {
    let mut model = tiny_model(false, 13);
    let (ids, _) = batch();
    let hidden = model.config().hidden_size;
    let pass = model.forward(ids.view(), None).unwrap();
    assert!(pass.hidden_state(2).is_err());
    let zeros = ndarray::Array3::zeros(pass.logits().dim());
    let wrong = Array2::<f32>::zeros((3, hidden));
    let err = model
        .backward_with_hidden(pass, zeros.view(), &[(0, wrong.view())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad_hidden[0]"), "{err}");
    let pass = model.forward(ids.view(), None).unwrap();
    let nan = Array2::<f32>::from_elem((ids.len(), hidden), f32::NAN);
    assert!(model
        .backward_with_hidden(pass, zeros.view(), &[(1, nan.view())])
        .is_err());
    assert!(model
        .logits_and_hidden_states(ids.view(), None, &[5])
        .is_err());
}

/// NF4 projections (the QLoRA base) are frozen: the input gradient through their tiled
/// `dy·deq(W)` products matches finite differences of the loss in the embedding rows.
#[test]
fn nf4_projections_pass_the_input_gradient() {
    let mut model = tiny_model(false, 8);
    assert_eq!(
        model
            .quantize_linears_nf4(&lora_core::Nf4Options {
                tile: 4,
                ..Default::default()
            })
            .unwrap(),
        14
    );
    let (ids, labels) = batch();
    let pass = model.forward(ids.view(), None).unwrap();
    let ce = lm::cross_entropy(pass.logits().view(), labels.view()).unwrap();
    let grad_in = model.backward(pass, ce.grad_logits.view()).unwrap();
    let hidden = model.config().hidden_size;
    for ((b, t), &id) in ids.indexed_iter() {
        for d in [0, hidden - 1] {
            let index = id as usize * hidden + d;
            let numeric = numeric_grad(
                &mut model,
                "model.embed_tokens.weight",
                index,
                &ids,
                &labels,
            );
            let a = grad_in[[b, t, d]] as f64;
            assert!(
                (numeric - a).abs() <= 1e-3 + 3e-2 * a.abs(),
                "input gradient at ({b}, {t}, {d}): analytic {a}, numeric {numeric}"
            );
        }
    }
}

/// A tiny random model of `model_type` with every family option switched on that it has.
fn tiny_family_model(json: &str, seed: u64) -> LlamaModel {
    let config = LlamaConfig::from_json_str(json).unwrap();
    let mut model = LlamaModel::random(config, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    model
        .visit_parameters(|name, p| {
            if name.contains("norm") || name.ends_with(".bias") {
                p.value.iter_mut().for_each(|v| {
                    *v = rng.random_range(-0.5..0.5) + if name.contains("norm") { 0.5 } else { 0.0 }
                });
            } else {
                p.value.iter_mut().for_each(|v| *v *= 20.0);
            }
            Ok(())
        })
        .unwrap();
    model
}

/// Central differences of the loss for three elements of every parameter of a family model:
/// covers soft caps, GeGLU, `(1 + w)` norms, sandwich norms, q/k norms, biases, fused
/// projections, sliding windows and the scaled ropes through the whole backward.
fn check_family_parameters(json: &str) {
    let mut model = tiny_family_model(json, 3);
    let (ids, labels) = batch();
    model.set_base_trainable(true);
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let analytic = grads(&mut model);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut names: Vec<&String> = analytic.keys().collect();
    names.sort();
    for name in names {
        let g = &analytic[name];
        let largest = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for i in [
            largest,
            rng.random_range(0..g.len()),
            rng.random_range(0..g.len()),
        ] {
            let numeric = numeric_grad(&mut model, name, i, &ids, &labels);
            let a = g[i] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 + 3e-2 * a.abs(),
                "{name}[{i}]: analytic {a}, numeric {numeric}"
            );
        }
    }
}

const SIZES: &str = r#""vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "max_position_embeddings": 16, "initializer_range": 0.02"#;

#[test]
fn gemma2_gradients_match_finite_differences() {
    // Soft caps low enough to bend the scores and logits; window 2 on layer 0.
    check_family_parameters(&format!(
        r#"{{"model_type": "gemma2", {SIZES}, "attn_logit_softcapping": 0.8,
        "final_logit_softcapping": 1.5, "query_pre_attn_scalar": 6, "sliding_window": 2}}"#
    ));
}

#[test]
fn gemma3_gradients_match_finite_differences() {
    check_family_parameters(&format!(
        r#"{{"model_type": "gemma3_text", {SIZES}, "sliding_window": 3,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {{"full_attention": {{"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}},
                             "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#
    ));
}

#[test]
fn qwen_biases_and_qk_norms_gradients_match_finite_differences() {
    check_family_parameters(&format!(
        r#"{{"model_type": "qwen2", {SIZES}, "tie_word_embeddings": false}}"#
    ));
    check_family_parameters(&format!(r#"{{"model_type": "qwen3", {SIZES}}}"#));
}

#[test]
fn phi3_fused_and_scaled_rope_gradients_match_finite_differences() {
    check_family_parameters(&format!(
        r#"{{"model_type": "phi3", {SIZES}, "original_max_position_embeddings": 4,
        "rope_scaling": {{"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}}}}"#
    ));
    check_family_parameters(&format!(
        r#"{{"model_type": "llama", {SIZES}, "rope_parameters": {{"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 10000.0}}}}"#
    ));
}
