//! The one matrix-multiply entry point of the workspace.
//!
//! Every layer above (LoRA, QLoRA, attention, the LM head) calls [`gemm`] (or [`gemm_in`]
//! with a [`ComputeDtype`]); performance work (blocking, threading, fused dequantization)
//! happens here and nowhere else. Views may have any strides, so `x·Wᵀ`, `dY·W` and `Xᵀ·dY`
//! are computed straight from `W.t()` or `x.t()` without copying a transpose.
//!
//! * `f32`: the `gemm` crate's packed, cache-blocked SGEMM with its AVX-512 micro-kernels
//!   compiled in (the `x86-v4` feature), chosen at run time: AVX-512F → 16-lane kernels, else
//!   AVX2/FMA → 8-lane kernels, else scalar; threaded on rayon's pool. At 512×2048×2048 on the
//!   2-core AVX-512 machine the AVX-512 kernels double the AVX2 ones (docs/PERFORMANCE.md);
//!   `matrixmultiply`, the kernel this replaced, stays beside it in the criterion bench.
//! * bf16 ([`ComputeDtype::Bf16`]): operands rounded to bf16, products summed in `f32`
//!   (PyTorch's CPU autocast arithmetic), by `vdpbf16ps` when the CPU has AVX512-BF16 and by
//!   the `f32` kernel on rounded copies otherwise ([`Bf16Kernel`], module `bf16`).

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::error::{QuantError, Result};

mod bf16;

pub use bf16::{Bf16Kernel, BF16_KERNEL_ENV};

/// The precision a product's operands are rounded to; sums are `f32` either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// Full `f32` products.
    #[default]
    F32,
    /// bf16 operands (round to nearest even), `f32` accumulation.
    Bf16,
}

impl ComputeDtype {
    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        }
    }

    /// Parses `"f32"` / `"bf16"`; anything else is an error naming the value.
    ///
    /// ```
    /// use quant_core::linalg::ComputeDtype;
    /// assert_eq!(ComputeDtype::from_name("bf16").unwrap(), ComputeDtype::Bf16);
    /// assert!(ComputeDtype::from_name("fp8").is_err());
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(QuantError::invalid(
                "compute dtype",
                other,
                "supported: f32, bf16",
            )),
        }
    }
}

/// `C ← α·A·B + β·C` for `A: (m, k)`, `B: (k, n)`, `C: (m, n)`, any strides.
///
/// When `beta == 0` the old contents of `C` are never read (NaN in `C` does not leak).
///
/// ```
/// use ndarray::array;
/// use quant_core::linalg::gemm;
/// let a = array![[1.0f32, 2.0, 3.0]];          // 1×3
/// let b = array![[1.0f32], [1.0], [1.0]];      // 3×1
/// let mut c = array![[10.0f32]];
/// gemm(2.0, a.view(), b.view(), 1.0, c.view_mut()).unwrap();
/// assert_eq!(c[[0, 0]], 22.0);
/// ```
pub fn gemm(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    gemm_in(ComputeDtype::F32, alpha, a, b, beta, c)
}

/// `C ← α·A·B + β·C` with the operands rounded to `dtype` (bf16: the fastest
/// [`Bf16Kernel`] this CPU has, or the one [`BF16_KERNEL_ENV`] names, see
/// [`Bf16Kernel::selected`]). Same shapes, strides and `β = 0` rule as [`gemm`].
///
/// ```
/// use ndarray::array;
/// use quant_core::linalg::{gemm_in, ComputeDtype};
/// let a = array![[1.0f32, 1.0 / 3.0]];
/// let b = array![[3.0f32], [3.0]];
/// let mut c = array![[0.0f32]];
/// gemm_in(ComputeDtype::Bf16, 1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap();
/// // 1/3 rounds to bf16 0.333984375: 3 + 1.001953125.
/// assert_eq!(c[[0, 0]], 4.001953125);
/// ```
pub fn gemm_in(
    dtype: ComputeDtype,
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    match dtype {
        ComputeDtype::F32 => {
            if let Some(c) = checked(a, b, beta, c)? {
                gemm_f32(alpha, a, b, beta, c);
            }
            Ok(())
        }
        ComputeDtype::Bf16 => gemm_bf16_with(Bf16Kernel::selected()?, alpha, a, b, beta, c),
    }
}

/// [`gemm_in`] with bf16 operands on a chosen kernel, for tests and benchmarks that run
/// every path this CPU has; a kernel the CPU lacks is refused by name.
///
/// ```
/// use ndarray::array;
/// use quant_core::linalg::{gemm_bf16_with, Bf16Kernel};
/// let a = array![[1.0f32, 2.0], [3.0, 4.0]];
/// for kernel in Bf16Kernel::available() {
///     let mut c = ndarray::Array2::zeros((2, 2));
///     gemm_bf16_with(kernel, 1.0, a.view(), a.t(), 0.0, c.view_mut()).unwrap();
///     assert_eq!(c, array![[5.0, 11.0], [11.0, 25.0]]);
/// }
/// ```
pub fn gemm_bf16_with(
    kernel: Bf16Kernel,
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    match checked(a, b, beta, c)? {
        Some(c) => bf16::gemm_bf16(kernel, alpha, a, b, beta, c),
        None => Ok(()),
    }
}

/// Checks the shapes; handles the empty cases (`C ← β·C` when `k = 0`) and returns `None`
/// for them, else hands `C` back for the kernel.
fn checked<'c>(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'c, f32>,
) -> Result<Option<ArrayViewMut2<'c, f32>>> {
    let (m, k) = a.dim();
    let (kb, n) = b.dim();
    if k != kb {
        return Err(QuantError::shape(
            "gemm inner dimension (A: m×k, B: k×n)",
            format!("B with {k} rows"),
            format!("A {m}×{k}, B {kb}×{n}"),
        ));
    }
    if c.dim() != (m, n) {
        return Err(QuantError::shape(
            "gemm output",
            format!("{m}×{n}"),
            format!("{}×{}", c.dim().0, c.dim().1),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(None);
    }
    if k == 0 {
        // The product is empty: C ← β·C (β = 0 means overwrite, even NaN).
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.mapv_inplace(|v| v * beta);
        }
        return Ok(None);
    }
    Ok(Some(c))
}

/// The `f32` kernel on checked, non-empty operands.
fn gemm_f32(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let [rsa, csa] = strides(a.strides());
    let [rsb, csb] = strides(b.strides());
    let [rsc, csc] = strides(c.strides());
    // Splitting a small product across threads costs more than it saves.
    let parallelism = if m * n * k >= PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers and strides come from live ndarray views of the stated shapes, so
    // every index the kernel forms (i·rs + j·cs for i < rows, j < cols) is in bounds; `c` is a
    // unique mutable borrow, so it cannot alias `a` or `b`. The `gemm` crate accepts any
    // (including negative) strides. With `read_dst = false` it never reads `c`.
    // `gemm::gemm` computes dst ← α_dst·dst + β_prod·lhs·rhs, hence the argument order.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            csc,
            rsc,
            beta != 0.0,
            a.as_ptr(),
            csa,
            rsa,
            b.as_ptr(),
            csb,
            rsb,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `A·B` into a new row-major array.
///
/// ```
/// use ndarray::array;
/// use quant_core::linalg::matmul;
/// let a = array![[1.0f32, 2.0], [3.0, 4.0]];
/// assert_eq!(matmul(a.view(), a.t()).unwrap(), array![[5.0, 11.0], [11.0, 25.0]]);
/// ```
pub fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
    let mut c = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    gemm(1.0, a, b, 0.0, c.view_mut())?;
    Ok(c)
}

/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 64 * 64 * 64;

fn strides(s: &[isize]) -> [isize; 2] {
    [s[0], s[1]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Array2<f32> {
        Array2::from_shape_fn((r, c), |_| rng.random_range(-1.0f32..1.0))
    }

    fn naive(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            (0..k)
                .map(|p| a[[i, p]] as f64 * b[[p, j]] as f64)
                .sum::<f64>() as f32
        })
    }

    fn assert_close(x: &Array2<f32>, y: &Array2<f32>, k: usize) {
        let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
        for (a, b) in x.iter().zip(y.iter()) {
            assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
        }
    }

    #[test]
    fn matches_naive_on_random_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let shapes = [
            (1, 1, 1),
            (1, 17, 1),
            (1, 64, 33),
            (33, 64, 1),
            (7, 1, 9),
            (65, 130, 31),
            (128, 96, 200),
        ];
        for &(m, k, n) in &shapes {
            let a = random(&mut rng, m, k);
            let b = random(&mut rng, k, n);
            let c = matmul(a.view(), b.view()).unwrap();
            assert_close(&c, &naive(a.view(), b.view()), k);
        }
    }

    #[test]
    fn transposed_and_strided_views_need_no_copies() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // x·Wᵀ, dY·W, Xᵀ·dY as the layers use them.
        let x = random(&mut rng, 20, 12);
        let w = random(&mut rng, 9, 12);
        assert_close(
            &matmul(x.view(), w.t()).unwrap(),
            &naive(x.view(), w.t()),
            12,
        );
        let dy = random(&mut rng, 20, 9);
        assert_close(
            &matmul(dy.view(), w.view()).unwrap(),
            &naive(dy.view(), w.view()),
            9,
        );
        assert_close(
            &matmul(x.t(), dy.view()).unwrap(),
            &naive(x.t(), dy.view()),
            20,
        );
        // Every other row and column, and a reversed axis.
        let big = random(&mut rng, 40, 30);
        let a = big.slice(s![..;2, 1..;3]);
        let b = random(&mut rng, 60, 25);
        let bv = b.slice(s![..;6, ..;-1]);
        assert_close(&matmul(a, bv).unwrap(), &naive(a, bv), 10);
        // Output into a strided view.
        let mut out = Array2::<f32>::from_elem((40, 30), f32::NAN);
        gemm(1.0, a, bv, 0.0, out.slice_mut(s![..;2, 5..30])).unwrap();
        assert_close(&out.slice(s![..;2, 5..30]).to_owned(), &naive(a, bv), 10);
        assert!(out[[1, 0]].is_nan(), "rows outside the view are untouched");
    }

    #[test]
    fn alpha_beta_and_empty_inner_dimension() {
        let a = Array2::<f32>::ones((3, 0));
        let b = Array2::<f32>::ones((0, 2));
        let mut c = Array2::<f32>::from_elem((3, 2), f32::NAN);
        gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap();
        assert!(c.iter().all(|&v| v == 0.0));
        let a = Array2::<f32>::ones((2, 3));
        let b = Array2::<f32>::ones((3, 2));
        let mut c = Array2::<f32>::ones((2, 2));
        gemm(0.5, a.view(), b.view(), 2.0, c.view_mut()).unwrap();
        assert!(c.iter().all(|&v| v == 3.5));
    }

    /// `Σ bf16(a)·bf16(b)` in f64: what every bf16 kernel must give up to f32 summation.
    fn naive_bf16(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        naive(a.mapv(round).view(), b.mapv(round).view())
    }

    /// Checks one bf16 product against the bf16-input reference (f32 summation error only)
    /// and against the f32 product (bf16 tolerance: 1e-2 of ‖a_i‖·‖b_j‖).
    fn check_bf16(kernel: Bf16Kernel, a: ArrayView2<f32>, b: ArrayView2<f32>) {
        let (m, k) = a.dim();
        let n = b.ncols();
        let mut c = Array2::<f32>::from_elem((m, n), f32::NAN);
        gemm_bf16_with(kernel, 1.0, a, b, 0.0, c.view_mut()).unwrap();
        let exact = naive_bf16(a, b);
        let full = naive(a, b);
        let row_norm: Vec<f32> = a.rows().into_iter().map(|r| r.dot(&r).sqrt()).collect();
        let col_norm: Vec<f32> = b.columns().into_iter().map(|c| c.dot(&c).sqrt()).collect();
        for ((i, j), &v) in c.indexed_iter() {
            let scale = row_norm[i] * col_norm[j];
            let sum_tol = 1e-6 * (k as f32).sqrt().max(1.0) * 4.0 * scale.max(1e-30);
            assert!(
                (v - exact[[i, j]]).abs() <= sum_tol,
                "{} {m}×{k}×{n} at ({i}, {j}): {v} vs bf16 reference {}",
                kernel.name(),
                exact[[i, j]]
            );
            assert!(
                (v - full[[i, j]]).abs() <= 1e-2 * scale,
                "{} {m}×{k}×{n} at ({i}, {j}): {v} vs f32 {}",
                kernel.name(),
                full[[i, j]]
            );
        }
    }

    #[test]
    fn bf16_kernels_match_the_reference_on_odd_shapes_and_views() {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let shapes = [
            (1, 1, 1),
            (1, 17, 1),
            (3, 5, 7),
            (13, 33, 31),
            (12, 64, 32),
            (25, 513, 67),
            (130, 96, 200),
            (200, 600, 70),
        ];
        for kernel in Bf16Kernel::available() {
            for &(m, k, n) in &shapes {
                let a = random(&mut rng, m, k);
                let b = random(&mut rng, k, n);
                let w = random(&mut rng, n, k);
                // A·B contiguous, x·Wᵀ, Aᵀ·dY-style transposed left operand.
                check_bf16(kernel, a.view(), b.view());
                check_bf16(kernel, a.view(), w.t());
                let at = a.t().as_standard_layout().into_owned();
                check_bf16(kernel, at.t(), b.view());
                // Neither operand unit-stride in any direction.
                let big = random(&mut rng, 2 * m, 2 * k);
                let bb = random(&mut rng, 2 * k, 3 * n);
                check_bf16(kernel, big.slice(s![..;2, ..;2]), bb.slice(s![..;2, ..;-3]));
            }
        }
    }

    #[test]
    fn bf16_alpha_beta_and_strided_output() {
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        let (m, k, n) = (37, 700, 45);
        let a = random(&mut rng, m, k);
        let b = random(&mut rng, k, n);
        let start = random(&mut rng, m, n);
        let exact = naive_bf16(a.view(), b.view());
        for kernel in Bf16Kernel::available() {
            // C = 0.5·A·B + 2·C, in a column-major (transposed) output view.
            let mut c_t = start.t().to_owned();
            gemm_bf16_with(
                kernel,
                0.5,
                a.view(),
                b.view(),
                2.0,
                c_t.view_mut().reversed_axes(),
            )
            .unwrap();
            for ((i, j), &v) in c_t.t().indexed_iter() {
                let want = 0.5 * exact[[i, j]] + 2.0 * start[[i, j]];
                assert!(
                    (v - want).abs() <= 1e-4,
                    "{} ({i}, {j}): {v} vs {want}",
                    kernel.name()
                );
            }
            // β = 0 never reads C.
            let mut c = Array2::<f32>::from_elem((m, n), f32::NAN);
            gemm_in(
                ComputeDtype::Bf16,
                1.0,
                a.view(),
                b.view(),
                0.0,
                c.view_mut(),
            )
            .unwrap();
            assert!(c.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn bf16_kernels_agree_with_each_other() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let a = random(&mut rng, 70, 300);
        let w = random(&mut rng, 90, 300);
        let outputs: Vec<Array2<f32>> = Bf16Kernel::available()
            .into_iter()
            .map(|kernel| {
                let mut c = Array2::zeros((70, 90));
                gemm_bf16_with(kernel, 1.0, a.view(), w.t(), 0.0, c.view_mut()).unwrap();
                c
            })
            .collect();
        for other in &outputs[1..] {
            for (x, y) in outputs[0].iter().zip(other.iter()) {
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn shape_errors_say_which_dimension() {
        let a = Array2::<f32>::ones((2, 3));
        let b = Array2::<f32>::ones((4, 2));
        let mut c = Array2::<f32>::zeros((2, 2));
        let e = gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap_err();
        assert!(e.to_string().contains("inner dimension"), "{e}");
        let b = Array2::<f32>::ones((3, 2));
        let mut c = Array2::<f32>::zeros((3, 2));
        let e = gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap_err();
        assert!(e.to_string().contains("gemm output"), "{e}");
    }
}
