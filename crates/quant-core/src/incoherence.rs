//! Incoherence processing around any differentiable quantizer: quantize `Q·W·Rᵀ` instead of
//! `W`, where `R` (input dimension) and optionally `Q` (output dimension) are seeded Hadamard
//! rotations ([`HadamardRotation`]).
//!
//! Rotations spread the energy of a few outlier columns (or rows) over all of them, so a
//! uniform grid fitted to the rotated weights wastes far fewer levels on outliers. The
//! wrapper rotates the dequantized weights back, so the layer keeps computing `x·Ŵᵀ` in the
//! original basis and needs no change; only the quantization error changes.

use ndarray::{Array2, ArrayView2};

use crate::error::{QuantError, Result};
use crate::hadamard::{check_finite_matrix, HadamardRotation};
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};

/// Mixed into the caller's seed for the output rotation so `R` and `Q` draw different signs
/// even when the two dimensions are equal (the 64-bit golden-ratio constant of SplitMix64).
const OUTPUT_SEED_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// A [`DifferentiableQuantizer`] that quantizes `W' = Q·W·Rᵀ` with an inner quantizer and
/// returns `Ŵ = Qᵀ·Ŵ'·R`, with `W` of shape `(out, in)`, `R` a rotation of `Rⁱⁿ` and `Q`
/// (optional, identity when absent) a rotation of `Rᵒᵘᵗ`.
///
/// * **forward**: `Ŵ' = inner.forward(Q·W·Rᵀ)`, `Ŵ = Qᵀ·Ŵ'·R`. The returned **codes are
///   those of the inner quantizer, in the rotated basis**: dequantizing them with the inner
///   quantizer's parameters gives `Ŵ'`, and [`Self::unrotate_weight`] turns that into `Ŵ`.
/// * **backward**: since `Ŵ = Qᵀ·Ŵ'·R` is linear, `∂L/∂Ŵ' = Q·(∂L/∂Ŵ)·Rᵀ`; the inner backward
///   turns that into `∂L/∂W'` and `∂L/∂θ`, and since `W' = Q·W·Rᵀ`,
///   `∂L/∂W = Qᵀ·(∂L/∂W')·R`. Parameter gradients pass through unchanged.
/// * **params / bits** are the inner quantizer's (the rotations are fixed, not learned).
///
/// ```
/// use ndarray::{array, Array2, ArrayView2};
/// use quant_core::error::Result;
/// use quant_core::incoherence::IncoherentQuantizer;
/// use quant_core::quantizer::{
///     DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput,
/// };
///
/// // A stand-in inner quantizer that rounds to multiples of 0.5 with a straight-through
/// // gradient (the real ones live in the uniform / codebook modules).
/// #[derive(Debug, Clone)]
/// struct HalfStep;
/// impl DifferentiableQuantizer for HalfStep {
///     fn bits(&self) -> u32 { 8 }
///     fn init_from_weights(&mut self, _: ArrayView2<'_, f32>, _: InitMethod) -> Result<()> { Ok(()) }
///     fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
///         let dequantized = w.mapv(|v| (v * 2.0).round() / 2.0);
///         let codes = dequantized.mapv(|v| (v * 2.0 + 128.0).clamp(0.0, 255.0) as u8);
///         Ok(QuantizerOutput { codes, dequantized })
///     }
///     fn backward(&mut self, g: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
///         Ok(QuantizerGrads { input: g.to_owned(), params: Vec::new() })
///     }
///     fn params(&self) -> &[f32] { &[] }
///     fn params_mut(&mut self) -> &mut [f32] { &mut [] }
/// }
///
/// let mut quantizer = IncoherentQuantizer::with_seed(Box::new(HalfStep), 3, Some(2), 42).unwrap();
/// let w = array![[1.0f32, -2.0, 0.25], [0.0, 3.0, -1.5]]; // (out=2, in=3)
/// let out = quantizer.forward(w.view()).unwrap();
/// assert_eq!(out.dequantized.dim(), (2, 3));
/// // Rotating, rounding to a 0.5 grid and rotating back moves each weight by at most
/// // ‖rounding error‖₂ ≤ 0.25·√6.
/// let error: f32 = (&out.dequantized - &w).iter().map(|d| d * d).sum::<f32>().sqrt();
/// assert!(error <= 0.25 * 6f32.sqrt() + 1e-5);
/// // With a straight-through inner quantizer the rotations cancel in the backward pass.
/// let g = array![[1.0f32, 0.0, 0.0], [0.0, 0.0, 1.0]];
/// let grads = quantizer.backward(g.view()).unwrap();
/// assert!((&grads.input - &g).iter().all(|d| d.abs() < 1e-5));
/// ```
#[derive(Debug, Clone)]
pub struct IncoherentQuantizer {
    inner: Box<dyn DifferentiableQuantizer>,
    input_rotation: HadamardRotation,
    output_rotation: Option<HadamardRotation>,
    /// Shape of the last forward input, which backward's gradient must match.
    last_shape: Option<(usize, usize)>,
}

impl IncoherentQuantizer {
    /// Wraps `inner` with the given rotations: `input_rotation` acts on the `in` dimension
    /// (columns of `W`), `output_rotation`, if any, on the `out` dimension (rows).
    pub fn new(
        inner: Box<dyn DifferentiableQuantizer>,
        input_rotation: HadamardRotation,
        output_rotation: Option<HadamardRotation>,
    ) -> Self {
        Self {
            inner,
            input_rotation,
            output_rotation,
            last_shape: None,
        }
    }

    /// Wraps `inner` with `R = HadamardRotation::new(in_features, seed)` and, when
    /// `out_features` is given, `Q = HadamardRotation::new(out, seed ^ 0x9E3779B97F4A7C15)`.
    ///
    /// # Errors
    /// [`QuantError::InvalidParameter`] when a dimension is 0.
    pub fn with_seed(
        inner: Box<dyn DifferentiableQuantizer>,
        in_features: usize,
        out_features: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        let input_rotation = HadamardRotation::new(in_features, seed)?;
        let output_rotation = out_features
            .map(|out| HadamardRotation::new(out, seed ^ OUTPUT_SEED_MIX))
            .transpose()?;
        Ok(Self::new(inner, input_rotation, output_rotation))
    }

    /// The wrapped quantizer.
    pub fn inner(&self) -> &dyn DifferentiableQuantizer {
        self.inner.as_ref()
    }

    /// The wrapped quantizer, mutably.
    pub fn inner_mut(&mut self) -> &mut dyn DifferentiableQuantizer {
        self.inner.as_mut()
    }

    /// Unwraps the inner quantizer.
    pub fn into_inner(self) -> Box<dyn DifferentiableQuantizer> {
        self.inner
    }

    /// `R`, acting on the input dimension.
    pub fn input_rotation(&self) -> &HadamardRotation {
        &self.input_rotation
    }

    /// `Q`, acting on the output dimension, if any.
    pub fn output_rotation(&self) -> Option<&HadamardRotation> {
        self.output_rotation.as_ref()
    }

    fn check_weight(&self, context: &str, w: ArrayView2<'_, f32>) -> Result<()> {
        let (rows, cols) = w.dim();
        let expected_rows = self.output_rotation.as_ref().map(HadamardRotation::dim);
        let rows_ok = expected_rows.is_none_or(|r| r == rows);
        if cols != self.input_rotation.dim() || !rows_ok {
            let expected = match expected_rows {
                Some(r) => format!("({r}, {})", self.input_rotation.dim()),
                None => format!("(any, {})", self.input_rotation.dim()),
            };
            return Err(QuantError::shape(
                context,
                expected,
                format!("({rows}, {cols})"),
            ));
        }
        check_finite_matrix(context, w)
    }

    /// `Q·W·Rᵀ` (just `W·Rᵀ` without an output rotation): the weights the inner quantizer sees.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when `w` does not have `in` columns (and `out` rows when
    /// there is an output rotation); [`QuantError::NonFinite`] naming the first bad element.
    pub fn rotate_weight(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.check_weight("IncoherentQuantizer::rotate_weight", w)?;
        Ok(self.rotate_checked(w))
    }

    /// `Qᵀ·W'·R`: the inverse of [`Self::rotate_weight`], back to the original basis.
    ///
    /// # Errors
    /// As [`Self::rotate_weight`].
    pub fn unrotate_weight(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.check_weight("IncoherentQuantizer::unrotate_weight", w)?;
        Ok(self.unrotate_checked(w))
    }

    /// [`Self::rotate_weight`] after the shape and finiteness checks passed, so the rotations
    /// cannot fail.
    fn rotate_checked(&self, w: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut out = w.as_standard_layout().into_owned();
        self.input_rotation
            .apply_rows(out.view_mut())
            .expect("shape and finiteness were checked");
        match &self.output_rotation {
            Some(q) => q
                .rotate_output(out.view())
                .expect("shape and finiteness were checked"),
            None => out,
        }
    }

    fn unrotate_checked(&self, w: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut out = match &self.output_rotation {
            Some(q) => q
                .unrotate_output(w)
                .expect("shape and finiteness were checked"),
            None => w.as_standard_layout().into_owned(),
        };
        self.input_rotation
            .apply_inverse_rows(out.view_mut())
            .expect("shape and finiteness were checked");
        out
    }
}

impl DifferentiableQuantizer for IncoherentQuantizer {
    fn bits(&self) -> u32 {
        self.inner.bits()
    }

    /// Initialises the inner quantizer from the rotated weights `Q·W·Rᵀ`.
    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        self.check_weight("IncoherentQuantizer::init_from_weights w", w)?;
        let rotated = self.rotate_checked(w);
        self.inner.init_from_weights(rotated.view(), method)
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        self.check_weight("IncoherentQuantizer::forward w", w)?;
        let rotated = self.rotate_checked(w);
        let inner_out = self.inner.forward(rotated.view())?;
        if inner_out.dequantized.dim() != w.dim() {
            return Err(QuantError::shape(
                "IncoherentQuantizer::forward (inner quantizer's dequantized output)",
                format!("{:?}", w.dim()),
                format!("{:?}", inner_out.dequantized.dim()),
            ));
        }
        // The inner output is finite for finite input with any sane quantizer, but a learned
        // step that went to 0 or NaN would not be: report it as the inner output's fault.
        self.check_weight(
            "IncoherentQuantizer::forward (inner quantizer's dequantized output)",
            inner_out.dequantized.view(),
        )?;
        let dequantized = self.unrotate_checked(inner_out.dequantized.view());
        self.last_shape = Some(w.dim());
        Ok(QuantizerOutput {
            codes: inner_out.codes,
            dequantized,
        })
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let Some(shape) = self.last_shape else {
            return Err(QuantError::invalid(
                "IncoherentQuantizer::backward call",
                "before any forward",
                "backward needs the forward pass it differentiates",
            ));
        };
        if grad_output.dim() != shape {
            return Err(QuantError::shape(
                "IncoherentQuantizer::backward grad_output (shape of the last forward input)",
                format!("{shape:?}"),
                format!("{:?}", grad_output.dim()),
            ));
        }
        self.check_weight("IncoherentQuantizer::backward grad_output", grad_output)?;
        // Ŵ = Qᵀ·Ŵ'·R  ⇒  ∂L/∂Ŵ' = Q·(∂L/∂Ŵ)·Rᵀ, the same map as the forward rotation.
        let rotated_grad = self.rotate_checked(grad_output);
        let inner_grads = self.inner.backward(rotated_grad.view())?;
        if inner_grads.input.dim() != shape {
            return Err(QuantError::shape(
                "IncoherentQuantizer::backward (inner quantizer's input gradient)",
                format!("{shape:?}"),
                format!("{:?}", inner_grads.input.dim()),
            ));
        }
        self.check_weight(
            "IncoherentQuantizer::backward (inner quantizer's input gradient)",
            inner_grads.input.view(),
        )?;
        // W' = Q·W·Rᵀ  ⇒  ∂L/∂W = Qᵀ·(∂L/∂W')·R.
        let input = self.unrotate_checked(inner_grads.input.view());
        Ok(QuantizerGrads {
            input,
            params: inner_grads.params,
        })
    }

    fn params(&self) -> &[f32] {
        self.inner.params()
    }

    fn params_mut(&mut self) -> &mut [f32] {
        self.inner.params_mut()
    }
}
