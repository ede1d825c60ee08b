//! QLoRA (NF4 base) and LoftQ: tiled products against the dequantized weight, the NF4 error
//! bound, the bitsandbytes checkpoint copied from the shared golden set
//! (`tests/data/base_bnb4_model.safetensors` = `golden/llama/base_bnb4/model.safetensors`) and
//! the golden QLoRA adapter.

use std::path::{Path, PathBuf};

use lora_core::base::FrozenBase;
use lora_core::config::InitLoraWeights;
use lora_core::qlora::{
    frobenius_error, loftq_init, nf4_error_bound, LoftqConfig, Nf4Base, Nf4Options,
};
use lora_core::{AdapterOptions, LoraAdapter, LoraLinear, QLoraLinear};
use ndarray::{Array1, Array2};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

const Q_PROJ: &str = "model.layers.0.self_attn.q_proj";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn matrix(st: &SafeTensors<'_>, key: &str) -> Array2<f32> {
    let view = st.tensor(key).unwrap();
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Array2::from_shape_vec((view.shape()[0], view.shape()[1]), values).unwrap()
}

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-scale..scale))
}

fn assert_rel_close(got: &Array2<f32>, want: &Array2<f32>, rel: f32, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}");
    let norm = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            (a - b).abs() <= rel * norm,
            "{what}[{i}]: {a} vs {b} (tolerance {} of max {norm})",
            rel
        );
    }
}

/// Forward and backward of a QLoRA layer equal the LoRA layer over the dequantized weight:
/// every tile width, tiles that do not divide the shape, rows not a multiple of the block.
#[test]
fn tiled_products_equal_the_dequantized_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let cases = [(40, 96, 16), (33, 70, 7), (64, 64, 128), (130, 192, 64)];
    for (&(out_f, in_f, tile), parallel_tiles) in cases.iter().zip([true, false, true, false]) {
        let w = random(&mut rng, out_f, in_f, 1.0);
        let bias = Array1::from_shape_fn(out_f, |i| i as f32 * 0.01);
        let options = Nf4Options {
            tile,
            parallel_tiles,
            ..Nf4Options::default()
        };
        let mut qlora = QLoraLinear::qlora(w.view(), Some(bias.clone()), &options, "t").unwrap();
        let dense_w = qlora.base().dense_weight().unwrap().into_owned();
        let mut dense = LoraLinear::dense(dense_w, Some(bias), "t").unwrap();
        let mut adapter = AdapterOptions::new(4, 8.0);
        adapter.init = InitLoraWeights::Random;
        qlora.add_adapter("a", &adapter, 9).unwrap();
        dense.add_adapter("a", &adapter, 9).unwrap();
        let x = random(&mut rng, 11, in_f, 1.0);
        let dy = random(&mut rng, 11, out_f, 1.0);
        let y_q = qlora.forward(x.view()).unwrap();
        let y_d = dense.forward(x.view()).unwrap();
        assert_rel_close(&y_q, &y_d, 1e-5, "y");
        let dx_q = qlora.backward(dy.view()).unwrap();
        let dx_d = dense.backward(dy.view()).unwrap();
        assert_rel_close(&dx_q, &dx_d, 1e-5, "dx");
        let (aq, ad) = (qlora.adapter("a").unwrap(), dense.adapter("a").unwrap());
        assert_rel_close(aq.grad_a(), ad.grad_a(), 1e-5, "dA");
        assert_rel_close(aq.grad_b(), ad.grad_b(), 1e-5, "dB");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// |x·deq(W)ᵀ − x·Wᵀ| ≤ Σ_j |x_j|·bound_j for every output: the QLoRA layer (with an
    /// adapter, which both sides share) stays within the NF4 error bound of the f32 layer.
    #[test]
    fn qlora_output_within_the_nf4_bound_of_the_f32_layer(
        seed in 0u64..1000, out_f in 1usize..40, in_f in 1usize..90, tokens in 1usize..6,
        double_quant in any::<bool>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = random(&mut rng, out_f, in_f, 2.0);
        let options = Nf4Options { double_quant, tile: 8, ..Nf4Options::default() };
        let r = 1.min(out_f.min(in_f));
        let mut adapter = AdapterOptions::new(r, 2.0);
        adapter.init = InitLoraWeights::Random;
        let mut qlora = QLoraLinear::qlora(w.view(), None, &options, "p").unwrap();
        let mut dense = LoraLinear::dense(w.clone(), None, "p").unwrap();
        qlora.add_adapter("a", &adapter, seed).unwrap();
        dense.add_adapter("a", &adapter, seed).unwrap();
        let bound = nf4_error_bound(w.view(), qlora.base().weight()).unwrap();
        let x = random(&mut rng, tokens, in_f, 1.0);
        let y_q = qlora.forward(x.view()).unwrap();
        let y_d = dense.forward(x.view()).unwrap();
        for t in 0..tokens {
            for o in 0..out_f {
                let limit: f32 = (0..in_f).map(|j| x[[t, j]].abs() * bound[[o, j]]).sum();
                let err = (y_q[[t, o]] - y_d[[t, o]]).abs();
                prop_assert!(err <= limit * 1.0001 + 1e-5, "{err} > {limit} at ({t}, {o})");
            }
        }
    }
}

#[test]
fn bnb_checkpoint_q_proj_is_within_the_nf4_bound_of_the_f32_base() {
    let bytes = std::fs::read(data("base_bnb4_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let base = Nf4Base::from_bnb_safetensors(&st, Q_PROJ).unwrap();
    assert_eq!(base.storage_kind(), "nf4");
    let f32_bytes = std::fs::read(data("base_model.safetensors")).unwrap();
    let f32_st = SafeTensors::deserialize(&f32_bytes).unwrap();
    let w = matrix(&f32_st, &format!("{Q_PROJ}.weight"));
    assert_eq!((base.out_features(), base.in_features()), w.dim());
    let w_hat = base.dense_weight().unwrap();
    let bound = nf4_error_bound(w.view(), base.weight()).unwrap();
    for ((a, b), e) in w.iter().zip(w_hat.iter()).zip(bound.iter()) {
        assert!((a - b).abs() <= *e, "{a} vs {b} (bound {e})");
    }
    // Our own quantization of the f32 weight is bit-identical to bitsandbytes'.
    let ours = Nf4Base::quantize(w.view(), None, &Nf4Options::default(), Q_PROJ).unwrap();
    assert_eq!(ours.weight(), base.weight());
    // A missing part is named.
    let err = Nf4Base::from_bnb_safetensors(&st, "model.layers.0.self_attn.nope").unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn golden_qlora_adapter_output_matches_the_formula_on_the_dequantized_weight() {
    let bytes = std::fs::read(data("base_bnb4_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let base = Nf4Base::from_bnb_safetensors(&st, Q_PROJ).unwrap();
    let adapter_bytes = std::fs::read(data("adapter_qlora/adapter_model.safetensors")).unwrap();
    let ad = SafeTensors::deserialize(&adapter_bytes).unwrap();
    let a = matrix(&ad, &format!("base_model.model.{Q_PROJ}.lora_A.weight"));
    let b = matrix(&ad, &format!("base_model.model.{Q_PROJ}.lora_B.weight"));
    let options = AdapterOptions::new(4, 8.0);
    let adapter =
        LoraAdapter::from_weights(a.clone(), b.clone(), None, &options, 0, Q_PROJ).unwrap();
    let w_hat = base.dense_weight().unwrap().into_owned();
    let mut layer = LoraLinear::new(base, Q_PROJ);
    layer.insert_adapter("default", adapter).unwrap();
    let x = Array2::from_shape_fn((5, w_hat.ncols()), |(t, j)| {
        ((t * 31 + j) as f32 * 0.17).sin()
    });
    let y = layer.forward(x.view()).unwrap();
    // y = x·deq(W)ᵀ + (α/r)·x·Aᵀ·Bᵀ, in f64.
    let reference = Array2::from_shape_fn(y.dim(), |(t, o)| {
        let base: f64 = (0..x.ncols())
            .map(|j| x[[t, j]] as f64 * w_hat[[o, j]] as f64)
            .sum();
        let low: f64 = (0..a.nrows())
            .map(|k| {
                let h: f64 = (0..x.ncols())
                    .map(|j| x[[t, j]] as f64 * a[[k, j]] as f64)
                    .sum();
                h * b[[o, k]] as f64
            })
            .sum();
        (base + 2.0 * low) as f32
    });
    assert_rel_close(&y, &reference, 1e-5, "golden QLoRA q_proj output");
    // The 4-bit base refuses in-place merging; the merges make new weights.
    assert!(layer
        .merge()
        .unwrap_err()
        .to_string()
        .contains("merge_to_f32"));
    let merged = layer.merge_to_f32().unwrap();
    let y_merged = x.dot(&merged.t());
    assert_rel_close(&y_merged, &y, 1e-5, "merge_to_f32");
    let requantized = layer.merge_to_nf4().unwrap();
    let bound = nf4_error_bound(merged.view(), requantized.weight()).unwrap();
    let w_new = requantized.dense_weight().unwrap();
    for ((a, b), e) in merged.iter().zip(w_new.iter()).zip(bound.iter()) {
        assert!((a - b).abs() <= *e);
    }
}

#[test]
fn loftq_error_decreases_and_beats_plain_nf4() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // A weight with a strong low-rank part plus noise, as trained weights have.
    let u = random(&mut rng, 64, 4, 1.0);
    let v = random(&mut rng, 4, 128, 1.0);
    let w = u.dot(&v) + random(&mut rng, 64, 128, 0.1);
    let nf4 = Nf4Options::default();
    let plain = Nf4Base::quantize(w.view(), None, &nf4, "w").unwrap();
    let plain_error = frobenius_error(w.view(), plain.dense_weight().unwrap().view()).unwrap();
    // α ≠ r: the scale must be folded into A and B.
    let options = AdapterOptions::new(4, 16.0);
    let config = LoftqConfig {
        loftq_bits: 4,
        loftq_iter: 5,
        quantization: nf4,
    };
    let result = loftq_init(w.view(), &options, &config, "w").unwrap();
    for pair in result.errors.windows(2) {
        assert!(pair[1] <= pair[0] * 1.001, "{:?}", result.errors);
    }
    assert!(result.errors[4] < result.errors[0], "{:?}", result.errors);
    assert!(
        result.errors[0] < plain_error,
        "{:?} vs {plain_error}",
        result.errors
    );
    // The reported error is the layer's: deq(Q) + s·B·A.
    let mut layer =
        QLoraLinear::loftq(w.view(), None, "default", &options, &config, 0, "w").unwrap();
    layer.set_training(false);
    let approx = layer.merge_to_f32().unwrap();
    let err = frobenius_error(w.view(), approx.view()).unwrap();
    assert!(
        (err - result.errors[4]).abs() <= 1e-3 * err,
        "{err} vs {:?}",
        result.errors
    );
    let bad = LoftqConfig {
        loftq_bits: 2,
        loftq_iter: 1,
        quantization: nf4,
    };
    let e = loftq_init(w.view(), &options, &bad, "w").unwrap_err();
    assert!(e.to_string().contains("loftq_bits"), "{e}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let w = Array2::<f32>::ones((4, 64));
    let base = Nf4Base::quantize(w.view(), None, &Nf4Options::default(), "m").unwrap();
    let mut y = Array2::zeros((2, 4));
    let e = base
        .matmul_into(Array2::zeros((2, 63)).view(), y.view_mut())
        .unwrap_err();
    assert!(e.to_string().contains("m"), "{e}");
    let mut w_nan = w.clone();
    w_nan[[1, 3]] = f32::NAN;
    let e = Nf4Base::quantize(w_nan.view(), None, &Nf4Options::default(), "m").unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    let bad_tile = Nf4Options {
        tile: 0,
        ..Nf4Options::default()
    };
    assert!(Nf4Base::quantize(w.view(), None, &bad_tile, "m").is_err());
    let e = Nf4Base::quantize(
        w.view(),
        Some(Array1::zeros(3)),
        &Nf4Options::default(),
        "m",
    )
    .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}
