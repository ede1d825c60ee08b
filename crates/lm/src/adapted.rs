//! The adapter side of a projection, whatever its base: the object-safe [`AdaptedLayer`]
//! trait the model drives adapters through (activate, merge, visit, save), implemented for
//! every `lora_core::LoraLinear<B: FrozenBase>` (LoRA, rsLoRA, DoRA over any base) and for
//! [`crate::QatLayer`] (LoRA-QAT). A new adapter kind is one more implementation.

use std::borrow::Cow;

use lora_core::{AdapterOptions, FrozenBase, LoraAdapter, LoraLinear};
use ndarray::{Array2, ArrayView2};

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
    /// Drops what the last forward kept for backward (inputs, adapter intermediates), as
    /// gradient checkpointing does after a layer's forward and after its backward.
    fn release_forward_state(&mut self);
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
    fn release_forward_state(&mut self) {
        LoraLinear::release_forward_state(self)
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
