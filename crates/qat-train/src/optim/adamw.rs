//! AdamW, step for step as `torch.optim.AdamW` (single-tensor path): see [`super`].

use super::*;

/// AdamW's hyperparameters (learning rates and weight decay live in the [`ParamGroups`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// `(β₁, β₂)`, PyTorch's default `(0.9, 0.999)`.
    pub betas: (f32, f32),
    /// `ε`, PyTorch's default `1e-8`.
    pub eps: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

/// AdamW (Loshchilov & Hutter) exactly as `torch.optim.AdamW` (non-amsgrad): for step `t`,
///
/// ```text
/// p ← p·(1 − lr·wd)
/// m ← m + (1 − β₁)(g − m);   v ← β₂·v + (1 − β₂)·g²
/// p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
/// ```
///
/// ```
/// use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
/// use qat_train::params::ParamStore;
/// let mut store = ParamStore::new();
/// store.add("w", vec![1], vec![1.0]).unwrap();
/// store.set_grad("w", &[0.5]).unwrap();
/// let mut opt = AdamW::new(AdamWConfig::default(), ParamGroups::single(0.1, 0.0).unwrap()).unwrap();
/// opt.step(&mut store, 1.0).unwrap();
/// // The first bias-corrected step moves by ≈ lr·sign(g).
/// assert!((store.get("w").unwrap().value[0] - 0.9).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    groups: ParamGroups,
    step: u64,
    exp_avg: BTreeMap<String, Vec<f32>>,
    exp_avg_sq: BTreeMap<String, Vec<f32>>,
    order: Vec<String>,
}

impl AdamW {
    /// An AdamW with no state; errors when `β` is outside `[0, 1)` or `ε` is not finite and
    /// positive.
    pub fn new(config: AdamWConfig, groups: ParamGroups) -> Result<Self> {
        for (name, b) in [("betas.0", config.betas.0), ("betas.1", config.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(TrainError::invalid(
                    format!("AdamWConfig.{name}"),
                    b,
                    "must be in [0, 1)",
                ));
            }
        }
        if !(config.eps.is_finite() && config.eps > 0.0) {
            return Err(TrainError::invalid(
                "AdamWConfig.eps",
                config.eps,
                "must be finite and positive",
            ));
        }
        Ok(Self {
            config,
            groups,
            step: 0,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
            order: Vec::new(),
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut dyn ParamVisitor, lr_factor: f32) -> Result<()> {
        let hyper = prepare_step(
            params,
            &self.groups,
            lr_factor,
            &[&self.exp_avg, &self.exp_avg_sq],
        )?;
        let t = self.step + 1;
        let (beta1, beta2) = (
            f64::from(self.config.betas.0),
            f64::from(self.config.betas.1),
        );
        let bias_correction1 = 1.0 - beta1.powi(t.min(i32::MAX as u64) as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t.min(i32::MAX as u64) as i32)).sqrt();
        let eps = self.config.eps;
        let mut index = 0;
        let (exp_avg, exp_avg_sq, order) =
            (&mut self.exp_avg, &mut self.exp_avg_sq, &mut self.order);
        params.visit_params(&mut |name, value, grad| {
            let (lr, wd) = hyper[index];
            index += 1;
            if !exp_avg.contains_key(name) {
                order.push(name.to_string());
            }
            let m = exp_avg
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; value.len()]);
            let v = exp_avg_sq
                .entry(name.to_string())
                .or_insert_with(|| vec![0.0; value.len()]);
            let decay = (1.0 - lr * wd) as f32;
            let one_minus_beta1 = (1.0 - beta1) as f32;
            let one_minus_beta2 = (1.0 - beta2) as f32;
            let beta2 = beta2 as f32;
            let step_size = (lr / bias_correction1) as f32;
            let bc2_sqrt = bias_correction2_sqrt as f32;
            for (((p, &g), m), v) in value.iter_mut().zip(grad.iter()).zip(m).zip(v) {
                *p *= decay;
                *m += one_minus_beta1 * (g - *m);
                *v = *v * beta2 + one_minus_beta2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            }
            Ok(())
        })?;
        self.step = t;
        Ok(())
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn groups(&self) -> &ParamGroups {
        &self.groups
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            kind: "adamw".into(),
            step: self.step,
            config: serde_json::json!({ "adamw": self.config, "groups": self.groups }),
            tensors: export(
                &[("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)],
                &self.order,
            ),
        }
    }

    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        check_kind(&state, "adamw")?;
        let (mut maps, order) = import(state.tensors, &["exp_avg", "exp_avg_sq"])?;
        let exp_avg_sq = maps.pop().expect("two suffixes");
        let exp_avg = maps.pop().expect("two suffixes");
        if let Some(name) = order
            .iter()
            .find(|n| exp_avg.contains_key(*n) != exp_avg_sq.contains_key(*n))
        {
            return Err(TrainError::invalid(
                "optimizer state",
                name,
                "AdamW needs both exp_avg and exp_avg_sq for every parameter",
            ));
        }
        self.step = state.step;
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.order = order;
        Ok(())
    }
}
