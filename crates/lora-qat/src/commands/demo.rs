//! `lora-qat demo` (also what `lora-qat` with no command runs): post-training quantization
//! against LoRA-QAT on the embedded arithmetic task, or `--pretrain` to retrain the teacher.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora_qat::demo::eval::exact_match;
use lora_qat::demo::pretrain::{pretrain, PretrainSettings};
use lora_qat::demo::run::{run_demo, DemoSettings, Progress, RunPaths};
use lora_qat::demo::task::{draw_splits, Tokenizer};
use lora_qat::demo::TEACHER_DIR;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Train the fp32 teacher from scratch (deterministic: the committed teacher is the
    /// result) and write it to `--teacher`, instead of running the demo.
    #[arg(long)]
    pub pretrain: bool,
    /// The teacher's directory (`config.json`, `model.safetensors`).
    #[arg(long, default_value = TEACHER_DIR)]
    pub teacher: PathBuf,
    /// Pretraining steps (default: the committed teacher's).
    #[arg(long)]
    pub pretrain_steps: Option<u64>,
    /// Continue the interrupted run (or pretraining) from its checkpoint in `--work-dir`.
    #[arg(long)]
    pub resume: bool,
    /// Where checkpoints of an unfinished run are kept.
    #[arg(long, default_value = "runs/work")]
    pub work_dir: PathBuf,
    /// Where each run's directory (`<timestamp>/`: report.md, loss_curves.png, metrics CSVs,
    /// adapters, test.jsonl) is created.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// A short run for CI smoke tests (under two minutes): fewer test problems and steps.
    #[arg(long)]
    pub quick: bool,
    /// Also write the summary `{"teacher_accuracy", "rows": [{"bits", "ptq_accuracy",
    /// "ptq_clip_accuracy", "qat_accuracy"}], "seconds"}` to this file (accuracies in [0, 1];
    /// `ptq_accuracy` is plain RTN, `ptq_clip_accuracy` RTN with the MSE-optimal clip).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Bit widths to run (default 4,3,2).
    #[arg(long, value_delimiter = ',')]
    pub bits: Option<Vec<u32>>,
    /// LoRA-QAT optimizer steps per bit width (default: 300, or 40 with --quick).
    #[arg(long)]
    pub steps: Option<u64>,
    /// A JSON file of demo settings replacing the built-in ones (the `settings` block of a
    /// run's report.md has the format).
    #[arg(long, value_name = "FILE")]
    pub settings: Option<PathBuf>,
}

/// Progress bars on the terminal (hidden when stderr is not one).
struct TerminalProgress;

impl Progress for TerminalProgress {
    fn bar(&self, len: u64, label: &str) -> ProgressBar {
        bar(len, label)
    }

    fn note(&self, text: &str) {
        eprintln!("{text}");
    }
}

/// A handler that turns Ctrl-C into a flag the training loops check between steps.
fn stop_flag() -> CliResult<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&flag);
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: the user does not want to wait for the checkpoint.
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (a checkpoint will be saved; Ctrl-C again to abort)");
    })
    .map_err(|e| CliError::Usage(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(flag)
}

fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {elapsed}/{eta} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

pub fn run(args: &DemoArgs) -> CliResult {
    let stop = stop_flag()?;
    if args.pretrain {
        return run_pretrain(args, &stop);
    }
    let mut settings = match &args.settings {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| CliError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| CliError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
        }
        None if args.quick => DemoSettings::quick(),
        None => DemoSettings::full(),
    };
    if let Some(bits) = &args.bits {
        settings.bits = bits.clone();
    }
    if let Some(steps) = args.steps {
        settings.set_steps(steps)?;
    }
    let paths = RunPaths {
        teacher: args.teacher.clone(),
        runs_dir: args.runs_dir.clone(),
        work_dir: args.work_dir.clone(),
    };
    let report = run_demo(&settings, &paths, args.resume, &stop, &TerminalProgress)?;
    println!();
    print!("{}", report.table_markdown());
    println!(
        "\n{} test problems; {:.1} s in all; files in {}",
        report.test_problems,
        report.seconds,
        report.run_dir.display()
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report.json_summary())
            .map_err(|e| CliError::Usage(format!("cannot serialize the summary: {e}")))?;
        lora_qat::demo::report::write_text(path, &json)?;
    }
    Ok(())
}

fn run_pretrain(args: &DemoArgs, stop: &AtomicBool) -> CliResult {
    let mut settings = PretrainSettings::default();
    if let Some(steps) = args.pretrain_steps {
        settings.steps = steps;
    }
    let progress = bar(settings.steps, "pretrain");
    let started = Instant::now();
    let (model, log) = pretrain(&settings, &args.work_dir, args.resume, stop, &progress)?;
    progress.finish();
    model.save_pretrained(&args.teacher)?;
    let tokenizer = Tokenizer::new();
    let splits = draw_splits(settings.splits)?;
    let eval_bar = bar(splits.test.len() as u64, "test");
    let em = exact_match(&model, &splits.test, &tokenizer, Some(&eval_bar))?;
    eval_bar.finish();
    println!(
        "teacher written to {}: {} steps in {:.1} s of training, final loss {:.4}, test exact-match {:.1}% ({}/{}), {:.1} s in all",
        args.teacher.display(),
        settings.steps,
        log.seconds,
        log.losses.last().map_or(f64::NAN, |l| l.1),
        100.0 * em.accuracy(),
        em.correct,
        em.total,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
