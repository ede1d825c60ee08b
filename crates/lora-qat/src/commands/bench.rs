//! `lora-qat bench`: time the library's kernels on this machine and print a table or JSON
//! lines. The numbers the project reports come from criterion (`cargo xtask bench`); this
//! command is the quick check a user runs on their own machine.

use std::time::Instant;

use clap::{Args, Subcommand};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use quant_core::hadamard::fwht;
use quant_core::nf4::{FourBitTensor, FourBitType};

use lora_core::config::InitLoraWeights;
use lora_core::qat::{LoraQatLinear, QatMode};
use lora_core::qlora::Nf4Options;
use lora_core::QLoraLinear;
use lora_core::{AdapterOptions, LoraLinear};
use ndarray::Array2;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;

use super::{CliError, CliResult};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// NF4 quantize and dequantize (double quant) of a 4096×4096 f32 matrix, and the
    /// Walsh–Hadamard transform of a 4096-vector.
    Quant(BenchQuantArgs),
    /// GFLOP/s of the GEMM entry point (f32 and every bf16 kernel this CPU runs) on one
    /// shape, 512×2048×2048 by default.
    Gemm(super::bench_gemm::BenchGemmArgs),
    /// Forward + backward (input gradient included) of one adapted linear layer: LoRA over
    /// an f32 base, QLoRA over an NF4 base (blocksize 64, double quant), and LoRA-QAT
    /// (3-bit uniform LSQ, per-channel steps, quantizing W + s·B·A).
    Layer(BenchLayerArgs),
    /// Forward + backward training throughput of LoRA (r=16 on every projection) on a random
    /// Llama (width 512, 8 layers, 8 heads, vocab 4096, seq 256), in tokens per second.
    Train(super::bench_train::BenchTrainArgs),
    /// Peak resident memory (VmHWM) of the streaming merge of a LoRA adapter into a random
    /// Llama, against the model's size on disk.
    Merge(super::bench_merge::BenchMergeArgs),
}

#[derive(Debug, Args)]
pub struct BenchLayerArgs {
    /// Tokens (rows of x).
    #[arg(long, default_value_t = 512)]
    pub m: usize,
    /// in_features = out_features.
    #[arg(long, default_value_t = 2048)]
    pub d: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// Timed runs of each benchmark (after one warm-up run).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Print one JSON object per line: {"bench": ..., "ms": <median>, "runs": <n>}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchQuantArgs {
    /// Print one JSON object per line: {"bench": ..., "ms": <median>, "runs": <n>}.
    #[arg(long)]
    pub json: bool,
    /// Timed runs of each matrix benchmark (the Hadamard one runs 1000× as many).
    #[arg(long, default_value_t = 15)]
    pub runs: usize,
}

pub fn run(cmd: &BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Quant(args) => bench_quant(args),
        BenchCommand::Layer(args) => bench_layer(args),
        BenchCommand::Gemm(args) => super::bench_gemm::run(args),
        BenchCommand::Train(args) => super::bench_train::run(args),
        BenchCommand::Merge(args) => super::bench_merge::run(args),
    }
}

/// One measured benchmark.
struct Timing {
    bench: &'static str,
    median_ms: f64,
    runs: usize,
}

/// One measured layer benchmark, with its CPU time.
struct LayerTiming {
    bench: &'static str,
    median_ms: f64,
    cpu_ms: Option<f64>,
}

/// Median wall time of `runs` calls after one warm-up call.
pub(crate) fn time_median(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// CPU time used so far by every thread of this process, in ns, from Linux's
/// `/proc/self/task/*/schedstat` (`None` where that does not exist). On a machine shared with
/// other work the wall time of a run includes waiting for a core; its CPU time does not, so
/// the benches print both.
pub(crate) fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// [`time_median`] plus the mean CPU time of one call (warm-up included), in ms.
pub(crate) fn time_median_cpu(runs: usize, f: impl FnMut()) -> (f64, Option<f64>) {
    let before = process_cpu_ns();
    let wall = time_median(runs, f);
    let cpu = before
        .zip(process_cpu_ns())
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6 / (runs.max(1) + 1) as f64);
    (wall, cpu)
}

fn bench_quant(args: &BenchQuantArgs) -> CliResult {
    const N: usize = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
    let weights: Vec<f32> = (0..N * N).map(|_| normal.sample(&mut rng)).collect();
    let shape = [N, N];

    let quantize = || FourBitTensor::quantize(&weights, &shape, 64, FourBitType::Nf4, true);
    let q = quantize()?;
    let quantize_ms = time_median(args.runs, || {
        std::hint::black_box(quantize().expect("quantized once already"));
    });
    let mut out = vec![0.0f32; N * N];
    let dequantize_ms = time_median(args.runs, || {
        q.dequantize_into(&mut out)
            .expect("buffer sized to the tensor");
        std::hint::black_box(&out);
    });
    let mut v: Vec<f32> = weights[..N].to_vec();
    let hadamard_runs = args.runs * 1000;
    let hadamard_ms = time_median(hadamard_runs, || {
        fwht(&mut v).expect("power-of-two length");
        std::hint::black_box(&v);
    });

    let timings = [
        Timing {
            bench: "nf4_quantize_4096",
            median_ms: quantize_ms,
            runs: args.runs,
        },
        Timing {
            bench: "nf4_dequantize_4096",
            median_ms: dequantize_ms,
            runs: args.runs,
        },
        Timing {
            bench: "hadamard_4096",
            median_ms: hadamard_ms,
            runs: hadamard_runs,
        },
    ];
    if args.json {
        for t in &timings {
            println!(
                "{}",
                serde_json::json!({"bench": t.bench, "ms": t.median_ms, "runs": t.runs})
            );
        }
    } else {
        println!("{:<22} {:>12} {:>8}", "bench", "median ms", "runs");
        for t in &timings {
            println!("{:<22} {:>12.4} {:>8}", t.bench, t.median_ms, t.runs);
        }
        println!(
            "(4096×4096 f32 weights ~ N(0, 0.02²); NF4, blocksize 64, double quant; \
             bitsandbytes 0.50 on this machine class: quantize 509 ms, dequantize 39.5 ms)"
        );
    }
    Ok(())
}

/// A `(rows, cols)` matrix of N(0, std²) values from `rng`.
fn normal_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize, std: f32) -> Array2<f32> {
    let normal = Normal::new(0.0f32, std).expect("a positive standard deviation");
    Array2::from_shape_fn((rows, cols), |_| normal.sample(rng))
}

fn bench_layer(args: &BenchLayerArgs) -> CliResult {
    let (m, d, r) = (args.m, args.d, args.r);
    if m == 0 || d == 0 || r == 0 || r > d {
        return Err(CliError::Usage(format!(
            "bench layer needs m, d, r > 0 and r <= d (got m = {m}, d = {d}, r = {r})"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let weight = normal_matrix(&mut rng, d, d, 0.02);
    let x = normal_matrix(&mut rng, m, d, 1.0);
    let dy = normal_matrix(&mut rng, m, d, 1.0);
    let mut options = AdapterOptions::new(r, 2.0 * r as f64);
    // Non-zero B so that every product of the adapter path does real work.
    options.init = InitLoraWeights::Random;

    let mut lora = LoraLinear::dense(weight.clone(), None, "bench.lora")?;
    lora.add_adapter("default", &options, 1)?;
    let mut qlora = QLoraLinear::qlora(weight.view(), None, &Nf4Options::default(), "bench.qlora")?;
    qlora.add_adapter("default", &options, 1)?;
    let qat_config = QatConfig {
        quantizer: QuantizerKind::Uniform,
        bits: 3,
        granularity: Granularity::PerChannel,
        ste: Ste::Lsq,
        pi_k: None,
        symmetric: true,
        incoherence: None,
        init: InitMethod::MseClipSearch,
        double_quant: false,
    };
    let mut qat = LoraQatLinear::new(
        weight,
        None,
        &options,
        &qat_config,
        QatMode::QuantizeMerged,
        1,
        "bench.lora_qat",
    )?;

    let mut failure: Option<CliError> = None;
    let mut record = |result: Result<(), lora_core::LoraError>| {
        if let Err(e) = result {
            failure.get_or_insert(e.into());
        }
    };
    let (lora_ms, lora_cpu) = time_median_cpu(args.runs, || {
        record(lora.forward(x.view()).and_then(|y| {
            std::hint::black_box(&y);
            lora.backward(dy.view())
                .map(|dx| drop(std::hint::black_box(dx)))
        }))
    });
    let (qlora_ms, qlora_cpu) = time_median_cpu(args.runs, || {
        record(qlora.forward(x.view()).and_then(|y| {
            std::hint::black_box(&y);
            qlora
                .backward(dy.view())
                .map(|dx| drop(std::hint::black_box(dx)))
        }))
    });
    let (qat_ms, qat_cpu) = time_median_cpu(args.runs, || {
        record(qat.forward(x.view()).and_then(|y| {
            std::hint::black_box(&y);
            qat.backward(dy.view())
                .map(|dx| drop(std::hint::black_box(dx)))
        }))
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let timings = [
        LayerTiming {
            bench: "lora_fwd_bwd",
            median_ms: lora_ms,
            cpu_ms: lora_cpu,
        },
        LayerTiming {
            bench: "qlora_fwd_bwd",
            median_ms: qlora_ms,
            cpu_ms: qlora_cpu,
        },
        LayerTiming {
            bench: "lora_qat_fwd_bwd",
            median_ms: qat_ms,
            cpu_ms: qat_cpu,
        },
    ];
    if args.json {
        for t in &timings {
            println!(
                "{}",
                serde_json::json!({"bench": t.bench, "ms": t.median_ms, "cpu_ms": t.cpu_ms, "runs": args.runs})
            );
        }
    } else {
        println!(
            "{:<18} {:>12} {:>10} {:>14} {:>6}",
            "bench", "median ms", "vs LoRA", "cpu ms / run", "runs"
        );
        for t in &timings {
            let cpu = t.cpu_ms.map_or("-".to_string(), |c| format!("{c:.3}"));
            println!(
                "{:<18} {:>12.3} {:>9.2}x {:>14} {:>6}",
                t.bench,
                t.median_ms,
                t.median_ms / lora_ms,
                cpu,
                args.runs
            );
        }
        println!(
            "(m = {m} tokens, in = out = {d}, r = {r}; forward + backward with the input \
             gradient. PyTorch 2.15 on this machine class at 512/2048/16: LoRA 56.6 ms, \
             bitsandbytes NF4 QLoRA 59.8 ms, LSQ 3-bit LoRA-QAT 168 ms)"
        );
    }
    Ok(())
}
