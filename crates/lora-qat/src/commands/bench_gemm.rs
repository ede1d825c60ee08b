//! `lora-qat bench gemm`: GFLOP/s of the GEMM entry point on one shape, `f32` and bf16
//! (every bf16 kernel this CPU runs), for `y = x·Wᵀ` (the layer forward, `W` read through a
//! transposed view) and `y = x·B` with `B` contiguous.

use std::time::Instant;

use clap::Args;
use ndarray::{Array2, ArrayView2};
use quant_core::linalg::{gemm, gemm_bf16_with, Bf16Kernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct BenchGemmArgs {
    /// Rows of x (tokens).
    #[arg(long, default_value_t = 512)]
    pub m: usize,
    /// Inner dimension (in_features).
    #[arg(long, default_value_t = 2048)]
    pub k: usize,
    /// Columns of y (out_features).
    #[arg(long, default_value_t = 2048)]
    pub n: usize,
    /// Timed runs of each product (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Print one JSON object per line: {"bench", "ms", "gflops", "runs"}.
    #[arg(long)]
    pub json: bool,
}

/// Median wall time in ms of `runs` calls after one warm-up call, and the mean CPU time of
/// one call (all threads, warm-up included) where the OS reports it.
fn time_median(
    runs: usize,
    mut f: impl FnMut() -> CliResult,
) -> Result<(f64, Option<f64>), CliError> {
    let cpu_before = super::bench::process_cpu_ns();
    f()?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let cpu = cpu_before
        .zip(super::bench::process_cpu_ns())
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6 / (runs.max(1) + 1) as f64);
    Ok((times[times.len() / 2], cpu))
}

pub fn run(args: &BenchGemmArgs) -> CliResult {
    let (m, k, n) = (args.m, args.k, args.n);
    if m == 0 || k == 0 || n == 0 {
        return Err(CliError::Usage(format!(
            "bench gemm needs m, k, n > 0 (got m = {m}, k = {k}, n = {n})"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut random = |rows: usize, cols: usize| {
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
    };
    let x = random(m, k);
    let w = random(n, k); // (out, in): y = x·Wᵀ
    let b = random(k, n);
    let mut y = Array2::<f32>::zeros((m, n));
    let flops = 2.0 * (m * n * k) as f64;

    let mut rows: Vec<(String, (f64, Option<f64>))> = Vec::new();
    let operands: [(&str, ArrayView2<'_, f32>); 2] = [("x_wT", w.t()), ("x_b", b.view())];
    for (label, rhs) in operands {
        let ms = time_median(args.runs, || {
            gemm(1.0, x.view(), rhs, 0.0, y.view_mut())?;
            std::hint::black_box(&y);
            Ok(())
        })?;
        rows.push((format!("f32_{label}"), ms));
        for kernel in Bf16Kernel::available() {
            let ms = time_median(args.runs, || {
                gemm_bf16_with(kernel, 1.0, x.view(), rhs, 0.0, y.view_mut())?;
                std::hint::black_box(&y);
                Ok(())
            })?;
            rows.push((format!("bf16_{}_{label}", kernel.name()), ms));
        }
    }
    if args.json {
        for (bench, (ms, cpu)) in &rows {
            println!(
                "{}",
                serde_json::json!({"bench": bench, "ms": ms, "gflops": flops / ms / 1e6,
                                   "cpu_ms": cpu, "runs": args.runs})
            );
        }
    } else {
        println!(
            "{:<28} {:>10} {:>10} {:>12}",
            "bench", "median ms", "GFLOP/s", "cpu ms/run"
        );
        for (bench, (ms, cpu)) in &rows {
            let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.3}"));
            println!(
                "{bench:<28} {ms:>10.3} {:>10.1} {cpu:>12}",
                flops / ms / 1e6
            );
        }
        println!(
            "(m = {m}, k = {k}, n = {n}; {} rayon threads; bf16 kernels on this CPU: {})",
            rayon::current_num_threads(),
            Bf16Kernel::available()
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
