//! Straight-through estimators: how `∂L/∂v̂` becomes `∂L/∂v` through a rounding step.
//!
//! Rounding has zero derivative almost everywhere, so quantization-aware training replaces it
//! in the backward pass by an estimator. Every estimator here is written on a [`GridPoint`]:
//! the continuous value `x`, its quantized value `x_q`, the clamp range `[lower, upper]` and
//! the local grid step, **all in the grid's own units**. For a uniform grid with step `s` and
//! zero point `z` that is `x = v/s`, `x_q = q − z`, `[lower, upper] = [qmin − z, qmax − z]`,
//! step 1; for a codebook grid with scale `a` it is `x = w/a`, `x_q` = the code value,
//! `[−1, 1]`, and the step is the gap between the two code values around `x`. Because
//! `v̂ = s·x_q(v/s)`, the chain rule factors `s` and `1/s` cancel and `∂L/∂v` is the
//! estimator's `∂x_q/∂x` times `∂L/∂v̂`.
//!
//! | [`Ste`] | `∂L/∂v` for `g = ∂L/∂v̂` | source |
//! |---|---|---|
//! | `Standard` | `g` everywhere, also where the value is clamped | Bengio et al. 2013 |
//! | `Clipped { clip }` | `g` where `clip·lower ≤ x ≤ clip·upper`, else 0 | saturated STE, Hubara et al. 2016 (`clip = 1` is theirs) |
//! | `Lsq` | `g` where `lower ≤ x ≤ upper`, else 0 | Esser et al. 2019 |
//! | `Ewgs { delta }` | `g·(1 + δ·sign(g)·(x − x_q)/step)` where `lower ≤ x ≤ upper`, else 0 | Lee et al. 2021 |
//!
//! The bounds are inclusive, as the gradient of `torch.clamp` is. `sign(0) = 0`.
//!
//! The learned step gets LSQ's derivative `∂v̂/∂s` ([`lsq_step_derivative`]): `x_q − x`
//! inside the clamp range (rounding passed straight through), `lower` / `upper` at the
//! clamps. With [`Ste::Lsq`] the summed step gradient is multiplied by LSQ's gradient scale
//! `1/√(N·Qp)` ([`lsq_grad_scale`]), `N` being the number of values sharing the step and `Qp`
//! the number of positive levels; the other estimators leave it unscaled (their papers define
//! no step gradient of their own).
//!
//! ```
//! use quant_core::ste::{GridPoint, Ste};
//!
//! // A value 0.3 steps above its level, inside the grid [-4, 3].
//! let at = GridPoint { value: 2.3, quantized: 2.0, lower: -4.0, upper: 3.0, step: 1.0 };
//! assert_eq!(Ste::Standard.input_grad(1.0, at), 1.0);
//! assert_eq!(Ste::Lsq.input_grad(1.0, at), 1.0);
//! // EWGS scales the gradient up when it pushes the value further from its level.
//! assert!((Ste::Ewgs { delta: 0.5 }.input_grad(1.0, at) - 1.15).abs() < 1e-6);
//! // Clipped at 0.5 of the range: 2.3 > 0.5·3, so nothing passes.
//! assert_eq!(Ste::Clipped { clip: 0.5 }.input_grad(1.0, at), 0.0);
//! ```

use crate::error::{check_bits, check_finite, check_non_empty, QuantError, Result};
use crate::rounding::round_half_even;

/// A straight-through estimator (see the [module docs](self) for the formulas).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ste {
    /// Identity gradient everywhere.
    Standard,
    /// Identity inside `clip` times the representable range, zero outside.
    Clipped {
        /// Fraction of the representable range (> 0) inside which the gradient passes.
        clip: f32,
    },
    /// Learned Step Size Quantization: identity inside the clamp range, zero outside, and the
    /// step gradient scaled by `1/√(N·Qp)`.
    Lsq,
    /// Element-wise gradient scaling.
    Ewgs {
        /// Scaling strength δ ≥ 0 (δ = 0 is the LSQ weight gradient).
        delta: f32,
    },
}

/// Where one value sits on a quantization grid, in the grid's own units (see module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridPoint {
    /// The continuous value `x`, before clamping.
    pub value: f32,
    /// Its quantized value `x_q` (clamped and rounded).
    pub quantized: f32,
    /// Lowest representable value.
    pub lower: f32,
    /// Highest representable value.
    pub upper: f32,
    /// Local spacing of the grid around `value` (1 for a uniform grid in step units).
    pub step: f32,
}

/// `sign` with `sign(0) = 0` (unlike `f32::signum`).
#[inline]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Ste {
    /// Errors if a parameter is out of range: `clip` must be finite and > 0, `delta` finite
    /// and ≥ 0. The error names the field (`ste.clip`, `ste.delta`).
    ///
    /// ```
    /// use quant_core::ste::Ste;
    /// assert!(Ste::Clipped { clip: 1.0 }.validate().is_ok());
    /// let err = Ste::Ewgs { delta: -0.1 }.validate().unwrap_err();
    /// assert!(err.to_string().contains("ste.delta"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Ste::Clipped { clip } if !(clip.is_finite() && clip > 0.0) => Err(QuantError::invalid(
                "ste.clip",
                clip,
                "must be finite and greater than 0",
            )),
            Ste::Ewgs { delta } if !(delta.is_finite() && delta >= 0.0) => Err(
                QuantError::invalid("ste.delta", delta, "must be finite and at least 0"),
            ),
            _ => Ok(()),
        }
    }

    /// `∂L/∂x` for one value given `grad = ∂L/∂x_q` (equal to `∂L/∂v` given `∂L/∂v̂`).
    #[inline]
    pub fn input_grad(&self, grad: f32, at: GridPoint) -> f32 {
        let inside = at.lower <= at.value && at.value <= at.upper;
        match *self {
            Ste::Standard => grad,
            Ste::Clipped { clip } => {
                if clip * at.lower <= at.value && at.value <= clip * at.upper {
                    grad
                } else {
                    0.0
                }
            }
            Ste::Lsq => {
                if inside {
                    grad
                } else {
                    0.0
                }
            }
            Ste::Ewgs { delta } => {
                if inside {
                    grad * (1.0 + delta * sign(grad) * (at.value - at.quantized) / at.step)
                } else {
                    0.0
                }
            }
        }
    }

    /// True for [`Ste::Lsq`], the one estimator whose step gradient is rescaled.
    pub fn scales_step_grad(&self) -> bool {
        matches!(self, Ste::Lsq)
    }
}

/// LSQ's `∂v̂/∂s` for one value, in step units: `quantized − value` inside
/// `[lower, upper]`, `lower` below it and `upper` above it.
///
/// ```
/// use quant_core::ste::lsq_step_derivative;
/// assert!((lsq_step_derivative(1.2, 1.0, -4.0, 3.0) + 0.2).abs() < 1e-6);
/// assert_eq!(lsq_step_derivative(-7.5, -4.0, -4.0, 3.0), -4.0);
/// assert_eq!(lsq_step_derivative(9.0, 3.0, -4.0, 3.0), 3.0);
/// ```
#[inline]
pub fn lsq_step_derivative(value: f32, quantized: f32, lower: f32, upper: f32) -> f32 {
    if value < lower {
        lower
    } else if value > upper {
        upper
    } else {
        quantized - value
    }
}

/// LSQ's step-gradient scale `1/√(N·Qp)` for `N` values sharing a step and `Qp` positive
/// levels (a zero `N·Qp` gives scale 1 rather than infinity).
///
/// ```
/// use quant_core::ste::lsq_grad_scale;
/// assert_eq!(lsq_grad_scale(4, 1.0), 0.5);
/// ```
#[inline]
pub fn lsq_grad_scale(n: usize, qp: f32) -> f32 {
    let denom = n as f64 * f64::from(qp);
    if denom > 0.0 {
        (1.0 / denom.sqrt()) as f32
    } else {
        1.0
    }
}

/// Result of [`lsq`].
#[derive(Debug, Clone, PartialEq)]
pub struct LsqResult {
    /// `v̂ = round(clamp(v/s, −Qn, Qp))·s`.
    pub dequantized: Vec<f32>,
    /// `∂L/∂v`.
    pub grad_input: Vec<f32>,
    /// `∂L/∂s`, already multiplied by `1/√(n·Qp)`.
    pub grad_step: f32,
}

/// LSQ forward and backward of a signed `bits`-bit grid with one step `s` for all of `v`
/// (Esser et al. 2019): `Qn = 2^(b−1)`, `Qp = 2^(b−1) − 1`, round half to even.
///
/// Errors on an empty or non-finite `v` / `grad_output`, mismatched lengths, bits outside
/// 2..=8, or a step that is not finite and positive.
///
/// ```
/// use quant_core::ste::lsq;
/// // 2 bits: levels -2..=1 steps. 0.26/0.1 = 2.6 is clamped to Qp = 1.
/// let r = lsq(&[0.04, 0.26], &[1.0, 1.0], 0.1, 2).unwrap();
/// assert_eq!(r.dequantized, vec![0.0, 0.1]);
/// assert_eq!(r.grad_input, vec![1.0, 0.0]);
/// // ((0 − 0.4) + 1) / √(2·1)
/// assert!((r.grad_step - 0.6 / 2f32.sqrt()).abs() < 1e-6);
/// ```
pub fn lsq(v: &[f32], grad_output: &[f32], step: f32, bits: u32) -> Result<LsqResult> {
    check_bits("lsq", bits, 2, 8)?;
    check_non_empty("lsq input", v.len())?;
    check_finite("lsq input", v)?;
    check_finite("lsq grad_output", grad_output)?;
    if grad_output.len() != v.len() {
        return Err(QuantError::shape(
            "lsq grad_output",
            v.len(),
            grad_output.len(),
        ));
    }
    if !(step.is_finite() && step > 0.0) {
        return Err(QuantError::invalid(
            "lsq step",
            step,
            "must be finite and positive",
        ));
    }
    let qn = (1u32 << (bits - 1)) as f32;
    let qp = qn - 1.0;
    let mut dequantized = Vec::with_capacity(v.len());
    let mut grad_input = Vec::with_capacity(v.len());
    let mut step_sum = 0.0f64;
    for (&value, &g) in v.iter().zip(grad_output) {
        let x = value / step;
        let q = round_half_even(x.clamp(-qn, qp));
        dequantized.push(q * step);
        let at = GridPoint {
            value: x,
            quantized: q,
            lower: -qn,
            upper: qp,
            step: 1.0,
        };
        grad_input.push(Ste::Lsq.input_grad(g, at));
        step_sum += f64::from(g) * f64::from(lsq_step_derivative(x, q, -qn, qp));
    }
    let grad_step = (step_sum * f64::from(lsq_grad_scale(v.len(), qp))) as f32;
    Ok(LsqResult {
        dequantized,
        grad_input,
        grad_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(value: f32, quantized: f32) -> GridPoint {
        GridPoint {
            value,
            quantized,
            lower: -4.0,
            upper: 3.0,
            step: 1.0,
        }
    }

    #[test]
    fn standard_passes_everything() {
        for v in [-10.0, -4.0, 0.2, 3.0, 9.0] {
            let q = round_half_even(v).clamp(-4.0, 3.0);
            assert_eq!(Ste::Standard.input_grad(-0.7, point(v, q)), -0.7);
        }
    }

    #[test]
    fn lsq_blocks_clamped_values_with_inclusive_bounds() {
        assert_eq!(Ste::Lsq.input_grad(2.0, point(-4.0, -4.0)), 2.0);
        assert_eq!(Ste::Lsq.input_grad(2.0, point(3.0, 3.0)), 2.0);
        assert_eq!(Ste::Lsq.input_grad(2.0, point(3.01, 3.0)), 0.0);
        assert_eq!(Ste::Lsq.input_grad(2.0, point(-4.2, -4.0)), 0.0);
    }

    #[test]
    fn clipped_uses_a_fraction_of_the_range() {
        let ste = Ste::Clipped { clip: 0.5 };
        // Range [-4, 3] · 0.5 = [-2, 1.5].
        assert_eq!(ste.input_grad(1.0, point(-2.0, -2.0)), 1.0);
        assert_eq!(ste.input_grad(1.0, point(-2.1, -2.0)), 0.0);
        assert_eq!(ste.input_grad(1.0, point(1.5, 2.0)), 1.0);
        assert_eq!(ste.input_grad(1.0, point(1.6, 2.0)), 0.0);
        // clip > 1 passes some clamped values too.
        let wide = Ste::Clipped { clip: 2.0 };
        assert_eq!(wide.input_grad(1.0, point(5.0, 3.0)), 1.0);
        assert_eq!(wide.input_grad(1.0, point(6.5, 3.0)), 0.0);
    }

    #[test]
    fn ewgs_matches_its_formula_by_hand() {
        let ste = Ste::Ewgs { delta: 0.2 };
        // x − x_q = 0.4, g > 0: 3·(1 + 0.2·0.4) = 3.24.
        assert!((ste.input_grad(3.0, point(1.4, 1.0)) - 3.24).abs() < 1e-6);
        // g < 0 flips the sign of the correction: −3·(1 − 0.2·0.4) = −2.76.
        assert!((ste.input_grad(-3.0, point(1.4, 1.0)) + 2.76).abs() < 1e-6);
        // x − x_q = −0.3, g > 0: 1·(1 − 0.06).
        assert!((ste.input_grad(1.0, point(-0.3, 0.0)) - 0.94).abs() < 1e-6);
        // Units of the local step: a step of 0.5 doubles the correction.
        let mut at = point(1.4, 1.0);
        at.step = 0.5;
        assert!((ste.input_grad(3.0, at) - 3.48).abs() < 1e-6);
        // Zero outside the clamp range, and δ = 0 is the LSQ weight gradient.
        assert_eq!(ste.input_grad(3.0, point(3.7, 3.0)), 0.0);
        let plain = Ste::Ewgs { delta: 0.0 };
        assert_eq!(plain.input_grad(3.0, point(1.4, 1.0)), 3.0);
        assert_eq!(ste.input_grad(0.0, point(1.4, 1.0)), 0.0);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(Ste::Standard.validate().is_ok());
        assert!(Ste::Lsq.validate().is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let err = Ste::Clipped { clip: bad }.validate().unwrap_err();
            assert!(err.to_string().contains("ste.clip"), "{err}");
        }
        for bad in [-0.5, f32::NAN] {
            let err = Ste::Ewgs { delta: bad }.validate().unwrap_err();
            assert!(err.to_string().contains("ste.delta"), "{err}");
        }
    }

    #[test]
    fn serde_uses_snake_case_tags() {
        let json = serde_json::to_string(&Ste::Ewgs { delta: 0.25 }).unwrap();
        assert_eq!(json, r#"{"ewgs":{"delta":0.25}}"#);
        assert_eq!(serde_json::to_string(&Ste::Lsq).unwrap(), r#""lsq""#);
        let back: Ste = serde_json::from_str(r#"{"clipped":{"clip":1.5}}"#).unwrap();
        assert_eq!(back, Ste::Clipped { clip: 1.5 });
    }

    #[test]
    fn lsq_rejects_bad_input_with_its_location() {
        let err = lsq(&[0.1, f32::NAN], &[1.0, 1.0], 0.1, 4).unwrap_err();
        assert!(err.to_string().contains("index 1"), "{err}");
        assert!(lsq(&[0.1], &[1.0, 1.0], 0.1, 4).is_err());
        assert!(lsq(&[0.1], &[1.0], 0.0, 4).is_err());
        assert!(lsq(&[0.1], &[1.0], 0.1, 1).is_err());
        assert!(lsq(&[], &[], 0.1, 4).is_err());
    }
}
