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
use crate::nf4_grid::Nf4GridQuantizer;
use crate::pi::{check_k, PiQuantizer};
use crate::quantizer::{DifferentiableQuantizer, InitMethod};
use crate::ste::Ste;
use crate::uniform::{Granularity, UniformQuantizer};

/// Which grid the quantizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizerKind {
    /// Uniform integer grid with a learned step ([`UniformQuantizer`]).
    Uniform,
    /// Uniform grid with step `α·π/k` and learned α ([`PiQuantizer`]).
    Pi,
    /// NF4 codebook with a learned absmax scale ([`Nf4GridQuantizer`]); 4 bits, symmetric.
    Nf4,
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
        }
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
        match self.quantizer {
            QuantizerKind::Uniform | QuantizerKind::Pi => check_bits("bits", self.bits, 2, 8)?,
            QuantizerKind::Nf4 => {
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
    /// wrapped in a seeded Hadamard rotation when [`QatConfig::incoherence`] is set.
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
            QuantizerKind::Nf4 => Box::new(Nf4GridQuantizer::new(self.granularity, self.ste)?),
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
