//! What a run writes: resumable checkpoints, the PEFT adapter directory and the quantized
//! weights of a LoRA-QAT student.

use std::path::Path;

use super::{build_optimizer, TrainableParams, Trainer};
use crate::checkpoint::{Checkpoint, CheckpointFiles, TrainRng, OPTIMIZER_PREFIX};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::params::ParamVisitor;

impl Trainer {
    /// Saves everything a resume needs (see [`crate::checkpoint`]): the trainable tensors
    /// (adapters, quantizer steps) and optimizer moments as tensors; step, config, RNG state,
    /// data cursor and early-stopping state as JSON.
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<CheckpointFiles> {
        let mut ckpt = Checkpoint::new(self.step, self.rng.state());
        ckpt.add_params(&mut TrainableParams(&mut self.student))?;
        ckpt.set_optimizer(&self.optimizer.state())?;
        ckpt.config = serde_json::to_value(&self.config)
            .map_err(|e| TrainError::invalid("TrainConfig", "serialization", e.to_string()))?;
        ckpt.data_cursor = self.loader.cursor();
        ckpt.extra = serde_json::json!({
            "total_steps": self.total_steps,
            "best_eval": self.best_eval,
            "evals_since_best": self.evals_since_best,
            "stopped_early": self.stopped_early,
        });
        ckpt.save(path)
    }

    /// Restores a checkpoint saved by [`Trainer::save_checkpoint`] into this trainer (built
    /// with the same student adapters and data). Errors when a trainable tensor is missing or
    /// extra, or when the run's seed, batch size or accumulation differ from the saved ones
    /// (the saved data position would mean another order).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ckpt = Checkpoint::load(path)?;
        let saved: TrainConfig =
            serde_json::from_value(ckpt.config.clone()).map_err(|e| TrainError::Checkpoint {
                file: path.to_path_buf(),
                key: "config".into(),
                reason: e.to_string(),
            })?;
        for (field, a, b) in [
            ("seed", saved.seed, self.config.seed),
            (
                "batch_size",
                saved.batch_size as u64,
                self.config.batch_size as u64,
            ),
            (
                "gradient_accumulation",
                saved.gradient_accumulation as u64,
                self.config.gradient_accumulation as u64,
            ),
            ("shuffle", saved.shuffle as u64, self.config.shuffle as u64),
        ] {
            if a != b {
                return Err(TrainError::Checkpoint {
                    file: path.to_path_buf(),
                    key: format!("config.{field}"),
                    reason: format!("saved {a}, this run {b}: resume with the saved value"),
                });
            }
        }
        let mut names = Vec::new();
        TrainableParams(&mut self.student).visit_params(&mut |name, _, _| {
            names.push(name.to_string());
            Ok(())
        })?;
        if let Some(extra) = ckpt
            .tensors
            .iter()
            .find(|t| !t.name.starts_with(OPTIMIZER_PREFIX) && !names.contains(&t.name))
        {
            return Err(TrainError::Checkpoint {
                file: path.to_path_buf(),
                key: extra.name.clone(),
                reason: "the student has no trainable tensor of that name".into(),
            });
        }
        let state = ckpt
            .optimizer_state()?
            .ok_or_else(|| TrainError::Checkpoint {
                file: path.to_path_buf(),
                key: "optimizer".into(),
                reason: "no optimizer state saved".into(),
            })?;
        let mut optimizer = build_optimizer(&self.config)?;
        optimizer.load_state(state)?;
        ckpt.restore_params(&mut TrainableParams(&mut self.student))?;
        self.loader.set_cursor(ckpt.data_cursor)?;
        self.optimizer = optimizer;
        self.rng = TrainRng::from_state(&ckpt.rng);
        self.step = ckpt.step;
        let extra = &ckpt.extra;
        self.best_eval = extra.get("best_eval").and_then(|v| v.as_f64());
        self.evals_since_best = extra
            .get("evals_since_best")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        self.stopped_early = extra
            .get("stopped_early")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(())
    }

    /// Writes the student's adapter `name` as a PEFT adapter directory
    /// (`adapter_config.json` + `adapter_model.safetensors`); for a LoRA-QAT student also the
    /// quantizer steps beside them (`lm::qat::QAT_STATE_FILE`, read by
    /// `LlamaModel::load_qat_adapter`).
    pub fn save_adapter(&self, dir: &Path, name: &str) -> Result<()> {
        self.save_adapter_as(dir, name, lora_core::peft::SaveDtype::F32)
    }

    /// [`Trainer::save_adapter`] with the adapter tensors stored as `dtype`. A LoRA-QAT
    /// adapter is written in f32 only: its quantizer steps were trained against the f32
    /// `W + s·B·A`, and rounding `A`, `B` would move the grid the steps fit.
    pub fn save_adapter_as(
        &self,
        dir: &Path,
        name: &str,
        dtype: lora_core::peft::SaveDtype,
    ) -> Result<()> {
        if self.quant_layers > 0 {
            if dtype != lora_core::peft::SaveDtype::F32 {
                return Err(lora_core::LoraError::option(
                    "save_dtype",
                    dtype.name(),
                    "a LoRA-QAT adapter is saved in f32 (its quantizer steps fit the f32 \
                     W + s·B·A)",
                )
                .into());
            }
            Ok(self.student.save_qat_adapter(dir, name)?)
        } else {
            Ok(self.student.save_adapter_as(dir, name, dtype)?)
        }
    }

    /// Writes the LoRA-QAT student's quantized weights `Q(W + s·B·A)` (packed codes and
    /// steps, `LlamaModel::export_quantized`) to one safetensors file; returns the number of
    /// layers. Errors for a student without LoRA-QAT layers.
    pub fn export_quantized(&mut self, path: &Path) -> Result<usize> {
        self.student.set_fake_quant(true);
        let count = self.student.export_quantized(path);
        self.student.set_fake_quant(self.fake_quant_active());
        Ok(count?)
    }
}
