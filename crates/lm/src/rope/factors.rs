//! Per-frequency rotary divisors as llama.cpp stores them (`rope_freqs.weight`, the Llama 3.1
//! converter's tensor): computing them from a Llama 3 rope and recovering the rope's
//! parameters from them.
//!
//! A Llama 3 GGUF file keeps no `rope_scaling` metadata, only the divisors. They determine the
//! parameters up to a common scale of `original_max`, `low_freq_factor` and
//! `high_freq_factor` (the divisors depend on their ratios only), so the recovery searches the
//! values released models use (`low/high = 1/4`, lengths that are whole numbers) and keeps a
//! candidate only if it regenerates every stored divisor bit for bit. A file no candidate
//! reproduces is read with the divisors themselves ([`RopeScaling::Factors`]).

use super::RopeScaling;

/// The divisors llama.cpp applies to `1/θ^(2i/d)` for a Llama 3.1 rope (the converter's
/// `rope_freqs`), computed in f64 as the converter's Python floats, stored as f32.
///
/// ```
/// let f = lm::rope::factors::llama3_rope_freqs(10000.0, 8, 8.0, 1.0, 4.0, 32);
/// assert_eq!(f.len(), 4);
/// assert_eq!(f[0], 1.0); // the highest frequency is kept
/// assert_eq!(f[3], 8.0); // the lowest is divided by `factor`
/// ```
pub fn llama3_rope_freqs(
    theta: f32,
    dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max: usize,
) -> Vec<f32> {
    let (factor, low, high) = (
        factor as f64,
        low_freq_factor as f64,
        high_freq_factor as f64,
    );
    let old = original_max as f64;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    wavelengths(theta, dim)
        .into_iter()
        .map(|wavelen| {
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// `2π / freq` with the frequency in float32 (the converter's `torch.arange … float32`).
fn wavelengths(theta: f32, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0f32 / theta.powf((2 * i) as f32 / dim as f32);
            2.0 * std::f64::consts::PI / freq as f64
        })
        .collect()
}

/// `(low_freq_factor, high_freq_factor)` pairs tried, the released Llama 3.x one first.
const FREQ_FACTOR_PAIRS: [(f32, f32); 6] = [
    (1.0, 4.0),
    (1.0, 2.0),
    (1.0, 8.0),
    (2.0, 4.0),
    (1.0, 16.0),
    (1.0, 32.0),
];

/// The Llama 3 rope whose divisors are exactly `stored` (bit for bit), if one of the searched
/// candidates is (module docs). `hint` is a pretrained length to try first (a file's
/// `rope.scaling.original_context_length`, when it has one).
///
/// ```
/// use lm::rope::factors::{llama3_rope_freqs, recover_llama3};
/// use lm::rope::RopeScaling;
/// let stored = llama3_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192);
/// let rope = recover_llama3(500000.0, 64, &stored, None).unwrap();
/// assert_eq!(rope, RopeScaling::Llama3 {
///     factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 8192 });
/// ```
pub fn recover_llama3(
    theta: f32,
    dim: usize,
    stored: &[f32],
    hint: Option<usize>,
) -> Option<RopeScaling> {
    if stored.len() != dim / 2 || stored.is_empty() {
        return None;
    }
    let factor = stored.iter().copied().fold(f32::MIN, f32::max);
    if !(factor.is_finite() && factor > 1.0) || stored.iter().any(|&f| f.is_nan() || f < 1.0) {
        return None;
    }
    let waves = wavelengths(theta, dim);
    let inv_factor = 1.0 / factor as f64;
    // Band entries (strictly between 1 and `factor`) pin the length for each factor pair:
    // smooth = (old/λ − low)/(high − low) and smooth = (1/f − 1/factor)/(1 − 1/factor).
    let band: Vec<(f64, f64)> = waves
        .iter()
        .zip(stored)
        .filter(|(_, &f)| f > 1.0 && f < factor)
        .map(|(&w, &f)| (w, (1.0 / f as f64 - inv_factor) / (1.0 - inv_factor)))
        .collect();
    let mut lengths: Vec<usize> = hint.into_iter().collect();
    lengths.extend((4..=20).map(|k| 1usize << k));
    for (low, high) in FREQ_FACTOR_PAIRS {
        let mut candidates = lengths.clone();
        for &(w, smooth) in &band {
            let old = w * (low as f64 + smooth * (high - low) as f64);
            if (1.0..1e9).contains(&old) {
                let rounded = old.round() as usize;
                candidates.extend([rounded, rounded.saturating_sub(1), rounded + 1]);
            }
        }
        for original_max in candidates.into_iter().filter(|&c| c >= 1) {
            let regenerated = llama3_rope_freqs(theta, dim, factor, low, high, original_max);
            let same = regenerated
                .iter()
                .zip(stored)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if same {
                return Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max,
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_and_tiny_llama3_ropes_are_recovered_exactly() {
        for (theta, dim, factor, low, high, old) in [
            (500000.0, 128, 8.0, 1.0, 4.0, 8192),
            (500000.0, 64, 32.0, 1.0, 4.0, 8192),
            (10000.0, 16, 8.0, 1.0, 4.0, 32),
            (10000.0, 32, 4.0, 1.0, 2.0, 100),
        ] {
            let stored = llama3_rope_freqs(theta, dim, factor, low, high, old);
            let rope = recover_llama3(theta, dim, &stored, None).expect("recovered");
            let RopeScaling::Llama3 {
                factor: f,
                low_freq_factor: l,
                high_freq_factor: h,
                original_max: o,
            } = rope
            else {
                panic!("{rope:?}");
            };
            assert_eq!(llama3_rope_freqs(theta, dim, f, l, h, o), stored);
            assert_eq!(f, factor);
        }
    }

    #[test]
    fn divisors_no_llama3_rope_makes_are_not_recovered() {
        let mut stored = llama3_rope_freqs(500000.0, 128, 8.0, 1.0, 4.0, 8192);
        stored[20] *= 1.001;
        assert_eq!(recover_llama3(500000.0, 128, &stored, None), None);
        assert_eq!(recover_llama3(500000.0, 128, &stored[1..], None), None);
        assert_eq!(recover_llama3(10000.0, 8, &[1.0; 4], None), None);
        assert_eq!(
            recover_llama3(10000.0, 8, &[1.0, f32::NAN, 2.0, 2.0], None),
            None
        );
    }
}
