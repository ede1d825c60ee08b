//! `lora-qat qat`: a model quantized to one of llama.cpp's block types by LoRA-QAT, in one
//! command (issue 13, item 6). Steps, each written beside `--out`:
//!
//! 1. the PTQ baseline `<stem>-ptq.gguf`: ggml's own quantizer, llama.cpp's type mix
//!    (`lm::gguf::TypeMix::LlamaCpp`: the tied embedding / output matrix in Q6_K or its
//!    fallback Q8_0, as `llama-quantize` writes it);
//! 2. LoRA-QAT on the same block grid (`--type`), distilled from the model itself (KD on its
//!    logits): on `--data`, or — without it — on sequences the model writes itself
//!    (`qat_train::data_free`, LLM-QAT), saved to the work directory `<stem>.qat/`
//!    with the checkpoint, adapter and metrics; Ctrl-C saves a checkpoint and `--resume`
//!    continues it;
//! 3. `--out`: the trained blocks in the same type mix;
//! 4. both files against the full-precision model on held-out text (`qat_train::quality`:
//!    mean / p99 KLD, top-1 agreement, both perplexities), printed as a table and written
//!    to `<stem>-report.md` with the loss curve `<stem>-loss.png`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lm::gguf::TypeMix;
use lm::LlamaModel;
use lora_core::{LoraConfig, QatMode};
use qat_train::config::TrainConfig;
use qat_train::loss::CompositeWeights;
use qat_train::metrics::{CsvMetricsWriter, MetricsCallback, MetricsLog};
use qat_train::quality::{compare_models, QualityReport};
use qat_train::schedule::LrSchedule;
use qat_train::trainer::Trainer;
use quant_core::config::QatConfig;
use quant_core::ggml::GgmlType;

use super::train::{write_loss_curve, ADAPTER_NAME};
use super::{resolve_model_arg, CliError, CliResult};

mod data;

use data::run_data;

/// Types `qat` trains on: those with a trainable ggml grid.
const TRAINABLE: [GgmlType; 7] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

#[derive(Debug, Args)]
pub struct QatArgs {
    /// Full-precision model: a Hugging Face directory or a llama.cpp GGUF file (decoded to
    /// f32; it is both the teacher and the reference of the evaluation).
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// ggml type of the projections: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k or q6_k.
    #[arg(long = "type", value_name = "TYPE")]
    pub ty: String,
    /// The QAT GGUF file to write; the PTQ file, report and loss curve go beside it, the
    /// run's work files into `<stem>.qat/`.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Training text or data in any format `train --data` reads; without it the model
    /// writes its own training sequences (data-free distillation, LLM-QAT).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Held-out text for the PTQ-vs-QAT table (not used for training). Without it: 10% of
    /// --data's examples are held out, or, data-free, sequences the model writes under
    /// another seed.
    #[arg(long, value_name = "FILE")]
    pub heldout: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 40)]
    pub steps: u64,
    /// Continue the run saved in `<stem>.qat/` (after Ctrl-C or a crash).
    #[arg(long)]
    pub resume: bool,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Tokens per training sequence (packed from --data; written so long when data-free).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Adapter rank (alpha = 2·rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Learning rate of the adapters (warm-up 3 steps, cosine decay to 10%).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f32,
    /// Learning rate of the trained block scales (f16 `d`, `m`, sub-block scales).
    #[arg(long, default_value_t = 5e-5)]
    pub quantizer_lr: f32,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Data-free: sequences the model writes (default: one per training example needed,
    /// steps × batch size).
    #[arg(long, value_name = "N")]
    pub sequences: Option<usize>,
    /// Data-free: continuations taken greedily after the random start token (LLM-QAT: 3–5).
    #[arg(long, default_value_t = 4)]
    pub greedy_tokens: usize,
    /// Data-free: sequences the model writes at once (one cached pass feeds each its next
    /// token; the sequences do not depend on it beyond rounding).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub teacher_batch: usize,
    /// Context of the held-out evaluation (second half of each chunk scored).
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Seed of the adapter init, data order, and data-free generation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Products of the student and the teacher in f32 or bf16 (f32 accumulation, f32 master
    /// weights and optimizer state): qat-train's `compute_dtype`.
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: quant_core::linalg::ComputeDtype,
    /// Comma-separated projections to train.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The files of one run, all derived from `--out`.
struct RunFiles {
    qat: PathBuf,
    ptq: PathBuf,
    report: PathBuf,
    loss_png: PathBuf,
    work: PathBuf,
}

impl RunFiles {
    fn of(out: &Path) -> CliResult<Self> {
        let stem = out
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CliError::Usage(format!("--out {}: no file name", out.display())))?;
        let dir = out.parent().unwrap_or(Path::new(""));
        let beside = |suffix: &str| dir.join(format!("{stem}{suffix}"));
        Ok(Self {
            qat: out.to_path_buf(),
            ptq: beside("-ptq.gguf"),
            report: beside("-report.md"),
            loss_png: beside("-loss.png"),
            work: beside(".qat"),
        })
    }
    fn checkpoint(&self) -> PathBuf {
        self.work.join("checkpoint.json")
    }
    fn adapter(&self) -> PathBuf {
        self.work.join("adapter")
    }
    fn metrics(&self) -> PathBuf {
        self.work.join("metrics.csv")
    }
    fn sequences(&self) -> PathBuf {
        self.work.join("teacher-sequences.jsonl")
    }
    fn heldout_sequences(&self) -> PathBuf {
        self.work.join("heldout-sequences.jsonl")
    }
}

fn file_error(path: &Path, reason: impl ToString) -> CliError {
    CliError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// `--type`, refused unless it has a trainable grid.
fn parse_type(name: &str) -> CliResult<GgmlType> {
    let ty = GgmlType::from_name(name)?;
    if !TRAINABLE.contains(&ty) {
        let names: Vec<&str> = TRAINABLE.iter().map(|t| t.name()).collect();
        return Err(CliError::Usage(format!(
            "--type {name}: no trainable grid for this type; qat trains {}",
            names.join(", ")
        )));
    }
    Ok(ty)
}

fn check_args(args: &QatArgs) -> CliResult {
    let positive = [
        ("--steps", args.steps as f64),
        ("--batch-size", args.batch_size as f64),
        ("--rank", args.rank as f64),
        ("--lr", f64::from(args.lr)),
        ("--quantizer-lr", f64::from(args.quantizer_lr)),
        ("--temperature", f64::from(args.temperature)),
    ];
    for (flag, v) in positive {
        if !(v.is_finite() && v > 0.0) {
            return Err(CliError::Usage(format!("{flag} {v}: must be positive")));
        }
    }
    if args.seq_len < 4 {
        return Err(CliError::Usage(format!(
            "--seq-len {}: at least 4 tokens",
            args.seq_len
        )));
    }
    if args.teacher_batch == 0 {
        return Err(CliError::Usage("--teacher-batch 0: at least one".into()));
    }
    if args.sequences == Some(0) {
        return Err(CliError::Usage("--sequences 0: at least one".into()));
    }
    if args.data.is_some() && args.sequences.is_some() {
        return Err(CliError::Usage(
            "--sequences: only without --data (the model writes that many sequences)".into(),
        ));
    }
    Ok(())
}

/// The training configuration: KD only at `--temperature`, AdamW, warm-up + cosine.
fn train_config(args: &QatArgs) -> CliResult<TrainConfig> {
    let mut config = TrainConfig {
        seed: args.seed,
        max_steps: Some(args.steps),
        batch_size: args.batch_size,
        max_len: Some(args.seq_len),
        schedule: LrSchedule::WarmupCosine {
            warmup_steps: 3.min(args.steps),
            total_steps: args.steps,
            min_ratio: 0.1,
        },
        checkpoint_every: Some(10),
        compute_dtype: args.compute_dtype,
        ..TrainConfig::default()
    };
    config.optimizer.lr = args.lr;
    config.optimizer.quantizer_lr = Some(args.quantizer_lr);
    config.loss.weights = Some(CompositeWeights {
        task: 0.0,
        kd: 1.0,
        reasoning: 0.0,
        temperature: args.temperature,
    });
    config.validate()?;
    Ok(config)
}

fn progress_bar(len: u64, quiet: bool, what: &str) -> CliResult<ProgressBar> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}, ETA {{eta_precise}}] {{msg}}"
        ))
        .map_err(|e| CliError::Usage(e.to_string()))?,
    );
    Ok(bar)
}

/// The student: the model's dense weights with fresh LoRA-QAT adapters on `ty`'s grid.
fn build_student(args: &QatArgs, model_dir: &Path, ty: GgmlType) -> CliResult<LlamaModel> {
    let mut model = super::train::load_base(model_dir, lm::gguf_model::is_gguf_file(model_dir))?;
    let targets: Vec<&str> = args.target_modules.iter().map(String::as_str).collect();
    let lora = LoraConfig::new(args.rank, 2.0 * args.rank as f64, &targets);
    let qat = QatConfig::ggml(ty).map_err(|e| CliError::Usage(format!("--type {ty}: {e}")))?;
    model.inject_qat_adapters(
        &lora,
        &qat,
        QatMode::QuantizeMerged,
        ADAPTER_NAME,
        args.seed,
    )?;
    Ok(model)
}

/// Runs the steps left, saving a checkpoint every 10 steps, at the end, and when Ctrl-C
/// arrives (then the command ends with an error saying how to resume).
fn train_loop(trainer: &mut Trainer, files: &RunFiles, quiet: bool, resume: bool) -> CliResult {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second handler cannot be set in one process (tests call run twice): then Ctrl-C
    // ends the process as usual and the last periodic checkpoint is what resumes.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    let mut csv = if resume {
        CsvMetricsWriter::resume(&files.metrics(), trainer.step_count())?
    } else {
        CsvMetricsWriter::create(&files.metrics())?
    };
    let bar = progress_bar(trainer.total_steps(), quiet, "LoRA-QAT")?;
    bar.set_position(trainer.step_count());
    let every = trainer.config().checkpoint_every.unwrap_or(10);
    while !trainer.is_finished() {
        if interrupted.load(Ordering::SeqCst) {
            trainer.save_checkpoint(&files.checkpoint())?;
            bar.abandon();
            return Err(CliError::Usage(format!(
                "interrupted at step {}: checkpoint saved in {}; run the same command with \
                 --resume to continue",
                trainer.step_count(),
                files.work.display()
            )));
        }
        let m = trainer.step()?;
        csv.on_step(&m)?;
        bar.set_position(m.step);
        bar.set_message(format!("KD {:.4}", m.total_loss));
        if m.step % every == 0 && !trainer.is_finished() {
            trainer.save_checkpoint(&files.checkpoint())?;
        }
    }
    trainer.save_checkpoint(&files.checkpoint())?;
    csv.on_end()?;
    bar.finish_and_clear();
    Ok(())
}

/// Every step's KD loss in the run's metrics CSV (a resumed run's earlier steps included).
fn logged_losses(path: &Path) -> CliResult<MetricsLog> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let mut log = MetricsLog::default();
    for (i, line) in text.lines().enumerate().skip(1) {
        let mut cols = line.split(',');
        let step = cols.next().and_then(|v| v.parse::<u64>().ok());
        let loss = cols.nth(1).and_then(|v| v.parse::<f64>().ok());
        let (Some(step), Some(total_loss)) = (step, loss) else {
            return Err(file_error(
                path,
                format!("line {}: no step and loss", i + 1),
            ));
        };
        log.steps.push(qat_train::metrics::StepMetrics {
            step,
            epoch: 0,
            total_loss,
            task_loss: None,
            kd_loss: Some(total_loss),
            reasoning_loss: None,
            hidden_loss: None,
            grad_norm: None,
            lr: 0.0,
            tokens: 0,
            seconds: 0.0,
        });
    }
    Ok(log)
}

fn table(rows: &[(&str, &Path, &QualityReport)]) -> String {
    let mut out = String::from(
        "| file | mean KLD | KLD p99 | top-1 agreement | PPL(Q) | PPL(ref) |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for (what, path, r) in rows {
        out.push_str(&format!(
            "| {what} (`{}`) | {:.4} ± {:.4} | {:.4} | {:.1}% | {:.2} | {:.2} |\n",
            path.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            r.mean_kld,
            r.mean_kld_uncertainty,
            r.kld_p99,
            100.0 * r.same_top,
            r.perplexity,
            r.reference_perplexity
        ));
    }
    out
}

pub fn run(args: &QatArgs) -> CliResult {
    let ty = parse_type(&args.ty)?;
    check_args(args)?;
    let files = RunFiles::of(&args.out)?;
    if args.resume && !files.checkpoint().is_file() {
        return Err(file_error(
            &files.checkpoint(),
            "--resume needs the checkpoint of an earlier run of this --out",
        ));
    }
    let model_dir = resolve_model_arg(&args.model, None)?;
    std::fs::create_dir_all(&files.work).map_err(|e| file_error(&files.work, e))?;
    let started = std::time::Instant::now();

    // 1. PTQ baseline: ggml's quantizer in llama.cpp's type mix.
    if !(args.resume && files.ptq.is_file()) {
        lm::gguf::export_gguf_with(&model_dir, None, &files.ptq, ty, TypeMix::LlamaCpp)?;
    }

    // 2. LoRA-QAT distilled from the model itself.
    let mut teacher = super::logits::load_model(&model_dir, None)?;
    let data = run_data(args, &model_dir, &files, &mut teacher)?;
    let config = train_config(args)?;
    let student = build_student(args, &model_dir, ty)?;
    let train_sequences = data.train.len();
    let mut trainer = Trainer::new(config, student, Some(teacher), data.train, None)?;
    if args.resume {
        trainer.load_checkpoint(&files.checkpoint())?;
    }
    train_loop(&mut trainer, &files, args.quiet, args.resume)?;
    trainer.save_adapter(&files.adapter(), ADAPTER_NAME)?;
    let steps = trainer.step_count();
    drop(trainer);
    write_loss_curve(&files.loss_png, &logged_losses(&files.metrics())?)?;

    // 3. The trained blocks.
    lm::gguf::export_gguf_with(
        &model_dir,
        Some(&files.adapter()),
        &files.qat,
        ty,
        TypeMix::LlamaCpp,
    )?;

    // 4. Both files against the full-precision model on held-out text.
    let mut reference = super::logits::load_model(&model_dir, None)?;
    let mut reports = Vec::new();
    for path in [&files.ptq, &files.qat] {
        let mut quantized = super::logits::load_model(path, None)?;
        reports.push(compare_models(
            &mut quantized,
            &mut reference,
            &data.heldout,
            args.ctx,
            data.bos,
        )?);
    }
    let table = table(&[
        ("PTQ", &files.ptq, &reports[0]),
        ("LoRA-QAT", &files.qat, &reports[1]),
    ]);
    let training = match &args.data {
        Some(p) => format!(
            "KD on `{}` ({train_sequences} packed sequences)",
            p.display()
        ),
        None => format!(
            "data-free KD on {train_sequences} sequences the model wrote (LLM-QAT: random \
             start token, {} greedy continuations, then sampled at temperature 1)",
            args.greedy_tokens
        ),
    };
    let report = format!(
        "# LoRA-QAT {ty} of `{model}`\n\n\
         {table}\n\
         Held-out: {held} ({tokens} tokens, chunks of {ctx}, second halves scored), measured \
         by lora-qat's own forward (`qat_train::quality`, as llama.cpp's `perplexity \
         --kl-divergence`).\n\n\
         Training: {steps} steps of batch {batch} × {len} tokens, rank {rank}, lr {lr:e}, \
         block-scale lr {qlr:e}, KD temperature {temp}; {training}. Type mix: llama.cpp's \
         (`lm::gguf::TypeMix::LlamaCpp`). Loss curve: `{png}`. Wall time {secs:.0} s.\n",
        model = args.model.display(),
        held = data.heldout_source,
        tokens = data.heldout.len(),
        ctx = args.ctx,
        batch = args.batch_size,
        len = args.seq_len,
        rank = args.rank,
        lr = args.lr,
        qlr = args.quantizer_lr,
        temp = args.temperature,
        png = files
            .loss_png
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        secs = started.elapsed().as_secs_f64(),
    );
    quant_core::io::write_atomic(&files.report, report.as_bytes())?;
    println!("{table}");
    println!(
        "wrote {}, {}, {} and {}",
        files.qat.display(),
        files.ptq.display(),
        files.report.display(),
        files.loss_png.display()
    );
    Ok(())
}
