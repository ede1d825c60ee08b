//! Truncated SVD in `f64` (through `faer`), for PiSSA initialisation and for re-factoring a
//! combined `ΔW` back to a low rank.

use ndarray::{Array1, Array2, ArrayView2};

use crate::error::{check_finite, LoraError, Result};

/// The leading `k` singular triplets of a matrix: `M ≈ u · diag(s) · vt`.
#[derive(Clone, Debug)]
pub struct TruncatedSvd {
    /// `(rows, k)`, orthonormal columns.
    pub u: Array2<f32>,
    /// `k` singular values, non-increasing.
    pub s: Array1<f32>,
    /// `(k, cols)`, orthonormal rows.
    pub vt: Array2<f32>,
}

/// The top-`k` SVD of `m`, computed in `f64` and rounded once to `f32`.
///
/// ```
/// use ndarray::array;
/// let m = array![[3.0f32, 0.0], [0.0, -2.0], [0.0, 0.0]];
/// let svd = lora_core::svd::truncated_svd(m.view(), 1, "example").unwrap();
/// assert!((svd.s[0] - 3.0).abs() < 1e-6);
/// assert!((svd.u[[0, 0]] * svd.vt[[0, 0]] - 1.0).abs() < 1e-6);
/// ```
pub fn truncated_svd(m: ArrayView2<'_, f32>, k: usize, context: &str) -> Result<TruncatedSvd> {
    let (rows, cols) = m.dim();
    if k == 0 || k > rows.min(cols) {
        return Err(LoraError::option(
            format!("rank for the SVD of {context}"),
            k,
            format!(
                "must be in 1..={} for a {rows}×{cols} matrix",
                rows.min(cols)
            ),
        ));
    }
    check_finite(|| format!("SVD input {context}"), m.iter())?;
    let mat = faer::Mat::<f64>::from_fn(rows, cols, |i, j| m[[i, j]] as f64);
    let svd = mat.thin_svd().map_err(|e| {
        LoraError::state(
            "SVD",
            context.to_string(),
            format!("did not converge: {e:?}"),
        )
    })?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    Ok(TruncatedSvd {
        u: Array2::from_shape_fn((rows, k), |(i, j)| u[(i, j)] as f32),
        s: Array1::from_shape_fn(k, |j| s[j] as f32),
        vt: Array2::from_shape_fn((k, cols), |(j, c)| v[(c, j)] as f32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quant_core::linalg::matmul;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn full_rank_reconstructs_and_singular_values_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = Array2::from_shape_fn((7, 5), |_| rng.random_range(-1.0f32..1.0));
        let svd = truncated_svd(m.view(), 5, "test").unwrap();
        let us = &svd.u * &svd.s.view().insert_axis(ndarray::Axis(0));
        let back = matmul(us.view(), svd.vt.view()).unwrap();
        for (a, b) in back.iter().zip(m.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(svd.s.windows(2).into_iter().all(|w| w[0] >= w[1]));
        let e = truncated_svd(m.view(), 6, "test").unwrap_err().to_string();
        assert!(e.contains("1..=5"), "{e}");
    }
}
