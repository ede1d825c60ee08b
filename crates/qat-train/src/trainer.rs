//! The training loop: a student `lm` model (base + adapters) trained by real forward,
//! backward and optimizer steps on the composite objective, with an optional frozen teacher,
//! evaluation, early stopping and bit-identical resume.
//!
//! One optimizer step ([`Trainer::step`]):
//!
//! 1. For each of `gradient_accumulation` micro-batches: reseed the adapters' dropout from the
//!    trainer's RNG; the student's forward keeps its activations; the teacher (evaluation
//!    mode, no activations kept) gives logits and the hidden states the losses read; the
//!    composite loss gives `∂L/∂logits` and `∂L/∂h` for the student layers the reasoning and
//!    hidden-state terms read; [`LlamaModel::backward_with_hidden`] takes both, scaled by
//!    `1/gradient_accumulation`, and accumulates every trainable tensor's gradient.
//! 2. The global gradient norm is measured (and clipped to `max_grad_norm`); the optimizer
//!    updates every trainable tensor with its group's learning rate times the schedule's
//!    factor; gradients are zeroed.
//!
//! As one rank of a data-parallel run ([`Trainer::set_collective`], [`crate::distributed`]),
//! step 1 computes only this rank's contiguous block of the micro-batches, and the gradients
//! are summed over the ranks (rank order) before step 2.
//!
//! The loop lives here; its parts in submodules: `calibrate` (the quantizer steps when fake
//! quantization turns on), `objective` (the losses of one batch and their gradients),
//! `evaluation` (held-out losses, early stopping), `persist` (checkpoints, adapter and
//! quantized-weight files).
//!
//! The reasoning loss is taken per sequence (its trajectory term must not join one example's
//! last step to the next example's first) and averaged over the sequences that have step or
//! answer positions.

use std::path::Path;
use std::time::Instant;

use lm::{LinearModule, LlamaModel};
use ndarray::{Array2, ArrayView2};
use quant_core::quantizer::InitMethod;
use rand::RngCore;

use crate::checkpoint::TrainRng;
use crate::config::{LayerPair, OptimizerKind, TrainConfig};
use crate::data::{BatchConfig, DataLoader, Dataset};
use crate::distributed::{self, Collective, SingleProcess};
use crate::error::{Result, TrainError};
use crate::loss::{CompositeOutput, CompositeWeights};
use crate::metrics::{EvalMetrics, MetricsCallback, StepMetrics};
use crate::optim::{AdamW, Optimizer, Sgd};
use crate::params::{clip_grad_norm, grad_norm, ParamFn, ParamVisitor};

mod calibrate;
mod evaluation;
mod objective;
mod persist;

use objective::LossSums;

/// The trainable tensors of an `lm` model (those with a gradient buffer: active adapters,
/// learned quantizer steps, base tensors made trainable) as a [`ParamVisitor`], under the
/// model's parameter names.
pub struct TrainableParams<'a>(pub &'a mut LlamaModel);

impl ParamVisitor for TrainableParams<'_> {
    fn visit_params(&mut self, f: &mut ParamFn<'_>) -> Result<()> {
        // lm's callback returns lm::Result: keep the first TrainError aside and skip the rest.
        let mut failure: Option<TrainError> = None;
        self.0.visit_trainable_parameters(|name, p| {
            if let (None, Some(grad)) = (&failure, p.grad) {
                if let Err(e) = f(name, p.value, grad) {
                    failure = Some(e);
                }
            }
            Ok(())
        })?;
        failure.map_or(Ok(()), Err)
    }
}

/// A teacher's logits `[N, V]` and the hidden states the losses read (each `[N, D]`).
type TeacherOutputs = (Array2<f32>, Vec<Array2<f32>>);

/// The losses of one batch and the gradients they send into the student.
struct BatchLoss {
    composite: CompositeOutput,
    hidden: Option<f64>,
    /// `(student layer, ∂L/∂h)`, unscaled.
    grad_hidden: Vec<(usize, Array2<f32>)>,
}

/// What the calibration of the quantizer steps found: each candidate initialisation's mean
/// training loss (fake quantization on) over the calibration batches, and the one kept.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationReport {
    /// Optimizer step at which it ran (the end of the full-precision warm-up).
    pub step: u64,
    /// `(candidate, mean loss)`; empty when calibrating from the weights alone.
    pub candidates: Vec<(InitMethod, f64)>,
    /// The initialisation kept.
    pub chosen: InitMethod,
}

/// What a run ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps taken in total (including those before a resume).
    pub steps: u64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The best validation loss seen, if evaluated.
    pub best_eval_loss: Option<f64>,
    /// The last evaluation, if any.
    pub last_eval: Option<EvalMetrics>,
}

/// Trains a student [`LlamaModel`] (see the [module docs](self)).
///
/// ```
/// use lm::{LlamaConfig, LlamaModel};
/// use lora_core::LoraConfig;
/// use qat_train::config::TrainConfig;
/// use qat_train::data::{Dataset, Example};
/// use qat_train::metrics::MetricsLog;
/// use qat_train::trainer::Trainer;
///
/// let mut student = LlamaModel::random(LlamaConfig::new(16, 16, 32, 1, 2, 2).unwrap(), 1).unwrap();
/// let targets = ["q_proj", "v_proj", "down_proj", "lm_head"];
/// student.inject_adapters(&LoraConfig::new(4, 8.0, &targets), "default", 2).unwrap();
/// let data = Dataset::new(vec![Example::new(vec![1, 2, 3, 4, 5, 6]); 2]).unwrap();
/// let config = TrainConfig::from_json_str(
///     r#"{"max_steps": 40, "batch_size": 2, "optimizer": {"lr": 0.01}}"#).unwrap();
/// let mut trainer = Trainer::new(config, student, None, data, None).unwrap();
/// let mut log = MetricsLog::default();
/// let summary = trainer.train(&mut [&mut log], None).unwrap();
/// assert_eq!(summary.steps, 40);
/// assert!(log.steps[39].total_loss < 0.5 * log.steps[0].total_loss);
/// ```
pub struct Trainer {
    config: TrainConfig,
    weights: CompositeWeights,
    student: LlamaModel,
    teacher: Option<LlamaModel>,
    optimizer: Box<dyn Optimizer>,
    loader: DataLoader,
    validation: Option<Dataset>,
    rng: TrainRng,
    step: u64,
    total_steps: u64,
    best_eval: Option<f64>,
    evals_since_best: u64,
    stopped_early: bool,
    last_eval: Option<EvalMetrics>,
    /// LoRA-QAT layers of the student (whose fake quantization the phases switch).
    quant_layers: usize,
    calibration: Option<CalibrationReport>,
    /// The ranks of a data-parallel run ([`SingleProcess`] unless
    /// [`Trainer::set_collective`] says otherwise).
    collective: Box<dyn Collective>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .field("total_steps", &self.total_steps)
            .field("has_teacher", &self.teacher.is_some())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A trainer at step 0. `student` is the model to train as it is (base + adapters
    /// injected or loaded; whatever has a gradient buffer trains); `teacher`, when given, is
    /// run in evaluation mode and never updated. Errors when the config is invalid, a loss
    /// weight needs a teacher that is missing, a layer the losses read does not exist, the
    /// student has nothing to train, or the data cannot be batched.
    pub fn new(
        config: TrainConfig,
        mut student: LlamaModel,
        mut teacher: Option<LlamaModel>,
        train: Dataset,
        validation: Option<Dataset>,
    ) -> Result<Self> {
        config.validate()?;
        let weights = config.loss.effective_weights(teacher.is_some())?;
        let needs_teacher = weights.kd > 0.0
            || weights.reasoning > 0.0
            || config.loss.hidden.as_ref().is_some_and(|h| h.weight > 0.0);
        if needs_teacher && teacher.is_none() {
            return Err(TrainError::invalid(
                "TrainConfig.loss",
                format!(
                    "kd {}, reasoning {}, hidden {:?}",
                    weights.kd,
                    weights.reasoning,
                    config.loss.hidden.as_ref().map(|h| h.weight)
                ),
                "distillation and reasoning terms need a teacher model",
            ));
        }
        if let Some(t) = &teacher {
            let (sv, tv) = (student.config().vocab_size, t.config().vocab_size);
            if sv != tv {
                return Err(TrainError::shape(
                    "teacher vocabulary (KD compares logits token by token)",
                    sv,
                    tv,
                ));
            }
        }
        let pairs = layer_pairs(&config, &student, teacher.as_ref(), &weights);
        for (what, pair) in &pairs {
            let s_layers = student.config().num_hidden_layers;
            let t_layers = teacher.as_ref().map_or(0, |t| t.config().num_hidden_layers);
            if pair.student >= s_layers || pair.teacher >= t_layers {
                return Err(TrainError::invalid(
                    format!("TrainConfig.loss.{what}"),
                    format!("student {}, teacher {}", pair.student, pair.teacher),
                    format!(
                        "the student has decoder layers 0..{s_layers}, the teacher 0..{t_layers}"
                    ),
                ));
            }
        }
        let mut trainable = 0usize;
        student.visit_trainable_parameters(|_, p| {
            trainable += p.value.len();
            Ok(())
        })?;
        if trainable == 0 {
            return Err(TrainError::invalid(
                "student",
                "0 trainable parameters",
                "inject or load adapters (or make the base trainable) before training",
            ));
        }
        student.set_training(true);
        student.set_compute_dtype(config.compute_dtype);
        student.set_gradient_checkpointing(config.gradient_checkpointing);
        let quant_layers = student
            .linear_modules_mut()
            .filter(|(_, lin)| matches!(lin, LinearModule::Qat(_)))
            .count();
        if let Some(t) = teacher.as_mut() {
            t.set_training(false);
            t.set_base_trainable(false);
            t.set_compute_dtype(config.compute_dtype);
        }
        let loader = DataLoader::new(train, batch_config(&config, config.shuffle))?;
        let micro_batches = config
            .epochs
            .unwrap_or(1)
            .saturating_mul(loader.batches_per_epoch() as u64);
        let total_steps = config
            .max_steps
            .unwrap_or_else(|| (micro_batches / config.gradient_accumulation as u64).max(1));
        check_warmup(&config, quant_layers, total_steps)?;
        if let Some(v) = &validation {
            if v.is_empty() {
                return Err(TrainError::invalid(
                    "validation dataset",
                    "0 examples",
                    "leave it out instead",
                ));
            }
        }
        let optimizer = build_optimizer(&config)?;
        Ok(Self {
            rng: TrainRng::new(config.seed),
            weights,
            student,
            teacher,
            optimizer,
            loader,
            validation,
            step: 0,
            total_steps,
            best_eval: None,
            evals_since_best: 0,
            stopped_early: false,
            last_eval: None,
            quant_layers,
            calibration: None,
            collective: Box::new(SingleProcess),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The composite weights in effect.
    pub fn weights(&self) -> CompositeWeights {
        self.weights
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Optimizer steps the run takes in total (`max_steps`, or epochs over the data).
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Sets the number of optimizer steps the run takes in total (e.g. to extend a resumed
    /// run); errors when it is zero.
    pub fn set_total_steps(&mut self, steps: u64) -> Result<()> {
        if steps == 0 {
            return Err(TrainError::invalid("total steps", 0, "must be at least 1"));
        }
        check_warmup(&self.config, self.quant_layers, steps)?;
        self.total_steps = steps;
        Ok(())
    }

    /// Whether the run is over (all steps taken, or stopped early).
    pub fn is_finished(&self) -> bool {
        self.stopped_early || self.step >= self.total_steps
    }

    /// The student.
    pub fn student(&self) -> &LlamaModel {
        &self.student
    }

    /// The student, mutably (e.g. to export merged weights).
    pub fn student_mut(&mut self) -> &mut LlamaModel {
        &mut self.student
    }

    /// The teacher, if any.
    pub fn teacher(&self) -> Option<&LlamaModel> {
        self.teacher.as_ref()
    }

    /// Ends the run and returns the student.
    pub fn into_student(self) -> LlamaModel {
        self.student
    }

    /// The student's LoRA-QAT layers (0 for LoRA, DoRA, QLoRA students).
    pub fn quantized_layers(&self) -> usize {
        self.quant_layers
    }

    /// Makes this trainer one rank of a data-parallel run (see [`crate::distributed`] and
    /// docs/SCALING.md): each step this rank takes its contiguous block of the micro-batches of
    /// the global batch (`batch_size × gradient_accumulation` examples) and the gradients are
    /// summed over the ranks before clipping, so every rank takes the step one process would;
    /// evaluation batches are shared out the same way; only rank 0 calls the metrics
    /// callbacks and writes checkpoints. Errors when `gradient_accumulation` is not a multiple
    /// of the rank count.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) -> Result<()> {
        distributed::check_split(self.config.gradient_accumulation, collective.size())?;
        self.collective = collective;
        Ok(())
    }

    /// `(rank, number of ranks)` of this trainer's run; `(0, 1)` in one process.
    pub fn rank_and_size(&self) -> (usize, usize) {
        (self.collective.rank(), self.collective.size())
    }

    /// Whether this trainer is rank 0 (the one that writes files and reports metrics).
    pub fn is_root(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Whether the student computes with fake quantization at the current step (LoRA-QAT
    /// students after `quant_warmup_steps`).
    pub fn fake_quant_active(&self) -> bool {
        self.quant_layers > 0 && self.step >= self.config.quant_warmup_steps
    }

    /// The calibration this run did, once done.
    pub fn calibration(&self) -> Option<&CalibrationReport> {
        self.calibration.as_ref()
    }

    /// The learning-rate factor of the schedule at the current step.
    fn lr_factor(&self) -> Result<f32> {
        self.config.schedule.factor(self.step)
    }

    /// Runs steps until the run is over, calling every callback after each step and
    /// evaluation; saves a checkpoint to `checkpoint` every `checkpoint_every` steps and at
    /// the end, when a path is given. Callbacks' `on_end` is called once at the end.
    pub fn train(
        &mut self,
        callbacks: &mut [&mut dyn MetricsCallback],
        checkpoint: Option<&Path>,
    ) -> Result<TrainSummary> {
        self.check_ranks_agree()?;
        let root = self.is_root();
        // Rank 0 alone reports and writes; the others compute the same steps silently.
        let callbacks = if root { callbacks } else { &mut [] };
        while !self.is_finished() {
            let metrics = self.step()?;
            for cb in callbacks.iter_mut() {
                cb.on_step(&metrics)?;
            }
            let eval_due = self
                .config
                .eval_every
                .is_some_and(|every| self.step % every == 0 || self.step == self.total_steps);
            if eval_due && self.validation.is_some() {
                if let Some(eval) = self.evaluate_and_track()? {
                    for cb in callbacks.iter_mut() {
                        cb.on_eval(&eval)?;
                    }
                }
            }
            if let (Some(path), Some(every), true) =
                (checkpoint, self.config.checkpoint_every, root)
            {
                if self.step % every == 0 && !self.is_finished() {
                    self.save_checkpoint(path)?;
                }
            }
        }
        if let (Some(path), true) = (checkpoint, root) {
            self.save_checkpoint(path)?;
        }
        for cb in callbacks.iter_mut() {
            cb.on_end()?;
        }
        Ok(TrainSummary {
            steps: self.step,
            stopped_early: self.stopped_early,
            best_eval_loss: self.best_eval,
            last_eval: self.last_eval.clone(),
        })
    }

    /// One optimizer step over `gradient_accumulation` micro-batches (see the module docs);
    /// returns its metrics. Errors — before any parameter changes — on a non-finite loss or
    /// gradient.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let micro = self.config.gradient_accumulation;
        let scale = 1.0 / micro as f32;
        let epoch = self.loader.cursor().epoch;
        let mut tokens = 0usize;
        let mut sums = LossSums::default();
        self.enter_phase()?;
        self.student.zero_grad();
        self.student.set_training(true);
        for index in 0..micro {
            // Every rank reads every micro-batch and draws its dropout seed, so the data
            // position and the RNG stay global; each computes only its own micro-batches.
            let batch = self.loader.next_batch()?;
            let dropout_seed = self.rng.next_u64();
            if !distributed::owns(self.collective.as_ref(), index, micro) {
                continue;
            }
            tokens += batch.num_tokens();
            self.student.reseed_adapter_dropout(dropout_seed)?;
            let student_layers = self.student_layers();
            let teacher_out = self.teacher_outputs(&batch)?;
            // A packed batch runs the segmented forward: positions restart and attention stays
            // inside each packed document.
            let pass = match &batch.segment_ids {
                Some(segments) => {
                    self.student
                        .forward_segmented(batch.input_ids.view(), segments.view(), None)?
                }
                None => self
                    .student
                    .forward(batch.input_ids.view(), Some(batch.attention_mask.view()))?,
            };
            let (b, seq, vocab) = pass.logits().dim();
            let logits = pass
                .logits()
                .view()
                .into_shape_with_order((b * seq, vocab))
                .map_err(|e| TrainError::shape("student logits", "contiguous", e))?;
            let student_hidden: Vec<ArrayView2<'_, f32>> = student_layers
                .iter()
                .map(|&l| pass.hidden_state(l))
                .collect::<lm::Result<_>>()?;
            let loss = self.batch_loss(&batch, logits, &student_hidden, teacher_out.as_ref())?;
            drop(student_hidden);
            sums.add(&loss);
            let grad_logits = (loss.composite.grad_logits * scale)
                .into_shape_with_order((b, seq, vocab))
                .map_err(|e| TrainError::shape("grad_logits", "contiguous", e))?;
            let grad_hidden: Vec<(usize, Array2<f32>)> = loss
                .grad_hidden
                .into_iter()
                .map(|(l, g)| (l, g * scale))
                .collect();
            let views: Vec<(usize, ArrayView2<'_, f32>)> =
                grad_hidden.iter().map(|(l, g)| (*l, g.view())).collect();
            self.student
                .backward_with_hidden(pass, grad_logits.view(), &views)?;
        }
        if self.collective.size() > 1 {
            // Each micro-batch's gradient is already scaled by 1/gradient_accumulation (the
            // global count), so the sum over ranks is the one-process mean.
            distributed::all_reduce_gradients(
                self.collective.as_mut(),
                &mut TrainableParams(&mut self.student),
            )?;
            sums.all_reduce(&mut tokens, self.collective.as_mut(), "step losses")?;
        }
        let norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut TrainableParams(&mut self.student), max)?,
            None => grad_norm(&mut TrainableParams(&mut self.student))? as f32,
        };
        let factor = self.lr_factor()?;
        self.optimizer
            .step(&mut TrainableParams(&mut self.student), factor)?;
        self.student.zero_grad();
        self.step += 1;
        let lr = self
            .optimizer
            .groups()
            .groups()
            .last()
            .map_or(0.0, |g| g.lr * factor);
        let metrics = StepMetrics {
            step: self.step,
            epoch,
            total_loss: sums.total / micro as f64,
            task_loss: sums.task.map(|v| v / micro as f64),
            kd_loss: sums.kd.map(|v| v / micro as f64),
            reasoning_loss: sums.reasoning.map(|v| v / micro as f64),
            hidden_loss: sums.hidden.map(|v| v / micro as f64),
            grad_norm: Some(norm),
            lr,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        };
        metrics.validate()?;
        Ok(metrics)
    }

    /// Errors (on every rank) unless every rank holds rank 0's step, total steps, data
    /// position, RNG position and trainable values (hashed per tensor).
    fn check_ranks_agree(&mut self) -> Result<()> {
        if self.collective.size() == 1 {
            return Ok(());
        }
        let cursor = self.loader.cursor();
        let rng = self.rng.state();
        let mut state: Vec<(String, u64)> = vec![
            ("step".into(), self.step),
            ("total steps".into(), self.total_steps),
            ("data cursor epoch".into(), cursor.epoch),
            ("data cursor index".into(), cursor.index as u64),
            ("RNG seed".into(), rng.seed),
            ("RNG word position".into(), rng.word_pos as u64),
        ];
        TrainableParams(&mut self.student).visit_params(&mut |name, value, _| {
            state.push((format!("hash of `{name}`"), distributed::hash_f32s(value)));
            Ok(())
        })?;
        distributed::check_same_state(self.collective.as_mut(), &state, "run state")
    }

    /// The student layers the losses read, in the order [`Trainer::batch_loss`] expects:
    /// hidden-state pairs, then the reasoning layer.
    fn student_layers(&self) -> Vec<usize> {
        layer_pairs(
            &self.config,
            &self.student,
            self.teacher.as_ref(),
            &self.weights,
        )
        .iter()
        .map(|(_, p)| p.student)
        .collect()
    }
}

/// The layer pairs the losses read: hidden-state pairs (when weighted), then the reasoning
/// pair (when weighted; default the last layer of each model). Named for errors.
fn layer_pairs(
    config: &TrainConfig,
    student: &LlamaModel,
    teacher: Option<&LlamaModel>,
    weights: &CompositeWeights,
) -> Vec<(&'static str, LayerPair)> {
    let mut pairs = Vec::new();
    if let Some(h) = config.loss.hidden.as_ref().filter(|h| h.weight > 0.0) {
        pairs.extend(h.layers.iter().map(|&p| ("hidden.layers", p)));
    }
    if weights.reasoning > 0.0 {
        let last = |m: &LlamaModel| m.config().num_hidden_layers.saturating_sub(1);
        let pair = config.loss.reasoning_layers.unwrap_or(LayerPair {
            student: last(student),
            teacher: teacher.map_or(0, last),
        });
        pairs.push(("reasoning_layers", pair));
    }
    pairs
}

fn batch_config(config: &TrainConfig, shuffle: bool) -> BatchConfig {
    BatchConfig {
        batch_size: config.batch_size,
        pad_id: config.pad_id,
        max_len: config.max_len,
        shuffle,
        drop_last: false,
        seed: config.seed,
    }
}

fn build_optimizer(config: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    let groups = config.optimizer.param_groups()?;
    Ok(match config.optimizer.kind {
        OptimizerKind::Adamw => Box::new(AdamW::new(config.optimizer.adamw, groups)?),
        OptimizerKind::Sgd => Box::new(Sgd::new(config.optimizer.sgd, groups)?),
    })
}

/// A LoRA-QAT student whose warm-up lasts the whole run would never train (or be graded)
/// through its quantizer: `quant_warmup_steps` must end before the last step.
fn check_warmup(config: &TrainConfig, quant_layers: usize, total_steps: u64) -> Result<()> {
    if quant_layers > 0 && config.quant_warmup_steps >= total_steps {
        return Err(TrainError::invalid(
            "TrainConfig.quant_warmup_steps",
            config.quant_warmup_steps,
            format!(
                "the run has {total_steps} optimizer steps, so fake quantization would never \
                 turn on for the {quant_layers} LoRA-QAT layers; use fewer warm-up steps than \
                 steps"
            ),
        ));
    }
    Ok(())
}
