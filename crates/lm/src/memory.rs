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
    /// Scalars of the base stored quantized (NF4 or ggml-block projections), a part of
    /// `base_parameters`.
    pub quantized_base_parameters: usize,
    /// Bytes of those quantized tensors (codes, block scales, double quantization's
    /// second-level scales and maps), a part of the base bytes.
    pub quantized_base_bytes: usize,
    /// Bytes of the adapters held by projections with a quantized base (QLoRA), a part of
    /// `adapter_bytes`.
    pub adapter_bytes_on_quantized_bases: usize,
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

    /// QLoRA's figure: bytes per quantized base parameter of the quantized projections,
    /// their adapters included — `(quantized base bytes + their adapters' bytes) / quantized
    /// base parameters` (gradients, activations and the unquantized tensors excluded);
    /// `None` without quantized projections. About 0.52 for NF4 with double quantization
    /// and blocksize 64, plus `4·r·(in + out)/(in·out)` for rank-`r` adapters.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// use lora_core::{LoraConfig, Nf4Options};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 256, 512, 1, 4, 4).unwrap(), 1).unwrap();
    /// assert_eq!(model.memory_report().qlora_bytes_per_parameter(), None);
    /// model.quantize_linears_nf4(&Nf4Options::default()).unwrap();
    /// model.inject_adapters(&LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]), "qlora", 0).unwrap();
    /// let figure = model.memory_report().qlora_bytes_per_parameter().unwrap();
    /// assert!(figure > 0.5 && figure < 0.6, "{figure}");
    /// ```
    pub fn qlora_bytes_per_parameter(&self) -> Option<f64> {
        if self.quantized_base_parameters == 0 {
            return None;
        }
        Some(
            (self.quantized_base_bytes + self.adapter_bytes_on_quantized_bases) as f64
                / self.quantized_base_parameters as f64,
        )
    }

    /// Counts a quantized base tensor of `count` scalars stored as `kind` in `bytes`.
    pub(crate) fn add_quantized_base(&mut self, kind: &str, bytes: usize, count: usize) {
        *self.base_bytes_by_kind.entry(kind.to_string()).or_default() += bytes;
        self.base_parameters += count;
        self.quantized_base_parameters += count;
        self.quantized_base_bytes += bytes;
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

impl std::fmt::Display for MemoryReport {
    /// One line per kind, in MiB, then the per-parameter figures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
        for (kind, bytes) in &self.base_bytes_by_kind {
            writeln!(f, "base {kind:<6} {:>12.3} MiB", mib(*bytes))?;
        }
        writeln!(
            f,
            "adapters    {:>12.3} MiB ({} parameters)",
            mib(self.adapter_bytes),
            self.adapter_parameters
        )?;
        writeln!(f, "gradients   {:>12.3} MiB", mib(self.gradient_bytes))?;
        writeln!(f, "total       {:>12.3} MiB", mib(self.total_bytes()))?;
        write!(
            f,
            "base bytes per base parameter: {:.4}",
            self.bytes_per_base_parameter()
        )?;
        if let Some(figure) = self.qlora_bytes_per_parameter() {
            write!(
                f,
                "\nQLoRA bytes per quantized base parameter (quantized projections + their adapters): \
                 {figure:.4}"
            )?;
        }
        Ok(())
    }
}
