//! `lora-qat bench train`: forward + backward training throughput of LoRA on a random Llama.

use std::time::Instant;

use clap::Args;
use lm::{LlamaConfig, LlamaModel, LAYER_LINEAR_NAMES};
use lora_core::LoraConfig;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Print one JSON object per line: {"bench", "tokens_per_s", "ms_per_step", "runs"}.
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
    /// Attention heads (key/value heads are the same number).
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
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
}

/// The measured sizes, after `--small`.
struct Sizes {
    batch: usize,
    seq: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
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
    let mut config = LlamaConfig::new(
        s.vocab,
        s.hidden,
        s.intermediate,
        s.layers,
        s.heads,
        s.heads,
    )?;
    config.max_position_embeddings = config.max_position_embeddings.max(s.seq);
    let mut model = LlamaModel::random(config, 0)?;
    if args.qlora {
        model.quantize_linears_nf4(&lora_core::Nf4Options::default())?;
    }
    let targets: Vec<&str> = LAYER_LINEAR_NAMES
        .iter()
        .map(|path| path.rsplit('.').next().unwrap_or(path))
        .collect();
    let lora = LoraConfig::new(s.rank, 2.0 * s.rank as f64, &targets);
    model.inject_adapters(&lora, "default", 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids =
        Array2::from_shape_simple_fn((s.batch, s.seq), || rng.random_range(0..s.vocab as u32));
    let labels = ids.mapv(i64::from);
    let mut step = || -> CliResult<f64> {
        let start = Instant::now();
        model.zero_grad();
        model.loss_and_backward(ids.view(), labels.view(), None)?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    step()?;
    let mut times = (0..args.runs)
        .map(|_| step())
        .collect::<CliResult<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    let ms_per_step = times[times.len() / 2];
    let tokens_per_s = (s.batch * s.seq) as f64 / (ms_per_step / 1e3);
    let kind = if args.qlora { "qlora" } else { "lora" };
    let bench = format!("train_{kind}_r{}", s.rank);
    let memory = model.memory_report();
    let qlora_bytes = memory.qlora_bytes_per_parameter();
    if args.json {
        let mut record = serde_json::json!({
            "bench": bench,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": ms_per_step,
            "runs": args.runs,
        });
        if let Some(bytes) = qlora_bytes {
            record["bytes_per_quantized_parameter"] = serde_json::json!(bytes);
        }
        println!("{record}");
    } else {
        println!(
            "{:<18} {:>14} {:>12} {:>6}",
            "bench", "tokens/s", "ms/step", "runs"
        );
        println!(
            "{:<18} {:>14.1} {:>12.2} {:>6}",
            bench, tokens_per_s, ms_per_step, args.runs
        );
        println!(
            "(random Llama: width {}, {} layers, {} heads, MLP {}, vocab {}; batch {} × seq {}; \
             LoRA r={} on q/k/v/o/gate/up/down{}; forward + loss + backward, median step)",
            s.hidden,
            s.layers,
            s.heads,
            s.intermediate,
            s.vocab,
            s.batch,
            s.seq,
            s.rank,
            if args.qlora { " over NF4 bases" } else { "" }
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
