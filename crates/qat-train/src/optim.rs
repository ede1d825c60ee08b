//! Optimizers (SGD, AdamW) over [`ParamVisitor`]s, parameter groups with their own learning
//! rates, gradient accumulation, and optimizer state as named tensors plus JSON.
//!
//! Both optimizers follow PyTorch's single-tensor implementations step for step (same order of
//! `f32` operations, scalars computed in `f64` as Python does), so a run matches
//! `torch.optim.SGD` / `torch.optim.AdamW` to `f32` rounding. An update is all or nothing: the
//! gradients are checked for NaN/∞ and every parameter's group and state are resolved before
//! any value changes. Every parameter takes a step on every call (one global step count).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, Result, TrainError};
use crate::params::ParamVisitor;

mod adamw;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

/// Per-parameter buffers of one kind, by parameter name.
type Buffers = BTreeMap<String, Vec<f32>>;

/// Which parameter names a [`ParamGroup`] takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameMatcher {
    /// Every name.
    All,
    /// Names containing the string (e.g. `"lora_"`).
    Contains(String),
    /// Names starting with the string.
    Prefix(String),
    /// Names ending with the string.
    Suffix(String),
}

impl NameMatcher {
    /// Whether `name` belongs to this matcher.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NameMatcher::All => true,
            NameMatcher::Contains(s) => name.contains(s.as_str()),
            NameMatcher::Prefix(s) => name.starts_with(s.as_str()),
            NameMatcher::Suffix(s) => name.ends_with(s.as_str()),
        }
    }
}

/// Parameters chosen by name with their own learning rate and weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    /// Label for messages and metrics.
    pub name: String,
    /// Which parameters belong to the group.
    pub matcher: NameMatcher,
    /// Base learning rate (multiplied by the schedule's factor at each step).
    pub lr: f32,
    /// Weight decay (L2 added to the gradient for SGD, decoupled for AdamW).
    pub weight_decay: f32,
}

/// An ordered list of groups; a parameter belongs to the **first** group that matches it.
///
/// ```
/// use qat_train::optim::ParamGroups;
/// let groups = ParamGroups::adapters_and_quantizer_steps(2e-4, 1e-3, 0.01).unwrap();
/// assert_eq!(groups.group_of("layers.0.q_proj.lora_A.weight").unwrap().lr, 2e-4);
/// assert_eq!(groups.group_of("layers.0.q_proj.step_size").unwrap().lr, 1e-3);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ParamGroups {
    groups: Vec<ParamGroup>,
}

impl ParamGroups {
    /// Groups checked for sane values (finite, non-negative `lr` and `weight_decay`, at least
    /// one group, unique names).
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        if groups.is_empty() {
            return Err(TrainError::invalid(
                "parameter groups",
                "[]",
                "at least one group is needed",
            ));
        }
        for (i, g) in groups.iter().enumerate() {
            for (field, v) in [("lr", g.lr), ("weight_decay", g.weight_decay)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(TrainError::invalid(
                        format!("parameter group `{}` {field}", g.name),
                        v,
                        "must be finite and non-negative",
                    ));
                }
            }
            if groups[..i].iter().any(|h| h.name == g.name) {
                return Err(TrainError::invalid(
                    "parameter group name",
                    &g.name,
                    "group names must be unique",
                ));
            }
        }
        Ok(Self { groups })
    }

    /// One group for every parameter.
    pub fn single(lr: f32, weight_decay: f32) -> Result<Self> {
        Self::new(vec![ParamGroup {
            name: "all".into(),
            matcher: NameMatcher::All,
            lr,
            weight_decay,
        }])
    }

    /// LoRA-QAT's two groups: adapter tensors (names containing `lora_`, which includes DoRA's
    /// `lora_magnitude_vector`) at `lora_lr` with `weight_decay`, and every other trainable
    /// tensor — the quantizers' learned step sizes — at `scale_lr` without weight decay (decay
    /// would pull a step size towards zero, i.e. towards a coarser grid's collapse).
    pub fn adapters_and_quantizer_steps(
        lora_lr: f32,
        scale_lr: f32,
        weight_decay: f32,
    ) -> Result<Self> {
        Self::new(vec![
            ParamGroup {
                name: "adapters".into(),
                matcher: NameMatcher::Contains("lora_".into()),
                lr: lora_lr,
                weight_decay,
            },
            ParamGroup {
                name: "quantizer_steps".into(),
                matcher: NameMatcher::All,
                lr: scale_lr,
                weight_decay: 0.0,
            },
        ])
    }

    /// The first group matching `name`, or an error naming the parameter.
    pub fn group_of(&self, name: &str) -> Result<&ParamGroup> {
        self.groups
            .iter()
            .find(|g| g.matcher.matches(name))
            .ok_or_else(|| {
                TrainError::invalid(
                    "parameter",
                    name,
                    format!(
                        "no parameter group matches it (groups: {})",
                        self.groups
                            .iter()
                            .map(|g| g.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    /// The groups in order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
}

/// Optimizer state: the step count, hyperparameters and per-parameter buffers by name.
///
/// Buffers are named `{parameter}.{buffer}` (`exp_avg`, `exp_avg_sq` for AdamW,
/// `momentum_buffer` for SGD), so they can sit in a checkpoint's safetensors file next to the
/// weights; [`meta_json`](Self::meta_json) is the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// `"adamw"` or `"sgd"`.
    pub kind: String,
    /// Steps taken.
    pub step: u64,
    /// The optimizer's configuration, as JSON.
    pub config: serde_json::Value,
    /// Buffers by name, in parameter order.
    pub tensors: Vec<(String, Vec<f32>)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateMeta {
    kind: String,
    step: u64,
    config: serde_json::Value,
    tensor_names: Vec<String>,
}

impl OptimizerState {
    /// Everything but the buffers' values: kind, step, config and the buffer names.
    pub fn meta_json(&self) -> serde_json::Value {
        serde_json::to_value(StateMeta {
            kind: self.kind.clone(),
            step: self.step,
            config: self.config.clone(),
            tensor_names: self.tensors.iter().map(|(n, _)| n.clone()).collect(),
        })
        .expect("plain data serializes")
    }

    /// Rebuilds a state from [`meta_json`](Self::meta_json) and the buffers; errors when a
    /// buffer the JSON lists is missing (or one is not listed).
    ///
    /// ```
    /// use qat_train::optim::{AdamW, AdamWConfig, OptimizerState, ParamGroups, Optimizer};
    /// let opt = AdamW::new(AdamWConfig::default(), ParamGroups::single(1e-3, 0.0).unwrap()).unwrap();
    /// let state = opt.state();
    /// let back = OptimizerState::from_parts(&state.meta_json(), state.tensors.clone()).unwrap();
    /// assert_eq!(back, state);
    /// ```
    pub fn from_parts(meta: &serde_json::Value, tensors: Vec<(String, Vec<f32>)>) -> Result<Self> {
        let meta: StateMeta = serde_json::from_value(meta.clone())
            .map_err(|e| TrainError::invalid("optimizer state", "JSON metadata", e.to_string()))?;
        let mut by_name: BTreeMap<String, Vec<f32>> = tensors.into_iter().collect();
        let mut ordered = Vec::with_capacity(meta.tensor_names.len());
        for name in &meta.tensor_names {
            let t = by_name.remove(name).ok_or_else(|| {
                TrainError::invalid(
                    "optimizer state tensor",
                    name,
                    "listed in the JSON but not among the tensors",
                )
            })?;
            ordered.push((name.clone(), t));
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(TrainError::invalid(
                "optimizer state tensor",
                extra,
                "not listed in the JSON",
            ));
        }
        Ok(Self {
            kind: meta.kind,
            step: meta.step,
            config: meta.config,
            tensors: ordered,
        })
    }
}

/// An optimizer over named parameters.
pub trait Optimizer {
    /// One update of every parameter with learning rate `group.lr · lr_factor` (the schedule's
    /// factor). Errors — before changing anything — on a non-finite gradient (naming the
    /// parameter and index), a parameter no group matches, a state buffer of the wrong length,
    /// or a `lr_factor` that is not finite and non-negative.
    fn step(&mut self, params: &mut dyn ParamVisitor, lr_factor: f32) -> Result<()>;
    /// Steps taken so far.
    fn step_count(&self) -> u64;
    /// The parameter groups.
    fn groups(&self) -> &ParamGroups;
    /// A copy of the state for a checkpoint.
    fn state(&self) -> OptimizerState;
    /// Restores a state saved by [`state`](Self::state); errors on another optimizer kind or a
    /// buffer name that does not fit.
    fn load_state(&mut self, state: OptimizerState) -> Result<()>;
}

/// Checks `lr_factor`, every gradient's finiteness, each parameter's group and the lengths of
/// its existing buffers; returns each parameter's `(lr, weight_decay)` in visiting order.
fn prepare_step(
    params: &mut dyn ParamVisitor,
    groups: &ParamGroups,
    lr_factor: f32,
    buffers: &[&BTreeMap<String, Vec<f32>>],
) -> Result<Vec<(f64, f64)>> {
    if !(lr_factor.is_finite() && lr_factor >= 0.0) {
        return Err(TrainError::invalid(
            "lr_factor",
            lr_factor,
            "must be finite and non-negative",
        ));
    }
    let mut hyper = Vec::new();
    params.visit_params(&mut |name, value, grad| {
        if value.len() != grad.len() {
            return Err(TrainError::shape(
                format!("gradient of `{name}`"),
                value.len(),
                grad.len(),
            ));
        }
        check_finite(&format!("gradient of `{name}`"), grad)?;
        for map in buffers {
            if let Some(buf) = map.get(name) {
                if buf.len() != value.len() {
                    return Err(TrainError::shape(
                        format!("optimizer state of `{name}`"),
                        value.len(),
                        buf.len(),
                    ));
                }
            }
        }
        let g = groups.group_of(name)?;
        hyper.push((
            f64::from(g.lr) * f64::from(lr_factor),
            f64::from(g.weight_decay),
        ));
        Ok(())
    })?;
    Ok(hyper)
}

fn export(
    maps: &[(&str, &BTreeMap<String, Vec<f32>>)],
    order: &[String],
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for name in order {
        for (suffix, map) in maps {
            if let Some(buf) = map.get(name) {
                out.push((format!("{name}.{suffix}"), buf.clone()));
            }
        }
    }
    out
}

fn check_kind(state: &OptimizerState, kind: &str) -> Result<()> {
    if state.kind != kind {
        return Err(TrainError::invalid(
            "optimizer state kind",
            &state.kind,
            format!("this optimizer is {kind}"),
        ));
    }
    Ok(())
}

/// Splits `{parameter}.{suffix}` buffer names by suffix.
fn import(
    tensors: Vec<(String, Vec<f32>)>,
    suffixes: &[&str],
) -> Result<(Vec<Buffers>, Vec<String>)> {
    let mut maps = vec![BTreeMap::new(); suffixes.len()];
    let mut order = Vec::new();
    for (full, t) in tensors {
        let (k, param) = suffixes
            .iter()
            .enumerate()
            .find_map(|(k, s)| full.strip_suffix(&format!(".{s}")).map(|p| (k, p)))
            .ok_or_else(|| {
                TrainError::invalid(
                    "optimizer state tensor",
                    &full,
                    format!("expected a name ending in one of .{}", suffixes.join(", .")),
                )
            })?;
        if !order.iter().any(|o| o == param) {
            order.push(param.to_string());
        }
        maps[k].insert(param.to_string(), t);
    }
    Ok((maps, order))
}

/// Gradient accumulation over `micro_batches` micro-batches: scale each micro-batch's loss
/// gradient by [`loss_scale`](Self::loss_scale), call [`record`](Self::record) after each
/// backward, and step the optimizer when it returns `true`.
///
/// ```
/// use qat_train::optim::GradientAccumulation;
/// let mut acc = GradientAccumulation::new(3).unwrap();
/// assert_eq!(acc.loss_scale(), 1.0 / 3.0);
/// assert_eq!([acc.record(), acc.record(), acc.record(), acc.record()], [false, false, true, false]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradientAccumulation {
    micro_batches: usize,
    pending: usize,
}

impl GradientAccumulation {
    /// Errors when `micro_batches` is zero.
    pub fn new(micro_batches: usize) -> Result<Self> {
        if micro_batches == 0 {
            return Err(TrainError::invalid(
                "gradient accumulation micro_batches",
                0,
                "must be at least 1",
            ));
        }
        Ok(Self {
            micro_batches,
            pending: 0,
        })
    }

    /// `1 / micro_batches`: the factor on each micro-batch's loss so the accumulated gradient
    /// is the mean over micro-batches.
    pub fn loss_scale(&self) -> f32 {
        1.0 / self.micro_batches as f32
    }

    /// Records one finished micro-batch; `true` when an optimizer step is due (the counter
    /// then restarts).
    pub fn record(&mut self) -> bool {
        self.pending += 1;
        if self.pending == self.micro_batches {
            self.pending = 0;
            true
        } else {
            false
        }
    }

    /// Micro-batches accumulated since the last step.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Micro-batches per optimizer step.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }
}

#[cfg(test)]
mod tests;
