//! LoraLinear and AdapterSet behaviour: initialisations, adapter management, merging, errors,
//! and proptests of merge→unmerge and save→load identities.

use lora_core::peft::{load_adapter, save_adapter};
use lora_core::{AdapterOptions, AdapterSet, InitLoraWeights, LoraConfig, LoraError, LoraLinear};
use ndarray::{Array1, Array2};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
}

fn opts(r: usize, alpha: f64, init: InitLoraWeights) -> AdapterOptions {
    AdapterOptions {
        init,
        ..AdapterOptions::new(r, alpha)
    }
}

#[test]
fn kaiming_and_gaussian_inits_follow_peft_bounds() {
    let mut layer = LoraLinear::dense(Array2::zeros((64, 400)), None, "l").unwrap();
    layer
        .add_adapter("k", &opts(16, 16.0, InitLoraWeights::Kaiming), 1)
        .unwrap();
    layer
        .add_adapter("g", &opts(16, 16.0, InitLoraWeights::Gaussian), 2)
        .unwrap();
    layer
        .add_adapter("f", &opts(16, 16.0, InitLoraWeights::Random), 3)
        .unwrap();
    let bound = 1.0 / 400f32.sqrt();
    let k = layer.adapter("k").unwrap();
    assert!(k.a().iter().all(|v| v.abs() <= bound));
    // Uniform on ±bound has max close to the bound.
    assert!(k.a().iter().any(|v| v.abs() > 0.95 * bound));
    assert!(k.b().iter().all(|&v| v == 0.0));
    let g = layer.adapter("g").unwrap();
    let n = g.a().len() as f64;
    let var = g.a().iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
    assert!(
        (var.sqrt() - 1.0 / 16.0).abs() < 0.1 / 16.0,
        "std {}",
        var.sqrt()
    );
    assert!(g.b().iter().all(|&v| v == 0.0));
    let f = layer.adapter("f").unwrap();
    assert!(f.b().iter().all(|v| v.abs() <= 0.25) && f.b().iter().any(|&v| v != 0.0));
    // Seeded: the same seed gives the same adapter.
    let mut again = LoraLinear::dense(Array2::zeros((64, 400)), None, "l").unwrap();
    again
        .add_adapter("k", &opts(16, 16.0, InitLoraWeights::Kaiming), 1)
        .unwrap();
    assert_eq!(again.adapter("k").unwrap().a(), k.a());
}

#[test]
fn pissa_moves_the_principal_part_into_the_adapter() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let w = random(&mut rng, 8, 6);
    let mut layer = LoraLinear::dense(w.clone(), None, "p").unwrap();
    layer
        .add_adapter("pissa", &opts(2, 4.0, InitLoraWeights::Pissa), 0)
        .unwrap();
    let delta = layer.adapter("pissa").unwrap().delta_weight().unwrap();
    let residual = layer.base().weight().clone();
    // W = residual + s·B·A, and the adapted layer computes W from the start.
    for ((r, d), w) in residual.iter().zip(delta.iter()).zip(w.iter()) {
        assert!((r + d - w).abs() < 1e-5);
    }
    // s·B·A is the rank-2 truncation: its singular values are W's top two.
    let top = lora_core::svd::truncated_svd(w.view(), 2, "w").unwrap();
    let of_delta = lora_core::svd::truncated_svd(delta.view(), 2, "d").unwrap();
    for (a, b) in top.s.iter().zip(of_delta.s.iter()) {
        assert!((a - b).abs() < 1e-4 * a);
    }
    // And the residual keeps the rest: its top singular value is W's third.
    let all = lora_core::svd::truncated_svd(w.view(), 6, "w").unwrap();
    let res = lora_core::svd::truncated_svd(residual.view(), 1, "r").unwrap();
    assert!((res.s[0] - all.s[2]).abs() < 1e-4 * all.s[2]);
}

#[test]
fn rank_and_option_errors_name_the_layer_and_option() {
    let mut layer = LoraLinear::dense(Array2::eye(4), None, "model.q_proj").unwrap();
    let e = layer
        .add_adapter("a", &AdapterOptions::new(5, 1.0), 0)
        .unwrap_err();
    assert!(
        e.to_string().contains("r for model.q_proj") && e.to_string().contains("1..=4"),
        "{e}"
    );
    let e = layer
        .add_adapter("a", &AdapterOptions::new(0, 1.0), 0)
        .unwrap_err();
    assert!(e.to_string().contains("r for"), "{e}");
    let e = layer
        .add_adapter("a", &AdapterOptions::new(2, -1.0), 0)
        .unwrap_err();
    assert!(e.to_string().contains("lora_alpha"), "{e}");
    let mut o = AdapterOptions::new(2, 1.0);
    o.dropout = 1.0;
    assert!(layer
        .add_adapter("a", &o, 0)
        .unwrap_err()
        .to_string()
        .contains("lora_dropout"));
    let e = layer
        .add_adapter(
            "a",
            &opts(2, 1.0, InitLoraWeights::Other("olora".into())),
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("olora"), "{e}");
    layer
        .add_adapter("a", &AdapterOptions::new(2, 1.0), 0)
        .unwrap();
    assert!(matches!(
        layer.add_adapter("a", &AdapterOptions::new(2, 1.0), 0),
        Err(LoraError::DuplicateAdapter { .. })
    ));
    assert!(matches!(
        layer.set_active(&["nope"]),
        Err(LoraError::UnknownAdapter { .. })
    ));
}

#[test]
fn forward_and_backward_errors_are_reported_not_panics() {
    let mut layer = LoraLinear::dense(Array2::eye(4), None, "m").unwrap();
    layer
        .add_adapter("a", &AdapterOptions::new(2, 1.0), 0)
        .unwrap();
    let e = layer.backward(Array2::zeros((2, 4)).view()).unwrap_err();
    assert!(e.to_string().contains("no forward"), "{e}");
    let e = layer.forward(Array2::zeros((2, 5)).view()).unwrap_err();
    assert!(e.to_string().contains("(tokens, 4)"), "{e}");
    let mut x = Array2::zeros((2, 4));
    x[[1, 2]] = f32::INFINITY;
    let e = layer.forward(x.view()).unwrap_err();
    assert!(e.to_string().contains("index 6"), "{e}");
    layer.forward(Array2::zeros((2, 4)).view()).unwrap();
    let e = layer.backward(Array2::zeros((3, 4)).view()).unwrap_err();
    assert!(e.to_string().contains("backward dy"), "{e}");
    // The stored forward survives a bad backward.
    layer.backward(Array2::zeros((2, 4)).view()).unwrap();
    assert!(LoraLinear::dense(Array2::from_elem((2, 2), f32::NAN), None, "w").is_err());
    assert!(LoraLinear::dense(Array2::eye(2), Some(Array1::zeros(3)), "w").is_err());
}

#[test]
fn active_disabled_and_merged_states() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let w = random(&mut rng, 5, 4);
    let bias = Array1::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 1.0]);
    let mut layer = LoraLinear::dense(w.clone(), Some(bias.clone()), "m").unwrap();
    layer
        .add_adapter("a", &opts(2, 2.0, InitLoraWeights::Random), 1)
        .unwrap();
    let mut dora = opts(2, 2.0, InitLoraWeights::Random);
    dora.use_dora = true;
    layer.add_adapter("b", &dora, 2).unwrap();
    assert_eq!(layer.active(), ["a"]);
    let x = random(&mut rng, 3, 4);
    let base_only = {
        let mut plain = LoraLinear::dense(w.clone(), Some(bias), "m").unwrap();
        plain.forward(x.view()).unwrap()
    };
    let only_a = layer.forward(x.view()).unwrap();
    // DoRA first: merging is then equivalent to the unmerged forward (see LoraLinear::merge).
    layer.set_active(&["b", "a"]).unwrap();
    let both = layer.forward(x.view()).unwrap();
    assert_ne!(only_a, both);
    // Trainable: both active adapters (A, B, and b's magnitude).
    assert_eq!(layer.trainable_parameters(), 2 * (2 * 4 + 5 * 2) + 5);
    assert_eq!(layer.total_parameters(), 20 + 5 + 2 * (2 * 4 + 5 * 2) + 5);

    layer.merge().unwrap();
    assert!(layer.is_merged());
    let merged = layer.forward(x.view()).unwrap();
    for (a, b) in merged.iter().zip(both.iter()) {
        assert!((a - b).abs() < 1e-5, "merged {a} vs {b}");
    }
    assert!(
        layer.adapter_mut("a").is_err(),
        "merged adapters cannot change"
    );
    layer.disable_adapters().unwrap();
    assert!(!layer.is_merged());
    let off = layer.forward(x.view()).unwrap();
    for (a, b) in off.iter().zip(base_only.iter()) {
        assert!((a - b).abs() < 1e-5);
    }
    layer.enable_adapters();
    let again = layer.forward(x.view()).unwrap();
    for (a, b) in again.iter().zip(both.iter()) {
        assert!((a - b).abs() < 1e-5);
    }
    let removed = layer.remove_adapter("a").unwrap();
    assert_eq!(removed.rank(), 2);
    assert_eq!(layer.active(), ["b"]);
}

#[test]
fn set_targets_ranks_and_summary() {
    let mut set = AdapterSet::new();
    for l in 0..2 {
        set.add_module(
            &format!("model.layers.{l}.self_attn.q_proj"),
            Array2::eye(8),
            None,
        )
        .unwrap();
        set.add_module(
            &format!("model.layers.{l}.mlp.up_proj"),
            Array2::ones((16, 8)),
            None,
        )
        .unwrap();
    }
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "up_proj"]);
    config
        .rank_pattern
        .0
        .push(("layers.1.mlp.up_proj".into(), 2));
    assert_eq!(set.add_adapter("default", config.clone(), 3).unwrap(), 4);
    assert_eq!(
        set.layer("model.layers.1.mlp.up_proj")
            .unwrap()
            .adapter("default")
            .unwrap()
            .rank(),
        2
    );
    assert_eq!(
        set.layer("model.layers.0.mlp.up_proj")
            .unwrap()
            .adapter("default")
            .unwrap()
            .rank(),
        4
    );
    let s = set.summary();
    let adapter_params = 2 * (4 * 8 + 8 * 4) + (4 * 8 + 16 * 4) + (2 * 8 + 16 * 2);
    assert_eq!(s.trainable_parameters, adapter_params);
    assert_eq!(s.frozen_parameters, 2 * (64 + 128));
    assert_eq!(s.bytes_by_kind["f32"], 2 * (64 + 128) * 4);
    assert_eq!(s.bytes_by_kind["adapter"], adapter_params * 4);
    assert!(s.to_string().contains("trainable params"));
    // A second adapter is inactive (frozen) until activated.
    set.add_adapter("second", config, 4).unwrap();
    assert_eq!(set.summary().trainable_parameters, adapter_params);
    set.set_active(&["second"]).unwrap();
    assert_eq!(set.active(), ["second"]);
    let mut none = LoraConfig::new(2, 2.0, &["k_proj"]);
    none.r = 2;
    assert!(set
        .add_adapter("none", none, 0)
        .unwrap_err()
        .to_string()
        .contains("matches none"));
    // A layer that rejects the rank leaves the set unchanged.
    let too_big = LoraConfig::new(9, 2.0, &["q_proj"]);
    assert!(set.add_adapter("big", too_big, 0).is_err());
    assert!(set.config("big").is_err());
    assert!(set
        .layer("model.layers.0.self_attn.q_proj")
        .unwrap()
        .adapter("big")
        .is_err());
    set.delete_adapter("second").unwrap();
    assert!(set.config("second").is_err());
}

fn rel_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    let scale = b
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter()
        .zip(b.iter())
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merge_then_unmerge_restores_w(
        out_f in 1usize..12, in_f in 1usize..12, r_seed in 0usize..100,
        alpha in 0.1f64..32.0, dora in any::<bool>(), rslora in any::<bool>(), seed in any::<u64>(),
        two in any::<bool>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = random(&mut rng, out_f, in_f);
        let r = 1 + r_seed % out_f.min(in_f);
        let mut layer = LoraLinear::dense(w.clone(), None, "p").unwrap();
        let mut o = opts(r, alpha, InitLoraWeights::Random);
        o.use_dora = dora;
        o.use_rslora = rslora;
        layer.add_adapter("a", &o, seed).unwrap();
        if two {
            // A DoRA adapter ("a") comes first so that merging matches the unmerged forward.
            layer.add_adapter("b", &opts(r, alpha, InitLoraWeights::Random), seed ^ 1).unwrap();
            layer.set_active(&["a", "b"]).unwrap();
        }
        let x = random(&mut rng, 3, in_f);
        let before = layer.forward(x.view()).unwrap();
        layer.merge().unwrap();
        let merged = layer.forward(x.view()).unwrap();
        prop_assert!(rel_diff(&merged, &before) < 1e-4);
        // Rounding of W + ΔW is the only loss: within 1e-6 of the larger of |W| and |W + ΔW|
        // (1e-6 of |W| itself whenever ΔW is no larger than W, as in practice).
        let merged_scale = layer.base().weight().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let w_scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        layer.unmerge().unwrap();
        let err = layer.base().weight().iter().zip(w.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        prop_assert!(err <= 1e-6 * w_scale.max(merged_scale), "err {} scales {} {}", err, w_scale, merged_scale);
    }

    #[test]
    fn save_then_load_is_identity(
        out_f in 1usize..10, in_f in 1usize..10, r_seed in 0usize..100,
        alpha in 0.5f64..20.0, dora in any::<bool>(), rslora in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut set = AdapterSet::new();
        set.add_module("model.layers.0.self_attn.q_proj", random(&mut rng, out_f, in_f), None).unwrap();
        set.add_module("model.layers.0.self_attn.v_proj", random(&mut rng, in_f, out_f), None).unwrap();
        let r = 1 + r_seed % out_f.min(in_f);
        let mut config = LoraConfig::new(r, alpha, &["q_proj", "v_proj"]);
        config.use_dora = dora;
        config.use_rslora = rslora;
        config.init_lora_weights = InitLoraWeights::Random;
        set.add_adapter("default", config, seed).unwrap();
        let dir = std::env::temp_dir().join(format!("lora-core-prop-{}-{seed}", std::process::id()));
        save_adapter(&dir, &set, "default").unwrap();
        let loaded = load_adapter(&dir, &set.shapes()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        prop_assert_eq!(&loaded.config, set.config("default").unwrap());
        for (path, weights) in &loaded.modules {
            let ad = set.layer(path).unwrap().adapter("default").unwrap();
            // Bit-identical, NaN-free: compare the bits.
            let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&weights.a), bits(ad.a()));
            prop_assert_eq!(bits(&weights.b), bits(ad.b()));
            prop_assert_eq!(weights.magnitude.as_ref(), ad.magnitude());
        }
    }
}

/// Rough cost of the adapter paths next to the base product (run with `--ignored`; prints).
#[test]
#[ignore = "timing, not a check"]
fn timing_of_forward_and_backward() {
    use std::time::Instant;
    let (tokens, width, r) = (512, 1024, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let w = random(&mut rng, width, width);
    let x = random(&mut rng, tokens, width);
    for (name, dora) in [
        ("base only", None),
        ("lora", Some(false)),
        ("dora", Some(true)),
    ] {
        let mut layer = LoraLinear::dense(w.clone(), None, name).unwrap();
        if let Some(dora) = dora {
            let mut o = opts(r, 32.0, InitLoraWeights::Random);
            o.use_dora = dora;
            layer.add_adapter("a", &o, 1).unwrap();
        }
        let _ = layer.forward(x.view()).unwrap();
        let start = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let y = layer.forward(x.view()).unwrap();
            layer.backward(y.view()).unwrap();
        }
        println!(
            "{name}: forward+backward {tokens}x{width}x{width} r={r}: {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3 / reps as f64
        );
    }
}

#[test]
fn pissa_through_a_config_keeps_the_layer_function() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let w = random(&mut rng, 6, 5);
    let mut set = AdapterSet::new();
    set.add_module("model.layers.0.self_attn.q_proj", w.clone(), None)
        .unwrap();
    let mut config = LoraConfig::new(2, 4.0, &["q_proj"]);
    config.init_lora_weights = serde_json::from_str("\"pissa\"").unwrap();
    config.use_dora = true;
    set.add_adapter("pissa", config, 0).unwrap();
    let layer = set.layer("model.layers.0.self_attn.q_proj").unwrap();
    // Residual + principal = W, and DoRA's m starts at ‖W‖_row, so the merged weight is W.
    let merged = layer.merged_weight().unwrap();
    for (a, b) in merged.iter().zip(w.iter()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_ne!(layer.base().weight(), &w);
}

/// A caller's shape mistake in `forward_into`/`backward_into` (DoRA included) is an error.
#[test]
fn adapter_forward_and_backward_into_refuse_wrong_shapes() {
    use lora_core::{DenseBase, LoraAdapter};
    let mut options = opts(2, 4.0, InitLoraWeights::Random);
    options.use_dora = true;
    let w = Array2::from_shape_fn((5, 4), |(i, j)| (i as f32 - j as f32) * 0.25 + 0.1);
    let base = DenseBase::new(w.clone(), None, "q").unwrap();
    let mut adapter = LoraAdapter::new(&options, 5, 4, 1, "q").unwrap();
    adapter.init_dora_magnitude(w.view()).unwrap();
    let x = Array2::<f32>::ones((3, 4));
    // y of the wrong shape, x of the wrong width, base_out of the wrong shape, a base of
    // another shape.
    let mut y = Array2::<f32>::zeros((3, 4));
    assert!(adapter
        .forward_into(&base, x.view(), None, true, y.view_mut())
        .is_err());
    let mut y = Array2::<f32>::zeros((3, 5));
    let wide = Array2::<f32>::ones((3, 6));
    assert!(adapter
        .forward_into(&base, wide.view(), None, true, y.view_mut())
        .is_err());
    let bad_out = Array2::<f32>::zeros((2, 5));
    let err = adapter
        .forward_into(&base, x.view(), Some(bad_out.view()), false, y.view_mut())
        .unwrap_err();
    assert!(err.to_string().contains("base_out"), "{err}");
    let other = DenseBase::new(Array2::ones((6, 4)), None, "o").unwrap();
    assert!(adapter
        .forward_into(&other, x.view(), None, true, y.view_mut())
        .is_err());
    adapter
        .forward_into(&base, x.view(), None, true, y.view_mut())
        .unwrap();
    let dy = Array2::<f32>::ones((3, 5));
    let mut dx = Array2::<f32>::zeros((3, 3));
    let err = adapter
        .backward_into(&base, x.view(), dy.view(), dx.view_mut(), false)
        .unwrap_err();
    assert!(err.to_string().contains("dx"), "{err}");
    let bad_dy = Array2::<f32>::ones((3, 4));
    let mut dx = Array2::<f32>::zeros((3, 4));
    assert!(adapter
        .backward_into(&base, x.view(), bad_dy.view(), dx.view_mut(), false)
        .is_err());
    adapter
        .backward_into(&base, x.view(), dy.view(), dx.view_mut(), false)
        .unwrap();
}
