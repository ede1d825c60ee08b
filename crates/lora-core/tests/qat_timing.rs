//! Timing breakdown of the LoRA-QAT step at 512×2048×2048 (ignored: run with
//! `cargo test --release -p lora-core --test qat_timing -- --ignored --nocapture`).

use std::time::Instant;

use lora_core::base::FrozenBase;
use lora_core::qlora::{Nf4Base, Nf4Options};
use ndarray::Array2;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::linalg::gemm;
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

#[test]
#[ignore]
fn quantizer_and_gemm_breakdown() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let d = 2048;
    let w = Array2::from_shape_fn((d, d), |_| rng.random_range(-0.05f32..0.05));
    let x = Array2::from_shape_fn((512, d), |_| rng.random_range(-1.0f32..1.0));
    for kind in [
        QuantizerKind::Uniform,
        QuantizerKind::Pi,
        QuantizerKind::Nf4,
    ] {
        let config = QatConfig {
            quantizer: kind,
            bits: if kind == QuantizerKind::Nf4 { 4 } else { 3 },
            granularity: Granularity::PerChannel,
            ste: Ste::Lsq,
            pi_k: (kind == QuantizerKind::Pi).then_some(3),
            symmetric: true,
            incoherence: None,
            init: InitMethod::Absmax,
            double_quant: false,
        };
        let mut q = config.build().unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let fwd = median(|| {
            std::hint::black_box(q.forward(w.view()).unwrap());
        });
        let bwd = median(|| {
            std::hint::black_box(q.backward(w.view()).unwrap());
        });
        println!("{kind:?} 4M weights: forward {fwd:.2} ms, backward {bwd:.2} ms");
    }
    let mut y = Array2::zeros((512, d));
    let g = median(|| gemm(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap());
    println!("gemm 512x2048x2048: {g:.2} ms");
    let mut gw = Array2::zeros((d, d));
    let g2 = median(|| gemm(1.0, y.t(), x.view(), 0.0, gw.view_mut()).unwrap());
    println!("gemm dW = dyᵀ·x: {g2:.2} ms");
    let c = median(|| {
        std::hint::black_box(w.clone());
    });
    println!("16 MB clone: {c:.2} ms");
}

#[test]
#[ignore]
fn nf4_tiling_sweep() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let d = 2048;
    let w = Array2::from_shape_fn((d, d), |_| rng.random_range(-0.05f32..0.05));
    let x = Array2::from_shape_fn((512, d), |_| rng.random_range(-1.0f32..1.0));
    let mut base = Nf4Base::quantize(w.view(), None, &Nf4Options::default(), "sweep").unwrap();
    let mut y = Array2::zeros((512, d));
    let mut dx = Array2::zeros((512, d));
    let mut dense = Array2::zeros((512, d));
    let g = median(|| gemm(1.0, x.view(), w.t(), 0.0, dense.view_mut()).unwrap());
    println!("dense x·Wᵀ: {g:.2} ms");
    for parallel in [true, false] {
        for tile in [64, 128, 256, 512] {
            base.set_tiling(tile, parallel).unwrap();
            let f = median(|| base.matmul_into(x.view(), y.view_mut()).unwrap());
            let b = median(|| {
                base.matmul_transposed_into(x.view(), 0.0, dx.view_mut())
                    .unwrap()
            });
            println!("parallel {parallel} tile {tile}: x·Wᵀ {f:.2} ms, dy·W {b:.2} ms");
        }
    }
}
