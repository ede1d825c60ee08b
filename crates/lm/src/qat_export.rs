//! The GGUF export of a LoRA-QAT adapter trained on one of ggml's grids (`q4_0` … `q6_k`,
//! issue 13): the tensor written for each adapted projection is exactly the blocks the
//! quantizer computed with in training — its trained f16 scales (and minima, sub-block
//! scales) and the codes of `W + s·B·A` under them — not a re-quantization of the merged
//! weight by ggml's quantizer, which would pick other scales. `gguf::export_gguf` calls
//! [`trained_gguf_blocks`] for every tensor; `None` means "quantize as usual".

use std::path::Path;

use lora_core::peft;
use lora_core::{AdapterOptions, LoraAdapter, LoraConfig, LoraLinear, LoraQatLinear, QatMode};
use ndarray::Array2;
use quant_core::config::QatConfig;
use quant_core::ggml::GgmlType;

use crate::error::{LmError, Result};
use crate::gguf::names::Transform;
use crate::merge::MergedSource;
use crate::model::LlamaModel;
use crate::qat::QatState;
use crate::LinearModule;

impl QatState {
    /// The trained blocks of `module` on a ggml grid: its type (llama.cpp's fallback type
    /// when the rows did not divide) and the row-major blocks of `Q(W + s·B·A)`. `None` when
    /// the state's grid is not a ggml one. The frozen-base mode on a ggml grid has no such
    /// form (its adapter sits beside `Q(W)`): an error says so.
    pub(crate) fn quantized_blocks(
        &self,
        weight: Array2<f32>,
        adapter: &peft::AdapterWeights,
        lora: &LoraConfig,
        module: &str,
        file: &Path,
    ) -> Result<Option<(GgmlType, Vec<u8>)>> {
        let Some(grid) = self.config.quantizer.ggml_type() else {
            return Ok(None);
        };
        if self.mode != QatMode::QuantizeMerged {
            return Err(LmError::AdapterState {
                operation: format!("exporting the {grid} blocks of {module}"),
                reason: format!(
                    "{} was trained in the frozen-base mode: its adapter is not part of the \
                     blocks, so no single {grid} tensor holds what training computed with",
                    file.display()
                ),
            });
        }
        let options = AdapterOptions::from_config(lora, module);
        let adapter = LoraAdapter::from_weights(
            adapter.a.clone(),
            adapter.b.clone(),
            adapter.magnitude.clone(),
            &options,
            LoraLinear::<lora_core::DenseBase>::derive_seed(0, module),
            module,
        )?;
        let mut layer =
            LoraQatLinear::with_adapter(weight, None, adapter, &self.config, self.mode, module)?;
        self.copy_steps(&mut layer, module, file)?;
        Ok(Some(layer.export_ggml_blocks()?))
    }
}

/// The bytes to write for tensor `name` (a Hugging Face name, `…q_proj.weight`) of a GGUF
/// export in type `ty` when `source`'s adapter is a LoRA-QAT adapter on a ggml grid that
/// targets it: the trained blocks, with the tensor's name-table `transform` applied to whole
/// rows (llama.cpp's Q/K row order; `heads` = `(num_attention_heads, num_key_value_heads)`).
/// `None` for every other tensor (quantize it as usual). A requested type other than the
/// trained one is an error naming both: re-quantizing would discard what training learned.
pub fn trained_gguf_blocks(
    source: &MergedSource,
    name: &str,
    ty: GgmlType,
    transform: Transform,
    heads: (usize, usize),
) -> Result<Option<Vec<u8>>> {
    let (Some((state, file)), Some(adapter)) = (source.qat_state(), source.adapter.as_ref()) else {
        return Ok(None);
    };
    let Some(module) = name.strip_suffix(".weight") else {
        return Ok(None);
    };
    let Some(weights) = adapter.modules.get(module) else {
        return Ok(None);
    };
    let w = source.adapted_base_weight(name, weights, "QAT export")?;
    let Some((trained, blocks)) =
        state.quantized_blocks(w, weights, &adapter.config, module, file)?
    else {
        return Ok(None);
    };
    if trained != ty {
        return Err(LmError::InvalidArgument {
            name: format!("GGUF type of {name}"),
            value: ty.name().to_string(),
            reason: format!(
                "the LoRA-QAT adapter ({}) trained this tensor on {}'s grid; export with that \
                 type so the file holds the trained blocks",
                file.display(),
                trained.name()
            ),
        });
    }
    Ok(Some(match transform {
        Transform::Identity => blocks,
        Transform::RopeRows(group) => {
            permute_block_rows(&blocks, weights.b.nrows(), group.count(heads), name)?
        }
        Transform::PlusOne => {
            return Err(LmError::AdapterState {
                operation: format!("exporting the trained blocks of {name}"),
                reason: "the tensor is stored with +1 added (a norm), which blocks cannot carry"
                    .into(),
            })
        }
    }))
}

/// llama.cpp's rotary row order for Q/K applied to whole rows of blocks: within each head,
/// row `j·(d/2) + i` moves to `2·i + j` (as `gguf::permute_rope_rows` does for values).
/// Blocks run along a row, so a row's bytes move as one.
fn permute_block_rows(bytes: &[u8], rows: usize, heads: usize, name: &str) -> Result<Vec<u8>> {
    if heads == 0 || rows == 0 || rows % (2 * heads) != 0 || bytes.len() % rows != 0 {
        return Err(LmError::shape(
            format!("rotary row permutation of {name}"),
            format!("{heads} heads of an even number of rows, {rows} rows"),
            format!("{} bytes", bytes.len()),
        ));
    }
    let row_bytes = bytes.len() / rows;
    let (head, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let (from, to) = (h * head + j * half + i, h * head + 2 * i + j);
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&bytes[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

impl LlamaModel {
    /// The `QatConfig` of the model's LoRA-QAT layers (the first one's; a saved adapter
    /// holds one for all), `None` without LoRA-QAT layers. The trainer reads it to know
    /// which initialisations a calibration may try (a ggml grid has only ggml's own).
    pub fn qat_config(&self) -> Option<QatConfig> {
        self.linear_modules()
            .into_iter()
            .find_map(|(_, lin)| match lin {
                LinearModule::Qat(q) => Some(*q.layer().config()),
                _ => None,
            })
    }
}
