//! quant-core benchmarks: the GEMM entry point against the raw kernels.
use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn random(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Array2<f32> {
    Array2::from_shape_fn((r, c), |_| rng.random_range(-1.0f32..1.0))
}

/// 512×2048×2048, the shape of a LoRA layer's base product at 512 tokens and d = 2048:
/// the entry point must stay within 10% of calling its kernel (the `gemm` crate) directly, and
/// is shown beside `matrixmultiply`, the kernel it replaced.
fn gemm_vs_matrixmultiply(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (m, k, n) = (512, 2048, 2048);
    let x = random(&mut rng, m, k);
    let w = random(&mut rng, n, k); // (out, in): y = x·Wᵀ
    let mut y = Array2::<f32>::zeros((m, n));
    let mut group = c.benchmark_group("gemm_512x2048x2048");
    group.sample_size(10);
    group.bench_function("entry_point_x_wT", |b| {
        b.iter(|| quant_core::linalg::gemm(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap())
    });
    group.bench_function("raw_gemm_crate_x_wT", |b| {
        b.iter(|| unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
            black_box(&y);
        })
    });
    group.bench_function("raw_matrixmultiply_x_wT", |b| {
        b.iter(|| unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                y.as_mut_ptr(),
                n as isize,
                1,
            );
            black_box(&y);
        })
    });
    group.finish();
}

criterion_group!(benches, gemm_vs_matrixmultiply);
criterion_main!(benches);
