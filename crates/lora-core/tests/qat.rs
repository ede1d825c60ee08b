//! LoRA-QAT: gradients of the merged mode checked by finite differences where the function is
//! smooth, and against the STE formulas where it is not; training reduces a toy loss for
//! every grid; the frozen-base mode equals LoRA over `Q(W)`; export round-trips.
//!
//! How the finite-difference checks stay meaningful: the quantized loss is piecewise constant
//! in `A`, `B` (the rounding jumps), so its finite differences are 0 or huge. The layer's
//! gradient is the gradient of the *straight-through surrogate*: with the rounding frozen at
//! the forward pass, `Ŵ(A, B) = Ŵ₀ + M ⊙ (W + s·B·A − V₀)` where `M` is the STE's pass-through
//! mask (all ones for the standard STE, the clip/clamp range for Clipped and LSQ). That
//! surrogate is a polynomial in `A`, `B`, so central differences in `f64` check `dA`, `dB`
//! exactly. `dx` needs no surrogate: `y` is linear in `x` with `W_q` fixed. EWGS rescales each
//! element's gradient by `1 + δ·sign(g)·(v − v_q)`, which is not the gradient of any surrogate,
//! and LSQ's step gradient `Σ g·(round(v/s) − v/s)` is a chosen estimator, not a derivative:
//! those are compared with their formulas, computed independently here.

use lora_core::config::InitLoraWeights;
use lora_core::qat::{LoraQatLinear, QatMode};
use lora_core::{AdapterOptions, LoraLinear};
use ndarray::{Array2, ArrayView2};
use quant_core::config::{IncoherenceConfig, QatConfig, QuantizerKind};
use quant_core::packed_layout::from_tensors;
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STES: [Ste; 4] = [
    Ste::Standard,
    Ste::Clipped { clip: 0.8 },
    Ste::Lsq,
    Ste::Ewgs { delta: 0.2 },
];

fn config(kind: QuantizerKind, ste: Ste) -> QatConfig {
    QatConfig {
        quantizer: kind,
        bits: if kind == QuantizerKind::Nf4 { 4 } else { 3 },
        granularity: Granularity::PerChannel,
        ste,
        pi_k: (kind == QuantizerKind::Pi).then_some(3),
        symmetric: true,
        incoherence: None,
        init: InitMethod::MseClipSearch,
        double_quant: false,
    }
}

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-scale..scale))
}

fn random_options(r: usize, alpha: f64) -> AdapterOptions {
    let mut o = AdapterOptions::new(r, alpha);
    o.init = InitLoraWeights::Random;
    o
}

struct Problem {
    w: Array2<f32>,
    x: Array2<f32>,
    dy: Array2<f32>,
}

fn problem(seed: u64) -> Problem {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Problem {
        w: random(&mut rng, 12, 20, 1.0),
        x: random(&mut rng, 7, 20, 1.0),
        dy: random(&mut rng, 7, 12, 1.0),
    }
}

/// `Σ (x·Ŵᵀ) ⊙ dy` in f64: its gradient in `Ŵ` is `dyᵀ·x`, so `dy` is the backward seed.
fn linear_loss(x: ArrayView2<f32>, w_hat: &Array2<f64>, dy: ArrayView2<f32>) -> f64 {
    let mut total = 0.0;
    for t in 0..x.nrows() {
        for o in 0..w_hat.nrows() {
            let y: f64 = (0..x.ncols())
                .map(|j| x[[t, j]] as f64 * w_hat[[o, j]])
                .sum();
            total += y * dy[[t, o]] as f64;
        }
    }
    total
}

fn merged_f64(w: &Array2<f32>, a: &Array2<f64>, b: &Array2<f64>, s: f64) -> Array2<f64> {
    Array2::from_shape_fn(w.dim(), |(o, i)| {
        w[[o, i]] as f64 + s * (0..a.nrows()).map(|k| b[[o, k]] * a[[k, i]]).sum::<f64>()
    })
}

#[test]
fn input_gradient_matches_finite_differences_for_every_ste() {
    for kind in [
        QuantizerKind::Uniform,
        QuantizerKind::Pi,
        QuantizerKind::Nf4,
    ] {
        for ste in STES {
            let p = problem(1);
            let mut layer = LoraQatLinear::new(
                p.w.clone(),
                None,
                &random_options(2, 4.0),
                &config(kind, ste),
                QatMode::QuantizeMerged,
                3,
                "fd",
            )
            .unwrap();
            layer.forward(p.x.view()).unwrap();
            let dx = layer.backward(p.dy.view()).unwrap();
            let w_q = layer.effective_weight().unwrap().mapv(f64::from);
            let eps = 1e-3f32;
            for &(t, j) in &[(0, 0), (3, 7), (6, 19)] {
                let mut plus = p.x.clone();
                plus[[t, j]] += eps;
                let mut minus = p.x.clone();
                minus[[t, j]] -= eps;
                let fd = (linear_loss(plus.view(), &w_q, p.dy.view())
                    - linear_loss(minus.view(), &w_q, p.dy.view()))
                    / (2.0 * eps as f64);
                assert!(
                    (fd - dx[[t, j]] as f64).abs() <= 1e-3 * fd.abs().max(1.0),
                    "{kind:?} {ste:?} dx[{t},{j}]: {} vs {fd}",
                    dx[[t, j]]
                );
            }
        }
    }
}

#[test]
fn adapter_gradients_match_finite_differences_of_the_straight_through_surrogate() {
    for kind in [
        QuantizerKind::Uniform,
        QuantizerKind::Pi,
        QuantizerKind::Nf4,
    ] {
        for ste in STES {
            let p = problem(2);
            let cfg = config(kind, ste);
            let options = random_options(2, 4.0);
            let mut layer = LoraQatLinear::new(
                p.w.clone(),
                None,
                &options,
                &cfg,
                QatMode::QuantizeMerged,
                4,
                "fd",
            )
            .unwrap();
            layer.forward(p.x.view()).unwrap();
            layer.backward(p.dy.view()).unwrap();
            let s = layer.adapter().scale() as f64;
            let a0 = layer.adapter().a().mapv(f64::from);
            let b0 = layer.adapter().b().mapv(f64::from);
            let v0 = merged_f64(&p.w, &a0, &b0, s);

            // An independent quantizer, initialised as the layer's was, gives Ŵ₀ and dV.
            let mut reference = cfg.build_for_weight(12, 20).unwrap();
            let v0_f32 = layer.merged_weight().unwrap();
            reference
                .init_from_weights(v0_f32.view(), cfg.init)
                .unwrap();
            let w_hat0 = reference.forward(v0_f32.view()).unwrap().dequantized;
            assert_eq!(
                w_hat0,
                layer.effective_weight().unwrap(),
                "{kind:?} {ste:?}"
            );
            let grad_w = p.dy.t().dot(&p.x);
            let grads = reference.backward(grad_w.view()).unwrap();
            for (got, want) in layer.grad_quantizer_params().iter().zip(&grads.params) {
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1e-3));
            }
            // dA = s·Bᵀ·dV, dB = s·dV·Aᵀ from the reference dV (every STE, EWGS included).
            let dv = grads.input.mapv(f64::from);
            let da_formula = b0.t().dot(&dv) * s;
            let db_formula = dv.dot(&a0.t()) * s;
            for (got, want) in layer.adapter().grad_a().iter().zip(da_formula.iter()) {
                assert!((*got as f64 - want).abs() <= 1e-3 * want.abs().max(1.0));
            }
            for (got, want) in layer.adapter().grad_b().iter().zip(db_formula.iter()) {
                assert!((*got as f64 - want).abs() <= 1e-3 * want.abs().max(1.0));
            }
            if matches!(ste, Ste::Ewgs { .. }) {
                continue;
            }
            // The pass-through mask M: where a unit upstream gradient passes.
            let mut mask_probe = cfg.build_for_weight(12, 20).unwrap();
            mask_probe
                .init_from_weights(v0_f32.view(), cfg.init)
                .unwrap();
            mask_probe.forward(v0_f32.view()).unwrap();
            let mask = mask_probe
                .backward(Array2::ones((12, 20)).view())
                .unwrap()
                .input
                .mapv(f64::from);
            let surrogate = |a: &Array2<f64>, b: &Array2<f64>| {
                let v = merged_f64(&p.w, a, b, s);
                let w_hat = Array2::from_shape_fn(v.dim(), |(o, i)| {
                    w_hat0[[o, i]] as f64 + mask[[o, i]] * (v[[o, i]] - v0[[o, i]])
                });
                linear_loss(p.x.view(), &w_hat, p.dy.view())
            };
            let eps = 1e-4;
            for &(k, i) in &[(0, 0), (1, 9), (1, 19)] {
                let (mut plus, mut minus) = (a0.clone(), a0.clone());
                plus[[k, i]] += eps;
                minus[[k, i]] -= eps;
                let fd = (surrogate(&plus, &b0) - surrogate(&minus, &b0)) / (2.0 * eps);
                let got = layer.adapter().grad_a()[[k, i]] as f64;
                assert!(
                    (fd - got).abs() <= 1e-3 * fd.abs().max(1.0),
                    "{kind:?} {ste:?} dA[{k},{i}]: {got} vs {fd}"
                );
            }
            for &(o, k) in &[(0, 0), (5, 1), (11, 1)] {
                let (mut plus, mut minus) = (b0.clone(), b0.clone());
                plus[[o, k]] += eps;
                minus[[o, k]] -= eps;
                let fd = (surrogate(&a0, &plus) - surrogate(&a0, &minus)) / (2.0 * eps);
                let got = layer.adapter().grad_b()[[o, k]] as f64;
                assert!(
                    (fd - got).abs() <= 1e-3 * fd.abs().max(1.0),
                    "{kind:?} {ste:?} dB[{o},{k}]: {got} vs {fd}"
                );
            }
        }
    }
}

/// LSQ's step gradient written out: per row `g`, `Σ_i dŴ_i·d_i / √(N·Qp)` with
/// `d_i = round(v_i/s) − v_i/s` inside `[qmin, qmax]` and the bound outside.
#[test]
fn lsq_step_gradient_matches_the_lsq_formula() {
    let p = problem(3);
    let cfg = config(QuantizerKind::Uniform, Ste::Lsq);
    let mut layer = LoraQatLinear::new(
        p.w.clone(),
        None,
        &random_options(2, 4.0),
        &cfg,
        QatMode::QuantizeMerged,
        5,
        "lsq",
    )
    .unwrap();
    let steps = layer.quantizer_params().to_vec();
    layer.forward(p.x.view()).unwrap();
    layer.backward(p.dy.view()).unwrap();
    let a = layer.adapter().a().mapv(f64::from);
    let b = layer.adapter().b().mapv(f64::from);
    let v = merged_f64(&p.w, &a, &b, layer.adapter().scale() as f64);
    let grad_w = p.dy.t().dot(&p.x);
    let (qmin, qmax) = (-4.0f64, 3.0f64);
    for (row, &step) in steps.iter().enumerate() {
        let step = step as f64;
        let sum: f64 = (0..20)
            .map(|i| {
                let u = (v[[row, i]] as f32 as f64) / step;
                let d = if u < qmin {
                    qmin
                } else if u > qmax {
                    qmax
                } else {
                    u.round_ties_even() - u
                };
                grad_w[[row, i]] as f64 * d
            })
            .sum();
        let want = sum / (20.0 * qmax).sqrt();
        let got = layer.grad_quantizer_params()[row] as f64;
        assert!(
            (got - want).abs() <= 1e-3 * want.abs().max(1e-2),
            "row {row}: {got} vs {want}"
        );
        assert!(got != 0.0);
    }
}

#[test]
fn sgd_reduces_a_toy_regression_loss_for_every_grid() {
    for kind in [
        QuantizerKind::Uniform,
        QuantizerKind::Pi,
        QuantizerKind::Nf4,
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let w = random(&mut rng, 16, 32, 1.0);
        // The target differs from W by a rank-2 update the adapter can learn.
        let target_w = &w + &random(&mut rng, 16, 2, 1.0).dot(&random(&mut rng, 2, 32, 1.0));
        let x = random(&mut rng, 64, 32, 1.0);
        let target = x.dot(&target_w.t());
        let mut layer = LoraQatLinear::new(
            w,
            None,
            &AdapterOptions::new(2, 2.0),
            &config(kind, Ste::Lsq),
            QatMode::QuantizeMerged,
            1,
            "toy",
        )
        .unwrap();
        let mut losses = Vec::new();
        for step in 0..60 {
            let y = layer.forward(x.view()).unwrap();
            let diff = &y - &target;
            losses.push(diff.iter().map(|d| (d * d) as f64).sum::<f64>() / diff.len() as f64);
            let dy = diff * (2.0 / y.len() as f32);
            layer.zero_grad();
            layer.backward(dy.view()).unwrap();
            if step == 0 {
                let ad = layer.adapter();
                assert!(ad.grad_a().iter().any(|&g| g != 0.0) || ad.b().iter().all(|&v| v == 0.0));
                assert!(ad.grad_b().iter().any(|&g| g != 0.0), "{kind:?} dB");
                assert!(
                    layer.grad_quantizer_params().iter().any(|&g| g != 0.0),
                    "{kind:?} dθ"
                );
            }
            let lr = 0.5f32;
            let a = layer.adapter().a() - &(layer.adapter().grad_a() * lr);
            let b = layer.adapter().b() - &(layer.adapter().grad_b() * lr);
            layer
                .adapter_mut()
                .set_weights(a.view(), b.view(), None)
                .unwrap();
            let grads = layer.grad_quantizer_params().to_vec();
            for (theta, g) in layer.quantizer_params_mut().iter_mut().zip(grads) {
                *theta = (*theta - 1e-3 * g).max(1e-4);
            }
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.7 * first, "{kind:?}: {first} → {last}");
    }
}

#[test]
fn frozen_base_mode_is_lora_over_the_quantized_weight() {
    let p = problem(4);
    let cfg = config(QuantizerKind::Uniform, Ste::Lsq);
    let options = random_options(2, 4.0);
    let mut layer = LoraQatLinear::new(
        p.w.clone(),
        None,
        &options,
        &cfg,
        QatMode::FrozenQuantizedBase,
        6,
        "frozen",
    )
    .unwrap();
    let mut q = cfg.build().unwrap();
    q.init_from_weights(p.w.view(), cfg.init).unwrap();
    let w_q = q.forward(p.w.view()).unwrap().dequantized;
    let mut lora = LoraLinear::dense(w_q, None, "frozen").unwrap();
    lora.add_adapter("a", &options, 6).unwrap();
    let y = layer.forward(p.x.view()).unwrap();
    let y_ref = lora.forward(p.x.view()).unwrap();
    assert!(y
        .iter()
        .zip(y_ref.iter())
        .all(|(a, b)| (a - b).abs() < 1e-5));
    let dx = layer.backward(p.dy.view()).unwrap();
    let dx_ref = lora.backward(p.dy.view()).unwrap();
    assert!(dx
        .iter()
        .zip(dx_ref.iter())
        .all(|(a, b)| (a - b).abs() < 1e-5));
    let ga = lora.adapter("a").unwrap().grad_a();
    assert!(layer
        .adapter()
        .grad_a()
        .iter()
        .zip(ga.iter())
        .all(|(a, b)| (a - b).abs() < 1e-5));
    assert!(layer.grad_quantizer_params().iter().all(|&g| g == 0.0));
}

#[test]
fn export_round_trips_to_the_effective_weight() {
    let p = problem(5);
    for kind in [QuantizerKind::Uniform, QuantizerKind::Pi] {
        let mut layer = LoraQatLinear::new(
            p.w.clone(),
            None,
            &random_options(2, 4.0),
            &config(kind, Ste::Lsq),
            QatMode::QuantizeMerged,
            8,
            "e",
        )
        .unwrap();
        let tensors = layer.export("q_proj").unwrap();
        let (stored, _) = from_tensors("q_proj", |k| {
            tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone())
        })
        .unwrap();
        let effective = layer.effective_weight().unwrap();
        let back = stored.dequantize();
        assert!(back
            .iter()
            .zip(effective.iter())
            .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0)));
    }
    let mut nf4 = LoraQatLinear::new(
        p.w.clone(),
        None,
        &random_options(2, 4.0),
        &config(QuantizerKind::Nf4, Ste::Lsq),
        QatMode::QuantizeMerged,
        8,
        "e",
    )
    .unwrap();
    let tensors = nf4.export("w").unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w.qweight", "w.qscale", "w.qstate"]);
    let effective = nf4.effective_weight().unwrap();
    let codes = &tensors[0].1.data;
    let scales: Vec<f32> = tensors[1]
        .1
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (idx, &value) in effective.iter().enumerate() {
        let byte = codes[idx / 2];
        let code = if idx % 2 == 0 { byte >> 4 } else { byte & 15 };
        let want = quant_core::nf4::FourBitType::Nf4.code()[code as usize] * scales[idx / 20];
        assert!((want - value).abs() <= 1e-6 * value.abs().max(1.0));
    }
}

#[test]
fn caller_mistakes_are_errors() {
    let p = problem(6);
    let cfg = config(QuantizerKind::Uniform, Ste::Lsq);
    let mut dropout = random_options(2, 4.0);
    dropout.dropout = 0.1;
    let e = LoraQatLinear::new(
        p.w.clone(),
        None,
        &dropout,
        &cfg,
        QatMode::QuantizeMerged,
        0,
        "m",
    )
    .unwrap_err();
    assert!(e.to_string().contains("lora_dropout"), "{e}");
    let mut layer = LoraQatLinear::new(
        p.w.clone(),
        None,
        &random_options(2, 4.0),
        &cfg,
        QatMode::QuantizeMerged,
        0,
        "model.q",
    )
    .unwrap();
    let e = layer.backward(p.dy.view()).unwrap_err();
    assert!(e.to_string().contains("no forward"), "{e}");
    let e = layer.forward(Array2::zeros((2, 19)).view()).unwrap_err();
    assert!(e.to_string().contains("model.q"), "{e}");
    let mut nan = p.x.clone();
    nan[[1, 1]] = f32::NAN;
    assert!(layer
        .forward(nan.view())
        .unwrap_err()
        .to_string()
        .contains("non-finite"));
    layer.forward(p.x.view()).unwrap();
    assert!(layer.backward(Array2::zeros((7, 11)).view()).is_err());
    let mut rotated_cfg = cfg;
    rotated_cfg.incoherence = Some(IncoherenceConfig {
        seed: 1,
        rotate_output: false,
    });
    let w = Array2::from_shape_fn((8, 16), |(i, j)| ((i + j) as f32).sin());
    let mut rotated = LoraQatLinear::new(
        w,
        None,
        &random_options(2, 4.0),
        &rotated_cfg,
        QatMode::QuantizeMerged,
        0,
        "rot",
    )
    .unwrap();
    rotated.forward(Array2::ones((3, 16)).view()).unwrap();
    rotated.backward(Array2::ones((3, 8)).view()).unwrap();
    assert!(rotated
        .export("w")
        .unwrap_err()
        .to_string()
        .contains("Hadamard"));
}

#[test]
fn fake_quant_off_is_lora_over_the_full_precision_weight_in_both_modes() {
    let p = problem(8);
    let cfg = config(QuantizerKind::Pi, Ste::Lsq);
    let options = random_options(2, 4.0);
    let close = |a: &Array2<f32>, b: &Array2<f32>, what: &str| {
        let diff = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{what}: max diff {diff}");
    };
    for mode in [QatMode::QuantizeMerged, QatMode::FrozenQuantizedBase] {
        let mut layer =
            LoraQatLinear::new(p.w.clone(), None, &options, &cfg, mode, 6, "warm").unwrap();
        let quantized_y = layer.forward(p.x.view()).unwrap();
        let steps = layer.quantizer_params().to_vec();
        layer.set_fake_quant(false);
        assert!(!layer.fake_quant());
        let mut lora = LoraLinear::dense(p.w.clone(), None, "warm").unwrap();
        lora.add_adapter("a", &options, 6).unwrap();
        let y = layer.forward(p.x.view()).unwrap();
        close(&y, &lora.forward(p.x.view()).unwrap(), "y");
        close(
            &layer.effective_weight().unwrap(),
            &layer.merged_weight().unwrap(),
            "effective weight",
        );
        let dx = layer.backward(p.dy.view()).unwrap();
        close(&dx, &lora.backward(p.dy.view()).unwrap(), "dx");
        let reference = lora.adapter("a").unwrap();
        close(layer.adapter().grad_a(), reference.grad_a(), "dA");
        close(layer.adapter().grad_b(), reference.grad_b(), "dB");
        assert!(layer.grad_quantizer_params().iter().all(|&g| g == 0.0));
        assert_eq!(layer.quantizer_params(), &steps[..]);
        // Switched back on, the layer quantizes again, with θ as it was.
        layer.set_fake_quant(true);
        close(
            &layer.forward(p.x.view()).unwrap(),
            &quantized_y,
            "y back on",
        );
        assert!(quantized_y
            .iter()
            .zip(y.iter())
            .any(|(a, b)| (a - b).abs() > 1e-4));
    }
}

#[test]
fn recalibration_refits_the_quantizer_to_the_current_merged_weight() {
    let p = problem(9);
    let cfg = config(QuantizerKind::Uniform, Ste::Lsq);
    let mut layer = LoraQatLinear::new(
        p.w.clone(),
        None,
        &random_options(2, 4.0),
        &cfg,
        QatMode::QuantizeMerged,
        2,
        "recal",
    )
    .unwrap();
    // Move the adapter; recalibration must fit θ to W + s·B·A as it is now.
    let a = layer.adapter().a() * 3.0;
    let b = layer.adapter().b() * 3.0;
    layer
        .adapter_mut()
        .set_weights(a.view(), b.view(), None)
        .unwrap();
    layer.recalibrate(InitMethod::Absmax).unwrap();
    let mut fresh = cfg.build().unwrap();
    fresh
        .init_from_weights(layer.merged_weight().unwrap().view(), InitMethod::Absmax)
        .unwrap();
    assert_eq!(layer.quantizer_params(), fresh.params());
    assert!(layer.grad_quantizer_params().iter().all(|&g| g == 0.0));
}

#[test]
fn dora_options_are_refused_before_any_magnitude_exists() {
    let p = problem(10);
    let mut options = random_options(2, 4.0);
    options.use_dora = true;
    let err = LoraQatLinear::new(
        p.w.clone(),
        None,
        &options,
        &config(QuantizerKind::Uniform, Ste::Lsq),
        QatMode::QuantizeMerged,
        0,
        "dora",
    )
    .unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");
}

/// Issue 13 item 7: a frozen-base LoRA-QAT layer in evaluation mode draws no dropout — two
/// evaluation forwards agree and equal the dropout-free layer; training mode still drops.
#[test]
fn frozen_base_mode_draws_no_dropout_in_evaluation() {
    let p = problem(11);
    let cfg = config(QuantizerKind::Uniform, Ste::Lsq);
    let mut options = random_options(2, 4.0);
    let build = |options: &AdapterOptions| {
        LoraQatLinear::new(
            p.w.clone(),
            None,
            options,
            &cfg,
            QatMode::FrozenQuantizedBase,
            6,
            "frozen",
        )
        .unwrap()
    };
    let no_dropout = build(&options).forward(p.x.view()).unwrap();
    options.dropout = 0.5;
    let mut layer = build(&options);
    assert!(layer.is_training());
    let trained = layer.forward(p.x.view()).unwrap();
    assert_ne!(trained, no_dropout, "training mode drops inputs");
    layer.set_training(false);
    let first = layer.forward(p.x.view()).unwrap();
    let second = layer.forward(p.x.view()).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        first, no_dropout,
        "evaluation mode is the dropout-free layer"
    );
}
