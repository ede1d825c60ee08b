//! The chain-of-thought fidelity loss: the student's hidden states should pass through the
//! teacher's reasoning steps, move between them the way the teacher's do, and end on the
//! teacher's answer.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::{check_len, check_output, checked_matrix, cosine_with_grad, same_shape};
use crate::error::{Result, TrainError};

/// Weights of the three terms of [`reasoning_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningLossConfig {
    /// Weight of the per-step alignment term `L_step`.
    pub step_weight: f32,
    /// Weight of the trajectory term `L_traj` on consecutive step differences.
    pub trajectory_weight: f32,
    /// Weight of the answer-position alignment term `L_answer`.
    pub answer_weight: f32,
}

impl Default for ReasoningLossConfig {
    /// `1.0 / 1.0 / 2.0`: steps and transitions count equally, the answer twice.
    fn default() -> Self {
        Self {
            step_weight: 1.0,
            trajectory_weight: 1.0,
            answer_weight: 2.0,
        }
    }
}

impl ReasoningLossConfig {
    /// Errors unless every weight is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [
            ("step_weight", self.step_weight),
            ("trajectory_weight", self.trajectory_weight),
            ("answer_weight", self.answer_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(TrainError::invalid(
                    format!("ReasoningLossConfig.{name}"),
                    w,
                    "must be finite and non-negative",
                ));
            }
        }
        Ok(())
    }
}

/// The value, its terms and the gradient of [`reasoning_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReasoningOutput {
    /// `w_step·L_step + w_traj·L_traj + w_answer·L_answer`.
    pub value: f64,
    /// `L_step` (0 without step positions).
    pub step: f64,
    /// `L_traj` (0 with fewer than two step positions).
    pub trajectory: f64,
    /// `L_answer` (0 without answer positions).
    pub answer: f64,
    /// Number of step-closing positions `K`.
    pub steps: usize,
    /// Number of answer positions.
    pub answers: usize,
    /// `∂value/∂student_hidden`, `[N, D]`.
    pub grad: Array2<f32>,
}

/// Chain-of-thought fidelity between student and teacher hidden states `[N, D]`
/// (N positions of one sequence, or a flattened batch whose steps are in order).
///
/// Let `p_1 < … < p_K` be the positions where `step_mask` is `true` (the tokens that close a
/// reasoning step), `A` the positions where `answer_mask` is `true`, `s_i`/`t_i` the student and
/// teacher hidden states at position `i`, and `cos(a, b) = a·b / (max(‖a‖, ε)·max(‖b‖, ε))`
/// with `ε = 1e-8`. Then
///
/// * `L_step   = (1/K)·Σ_{k=1..K} (1 − cos(t_{p_k}, s_{p_k}))` — each step's state matches;
/// * `L_traj   = (1/(K−1))·Σ_{k=2..K} (1 − cos(Δt_k, Δs_k))`, `Δh_k = h_{p_k} − h_{p_{k−1}}` —
///   the student moves from one step to the next in the teacher's direction;
/// * `L_answer = (1/|A|)·Σ_{a∈A} (1 − cos(t_a, s_a))` — the answer tokens match;
/// * `loss = step_weight·L_step + trajectory_weight·L_traj + answer_weight·L_answer`.
///
/// A term whose set is empty (`K = 0`, `K < 2`, `A = ∅`) is `0`. The gradient flows into every
/// step position through both the step term and the two differences it takes part in.
///
/// ```
/// use ndarray::array;
/// use qat_train::loss::{reasoning_loss, ReasoningLossConfig};
/// let teacher = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
/// let steps = [true, true, false];
/// let answer = [false, false, true];
/// let config = ReasoningLossConfig::default();
/// let out = reasoning_loss(teacher.view(), teacher.view(), &steps, &answer, &config).unwrap();
/// assert!(out.value.abs() < 1e-12); // a student identical to the teacher
/// let student = array![[0.0f32, 1.0], [1.0, 0.0], [1.0, 1.0]];
/// let out = reasoning_loss(student.view(), teacher.view(), &steps, &answer, &config).unwrap();
/// assert!((out.step - 1.0).abs() < 1e-12);       // both steps orthogonal to the teacher's
/// assert!((out.trajectory - 2.0).abs() < 1e-12); // the move goes the opposite way
/// assert!(out.answer.abs() < 1e-12);
/// ```
pub fn reasoning_loss(
    student: ArrayView2<'_, f32>,
    teacher: ArrayView2<'_, f32>,
    step_mask: &[bool],
    answer_mask: &[bool],
    config: &ReasoningLossConfig,
) -> Result<ReasoningOutput> {
    const CONTEXT: &str = "reasoning_loss";
    config.validate()?;
    same_shape("reasoning_loss teacher hidden states", &student, &teacher)?;
    let (rows, dim) = student.dim();
    check_len(CONTEXT, "step_mask", Some(step_mask), rows)?;
    check_len(CONTEXT, "answer_mask", Some(answer_mask), rows)?;
    let student = checked_matrix("reasoning_loss student hidden states", student)?;
    let teacher = checked_matrix("reasoning_loss teacher hidden states", teacher)?;
    let row_f64 = |m: &ndarray::CowArray<'_, f32, ndarray::Ix2>, i: usize| -> Vec<f64> {
        m.row(i).iter().map(|&x| f64::from(x)).collect()
    };
    let steps: Vec<usize> = (0..rows).filter(|&i| step_mask[i]).collect();
    let answers: Vec<usize> = (0..rows).filter(|&i| answer_mask[i]).collect();
    // Accumulated in f64 because a step position receives up to three contributions.
    let mut grad = vec![0.0f64; rows * dim];
    let mut dcos = Vec::with_capacity(dim);

    // Σ (1 − cos(t_i, s_i)) over `positions`, scaled by weight/len, gradient added in place.
    let mut alignment = |positions: &[usize], weight: f64, grad: &mut [f64]| -> f64 {
        if positions.is_empty() {
            return 0.0;
        }
        let scale = 1.0 / positions.len() as f64;
        let mut term = 0.0;
        for &i in positions {
            let cos = cosine_with_grad(&row_f64(&student, i), &row_f64(&teacher, i), &mut dcos);
            term += scale * (1.0 - cos);
            for (g, d) in grad[i * dim..(i + 1) * dim].iter_mut().zip(&dcos) {
                *g -= weight * scale * d;
            }
        }
        term
    };
    let step = alignment(&steps, f64::from(config.step_weight), &mut grad);
    let answer = alignment(&answers, f64::from(config.answer_weight), &mut grad);

    let mut trajectory = 0.0;
    if steps.len() >= 2 {
        let scale = 1.0 / (steps.len() - 1) as f64;
        let weight = f64::from(config.trajectory_weight);
        let mut dcos = Vec::with_capacity(dim);
        for pair in steps.windows(2) {
            let (prev, cur) = (pair[0], pair[1]);
            let diff = |m: &ndarray::CowArray<'_, f32, ndarray::Ix2>| -> Vec<f64> {
                row_f64(m, cur)
                    .iter()
                    .zip(row_f64(m, prev))
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let cos = cosine_with_grad(&diff(&student), &diff(&teacher), &mut dcos);
            trajectory += scale * (1.0 - cos);
            // Δs = s_cur − s_prev: +∂ into the current step, −∂ into the previous one.
            for (j, d) in dcos.iter().enumerate() {
                grad[cur * dim + j] -= weight * scale * d;
                grad[prev * dim + j] += weight * scale * d;
            }
        }
    }
    let value = f64::from(config.step_weight) * step
        + f64::from(config.trajectory_weight) * trajectory
        + f64::from(config.answer_weight) * answer;
    let grad = Array2::from_shape_vec((rows, dim), grad.into_iter().map(|g| g as f32).collect())
        .expect("rows·dim gradient entries");
    check_output(CONTEXT, value, &grad)?;
    Ok(ReasoningOutput {
        value,
        step,
        trajectory,
        answer,
        steps: steps.len(),
        answers: answers.len(),
        grad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::test_util::{check_gradient, random_matrix};
    use proptest::prelude::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let s = random_matrix(7, 5, 2.0, 30);
        let t = random_matrix(7, 5, 2.0, 31);
        let steps = [false, true, false, true, true, false, false];
        let answer = [false, false, false, false, false, true, true];
        let config = ReasoningLossConfig {
            step_weight: 0.7,
            trajectory_weight: 1.3,
            answer_weight: 2.0,
        };
        let out = reasoning_loss(s.view(), t.view(), &steps, &answer, &config).unwrap();
        assert_eq!((out.steps, out.answers), (3, 2));
        let expected = f64::from(config.step_weight) * out.step
            + f64::from(config.trajectory_weight) * out.trajectory
            + f64::from(config.answer_weight) * out.answer;
        assert!((out.value - expected).abs() < 1e-12);
        check_gradient(
            &s,
            &out.grad,
            |z| {
                reasoning_loss(z.view(), t.view(), &steps, &answer, &config)
                    .unwrap()
                    .value
            },
            1e-4,
        );
        // Positions in neither mask get no gradient.
        assert!(out.grad.row(0).iter().all(|&g| g == 0.0));
        assert!(out.grad.row(2).iter().all(|&g| g == 0.0));
    }

    #[test]
    fn empty_masks_give_zero_terms() {
        let s = random_matrix(3, 2, 1.0, 1);
        let t = random_matrix(3, 2, 1.0, 2);
        let none = [false; 3];
        let out = reasoning_loss(
            s.view(),
            t.view(),
            &[true, false, false],
            &none,
            &ReasoningLossConfig::default(),
        )
        .unwrap();
        assert_eq!((out.trajectory, out.answer), (0.0, 0.0));
        assert!(out.step > 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = random_matrix(3, 2, 1.0, 1);
        let config = ReasoningLossConfig::default();
        let err = reasoning_loss(s.view(), s.view(), &[true; 2], &[false; 3], &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("step_mask"), "{err}");
        let bad = ReasoningLossConfig {
            answer_weight: -1.0,
            ..config
        };
        let err = reasoning_loss(s.view(), s.view(), &[true; 3], &[false; 3], &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("answer_weight"), "{err}");
    }

    proptest! {
        /// Every term lies in [0, 2] and the loss is invariant to scaling the student.
        #[test]
        fn terms_are_bounded_and_scale_invariant(seed in 0u64..500, scale in 0.2f32..5.0) {
            let s = random_matrix(6, 3, 1.0, seed);
            let t = random_matrix(6, 3, 1.0, seed + 1);
            let steps = [true, false, true, true, false, false];
            let answer = [false, false, false, false, true, true];
            let config = ReasoningLossConfig::default();
            let a = reasoning_loss(s.view(), t.view(), &steps, &answer, &config).unwrap();
            let b = reasoning_loss(s.mapv(|x| x * scale).view(), t.view(), &steps, &answer, &config).unwrap();
            for term in [a.step, a.trajectory, a.answer] {
                prop_assert!((0.0..=2.0 + 1e-9).contains(&term));
            }
            prop_assert!((a.value - b.value).abs() < 1e-5);
        }
    }
}
