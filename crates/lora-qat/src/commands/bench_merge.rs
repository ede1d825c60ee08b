//! `lora-qat bench merge`: peak resident memory of the streaming merge against the size of
//! the model it merges, on a random Llama written to a temporary directory.

use std::time::Instant;

use clap::Args;
use lm::merge::{merge_checkpoint, MergeOptions};
use lm::{LlamaConfig, LlamaModel};
use lora_core::config::InitLoraWeights;
use lora_core::LoraConfig;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct BenchMergeArgs {
    /// Model width (hidden_size).
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// MLP width (intermediate_size).
    #[arg(long, default_value_t = 1536)]
    pub intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// LoRA rank on every projection.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Also re-quantize to NF4 (`--quantize nf4`).
    #[arg(long)]
    pub nf4: bool,
    /// Print one JSON object: {"bench", "model_bytes", "peak_rss_bytes", "baseline_rss_bytes", "seconds"}.
    #[arg(long)]
    pub json: bool,
}

/// `VmHWM` (peak resident set) or `VmRSS` of this process from /proc/self/status, in bytes.
fn proc_status_kb(field: &str) -> CliResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| CliError::File {
        path: "/proc/self/status".into(),
        reason: format!("{e} (peak-memory measurement needs Linux /proc)"),
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| CliError::File {
            path: "/proc/self/status".into(),
            reason: format!("no {field} line"),
        })
}

pub fn run(args: &BenchMergeArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("lora-qat-bench-merge-{}", std::process::id()));
    let result = bench(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(args: &BenchMergeArgs, dir: &std::path::Path) -> CliResult {
    let heads = (args.hidden / 64).max(1);
    let config = LlamaConfig::new(
        args.vocab,
        args.hidden,
        args.intermediate,
        args.layers,
        heads,
        heads,
    )?;
    {
        // Built and saved in memory; dropped before the measurement starts.
        let mut model = LlamaModel::random(config, 0)?;
        model.save_pretrained(dir.join("base"))?;
        let mut lora = LoraConfig::new(
            args.rank,
            2.0 * args.rank as f64,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        );
        lora.init_lora_weights = InitLoraWeights::Random;
        model.inject_adapters(&lora, "default", 1)?;
        model.save_adapter(dir.join("adapter"), "default")?;
    }
    let model_bytes = std::fs::metadata(dir.join("base/model.safetensors"))
        .map_err(|e| CliError::File {
            path: dir.join("base/model.safetensors").display().to_string(),
            reason: e.to_string(),
        })?
        .len();
    // Reset the high-water mark to the current RSS (Linux ≥ 4.0), so the peak is the merge's.
    std::fs::write("/proc/self/clear_refs", "5").map_err(|e| CliError::File {
        path: "/proc/self/clear_refs".into(),
        reason: format!("cannot reset the peak RSS: {e}"),
    })?;
    let baseline = proc_status_kb("VmRSS:")?;
    let start = Instant::now();
    let options = MergeOptions {
        quantize_nf4: args.nf4,
        ..MergeOptions::default()
    };
    merge_checkpoint(
        &dir.join("base"),
        Some(&dir.join("adapter")),
        &dir.join("merged"),
        &options,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = proc_status_kb("VmHWM:")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": if args.nf4 { "merge_nf4" } else { "merge" },
                "model_bytes": model_bytes,
                "peak_rss_bytes": peak,
                "baseline_rss_bytes": baseline,
                "seconds": seconds,
            })
        );
    } else {
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "merge{}: model {:.1} MB; peak RSS {:.1} MB ({:.1} MB above the {:.1} MB before the \
             merge, {:.0}% of the model); {:.2} s",
            if args.nf4 { " --quantize nf4" } else { "" },
            mb(model_bytes),
            mb(peak),
            mb(peak.saturating_sub(baseline)),
            mb(baseline),
            100.0 * peak.saturating_sub(baseline) as f64 / model_bytes as f64,
            seconds
        );
    }
    Ok(())
}
