//! LoRA-QAT on ggml's grids (`q4_0` … `q6_k`): the layer's `dx` matches central finite
//! differences (`y` is linear in `x` with `W_q` fixed), `dA`, `dB` are `s·Bᵀ·dV`, `s·dV·Aᵀ`
//! with `dV` from an independent quantizer and agree with central differences of the
//! straight-through surrogate (see `tests/qat.rs` for why that is the function to
//! differentiate), the exported blocks decode to the weights the layer computed with bit for
//! bit after training moved everything, and rows that do not divide train on llama.cpp's
//! fallback type.

use lora_core::config::InitLoraWeights;
use lora_core::qat::{LoraQatLinear, QatMode};
use lora_core::AdapterOptions;
use ndarray::{Array2, ArrayView2};
use quant_core::config::QatConfig;
use quant_core::ggml::{dequantize, GgmlType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TYPES: [GgmlType; 7] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-scale..scale))
}

fn options() -> AdapterOptions {
    let mut o = AdapterOptions::new(2, 4.0);
    o.init = InitLoraWeights::Random;
    o
}

fn linear_loss(x: ArrayView2<f32>, w_hat: &Array2<f64>, dy: ArrayView2<f32>) -> f64 {
    let y = x.mapv(f64::from).dot(&w_hat.t());
    (&y * &dy.mapv(f64::from)).sum()
}

fn layer(ty: GgmlType, w: Array2<f32>) -> LoraQatLinear {
    LoraQatLinear::new(
        w,
        None,
        &options(),
        &QatConfig::ggml(ty).unwrap(),
        QatMode::QuantizeMerged,
        3,
        "ggml",
    )
    .unwrap()
}

#[test]
fn gradients_match_finite_differences_and_the_ste_formulas() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for ty in TYPES {
        let cols = ty.block_values();
        let (w, x, dy) = (
            random(&mut rng, 6, cols, 0.5),
            random(&mut rng, 5, cols, 1.0),
            random(&mut rng, 5, 6, 1.0),
        );
        let mut layer = layer(ty, w.clone());
        layer.forward(x.view()).unwrap();
        let dx = layer.backward(dy.view()).unwrap();
        let w_q = layer.effective_weight().unwrap().mapv(f64::from);
        let eps = 1e-3f32;
        for &(t, j) in &[(0, 0), (2, 7), (4, cols - 1)] {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[[t, j]] += eps;
            minus[[t, j]] -= eps;
            let fd = (linear_loss(plus.view(), &w_q, dy.view())
                - linear_loss(minus.view(), &w_q, dy.view()))
                / (2.0 * f64::from(eps));
            let got = f64::from(dx[[t, j]]);
            assert!(
                (fd - got).abs() <= 1e-3 * fd.abs().max(1.0),
                "{ty} dx[{t},{j}]: {got} vs {fd}"
            );
        }
        // dV and dθ from an independent quantizer fitted to the same W + s·B·A.
        let config = QatConfig::ggml(ty).unwrap();
        let v0 = layer.merged_weight().unwrap();
        let mut reference = config.build_for_weight(6, cols).unwrap();
        reference.init_from_weights(v0.view(), config.init).unwrap();
        let w_hat0 = reference.forward(v0.view()).unwrap().dequantized;
        assert_eq!(w_hat0, layer.effective_weight().unwrap(), "{ty}");
        let grads = reference.backward(dy.t().dot(&x).view()).unwrap();
        for (got, want) in layer.grad_quantizer_params().iter().zip(&grads.params) {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1e-3),
                "{ty} dθ {got} vs {want}"
            );
        }
        let s = layer.adapter().scale() as f64;
        let (a0, b0) = (
            layer.adapter().a().mapv(f64::from),
            layer.adapter().b().mapv(f64::from),
        );
        let mask = {
            let mut probe = config.build_for_weight(6, cols).unwrap();
            probe.init_from_weights(v0.view(), config.init).unwrap();
            probe.forward(v0.view()).unwrap();
            probe
                .backward(Array2::ones((6, cols)).view())
                .unwrap()
                .input
                .mapv(f64::from)
        };
        let v0 = v0.mapv(f64::from);
        let surrogate = |a: &Array2<f64>, b: &Array2<f64>| {
            let v = w.mapv(f64::from) + b.dot(a) * s;
            let w_hat = w_hat0.mapv(f64::from) + &mask * &(v - &v0);
            linear_loss(x.view(), &w_hat, dy.view())
        };
        let h = 1e-4;
        for &(k, i) in &[(0, 0), (1, cols / 2), (1, cols - 1)] {
            let (mut plus, mut minus) = (a0.clone(), a0.clone());
            plus[[k, i]] += h;
            minus[[k, i]] -= h;
            let fd = (surrogate(&plus, &b0) - surrogate(&minus, &b0)) / (2.0 * h);
            let got = f64::from(layer.adapter().grad_a()[[k, i]]);
            assert!(
                (fd - got).abs() <= 1e-3 * fd.abs().max(1.0),
                "{ty} dA[{k},{i}]: {got} vs {fd}"
            );
        }
        for &(o, k) in &[(0, 0), (3, 1), (5, 1)] {
            let (mut plus, mut minus) = (b0.clone(), b0.clone());
            plus[[o, k]] += h;
            minus[[o, k]] -= h;
            let fd = (surrogate(&a0, &plus) - surrogate(&a0, &minus)) / (2.0 * h);
            let got = f64::from(layer.adapter().grad_b()[[o, k]]);
            assert!(
                (fd - got).abs() <= 1e-3 * fd.abs().max(1.0),
                "{ty} dB[{o},{k}]: {got} vs {fd}"
            );
        }
    }
}

#[test]
fn exported_blocks_are_the_weights_training_computed_with_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for ty in TYPES {
        let cols = ty.block_values() * 2;
        let mut layer = layer(ty, random(&mut rng, 4, cols, 0.5));
        // What an optimizer does: θ, A and B all move.
        for p in layer.quantizer_params_mut() {
            *p *= rng.random_range(0.8f32..1.2);
        }
        let (a, b) = (layer.adapter().a().clone(), layer.adapter().b().clone());
        let (a, b) = (a.mapv(|v| v * 1.5), b.mapv(|v| v + 0.01));
        layer
            .adapter_mut()
            .set_weights(a.view(), b.view(), None)
            .unwrap();
        let x = random(&mut rng, 3, cols, 1.0);
        let y = layer.forward(x.view()).unwrap();
        let used = layer.effective_weight().unwrap();
        let (stored, blocks) = layer.export_ggml_blocks().unwrap();
        assert_eq!(stored, ty);
        let decoded = dequantize(ty, &blocks, used.len()).unwrap();
        for (i, (d, u)) in decoded.iter().zip(used.iter()).enumerate() {
            assert_eq!(d.to_bits(), u.to_bits(), "{ty} value {i}");
        }
        let y_deployed = x.dot(&Array2::from_shape_vec(used.dim(), decoded).unwrap().t());
        let diff = (&y - &y_deployed)
            .iter()
            .fold(0.0f32, |m, d| m.max(d.abs()));
        assert!(diff < 1e-4, "{ty}: {diff}");
        let tensors = layer.export("m").unwrap();
        let state = tensors.iter().find(|(n, _)| n == "m.qstate").unwrap();
        let json: serde_json::Value = serde_json::from_slice(&state.1.data).unwrap();
        assert_eq!(json["type"], ty.name());
    }
}

#[test]
fn rows_that_do_not_divide_train_on_llama_cpp_fallback_type() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (ty, fallback) in [
        (GgmlType::Q4_K, GgmlType::Q5_0),
        (GgmlType::Q6_K, GgmlType::Q8_0),
    ] {
        let mut layer = layer(ty, random(&mut rng, 2, 576, 0.5));
        assert_eq!(layer.ggml_type(), Some(fallback));
        let (stored, blocks) = layer.export_ggml_blocks().unwrap();
        assert_eq!(
            (stored, blocks.len()),
            (fallback, fallback.bytes_for(1152).unwrap())
        );
    }
    let err = LoraQatLinear::new(
        random(&mut rng, 2, 100, 0.5),
        None,
        &options(),
        &QatConfig::ggml(GgmlType::Q4_K).unwrap(),
        QatMode::QuantizeMerged,
        1,
        "odd",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("f16") || err.contains("F16"), "{err}");
    let err = LoraQatLinear::new(
        random(&mut rng, 2, 48, 0.5),
        None,
        &options(),
        &QatConfig::ggml(GgmlType::Q4_0).unwrap(),
        QatMode::QuantizeMerged,
        1,
        "odd",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("48"), "{err}");
    let mut uniform = LoraQatLinear::new(
        random(&mut rng, 2, 64, 0.5),
        None,
        &options(),
        &QatConfig::piq3(),
        QatMode::QuantizeMerged,
        1,
        "pi",
    )
    .unwrap();
    assert!(uniform
        .export_ggml_blocks()
        .unwrap_err()
        .to_string()
        .contains("Pi"));
}
