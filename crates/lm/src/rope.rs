//! Rotary position embeddings: the inverse frequencies of every rope type the supported
//! families publish (transformers' `modeling_rope_utils.py`: default, linear, dynamic NTK,
//! YaRN, LongRoPE, Llama 3), parsed from a config's `rope_parameters` / `rope_scaling`, and
//! the cos/sin table that rotates query and key heads (rotate-half convention).
//!
//! Everything is computed in `f32` as transformers computes it (float32 `pow`, products and
//! `where`s), so the tables agree with its buffers to the last bit or two.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::error::{LmError, Result};

/// How the inverse frequencies are scaled (the `rope_type` of a config), with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = 1/θ^(2i/d)`.
    Default,
    /// Position interpolation: `inv_freq / factor`.
    Linear { factor: f32 },
    /// Dynamic NTK: when a forward reaches `seq_len > original_max`, θ grows to
    /// `θ·(factor·seq_len/original_max − (factor − 1))^(d/(d−2))`.
    Dynamic { factor: f32, original_max: usize },
    /// YaRN: interpolated and extrapolated frequencies blended by a linear ramp between the
    /// correction dimensions of `beta_fast`/`beta_slow` rotations; cos/sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f32,
        original_max: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-frequency divisors, `short_factor` up to `original_max`
    /// positions and `long_factor` beyond; cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max: usize,
        attention_factor: f32,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated smoothly.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max: usize,
    },
    /// Explicit per-frequency divisors, `inv_freq[i] = 1/(θ^(2i/d)·factors[i])`: a GGUF file's
    /// `rope_freqs` tensor (what llama.cpp computes with) when no Llama 3 parameters
    /// regenerate it bit for bit ([`factors::recover_llama3`]). No config spells this type.
    Factors { factors: Vec<f32> },
}

/// One rotary embedding: base θ, rotated dimensions and scaling.
///
/// ```
/// use lm::rope::{Rope, RopeScaling};
/// let rope = Rope { theta: 10000.0, dim: 4, scaling: RopeScaling::Linear { factor: 2.0 } };
/// let (inv_freq, attention) = rope.inv_freq(8);
/// assert_eq!(inv_freq, vec![0.5, 0.005]);
/// assert_eq!(attention, 1.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f32,
    /// Rotated dimensions per head (`head_dim`; partial rotary factors are refused).
    pub dim: usize,
    pub scaling: RopeScaling,
}

fn default_inv_freq(theta: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// YaRN's `0.1·mscale·ln(scale) + 1` (1 for `scale <= 1`).
fn yarn_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    /// The inverse frequencies (`dim/2`) and the factor cos/sin are multiplied by, for a
    /// forward whose largest position is `seq_len − 1` (only dynamic and LongRoPE depend on it).
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let (theta, dim) = (self.theta, self.dim);
        match &self.scaling {
            RopeScaling::Default => (default_inv_freq(theta, dim), 1.0),
            RopeScaling::Linear { factor } => (
                default_inv_freq(theta, dim)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic {
                factor,
                original_max,
            } => {
                let seq = seq_len.max(*original_max) as f64;
                let base = theta as f64
                    * ((*factor as f64 * seq / *original_max as f64) - (*factor as f64 - 1.0))
                        .powf(dim as f64 / (dim as f64 - 2.0));
                (default_inv_freq(base as f32, dim), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let correction_dim = |rotations: f32| -> f64 {
                    (dim as f64
                        * (*original_max as f64 / (rotations as f64 * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * (theta as f64).ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let pos_freq = theta.powf((2 * i) as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor * pos_freq);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv_freq, *attention_factor)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max,
                attention_factor,
            } => {
                let ext = if seq_len > *original_max {
                    long_factor
                } else {
                    short_factor
                };
                let inv_freq = (0..dim / 2)
                    .map(|i| 1.0 / (ext[i] * theta.powf((2 * i) as f32 / dim as f32)))
                    .collect();
                (inv_freq, *attention_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                let old = *original_max as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv_freq = default_inv_freq(theta, dim)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Frequencies are finite and positive, so the wavelengths compare totally.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (inv_freq, 1.0)
            }
            RopeScaling::Factors { factors } => (
                default_inv_freq(theta, dim)
                    .into_iter()
                    .zip(factors)
                    .map(|(f, d)| f / d)
                    .collect(),
                1.0,
            ),
        }
    }

    /// Parses one rope description: `params` is a `rope_parameters` dict (or a legacy
    /// `rope_scaling` dict, with `theta` from `rope_theta`), `key` names it in errors and
    /// `config` is the whole config (for `max_position_embeddings` and Phi-3's top-level
    /// `original_max_position_embeddings`). Unknown types and keys are refused by name.
    pub fn parse(
        key: &str,
        params: Option<&Map<String, Value>>,
        theta_fallback: Option<f64>,
        dim: usize,
        config: &Map<String, Value>,
    ) -> Result<Rope> {
        let empty = Map::new();
        let p = params.unwrap_or(&empty);
        let num = |name: &str| -> Result<Option<f64>> {
            match p.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    LmError::config(
                        format!("{key}.{name}"),
                        format!("expected a number, got {v}"),
                    )
                }),
            }
        };
        let theta = match num("rope_theta")? {
            Some(t) => t,
            None => theta_fallback.unwrap_or(10000.0),
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(LmError::config(
                format!("{key}.rope_theta"),
                format!("{theta} is invalid"),
            ));
        }
        let kind = match p.get("rope_type").or_else(|| p.get("type")) {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(LmError::config(
                    format!("{key}.rope_type"),
                    format!("expected a string, got {v}"),
                ))
            }
        };
        let max_pos = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize;
        // transformers' `standardize_rope_params`: for llama3, yarn and longrope a pretrained
        // length at the config's top level (Phi-3 keeps it there) takes precedence over the
        // rope dict's own, except in a per-layer-type dict; absent both, the model's length.
        let top_level_original = if key.starts_with("rope_parameters.") {
            None
        } else {
            match config.get("original_max_position_embeddings") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(o) if o >= 1 => Some(o as usize),
                    _ => {
                        return Err(LmError::config(
                            "original_max_position_embeddings",
                            format!("{v} is invalid"),
                        ))
                    }
                },
            }
        };
        let original_max = |scaled_type: bool| -> Result<usize> {
            if let Some(o) = top_level_original.filter(|_| scaled_type) {
                return Ok(o);
            }
            match num("original_max_position_embeddings")? {
                Some(v) if v >= 1.0 => Ok(v as usize),
                Some(v) => Err(LmError::config(
                    format!("{key}.original_max_position_embeddings"),
                    format!("{v} is invalid"),
                )),
                None => Ok(max_pos),
            }
        };
        let factor = || -> Result<f32> {
            match num("factor")? {
                Some(f) if f.is_finite() && f > 0.0 => Ok(f as f32),
                Some(f) => Err(LmError::config(
                    format!("{key}.factor"),
                    format!("{f} is invalid"),
                )),
                None => Err(LmError::config(format!("{key}.factor"), "missing")),
            }
        };
        let allowed: &[&str] =
            match kind.as_str() {
                "default" => &[],
                "linear" => &["factor"],
                "dynamic" => &["factor", "original_max_position_embeddings"],
                "yarn" => &[
                    "factor",
                    "original_max_position_embeddings",
                    "beta_fast",
                    "beta_slow",
                    "attention_factor",
                    "mscale",
                    "mscale_all_dim",
                    "truncate",
                ],
                "longrope" => &[
                    "short_factor",
                    "long_factor",
                    "factor",
                    "attention_factor",
                    "original_max_position_embeddings",
                ],
                "llama3" => &[
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ],
                _ => return Err(LmError::Unsupported {
                    key: format!("{key}.rope_type"),
                    value: format!("{kind:?}"),
                    reason:
                        "implemented rope types: default, linear, dynamic, yarn, longrope, llama3"
                            .into(),
                }),
            };
        for (name, value) in p {
            let common = ["rope_type", "type", "rope_theta"].contains(&name.as_str());
            if !common && !allowed.contains(&name.as_str()) && !value.is_null() {
                if name == "partial_rotary_factor" && value.as_f64() == Some(1.0) {
                    continue;
                }
                return Err(LmError::Unsupported {
                    key: format!("{key}.{name}"),
                    value: value.to_string(),
                    reason: format!("not an implemented option of rope type {kind:?}"),
                });
            }
        }
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor()?,
                original_max: original_max(false)?,
            },
            "yarn" => {
                let factor = factor()?;
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a as f32,
                    None => match (num("mscale")?, num("mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            yarn_mscale(factor, m as f32) / yarn_mscale(factor, all as f32)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                RopeScaling::Yarn {
                    factor,
                    original_max: original_max(true)?,
                    beta_fast: num("beta_fast")?.unwrap_or(32.0) as f32,
                    beta_slow: num("beta_slow")?.unwrap_or(1.0) as f32,
                    attention_factor,
                    truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "longrope" => {
                let list = |name: &str| -> Result<Vec<f32>> {
                    let v = p
                        .get(name)
                        .ok_or_else(|| LmError::config(format!("{key}.{name}"), "missing"))?;
                    let items = v.as_array().ok_or_else(|| {
                        LmError::config(
                            format!("{key}.{name}"),
                            format!("expected a list, got {v}"),
                        )
                    })?;
                    let values: Vec<f32> = items
                        .iter()
                        .filter_map(|x| x.as_f64().map(|f| f as f32))
                        .collect();
                    if values.len() != dim / 2 || items.len() != dim / 2 {
                        return Err(LmError::config(
                            format!("{key}.{name}"),
                            format!(
                                "has {} numbers, expected head_dim/2 = {}",
                                items.len(),
                                dim / 2
                            ),
                        ));
                    }
                    Ok(values)
                };
                // Without an explicit factor, the ratio of the model's length to the
                // pretrained one (Phi-3's configs give only the lengths).
                let original = original_max(true)?;
                let factor = match num("factor")? {
                    Some(f) => f,
                    None => max_pos as f64 / original as f64,
                };
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a as f32,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32,
                };
                RopeScaling::LongRope {
                    short_factor: list("short_factor")?,
                    long_factor: list("long_factor")?,
                    original_max: original,
                    attention_factor,
                }
            }
            _ => {
                let need = |name: &str| -> Result<f32> {
                    num(name)?
                        .map(|v| v as f32)
                        .ok_or_else(|| LmError::config(format!("{key}.{name}"), "missing"))
                };
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max: original_max(true)?,
                }
            }
        };
        Ok(Rope {
            theta: theta as f32,
            dim,
            scaling,
        })
    }

    /// The rope type's name as configs spell it.
    pub fn type_name(&self) -> &'static str {
        match self.scaling {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Factors { .. } => "rope_freqs",
        }
    }
}

/// Cosines and sines of rotary embeddings for a run of positions: angle = position·inv_freq,
/// both halves of a head share them, each scaled by the rope's attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    head_dim: usize,
    first_position: usize,
    /// `(positions, head_dim/2)`.
    cos: Array2<f32>,
    sin: Array2<f32>,
}

impl RopeTable {
    /// The default-RoPE table (θ) for positions `first_position .. first_position + len`.
    ///
    /// ```
    /// use lm::layers::RopeTable;
    /// let table = RopeTable::new(10000.0, 4, 0, 3).unwrap();
    /// // Position 0 does not rotate.
    /// let mut x = ndarray::array![[1.0f32, 2.0, 3.0, 4.0]];
    /// table.apply(x.view_mut(), &[0], 1, false).unwrap();
    /// assert_eq!(x, ndarray::array![[1.0, 2.0, 3.0, 4.0]]);
    /// ```
    pub fn new(theta: f32, head_dim: usize, first_position: usize, len: usize) -> Result<Self> {
        let rope = Rope {
            theta,
            dim: head_dim,
            scaling: RopeScaling::Default,
        };
        Self::for_rope(&rope, first_position, len, first_position + len)
    }

    /// The table of `rope` for positions `first_position .. first_position + len`, in a forward
    /// whose sequence length (for dynamic and LongRoPE scaling) is `seq_len`.
    pub fn for_rope(
        rope: &Rope,
        first_position: usize,
        len: usize,
        seq_len: usize,
    ) -> Result<Self> {
        let head_dim = rope.dim;
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(LmError::invalid(
                "head_dim",
                head_dim,
                "RoPE needs a positive even head_dim",
            ));
        }
        let half = head_dim / 2;
        let (inv_freq, attention) = rope.inv_freq(seq_len);
        let mut cos = Array2::zeros((len, half));
        let mut sin = Array2::zeros((len, half));
        for p in 0..len {
            let pos = (first_position + p) as f32;
            for (i, &f) in inv_freq.iter().enumerate() {
                // transformers: float32 angle, cos/sin, then × attention_scaling in float32.
                let angle = (pos * f) as f64;
                cos[[p, i]] = angle.cos() as f32 * attention;
                sin[[p, i]] = angle.sin() as f32 * attention;
            }
        }
        Ok(RopeTable {
            head_dim,
            first_position,
            cos,
            sin,
        })
    }

    /// Several runs' tables stacked and indexed by row, not position: run `(first, len,
    /// seq_len)` contributes [`RopeTable::for_rope`]`(rope, first, len, seq_len)`, and row `r`
    /// of `x` is rotated by [`RopeTable::apply`] with position `r`. The batched cached decoder
    /// rotates sequences at different positions and lengths (dynamic and LongRoPE scaling
    /// depend on each one's) in one pass.
    pub(crate) fn stacked(rope: &Rope, runs: &[(usize, usize, usize)]) -> Result<Self> {
        let tables = runs
            .iter()
            .map(|&(first, len, seq_len)| Self::for_rope(rope, first, len, seq_len))
            .collect::<Result<Vec<_>>>()?;
        let stack = |part: fn(&RopeTable) -> ArrayView2<'_, f32>| {
            let views: Vec<_> = tables.iter().map(part).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|e| LmError::shape("stacked RoPE tables", "(rows, head_dim/2)", e))
        };
        Ok(RopeTable {
            head_dim: rope.dim,
            first_position: 0,
            cos: stack(|t| t.cos.view())?,
            sin: stack(|t| t.sin.view())?,
        })
    }

    /// Rotates every head of every row in place: `x·cos + rotate_half(x)·sin` (forward), or
    /// its transpose (`inverse`: the backward pass; with an attention factor `a` the map is
    /// `a` times a rotation, and its transpose is `a` times the opposite rotation).
    /// `positions[r]` is the position of row `r`; `x` has `n_heads·head_dim` columns.
    pub fn apply(
        &self,
        mut x: ArrayViewMut2<'_, f32>,
        positions: &[usize],
        n_heads: usize,
        inverse: bool,
    ) -> Result<()> {
        let _timer = crate::profile::scope(crate::profile::Op::Rope);
        let hd = self.head_dim;
        let half = hd / 2;
        if x.ncols() != n_heads * hd || positions.len() != x.nrows() {
            return Err(LmError::shape(
                "RoPE input (rows, n_heads·head_dim) and positions",
                format!("{} positions, {} columns", x.nrows(), n_heads * hd),
                format!("{} positions, {} columns", positions.len(), x.ncols()),
            ));
        }
        let table_len = self.cos.nrows();
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p < self.first_position || p - self.first_position >= table_len)
        {
            return Err(LmError::invalid(
                "position",
                p,
                format!(
                    "outside the RoPE table {}..{}",
                    self.first_position,
                    self.first_position + table_len
                ),
            ));
        }
        let sign = if inverse { -1.0f32 } else { 1.0 };
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(positions.par_iter())
            .for_each(|(mut row, &p)| {
                let cos = self.cos.row(p - self.first_position);
                let sin = self.sin.row(p - self.first_position);
                for h in 0..n_heads {
                    let mut head = row.slice_mut(s![h * hd..(h + 1) * hd]);
                    for i in 0..half {
                        let (c, sn) = (cos[i], sign * sin[i]);
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c - b * sn;
                        head[i + half] = b * c + a * sn;
                    }
                }
            });
        Ok(())
    }
}

pub mod factors;
#[cfg(test)]
mod tests;
