//! What a demo run leaves behind: the table (console and Markdown), `report.md`, the JSON
//! summary for scripts, per-run metrics CSVs and a PNG of the loss curves.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use qat_train::metrics::StepMetrics;
use serde::{Deserialize, Serialize};

use super::error::{DemoError, Result};

/// One bit width's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitsRow {
    pub bits: u8,
    /// Exact-match after round-to-nearest PTQ of every decoder linear, the grid fitted to each
    /// group's absmax (plain RTN).
    pub ptq_accuracy: f64,
    /// The same with each group's clip chosen to minimise the squared error (RTN + clip
    /// search).
    pub ptq_clip_accuracy: f64,
    /// Exact-match of the LoRA-QAT student (fake-quantized merged weights).
    pub qat_accuracy: f64,
    /// Optimizer steps of the LoRA-QAT run.
    pub qat_steps: u64,
    /// Seconds of LoRA-QAT training.
    pub qat_seconds: f64,
    /// Seconds of the PTQ step and its evaluation.
    pub ptq_seconds: f64,
}

/// The whole run: the teacher's accuracy, a row per bit width, the settings and timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoReport {
    pub teacher_accuracy: f64,
    /// Test problems graded.
    pub test_problems: usize,
    pub rows: Vec<BitsRow>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// The settings, as JSON (printed into the report).
    pub settings: serde_json::Value,
    /// Where the run's files are.
    pub run_dir: std::path::PathBuf,
}

/// `{"teacher_accuracy", "rows": [{"bits", "ptq_accuracy", "qat_accuracy"}], "seconds"}`,
/// the `--json` format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSummary {
    pub teacher_accuracy: f64,
    pub rows: Vec<JsonRow>,
    pub seconds: f64,
}

/// One row of [`JsonSummary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonRow {
    pub bits: u8,
    /// Plain RTN.
    pub ptq_accuracy: f64,
    /// RTN with the MSE-optimal clip.
    pub ptq_clip_accuracy: f64,
    pub qat_accuracy: f64,
}

/// `part / whole` as a percentage, or `–` when the whole is zero.
fn retained(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.1}%", 100.0 * part / whole)
    } else {
        "–".into()
    }
}

impl DemoReport {
    /// The `--json` summary.
    pub fn json_summary(&self) -> JsonSummary {
        JsonSummary {
            teacher_accuracy: self.teacher_accuracy,
            rows: self
                .rows
                .iter()
                .map(|r| JsonRow {
                    bits: r.bits,
                    ptq_accuracy: r.ptq_accuracy,
                    ptq_clip_accuracy: r.ptq_clip_accuracy,
                    qat_accuracy: r.qat_accuracy,
                })
                .collect(),
            seconds: self.seconds,
        }
    }

    /// The table as Markdown (also what the console shows).
    ///
    /// ```
    /// use lora_qat::demo::report::{BitsRow, DemoReport};
    /// let report = DemoReport {
    ///     teacher_accuracy: 0.98, test_problems: 100, seconds: 1.0, settings: serde_json::json!({}),
    ///     run_dir: "runs/x".into(),
    ///     rows: vec![BitsRow { bits: 3, ptq_accuracy: 0.49, ptq_clip_accuracy: 0.6, qat_accuracy: 0.98,
    ///                          qat_steps: 10, qat_seconds: 1.0, ptq_seconds: 0.1 }],
    /// };
    /// let table = report.table_markdown();
    /// assert!(table.contains("| 3 | 49.0% (50.0%) | 60.0% (61.2%) | 98.0% (100.0%) |"), "{table}");
    /// ```
    pub fn table_markdown(&self) -> String {
        let mut out = String::new();
        let t = self.teacher_accuracy;
        let _ = writeln!(
            out,
            "| bits | PTQ: RTN | PTQ: RTN + clip search | LoRA-QAT (KD + reasoning) |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- |");
        let _ = writeln!(
            out,
            "| fp32 teacher | {0:.1}% | {0:.1}% | {0:.1}% |",
            100.0 * t
        );
        for r in &self.rows {
            let cell = |a: f64| format!("{:.1}% ({})", 100.0 * a, retained(a, t));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                r.bits,
                cell(r.ptq_accuracy),
                cell(r.ptq_clip_accuracy),
                cell(r.qat_accuracy)
            );
        }
        out
    }

    /// `report.md`: the table, then timings and the settings.
    pub fn markdown(&self) -> String {
        let mut out = String::from("# lora-qat demo\n\n");
        let _ = writeln!(
            out,
            "Exact-match answer accuracy on {} held-out test problems (greedy decoding), \
             the fp32 teacher against round-to-nearest post-training quantization (PTQ) of \
             every decoder linear and LoRA-QAT (LoRA trained through the quantizer with \
             distillation and the reasoning loss from the fp32 teacher). In brackets: the \
             share of the teacher's accuracy retained. RTN fits each group's grid to its \
             absmax; RTN + clip search picks the clip that minimises the squared error.\n",
            self.test_problems
        );
        out.push_str(&self.table_markdown());
        out.push_str("\n## Timings\n\n| bits | PTQ + eval (s) | LoRA-QAT steps | LoRA-QAT training (s) |\n| --- | --- | --- | --- |\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {:.1} |",
                r.bits, r.ptq_seconds, r.qat_steps, r.qat_seconds
            );
        }
        let _ = writeln!(out, "\nWhole run: {:.1} s.\n", self.seconds);
        let settings =
            serde_json::to_string_pretty(&self.settings).unwrap_or_else(|e| e.to_string());
        let _ = writeln!(out, "## Settings\n\n```json\n{settings}\n```");
        out
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    quant_core::io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// The font the plot's labels use: the first of a few common system TrueType fonts, read
/// once. `None` when none is installed; the plot is then drawn without text.
fn plot_font() -> Option<&'static str> {
    static FONT: OnceLock<Option<&'static str>> = OnceLock::new();
    *FONT.get_or_init(|| {
        const CANDIDATES: [&str; 4] = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ];
        CANDIDATES.iter().find_map(|path| {
            let bytes = std::fs::read(path).ok()?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("demo-sans", FontStyle::Normal, bytes).ok()?;
            Some("demo-sans")
        })
    })
}

/// One curve: a label and `(step, value)` points.
pub type Curve = (String, Vec<(f64, f64)>);

/// Curves of one metric of several runs: `select` picks the value from each step's metrics.
pub fn curves(
    runs: &[(String, Vec<StepMetrics>)],
    select: impl Fn(&StepMetrics) -> Option<f64>,
) -> Vec<Curve> {
    runs.iter()
        .map(|(label, steps)| {
            let points = steps
                .iter()
                .filter_map(|m| select(m).map(|v| (m.step as f64, v)))
                .collect();
            (label.clone(), points)
        })
        .collect()
}

/// Draws panels of curves side by side into a PNG (log-scale y), each panel titled. Text is
/// drawn when a system font is available, left out otherwise.
pub fn plot_loss_curves(path: &Path, panels: &[(String, Vec<Curve>)]) -> Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| DemoError::Plot {
        path: PathBuf::from(path),
        reason: e.to_string(),
    };
    if panels.is_empty() {
        return Err(plot_err(&"no panels to draw"));
    }
    let width = 560 * panels.len() as u32;
    // Drawn into a temporary file next to the target, renamed when complete.
    let partial = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&partial, (width, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let areas = root.split_evenly((1, panels.len()));
        let font = plot_font();
        let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
        for (area, (title, curves)) in areas.iter().zip(panels) {
            let points = curves.iter().flat_map(|(_, p)| p.iter());
            let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, 0.0f64);
            for &(x, y) in points {
                if y > 0.0 && y.is_finite() {
                    x_max = x_max.max(x);
                    y_min = y_min.min(y);
                    y_max = y_max.max(y);
                }
            }
            if !y_min.is_finite() {
                (y_min, y_max) = (1e-3, 1.0);
            }
            let y_range = (y_min * 0.8)..(y_max * 1.25).max(y_min * 1.01);
            let mut builder = ChartBuilder::on(area);
            builder.margin(12);
            if let Some(font) = font {
                builder
                    .caption(title, (font, 18))
                    .x_label_area_size(30)
                    .y_label_area_size(50);
            }
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, y_range.log_scale())
                .map_err(|e| plot_err(&e))?;
            let mut mesh = chart.configure_mesh();
            // Log-scale axes draw a light line per minor tick; the bold ones are enough.
            mesh.light_line_style(TRANSPARENT);
            if let Some(font) = font {
                mesh.x_desc("step").label_style((font, 12));
            } else {
                mesh.disable_x_axis().disable_y_axis();
            }
            mesh.draw().map_err(|e| plot_err(&e))?;
            for (i, (label, points)) in curves.iter().enumerate() {
                let color = palette[i % palette.len()];
                let series = chart
                    .draw_series(LineSeries::new(
                        points.iter().copied().filter(|&(_, y)| y > 0.0),
                        color,
                    ))
                    .map_err(|e| plot_err(&e))?;
                if font.is_some() {
                    series
                        .label(label.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                }
            }
            if let Some(font) = font {
                chart
                    .configure_series_labels()
                    .label_font((font, 13))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| plot_err(&e))?;
            }
        }
        root.present().map_err(|e| plot_err(&e))?;
    }
    std::fs::rename(&partial, path).map_err(|e| DemoError::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> DemoReport {
        DemoReport {
            teacher_accuracy: 0.5,
            test_problems: 10,
            rows: vec![BitsRow {
                bits: 2,
                ptq_accuracy: 0.1,
                ptq_clip_accuracy: 0.2,
                qat_accuracy: 0.5,
                qat_steps: 3,
                qat_seconds: 1.5,
                ptq_seconds: 0.5,
            }],
            seconds: 4.0,
            settings: serde_json::json!({"bits": [2]}),
            run_dir: "runs/x".into(),
        }
    }

    #[test]
    fn json_summary_has_the_documented_fields() {
        let json = serde_json::to_value(report().json_summary()).unwrap();
        assert_eq!(json["teacher_accuracy"], 0.5);
        assert_eq!(json["seconds"], 4.0);
        assert_eq!(json["rows"][0]["bits"], 2);
        assert_eq!(json["rows"][0]["ptq_accuracy"], 0.1);
        assert_eq!(json["rows"][0]["qat_accuracy"], 0.5);
    }

    #[test]
    fn markdown_has_table_timings_and_settings() {
        let md = report().markdown();
        assert!(
            md.contains("| 2 | 10.0% (20.0%) | 20.0% (40.0%) | 50.0% (100.0%) |"),
            "{md}"
        );
        assert!(md.contains("| 2 | 0.5 | 3 | 1.5 |"), "{md}");
        assert!(md.contains("\"bits\""), "{md}");
    }

    #[test]
    fn loss_curves_are_written_as_png() {
        let dir = std::env::temp_dir().join(format!("lora-qat-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let steps: Vec<StepMetrics> = (1..=5)
            .map(|i| StepMetrics {
                step: i,
                total_loss: 1.0 / i as f64,
                kd_loss: Some(0.5 / i as f64),
                ..Default::default()
            })
            .collect();
        let runs = vec![("2-bit".to_string(), steps)];
        let path = dir.join("curves.png");
        plot_loss_curves(
            &path,
            &[
                ("total".into(), curves(&runs, |m| Some(m.total_loss))),
                ("kd".into(), curves(&runs, |m| m.kd_loss)),
                ("reasoning".into(), curves(&runs, |m| m.reasoning_loss)),
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
        assert!(!dir.join("curves.partial.png").exists());
        assert!(plot_loss_curves(&path, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
