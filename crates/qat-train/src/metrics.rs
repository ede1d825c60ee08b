//! Per-step training metrics, a callback trait to observe them and a CSV writer.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::CompositeOutput;

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based after the first update).
    pub step: u64,
    /// Epoch the step's data came from.
    pub epoch: u64,
    /// The composite loss.
    pub total_loss: f64,
    /// Task cross-entropy, when computed.
    pub task_loss: Option<f64>,
    /// Distillation loss, when computed.
    pub kd_loss: Option<f64>,
    /// Reasoning loss, when computed.
    pub reasoning_loss: Option<f64>,
    /// Hidden-state distillation loss, when computed.
    #[serde(default)]
    pub hidden_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f32>,
    /// Learning rate at this step of the adapters' parameter group (the trainer's main group).
    pub lr: f32,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

impl StepMetrics {
    /// The losses of a [`CompositeOutput`] with the rest of a step's measurements.
    ///
    /// ```
    /// use qat_train::metrics::StepMetrics;
    /// use qat_train::loss::{composite_loss, CompositeInputs, CompositeWeights};
    /// let logits = ndarray::array![[0.0f32, 0.0]];
    /// let weights = CompositeWeights { kd: 0.0, reasoning: 0.0, ..CompositeWeights::default() };
    /// let out = composite_loss(&weights, &CompositeInputs {
    ///     student_logits: logits.view(), targets: &[1], teacher_logits: None,
    ///     kd_row_mask: None, reasoning: None }).unwrap();
    /// let m = StepMetrics::from_loss(1, 0, &out, Some(0.5), 1e-3, 1000, 0.5);
    /// assert_eq!(m.tokens_per_second(), Some(2000.0));
    /// assert_eq!(m.task_loss, Some(std::f64::consts::LN_2));
    /// ```
    #[allow(clippy::too_many_arguments)] // one argument per column, named at the call site
    pub fn from_loss(
        step: u64,
        epoch: u64,
        loss: &CompositeOutput,
        grad_norm: Option<f32>,
        lr: f32,
        tokens: usize,
        seconds: f64,
    ) -> Self {
        Self {
            step,
            epoch,
            total_loss: loss.total,
            task_loss: loss.task,
            kd_loss: loss.kd,
            reasoning_loss: loss.reasoning.as_ref().map(|r| r.value),
            hidden_loss: None,
            grad_norm,
            lr,
            tokens,
            seconds,
        }
    }

    /// `tokens / seconds`, when time was measured.
    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.tokens as f64 / self.seconds)
    }

    /// Errors naming the field and step when a loss, the norm, the lr or the time is NaN/∞.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("total_loss", Some(self.total_loss)),
            ("task_loss", self.task_loss),
            ("kd_loss", self.kd_loss),
            ("reasoning_loss", self.reasoning_loss),
            ("hidden_loss", self.hidden_loss),
            ("grad_norm", self.grad_norm.map(f64::from)),
            ("lr", Some(f64::from(self.lr))),
            ("seconds", Some(self.seconds)),
        ];
        for (name, value) in fields {
            if let Some(v) = value.filter(|v| !v.is_finite()) {
                return Err(TrainError::non_finite(
                    format!("metrics {name}"),
                    format!("step {}", self.step),
                    v,
                ));
            }
        }
        Ok(())
    }
}

/// Observes each step's metrics (logging, early stopping, progress bars).
pub trait MetricsCallback {
    /// Called after every optimizer step; an error stops training.
    fn on_step(&mut self, metrics: &StepMetrics) -> Result<()>;
    /// Called once when training ends (flush files here).
    fn on_end(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called after each evaluation on the validation set.
    fn on_eval(&mut self, _metrics: &EvalMetrics) -> Result<()> {
        Ok(())
    }
}

/// What one evaluation on a validation set measured (means over its batches, no update).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Optimizer steps taken when evaluated.
    pub step: u64,
    /// The composite loss (the value early stopping watches).
    pub total_loss: f64,
    /// Task cross-entropy, when computed.
    pub task_loss: Option<f64>,
    /// Distillation loss, when computed.
    pub kd_loss: Option<f64>,
    /// Reasoning loss, when computed.
    pub reasoning_loss: Option<f64>,
    /// Hidden-state distillation loss, when computed.
    pub hidden_loss: Option<f64>,
    /// Batches evaluated.
    pub batches: usize,
    /// Real tokens evaluated.
    pub tokens: usize,
}

/// Keeps every step's metrics in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLog {
    /// The steps seen, in order.
    pub steps: Vec<StepMetrics>,
    /// The evaluations seen, in order.
    pub evals: Vec<EvalMetrics>,
}

impl MetricsCallback for MetricsLog {
    fn on_step(&mut self, metrics: &StepMetrics) -> Result<()> {
        self.steps.push(metrics.clone());
        Ok(())
    }
    fn on_eval(&mut self, metrics: &EvalMetrics) -> Result<()> {
        self.evals.push(metrics.clone());
        Ok(())
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str = "step,epoch,total_loss,task_loss,kd_loss,reasoning_loss,hidden_loss,grad_norm,lr,tokens,seconds,tokens_per_second";

/// Writes one CSV row per step (header first; absent values are empty cells).
///
/// ```
/// use qat_train::metrics::{CsvMetricsWriter, MetricsCallback, StepMetrics};
/// let mut csv = CsvMetricsWriter::new(Vec::new(), "memory");
/// csv.on_step(&StepMetrics { step: 1, total_loss: 2.5, lr: 1e-3, tokens: 10, seconds: 2.0, ..Default::default() }).unwrap();
/// let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
/// assert_eq!(text.lines().nth(1).unwrap(), "1,0,2.5,,,,,,0.001,10,2,5");
/// ```
pub struct CsvMetricsWriter<W: Write> {
    writer: W,
    target: PathBuf,
    header_written: bool,
}

impl CsvMetricsWriter<BufWriter<File>> {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            writer: BufWriter::new(file),
            target: path.to_path_buf(),
            header_written: false,
        })
    }

    /// Opens `path` for appending (a resumed run continues its log); the header is written
    /// only when the file is new or empty.
    pub fn append(path: &Path) -> Result<Self> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let empty = file.metadata().map_err(io)?.len() == 0;
        Ok(Self {
            writer: BufWriter::new(file),
            target: path.to_path_buf(),
            header_written: !empty,
        })
    }

    /// Continues the log of a run resumed from its checkpoint at `step`: the rows after
    /// `step` (logged before the kill, after the last checkpoint — the resumed run logs those
    /// steps again) and a partial last line are cut off, crash-safely (`formats::atomic`),
    /// and later rows are appended. A missing or empty file starts with the header; a file
    /// whose first line is not [`CSV_HEADER`], or a row whose step is not a number, is an
    /// error naming the file and line.
    ///
    /// ```
    /// use qat_train::metrics::{CsvMetricsWriter, MetricsCallback, StepMetrics, CSV_HEADER};
    /// let dir = std::env::temp_dir().join(format!("qat-csv-resume-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("metrics.csv");
    /// let rows = ["1,0,2,,,,,,0.1,4,1,4", "2,0,2,,,,,,0.1,4,1,4", "3,0,2,,,,,,0.1,4,1,4"];
    /// std::fs::write(&path, format!("{CSV_HEADER}\n{}\n3,0,", rows.join("\n"))).unwrap();
    /// let mut csv = CsvMetricsWriter::resume(&path, 2).unwrap();
    /// let m = StepMetrics { step: 3, total_loss: 1.0, lr: 0.1, tokens: 4, seconds: 1.0, ..Default::default() };
    /// csv.on_step(&m).unwrap();
    /// csv.on_end().unwrap();
    /// let text = std::fs::read_to_string(&path).unwrap();
    /// let steps: Vec<&str> = text.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    /// assert_eq!(steps, ["1", "2", "3"]);
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(TrainError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let bad = |line: usize, reason: String| TrainError::Data {
            source_name: path.display().to_string(),
            line,
            reason,
        };
        // Only lines ended by a newline were written whole (each row is one write).
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let mut kept = String::with_capacity(complete);
        for (i, line) in text[..complete].lines().enumerate() {
            if i == 0 {
                if line != CSV_HEADER {
                    return Err(bad(
                        1,
                        format!("header is {line:?}, expected {CSV_HEADER:?}"),
                    ));
                }
            } else {
                let cell = line.split(',').next().unwrap_or_default();
                let row_step: u64 = cell
                    .parse()
                    .map_err(|_| bad(i + 1, format!("step {cell:?} is not a number")))?;
                if row_step > step {
                    break;
                }
            }
            kept.push_str(line);
            kept.push('\n');
        }
        if kept.len() != text.len() {
            quant_core::io::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Self::append(path)
    }
}

impl<W: Write> CsvMetricsWriter<W> {
    /// A writer into `writer`; `target` names it in errors.
    pub fn new(writer: W, target: &str) -> Self {
        Self {
            writer,
            target: PathBuf::from(target),
            header_written: false,
        }
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        Ok(self.writer)
    }

    fn flush(&mut self) -> Result<()> {
        self.writer.flush().map_err(|source| TrainError::Io {
            path: self.target.clone(),
            source,
        })
    }
}

fn cell<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl<W: Write> MetricsCallback for CsvMetricsWriter<W> {
    fn on_step(&mut self, m: &StepMetrics) -> Result<()> {
        m.validate()?;
        let mut text = String::new();
        if !self.header_written {
            text.push_str(CSV_HEADER);
            text.push('\n');
        }
        let row = [
            m.step.to_string(),
            m.epoch.to_string(),
            m.total_loss.to_string(),
            cell(m.task_loss),
            cell(m.kd_loss),
            cell(m.reasoning_loss),
            cell(m.hidden_loss),
            cell(m.grad_norm),
            m.lr.to_string(),
            m.tokens.to_string(),
            m.seconds.to_string(),
            cell(m.tokens_per_second()),
        ];
        text.push_str(&row.join(","));
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| TrainError::Io {
                path: self.target.clone(),
                source,
            })?;
        self.header_written = true;
        // Each row reaches the file before the step's checkpoint is saved, so a killed run's
        // log holds every step up to its last checkpoint (`resume` cuts the rest).
        self.flush()
    }

    fn on_end(&mut self) -> Result<()> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 1,
            total_loss: 1.5,
            task_loss: Some(1.0),
            kd_loss: Some(0.75),
            reasoning_loss: None,
            hidden_loss: None,
            grad_norm: Some(0.25),
            lr: 0.5,
            tokens: 100,
            seconds: 0.5,
        }
    }

    #[test]
    fn csv_file_appends_without_repeating_the_header() {
        let dir = std::env::temp_dir().join(format!("qat-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.csv");
        let mut w = CsvMetricsWriter::create(&path).unwrap();
        w.on_step(&metrics(1)).unwrap();
        w.on_end().unwrap();
        drop(w);
        let mut w = CsvMetricsWriter::append(&path).unwrap();
        w.on_step(&metrics(2)).unwrap();
        w.on_end().unwrap();
        drop(w);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines[2], "2,1,1.5,1,0.75,,,0.25,0.5,100,0.5,200");
        assert_eq!(
            lines[0].split(',').count(),
            lines[1].split(',').count(),
            "every row has every column"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_metrics_are_errors_naming_field_and_step() {
        let mut m = metrics(7);
        m.kd_loss = Some(f64::NAN);
        let mut w = CsvMetricsWriter::new(Vec::new(), "mem");
        let err = w.on_step(&m).unwrap_err().to_string();
        assert!(err.contains("kd_loss") && err.contains("step 7"), "{err}");
        let mut log = MetricsLog::default();
        log.on_step(&metrics(1)).unwrap();
        assert_eq!(log.steps.len(), 1);
        assert!(CsvMetricsWriter::create(Path::new("/nonexistent/m.csv")).is_err());
    }
    #[test]
    fn resume_cuts_rows_past_the_checkpoint_and_a_partial_line() {
        let dir = std::env::temp_dir().join(format!("qat-metrics-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.csv");
        let mut w = CsvMetricsWriter::create(&path).unwrap();
        for step in 1..=5 {
            w.on_step(&metrics(step)).unwrap();
        }
        drop(w);
        // A kill during a row's write (never seen in practice: one write per row).
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("6,1,1.");
        std::fs::write(&path, &text).unwrap();
        let mut w = CsvMetricsWriter::resume(&path, 3).unwrap();
        for step in 4..=6 {
            w.on_step(&metrics(step)).unwrap();
        }
        w.on_end().unwrap();
        drop(w);
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<&str> = text.lines().map(|l| l.split(',').next().unwrap()).collect();
        assert_eq!(steps, ["step", "1", "2", "3", "4", "5", "6"]);
        // No file yet: the header, then the rows.
        let fresh = dir.join("fresh.csv");
        CsvMetricsWriter::resume(&fresh, 9)
            .unwrap()
            .on_end()
            .unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "");
        // Not a metrics file: refused by file and line, and left alone.
        let other = dir.join("other.csv");
        std::fs::write(&other, "a,b\n1,2\n").unwrap();
        let err = CsvMetricsWriter::resume(&other, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("other.csv line 1") && err.contains("header"),
            "{err}"
        );
        std::fs::write(&other, format!("{CSV_HEADER}\nx,2\n")).unwrap();
        let err = CsvMetricsWriter::resume(&other, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("other.csv line 2") && err.contains("\"x\""),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&other).unwrap(),
            format!("{CSV_HEADER}\nx,2\n")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
