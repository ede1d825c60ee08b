//! `lora-qat train`: fine-tune a model's adapters on text or token data with the trainer of
//! `qat-train`, writing a PEFT adapter directory, a metrics CSV and a resumable checkpoint.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lm::LlamaModel;
use lora_core::qlora::Nf4Options;
use lora_core::{LoraConfig, QatMode};
use lora_qat::text::{examples_from_file, ModelText};
use qat_train::config::TrainConfig;
use qat_train::data::Dataset;
use qat_train::metrics::{CsvMetricsWriter, EvalMetrics, MetricsCallback, MetricsLog, StepMetrics};
use qat_train::trainer::Trainer;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::ggml::GgmlType;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;

use super::{resolve_model_arg, CliError, CliResult};

/// The adapter trained and saved.
pub const ADAPTER_NAME: &str = "default";
/// Files written under `--out`.
pub const ADAPTER_DIR: &str = "adapter";
pub const METRICS_FILE: &str = "metrics.csv";
/// Training and validation loss per step, drawn after training.
pub const LOSS_CURVE_FILE: &str = "loss_curve.png";
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
pub const CONFIG_FILE: &str = "train_config.json";
/// LoRA-QAT only: the quantized merged weights `Q(W + s·B·A)` (`LlamaModel::export_quantized`).
pub const QUANTIZED_FILE: &str = "quantized.safetensors";

/// Which adapter the student gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdapterType {
    /// LoRA on a full-precision base.
    Lora,
    /// DoRA (LoRA with a learned magnitude per output row).
    Dora,
    /// LoRA on a frozen quantized base (QLoRA-style).
    Qlora,
    /// LoRA trained through a learned weight quantizer of W + s·B·A.
    LoraQat,
}

/// `--quantizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizerArg {
    Uniform,
    Pi,
    Nf4,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

/// `--ste`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SteArg {
    Lsq,
    Ewgs,
    Clipped,
    Standard,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Hugging Face model directory (config.json + model.safetensors), a llama.cpp GGUF file,
    /// or a hub id (org/name) in the local Hugging Face cache; its tokenizer (tokenizer.json,
    /// or the GGUF's tokenizer.ggml.* keys) and chat template turn text data into tokens. A
    /// GGUF file's projections stay in its own quantized blocks (frozen, products tile by
    /// tile, as QLoRA over NF4) unless --dequantize-base.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// With a GGUF --model: decode its projections to dense f32 weights first (training over
    /// the weights llama.cpp computes with, at 4 bytes per parameter) instead of keeping the
    /// file's quantized blocks as the frozen base.
    #[arg(long)]
    pub dequantize_base: bool,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Training data, read by content: chat JSONL (`{"messages": [{"role", "content"}, ...]}`,
    /// loss on assistant turns only), prompt-completion JSONL (`{"prompt", "completion"}`,
    /// strings or message lists, loss on the completion), text JSONL (`{"text"}`),
    /// pre-tokenized JSONL (`{"input_ids": [...], "labels": [...]?, "step_mask": [...]?,
    /// "answer_mask": [...]?}`), or plain text, one example per line.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Validation data in the same formats, evaluated every `eval_every` steps (config) and at
    /// the end.
    #[arg(long, value_name = "FILE", conflicts_with = "validation_split")]
    pub validation: Option<PathBuf>,
    /// Hold out this fraction of --data (seeded by --seed) as validation data.
    #[arg(long, value_name = "F")]
    pub validation_split: Option<f64>,
    /// Truncate examples to this many tokens (overrides the config's max_len).
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,
    /// Pack examples into sequences of --max-seq-len tokens (positions restart per example,
    /// no attention across examples).
    #[arg(long, requires = "max_seq_len")]
    pub packing: bool,
    /// Output directory: adapter/ (PEFT adapter; for lora-qat also the quantizer steps),
    /// metrics.csv, checkpoint.json (+ its tensors), train_config.json (the configuration in
    /// effect), and for lora-qat quantized.safetensors (the merged weights Q(W + s·B·A)).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The adapter to train.
    #[arg(long, value_enum, default_value_t = AdapterType::Lora)]
    pub adapter_type: AdapterType,
    /// Adapter rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Adapter alpha (scale α/r); default 2·rank.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Adapter dropout probability.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Comma-separated module names to adapt.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// Start from this saved PEFT adapter directory (ours or PEFT's) instead of a fresh
    /// adapter; the optimizer starts fresh.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub init_adapter: Option<PathBuf>,
    /// Bits of the weight quantizer (qlora, lora-qat): 2..=8 for uniform and pi, 4 for nf4
    /// (default 4); a ggml grid fixes its own (giving another is an error).
    #[arg(long)]
    pub bits: Option<u32>,
    /// Quantizer grid (qlora, lora-qat), per output channel: uniform (learned step), pi
    /// (step α·π/3, learned α) or nf4 (NF4 codebook, learned absmax). For qlora, nf4 quantizes
    /// the base as bitsandbytes does (blocks of 64, double quantization); a bnb-4bit model
    /// directory is used as it is. lora-qat only: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k
    /// train on ggml's block grid of that type (trainable f16 scales; rows that do not divide
    /// use llama.cpp's fallback type), so that `export-gguf --type` of the same type writes
    /// exactly the trained blocks.
    #[arg(long, value_enum, default_value_t = QuantizerArg::Nf4)]
    pub quantizer: QuantizerArg,
    /// lora-qat with --quantizer nf4: train the NF4 grid in bitsandbytes' 4-bit layout —
    /// absmax per block of 64 values along each row (rows must be a multiple of 64) and
    /// double-quantized absmax in the forward — so that `merge --quantize nf4` writes
    /// exactly the trained codes and scales as a transformers bitsandbytes checkpoint.
    #[arg(long)]
    pub bnb_layout: bool,
    /// Straight-through estimator of the quantizer's backward (lora-qat): lsq (learned step
    /// size, step gradient scaled by 1/√(N·Qp)), ewgs (element-wise gradient scaling,
    /// δ = 0.2), clipped (identity inside the range, zero outside), standard (identity).
    /// The ggml grids have LSQ's backward only. Default lsq.
    #[arg(long, value_enum)]
    pub ste: Option<SteArg>,
    /// Frozen teacher model directory for distillation (KD on logits, reasoning and
    /// hidden-state terms as the config's loss weights say; the `default` preset otherwise).
    #[arg(long, value_name = "DIR")]
    pub teacher: Option<PathBuf>,
    /// Learning rate of the adapters (overrides the config file).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Optimizer steps (overrides the config file).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Passes over the data when no step count is given (overrides the config file).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Examples per batch (overrides the config file).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the adapter init, data order and dropout (overrides the config file).
    #[arg(long)]
    pub seed: Option<u64>,
    /// JSON training configuration (qat_train::config::TrainConfig: optimizer, schedule,
    /// loss weights, calibration, evaluation, ...); the flags above override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run saved in --out (checkpoint.json): adapter, optimizer moments, step,
    /// RNG and data position, so the result equals an uninterrupted run. --max-steps may
    /// extend it.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Under `mpirun` (a build with `--features mpi`): end the whole job when one rank has
    /// waited this many seconds in one exchange with the others (a rank died or hangs);
    /// 0 waits forever. See docs/SCALING.md.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub collective_timeout: f64,
    /// Gradient checkpointing: keep only each decoder layer's input in the forward and
    /// recompute the layer in backward (same gradients bit for bit, far less memory at long
    /// sequences, about one more forward per step). Sets the config's gradient_checkpointing.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Element type of the saved adapter tensors (f32, f16 or bf16; LoRA-QAT: f32 only).
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = parse_save_dtype)]
    pub save_dtype: lora_core::peft::SaveDtype,
    /// Precision of the matrix products of the student (and teacher): f32, or bf16 (operands
    /// rounded to bf16, sums in f32, as PyTorch's CPU autocast; master weights, gradients,
    /// optimizer state, norms, softmax and loss stay f32). Overrides the config's
    /// `compute_dtype` (default f32).
    #[arg(long, value_name = "f32|bf16", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: Option<quant_core::linalg::ComputeDtype>,
}

fn parse_save_dtype(name: &str) -> Result<lora_core::peft::SaveDtype, String> {
    lora_core::peft::SaveDtype::from_name(name).map_err(|e| e.to_string())
}

fn file_error(path: &Path, reason: impl ToString) -> CliError {
    CliError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The config in effect: the saved one when resuming, else `--config` or the defaults; then
/// the flags.
fn effective_config(args: &TrainArgs) -> CliResult<TrainConfig> {
    let saved = args.out.join(CONFIG_FILE);
    let mut config = if args.resume {
        TrainConfig::from_json_file(&saved)?
    } else if let Some(path) = &args.config {
        TrainConfig::from_json_file(path)?
    } else {
        TrainConfig::default()
    };
    if let Some(lr) = args.lr {
        config.optimizer.lr = lr;
    }
    if let Some(steps) = args.max_steps {
        config.max_steps = Some(steps);
    }
    if let Some(epochs) = args.epochs {
        config.epochs = Some(epochs);
    }
    if let Some(b) = args.batch_size {
        config.batch_size = b;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(n) = args.max_seq_len {
        config.max_len = Some(n);
    }
    if let Some(dtype) = args.compute_dtype {
        config.compute_dtype = dtype;
    }
    if args.gradient_checkpointing {
        config.gradient_checkpointing = true;
    }
    config.validate()?;
    Ok(config)
}

/// Reads a dataset by content (`lora_qat::text::data`), loading the model's tokenizer and
/// chat template only when the format needs them.
pub fn read_dataset(path: &Path, model: &Path) -> CliResult<Dataset> {
    Ok(examples_from_file(path, || ModelText::load(model))?.dataset)
}

fn lora_config(args: &TrainArgs) -> LoraConfig {
    let targets: Vec<&str> = args.target_modules.iter().map(String::as_str).collect();
    let mut config = LoraConfig::new(
        args.rank,
        args.alpha.unwrap_or(2.0 * args.rank as f64),
        &targets,
    );
    config.lora_dropout = args.dropout;
    config.use_dora = args.adapter_type == AdapterType::Dora;
    config
}

/// The quantizer `--quantizer`, `--bits` and `--ste` describe (per output channel,
/// symmetric, MSE clip-search init), or a ggml grid (`QatConfig::ggml`, which fixes the
/// others: a `--bits` or `--ste` that disagrees is an error naming it).
/// The block size of `--bnb-layout`: bitsandbytes' and QLoRA's default.
const BNB_LAYOUT_BLOCKSIZE: usize = 64;

fn qat_config(args: &TrainArgs) -> CliResult<QatConfig> {
    let ggml = match args.quantizer {
        QuantizerArg::Uniform | QuantizerArg::Pi | QuantizerArg::Nf4 => None,
        QuantizerArg::Q4_0 => Some(GgmlType::Q4_0),
        QuantizerArg::Q4_1 => Some(GgmlType::Q4_1),
        QuantizerArg::Q5_0 => Some(GgmlType::Q5_0),
        QuantizerArg::Q5_1 => Some(GgmlType::Q5_1),
        QuantizerArg::Q8_0 => Some(GgmlType::Q8_0),
        QuantizerArg::Q4K => Some(GgmlType::Q4_K),
        QuantizerArg::Q6K => Some(GgmlType::Q6_K),
    };
    if args.bnb_layout && (args.adapter_type != AdapterType::LoraQat || args.init_adapter.is_some())
    {
        return Err(CliError::Usage(
            "--bnb-layout sets the grid of a fresh LoRA-QAT adapter (--adapter-type lora-qat \
             without --init-adapter, whose saved state fixes its grid); a qlora base is \
             bitsandbytes' layout already"
                .into(),
        ));
    }
    if args.bnb_layout && args.quantizer != QuantizerArg::Nf4 {
        return Err(CliError::Usage(format!(
            "--bnb-layout: bitsandbytes' 4-bit layout is the nf4 grid's, not --quantizer {:?}",
            args.quantizer
        )));
    }
    if let Some(ty) = ggml {
        let config = QatConfig::ggml(ty)
            .map_err(|e| CliError::Usage(format!("--quantizer {}: {e}", ty.name())))?;
        if let Some(bits) = args.bits.filter(|&b| b != config.bits) {
            return Err(CliError::Usage(format!(
                "--bits {bits}: the {} grid has {}-bit codes",
                ty.name(),
                config.bits
            )));
        }
        if let Some(ste) = args.ste.filter(|&s| s != SteArg::Lsq) {
            return Err(CliError::Usage(format!(
                "--ste {ste:?}: the {} grid trains with LSQ's backward only",
                ty.name()
            )));
        }
        return Ok(config);
    }
    let (quantizer, pi_k) = match args.quantizer {
        QuantizerArg::Uniform => (QuantizerKind::Uniform, None),
        QuantizerArg::Pi => (QuantizerKind::Pi, Some(3)),
        _ => (QuantizerKind::Nf4, None),
    };
    let ste = match args.ste.unwrap_or(SteArg::Lsq) {
        SteArg::Lsq => Ste::Lsq,
        SteArg::Ewgs => Ste::Ewgs { delta: 0.2 },
        SteArg::Clipped => Ste::Clipped { clip: 1.0 },
        SteArg::Standard => Ste::Standard,
    };
    let config = QatConfig {
        quantizer,
        bits: args.bits.unwrap_or(4),
        granularity: if args.bnb_layout {
            Granularity::PerBlock {
                size: BNB_LAYOUT_BLOCKSIZE,
            }
        } else {
            Granularity::PerChannel
        },
        ste,
        pi_k,
        double_quant: args.bnb_layout,
        ..QatConfig::piq3()
    };
    config
        .validate()
        .map_err(|e| CliError::Usage(format!("--quantizer/--bits/--ste: {e}")))?;
    Ok(config)
}

/// The base model: a directory as stored; a GGUF file over its quantized blocks, or decoded
/// to `f32` with `dequantize` (`--dequantize-base`, refused for a directory).
pub(crate) fn load_base(model_dir: &Path, dequantize: bool) -> CliResult<LlamaModel> {
    if lm::gguf_model::is_gguf_file(model_dir) {
        let source = lm::gguf_model::GgufModelFile::open(model_dir)?;
        let base = if dequantize {
            lm::gguf_model::GgufBase::Dequantized
        } else {
            lm::gguf_model::GgufBase::Blocks
        };
        return Ok(source.load(base)?);
    }
    if dequantize {
        return Err(CliError::Usage(format!(
            "--dequantize-base: {} is not a GGUF file (a directory's weights load as stored)",
            model_dir.display()
        )));
    }
    Ok(LlamaModel::from_pretrained(model_dir)?)
}

/// The student: the base (quantized for qlora) with a fresh adapter seeded by the run's seed,
/// or the one in `--init-adapter`.
fn build_student(
    args: &TrainArgs,
    model_dir: &Path,
    config: &TrainConfig,
) -> CliResult<LlamaModel> {
    let mut model = load_base(model_dir, args.dequantize_base)?;
    let lora = lora_config(args);
    let seed = config.seed;
    let dense_base = model.linear_modules_mut().all(|(_, lin)| lin.is_dense());
    match args.adapter_type {
        AdapterType::Lora | AdapterType::Dora => match &args.init_adapter {
            Some(dir) => model.load_adapter(dir, ADAPTER_NAME, seed)?,
            None => model.inject_adapters(&lora, ADAPTER_NAME, seed)?,
        },
        AdapterType::Qlora => {
            let qat = qat_config(args)?;
            if dense_base && qat.quantizer == QuantizerKind::Nf4 {
                // bitsandbytes' NF4 base: the adapters below become QLoRA layers.
                model.quantize_linears_nf4(&Nf4Options::default())?;
            }
            match (
                &args.init_adapter,
                dense_base && qat.quantizer != QuantizerKind::Nf4,
            ) {
                (Some(dir), false) => model.load_adapter(dir, ADAPTER_NAME, seed)?,
                (None, false) => model.inject_adapters(&lora, ADAPTER_NAME, seed)?,
                (None, true) => model.inject_qat_adapters(
                    &lora,
                    &qat,
                    QatMode::FrozenQuantizedBase,
                    ADAPTER_NAME,
                    seed,
                )?,
                (Some(_), true) => {
                    return Err(CliError::Usage(
                        "--init-adapter with --adapter-type qlora needs --quantizer nf4 (or a \
                         bnb-4bit model directory)"
                            .into(),
                    ))
                }
            }
        }
        AdapterType::LoraQat => match &args.init_adapter {
            Some(dir) if dir.join(lm::qat::QAT_STATE_FILE).is_file() => {
                model.load_qat_adapter(dir, ADAPTER_NAME)?
            }
            Some(dir) => {
                return Err(CliError::Usage(format!(
                    "--init-adapter {} has no {} (the quantizer steps a LoRA-QAT run saves); \
                     continue a plain LoRA adapter with --adapter-type lora",
                    dir.display(),
                    lm::qat::QAT_STATE_FILE
                )))
            }
            None => model.inject_qat_adapters(
                &lora,
                &qat_config(args)?,
                QatMode::QuantizeMerged,
                ADAPTER_NAME,
                seed,
            )?,
        },
    };
    Ok(model)
}

/// A progress bar over optimizer steps showing the latest loss and the run's tokens/s (the
/// bar's template adds the ETA).
struct Progress {
    bar: ProgressBar,
    tokens: usize,
    seconds: f64,
}

impl MetricsCallback for Progress {
    fn on_step(&mut self, m: &StepMetrics) -> qat_train::Result<()> {
        self.tokens += m.tokens;
        self.seconds += m.seconds;
        self.bar.set_position(m.step);
        let rate = if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        };
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {rate:.0} tok/s",
            m.total_loss, m.lr
        ));
        Ok(())
    }
    fn on_eval(&mut self, m: &EvalMetrics) -> qat_train::Result<()> {
        self.bar.println(format!(
            "step {}: validation loss {:.4}",
            m.step, m.total_loss
        ));
        Ok(())
    }
    fn on_end(&mut self) -> qat_train::Result<()> {
        self.bar.finish();
        Ok(())
    }
}

/// Runs the training on this process's rank (one process, or one of `mpirun -np N`).
pub fn run(args: &TrainArgs) -> CliResult {
    let ranks = super::distributed::Ranks::start(args.collective_timeout)?;
    let result = run_rank(args, &ranks);
    ranks.finish(result)
}

/// Every rank builds the same trainer; rank 0 alone writes files and shows progress.
fn run_rank(args: &TrainArgs, ranks: &super::distributed::Ranks) -> CliResult {
    let root = ranks.rank() == 0;
    let checkpoint = args.out.join(CHECKPOINT_FILE);
    if args.resume && !checkpoint.is_file() {
        return Err(file_error(
            &checkpoint,
            "--resume needs the checkpoint of an earlier run in --out",
        ));
    }
    let config = effective_config(args)?;
    let model_dir = resolve_model_arg(&args.model, args.revision.as_deref())?;
    if root {
        std::fs::create_dir_all(&args.out).map_err(|e| file_error(&args.out, e))?;
    }
    let mut train = read_dataset(&args.data, &model_dir)?;
    let mut validation = args
        .validation
        .as_ref()
        .map(|p| read_dataset(p, &model_dir))
        .transpose()?;
    if let Some(fraction) = args.validation_split {
        let (t, v) = train.split(fraction, config.seed)?;
        (train, validation) = (t, Some(v));
    }
    if args.packing {
        let len = config.max_len.ok_or_else(|| {
            CliError::Usage("--packing needs --max-seq-len (the packed length)".into())
        })?;
        train = train.packed(len)?;
        validation = validation.map(|v| v.packed(len)).transpose()?;
    }
    let student = build_student(args, &model_dir, &config)?;
    let teacher = args
        .teacher
        .as_ref()
        .map(|t| resolve_model_arg(t, None))
        .transpose()?
        .map(LlamaModel::open)
        .transpose()?;
    let mut trainer = Trainer::new(config.clone(), student, teacher, train, validation)?;
    trainer.set_collective(ranks.collective())?;
    let metrics_path = args.out.join(METRICS_FILE);
    if args.resume {
        trainer.load_checkpoint(&checkpoint)?;
        if let Some(steps) = args.max_steps {
            trainer.set_total_steps(steps)?;
        }
    }
    if !root {
        // The same steps as rank 0, which reports them and writes every file.
        trainer.train(&mut [], Some(&checkpoint))?;
        return Ok(());
    }
    let mut csv = if args.resume {
        CsvMetricsWriter::resume(&metrics_path, trainer.step_count())?
    } else {
        CsvMetricsWriter::create(&metrics_path)?
    };
    let config_text = serde_json::to_string_pretty(&config)
        .map_err(|e| file_error(&args.out.join(CONFIG_FILE), e))?;
    quant_core::io::write_atomic(&args.out.join(CONFIG_FILE), config_text.as_bytes())?;

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(trainer.total_steps())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}, ETA {eta_precise}] {msg}",
        )
        .map_err(|e| CliError::Usage(e.to_string()))?,
    );
    bar.set_position(trainer.step_count());
    let mut progress = Progress {
        bar,
        tokens: 0,
        seconds: 0.0,
    };
    let mut log = MetricsLog::default();
    let summary = trainer.train(&mut [&mut csv, &mut progress, &mut log], Some(&checkpoint))?;
    write_loss_curve(&args.out.join(LOSS_CURVE_FILE), &log)?;
    trainer.save_adapter_as(&args.out.join(ADAPTER_DIR), ADAPTER_NAME, args.save_dtype)?;
    if trainer.quantized_layers() > 0 && args.adapter_type == AdapterType::LoraQat {
        trainer.export_quantized(&args.out.join(QUANTIZED_FILE))?;
    }
    if !args.quiet {
        eprintln!(
            "trained {} steps{}; adapter in {}",
            summary.steps,
            if summary.stopped_early {
                " (stopped early)"
            } else {
                ""
            },
            args.out.join(ADAPTER_DIR).display()
        );
        if ranks.size() > 1 {
            eprintln!("data-parallel over {} ranks", ranks.size());
        }
    }
    Ok(())
}

/// The training loss per step and the validation loss at each evaluation of this run, as a
/// PNG (the demo's plotting code).
pub(crate) fn write_loss_curve(path: &Path, log: &MetricsLog) -> CliResult {
    let train: Vec<(f64, f64)> = log
        .steps
        .iter()
        .map(|m| (m.step as f64, m.total_loss))
        .collect();
    let validation: Vec<(f64, f64)> = log
        .evals
        .iter()
        .map(|m| (m.step as f64, m.total_loss))
        .collect();
    let mut curves = vec![("train".to_string(), train)];
    if !validation.is_empty() {
        curves.push(("validation".to_string(), validation));
    }
    lora_qat::demo::report::plot_loss_curves(path, &[("loss".to_string(), curves)])?;
    Ok(())
}
