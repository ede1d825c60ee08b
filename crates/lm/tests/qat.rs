//! LoRA-QAT in the model: gradients by finite differences (an adapter tensor with fake
//! quantization off, where the loss is smooth; with it on, the one direction in which the
//! quantized loss is smooth — scaling `V = s·B·A` and the steps together leaves every code
//! unchanged), the warm-up switch, recalibration, parameter names, save → load identity,
//! export, and refusals.

use std::path::PathBuf;

use lm::{LlamaConfig, LlamaModel, LmError, QUANTIZER_STEP_SUFFIX};
use lora_core::{InitLoraWeights, LoraConfig, QatMode};
use ndarray::Array2;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::quantizer::InitMethod;
use quant_core::ste::{lsq_grad_scale, Ste};
use quant_core::uniform::Granularity;

const O_PROJ: &str = "model.layers.0.self_attn.o_proj";

fn small_model(seed: u64) -> LlamaModel {
    let config = LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap();
    LlamaModel::random(config, seed).unwrap()
}

fn ids_and_labels() -> (Array2<u32>, Array2<i64>) {
    let ids = Array2::from_shape_fn((2, 6), |(b, t)| ((b * 7 + t * 5 + 1) % 32) as u32);
    let labels = ids.mapv(i64::from);
    (ids, labels)
}

fn random_lora(targets: &[&str]) -> LoraConfig {
    let mut config = LoraConfig::new(2, 4.0, targets);
    // B ≠ 0, so the adapter changes what the layer computes.
    config.init_lora_weights = InitLoraWeights::Random;
    config
}

fn uniform3_lsq() -> QatConfig {
    QatConfig {
        quantizer: QuantizerKind::Uniform,
        bits: 3,
        granularity: Granularity::PerChannel,
        ste: Ste::Lsq,
        pi_k: None,
        symmetric: true,
        incoherence: None,
        init: InitMethod::MseClipSearch,
        double_quant: false,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The model's loss with `f` applied to every parameter value whose name passes `select`.
fn loss_after(
    model: &LlamaModel,
    select: impl Fn(&str) -> bool,
    f: impl Fn(usize, &mut f32),
) -> f64 {
    let (ids, labels) = ids_and_labels();
    let mut m = model.clone();
    m.visit_parameters(|name, p| {
        if select(name) {
            for (i, v) in p.value.iter_mut().enumerate() {
                f(i, v);
            }
        }
        Ok(())
    })
    .unwrap();
    f64::from(m.loss(ids.view(), labels.view(), None).unwrap())
}

fn gradient_of(model: &mut LlamaModel, name: &str) -> Vec<f32> {
    let mut out = None;
    model
        .visit_parameters(|n, p| {
            if n == name {
                out = Some(p.grad.expect("a trainable parameter").to_vec());
            }
            Ok(())
        })
        .unwrap();
    out.unwrap_or_else(|| panic!("no parameter {name}"))
}

#[test]
fn adapter_gradient_matches_finite_differences_with_fake_quant_off() {
    let mut model = small_model(1);
    let lora = random_lora(&["q_proj", "down_proj"]);
    model
        .inject_qat_adapters(&lora, &QatConfig::piq3(), QatMode::QuantizeMerged, "qat", 4)
        .unwrap();
    assert_eq!(model.set_fake_quant(false), 2);
    let (ids, labels) = ids_and_labels();
    model.zero_grad();
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    for tensor in ["lora_A", "lora_B"] {
        let name = format!("base_model.model.model.layers.0.mlp.down_proj.{tensor}.qat.weight");
        let grad = gradient_of(&mut model, &name);
        for index in [0usize, 5, grad.len() - 1] {
            let h = 1e-2f32;
            let plus = loss_after(
                &model,
                |n| n == name,
                |i, v| *v += if i == index { h } else { 0.0 },
            );
            let minus = loss_after(
                &model,
                |n| n == name,
                |i, v| *v -= if i == index { h } else { 0.0 },
            );
            let fd = (plus - minus) / (2.0 * f64::from(h));
            let got = f64::from(grad[index]);
            assert!(
                (fd - got).abs() <= 2e-3 * fd.abs().max(got.abs()).max(1e-2),
                "{name}[{index}]: backward {got}, finite differences {fd}"
            );
        }
    }
    // Off, the steps get no gradient.
    let step = gradient_of(
        &mut model,
        &lm::quantizer_step_name("model.layers.0.mlp.down_proj"),
    );
    assert!(step.iter().all(|&g| g == 0.0));
}

/// With fake quantization on the loss is piecewise constant in `B` and in the steps
/// separately, but scaling `V = s·B·A` (the base is zero here) and every step of the layer
/// by `1 + ε` keeps every code: `Ŵ` scales by `1 + ε` and the loss is smooth along that
/// direction. LSQ's estimators are exact there: `Σ ∂L/∂B ⊙ B + Σ_g s_g·(∂L/∂s_g)/gscale`
/// equals the directional derivative, which finite differences measure.
#[test]
fn step_and_adapter_gradients_match_finite_differences_along_the_code_preserving_direction() {
    let mut model = small_model(2);
    if let Some(d) = model.linear_module_mut(O_PROJ).unwrap().as_dense_mut() {
        d.weight_mut().value_mut().fill(0.0);
    }
    let qat = uniform3_lsq();
    model
        .inject_qat_adapters(
            &random_lora(&["o_proj"]),
            &qat,
            QatMode::QuantizeMerged,
            "qat",
            9,
        )
        .unwrap();
    let (ids, labels) = ids_and_labels();
    model.zero_grad();
    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let b_name = format!("base_model.model.{O_PROJ}.lora_B.qat.weight");
    let step_name = lm::quantizer_step_name(O_PROJ);
    let grad_b = gradient_of(&mut model, &b_name);
    let grad_steps = gradient_of(&mut model, &step_name);
    assert!(grad_steps.iter().any(|&g| g != 0.0));
    let mut b = Vec::new();
    let mut steps = Vec::new();
    model
        .visit_parameters(|n, p| {
            if n == b_name {
                b = p.value.to_vec();
            } else if n == step_name {
                steps = p.value.to_vec();
            }
            Ok(())
        })
        .unwrap();
    let gscale = f64::from(lsq_grad_scale(16, 3.0));
    let predicted: f64 = grad_b
        .iter()
        .zip(&b)
        .map(|(g, v)| f64::from(*g) * f64::from(*v))
        .sum::<f64>()
        + grad_steps
            .iter()
            .zip(&steps)
            .map(|(g, s)| f64::from(*g) / gscale * f64::from(*s))
            .sum::<f64>();
    let eps = 1e-3f32;
    let select = |n: &str| n == b_name || n == step_name;
    let plus = loss_after(&model, select, |_, v| *v *= 1.0 + eps);
    let minus = loss_after(&model, select, |_, v| *v *= 1.0 - eps);
    let fd = (plus - minus) / (2.0 * f64::from(eps));
    assert!(
        (fd - predicted).abs() <= 1e-2 * fd.abs().max(1e-3),
        "directional derivative: backward {predicted}, finite differences {fd}"
    );
}

#[test]
fn parameters_fake_quant_switch_and_recalibration() {
    let mut model = small_model(3);
    let (ids, labels) = ids_and_labels();
    let base = model.logits(ids.view(), None).unwrap();
    let lora = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    let n = model
        .inject_qat_adapters(&lora, &QatConfig::piq2(), QatMode::QuantizeMerged, "qat", 0)
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        model.layers()[0].linear("self_attn.q_proj").unwrap().kind(),
        "LoRA-QAT"
    );
    // PEFT's default B = 0: with fake quantization off the model computes the base.
    model.set_fake_quant(false);
    assert_eq!(model.logits(ids.view(), None).unwrap(), base);
    model.set_fake_quant(true);
    let quantized = model.logits(ids.view(), None).unwrap();
    assert!((&quantized - &base).iter().any(|d| d.abs() > 1e-4));

    model
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let mut names = Vec::new();
    model
        .visit_trainable_parameters(|name, p| {
            assert!(p.grad.is_some());
            names.push(name.to_string());
            Ok(())
        })
        .unwrap();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.qat.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.qat.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.quantizer.step",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.qat.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.qat.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.quantizer.step",
        ]
    );
    let step_grads = model.quantizer_gradients("qat").unwrap();
    assert_eq!(step_grads.len(), 2);
    assert!(step_grads[0].1.iter().any(|&g| g != 0.0));
    // Steps moved far off, recalibration fits them again to the same weights.
    let fitted = loss_after(&model, |_| false, |_, _| {});
    model
        .visit_parameters(|name, p| {
            if name.ends_with(QUANTIZER_STEP_SUFFIX) {
                p.value.iter_mut().for_each(|s| *s *= 4.0);
            }
            Ok(())
        })
        .unwrap();
    let off = model.loss(ids.view(), labels.view(), None).unwrap();
    assert_ne!(f64::from(off), fitted);
    assert_eq!(
        model
            .recalibrate_quantizers(InitMethod::MseClipSearch)
            .unwrap(),
        2
    );
    let refit = model.loss(ids.view(), labels.view(), None).unwrap();
    assert_eq!(f64::from(refit), fitted);
    // The frozen-base mode has steps but does not train them.
    let mut frozen = small_model(3);
    frozen
        .inject_qat_adapters(
            &lora,
            &QatConfig::piq3(),
            QatMode::FrozenQuantizedBase,
            "f",
            0,
        )
        .unwrap();
    frozen
        .loss_and_backward(ids.view(), labels.view(), None)
        .unwrap();
    let mut trains_steps = false;
    frozen
        .visit_trainable_parameters(|name, _| {
            trains_steps |= name.ends_with(QUANTIZER_STEP_SUFFIX);
            Ok(())
        })
        .unwrap();
    assert!(!trains_steps);
    // Memory: the steps count with the adapters.
    let report = model.memory_report();
    // q: A 2×16, B 16×2, 16 steps; v: A 2×16, B 8×2, 8 steps.
    assert_eq!(report.adapter_parameters, 64 + 16 + 48 + 8);
}

#[test]
fn saved_qat_adapters_reload_identically_and_export_the_quantized_weights() {
    let mut model = small_model(4);
    let lora = random_lora(&["q_proj", "k_proj", "gate_proj"]);
    model
        .inject_qat_adapters(&lora, &QatConfig::piq3(), QatMode::QuantizeMerged, "qat", 5)
        .unwrap();
    // Train a little so that steps and adapters differ from their initial values.
    let (ids, labels) = ids_and_labels();
    for _ in 0..3 {
        model.zero_grad();
        model
            .loss_and_backward(ids.view(), labels.view(), None)
            .unwrap();
        model
            .visit_trainable_parameters(|_, p| {
                let grad = p.grad.unwrap();
                for (v, g) in p.value.iter_mut().zip(grad.iter()) {
                    *v -= 0.05 * g;
                }
                Ok(())
            })
            .unwrap();
    }
    let logits = model.logits(ids.view(), None).unwrap();
    let dir = temp_dir("save");
    model.save_qat_adapter(&dir, "qat").unwrap();
    assert!(dir.join("adapter_config.json").is_file());
    assert!(dir.join(lm::QAT_STATE_FILE).is_file());
    let mut reloaded = small_model(4);
    assert_eq!(reloaded.load_qat_adapter(&dir, "qat").unwrap(), 3);
    assert_eq!(reloaded, model);
    assert_eq!(reloaded.logits(ids.view(), None).unwrap(), logits);
    // The PEFT files alone load as a plain LoRA adapter (unquantized).
    let mut plain = small_model(4);
    assert_eq!(plain.load_adapter(&dir, "plain", 0).unwrap(), 3);

    // Export: one packed tensor set per layer; merge_and_unload computes the same logits.
    let file = dir.join("quantized.safetensors");
    assert_eq!(model.export_quantized(&file).unwrap(), 3);
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.len(),
        3 * 3,
        "qweight, qscale, qstate per layer (symmetric: no qzero)"
    );
    let (packed, _) =
        quant_core::packed_layout::from_tensors("model.layers.0.mlp.gate_proj", |key| {
            st.tensor(key)
                .ok()
                .map(|v| quant_core::io::OwnedTensor::from_view(&v))
        })
        .unwrap();
    let _ = packed;
    let mut merged = model.clone();
    assert_eq!(merged.merge_and_unload().unwrap(), 3);
    let merged_logits = merged.logits(ids.view(), None).unwrap();
    assert!((&merged_logits - &logits).iter().all(|d| d.abs() < 1e-4));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refusals_name_the_problem_and_change_nothing() {
    let mut model = small_model(6);
    let before = model.clone();
    let mut dora = LoraConfig::new(2, 4.0, &["q_proj"]);
    dora.use_dora = true;
    let err = model
        .inject_qat_adapters(&dora, &QatConfig::piq3(), QatMode::QuantizeMerged, "d", 0)
        .unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");
    let mut dropout = LoraConfig::new(2, 4.0, &["q_proj"]);
    dropout.lora_dropout = 0.1;
    let err = model
        .inject_qat_adapters(
            &dropout,
            &QatConfig::piq3(),
            QatMode::QuantizeMerged,
            "d",
            0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("dropout"), "{err}");
    assert_eq!(model, before);
    // On a LoRA projection, and a second adapter on a QAT projection.
    model
        .inject_adapters(&LoraConfig::new(2, 4.0, &["q_proj"]), "lora", 0)
        .unwrap();
    let err = model
        .inject_qat_adapters(
            &LoraConfig::new(2, 4.0, &["q_proj"]),
            &QatConfig::piq3(),
            QatMode::QuantizeMerged,
            "q",
            0,
        )
        .unwrap_err();
    assert!(matches!(err, LmError::AdapterState { .. }), "{err}");
    model
        .inject_qat_adapters(
            &LoraConfig::new(2, 4.0, &["v_proj"]),
            &QatConfig::piq3(),
            QatMode::QuantizeMerged,
            "q",
            0,
        )
        .unwrap();
    let err = model
        .inject_adapters(&LoraConfig::new(2, 4.0, &["v_proj"]), "again", 0)
        .unwrap_err();
    assert!(err.to_string().contains("exactly one adapter"), "{err}");
    assert!(model.merge_adapters().is_err());
    assert!(model.save_qat_adapter(temp_dir("none"), "lora").is_err());
    let mut plain = small_model(6);
    assert!(plain
        .export_quantized(temp_dir("none2").join("x.safetensors"))
        .is_err());
}

/// Post-training quantization: every decoder projection holds at most `2^bits` distinct
/// values per scale group (row, or block of a row), `lm_head` and the norms are untouched,
/// the report's errors are the ones measured here, and a 4-bit model stays close to the
/// `f32` one while a 2-bit one moves further.
#[test]
fn round_to_nearest_quantization_per_channel_and_blockwise() {
    let (ids, _) = ids_and_labels();
    let reference_model = small_model(7);
    let mut reference = reference_model.clone();
    let reference_logits = reference.logits(ids.view(), None).unwrap();
    let mut drift = Vec::new();
    for (granularity, bits) in [
        (Granularity::PerChannel, 4),
        (Granularity::PerBlock { size: 8 }, 4),
        (Granularity::PerChannel, 2),
    ] {
        let qat = QatConfig {
            bits,
            granularity,
            ..uniform3_lsq()
        };
        let mut model = reference_model.clone();
        let report = model.quantize_linears_rtn(&qat).unwrap();
        assert_eq!(report.modules.len(), 7);
        assert_eq!(report.weights(), 16 * 16 * 2 + 8 * 16 * 2 + 32 * 16 * 3);
        let group = match granularity {
            Granularity::PerBlock { size } => size,
            _ => 16,
        };
        for ((path, lin), entry) in model
            .linear_modules_mut()
            .filter(|(p, _)| p != "lm_head")
            .zip(&report.modules)
        {
            assert_eq!(path, entry.path);
            let w = lin.base_weight().unwrap().to_owned();
            let mut original = reference.clone();
            let w0 = original
                .linear_module_mut(&path)
                .unwrap()
                .base_weight()
                .unwrap()
                .to_owned();
            let mse = (&w - &w0).mapv(|d| f64::from(d * d)).sum() / w.len() as f64;
            assert!((mse - entry.mse).abs() <= 1e-9 + 1e-6 * mse, "{path}");
            assert!(entry.relative_error > 0.0 && entry.relative_error < 1.0);
            for row in w.rows() {
                for chunk in row.as_slice().unwrap().chunks(group.min(row.len())) {
                    let mut distinct: Vec<f32> = chunk.to_vec();
                    distinct.sort_by(f32::total_cmp);
                    distinct.dedup();
                    assert!(distinct.len() <= 1 << bits, "{path}: {}", distinct.len());
                }
            }
        }
        let head = |m: &mut LlamaModel| {
            m.linear_module_mut("lm_head")
                .unwrap()
                .base_weight()
                .unwrap()
                .to_owned()
        };
        assert_eq!(head(&mut model), head(&mut reference));
        let logits = model.logits(ids.view(), None).unwrap();
        drift.push(
            (&logits - &reference_logits)
                .iter()
                .map(|d| d.abs())
                .fold(0.0f32, f32::max),
        );
    }
    assert!(drift[0] > 0.0 && drift[0] < drift[2], "{drift:?}");
    // Quantizing an adapted model is refused, naming the projection.
    let mut adapted = small_model(7);
    adapted
        .inject_adapters(&LoraConfig::new(2, 4.0, &["k_proj"]), "a", 0)
        .unwrap();
    let err = adapted.quantize_linears_rtn(&uniform3_lsq()).unwrap_err();
    assert!(err.to_string().contains("k_proj"), "{err}");
}
