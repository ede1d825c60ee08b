//! Next-token choice as transformers' logits processors define it, and a decoding loop over
//! [`LlamaModel::forward_cached`] that hands each token to the caller as it is chosen (for
//! streaming and stop strings).
//!
//! Processing order (transformers' `generate`): repetition penalty, then — only when
//! sampling — temperature, top-k, top-p, min-p; then greedy argmax or a draw from the softmax
//! with `ChaCha8Rng(seed)`. Filtered tokens get `-∞`, as transformers' `filter_value`.

use std::ops::ControlFlow;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{check_finite_at, LmError, Result};
use crate::model::LlamaModel;

/// How the next token is chosen. The default is greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingConfig {
    /// Sample (with the warpers below) instead of taking the argmax.
    pub do_sample: bool,
    /// Divides the logits (> 0; sampling only).
    pub temperature: f32,
    /// Keep the `k` most likely tokens (ties with the k-th kept; sampling only).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (sampling only).
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one (sampling only).
    pub min_p: Option<f32>,
    /// CTRL's penalty on tokens already in the sequence (prompt included): a positive logit
    /// is divided by it, a negative one multiplied (also when greedy).
    pub repetition_penalty: Option<f32>,
    /// Seed of the ChaCha8 stream the draws come from.
    pub seed: u64,
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 1.0,
            ..Self::default()
        }
    }

    /// Errors naming the first value outside its range.
    pub fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(LmError::invalid(
                "temperature",
                self.temperature,
                "must be a finite number > 0",
            ));
        }
        if self.top_k == Some(0) {
            return Err(LmError::invalid("top_k", 0, "must be at least 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(LmError::invalid("top_p", p, "must be in (0, 1]"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(LmError::invalid("min_p", p, "must be in [0, 1]"));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(LmError::invalid(
                    "repetition_penalty",
                    r,
                    "must be a finite number > 0",
                ));
            }
        }
        Ok(())
    }
}

/// Chooses tokens from logits with a [`SamplingConfig`] and its seeded RNG.
///
/// ```
/// use lm::sampling::{LogitsSampler, SamplingConfig};
/// let mut greedy = LogitsSampler::new(SamplingConfig::greedy()).unwrap();
/// assert_eq!(greedy.next_token(&mut [0.1, 2.0, -1.0], &[]).unwrap(), 1);
/// // A repetition penalty of 10 turns 2.0 into 0.2 for a token already seen.
/// let config = SamplingConfig { repetition_penalty: Some(10.0), ..SamplingConfig::greedy() };
/// let mut penalised = LogitsSampler::new(config).unwrap();
/// assert_eq!(penalised.next_token(&mut [0.3, 2.0, -1.0], &[1]).unwrap(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct LogitsSampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl LogitsSampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
        })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Processes `logits` in place (see the module docs) and picks a token; `history` is the
    /// sequence so far (prompt and generated tokens) the repetition penalty reads.
    pub fn next_token(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(LmError::invalid("logits", "[]", "no token to choose from"));
        }
        check_finite_at("logits of the last position", logits, |i| {
            format!("token id {i}")
        })?;
        process_logits(&self.config, logits, history);
        if !self.config.do_sample {
            return Ok(argmax(logits));
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last_kept = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                if u < w {
                    return Ok(i as u32);
                }
                u -= w;
                last_kept = i;
            }
        }
        // Rounding left `u` just past the last weight: that token.
        Ok(last_kept as u32)
    }
}

/// The first index of the largest value.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' processors in `generate`'s order, in place.
pub fn process_logits(config: &SamplingConfig, logits: &mut [f32], history: &[u32]) {
    if let Some(penalty) = config.repetition_penalty {
        let mut seen = vec![false; logits.len()];
        for &id in history {
            let id = id as usize;
            if id < logits.len() && !seen[id] {
                seen[id] = true;
                let l = logits[id];
                logits[id] = if l < 0.0 { l * penalty } else { l / penalty };
            }
        }
    }
    if !config.do_sample {
        return;
    }
    if config.temperature != 1.0 {
        for l in logits.iter_mut() {
            *l /= config.temperature;
        }
    }
    if let Some(k) = config.top_k {
        let k = k.min(logits.len());
        let mut sorted: Vec<f32> = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for l in logits.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(top_p) = config.top_p {
        // Ascending order; drop the prefix whose cumulative probability is <= 1 - p, always
        // keeping the most likely token.
        let probs = softmax(logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
        let mut cumulative = 0.0f32;
        let last = order.len() - 1;
        for (rank, &i) in order.iter().enumerate() {
            cumulative += probs[i];
            if rank < last && cumulative <= 1.0 - top_p {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(min_p) = config.min_p {
        let probs = softmax(logits);
        let top = probs.iter().copied().fold(0.0f32, f32::max);
        let best = argmax(logits) as usize;
        for (i, l) in logits.iter_mut().enumerate() {
            if probs[i] < min_p * top && i != best {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

impl LlamaModel {
    /// Continues `prompt` with a fresh KV cache: up to `max_new` tokens chosen by `sampler`,
    /// stopping after a token of `stop_ids` (which is passed to `on_token` and returned) or
    /// when `on_token` breaks. `on_token` sees each new token as soon as it is chosen.
    /// Returns the new tokens.
    ///
    /// ```
    /// use lm::sampling::{LogitsSampler, SamplingConfig};
    /// use lm::{LlamaConfig, LlamaModel, Sampling};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap(), 1).unwrap();
    /// let mut sampler = LogitsSampler::new(SamplingConfig::greedy()).unwrap();
    /// let mut streamed = Vec::new();
    /// let new = model
    ///     .decode_stream(&[1, 2, 3], 5, &mut sampler, &[], |t| {
    ///         streamed.push(t);
    ///         std::ops::ControlFlow::Continue(())
    ///     })
    ///     .unwrap();
    /// assert_eq!(new, streamed);
    /// // Greedy decoding equals the model's own greedy generate (which returns the new
    /// // tokens only).
    /// let all = model.generate(&[1, 2, 3], 5, &Sampling::Greedy, None).unwrap();
    /// assert_eq!(all, new);
    /// ```
    pub fn decode_stream(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut LogitsSampler,
        stop_ids: &[u32],
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(LmError::invalid(
                "prompt",
                "[]",
                "at least one token is needed",
            ));
        }
        let mut cache = self.new_kv_cache();
        let mut history = prompt.to_vec();
        let mut new = Vec::new();
        let mut logits = self.forward_cached(prompt, &mut cache)?;
        for _ in 0..max_new {
            let last = logits.nrows() - 1;
            let mut row: Vec<f32> = logits.row(last).to_vec();
            let token = sampler.next_token(&mut row, &history)?;
            history.push(token);
            new.push(token);
            let flow = on_token(token);
            if stop_ids.contains(&token) || flow.is_break() || new.len() == max_new {
                break;
            }
            logits = self.forward_cached(&[token], &mut cache)?;
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling() -> SamplingConfig {
        SamplingConfig {
            do_sample: true,
            ..SamplingConfig::greedy()
        }
    }

    #[test]
    fn warpers_filter_as_transformers() {
        // top-k keeps ties with the k-th value.
        let mut l = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        process_logits(
            &SamplingConfig {
                top_k: Some(2),
                ..sampling()
            },
            &mut l,
            &[],
        );
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]);
        // top-p: probabilities (0.5, 0.3, 0.2) with p = 0.6 keep the first two.
        let mut l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        process_logits(
            &SamplingConfig {
                top_p: Some(0.6),
                ..sampling()
            },
            &mut l,
            &[],
        );
        assert!(l[0].is_finite() && l[1].is_finite() && l[2] == f32::NEG_INFINITY);
        // min-p 0.5: drop tokens with p < 0.25 when the top one has 0.5.
        let mut l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        process_logits(
            &SamplingConfig {
                min_p: Some(0.5),
                ..sampling()
            },
            &mut l,
            &[],
        );
        assert!(l[1].is_finite() && l[2] == f32::NEG_INFINITY);
        // temperature divides; repetition penalty divides positives, multiplies negatives.
        let mut l = vec![2.0, -2.0, 1.0];
        process_logits(
            &SamplingConfig {
                temperature: 2.0,
                repetition_penalty: Some(2.0),
                ..sampling()
            },
            &mut l,
            &[0, 1, 1],
        );
        assert_eq!(l, vec![0.5, -2.0, 0.5]);
    }

    #[test]
    fn draws_are_seeded_and_follow_the_distribution() {
        let config = SamplingConfig {
            seed: 7,
            ..sampling()
        };
        let logits: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let draw = |n: usize| {
            let mut s = LogitsSampler::new(config).unwrap();
            (0..n)
                .map(|_| s.next_token(&mut logits.clone(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(4000);
        assert_eq!(a, draw(4000));
        let share = a.iter().filter(|&&t| t == 0).count() as f64 / a.len() as f64;
        assert!((share - 0.7).abs() < 0.03, "{share}");
        assert!(LogitsSampler::new(SamplingConfig {
            temperature: 0.0,
            ..sampling()
        })
        .is_err());
        assert!(LogitsSampler::new(SamplingConfig {
            top_p: Some(1.5),
            ..sampling()
        })
        .is_err());
        let mut s = LogitsSampler::new(sampling()).unwrap();
        assert!(s.next_token(&mut [f32::NAN, 1.0], &[]).is_err());
    }
}
