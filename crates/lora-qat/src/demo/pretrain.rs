//! Training the fp32 teacher on the task from scratch: full-parameter AdamW with warmup and
//! cosine decay, seeded end to end, with a checkpoint that Ctrl-C leaves behind and
//! `--resume` continues from.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::ProgressBar;
use lm::{LlamaConfig, LlamaModel};
use qat_train::checkpoint::{Checkpoint, TrainRng};
use qat_train::data::{BatchConfig, DataLoader, Dataset};
use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
use qat_train::params::clip_grad_norm;
use qat_train::schedule::LrSchedule;
use qat_train::trainer::TrainableParams;
use serde::{Deserialize, Serialize};

use super::error::{DemoError, Result};
use super::task::{draw_splits, SplitSizes, Tokenizer, BOS_ID, EOS_ID, MAX_TOKENS, PAD_ID};

/// The teacher's architecture: width 128, 4 layers of 4 heads, SwiGLU width 256, the task's
/// 18-token vocabulary, untied head (≈ 0.66 M parameters, 2.6 MB in f32).
pub fn teacher_config() -> Result<LlamaConfig> {
    let mut config = LlamaConfig::new(Tokenizer::new().vocab_size(), 128, 256, 4, 4, 4)?;
    config.max_position_embeddings = 64;
    config.bos_token_id = Some(BOS_ID);
    config.eos_token_ids = vec![EOS_ID];
    config.pad_token_id = Some(PAD_ID);
    config.validate()?;
    Ok(config)
}

/// Everything that decides the teacher's weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSettings {
    /// Problems per split (the test split is the one the demo grades on).
    pub splits: SplitSizes,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warmup steps before the cosine decay.
    pub warmup_steps: u64,
    /// Final learning rate as a share of the peak.
    pub min_lr_ratio: f32,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Global gradient-norm clip.
    pub clip_norm: f32,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
}

impl Default for PretrainSettings {
    /// The settings the committed teacher was trained with.
    fn default() -> Self {
        Self {
            splits: SplitSizes {
                train: 20_000,
                validation: 200,
                test: 500,
                seed: 2024,
            },
            steps: 1600,
            batch_size: 32,
            lr: 3e-3,
            warmup_steps: 100,
            min_lr_ratio: 0.05,
            weight_decay: 0.01,
            clip_norm: 1.0,
            seed: 7,
            checkpoint_every: 200,
        }
    }
}

/// What pretraining measured.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PretrainLog {
    /// `(step, loss)` after every optimizer step.
    pub losses: Vec<(u64, f64)>,
    /// Seconds of training, summed over resumed sessions.
    pub seconds: f64,
}

/// The checkpoint file pretraining writes in `work_dir`.
pub fn checkpoint_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pretrain-checkpoint.json")
}

/// Deletes a finished run's checkpoint: the JSON file and every tensor file of its name
/// (`{stem}.{id}.safetensors`, as qat-train names them). Missing files are not an error.
pub fn remove_checkpoint(json_path: &Path) -> Result<()> {
    let (Some(dir), Some(stem)) = (json_path.parent(), json_path.file_stem()) else {
        return Ok(());
    };
    let prefix = format!("{}.", stem.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".safetensors") {
                std::fs::remove_file(entry.path()).map_err(|e| DemoError::io(entry.path(), e))?;
            }
        }
    }
    match std::fs::remove_file(json_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DemoError::io(json_path, e)),
        _ => Ok(()),
    }
}

/// Trains the teacher from `LlamaModel::random(teacher_config(), seed)` on the training split.
///
/// With `resume`, continues from the checkpoint in `work_dir` (which must have been written
/// with the same settings). When `stop` becomes true the loop saves a checkpoint and returns
/// [`DemoError::Interrupted`]. `progress` is advanced per step and shows the loss.
pub fn pretrain(
    settings: &PretrainSettings,
    work_dir: &Path,
    resume: bool,
    stop: &AtomicBool,
    progress: &ProgressBar,
) -> Result<(LlamaModel, PretrainLog)> {
    if settings.steps == 0 || settings.batch_size == 0 {
        return Err(DemoError::invalid(
            "pretraining steps × batch size",
            format!("{} × {}", settings.steps, settings.batch_size),
            "both must be positive",
        ));
    }
    std::fs::create_dir_all(work_dir).map_err(|e| DemoError::io(work_dir, e))?;
    let tokenizer = Tokenizer::new();
    let splits = draw_splits(settings.splits)?;
    let train = Dataset::new(splits.train.iter().map(|p| p.example(&tokenizer)).collect())?;
    let mut loader = DataLoader::new(
        train,
        BatchConfig {
            batch_size: settings.batch_size,
            pad_id: PAD_ID,
            max_len: Some(MAX_TOKENS),
            shuffle: true,
            drop_last: true,
            seed: settings.seed,
        },
    )?;
    let mut model = LlamaModel::random(teacher_config()?, settings.seed)?;
    model.set_base_trainable(true);
    let mut optimizer = AdamW::new(
        AdamWConfig {
            betas: (0.9, 0.98),
            eps: 1e-8,
        },
        ParamGroups::single(settings.lr, settings.weight_decay)?,
    )?;
    let schedule = LrSchedule::WarmupCosine {
        warmup_steps: settings.warmup_steps.min(settings.steps),
        total_steps: settings.steps,
        min_ratio: settings.min_lr_ratio,
    };
    let settings_json = serde_json::to_value(settings)
        .map_err(|e| DemoError::invalid("pretraining settings", "JSON", e.to_string()))?;
    let ckpt_path = checkpoint_path(work_dir);
    let mut log = PretrainLog::default();
    let mut step = 0u64;
    if resume {
        let ckpt = Checkpoint::load(&ckpt_path)?;
        if ckpt.config != settings_json {
            return Err(DemoError::invalid(
                "--resume",
                ckpt_path.display(),
                format!(
                    "the checkpoint was written with other settings ({}), not {}",
                    ckpt.config, settings_json
                ),
            ));
        }
        ckpt.restore_params(&mut TrainableParams(&mut model))?;
        if let Some(state) = ckpt.optimizer_state()? {
            optimizer.load_state(state)?;
        }
        loader.set_cursor(ckpt.data_cursor)?;
        log = serde_json::from_value(ckpt.extra.clone()).map_err(|e| {
            DemoError::invalid("checkpoint extra", ckpt_path.display(), e.to_string())
        })?;
        step = ckpt.step;
    }
    let save = |model: &mut LlamaModel,
                optimizer: &AdamW,
                loader: &DataLoader,
                log: &PretrainLog,
                step: u64|
     -> Result<()> {
        let mut ckpt = Checkpoint::new(step, TrainRng::new(settings.seed).state());
        ckpt.config = settings_json.clone();
        ckpt.add_params(&mut TrainableParams(model))?;
        ckpt.set_optimizer(&optimizer.state())?;
        ckpt.data_cursor = loader.cursor();
        ckpt.extra = serde_json::to_value(log)
            .map_err(|e| DemoError::invalid("pretraining log", "JSON", e.to_string()))?;
        ckpt.save(&ckpt_path)?;
        Ok(())
    };

    progress.set_length(settings.steps);
    progress.set_position(step);
    let started = Instant::now();
    let seconds_before = log.seconds;
    let mut recent = Vec::new();
    while step < settings.steps {
        if stop.load(Ordering::SeqCst) {
            log.seconds = seconds_before + started.elapsed().as_secs_f64();
            save(&mut model, &optimizer, &loader, &log, step)?;
            return Err(DemoError::Interrupted {
                checkpoint: ckpt_path,
            });
        }
        let batch = loader.next_batch()?;
        model.zero_grad();
        let loss = model.loss_and_backward(
            batch.input_ids.view(),
            batch.labels.view(),
            Some(batch.attention_mask.view()),
        )?;
        clip_grad_norm(&mut TrainableParams(&mut model), settings.clip_norm)?;
        optimizer.step(&mut TrainableParams(&mut model), schedule.factor(step)?)?;
        step += 1;
        log.losses.push((step, f64::from(loss)));
        recent.push(loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        progress.set_position(step);
        progress.set_message(format!(
            "loss {:.4}",
            recent.iter().sum::<f32>() / recent.len() as f32
        ));
        if step % settings.checkpoint_every == 0 && step < settings.steps {
            log.seconds = seconds_before + started.elapsed().as_secs_f64();
            save(&mut model, &optimizer, &loader, &log, step)?;
        }
    }
    log.seconds = seconds_before + started.elapsed().as_secs_f64();
    model.set_base_trainable(false);
    remove_checkpoint(&ckpt_path)?;
    Ok((model, log))
}
