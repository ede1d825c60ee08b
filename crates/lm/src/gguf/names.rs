//! The one table between Hugging Face tensor names and llama.cpp's GGUF tensor names, per
//! family, used in both directions: export (HF → GGUF) and reading a GGUF file back into our
//! models (GGUF → HF).
//!
//! For each family ([`FamilyNames::of`]) it lists
//! - the GGUF architecture name (`general.architecture`): Mistral is written as `llama`, as
//!   llama.cpp's converter registers `MistralForCausalLM` with its Llama class;
//! - the global tensors and the per-layer tensors (`model.layers.{i}.<hf>` ↔ `blk.{i}.<gguf>`),
//!   each with the `.weight` / `.bias` suffix carried over unchanged;
//! - how values change on the way ([`Transform`]): llama.cpp's rotary row permutation of
//!   `attn_q` / `attn_k` (weights and biases) for the `llama` architecture only (the other
//!   families use NeoX-style rotation on the Hugging Face row order), and the `+1` added to
//!   every Gemma norm weight (`Gemma*RMSNorm` computes `x̂·(1 + w)`, llama.cpp `x̂·w`);
//! - fused tensors ([`Fusion`]): Phi-3's `qkv_proj` → `attn_qkv` (rows q, k, v) and
//!   `gate_up_proj` → `ffn_up` (rows gate, then up), stored fused on both sides;
//! - extra tensors the converter computes from the config ([`ExtraTensor`]): Llama 3's
//!   `rope_freqs` and Phi-3's `rope_factors_long` / `rope_factors_short`.
//!
//! Facts from llama.cpp's `gguf-py/gguf/constants.py` (`MODEL_TENSORS`, `TENSOR_NAMES`),
//! `tensor_mapping.py` and the converter classes (`LlamaModel.permute`, `Gemma*Model.
//! modify_tensors`, `LlamaModel.generate_extra_tensors`, `Phi3MiniModel.generate_extra_tensors`).
//!
//! ```
//! use lm::family::Family;
//! use lm::gguf::names::{FamilyNames, Transform, HeadGroup};
//! let gemma = FamilyNames::of(Family::Gemma2);
//! assert_eq!(gemma.arch, "gemma2");
//! let m = gemma.to_gguf("model.layers.1.pre_feedforward_layernorm.weight").unwrap().unwrap();
//! assert_eq!(m.name, "blk.1.ffn_norm.weight");
//! assert_eq!(m.transform, Transform::PlusOne);
//! let back = gemma.to_hf("blk.1.ffn_norm.weight").unwrap();
//! assert_eq!(back.name, "model.layers.1.pre_feedforward_layernorm.weight");
//! let llama = FamilyNames::for_arch("llama").unwrap();
//! let q = llama.to_gguf("model.layers.0.self_attn.q_proj.weight").unwrap().unwrap();
//! assert_eq!((q.name.as_str(), q.transform), ("blk.0.attn_q.weight", Transform::RopeRows(HeadGroup::Query)));
//! assert_eq!(FamilyNames::of(Family::Mistral).arch, "llama");
//! ```

use crate::error::{LmError, Result};
use crate::family::Family;
use crate::rope::{Rope, RopeScaling};

/// Which head count the rotary row permutation works over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadGroup {
    /// `num_attention_heads` (`{arch}.attention.head_count`).
    Query,
    /// `num_key_value_heads` (`{arch}.attention.head_count_kv`).
    KeyValue,
}

/// How a tensor's values differ between the Hugging Face and the GGUF layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Stored as is.
    Identity,
    /// Rows permuted per head from Hugging Face's half-split rotary layout to llama.cpp's
    /// interleaved pairs ([`super::permute_rope_rows`]); for a LoRA adapter, the rows of `lora_b`.
    RopeRows(HeadGroup),
    /// GGUF holds `1 + w` (Gemma norms).
    PlusOne,
}

impl Transform {
    /// The GGUF values of Hugging Face `values` of row-major `shape` (1-D tensors are one
    /// column); `heads` is `(num_attention_heads, num_key_value_heads)`.
    pub fn to_gguf(
        self,
        mut values: Vec<f32>,
        shape: &[usize],
        heads: (usize, usize),
    ) -> Result<Vec<f32>> {
        match self {
            Transform::Identity => Ok(values),
            Transform::PlusOne => {
                values.iter_mut().for_each(|v| *v += 1.0);
                Ok(values)
            }
            Transform::RopeRows(group) => {
                let (rows, cols) = rows_cols(shape);
                super::permute_rope_rows(&values, rows, cols, group.count(heads))
            }
        }
    }

    /// The inverse of [`Transform::to_gguf`].
    pub fn to_hf(
        self,
        mut values: Vec<f32>,
        shape: &[usize],
        heads: (usize, usize),
    ) -> Result<Vec<f32>> {
        match self {
            Transform::Identity => Ok(values),
            Transform::PlusOne => {
                values.iter_mut().for_each(|v| *v -= 1.0);
                Ok(values)
            }
            Transform::RopeRows(group) => {
                let (rows, cols) = rows_cols(shape);
                super::unpermute_rope_rows(&values, rows, cols, group.count(heads))
            }
        }
    }
}

impl HeadGroup {
    pub(crate) fn count(self, (heads, kv_heads): (usize, usize)) -> usize {
        match self {
            HeadGroup::Query => heads,
            HeadGroup::KeyValue => kv_heads,
        }
    }
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (0, 0),
        [rows] => (*rows, 1),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    }
}

/// A tensor stored fused on both sides; its rows are the parts in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// `[q (heads·head_dim); k (kv_heads·head_dim); v (kv_heads·head_dim)]`.
    QkvRows,
    /// `[gate (intermediate); up (intermediate)]`: llama.cpp's `swiglu` applies the
    /// activation to the first half, as Phi-3's `gate_up_proj.chunk(2)`.
    GateUpRows,
}

/// One row of the table: `hf` ↔ `gguf` without the `.weight`/`.bias` suffix. For a layer
/// tensor both are below the layer (`model.layers.{i}.` / `blk.{i}.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorName {
    pub hf: &'static str,
    pub gguf: &'static str,
    pub transform: Transform,
    pub fused: Option<Fusion>,
}

const fn t(hf: &'static str, gguf: &'static str) -> TensorName {
    TensorName {
        hf,
        gguf,
        transform: Transform::Identity,
        fused: None,
    }
}

const fn with(hf: &'static str, gguf: &'static str, transform: Transform) -> TensorName {
    TensorName {
        hf,
        gguf,
        transform,
        fused: None,
    }
}

/// What an extra tensor is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraSource {
    /// Llama 3.1 rope: one divisor per frequency (1 for high frequencies, `factor` for low
    /// ones, interpolated between), written only when the rope type is `llama3`.
    Llama3RopeFreqs,
    /// Phi-3 LongRoPE `long_factor`, written only when the rope type is `longrope`.
    LongRopeLong,
    /// Phi-3 LongRoPE `short_factor`.
    LongRopeShort,
}

/// A tensor llama.cpp reads that has no Hugging Face tensor: computed from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtraTensor {
    /// Full GGUF name (`rope_freqs.weight`).
    pub gguf: &'static str,
    pub source: ExtraSource,
}

impl ExtraTensor {
    /// The values for a model whose (global) rotary embedding is `rope`, `None` when this
    /// rope type has no such tensor.
    ///
    /// ```
    /// use lm::gguf::names::{ExtraSource, ExtraTensor};
    /// use lm::rope::{Rope, RopeScaling};
    /// let rope = Rope { theta: 10000.0, dim: 8, scaling: RopeScaling::Llama3 {
    ///     factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 32 } };
    /// let extra = ExtraTensor { gguf: "rope_freqs.weight", source: ExtraSource::Llama3RopeFreqs };
    /// let f = extra.values(&rope).unwrap();
    /// assert_eq!(f.len(), 4);
    /// assert_eq!(f[0], 1.0); // the highest frequency is kept
    /// assert_eq!(f[3], 8.0); // the lowest is divided by `factor`
    /// ```
    pub fn values(&self, rope: &Rope) -> Option<Vec<f32>> {
        match (&self.source, &rope.scaling) {
            (
                ExtraSource::Llama3RopeFreqs,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max,
                },
            ) => Some(crate::rope::factors::llama3_rope_freqs(
                rope.theta,
                rope.dim,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max,
            )),
            (ExtraSource::Llama3RopeFreqs, RopeScaling::Factors { factors }) => {
                Some(factors.clone())
            }
            (ExtraSource::LongRopeLong, RopeScaling::LongRope { long_factor, .. }) => {
                Some(long_factor.clone())
            }
            (ExtraSource::LongRopeShort, RopeScaling::LongRope { short_factor, .. }) => {
                Some(short_factor.clone())
            }
            _ => None,
        }
    }
}

/// A family's part of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FamilyNames {
    /// The family this part is written for (Mistral and Llama share the `llama` names).
    pub family: Family,
    /// llama.cpp's architecture name (`general.architecture`, the `{arch}.` key prefix).
    pub arch: &'static str,
    /// Tensors outside the layers (full names without suffix).
    pub globals: &'static [TensorName],
    /// Tensors of every layer.
    pub layer: &'static [TensorName],
    /// Tensors computed from the config.
    pub extras: &'static [ExtraTensor],
    /// Whether llama.cpp can read an untied LM head (`output`) for this architecture.
    pub untied_head: bool,
}

const Q_ROPE: Transform = Transform::RopeRows(HeadGroup::Query);
const K_ROPE: Transform = Transform::RopeRows(HeadGroup::KeyValue);
const ONE: Transform = Transform::PlusOne;

const GLOBALS: &[TensorName] = &[
    t("model.embed_tokens", "token_embd"),
    t("model.norm", "output_norm"),
    t("lm_head", "output"),
];
const GEMMA_GLOBALS: &[TensorName] = &[
    t("model.embed_tokens", "token_embd"),
    with("model.norm", "output_norm", ONE),
    t("lm_head", "output"),
];

const LLAMA_LAYER: &[TensorName] = &[
    t("input_layernorm", "attn_norm"),
    with("self_attn.q_proj", "attn_q", Q_ROPE),
    with("self_attn.k_proj", "attn_k", K_ROPE),
    t("self_attn.v_proj", "attn_v"),
    t("self_attn.o_proj", "attn_output"),
    t("post_attention_layernorm", "ffn_norm"),
    t("mlp.gate_proj", "ffn_gate"),
    t("mlp.up_proj", "ffn_up"),
    t("mlp.down_proj", "ffn_down"),
];
const QWEN2_LAYER: &[TensorName] = &[
    t("input_layernorm", "attn_norm"),
    t("self_attn.q_proj", "attn_q"),
    t("self_attn.k_proj", "attn_k"),
    t("self_attn.v_proj", "attn_v"),
    t("self_attn.o_proj", "attn_output"),
    t("post_attention_layernorm", "ffn_norm"),
    t("mlp.gate_proj", "ffn_gate"),
    t("mlp.up_proj", "ffn_up"),
    t("mlp.down_proj", "ffn_down"),
];
const QWEN3_LAYER: &[TensorName] = &[
    t("input_layernorm", "attn_norm"),
    t("self_attn.q_proj", "attn_q"),
    t("self_attn.k_proj", "attn_k"),
    t("self_attn.v_proj", "attn_v"),
    t("self_attn.q_norm", "attn_q_norm"),
    t("self_attn.k_norm", "attn_k_norm"),
    t("self_attn.o_proj", "attn_output"),
    t("post_attention_layernorm", "ffn_norm"),
    t("mlp.gate_proj", "ffn_gate"),
    t("mlp.up_proj", "ffn_up"),
    t("mlp.down_proj", "ffn_down"),
];
const GEMMA2_LAYER: &[TensorName] = &[
    with("input_layernorm", "attn_norm", ONE),
    t("self_attn.q_proj", "attn_q"),
    t("self_attn.k_proj", "attn_k"),
    t("self_attn.v_proj", "attn_v"),
    t("self_attn.o_proj", "attn_output"),
    with("post_attention_layernorm", "post_attention_norm", ONE),
    with("pre_feedforward_layernorm", "ffn_norm", ONE),
    t("mlp.gate_proj", "ffn_gate"),
    t("mlp.up_proj", "ffn_up"),
    t("mlp.down_proj", "ffn_down"),
    with("post_feedforward_layernorm", "post_ffw_norm", ONE),
];
const GEMMA3_LAYER: &[TensorName] = &[
    with("input_layernorm", "attn_norm", ONE),
    t("self_attn.q_proj", "attn_q"),
    t("self_attn.k_proj", "attn_k"),
    t("self_attn.v_proj", "attn_v"),
    with("self_attn.q_norm", "attn_q_norm", ONE),
    with("self_attn.k_norm", "attn_k_norm", ONE),
    t("self_attn.o_proj", "attn_output"),
    with("post_attention_layernorm", "post_attention_norm", ONE),
    with("pre_feedforward_layernorm", "ffn_norm", ONE),
    t("mlp.gate_proj", "ffn_gate"),
    t("mlp.up_proj", "ffn_up"),
    t("mlp.down_proj", "ffn_down"),
    with("post_feedforward_layernorm", "post_ffw_norm", ONE),
];
const PHI3_LAYER: &[TensorName] = &[
    t("input_layernorm", "attn_norm"),
    TensorName {
        hf: "self_attn.qkv_proj",
        gguf: "attn_qkv",
        transform: Transform::Identity,
        fused: Some(Fusion::QkvRows),
    },
    t("self_attn.o_proj", "attn_output"),
    t("post_attention_layernorm", "ffn_norm"),
    TensorName {
        hf: "mlp.gate_up_proj",
        gguf: "ffn_up",
        transform: Transform::Identity,
        fused: Some(Fusion::GateUpRows),
    },
    t("mlp.down_proj", "ffn_down"),
];

const ROPE_FREQS: &[ExtraTensor] = &[ExtraTensor {
    gguf: "rope_freqs.weight",
    source: ExtraSource::Llama3RopeFreqs,
}];
const ROPE_FACTORS: &[ExtraTensor] = &[
    ExtraTensor {
        gguf: "rope_factors_long.weight",
        source: ExtraSource::LongRopeLong,
    },
    ExtraTensor {
        gguf: "rope_factors_short.weight",
        source: ExtraSource::LongRopeShort,
    },
];

const fn family(
    family: Family,
    arch: &'static str,
    globals: &'static [TensorName],
    layer: &'static [TensorName],
    extras: &'static [ExtraTensor],
    untied_head: bool,
) -> FamilyNames {
    FamilyNames {
        family,
        arch,
        globals,
        layer,
        extras,
        untied_head,
    }
}

const TABLE: [FamilyNames; 7] = [
    family(
        Family::Llama,
        "llama",
        GLOBALS,
        LLAMA_LAYER,
        ROPE_FREQS,
        true,
    ),
    family(
        Family::Mistral,
        "llama",
        GLOBALS,
        LLAMA_LAYER,
        ROPE_FREQS,
        true,
    ),
    family(Family::Qwen2, "qwen2", GLOBALS, QWEN2_LAYER, &[], true),
    family(Family::Qwen3, "qwen3", GLOBALS, QWEN3_LAYER, &[], true),
    // The converter skips Gemma 2's `lm_head` (llama.cpp always uses `token_embd`).
    family(
        Family::Gemma2,
        "gemma2",
        GEMMA_GLOBALS,
        GEMMA2_LAYER,
        &[],
        false,
    ),
    family(
        Family::Gemma3,
        "gemma3",
        GEMMA_GLOBALS,
        GEMMA3_LAYER,
        &[],
        true,
    ),
    family(
        Family::Phi3,
        "phi3",
        GLOBALS,
        PHI3_LAYER,
        ROPE_FACTORS,
        true,
    ),
];

/// A name found in the table, with what happens to its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The full name on the other side, with its suffix.
    pub name: String,
    /// The layer, for a per-layer tensor.
    pub layer: Option<usize>,
    pub transform: Transform,
    pub fused: Option<Fusion>,
}

/// Hugging Face tensors that llama.cpp has no use for (dropped on export).
const IGNORED_HF_SUFFIXES: [&str; 1] = ["self_attn.rotary_emb.inv_freq"];

impl FamilyNames {
    /// The table of `family`.
    pub fn of(family: Family) -> &'static FamilyNames {
        TABLE
            .iter()
            .find(|f| f.family == family)
            .expect("every family has a table row")
    }

    /// The table for a GGUF `general.architecture`; `llama` maps to [`Family::Llama`] (a
    /// Mistral model written by the converter reads back as Llama).
    pub fn for_arch(arch: &str) -> Option<&'static FamilyNames> {
        TABLE.iter().find(|f| f.arch == arch)
    }

    /// The GGUF architecture names the table knows, in table order without repeats.
    pub fn architectures() -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for f in &TABLE {
            if !out.contains(&f.arch) {
                out.push(f.arch);
            }
        }
        out
    }

    /// The GGUF name of Hugging Face tensor `hf` (`model.layers.3.self_attn.o_proj.weight`);
    /// `Ok(None)` for tensors llama.cpp does not use (`rotary_emb.inv_freq`); an error naming
    /// the tensor for anything the architecture has no place for (including Gemma 2's
    /// `lm_head`).
    pub fn to_gguf(&self, hf: &str) -> Result<Option<Mapped>> {
        let unsupported = || LmError::Unsupported {
            key: "tensor".into(),
            value: hf.to_string(),
            reason: format!("has no place in llama.cpp's `{}` architecture", self.arch),
        };
        let global = split_suffix(hf)
            .and_then(|(stem, suffix)| Some((self.globals.iter().find(|t| t.hf == stem)?, suffix)));
        if let Some((t, suffix)) = global {
            if t.hf == "lm_head" && !self.untied_head {
                return Err(unsupported());
            }
            return Ok(Some(Mapped {
                name: format!("{}{suffix}", t.gguf),
                layer: None,
                transform: t.transform,
                fused: t.fused,
            }));
        }
        let rest = hf.strip_prefix("model.layers.").ok_or_else(unsupported)?;
        let (layer, tail) = rest.split_once('.').ok_or_else(unsupported)?;
        let layer: usize = layer.parse().map_err(|_| unsupported())?;
        if IGNORED_HF_SUFFIXES.contains(&tail) {
            return Ok(None);
        }
        let (module, suffix) = split_suffix(tail).ok_or_else(unsupported)?;
        let t = self
            .layer
            .iter()
            .find(|t| t.hf == module)
            .ok_or_else(unsupported)?;
        Ok(Some(Mapped {
            name: format!("blk.{layer}.{}{suffix}", t.gguf),
            layer: Some(layer),
            transform: t.transform,
            fused: t.fused,
        }))
    }

    /// The Hugging Face name of GGUF tensor `gguf` (inverse of [`FamilyNames::to_gguf`]);
    /// `None` for names outside the table (extra tensors such as `rope_freqs.weight` are
    /// listed in [`FamilyNames::extras`], not here).
    pub fn to_hf(&self, gguf: &str) -> Option<Mapped> {
        let (stem, suffix) = split_suffix(gguf)?;
        if let Some(t) = self.globals.iter().find(|t| t.gguf == stem) {
            if t.hf == "lm_head" && !self.untied_head {
                return None;
            }
            return Some(Mapped {
                name: format!("{}{suffix}", t.hf),
                layer: None,
                transform: t.transform,
                fused: t.fused,
            });
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, tail) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (short, suffix) = split_suffix(tail)?;
        let t = self.layer.iter().find(|t| t.gguf == short)?;
        Some(Mapped {
            name: format!("model.layers.{layer}.{}{suffix}", t.hf),
            layer: Some(layer),
            transform: t.transform,
            fused: t.fused,
        })
    }

    /// The extra tensor named `gguf` (full name), if the architecture has one.
    pub fn extra(&self, gguf: &str) -> Option<&'static ExtraTensor> {
        self.extras.iter().find(|e| e.gguf == gguf)
    }
}

/// `name` split into its stem and `.weight` / `.bias` suffix.
fn split_suffix(name: &str) -> Option<(&str, &str)> {
    [".weight", ".bias"]
        .iter()
        .find_map(|s| name.strip_suffix(s).map(|stem| (stem, *s)))
}
