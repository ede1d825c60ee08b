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
/// is shown beside `matrixmultiply`, the kernel it replaced; `x·B` with `B` contiguous beside
/// `x·Wᵀ` through a transposed view; and the bf16 product on every kernel this CPU runs.
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
    let b_contiguous = random(&mut rng, k, n);
    group.bench_function("entry_point_x_b", |b| {
        b.iter(|| {
            quant_core::linalg::gemm(1.0, x.view(), b_contiguous.view(), 0.0, y.view_mut()).unwrap()
        })
    });
    for kernel in quant_core::linalg::Bf16Kernel::available() {
        group.bench_function(format!("bf16_{}_x_wT", kernel.name()), |b| {
            b.iter(|| {
                quant_core::linalg::gemm_bf16_with(kernel, 1.0, x.view(), w.t(), 0.0, y.view_mut())
                    .unwrap()
            })
        });
    }
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

/// NF4 with double quant on a 4096×4096 f32 matrix, as `bnb.functional.quantize_4bit(...,
/// compress_statistics=True)`; bitsandbytes 0.50 on CPU takes 509 ms to quantize and 39.5 ms
/// to dequantize on this machine class (targets: ≤ 25 ms and ≤ 10 ms).
fn nf4_4096(c: &mut Criterion) {
    use quant_core::nf4::{FourBitTensor, FourBitType};
    use rand_distr::{Distribution, Normal};
    const N: usize = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let w: Vec<f32> = (0..N * N).map(|_| normal.sample(&mut rng)).collect();
    let q = FourBitTensor::quantize(&w, &[N, N], 64, FourBitType::Nf4, true).unwrap();
    let mut out = vec![0.0f32; N * N];
    let mut group = c.benchmark_group("nf4_4096x4096_dq");
    group.sample_size(20);
    group.bench_function("quantize", |b| {
        b.iter(|| {
            black_box(FourBitTensor::quantize(&w, &[N, N], 64, FourBitType::Nf4, true).unwrap())
        })
    });
    group.bench_function("dequantize", |b| {
        b.iter(|| {
            q.dequantize_into(&mut out).unwrap();
            black_box(&out);
        })
    });
    group.finish();
}

/// The orthonormal fast Walsh–Hadamard transform of a 4096-vector (target < 50 µs).
fn hadamard_4096(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut v: Vec<f32> = (0..4096).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    c.bench_function("hadamard_4096", |b| {
        b.iter(|| {
            quant_core::hadamard::fwht(&mut v).unwrap();
            black_box(&v);
        })
    });
}

criterion_group!(benches, gemm_vs_matrixmultiply, nf4_4096, hadamard_4096);
criterion_main!(benches);
