//! The trainer's configuration: serde (a `train.json` file), defaults for every field, and
//! validation whose errors name the field (`TrainConfig.optimizer.lr`).

use std::path::Path;

use quant_core::linalg::ComputeDtype;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::{CompositeWeights, HiddenLossKind, ReasoningLossConfig};
use crate::optim::{AdamWConfig, NameMatcher, ParamGroup, ParamGroups, SgdConfig};
use crate::schedule::LrSchedule;

/// Which optimizer updates the trainable tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    #[default]
    Adamw,
    /// SGD with momentum.
    Sgd,
}

/// The optimizer and its two parameter groups.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// AdamW or SGD.
    pub kind: OptimizerKind,
    /// Learning rate of every trainable tensor but the quantizers' steps (the adapters).
    pub lr: f32,
    /// Learning rate of the quantizers' learned steps/scales (tensors whose name contains
    /// `quantizer`); `None` = `lr`.
    pub quantizer_lr: Option<f32>,
    /// Weight decay of the adapter group (the quantizer group never decays: decay would pull a
    /// step towards zero).
    pub weight_decay: f32,
    /// AdamW's betas and epsilon.
    pub adamw: AdamWConfig,
    /// SGD's momentum, dampening, Nesterov.
    pub sgd: SgdConfig,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            lr: 1e-4,
            quantizer_lr: None,
            weight_decay: 0.0,
            adamw: AdamWConfig::default(),
            sgd: SgdConfig::default(),
        }
    }
}

/// The substring that marks a quantizer's learned step among parameter names.
pub const QUANTIZER_NAME_MARK: &str = "quantizer";

impl OptimizerConfig {
    /// The two groups: `quantizer_steps` (names containing [`QUANTIZER_NAME_MARK`], at
    /// `quantizer_lr`, no decay) first, then `adapters` (everything else, at `lr`).
    pub fn param_groups(&self) -> Result<ParamGroups> {
        ParamGroups::new(vec![
            ParamGroup {
                name: "quantizer_steps".into(),
                matcher: NameMatcher::Contains(QUANTIZER_NAME_MARK.into()),
                lr: self.quantizer_lr.unwrap_or(self.lr),
                weight_decay: 0.0,
            },
            ParamGroup {
                name: "adapters".into(),
                matcher: NameMatcher::All,
                lr: self.lr,
                weight_decay: self.weight_decay,
            },
        ])
    }
}

/// Which student layer is compared with which teacher layer (decoder layer indices, 0-based;
/// the layer's output is the residual stream after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerPair {
    /// Student decoder layer.
    pub student: usize,
    /// Teacher decoder layer.
    pub teacher: usize,
}

/// Hidden-state distillation on chosen layer pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HiddenDistillConfig {
    /// Weight of the term in the total loss.
    pub weight: f32,
    /// MSE or cosine.
    pub kind: HiddenLossKind,
    /// The layer pairs (mean over pairs).
    pub layers: Vec<LayerPair>,
}

/// The objective: composite weights, the reasoning loss's own weights and layers, optional
/// hidden-state distillation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// `λ_task, λ_kd, λ_reasoning, T`. `None`: the `default` preset with a teacher, the task
    /// loss alone without one.
    pub weights: Option<CompositeWeights>,
    /// A preset name ([`CompositeWeights::PRESETS`]) used when `weights` is `None` and a
    /// teacher is given.
    pub preset: Option<String>,
    /// Weights of the reasoning loss's step / trajectory / answer terms.
    pub reasoning: ReasoningLossConfig,
    /// The layers the reasoning loss reads; `None` = the last layer of each model.
    pub reasoning_layers: Option<LayerPair>,
    /// Hidden-state distillation, off by default.
    pub hidden: Option<HiddenDistillConfig>,
}

impl LossConfig {
    /// The weights in effect with or without a teacher.
    pub fn effective_weights(&self, has_teacher: bool) -> Result<CompositeWeights> {
        if let Some(w) = self.weights {
            return Ok(w);
        }
        if has_teacher {
            CompositeWeights::preset(self.preset.as_deref().unwrap_or("default"))
        } else {
            Ok(CompositeWeights {
                task: 1.0,
                kd: 0.0,
                reasoning: 0.0,
                ..CompositeWeights::default()
            })
        }
    }
}

/// Calibration of the quantizers before training (LoRA-QAT students only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalibrationConfig {
    /// Batches of training data on which each candidate initialisation of the quantizer steps
    /// (absmax, MSE clip search — both from the weights) is scored by the training loss with
    /// fake quantization on; the lowest wins. `0`: MSE clip search from the weights alone.
    pub batches: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self { batches: 2 }
    }
}

/// Stop when the validation loss has not improved for a while.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without an improvement of more than `min_delta` before stopping.
    pub patience: u64,
    /// Smallest decrease that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
}

/// Everything a training run is configured by. Every field has a default, so a JSON file
/// names only what it changes; unknown fields are errors.
///
/// ```
/// use qat_train::config::TrainConfig;
/// let config = TrainConfig::from_json_str(r#"{"max_steps": 10, "optimizer": {"lr": 1e-3}}"#).unwrap();
/// assert_eq!((config.max_steps, config.optimizer.lr, config.batch_size), (Some(10), 1e-3, 8));
/// let err = TrainConfig::from_json_str(r#"{"optimizer": {"lr": -1}}"#).unwrap_err();
/// assert!(err.to_string().contains("TrainConfig.optimizer.lr"), "{err}");
/// assert!(TrainConfig::from_json_str(r#"{"max_step": 10}"#).is_err()); // a typo is an error
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of the data order, the dropout masks and anything else random.
    pub seed: u64,
    /// Optimizer steps; `None` = `epochs` passes over the data.
    pub max_steps: Option<u64>,
    /// Passes over the training data when `max_steps` is `None` (default 1).
    pub epochs: Option<u64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation: usize,
    /// Truncate examples to this many tokens.
    pub max_len: Option<usize>,
    /// Token id of padding.
    pub pad_id: u32,
    /// Shuffle each epoch (seeded).
    pub shuffle: bool,
    /// Optimizer and learning rates.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule over optimizer steps.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this (`None` = no clipping).
    pub max_grad_norm: Option<f32>,
    /// The objective.
    pub loss: LossConfig,
    /// Quantizer calibration (LoRA-QAT students).
    pub calibration: CalibrationConfig,
    /// Optimizer steps trained in full precision (fake quantization off) before quantization
    /// is switched on (LoRA-QAT students).
    pub quant_warmup_steps: u64,
    /// Evaluate on the validation set every this many optimizer steps (and at the end).
    pub eval_every: Option<u64>,
    /// Early stopping on the validation loss (needs `eval_every` and a validation set).
    pub early_stopping: Option<EarlyStopping>,
    /// Save a checkpoint every this many optimizer steps (when the run has a checkpoint path).
    pub checkpoint_every: Option<u64>,
    /// The precision of the student's and the teacher's matrix products: `"f32"` (default)
    /// or `"bf16"` (operands rounded to bf16, sums in `f32`, as PyTorch's CPU autocast);
    /// master weights, gradients, optimizer state, norms, softmax and losses stay `f32`.
    pub compute_dtype: ComputeDtype,
    /// Gradient checkpointing: keep only each decoder layer's input in the forward and
    /// recompute the layer in backward (bit-identical gradients, one layer's activations held
    /// at a time, about one more forward per step). Default off.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            max_steps: None,
            epochs: None,
            batch_size: 8,
            gradient_accumulation: 1,
            max_len: None,
            pad_id: 0,
            shuffle: true,
            optimizer: OptimizerConfig::default(),
            schedule: LrSchedule::Constant,
            max_grad_norm: Some(1.0),
            loss: LossConfig::default(),
            calibration: CalibrationConfig::default(),
            quant_warmup_steps: 0,
            eval_every: None,
            early_stopping: None,
            checkpoint_every: None,
            compute_dtype: ComputeDtype::F32,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Parses and validates a JSON object (see the type's example).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| TrainError::invalid("TrainConfig", "JSON", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a JSON file; errors name the file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| TrainError::Data {
            source_name: path.display().to_string(),
            line: e.line(),
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the error names it (`TrainConfig.<path>`) and its value.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(TrainError::invalid(
                    format!("TrainConfig.{name}"),
                    v,
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        positive("batch_size", self.batch_size)?;
        positive("gradient_accumulation", self.gradient_accumulation)?;
        if let Some(m) = self.max_len {
            positive("max_len", m)?;
        }
        for (name, v) in [("max_steps", self.max_steps), ("epochs", self.epochs)] {
            if v == Some(0) {
                return Err(TrainError::invalid(
                    format!("TrainConfig.{name}"),
                    0,
                    "must be at least 1",
                ));
            }
        }
        for (name, v) in [
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == Some(0) {
                return Err(TrainError::invalid(
                    format!("TrainConfig.{name}"),
                    0,
                    "must be at least 1 (leave it out to disable)",
                ));
            }
        }
        let o = &self.optimizer;
        for (name, v) in [
            ("lr", Some(o.lr)),
            ("quantizer_lr", o.quantizer_lr),
            ("weight_decay", Some(o.weight_decay)),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(TrainError::invalid(
                    format!("TrainConfig.optimizer.{name}"),
                    v,
                    "must be finite and non-negative",
                ));
            }
        }
        let prefixed = |e: TrainError, prefix: &str| match e {
            TrainError::InvalidArgument {
                name,
                value,
                reason,
            } => TrainError::InvalidArgument {
                name: format!("TrainConfig.{prefix}{name}"),
                value,
                reason,
            },
            other => other,
        };
        match o.kind {
            OptimizerKind::Adamw => crate::optim::AdamW::new(o.adamw, o.param_groups()?)
                .map(|_| ())
                .map_err(|e| prefixed(e, "optimizer.")),
            OptimizerKind::Sgd => crate::optim::Sgd::new(o.sgd, o.param_groups()?)
                .map(|_| ())
                .map_err(|e| prefixed(e, "optimizer.")),
        }?;
        self.schedule
            .validate()
            .map_err(|e| prefixed(e, "schedule."))?;
        if let Some(v) = self.max_grad_norm.filter(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(TrainError::invalid(
                "TrainConfig.max_grad_norm",
                v,
                "must be finite and positive (leave it out to disable clipping)",
            ));
        }
        if let Some(w) = &self.loss.weights {
            w.validate().map_err(|e| prefixed(e, "loss.weights."))?;
        }
        if let Some(p) = &self.loss.preset {
            CompositeWeights::preset(p).map_err(|_| {
                TrainError::invalid(
                    "TrainConfig.loss.preset",
                    p,
                    format!("known presets: {}", CompositeWeights::PRESETS.join(", ")),
                )
            })?;
        }
        self.loss
            .reasoning
            .validate()
            .map_err(|e| prefixed(e, "loss.reasoning."))?;
        if let Some(h) = &self.loss.hidden {
            if !(h.weight.is_finite() && h.weight >= 0.0) {
                return Err(TrainError::invalid(
                    "TrainConfig.loss.hidden.weight",
                    h.weight,
                    "must be finite and non-negative",
                ));
            }
            if h.layers.is_empty() {
                return Err(TrainError::invalid(
                    "TrainConfig.loss.hidden.layers",
                    "[]",
                    "at least one layer pair is needed",
                ));
            }
        }
        if self.early_stopping.is_some() && self.eval_every.is_none() {
            return Err(TrainError::invalid(
                "TrainConfig.early_stopping",
                "set",
                "needs eval_every (early stopping watches the validation loss)",
            ));
        }
        if let Some(es) = &self.early_stopping {
            if es.patience == 0 || !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
                return Err(TrainError::invalid(
                    "TrainConfig.early_stopping",
                    format!("patience {}, min_delta {}", es.patience, es.min_delta),
                    "patience must be at least 1 and min_delta finite and non-negative",
                ));
            }
        }
        Ok(())
    }
}
