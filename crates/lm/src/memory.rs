//! Resident memory of a model by kind: what the weights, adapters and gradients occupy.

use std::collections::BTreeMap;

/// Bytes a model holds, by kind (from [`crate::LlamaModel::memory_report`]).
///
/// Base tensors (embedding, norms, projections, LM head) are counted by storage kind
/// (`"f32"`, and the kinds quantized bases report through `FrozenBase::storage_kind`);
/// adapters and gradient buffers apart. Activations of a forward pass and optimizer state are
/// not included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryReport {
    /// Bytes of base tensors by storage kind.
    pub base_bytes_by_kind: BTreeMap<String, usize>,
    /// Scalars of the base (embedding, norms, projections, LM head).
    pub base_parameters: usize,
    /// Scalars of every adapter held (`A`, `B`, DoRA's `m`), active or not.
    pub adapter_parameters: usize,
    /// Bytes of those adapter tensors.
    pub adapter_bytes: usize,
    /// Bytes of gradient buffers: trainable base parameters and every adapter.
    pub gradient_bytes: usize,
}

impl MemoryReport {
    /// Bytes of all base tensors.
    pub fn base_bytes(&self) -> usize {
        self.base_bytes_by_kind.values().sum()
    }

    /// Base bytes per base parameter: 4 for an all-`f32` model, about 0.5 plus the
    /// unquantized tensors' share for a 4-bit one.
    pub fn bytes_per_base_parameter(&self) -> f64 {
        if self.base_parameters == 0 {
            return 0.0;
        }
        self.base_bytes() as f64 / self.base_parameters as f64
    }

    /// Everything counted: base, adapters and gradients.
    pub fn total_bytes(&self) -> usize {
        self.base_bytes() + self.adapter_bytes + self.gradient_bytes
    }

    /// Counts an `f32` base tensor of `count` scalars (and its gradient when it trains).
    pub(crate) fn add_f32_parameter(&mut self, count: usize, trainable: bool) {
        let bytes = count * std::mem::size_of::<f32>();
        *self.base_bytes_by_kind.entry("f32".into()).or_default() += bytes;
        self.base_parameters += count;
        if trainable {
            self.gradient_bytes += bytes;
        }
    }
}
