//! Calibration of a LoRA-QAT student's quantizer steps when fake quantization turns on.

use quant_core::quantizer::InitMethod;

use super::{batch_config, CalibrationReport, Trainer};
use crate::data::{Batch, DataLoader};
use crate::error::{Result, TrainError};

impl Trainer {
    /// Fits the quantizer steps of a LoRA-QAT student to the weights they quantize now
    /// (`W + s·B·A`): with `calibration.batches > 0`, each candidate initialisation (MSE clip
    /// search, absmax) is scored by the mean training loss over the first batches of the data
    /// (in file order, fake quantization on, no update) and the lowest kept; with `0`, MSE clip
    /// search from the weights alone; a ggml grid (`q4_0` … `q6_k`) with ggml's own quantizer,
    /// its only initialisation. [`Trainer::step`] runs it when fake quantization turns
    /// on (at `quant_warmup_steps`, or step 0 with data); callable directly too. Errors when
    /// the student has no LoRA-QAT layer.
    pub fn calibrate(&mut self) -> Result<&CalibrationReport> {
        if self.quant_layers == 0 {
            return Err(TrainError::invalid(
                "calibration",
                "student",
                "the student has no LoRA-QAT layer (inject_qat_adapters) to calibrate",
            ));
        }
        self.student.set_fake_quant(true);
        let mut candidates = Vec::new();
        // A ggml grid has one initialisation, ggml's own quantizer (`absmax` in its config).
        let ggml_grid = self
            .student
            .qat_config()
            .is_some_and(|c| c.quantizer.ggml_type().is_some());
        let chosen = if ggml_grid {
            InitMethod::Absmax
        } else if self.config.calibration.batches == 0 {
            InitMethod::MseClipSearch
        } else {
            let mut loader = DataLoader::new(
                self.loader.dataset().clone(),
                batch_config(&self.config, false),
            )?;
            let n = self
                .config
                .calibration
                .batches
                .min(loader.batches_per_epoch());
            let batches: Vec<Batch> = (0..n).map(|_| loader.next_batch()).collect::<Result<_>>()?;
            for init in [InitMethod::MseClipSearch, InitMethod::Absmax] {
                self.student.recalibrate_quantizers(init)?;
                let mut total = 0.0;
                for batch in &batches {
                    total += self.eval_batch_loss(batch)?.composite.total;
                }
                candidates.push((init, total / n as f64));
            }
            // Ties keep the first (MSE clip search).
            candidates
                .iter()
                .fold(
                    None,
                    |best: Option<(InitMethod, f64)>, &(init, loss)| match best {
                        Some((_, b)) if b <= loss => best,
                        _ => Some((init, loss)),
                    },
                )
                .map_or(InitMethod::MseClipSearch, |(init, _)| init)
        };
        self.student.recalibrate_quantizers(chosen)?;
        self.student.zero_grad();
        Ok(self.calibration.insert(CalibrationReport {
            step: self.step,
            candidates,
            chosen,
        }))
    }

    /// Switches fake quantization for the current step's phase and calibrates when it turns
    /// on: at the end of a full-precision warm-up, or at step 0 when calibrating with data.
    pub(super) fn enter_phase(&mut self) -> Result<()> {
        if self.quant_layers == 0 {
            return Ok(());
        }
        let warmup = self.config.quant_warmup_steps;
        let quantized = self.step >= warmup;
        self.student.set_fake_quant(quantized);
        let turning_on = self.step == warmup
            && (warmup > 0 || self.config.calibration.batches > 0)
            && self
                .calibration
                .as_ref()
                .is_none_or(|c| c.step != self.step);
        if turning_on {
            self.calibrate()?;
        }
        Ok(())
    }
}
