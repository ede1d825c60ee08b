//! The linear modules of the decoder, addressed by Hugging Face module path.
//!
//! Every projection (`q/k/v/o_proj`, `gate/up/down_proj`, `lm_head`) is a [`LinearModule`].
//! The enum is the extension point for adapters and quantized bases: a variant wraps its
//! state, `forward` may remember what its `backward` needs, and `backward` returns the input
//! gradient and accumulates the gradients of whatever the variant trains.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, CowArray, Ix2};

use crate::error::{LmError, Result};
use crate::param::{ParamMut, Parameter};

/// `y = x·Wᵀ` with a dense `f32` weight `W` of shape `(out_features, in_features)` (PyTorch layout).
///
/// ```
/// use lm::{DenseLinear, LinearModule};
/// use ndarray::{array, Array2};
/// let mut linear = LinearModule::Dense(DenseLinear::new(array![[1.0f32, 2.0], [0.0, 1.0], [1.0, 0.0]]));
/// let x = array![[1.0f32, 1.0]];
/// let mut y = Array2::zeros((1, 3));
/// linear.forward(x.view(), y.view_mut(), false).unwrap();
/// assert_eq!(y, array![[3.0, 1.0, 1.0]]);
/// // Backward: dx = dy·W; dW += dyᵀ·x once the weight trains.
/// linear.set_base_trainable(true);
/// let mut dx = Array2::zeros((1, 2));
/// linear.backward(x.view(), array![[1.0f32, 0.0, 0.0]].view(), dx.view_mut(), false).unwrap();
/// assert_eq!(dx, array![[1.0, 2.0]]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLinear {
    weight: Parameter<Ix2>,
}

impl DenseLinear {
    /// A frozen dense layer with `weight` of shape `(out_features, in_features)`.
    pub fn new(weight: Array2<f32>) -> Self {
        DenseLinear {
            weight: Parameter::new(weight),
        }
    }

    pub fn weight(&self) -> &Parameter<Ix2> {
        &self.weight
    }

    pub fn weight_mut(&mut self) -> &mut Parameter<Ix2> {
        &mut self.weight
    }
}

/// One linear projection of the model; see the module docs for how variants are added.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearModule {
    /// A plain `f32` weight.
    Dense(DenseLinear),
}

impl LinearModule {
    pub fn in_features(&self) -> usize {
        match self {
            LinearModule::Dense(d) => d.weight.value().ncols(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            LinearModule::Dense(d) => d.weight.value().nrows(),
        }
    }

    /// `out ← x·Wᵀ` (or `out += x·Wᵀ` with `accumulate`), `x: (rows, in)`, `out: (rows, out)`;
    /// `out` may be a strided view (a column block of a fused buffer).
    pub fn forward(
        &mut self,
        x: ArrayView2<'_, f32>,
        out: ArrayViewMut2<'_, f32>,
        accumulate: bool,
    ) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        match self {
            LinearModule::Dense(d) => {
                quant_core::linalg::gemm(1.0, x, d.weight.value().t(), beta, out)?;
            }
        }
        Ok(())
    }

    /// Given the forward input `x` and `∂L/∂y`, writes (or adds, with `accumulate_input`)
    /// `∂L/∂x = ∂L/∂y·W` into `grad_input` and adds `∂L/∂W = (∂L/∂y)ᵀ·x` to the weight's
    /// gradient when the weight trains (nothing is computed for a frozen weight).
    pub fn backward(
        &mut self,
        x: ArrayView2<'_, f32>,
        grad_output: ArrayView2<'_, f32>,
        grad_input: ArrayViewMut2<'_, f32>,
        accumulate_input: bool,
    ) -> Result<()> {
        let beta = if accumulate_input { 1.0 } else { 0.0 };
        match self {
            LinearModule::Dense(d) => {
                if grad_output.nrows() != x.nrows() {
                    return Err(LmError::shape(
                        "linear backward: rows of grad_output vs input",
                        x.nrows(),
                        grad_output.nrows(),
                    ));
                }
                quant_core::linalg::gemm(
                    1.0,
                    grad_output,
                    d.weight.value().view(),
                    beta,
                    grad_input,
                )?;
                if let Some(gw) = d.weight.grad_mut() {
                    quant_core::linalg::gemm(1.0, grad_output.t(), x, 1.0, gw.view_mut())?;
                }
            }
        }
        Ok(())
    }

    /// Makes the base weight trainable (allocating its gradient) or frozen (dropping it).
    pub fn set_base_trainable(&mut self, trainable: bool) {
        match self {
            LinearModule::Dense(d) => d.weight.set_trainable(trainable),
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            LinearModule::Dense(d) => d.weight.zero_grad(),
        }
    }

    /// The weight as a dense `f32` `(out, in)` matrix, for saving in Hugging Face layout
    /// (borrowed for dense weights; variants with quantized bases will dequantize).
    pub fn base_weight(&self) -> CowArray<'_, f32, Ix2> {
        match self {
            LinearModule::Dense(d) => CowArray::from(d.weight.value().view()),
        }
    }

    /// Calls `f` for every tensor of the module under `{path}.<tensor name>` (HF names).
    pub fn visit_parameters(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, ParamMut<'_>) -> Result<()>,
    ) -> Result<()> {
        match self {
            LinearModule::Dense(d) => {
                let name = format!("{path}.weight");
                let p = d.weight.as_param_mut(&name)?;
                f(&name, p)
            }
        }
    }

    pub(crate) fn check_grads_finite(&self, path: &str) -> Result<()> {
        match self {
            LinearModule::Dense(d) => d.weight.check_grad_finite(&format!("{path}.weight")),
        }
    }
}
