//! The linear modules of the decoder, addressed by Hugging Face module path.
//!
//! Every projection (`q/k/v/o_proj`, `gate/up/down_proj`, `lm_head`) is a [`LinearModule`].
//! The enum is the extension point for adapters and quantized bases: a variant wraps its
//! state, `forward` may remember what its `backward` needs, and `backward` returns the input
//! gradient and accumulates the gradients of whatever the variant trains.
//!
//! Adapted variants hold a `lora_core::LoraLinear<B>` over some frozen base `B`. Everything
//! the model does with adapters goes through the object-safe [`AdaptedLayer`] trait, which
//! every `LoraLinear<B: FrozenBase>` implements, so a variant for another base (NF4 for
//! QLoRA, a fake-quantized base for LoRA-QAT) only needs its arm in
//! [`LinearModule::adapted`] / [`LinearModule::adapted_mut`].

use std::borrow::Cow;

use lora_core::{AdapterOptions, DenseBase, FrozenBase, LoraAdapter, LoraLinear, Nf4Base};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, CowArray, Ix1, Ix2};

use crate::error::{check_finite_at, LmError, Result};
use crate::memory::MemoryReport;
use crate::param::{ParamMut, Parameter};
use crate::qat::{quantizer_step_name, QatLayer};

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
    /// `y = x·Wᵀ + b` (Qwen2's q/k/v); trains with the weight in full fine-tuning.
    bias: Option<Parameter<Ix1>>,
}

impl DenseLinear {
    /// A frozen dense layer with `weight` of shape `(out_features, in_features)`.
    pub fn new(weight: Array2<f32>) -> Self {
        DenseLinear {
            weight: Parameter::new(weight),
            bias: None,
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
}

/// One linear projection of the model; see the module docs for how variants are added.
///
/// Equality compares what the module computes with: the weight of a dense module; the base
/// weight, adapter names, active and merged state and adapter tensors of an adapted one.
// The dense variant (weight and optional bias inline) is the common one; boxing it would add
// an indirection to every projection for the sake of the rarer adapted variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LinearModule {
    /// A plain `f32` weight.
    Dense(DenseLinear),
    /// A frozen `f32` base with low-rank adapters (LoRA, rsLoRA, DoRA).
    Lora(Box<LoraLinear<DenseBase>>),
    /// A frozen NF4 base (a bitsandbytes 4-bit checkpoint's projection, or one quantized by
    /// [`crate::LlamaModel::quantize_linears_nf4`]) without adapters: products computed one
    /// dequantized tile at a time.
    Nf4(Box<Nf4Base>),
    /// An NF4 base with low-rank adapters: QLoRA.
    Qlora(Box<LoraLinear<Nf4Base>>),
    /// LoRA-QAT: one adapter trained through a weight quantizer whose steps train too.
    Qat(Box<QatLayer>),
}

/// What the model needs from an adapted projection, whatever its base: implemented for
/// every `LoraLinear<B: FrozenBase>` by forwarding to its methods.
pub trait AdaptedLayer {
    /// `(out, in)`.
    fn shape(&self) -> (usize, usize);
    /// `x·Wᵀ + Σ active adapters`, keeping `x` for [`AdaptedLayer::backward`].
    fn forward(&mut self, x: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>>;
    /// `∂L/∂x` from `∂L/∂y`, accumulating the active adapters' gradients.
    fn backward(&mut self, dy: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>>;
    /// The named adapter.
    fn adapter(&self, name: &str) -> lora_core::Result<&LoraAdapter>;
    /// The named adapter, mutably; refused while it is merged.
    fn adapter_mut(&mut self, name: &str) -> lora_core::Result<&mut LoraAdapter>;
    /// Names of the adapters held, in the order they were added.
    fn adapter_names(&self) -> Vec<String>;
    /// Names of the active adapters.
    fn active(&self) -> Vec<String>;
    /// Makes exactly `names` active (unmerging first).
    fn set_active(&mut self, names: &[&str]) -> lora_core::Result<()>;
    /// Creates a fresh adapter as `options` say, from `seed`.
    fn add_adapter(
        &mut self,
        name: &str,
        options: &AdapterOptions,
        seed: u64,
    ) -> lora_core::Result<()>;
    /// Adds an adapter built elsewhere (a loaded file); its shape must match.
    fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> lora_core::Result<()>;
    /// Removes an adapter (unmerging first if needed) and returns it.
    fn remove_adapter(&mut self, name: &str) -> lora_core::Result<LoraAdapter>;
    /// Folds the active adapters into the base weight.
    fn merge(&mut self) -> lora_core::Result<()>;
    /// Undoes [`AdaptedLayer::merge`].
    fn unmerge(&mut self) -> lora_core::Result<()>;
    /// Whether any adapter is merged into the base weight.
    fn is_merged(&self) -> bool;
    /// Training mode draws adapter dropout; evaluation mode does not.
    fn set_training(&mut self, training: bool);
    /// Zeroes every adapter gradient.
    fn zero_grad(&mut self);
    /// The base weight `(out, in)` as `f32` (with merged adapters folded in, if any).
    fn base_weight(&self) -> lora_core::Result<Cow<'_, Array2<f32>>>;
    /// A new `f32` weight computing what the layer computes with its active adapters: the
    /// base (dequantized) plus every active `ΔW` (LoRA-QAT: the quantized weight). The layer
    /// is unchanged.
    fn merged_weight(&mut self) -> lora_core::Result<Array2<f32>>;
    /// Scalars of the frozen base.
    fn base_parameter_count(&self) -> usize;
    /// Bytes the frozen base occupies (`FrozenBase::storage_bytes`).
    fn base_storage_bytes(&self) -> usize;
    /// The base's storage kind (`"f32"`, `"nf4"`, ...).
    fn base_storage_kind(&self) -> &'static str;
}

impl<B: FrozenBase> AdaptedLayer for LoraLinear<B> {
    fn shape(&self) -> (usize, usize) {
        LoraLinear::shape(self)
    }
    fn forward(&mut self, x: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>> {
        LoraLinear::forward(self, x)
    }
    fn backward(&mut self, dy: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>> {
        LoraLinear::backward(self, dy)
    }
    fn adapter(&self, name: &str) -> lora_core::Result<&LoraAdapter> {
        LoraLinear::adapter(self, name)
    }
    fn adapter_mut(&mut self, name: &str) -> lora_core::Result<&mut LoraAdapter> {
        LoraLinear::adapter_mut(self, name)
    }
    fn adapter_names(&self) -> Vec<String> {
        LoraLinear::adapter_names(self)
    }
    fn active(&self) -> Vec<String> {
        LoraLinear::active(self).to_vec()
    }
    fn set_active(&mut self, names: &[&str]) -> lora_core::Result<()> {
        LoraLinear::set_active(self, names)
    }
    fn add_adapter(
        &mut self,
        name: &str,
        options: &AdapterOptions,
        seed: u64,
    ) -> lora_core::Result<()> {
        LoraLinear::add_adapter(self, name, options, seed)
    }
    fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> lora_core::Result<()> {
        LoraLinear::insert_adapter(self, name, adapter)
    }
    fn remove_adapter(&mut self, name: &str) -> lora_core::Result<LoraAdapter> {
        LoraLinear::remove_adapter(self, name)
    }
    fn merge(&mut self) -> lora_core::Result<()> {
        LoraLinear::merge(self)
    }
    fn unmerge(&mut self) -> lora_core::Result<()> {
        LoraLinear::unmerge(self)
    }
    fn is_merged(&self) -> bool {
        LoraLinear::is_merged(self)
    }
    fn set_training(&mut self, training: bool) {
        LoraLinear::set_training(self, training)
    }
    fn zero_grad(&mut self) {
        LoraLinear::zero_grad(self)
    }
    fn base_weight(&self) -> lora_core::Result<Cow<'_, Array2<f32>>> {
        self.base().dense_weight()
    }
    fn merged_weight(&mut self) -> lora_core::Result<Array2<f32>> {
        LoraLinear::merged_weight(self)
    }
    fn base_parameter_count(&self) -> usize {
        self.base().parameter_count()
    }
    fn base_storage_bytes(&self) -> usize {
        self.base().storage_bytes()
    }
    fn base_storage_kind(&self) -> &'static str {
        self.base().storage_kind()
    }
}

/// PEFT's in-memory parameter name of an adapter tensor (`named_parameters()` of a
/// `PeftModel`): `base_model.model.<module>.<tensor>.<adapter>.weight`, `tensor` one of
/// `lora_A`, `lora_B`, `lora_magnitude_vector`.
pub fn peft_parameter_name(module: &str, tensor: &str, adapter: &str) -> String {
    format!("base_model.model.{module}.{tensor}.{adapter}.weight")
}

impl LinearModule {
    pub fn in_features(&self) -> usize {
        match self {
            LinearModule::Dense(d) => d.weight.value().ncols(),
            LinearModule::Nf4(b) => b.in_features(),
            _ => self.adapted().map_or(0, |l| l.shape().1),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            LinearModule::Dense(d) => d.weight.value().nrows(),
            LinearModule::Nf4(b) => b.out_features(),
            _ => self.adapted().map_or(0, |l| l.shape().0),
        }
    }

    /// What the module is, for messages: `dense f32`, `LoRA`, `NF4`, `QLoRA`, `LoRA-QAT`.
    pub fn kind(&self) -> &'static str {
        match self {
            LinearModule::Dense(_) => "dense f32",
            LinearModule::Lora(_) => "LoRA",
            LinearModule::Nf4(_) => "NF4",
            LinearModule::Qlora(_) => "QLoRA",
            LinearModule::Qat(_) => "LoRA-QAT",
        }
    }

    /// The adapter layer, if this projection is adapted.
    pub fn adapted(&self) -> Option<&dyn AdaptedLayer> {
        match self {
            LinearModule::Dense(_) | LinearModule::Nf4(_) => None,
            LinearModule::Lora(l) => Some(l.as_ref()),
            LinearModule::Qlora(l) => Some(l.as_ref()),
            LinearModule::Qat(l) => Some(l.as_ref()),
        }
    }

    /// The adapter layer, mutably, if this projection is adapted.
    pub fn adapted_mut(&mut self) -> Option<&mut dyn AdaptedLayer> {
        match self {
            LinearModule::Dense(_) | LinearModule::Nf4(_) => None,
            LinearModule::Lora(l) => Some(l.as_mut()),
            LinearModule::Qlora(l) => Some(l.as_mut()),
            LinearModule::Qat(l) => Some(l.as_mut()),
        }
    }

    /// Turns a dense projection into an adapted one over the same (now frozen) `f32` weight,
    /// and an NF4 one into a QLoRA layer over the same codes, with no adapters yet; an
    /// adapted one is returned as it is. `path` names the module in errors.
    pub fn make_adapted(&mut self, path: &str) -> Result<&mut dyn AdaptedLayer> {
        if matches!(self, LinearModule::Nf4(_)) {
            // An empty dense module holds the place while the NF4 base moves into its layer.
            let empty = LinearModule::Dense(DenseLinear::new(Array2::zeros((0, 0))));
            if let LinearModule::Nf4(base) = std::mem::replace(self, empty) {
                *self = LinearModule::Qlora(Box::new(LoraLinear::new(*base, path)));
            }
        }
        if let LinearModule::Dense(d) = self {
            let weight = d.weight.value();
            let cols = weight.ncols().max(1);
            check_finite_at(
                &format!("{path}.weight"),
                weight.as_slice().unwrap_or_default(),
                |i| format!("element [{}, {}]", i / cols, i % cols),
            )?;
            let weight = std::mem::take(d.weight.value_mut());
            let bias = d.bias.take().map(|mut b| std::mem::take(b.value_mut()));
            *self = LinearModule::Lora(Box::new(LoraLinear::dense(weight, bias, path)?));
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
        let beta = if accumulate { 1.0 } else { 0.0 };
        match self {
            LinearModule::Dense(d) => {
                quant_core::linalg::gemm(1.0, x, d.weight.value().t(), beta, out.view_mut())?;
                if let Some(b) = &d.bias {
                    out += &b.value().view().insert_axis(Axis(0));
                }
            }
            LinearModule::Nf4(base) => {
                if accumulate {
                    let mut y = Array2::zeros(out.dim());
                    base.matmul_into(x, y.view_mut())?;
                    out += &y;
                } else {
                    base.matmul_into(x, out.view_mut())?;
                }
                if let Some(b) = base.bias() {
                    out += &b.insert_axis(Axis(0));
                }
            }
            _ => {
                let layer = self.adapted_mut().ok_or_else(|| LmError::AdapterState {
                    operation: "adapted forward".into(),
                    reason: "the module is not adapted".into(),
                })?;
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
            }
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
        if grad_output.nrows() != x.nrows() {
            return Err(LmError::shape(
                "linear backward: rows of grad_output vs input",
                x.nrows(),
                grad_output.nrows(),
            ));
        }
        let beta = if accumulate_input { 1.0 } else { 0.0 };
        match self {
            LinearModule::Dense(d) => {
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
                if let Some(gb) = d.bias.as_mut().and_then(|b| b.grad_mut()) {
                    *gb += &grad_output.sum_axis(Axis(0));
                }
            }
            // The 4-bit base is frozen: only the input gradient flows.
            LinearModule::Nf4(base) => {
                base.matmul_transposed_into(grad_output, beta, grad_input)?
            }
            _ => {
                let layer = self.adapted_mut().ok_or_else(|| LmError::AdapterState {
                    operation: "adapted backward".into(),
                    reason: "the module is not adapted".into(),
                })?;
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
            }
        }
        Ok(())
    }

    /// Makes the base weight trainable (allocating its gradient) or frozen (dropping it).
    /// Adapted modules keep their base frozen, as PEFT does; only adapters train there.
    pub fn set_base_trainable(&mut self, trainable: bool) {
        if let LinearModule::Dense(d) = self {
            d.weight.set_trainable(trainable);
            if let Some(b) = &mut d.bias {
                b.set_trainable(trainable);
            }
        }
    }

    /// Gives the frozen base a bias (`(out)`), as a family's checkpoint stores it: a dense
    /// weight keeps it as a parameter, an NF4 base holds it frozen. Errors on a wrong length
    /// or a module that already has adapters.
    pub fn attach_bias(&mut self, bias: Array1<f32>, path: &str) -> Result<()> {
        if bias.len() != self.out_features() {
            return Err(LmError::TensorShape {
                key: format!("{path}.bias"),
                expected: vec![self.out_features()],
                got: vec![bias.len()],
            });
        }
        match self {
            LinearModule::Dense(d) => {
                d.bias = Some(Parameter::new(bias));
                Ok(())
            }
            LinearModule::Nf4(base) => {
                let rebuilt = Nf4Base::from_four_bit(
                    base.weight().clone(),
                    Some(bias),
                    base.options().tile,
                    path,
                )?;
                **base = rebuilt;
                Ok(())
            }
            _ => Err(LmError::AdapterState {
                operation: format!("attaching a bias to {path}"),
                reason: format!("a {} module's base is already built", self.kind()),
            }),
        }
    }

    /// The frozen base's bias, if any.
    pub fn base_bias(&self) -> Option<ArrayView1<'_, f32>> {
        match self {
            LinearModule::Dense(d) => d.bias.as_ref().map(|b| b.value().view()),
            LinearModule::Nf4(base) => base.bias(),
            LinearModule::Lora(l) => l.base().bias(),
            LinearModule::Qlora(l) => l.base().bias(),
            LinearModule::Qat(q) => q.layer().bias(),
        }
    }

    /// Zeroes the base weight's gradient (if it trains) and every adapter gradient.
    pub fn zero_grad(&mut self) {
        match self {
            LinearModule::Dense(d) => {
                d.weight.zero_grad();
                if let Some(b) = &mut d.bias {
                    b.zero_grad();
                }
            }
            _ => {
                if let Some(layer) = self.adapted_mut() {
                    layer.zero_grad();
                }
            }
        }
    }

    /// The weight as a dense `f32` `(out, in)` matrix, for saving in Hugging Face layout
    /// (borrowed for dense weights; quantized bases dequantize). Merged adapters are part of
    /// an adapted module's base weight, as after PEFT's `merge_and_unload`.
    pub fn base_weight(&self) -> Result<CowArray<'_, f32, Ix2>> {
        match self {
            LinearModule::Dense(d) => Ok(CowArray::from(d.weight.value().view())),
            LinearModule::Nf4(base) => Ok(CowArray::from(base.dense_weight()?.into_owned())),
            _ => {
                let layer = self.adapted().ok_or_else(|| LmError::AdapterState {
                    operation: "reading the base weight".into(),
                    reason: "the module is neither dense nor adapted".into(),
                })?;
                Ok(match layer.base_weight()? {
                    Cow::Borrowed(w) => CowArray::from(w.view()),
                    Cow::Owned(w) => CowArray::from(w),
                })
            }
        }
    }

    /// Scalars of the base weight and of every adapter (and of a LoRA-QAT quantizer).
    pub fn parameter_count(&self) -> usize {
        match self {
            LinearModule::Dense(d) => {
                d.weight.value().len() + d.bias.as_ref().map_or(0, |b| b.value().len())
            }
            LinearModule::Nf4(base) => base.parameter_count(),
            LinearModule::Qat(q) => {
                let layer = q.layer();
                q.base_parameter_count()
                    + layer.adapter().parameter_count()
                    + layer.quantizer_params().len()
            }
            _ => self.adapted().map_or(0, |layer| {
                let adapters: usize = layer
                    .adapter_names()
                    .iter()
                    .filter_map(|n| layer.adapter(n).ok())
                    .map(|a| a.parameter_count())
                    .sum();
                layer.base_parameter_count() + adapters
            }),
        }
    }

    /// Calls `f` for every tensor of the module: a dense weight under `{path}.weight` (HF
    /// name); an adapted module's adapter tensors under PEFT's parameter names (see
    /// [`peft_parameter_name`]), with gradients for active adapters only; a LoRA-QAT
    /// module's quantizer steps after them under [`crate::quantizer_step_name`] (with a
    /// gradient when its adapter is active and the mode trains them). The frozen base of an
    /// adapted module belongs to its adapter layer and is not visited, nor is a frozen NF4
    /// base. Merged adapters cannot be visited (their values are folded into the base): an
    /// error says so.
    pub fn visit_parameters(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, ParamMut<'_>) -> Result<()>,
    ) -> Result<()> {
        if let LinearModule::Qat(q) = self {
            visit_adapter_tensors(q.as_mut(), path, f)?;
            let trains =
                !q.active().is_empty() && q.layer().mode() == lora_core::QatMode::QuantizeMerged;
            let (value, grad) = q.layer_mut().quantizer_params_and_grads_mut();
            let name = quantizer_step_name(path);
            return f(
                &name,
                ParamMut {
                    shape: vec![value.len()],
                    value,
                    grad: if trains { Some(grad) } else { None },
                },
            );
        }
        match self.adapted_mut() {
            None => match self {
                LinearModule::Dense(d) => {
                    let name = format!("{path}.weight");
                    let p = d.weight.as_param_mut(&name)?;
                    f(&name, p)?;
                    if let Some(b) = &mut d.bias {
                        let name = format!("{path}.bias");
                        f(&name, b.as_param_mut(&name)?)?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            },
            Some(layer) => visit_adapter_tensors(layer, path, f),
        }
    }

    /// Adds this module's resident bytes to `report`.
    pub(crate) fn add_memory(&self, report: &mut MemoryReport) {
        let f32_bytes = std::mem::size_of::<f32>();
        if let LinearModule::Qat(q) = self {
            // The quantizer's steps train like the adapter: counted with it, with a gradient.
            let steps = q.layer().quantizer_params();
            report.adapter_parameters += steps.len();
            report.adapter_bytes += std::mem::size_of_val(steps);
            report.gradient_bytes += std::mem::size_of_val(steps);
        }
        match self.adapted() {
            None => match self {
                LinearModule::Dense(d) => {
                    report.add_f32_parameter(d.weight.value().len(), d.weight.is_trainable());
                    if let Some(b) = &d.bias {
                        report.add_f32_parameter(b.value().len(), b.is_trainable());
                    }
                }
                LinearModule::Nf4(base) => {
                    report.add_quantized_base(
                        base.storage_kind(),
                        base.storage_bytes(),
                        base.parameter_count(),
                    );
                }
                _ => {}
            },
            Some(layer) => {
                let quantized = layer.base_storage_kind() != "f32";
                if quantized {
                    report.add_quantized_base(
                        layer.base_storage_kind(),
                        layer.base_storage_bytes(),
                        layer.base_parameter_count(),
                    );
                } else {
                    *report
                        .base_bytes_by_kind
                        .entry(layer.base_storage_kind().to_string())
                        .or_default() += layer.base_storage_bytes();
                    report.base_parameters += layer.base_parameter_count();
                }
                for name in layer.adapter_names() {
                    if let Ok(adapter) = layer.adapter(&name) {
                        let count = adapter.parameter_count();
                        report.adapter_parameters += count;
                        report.adapter_bytes += count * f32_bytes;
                        if quantized {
                            report.adapter_bytes_on_quantized_bases += count * f32_bytes;
                        }
                        // lora-core keeps a gradient buffer for every adapter it holds.
                        report.gradient_bytes += count * f32_bytes;
                    }
                }
            }
        }
    }

    pub(crate) fn check_grads_finite(&self, path: &str) -> Result<()> {
        if let LinearModule::Qat(q) = self {
            check_finite_at(
                &format!("gradient of {}", quantizer_step_name(path)),
                q.layer().grad_quantizer_params(),
                |i| format!("element [{i}]"),
            )?;
        }
        match self.adapted() {
            None => match self {
                LinearModule::Dense(d) => {
                    d.weight.check_grad_finite(&format!("{path}.weight"))?;
                    match &d.bias {
                        Some(b) => b.check_grad_finite(&format!("{path}.bias")),
                        None => Ok(()),
                    }
                }
                _ => Ok(()),
            },
            Some(layer) => {
                for name in layer.active() {
                    let adapter = layer.adapter(&name)?;
                    let mut grads = vec![
                        (
                            "lora_A",
                            adapter.grad_a().as_slice(),
                            adapter.grad_a().ncols(),
                        ),
                        (
                            "lora_B",
                            adapter.grad_b().as_slice(),
                            adapter.grad_b().ncols(),
                        ),
                    ];
                    if let Some(g) = adapter.grad_magnitude() {
                        grads.push(("lora_magnitude_vector", g.as_slice(), g.len()));
                    }
                    for (tensor, values, cols) in grads {
                        let cols = cols.max(1);
                        check_finite_at(
                            &format!("gradient of {}", peft_parameter_name(path, tensor, &name)),
                            values.unwrap_or_default(),
                            |i| format!("element [{}, {}]", i / cols, i % cols),
                        )?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// A contiguous tensor's flat buffer, or an error naming the tensor.
fn flat<'a>(what: &str, values: Option<&'a mut [f32]>) -> Result<&'a mut [f32]> {
    values.ok_or_else(|| {
        LmError::invalid(
            what,
            "non-contiguous tensor",
            "adapters are kept contiguous",
        )
    })
}

fn visit_adapter_tensors(
    layer: &mut dyn AdaptedLayer,
    path: &str,
    f: &mut dyn FnMut(&str, ParamMut<'_>) -> Result<()>,
) -> Result<()> {
    if layer.is_merged() {
        return Err(LmError::AdapterState {
            operation: format!("visiting the adapter parameters of {path}"),
            reason: "adapters are merged into the base weight; unmerge first".into(),
        });
    }
    let active = layer.active();
    for name in layer.adapter_names() {
        let trains = active.contains(&name);
        let tensors = layer.adapter_mut(&name)?.tensors_mut();
        let (a, grad_a) = tensors.a;
        let (b, grad_b) = tensors.b;
        let mut visit = |tensor: &str, shape: Vec<usize>, value, grad| -> Result<()> {
            let full = peft_parameter_name(path, tensor, &name);
            let value = flat(&full, value)?;
            let grad = flat(&full, grad)?;
            let grad = if trains { Some(grad) } else { None };
            f(&full, ParamMut { shape, value, grad })
        };
        visit(
            "lora_A",
            a.shape().to_vec(),
            a.as_slice_mut(),
            grad_a.as_slice_mut(),
        )?;
        visit(
            "lora_B",
            b.shape().to_vec(),
            b.as_slice_mut(),
            grad_b.as_slice_mut(),
        )?;
        if let Some((m, grad_m)) = tensors.magnitude {
            visit(
                "lora_magnitude_vector",
                vec![m.len()],
                m.as_slice_mut(),
                grad_m.as_slice_mut(),
            )?;
        }
    }
    Ok(())
}

impl PartialEq for LinearModule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (LinearModule::Dense(a), LinearModule::Dense(b)) => a == b,
            (LinearModule::Nf4(a), LinearModule::Nf4(b)) => a.weight() == b.weight(),
            (LinearModule::Qat(a), LinearModule::Qat(b)) => a == b,
            (LinearModule::Qat(_), _) | (_, LinearModule::Qat(_)) => false,
            _ => match (self.adapted(), other.adapted()) {
                (Some(a), Some(b)) => adapted_eq(a, b),
                _ => false,
            },
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
