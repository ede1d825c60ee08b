//! Next-token cross-entropy as transformers' `ForCausalLMLoss`.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{check_finite_at, LmError, Result};
use crate::vmath::RowKernel;

/// The label value that is not counted, as PyTorch's `ignore_index`.
pub const IGNORE_INDEX: i64 = -100;

/// The mean loss, how many positions it averages, and `∂loss/∂logits`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropy {
    pub loss: f32,
    /// Positions with a label other than [`IGNORE_INDEX`] after the shift.
    pub counted: usize,
    /// `(batch, seq, vocab)`; zero at the last position and at ignored ones.
    pub grad_logits: Array3<f32>,
}

/// Shifted cross-entropy: position `t` of `logits: (batch, seq, vocab)` predicts
/// `labels[b, t + 1]`; labels equal to −100 are ignored and the loss is the mean over the
/// counted positions (the `labels` are not shifted by the caller, as in transformers).
///
/// ```
/// use lm::cross_entropy;
/// use ndarray::{array, Array3};
/// let logits = Array3::<f32>::zeros((1, 3, 4));
/// let labels = array![[0i64, 1, -100]];
/// let ce = cross_entropy(logits.view(), labels.view()).unwrap();
/// // One counted position (t = 0 predicts label 1) with a uniform distribution over 4.
/// assert_eq!(ce.counted, 1);
/// assert!((ce.loss - 4f32.ln()).abs() < 1e-6);
/// assert!((ce.grad_logits[[0, 0, 1]] - (0.25 - 1.0)).abs() < 1e-6);
/// ```
pub fn cross_entropy(
    logits: ArrayView3<'_, f32>,
    labels: ArrayView2<'_, i64>,
) -> Result<CrossEntropy> {
    let _timer = crate::profile::scope(crate::profile::Op::Loss);
    let (batch, seq, vocab) = logits.dim();
    if labels.dim() != (batch, seq) {
        return Err(LmError::shape(
            "labels (batch, seq) vs logits",
            format!("{batch}×{seq}"),
            format!("{}×{}", labels.nrows(), labels.ncols()),
        ));
    }
    // Targets after the shift, validated up front so errors name the label's own position.
    let mut targets = vec![None; batch * seq];
    for ((b, t), &label) in labels.indexed_iter() {
        if t == 0 || label == IGNORE_INDEX {
            continue;
        }
        if label < 0 || label as u64 >= vocab as u64 {
            return Err(LmError::TokenOutOfRange {
                what: "label".into(),
                value: label,
                batch: b,
                position: t,
                vocab,
            });
        }
        targets[b * seq + t - 1] = Some(label as usize);
    }
    let counted = targets.iter().filter(|t| t.is_some()).count();
    if counted == 0 {
        return Err(LmError::NoLabels);
    }
    let logits = logits.as_standard_layout();
    let flat = logits.as_slice().unwrap_or_default();
    let logit_rows = ArrayView2::from_shape((batch * seq, vocab), flat)
        .map_err(|e| LmError::shape("logits", format!("{batch}×{seq}×{vocab}"), e))?;
    let mut grad_logits = Array2::<f32>::zeros((batch * seq, vocab));
    let inv_count = 1.0 / counted as f64;
    let kernel = RowKernel::detect();
    // One pass for the row maximum and the finiteness check, one writing e^(z − max) into the
    // gradient row while summing it, one scaling that row in place: no other copy of the
    // (tokens × vocab) logits is made.
    let rows: Vec<Option<f64>> = grad_logits
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(logit_rows.axis_iter(Axis(0)).into_par_iter())
        .zip(targets.par_iter())
        .map(|((mut g, z), target)| {
            let z = z.to_slice().unwrap_or_default();
            let (max, finite) = kernel.max_finite(z);
            if !finite {
                return None;
            }
            let Some(target) = *target else {
                return Some(0.0);
            };
            let g = g.as_slice_mut().unwrap_or_default();
            let sum = kernel.exp_sum(z, max, g);
            let factor = (inv_count / sum) as f32;
            for gv in g.iter_mut() {
                *gv *= factor;
            }
            g[target] -= inv_count as f32;
            Some(sum.ln() - (z[target] - max) as f64)
        })
        .collect();
    if rows.iter().any(Option::is_none) {
        check_finite_at("logits", flat, |i| {
            format!(
                "(batch {}, position {}, vocab {})",
                i / (seq * vocab),
                i / vocab % seq,
                i % vocab
            )
        })?;
    }
    let total: f64 = rows.into_iter().flatten().sum();
    let loss = (total * inv_count) as f32;
    if !loss.is_finite() {
        return Err(LmError::NonFinite {
            what: "loss".into(),
            location: format!("mean over {counted} positions"),
            value: loss,
        });
    }
    let grad_logits = grad_logits
        .into_shape_with_order((batch, seq, vocab))
        .map_err(|e| LmError::shape("grad_logits", format!("{batch}×{seq}×{vocab}"), e))?;
    Ok(CrossEntropy {
        loss,
        counted,
        grad_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut logits = Array3::from_shape_fn((2, 4, 7), |_| rng.random_range(-2.0f32..2.0));
        let labels = array![[3i64, 1, -100, 6], [-100, 0, 2, -100]];
        let ce = cross_entropy(logits.view(), labels.view()).unwrap();
        assert_eq!(ce.counted, 4);
        let eps = 1e-2f32;
        for idx in 0..logits.len() {
            let i = (idx / 28, idx / 7 % 4, idx % 7);
            let orig = logits[i];
            logits[i] = orig + eps;
            let plus = cross_entropy(logits.view(), labels.view()).unwrap().loss as f64;
            logits[i] = orig - eps;
            let minus = cross_entropy(logits.view(), labels.view()).unwrap().loss as f64;
            logits[i] = orig;
            let numeric = (plus - minus) / (2.0 * eps as f64);
            let a = ce.grad_logits[i] as f64;
            assert!(
                (numeric - a).abs() <= 1e-3 + 1e-2 * a.abs(),
                "{i:?}: {a} vs {numeric}"
            );
        }
        // The last position and positions whose next label is ignored get no gradient.
        assert!(ce
            .grad_logits
            .slice(ndarray::s![.., 3, ..])
            .iter()
            .all(|&g| g == 0.0));
        assert!(ce
            .grad_logits
            .slice(ndarray::s![0, 1, ..])
            .iter()
            .all(|&g| g == 0.0));
    }

    #[test]
    fn caller_mistakes_are_errors_with_where() {
        let logits = Array3::<f32>::zeros((1, 3, 4));
        let e = cross_entropy(logits.view(), array![[0i64, 4, 1]].view()).unwrap_err();
        assert!(e.to_string().contains("position 1"), "{e}");
        let e = cross_entropy(logits.view(), array![[0i64, -100, -100]].view()).unwrap_err();
        assert!(matches!(e, LmError::NoLabels), "{e}");
        let e = cross_entropy(logits.view(), array![[0i64, 1]].view()).unwrap_err();
        assert!(e.to_string().contains("labels"), "{e}");
        let mut bad = logits.clone();
        bad[[0, 2, 3]] = f32::NAN;
        let e = cross_entropy(bad.view(), array![[0i64, 1, 2]].view()).unwrap_err();
        assert!(e.to_string().contains("position 2, vocab 3"), "{e}");
    }
}
