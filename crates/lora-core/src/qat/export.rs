//! Export of a [`LoraQatLinear`]'s quantized weight in stored layouts: quant-core's packed
//! layout, the NF4 grid's, and a ggml grid's blocks exactly as a GGUF file stores them.

use ndarray::Array2;
use quant_core::ggml::GgmlType;
use quant_core::io::OwnedTensor;
use quant_core::nf4::FourBitTensor;
use quant_core::packed_layout;
use quant_core::quantizer::DifferentiableQuantizer;
use quant_core::uniform::{GridKind, TensorQuantSpec};

use super::{merged_weight, Grid, LoraQatLinear, QatMode};
use crate::error::{LoraError, Result};

impl LoraQatLinear {
    /// The weight the exports quantize: `W + s·B·A` (merged mode) or `W` (frozen mode).
    fn export_target(&self) -> Result<Array2<f32>> {
        match self.mode {
            QatMode::QuantizeMerged => merged_weight(self.base.weight(), &self.adapter),
            QatMode::FrozenQuantizedBase => Ok(self.base.weight().clone()),
        }
    }

    /// The ggml type this layer's blocks are stored in: the config's ggml grid, or
    /// llama.cpp's fallback type when the rows did not divide into its blocks. `None` for
    /// the other grids.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        match &self.grid {
            Grid::Ggml(q) => Some(q.ggml_type()),
            _ => None,
        }
    }

    /// A ggml grid's trained weight as GGUF stores it: the type and the row-major blocks of
    /// `Q(W + s·B·A)` (merged mode) or `Q(W)` (frozen mode) with the current θ. Decoding
    /// them with `quant_core::ggml::dequantize` gives [`LoraQatLinear::effective_weight`]
    /// bit for bit (merged mode; in the frozen mode the adapter is not part of the blocks).
    /// Any other grid is an error naming the quantizer.
    ///
    /// ```
    /// use lora_core::qat::{LoraQatLinear, QatMode};
    /// use lora_core::{config::InitLoraWeights, AdapterOptions};
    /// use quant_core::config::QatConfig;
    /// use quant_core::ggml::{dequantize, GgmlType};
    /// use ndarray::Array2;
    /// let w = Array2::from_shape_fn((4, 64), |(i, j)| ((i * 64 + j) as f32 * 0.3).sin());
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.init = InitLoraWeights::Random;
    /// let config = QatConfig::ggml(GgmlType::Q4_0).unwrap();
    /// let mut layer = LoraQatLinear::new(w, None, &options, &config,
    ///                                    QatMode::QuantizeMerged, 7, "q_proj").unwrap();
    /// let (ty, blocks) = layer.export_ggml_blocks().unwrap();
    /// assert_eq!(ty, GgmlType::Q4_0);
    /// let deployed = dequantize(ty, &blocks, 256).unwrap();
    /// assert_eq!(deployed, layer.effective_weight().unwrap().into_raw_vec_and_offset().0);
    /// ```
    pub fn export_ggml_blocks(&mut self) -> Result<(GgmlType, Vec<u8>)> {
        let target = self.export_target()?;
        match &mut self.grid {
            Grid::Ggml(q) => Ok((q.ggml_type(), q.export_blocks(target.view())?)),
            _ => Err(LoraError::option(
                format!("quantizer of {}", self.context),
                format!("{:?}", self.config.quantizer),
                "only a ggml grid (q4_0 … q6_k) exports GGUF blocks",
            )),
        }
    }

    /// The NF4 grid's trained weight as bitsandbytes stores a 4-bit weight: the codes of
    /// `Q(W + s·B·A)` (merged mode) or `Q(W)` (frozen mode) under the trained absmax scales —
    /// double-quantized when the config says `double_quant`, as the forward used them — in
    /// the grid's blocks. Dequantizing it gives [`LoraQatLinear::effective_weight`] bit for
    /// bit (merged mode). Another grid, or a granularity that is not bitsandbytes' blocks,
    /// is an error naming it.
    ///
    /// ```
    /// use lora_core::qat::{LoraQatLinear, QatMode};
    /// use lora_core::{config::InitLoraWeights, AdapterOptions};
    /// use quant_core::config::{QatConfig, QuantizerKind};
    /// use quant_core::uniform::Granularity;
    /// use ndarray::Array2;
    /// let w = Array2::from_shape_fn((4, 64), |(i, j)| ((i * 64 + j) as f32 * 0.3).sin());
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.init = InitLoraWeights::Random;
    /// let config = QatConfig {
    ///     quantizer: QuantizerKind::Nf4, bits: 4, pi_k: None,
    ///     granularity: Granularity::PerBlock { size: 64 }, double_quant: true,
    ///     ..QatConfig::piq3()
    /// };
    /// let mut layer = LoraQatLinear::new(w, None, &options, &config,
    ///                                    QatMode::QuantizeMerged, 7, "q_proj").unwrap();
    /// let stored = layer.export_bnb4().unwrap();
    /// assert_eq!(stored.dequantize().into_raw_vec_and_offset().0,
    ///            layer.effective_weight().unwrap().into_raw_vec_and_offset().0);
    /// ```
    pub fn export_bnb4(&mut self) -> Result<FourBitTensor> {
        let target = self.export_target()?;
        match &mut self.grid {
            Grid::Nf4(q) => Ok(q.export_bnb4(target.view())?),
            _ => Err(LoraError::option(
                format!("quantizer of {}", self.context),
                format!("{:?}", self.config.quantizer),
                "only the nf4 grid exports a bitsandbytes 4-bit weight",
            )),
        }
    }

    /// The merged weight `W + s·B·A` quantized with the current θ, in a stored layout:
    ///
    /// * uniform and Pi grids: quant-core's packed layout ([`packed_layout::to_tensors`]):
    ///   `name.qweight` (codes, bit-packed), `name.qscale` (one step per group; for Pi the
    ///   step `α·π/k`), `name.qzero` (asymmetric only), `name.qstate` (JSON);
    /// * the NF4 grid: `name.qweight` (u8, two 4-bit codes per byte, the first in the high
    ///   nibble, as bitsandbytes packs), `name.qscale` (f32, one absmax scale per group in
    ///   row-major group order) and `name.qstate` (JSON: format `lora-qat.nf4_grid`,
    ///   version 1, granularity, shape). Value `i` of group `g` is `NF4[code_i]·scale_g`.
    ///
    /// * a ggml grid: `name.qweight` (u8, the blocks exactly as a GGUF tensor of that type
    ///   stores them, rows in order: [`LoraQatLinear::export_ggml_blocks`]) and `name.qstate`
    ///   (JSON: format `lora-qat.ggml_blocks`, version 1, `type` — the ggml type name, which is
    ///   llama.cpp's fallback type when the rows did not divide — and shape).
    ///
    /// In the frozen mode the exported weight is `Q(W)` (the adapter stays separate).
    /// A config with Hadamard incoherence cannot be exported (the rotation is not part of
    /// these layouts): an error says so.
    pub fn export(&mut self, name: &str) -> Result<Vec<(String, OwnedTensor)>> {
        let target = self.export_target()?;
        let spec = |kind| TensorQuantSpec {
            kind,
            bits: self.config.bits,
            granularity: self.config.granularity,
            symmetric: self.config.symmetric,
            init: self.config.init,
        };
        match &mut self.grid {
            Grid::Uniform(q) => {
                let stored = q.export(target.view())?;
                Ok(packed_layout::to_tensors(
                    name,
                    &stored,
                    &spec(GridKind::Uniform),
                )?)
            }
            Grid::Pi(q) => {
                let k = q.k();
                let stored = q.export(target.view())?;
                Ok(packed_layout::to_tensors(
                    name,
                    &stored,
                    &spec(GridKind::Pi { k }),
                )?)
            }
            Grid::Nf4(q) => {
                let out = q.forward(target.view())?;
                let codes: Vec<u8> = out.codes.iter().copied().collect();
                let packed: Vec<u8> = codes
                    .chunks(2)
                    .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(0))
                    .collect();
                let scales = q.params().to_vec();
                let state = serde_json::json!({
                    "format": "lora-qat.nf4_grid",
                    "version": 1,
                    "granularity": self.config.granularity,
                    "shape": target.dim(),
                });
                let json = state.to_string().into_bytes();
                Ok(vec![
                    (
                        format!("{name}.qweight"),
                        OwnedTensor::u8(vec![packed.len()], packed)?,
                    ),
                    (
                        format!("{name}.qscale"),
                        OwnedTensor::f32(vec![scales.len()], &scales)?,
                    ),
                    (
                        format!("{name}.qstate"),
                        OwnedTensor::u8(vec![json.len()], json)?,
                    ),
                ])
            }
            Grid::Ggml(q) => {
                let ty = q.ggml_type();
                let blocks = q.export_blocks(target.view())?;
                let state = serde_json::json!({
                    "format": "lora-qat.ggml_blocks",
                    "version": 1,
                    "type": ty.name(),
                    "shape": target.dim(),
                });
                let json = state.to_string().into_bytes();
                Ok(vec![
                    (
                        format!("{name}.qweight"),
                        OwnedTensor::u8(vec![blocks.len()], blocks)?,
                    ),
                    (
                        format!("{name}.qstate"),
                        OwnedTensor::u8(vec![json.len()], json)?,
                    ),
                ])
            }
            Grid::Rotated(_) => Err(LoraError::option(
                format!("incoherence of {}", self.context),
                "set",
                "a Hadamard-rotated quantizer cannot be exported to the packed layouts",
            )),
        }
    }
}
