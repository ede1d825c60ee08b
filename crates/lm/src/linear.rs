//! The linear modules of the decoder, addressed by Hugging Face module path.
//!
//! Every projection (`q/k/v/o_proj`, `gate/up/down_proj`, `lm_head`) is a [`LinearModule`]: a
//! base ([`LinearBase`]: dense `f32`, NF4 or ggml blocks) with at most one kind of adapter
//! over it. lora-core's adapter layers own their base, so the composition is spelled as
//! "the base alone, or an adapter layer holding it":
//!
//! | variant | computes | trains |
//! |---|---|---|
//! | `Base(b)` | `x·Wᵀ + b` | `W`, `b` of a dense base in full fine-tuning |
//! | `Lora(LoraLinear<LinearBase>)` | LoRA / rsLoRA / DoRA over any base | the adapters |
//! | `Qat(QatLayer)` | LoRA-QAT: `Q(W + s·B·A)` over the base's `f32` weight | `A`, `B`, steps |
//!
//! A new storage is a variant of [`LinearBase`] (every adapter then works over it); a new
//! adapter is an [`AdaptedLayer`] implementation and a variant here. `forward` may remember
//! what its `backward` needs; `backward` returns the input gradient and accumulates the
//! gradients of whatever trains.

use std::borrow::Cow;

use lora_core::{FrozenBase, GgmlBase, LoraLinear, Nf4Base};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, CowArray, Ix2};
use quant_core::linalg::{gemm_in, ComputeDtype};

pub use crate::adapted::{peft_parameter_name, AdaptedLayer};
pub use crate::base::{DenseLinear, LinearBase};
use crate::error::{check_finite_at, LmError, Result};
use crate::qat_layer::QatLayer;

/// One linear projection of the model; see the module docs for the composition.
///
/// Equality compares what the module computes with: the base of an unadapted module; the base
/// weight, adapter names, active and merged state and adapter tensors of an adapted one.
///
/// ```
/// use lm::LinearModule;
/// use lora_core::{FrozenBase, GgmlBase};
/// use quant_core::ggml::GgmlType;
/// use ndarray::{Array1, Array2};
/// // A frozen Q4_0 projection with a bias, as a GGUF file stores one.
/// let w = Array2::from_shape_fn((3, 32), |(i, j)| ((i * 32 + j) as f32 * 0.1).cos());
/// let base = GgmlBase::quantize(w.view(), Some(Array1::ones(3)), GgmlType::Q4_0, "q_proj").unwrap();
/// let decoded = base.dense_weight().unwrap().into_owned(); // what llama.cpp computes with
/// let mut module = LinearModule::ggml(base);
/// let x = Array2::ones((2, 32));
/// let mut y = Array2::zeros((2, 3));
/// module.forward(x.view(), y.view_mut(), false).unwrap();
/// let expected = x.dot(&decoded.t()) + 1.0;
/// assert!((&y - &expected).iter().all(|e| e.abs() < 1e-5));
/// ```
// The unadapted variant (a base inline) is the common one; boxing it would add an
// indirection to every projection for the sake of the rarer adapted variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LinearModule {
    /// The base alone (a dense `f32` weight trains in full fine-tuning; NF4 and ggml bases are
    /// frozen and compute one dequantized tile at a time).
    Base(LinearBase),
    /// LoRA, rsLoRA or DoRA adapters over any base (over NF4: QLoRA). The base is frozen.
    Lora(Box<LoraLinear<LinearBase>>),
    /// LoRA-QAT: one adapter trained through a weight quantizer whose steps train too, over
    /// the base's `f32` weight (dequantized once from an NF4 or ggml base).
    Qat(Box<QatLayer>),
}

impl From<LinearBase> for LinearModule {
    fn from(base: LinearBase) -> Self {
        LinearModule::Base(base)
    }
}

impl From<DenseLinear> for LinearModule {
    fn from(d: DenseLinear) -> Self {
        LinearModule::Base(LinearBase::Dense(d))
    }
}

impl LinearModule {
    /// A frozen dense `f32` projection with `weight: (out, in)` and an optional bias.
    pub fn dense(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Self {
        let dense = DenseLinear::new(weight);
        LinearModule::from(match bias {
            Some(b) => dense.with_bias(b),
            None => dense,
        })
    }

    /// A frozen NF4 projection (its bias, if any, is the base's).
    pub fn nf4(base: Nf4Base) -> Self {
        LinearModule::Base(LinearBase::Nf4(base))
    }

    /// A frozen projection kept in a GGUF file's ggml blocks (its bias, if any, is the
    /// base's: `GgmlBase::from_blocks(.., Some(bias), ..)`). Adapters injected afterwards
    /// (LoRA, rsLoRA, DoRA, LoRA-QAT) go over it as over any base.
    pub fn ggml(base: GgmlBase) -> Self {
        LinearModule::Base(LinearBase::Ggml(base))
    }

    pub fn in_features(&self) -> usize {
        match self {
            LinearModule::Base(b) => b.in_features(),
            LinearModule::Lora(l) => l.shape().1,
            LinearModule::Qat(q) => q.shape().1,
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            LinearModule::Base(b) => b.out_features(),
            LinearModule::Lora(l) => l.shape().0,
            LinearModule::Qat(q) => q.shape().0,
        }
    }

    /// What the module is, for messages: `dense f32`, `NF4`, `ggml` (unadapted bases),
    /// `LoRA` (over `f32`), `QLoRA` (over NF4), `LoRA over ggml`, `LoRA-QAT`.
    pub fn kind(&self) -> &'static str {
        match self {
            LinearModule::Base(b) => b.kind(),
            LinearModule::Lora(l) => match l.base() {
                LinearBase::Dense(_) => "LoRA",
                LinearBase::Nf4(_) => "QLoRA",
                LinearBase::Ggml(_) => "LoRA over ggml",
            },
            LinearModule::Qat(_) => "LoRA-QAT",
        }
    }

    /// The base, unless a LoRA-QAT layer has taken it over (it holds its own `f32` copy).
    pub fn base(&self) -> Option<&LinearBase> {
        match self {
            LinearModule::Base(b) => Some(b),
            LinearModule::Lora(l) => Some(l.base()),
            LinearModule::Qat(_) => None,
        }
    }

    /// The dense weight of an unadapted dense projection.
    pub fn as_dense(&self) -> Option<&DenseLinear> {
        match self {
            LinearModule::Base(LinearBase::Dense(d)) => Some(d),
            _ => None,
        }
    }

    /// The dense weight of an unadapted dense projection, mutably.
    pub fn as_dense_mut(&mut self) -> Option<&mut DenseLinear> {
        match self {
            LinearModule::Base(LinearBase::Dense(d)) => Some(d),
            _ => None,
        }
    }

    /// Whether the module is an unadapted dense `f32` projection.
    pub fn is_dense(&self) -> bool {
        self.as_dense().is_some()
    }

    /// The adapter layer, if this projection is adapted.
    pub fn adapted(&self) -> Option<&dyn AdaptedLayer> {
        match self {
            LinearModule::Base(_) => None,
            LinearModule::Lora(l) => Some(l.as_ref()),
            LinearModule::Qat(l) => Some(l.as_ref()),
        }
    }

    /// The adapter layer, mutably, if this projection is adapted.
    pub fn adapted_mut(&mut self) -> Option<&mut dyn AdaptedLayer> {
        match self {
            LinearModule::Base(_) => None,
            LinearModule::Lora(l) => Some(l.as_mut()),
            LinearModule::Qat(l) => Some(l.as_mut()),
        }
    }

    /// Turns an unadapted projection into a LoRA layer over the same (now frozen) base — a
    /// dense weight, NF4 codes (QLoRA) or ggml blocks — with no adapters yet; an adapted one
    /// is returned as it is. A dense base must be finite. `path` names the module in errors.
    pub fn make_adapted(&mut self, path: &str) -> Result<&mut dyn AdaptedLayer> {
        if let LinearModule::Base(base) = self {
            if let LinearBase::Dense(d) = base {
                check_dense_finite(d, path)?;
                // Adapted bases are frozen, as PEFT's: no gradient buffers.
                d.set_trainable(false);
            }
            // An empty dense base holds the place while the base moves into its layer.
            let empty = LinearBase::Dense(DenseLinear::new(Array2::zeros((0, 0))));
            let base = std::mem::replace(base, empty);
            *self = LinearModule::Lora(Box::new(LoraLinear::new(base, path)));
        }
        self.adapted_mut().ok_or_else(|| LmError::AdapterState {
            operation: format!("adapting {path}"),
            reason: "the module has no adapter form".into(),
        })
    }

    /// `out ← x·Wᵀ` (or `out += x·Wᵀ` with `accumulate`), `x: (rows, in)`, `out: (rows, out)`;
    /// `out` may be a strided view (a column block of a fused buffer). Adapted modules add
    /// their active adapters and keep `x` for backward.
    pub fn forward(
        &mut self,
        x: ArrayView2<'_, f32>,
        mut out: ArrayViewMut2<'_, f32>,
        accumulate: bool,
    ) -> Result<()> {
        let _timer = crate::profile::scope(crate::profile::Op::ProjectionForward);
        let layer: &mut dyn AdaptedLayer = match self {
            LinearModule::Base(base) => return base.forward_into(x, out, accumulate),
            LinearModule::Lora(l) => l.as_mut(),
            LinearModule::Qat(q) => q.as_mut(),
        };
        let y = layer.forward(x)?;
        if y.dim() != out.dim() {
            return Err(LmError::shape(
                "adapted linear output",
                format!("{:?}", out.dim()),
                format!("{:?}", y.dim()),
            ));
        }
        if accumulate {
            out += &y;
        } else {
            out.assign(&y);
        }
        Ok(())
    }

    /// Given the forward input `x` and `∂L/∂y`, writes (or adds, with `accumulate_input`)
    /// `∂L/∂x = ∂L/∂y·W` into `grad_input` and adds `∂L/∂W = (∂L/∂y)ᵀ·x` to the weight's
    /// gradient when the weight trains (nothing is computed for a frozen weight). Adapted
    /// modules use the input their last forward kept and accumulate their active adapters'
    /// gradients.
    pub fn backward(
        &mut self,
        x: ArrayView2<'_, f32>,
        grad_output: ArrayView2<'_, f32>,
        mut grad_input: ArrayViewMut2<'_, f32>,
        accumulate_input: bool,
    ) -> Result<()> {
        let _timer = crate::profile::scope(crate::profile::Op::ProjectionBackward);
        if grad_output.nrows() != x.nrows() {
            return Err(LmError::shape(
                "linear backward: rows of grad_output vs input",
                x.nrows(),
                grad_output.nrows(),
            ));
        }
        let beta = if accumulate_input { 1.0 } else { 0.0 };
        let layer: &mut dyn AdaptedLayer = match self {
            LinearModule::Base(LinearBase::Dense(d)) => {
                let dtype = d.compute_dtype;
                gemm_in(
                    dtype,
                    1.0,
                    grad_output,
                    d.weight.value().view(),
                    beta,
                    grad_input,
                )?;
                if let Some(gw) = d.weight.grad_mut() {
                    gemm_in(dtype, 1.0, grad_output.t(), x, 1.0, gw.view_mut())?;
                }
                if let Some(gb) = d.bias.as_mut().and_then(|b| b.grad_mut()) {
                    *gb += &grad_output.sum_axis(Axis(0));
                }
                return Ok(());
            }
            // A quantized base is frozen: only the input gradient flows.
            LinearModule::Base(base) => {
                base.matmul_transposed_into(grad_output, beta, grad_input)?;
                return Ok(());
            }
            LinearModule::Lora(l) => l.as_mut(),
            LinearModule::Qat(q) => q.as_mut(),
        };
        let dx = layer.backward(grad_output)?;
        if dx.dim() != grad_input.dim() {
            return Err(LmError::shape(
                "adapted linear input gradient",
                format!("{:?}", grad_input.dim()),
                format!("{:?}", dx.dim()),
            ));
        }
        if accumulate_input {
            grad_input += &dx;
        } else {
            grad_input.assign(&dx);
        }
        Ok(())
    }

    /// The precision of the module's products (see [`LinearModule::set_compute_dtype`]).
    pub fn compute_dtype(&self) -> ComputeDtype {
        match self {
            LinearModule::Base(b) => b.compute_dtype(),
            LinearModule::Lora(l) => l.compute_dtype(),
            LinearModule::Qat(q) => q.layer().compute_dtype(),
        }
    }

    /// Sets the precision of every product of the module — base, adapters, LoRA-QAT's
    /// fake-quantized weight; forward, input gradient and weight gradients — to `dtype`
    /// (bf16: operands rounded to bf16, sums in `f32`). Weights, gradients and outputs stay
    /// `f32`; a quantized base decodes each tile to `f32`, then rounds it.
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        if self.compute_dtype() == dtype {
            // Unchanged: a LoRA-QAT layer keeps the forward its backward needs.
            return;
        }
        match self {
            LinearModule::Base(b) => b.set_compute_dtype(dtype),
            LinearModule::Lora(l) => l.set_compute_dtype(dtype),
            LinearModule::Qat(q) => q.layer_mut().set_compute_dtype(dtype),
        }
    }

    /// Makes the base weight trainable (allocating its gradient) or frozen (dropping it).
    /// Only an unadapted dense base trains; adapted modules keep their base frozen, as PEFT
    /// does, and quantized bases are always frozen.
    pub fn set_base_trainable(&mut self, trainable: bool) {
        if let Some(d) = self.as_dense_mut() {
            d.set_trainable(trainable);
        }
    }

    /// Gives the base a bias (`(out)`), as a family's checkpoint stores it: a dense weight
    /// keeps it as a parameter, an NF4 or ggml base holds it frozen. Errors on a wrong length
    /// or a module that already has adapters.
    pub fn attach_bias(&mut self, bias: Array1<f32>, path: &str) -> Result<()> {
        if bias.len() != self.out_features() {
            return Err(LmError::TensorShape {
                key: format!("{path}.bias"),
                expected: vec![self.out_features()],
                got: vec![bias.len()],
            });
        }
        let kind = self.kind();
        let LinearModule::Base(base) = self else {
            return Err(LmError::AdapterState {
                operation: format!("attaching a bias to {path}"),
                reason: format!("a {kind} module's base is already built"),
            });
        };
        match base {
            LinearBase::Dense(d) => d.bias = Some(crate::param::Parameter::new(bias)),
            LinearBase::Nf4(b) => {
                *b = Nf4Base::from_four_bit(b.weight().clone(), Some(bias), b.options().tile, path)?
            }
            LinearBase::Ggml(b) => {
                let (tile, parallel) = b.tiling();
                let mut rebuilt = GgmlBase::from_blocks(
                    b.ggml_type(),
                    b.blocks().to_vec(),
                    b.out_features(),
                    b.in_features(),
                    Some(bias),
                    path,
                )?;
                rebuilt.set_tiling(tile, parallel)?;
                *b = rebuilt;
            }
        }
        Ok(())
    }

    /// The frozen base's bias, if any.
    pub fn base_bias(&self) -> Option<ArrayView1<'_, f32>> {
        match self {
            LinearModule::Base(b) => b.bias(),
            LinearModule::Lora(l) => l.base().bias(),
            LinearModule::Qat(q) => q.layer().bias(),
        }
    }

    /// Zeroes the base weight's gradient (if it trains) and every adapter gradient.
    pub fn zero_grad(&mut self) {
        match self {
            LinearModule::Base(LinearBase::Dense(d)) => {
                d.weight.zero_grad();
                if let Some(b) = &mut d.bias {
                    b.zero_grad();
                }
            }
            LinearModule::Base(_) => {}
            LinearModule::Lora(l) => l.zero_grad(),
            LinearModule::Qat(q) => AdaptedLayer::zero_grad(q.as_mut()),
        }
    }

    /// The weight as a dense `f32` `(out, in)` matrix, for saving in Hugging Face layout
    /// (borrowed for dense weights; quantized bases dequantize). Merged adapters are part of
    /// an adapted module's base weight, as after PEFT's `merge_and_unload`.
    pub fn base_weight(&self) -> Result<CowArray<'_, f32, Ix2>> {
        let weight = match self {
            LinearModule::Base(b) => b.dense_weight()?,
            LinearModule::Lora(l) => AdaptedLayer::base_weight(l.as_ref())?,
            LinearModule::Qat(q) => q.base_weight()?,
        };
        Ok(match weight {
            Cow::Borrowed(w) => CowArray::from(w.view()),
            Cow::Owned(w) => CowArray::from(w),
        })
    }
}

/// A dense weight and bias about to become an adapter's frozen base must be finite (PEFT's
/// layers would propagate a NaN silently): the first bad element is named.
fn check_dense_finite(d: &DenseLinear, path: &str) -> Result<()> {
    let weight = d.weight.value();
    let cols = weight.ncols().max(1);
    check_finite_at(
        &format!("{path}.weight"),
        weight.as_slice().unwrap_or_default(),
        |i| format!("element [{}, {}]", i / cols, i % cols),
    )?;
    if let Some(b) = &d.bias {
        check_finite_at(
            &format!("{path}.bias"),
            b.value().as_slice().unwrap_or_default(),
            |i| format!("element [{i}]"),
        )?;
    }
    Ok(())
}

impl PartialEq for LinearModule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (LinearModule::Base(a), LinearModule::Base(b)) => a == b,
            (LinearModule::Qat(a), LinearModule::Qat(b)) => a == b,
            (LinearModule::Lora(a), LinearModule::Lora(b)) => adapted_eq(a.as_ref(), b.as_ref()),
            _ => false,
        }
    }
}

fn adapted_eq(a: &dyn AdaptedLayer, b: &dyn AdaptedLayer) -> bool {
    let same_base = match (a.base_weight(), b.base_weight()) {
        (Ok(wa), Ok(wb)) => wa == wb,
        _ => false,
    };
    same_base
        && a.base_storage_kind() == b.base_storage_kind()
        && a.adapter_names() == b.adapter_names()
        && a.active() == b.active()
        && a.is_merged() == b.is_merged()
        && a.adapter_names()
            .iter()
            .all(|name| match (a.adapter(name), b.adapter(name)) {
                (Ok(x), Ok(y)) => {
                    x.a() == y.a()
                        && x.b() == y.b()
                        && x.magnitude() == y.magnitude()
                        && x.options() == y.options()
                }
                _ => false,
            })
}
