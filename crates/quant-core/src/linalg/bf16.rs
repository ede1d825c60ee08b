//! bf16 products with `f32` accumulation, behind [`super::gemm_in`] with
//! [`super::ComputeDtype::Bf16`].
//!
//! Both operands are rounded to bf16 (round to nearest even, NaN kept quiet, as
//! `half::bf16::from_f32`), multiplied exactly (a bf16·bf16 product fits in `f32`) and summed
//! in `f32`: the arithmetic of PyTorch's bf16 autocast on CPU. Two kernels:
//!
//! * [`Bf16Kernel::Avx512Bf16`], chosen at run time when the CPU has AVX512-BF16: `A` and `B`
//!   are packed into bf16 pairs (`(v[2p], v[2p+1])` in one 32-bit lane, the layout
//!   `vdpbf16ps` multiplies), then a `MR × NR` register-blocked micro-kernel runs over
//!   `KC`-deep slices, cache-blocked (a `KC × NR` slice of `B` stays in L1, a row group of
//!   `A` in L2) and threaded on rayon over tiles of `C`.
//! * [`Bf16Kernel::Portable`], everywhere: rounds copies of `A` and `B` to bf16 values and
//!   runs the `f32` kernel on them. Same inputs to every product, different summation order.

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::error::{QuantError, Result};

/// The environment variable that forces a bf16 kernel for the whole process
/// ([`Bf16Kernel::selected`]).
pub const BF16_KERNEL_ENV: &str = "LORA_QAT_BF16_KERNEL";

/// Which bf16 kernel runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` (AVX512-BF16 with AVX-512F), x86-64 only.
    Avx512Bf16,
    /// Round to bf16, then the `f32` kernel (any CPU).
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs (checked once per call with the cached CPUID bits).
    pub fn detect() -> Self {
        if Self::Avx512Bf16.is_available() {
            Self::Avx512Bf16
        } else {
            Self::Portable
        }
    }

    /// The kernel [`super::gemm_in`] runs: [`Bf16Kernel::detect`]'s, unless the environment
    /// variable [`BF16_KERNEL_ENV`] names one (`portable` or `avx512bf16`) — how a test or a
    /// benchmark runs a whole model on the portable kernel of an AVX512-BF16 machine. Read
    /// once per process. An unknown name, or a kernel the CPU lacks, is an error naming it.
    pub fn selected() -> Result<Self> {
        static CHOICE: std::sync::OnceLock<Result<Bf16Kernel>> = std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| Self::from_env_value(std::env::var(BF16_KERNEL_ENV).ok().as_deref()))
            .clone()
    }

    /// The kernel a value of [`BF16_KERNEL_ENV`] asks for (`None`: unset, the fastest).
    fn from_env_value(value: Option<&str>) -> Result<Self> {
        let Some(name) = value else {
            return Ok(Self::detect());
        };
        let kernel = [Self::Avx512Bf16, Self::Portable]
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                QuantError::invalid(
                    BF16_KERNEL_ENV,
                    name,
                    "supported: avx512bf16, portable (or unset: the fastest this CPU has)",
                )
            })?;
        if !kernel.is_available() {
            return Err(QuantError::invalid(
                BF16_KERNEL_ENV,
                name,
                "this CPU lacks AVX512-BF16",
            ));
        }
        Ok(kernel)
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Avx512Bf16 => avx512_available(),
        }
    }

    /// Every kernel this CPU can run, fastest first (tests force each one).
    pub fn available() -> Vec<Self> {
        [Self::Avx512Bf16, Self::Portable]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// A short name for tables and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Bf16 => "avx512bf16",
            Self::Portable => "portable",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

/// `f32 → bf16` bits, round to nearest even; NaN stays NaN (quiet). Bit-identical to
/// `half::bf16::from_f32(v).to_bits()`, written out so the vector packing can do the same.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u32 {
    let x = v.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return (x >> 16) | 0x40;
    }
    (x + 0x7FFF + ((x >> 16) & 1)) >> 16
}

/// `C ← α·bf16(A)·bf16(B) + β·C` with `kernel`; shapes already checked, `m, n, k > 0`.
pub(super) fn gemm_bf16(
    kernel: Bf16Kernel,
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    match kernel {
        Bf16Kernel::Portable => {
            let round = |v: f32| f32::from_bits(bf16_bits(v) << 16);
            let a16 = a.mapv(round);
            let b16 = b.mapv(round);
            super::gemm_f32(alpha, a16.view(), b16.view(), beta, c);
            Ok(())
        }
        Bf16Kernel::Avx512Bf16 => {
            if !avx512_available() {
                return Err(QuantError::invalid(
                    "bf16 GEMM kernel",
                    kernel.name(),
                    "this CPU lacks AVX512-BF16 (use Bf16Kernel::detect())",
                ));
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked just above).
            unsafe {
                avx512::gemm(alpha, a, b, beta, c);
            }
            Ok(())
        }
    }
}

#[cfg(target_arch = "x86_64")]
// The AVX-512 intrinsics are stable from Rust 1.89: building the x86-64 kernels needs it
// although the workspace still declares 1.85 (see docs/PERFORMANCE.md, "Not done").
#[clippy::msrv = "1.89"]
mod avx512 {
    //! The AVX512-BF16 kernel. Packed layouts (32-bit lanes, each a bf16 pair along `k`):
    //! `A` as `[row block of MR][pair][row]`, `B` as `[strip of NR columns][pair][column]`,
    //! zero-padded to whole blocks and an even `k`.

    use std::arch::x86_64::*;

    use ndarray::{ArrayView2, ArrayViewMut2};
    use rayon::prelude::*;

    use super::bf16_bits;

    /// Rows of a micro-tile (one broadcast each per pair).
    const MR: usize = 12;
    /// Columns of a micro-tile: two 16-lane vectors. 12·2 accumulators + 2 `B` vectors + 1
    /// broadcast use 27 of the 32 vector registers.
    const NR: usize = 32;
    /// Pairs (`2·KC` values of `k`) per slice: a `B` strip slice is `KC·NR·4` = 32 KiB (L1).
    const KC: usize = 256;
    /// Row blocks per task: `A` of one task and slice is `MC_BLOCKS·MR·KC·4` = 192 KiB (L2).
    const MC_BLOCKS: usize = 16;
    /// Column strips per task.
    const NC_STRIPS: usize = 8;

    /// A `*mut f32` that rayon tasks share; each task writes a disjoint tile of `C`.
    #[derive(Clone, Copy)]
    struct OutPtr(*mut f32);
    // SAFETY: tasks only write disjoint elements (see `gemm`).
    unsafe impl Send for OutPtr {}
    unsafe impl Sync for OutPtr {}

    impl OutPtr {
        /// Through a method so that closures capture the whole (Sync) wrapper.
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// A read-only source matrix seen as `(idx, k)` with strides: `A` directly (`idx` = row),
    /// `B` transposed (`idx` = column).
    #[derive(Clone, Copy)]
    struct Source {
        ptr: *const f32,
        len: usize,
        depth: usize,
        s_idx: isize,
        s_k: isize,
    }
    // SAFETY: read-only view of a borrowed array that outlives every task.
    unsafe impl Send for Source {}
    unsafe impl Sync for Source {}

    impl Source {
        #[inline(always)]
        unsafe fn get(&self, idx: usize, k: usize) -> f32 {
            if idx < self.len && k < self.depth {
                *self
                    .ptr
                    .offset(idx as isize * self.s_idx + k as isize * self.s_k)
            } else {
                0.0
            }
        }
    }

    /// Packs `src` into `[block of WIDTH idx][pair][lane]`, `pairs = ⌈depth/2⌉` per block.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack<const WIDTH: usize>(src: Source, pairs: usize, out: &mut [u32]) {
        let block_len = pairs * WIDTH;
        let parallel = out.len() >= 1 << 16;
        let work = |(block, chunk): (usize, &mut [u32])| {
            // SAFETY: the CPU has AVX-512F (callers run only on such CPUs).
            unsafe { pack_block::<WIDTH>(src, block * WIDTH, pairs, chunk) }
        };
        if parallel {
            out.par_chunks_mut(block_len).enumerate().for_each(work);
        } else {
            out.chunks_mut(block_len).enumerate().for_each(work);
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn pack_block<const WIDTH: usize>(
        src: Source,
        idx0: usize,
        pairs: usize,
        out: &mut [u32],
    ) {
        let lanes = src.len.saturating_sub(idx0).min(WIDTH);
        let full_pairs = src.depth / 2;
        if src.s_k == 1 {
            // Pairs are adjacent in memory: 16 values → 8 pairs per step, per idx.
            for lane in 0..lanes {
                let row = src.ptr.offset((idx0 + lane) as isize * src.s_idx);
                let mut p = 0;
                while p + 8 <= full_pairs {
                    let v = _mm512_loadu_si512(row.add(2 * p) as *const __m512i);
                    let packed = pairs_from_adjacent(v);
                    let mut tmp = [0u32; 8];
                    _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, packed);
                    for (q, &t) in tmp.iter().enumerate() {
                        *out.get_unchecked_mut((p + q) * WIDTH + lane) = t;
                    }
                    p += 8;
                }
                for p in p..pairs {
                    let lo = src.get(idx0 + lane, 2 * p);
                    let hi = src.get(idx0 + lane, 2 * p + 1);
                    *out.get_unchecked_mut(p * WIDTH + lane) =
                        bf16_bits(lo) | (bf16_bits(hi) << 16);
                }
            }
            for p in 0..pairs {
                for lane in lanes..WIDTH {
                    *out.get_unchecked_mut(p * WIDTH + lane) = 0;
                }
            }
        } else if src.s_idx == 1 {
            // Lanes are adjacent: one vector of up to 16 lanes from k = 2p and one from 2p+1.
            for p in 0..pairs {
                let mut lane = 0;
                while lane < WIDTH {
                    let count = lanes.saturating_sub(lane).min(16);
                    let dst = out.as_mut_ptr().add(p * WIDTH + lane);
                    let store_mask: __mmask16 = if WIDTH - lane >= 16 {
                        0xFFFF
                    } else {
                        (1u32 << (WIDTH - lane)) as u16 - 1
                    };
                    if count == 0 {
                        _mm512_mask_storeu_epi32(
                            dst as *mut i32,
                            store_mask,
                            _mm512_setzero_si512(),
                        );
                    } else {
                        let mask: __mmask16 = if count == 16 {
                            0xFFFF
                        } else {
                            ((1u32 << count) - 1) as u16
                        };
                        let base = src.ptr.add(idx0 + lane);
                        let k0 = 2 * p;
                        let lo = _mm512_maskz_loadu_epi32(
                            mask,
                            base.offset(k0 as isize * src.s_k) as *const i32,
                        );
                        let hi = if k0 + 1 < src.depth {
                            _mm512_maskz_loadu_epi32(
                                mask,
                                base.offset((k0 + 1) as isize * src.s_k) as *const i32,
                            )
                        } else {
                            _mm512_setzero_si512()
                        };
                        let pair =
                            _mm512_or_si512(round_bits(lo), _mm512_slli_epi32(round_bits(hi), 16));
                        _mm512_mask_storeu_epi32(dst as *mut i32, store_mask, pair);
                    }
                    lane += 16;
                }
            }
        } else {
            for p in 0..pairs {
                for lane in 0..WIDTH {
                    let lo = src.get(idx0 + lane, 2 * p);
                    let hi = src.get(idx0 + lane, 2 * p + 1);
                    *out.get_unchecked_mut(p * WIDTH + lane) =
                        bf16_bits(lo) | (bf16_bits(hi) << 16);
                }
            }
        }
    }

    /// `bf16_bits` on 16 lanes of `f32` bits: the bf16 in the low half of each lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_bits(x: __m512i) -> __m512i {
        let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb),
            16,
        );
        let quiet = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// 16 `f32` (8 adjacent pairs) → 8 packed pairs `bf16(v[2q]) | bf16(v[2q+1]) << 16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pairs_from_adjacent(v: __m512i) -> __m256i {
        let r = round_bits(v);
        // As 64-bit lanes: bf16(even) in bits 0..16, bf16(odd) in bits 32..48.
        let merged = _mm512_or_si512(r, _mm512_srli_epi64(r, 16));
        _mm512_cvtepi64_epi32(merged)
    }

    /// The micro-kernel: `MR × NR` sums over `pairs` pairs, then written to `C` at `c`:
    /// `C = α·acc + β·C` on the first slice (`β = 0`: `C` not read), `C += α·acc` after.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn micro_kernel(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        rows: usize,
        cols: usize,
        alpha: f32,
        beta: Option<f32>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            let b0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const __m512i));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        let va = _mm512_set1_ps(alpha);
        if csc == 1 && cols == NR {
            for (r, row) in acc.iter().enumerate().take(rows) {
                let dst = c.offset(r as isize * rsc);
                for (h, &v) in row.iter().enumerate() {
                    let d = dst.add(16 * h);
                    let out = match beta {
                        Some(0.0) => _mm512_mul_ps(va, v),
                        Some(beta) => _mm512_fmadd_ps(
                            va,
                            v,
                            _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(d)),
                        ),
                        None => _mm512_fmadd_ps(va, v, _mm512_loadu_ps(d)),
                    };
                    _mm512_storeu_ps(d, out);
                }
            }
        } else {
            let mut tile = [[0.0f32; NR]; MR];
            for (t, row) in tile.iter_mut().zip(acc.iter()) {
                _mm512_storeu_ps(t.as_mut_ptr(), row[0]);
                _mm512_storeu_ps(t.as_mut_ptr().add(16), row[1]);
            }
            for (r, t) in tile.iter().enumerate().take(rows) {
                for (j, &v) in t.iter().enumerate().take(cols) {
                    let d = c.offset(r as isize * rsc + j as isize * csc);
                    *d = match beta {
                        Some(0.0) => alpha * v,
                        Some(beta) => alpha * v + beta * *d,
                        None => alpha * v + *d,
                    };
                }
            }
        }
    }

    /// `C ← α·bf16(A)·bf16(B) + β·C`, `m, n, k > 0`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemm(
        alpha: f32,
        a: ArrayView2<'_, f32>,
        b: ArrayView2<'_, f32>,
        beta: f32,
        mut c: ArrayViewMut2<'_, f32>,
    ) {
        let (m, k) = a.dim();
        let n = b.ncols();
        let pairs = k.div_ceil(2);
        let row_blocks = m.div_ceil(MR);
        let strips = n.div_ceil(NR);
        let a_src = Source {
            ptr: a.as_ptr(),
            len: m,
            depth: k,
            s_idx: a.strides()[0],
            s_k: a.strides()[1],
        };
        let b_src = Source {
            ptr: b.as_ptr(),
            len: n,
            depth: k,
            s_idx: b.strides()[1],
            s_k: b.strides()[0],
        };
        let mut packed_a = vec![0u32; row_blocks * pairs * MR];
        let mut packed_b = vec![0u32; strips * pairs * NR];
        pack::<MR>(a_src, pairs, &mut packed_a);
        pack::<NR>(b_src, pairs, &mut packed_b);

        let (rsc, csc) = (c.strides()[0], c.strides()[1]);
        let out = OutPtr(c.as_mut_ptr());
        let row_groups = row_blocks.div_ceil(MC_BLOCKS);
        let col_groups = strips.div_ceil(NC_STRIPS);
        let (packed_a, packed_b) = (&packed_a[..], &packed_b[..]);
        let task = move |t: usize| {
            let (rg, cg) = (t / col_groups, t % col_groups);
            let blocks = rg * MC_BLOCKS..((rg + 1) * MC_BLOCKS).min(row_blocks);
            let strip_range = cg * NC_STRIPS..((cg + 1) * NC_STRIPS).min(strips);
            let mut p0 = 0;
            while p0 < pairs {
                let depth = KC.min(pairs - p0);
                let first = p0 == 0;
                for s in strip_range.clone() {
                    let b_ptr = packed_b.as_ptr().add(s * pairs * NR + p0 * NR);
                    let cols = NR.min(n - s * NR);
                    for rb in blocks.clone() {
                        let a_ptr = packed_a.as_ptr().add(rb * pairs * MR + p0 * MR);
                        let rows = MR.min(m - rb * MR);
                        let c_ptr = out
                            .get()
                            .offset((rb * MR) as isize * rsc + (s * NR) as isize * csc);
                        // SAFETY: the tile (rows × cols at c_ptr) lies inside C and belongs to
                        // this task alone; the packed pointers stay inside their buffers.
                        micro_kernel(
                            depth,
                            a_ptr,
                            b_ptr,
                            c_ptr,
                            rsc,
                            csc,
                            rows,
                            cols,
                            alpha,
                            first.then_some(beta),
                        );
                    }
                }
                p0 += depth;
            }
        };
        let tasks = row_groups * col_groups;
        if m * n * k >= super::super::PARALLEL_MIN_MACS && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            for t in 0..tasks {
                task(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use proptest::prelude::*;

    #[test]
    fn rounding_matches_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0x3F80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie, rounds to even (up)
        ];
        for v in specials {
            let want = half::bf16::from_f32(v).to_bits() as u32;
            assert_eq!(bf16_bits(v), want, "{v:e} ({:#x})", v.to_bits());
        }
    }

    proptest! {
        #[test]
        fn rounding_matches_half_on_any_bits(bits in any::<u32>()) {
            let v = f32::from_bits(bits);
            prop_assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits() as u32);
        }
    }

    #[test]
    fn the_environment_chooses_a_kernel_by_name() {
        assert_eq!(
            Bf16Kernel::from_env_value(None).unwrap(),
            Bf16Kernel::detect()
        );
        assert_eq!(
            Bf16Kernel::from_env_value(Some("portable")).unwrap(),
            Bf16Kernel::Portable
        );
        let e = Bf16Kernel::from_env_value(Some("amx")).unwrap_err();
        assert!(
            e.to_string().contains(BF16_KERNEL_ENV) && e.to_string().contains("amx"),
            "{e}"
        );
        let avx = Bf16Kernel::from_env_value(Some("avx512bf16"));
        assert_eq!(avx.is_ok(), Bf16Kernel::Avx512Bf16.is_available());
    }

    #[test]
    fn unavailable_kernel_is_refused_by_name() {
        if Bf16Kernel::Avx512Bf16.is_available() {
            return;
        }
        let a = Array2::<f32>::ones((2, 2));
        let mut c = Array2::<f32>::zeros((2, 2));
        let e = gemm_bf16(
            Bf16Kernel::Avx512Bf16,
            1.0,
            a.view(),
            a.view(),
            0.0,
            c.view_mut(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("avx512bf16"), "{e}");
    }
}
