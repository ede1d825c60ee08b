//! The training objective: task cross-entropy, logit distillation and reasoning fidelity,
//! weighted, with the gradients for the student's logits and hidden states combined.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::{cross_entropy, kd_loss, reasoning_loss, ReasoningLossConfig, ReasoningOutput};
use crate::error::{Result, TrainError};

/// Weights `λ` of the composite loss and the distillation temperature `T`.
///
/// Presets (`λ_task / λ_kd / λ_reasoning`, `T`):
///
/// | preset | task | kd | reasoning | T |
/// |---|---|---|---|---|
/// | [`default_preset`](Self::default_preset) (`"default"`) | 1.0 | 0.5 | 0.1 | 2 |
/// | [`distillation_heavy`](Self::distillation_heavy) | 0.3 | 1.0 | 0.1 | 4 |
/// | [`reasoning_focused`](Self::reasoning_focused) | 0.5 | 0.5 | 1.0 | 2 |
///
/// ```
/// use qat_train::loss::CompositeWeights;
/// let w: CompositeWeights = serde_json::from_str(
///     r#"{"task": 0.3, "kd": 1.0, "reasoning": 0.1, "temperature": 4.0}"#).unwrap();
/// assert_eq!(w, CompositeWeights::preset("distillation_heavy").unwrap());
/// assert_eq!(CompositeWeights::default().temperature, 2.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeWeights {
    /// `λ_task`, on the cross-entropy against the labels.
    pub task: f32,
    /// `λ_kd`, on [`kd_loss`](super::kd_loss) (which already carries its `T²`).
    pub kd: f32,
    /// `λ_reasoning`, on [`reasoning_loss`](super::reasoning_loss).
    pub reasoning: f32,
    /// Distillation temperature `T`.
    pub temperature: f32,
}

impl Default for CompositeWeights {
    fn default() -> Self {
        Self::default_preset()
    }
}

impl CompositeWeights {
    /// The names [`preset`](Self::preset) accepts.
    pub const PRESETS: [&'static str; 3] = ["default", "distillation_heavy", "reasoning_focused"];

    /// `1.0 / 0.5 / 0.1`, `T = 2`: the task first, distillation as a regulariser.
    pub fn default_preset() -> Self {
        Self {
            task: 1.0,
            kd: 0.5,
            reasoning: 0.1,
            temperature: 2.0,
        }
    }

    /// `0.3 / 1.0 / 0.1`, `T = 4`: follow the teacher's soft distribution closely.
    pub fn distillation_heavy() -> Self {
        Self {
            task: 0.3,
            kd: 1.0,
            reasoning: 0.1,
            temperature: 4.0,
        }
    }

    /// `0.5 / 0.5 / 1.0`, `T = 2`: keep the teacher's chain of thought.
    pub fn reasoning_focused() -> Self {
        Self {
            task: 0.5,
            kd: 0.5,
            reasoning: 1.0,
            temperature: 2.0,
        }
    }

    /// A preset by name (one of [`PRESETS`](Self::PRESETS)).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(Self::default_preset()),
            "distillation_heavy" => Ok(Self::distillation_heavy()),
            "reasoning_focused" => Ok(Self::reasoning_focused()),
            other => Err(TrainError::invalid(
                "composite loss preset",
                other,
                format!("known presets: {}", Self::PRESETS.join(", ")),
            )),
        }
    }

    /// Errors unless the weights are finite and non-negative and `T` is finite and positive.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [
            ("task", self.task),
            ("kd", self.kd),
            ("reasoning", self.reasoning),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(TrainError::invalid(
                    format!("CompositeWeights.{name}"),
                    w,
                    "must be finite and non-negative",
                ));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(TrainError::invalid(
                "CompositeWeights.temperature",
                self.temperature,
                "must be finite and positive",
            ));
        }
        Ok(())
    }
}

/// The hidden states and masks the reasoning term needs.
#[derive(Debug, Clone)]
pub struct ReasoningInputs<'a> {
    /// Student hidden states `[N, D]` (the layer the reasoning loss reads).
    pub student_hidden: ArrayView2<'a, f32>,
    /// Teacher hidden states `[N, D]`.
    pub teacher_hidden: ArrayView2<'a, f32>,
    /// Positions that close a reasoning step.
    pub step_mask: &'a [bool],
    /// Answer positions.
    pub answer_mask: &'a [bool],
    /// Weights of the reasoning loss's own terms.
    pub config: ReasoningLossConfig,
}

/// Everything [`composite_loss`] reads. Rows of the logits are positions (`[N, V]`).
#[derive(Debug, Clone)]
pub struct CompositeInputs<'a> {
    /// Student logits `[N, V]`.
    pub student_logits: ArrayView2<'a, f32>,
    /// Task targets, one per row ([`IGNORE_INDEX`](super::IGNORE_INDEX) = not counted).
    pub targets: &'a [i64],
    /// Teacher logits `[N, V]`; needed when `λ_kd > 0`.
    pub teacher_logits: Option<ArrayView2<'a, f32>>,
    /// Rows the distillation term averages over (e.g. the attention mask); all when `None`.
    pub kd_row_mask: Option<&'a [bool]>,
    /// Hidden states for the reasoning term; needed when `λ_reasoning > 0`.
    pub reasoning: Option<ReasoningInputs<'a>>,
}

/// The composite loss, its terms and the combined gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct CompositeOutput {
    /// `λ_task·task + λ_kd·kd + λ_reasoning·reasoning` (terms with `λ = 0` are not computed).
    pub total: f64,
    /// The cross-entropy (unweighted), when computed.
    pub task: Option<f64>,
    /// The distillation loss (unweighted, with its `T²`), when computed.
    pub kd: Option<f64>,
    /// The reasoning loss's value and terms (unweighted), when computed.
    pub reasoning: Option<ReasoningOutput>,
    /// `∂total/∂student_logits`, `[N, V]`.
    pub grad_logits: Array2<f32>,
    /// `∂total/∂student_hidden`, `[N, D]`, when the reasoning term was computed.
    pub grad_hidden: Option<Array2<f32>>,
}

/// `total = λ_task·CE(student, targets) + λ_kd·KD_T(student, teacher) + λ_reasoning·R(h_s, h_t)`.
///
/// A term with weight `0` is skipped (its inputs may be absent); a term with a positive weight
/// whose inputs are missing is an error naming it. The logits' gradient is
/// `λ_task·∂CE + λ_kd·∂KD`; the hidden states' gradient is `λ_reasoning·∂R`.
///
/// ```
/// use ndarray::array;
/// use qat_train::loss::{composite_loss, CompositeInputs, CompositeWeights};
/// let student = array![[1.0f32, 0.0, -1.0], [0.0, 0.5, 0.0]];
/// let teacher = array![[2.0f32, 0.0, -2.0], [0.0, 1.0, 0.0]];
/// let weights = CompositeWeights { reasoning: 0.0, ..CompositeWeights::default() };
/// let out = composite_loss(&weights, &CompositeInputs {
///     student_logits: student.view(),
///     targets: &[0, 1],
///     teacher_logits: Some(teacher.view()),
///     kd_row_mask: None,
///     reasoning: None,
/// }).unwrap();
/// let expected = out.task.unwrap() + 0.5 * out.kd.unwrap();
/// assert!((out.total - expected).abs() < 1e-12);
/// assert!(out.grad_hidden.is_none());
/// ```
pub fn composite_loss(
    weights: &CompositeWeights,
    inputs: &CompositeInputs<'_>,
) -> Result<CompositeOutput> {
    weights.validate()?;
    let logits = inputs.student_logits;
    let mut grad_logits = Array2::<f32>::zeros(logits.dim());
    let mut total = 0.0;
    let add_scaled = |acc: &mut Array2<f32>, g: &Array2<f32>, w: f32| {
        acc.zip_mut_with(g, |a, &b| *a += w * b);
    };

    let task = if weights.task > 0.0 {
        let out = cross_entropy(logits, inputs.targets)?;
        total += f64::from(weights.task) * out.value;
        add_scaled(&mut grad_logits, &out.grad, weights.task);
        Some(out.value)
    } else {
        None
    };

    let kd = if weights.kd > 0.0 {
        let teacher = inputs.teacher_logits.ok_or_else(|| {
            TrainError::invalid(
                "composite_loss teacher_logits",
                "None",
                format!(
                    "the KD weight is {} so teacher logits are needed",
                    weights.kd
                ),
            )
        })?;
        let out = kd_loss(logits, teacher, weights.temperature, inputs.kd_row_mask)?;
        total += f64::from(weights.kd) * out.value;
        add_scaled(&mut grad_logits, &out.grad, weights.kd);
        Some(out.value)
    } else {
        None
    };

    let (reasoning, grad_hidden) = if weights.reasoning > 0.0 {
        let r = inputs.reasoning.as_ref().ok_or_else(|| {
            TrainError::invalid(
                "composite_loss reasoning",
                "None",
                format!(
                    "the reasoning weight is {} so hidden states and masks are needed",
                    weights.reasoning
                ),
            )
        })?;
        let out = reasoning_loss(
            r.student_hidden,
            r.teacher_hidden,
            r.step_mask,
            r.answer_mask,
            &r.config,
        )?;
        total += f64::from(weights.reasoning) * out.value;
        let grad = out.grad.mapv(|g| weights.reasoning * g);
        (Some(out), Some(grad))
    } else {
        (None, None)
    };

    if !total.is_finite() {
        return Err(TrainError::non_finite(
            "composite_loss",
            "total loss",
            total,
        ));
    }
    Ok(CompositeOutput {
        total,
        task,
        kd,
        reasoning,
        grad_logits,
        grad_hidden,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::test_util::{check_gradient, random_matrix};

    #[test]
    fn gradients_match_finite_differences() {
        let logits = random_matrix(4, 6, 2.0, 40);
        let teacher = random_matrix(4, 6, 2.0, 41);
        let hs = random_matrix(4, 3, 1.0, 42);
        let ht = random_matrix(4, 3, 1.0, 43);
        let targets = [1, 2, -100, 5];
        let steps = [true, false, true, false];
        let answer = [false, false, false, true];
        let weights = CompositeWeights::reasoning_focused();
        let run = |l: &Array2<f32>, h: &Array2<f32>| {
            composite_loss(
                &weights,
                &CompositeInputs {
                    student_logits: l.view(),
                    targets: &targets,
                    teacher_logits: Some(teacher.view()),
                    kd_row_mask: Some(&[true, true, false, true]),
                    reasoning: Some(ReasoningInputs {
                        student_hidden: h.view(),
                        teacher_hidden: ht.view(),
                        step_mask: &steps,
                        answer_mask: &answer,
                        config: ReasoningLossConfig::default(),
                    }),
                },
            )
            .unwrap()
        };
        let out = run(&logits, &hs);
        check_gradient(&logits, &out.grad_logits, |l| run(l, &hs).total, 1e-4);
        check_gradient(
            &hs,
            out.grad_hidden.as_ref().unwrap(),
            |h| run(&logits, h).total,
            1e-4,
        );
    }

    #[test]
    fn missing_inputs_for_weighted_terms_are_errors() {
        let logits = random_matrix(2, 3, 1.0, 1);
        let inputs = CompositeInputs {
            student_logits: logits.view(),
            targets: &[0, 1],
            teacher_logits: None,
            kd_row_mask: None,
            reasoning: None,
        };
        let err = composite_loss(&CompositeWeights::default(), &inputs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("teacher_logits"), "{err}");
        let only_task = CompositeWeights {
            kd: 0.0,
            reasoning: 0.0,
            ..CompositeWeights::default()
        };
        let out = composite_loss(&only_task, &inputs).unwrap();
        assert_eq!(out.kd, None);
        assert!(CompositeWeights::preset("nope")
            .unwrap_err()
            .to_string()
            .contains("reasoning_focused"));
    }

    #[test]
    fn presets_round_trip_through_json() {
        for name in CompositeWeights::PRESETS {
            let w = CompositeWeights::preset(name).unwrap();
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(serde_json::from_str::<CompositeWeights>(&json).unwrap(), w);
        }
    }
}
