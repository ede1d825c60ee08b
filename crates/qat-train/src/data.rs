//! Token datasets: pre-tokenized JSONL, seeded per-epoch shuffling, right-padded batches, a
//! resumable position cursor, and packing of short examples into full sequences.
//!
//! Shuffling is a function of `(seed, epoch)` only (a ChaCha8 stream per epoch), so the
//! [`DataCursor`] `(epoch, index)` is all a checkpoint needs to resume the exact batch order.

use std::path::Path;

use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::IGNORE_INDEX;

/// One tokenized example. `labels`, `step_mask` and `answer_mask`, when present, have one
/// entry per input token. Without labels the inputs are the labels (causal LM; the model
/// shifts them by one inside, as Hugging Face models do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Targets per token ([`IGNORE_INDEX`] = not trained on, e.g. the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<i64>>,
    /// Tokens that close a reasoning step (for the reasoning loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_mask: Option<Vec<bool>>,
    /// Answer tokens (for the reasoning loss and answer-weighted CE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_mask: Option<Vec<bool>>,
    /// Which packed document each token belongs to (non-decreasing from 0), when several
    /// examples were packed into this one ([`Dataset::packed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_ids: Option<Vec<u32>>,
}

impl Example {
    /// An example with inputs only.
    pub fn new(input_ids: Vec<u32>) -> Self {
        Self {
            input_ids,
            labels: None,
            step_mask: None,
            answer_mask: None,
            segment_ids: None,
        }
    }

    /// Why the example is unusable, if it is.
    fn problem(&self) -> Option<String> {
        let n = self.input_ids.len();
        if n == 0 {
            return Some("input_ids is empty".into());
        }
        let lens = [
            ("labels", self.labels.as_ref().map(Vec::len)),
            ("step_mask", self.step_mask.as_ref().map(Vec::len)),
            ("answer_mask", self.answer_mask.as_ref().map(Vec::len)),
            ("segment_ids", self.segment_ids.as_ref().map(Vec::len)),
        ];
        for (field, len) in lens {
            if let Some(len) = len.filter(|&l| l != n) {
                return Some(format!("{field} has {len} entries but input_ids has {n}"));
            }
        }
        if let Some(seg) = &self.segment_ids {
            if seg[0] != 0 {
                return Some(format!(
                    "segment_ids[0] = {} (segments count from 0)",
                    seg[0]
                ));
            }
            if let Some(i) = seg
                .windows(2)
                .position(|w| w[1] != w[0] && w[1] != w[0] + 1)
            {
                return Some(format!(
                    "segment_ids[{}] = {} after {} (each new segment is the previous + 1)",
                    i + 1,
                    seg[i + 1],
                    seg[i]
                ));
            }
        }
        if let Some(labels) = &self.labels {
            if let Some(i) = labels.iter().position(|&l| l < 0 && l != IGNORE_INDEX) {
                return Some(format!(
                    "labels[{i}] = {} (a label is a token id or {IGNORE_INDEX})",
                    labels[i]
                ));
            }
        }
        None
    }
}

/// A list of validated examples.
///
/// ```
/// use qat_train::data::Dataset;
/// let text = "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 3]}\n\n{\"input_ids\": [4]}\n";
/// let ds = Dataset::from_jsonl_str(text, "train.jsonl").unwrap();
/// assert_eq!(ds.len(), 2);
/// let err = Dataset::from_jsonl_str("{\"input_ids\": []}", "bad.jsonl").unwrap_err();
/// assert_eq!(err.to_string(), "bad.jsonl line 1: input_ids is empty");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    examples: Vec<Example>,
}

impl Dataset {
    /// A dataset of `examples`; errors name the first unusable example by index.
    pub fn new(examples: Vec<Example>) -> Result<Self> {
        for (i, e) in examples.iter().enumerate() {
            if let Some(reason) = e.problem() {
                return Err(TrainError::invalid("dataset example", i, reason));
            }
        }
        Ok(Self { examples })
    }

    /// Parses JSONL: one example object per line (`{"input_ids": [...], "labels": [...]}`,
    /// optional `step_mask`, `answer_mask`; other fields are ignored), blank lines skipped.
    /// Errors name `source_name` and the 1-based line.
    pub fn from_jsonl_str(text: &str, source_name: &str) -> Result<Self> {
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let data_error = |reason: String| TrainError::Data {
                source_name: source_name.to_string(),
                line: i + 1,
                reason,
            };
            let example: Example =
                serde_json::from_str(line).map_err(|e| data_error(e.to_string()))?;
            if let Some(reason) = example.problem() {
                return Err(data_error(reason));
            }
            examples.push(example);
        }
        Ok(Self { examples })
    }

    /// Reads and parses a JSONL file (see [`from_jsonl_str`](Self::from_jsonl_str)).
    pub fn from_jsonl_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_jsonl_str(&text, &path.display().to_string())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The examples in order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Total number of input tokens.
    pub fn num_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.input_ids.len()).sum()
    }

    /// Whether any example holds packed documents.
    pub fn is_packed(&self) -> bool {
        self.examples.iter().any(|e| e.segment_ids.is_some())
    }

    /// Packs examples, in order, into sequences of at most `max_len` tokens (each example
    /// truncated to `max_len` first): an example that does not fit in the current sequence
    /// starts the next. Each packed example numbers its documents in `segment_ids`, and the
    /// first token of every document is not a target (`labels` = [`IGNORE_INDEX`]), so no
    /// document is trained to predict the next one's start. Step and answer masks are carried
    /// along.
    ///
    /// ```
    /// use qat_train::data::{Dataset, Example};
    /// let ds = Dataset::new(vec![
    ///     Example::new(vec![1, 2, 3]),
    ///     Example::new(vec![4, 5]),
    ///     Example::new(vec![6, 7, 8, 9]),
    /// ])
    /// .unwrap();
    /// let packed = ds.packed(5).unwrap();
    /// assert_eq!(packed.len(), 2);
    /// let first = &packed.examples()[0];
    /// assert_eq!(first.input_ids, vec![1, 2, 3, 4, 5]);
    /// assert_eq!(first.segment_ids.as_deref(), Some(&[0, 0, 0, 1, 1][..]));
    /// assert_eq!(first.labels.as_deref(), Some(&[-100, 2, 3, -100, 5][..]));
    /// ```
    pub fn packed(&self, max_len: usize) -> Result<Dataset> {
        if max_len == 0 {
            return Err(TrainError::invalid(
                "packing max_len",
                0,
                "must be at least 1",
            ));
        }
        if self.is_packed() {
            return Err(TrainError::invalid(
                "dataset",
                "already packed",
                "packing applies to unpacked examples",
            ));
        }
        let any_steps = self.examples.iter().any(|e| e.step_mask.is_some());
        let any_answers = self.examples.iter().any(|e| e.answer_mask.is_some());
        let mut out: Vec<Example> = Vec::new();
        let mut current: Option<Example> = None;
        for e in &self.examples {
            let n = e.input_ids.len().min(max_len);
            if current
                .as_ref()
                .is_some_and(|c| c.input_ids.len() + n > max_len)
            {
                out.extend(current.take());
            }
            let c = current.get_or_insert_with(|| Example {
                input_ids: Vec::with_capacity(max_len),
                labels: Some(Vec::with_capacity(max_len)),
                step_mask: any_steps.then(Vec::new),
                answer_mask: any_answers.then(Vec::new),
                segment_ids: Some(Vec::with_capacity(max_len)),
            });
            let segment = c
                .segment_ids
                .as_ref()
                .and_then(|s| s.last())
                .map_or(0, |&last| last + 1);
            c.input_ids.extend_from_slice(&e.input_ids[..n]);
            let labels = c.labels.get_or_insert_with(Vec::new);
            for t in 0..n {
                labels.push(if t == 0 {
                    IGNORE_INDEX
                } else {
                    e.labels
                        .as_ref()
                        .map_or(i64::from(e.input_ids[t]), |l| l[t])
                });
            }
            if let Some(m) = c.step_mask.as_mut() {
                m.extend((0..n).map(|t| e.step_mask.as_ref().is_some_and(|s| s[t])));
            }
            if let Some(m) = c.answer_mask.as_mut() {
                m.extend((0..n).map(|t| e.answer_mask.as_ref().is_some_and(|s| s[t])));
            }
            c.segment_ids
                .get_or_insert_with(Vec::new)
                .extend(std::iter::repeat_n(segment, n));
        }
        out.extend(current);
        Dataset::new(out)
    }

    /// Splits into `(train, validation)` by a seeded shuffle: `round(len·fraction)` examples go
    /// to validation. Errors when `fraction` is outside `(0, 1)` or either side would be empty.
    ///
    /// ```
    /// use qat_train::data::{Dataset, Example};
    /// let ds = Dataset::new((0..10).map(|i| Example::new(vec![i])).collect()).unwrap();
    /// let (train, val) = ds.split(0.2, 7).unwrap();
    /// assert_eq!((train.len(), val.len()), (8, 2));
    /// assert_eq!(ds.split(0.2, 7).unwrap().1, val); // same seed, same split
    /// ```
    pub fn split(&self, validation_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(TrainError::invalid(
                "validation_fraction",
                validation_fraction,
                "must be in (0, 1)",
            ));
        }
        let n_val = (self.len() as f64 * validation_fraction).round() as usize;
        if n_val == 0 || n_val == self.len() {
            return Err(TrainError::invalid(
                "validation_fraction",
                validation_fraction,
                format!(
                    "with {} examples one side of the split would be empty",
                    self.len()
                ),
            ));
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let (val_idx, train_idx) = order.split_at(n_val);
        let pick = |idx: &[usize]| {
            let mut idx = idx.to_vec();
            // Keep the file order inside each side, so the split only decides membership.
            idx.sort_unstable();
            Dataset {
                examples: idx.iter().map(|&i| self.examples[i].clone()).collect(),
            }
        };
        Ok((pick(train_idx), pick(val_idx)))
    }
}

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Examples per batch.
    pub batch_size: usize,
    /// Token id written into padded positions of `input_ids`.
    pub pad_id: u32,
    /// Truncate longer examples to this many tokens.
    pub max_len: Option<usize>,
    /// Shuffle each epoch (seeded); otherwise file order.
    pub shuffle: bool,
    /// Drop an epoch's last batch when it would be short.
    pub drop_last: bool,
    /// Seed of the shuffle.
    pub seed: u64,
}

/// A right-padded batch, `[batch, seq]` with `seq` the longest example's length.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids, `pad_id` after each example's end.
    pub input_ids: Array2<u32>,
    /// `true` on real tokens, `false` on padding.
    pub attention_mask: Array2<bool>,
    /// Labels ([`IGNORE_INDEX`] on padding).
    pub labels: Array2<i64>,
    /// Step-closing positions, when any example of the batch has a step mask (false elsewhere).
    pub step_mask: Option<Array2<bool>>,
    /// Answer positions, when any example of the batch has an answer mask (false elsewhere).
    pub answer_mask: Option<Array2<bool>>,
    /// Packed documents per row, when any example is packed: the example's `segment_ids`
    /// (an unpacked example is segment 0), padding numbered one past the row's last segment.
    pub segment_ids: Option<Array2<u32>>,
    /// Which dataset examples, in batch order.
    pub example_indices: Vec<usize>,
}

impl Batch {
    /// The labels aligned with the logits, flattened to `batch·seq` rows: the logits at
    /// position `t` predict `labels[b, t + 1]` (Hugging Face's causal-LM shift, done inside the
    /// model there), and each sequence's last position has no target ([`IGNORE_INDEX`]).
    /// Rows are `b·seq + t`, the layout of `(batch, seq, vocab)` logits viewed as
    /// `[batch·seq, vocab]`, ready for [`cross_entropy`](crate::loss::cross_entropy).
    ///
    /// ```
    /// use qat_train::data::{BatchConfig, DataLoader, Dataset, Example};
    /// let ds = Dataset::new(vec![Example::new(vec![5, 6, 7]), Example::new(vec![8, 9])]).unwrap();
    /// let config = BatchConfig { batch_size: 2, pad_id: 0, max_len: None, shuffle: false, drop_last: false, seed: 0 };
    /// let batch = DataLoader::new(ds, config).unwrap().next_batch().unwrap();
    /// assert_eq!(batch.shifted_targets(), vec![6, 7, -100, 9, -100, -100]);
    /// ```
    pub fn shifted_targets(&self) -> Vec<i64> {
        let (rows, seq) = self.labels.dim();
        let mut out = vec![IGNORE_INDEX; rows * seq];
        for b in 0..rows {
            for t in 0..seq.saturating_sub(1) {
                out[b * seq + t] = self.labels[[b, t + 1]];
            }
        }
        out
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m).count()
    }
}

/// Where a [`DataLoader`] is: the epoch and the position in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Index into the epoch's example order of the next batch's first example.
    pub index: usize,
}

/// Endless batches over epochs, in a seeded order per epoch.
///
/// ```
/// use qat_train::data::{BatchConfig, DataLoader, Dataset, Example};
/// let ds = Dataset::new(vec![Example::new(vec![5, 6, 7]), Example::new(vec![8])]).unwrap();
/// let config = BatchConfig { batch_size: 2, pad_id: 0, max_len: None, shuffle: false, drop_last: false, seed: 0 };
/// let mut loader = DataLoader::new(ds, config).unwrap();
/// let batch = loader.next_batch().unwrap();
/// assert_eq!(batch.input_ids.row(1).to_vec(), vec![8, 0, 0]);
/// assert_eq!(batch.labels.row(1).to_vec(), vec![8, -100, -100]);
/// assert_eq!(batch.attention_mask.row(1).to_vec(), vec![true, false, false]);
/// assert_eq!(loader.cursor().epoch, 1);
/// ```
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: Dataset,
    config: BatchConfig,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl DataLoader {
    /// A loader at epoch 0; errors on an empty dataset, a zero batch size, `max_len = 0`, or
    /// `drop_last` with fewer examples than one batch (it would never yield).
    pub fn new(dataset: Dataset, config: BatchConfig) -> Result<Self> {
        if dataset.is_empty() {
            return Err(TrainError::invalid(
                "DataLoader dataset",
                "0 examples",
                "nothing to batch",
            ));
        }
        if config.batch_size == 0 {
            return Err(TrainError::invalid(
                "BatchConfig.batch_size",
                0,
                "must be at least 1",
            ));
        }
        if config.max_len == Some(0) {
            return Err(TrainError::invalid(
                "BatchConfig.max_len",
                0,
                "must be at least 1",
            ));
        }
        if config.drop_last && dataset.len() < config.batch_size {
            return Err(TrainError::invalid(
                "BatchConfig.batch_size",
                config.batch_size,
                format!(
                    "with drop_last and {} examples no full batch exists",
                    dataset.len()
                ),
            ));
        }
        let order = epoch_order(dataset.len(), &config, 0);
        Ok(Self {
            dataset,
            config,
            cursor: DataCursor::default(),
            order,
        })
    }

    /// The position of the next batch.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Moves to a saved position; errors when `index` is past the end of an epoch.
    pub fn set_cursor(&mut self, cursor: DataCursor) -> Result<()> {
        if cursor.index >= self.dataset.len() {
            return Err(TrainError::invalid(
                "DataCursor.index",
                cursor.index,
                format!("the dataset has {} examples", self.dataset.len()),
            ));
        }
        if self.config.drop_last && cursor.index + self.config.batch_size > self.dataset.len() {
            return Err(TrainError::invalid(
                "DataCursor.index",
                cursor.index,
                format!(
                    "with drop_last no full batch of {} starts there ({} examples)",
                    self.config.batch_size,
                    self.dataset.len()
                ),
            ));
        }
        if cursor.epoch != self.cursor.epoch {
            self.order = epoch_order(self.dataset.len(), &self.config, cursor.epoch);
        }
        self.cursor = cursor;
        Ok(())
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The example order of an epoch (a permutation of `0..len`).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        epoch_order(self.dataset.len(), &self.config, epoch)
    }

    /// The next batch; after an epoch's last batch the cursor moves to the next epoch.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let n = self.dataset.len();
        let start = self.cursor.index;
        let end = (start + self.config.batch_size).min(n);
        let indices = self.order[start..end].to_vec();
        let batch = self.collate(indices)?;
        let remaining = n - end;
        if remaining == 0 || (self.config.drop_last && remaining < self.config.batch_size) {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.order = epoch_order(n, &self.config, self.cursor.epoch);
        } else {
            self.cursor.index = end;
        }
        Ok(batch)
    }

    fn collate(&self, indices: Vec<usize>) -> Result<Batch> {
        let truncate = |len: usize| self.config.max_len.map_or(len, |m| len.min(m));
        let examples: Vec<&Example> = indices.iter().map(|&i| &self.dataset.examples[i]).collect();
        let seq = examples
            .iter()
            .map(|e| truncate(e.input_ids.len()))
            .max()
            .unwrap_or(0);
        let rows = examples.len();
        let mut input_ids = Array2::from_elem((rows, seq), self.config.pad_id);
        let mut attention_mask = Array2::from_elem((rows, seq), false);
        let mut labels = Array2::from_elem((rows, seq), IGNORE_INDEX);
        let any_steps = examples.iter().any(|e| e.step_mask.is_some());
        let any_answers = examples.iter().any(|e| e.answer_mask.is_some());
        let mut step_mask = any_steps.then(|| Array2::from_elem((rows, seq), false));
        let mut answer_mask = any_answers.then(|| Array2::from_elem((rows, seq), false));
        let any_segments = examples.iter().any(|e| e.segment_ids.is_some());
        let mut segment_ids = any_segments.then(|| Array2::from_elem((rows, seq), 0u32));
        for (r, e) in examples.iter().enumerate() {
            let len = truncate(e.input_ids.len());
            if let Some(m) = segment_ids.as_mut() {
                let src = e.segment_ids.as_deref();
                let at = |t: usize| src.map_or(0, |s| s[t]);
                let pad = if len == 0 { 0 } else { at(len - 1) + 1 };
                for t in 0..seq {
                    m[[r, t]] = if t < len { at(t) } else { pad };
                }
            }
            for t in 0..len {
                input_ids[[r, t]] = e.input_ids[t];
                attention_mask[[r, t]] = true;
                labels[[r, t]] = e
                    .labels
                    .as_ref()
                    .map_or(i64::from(e.input_ids[t]), |l| l[t]);
                if let (Some(m), Some(src)) = (step_mask.as_mut(), e.step_mask.as_ref()) {
                    m[[r, t]] = src[t];
                }
                if let (Some(m), Some(src)) = (answer_mask.as_mut(), e.answer_mask.as_ref()) {
                    m[[r, t]] = src[t];
                }
            }
        }
        Ok(Batch {
            input_ids,
            attention_mask,
            labels,
            step_mask,
            answer_mask,
            segment_ids,
            example_indices: indices,
        })
    }
}

fn epoch_order(len: usize, config: &BatchConfig, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if config.shuffle {
        // One ChaCha stream per epoch: any epoch's order is reproducible without replaying
        // the epochs before it.
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
    }
    order
}

#[cfg(test)]
mod tests;
