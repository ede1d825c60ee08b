//! The demo run: the teacher's accuracy, then for each bit width round-to-nearest PTQ and
//! LoRA-QAT distilled from the fp32 teacher, each graded by exact match on the test split;
//! resumable after Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::ProgressBar;
use lm::LlamaModel;
use lora_core::{LoraConfig, QatMode};
use qat_train::config::TrainConfig;
use qat_train::data::Dataset;
use qat_train::metrics::{CsvMetricsWriter, MetricsCallback, StepMetrics};
use qat_train::trainer::Trainer;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;
use serde::{Deserialize, Serialize};

use super::error::{DemoError, Result};
use super::eval::exact_match;
use super::pretrain::{remove_checkpoint, PretrainSettings};
use super::report::{curves, plot_loss_curves, write_text, BitsRow, DemoReport};
use super::task::{draw_splits, Problem, Tokenizer};

/// The adapter name of every LoRA-QAT student.
pub const ADAPTER_NAME: &str = "qat";

/// Everything that decides a demo run's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    /// Bit widths, in the order they run.
    pub bits: Vec<u32>,
    /// Test problems graded (a prefix of the teacher's test split).
    pub test_problems: usize,
    /// Training problems LoRA-QAT sees (a prefix of the teacher's training split).
    pub train_problems: usize,
    /// Validation problems the trainer's loss is measured on.
    pub validation_problems: usize,
    /// The quantizer of PTQ and LoRA-QAT at each bit width (`bits` is replaced; PTQ runs with
    /// both initialisations, LoRA-QAT starts from `init`).
    pub quantizer: QatConfig,
    /// LoRA rank and alpha, on all seven projections of every layer.
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// The LoRA-QAT training run (steps, batch, learning rates, schedule, loss weights).
    pub train: TrainConfig,
    /// Seed of the adapters' initialisation.
    pub seed: u64,
}

impl DemoSettings {
    /// The full demo (about ten minutes on two cores).
    pub fn full() -> Self {
        let train = TrainConfig::from_json_str(
            r#"{
                "seed": 1,
                "max_steps": 300,
                "batch_size": 16,
                "max_len": 48,
                "optimizer": {"lr": 2e-3, "quantizer_lr": 2e-5, "weight_decay": 0.0},
                "schedule": {"kind": "warmup_cosine", "warmup_steps": 20, "total_steps": 300, "min_ratio": 0.05},
                "max_grad_norm": 1.0,
                "loss": {
                    "weights": {"task": 0.5, "kd": 1.0, "reasoning": 0.5, "temperature": 2.0},
                    "reasoning": {"step_weight": 1.0, "trajectory_weight": 1.0, "answer_weight": 2.0}
                },
                "calibration": {"batches": 2}
            }"#,
        )
        .expect("the built-in training config parses");
        Self {
            bits: vec![4, 3, 2],
            test_problems: 500,
            train_problems: 8000,
            validation_problems: 64,
            quantizer: QatConfig {
                quantizer: QuantizerKind::Uniform,
                bits: 4,
                granularity: Granularity::PerChannel,
                ste: Ste::Lsq,
                pi_k: None,
                symmetric: true,
                incoherence: None,
                init: InitMethod::MseClipSearch,
                double_quant: false,
            },
            lora_rank: 8,
            lora_alpha: 16.0,
            train,
            seed: 3,
        }
    }

    /// The CI smoke run (under two minutes): fewer problems and steps.
    pub fn quick() -> Self {
        let mut s = Self::full();
        s.test_problems = 100;
        s.train_problems = 1000;
        s.validation_problems = 16;
        s.train.max_steps = Some(40);
        s.train.schedule = qat_train::schedule::LrSchedule::WarmupCosine {
            warmup_steps: 5,
            total_steps: 40,
            min_ratio: 0.1,
        };
        s
    }

    /// Sets the LoRA-QAT steps per bit width, stretching the schedule's decay to match.
    pub fn set_steps(&mut self, steps: u64) -> Result<()> {
        if steps == 0 {
            return Err(DemoError::invalid("steps", 0, "must be positive"));
        }
        self.train.max_steps = Some(steps);
        use qat_train::schedule::LrSchedule;
        self.train.schedule = match self.train.schedule {
            LrSchedule::WarmupCosine {
                warmup_steps,
                min_ratio,
                ..
            } => LrSchedule::WarmupCosine {
                warmup_steps: warmup_steps.min(steps),
                total_steps: steps,
                min_ratio,
            },
            LrSchedule::WarmupLinear {
                warmup_steps,
                min_ratio,
                ..
            } => LrSchedule::WarmupLinear {
                warmup_steps: warmup_steps.min(steps),
                total_steps: steps,
                min_ratio,
            },
            LrSchedule::Constant => LrSchedule::Constant,
        };
        Ok(())
    }

    /// The quantizer at `bits`.
    pub fn quantizer_at(&self, bits: u32) -> Result<QatConfig> {
        let config = QatConfig {
            bits,
            ..self.quantizer
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.bits.is_empty() {
            return Err(DemoError::invalid("bits", "[]", "name at least one width"));
        }
        for &b in &self.bits {
            self.quantizer_at(b)?;
        }
        let teacher = PretrainSettings::default().splits;
        for (name, n, max) in [
            ("test_problems", self.test_problems, teacher.test),
            ("train_problems", self.train_problems, teacher.train),
            (
                "validation_problems",
                self.validation_problems,
                teacher.validation,
            ),
        ] {
            if n == 0 || n > max {
                return Err(DemoError::invalid(
                    name,
                    n,
                    format!("must be in 1..={max} (the teacher's split)"),
                ));
            }
        }
        self.train.validate()?;
        Ok(())
    }
}

/// What survives an interruption: finished rows and the metrics of every run so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    settings: DemoSettings,
    run_dir: PathBuf,
    teacher_accuracy: f64,
    rows: Vec<BitsRow>,
    /// `(bits, metrics)` of finished runs and of the one in progress.
    metrics: Vec<(u32, Vec<StepMetrics>)>,
    /// Seconds spent in earlier sessions.
    seconds: f64,
}

fn state_path(work_dir: &Path) -> PathBuf {
    work_dir.join("demo-state.json")
}

fn qat_checkpoint_path(work_dir: &Path, bits: u32) -> PathBuf {
    work_dir.join(format!("qat-{bits}bit.json"))
}

fn save_state(work_dir: &Path, state: &RunState) -> Result<()> {
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| DemoError::invalid("demo state", "JSON", e.to_string()))?;
    write_text(&state_path(work_dir), &text)
}

/// Progress bars the run drives; the caller styles them (or hides them).
pub trait Progress {
    /// A bar of `len` steps labelled `label`.
    fn bar(&self, len: u64, label: &str) -> ProgressBar;
    /// A line of text between bars.
    fn note(&self, text: &str);
}

/// Where the run reads and writes.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The teacher (`config.json`, `model.safetensors`).
    pub teacher: PathBuf,
    /// The parent of `runs/<timestamp>/`.
    pub runs_dir: PathBuf,
    /// Checkpoints and state of an unfinished run.
    pub work_dir: PathBuf,
}

/// Now as `YYYYMMDD-HHMMSS` (UTC), for run directory names.
fn timestamp() -> String {
    utc_stamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// Seconds since the Unix epoch as `YYYYMMDD-HHMMSS` (UTC).
fn utc_stamp(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The LoRA config of the students: rank/alpha on the seven projections of every layer.
pub fn lora_config(settings: &DemoSettings) -> LoraConfig {
    LoraConfig::new(
        settings.lora_rank,
        settings.lora_alpha,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
}

/// Runs the demo and writes its files into `runs_dir/<timestamp>/` (or, resumed, into the
/// interrupted run's directory). Stops with [`DemoError::Interrupted`] after saving a
/// checkpoint when `stop` becomes true.
pub fn run_demo(
    settings: &DemoSettings,
    paths: &RunPaths,
    resume: bool,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<DemoReport> {
    settings.validate()?;
    let started = Instant::now();
    std::fs::create_dir_all(&paths.work_dir).map_err(|e| DemoError::io(&paths.work_dir, e))?;
    let tokenizer = Tokenizer::new();
    let teacher = LlamaModel::from_pretrained(&paths.teacher).map_err(|e| {
        DemoError::invalid(
            "teacher",
            paths.teacher.display(),
            format!("{e} (train one with `lora-qat demo --pretrain`)"),
        )
    })?;
    let splits = draw_splits(PretrainSettings::default().splits)?;
    let test = &splits.test[..settings.test_problems];
    let to_dataset = |problems: &[Problem]| -> Result<Dataset> {
        Ok(Dataset::new(
            problems.iter().map(|p| p.example(&tokenizer)).collect(),
        )?)
    };
    let train_data = to_dataset(&splits.train[..settings.train_problems])?;
    let validation = to_dataset(&splits.validation[..settings.validation_problems])?;

    let mut state = if resume {
        let path = state_path(&paths.work_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| DemoError::io(&path, e))?;
        let state: RunState = serde_json::from_str(&text)
            .map_err(|e| DemoError::invalid("demo state", path.display(), e.to_string()))?;
        if &state.settings != settings {
            return Err(DemoError::invalid(
                "--resume",
                path.display(),
                "the interrupted run had other settings (--quick or not must match)",
            ));
        }
        progress.note(&format!(
            "resuming the run in {} ({} of {} bit widths done)",
            state.run_dir.display(),
            state.rows.len(),
            settings.bits.len()
        ));
        state
    } else {
        let run_dir = paths.runs_dir.join(timestamp());
        let bar = progress.bar(test.len() as u64, "fp32 teacher");
        let em = exact_match(&teacher, test, &tokenizer, Some(&bar))?;
        bar.finish();
        RunState {
            settings: settings.clone(),
            run_dir,
            teacher_accuracy: em.accuracy(),
            rows: Vec::new(),
            metrics: Vec::new(),
            seconds: 0.0,
        }
    };
    std::fs::create_dir_all(&state.run_dir).map_err(|e| DemoError::io(&state.run_dir, e))?;
    let test_lines: Vec<String> = test.iter().map(|p| p.jsonl_line(&tokenizer)).collect();
    write_text(
        &state.run_dir.join("test.jsonl"),
        &(test_lines.join("\n") + "\n"),
    )?;
    let seconds_before = state.seconds;
    let elapsed = || seconds_before + started.elapsed().as_secs_f64();
    progress.note(&format!(
        "fp32 teacher: {:.1}% exact-match on {} test problems",
        100.0 * state.teacher_accuracy,
        test.len()
    ));

    for &bits in &settings.bits {
        if state.rows.iter().any(|r| u32::from(r.bits) == bits) {
            continue;
        }
        let quantizer = settings.quantizer_at(bits)?;

        // Post-training quantization, no data: round to nearest with the grid fitted to each
        // group's absmax (plain RTN), then with the MSE-optimal clip (RTN + clip search).
        let ptq_started = Instant::now();
        let mut ptq_accuracy = [0.0; 2];
        for (slot, (init, label)) in [
            (InitMethod::Absmax, "RTN"),
            (InitMethod::MseClipSearch, "RTN+clip"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut ptq = teacher.clone();
            ptq.quantize_linears_rtn(&QatConfig { init, ..quantizer })?;
            let bar = progress.bar(test.len() as u64, &format!("{label} {bits}-bit"));
            ptq_accuracy[slot] = exact_match(&ptq, test, &tokenizer, Some(&bar))?.accuracy();
            bar.finish();
        }
        let ptq_seconds = ptq_started.elapsed().as_secs_f64();

        // LoRA-QAT from the teacher's weights, distilled from the fp32 teacher.
        let mut student = teacher.clone();
        student.inject_qat_adapters(
            &lora_config(settings),
            &quantizer,
            QatMode::QuantizeMerged,
            ADAPTER_NAME,
            settings.seed,
        )?;
        let mut trainer = Trainer::new(
            settings.train.clone(),
            student,
            Some(teacher.clone()),
            train_data.clone(),
            Some(validation.clone()),
        )?;
        let ckpt = qat_checkpoint_path(&paths.work_dir, bits);
        let mut metrics: Vec<StepMetrics> = Vec::new();
        if let Some(pos) = state.metrics.iter().position(|(b, _)| *b == bits) {
            // An interrupted run of this width: continue from its checkpoint.
            metrics = state.metrics.remove(pos).1;
            trainer.load_checkpoint(&ckpt)?;
        }
        let qat_started = Instant::now();
        let seconds_in_earlier = metrics.iter().map(|m| m.seconds).sum::<f64>();
        let bar = progress.bar(trainer.total_steps(), &format!("LoRA-QAT {bits}-bit"));
        bar.set_position(trainer.step_count());
        while !trainer.is_finished() {
            if stop.load(Ordering::SeqCst) {
                bar.abandon();
                trainer.save_checkpoint(&ckpt)?;
                state.metrics.push((bits, metrics));
                state.seconds = elapsed();
                save_state(&paths.work_dir, &state)?;
                return Err(DemoError::Interrupted { checkpoint: ckpt });
            }
            let m = trainer.step()?;
            bar.set_position(m.step);
            bar.set_message(format!(
                "loss {:.4} (kd {:.4}, reasoning {:.4})",
                m.total_loss,
                m.kd_loss.unwrap_or(f64::NAN),
                m.reasoning_loss.unwrap_or(f64::NAN)
            ));
            metrics.push(m);
        }
        bar.finish();
        let qat_seconds = seconds_in_earlier + qat_started.elapsed().as_secs_f64();
        let steps = trainer.step_count();
        let mut student = trainer.into_student();
        let adapter_dir = state.run_dir.join("adapters").join(format!("{bits}bit"));
        student.save_qat_adapter(&adapter_dir, ADAPTER_NAME)?;
        // Graded as deployed: every projection holds its quantized weight Q(W + s·B·A).
        student.merge_and_unload()?;
        let bar = progress.bar(test.len() as u64, &format!("QAT {bits}-bit eval"));
        let qat_em = exact_match(&student, test, &tokenizer, Some(&bar))?;
        bar.finish();
        let row = BitsRow {
            bits: bits as u8,
            ptq_accuracy: ptq_accuracy[0],
            ptq_clip_accuracy: ptq_accuracy[1],
            qat_accuracy: qat_em.accuracy(),
            qat_steps: steps,
            qat_seconds,
            ptq_seconds,
        };
        progress.note(&format!(
            "{bits}-bit: RTN {:.1}%, RTN+clip {:.1}%, LoRA-QAT {:.1}% (teacher {:.1}%)",
            100.0 * row.ptq_accuracy,
            100.0 * row.ptq_clip_accuracy,
            100.0 * row.qat_accuracy,
            100.0 * state.teacher_accuracy
        ));
        state.rows.push(row);
        state.metrics.push((bits, metrics));
        state.seconds = elapsed();
        save_state(&paths.work_dir, &state)?;
        remove_checkpoint(&ckpt)?;
    }

    let report = DemoReport {
        teacher_accuracy: state.teacher_accuracy,
        test_problems: test.len(),
        rows: state.rows.clone(),
        seconds: elapsed(),
        settings: serde_json::to_value(settings)
            .map_err(|e| DemoError::invalid("settings", "JSON", e.to_string()))?,
        run_dir: state.run_dir.clone(),
    };
    write_outputs(&state, &report)?;
    let _ = std::fs::remove_file(state_path(&paths.work_dir));
    Ok(report)
}

/// `report.md`, `summary.json`, one metrics CSV per bit width and `loss_curves.png`.
fn write_outputs(state: &RunState, report: &DemoReport) -> Result<()> {
    let dir = &state.run_dir;
    write_text(&dir.join("report.md"), &report.markdown())?;
    let json = serde_json::to_string_pretty(&report.json_summary())
        .map_err(|e| DemoError::invalid("summary", "JSON", e.to_string()))?;
    write_text(&dir.join("summary.json"), &json)?;
    for (bits, steps) in &state.metrics {
        let mut csv = CsvMetricsWriter::create(&dir.join(format!("metrics-{bits}bit.csv")))?;
        for m in steps {
            csv.on_step(m)?;
        }
        csv.on_end()?;
    }
    let runs: Vec<(String, Vec<StepMetrics>)> = state
        .metrics
        .iter()
        .map(|(b, m)| (format!("{b}-bit"), m.clone()))
        .collect();
    plot_loss_curves(
        &dir.join("loss_curves.png"),
        &[
            ("total loss".into(), curves(&runs, |m| Some(m.total_loss))),
            ("distillation (KL)".into(), curves(&runs, |m| m.kd_loss)),
            ("reasoning".into(), curves(&runs, |m| m.reasoning_loss)),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_directories_are_named_by_utc_time() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000"); // a leap day
    }

    #[test]
    fn settings_are_checked_and_steps_stretch_the_schedule() {
        let mut s = DemoSettings::quick();
        s.validate().unwrap();
        s.set_steps(80).unwrap();
        assert_eq!(s.train.max_steps, Some(80));
        match s.train.schedule {
            qat_train::schedule::LrSchedule::WarmupCosine { total_steps, .. } => {
                assert_eq!(total_steps, 80)
            }
            other => panic!("unexpected schedule {other:?}"),
        }
        assert!(s.set_steps(0).is_err());
        s.test_problems = 0;
        assert!(s.validate().is_err());
        let mut s = DemoSettings::full();
        s.bits = vec![1];
        assert!(
            s.validate().is_err(),
            "1-bit uniform is refused by quant-core"
        );
        let json = serde_json::to_string(&DemoSettings::full()).unwrap();
        let back: DemoSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            DemoSettings::full(),
            "--settings reads what report.md prints"
        );
    }
}
