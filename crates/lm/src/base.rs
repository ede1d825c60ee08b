//! The base of a projection: what computes `x·Wᵀ + b` before any adapter.
//!
//! [`LinearBase`] is one of three storages — a dense `f32` weight ([`DenseLinear`], the only
//! one that trains, in full fine-tuning), NF4 codes (`lora_core::Nf4Base`, a bitsandbytes
//! 4-bit checkpoint's or QLoRA's base) or ggml blocks (`lora_core::GgmlBase`, a GGUF file's
//! weight in its own encoding) — and implements `lora_core::FrozenBase` by dispatching to
//! it, so `lora_core::LoraLinear<LinearBase>` is LoRA, rsLoRA or DoRA over any of them. A new
//! storage is one more variant here and one more arm per `FrozenBase` method; the adapters
//! and the model do not change.

use std::borrow::Cow;

use lora_core::{FrozenBase, GgmlBase, Nf4Base};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Ix1, Ix2};
use quant_core::linalg::{gemm_in, ComputeDtype};

use crate::error::Result;
use crate::param::Parameter;

/// `y = x·Wᵀ (+ b)` with a dense `f32` weight `W` of shape `(out_features, in_features)`
/// (PyTorch layout).
///
/// ```
/// use lm::{DenseLinear, LinearModule};
/// use ndarray::{array, Array2};
/// let mut linear = LinearModule::from(DenseLinear::new(array![[1.0f32, 2.0], [0.0, 1.0], [1.0, 0.0]]));
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
    pub(crate) weight: Parameter<Ix2>,
    /// `y = x·Wᵀ + b` (Qwen2's q/k/v); trains with the weight in full fine-tuning.
    pub(crate) bias: Option<Parameter<Ix1>>,
    /// The precision of the products' operands (`f32` weight and gradient either way).
    pub(crate) compute_dtype: ComputeDtype,
}

impl DenseLinear {
    /// A frozen dense layer with `weight` of shape `(out_features, in_features)`.
    pub fn new(weight: Array2<f32>) -> Self {
        DenseLinear {
            weight: Parameter::new(weight),
            bias: None,
            compute_dtype: ComputeDtype::F32,
        }
    }

    /// The layer with a frozen bias of length `out_features`.
    pub fn with_bias(mut self, bias: Array1<f32>) -> Self {
        self.bias = Some(Parameter::new(bias));
        self
    }

    pub fn bias(&self) -> Option<&Parameter<Ix1>> {
        self.bias.as_ref()
    }

    pub fn weight(&self) -> &Parameter<Ix2> {
        &self.weight
    }

    pub fn weight_mut(&mut self) -> &mut Parameter<Ix2> {
        &mut self.weight
    }

    /// Trains (allocating gradients) or freezes the weight and bias.
    pub fn set_trainable(&mut self, trainable: bool) {
        self.weight.set_trainable(trainable);
        if let Some(b) = &mut self.bias {
            b.set_trainable(trainable);
        }
    }
}

/// The storage of a projection's base weight; see the module docs.
///
/// ```
/// use lm::{LinearBase, LinearModule};
/// use lora_core::{FrozenBase, GgmlBase};
/// use quant_core::ggml::GgmlType;
/// use ndarray::Array2;
/// let w = Array2::from_shape_fn((4, 32), |(i, j)| ((i * 32 + j) as f32 * 0.3).sin());
/// let base = LinearBase::from(GgmlBase::quantize(w.view(), None, GgmlType::Q8_0, "q_proj").unwrap());
/// assert_eq!((base.out_features(), base.storage_kind()), (4, "ggml-q8_0"));
/// let module = LinearModule::from(base);
/// assert_eq!(module.kind(), "ggml");
/// ```
// Each variant is used inline by the unadapted projections of a whole model; boxing the
// quantized ones would add an indirection per product for a few bytes per module.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LinearBase {
    /// A dense `f32` weight (trainable in full fine-tuning; frozen under adapters).
    Dense(DenseLinear),
    /// NF4 codes with double-quantized scales; products one dequantized tile at a time.
    Nf4(Nf4Base),
    /// ggml blocks (`Q4_0` ... `Q6_K`, `F16`, ...); products one decoded tile at a time.
    Ggml(GgmlBase),
}

impl From<DenseLinear> for LinearBase {
    fn from(d: DenseLinear) -> Self {
        LinearBase::Dense(d)
    }
}

impl From<Nf4Base> for LinearBase {
    fn from(b: Nf4Base) -> Self {
        LinearBase::Nf4(b)
    }
}

impl From<GgmlBase> for LinearBase {
    fn from(b: GgmlBase) -> Self {
        LinearBase::Ggml(b)
    }
}

impl LinearBase {
    /// What the base is, for messages: `dense f32`, `NF4`, `ggml`.
    pub fn kind(&self) -> &'static str {
        match self {
            LinearBase::Dense(_) => "dense f32",
            LinearBase::Nf4(_) => "NF4",
            LinearBase::Ggml(_) => "ggml",
        }
    }

    /// The dense weight, when the base is one.
    pub fn as_dense(&self) -> Option<&DenseLinear> {
        match self {
            LinearBase::Dense(d) => Some(d),
            _ => None,
        }
    }

    /// `out ← x·Wᵀ + b` (or `out += x·Wᵀ + b` with `accumulate`); `out` may be strided.
    pub(crate) fn forward_into(
        &self,
        x: ArrayView2<'_, f32>,
        mut out: ArrayViewMut2<'_, f32>,
        accumulate: bool,
    ) -> Result<()> {
        match self {
            LinearBase::Dense(d) => {
                let beta = if accumulate { 1.0 } else { 0.0 };
                gemm_in(
                    d.compute_dtype,
                    1.0,
                    x,
                    d.weight.value().t(),
                    beta,
                    out.view_mut(),
                )?;
            }
            _ if accumulate => {
                let mut y = Array2::zeros(out.dim());
                self.matmul_into(x, y.view_mut())?;
                out += &y;
            }
            _ => self.matmul_into(x, out.view_mut())?,
        }
        if let Some(b) = self.bias() {
            out += &b.insert_axis(Axis(0));
        }
        Ok(())
    }
}

impl PartialEq for LinearBase {
    /// Same storage and same stored values (the dense weight with its gradient state).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (LinearBase::Dense(a), LinearBase::Dense(b)) => a == b,
            (LinearBase::Nf4(a), LinearBase::Nf4(b)) => a.weight() == b.weight(),
            (LinearBase::Ggml(a), LinearBase::Ggml(b)) => {
                a.ggml_type() == b.ggml_type()
                    && a.blocks() == b.blocks()
                    && a.out_features() == b.out_features()
                    && a.bias() == b.bias()
            }
            _ => false,
        }
    }
}

impl FrozenBase for LinearBase {
    fn out_features(&self) -> usize {
        match self {
            LinearBase::Dense(d) => d.weight.value().nrows(),
            LinearBase::Nf4(b) => b.out_features(),
            LinearBase::Ggml(b) => b.out_features(),
        }
    }
    fn in_features(&self) -> usize {
        match self {
            LinearBase::Dense(d) => d.weight.value().ncols(),
            LinearBase::Nf4(b) => b.in_features(),
            LinearBase::Ggml(b) => b.in_features(),
        }
    }
    fn matmul_into(
        &self,
        x: ArrayView2<'_, f32>,
        y: ArrayViewMut2<'_, f32>,
    ) -> lora_core::Result<()> {
        match self {
            LinearBase::Dense(d) => {
                gemm_in(d.compute_dtype, 1.0, x, d.weight.value().t(), 0.0, y)?;
                Ok(())
            }
            LinearBase::Nf4(b) => b.matmul_into(x, y),
            LinearBase::Ggml(b) => b.matmul_into(x, y),
        }
    }
    fn matmul_transposed_into(
        &self,
        dy: ArrayView2<'_, f32>,
        beta: f32,
        dx: ArrayViewMut2<'_, f32>,
    ) -> lora_core::Result<()> {
        match self {
            LinearBase::Dense(d) => {
                gemm_in(d.compute_dtype, 1.0, dy, d.weight.value().view(), beta, dx)?;
                Ok(())
            }
            LinearBase::Nf4(b) => b.matmul_transposed_into(dy, beta, dx),
            LinearBase::Ggml(b) => b.matmul_transposed_into(dy, beta, dx),
        }
    }
    fn dense_weight(&self) -> lora_core::Result<Cow<'_, Array2<f32>>> {
        match self {
            LinearBase::Dense(d) => Ok(Cow::Borrowed(d.weight.value())),
            LinearBase::Nf4(b) => b.dense_weight(),
            LinearBase::Ggml(b) => b.dense_weight(),
        }
    }
    fn weight_mut(&mut self) -> lora_core::Result<&mut Array2<f32>> {
        match self {
            LinearBase::Dense(d) => Ok(d.weight.value_mut()),
            LinearBase::Nf4(b) => b.weight_mut(),
            LinearBase::Ggml(b) => b.weight_mut(),
        }
    }
    fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        match self {
            LinearBase::Dense(d) => d.bias.as_ref().map(|b| b.value().view()),
            LinearBase::Nf4(b) => b.bias(),
            LinearBase::Ggml(b) => b.bias(),
        }
    }
    fn parameter_count(&self) -> usize {
        match self {
            LinearBase::Dense(d) => {
                d.weight.value().len() + d.bias.as_ref().map_or(0, |b| b.value().len())
            }
            LinearBase::Nf4(b) => b.parameter_count(),
            LinearBase::Ggml(b) => b.parameter_count(),
        }
    }
    fn storage_bytes(&self) -> usize {
        match self {
            LinearBase::Dense(_) => self.parameter_count() * std::mem::size_of::<f32>(),
            LinearBase::Nf4(b) => b.storage_bytes(),
            LinearBase::Ggml(b) => b.storage_bytes(),
        }
    }
    fn storage_kind(&self) -> &'static str {
        match self {
            LinearBase::Dense(_) => "f32",
            LinearBase::Nf4(b) => b.storage_kind(),
            LinearBase::Ggml(b) => b.storage_kind(),
        }
    }
    fn compute_dtype(&self) -> ComputeDtype {
        match self {
            LinearBase::Dense(d) => d.compute_dtype,
            LinearBase::Nf4(b) => b.compute_dtype(),
            LinearBase::Ggml(b) => b.compute_dtype(),
        }
    }
    fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        match self {
            LinearBase::Dense(d) => d.compute_dtype = dtype,
            LinearBase::Nf4(b) => b.set_compute_dtype(dtype),
            LinearBase::Ggml(b) => b.set_compute_dtype(dtype),
        }
    }
}
