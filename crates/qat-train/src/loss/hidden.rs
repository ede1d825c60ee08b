//! Hidden-state distillation: matching chosen layers of the student to the teacher.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::{check_len, check_output, checked_matrix, cosine_with_grad, same_shape, LossOutput};
use crate::error::{Result, TrainError};

/// How a student's hidden states are compared with the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenLossKind {
    /// Mean over the counted rows' elements of `(s − t)²` (PyTorch's `F.mse_loss`).
    Mse,
    /// Mean over the counted rows of `1 − cos(s_i, t_i)`, with
    /// `cos = s·t / (max(‖s‖, ε)·max(‖t‖, ε))`, `ε` = [`COSINE_EPS`](crate::loss::COSINE_EPS): it matches directions
    /// and ignores scale, for students whose hidden states have a different norm.
    Cosine,
}

/// The loss between one layer's student and teacher hidden states `[N, D]`, over all rows or
/// the rows where `row_mask` is `true` (padding excluded), with the gradient into the student.
///
/// MSE: `(1/(R·D))·Σ (s − t)²`, gradient `2(s − t)/(R·D)`. Cosine: `(1/R)·Σ_i (1 − cos(s_i, t_i))`.
/// With no counted row the loss is `0` with a zero gradient.
///
/// ```
/// use ndarray::array;
/// use qat_train::loss::{hidden_state_loss, HiddenLossKind};
/// let s = array![[1.0f32, 0.0], [0.0, 2.0]];
/// let t = array![[2.0f32, 0.0], [0.0, 2.0]];
/// let mse = hidden_state_loss(s.view(), t.view(), HiddenLossKind::Mse, None).unwrap();
/// assert!((mse.value - 0.25).abs() < 1e-12);
/// let cos = hidden_state_loss(s.view(), t.view(), HiddenLossKind::Cosine, None).unwrap();
/// assert!(cos.value.abs() < 1e-12); // same directions
/// ```
pub fn hidden_state_loss(
    student: ArrayView2<'_, f32>,
    teacher: ArrayView2<'_, f32>,
    kind: HiddenLossKind,
    row_mask: Option<&[bool]>,
) -> Result<LossOutput> {
    layer_loss("hidden_state_loss", student, teacher, kind, row_mask)
}

/// [`hidden_state_loss`] with `context` (the function, and the layer pair) in its errors.
fn layer_loss(
    context: &str,
    student: ArrayView2<'_, f32>,
    teacher: ArrayView2<'_, f32>,
    kind: HiddenLossKind,
    row_mask: Option<&[bool]>,
) -> Result<LossOutput> {
    same_shape(
        &format!("{context} teacher hidden states"),
        &student,
        &teacher,
    )?;
    let (rows, dim) = student.dim();
    check_len(context, "row_mask", row_mask, rows)?;
    let student = checked_matrix(&format!("{context} student hidden states"), student)?;
    let teacher = checked_matrix(&format!("{context} teacher hidden states"), teacher)?;
    let counted: Vec<usize> = (0..rows)
        .filter(|&i| row_mask.is_none_or(|m| m[i]))
        .collect();
    let mut grad = Array2::<f32>::zeros((rows, dim));
    if counted.is_empty() || dim == 0 {
        return Ok(LossOutput {
            value: 0.0,
            grad,
            counted: 0,
        });
    }
    let mut value = 0.0;
    match kind {
        HiddenLossKind::Mse => {
            let scale = 1.0 / (counted.len() * dim) as f64;
            for &i in &counted {
                for ((g, &s), &t) in grad
                    .row_mut(i)
                    .iter_mut()
                    .zip(student.row(i))
                    .zip(teacher.row(i))
                {
                    let diff = f64::from(s) - f64::from(t);
                    value += scale * diff * diff;
                    *g = (2.0 * scale * diff) as f32;
                }
            }
        }
        HiddenLossKind::Cosine => {
            let scale = 1.0 / counted.len() as f64;
            let (mut s, mut t, mut dcos) = (Vec::new(), Vec::new(), Vec::new());
            for &i in &counted {
                s.clear();
                s.extend(student.row(i).iter().map(|&x| f64::from(x)));
                t.clear();
                t.extend(teacher.row(i).iter().map(|&x| f64::from(x)));
                let cos = cosine_with_grad(&s, &t, &mut dcos);
                value += scale * (1.0 - cos);
                for (g, d) in grad.row_mut(i).iter_mut().zip(&dcos) {
                    *g = (-scale * d) as f32;
                }
            }
        }
    }
    check_output(context, value, &grad)?;
    Ok(LossOutput {
        value,
        grad,
        counted: counted.len(),
    })
}

/// The mean of [`hidden_state_loss`] over several layers, with one gradient per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiLayerOutput {
    /// `(1/L)·Σ_layers loss_layer`.
    pub value: f64,
    /// Each layer's loss (before the `1/L`).
    pub per_layer: Vec<f64>,
    /// `∂value/∂student_layer`, in the order of the pairs given.
    pub grads: Vec<Array2<f32>>,
}

/// Hidden-state distillation over chosen layers: `pairs[k] = (student_k, teacher_k)` are the
/// hidden states of the k-th chosen (student layer, teacher layer) pair; the loss is the mean
/// over pairs. Errors name the pair index.
///
/// ```
/// use ndarray::array;
/// use qat_train::loss::{multi_layer_hidden_loss, HiddenLossKind};
/// let (s0, t0) = (array![[1.0f32, 0.0]], array![[1.0f32, 0.0]]);
/// let (s1, t1) = (array![[0.0f32, 1.0]], array![[1.0f32, 0.0]]);
/// let out = multi_layer_hidden_loss(
///     &[(s0.view(), t0.view()), (s1.view(), t1.view())], HiddenLossKind::Cosine, None).unwrap();
/// assert!((out.value - 0.5).abs() < 1e-12); // (0 + 1) / 2
/// assert_eq!(out.grads.len(), 2);
/// ```
pub fn multi_layer_hidden_loss(
    pairs: &[(ArrayView2<'_, f32>, ArrayView2<'_, f32>)],
    kind: HiddenLossKind,
    row_mask: Option<&[bool]>,
) -> Result<MultiLayerOutput> {
    if pairs.is_empty() {
        return Err(TrainError::invalid(
            "multi_layer_hidden_loss pairs",
            "[]",
            "at least one (student, teacher) layer pair is needed",
        ));
    }
    let scale = 1.0 / pairs.len() as f64;
    let mut out = MultiLayerOutput {
        value: 0.0,
        per_layer: Vec::with_capacity(pairs.len()),
        grads: Vec::with_capacity(pairs.len()),
    };
    for (k, (s, t)) in pairs.iter().enumerate() {
        let context = format!("multi_layer_hidden_loss pair {k}");
        let layer = layer_loss(&context, s.view(), t.view(), kind, row_mask)?;
        out.value += scale * layer.value;
        out.per_layer.push(layer.value);
        out.grads
            .push(layer.grad.mapv(|g| (f64::from(g) * scale) as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::test_util::{check_gradient, random_matrix};
    use proptest::prelude::*;

    #[test]
    fn gradients_match_finite_differences() {
        let s = random_matrix(3, 5, 2.0, 20);
        let t = random_matrix(3, 5, 2.0, 21);
        let mask = [true, false, true];
        for kind in [HiddenLossKind::Mse, HiddenLossKind::Cosine] {
            for m in [None, Some(&mask[..])] {
                let out = hidden_state_loss(s.view(), t.view(), kind, m).unwrap();
                check_gradient(
                    &s,
                    &out.grad,
                    |z| {
                        hidden_state_loss(z.view(), t.view(), kind, m)
                            .unwrap()
                            .value
                    },
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn multi_layer_gradients_are_scaled_by_the_layer_count() {
        let (s0, t0) = (random_matrix(2, 4, 1.0, 1), random_matrix(2, 4, 1.0, 2));
        let (s1, t1) = (random_matrix(2, 4, 1.0, 3), random_matrix(2, 4, 1.0, 4));
        let out = multi_layer_hidden_loss(
            &[(s0.view(), t0.view()), (s1.view(), t1.view())],
            HiddenLossKind::Mse,
            None,
        )
        .unwrap();
        let f = |z: &Array2<f32>| {
            multi_layer_hidden_loss(
                &[(s0.view(), t0.view()), (z.view(), t1.view())],
                HiddenLossKind::Mse,
                None,
            )
            .unwrap()
            .value
        };
        check_gradient(&s1, &out.grads[1], f, 1e-4);
        let err = multi_layer_hidden_loss(
            &[
                (s0.view(), t0.view()),
                (s1.view(), t0.slice(ndarray::s![..1, ..])),
            ],
            HiddenLossKind::Mse,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("pair 1"), "{err}");
    }

    proptest! {
        /// 1 − cos lies in [0, 2] and does not change when the student is scaled.
        #[test]
        fn cosine_loss_is_bounded_and_scale_invariant(seed in 0u64..1000, scale in 0.1f32..10.0) {
            let s = random_matrix(3, 4, 1.0, seed);
            let t = random_matrix(3, 4, 1.0, seed + 1);
            let a = hidden_state_loss(s.view(), t.view(), HiddenLossKind::Cosine, None).unwrap();
            let b = hidden_state_loss(s.mapv(|x| x * scale).view(), t.view(), HiddenLossKind::Cosine, None).unwrap();
            prop_assert!((0.0..=2.0 + 1e-9).contains(&a.value));
            prop_assert!((a.value - b.value).abs() < 1e-5);
        }
    }
}
