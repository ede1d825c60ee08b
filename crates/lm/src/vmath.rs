//! Vectorised row kernels for softmax-like passes over long rows (the 49152-wide logits of
//! SmolLM2's vocabulary): the row maximum with a finiteness check, and `e^(z − max)` written
//! out and summed; and the SwiGLU gate (`silu(g)·u`) with its backward, one `σ` per element.
//! The bodies are plain loops over 16 lanes that the compiler vectorises, compiled three
//! times and chosen at run time: for AVX-512F (16-wide registers), for AVX2 (8-wide; the
//! machines without AVX-512), and for the target's baseline (SSE2 on x86-64). Every path
//! computes each element with the same operations in the same order (no fused multiply-add
//! is enabled), so written values are bit-identical; only the order of the sums' lanes differs.

/// Lanes per accumulator: one AVX-512 register of `f32`.
const LANES: usize = 16;
/// Elements summed in `f32` lanes before the partial sum moves to `f64`, bounding the
/// rounding of long rows (256 elements per lane group: relative error ≲ 2⁻²⁴·16).
const CHUNK: usize = 256;

/// Which compiled copy of the row kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowKernel {
    /// The target's baseline vector width.
    Portable,
    /// 8-wide AVX2 registers.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16-wide AVX-512F registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl RowKernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return RowKernel::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return RowKernel::Avx2;
        }
        RowKernel::Portable
    }

    /// Every kernel this CPU runs (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        #[allow(unused_mut)] // only x86-64 has more than the portable kernel
        let mut kernels = vec![RowKernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(RowKernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(RowKernel::Avx512);
            }
        }
        kernels
    }

    /// `(max(z), every z finite)`; the maximum is meaningless when not finite.
    pub(crate) fn max_finite(self, z: &[f32]) -> (f32, bool) {
        match self {
            RowKernel::Portable => max_finite_body(z),
            // SAFETY: `detect` (or `available`) returned this kernel only after seeing its
            // feature (AVX2, AVX-512F) on this CPU.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx2 => unsafe { max_finite_avx2(z) },
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx512 => unsafe { max_finite_avx512(z) },
        }
    }

    /// `row[i] ← e^(row[i] − shift)`; returns their sum (`f32` lanes over chunks of 256,
    /// the chunks added in `f64`).
    pub(crate) fn exp_sum_in_place(self, row: &mut [f32], shift: f32) -> f64 {
        match self {
            RowKernel::Portable => exp_sum_in_place_body(row, shift),
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx2 => unsafe { exp_sum_in_place_avx2(row, shift) },
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx512 => unsafe { exp_sum_in_place_avx512(row, shift) },
        }
    }

    /// SwiGLU forward of one row: `out[i] = silu(g[i])·u[i]` (all the same length).
    pub(crate) fn silu_gate(self, g: &[f32], u: &[f32], out: &mut [f32]) {
        match self {
            RowKernel::Portable => silu_gate_body(g, u, out),
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx2 => unsafe { silu_gate_avx2(g, u, out) },
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx512 => unsafe { silu_gate_avx512(g, u, out) },
        }
    }

    /// SwiGLU backward of one row: `du = d·silu(g)`, `dg = d·u·silu′(g)` (all one length).
    pub(crate) fn silu_gate_backward(
        self,
        g: &[f32],
        u: &[f32],
        d: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        match self {
            RowKernel::Portable => silu_gate_backward_body(g, u, d, dg, du),
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx2 => unsafe { silu_gate_backward_avx2(g, u, d, dg, du) },
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx512 => unsafe { silu_gate_backward_avx512(g, u, d, dg, du) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_gate_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    silu_gate_body(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_gate_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    silu_gate_body(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_gate_backward_avx512(
    g: &[f32],
    u: &[f32],
    d: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    silu_gate_backward_body(g, u, d, dg, du)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_gate_backward_avx2(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    silu_gate_backward_body(g, u, d, dg, du)
}

/// `σ(x) = 1/(1 + e^−x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn silu_gate_body(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = gv * sigmoid(gv) * uv;
    }
}

#[inline(always)]
fn silu_gate_backward_body(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g
        .len()
        .min(u.len())
        .min(d.len())
        .min(dg.len())
        .min(du.len());
    let (g, u, d, dg, du) = (&g[..n], &u[..n], &d[..n], &mut dg[..n], &mut du[..n]);
    for i in 0..n {
        // One σ per element: silu = g·σ, silu′ = σ·(1 + g·(1 − σ)).
        let sig = sigmoid(g[i]);
        du[i] = d[i] * (g[i] * sig);
        dg[i] = d[i] * u[i] * (sig * (1.0 + g[i] * (1.0 - sig)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_finite_avx512(z: &[f32]) -> (f32, bool) {
    max_finite_body(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_finite_avx2(z: &[f32]) -> (f32, bool) {
    max_finite_body(z)
}

#[inline(always)]
fn max_finite_body(z: &[f32]) -> (f32, bool) {
    let mut max = [f32::NEG_INFINITY; LANES];
    // v − v is 0 for finite v and NaN for ±∞ or NaN, so the sum is NaN iff one is not finite.
    let mut check = [0.0f32; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            max[l] = max[l].max(c[l]);
            #[allow(clippy::eq_op)] // v − v on purpose: the finiteness test above
            {
                check[l] += c[l] - c[l];
            }
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut ok = true;
    for &v in chunks.remainder() {
        m = m.max(v);
        ok &= v.is_finite();
    }
    for l in 0..LANES {
        m = m.max(max[l]);
        ok &= check[l] == 0.0;
    }
    (m, ok)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sum_in_place_avx512(row: &mut [f32], shift: f32) -> f64 {
    exp_sum_in_place_body(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_sum_in_place_avx2(row: &mut [f32], shift: f32) -> f64 {
    exp_sum_in_place_body(row, shift)
}

#[inline(always)]
fn exp_sum_in_place_body(row: &mut [f32], shift: f32) -> f64 {
    let mut total = 0.0f64;
    for chunk in row.chunks_mut(CHUNK) {
        let mut acc = [0.0f32; LANES];
        let mut lanes = chunk.chunks_exact_mut(LANES);
        for vs in &mut lanes {
            for l in 0..LANES {
                let e = exp(vs[l] - shift);
                vs[l] = e;
                acc[l] += e;
            }
        }
        let mut part = 0.0f32;
        for v in lanes.into_remainder() {
            let e = exp(*v - shift);
            *v = e;
            part += e;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + part as f64;
    }
    total
}

/// `e^x` in `f32` without a library call, so loops over it vectorise: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-7 polynomial for `e^r` (the classic Cephes `expf` minimax
/// coefficients) and `2ⁿ` built in the exponent bits. Within 2 ulp of `f32::exp` for
/// `x ∈ [−87.3, 88]`; `x` is clamped to that range (below it `e^x` is returned as about
/// `1.2·10⁻³⁸` instead of a subnormal or 0, which no softmax sum notices); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // the fitted 5.000_000_1e-1 is 0.5 in f32
    let er = p * r2 + r + 1.0;
    // n ∈ [−126, 127] after the clamp: a normal power of two.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    er * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn exp_is_within_two_ulp_of_the_library_exp() {
        let mut x = -87.3f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            let ulp = (libm.to_bits() as i64 - ours.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm} ({ulp} ulp)");
            x += 0.0173;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e4) < 1.3e-38 && exp(-1e4) > 0.0);
    }

    #[test]
    fn every_kernel_writes_the_same_values_and_sums_as_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for len in [1usize, 15, 16, 17, 255, 256, 257, 4099] {
            let z: Vec<f32> = (0..len).map(|_| rng.random_range(-30.0f32..30.0)).collect();
            let reference_max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let reference_sum: f64 = z.iter().map(|&v| ((v - reference_max) as f64).exp()).sum();
            let mut written = Vec::new();
            for kernel in RowKernel::available() {
                let (max, finite) = kernel.max_finite(&z);
                assert!(finite);
                assert_eq!(max, reference_max, "{kernel:?} len {len}");
                let mut out = z.clone();
                let sum = kernel.exp_sum_in_place(&mut out, max);
                assert!(
                    (sum - reference_sum).abs() <= 1e-6 * reference_sum,
                    "{kernel:?} len {len}: {sum} vs {reference_sum}"
                );
                written.push(out);
            }
            assert!(written.windows(2).all(|w| w[0] == w[1]), "len {len}");
        }
    }

    #[test]
    fn silu_gate_matches_the_library_formula_on_every_kernel() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-12.0f32..12.0)).collect();
        let u: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let d: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut outputs = Vec::new();
        for kernel in RowKernel::available() {
            let (mut out, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            kernel.silu_gate(&g, &u, &mut out);
            kernel.silu_gate_backward(&g, &u, &d, &mut dg, &mut du);
            for i in 0..n {
                let sig = 1.0 / (1.0 + (-g[i] as f64).exp());
                let silu = g[i] as f64 * sig;
                let silu_grad = sig * (1.0 + g[i] as f64 * (1.0 - sig));
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs());
                assert!(close(out[i], silu * u[i] as f64), "{kernel:?} out {i}");
                assert!(close(du[i], silu * d[i] as f64), "{kernel:?} du {i}");
                assert!(
                    close(dg[i], silu_grad * (u[i] * d[i]) as f64),
                    "{kernel:?} dg {i}"
                );
            }
            outputs.push((out, dg, du));
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn non_finite_values_are_flagged_by_every_kernel() {
        for kernel in RowKernel::available() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0usize, 5, 16, 40] {
                    let mut z = vec![1.0f32; 41];
                    z[at] = bad;
                    assert!(!kernel.max_finite(&z).1, "{kernel:?} {bad} at {at}");
                }
            }
            assert!(kernel.max_finite(&[1.0f32; 41]).1);
        }
    }
}
