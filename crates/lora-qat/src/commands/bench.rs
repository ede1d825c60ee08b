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

use super::CliResult;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// NF4 quantize and dequantize (double quant) of a 4096×4096 f32 matrix, and the
    /// Walsh–Hadamard transform of a 4096-vector.
    Quant(BenchQuantArgs),
    /// Forward + backward training throughput of LoRA (r=16 on every projection) on a random
    /// Llama (width 512, 8 layers, 8 heads, vocab 4096, seq 256), in tokens per second.
    Train(super::bench_train::BenchTrainArgs),
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
        BenchCommand::Train(args) => super::bench_train::run(args),
    }
}

/// One measured benchmark.
struct Timing {
    bench: &'static str,
    median_ms: f64,
    runs: usize,
}

/// Median wall time of `runs` calls after one warm-up call.
fn time_median(runs: usize, mut f: impl FnMut()) -> f64 {
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
