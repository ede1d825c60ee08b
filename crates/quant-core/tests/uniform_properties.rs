//! Invariants and error behaviour of the uniform and Pi grids, the stored form and the
//! learned-step quantizers.

use ndarray::Array2;
use proptest::prelude::*;
use quant_core::error::QuantError;
use quant_core::nf4_grid::Nf4GridQuantizer;
use quant_core::packing::PackedCodes;
use quant_core::pi::{pi_step, PiQuantizer};
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
use quant_core::ste::Ste;
use quant_core::uniform::{
    absmax_params, error_stats, init_params, mse_clip_search, quantize_tensor, ClipSearch,
    Granularity, GridKind, GroupLayout, TensorQuantSpec, UniformGrid, UniformQuantized,
    UniformQuantizer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn spec(bits: u32, granularity: Granularity, symmetric: bool, init: InitMethod) -> TensorQuantSpec {
    TensorQuantSpec {
        kind: GridKind::Uniform,
        bits,
        granularity,
        symmetric,
        init,
    }
}

fn granularity_strategy() -> impl Strategy<Value = Granularity> {
    prop_oneof![
        Just(Granularity::PerTensor),
        Just(Granularity::PerChannel),
        Just(Granularity::PerToken),
        (1usize..12).prop_map(|size| Granularity::PerBlock { size }),
    ]
}

/// A small matrix with moderate values; some rows forced to all zeros.
fn matrix_strategy() -> impl Strategy<Value = Array2<f32>> {
    (1usize..6, 1usize..33).prop_flat_map(|(rows, cols)| {
        (
            prop::collection::vec(-10.0f32..10.0, rows * cols),
            prop::collection::vec(any::<bool>(), rows),
        )
            .prop_map(move |(values, zero_rows)| {
                let mut w = Array2::from_shape_vec((rows, cols), values).unwrap();
                for (r, zero) in zero_rows.into_iter().enumerate() {
                    if zero && r % 2 == 1 {
                        w.row_mut(r).fill(0.0);
                    }
                }
                w
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn absmax_error_is_at_most_half_a_step_and_the_stored_form_is_consistent(
        w in matrix_strategy(),
        bits in 2u32..=8,
        symmetric in any::<bool>(),
        granularity in granularity_strategy(),
    ) {
        let q = quantize_tensor(w.view(), &spec(bits, granularity, symmetric, InitMethod::Absmax)).unwrap();
        let (rows, cols) = w.dim();
        let layout = GroupLayout::new(rows, cols, granularity).unwrap();
        prop_assert_eq!(q.scales().len(), layout.num_groups());
        prop_assert_eq!(q.zero_points().len(), if symmetric { 0 } else { layout.num_groups() });
        prop_assert_eq!(q.codes().len(), rows * cols);

        let w_hat = q.dequantize();
        for r in 0..rows {
            for (g, range) in layout.row_segments(r) {
                let s = q.scales()[g];
                for c in range {
                    let err = (w[[r, c]] - w_hat[[r, c]]).abs();
                    prop_assert!(w_hat[[r, c]].is_finite());
                    prop_assert!(err <= 0.5 * s * (1.0 + 1e-5) + 1e-6,
                        "({r},{c}) err {err} step {s}");
                }
            }
        }
        // Bits per weight from the stored parts.
        let expected_bits = (q.codes().stored_bytes() * 8 + q.scales().len() * 32
            + q.zero_points().len() * 8) as f64 / (rows * cols) as f64;
        prop_assert_eq!(q.bits_per_weight(), expected_bits);
        // The stored form survives serialization.
        let json = serde_json::to_string(&q).unwrap();
        let back: UniformQuantized = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, q);
    }

    #[test]
    fn mse_clip_search_is_never_worse_than_absmax(
        values in prop::collection::vec(-5.0f32..5.0, 1..200),
        bits in 2u32..=8,
        symmetric in any::<bool>(),
    ) {
        let grid = UniformGrid::new(bits, symmetric).unwrap();
        let found = mse_clip_search(&values, grid, &ClipSearch::default()).unwrap();
        let absmax = absmax_params(&values, grid).unwrap();
        let mse = |scale: f32, zp: i32| {
            let w = Array2::from_shape_vec((1, values.len()), values.clone()).unwrap();
            let p = quant_core::uniform::GroupParams { scale, zero_point: zp };
            let q = UniformQuantized::quantize_with_params(
                w.view(), bits, Granularity::PerTensor, symmetric, &[p]).unwrap();
            q.error_stats(w.view()).unwrap().rmse.powi(2)
        };
        let searched = mse(found.params.scale, found.params.zero_point);
        prop_assert!(searched <= mse(absmax.scale, absmax.zero_point) * (1.0 + 1e-9) + 1e-12);
        prop_assert!((searched - found.mse).abs() <= 1e-9 + 1e-6 * searched);
        prop_assert!((0.3..=1.0).contains(&found.ratio));
    }

    #[test]
    fn a_learned_step_quantizer_agrees_with_its_exported_stored_form(
        w in matrix_strategy(),
        bits in 2u32..=8,
        symmetric in any::<bool>(),
        granularity in granularity_strategy(),
    ) {
        let mut q = UniformQuantizer::new(bits, symmetric, granularity, Ste::Lsq).unwrap();
        q.init_from_weights(w.view(), InitMethod::MseClipSearch).unwrap();
        let out = q.forward(w.view()).unwrap();
        let stored = q.export(w.view()).unwrap();
        prop_assert_eq!(&stored.dequantize(), &out.dequantized);
        prop_assert_eq!(stored.codes().unpack(), out.codes.iter().copied().collect::<Vec<_>>());
        prop_assert!(out.codes.iter().all(|&c| u32::from(c) < 1 << bits));
    }
}

#[test]
fn symmetric_codes_are_offset_by_qmin() {
    let w = Array2::from_shape_vec((1, 3), vec![-1.0f32, 0.0, 1.0]).unwrap();
    let q = quantize_tensor(
        w.view(),
        &spec(2, Granularity::PerTensor, true, InitMethod::Absmax),
    )
    .unwrap();
    // 2 bits: qmax = 1, step 1; q ∈ {−1, 0, 1} → codes q + 2.
    assert_eq!(q.codes().unpack(), vec![1, 2, 3]);
    assert_eq!(q.scales(), &[1.0]);
}

#[test]
fn asymmetric_grid_uses_the_full_range_for_one_signed_data() {
    let w = Array2::from_shape_fn((4, 64), |(r, c)| ((r * 64 + c) as f32 * 0.1).sin().abs());
    let sym = quantize_tensor(
        w.view(),
        &spec(3, Granularity::PerChannel, true, InitMethod::Absmax),
    )
    .unwrap();
    let asym = quantize_tensor(
        w.view(),
        &spec(3, Granularity::PerChannel, false, InitMethod::Absmax),
    )
    .unwrap();
    assert!(asym.zero_points().iter().all(|&z| z == 0));
    let e_sym = sym.error_stats(w.view()).unwrap().rmse;
    let e_asym = asym.error_stats(w.view()).unwrap().rmse;
    assert!(e_asym < 0.6 * e_sym, "asym {e_asym} sym {e_sym}");
}

#[test]
fn all_zero_groups_never_produce_nan() {
    let w = Array2::<f32>::zeros((3, 8));
    for symmetric in [true, false] {
        for init in [InitMethod::Absmax, InitMethod::MseClipSearch] {
            let q = quantize_tensor(
                w.view(),
                &spec(4, Granularity::PerBlock { size: 3 }, symmetric, init),
            )
            .unwrap();
            assert!(q.scales().iter().all(|&s| s == 1.0));
            assert_eq!(q.dequantize(), w);
            let mut learned =
                UniformQuantizer::new(4, symmetric, Granularity::PerChannel, Ste::Lsq).unwrap();
            learned.init_from_weights(w.view(), init).unwrap();
            let out = learned.forward(w.view()).unwrap();
            assert_eq!(out.dequantized, w);
            let g = learned.backward(Array2::ones((3, 8)).view()).unwrap();
            assert!(g.params.iter().all(|p| p.is_finite()));
        }
        let mut nf4 = Nf4GridQuantizer::new(Granularity::PerChannel, Ste::Lsq).unwrap();
        nf4.init_from_weights(w.view(), InitMethod::MseClipSearch)
            .unwrap();
        assert_eq!(nf4.forward(w.view()).unwrap().dequantized, w);
    }
}

#[test]
fn extreme_magnitudes_stay_finite() {
    let w = Array2::from_shape_vec((1, 4), vec![f32::MAX, -f32::MAX, 1e-40, 0.0]).unwrap();
    for symmetric in [true, false] {
        let q = quantize_tensor(
            w.view(),
            &spec(8, Granularity::PerTensor, symmetric, InitMethod::Absmax),
        )
        .unwrap();
        assert!(q.scales()[0].is_finite());
        let d = q.dequantize();
        assert!(
            d.iter().all(|v| v.is_finite()),
            "symmetric {symmetric}: {d}"
        );
    }
    let tiny = Array2::from_elem((1, 3), 1e-44f32);
    let q = quantize_tensor(
        tiny.view(),
        &spec(4, Granularity::PerTensor, true, InitMethod::Absmax),
    )
    .unwrap();
    assert!(q.dequantize().iter().all(|v| v.is_finite()));
}

#[test]
fn per_token_is_per_channel_and_a_wide_block_is_a_row() {
    let w = Array2::from_shape_fn((5, 9), |(r, c)| {
        ((r * 9 + c) as f32 * 0.77).cos() * (r + 1) as f32
    });
    let quantize =
        |g| quantize_tensor(w.view(), &spec(3, g, true, InitMethod::MseClipSearch)).unwrap();
    let channel = quantize(Granularity::PerChannel);
    let token = quantize(Granularity::PerToken);
    let block = quantize(Granularity::PerBlock { size: 100 });
    assert_eq!(channel.scales(), token.scales());
    assert_eq!(channel.codes(), token.codes());
    assert_eq!(channel.scales(), block.scales());
    assert_eq!(channel.dequantize(), block.dequantize());
}

#[test]
fn clip_search_works_at_every_bit_width_and_helps_gaussian_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let w = Array2::from_shape_fn((16, 256), |_| normal.sample(&mut rng));
    for bits in 2..=8 {
        let absmax = quantize_tensor(
            w.view(),
            &spec(bits, Granularity::PerChannel, true, InitMethod::Absmax),
        )
        .unwrap();
        let mse = quantize_tensor(
            w.view(),
            &spec(
                bits,
                Granularity::PerChannel,
                true,
                InitMethod::MseClipSearch,
            ),
        )
        .unwrap();
        let (ea, em) = (
            absmax.error_stats(w.view()).unwrap().rmse,
            mse.error_stats(w.view()).unwrap().rmse,
        );
        assert!(em <= ea, "bits {bits}: mse {em} absmax {ea}");
        if bits <= 4 {
            // Gaussian tails make clipping worthwhile at low bit widths.
            assert!(em < 0.9 * ea, "bits {bits}: mse {em} absmax {ea}");
        }
    }
}

#[test]
fn pi_one_shot_stores_alpha_pi_over_k() {
    let w = Array2::from_shape_fn((3, 16), |(r, c)| ((r * 16 + c) as f32 * 0.41).sin());
    let uniform = quantize_tensor(
        w.view(),
        &spec(3, Granularity::PerChannel, true, InitMethod::MseClipSearch),
    )
    .unwrap();
    for k in 2..=5 {
        let pi_spec = TensorQuantSpec {
            kind: GridKind::Pi { k },
            ..spec(3, Granularity::PerChannel, true, InitMethod::MseClipSearch)
        };
        let pi = quantize_tensor(w.view(), &pi_spec).unwrap();
        for (&a, &b) in pi.scales().iter().zip(uniform.scales()) {
            assert!((a - b).abs() <= 1e-6 * b, "k {k}: {a} vs {b}");
        }
        // The learned quantizer computes with the very same scales.
        let mut learned = PiQuantizer::new(3, true, Granularity::PerChannel, Ste::Lsq, k).unwrap();
        learned
            .init_from_weights(w.view(), InitMethod::MseClipSearch)
            .unwrap();
        let steps: Vec<f32> = learned.params().iter().map(|&a| pi_step(a, k)).collect();
        assert_eq!(steps, pi.scales());
        assert_eq!(learned.export(w.view()).unwrap(), pi);
    }
    let bad = TensorQuantSpec {
        kind: GridKind::Pi { k: 7 },
        ..spec(3, Granularity::PerChannel, true, InitMethod::Absmax)
    };
    let err = quantize_tensor(w.view(), &bad).unwrap_err();
    assert!(err.to_string().contains("pi_k"), "{err}");
}

#[test]
fn non_finite_input_is_reported_at_its_flat_index() {
    let mut w = Array2::from_elem((3, 4), 0.5f32);
    w[[1, 2]] = f32::NAN;
    let err = quantize_tensor(
        w.view(),
        &spec(4, Granularity::PerChannel, true, InitMethod::Absmax),
    )
    .unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 6, .. }),
        "{err}"
    );

    let clean = Array2::from_elem((3, 4), 0.5f32);
    let mut q = UniformQuantizer::new(4, true, Granularity::PerChannel, Ste::Lsq).unwrap();
    assert!(matches!(
        q.init_from_weights(w.view(), InitMethod::MseClipSearch),
        Err(QuantError::NonFinite { index: 6, .. })
    ));
    q.init_from_weights(clean.view(), InitMethod::Absmax)
        .unwrap();
    assert!(matches!(
        q.forward(w.view()),
        Err(QuantError::NonFinite { index: 6, .. })
    ));
    q.forward(clean.view()).unwrap();
    let mut g = Array2::from_elem((3, 4), 1.0f32);
    g[[2, 3]] = f32::INFINITY;
    assert!(matches!(
        q.backward(g.view()),
        Err(QuantError::NonFinite { index: 11, .. })
    ));

    let mut nf4 = Nf4GridQuantizer::new(Granularity::PerChannel, Ste::Lsq).unwrap();
    assert!(matches!(
        nf4.init_from_weights(w.view(), InitMethod::Absmax),
        Err(QuantError::NonFinite { index: 6, .. })
    ));
    // Transposed (non-contiguous) views report the index in their own logical order.
    let err = quantize_tensor(
        w.t(),
        &spec(4, Granularity::PerChannel, true, InitMethod::Absmax),
    )
    .unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 7, .. }),
        "{err}"
    );
}

#[test]
fn misuse_of_a_quantizer_is_an_error_not_a_panic() {
    let w = Array2::from_elem((2, 4), 0.5f32);
    let boxed: Vec<Box<dyn DifferentiableQuantizer>> = vec![
        Box::new(UniformQuantizer::new(4, true, Granularity::PerChannel, Ste::Lsq).unwrap()),
        Box::new(PiQuantizer::new(4, true, Granularity::PerChannel, Ste::Lsq, 3).unwrap()),
        Box::new(Nf4GridQuantizer::new(Granularity::PerChannel, Ste::Lsq).unwrap()),
    ];
    for mut q in boxed {
        assert!(q.forward(w.view()).is_err(), "forward before init");
        assert!(q.backward(w.view()).is_err(), "backward before forward");
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let wrong = Array2::from_elem((4, 2), 0.5f32);
        assert!(matches!(
            q.forward(wrong.view()),
            Err(QuantError::ShapeMismatch { .. })
        ));
        q.forward(w.view()).unwrap();
        assert!(matches!(
            q.backward(wrong.view()),
            Err(QuantError::ShapeMismatch { .. })
        ));
        // An optimizer that drives a parameter negative gets told which one.
        q.params_mut()[1] = -0.1;
        let err = q.forward(w.view()).unwrap_err().to_string();
        assert!(err.contains("[1]"), "{err}");
        let empty = Array2::<f32>::zeros((0, 4));
        assert!(q
            .init_from_weights(empty.view(), InitMethod::Absmax)
            .is_err());
    }
}

#[test]
fn bad_parameters_are_rejected_with_their_names() {
    assert!(matches!(
        UniformGrid::new(1, true),
        Err(QuantError::BitsOutOfRange { bits: 1, .. })
    ));
    assert!(UniformQuantizer::new(9, true, Granularity::PerTensor, Ste::Lsq).is_err());
    let err =
        UniformQuantizer::new(4, true, Granularity::PerBlock { size: 0 }, Ste::Lsq).unwrap_err();
    assert!(
        err.to_string().contains("granularity.per_block.size"),
        "{err}"
    );
    let err = UniformQuantizer::new(4, true, Granularity::PerTensor, Ste::Clipped { clip: -1.0 })
        .unwrap_err();
    assert!(err.to_string().contains("ste.clip"), "{err}");
    let err = ClipSearch {
        min_ratio: 0.5,
        max_ratio: 0.4,
        steps: 3,
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("max_ratio"), "{err}");
    let w = Array2::from_elem((2, 2), 1.0f32);
    let grid = UniformGrid::new(4, true).unwrap();
    let bad_search = ClipSearch {
        steps: 0,
        ..ClipSearch::default()
    };
    let err = init_params(
        w.view(),
        Granularity::PerTensor,
        grid,
        InitMethod::MseClipSearch,
        &bad_search,
    )
    .unwrap_err();
    assert!(err.to_string().contains("clip_search.steps"), "{err}");
}

#[test]
fn stored_parts_are_checked() {
    let codes = PackedCodes::pack(&[0, 1, 2, 3], 4).unwrap();
    let ok = UniformQuantized::from_parts(
        (2, 2),
        4,
        Granularity::PerChannel,
        false,
        codes.clone(),
        vec![0.1, 0.2],
        vec![3, 4],
    )
    .unwrap();
    assert_eq!(ok.dequantize()[[1, 1]], (3.0 - 4.0) * 0.2);
    let try_parts = |bits, scales: Vec<f32>, zps: Vec<u8>| {
        UniformQuantized::from_parts(
            (2, 2),
            bits,
            Granularity::PerChannel,
            false,
            codes.clone(),
            scales,
            zps,
        )
    };
    assert!(
        try_parts(3, vec![0.1, 0.2], vec![3, 4]).is_err(),
        "code width"
    );
    assert!(try_parts(4, vec![0.1], vec![3, 4]).is_err(), "scale count");
    let err = try_parts(4, vec![0.1, f32::NAN], vec![3, 4]).unwrap_err();
    assert!(err.to_string().contains("scales[1]"), "{err}");
    assert!(
        try_parts(4, vec![0.1, 0.2], vec![3]).is_err(),
        "zero point count"
    );
    let err = try_parts(4, vec![0.1, 0.2], vec![3, 16]).unwrap_err();
    assert!(err.to_string().contains("zero_points[1]"), "{err}");
    let bad_json = serde_json::to_string(&ok)
        .unwrap()
        .replace("[3,4]", "[3,99]");
    assert!(serde_json::from_str::<UniformQuantized>(&bad_json).is_err());
}

#[test]
fn error_stats_need_matching_shapes() {
    let a = Array2::<f32>::zeros((2, 3));
    let b = Array2::<f32>::zeros((3, 2));
    assert!(matches!(
        error_stats(a.view(), b.view()),
        Err(QuantError::ShapeMismatch { .. })
    ));
}
