//! Knowledge distillation on logits with a temperature.

use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView2, Axis};

use super::{check_len, check_output, checked_matrix, same_shape, shifted_exps, LossOutput};
use crate::error::{Result, TrainError};

/// `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over rows (over the rows where
/// `row_mask` is `true` when a mask is given) — Hinton et al.'s distillation loss, as PyTorch's
/// `T**2 * F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True,
/// reduction="batchmean")`.
///
/// With `p = softmax(teacher/T)` and `q = softmax(student/T)` per row:
/// `loss = (T²/R)·Σ_rows Σ_v p_v·(log p_v − log q_v)` and `∂loss/∂student = (T/R)·(q − p)`
/// (zero on masked-out rows). The `T²` keeps the gradient's scale independent of `T`. With a
/// mask that selects no row the loss is `0` with a zero gradient.
///
/// ```
/// use ndarray::array;
/// let s = array![[1.0f32, 2.0, 3.0]];
/// let same = qat_train::loss::kd_loss(s.view(), s.view(), 2.0, None).unwrap();
/// assert!(same.value.abs() < 1e-12);
/// let t = array![[3.0f32, 2.0, 1.0]];
/// let out = qat_train::loss::kd_loss(s.view(), t.view(), 2.0, None).unwrap();
/// assert!(out.value > 0.0);
/// ```
pub fn kd_loss(
    student: ArrayView2<'_, f32>,
    teacher: ArrayView2<'_, f32>,
    temperature: f32,
    row_mask: Option<&[bool]>,
) -> Result<LossOutput> {
    const CONTEXT: &str = "kd_loss";
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(TrainError::invalid(
            "kd_loss temperature",
            temperature,
            "must be finite and positive",
        ));
    }
    same_shape("kd_loss teacher logits", &student, &teacher)?;
    let (rows, vocab) = student.dim();
    check_len(CONTEXT, "row_mask", row_mask, rows)?;
    let student = checked_matrix("kd_loss student logits", student)?;
    let teacher = checked_matrix("kd_loss teacher logits", teacher)?;
    let counted: Vec<usize> = (0..rows)
        .filter(|&i| row_mask.is_none_or(|m| m[i]))
        .collect();
    let mut grad = Array2::<f32>::zeros((rows, vocab));
    if counted.is_empty() {
        return Ok(LossOutput {
            value: 0.0,
            grad,
            counted: 0,
        });
    }
    let t = f64::from(temperature);
    let inv_rows = 1.0 / counted.len() as f64;
    let counted_mask: Vec<bool> = (0..rows).map(|i| row_mask.is_none_or(|m| m[i])).collect();
    // Rows in parallel, per-row KL summed afterwards in row order (deterministic).
    let row_kl: Vec<f64> = grad
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .map_init(
            || (Vec::with_capacity(vocab), Vec::with_capacity(vocab)),
            |(exps_s, exps_t), (i, mut grad_row)| {
                if !counted_mask[i] {
                    return 0.0;
                }
                let s_row = student.row(i);
                let t_row = teacher.row(i);
                let s_row = s_row.as_slice().expect("contiguous row");
                let t_row = t_row.as_slice().expect("contiguous row");
                let (max_s, sum_s) = shifted_exps(s_row, t, exps_s);
                let (max_t, sum_t) = shifted_exps(t_row, t, exps_t);
                // log p_v − log q_v = (t_v − s_v)/T − (lse_t − lse_s), lse = m + ln Σ.
                let lse_gap = (max_t + sum_t.ln()) - (max_s + sum_s.ln());
                let (inv_sum_s, inv_sum_t) = (1.0 / sum_s, 1.0 / sum_t);
                let mut kl = 0.0;
                for v in 0..vocab {
                    let p = exps_t[v] * inv_sum_t;
                    let q = exps_s[v] * inv_sum_s;
                    // p·log p → 0 as p → 0: an underflowed teacher probability adds nothing.
                    if p > 0.0 {
                        let log_ratio = (f64::from(t_row[v]) - f64::from(s_row[v])) / t - lse_gap;
                        kl += p * log_ratio;
                    }
                    grad_row[v] = (t * inv_rows * (q - p)) as f32;
                }
                kl
            },
        )
        .collect();
    let kl_sum: f64 = row_kl.iter().sum();
    let value = t * t * kl_sum * inv_rows;
    check_output(CONTEXT, value, &grad)?;
    Ok(LossOutput {
        value,
        grad,
        counted: counted.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::test_util::{check_gradient, random_matrix};
    use proptest::prelude::*;

    #[test]
    fn gradient_matches_finite_differences_with_and_without_mask() {
        let s = random_matrix(4, 9, 3.0, 10);
        let t = random_matrix(4, 9, 3.0, 11);
        for temperature in [1.0f32, 2.0, 4.0] {
            for mask in [None, Some(&[true, false, true, true][..])] {
                let out = kd_loss(s.view(), t.view(), temperature, mask).unwrap();
                check_gradient(
                    &s,
                    &out.grad,
                    |z| {
                        kd_loss(z.view(), t.view(), temperature, mask)
                            .unwrap()
                            .value
                    },
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn invalid_temperature_and_shapes_are_errors() {
        let s = random_matrix(2, 3, 1.0, 1);
        assert!(kd_loss(s.view(), s.view(), 0.0, None)
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let t = random_matrix(2, 4, 1.0, 1);
        assert!(kd_loss(s.view(), t.view(), 1.0, None)
            .unwrap_err()
            .to_string()
            .contains("teacher"));
        let mut bad = s.clone();
        bad[[1, 2]] = f32::INFINITY;
        let err = kd_loss(s.view(), bad.view(), 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("teacher") && err.contains("row 1, column 2"),
            "{err}"
        );
    }

    proptest! {
        /// KL is non-negative, zero for identical logits, and invariant to a per-row shift.
        #[test]
        fn kl_is_non_negative_and_shift_invariant(seed in 0u64..1000, shift in -50.0f32..50.0) {
            let s = random_matrix(3, 5, 4.0, seed);
            let t = random_matrix(3, 5, 4.0, seed + 7);
            let out = kd_loss(s.view(), t.view(), 2.0, None).unwrap();
            prop_assert!(out.value >= -1e-12);
            let shifted = s.mapv(|x| x + shift);
            let again = kd_loss(shifted.view(), t.view(), 2.0, None).unwrap();
            prop_assert!((out.value - again.value).abs() < 1e-4 * (1.0 + out.value));
            prop_assert!(kd_loss(s.view(), s.view(), 2.0, None).unwrap().value.abs() < 1e-9);
        }
    }
}
