//! The frozen base product of an adapted layer, behind [`FrozenBase`].
//!
//! [`crate::LoraLinear`] is generic over its base so that the same adapter math serves every
//! base representation: [`DenseBase`] holds `W` in `f32`; a QLoRA base (NF4 codes with
//! double-quantized scales) or a LoRA-QAT base (a weight seen through a fake quantizer)
//! implements the same trait with its own product and dequantization.

use std::borrow::Cow;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2};
use quant_core::linalg::{gemm_in, ComputeDtype};

use crate::error::{check_finite, LoraError, Result};

/// A frozen linear map `x ↦ x·Wᵀ` with `W: (out, in)` and an optional frozen bias.
pub trait FrozenBase {
    /// Rows of `W`.
    fn out_features(&self) -> usize;
    /// Columns of `W`.
    fn in_features(&self) -> usize;
    /// `y ← x·Wᵀ` (bias excluded) for `x: (tokens, in)`, `y: (tokens, out)`.
    fn matmul_into(&self, x: ArrayView2<'_, f32>, y: ArrayViewMut2<'_, f32>) -> Result<()>;
    /// `dx ← dy·W + beta·dx` for `dy: (tokens, out)`, `dx: (tokens, in)`.
    fn matmul_transposed_into(
        &self,
        dy: ArrayView2<'_, f32>,
        beta: f32,
        dx: ArrayViewMut2<'_, f32>,
    ) -> Result<()>;
    /// `W` as `f32` (dequantized if the base is stored otherwise), for DoRA's row norms and
    /// for initialisations that read `W`.
    fn dense_weight(&self) -> Result<Cow<'_, Array2<f32>>>;
    /// `W` for in-place edits (merge, PiSSA's residual). A base that cannot be edited in `f32`
    /// returns an error naming why.
    fn weight_mut(&mut self) -> Result<&mut Array2<f32>>;
    /// The frozen bias, if any.
    fn bias(&self) -> Option<ArrayView1<'_, f32>>;
    /// Number of frozen parameters (weight and bias elements).
    fn parameter_count(&self) -> usize;
    /// Bytes the base occupies in memory.
    fn storage_bytes(&self) -> usize;
    /// A short name of the storage (`"f32"`, `"nf4"`, ...), used in summaries.
    fn storage_kind(&self) -> &'static str;
    /// The precision of the products' operands (sums are `f32` either way); a quantized
    /// base decodes its tile to `f32` and then rounds it like a dense one.
    fn compute_dtype(&self) -> ComputeDtype;
    /// Sets the precision of [`FrozenBase::matmul_into`] and
    /// [`FrozenBase::matmul_transposed_into`].
    fn set_compute_dtype(&mut self, dtype: ComputeDtype);
}

/// A dense `f32` base weight `(out, in)` and optional bias `(out)`.
///
/// ```
/// use lora_core::base::{DenseBase, FrozenBase};
/// use ndarray::array;
/// // A GPT-2 style weight stored (in, out) is transposed once on the way in.
/// let stored = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]; // (in = 2, out = 3)
/// let base = DenseBase::from_stored(stored, None, true, "h.0.attn.c_attn").unwrap();
/// assert_eq!((base.out_features(), base.in_features()), (3, 2));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DenseBase {
    weight: Array2<f32>,
    bias: Option<Array1<f32>>,
    compute_dtype: ComputeDtype,
}

impl DenseBase {
    /// A base from `W: (out, in)` and an optional bias of length `out`; both must be finite.
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>, context: &str) -> Result<Self> {
        check_finite(|| format!("base weight of {context}"), weight.iter())?;
        if weight.is_empty() {
            return Err(LoraError::shape(
                format!("base weight of {context}"),
                "a non-empty (out, in) matrix",
                format!("{:?}", weight.dim()),
            ));
        }
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(LoraError::shape(
                    format!("base bias of {context}"),
                    weight.nrows(),
                    b.len(),
                ));
            }
            check_finite(|| format!("base bias of {context}"), b.iter())?;
        }
        Ok(DenseBase {
            weight,
            bias,
            compute_dtype: ComputeDtype::F32,
        })
    }

    /// A base from a weight as stored on disk: `(in, out)` when `fan_in_fan_out` (GPT-2's
    /// `Conv1D`), else `(out, in)`.
    pub fn from_stored(
        weight: Array2<f32>,
        bias: Option<Array1<f32>>,
        fan_in_fan_out: bool,
        context: &str,
    ) -> Result<Self> {
        let weight = if fan_in_fan_out {
            weight.t().as_standard_layout().into_owned()
        } else {
            weight
        };
        DenseBase::new(weight, bias, context)
    }

    /// `W: (out, in)`.
    pub fn weight(&self) -> &Array2<f32> {
        &self.weight
    }
}

impl FrozenBase for DenseBase {
    fn out_features(&self) -> usize {
        self.weight.nrows()
    }
    fn in_features(&self) -> usize {
        self.weight.ncols()
    }
    fn matmul_into(&self, x: ArrayView2<'_, f32>, y: ArrayViewMut2<'_, f32>) -> Result<()> {
        gemm_in(self.compute_dtype, 1.0, x, self.weight.t(), 0.0, y)?;
        Ok(())
    }
    fn matmul_transposed_into(
        &self,
        dy: ArrayView2<'_, f32>,
        beta: f32,
        dx: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        gemm_in(self.compute_dtype, 1.0, dy, self.weight.view(), beta, dx)?;
        Ok(())
    }
    fn dense_weight(&self) -> Result<Cow<'_, Array2<f32>>> {
        Ok(Cow::Borrowed(&self.weight))
    }
    fn weight_mut(&mut self) -> Result<&mut Array2<f32>> {
        Ok(&mut self.weight)
    }
    fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_ref().map(|b| b.view())
    }
    fn parameter_count(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, |b| b.len())
    }
    fn storage_bytes(&self) -> usize {
        self.parameter_count() * std::mem::size_of::<f32>()
    }
    fn storage_kind(&self) -> &'static str {
        "f32"
    }
    fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }
    fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
    }
}
