//! `lora-qat bench train`: training throughput of LoRA (forward, loss, backward and the AdamW
//! step, as PyTorch's `opt.step()` in `tools/interop/bench_compare.py`) on a random Llama,
//! or (`--model FILE.gguf`) on a llama.cpp model over its quantized blocks (`--dequantize-base`:
//! over its weights decoded to f32), with the resident memory.

use std::time::Instant;

use clap::Args;
use lm::{LlamaConfig, LlamaModel};
use lora_core::LoraConfig;
use ndarray::Array2;
use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
use qat_train::trainer::TrainableParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Print one JSON object per line: {"bench", "tokens_per_s", "ms_per_step", "runs",
    /// "cpu_ms_per_step", "batch", "seq", "gradient_checkpointing", "compute_dtype",
    /// "peak_rss_bytes"}
    /// (+ "profile_ms_per_step" with --profile).
    #[arg(long)]
    pub json: bool,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Model width (hidden_size).
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// MLP width (intermediate_size); default ≈ 8/3 of the width rounded up to 64, as Llama.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; must divide --heads); default --heads.
    /// SmolLM2-135M's shape: --hidden 576 --intermediate 1536 --layers 30 --heads 9
    /// --kv-heads 3 --vocab 49152.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    /// LoRA rank on every projection (alpha = 2·rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// A tiny model (width 32, 2 layers, 4 heads, vocab 64, batch 2, seq 16, rank 4) for
    /// quick checks; overrides the size options.
    #[arg(long)]
    pub small: bool,
    /// QLoRA: quantize every projection to NF4 (blocksize 64, double quantization) before
    /// adding the adapters, and print the resident bytes per quantized base parameter.
    #[arg(long)]
    pub qlora: bool,
    /// Train over this GGUF model instead of a random Llama (its sizes replace the size
    /// options; --batch, --seq, --rank and --runs apply): the projections stay in the file's
    /// quantized blocks as frozen bases, and the report adds the base's resident bytes, the
    /// file's tensor bytes and the process's peak resident memory.
    #[arg(long, value_name = "FILE.gguf", conflicts_with_all = ["small", "qlora", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"])]
    pub model: Option<std::path::PathBuf>,
    /// With --model: decode the projections to dense f32 first (the f32 figure to compare).
    #[arg(long, requires = "model")]
    pub dequantize_base: bool,
    /// Also print the wall time of each kind of operation per timed step (GEMM-backed
    /// projections, attention, RMSNorm, RoPE, SwiGLU, LM head, loss, ...; see `lm::profile`)
    /// and what is left (residual additions, copies, allocation, checks).
    #[arg(long)]
    pub profile: bool,
    /// Gradient checkpointing: keep only each decoder layer's input in the forward and
    /// recompute the layer in backward (the bench name gets `_ckpt`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Precision of the matrix products: f32, or bf16 (operands rounded to bf16, sums in
    /// f32, as PyTorch's CPU autocast; weights, norms, softmax and loss stay f32; the bench
    /// name gets `_bf16`).
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: quant_core::linalg::ComputeDtype,
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Mean milliseconds per step of every `lm::profile` kind, then the rest of the step.
fn profile_rows(times: &[f64], runs: usize) -> Vec<(String, f64)> {
    let runs = runs.max(1) as f64;
    let mut rows: Vec<(String, f64)> = lm::profile::take()
        .into_iter()
        .map(|(op, d)| (op.label().to_string(), d.as_secs_f64() * 1e3 / runs))
        .collect();
    let step = times.iter().sum::<f64>() / runs;
    let timed: f64 = rows.iter().map(|(_, ms)| ms).sum();
    rows.push((
        "other (residuals, copies, allocs, checks)".into(),
        (step - timed).max(0.0),
    ));
    rows
}

/// The measured sizes, after `--small`.
struct Sizes {
    batch: usize,
    seq: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    rank: usize,
}

fn sizes(args: &BenchTrainArgs) -> Sizes {
    if args.small {
        return Sizes {
            batch: 2,
            seq: 16,
            hidden: 32,
            intermediate: 64,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            vocab: 64,
            rank: 4,
        };
    }
    let intermediate = args
        .intermediate
        .unwrap_or_else(|| (args.hidden * 8 / 3).div_ceil(64) * 64);
    Sizes {
        batch: args.batch,
        seq: args.seq,
        hidden: args.hidden,
        intermediate,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads.unwrap_or(args.heads),
        vocab: args.vocab,
        rank: args.rank,
    }
}

pub fn run(args: &BenchTrainArgs) -> CliResult {
    let s = sizes(args);
    if s.batch == 0 || s.seq == 0 || args.runs == 0 {
        return Err(CliError::Usage(
            "--batch, --seq and --runs must be at least 1".into(),
        ));
    }
    let mut gguf_bytes = None;
    let mut model = match &args.model {
        Some(path) => {
            let source = lm::gguf_model::GgufModelFile::open(path)?;
            gguf_bytes = Some(source.tensor_bytes());
            let base = if args.dequantize_base {
                lm::gguf_model::GgufBase::Dequantized
            } else {
                lm::gguf_model::GgufBase::Blocks
            };
            let model = source.load(base)?;
            if s.seq > model.config().max_position_embeddings {
                return Err(CliError::Usage(format!(
                    "--seq {}: the model has {} positions",
                    s.seq,
                    model.config().max_position_embeddings
                )));
            }
            model
        }
        None => {
            let mut config = LlamaConfig::new(
                s.vocab,
                s.hidden,
                s.intermediate,
                s.layers,
                s.heads,
                s.kv_heads,
            )?;
            config.max_position_embeddings = config.max_position_embeddings.max(s.seq);
            let mut model = LlamaModel::random(config, 0)?;
            if args.qlora {
                model.quantize_linears_nf4(&lora_core::Nf4Options::default())?;
            }
            model
        }
    };
    let vocab = model.config().vocab_size;
    let names = model.config().architecture.linear_names();
    let targets: Vec<&str> = names
        .iter()
        .map(|path| path.rsplit('.').next().unwrap_or(path))
        .collect();
    let lora = LoraConfig::new(s.rank, 2.0 * s.rank as f64, &targets);
    model.inject_adapters(&lora, "default", 0)?;
    model.set_gradient_checkpointing(args.gradient_checkpointing);
    model.set_compute_dtype(args.compute_dtype);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids = Array2::from_shape_simple_fn((s.batch, s.seq), || rng.random_range(0..vocab as u32));
    let labels = ids.mapv(i64::from);
    // The optimizer PyTorch's side runs (lr 1e-4, no weight decay), so a step is the same work.
    let mut optimizer = AdamW::new(AdamWConfig::default(), ParamGroups::single(1e-4, 0.0)?)?;
    let mut step = || -> CliResult<f64> {
        let start = Instant::now();
        model.zero_grad();
        model.loss_and_backward(ids.view(), labels.view(), None)?;
        let timer = lm::profile::scope(lm::profile::Op::Optimizer);
        optimizer.step(&mut TrainableParams(&mut model), 1.0)?;
        drop(timer);
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    step()?;
    lm::profile::set_enabled(args.profile);
    let _ = lm::profile::take();
    let cpu_before = super::bench::process_cpu_ns();
    let times = (0..args.runs)
        .map(|_| step())
        .collect::<CliResult<Vec<f64>>>();
    lm::profile::set_enabled(false);
    // CPU time of all threads per step: unlike the wall time, it does not grow while the
    // process waits for a core on a shared machine.
    let cpu_ms_per_step = cpu_before
        .zip(super::bench::process_cpu_ns())
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6 / args.runs as f64);
    let mut times = times?;
    let profile = profile_rows(&times, args.runs);
    times.sort_by(f64::total_cmp);
    let ms_per_step = times[times.len() / 2];
    let tokens_per_s = (s.batch * s.seq) as f64 / (ms_per_step / 1e3);
    let kind = match (&args.model, args.dequantize_base) {
        (Some(_), false) => "gguf",
        (Some(_), true) => "gguf_f32",
        (None, _) if args.qlora => "qlora",
        (None, _) => "lora",
    };
    // f32 rows keep their names; bf16 rows get `_bf16`.
    let dtype_suffix = match args.compute_dtype {
        quant_core::linalg::ComputeDtype::F32 => String::new(),
        dtype => format!("_{}", dtype.name()),
    };
    let bench = format!(
        "train_{kind}_r{}{}{dtype_suffix}",
        s.rank,
        if args.gradient_checkpointing {
            "_ckpt"
        } else {
            ""
        }
    );
    let memory = model.memory_report();
    let qlora_bytes = memory.qlora_bytes_per_parameter();
    if args.json {
        let mut record = serde_json::json!({
            "bench": bench,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": ms_per_step,
            "runs": args.runs,
            "cpu_ms_per_step": cpu_ms_per_step,
            "batch": s.batch,
            "seq": s.seq,
            "gradient_checkpointing": args.gradient_checkpointing,
            "compute_dtype": args.compute_dtype.name(),
            "peak_rss_bytes": peak_rss_bytes(),
        });
        if let Some(bytes) = qlora_bytes {
            record["bytes_per_quantized_parameter"] = serde_json::json!(bytes);
        }
        if args.profile {
            record["profile_ms_per_step"] = serde_json::Value::Object(
                profile
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v).into()))
                    .collect(),
            );
        }
        if let Some(file) = gguf_bytes {
            record["base_bytes"] = serde_json::json!(memory.base_bytes());
            record["base_bytes_by_kind"] = serde_json::json!(memory.base_bytes_by_kind);
            record["file_tensor_bytes"] = serde_json::json!(file);
        }
        println!("{record}");
    } else {
        println!(
            "{:<18} {:>14} {:>12} {:>6} {:>16}",
            "bench", "tokens/s", "ms/step", "runs", "cpu ms/step"
        );
        println!(
            "{:<18} {:>14.1} {:>12.2} {:>6} {:>16}",
            bench,
            tokens_per_s,
            ms_per_step,
            args.runs,
            cpu_ms_per_step.map_or("-".into(), |c| format!("{c:.1}"))
        );
        if args.profile {
            let total: f64 = times.iter().sum::<f64>() / args.runs as f64;
            println!(
                "{:<34} {:>10} {:>7}",
                "operation (mean of the timed steps)", "ms/step", "share"
            );
            for (label, ms) in &profile {
                println!("{label:<34} {ms:>10.2} {:>6.1}%", 100.0 * ms / total);
            }
        }
        if let (Some(path), Some(file)) = (&args.model, gguf_bytes) {
            let c = model.config();
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "({}: {} {} layers, width {}; batch {} × seq {}; LoRA r={} on every \
                 projection{}{}; forward + loss + backward + AdamW step, median step)",
                path.display(),
                c.family(),
                c.num_hidden_layers,
                c.hidden_size,
                s.batch,
                s.seq,
                s.rank,
                if args.dequantize_base {
                    " over the weights decoded to f32"
                } else {
                    " over the file's quantized blocks"
                },
                if args.gradient_checkpointing {
                    "; gradient checkpointing"
                } else {
                    ""
                }
            );
            println!("{memory}");
            println!(
                "file tensor bytes {:.3} MiB; peak resident {}",
                mib(file),
                peak_rss_bytes()
                    .map(|b| format!("{:.1} MiB", mib(b)))
                    .unwrap_or_else(|| "not reported by this OS".into())
            );
            return Ok(());
        }
        println!(
            "(random Llama: width {}, {} layers, {} heads ({} key/value), MLP {}, vocab {}; \
             batch {} × seq {}; LoRA r={} on q/k/v/o/gate/up/down{}{}{}; forward + loss + \
             backward + AdamW step, median step)",
            s.hidden,
            s.layers,
            s.heads,
            s.kv_heads,
            s.intermediate,
            s.vocab,
            s.batch,
            s.seq,
            s.rank,
            if args.qlora { " over NF4 bases" } else { "" },
            if args.gradient_checkpointing {
                "; gradient checkpointing"
            } else {
                ""
            },
            match args.compute_dtype {
                quant_core::linalg::ComputeDtype::F32 => String::new(),
                dtype => format!("; {} products", dtype.name()),
            }
        );
        println!(
            "peak resident {}",
            peak_rss_bytes()
                .map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
                .unwrap_or_else(|| "not reported by this OS".into())
        );
        if let Some(bytes) = qlora_bytes {
            println!(
                "resident bytes per quantized base parameter (NF4 + double quant + adapters): \
                 {bytes:.4}"
            );
        }
    }
    Ok(())
}
