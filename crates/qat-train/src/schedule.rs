//! Learning-rate schedules as a factor of the base learning rate at each optimizer step.
//!
//! The factor multiplies each parameter group's `lr` ([`Optimizer::step`]'s `lr_factor`).
//! Warmups follow Hugging Face's `get_*_schedule_with_warmup`: the factor at step `s < w` is
//! `s / w`, so step 0 has factor 0.
//!
//! [`Optimizer::step`]: crate::optim::Optimizer::step

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A learning-rate schedule.
///
/// With `w = warmup_steps`, `T = total_steps`, `r = min_ratio` and the decay progress
/// `x = clamp((s − w)/(T − w), 0, 1)` for `s ≥ w`:
///
/// * `Constant`: `1`.
/// * `WarmupCosine`: `s/w` for `s < w`, then `r + (1 − r)·½(1 + cos(π·x))`.
/// * `WarmupLinear`: `s/w` for `s < w`, then `r + (1 − r)·(1 − x)`.
///
/// After `T` the factor stays at `r`.
///
/// ```
/// use qat_train::schedule::LrSchedule;
/// let s = LrSchedule::WarmupCosine { warmup_steps: 10, total_steps: 110, min_ratio: 0.1 };
/// assert_eq!(s.factor(5).unwrap(), 0.5);
/// assert_eq!(s.factor(10).unwrap(), 1.0);
/// assert!((s.factor(60).unwrap() - 0.55).abs() < 1e-6); // half-way: r + (1 − r)/2
/// assert!((s.factor(500).unwrap() - 0.1).abs() < 1e-6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base learning rate throughout.
    Constant,
    /// Linear warmup, then cosine decay to `min_ratio` at `total_steps`.
    WarmupCosine {
        /// Steps of linear warmup.
        warmup_steps: u64,
        /// Step at which the decay reaches `min_ratio`.
        total_steps: u64,
        /// Final factor, in `[0, 1]`.
        min_ratio: f32,
    },
    /// Linear warmup, then linear decay to `min_ratio` at `total_steps`.
    WarmupLinear {
        /// Steps of linear warmup.
        warmup_steps: u64,
        /// Step at which the decay reaches `min_ratio`.
        total_steps: u64,
        /// Final factor, in `[0, 1]`.
        min_ratio: f32,
    },
}

impl LrSchedule {
    /// Errors when `warmup_steps > total_steps` or `min_ratio` is outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_ratio,
            }
            | LrSchedule::WarmupLinear {
                warmup_steps,
                total_steps,
                min_ratio,
            } => {
                if warmup_steps > total_steps {
                    return Err(TrainError::invalid(
                        "LrSchedule.warmup_steps",
                        warmup_steps,
                        format!("must not exceed total_steps = {total_steps}"),
                    ));
                }
                if !(0.0..=1.0).contains(&min_ratio) {
                    return Err(TrainError::invalid(
                        "LrSchedule.min_ratio",
                        min_ratio,
                        "must be in [0, 1]",
                    ));
                }
                Ok(())
            }
        }
    }

    /// The factor at optimizer step `step` (0-based); errors on an invalid schedule.
    pub fn factor(&self, step: u64) -> Result<f32> {
        self.validate()?;
        let (warmup, total, min_ratio, cosine) = match *self {
            LrSchedule::Constant => return Ok(1.0),
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_ratio,
            } => (warmup_steps, total_steps, min_ratio, true),
            LrSchedule::WarmupLinear {
                warmup_steps,
                total_steps,
                min_ratio,
            } => (warmup_steps, total_steps, min_ratio, false),
        };
        if step < warmup {
            return Ok((step as f64 / warmup as f64) as f32);
        }
        let progress = if total == warmup {
            1.0
        } else {
            ((step - warmup) as f64 / (total - warmup) as f64).min(1.0)
        };
        let shape = if cosine {
            0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        } else {
            1.0 - progress
        };
        let r = f64::from(min_ratio);
        Ok((r + (1.0 - r) * shape) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_at_key_steps() {
        assert_eq!(LrSchedule::Constant.factor(12345).unwrap(), 1.0);
        let lin = LrSchedule::WarmupLinear {
            warmup_steps: 4,
            total_steps: 104,
            min_ratio: 0.0,
        };
        let expected = [
            (0, 0.0),
            (1, 0.25),
            (4, 1.0),
            (54, 0.5),
            (79, 0.25),
            (104, 0.0),
            (1000, 0.0),
        ];
        for (step, f) in expected {
            assert!((lin.factor(step).unwrap() - f).abs() < 1e-7, "step {step}");
        }
        let cos = LrSchedule::WarmupCosine {
            warmup_steps: 0,
            total_steps: 100,
            min_ratio: 0.0,
        };
        assert_eq!(cos.factor(0).unwrap(), 1.0);
        // A quarter of the way: ½(1 + cos(π/4)).
        let quarter = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert!((f64::from(cos.factor(25).unwrap()) - quarter).abs() < 1e-7);
        assert!(cos.factor(100).unwrap().abs() < 1e-7);
        let lin_min = LrSchedule::WarmupLinear {
            warmup_steps: 0,
            total_steps: 10,
            min_ratio: 0.2,
        };
        assert!((lin_min.factor(5).unwrap() - 0.6).abs() < 1e-7);
        assert!((lin_min.factor(50).unwrap() - 0.2).abs() < 1e-7);
        // Warmup that lasts the whole run: ramp up, then straight to min_ratio.
        let all_warmup = LrSchedule::WarmupCosine {
            warmup_steps: 4,
            total_steps: 4,
            min_ratio: 0.5,
        };
        assert_eq!(all_warmup.factor(2).unwrap(), 0.5);
        assert_eq!(all_warmup.factor(4).unwrap(), 0.5);
    }

    #[test]
    fn invalid_schedules_are_errors_and_json_round_trips() {
        let bad = LrSchedule::WarmupCosine {
            warmup_steps: 20,
            total_steps: 10,
            min_ratio: 0.0,
        };
        assert!(bad
            .factor(0)
            .unwrap_err()
            .to_string()
            .contains("warmup_steps"));
        let s = LrSchedule::WarmupLinear {
            warmup_steps: 3,
            total_steps: 30,
            min_ratio: 0.1,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"kind\":\"warmup_linear\""), "{json}");
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
    }

    proptest! {
        /// Factors stay in [0, 1]; after warmup they never increase; never below min_ratio then.
        #[test]
        fn factors_are_bounded_and_decay_monotonically(warmup in 0u64..50, extra in 1u64..200, r in 0.0f32..1.0, cosine: bool) {
            let total = warmup + extra;
            let s = if cosine {
                LrSchedule::WarmupCosine { warmup_steps: warmup, total_steps: total, min_ratio: r }
            } else {
                LrSchedule::WarmupLinear { warmup_steps: warmup, total_steps: total, min_ratio: r }
            };
            let mut prev = f32::INFINITY;
            for step in warmup..total + 10 {
                let f = s.factor(step).unwrap();
                prop_assert!(f <= prev + 1e-7 && f >= r - 1e-6 && f <= 1.0);
                prev = f;
            }
            for step in 0..warmup {
                let f = s.factor(step).unwrap();
                prop_assert!((0.0..1.0).contains(&f));
            }
        }
    }
}
