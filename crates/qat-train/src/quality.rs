//! How close a quantized model is to its full-precision reference, measured as llama.cpp's
//! `perplexity --kl-divergence` measures it (`tools/perplexity/perplexity.cpp`):
//!
//! * the token stream is cut into chunks of `ctx` tokens, the first token of each chunk
//!   replaced by `bos` when the model adds one, and each chunk evaluated from an empty cache;
//! * only the second half of each chunk is scored: the logits at positions
//!   `ctx/2 .. ctx − 1` predicting the tokens after them, so every scored token has at least
//!   `ctx/2` tokens of context;
//! * per scored token: `KL(P_ref ‖ P_q) = Σ_v p_ref(v)·(log p_ref(v) − log p_q(v))`, whether
//!   both models' most likely tokens agree ("Same top p"), and both models' negative
//!   log-likelihood of the actual next token;
//! * reported: mean KLD with its standard error, its median, 99th percentile (linear
//!   interpolation between sorted values at `fraction·(n − 1)`, as llama.cpp's `percentile`)
//!   and maximum, the agreement fraction with its binomial standard error, and
//!   `PPL = exp(mean NLL)` of each model.
//!
//! One difference, stated: llama.cpp stores the reference's log-probabilities as 16-bit codes
//! and skips vocabulary entries with `log p_ref < −16` in the sum; here both distributions are
//! exact (`f64` log-softmax over the whole vocabulary), which changes the mean by at most
//! `V·e^(−16)·|log p_ref − log p_q|` per token.

use lm::LlamaModel;
use ndarray::{Array2, ArrayView2};

use crate::error::{Result, TrainError};

/// What [`KlDivergence::finish`] reports (fractions as fractions, not per cent).
#[derive(Debug, Clone, PartialEq)]
pub struct QualityReport {
    /// Tokens scored.
    pub tokens: usize,
    /// Mean `KL(P_ref ‖ P_q)` per token, nats.
    pub mean_kld: f64,
    /// Standard error of the mean (llama.cpp's `±`; 0 with 10 tokens or fewer).
    pub mean_kld_uncertainty: f64,
    /// Median per-token KLD.
    pub median_kld: f64,
    /// 99th percentile of the per-token KLD.
    pub kld_p99: f64,
    /// Largest per-token KLD.
    pub max_kld: f64,
    /// Fraction of tokens whose most likely next token is the same in both models.
    pub same_top: f64,
    /// Binomial standard error of `same_top`.
    pub same_top_uncertainty: f64,
    /// Perplexity of the quantized model on the scored tokens.
    pub perplexity: f64,
    /// Perplexity of the reference on the same tokens.
    pub reference_perplexity: f64,
}

/// Accumulates per-token comparisons of two models' logits.
///
/// ```
/// use qat_train::quality::KlDivergence;
/// let mut kl = KlDivergence::new();
/// // Identical distributions: no divergence, same top token.
/// kl.add_token(&[0.0, 1.0, -1.0], &[0.0, 1.0, -1.0], 1).unwrap();
/// let report = kl.finish().unwrap();
/// assert_eq!((report.mean_kld, report.same_top), (0.0, 1.0));
/// ```
#[derive(Debug, Clone, Default)]
pub struct KlDivergence {
    klds: Vec<f64>,
    sum_kld2: f64,
    sum_nll: f64,
    sum_nll_ref: f64,
    same_top: usize,
}

/// `log softmax(logits)` in `f64` and the index of the first largest logit.
fn log_softmax(logits: &[f32], what: &str) -> Result<(Vec<f64>, usize)> {
    let mut imax = 0;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_finite() {
            return Err(TrainError::non_finite(
                what,
                format!("vocabulary index {i}"),
                v as f64,
            ));
        }
        if v > logits[imax] {
            imax = i;
        }
    }
    let max = f64::from(logits[imax]);
    let log_sum = logits
        .iter()
        .map(|&v| (f64::from(v) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    Ok((
        logits.iter().map(|&v| f64::from(v) - log_sum).collect(),
        imax,
    ))
}

/// llama.cpp's `mean_and_uncertainty`: the mean and its standard error (0 unless more than
/// ten values and a positive variance).
fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    let n = count as f64;
    let mean = sum / n;
    let var = sum2 / n - mean * mean;
    let unc = if var > 0.0 && count > 10 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, unc)
}

/// llama.cpp's `percentile` of sorted values: linear interpolation at `fraction·(n − 1)`.
///
/// ```
/// let sorted: Vec<f64> = (0..=100).map(f64::from).collect();
/// assert_eq!(qat_train::quality::percentile(&sorted, 0.99), 99.0);
/// assert_eq!(qat_train::quality::percentile(&[1.0, 2.0], 0.5), 1.5);
/// ```
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let Some((&first, &last)) = sorted.first().zip(sorted.last()) else {
        return f64::NAN;
    };
    if fraction <= 0.0 {
        return first;
    }
    if fraction >= 1.0 {
        return last;
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let ip = p as usize;
    let frac = p - ip as f64;
    (1.0 - frac) * sorted[ip] + frac * sorted[(ip + 1).min(sorted.len() - 1)]
}

impl KlDivergence {
    /// Nothing accumulated yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens accumulated.
    pub fn tokens(&self) -> usize {
        self.klds.len()
    }

    /// Compares one position: the reference's and the quantized model's logits over the
    /// vocabulary, and the token that actually follows (`next`). Returns the token's KLD.
    /// Errors on a length mismatch, a token outside the vocabulary or a non-finite logit.
    pub fn add_token(&mut self, reference: &[f32], quantized: &[f32], next: u32) -> Result<f64> {
        if reference.len() != quantized.len() || reference.is_empty() {
            return Err(TrainError::shape(
                "quantized logits (one per reference logit)",
                reference.len(),
                quantized.len(),
            ));
        }
        let next = next as usize;
        if next >= reference.len() {
            return Err(TrainError::invalid(
                "next token",
                next,
                format!("outside the vocabulary of {} tokens", reference.len()),
            ));
        }
        let (log_ref, top_ref) = log_softmax(reference, "reference logits")?;
        let (log_q, top_q) = log_softmax(quantized, "quantized logits")?;
        let kld: f64 = log_ref
            .iter()
            .zip(&log_q)
            .map(|(&lr, &lq)| lr.exp() * (lr - lq))
            .sum();
        self.klds.push(kld);
        self.sum_kld2 += kld * kld;
        self.sum_nll -= log_q[next];
        self.sum_nll_ref -= log_ref[next];
        self.same_top += usize::from(top_ref == top_q);
        Ok(kld)
    }

    /// [`KlDivergence::add_token`] for each row of `[tokens, vocab]` logits with its next token.
    pub fn add_rows(
        &mut self,
        reference: ArrayView2<'_, f32>,
        quantized: ArrayView2<'_, f32>,
        next: &[u32],
    ) -> Result<()> {
        if reference.dim() != quantized.dim() || reference.nrows() != next.len() {
            return Err(TrainError::shape(
                "logits of both models and next tokens",
                format!(
                    "{:?} twice and {} tokens",
                    reference.dim(),
                    reference.nrows()
                ),
                format!(
                    "{:?}, {:?}, {}",
                    reference.dim(),
                    quantized.dim(),
                    next.len()
                ),
            ));
        }
        for ((r, q), &t) in reference.rows().into_iter().zip(quantized.rows()).zip(next) {
            let (r, q) = (r.to_vec(), q.to_vec());
            self.add_token(&r, &q, t)?;
        }
        Ok(())
    }

    /// The statistics; an error when no token was added.
    pub fn finish(self) -> Result<QualityReport> {
        let n = self.klds.len();
        if n == 0 {
            return Err(TrainError::invalid(
                "KL divergence",
                "0 tokens",
                "nothing was scored",
            ));
        }
        let sum: f64 = self.klds.iter().sum();
        let (mean_kld, mean_kld_uncertainty) = mean_and_uncertainty(sum, self.sum_kld2, n);
        let mut sorted = self.klds;
        sorted.sort_by(f64::total_cmp);
        let median_kld = if n % 2 == 0 {
            0.5 * (sorted[n / 2] + sorted[n / 2 - 1])
        } else {
            sorted[n / 2]
        };
        let same_top = self.same_top as f64 / n as f64;
        let same_top_uncertainty = if n > 1 {
            (same_top * (1.0 - same_top) / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Ok(QualityReport {
            tokens: n,
            mean_kld,
            mean_kld_uncertainty,
            median_kld,
            kld_p99: percentile(&sorted, 0.99),
            max_kld: sorted[n - 1],
            same_top,
            same_top_uncertainty,
            perplexity: (self.sum_nll / n as f64).exp(),
            reference_perplexity: (self.sum_nll_ref / n as f64).exp(),
        })
    }
}

/// Compares `quantized` with `reference` on the token stream `tokens` as llama.cpp's
/// `perplexity --kl-divergence -c ctx` does (see the module's documentation): whole chunks of
/// `ctx` tokens (a remainder shorter than `ctx` is not scored), `bos` in place of each
/// chunk's first token when given, the second half of each chunk scored. Errors when the
/// vocabularies differ, `ctx < 4`, the stream holds less than one chunk, or a token is
/// outside the vocabulary.
pub fn compare_models(
    quantized: &mut LlamaModel,
    reference: &mut LlamaModel,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
) -> Result<QualityReport> {
    let vocab = reference.config().vocab_size;
    if quantized.config().vocab_size != vocab {
        return Err(TrainError::shape(
            "vocabulary of the quantized model (KL divergence compares token by token)",
            vocab,
            quantized.config().vocab_size,
        ));
    }
    if ctx < 4 {
        return Err(TrainError::invalid(
            "context",
            ctx,
            "must be at least 4 (the second half of each chunk is scored)",
        ));
    }
    if tokens.len() < ctx {
        return Err(TrainError::invalid(
            "tokens",
            tokens.len(),
            format!("fewer than one chunk of {ctx} tokens; use a smaller context or more text"),
        ));
    }
    if let Some((i, &t)) = tokens
        .iter()
        .chain(bos.as_ref())
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(TrainError::invalid(
            format!("token {i}"),
            t,
            format!("outside the vocabulary of {vocab} tokens"),
        ));
    }
    let first = ctx / 2;
    let mut kl = KlDivergence::new();
    for chunk in tokens.chunks_exact(ctx) {
        let mut ids = chunk.to_vec();
        if let Some(b) = bos {
            ids[0] = b;
        }
        let input = Array2::from_shape_vec((1, ctx), ids)
            .map_err(|e| TrainError::shape("chunk", ctx, e))?;
        let r = reference.logits(input.view(), None)?;
        let q = quantized.logits(input.view(), None)?;
        let scored = ndarray::s![0, first..ctx - 1, ..];
        kl.add_rows(r.slice(scored), q.slice(scored), &chunk[first + 1..])?;
    }
    kl.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_two_token_example() {
        let mut kl = KlDivergence::new();
        // Token 1: P_ref = (½, ½), P_q = (¾, ¼); KL = ½·ln(4/3); both tops are 0 (ties → first).
        kl.add_token(&[0.0, 0.0], &[3f32.ln(), 0.0], 0).unwrap();
        // Token 2: P_ref = (¼, ¾), P_q = (½, ½); KL = ¼·ln ½ + ¾·ln(3/2); tops 1 and 0.
        kl.add_token(&[0.0, 3f32.ln()], &[0.0, 0.0], 1).unwrap();
        let r = kl.finish().unwrap();
        let k1 = 0.5 * (4.0f64 / 3.0).ln();
        let k2 = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!(
            (r.mean_kld - (k1 + k2) / 2.0).abs() < 1e-7,
            "{}",
            r.mean_kld
        );
        assert!((r.max_kld - k1).abs() < 1e-7);
        assert!((r.kld_p99 - (0.01 * k2 + 0.99 * k1)).abs() < 1e-7);
        assert_eq!(r.same_top, 0.5);
        // NLL of the next tokens: q: −ln ¾, −ln ½; ref: −ln ½, −ln ¾.
        let ppl = ((-(0.75f64.ln()) - 0.5f64.ln()) / 2.0).exp();
        assert!((r.perplexity - ppl).abs() < 1e-6);
        assert!((r.reference_perplexity - ppl).abs() < 1e-6);
        assert_eq!(r.tokens, 2);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut kl = KlDivergence::new();
        assert!(kl.add_token(&[0.0, 1.0], &[0.0], 0).is_err());
        assert!(kl.add_token(&[0.0, 1.0], &[0.0, 1.0], 2).is_err());
        let err = kl.add_token(&[0.0, f32::NAN], &[0.0, 1.0], 0).unwrap_err();
        assert!(err.to_string().contains("vocabulary index 1"), "{err}");
        assert!(KlDivergence::new().finish().is_err());
    }

    #[test]
    fn a_model_against_itself_agrees_exactly() {
        let config = lm::LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap();
        let mut a = LlamaModel::random(config.clone(), 3).unwrap();
        let mut b = a.clone();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 1) % 32).collect();
        let r = compare_models(&mut a, &mut b, &tokens, 16, Some(1)).unwrap();
        // Two chunks of 16 (8 left over), positions 8..15 scored: 7 tokens each.
        assert_eq!(r.tokens, 14);
        assert!(r.mean_kld.abs() < 1e-12 && r.max_kld.abs() < 1e-12, "{r:?}");
        assert_eq!(r.same_top, 1.0);
        assert_eq!(r.perplexity, r.reference_perplexity);
        let mut other = LlamaModel::random(config, 4).unwrap();
        let r = compare_models(&mut other, &mut b, &tokens, 16, None).unwrap();
        assert!(r.mean_kld > 0.0 && r.kld_p99 >= r.median_kld);
        assert!(compare_models(&mut other, &mut b, &tokens[..10], 16, None).is_err());
        assert!(compare_models(&mut other, &mut b, &tokens, 16, Some(99)).is_err());
    }

    proptest::proptest! {
        /// KL divergence is never negative and is zero only for equal distributions (here:
        /// logits shifted by a constant give the same distribution).
        #[test]
        fn kld_is_non_negative_and_shift_invariant(
            logits in proptest::collection::vec(-8.0f32..8.0, 2..20),
            other in proptest::collection::vec(-8.0f32..8.0, 20),
            shift in -5.0f32..5.0,
        ) {
            let q: Vec<f32> = other[..logits.len()].to_vec();
            let shifted: Vec<f32> = logits.iter().map(|v| v + shift).collect();
            let mut kl = KlDivergence::new();
            proptest::prop_assert!(kl.add_token(&logits, &q, 0).unwrap() >= -1e-12);
            proptest::prop_assert!(kl.add_token(&logits, &shifted, 0).unwrap().abs() < 1e-5);
        }
    }
}
