//! Next-token cross-entropy as transformers' `ForCausalLMLoss`.

use ndarray::{Array3, ArrayView2, ArrayView3};
use rayon::prelude::*;

use crate::error::{LmError, Result};
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
    let targets = shifted_targets(labels, (batch, seq, vocab))?;
    // The gradient starts as a copy of the logits and is turned into ∂loss/∂logits in place:
    // the same row pass as [`cross_entropy_in_place`], so both give identical bits.
    let mut grad_logits = logits.as_standard_layout().into_owned();
    let (loss, counted) = loss_in_place(&mut grad_logits, &targets)?;
    Ok(CrossEntropy {
        loss,
        counted,
        grad_logits,
    })
}

/// [`cross_entropy`] that overwrites `logits` with `∂loss/∂logits` instead of allocating a
/// second `(batch, seq, vocab)` array (100 MB for SmolLM2's vocabulary at 512 tokens); returns
/// `(loss, counted)`. The training step uses it when nothing else needs the logits.
///
/// ```
/// use lm::loss::{cross_entropy, cross_entropy_in_place};
/// use ndarray::{array, Array3};
/// let logits = Array3::from_shape_fn((1, 3, 4), |(_, t, v)| (t * 4 + v) as f32 / 7.0);
/// let labels = array![[0i64, 1, 3]];
/// let copied = cross_entropy(logits.view(), labels.view()).unwrap();
/// let mut in_place = logits.clone();
/// let (loss, counted) = cross_entropy_in_place(&mut in_place, labels.view()).unwrap();
/// assert_eq!((loss, counted), (copied.loss, copied.counted));
/// assert_eq!(in_place, copied.grad_logits);
/// ```
pub fn cross_entropy_in_place(
    logits: &mut Array3<f32>,
    labels: ArrayView2<'_, i64>,
) -> Result<(f32, usize)> {
    let _timer = crate::profile::scope(crate::profile::Op::Loss);
    let targets = shifted_targets(labels, logits.dim())?;
    if !logits.is_standard_layout() {
        *logits = logits.as_standard_layout().into_owned();
    }
    loss_in_place(logits, &targets)
}

/// The target of every `(batch·seq)` row after the shift (`None`: not counted), validated up
/// front so errors name the label's own position.
fn shifted_targets(
    labels: ArrayView2<'_, i64>,
    (batch, seq, vocab): (usize, usize, usize),
) -> Result<Vec<Option<usize>>> {
    if labels.dim() != (batch, seq) {
        return Err(LmError::shape(
            "labels (batch, seq) vs logits",
            format!("{batch}×{seq}"),
            format!("{}×{}", labels.nrows(), labels.ncols()),
        ));
    }
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
    if targets.iter().all(Option::is_none) {
        return Err(LmError::NoLabels);
    }
    Ok(targets)
}

/// Turns standard-layout `logits` into `∂loss/∂logits` row by row in parallel and returns
/// `(mean loss, counted)`. Per row: one pass for the maximum and the finiteness check, one
/// writing `e^(z − max)` over the row while summing it, one scaling it; rows without a target
/// become zero. A non-finite logit is reported with its position (the array is then partly
/// overwritten).
fn loss_in_place(logits: &mut Array3<f32>, targets: &[Option<usize>]) -> Result<(f32, usize)> {
    let (_, seq, vocab) = logits.dim();
    let counted = targets.iter().filter(|t| t.is_some()).count();
    let inv_count = 1.0 / counted as f64;
    let kernel = RowKernel::detect();
    let flat = logits
        .as_slice_mut()
        .ok_or_else(|| LmError::shape("logits", "a standard-layout array", "a strided view"))?;
    let rows: Vec<std::result::Result<f64, (usize, f32)>> = flat
        .par_chunks_mut(vocab.max(1))
        .zip(targets.par_iter())
        .enumerate()
        .map(|(r, (row, target))| {
            let (max, finite) = kernel.max_finite(row);
            if !finite {
                let j = row.iter().position(|v| !v.is_finite()).unwrap_or(0);
                return Err((r * vocab + j, row[j]));
            }
            let Some(target) = *target else {
                row.fill(0.0);
                return Ok(0.0);
            };
            let z_target = row[target];
            let sum = kernel.exp_sum_in_place(row, max);
            let factor = (inv_count / sum) as f32;
            for v in row.iter_mut() {
                *v *= factor;
            }
            row[target] -= inv_count as f32;
            Ok(sum.ln() - (z_target - max) as f64)
        })
        .collect();
    let mut total = 0.0f64;
    for row in rows {
        match row {
            Ok(v) => total += v,
            Err((i, value)) => {
                return Err(LmError::NonFinite {
                    what: "logits".into(),
                    location: format!(
                        "(batch {}, position {}, vocab {})",
                        i / (seq * vocab),
                        i / vocab % seq,
                        i % vocab
                    ),
                    value,
                })
            }
        }
    }
    let loss = (total * inv_count) as f32;
    if !loss.is_finite() {
        return Err(LmError::NonFinite {
            what: "loss".into(),
            location: format!("mean over {counted} positions"),
            value: loss,
        });
    }
    Ok((loss, counted))
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
    fn wide_vocabulary_matches_an_f64_reference() {
        // Rows longer than the kernels' chunks and lanes, logits spread like a real model's.
        let (batch, seq, vocab) = (2, 3, 4099);
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let logits =
            Array3::from_shape_fn((batch, seq, vocab), |_| rng.random_range(-20.0f32..20.0));
        let labels = array![[5i64, 4098, 17], [0, -100, 2048]];
        let ce = cross_entropy(logits.view(), labels.view()).unwrap();
        let mut total = 0.0f64;
        let mut counted = 0;
        for b in 0..batch {
            for t in 0..seq - 1 {
                let label = labels[[b, t + 1]];
                let row = logits.slice(ndarray::s![b, t, ..]);
                if label < 0 {
                    assert!(ce
                        .grad_logits
                        .slice(ndarray::s![b, t, ..])
                        .iter()
                        .all(|&g| g == 0.0));
                    continue;
                }
                counted += 1;
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                total += sum.ln() + max - row[label as usize] as f64;
                for (j, &v) in row.iter().enumerate() {
                    let p =
                        (v as f64 - max).exp() / sum - if j == label as usize { 1.0 } else { 0.0 };
                    let g = ce.grad_logits[[b, t, j]] as f64 * 3.0; // 3 counted positions
                    assert!(
                        (g - p).abs() <= 1e-6 * (1.0 + p.abs()),
                        "({b}, {t}, {j}): {g} vs {p}"
                    );
                }
            }
        }
        assert_eq!((ce.counted, counted), (3, 3));
        let reference = total / 3.0;
        assert!(
            (ce.loss as f64 - reference).abs() <= 1e-6 * reference,
            "{} vs {reference}",
            ce.loss
        );
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
