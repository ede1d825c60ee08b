//! Combining adapters into a new one (PEFT's `add_weighted_adapter`), in `ΔW` space.
//!
//! With `ΔWᵢ = sᵢ·Bᵢ·Aᵢ` (each adapter's own scale applied once), every combination here
//! produces an adapter of scale `1` (`α = r`, no rsLoRA) whose `B·A` is the combined `ΔW`:
//!
//! | type | combined `ΔW` | rank |
//! |---|---|---|
//! | `cat` | `Σ wᵢ·ΔWᵢ` exactly: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ B₂ …]` (as PEFT) | `Σ rᵢ` |
//! | `linear` | `Σ wᵢ·ΔWᵢ`, re-factored by truncated SVD | the common `r` |
//! | `svd` | `Σ wᵢ·ΔWᵢ`, truncated SVD | `svd_rank` or `max rᵢ` |
//! | `ties` | trim each `ΔWᵢ` to the `density` largest magnitudes, elect a sign per element, mean of the weighted agreeing entries, SVD | as `svd` |
//! | `dare_linear` | drop each element of each `ΔWᵢ` with probability `1 − density` (seeded), rescale by `1/density`, weighted sum, SVD | as `svd` |
//! | `dare_ties` | DARE's drop and rescale, then TIES' sign election and disjoint mean, SVD | as `svd` |
//! | `magnitude_prune` | trim as `ties`, weighted sum, SVD | as `svd` |
//!
//! Where this differs from PEFT, on purpose: PEFT's `linear`, `ties`, `dare_*` and
//! `magnitude_prune` (without `_svd`) combine the `A`s and the `B`s separately, so their
//! product has cross terms `Bᵢ·Aⱼ` that are no weighted sum of the adapters; here they are
//! computed in `ΔW` space like PEFT's `*_svd` variants. PEFT's `*_svd` variants also multiply
//! each `ΔWᵢ` (which already carries `sᵢ`) by `wᵢ·sᵢ`, applying the scale twice; here the scale
//! is applied once. The SVD factors follow PEFT: `B = U_r·S_r`, `A = V_rᵀ`.

use ndarray::{concatenate, Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::config::InitLoraWeights;
use crate::error::{LoraError, Result};
use crate::svd::truncated_svd;

/// PEFT's `combination_type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CombinationType {
    /// `"linear"`.
    Linear,
    /// `"cat"`.
    Cat,
    /// `"svd"`.
    Svd,
    /// `"ties"`.
    Ties,
    /// `"dare_linear"`.
    DareLinear,
    /// `"dare_ties"`.
    DareTies,
    /// `"magnitude_prune"`.
    MagnitudePrune,
}

impl std::str::FromStr for CombinationType {
    type Err = LoraError;
    /// Parses PEFT's names; the `_svd` suffixed names map to the same (`ΔW`-space) type.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.strip_suffix("_svd").unwrap_or(s) {
            "linear" => CombinationType::Linear,
            "cat" => CombinationType::Cat,
            "svd" | "" => CombinationType::Svd,
            "ties" => CombinationType::Ties,
            "dare_linear" => CombinationType::DareLinear,
            "dare_ties" => CombinationType::DareTies,
            "magnitude_prune" => CombinationType::MagnitudePrune,
            _ => {
                return Err(LoraError::option(
                    "combination_type",
                    format!("{s:?}"),
                    "expected one of linear, cat, svd, ties, dare_linear, dare_ties, \
                     magnitude_prune (optionally with _svd)",
                ))
            }
        })
    }
}

/// How TIES elects the sign of each element.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MajoritySign {
    /// The sign of the sum of the (trimmed) task tensors (PEFT's `"total"`).
    #[default]
    Total,
    /// The sign that more task tensors have (PEFT's `"frequency"`).
    Frequency,
}

/// A combination request: the type and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Combination {
    /// Which combination.
    pub kind: CombinationType,
    /// Fraction of elements kept by `ties`, `dare_*` and `magnitude_prune`, in `(0, 1]`
    /// (`[0, 1]` for the magnitude-based ones).
    pub density: Option<f64>,
    /// Rank of the SVD-factored result (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// TIES' sign election.
    pub majority_sign: MajoritySign,
    /// Seed of DARE's random drops.
    pub seed: u64,
}

impl Combination {
    /// A combination of `kind` with no density, default rank and seed 0.
    pub fn new(kind: CombinationType) -> Self {
        Combination {
            kind,
            density: None,
            svd_rank: None,
            majority_sign: MajoritySign::Total,
            seed: 0,
        }
    }

    /// The same with `density` set.
    pub fn with_density(mut self, density: f64) -> Self {
        self.density = Some(density);
        self
    }
}

/// Combines `(adapter, weight)` pairs of one layer into a new adapter of scale 1 (see the
/// module docs). `seed` drives DARE's drops and the new adapter's dropout.
///
/// ```
/// use lora_core::combine::{combine, Combination, CombinationType};
/// use lora_core::{AdapterOptions, LoraAdapter};
/// use ndarray::array;
///
/// let o = AdapterOptions::new(1, 2.0); // s = 2
/// let a1 = LoraAdapter::from_weights(array![[1.0f32, 0.0]], array![[1.0f32], [0.0]], None, &o, 0, "t").unwrap();
/// let a2 = LoraAdapter::from_weights(array![[0.0f32, 1.0]], array![[0.0f32], [1.0]], None, &o, 0, "t").unwrap();
/// let cat = combine(&[(&a1, 0.5), (&a2, 1.0)], &Combination::new(CombinationType::Cat), 0, "t").unwrap();
/// // ΔW = 0.5·2·e₀e₀ᵀ + 1·2·e₁e₁ᵀ
/// assert_eq!(cat.delta_weight().unwrap(), array![[1.0f32, 0.0], [0.0, 2.0]]);
/// ```
pub fn combine(
    adapters: &[(&LoraAdapter, f64)],
    combination: &Combination,
    seed: u64,
    context: &str,
) -> Result<LoraAdapter> {
    let (first, _) = adapters.first().ok_or_else(|| {
        LoraError::option("adapters", "[]", format!("nothing to combine in {context}"))
    })?;
    let shape = first.shape();
    for (adapter, weight) in adapters {
        if adapter.shape() != shape {
            return Err(LoraError::shape(
                format!("combining adapters of {context}"),
                format!("{shape:?}"),
                format!("{:?}", adapter.shape()),
            ));
        }
        if adapter.is_dora() {
            return Err(LoraError::option(
                format!("use_dora of an adapter combined in {context}"),
                true,
                "DoRA adapters have no ΔW independent of the base and cannot be combined",
            ));
        }
        if !weight.is_finite() {
            return Err(LoraError::option("weights", weight, "must be finite"));
        }
    }
    let ranks: Vec<usize> = adapters.iter().map(|(a, _)| a.rank()).collect();
    let max_rank = *ranks.iter().max().unwrap_or(&1);
    let dropout = first.options().dropout;
    let new_options = |r: usize| AdapterOptions {
        r,
        alpha: r as f64,
        dropout,
        use_rslora: false,
        use_dora: false,
        init: InitLoraWeights::Kaiming,
    };

    if combination.kind == CombinationType::Cat {
        let mut a_blocks = Vec::with_capacity(adapters.len());
        for (adapter, weight) in adapters {
            a_blocks.push(adapter.a() * (*weight as f32 * adapter.scale()));
        }
        let a_views: Vec<_> = a_blocks.iter().map(|a| a.view()).collect();
        let b_views: Vec<_> = adapters.iter().map(|(a, _)| a.b().view()).collect();
        let a = concatenate(Axis(0), &a_views).map_err(|e| LoraError::shape("cat A", "", e))?;
        let b = concatenate(Axis(1), &b_views).map_err(|e| LoraError::shape("cat B", "", e))?;
        let r = a.nrows();
        return LoraAdapter::from_weights(a, b, None, &new_options(r), seed, context);
    }

    let new_rank = match combination.kind {
        CombinationType::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(LoraError::option(
                    "combination_type",
                    "linear",
                    format!("needs equal ranks in {context}, got {ranks:?} (use cat or svd)"),
                ));
            }
            ranks[0]
        }
        _ => combination.svd_rank.unwrap_or(max_rank),
    };
    let density = || -> Result<f64> {
        let d = combination.density.ok_or_else(|| {
            LoraError::option(
                "density",
                "None",
                format!("{:?} needs a density", combination.kind),
            )
        })?;
        let random = matches!(
            combination.kind,
            CombinationType::DareLinear | CombinationType::DareTies
        );
        let valid = if random {
            d > 0.0 && d <= 1.0
        } else {
            (0.0..=1.0).contains(&d)
        };
        if valid {
            Ok(d)
        } else {
            Err(LoraError::option(
                "density",
                d,
                if random {
                    "must be in (0, 1] for DARE"
                } else {
                    "must be in [0, 1]"
                },
            ))
        }
    };

    let mut deltas = Vec::with_capacity(adapters.len());
    for (adapter, _) in adapters {
        deltas.push(adapter.delta_weight()?);
    }
    let weights: Vec<f32> = adapters.iter().map(|(_, w)| *w as f32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ combination.seed);
    let combined = match combination.kind {
        CombinationType::Linear | CombinationType::Svd => weighted_sum(&deltas, &weights)?,
        CombinationType::MagnitudePrune => {
            let d = density()?;
            let trimmed: Vec<_> = deltas.iter().map(|t| magnitude_prune(t, d)).collect();
            weighted_sum(&trimmed, &weights)?
        }
        CombinationType::Ties => {
            let d = density()?;
            let trimmed: Vec<_> = deltas.iter().map(|t| magnitude_prune(t, d)).collect();
            disjoint_merge(&trimmed, &weights, combination.majority_sign)?
        }
        CombinationType::DareLinear => {
            let d = density()?;
            let dropped: Vec<_> = deltas
                .iter()
                .map(|t| random_prune(t, d, &mut rng))
                .collect();
            weighted_sum(&dropped, &weights)?
        }
        CombinationType::DareTies => {
            let d = density()?;
            let dropped: Vec<_> = deltas
                .iter()
                .map(|t| random_prune(t, d, &mut rng))
                .collect();
            disjoint_merge(&dropped, &weights, combination.majority_sign)?
        }
        CombinationType::Cat => unreachable!("handled above"),
    };
    let svd = truncated_svd(combined.view(), new_rank, context)?;
    let b = &svd.u * &svd.s.view().insert_axis(Axis(0));
    LoraAdapter::from_weights(svd.vt, b, None, &new_options(new_rank), seed, context)
}

/// Errors unless there is at least one tensor, one weight per tensor, and every tensor has
/// the first one's shape; returns that shape.
fn check_inputs(what: &str, tensors: &[Array2<f32>], weights: &[f32]) -> Result<(usize, usize)> {
    let first = tensors.first().ok_or_else(|| {
        LoraError::option(
            format!("{what} tensors"),
            "[]",
            "at least one tensor is needed",
        )
    })?;
    if weights.len() != tensors.len() {
        return Err(LoraError::shape(
            format!("{what} weights (one per tensor)"),
            tensors.len(),
            weights.len(),
        ));
    }
    for (i, t) in tensors.iter().enumerate() {
        if t.dim() != first.dim() {
            return Err(LoraError::shape(
                format!("{what} tensor {i} (every tensor has tensor 0's shape)"),
                format!("{:?}", first.dim()),
                format!("{:?}", t.dim()),
            ));
        }
    }
    Ok(first.dim())
}

/// `Σ wᵢ·tᵢ`. Empty input, a weight count other than the tensor count, or tensors of
/// different shapes are errors.
///
/// ```
/// use ndarray::array;
/// let s = lora_core::combine::weighted_sum(&[array![[1.0f32]], array![[2.0]]], &[1.0, 0.5]);
/// assert_eq!(s.unwrap(), array![[2.0]]);
/// assert!(lora_core::combine::weighted_sum(&[], &[]).is_err());
/// ```
pub fn weighted_sum(tensors: &[Array2<f32>], weights: &[f32]) -> Result<Array2<f32>> {
    let dim = check_inputs("weighted_sum", tensors, weights)?;
    let mut sum = Array2::zeros(dim);
    for (t, &w) in tensors.iter().zip(weights) {
        sum.scaled_add(w, t);
    }
    Ok(sum)
}

/// Keeps the `⌊density·n⌋` elements of largest magnitude (ties: the earlier element), zeroes
/// the rest, as PEFT's `magnitude_based_pruning`. `density ≥ 1` keeps everything.
pub fn magnitude_prune(tensor: &Array2<f32>, density: f64) -> Array2<f32> {
    if density >= 1.0 {
        return tensor.clone();
    }
    let flat: Vec<f32> = tensor.iter().copied().collect();
    let keep = (density * flat.len() as f64) as usize;
    let mut order: Vec<usize> = (0..flat.len()).collect();
    order.sort_by(|&i, &j| flat[j].abs().total_cmp(&flat[i].abs()));
    let mut kept = vec![0.0f32; flat.len()];
    for &i in &order[..keep] {
        kept[i] = flat[i];
    }
    Array2::from_shape_vec(tensor.dim(), kept).expect("same element count")
}

/// Keeps each element with probability `density` and divides the kept ones by `density`
/// (DARE). `density ≥ 1` keeps everything unchanged, as PEFT.
pub fn random_prune(tensor: &Array2<f32>, density: f64, rng: &mut ChaCha8Rng) -> Array2<f32> {
    if density >= 1.0 {
        return tensor.clone();
    }
    let rescale = (1.0 / density) as f32;
    tensor.mapv(|v| {
        if rng.random::<f64>() < density {
            v * rescale
        } else {
            0.0
        }
    })
}

/// TIES' sign election and disjoint merge: per element, the majority sign is the sign of
/// `Σ tᵢ` (or of the count of signs), ≥ 0 counting as positive; the result is the mean of
/// `wᵢ·tᵢ` over the tensors whose element has that sign (zeros never agree).
pub fn disjoint_merge(
    tensors: &[Array2<f32>],
    weights: &[f32],
    method: MajoritySign,
) -> Result<Array2<f32>> {
    let dim = check_inputs("disjoint_merge", tensors, weights)?;
    Ok(Array2::from_shape_fn(dim, |ij| {
        let election: f32 = match method {
            MajoritySign::Total => tensors.iter().map(|t| t[ij]).sum(),
            MajoritySign::Frequency => tensors.iter().map(|t| sign(t[ij])).sum(),
        };
        let majority = if election >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0.0f32, 0u32);
        for (t, &w) in tensors.iter().zip(weights) {
            if sign(t[ij]) == majority {
                sum += w * t[ij];
                count += 1;
            }
        }
        sum / count.max(1) as f32
    }))
}

/// torch's `sign`: −1, 0 or 1.
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}
