//! Incremental decoding with a key/value cache, and greedy or temperature sampling. The
//! cached forward runs the same decoder layers as training ([`crate::decoder::layer_forward`]),
//! with each layer's sliding window applied to the cached keys; several sequences, each with
//! its own cache, can be decoded in one pass ([`LlamaModel::forward_cached_batch`]).

use ndarray::{s, Array2, ArrayView1};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::decoder::{layer_forward, CachedSequence, KeysFrom};
use crate::error::{check_finite_at, LmError, Result};
use crate::model::LlamaModel;
use crate::rope::RopeTable;

/// Rotated keys and values of every layer for the positions decoded so far (one sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    /// Per layer, row-major `(len, kv_heads·head_dim)`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_width: usize,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the buffers keep their capacity).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, len: usize) {
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            buf.truncate(len * self.kv_width);
        }
        self.len = len;
    }
}

/// How the next token is chosen from the last position's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties).
    Greedy,
    /// A draw from `softmax(logits / temperature)` with `ChaCha8Rng(seed)`.
    Temperature { temperature: f32, seed: u64 },
}

impl LlamaModel {
    /// An empty cache shaped for this model.
    pub fn new_kv_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache {
            keys: vec![Vec::new(); c.num_hidden_layers],
            values: vec![Vec::new(); c.num_hidden_layers],
            kv_width: c.num_key_value_heads * c.head_dim,
            len: 0,
        }
    }

    /// Runs `tokens` (one sequence) at positions `cache.len() ..` against the cached keys and
    /// values, appends theirs, and returns their logits `(tokens.len(), vocab)`. Equal (up to
    /// rounding) to the rows of a full [`LlamaModel::forward`] over all tokens so far. On error
    /// the cache is left as it was.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 5).unwrap();
    /// let mut cache = model.new_kv_cache();
    /// model.forward_cached(&[3, 1, 4], &mut cache).unwrap();
    /// let step = model.forward_cached(&[1], &mut cache).unwrap();
    /// let full = model.logits(ndarray::array![[3u32, 1, 4, 1]].view(), None).unwrap();
    /// for v in 0..32 {
    ///     assert!((step[[0, v]] - full[[0, 3, v]]).abs() < 1e-5);
    /// }
    /// assert_eq!(cache.len(), 4);
    /// ```
    pub fn forward_cached(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Array2<f32>> {
        let mut logits = self.forward_cached_batch(&[tokens], &mut [cache])?;
        // One sequence in, one block of logits out.
        Ok(logits.pop().unwrap_or_default())
    }

    /// [`LlamaModel::forward_cached`] for several sequences at once: `tokens[b]` runs at
    /// positions `caches[b].len() ..` against `caches[b]` (sequences may be at different
    /// lengths and feed different numbers of tokens). Every projection and the LM head run
    /// as one product of all the rows, attention per sequence against its own cache. Returns
    /// each sequence's logits `(tokens[b].len(), vocab)`, equal (up to rounding) to separate
    /// `forward_cached` calls. On error every cache is left as it was.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 5).unwrap();
    /// let (mut a, mut b) = (model.new_kv_cache(), model.new_kv_cache());
    /// model.forward_cached(&[3, 1, 4], &mut a).unwrap();
    /// // `a` takes its fourth token while `b` takes its first two.
    /// let out = model.forward_cached_batch(&[&[1], &[2, 7]], &mut [&mut a, &mut b]).unwrap();
    /// let full = model.logits(ndarray::array![[3u32, 1, 4, 1]].view(), None).unwrap();
    /// let alone = model.logits(ndarray::array![[2u32, 7]].view(), None).unwrap();
    /// for v in 0..32 {
    ///     assert!((out[0][[0, v]] - full[[0, 3, v]]).abs() < 1e-5);
    ///     assert!((out[1][[1, v]] - alone[[0, 1, v]]).abs() < 1e-5);
    /// }
    /// assert_eq!((a.len(), b.len()), (4, 2));
    /// ```
    pub fn forward_cached_batch(
        &mut self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Array2<f32>>> {
        self.check_cached_batch(tokens, caches)?;
        self.passes.0 += 1;
        let offsets: Vec<usize> = caches.iter().map(|cache| cache.len).collect();
        let result = self.in_eval_mode(|model| model.forward_cached_unchecked(tokens, caches));
        for ((cache, offset), t) in caches.iter_mut().zip(offsets).zip(tokens) {
            match result {
                Ok(_) => cache.len = offset + t.len(),
                Err(_) => cache.truncate(offset),
            }
        }
        result
    }

    /// The checks of [`LlamaModel::forward_cached_batch`], before anything is computed.
    fn check_cached_batch(&self, tokens: &[&[u32]], caches: &[&mut KvCache]) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(LmError::invalid(
                "tokens",
                "[]",
                "at least one sequence is needed",
            ));
        }
        if caches.len() != tokens.len() {
            return Err(LmError::invalid(
                "caches",
                caches.len(),
                format!("one per token sequence ({})", tokens.len()),
            ));
        }
        let kv_width = c.num_key_value_heads * c.head_dim;
        for (b, (t, cache)) in tokens.iter().zip(caches).enumerate() {
            if t.is_empty() {
                return Err(LmError::invalid(
                    format!("tokens of sequence {b}"),
                    "[]",
                    "at least one token is needed",
                ));
            }
            if cache.keys.len() != self.layers.len() || cache.kv_width != kv_width {
                return Err(LmError::invalid(
                    format!("cache of sequence {b}"),
                    format!("{} layers of width {}", cache.keys.len(), cache.kv_width),
                    "the cache was made for a different model; use new_kv_cache",
                ));
            }
            let offset = cache.len;
            if offset + t.len() > c.max_position_embeddings {
                return Err(LmError::SequenceTooLong {
                    len: offset + t.len(),
                    max: c.max_position_embeddings,
                });
            }
            if let Some((i, &id)) = t
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= c.vocab_size)
            {
                return Err(LmError::TokenOutOfRange {
                    what: "token id".into(),
                    value: id as i64,
                    batch: b,
                    position: offset + i,
                    vocab: c.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// The decoder layers of [`crate::decoder`] with every sequence's keys taken from (and
    /// appended to) its cache; the head is the training pass's.
    fn forward_cached_unchecked(
        &mut self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Array2<f32>>> {
        let c = self.config.clone();
        // Dynamic and LongRoPE scaling depend on the length each sequence reaches, as in
        // transformers' cached generation (earlier keys keep the rotation they were cached
        // with); the stacked tables are indexed by row.
        let runs: Vec<(usize, usize, usize)> = tokens
            .iter()
            .zip(caches.iter())
            .map(|(t, cache)| (cache.len, t.len(), cache.len + t.len()))
            .collect();
        let tables = c
            .architecture
            .ropes
            .iter()
            .map(|rope| RopeTable::stacked(rope, &runs))
            .collect::<Result<Vec<_>>>()?;
        let ids = tokens.concat();
        let rows: Vec<usize> = (0..ids.len()).collect();
        let mut x = self.embed(&ids)?;
        self.sync_compute_dtype();
        let dtype = self.compute_dtype;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let ctx = Self::layer_context(&c, l, &rows, &tables, dtype);
            let sequences = caches
                .iter_mut()
                .zip(tokens)
                .map(|(cache, t)| {
                    let cache: &mut KvCache = cache;
                    CachedSequence {
                        keys: &mut cache.keys[l],
                        values: &mut cache.values[l],
                        offset: cache.len,
                        rows: t.len(),
                    }
                })
                .collect();
            x = layer_forward(layer, &ctx, &x, KeysFrom::Caches(sequences))?.0;
        }
        let (_, _, logits) = self.head_forward(&x)?;
        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(tokens.len());
        let mut first = 0;
        for (b, &(offset, n, _)) in runs.iter().enumerate() {
            let own = logits.slice(s![first..first + n, ..]).to_owned();
            check_finite_at("logits", own.as_slice().unwrap_or_default(), |i| {
                format!(
                    "(sequence {b}, position {}, vocab {})",
                    offset + i / vocab,
                    i % vocab
                )
            })?;
            out.push(own);
            first += n;
        }
        Ok(out)
    }

    /// Continues `prompt_ids` by up to `max_new` tokens with a key/value cache, stopping after
    /// `eos` if it is produced (it is included). Returns only the new tokens.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel, Sampling};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap(), 3).unwrap();
    /// let greedy = model.generate(&[1, 7, 4], 5, &Sampling::Greedy, None).unwrap();
    /// assert_eq!(greedy.len(), 5);
    /// let sampling = Sampling::Temperature { temperature: 0.8, seed: 42 };
    /// let a = model.generate(&[1, 7, 4], 5, &sampling, None).unwrap();
    /// assert_eq!(a, model.generate(&[1, 7, 4], 5, &sampling, None).unwrap(), "seeded");
    /// ```
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        max_new: usize,
        sampling: &Sampling,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        if prompt_ids.is_empty() {
            return Err(LmError::invalid(
                "prompt_ids",
                "[]",
                "generation needs at least one prompt token",
            ));
        }
        let mut rng = match *sampling {
            Sampling::Greedy => None,
            Sampling::Temperature { temperature, seed } => {
                if !(temperature.is_finite() && temperature > 0.0) {
                    return Err(LmError::invalid(
                        "temperature",
                        temperature,
                        "must be finite and positive",
                    ));
                }
                Some((temperature, ChaCha8Rng::seed_from_u64(seed)))
            }
        };
        // The last new token is never fed back, so it needs no position of its own.
        let needed = prompt_ids.len() + max_new.saturating_sub(1);
        if needed > self.config.max_position_embeddings {
            return Err(LmError::SequenceTooLong {
                len: needed,
                max: self.config.max_position_embeddings,
            });
        }
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let mut cache = self.new_kv_cache();
        let mut logits = self.forward_cached(prompt_ids, &mut cache)?;
        loop {
            let last = logits.row(logits.nrows() - 1);
            let next = match &mut rng {
                None => argmax(last),
                Some((temperature, rng)) => sample(last, *temperature, rng),
            };
            out.push(next);
            if Some(next) == eos || out.len() == max_new {
                return Ok(out);
            }
            logits = self.forward_cached(&[next], &mut cache)?;
        }
    }
}

fn argmax(logits: ArrayView1<'_, f32>) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(logits: ArrayView1<'_, f32>, temperature: f32, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let t = temperature as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| ((v - max) as f64 / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    // Rounding can leave u just above the last weight; the most likely token is the fallback.
    argmax(logits)
}
