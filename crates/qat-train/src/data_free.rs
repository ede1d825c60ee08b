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
//! sequences is generated. The teacher writes [`DataFreeConfig::batch`] sequences at once
//! (one cached pass feeds each its next token); the set does not depend on the batch size
//! beyond rounding.
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
use lm::{KvCache, LlamaModel};
use ndarray::Array2;
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
    /// Sequences the teacher writes at once (each pass feeds all of them their next token, so
    /// the projections are products of `batch` rows rather than matrix-vector products). The
    /// sequences do not depend on it beyond rounding.
    pub batch: usize,
}

impl DataFreeConfig {
    /// LLM-QAT's defaults: 64 sequences of 128 tokens, 4 greedy continuations, temperature 1,
    /// no prefix, no excluded start token, no end token; written 16 at a time.
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
            batch: 16,
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
        if self.batch == 0 {
            return Err(TrainError::invalid(
                "data_free.batch",
                0,
                "at least one sequence at a time",
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

/// One sequence being written: its tokens so far, how many of them the cache holds, and its
/// two samplers (both seeded from the sequence's own stream).
struct Writer {
    index: usize,
    ids: Vec<u32>,
    fed: usize,
    cache: KvCache,
    greedy: LogitsSampler,
    sampled: LogitsSampler,
}

impl Writer {
    /// The prefix and a uniformly drawn start token of sequence `index`.
    fn new(teacher: &LlamaModel, config: &DataFreeConfig, index: usize) -> Result<Self> {
        let vocab = teacher.config().vocab_size;
        let mut rng = ChaCha8Rng::seed_from_u64(sequence_seed(config.seed, index));
        // Rejection keeps the draw uniform over the allowed ids; validate() left at least one.
        let start = loop {
            let id = rng.random_range(0..vocab as u32);
            if !config.exclude_start.contains(&id) {
                break id;
            }
        };
        let greedy = LogitsSampler::new(SamplingConfig::greedy())?;
        let sampled = LogitsSampler::new(SamplingConfig {
            do_sample: true,
            temperature: config.temperature,
            top_p: config.top_p,
            seed: rng.random(),
            ..SamplingConfig::greedy()
        })?;
        let mut ids = config.prefix.clone();
        ids.push(start);
        Ok(Writer {
            index,
            ids,
            fed: 0,
            cache: teacher.new_kv_cache(),
            greedy,
            sampled,
        })
    }

    /// Appends the token chosen from the last row of `logits` (the logits of the tokens just
    /// fed); true when the sequence is complete.
    fn extend(&mut self, logits: &Array2<f32>, config: &DataFreeConfig) -> Result<bool> {
        self.fed = self.ids.len();
        let mut last = logits.row(logits.nrows().saturating_sub(1)).to_vec();
        let continuation = self.ids.len() - config.prefix.len() - 1;
        let next = if continuation < config.greedy_tokens {
            self.greedy.next_token(&mut last, &self.ids)?
        } else {
            self.sampled.next_token(&mut last, &self.ids)?
        };
        self.ids.push(next);
        Ok(self.ids.len() >= config.seq_len || Some(next) == config.eos)
    }
}

/// Sequences `indices` written by `teacher`, up to `config.batch` at a time: every pass feeds
/// each unfinished sequence its newest token(s) ([`LlamaModel::forward_cached_batch`]); a
/// finished one leaves the batch (`on_sequence(index, ids)`) and the next index takes its
/// place. Returned in the order of `indices`.
fn write_sequences(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    indices: &[usize],
    on_sequence: &mut dyn FnMut(usize, &[u32]),
) -> Result<Vec<Vec<u32>>> {
    config.validate(
        teacher.config().vocab_size,
        teacher.config().max_position_embeddings,
    )?;
    let training = teacher.is_training();
    teacher.set_training(false);
    let mut done: Vec<Option<Vec<u32>>> = vec![None; indices.len()];
    let result = (|| -> Result<()> {
        let mut pending = indices.iter().copied().enumerate();
        // (slot in `indices`, writer)
        let mut active: Vec<(usize, Writer)> = Vec::with_capacity(config.batch);
        loop {
            while active.len() < config.batch {
                match pending.next() {
                    Some((slot, index)) => {
                        active.push((slot, Writer::new(teacher, config, index)?))
                    }
                    None => break,
                }
            }
            if active.is_empty() {
                return Ok(());
            }
            let (tokens, mut caches): (Vec<&[u32]>, Vec<&mut KvCache>) = active
                .iter_mut()
                .map(|(_, w)| (&w.ids[w.fed..], &mut w.cache))
                .unzip();
            let logits = teacher.forward_cached_batch(&tokens, &mut caches)?;
            let mut finished = Vec::with_capacity(active.len());
            for ((_, w), logits) in active.iter_mut().zip(&logits) {
                finished.push(w.extend(logits, config)?);
            }
            let mut unfinished = Vec::with_capacity(active.len());
            for ((slot, w), finished) in active.drain(..).zip(finished) {
                if finished {
                    on_sequence(w.index, &w.ids);
                    done[slot] = Some(w.ids);
                } else {
                    unfinished.push((slot, w));
                }
            }
            active = unfinished;
        }
    })();
    teacher.set_training(training);
    result?;
    Ok(done.into_iter().flatten().collect())
}

/// One sequence written by `teacher` (see the module docs): the prefix, a uniformly drawn
/// start token, `greedy_tokens` greedy continuations, then sampled ones. Equal (up to
/// rounding) to sequence `index` of [`teacher_sequences`].
pub fn teacher_sequence(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    index: usize,
) -> Result<Vec<u32>> {
    let mut ids = write_sequences(teacher, config, &[index], &mut |_, _| {})?;
    ids.pop()
        .ok_or_else(|| TrainError::invalid("data_free sequence", index, "the teacher wrote none"))
}

/// `config.sequences` sequences written by `teacher`, `config.batch` at a time, as a dataset
/// of plain examples (the distillation loss reads every position), in index order.
/// `on_sequence(index, ids)` is called as each one is finished (progress, saving) — not
/// necessarily in index order, as a sequence that ends early leaves its batch first.
pub fn teacher_sequences(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    on_sequence: &mut dyn FnMut(usize, &[u32]),
) -> Result<Dataset> {
    let indices: Vec<usize> = (0..config.sequences).collect();
    let sequences = write_sequences(teacher, config, &indices, on_sequence)?;
    Dataset::new(sequences.into_iter().map(Example::new).collect())
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
    fn the_batch_size_does_not_change_the_sequences() {
        let mut t = teacher();
        let base = DataFreeConfig {
            sequences: 7,
            seq_len: 16,
            batch: 1,
            ..DataFreeConfig::new(3)
        };
        let plain = teacher_sequences(&mut t, &base, &mut |_, _| {}).unwrap();
        // An end token some sequences produce early, so they leave their batch first.
        let eos = plain.examples()[1].input_ids[9];
        let with_eos = DataFreeConfig {
            eos: Some(eos),
            ..base.clone()
        };
        let one = teacher_sequences(&mut t, &with_eos, &mut |_, _| {}).unwrap();
        assert!(
            one.examples().iter().any(|e| e.input_ids.len() < 16),
            "some sequence ends early"
        );
        for batch in [4, 16] {
            let mut seen = Vec::new();
            let batched = teacher_sequences(
                &mut t,
                &DataFreeConfig {
                    batch,
                    ..with_eos.clone()
                },
                &mut |i, ids| seen.push((i, ids.len())),
            )
            .unwrap();
            assert_eq!(batched, one, "batch {batch}");
            seen.sort_unstable();
            let expected: Vec<(usize, usize)> = one
                .examples()
                .iter()
                .enumerate()
                .map(|(i, e)| (i, e.input_ids.len()))
                .collect();
            assert_eq!(seen, expected, "every sequence reported once");
            let no_eos = DataFreeConfig {
                batch,
                ..base.clone()
            };
            assert_eq!(
                teacher_sequences(&mut t, &no_eos, &mut |_, _| {}).unwrap(),
                plain
            );
        }
        assert!(t.is_training(), "the teacher's mode is restored");
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
                    batch: 0,
                    ..DataFreeConfig::new(0)
                },
                "batch",
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
