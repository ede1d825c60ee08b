//! Unit tests of the calibration statistics, histogram, search and artifact.

use super::stats::GridError;
use super::*;
use proptest::prelude::*;

/// Midpoint-rule integral of `(x − Q(x))²` with `Q` the crate's scalar fake quantizer.
fn numeric_integral(range: &QuantRange, a: f64, b: f64) -> f64 {
    let n = 200_000;
    let h = (b - a) / n as f64;
    (0..n)
        .map(|i| {
            let x = a + (i as f64 + 0.5) * h;
            let q = crate::rounding::fake_quant_scalar(
                x as f32,
                range.scale,
                range.zero_point as f32,
                range.qmin as f32,
                range.qmax as f32,
            ) as f64;
            (x - q).powi(2) * h
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// The closed form agrees with brute-force integration, across the clamped ends,
    /// partial cells and runs of whole cells.
    #[test]
    fn closed_form_grid_error_matches_numeric_integration(
        bits in 2u32..6,
        symmetric in any::<bool>(),
        lower in -5.0f32..0.0,
        upper in 0.1f32..5.0,
        a in -8.0f64..8.0,
        width in 0.01f64..6.0,
    ) {
        let range = QuantRange::from_clip(lower, upper, bits, symmetric).unwrap();
        let grid = GridError::new(&range);
        let b = a + width;
        let exact = grid.integral(a, b);
        let numeric = numeric_integral(&range, a, b);
        prop_assert!(
            (exact - numeric).abs() <= 1e-4 * (1.0 + numeric),
            "{exact} vs {numeric}"
        );
    }
}
