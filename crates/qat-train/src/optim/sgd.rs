//! SGD with momentum, dampening, Nesterov and weight decay, step for step as
//! `torch.optim.SGD` (single-tensor path): see [`super`].

use super::*;

/// SGD's hyperparameters (learning rates and weight decay live in the [`ParamGroups`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum `μ` (0 = plain SGD).
    pub momentum: f32,
    /// Dampening `τ` of the momentum buffer.
    pub dampening: f32,
    /// Nesterov momentum (needs `μ > 0` and `τ = 0`, as in PyTorch).
    pub nesterov: bool,
}

/// SGD with momentum, optional Nesterov and L2 weight decay, as `torch.optim.SGD`:
///
/// ```text
/// g ← g + wd·p
/// b ← g (first step),  b ← μ·b + (1 − τ)·g (later);   g ← g + μ·b (Nesterov) or g ← b
/// p ← p − lr·g
/// ```
///
/// The caller's gradients are not modified.
///
/// ```
/// use qat_train::optim::{Optimizer, ParamGroups, Sgd, SgdConfig};
/// use qat_train::params::ParamStore;
/// let mut store = ParamStore::new();
/// store.add("w", vec![1], vec![1.0]).unwrap();
/// store.set_grad("w", &[1.0]).unwrap();
/// let config = SgdConfig { momentum: 0.9, ..SgdConfig::default() };
/// let mut opt = Sgd::new(config, ParamGroups::single(0.1, 0.0).unwrap()).unwrap();
/// opt.step(&mut store, 1.0).unwrap(); // b = 1,   w = 1 − 0.1
/// opt.step(&mut store, 1.0).unwrap(); // b = 1.9, w = 0.9 − 0.19
/// assert!((store.get("w").unwrap().value[0] - 0.71).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    groups: ParamGroups,
    step: u64,
    momentum_buffer: BTreeMap<String, Vec<f32>>,
    order: Vec<String>,
}

impl Sgd {
    /// An SGD with no state; errors on a momentum or dampening outside `[0, 1]` or Nesterov
    /// without momentum or with dampening.
    pub fn new(config: SgdConfig, groups: ParamGroups) -> Result<Self> {
        for (name, v) in [
            ("momentum", config.momentum),
            ("dampening", config.dampening),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(TrainError::invalid(
                    format!("SgdConfig.{name}"),
                    v,
                    "must be in [0, 1]",
                ));
            }
        }
        if config.nesterov && (config.momentum == 0.0 || config.dampening != 0.0) {
            return Err(TrainError::invalid(
                "SgdConfig.nesterov",
                true,
                "Nesterov momentum requires a momentum and zero dampening",
            ));
        }
        Ok(Self {
            config,
            groups,
            step: 0,
            momentum_buffer: BTreeMap::new(),
            order: Vec::new(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut dyn ParamVisitor, lr_factor: f32) -> Result<()> {
        let hyper = prepare_step(params, &self.groups, lr_factor, &[&self.momentum_buffer])?;
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
        } = self.config;
        let mut index = 0;
        let (buffers, order) = (&mut self.momentum_buffer, &mut self.order);
        params.visit_params(&mut |name, value, grad| {
            let (lr, wd) = hyper[index];
            index += 1;
            let (lr, wd) = (lr as f32, wd as f32);
            let mut d: Vec<f32> = if wd != 0.0 {
                grad.iter()
                    .zip(value.iter())
                    .map(|(&g, &p)| g + wd * p)
                    .collect()
            } else {
                grad.to_vec()
            };
            if momentum != 0.0 {
                match buffers.get_mut(name) {
                    Some(buf) => {
                        for (b, &g) in buf.iter_mut().zip(&d) {
                            *b = *b * momentum + (1.0 - dampening) * g;
                        }
                    }
                    None => {
                        order.push(name.to_string());
                        buffers.insert(name.to_string(), d.clone());
                    }
                }
                let buf = &buffers[name];
                if nesterov {
                    d.iter_mut().zip(buf).for_each(|(g, &b)| *g += momentum * b);
                } else {
                    d.copy_from_slice(buf);
                }
            }
            value.iter_mut().zip(&d).for_each(|(p, &g)| *p += -lr * g);
            Ok(())
        })?;
        self.step += 1;
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
            kind: "sgd".into(),
            step: self.step,
            config: serde_json::json!({ "sgd": self.config, "groups": self.groups }),
            tensors: export(&[("momentum_buffer", &self.momentum_buffer)], &self.order),
        }
    }

    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        check_kind(&state, "sgd")?;
        let (mut maps, order) = import(state.tensors, &["momentum_buffer"])?;
        self.momentum_buffer = maps.pop().expect("one suffix");
        self.order = order;
        self.step = state.step;
        Ok(())
    }
}
