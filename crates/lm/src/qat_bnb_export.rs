//! The bitsandbytes 4-bit export of a LoRA-QAT adapter trained on the NF4 grid (issue 13):
//! `merge --quantize nf4` writes, for each adapted projection, exactly the codes and absmax
//! scales the quantizer computed with in training — the trained absmax of every block and
//! the NF4 codes of `W + s·B·A` under it, double-quantized as the forward used them — in the
//! layout transformers saves a `BitsAndBytesConfig(load_in_4bit, nf4, double quant)` model
//! with, instead of re-quantizing the merged weight with bitsandbytes' quantizer (which
//! would take each block's absmax of the merged values and round the scales again).
//!
//! What can be exported so is what training computed with as one bitsandbytes tensor:
//! the merged mode on the NF4 grid, in per-block groups of a size bitsandbytes supports that
//! divide the rows (its blocks run over the flattened weight), with double-quantized scales
//! (the quantization config the merge writes says `bnb_4bit_use_double_quant`). Any other
//! LoRA-QAT adapter is refused by name rather than re-quantized: a ggml grid exports to GGUF
//! (`export-gguf`), per-channel NF4 scales are not bitsandbytes blocks, and the frozen-base
//! mode keeps its adapter beside `Q(W)`. FP4 has no trainable grid here.

use lora_core::QatMode;
use quant_core::config::QuantizerKind;
use quant_core::nf4::FourBitTensor;

use crate::error::{LmError, Result};
use crate::merge::MergedSource;

/// The trained 4-bit tensor to write for tensor `name` (a Hugging Face name,
/// `…q_proj.weight`) of an NF4 merge when `source`'s adapter is a LoRA-QAT adapter that
/// targets it; `None` for every other tensor (quantize it as usual). A LoRA-QAT adapter
/// that cannot be exported as bitsandbytes stores it is an error naming why (module docs).
pub fn trained_bnb4_tensor(source: &MergedSource, name: &str) -> Result<Option<FourBitTensor>> {
    let (Some((state, file)), Some(adapter)) = (source.qat_state(), source.adapter.as_ref()) else {
        return Ok(None);
    };
    let Some(module) = name.strip_suffix(".weight") else {
        return Ok(None);
    };
    let Some(weights) = adapter.modules.get(module) else {
        return Ok(None);
    };
    let refuse = |reason: String| LmError::AdapterState {
        operation: format!("writing the trained NF4 weight of {module} in bitsandbytes' layout"),
        reason: format!("{}: {reason}", file.display()),
    };
    let config = &state.config;
    if config.quantizer != QuantizerKind::Nf4 {
        return Err(refuse(format!(
            "the adapter trained on the {:?} grid; re-quantizing it to NF4 would discard what \
             training learned (a ggml grid exports with export-gguf --type of that grid)",
            config.quantizer
        )));
    }
    if state.mode != QatMode::QuantizeMerged {
        return Err(refuse(
            "it was trained in the frozen-base mode: its adapter is not part of the quantized \
             weight, so no single 4-bit tensor holds what training computed with"
                .into(),
        ));
    }
    if !config.double_quant {
        return Err(refuse(format!(
            "its absmax scales trained without double quantization ({:?}), while the \
             checkpoint written is double-quantized as bitsandbytes' QLoRA setting; train with \
             the bitsandbytes layout (lora-qat train --bnb-layout: blocks of 64, double quant)",
            config.granularity
        )));
    }
    let w = source.adapted_base_weight(name, weights, "bitsandbytes export")?;
    let mut layer = state.layer(w, weights, &adapter.config, module, file)?;
    Ok(Some(layer.export_bnb4()?))
}
