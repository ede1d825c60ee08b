//! Evaluation on held-out data (no update, no dropout) and the early-stopping state it drives.

use super::objective::{eval_logits_and_hidden, LossSums};
use super::{batch_config, BatchLoss, Trainer};
use crate::data::{Batch, DataLoader, Dataset};
use crate::distributed;
use crate::error::{Result, TrainError};
use crate::metrics::EvalMetrics;

impl Trainer {
    /// Evaluates on the validation set (if any) without updating; see
    /// [`Trainer::evaluate_dataset`].
    pub fn evaluate(&mut self) -> Result<Option<EvalMetrics>> {
        match self.validation.take() {
            None => Ok(None),
            Some(v) => {
                let result = self.evaluate_dataset(&v);
                self.validation = Some(v);
                result.map(Some)
            }
        }
    }

    /// The objective's terms on `dataset` in file order (no shuffle, no dropout, no update),
    /// averaged over its batches.
    pub fn evaluate_dataset(&mut self, dataset: &Dataset) -> Result<EvalMetrics> {
        let mut loader = DataLoader::new(dataset.clone(), batch_config(&self.config, false))?;
        let batches = loader.batches_per_epoch();
        let mut sums = LossSums::default();
        let mut tokens = 0;
        for index in 0..batches {
            let batch = loader.next_batch()?;
            if !distributed::owns(self.collective.as_ref(), index, batches) {
                continue;
            }
            tokens += batch.num_tokens();
            let loss = self.eval_batch_loss(&batch)?;
            sums.add(&loss);
        }
        if self.collective.size() > 1 {
            sums.all_reduce(&mut tokens, self.collective.as_mut(), "evaluation losses")?;
        }
        let n = batches as f64;
        Ok(EvalMetrics {
            step: self.step,
            total_loss: sums.total / n,
            task_loss: sums.task.map(|v| v / n),
            kd_loss: sums.kd.map(|v| v / n),
            reasoning_loss: sums.reasoning.map(|v| v / n),
            hidden_loss: sums.hidden.map(|v| v / n),
            batches,
            tokens,
        })
    }

    /// The losses of one batch without keeping a backward pass (no dropout).
    pub(super) fn eval_batch_loss(&mut self, batch: &Batch) -> Result<BatchLoss> {
        let layers = self.student_layers();
        let teacher_out = self.teacher_outputs(batch)?;
        let (logits, hidden) = eval_logits_and_hidden(&mut self.student, batch, &layers)?;
        let (b, seq, vocab) = logits.dim();
        let logits = logits
            .into_shape_with_order((b * seq, vocab))
            .map_err(|e| TrainError::shape("student logits", "contiguous", e))?;
        let views: Vec<_> = hidden.iter().map(|h| h.view()).collect();
        self.batch_loss(batch, logits.view(), &views, teacher_out.as_ref())
    }

    /// Evaluates and updates the early-stopping state.
    pub(super) fn evaluate_and_track(&mut self) -> Result<Option<EvalMetrics>> {
        let Some(eval) = self.evaluate()? else {
            return Ok(None);
        };
        let min_delta = self.config.early_stopping.map_or(0.0, |e| e.min_delta);
        match self.best_eval {
            Some(best) if eval.total_loss >= best - min_delta => self.evals_since_best += 1,
            _ => {
                self.best_eval = Some(eval.total_loss);
                self.evals_since_best = 0;
            }
        }
        if let Some(es) = self.config.early_stopping {
            if self.evals_since_best >= es.patience {
                self.stopped_early = true;
            }
        }
        self.last_eval = Some(eval.clone());
        Ok(Some(eval))
    }
}
