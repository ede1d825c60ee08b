//! Where a model's tensors come from while it is built: [`ModelSource`].
//!
//! [`crate::LlamaModel::from_source`] asks a source for every norm and embedding
//! ([`ModelSource::take_f32`]) and for every projection as a ready [`LinearModule`]
//! ([`ModelSource::take_linear`]), so the source decides the projection's base: a Hugging
//! Face checkpoint gives dense `f32` weights ([`Checkpoint`]) or, for a bitsandbytes 4-bit
//! checkpoint, NF4 bases ([`Bnb4Checkpoint`]); a [`crate::lazy_checkpoint::LazyCheckpoint`]
//! reads each tensor when asked (NF4 where the file stores bnb 4-bit); a GGUF reader can keep
//! the file's ggml blocks (`LinearModule::ggml`).

use lora_core::{Nf4Base, Nf4Options};
use ndarray::{Array1, ArrayD, Ix1, Ix2};
use quant_core::nf4::bnb_layout::{from_bnb_tensors, BnbDtype, BnbTensor};
use quant_core::nf4::FourBitTensor;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{LmError, Result};
use crate::linear::LinearModule;

/// The tensors of a model, by Hugging Face name, as [`crate::LlamaModel::from_source`] takes
/// them. Names are those of transformers' `state_dict` (`model.embed_tokens.weight`,
/// `model.layers.0.input_layernorm.weight`, ...); a source stored under other names (GGUF's
/// `blk.0.attn_q`) maps them.
///
/// ```
/// use lm::{LinearModule, LlamaConfig, LlamaModel, ModelSource, Result};
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// /// Every weight 0.01, every norm 1: a source built in memory.
/// struct Constant;
/// impl ModelSource for Constant {
///     fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
///         let fill = if name.ends_with("norm.weight") { 1.0 } else { 0.01 };
///         Ok(ArrayD::from_elem(IxDyn(shape), fill))
///     }
///     fn take_linear(&mut self, _: &str, (out, inp): (usize, usize), bias: bool) -> Result<LinearModule> {
///         Ok(LinearModule::dense(Array2::from_elem((out, inp), 0.01), bias.then(|| Array1::zeros(out))))
///     }
/// }
/// let config = LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap();
/// let model = LlamaModel::from_source(config, &mut Constant).unwrap();
/// assert_eq!(model.layers().len(), 2);
/// ```
pub trait ModelSource {
    /// Tensor `name` as `f32` of exactly `shape`; a missing tensor or another shape is an
    /// error naming it.
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>>;

    /// The projection at module path `path` (`model.layers.0.self_attn.q_proj`, `lm_head`)
    /// of shape `(out, in)`, frozen, with the bias `{path}.bias` of length `out` when `bias`
    /// (the family has one there) — built on whatever base the source stores.
    fn take_linear(
        &mut self,
        path: &str,
        shape: (usize, usize),
        bias: bool,
    ) -> Result<LinearModule>;

    /// The token embedding `name` of shape `(vocab, hidden)`, frozen: a dense `f32` parameter
    /// unless the source keeps it in its own blocks (a GGUF file read as a quantized base).
    fn take_embedding(
        &mut self,
        name: &str,
        shape: (usize, usize),
    ) -> Result<crate::embedding::TokenEmbedding> {
        let e = take_matrix(self, name, [shape.0, shape.1])?;
        Ok(crate::embedding::TokenEmbedding::Dense(
            crate::param::Parameter::new(e),
        ))
    }

    /// Forgets tensor `name` if the source has it: one the model knows and deliberately does
    /// not use (a rotary `inv_freq` buffer, the copy of a tied `lm_head`).
    fn discard(&mut self, _name: &str) {}
}

/// `take_f32` as a matrix.
pub(crate) fn take_matrix<S: ModelSource + ?Sized>(
    source: &mut S,
    name: &str,
    shape: [usize; 2],
) -> Result<ndarray::Array2<f32>> {
    source
        .take_f32(name, &shape)?
        .into_dimensionality::<Ix2>()
        .map_err(|e| LmError::shape(name, format!("{shape:?}"), e))
}

/// `take_f32` as a vector.
pub(crate) fn take_vector<S: ModelSource + ?Sized>(
    source: &mut S,
    name: &str,
    len: usize,
) -> Result<Array1<f32>> {
    source
        .take_f32(name, &[len])?
        .into_dimensionality::<Ix1>()
        .map_err(|e| LmError::shape(name, len, e))
}

/// A checkpoint's tensors as dense `f32` projections; tensors taken are removed, so
/// [`Checkpoint::finish`] reports what nobody took.
impl ModelSource for Checkpoint {
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        Checkpoint::take_f32(self, name, shape)
    }

    fn take_linear(
        &mut self,
        path: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<LinearModule> {
        let weight = take_matrix(self, &format!("{path}.weight"), [out, inp])?;
        let bias = bias_of(self, path, out, bias)?;
        Ok(LinearModule::dense(weight, bias))
    }

    fn discard(&mut self, name: &str) {
        Checkpoint::discard(self, name)
    }
}

pub(crate) fn bias_of<S: ModelSource + ?Sized>(
    source: &mut S,
    path: &str,
    out: usize,
    bias: bool,
) -> Result<Option<Array1<f32>>> {
    bias.then(|| take_vector(source, &format!("{path}.bias"), out))
        .transpose()
}

/// The NF4 projection `path` from its 4-bit weight (checked to be `(out, in)`) and, when
/// `bias`, the source's `{path}.bias`.
pub(crate) fn nf4_linear<S: ModelSource + ?Sized>(
    source: &mut S,
    tensor: FourBitTensor,
    path: &str,
    (out, inp): (usize, usize),
    bias: bool,
) -> Result<LinearModule> {
    if tensor.shape() != [out, inp] {
        return Err(LmError::TensorShape {
            key: format!("{path}.weight"),
            expected: vec![out, inp],
            got: tensor.shape().to_vec(),
        });
    }
    let bias = bias_of(source, path, out, bias)?;
    let base = Nf4Base::from_four_bit(tensor, bias, Nf4Options::default().tile, path)?;
    Ok(LinearModule::nf4(base))
}

/// A bitsandbytes 4-bit checkpoint: projections stored in bnb's 4-bit layout become frozen
/// NF4 bases, the rest (modules bitsandbytes skipped, such as `lm_head`) dense `f32`.
pub struct Bnb4Checkpoint<'a>(pub &'a mut Checkpoint);

impl ModelSource for Bnb4Checkpoint<'_> {
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        self.0.take_f32(name, shape)
    }

    /// An NF4 base when the checkpoint holds `{path}.weight` in bnb's 4-bit layout
    /// (`.absmax`, `.quant_map`, `.nested_*`, `.quant_state.bitsandbytes__nf4`), else a dense
    /// weight. An FP4 weight or a 4-bit shape other than `(out, in)` is an error naming the key.
    fn take_linear(
        &mut self,
        path: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<LinearModule> {
        let ckpt = &mut *self.0;
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
            return ckpt.take_linear(path, (out, inp), bias);
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
        nf4_linear(self, tensor, path, (out, inp), bias)
    }

    fn discard(&mut self, name: &str) {
        self.0.discard(name)
    }
}

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
