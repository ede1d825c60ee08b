//! Quantized projections: quantizing a loaded model's projections to NF4 (QLoRA) or
//! round-to-nearest on a QAT grid (post-training quantization), and folding adapters back
//! into dense weights. Loading bitsandbytes 4-bit checkpoints is [`crate::source`]'s.

use lora_core::{Nf4Base, Nf4Options};
use ndarray::Array2;
use quant_core::config::QatConfig;

use crate::error::{LmError, Result};
use crate::linear::LinearModule;
use crate::model::LlamaModel;
pub use crate::source::{check_bnb4_config, Bnb4Checkpoint};

/// What [`LlamaModel::quantize_linears_rtn`] did to one projection.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearQuantization {
    /// Hugging Face module path.
    pub path: String,
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// Mean squared error `‖Q(W) − W‖² / n`.
    pub mse: f64,
    /// Relative error `‖Q(W) − W‖ / ‖W‖` (Frobenius).
    pub relative_error: f64,
}

/// The result of a post-training quantization of the model's projections.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationReport {
    /// The config every projection was quantized with.
    pub config: QatConfig,
    /// One entry per projection, in model order.
    pub modules: Vec<LinearQuantization>,
}

impl QuantizationReport {
    /// Weights quantized in all.
    pub fn weights(&self) -> usize {
        self.modules.iter().map(|m| m.shape.0 * m.shape.1).sum()
    }

    /// `‖Q(W) − W‖ / ‖W‖` over all projections together.
    pub fn relative_error(&self) -> f64 {
        let (mut err, mut norm) = (0.0, 0.0);
        for m in &self.modules {
            let n = (m.shape.0 * m.shape.1) as f64;
            err += m.mse * n;
            if m.relative_error > 0.0 {
                norm += m.mse * n / (m.relative_error * m.relative_error);
            }
        }
        if norm > 0.0 {
            (err / norm).sqrt()
        } else {
            0.0
        }
    }
}

impl LlamaModel {
    /// The decoder projections (not `lm_head`) with their paths, checked to be dense `f32`
    /// (quantization comes before adapters); `operation` names the caller in errors.
    fn dense_decoder_linears(
        &mut self,
        operation: &str,
    ) -> Result<Vec<(String, &mut LinearModule)>> {
        let linears: Vec<(String, &mut LinearModule)> = self
            .linear_modules_mut()
            .filter(|(path, _)| path != "lm_head")
            .collect();
        if let Some((path, lin)) = linears.iter().find(|(_, lin)| !lin.is_dense()) {
            return Err(LmError::AdapterState {
                operation: format!("{operation} ({path})"),
                reason: format!(
                    "the projection is {}; only dense f32 projections are quantized (quantize \
                     before injecting adapters)",
                    lin.kind()
                ),
            });
        }
        Ok(linears)
    }

    /// Quantizes every decoder projection (`q/k/v/o_proj`, `gate/up/down_proj`; `lm_head`
    /// stays `f32`, as bitsandbytes leaves it) to an NF4 base with `options` (QLoRA's
    /// defaults: blocksize 64, double quantization), as `load_in_4bit` would. Adapters
    /// injected afterwards make them QLoRA layers. Errors (changing nothing) when a
    /// projection is not dense `f32`. Returns the number quantized.
    pub fn quantize_linears_nf4(&mut self, options: &Nf4Options) -> Result<usize> {
        let linears = self.dense_decoder_linears("quantizing to NF4")?;
        let mut bases = Vec::with_capacity(linears.len());
        for (path, lin) in &linears {
            let Some(d) = lin.as_dense() else {
                continue;
            };
            bases.push(Nf4Base::quantize(
                d.weight().value().view(),
                d.bias().map(|b| b.value().clone()),
                options,
                path,
            )?);
        }
        let count = bases.len();
        for ((_, lin), base) in linears.into_iter().zip(bases) {
            *lin = LinearModule::nf4(base);
        }
        Ok(count)
    }

    /// Post-training quantization by round-to-nearest: replaces every decoder projection's
    /// weight (`lm_head` stays `f32`) with `Q(W)` dequantized, `Q` the quantizer `qat`
    /// describes (grid, bits, per-channel / per-group / per-tensor granularity, optional
    /// Hadamard rotation), its steps fitted to `W` by `qat.init` (absmax, or the MSE clip
    /// search). The model stays `f32`, computing with the quantized values: what a
    /// round-to-nearest deployment of the config computes. Errors (changing nothing) when a
    /// projection is not dense `f32`.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// use quant_core::config::QatConfig;
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 3).unwrap();
    /// let report = model.quantize_linears_rtn(&QatConfig::piq3()).unwrap();
    /// assert_eq!(report.modules.len(), 7);
    /// assert!(report.relative_error() > 0.0 && report.relative_error() < 0.5);
    /// ```
    pub fn quantize_linears_rtn(&mut self, qat: &QatConfig) -> Result<QuantizationReport> {
        qat.validate()?;
        let linears = self.dense_decoder_linears("round-to-nearest quantization")?;
        let mut quantized = Vec::with_capacity(linears.len());
        let mut modules = Vec::with_capacity(linears.len());
        for (path, lin) in &linears {
            let Some(d) = lin.as_dense() else {
                continue;
            };
            let w = d.weight().value();
            let (out_features, in_features) = w.dim();
            let mut quantizer = qat.build_for_weight(out_features, in_features)?;
            quantizer.init_from_weights(w.view(), qat.init)?;
            let w_q = quantizer.forward(w.view())?.dequantized;
            crate::error::check_finite_at(
                &format!("quantized weight of {path}"),
                w_q.as_slice().unwrap_or_default(),
                |i| format!("element [{}, {}]", i / in_features, i % in_features),
            )?;
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for (a, b) in w_q.iter().zip(w.iter()) {
                err += f64::from(a - b).powi(2);
                norm += f64::from(*b).powi(2);
            }
            modules.push(LinearQuantization {
                path: path.clone(),
                shape: (out_features, in_features),
                mse: err / w.len() as f64,
                relative_error: if norm > 0.0 { (err / norm).sqrt() } else { 0.0 },
            });
            quantized.push((w_q, d.bias().map(|b| b.value().clone())));
        }
        for ((_, lin), (w_q, bias)) in linears.into_iter().zip(quantized) {
            *lin = LinearModule::dense(w_q, bias);
        }
        Ok(QuantizationReport {
            config: *qat,
            modules,
        })
    }

    /// PEFT's `merge_and_unload`: every adapted projection becomes a dense `f32` projection
    /// computing what it computed with its active adapters — base (dequantized for QLoRA)
    /// plus their `ΔW`; a LoRA-QAT layer its quantized weight `Q(W + s·B·A)` — and the model
    /// forgets its adapters. Unadapted NF4 projections stay NF4. Returns the number of
    /// projections merged.
    pub fn merge_and_unload(&mut self) -> Result<usize> {
        let mut merged: Vec<(String, Array2<f32>, Option<ndarray::Array1<f32>>)> = Vec::new();
        for (path, lin) in self.linear_modules_mut() {
            let bias = lin.base_bias().map(|b| b.to_owned());
            if let Some(layer) = lin.adapted_mut() {
                let w = if layer.is_merged() {
                    layer.base_weight()?.into_owned()
                } else {
                    layer.merged_weight()?
                };
                merged.push((path, w, bias));
            }
        }
        let count = merged.len();
        for (path, w, bias) in merged {
            *self.linear_module_mut(&path)? = LinearModule::dense(w, bias);
        }
        self.adapter_configs.clear();
        self.active_adapters.clear();
        Ok(count)
    }
}
