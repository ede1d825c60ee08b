//! Losses with their gradients with respect to the student's outputs.
//!
//! Every loss accumulates in `f64` from `f32` inputs (so the value agrees with PyTorch's `f32`
//! result to its rounding, and finite-difference checks are meaningful) and returns the value
//! with the gradient as `f32` in the shape of the student input. Cross-entropy takes its
//! exponentials in `f32` (as PyTorch does; relative error of the value ≤ 1e-6), distillation
//! in `f64` (its `T²` factor would amplify `f32` error past the 1e-6 agreement with PyTorch).
//! Rows of the logit losses run in parallel (rayon) and are summed in row order, so results do
//! not depend on the thread count. Inputs are checked: shapes
//! must agree, masks must have one entry per row, and NaN/∞ in any input, in the value or in a
//! gradient is an error naming the tensor and the row and column.
//!
//! * [`cross_entropy`] (and the weighted and answer-weighted variants) over logits `[N, V]`.
//! * [`kd_loss`]: `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over rows.
//! * [`hidden_state_loss`] / [`multi_layer_hidden_loss`]: MSE or `1 − cos` on hidden states.
//! * [`reasoning_loss`]: the chain-of-thought fidelity loss (step, trajectory, answer terms).
//! * [`composite_loss`]: `λ_task·CE + λ_kd·KD + λ_reasoning·reasoning` with [`CompositeWeights`].

mod ce;
mod composite;
mod hidden;
mod kd;
mod reasoning;

pub use ce::{answer_weighted_cross_entropy, cross_entropy, weighted_cross_entropy, IGNORE_INDEX};
pub use composite::{
    composite_loss, CompositeInputs, CompositeOutput, CompositeWeights, ReasoningInputs,
};
pub use hidden::{hidden_state_loss, multi_layer_hidden_loss, HiddenLossKind, MultiLayerOutput};
pub use kd::kd_loss;
pub use reasoning::{reasoning_loss, ReasoningLossConfig, ReasoningOutput};

use ndarray::{Array2, ArrayView2, CowArray, Ix2};

use crate::error::{check_finite_2d, Result, TrainError};

/// A loss value and its gradient with respect to the student input.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The loss (computed in `f64`).
    pub value: f64,
    /// `∂loss/∂student`, same shape as the student input.
    pub grad: Array2<f32>,
    /// How many rows (positions) contributed to the mean.
    pub counted: usize,
}

/// Numerical floor on vector norms in cosine similarities (PyTorch's `cosine_similarity` eps).
pub const COSINE_EPS: f64 = 1e-8;

/// A standard-layout view (copied only when the input is strided) with finiteness checked.
pub(crate) fn checked_matrix<'a>(
    name: &str,
    m: ArrayView2<'a, f32>,
) -> Result<CowArray<'a, f32, Ix2>> {
    let m: CowArray<'a, f32, Ix2> = if m.is_standard_layout() {
        CowArray::from(m)
    } else {
        CowArray::from(m.as_standard_layout().into_owned())
    };
    let cols = m.ncols();
    let slice = m
        .as_slice()
        .expect("as_standard_layout yields a contiguous array");
    check_finite_2d(name, slice, cols)?;
    Ok(m)
}

/// Errors unless `a` and `b` have the same `[rows, cols]`.
pub(crate) fn same_shape(
    context: &str,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
) -> Result<()> {
    if a.dim() != b.dim() {
        return Err(TrainError::shape(
            context,
            format!("{:?} (the student's shape)", a.dim()),
            format!("{:?}", b.dim()),
        ));
    }
    Ok(())
}

/// Errors unless an optional per-row slice has `rows` entries.
pub(crate) fn check_len<T>(context: &str, what: &str, v: Option<&[T]>, rows: usize) -> Result<()> {
    if let Some(v) = v {
        if v.len() != rows {
            return Err(TrainError::shape(
                format!("{context} {what}"),
                format!("{rows} entries (one per row)"),
                v.len(),
            ));
        }
    }
    Ok(())
}

/// Errors when a computed loss or gradient is not finite.
pub(crate) fn check_output(context: &str, value: f64, grad: &Array2<f32>) -> Result<()> {
    if !value.is_finite() {
        return Err(TrainError::non_finite(context, "loss value", value));
    }
    let cols = grad.ncols();
    check_finite_2d(
        &format!("{context} gradient"),
        grad.as_slice()
            .expect("gradients are built in standard layout"),
        cols,
    )
}

/// Fills `exps` with `exp(x/T − m)` for `m = max(x/T)` and returns `(m, Σ exps)`, in `f64`:
/// then `softmax = exps/Σ` and `log softmax = x/T − m − ln Σ`, one `exp` per element and stable
/// for any finite input.
pub(crate) fn shifted_exps(row: &[f32], temperature: f64, exps: &mut Vec<f64>) -> (f64, f64) {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)))
        / temperature;
    exps.clear();
    exps.extend(
        row.iter()
            .map(|&x| (f64::from(x) / temperature - max).exp()),
    );
    (max, exps.iter().sum())
}

/// `cos(s, t) = s·t / (max(‖s‖, ε)·max(‖t‖, ε))` and its gradient with respect to `s`.
pub(crate) fn cosine_with_grad(s: &[f64], t: &[f64], grad: &mut Vec<f64>) -> f64 {
    let dot: f64 = s.iter().zip(t).map(|(a, b)| a * b).sum();
    let s_norm = s.iter().map(|a| a * a).sum::<f64>().sqrt();
    let t_norm = t.iter().map(|a| a * a).sum::<f64>().sqrt();
    let (s_den, t_den) = (s_norm.max(COSINE_EPS), t_norm.max(COSINE_EPS));
    let cos = dot / (s_den * t_den);
    grad.clear();
    // Below the floor the denominator is a constant, so only the t/(…) part remains.
    let s_term = if s_norm > COSINE_EPS {
        cos / (s_norm * s_norm)
    } else {
        0.0
    };
    grad.extend(
        s.iter()
            .zip(t)
            .map(|(a, b)| b / (s_den * t_den) - s_term * a),
    );
    cos
}

#[cfg(test)]
pub(crate) mod test_util {
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A seeded random `[rows, cols]` matrix with entries in `[-scale, scale)`.
    pub fn random_matrix(rows: usize, cols: usize, scale: f32, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-scale..scale))
    }

    /// Checks `grad` against central differences of `f` at `x`, element by element.
    pub fn check_gradient(
        x: &Array2<f32>,
        grad: &Array2<f32>,
        f: impl Fn(&Array2<f32>) -> f64,
        tol: f64,
    ) {
        assert_eq!(x.dim(), grad.dim());
        let h = 1e-3f32;
        for idx in 0..x.len() {
            let (r, c) = (idx / x.ncols(), idx % x.ncols());
            let mut plus = x.clone();
            plus[[r, c]] += h;
            let mut minus = x.clone();
            minus[[r, c]] -= h;
            // The actual step after f32 rounding, so the quotient is not biased by it.
            let step = f64::from(plus[[r, c]]) - f64::from(minus[[r, c]]);
            let numeric = (f(&plus) - f(&minus)) / step;
            let analytic = f64::from(grad[[r, c]]);
            assert!(
                (numeric - analytic).abs() <= tol * (1.0 + numeric.abs()),
                "gradient at ({r}, {c}): analytic {analytic}, finite difference {numeric}"
            );
        }
    }
}
