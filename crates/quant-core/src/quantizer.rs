//! The differentiable quantizer interface: what LoRA-QAT layers call.
//!
//! A differentiable quantizer maps a weight matrix `w` (`(out, in)`) to integer codes and
//! their dequantized values `ŵ` in the forward pass, and in the backward pass turns `∂L/∂ŵ`
//! into `∂L/∂w` (through a straight-through estimator) and `∂L/∂θ` for its own learnable
//! step/scale parameters `θ` (LSQ). Implementations live beside their grids (uniform, Pi,
//! NF4-grid) and wrappers (Hadamard incoherence); the factory from a serde config builds them.

use ndarray::{Array2, ArrayView2};

use crate::error::Result;

/// What a forward pass produces.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizerOutput {
    /// Unsigned codes, one per weight, in `0..2^bits` (uniform: `q − qmin`; codebook: index).
    pub codes: Array2<u8>,
    /// The dequantized weights `ŵ` the layer computes with.
    pub dequantized: Array2<f32>,
}

/// What a backward pass produces.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizerGrads {
    /// `∂L/∂w`, same shape as the forward input.
    pub input: Array2<f32>,
    /// `∂L/∂θ` for each learnable parameter, in the order of [`DifferentiableQuantizer::params`]
    /// (empty when the quantizer learns nothing).
    pub params: Vec<f32>,
}

/// How a quantizer initialises its step/scale parameters from weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitMethod {
    /// The grid's extreme level lands on max |w| of each group.
    Absmax,
    /// The clip ratio that minimises the mean squared quantization error of each group.
    MseClipSearch,
}

/// Cloning behind `Box<dyn DifferentiableQuantizer>`: implemented for every quantizer that is
/// `Clone`, so an implementation only derives `Clone`. Layers holding a quantizer (and the
/// models holding those layers) can then be cloned, e.g. to keep a teacher copy.
pub trait QuantizerClone {
    /// A boxed copy of this quantizer, learned parameters and saved state included.
    fn clone_box(&self) -> Box<dyn DifferentiableQuantizer>;
}

impl<T: DifferentiableQuantizer + Clone + 'static> QuantizerClone for T {
    fn clone_box(&self) -> Box<dyn DifferentiableQuantizer> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn DifferentiableQuantizer> {
    fn clone(&self) -> Self {
        self.as_ref().clone_box()
    }
}

/// A quantizer with a forward pass that keeps what its backward pass needs.
pub trait DifferentiableQuantizer: QuantizerClone + Send + Sync + std::fmt::Debug {
    /// Bits per code.
    fn bits(&self) -> u32;

    /// Sets the learnable parameters from `w` (called once before training, or on calibration).
    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()>;

    /// Quantizes `w` with the current parameters; remembers what [`Self::backward`] needs.
    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput>;

    /// `∂L/∂ŵ` → (`∂L/∂w`, `∂L/∂θ`) for the last forward input.
    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads>;

    /// [`Self::forward`] without the codes, `ŵ` written into `out` (replaced by a fresh
    /// array when its shape differs from `w`'s or it is not row-major): a training layer
    /// that never reads the codes reuses one buffer across steps. Keeps what
    /// [`Self::backward`] needs exactly as `forward` does, and gives the same `ŵ` bit for bit.
    /// The default calls `forward`.
    fn forward_dequantized_into(
        &mut self,
        w: ArrayView2<'_, f32>,
        out: &mut Array2<f32>,
    ) -> Result<()> {
        *out = self.forward(w)?.dequantized;
        Ok(())
    }

    /// [`Self::forward_dequantized_into`] on an owned `w`, which the quantizer may keep as
    /// the input its backward reads instead of copying it (one weight-sized copy less per
    /// step); returns a buffer of `w`'s shape for the caller to reuse (the previous input, or
    /// `w` itself when the quantizer keeps a copy). Same `ŵ` bit for bit. The default copies.
    fn forward_dequantized_owned(
        &mut self,
        w: Array2<f32>,
        out: &mut Array2<f32>,
    ) -> Result<Array2<f32>> {
        self.forward_dequantized_into(w.view(), out)?;
        Ok(w)
    }

    /// [`Self::backward`] in place: `grad` holds `∂L/∂ŵ` on entry and `∂L/∂w` on return
    /// (replaced by a fresh array if the quantizer cannot write it in place); returns
    /// `∂L/∂θ`. Same numbers bit for bit. The default calls `backward`.
    fn backward_in_place(&mut self, grad: &mut Array2<f32>) -> Result<Vec<f32>> {
        let grads = self.backward(grad.view())?;
        *grad = grads.input;
        Ok(grads.params)
    }

    /// The learnable parameters θ (steps, scales, α), flattened.
    fn params(&self) -> &[f32];

    /// Mutable access for optimizers.
    fn params_mut(&mut self) -> &mut [f32];
}
