//! Cross-entropy over logits with an ignore index, and its weighted variants.

use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView2, Axis};

use super::{check_len, check_output, checked_matrix, LossOutput};
use crate::error::{Result, TrainError};

/// Target value of rows that do not count (PyTorch's and Hugging Face's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over the rows whose target is not [`IGNORE_INDEX`], as PyTorch's
/// `F.cross_entropy(logits, targets, ignore_index=-100)`.
///
/// `loss = (1/C)·Σ_{i counted} −log softmax(z_i)[y_i]`, gradient `(softmax(z_i) − onehot(y_i))/C`
/// on counted rows and zero elsewhere. When no row counts, the loss is `0` with a zero gradient
/// (`counted == 0`) rather than PyTorch's NaN, so a batch of only prompt tokens is harmless.
///
/// ```
/// use ndarray::array;
/// let logits = array![[0.0f32, 0.0], [5.0, 1.0]];
/// let out = qat_train::loss::cross_entropy(logits.view(), &[1, -100]).unwrap();
/// assert!((out.value - std::f64::consts::LN_2).abs() < 1e-12);
/// assert_eq!(out.counted, 1);
/// assert_eq!(out.grad[[0, 1]], -0.5);
/// assert_eq!(out.grad[[1, 0]], 0.0);
/// ```
pub fn cross_entropy(logits: ArrayView2<'_, f32>, targets: &[i64]) -> Result<LossOutput> {
    weighted_ce("cross_entropy", logits, targets, None)
}

/// Cross-entropy with a weight per row: `Σ w_i·CE_i / Σ w_i` over counted rows (target not
/// [`IGNORE_INDEX`]); weights must be finite and non-negative. With all weights equal this is
/// [`cross_entropy`].
///
/// ```
/// use ndarray::array;
/// let logits = array![[2.0f32, 0.0], [0.0, 2.0]];
/// let plain = qat_train::loss::cross_entropy(logits.view(), &[0, 0]).unwrap();
/// let same = qat_train::loss::weighted_cross_entropy(logits.view(), &[0, 0], &[3.0, 3.0]).unwrap();
/// assert!((plain.value - same.value).abs() < 1e-12);
/// ```
pub fn weighted_cross_entropy(
    logits: ArrayView2<'_, f32>,
    targets: &[i64],
    weights: &[f32],
) -> Result<LossOutput> {
    weighted_ce("weighted_cross_entropy", logits, targets, Some(weights))
}

/// The token-level reasoning variant: cross-entropy where answer positions weigh
/// `answer_weight` and every other counted position weighs `1`
/// (`Σ w_i·CE_i / Σ w_i`), so the final answer counts more than the reasoning that leads to it.
///
/// ```
/// use ndarray::array;
/// let logits = array![[2.0f32, 0.0], [0.0, 2.0]];
/// let out = qat_train::loss::answer_weighted_cross_entropy(
///     logits.view(), &[0, 0], &[false, true], 3.0).unwrap();
/// let ce = |z: f64| (1.0 + (-z).exp()).ln(); // −log softmax for a 2-way margin z
/// assert!((out.value - (ce(2.0) + 3.0 * ce(-2.0)) / 4.0).abs() < 1e-6);
/// ```
pub fn answer_weighted_cross_entropy(
    logits: ArrayView2<'_, f32>,
    targets: &[i64],
    answer_mask: &[bool],
    answer_weight: f32,
) -> Result<LossOutput> {
    if !(answer_weight.is_finite() && answer_weight >= 0.0) {
        return Err(TrainError::invalid(
            "answer_weight",
            answer_weight,
            "must be finite and non-negative",
        ));
    }
    check_len(
        "answer_weighted_cross_entropy",
        "answer_mask",
        Some(answer_mask),
        logits.nrows(),
    )?;
    let weights: Vec<f32> = answer_mask
        .iter()
        .map(|&a| if a { answer_weight } else { 1.0 })
        .collect();
    weighted_ce(
        "answer_weighted_cross_entropy",
        logits,
        targets,
        Some(&weights),
    )
}

fn weighted_ce(
    context: &str,
    logits: ArrayView2<'_, f32>,
    targets: &[i64],
    weights: Option<&[f32]>,
) -> Result<LossOutput> {
    let (rows, vocab) = logits.dim();
    check_len(context, "targets", Some(targets), rows)?;
    check_len(context, "weights", weights, rows)?;
    if let Some(w) = weights {
        if let Some(i) = w.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(TrainError::invalid(
                format!("{context} weights[{i}]"),
                w[i],
                "weights must be finite and non-negative",
            ));
        }
    }
    for (i, &t) in targets.iter().enumerate() {
        if t != IGNORE_INDEX && !(0..vocab as i64).contains(&t) {
            return Err(TrainError::invalid(
                format!("{context} targets[{i}]"),
                t,
                format!("a target must be in 0..{vocab} or {IGNORE_INDEX} (ignored)"),
            ));
        }
    }
    let logits = checked_matrix(&format!("{context} logits"), logits)?;
    let weight_of = |i: usize| weights.map_or(1.0, |w| f64::from(w[i]));
    let counted_rows: Vec<usize> = (0..rows).filter(|&i| targets[i] != IGNORE_INDEX).collect();
    let total_weight: f64 = counted_rows.iter().map(|&i| weight_of(i)).sum();
    let mut grad = Array2::<f32>::zeros((rows, vocab));
    if counted_rows.is_empty() || total_weight == 0.0 {
        return Ok(LossOutput {
            value: 0.0,
            grad,
            counted: 0,
        });
    }
    // Rows in parallel; per-row values are summed afterwards in row order so the result does
    // not depend on how rayon split the work.
    let row_values: Vec<f64> = grad
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .map_init(
            || Vec::with_capacity(vocab),
            |exps, (i, mut grad_row)| {
                if targets[i] == IGNORE_INDEX {
                    return 0.0;
                }
                let row = logits.row(i);
                let row = row.as_slice().expect("standard layout rows are contiguous");
                // f32 exponentials as PyTorch's f32 kernel (the sum is f64): the loss is off by at
                // most a few f32 ulps of ln Σ, and the exp is twice as fast as f64's.
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                exps.clear();
                exps.extend(row.iter().map(|&x| (x - max).exp()));
                let sum: f64 = exps.iter().map(|&e| f64::from(e)).sum();
                let max = f64::from(max);
                let target = targets[i] as usize;
                let w = weight_of(i) / total_weight;
                let scale = w / sum;
                for (g, &e) in grad_row.iter_mut().zip(exps.iter()) {
                    *g = (scale * f64::from(e)) as f32;
                }
                grad_row[target] = (w * (f64::from(exps[target]) / sum - 1.0)) as f32;
                // −log softmax[target] = m + ln Σ − x_target
                w * (max + sum.ln() - f64::from(row[target]))
            },
        )
        .collect();
    let value: f64 = row_values.iter().sum();
    check_output(context, value, &grad)?;
    Ok(LossOutput {
        value,
        grad,
        counted: counted_rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::test_util::{check_gradient, random_matrix};
    use proptest::prelude::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let x = random_matrix(4, 7, 3.0, 1);
        let targets = [3, IGNORE_INDEX, 0, 6];
        let out = cross_entropy(x.view(), &targets).unwrap();
        assert_eq!(out.counted, 3);
        check_gradient(
            &x,
            &out.grad,
            |z| cross_entropy(z.view(), &targets).unwrap().value,
            1e-4,
        );
    }

    #[test]
    fn answer_weighted_gradient_matches_finite_differences() {
        let x = random_matrix(5, 6, 2.0, 2);
        let targets = [1, 2, IGNORE_INDEX, 4, 5];
        let mask = [false, true, true, false, true];
        let f = |z: &Array2<f32>| {
            answer_weighted_cross_entropy(z.view(), &targets, &mask, 2.5)
                .unwrap()
                .value
        };
        let out = answer_weighted_cross_entropy(x.view(), &targets, &mask, 2.5).unwrap();
        check_gradient(&x, &out.grad, f, 1e-4);
    }

    /// The f32 exponentials keep the value within 1e-6 (relative) of an all-f64 reference.
    #[test]
    fn value_agrees_with_an_f64_reference() {
        let x = random_matrix(16, 1000, 8.0, 5);
        let targets: Vec<i64> = (0..16).map(|i| i * 61).collect();
        let out = cross_entropy(x.view(), &targets).unwrap();
        let reference: f64 = x
            .rows()
            .into_iter()
            .zip(&targets)
            .map(|(row, &t)| {
                let max = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (f64::from(v) - max).exp())
                        .sum::<f64>()
                        .ln();
                lse - f64::from(row[t as usize])
            })
            .sum::<f64>()
            / 16.0;
        assert!(
            (out.value - reference).abs() <= 1e-6 * reference.abs(),
            "{} vs {reference}",
            out.value
        );
    }

    #[test]
    fn huge_logits_stay_finite() {
        let x = ndarray::array![[1.0e30f32, -1.0e30, 0.0]];
        let out = cross_entropy(x.view(), &[1]).unwrap();
        assert!((out.value - 2.0e30).abs() / 2.0e30 < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors_that_say_where() {
        let x = ndarray::array![[0.0f32, f32::NAN], [0.0, 0.0]];
        let err = cross_entropy(x.view(), &[0, 0]).unwrap_err().to_string();
        assert!(err.contains("row 0, column 1"), "{err}");
        let x = ndarray::array![[0.0f32, 1.0]];
        let err = cross_entropy(x.view(), &[2]).unwrap_err().to_string();
        assert!(err.contains("targets[0]"), "{err}");
        let err = cross_entropy(x.view(), &[0, 1]).unwrap_err().to_string();
        assert!(err.contains("targets"), "{err}");
        let err = weighted_cross_entropy(x.view(), &[0], &[-1.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("weights[0]"), "{err}");
    }

    #[test]
    fn strided_views_give_the_same_result_as_contiguous_ones() {
        let x = random_matrix(6, 4, 2.0, 8);
        let transposed_back = x.t().as_standard_layout().into_owned();
        let strided = transposed_back.t();
        assert!(!strided.is_standard_layout());
        let targets = [0, 1, 2, 3, IGNORE_INDEX, 1];
        let a = cross_entropy(x.view(), &targets).unwrap();
        let b = cross_entropy(strided, &targets).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn all_ignored_is_zero() {
        let x = random_matrix(2, 3, 1.0, 3);
        let out = cross_entropy(x.view(), &[IGNORE_INDEX, IGNORE_INDEX]).unwrap();
        assert_eq!((out.value, out.counted), (0.0, 0));
        assert!(out.grad.iter().all(|&g| g == 0.0));
    }

    proptest! {
        /// Each counted row's gradient sums to zero (softmax minus a one-hot, both mass 1),
        /// and the loss is non-negative.
        #[test]
        fn rows_of_the_gradient_sum_to_zero(seed in 0u64..1000, rows in 1usize..6, vocab in 2usize..9) {
            let x = random_matrix(rows, vocab, 5.0, seed);
            let targets: Vec<i64> = (0..rows).map(|i| ((i as u64 + seed) % vocab as u64) as i64).collect();
            let out = cross_entropy(x.view(), &targets).unwrap();
            prop_assert!(out.value >= 0.0);
            for row in out.grad.rows() {
                prop_assert!(row.sum().abs() < 1e-6);
            }
        }
    }
}
