//! Data-free distillation data (LLM-QAT, Liu et al. 2023, §2.1): the full-precision teacher
//! writes the training sequences itself, so a quantized student can be distilled without the
//! data the model was trained on.
//!
//! LLM-QAT's recipe, which this follows: each sequence starts from a token drawn uniformly
//! from the vocabulary; the teacher then extends it one token at a time — the first few
//! continuations greedily (its top-1, which keeps the start on the model's own path), the rest
//! sampled from its softmax (greedy decoding alone collapses into repeated text, sampling
//! alone from a random start wanders off the distribution). The paper takes the top-1 for the
//! first 3–5 tokens; [`DataFreeConfig::greedy_tokens`] says how many here (default 4).
//! Generation stops at `seq_len` tokens or after the end-of-sequence token.
//!
//! Every random choice comes from the caller's seed: sequence `i` uses its own ChaCha8
//! stream derived from `(seed, i)`, so the set is the same whatever order or subset of
//! sequences is generated.
//!
//! ```
//! use lm::{LlamaConfig, LlamaModel};
//! use qat_train::data_free::{teacher_sequences, DataFreeConfig};
//!
//! let mut teacher = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 7).unwrap();
//! let config = DataFreeConfig { sequences: 3, seq_len: 10, ..DataFreeConfig::new(42) };
//! let data = teacher_sequences(&mut teacher, &config, &mut |_, _| {}).unwrap();
//! assert_eq!(data.len(), 3);
//! assert!(data.examples().iter().all(|e| e.input_ids.len() == 10));
//! let again = teacher_sequences(&mut teacher, &config, &mut |_, _| {}).unwrap();
//! assert_eq!(data, again, "the same seed gives the same sequences");
//! ```

use lm::sampling::{LogitsSampler, SamplingConfig};
use lm::LlamaModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{Dataset, Example};
use crate::error::{Result, TrainError};

/// How the teacher writes the training set.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFreeConfig {
    /// Number of sequences.
    pub sequences: usize,
    /// Tokens per sequence (prefix and start token included), at least 2.
    pub seq_len: usize,
    /// Continuations after the start token taken greedily before sampling begins.
    pub greedy_tokens: usize,
    /// Temperature of the sampled continuations (> 0).
    pub temperature: f32,
    /// Nucleus sampling of the sampled continuations (`None`: the whole softmax, as LLM-QAT).
    pub top_p: Option<f32>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Tokens put before the random start token of every sequence (e.g. the model's BOS).
    pub prefix: Vec<u32>,
    /// Token ids never drawn as the start token (special and control tokens).
    pub exclude_start: Vec<u32>,
    /// A sequence ends after this token when the teacher produces it.
    pub eos: Option<u32>,
}

impl DataFreeConfig {
    /// LLM-QAT's defaults: 64 sequences of 128 tokens, 4 greedy continuations, temperature 1,
    /// no prefix, no excluded start token, no end token.
    pub fn new(seed: u64) -> Self {
        Self {
            sequences: 64,
            seq_len: 128,
            greedy_tokens: 4,
            temperature: 1.0,
            top_p: None,
            seed,
            prefix: Vec::new(),
            exclude_start: Vec::new(),
            eos: None,
        }
    }

    /// Errors naming the first value that cannot work for a vocabulary of `vocab` tokens and
    /// a model of `max_positions` positions.
    pub fn validate(&self, vocab: usize, max_positions: usize) -> Result<()> {
        if self.sequences == 0 {
            return Err(TrainError::invalid(
                "data_free.sequences",
                0,
                "at least one sequence is needed",
            ));
        }
        if self.seq_len < self.prefix.len() + 2 {
            return Err(TrainError::invalid(
                "data_free.seq_len",
                self.seq_len,
                format!(
                    "must hold the {}-token prefix, the start token and one continuation",
                    self.prefix.len()
                ),
            ));
        }
        if self.seq_len > max_positions {
            return Err(TrainError::invalid(
                "data_free.seq_len",
                self.seq_len,
                format!("the teacher has {max_positions} positions"),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(TrainError::invalid(
                "data_free.temperature",
                self.temperature,
                "must be finite and positive",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(TrainError::invalid(
                    "data_free.top_p",
                    p,
                    "must be in (0, 1]",
                ));
            }
        }
        for (what, ids) in [
            ("data_free.prefix", &self.prefix),
            ("data_free.exclude_start", &self.exclude_start),
        ] {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(TrainError::invalid(
                    what,
                    id,
                    format!("the vocabulary has {vocab} tokens"),
                ));
            }
        }
        if let Some(id) = self.eos.filter(|&id| id as usize >= vocab) {
            return Err(TrainError::invalid(
                "data_free.eos",
                id,
                format!("the vocabulary has {vocab} tokens"),
            ));
        }
        let mut excluded = self.exclude_start.clone();
        excluded.sort_unstable();
        excluded.dedup();
        if excluded.len() >= vocab {
            return Err(TrainError::invalid(
                "data_free.exclude_start",
                format!("{} ids", excluded.len()),
                format!("leaves none of the {vocab} tokens to start a sequence with"),
            ));
        }
        Ok(())
    }
}

/// The seed of sequence `index`'s stream (SplitMix64 of the pair, so neighbouring indices
/// get unrelated streams).
fn sequence_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One sequence written by `teacher` (see the module docs): the prefix, a uniformly drawn
/// start token, `greedy_tokens` greedy continuations, then sampled ones.
pub fn teacher_sequence(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    index: usize,
) -> Result<Vec<u32>> {
    let vocab = teacher.config().vocab_size;
    config.validate(vocab, teacher.config().max_position_embeddings)?;
    let seed = sequence_seed(config.seed, index);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Rejection keeps the draw uniform over the allowed ids; validate() left at least one.
    let start = loop {
        let id = rng.random_range(0..vocab as u32);
        if !config.exclude_start.contains(&id) {
            break id;
        }
    };
    let mut greedy = LogitsSampler::new(SamplingConfig::greedy())?;
    let mut sampled = LogitsSampler::new(SamplingConfig {
        do_sample: true,
        temperature: config.temperature,
        top_p: config.top_p,
        seed: rng.random(),
        ..SamplingConfig::greedy()
    })?;
    let mut ids = config.prefix.clone();
    ids.push(start);
    let training = teacher.is_training();
    teacher.set_training(false);
    let mut cache = teacher.new_kv_cache();
    let mut fed = 0;
    let result = (|| -> Result<()> {
        while ids.len() < config.seq_len {
            let logits = teacher.forward_cached(&ids[fed..], &mut cache)?;
            fed = ids.len();
            let mut last = logits.row(logits.nrows() - 1).to_vec();
            let continuation = ids.len() - config.prefix.len() - 1;
            let next = if continuation < config.greedy_tokens {
                greedy.next_token(&mut last, &ids)?
            } else {
                sampled.next_token(&mut last, &ids)?
            };
            ids.push(next);
            if Some(next) == config.eos {
                break;
            }
        }
        Ok(())
    })();
    teacher.set_training(training);
    result?;
    Ok(ids)
}

/// `config.sequences` sequences written by `teacher`, as a dataset of plain examples (the
/// distillation loss reads every position). `on_sequence(index, ids)` is called after each
/// one (progress, saving).
pub fn teacher_sequences(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    on_sequence: &mut dyn FnMut(usize, &[u32]),
) -> Result<Dataset> {
    config.validate(
        teacher.config().vocab_size,
        teacher.config().max_position_embeddings,
    )?;
    let mut examples = Vec::with_capacity(config.sequences);
    for index in 0..config.sequences {
        let ids = teacher_sequence(teacher, config, index)?;
        on_sequence(index, &ids);
        examples.push(Example::new(ids));
    }
    Dataset::new(examples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lm::LlamaConfig;

    fn teacher() -> LlamaModel {
        LlamaModel::random(LlamaConfig::new(48, 16, 32, 2, 4, 2).unwrap(), 11).unwrap()
    }

    #[test]
    fn greedy_part_is_the_teachers_argmax_and_the_rest_its_samples() {
        let mut t = teacher();
        let config = DataFreeConfig {
            sequences: 4,
            seq_len: 12,
            greedy_tokens: 3,
            prefix: vec![1],
            ..DataFreeConfig::new(5)
        };
        for i in 0..config.sequences {
            let ids = teacher_sequence(&mut t, &config, i).unwrap();
            assert_eq!(ids.len(), 12);
            assert_eq!(ids[0], 1, "prefix first");
            let logits = t
                .logits(
                    ndarray::Array2::from_shape_vec((1, 12), ids.clone())
                        .unwrap()
                        .view(),
                    None,
                )
                .unwrap();
            // Positions 1 (start) .. 1+3 predict greedy tokens 2..=4.
            for pos in 1..4 {
                let row = logits.slice(ndarray::s![0, pos, ..]);
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
                assert_eq!(
                    ids[pos + 1] as usize,
                    best,
                    "sequence {i} position {}",
                    pos + 1
                );
            }
        }
    }

    #[test]
    fn seeds_and_indices_give_distinct_sequences_and_eos_ends_one() {
        let mut t = teacher();
        let base = DataFreeConfig {
            sequences: 6,
            seq_len: 16,
            ..DataFreeConfig::new(1)
        };
        let a = teacher_sequences(&mut t, &base, &mut |_, _| {}).unwrap();
        let b = teacher_sequences(
            &mut t,
            &DataFreeConfig {
                seed: 2,
                ..base.clone()
            },
            &mut |_, _| {},
        )
        .unwrap();
        assert_ne!(a, b);
        let first: std::collections::BTreeSet<u32> =
            a.examples().iter().map(|e| e.input_ids[0]).collect();
        assert!(
            first.len() > 1,
            "start tokens are drawn, not fixed: {first:?}"
        );
        // Sequence 2 alone equals sequence 2 of the set.
        assert_eq!(
            teacher_sequence(&mut t, &base, 2).unwrap(),
            a.examples()[2].input_ids
        );
        let eos = a.examples()[0].input_ids[8];
        let cut = teacher_sequence(
            &mut t,
            &DataFreeConfig {
                eos: Some(eos),
                ..base.clone()
            },
            0,
        )
        .unwrap();
        assert!(cut.len() <= 9 && *cut.last().unwrap() == eos, "{cut:?}");
    }

    #[test]
    fn refused_settings_are_named() {
        let mut t = teacher();
        for (config, field) in [
            (
                DataFreeConfig {
                    sequences: 0,
                    ..DataFreeConfig::new(0)
                },
                "sequences",
            ),
            (
                DataFreeConfig {
                    seq_len: 1,
                    ..DataFreeConfig::new(0)
                },
                "seq_len",
            ),
            (
                DataFreeConfig {
                    seq_len: 10_000,
                    ..DataFreeConfig::new(0)
                },
                "seq_len",
            ),
            (
                DataFreeConfig {
                    temperature: 0.0,
                    ..DataFreeConfig::new(0)
                },
                "temperature",
            ),
            (
                DataFreeConfig {
                    top_p: Some(1.5),
                    ..DataFreeConfig::new(0)
                },
                "top_p",
            ),
            (
                DataFreeConfig {
                    prefix: vec![48],
                    ..DataFreeConfig::new(0)
                },
                "prefix",
            ),
            (
                DataFreeConfig {
                    exclude_start: (0..48).collect(),
                    ..DataFreeConfig::new(0)
                },
                "exclude_start",
            ),
        ] {
            let err = teacher_sequences(&mut t, &config, &mut |_, _| {})
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
