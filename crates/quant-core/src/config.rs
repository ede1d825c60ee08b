//! Quantization-aware-training configuration and the factory that builds a
//! [`DifferentiableQuantizer`] from it.
//!
//! A config is JSON (or any serde format); unknown fields are rejected so that a misspelt
//! option fails loudly instead of being ignored:
//!
//! ```
//! use quant_core::config::{QatConfig, QuantizerKind};
//!
//! let json = r#"{
//!     "quantizer": "pi",
//!     "bits": 3,
//!     "granularity": "per_channel",
//!     "ste": "lsq",
//!     "pi_k": 3,
//!     "symmetric": true,
//!     "init": "mse_clip_search"
//! }"#;
//! let config: QatConfig = serde_json::from_str(json).unwrap();
//! assert_eq!(config, QatConfig::piq3());
//! let quantizer = config.build().unwrap();
//! assert_eq!(quantizer.bits(), 3);
//!
//! let typo = json.replace("\"ste\"", "\"stee\"");
//! assert!(serde_json::from_str::<QatConfig>(&typo).is_err());
//! ```

use crate::error::{check_bits, QuantError, Result};
use crate::ggml::qat::GgmlQatQuantizer;
use crate::ggml::{fallback_type, GgmlType};
use crate::nf4_grid::Nf4GridQuantizer;
use crate::pi::{check_k, PiQuantizer};
use crate::quantizer::{DifferentiableQuantizer, InitMethod};
use crate::ste::Ste;
use crate::uniform::{Granularity, UniformQuantizer};

/// Which grid the quantizer uses.
// The ggml grids keep ggml's spellings (`Q4_0`, `Q4_K`), as `GgmlType` does.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizerKind {
    /// Uniform integer grid with a learned step ([`UniformQuantizer`]).
    Uniform,
    /// Uniform grid with step `α·π/k` and learned α ([`PiQuantizer`]).
    Pi,
    /// NF4 codebook with a learned absmax scale ([`Nf4GridQuantizer`]); 4 bits, symmetric.
    Nf4,
    /// ggml's `Q4_0` blocks (32 values, f16 scale) with trainable scales
    /// ([`GgmlQatQuantizer`]); the exported GGUF holds exactly the trained blocks. The
    /// ggml kinds fix every other field: see [`QatConfig::ggml`].
    #[serde(rename = "q4_0")]
    Q4_0,
    /// ggml's `Q4_1` blocks (f16 scale and minimum).
    #[serde(rename = "q4_1")]
    Q4_1,
    /// ggml's `Q5_0` blocks.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// ggml's `Q5_1` blocks (f16 scale and minimum).
    #[serde(rename = "q5_1")]
    Q5_1,
    /// ggml's `Q8_0` blocks.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// ggml's `Q4_K` super-blocks (256 values, 6-bit sub-block scales and minima).
    #[serde(rename = "q4_k")]
    Q4_K,
    /// ggml's `Q6_K` super-blocks (256 values, 8-bit signed sub-block scales).
    #[serde(rename = "q6_k")]
    Q6_K,
}

impl QuantizerKind {
    /// The ggml type of a ggml grid; `None` for uniform, Pi and NF4.
    ///
    /// ```
    /// use quant_core::config::QuantizerKind;
    /// use quant_core::ggml::GgmlType;
    /// assert_eq!(QuantizerKind::Q4_K.ggml_type(), Some(GgmlType::Q4_K));
    /// assert_eq!(QuantizerKind::Nf4.ggml_type(), None);
    /// ```
    pub fn ggml_type(self) -> Option<GgmlType> {
        Some(match self {
            QuantizerKind::Uniform | QuantizerKind::Pi | QuantizerKind::Nf4 => return None,
            QuantizerKind::Q4_0 => GgmlType::Q4_0,
            QuantizerKind::Q4_1 => GgmlType::Q4_1,
            QuantizerKind::Q5_0 => GgmlType::Q5_0,
            QuantizerKind::Q5_1 => GgmlType::Q5_1,
            QuantizerKind::Q8_0 => GgmlType::Q8_0,
            QuantizerKind::Q4_K => GgmlType::Q4_K,
            QuantizerKind::Q6_K => GgmlType::Q6_K,
        })
    }

    /// The ggml grid of `ty`, or an error naming it (types without a trainable grid).
    pub fn from_ggml_type(ty: GgmlType) -> Result<Self> {
        Ok(match ty {
            GgmlType::Q4_0 => QuantizerKind::Q4_0,
            GgmlType::Q4_1 => QuantizerKind::Q4_1,
            GgmlType::Q5_0 => QuantizerKind::Q5_0,
            GgmlType::Q5_1 => QuantizerKind::Q5_1,
            GgmlType::Q8_0 => QuantizerKind::Q8_0,
            GgmlType::Q4_K => QuantizerKind::Q4_K,
            GgmlType::Q6_K => QuantizerKind::Q6_K,
            other => {
                return Err(QuantError::invalid(
                    "ggml type of a QAT grid",
                    other,
                    "trainable ggml grids exist for q4_0, q4_1, q5_0, q5_1, q8_0, q4_k and q6_k",
                ))
            }
        })
    }
}

/// Randomized Hadamard incoherence processing around the quantizer, applied by
/// [`QatConfig::build_for_weight`] with [`crate::incoherence::IncoherentQuantizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncoherenceConfig {
    /// Seed of the random signs.
    pub seed: u64,
    /// Also rotate the output dimension (not only the input dimension).
    pub rotate_output: bool,
}

/// Everything that defines one weight quantizer for QAT.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QatConfig {
    /// The grid.
    pub quantizer: QuantizerKind,
    /// Bits per code: 2..=8 for uniform and Pi, exactly 4 for NF4.
    pub bits: u32,
    /// Which weights share a step/scale.
    pub granularity: Granularity,
    /// Straight-through estimator for the weight gradient.
    pub ste: Ste,
    /// Pi step divisor `k` (2..=5); required for Pi, must be absent otherwise.
    #[serde(default)]
    pub pi_k: Option<u32>,
    /// Symmetric grid (default). Asymmetric grids keep their zero points fixed from init;
    /// NF4 must be symmetric.
    #[serde(default = "default_symmetric")]
    pub symmetric: bool,
    /// Optional Hadamard incoherence processing (default none).
    #[serde(default)]
    pub incoherence: Option<IncoherenceConfig>,
    /// How steps/scales are initialised from the weights (default MSE clip search).
    #[serde(default = "default_init")]
    pub init: InitMethod,
    /// NF4 grid only: the forward quantizes with the double-quantized absmax (bitsandbytes'
    /// `compress_statistics`: 8-bit codes of `absmax − mean` in blocks of 256), the
    /// f32 absmax training through it as through a straight-through estimator, so that a
    /// bitsandbytes 4-bit export stores exactly the scales training used. Needs per-block
    /// granularity (bitsandbytes' blocks). Default false.
    #[serde(default)]
    pub double_quant: bool,
}

fn default_symmetric() -> bool {
    true
}

fn default_init() -> InitMethod {
    InitMethod::MseClipSearch
}

impl QatConfig {
    /// 3-bit Pi quantizer, per-channel α, LSQ, `k = 3` (`(π/3)² ≈ 1.10`: α learns at nearly
    /// the rate a plain step would), symmetric, MSE clip-search init.
    pub fn piq3() -> Self {
        QatConfig {
            quantizer: QuantizerKind::Pi,
            bits: 3,
            granularity: Granularity::PerChannel,
            ste: Ste::Lsq,
            pi_k: Some(3),
            symmetric: true,
            incoherence: None,
            init: InitMethod::MseClipSearch,
            double_quant: false,
        }
    }

    /// Training on ggml's grid of `ty` (`q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, `q4_k`,
    /// `q6_k`): the only config [`QatConfig::validate`] accepts for that grid. Its fields
    /// describe the format, not choices: `bits` the code width, `granularity` the
    /// (super-)block of `ty` along each row, `symmetric` false for the types with a minimum,
    /// `ste` LSQ (the grids' backward), `init` absmax, standing for ggml's own reference
    /// quantizer (`quantize_row_*_ref`), no incoherence (a rotation has no GGUF form).
    /// A weight whose rows do not divide into `ty`'s blocks trains on llama.cpp's fallback
    /// type ([`crate::ggml::fallback_type`]: `q4_k` → `q5_0`, `q6_k` → `q8_0` for rows of
    /// 576), see [`QatConfig::ggml_grid_for_rows`].
    ///
    /// ```
    /// use quant_core::config::{QatConfig, QuantizerKind};
    /// use quant_core::ggml::GgmlType;
    /// let c = QatConfig::ggml(GgmlType::Q4_1).unwrap();
    /// assert_eq!((c.quantizer, c.bits, c.symmetric), (QuantizerKind::Q4_1, 4, false));
    /// c.validate().unwrap();
    /// let mut wrong = c;
    /// wrong.bits = 3;
    /// assert!(wrong.validate().unwrap_err().to_string().contains("bits"));
    /// ```
    pub fn ggml(ty: GgmlType) -> Result<Self> {
        let quantizer = QuantizerKind::from_ggml_type(ty)?;
        let bits = match ty {
            GgmlType::Q5_0 | GgmlType::Q5_1 => 5,
            GgmlType::Q8_0 => 8,
            GgmlType::Q6_K => 6,
            _ => 4,
        };
        Ok(QatConfig {
            quantizer,
            bits,
            granularity: Granularity::PerBlock {
                size: ty.block_values(),
            },
            ste: Ste::Lsq,
            pi_k: None,
            symmetric: !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K),
            incoherence: None,
            init: InitMethod::Absmax,
            double_quant: false,
        })
    }

    /// The trainable ggml grid for a weight with rows of `row_len` values, for a ggml kind
    /// (`None` for the others): the requested type, or llama.cpp's fallback type when the
    /// rows are not whole (super-)blocks. A fallback to `F16` (rows not whole 32-blocks
    /// either) has no trainable grid: an error says so.
    ///
    /// ```
    /// use quant_core::config::QatConfig;
    /// use quant_core::ggml::GgmlType;
    /// let c = QatConfig::ggml(GgmlType::Q4_K).unwrap();
    /// assert_eq!(c.ggml_grid_for_rows(576).unwrap().unwrap().ggml_type(), GgmlType::Q5_0);
    /// assert_eq!(c.ggml_grid_for_rows(1536).unwrap().unwrap().ggml_type(), GgmlType::Q4_K);
    /// assert!(c.ggml_grid_for_rows(100).is_err());
    /// assert!(QatConfig::piq3().ggml_grid_for_rows(100).unwrap().is_none());
    /// ```
    pub fn ggml_grid_for_rows(&self, row_len: usize) -> Result<Option<GgmlQatQuantizer>> {
        let Some(ty) = self.quantizer.ggml_type() else {
            return Ok(None);
        };
        self.validate()?;
        let stored = fallback_type(ty, row_len)?;
        if stored.block_values() == 1 {
            return Err(QuantError::invalid(
                format!("rows of {row_len} values for the {ty} grid"),
                row_len,
                format!(
                    "llama.cpp would store such a tensor as {stored}, which has no trainable \
                     grid (rows must be a multiple of 32)"
                ),
            ));
        }
        Ok(Some(GgmlQatQuantizer::new(stored)?))
    }

    /// As [`QatConfig::piq3`] with 2 bits.
    pub fn piq2() -> Self {
        QatConfig {
            bits: 2,
            ..Self::piq3()
        }
    }

    /// Checks every field; the error names the field and its value.
    ///
    /// ```
    /// use quant_core::config::{QatConfig, QuantizerKind};
    /// let mut c = QatConfig::piq3();
    /// c.quantizer = QuantizerKind::Nf4;
    /// let err = c.validate().unwrap_err().to_string();
    /// assert!(err.contains("bits") || err.contains("pi_k"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.double_quant {
            if self.quantizer != QuantizerKind::Nf4 {
                return Err(QuantError::invalid(
                    "double_quant",
                    true,
                    format!(
                        "only the nf4 grid double-quantizes its scales, not {:?}",
                        self.quantizer
                    ),
                ));
            }
            if !matches!(self.granularity, Granularity::PerBlock { .. }) {
                return Err(QuantError::invalid(
                    "double_quant",
                    true,
                    format!(
                        "bitsandbytes double-quantizes the absmax of blocks: the granularity \
                         must be per_block, not {:?}",
                        self.granularity
                    ),
                ));
            }
        }
        if let Some(ty) = self.quantizer.ggml_type() {
            return self.validate_ggml(ty);
        }
        match self.quantizer {
            QuantizerKind::Uniform | QuantizerKind::Pi => check_bits("bits", self.bits, 2, 8)?,
            _ => {
                if self.bits != 4 {
                    return Err(QuantError::invalid(
                        "bits",
                        self.bits,
                        "the nf4 quantizer has 4-bit codes",
                    ));
                }
                if !self.symmetric {
                    return Err(QuantError::invalid(
                        "symmetric",
                        false,
                        "the nf4 grid is symmetric (absmax scale, no zero point)",
                    ));
                }
            }
        }
        match (self.quantizer, self.pi_k) {
            (QuantizerKind::Pi, Some(k)) => check_k(k)?,
            (QuantizerKind::Pi, None) => {
                return Err(QuantError::invalid(
                    "pi_k",
                    "none",
                    "the pi quantizer needs its step divisor k (2..=5)",
                ))
            }
            (_, Some(k)) => {
                return Err(QuantError::invalid(
                    "pi_k",
                    k,
                    "only the pi quantizer uses pi_k",
                ))
            }
            (_, None) => {}
        }
        self.granularity.validate()?;
        self.ste.validate()?;
        Ok(())
    }

    /// A ggml grid's config must be [`QatConfig::ggml`]'s: each other value is named.
    fn validate_ggml(&self, ty: GgmlType) -> Result<()> {
        let fixed = QatConfig::ggml(ty)?;
        let why = |what: &str| format!("the {ty} grid has {what}: use QatConfig::ggml");
        if self.bits != fixed.bits {
            return Err(QuantError::invalid(
                "bits",
                self.bits,
                why(&format!("{}-bit codes", fixed.bits)),
            ));
        }
        if self.granularity != fixed.granularity {
            return Err(QuantError::invalid(
                "granularity",
                format!("{:?}", self.granularity),
                why(&format!(
                    "blocks of {} values along each row",
                    ty.block_values()
                )),
            ));
        }
        if self.symmetric != fixed.symmetric {
            return Err(QuantError::invalid(
                "symmetric",
                self.symmetric,
                why(if fixed.symmetric {
                    "no minimum"
                } else {
                    "a minimum per block"
                }),
            ));
        }
        if self.ste != fixed.ste {
            return Err(QuantError::invalid(
                "ste",
                format!("{:?}", self.ste),
                why("LSQ's backward"),
            ));
        }
        if let Some(k) = self.pi_k {
            return Err(QuantError::invalid(
                "pi_k",
                k,
                "only the pi quantizer uses pi_k",
            ));
        }
        if self.incoherence.is_some() {
            return Err(QuantError::invalid(
                "incoherence",
                "set",
                why("no rotation (GGUF cannot store one)"),
            ));
        }
        if self.init != fixed.init {
            return Err(QuantError::invalid(
                "init",
                format!("{:?}", self.init),
                why("ggml's own quantizer as its initialisation (absmax)"),
            ));
        }
        Ok(())
    }

    /// Validates, then builds the quantizer (uninitialised: call
    /// [`DifferentiableQuantizer::init_from_weights`] with [`QatConfig::init`] next).
    /// A Hadamard rotation depends on the weight's shape, so a config with
    /// [`QatConfig::incoherence`] is an error here: use [`QatConfig::build_for_weight`].
    pub fn build(&self) -> Result<Box<dyn DifferentiableQuantizer>> {
        if self.incoherence.is_some() {
            return Err(QuantError::invalid(
                "incoherence",
                "set",
                "a Hadamard rotation needs the weight shape: use build_for_weight(out, in)",
            ));
        }
        self.build_grid()
    }

    /// Validates, then builds the quantizer for an `(out_features, in_features)` weight,
    /// wrapped in a seeded Hadamard rotation when [`QatConfig::incoherence`] is set; a ggml
    /// grid on llama.cpp's fallback type when the rows do not divide into its blocks.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use quant_core::config::{IncoherenceConfig, QatConfig};
    /// use quant_core::quantizer::InitMethod;
    /// let mut config = QatConfig::piq3();
    /// config.incoherence = Some(IncoherenceConfig { seed: 1, rotate_output: false });
    /// let mut q = config.build_for_weight(4, 6).unwrap();
    /// let w = Array2::from_shape_fn((4, 6), |(i, j)| (i as f32 - j as f32) * 0.1);
    /// q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
    /// assert_eq!(q.forward(w.view()).unwrap().dequantized.dim(), (4, 6));
    /// ```
    pub fn build_for_weight(
        &self,
        out_features: usize,
        in_features: usize,
    ) -> Result<Box<dyn DifferentiableQuantizer>> {
        // A ggml grid takes llama.cpp's fallback type when the rows do not divide.
        if let Some(grid) = self.ggml_grid_for_rows(in_features)? {
            return Ok(Box::new(grid));
        }
        let grid = self.build_grid()?;
        Ok(match self.incoherence {
            None => grid,
            Some(inc) => Box::new(crate::incoherence::IncoherentQuantizer::with_seed(
                grid,
                in_features,
                inc.rotate_output.then_some(out_features),
                inc.seed,
            )?),
        })
    }

    fn build_grid(&self) -> Result<Box<dyn DifferentiableQuantizer>> {
        self.validate()?;
        Ok(match self.quantizer {
            QuantizerKind::Uniform => Box::new(UniformQuantizer::new(
                self.bits,
                self.symmetric,
                self.granularity,
                self.ste,
            )?),
            QuantizerKind::Pi => Box::new(PiQuantizer::new(
                self.bits,
                self.symmetric,
                self.granularity,
                self.ste,
                self.pi_k.unwrap_or_default(),
            )?),
            QuantizerKind::Nf4 => Box::new(
                Nf4GridQuantizer::new(self.granularity, self.ste)?
                    .with_double_quant(self.double_quant),
            ),
            other => Box::new(GgmlQatQuantizer::new(
                other
                    .ggml_type()
                    .expect("the remaining kinds are ggml grids"),
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn parse(json: &str) -> Result<QatConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn parses_a_full_config_and_round_trips() {
        let json = r#"{
            "quantizer": "uniform",
            "bits": 4,
            "granularity": {"per_block": {"size": 64}},
            "ste": {"ewgs": {"delta": 0.2}},
            "symmetric": false,
            "incoherence": {"seed": 7, "rotate_output": true},
            "init": "absmax"
        }"#;
        let c = parse(json).unwrap();
        assert_eq!(c.granularity, Granularity::PerBlock { size: 64 });
        assert_eq!(c.ste, Ste::Ewgs { delta: 0.2 });
        assert_eq!(
            c.incoherence,
            Some(IncoherenceConfig {
                seed: 7,
                rotate_output: true
            })
        );
        assert_eq!(c.pi_k, None);
        assert!(!c.symmetric);
        c.validate().unwrap();
        let back = parse(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let c =
            parse(r#"{"quantizer":"nf4","bits":4,"granularity":"per_channel","ste":"standard"}"#)
                .unwrap();
        assert!(c.symmetric);
        assert_eq!(c.init, InitMethod::MseClipSearch);
        assert_eq!(c.incoherence, None);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let base = serde_json::to_value(QatConfig::piq2()).unwrap();
        let mut top = base.clone();
        top["learning_rate"] = serde_json::json!(0.1);
        let err = serde_json::from_value::<QatConfig>(top).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        let mut nested = base;
        nested["incoherence"] = serde_json::json!({"seed": 1, "rotate_output": false, "x": 1});
        assert!(serde_json::from_value::<QatConfig>(nested).is_err());
    }

    #[test]
    fn each_invalid_field_is_named() {
        let cases: Vec<(QatConfig, &str)> = vec![
            (
                QatConfig {
                    bits: 9,
                    ..QatConfig::piq3()
                },
                "bits",
            ),
            (
                QatConfig {
                    bits: 1,
                    quantizer: QuantizerKind::Uniform,
                    pi_k: None,
                    ..QatConfig::piq3()
                },
                "bits",
            ),
            (
                QatConfig {
                    quantizer: QuantizerKind::Nf4,
                    bits: 3,
                    pi_k: None,
                    ..QatConfig::piq3()
                },
                "bits",
            ),
            (
                QatConfig {
                    quantizer: QuantizerKind::Nf4,
                    bits: 4,
                    pi_k: None,
                    symmetric: false,
                    ..QatConfig::piq3()
                },
                "symmetric",
            ),
            (
                QatConfig {
                    pi_k: Some(6),
                    ..QatConfig::piq3()
                },
                "pi_k",
            ),
            (
                QatConfig {
                    pi_k: Some(1),
                    ..QatConfig::piq3()
                },
                "pi_k",
            ),
            (
                QatConfig {
                    pi_k: None,
                    ..QatConfig::piq3()
                },
                "pi_k",
            ),
            (
                QatConfig {
                    quantizer: QuantizerKind::Uniform,
                    ..QatConfig::piq3()
                },
                "pi_k",
            ),
            (
                QatConfig {
                    granularity: Granularity::PerBlock { size: 0 },
                    ..QatConfig::piq3()
                },
                "granularity.per_block.size",
            ),
            (
                QatConfig {
                    ste: Ste::Clipped { clip: 0.0 },
                    ..QatConfig::piq3()
                },
                "ste.clip",
            ),
            (
                QatConfig {
                    ste: Ste::Ewgs { delta: f32::NAN },
                    ..QatConfig::piq3()
                },
                "ste.delta",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "expected {field} in: {err}");
            assert!(config.build().is_err());
        }
    }

    #[test]
    fn every_kind_builds_and_trains_one_step() {
        let w = Array2::from_shape_fn((3, 8), |(r, c)| ((r * 8 + c) as f32 * 0.7).sin());
        let configs = [
            QatConfig::piq3(),
            QatConfig::piq2(),
            QatConfig {
                quantizer: QuantizerKind::Uniform,
                pi_k: None,
                symmetric: false,
                ..QatConfig::piq3()
            },
            QatConfig {
                quantizer: QuantizerKind::Nf4,
                bits: 4,
                pi_k: None,
                ..QatConfig::piq3()
            },
        ];
        for config in configs {
            let mut q = config.build().unwrap();
            q.init_from_weights(w.view(), config.init).unwrap();
            assert_eq!(q.params().len(), 3, "{config:?}");
            let out = q.forward(w.view()).unwrap();
            assert_eq!(out.dequantized.dim(), (3, 8));
            let grads = q.backward(out.dequantized.view()).unwrap();
            assert_eq!(grads.params.len(), 3);
            assert!(grads.params.iter().all(|g| g.is_finite()));
        }
    }

    #[test]
    fn ggml_grids_parse_by_their_ggml_names_and_refuse_every_other_value() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let c = QatConfig::ggml(ty).unwrap();
            let json = serde_json::to_string(&c).unwrap();
            assert!(json.contains(&format!("\"{}\"", ty.name())), "{json}");
            assert_eq!(parse(&json).unwrap(), c);
            let rows = ty.block_values() * 2;
            let mut q = c.build_for_weight(3, rows).unwrap();
            let w = Array2::from_shape_fn((3, rows), |(r, k)| ((r * rows + k) as f32).sin());
            q.init_from_weights(w.view(), c.init).unwrap();
            let out = q.forward(w.view()).unwrap();
            let grads = q.backward(out.dequantized.view()).unwrap();
            assert!(grads.params.iter().all(|g| g.is_finite()), "{ty}");
            let cases = [
                (QatConfig { bits: 3, ..c }, "bits"),
                (
                    QatConfig {
                        granularity: Granularity::PerChannel,
                        ..c
                    },
                    "granularity",
                ),
                (
                    QatConfig {
                        symmetric: !c.symmetric,
                        ..c
                    },
                    "symmetric",
                ),
                (
                    QatConfig {
                        ste: Ste::Standard,
                        ..c
                    },
                    "ste",
                ),
                (QatConfig { pi_k: Some(3), ..c }, "pi_k"),
                (
                    QatConfig {
                        init: InitMethod::MseClipSearch,
                        ..c
                    },
                    "init",
                ),
                (
                    QatConfig {
                        incoherence: Some(IncoherenceConfig {
                            seed: 1,
                            rotate_output: false,
                        }),
                        ..c
                    },
                    "incoherence",
                ),
            ];
            for (bad, field) in cases {
                let err = bad.validate().unwrap_err().to_string();
                assert!(err.contains(field), "{ty}: expected {field} in {err}");
            }
        }
        assert!(QatConfig::ggml(GgmlType::Q3_K).is_err());
    }

    #[test]
    fn incoherence_wraps_the_grid_in_a_rotation_of_the_weight_shape() {
        let w = Array2::from_shape_fn((5, 12), |(r, c)| ((r * 12 + c) as f32 * 0.37).cos());
        let config = QatConfig {
            incoherence: Some(IncoherenceConfig {
                seed: 3,
                rotate_output: true,
            }),
            ..QatConfig::piq3()
        };
        let err = config.build().unwrap_err().to_string();
        assert!(err.contains("build_for_weight"), "{err}");
        let mut rotated = config.build_for_weight(5, 12).unwrap();
        let mut plain = QatConfig::piq3().build_for_weight(5, 12).unwrap();
        rotated
            .init_from_weights(w.view(), InitMethod::Absmax)
            .unwrap();
        plain
            .init_from_weights(w.view(), InitMethod::Absmax)
            .unwrap();
        let r = rotated.forward(w.view()).unwrap().dequantized;
        let p = plain.forward(w.view()).unwrap().dequantized;
        assert_eq!(r.dim(), (5, 12));
        // Both approximate w, but on different grids: the rotation really is applied.
        assert!(r.iter().zip(p.iter()).any(|(a, b)| (a - b).abs() > 1e-4));
        let err = |q: &Array2<f32>| {
            (q - &w).iter().map(|d| d * d).sum::<f32>().sqrt()
                / w.iter().map(|v| v * v).sum::<f32>().sqrt()
        };
        assert!(err(&r) < 0.5 && err(&p) < 0.5);
        assert!(rotated.backward(r.view()).is_ok());
        assert!(
            config.build_for_weight(5, 0).is_err(),
            "zero-size rotation is an error"
        );
    }
}
