//! The per-group loops of the learned-step quantizer's training passes — fake quantization
//! `ŵ = clamp(round(x/s)) · s` with the finiteness check of its input, and the STE backward
//! with the step's partial gradient — compiled twice and chosen at run time: for AVX2 (8-wide
//! registers, on every x86-64 CPU of the last decade) and for the target's baseline (SSE2
//! on x86-64). Both copies run the same operations in the same order (the division stays a
//! division and no fused multiply-add is enabled), so they give the same bits; the sums run
//! in explicit lanes, so their order is the same too.

use super::{backward_segment_body, SegmentGrid};
use crate::ste::Ste;

/// Which compiled copy of the loops runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// The target's baseline vector width.
    Portable,
    /// 8-wide AVX2 registers (x86-64).
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest copy this CPU runs.
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// Every copy this CPU runs (tests compare them).
    #[cfg(test)]
    pub(super) fn available() -> Vec<Self> {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect() != Kernel::Portable {
            kernels.push(Kernel::detect());
        }
        kernels
    }

    /// `out[i] = ŵ(x[i])` on one group's grid; returns whether every `x` is finite.
    pub(super) fn fake_quant(self, grid: SegmentGrid, x: &[f32], out: &mut [f32]) -> bool {
        match self {
            Kernel::Portable => fake_quant_body(grid, x, out),
            // SAFETY: `detect` returns `Avx2` only on a CPU with AVX2.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { fake_quant_avx2(grid, x, out) },
        }
    }

    /// The STE backward of one group (see `backward_segment_body`): `∂L/∂x` into
    /// `grad_input`, returns the unscaled step partial, which is finite exactly when every
    /// `grad` is (each term is `g` times a finite factor).
    pub(super) fn backward(
        self,
        ste: Ste,
        grid: SegmentGrid,
        x: &[f32],
        grad: &[f32],
        grad_input: &mut [f32],
    ) -> f64 {
        match self {
            Kernel::Portable => backward_segment_body(ste, grid, x, grad, grad_input),
            // SAFETY: as in `fake_quant`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { backward_avx2(ste, grid, x, grad, grad_input) },
        }
    }
}

/// Whether every value is finite (a non-short-circuiting fold, so it vectorises).
#[inline(always)]
pub(super) fn all_finite(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    !x.iter()
        .fold(false, |bad, v| bad | (v.to_bits() & EXPONENT == EXPONENT))
}

#[inline(always)]
fn fake_quant_body(grid: SegmentGrid, x: &[f32], out: &mut [f32]) -> bool {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = grid.locate(v).1 * grid.step;
    }
    all_finite(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fake_quant_avx2(grid: SegmentGrid, x: &[f32], out: &mut [f32]) -> bool {
    fake_quant_body(grid, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2(
    ste: Ste,
    grid: SegmentGrid,
    x: &[f32],
    grad: &[f32],
    grad_input: &mut [f32],
) -> f64 {
    backward_segment_body(ste, grid, x, grad, grad_input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_kernel_gives_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let grid = SegmentGrid::new(0.037, 0.0, -4.0, 3.0);
        for len in [1usize, 7, 8, 9, 63, 2048] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-0.2f32..0.2)).collect();
            let g: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut results = Vec::new();
            for kernel in Kernel::available() {
                let mut out = vec![0.0; len];
                assert!(kernel.fake_quant(grid, &x, &mut out));
                for ste in [Ste::Standard, Ste::Lsq, Ste::Ewgs { delta: 0.2 }] {
                    let mut gin = vec![0.0; len];
                    let partial = kernel.backward(ste, grid, &x, &g, &mut gin);
                    results.push((kernel, ste, out.clone(), gin, partial.to_bits()));
                }
            }
            for r in &results {
                let first = results.iter().find(|f| f.1 == r.1).unwrap();
                assert_eq!(
                    (&first.2, &first.3, first.4),
                    (&r.2, &r.3, r.4),
                    "{:?} len {len}",
                    r.0
                );
            }
        }
    }

    #[test]
    fn a_non_finite_input_or_gradient_is_flagged() {
        let grid = SegmentGrid::new(0.5, 0.0, -4.0, 3.0);
        for kernel in Kernel::available() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = vec![0.25f32; 19];
                let mut out = vec![0.0; 19];
                x[11] = bad;
                assert!(!kernel.fake_quant(grid, &x, &mut out), "{kernel:?} {bad}");
                let x = vec![0.5f32; 19]; // on the grid: the LSQ factor q − u is 0 there
                let mut g = vec![1.0f32; 19];
                g[11] = bad;
                let mut gin = vec![0.0; 19];
                let partial = kernel.backward(Ste::Lsq, grid, &x, &g, &mut gin);
                assert!(!partial.is_finite(), "{kernel:?} {bad}");
            }
        }
    }
}
