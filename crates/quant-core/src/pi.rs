//! The Pi quantizer: a uniform grid whose step is parameterised as `s = α·π/k`.
//!
//! Said plainly, this **is** the uniform grid of [`crate::uniform`] (symmetric, or asymmetric
//! with a zero point fixed at initialisation): codes `clamp(round(w/s) + z, qmin, qmax)`,
//! values `(q − z)·s`. The constant π carries no special meaning — any step can be written as
//! `α·π/k` for some α. What changes is only the learned parameter: α (one per tensor, channel
//! or block), not `s`. By the chain rule `∂L/∂α = (π/k)·∂L/∂s`, with `∂L/∂s` the LSQ step
//! gradient of the configured estimator. Because `α = s·k/π`, a gradient step on α moves `s` by
//! `(π/k)²` times what the same step on `s` directly would, so `k ∈ 2..=5` acts as a fixed
//! rescaling of the step's learning rate (k = 3 gives `(π/3)² ≈ 1.10`, nearly neutral).
//!
//! α is initialised from the weights so that `α·π/k` equals the absmax or MSE-optimal step of
//! each group; a tensor stored from a Pi quantizer is an ordinary
//! [`UniformQuantized`] with scale `α·π/k`.
//!
//! ```
//! use ndarray::array;
//! use quant_core::pi::PiQuantizer;
//! use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
//! use quant_core::ste::Ste;
//! use quant_core::uniform::Granularity;
//!
//! let w = array![[0.3f32, -0.6, 0.9, 0.1]];
//! let mut q = PiQuantizer::new(3, true, Granularity::PerTensor, Ste::Lsq, 3).unwrap();
//! q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
//! // Absmax step 0.9/3 = 0.3, so α = 0.3·3/π.
//! assert!((q.params()[0] - 0.9 / std::f32::consts::PI).abs() < 1e-6);
//! let out = q.forward(w.view()).unwrap();
//! assert!((out.dequantized[[0, 1]] + 0.6).abs() < 1e-6);
//! ```

use std::f32::consts::PI;

use ndarray::ArrayView2;

use crate::error::{QuantError, Result};
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};
use crate::ste::Ste;
use crate::uniform::{ClipSearch, Granularity, UniformQuantized, UniformQuantizer};

/// Smallest divisor `k`.
pub const MIN_K: u32 = 2;
/// Largest divisor `k`.
pub const MAX_K: u32 = 5;

/// Errors unless `k ∈ 2..=5`, naming `pi_k`.
///
/// ```
/// assert!(quant_core::pi::check_k(3).is_ok());
/// assert!(quant_core::pi::check_k(6).unwrap_err().to_string().contains("pi_k"));
/// ```
pub fn check_k(k: u32) -> Result<()> {
    if (MIN_K..=MAX_K).contains(&k) {
        Ok(())
    } else {
        Err(QuantError::invalid(
            "pi_k",
            k,
            format!("the Pi step divisor must be in {MIN_K}..={MAX_K}"),
        ))
    }
}

/// The step `α·π/k`.
///
/// ```
/// use quant_core::pi::pi_step;
/// assert!((pi_step(1.0, 2) - std::f32::consts::FRAC_PI_2).abs() < 1e-7);
/// ```
#[inline]
pub fn pi_step(alpha: f32, k: u32) -> f32 {
    alpha * PI / k as f32
}

/// The α whose step is `step`: `step·k/π`.
#[inline]
pub fn alpha_for_step(step: f32, k: u32) -> f32 {
    step * k as f32 / PI
}

/// A uniform quantizer whose learned parameters are α (see the [module docs](self)).
///
/// [`DifferentiableQuantizer::params`] holds one α per group in the order of
/// [`crate::uniform::GroupLayout`]; any granularity works (per-tensor or per-channel are the
/// usual ones).
#[derive(Debug, Clone)]
pub struct PiQuantizer {
    inner: UniformQuantizer,
    k: u32,
    alphas: Vec<f32>,
}

impl PiQuantizer {
    /// A quantizer awaiting [`DifferentiableQuantizer::init_from_weights`].
    pub fn new(
        bits: u32,
        symmetric: bool,
        granularity: Granularity,
        ste: Ste,
        k: u32,
    ) -> Result<Self> {
        check_k(k)?;
        Ok(PiQuantizer {
            inner: UniformQuantizer::new(bits, symmetric, granularity, ste)?,
            k,
            alphas: Vec::new(),
        })
    }

    /// Uses `search` for [`InitMethod::MseClipSearch`].
    pub fn with_clip_search(mut self, search: ClipSearch) -> Result<Self> {
        self.inner = self.inner.with_clip_search(search)?;
        Ok(self)
    }

    /// The divisor `k`.
    pub fn k(&self) -> u32 {
        self.k
    }

    /// The zero points fixed at initialisation (all 0 when symmetric), one per group.
    pub fn zero_points(&self) -> &[f32] {
        self.inner.zero_points()
    }

    /// The current steps `α·π/k`, one per group.
    pub fn steps(&self) -> Vec<f32> {
        self.alphas.iter().map(|&a| pi_step(a, self.k)).collect()
    }

    /// Copies `α·π/k` into the inner quantizer after checking every α.
    fn sync_steps(&mut self) -> Result<()> {
        if let Some(i) = self
            .alphas
            .iter()
            .position(|a| !(a.is_finite() && *a > 0.0))
        {
            return Err(QuantError::invalid(
                format!("alpha[{i}]"),
                self.alphas[i],
                "must be finite and positive (an optimizer update may have pushed it there)",
            ));
        }
        let k = self.k;
        for (step, &alpha) in self.inner.params_mut().iter_mut().zip(&self.alphas) {
            *step = pi_step(alpha, k);
        }
        Ok(())
    }

    /// Quantizes `w` with the current α into the stored form (scale = `α·π/k`).
    pub fn export(&mut self, w: ArrayView2<'_, f32>) -> Result<UniformQuantized> {
        self.sync_steps()?;
        self.inner.export(w)
    }
}

impl DifferentiableQuantizer for PiQuantizer {
    fn bits(&self) -> u32 {
        self.inner.bits()
    }

    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        self.inner.init_from_weights(w, method)?;
        self.alphas = self
            .inner
            .params()
            .iter()
            .map(|&s| alpha_for_step(s, self.k))
            .collect();
        self.sync_steps()
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        self.sync_steps()?;
        self.inner.forward(w)
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let mut grads = self.inner.backward(grad_output)?;
        let ds_dalpha = PI / self.k as f32;
        for g in &mut grads.params {
            *g *= ds_dalpha;
        }
        Ok(grads)
    }

    fn params(&self) -> &[f32] {
        &self.alphas
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.alphas
    }
}
