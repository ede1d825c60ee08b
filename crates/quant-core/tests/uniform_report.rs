//! A printed report of reconstruction error, storage cost and wall time of the uniform, Pi and
//! NF4-grid quantizers on Gaussian weights. Ignored by default (it measures, it does not
//! check); run with
//! `cargo test --release -p quant-core --test uniform_report -- --ignored --nocapture`.

use std::time::Instant;

use ndarray::Array2;
use quant_core::nf4_grid::Nf4GridQuantizer;
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
use quant_core::ste::Ste;
use quant_core::uniform::{
    quantize_tensor, Granularity, GridKind, TensorQuantSpec, UniformQuantizer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[test]
#[ignore = "prints measurements; run explicitly"]
fn report_error_storage_and_time_on_gaussian_weights() {
    let (rows, cols) = (1024, 1024);
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let w = Array2::from_shape_fn((rows, cols), |_| normal.sample(&mut rng));
    println!("N(0,1) weights {rows}x{cols}; RMSE in units of σ");
    println!("kind     bits granularity        init            rmse    max_abs  bits/w   ms");
    for kind in [GridKind::Uniform, GridKind::Pi { k: 3 }] {
        for bits in [2u32, 3, 4, 8] {
            for granularity in [Granularity::PerChannel, Granularity::PerBlock { size: 64 }] {
                for init in [InitMethod::Absmax, InitMethod::MseClipSearch] {
                    let spec = TensorQuantSpec {
                        kind,
                        bits,
                        granularity,
                        symmetric: true,
                        init,
                    };
                    let start = Instant::now();
                    let q = quantize_tensor(w.view(), &spec).unwrap();
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    let e = q.error_stats(w.view()).unwrap();
                    println!(
                        "{:<8} {bits:>4} {:<18} {:<15} {:.5} {:.4}  {:.3}  {ms:>6.1}",
                        format!("{kind:?}").split(' ').next().unwrap_or(""),
                        format!("{granularity:?}"),
                        format!("{init:?}"),
                        e.rmse,
                        e.max_abs,
                        q.bits_per_weight(),
                    );
                }
            }
        }
    }

    let g = Array2::from_elem((rows, cols), 1e-3f32);
    let mut uniform = UniformQuantizer::new(3, true, Granularity::PerChannel, Ste::Lsq).unwrap();
    uniform
        .init_from_weights(w.view(), InitMethod::Absmax)
        .unwrap();
    let start = Instant::now();
    uniform.forward(w.view()).unwrap();
    let fwd = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    uniform.backward(g.view()).unwrap();
    let bwd = start.elapsed().as_secs_f64() * 1e3;
    println!("UniformQuantizer 3-bit per-channel LSQ: forward {fwd:.1} ms, backward {bwd:.1} ms");

    let mut nf4 = Nf4GridQuantizer::new(Granularity::PerBlock { size: 64 }, Ste::Lsq).unwrap();
    let start = Instant::now();
    nf4.init_from_weights(w.view(), InitMethod::MseClipSearch)
        .unwrap();
    let init = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let out = nf4.forward(w.view()).unwrap();
    let fwd = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    nf4.backward(g.view()).unwrap();
    let bwd = start.elapsed().as_secs_f64() * 1e3;
    let rmse = quant_core::uniform::rmse(w.view(), out.dequantized.view()).unwrap();
    println!(
        "Nf4GridQuantizer block 64 MSE init: rmse {rmse:.5}, init {init:.1} ms, forward {fwd:.1} ms, backward {bwd:.1} ms"
    );
}
