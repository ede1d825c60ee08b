//! Measuring a model on the task: exact-match accuracy of greedily generated answers, and
//! perplexity of the labelled tokens.

use indicatif::ProgressBar;
use lm::{LlamaModel, Sampling};
use ndarray::Array2;
use qat_train::data::Example;
use qat_train::loss::IGNORE_INDEX;
use rayon::prelude::*;

use super::error::{DemoError, Result};
use super::task::{answer_of, Problem, Tokenizer, EOS_ID, MAX_TOKENS};

/// How many problems a model answered exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
}

impl ExactMatch {
    /// `correct / total` (0 for no problems).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// The continuation `model` writes greedily after a problem's prompt, as text (up to `</s>`).
pub fn solve(model: &mut LlamaModel, problem: &Problem, tokenizer: &Tokenizer) -> Result<String> {
    let prompt = problem.prompt_ids(tokenizer);
    let max_new = MAX_TOKENS - prompt.len();
    let ids = model.generate(&prompt, max_new, &Sampling::Greedy, Some(EOS_ID))?;
    tokenizer.decode(&ids)
}

/// Exact-match accuracy: the share of `problems` whose generated answer (after `#`) is the
/// true one. The chain of thought is not graded, only the answer. Problems are split between
/// rayon's threads, each with its own copy of the model (generation keeps a cache per call,
/// the weights are only read); `progress` advances once per problem.
pub fn exact_match(
    model: &LlamaModel,
    problems: &[Problem],
    tokenizer: &Tokenizer,
    progress: Option<&ProgressBar>,
) -> Result<ExactMatch> {
    let threads = rayon::current_num_threads().max(1);
    let chunk = problems.len().div_ceil(threads).max(1);
    let correct = problems
        .par_chunks(chunk)
        .map(|chunk| -> Result<usize> {
            let mut local = model.clone();
            let mut correct = 0;
            for p in chunk {
                let text = solve(&mut local, p, tokenizer)?;
                correct += usize::from(answer_of(&text).as_deref() == Some(p.answer().as_str()));
                if let Some(bar) = progress {
                    bar.inc(1);
                }
            }
            Ok(correct)
        })
        .collect::<Result<Vec<usize>>>()?
        .into_iter()
        .sum();
    Ok(ExactMatch {
        correct,
        total: problems.len(),
    })
}

/// Mean cross-entropy (nats per labelled token) and perplexity of `examples`, batched
/// `batch_size` at a time with right padding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub mean_loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Perplexity of the labelled tokens (labels, or the inputs themselves when an example has
/// none; the causal shift is done here: logits at `t` predict the label at `t + 1`).
pub fn perplexity(
    model: &mut LlamaModel,
    examples: &[Example],
    batch_size: usize,
) -> Result<Perplexity> {
    if batch_size == 0 {
        return Err(DemoError::invalid("batch size", 0, "must be positive"));
    }
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    for batch in examples.chunks(batch_size) {
        let seq = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        if seq == 0 {
            return Err(DemoError::invalid("example", "[]", "empty input_ids"));
        }
        let mut ids = Array2::<u32>::zeros((batch.len(), seq));
        let mut mask = Array2::<bool>::from_elem((batch.len(), seq), false);
        let mut labels = Array2::<i64>::from_elem((batch.len(), seq), IGNORE_INDEX);
        for (b, e) in batch.iter().enumerate() {
            for (t, &id) in e.input_ids.iter().enumerate() {
                ids[[b, t]] = id;
                mask[[b, t]] = true;
                labels[[b, t]] = e.labels.as_ref().map_or(i64::from(id), |l| l[t]);
            }
        }
        let logits = model.logits(ids.view(), Some(mask.view()))?;
        // lm's cross-entropy shifts the labels and says how many positions it averaged.
        let ce = lm::cross_entropy(logits.view(), labels.view())?;
        if ce.counted > 0 {
            total += f64::from(ce.loss) * ce.counted as f64;
            tokens += ce.counted;
        }
    }
    if tokens == 0 {
        return Err(DemoError::invalid(
            "examples",
            examples.len(),
            "no labelled tokens to measure",
        ));
    }
    let mean_loss = total / tokens as f64;
    Ok(Perplexity {
        mean_loss,
        perplexity: mean_loss.exp(),
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::task::{draw_splits, SplitSizes};

    fn small_model() -> LlamaModel {
        let config = lm::LlamaConfig::new(Tokenizer::new().vocab_size(), 16, 32, 1, 2, 2).unwrap();
        LlamaModel::random(config, 5).unwrap()
    }

    #[test]
    fn an_untrained_model_is_near_uniform_and_solves_nothing() {
        let tokenizer = Tokenizer::new();
        let splits = draw_splits(SplitSizes {
            train: 0,
            validation: 0,
            test: 6,
            seed: 1,
        })
        .unwrap();
        let examples: Vec<_> = splits.test.iter().map(|p| p.example(&tokenizer)).collect();
        let mut model = small_model();
        let ppl = perplexity(&mut model, &examples, 4).unwrap();
        let labelled: usize = examples
            .iter()
            .map(|e| {
                e.labels.as_ref().unwrap()[1..]
                    .iter()
                    .filter(|&&l| l >= 0)
                    .count()
            })
            .sum();
        assert_eq!(ppl.tokens, labelled);
        let vocab = tokenizer.vocab_size() as f64;
        assert!((ppl.perplexity - vocab).abs() < 0.1 * vocab, "{ppl:?}");
        let em = exact_match(&model, &splits.test, &tokenizer, None).unwrap();
        assert_eq!((em.correct, em.total), (0, 6));
        assert!(perplexity(&mut model, &examples, 0).is_err());
    }
}
