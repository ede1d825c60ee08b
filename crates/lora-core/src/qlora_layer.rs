//! The QLoRA layer: LoRA over an NF4 base ([`QLoraLinear`] = `LoraLinear<Nf4Base>`), built
//! by quantizing a weight or by LoftQ, and merged back to `f32` or to a new NF4 base.

use ndarray::{Array1, Array2, ArrayView2};

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::error::{LoraError, Result};
use crate::linear::LoraLinear;
use crate::qlora::{loftq_init, LoftqConfig, Nf4Base, Nf4Options};

/// A LoRA layer over an NF4 base: QLoRA.
///
/// ```
/// use lora_core::qlora::Nf4Options;
/// use lora_core::QLoraLinear;
/// use lora_core::{config::InitLoraWeights, AdapterOptions};
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((16, 64), |(i, j)| ((i * 64 + j) as f32 * 0.11).cos());
/// let mut layer = QLoraLinear::qlora(w.view(), None, &Nf4Options::default(), "q_proj").unwrap();
/// let mut options = AdapterOptions::new(4, 8.0);
/// options.init = InitLoraWeights::Random;
/// layer.add_adapter("default", &options, 1).unwrap();
/// let x = Array2::from_shape_fn((5, 64), |(t, j)| ((t * 7 + j) as f32).sin());
/// let y = layer.forward(x.view()).unwrap();
/// let dx = layer.backward(Array2::ones((5, 16)).view()).unwrap();
/// assert_eq!((y.dim(), dx.dim()), ((5, 16), (5, 64)));
/// // The base is 4-bit: merging makes a new weight instead of editing it.
/// assert!(layer.merge().is_err());
/// let merged = layer.merge_to_f32().unwrap();
/// let y_merged = x.dot(&merged.t());
/// assert!(y.iter().zip(y_merged.iter()).all(|(a, b)| (a - b).abs() < 1e-3));
/// ```
pub type QLoraLinear = LoraLinear<Nf4Base>;

impl LoraLinear<Nf4Base> {
    /// A QLoRA layer: quantizes `weight: (out, in)` to NF4 with `options`.
    pub fn qlora(
        weight: ArrayView2<'_, f32>,
        bias: Option<Array1<f32>>,
        options: &Nf4Options,
        context: &str,
    ) -> Result<Self> {
        Ok(LoraLinear::new(
            Nf4Base::quantize(weight, bias, options, context)?,
            context,
        ))
    }

    /// `deq(W) + Σ_active s·B·A` (DoRA-normalised where applicable) as a new dense `f32`
    /// weight; the layer is unchanged.
    pub fn merge_to_f32(&self) -> Result<Array2<f32>> {
        self.merged_weight()
    }

    /// The active adapters folded into the base and re-quantized to NF4 with the base's
    /// options: a new base (bias kept); the layer is unchanged. As in PEFT's 4-bit merge, the
    /// result carries a fresh NF4 rounding error on top of `deq(W) + ΔW`.
    pub fn merge_to_nf4(&self) -> Result<Nf4Base> {
        let merged = self.merged_weight()?;
        self.base().requantized(merged.view())
    }
}

impl LoraLinear<Nf4Base> {
    /// A QLoRA layer initialised by LoftQ ([`loftq_init`]): NF4 base and adapter `name`
    /// (active) whose `s·B·A` fits the quantization residual. `seed` drives its dropout.
    pub fn loftq(
        weight: ArrayView2<'_, f32>,
        bias: Option<Array1<f32>>,
        name: &str,
        adapter: &AdapterOptions,
        config: &LoftqConfig,
        seed: u64,
        context: &str,
    ) -> Result<Self> {
        if adapter.use_dora {
            return Err(LoraError::option(
                format!("use_dora for {context}"),
                true,
                "LoftQ initialises plain LoRA adapters",
            ));
        }
        let init = loftq_init(weight, adapter, config, context)?;
        let base = Nf4Base::from_four_bit(
            init.base.into_four_bit(),
            bias,
            config.quantization.tile,
            context,
        )?;
        let adapter = LoraAdapter::from_weights(init.a, init.b, None, adapter, seed, context)?;
        let mut layer = LoraLinear::new(base, context);
        layer.insert_adapter(name, adapter)?;
        Ok(layer)
    }
}
