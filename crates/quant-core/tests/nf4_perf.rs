//! Timing of 4096×4096 NF4 quantization (double quant) and dequantization. Ignored by default:
//! `cargo test --release -p quant-core --test nf4_perf -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use quant_core::nf4::{FourBitTensor, FourBitType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
#[ignore = "timing; run explicitly in release"]
fn time_4096x4096_nf4_double_quant() {
    let n = 4096 * 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let runs = 7;
    let mut q = None;
    let quantize: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            q = Some(
                FourBitTensor::quantize(&w, &[4096, 4096], 64, FourBitType::Nf4, true).unwrap(),
            );
            t.elapsed()
        })
        .collect();
    let q = q.unwrap();
    let mut out = vec![0.0f32; n];
    let dequantize: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            q.dequantize_into(&mut out).unwrap();
            t.elapsed()
        })
        .collect();
    let mut tile = vec![0.0f32; 64 * 4096];
    let rows: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for r in (0..4096).step_by(64) {
                q.dequantize_rows(r, r + 64, &mut tile).unwrap();
            }
            t.elapsed()
        })
        .collect();
    println!(
        "4096x4096 NF4 dq: quantize median {:?} (all {:?}), dequantize_into median {:?} (all {:?}), \
         dequantize_rows 64-row tiles serial median {:?}, threads {}",
        median(quantize.clone()),
        quantize,
        median(dequantize.clone()),
        dequantize,
        median(rows),
        rayon::current_num_threads()
    );
}

#[test]
#[ignore = "timing; run explicitly in release"]
fn time_pieces() {
    let n = 4096 * 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for _ in 0..3 {
        let t = Instant::now();
        quant_core::error::check_finite("w", &w).unwrap();
        let finite = t.elapsed();
        let t = Instant::now();
        let _ = FourBitTensor::quantize(&w, &[4096, 4096], 64, FourBitType::Nf4, false).unwrap();
        let plain = t.elapsed();
        let t = Instant::now();
        let _ = FourBitTensor::quantize(&w, &[4096, 4096], 64, FourBitType::Fp4, false).unwrap();
        let fp4 = t.elapsed();
        let absmax: Vec<f32> = w[..262144].iter().map(|v| v.abs() + 0.5).collect();
        let t = Instant::now();
        let _ = quant_core::nf4::DoubleQuantAbsmax::quantize(&absmax).unwrap();
        let dq = t.elapsed();
        let t = Instant::now();
        let _ = quant_core::nf4::torch_cpu_mean_f32(&absmax);
        let mean = t.elapsed();
        println!("check_finite {finite:?} plain nf4 {plain:?} plain fp4 {fp4:?} dq of 262144 {dq:?} mean {mean:?}");
    }
}
