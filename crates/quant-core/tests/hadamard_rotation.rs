//! The fast Walsh–Hadamard transform and the randomized Hadamard rotation: agreement with the
//! explicit matrices, orthogonality, exact inverses, invariance of `x·Wᵀ`, and the reason the
//! rotation exists — it makes outlier-heavy weights easier to quantize.

use ndarray::{s, Array1, Array2};
use proptest::prelude::*;
use quant_core::error::QuantError;
use quant_core::hadamard::{fwht, fwht_rows, hadamard_matrix, HadamardRotation};
use quant_core::linalg::gemm;
use quant_core::rounding::fake_quant_scalar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn gaussian_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    Array2::from_shape_fn((rows, cols), |_| normal.sample(&mut rng))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn matmul_xwt(x: &Array2<f32>, w: &Array2<f32>) -> Array2<f32> {
    let mut y = Array2::zeros((x.nrows(), w.nrows()));
    gemm(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap();
    y
}

#[test]
fn fwht_matches_the_explicit_hadamard_matrix() {
    for log_n in 0..=9 {
        let n = 1usize << log_n;
        let h = hadamard_matrix(n).unwrap();
        let x = gaussian_matrix(1, n, log_n as u64).row(0).to_owned();
        let expected: Array1<f32> = h.dot(&x);
        let mut got = x.to_vec();
        fwht(&mut got).unwrap();
        let tol = 1e-5 * (n as f32).sqrt().max(1.0);
        assert!(
            max_abs_diff(&got, expected.as_slice().unwrap()) < tol,
            "n = {n}"
        );
    }
}

#[test]
fn fwht_is_its_own_inverse_beyond_a_million_elements() {
    // 2^21 elements: far past any fixed-size table, and across the cache-blocked stages.
    let n = 1usize << 21;
    let original: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1001) as f32 - 500.0).collect();
    let mut x = original.clone();
    fwht(&mut x).unwrap();
    let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let (before, after) = (norm(&original), norm(&x));
    assert!((before - after).abs() / before < 1e-5);
    fwht(&mut x).unwrap();
    assert!(max_abs_diff(&x, &original) < 1e-2);
}

#[test]
fn fwht_rejects_bad_lengths_and_non_finite_values() {
    assert!(matches!(
        fwht(&mut []),
        Err(QuantError::InvalidParameter { .. })
    ));
    assert!(matches!(
        fwht(&mut [1.0; 12]),
        Err(QuantError::InvalidParameter { .. })
    ));
    let mut x = [1.0f32, 2.0, f32::INFINITY, f32::NAN];
    let err = fwht(&mut x).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 2, .. }),
        "{err}"
    );
    assert_eq!(x[..2], [1.0, 2.0], "input left untouched on error");

    let mut m = Array2::<f32>::zeros((3, 4));
    m[[2, 1]] = f32::NAN;
    let err = fwht_rows(m.view_mut()).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 9, .. }),
        "{err}"
    );
}

#[test]
fn fwht_rows_matches_per_row_transforms_for_any_layout_and_size() {
    // Small (serial) and large (parallel) matrices, contiguous and strided.
    for &(rows, n) in &[(3usize, 8usize), (40, 2048)] {
        let m = gaussian_matrix(rows, n, 11);
        let mut expected = m.clone();
        for mut row in expected.rows_mut() {
            fwht(row.as_slice_mut().unwrap()).unwrap();
        }
        let mut contiguous = m.clone();
        fwht_rows(contiguous.view_mut()).unwrap();
        assert!(max_abs_diff(contiguous.as_slice().unwrap(), expected.as_slice().unwrap()) < 1e-5);

        // A column-major copy: every row is strided.
        let mut strided = Array2::<f32>::zeros((n, rows));
        strided.assign(&m.t());
        let mut view = strided.view_mut().reversed_axes();
        fwht_rows(view.view_mut()).unwrap();
        let got = view.as_standard_layout().into_owned();
        assert!(max_abs_diff(got.as_slice().unwrap(), expected.as_slice().unwrap()) < 1e-5);
    }
}

#[test]
fn rotation_is_deterministic_in_its_seed() {
    let a = HadamardRotation::new(100, 5).unwrap();
    let b = HadamardRotation::new(100, 5).unwrap();
    let c = HadamardRotation::new(100, 6).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.signs(), c.signs());
    assert!(a.signs().iter().all(|&s| s == 1.0 || s == -1.0));
}

#[test]
fn rotation_serializes_as_dim_and_seed() {
    let rotation = HadamardRotation::new(300, 12345).unwrap();
    let json = serde_json::to_string(&rotation).unwrap();
    assert_eq!(json, r#"{"dim":300,"seed":12345}"#);
    let back: HadamardRotation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, rotation);
    let err = serde_json::from_str::<HadamardRotation>(r#"{"dim":0,"seed":1}"#).unwrap_err();
    assert!(err.to_string().contains("dim"), "{err}");
    assert!(serde_json::from_str::<HadamardRotation>(r#"{"dim":4,"seed":1,"signs":[]}"#).is_err());
}

#[test]
fn rotation_errors_on_length_mismatch_and_zero_dim() {
    assert!(matches!(
        HadamardRotation::new(0, 1),
        Err(QuantError::InvalidParameter { .. })
    ));
    let r = HadamardRotation::new(6, 1).unwrap();
    assert!(matches!(
        r.apply(&mut [0.0; 5]),
        Err(QuantError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        r.apply_inverse(&mut [0.0; 7]),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let w = Array2::<f32>::zeros((4, 5));
    assert!(r.rotate_input(w.view()).is_err());
    assert!(r.rotate_activations(w.view()).is_err());
    assert!(r.rotate_output(w.view()).is_err());
    let mut x = [0.0, 1.0, 2.0, f32::NAN, 0.0, 0.0];
    let err = r.apply(&mut x).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 3, .. }),
        "{err}"
    );
}

#[test]
fn rotation_of_a_power_of_two_is_hadamard_times_signs() {
    let r = HadamardRotation::new(16, 9).unwrap();
    let h = hadamard_matrix(16).unwrap();
    let d = Array2::from_diag(&Array1::from(r.signs().to_vec()));
    let expected = h.dot(&d);
    let got = r.to_matrix();
    assert!(max_abs_diff(got.as_slice().unwrap(), expected.as_slice().unwrap()) < 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rotation_matrix_is_orthogonal(n in 1usize..48, seed in any::<u64>()) {
        let r = HadamardRotation::new(n, seed).unwrap().to_matrix();
        let rrt = r.dot(&r.t());
        let rtr = r.t().dot(&r);
        for i in 0..n {
            for j in 0..n {
                let expected = if i == j { 1.0 } else { 0.0 };
                prop_assert!((rrt[[i, j]] - expected).abs() < 1e-5);
                prop_assert!((rtr[[i, j]] - expected).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rotation_preserves_norms_and_inverts_exactly(
        x in prop::collection::vec(-100.0f32..100.0, 1..600),
        seed in any::<u64>(),
    ) {
        let r = HadamardRotation::new(x.len(), seed).unwrap();
        let mut y = x.clone();
        r.apply(&mut y).unwrap();
        let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        let (before, after) = (norm(&x), norm(&y));
        prop_assert!((before - after).abs() <= 1e-5 * before.max(1.0));
        r.apply_inverse(&mut y).unwrap();
        prop_assert!(max_abs_diff(&x, &y) <= 1e-4);
        // Inverse first, then forward, too.
        let mut z = x.clone();
        r.apply_inverse(&mut z).unwrap();
        r.apply(&mut z).unwrap();
        prop_assert!(max_abs_diff(&x, &z) <= 1e-4);
    }

    #[test]
    fn layer_output_is_unchanged_by_rotating_both_sides(
        tokens in 1usize..6,
        in_features in 1usize..40,
        out_features in 1usize..24,
        seed in any::<u64>(),
    ) {
        let x = gaussian_matrix(tokens, in_features, seed);
        let w = gaussian_matrix(out_features, in_features, seed.wrapping_add(1));
        let y = matmul_xwt(&x, &w);

        let input = HadamardRotation::new(in_features, seed).unwrap();
        let x_rot = input.rotate_activations(x.view()).unwrap();
        let w_rot = input.rotate_input(w.view()).unwrap();
        let y_rot = matmul_xwt(&x_rot, &w_rot);
        prop_assert!(max_abs_diff(y.as_slice().unwrap(), y_rot.as_slice().unwrap()) < 1e-4);

        // Rotating the output dimension too: the layer produces y·Qᵀ, and undoing it gives y.
        let output = HadamardRotation::new(out_features, seed ^ 0xABCD).unwrap();
        let w_both = output.rotate_output(w_rot.view()).unwrap();
        let y_both = matmul_xwt(&x_rot, &w_both);
        let y_back = output.unrotate_activations(y_both.view()).unwrap();
        prop_assert!(max_abs_diff(y.as_slice().unwrap(), y_back.as_slice().unwrap()) < 1e-4);

        // And the weight comes back exactly.
        let w_back = input
            .unrotate_input(output.unrotate_output(w_both.view()).unwrap().view())
            .unwrap();
        prop_assert!(max_abs_diff(w.as_slice().unwrap(), w_back.as_slice().unwrap()) < 1e-4);
    }
}

/// Per-output-channel (row) symmetric absmax round-to-nearest fake quantization on the full
/// signed grid `q ∈ [−2^(b−1), 2^(b−1) − 1]` with `scale = 2·absmax/(2^b − 1)` (GPTQ's
/// symmetric RTN), so 2 bits keep all four levels.
fn fake_quant_rows(w: &Array2<f32>, bits: u32) -> Array2<f32> {
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let qmin = -((1i32 << (bits - 1)) as f32);
    let mut out = w.clone();
    for mut row in out.rows_mut() {
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if absmax > 0.0 {
            2.0 * absmax / ((1u32 << bits) - 1) as f32
        } else {
            1.0
        };
        row.mapv_inplace(|v| fake_quant_scalar(v, scale, 0.0, qmin, qmax));
    }
    out
}

fn max_over_rms(w: &Array2<f32>) -> f32 {
    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    max / rms
}

fn outlier_matrix(in_features: usize, columns: &[usize], factor: f32) -> Array2<f32> {
    let mut w = gaussian_matrix(64, in_features, 2024);
    for &col in columns {
        w.slice_mut(s![.., col]).mapv_inplace(|v| v * factor);
    }
    w
}

/// Squared quantization error measured in the original basis: plain RTN, and RTN in the
/// rotated basis followed by the inverse rotation.
fn plain_and_rotated_error(w: &Array2<f32>, bits: u32, seed: u64) -> (f64, f64) {
    let rotation = HadamardRotation::new(w.ncols(), seed).unwrap();
    let w_rot = rotation.rotate_input(w.view()).unwrap();
    let sq_err = |a: &Array2<f32>, b: &Array2<f32>| {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
    };
    let plain = sq_err(w, &fake_quant_rows(w, bits));
    let rotated_back = rotation
        .unrotate_input(fake_quant_rows(&w_rot, bits).view())
        .unwrap();
    (plain, sq_err(w, &rotated_back))
}

#[test]
fn rotation_spreads_outlier_columns() {
    // Non-power-of-two input dimension on purpose: the overlapping-window construction.
    let w = outlier_matrix(384, &[5, 130, 311], 50.0);
    let rotation = HadamardRotation::new(384, 77).unwrap();
    let w_rot = rotation.rotate_input(w.view()).unwrap();
    let (before, after) = (max_over_rms(&w), max_over_rms(&w_rot));
    // A Gaussian 64×384 matrix has max/rms ≈ 4.5; ×50 columns push it to ≈ 30.
    assert!(
        after < 6.0 && after < 0.25 * before,
        "max/rms {before} → {after}"
    );
}

#[test]
fn rotation_lowers_two_bit_rtn_error_on_outlier_columns() {
    // 1000 = 512 + 488 columns: the two Hadamard windows overlap on 24 coordinates.
    let w = outlier_matrix(1000, &[5, 600], 20.0);
    let (plain, rotated) = plain_and_rotated_error(&w, 2, 77);
    assert!(rotated < 0.8 * plain, "2-bit error {plain} → {rotated}");
}

#[test]
fn rotation_lowers_three_and_four_bit_rtn_error_on_fifty_times_outliers() {
    // At 2 bits the rotation does *not* pay off for ×50 outliers: their energy then dominates
    // each row, the plain grid represents them almost exactly and only loses the Gaussian
    // bulk, while after rotation every coordinate carries a share of the outlier energy and
    // a 4-level grid loses a fixed fraction of it (measured 1.3–1.6× more error for 384–1536
    // columns). From 3 bits on the rotation wins clearly.
    let w = outlier_matrix(1536, &[5, 136, 267, 1400], 50.0);
    for (bits, required_ratio) in [(3u32, 0.6f64), (4, 0.2)] {
        let (plain, rotated) = plain_and_rotated_error(&w, bits, 77);
        assert!(
            rotated < required_ratio * plain,
            "{bits}-bit error {plain} → {rotated}"
        );
    }
}

/// Timing of the 4096-point transform; run with
/// `cargo test --release -p quant-core --test hadamard_rotation -- --ignored --nocapture`.
#[test]
#[ignore]
fn time_fwht_4096() {
    let mut x: Vec<f32> = (0..4096).map(|i| (i as f32).sin()).collect();
    let iterations = 20_000;
    for _ in 0..1000 {
        fwht(&mut x).unwrap();
    }
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        fwht(std::hint::black_box(&mut x)).unwrap();
    }
    let per_call = start.elapsed() / iterations;
    println!("fwht 4096: {per_call:?} per call");
    let rotation = HadamardRotation::new(4096 + 1024, 1).unwrap();
    let mut y: Vec<f32> = (0..rotation.dim()).map(|i| (i as f32).cos()).collect();
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        rotation.apply(std::hint::black_box(&mut y)).unwrap();
    }
    println!(
        "HadamardRotation 5120 apply: {:?} per call",
        start.elapsed() / iterations
    );
    let mut m = gaussian_matrix(512, 4096, 3);
    let start = std::time::Instant::now();
    fwht_rows(m.view_mut()).unwrap();
    println!("fwht_rows 512×4096: {:?}", start.elapsed());
}
