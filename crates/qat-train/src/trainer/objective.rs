//! The composite objective of one batch: the teacher's outputs, the student's losses and the
//! gradients they send back, and the running sums a step or an evaluation reports.

use lm::LlamaModel;
use ndarray::{s, Array2, ArrayView2};

use super::{layer_pairs, BatchLoss, TeacherOutputs, Trainer};
use crate::data::Batch;
use crate::distributed::Collective;
use crate::error::{Result, TrainError};
use crate::loss::{
    composite_loss, multi_layer_hidden_loss, reasoning_loss, CompositeInputs, CompositeWeights,
    ReasoningOutput,
};

impl Trainer {
    /// Teacher logits `[N, V]` and hidden states (same order as [`Trainer::student_layers`]).
    pub(super) fn teacher_outputs(&mut self, batch: &Batch) -> Result<Option<TeacherOutputs>> {
        let layers: Vec<usize> = layer_pairs(
            &self.config,
            &self.student,
            self.teacher.as_ref(),
            &self.weights,
        )
        .iter()
        .map(|(_, p)| p.teacher)
        .collect();
        let Some(teacher) = self.teacher.as_mut() else {
            return Ok(None);
        };
        let (logits, hidden) = eval_logits_and_hidden(teacher, batch, &layers)?;
        let (b, seq, vocab) = logits.dim();
        let logits = logits
            .into_shape_with_order((b * seq, vocab))
            .map_err(|e| TrainError::shape("teacher logits", "contiguous", e))?;
        Ok(Some((logits, hidden)))
    }

    /// The composite loss of one batch from the student's logits `[N, V]` and hidden states
    /// (order of [`Trainer::student_layers`]) and the teacher's outputs.
    pub(super) fn batch_loss(
        &self,
        batch: &Batch,
        logits: ArrayView2<'_, f32>,
        student_hidden: &[ArrayView2<'_, f32>],
        teacher: Option<&TeacherOutputs>,
    ) -> Result<BatchLoss> {
        let w = self.weights;
        let targets = batch.shifted_targets();
        let row_mask: Vec<bool> = batch.attention_mask.iter().copied().collect();
        let mut composite = composite_loss(
            &CompositeWeights {
                reasoning: 0.0,
                ..w
            },
            &CompositeInputs {
                student_logits: logits,
                targets: &targets,
                teacher_logits: teacher.map(|t| t.0.view()),
                kd_row_mask: Some(&row_mask),
                reasoning: None,
            },
        )?;
        let pairs = layer_pairs(
            &self.config,
            &self.student,
            self.teacher.as_ref(),
            &self.weights,
        );
        let mut grad_hidden = Vec::new();
        let mut hidden_value = None;
        let mut k = 0;
        if let (Some(h), Some((_, teacher_hidden))) = (&self.config.loss.hidden, teacher) {
            if h.weight > 0.0 {
                let n = h.layers.len();
                let views: Vec<_> = (0..n)
                    .map(|i| (student_hidden[i], teacher_hidden[i].view()))
                    .collect();
                let out = multi_layer_hidden_loss(&views, h.kind, Some(&row_mask))?;
                composite.total += f64::from(h.weight) * out.value;
                hidden_value = Some(out.value);
                for (i, g) in out.grads.into_iter().enumerate() {
                    grad_hidden.push((pairs[i].1.student, g * h.weight));
                }
                k = n;
            }
        }
        if let (true, Some((_, teacher_hidden))) = (w.reasoning > 0.0, teacher) {
            let (value, grad) =
                self.sequence_reasoning(batch, student_hidden[k], teacher_hidden[k].view())?;
            composite.total += f64::from(w.reasoning) * value.value;
            grad_hidden.push((pairs[k].1.student, grad * w.reasoning));
            composite.reasoning = Some(value);
        }
        if !composite.total.is_finite() {
            return Err(TrainError::non_finite(
                "training loss",
                format!("step {}", self.step + 1),
                composite.total,
            ));
        }
        Ok(BatchLoss {
            composite,
            hidden: hidden_value,
            grad_hidden,
        })
    }

    /// The reasoning loss per sequence, averaged over sequences with step or answer
    /// positions; the gradient `[N, D]` into the student's hidden states.
    fn sequence_reasoning(
        &self,
        batch: &Batch,
        student: ArrayView2<'_, f32>,
        teacher: ArrayView2<'_, f32>,
    ) -> Result<(ReasoningOutput, Array2<f32>)> {
        let (rows, seq) = batch.input_ids.dim();
        let dim = student.ncols();
        let mut grad = Array2::<f32>::zeros((rows * seq, dim));
        let none = vec![false; seq];
        let mut total = ReasoningOutput {
            value: 0.0,
            step: 0.0,
            trajectory: 0.0,
            answer: 0.0,
            steps: 0,
            answers: 0,
            grad: Array2::zeros((0, dim)),
        };
        let mut counted = 0usize;
        let mut outputs = Vec::new();
        for b in 0..rows {
            let steps: Vec<bool> = batch
                .step_mask
                .as_ref()
                .map_or_else(|| none.clone(), |m| m.row(b).to_vec());
            let answers: Vec<bool> = batch
                .answer_mask
                .as_ref()
                .map_or_else(|| none.clone(), |m| m.row(b).to_vec());
            if !steps.iter().chain(&answers).any(|&m| m) {
                continue;
            }
            let range = s![b * seq..(b + 1) * seq, ..];
            let out = reasoning_loss(
                student.slice(range),
                teacher.slice(range),
                &steps,
                &answers,
                &self.config.loss.reasoning,
            )?;
            counted += 1;
            outputs.push((b, out));
        }
        let inv = if counted > 0 {
            1.0 / counted as f64
        } else {
            0.0
        };
        for (b, out) in outputs {
            total.value += inv * out.value;
            total.step += inv * out.step;
            total.trajectory += inv * out.trajectory;
            total.answer += inv * out.answer;
            total.steps += out.steps;
            total.answers += out.answers;
            let mut rows = grad.slice_mut(s![b * seq..(b + 1) * seq, ..]);
            rows.zip_mut_with(&out.grad, |g, &o| *g = o * inv as f32);
        }
        Ok((total, grad))
    }
}

/// Running sums of a step's or an evaluation's losses.
#[derive(Default)]
pub(super) struct LossSums {
    pub(super) total: f64,
    pub(super) task: Option<f64>,
    pub(super) kd: Option<f64>,
    pub(super) reasoning: Option<f64>,
    pub(super) hidden: Option<f64>,
}

impl LossSums {
    pub(super) fn add(&mut self, loss: &BatchLoss) {
        let acc = |sum: &mut Option<f64>, v: Option<f64>| {
            if let Some(v) = v {
                *sum = Some(sum.unwrap_or(0.0) + v);
            }
        };
        self.total += loss.composite.total;
        acc(&mut self.task, loss.composite.task);
        acc(&mut self.kd, loss.composite.kd);
        acc(
            &mut self.reasoning,
            loss.composite.reasoning.as_ref().map(|r| r.value),
        );
        acc(&mut self.hidden, loss.hidden);
    }

    /// Sums these sums and `tokens` over the ranks; a term is present when any rank had it.
    pub(super) fn all_reduce(
        &mut self,
        tokens: &mut usize,
        collective: &mut dyn Collective,
        what: &str,
    ) -> Result<()> {
        let terms = [self.task, self.kd, self.reasoning, self.hidden];
        let mut buffer = vec![self.total, *tokens as f64];
        for term in terms {
            buffer.extend([term.unwrap_or(0.0), f64::from(u8::from(term.is_some()))]);
        }
        collective.all_reduce_sum_f64(&mut buffer, what)?;
        self.total = buffer[0];
        // Token counts are integers far below 2^53: exact in f64.
        *tokens = buffer[1] as usize;
        let term = |i: usize| (buffer[3 + 2 * i] > 0.0).then_some(buffer[2 + 2 * i]);
        (self.task, self.kd, self.reasoning, self.hidden) = (term(0), term(1), term(2), term(3));
        Ok(())
    }
}

/// Logits and the hidden states of `layers` without dropout; a packed batch (segment ids) runs
/// the segmented forward (positions restart, attention within each document).
pub(super) fn eval_logits_and_hidden(
    model: &mut LlamaModel,
    batch: &Batch,
    layers: &[usize],
) -> Result<(ndarray::Array3<f32>, Vec<Array2<f32>>)> {
    let Some(segments) = &batch.segment_ids else {
        return Ok(model.logits_and_hidden_states(
            batch.input_ids.view(),
            Some(batch.attention_mask.view()),
            layers,
        )?);
    };
    let training = model.is_training();
    model.set_training(false);
    let pass = model.forward_segmented(batch.input_ids.view(), segments.view(), Some(layers));
    model.set_training(training);
    let pass = pass?;
    let hidden = layers
        .iter()
        .map(|&l| pass.hidden_state(l).map(|h| h.to_owned()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((pass.logits().clone(), hidden))
}
