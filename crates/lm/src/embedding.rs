//! The token embedding: a dense `f32` parameter, or a GGUF file's `token_embd` kept frozen in
//! its own ggml blocks so that the resident base is about the file's size (the embedding of a
//! small model is a large part of it: 49152 × 576 for SmolLM2, 108 MiB as f32, 30 MiB as Q8_0).
//!
//! Over ggml blocks nothing is decoded as a whole matrix: a lookup decodes only the rows of the
//! ids asked for (ggml's `dequantize_row_*`, so the rows equal those of the dequantized matrix
//! bit for bit), and a tied LM head is the frozen ggml-base product `x·Eᵀ` tile by tile, with
//! its input gradient `dy·E` through the same base's backward.
//!
//! ```
//! use lm::embedding::TokenEmbedding;
//! use lora_core::{FrozenBase, GgmlBase};
//! use quant_core::ggml::GgmlType;
//! let e = ndarray::Array2::from_shape_fn((5, 32), |(i, j)| (i * 32 + j) as f32 * 0.01);
//! let quantized = GgmlBase::quantize(e.view(), None, GgmlType::Q8_0, "embed").unwrap();
//! let dense = TokenEmbedding::Dense(lm::Parameter::new(quantized.dense_weight().unwrap().into_owned()));
//! let blocks = TokenEmbedding::Ggml(quantized);
//! let (a, b) = (dense.gather(&[4, 0, 4], None).unwrap(), blocks.gather(&[4, 0, 4], None).unwrap());
//! assert_eq!(a, b);
//! assert_eq!(blocks.storage_bytes(), 5 * 34); // one Q8_0 block of 32 values per row
//! ```

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, CowArray, Ix2};

use lora_core::{FrozenBase, GgmlBase};
use quant_core::linalg::ComputeDtype;

use crate::error::{LmError, Result};
use crate::memory::MemoryReport;
use crate::param::Parameter;

/// The embedding matrix `E: (vocab, hidden)`.
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// A dense `f32` parameter (trainable when asked).
    Dense(Parameter<Ix2>),
    /// A GGUF file's blocks, frozen.
    Ggml(GgmlBase),
}

/// Equal when both are dense with equal values and gradients, or both the same blocks.
impl PartialEq for TokenEmbedding {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TokenEmbedding::Dense(a), TokenEmbedding::Dense(b)) => a == b,
            (TokenEmbedding::Ggml(a), TokenEmbedding::Ggml(b)) => {
                a.ggml_type() == b.ggml_type()
                    && (a.out_features(), a.in_features()) == (b.out_features(), b.in_features())
                    && a.blocks() == b.blocks()
            }
            _ => false,
        }
    }
}

impl TokenEmbedding {
    /// `(vocab, hidden)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            TokenEmbedding::Dense(p) => p.value().dim(),
            TokenEmbedding::Ggml(b) => (b.out_features(), b.in_features()),
        }
    }

    /// The dense parameter, `None` over ggml blocks.
    pub fn dense(&self) -> Option<&Parameter<Ix2>> {
        match self {
            TokenEmbedding::Dense(p) => Some(p),
            TokenEmbedding::Ggml(_) => None,
        }
    }

    pub(crate) fn dense_mut(&mut self) -> Option<&mut Parameter<Ix2>> {
        match self {
            TokenEmbedding::Dense(p) => Some(p),
            TokenEmbedding::Ggml(_) => None,
        }
    }

    /// The whole matrix in `f32` (borrowed when dense, decoded over ggml blocks): for saving
    /// and merging, never on the forward or backward path.
    pub fn weight_f32(&self) -> Result<CowArray<'_, f32, Ix2>> {
        Ok(match self {
            TokenEmbedding::Dense(p) => CowArray::from(p.value().view()),
            TokenEmbedding::Ggml(b) => CowArray::from(b.dense_weight()?.into_owned()),
        })
    }

    /// The rows of `ids`, each times `scale` when the family scales them (Gemma: √hidden).
    /// An id outside the vocabulary is an error naming it.
    pub fn gather(&self, ids: &[u32], scale: Option<f32>) -> Result<Array2<f32>> {
        let (vocab, hidden) = self.dim();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(LmError::invalid(
                "token id",
                bad,
                format!("outside the embedding's vocabulary of {vocab}"),
            ));
        }
        let mut x = Array2::<f32>::zeros((ids.len(), hidden));
        for (mut row, &id) in x.axis_iter_mut(Axis(0)).zip(ids) {
            let id = id as usize;
            match self {
                TokenEmbedding::Dense(p) => row.assign(&p.value().row(id)),
                TokenEmbedding::Ggml(b) => {
                    let out = row
                        .as_slice_mut()
                        .ok_or_else(|| LmError::invalid("embedding row", id, "not contiguous"))?;
                    b.dequantize_rows(id..id + 1, out)?;
                }
            }
            if let Some(s) = scale {
                row *= s;
            }
        }
        Ok(x)
    }

    /// Sets the precision of a ggml embedding's tied-head products (a dense embedding's
    /// products take the model's precision as an argument).
    pub(crate) fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        if let TokenEmbedding::Ggml(b) = self {
            b.set_compute_dtype(dtype);
        }
    }

    /// The tied LM head: `logits = x·Eᵀ` (`x: (n, hidden)`, `logits: (n, vocab)`), the dense
    /// product with `dtype` operands.
    pub(crate) fn head_forward(
        &self,
        x: ArrayView2<'_, f32>,
        logits: ArrayViewMut2<'_, f32>,
        dtype: ComputeDtype,
    ) -> Result<()> {
        match self {
            TokenEmbedding::Dense(p) => {
                quant_core::linalg::gemm_in(dtype, 1.0, x, p.value().t(), 0.0, logits)?
            }
            TokenEmbedding::Ggml(b) => b.matmul_into(x, logits)?,
        }
        Ok(())
    }

    /// The tied LM head's backward: `dx = dlogits·E` and, for a trainable dense embedding,
    /// `dE += dlogitsᵀ·x`.
    pub(crate) fn head_backward(
        &mut self,
        x: ArrayView2<'_, f32>,
        grad_logits: ArrayView2<'_, f32>,
        grad_x: ArrayViewMut2<'_, f32>,
        dtype: ComputeDtype,
    ) -> Result<()> {
        match self {
            TokenEmbedding::Dense(p) => {
                let (embed, embed_grad) = p.value_and_grad_mut();
                quant_core::linalg::gemm_in(dtype, 1.0, grad_logits, embed.view(), 0.0, grad_x)?;
                if let Some(g) = embed_grad {
                    quant_core::linalg::gemm_in(dtype, 1.0, grad_logits.t(), x, 1.0, g.view_mut())?;
                }
            }
            TokenEmbedding::Ggml(b) => b.matmul_transposed_into(grad_logits, 0.0, grad_x)?,
        }
        Ok(())
    }

    /// Adds the rows of `grad_rows` into the gradient of the rows `ids` (trainable dense only).
    pub(crate) fn accumulate_row_grads(&mut self, ids: &[u32], grad_rows: ArrayView2<'_, f32>) {
        if let Some(g) = self.dense_mut().and_then(Parameter::grad_mut) {
            for (row, &id) in grad_rows.axis_iter(Axis(0)).zip(ids) {
                let mut target = g.row_mut(id as usize);
                target += &row;
            }
        }
    }

    pub fn is_trainable(&self) -> bool {
        self.dense().is_some_and(Parameter::is_trainable)
    }

    /// Trains or freezes a dense embedding; ggml blocks stay frozen (as quantized projection
    /// bases do), so asking them to train is an error naming the tensor.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        match self {
            TokenEmbedding::Dense(p) => p.set_trainable(trainable),
            TokenEmbedding::Ggml(b) if trainable => {
                return Err(LmError::invalid(
                    "model.embed_tokens.weight",
                    b.ggml_type(),
                    "a ggml-block embedding is frozen; load the GGUF file dequantized \
                     (--dequantize-base) to train it",
                ))
            }
            TokenEmbedding::Ggml(_) => {}
        }
        Ok(())
    }

    /// Bytes the embedding keeps resident.
    pub fn storage_bytes(&self) -> usize {
        match self {
            TokenEmbedding::Dense(p) => std::mem::size_of_val(p.value().as_slice().unwrap_or(&[])),
            TokenEmbedding::Ggml(b) => b.storage_bytes(),
        }
    }

    pub fn parameter_count(&self) -> usize {
        let (v, d) = self.dim();
        v * d
    }

    pub(crate) fn add_memory(&self, report: &mut MemoryReport) {
        match self {
            TokenEmbedding::Dense(p) => report.add_f32_parameter(p.value().len(), p.is_trainable()),
            TokenEmbedding::Ggml(b) => {
                report.add_quantized_base(b.storage_kind(), b.storage_bytes(), b.parameter_count())
            }
        }
    }
}
