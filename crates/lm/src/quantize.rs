//! Quantized projections: loading bitsandbytes 4-bit checkpoints as NF4 bases, quantizing a
//! loaded model's projections to NF4 (QLoRA) or round-to-nearest on a QAT grid (post-training
//! quantization), and folding adapters back into dense weights.

use lora_core::{Nf4Base, Nf4Options};
use ndarray::Array2;
use quant_core::config::QatConfig;
use quant_core::nf4::bnb_layout::{from_bnb_tensors, BnbDtype, BnbTensor};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{LmError, Result};
use crate::linear::{DenseLinear, LinearModule};
use crate::model::{dense_linear_from_checkpoint, LlamaModel};

/// Checks that a checkpoint's `quantization_config` is one this crate loads: bitsandbytes,
/// 4-bit, NF4 (with or without double quantization). Anything else (8-bit, FP4, GPTQ, AWQ,
/// ...) is an [`LmError::Unsupported`] naming the key and value.
///
/// ```
/// let ok = serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
///                             "bnb_4bit_quant_type": "nf4"});
/// lm::quantize::check_bnb4_config(&ok).unwrap();
/// let gptq = serde_json::json!({"quant_method": "gptq", "bits": 4});
/// assert!(lm::quantize::check_bnb4_config(&gptq).unwrap_err().to_string().contains("gptq"));
/// ```
pub fn check_bnb4_config(q: &Value) -> Result<()> {
    let unsupported = |key: &str, value: &Value, reason: &str| LmError::Unsupported {
        key: format!("quantization_config.{key}"),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let field = |key: &str| q.get(key).unwrap_or(&Value::Null);
    let method = field("quant_method");
    if method.as_str() != Some("bitsandbytes") {
        return Err(unsupported(
            "quant_method",
            method,
            "only bitsandbytes 4-bit (NF4) checkpoints are loaded",
        ));
    }
    let flag = |key: &str| field(key).as_bool().unwrap_or(false);
    if flag("load_in_8bit") || flag("_load_in_8bit") {
        return Err(unsupported(
            "load_in_8bit",
            &Value::Bool(true),
            "LLM.int8 checkpoints are not supported; only 4-bit NF4",
        ));
    }
    if !(flag("load_in_4bit") || flag("_load_in_4bit")) {
        return Err(unsupported(
            "load_in_4bit",
            field("load_in_4bit"),
            "a bitsandbytes checkpoint must be 4-bit to load",
        ));
    }
    let quant_type = field("bnb_4bit_quant_type");
    if quant_type.as_str().unwrap_or("nf4") != "nf4" {
        return Err(unsupported(
            "bnb_4bit_quant_type",
            quant_type,
            "only NF4 bases are supported (QLoRA's type)",
        ));
    }
    Ok(())
}

/// Takes the projection at `path` of shape `(out, in)` from a bitsandbytes 4-bit checkpoint:
/// an NF4 base ([`LinearModule::Nf4`]) when the checkpoint holds `{path}.weight` in bnb's
/// 4-bit layout (`.absmax`, `.quant_map`, `.nested_*`, `.quant_state.bitsandbytes__nf4`),
/// else a dense weight (modules bitsandbytes skipped, such as `lm_head`). An FP4 weight or a
/// 4-bit shape other than `(out, in)` is an error naming the key.
pub fn bnb4_linear_from_checkpoint(
    path: &str,
    shape: [usize; 2],
    ckpt: &mut Checkpoint,
) -> Result<LinearModule> {
    let weight_key = format!("{path}.weight");
    let fp4_key = format!("{weight_key}.quant_state.bitsandbytes__fp4");
    if ckpt.contains(&fp4_key) {
        return Err(LmError::Unsupported {
            key: fp4_key,
            value: "fp4".into(),
            reason: "only NF4 bases are supported (QLoRA's type)".into(),
        });
    }
    if !ckpt.contains(&format!("{weight_key}.quant_state.bitsandbytes__nf4")) {
        return dense_linear_from_checkpoint(path, shape, ckpt);
    }
    let mut bad_dtype: Option<LmError> = None;
    let tensor = from_bnb_tensors(&weight_key, |key| {
        let stored = ckpt.take(key)?;
        let dtype = match stored.dtype {
            safetensors::Dtype::U8 => BnbDtype::U8,
            safetensors::Dtype::F32 => BnbDtype::F32,
            other => {
                bad_dtype.get_or_insert(LmError::TensorDtype {
                    key: key.to_string(),
                    dtype: format!("{other:?} (a bnb 4-bit part is U8 or F32)"),
                });
                return None;
            }
        };
        Some(BnbTensor {
            dtype,
            shape: stored.shape,
            bytes: stored.bytes,
        })
    });
    let tensor = match (tensor, bad_dtype) {
        (Err(_), Some(err)) => return Err(err),
        (result, _) => result?,
    };
    if tensor.shape() != shape {
        return Err(LmError::TensorShape {
            key: weight_key,
            expected: shape.to_vec(),
            got: tensor.shape().to_vec(),
        });
    }
    let base = Nf4Base::from_four_bit(tensor, None, Nf4Options::default().tile, path)?;
    Ok(LinearModule::Nf4(Box::new(base)))
}

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
        if let Some((path, lin)) = linears
            .iter()
            .find(|(_, lin)| !matches!(lin, LinearModule::Dense(_)))
        {
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
            let LinearModule::Dense(d) = &**lin else {
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
            *lin = LinearModule::Nf4(Box::new(base));
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
            let LinearModule::Dense(d) = &**lin else {
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
            let dense = DenseLinear::new(w_q);
            *lin = LinearModule::Dense(match bias {
                Some(b) => dense.with_bias(b),
                None => dense,
            });
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
            let dense = DenseLinear::new(w);
            *self.linear_module_mut(&path)? = LinearModule::Dense(match bias {
                Some(b) => dense.with_bias(b),
                None => dense,
            });
        }
        self.adapter_configs.clear();
        self.active_adapters.clear();
        Ok(count)
    }
}
