//! 4-bit dequantization kernels: `code_value[c] · scale` for a run of packed codes.
//!
//! Every kernel gives the same bits (one `f32` multiply of the same two numbers), so the
//! choice is speed only. [`DequantKernel::Avx512`] (chosen at run time with AVX-512F) looks
//! 16 codes up at once in the 16-entry codebook held in one register (`vpermps`);
//! [`DequantKernel::Scalar`] reads a static byte → (high, low) pair table, built once per
//! codebook instead of on every call (the tiled `dy·W` of QLoRA dequantizes one short run
//! per row of `W`, thousands per product).

use std::sync::OnceLock;

use super::FourBitType;

/// Which dequantization kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DequantKernel {
    /// AVX-512F codebook lookups, 32 values per step (x86-64 only).
    Avx512,
    /// The byte → pair table, two values per byte (any CPU).
    Scalar,
}

impl DequantKernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        if Self::Avx512.is_available() {
            Self::Avx512
        } else {
            Self::Scalar
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512 => false,
        }
    }

    /// Every kernel this CPU can run (tests force each one).
    pub fn available() -> Vec<Self> {
        [Self::Avx512, Self::Scalar]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// A short name for tables and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Scalar => "scalar",
        }
    }
}

/// The unscaled code values of both nibbles of every byte: `(code[b >> 4], code[b & 15])`.
/// One load per byte then a multiply by the block scale gives the same bits as looking up
/// each nibble and multiplying.
type PairTable = [[f32; 2]; 256];

fn build_pairs(code: &[f32; 16]) -> PairTable {
    std::array::from_fn(|b| [code[b >> 4], code[b & 15]])
}

/// The pair table of `quant_type`, built on first use.
fn pair_table(quant_type: FourBitType) -> &'static PairTable {
    static NF4: OnceLock<PairTable> = OnceLock::new();
    static FP4: OnceLock<PairTable> = OnceLock::new();
    let cell = match quant_type {
        FourBitType::Nf4 => &NF4,
        FourBitType::Fp4 => &FP4,
    };
    cell.get_or_init(|| build_pairs(quant_type.code()))
}

/// Writes `code_value · scale` for the flat elements `start..start + out.len()` of one block,
/// reading codes from `packed` (indexed by flat element / 2). `kernel` must be available.
#[inline]
pub(super) fn dequantize_segment(
    kernel: DequantKernel,
    quant_type: FourBitType,
    scale: f32,
    packed: &[u8],
    start: usize,
    out: &mut [f32],
) {
    let pairs = pair_table(quant_type);
    let mut out = out;
    let mut index = start;
    if index % 2 == 1 && !out.is_empty() {
        out[0] = pairs[packed[index / 2] as usize][1] * scale;
        out = &mut out[1..];
        index += 1;
    }
    let bytes = &packed[index / 2..];
    #[cfg(target_arch = "x86_64")]
    if kernel == DequantKernel::Avx512 && out.len() >= 32 {
        let done = out.len() / 32 * 32;
        // SAFETY: the caller only passes an available kernel (AVX-512F present); `bytes`
        // holds at least `done / 2` bytes because `packed` covers every element of `out`.
        unsafe {
            avx512::dequantize_pairs(
                quant_type.code(),
                scale,
                &bytes[..done / 2],
                &mut out[..done],
            )
        };
        scalar_from_even(pairs, scale, &bytes[done / 2..], &mut out[done..]);
        return;
    }
    let _ = kernel;
    scalar_from_even(pairs, scale, bytes, out);
}

/// `out` starts at an even element, whose code is the high nibble of `bytes[0]`.
#[inline]
fn scalar_from_even(pairs: &PairTable, scale: f32, bytes: &[u8], out: &mut [f32]) {
    let tail_byte = out.len() / 2;
    let mut chunks = out.chunks_exact_mut(2);
    for (pair, &byte) in (&mut chunks).zip(bytes) {
        let [hi, lo] = pairs[byte as usize];
        pair[0] = hi * scale;
        pair[1] = lo * scale;
    }
    if let [last] = chunks.into_remainder() {
        *last = pairs[bytes[tail_byte] as usize][0] * scale;
    }
}

#[cfg(target_arch = "x86_64")]
// The AVX-512 intrinsics are stable from Rust 1.89: building the x86-64 kernels needs it
// although the workspace still declares 1.85 (see docs/PERFORMANCE.md, "Not done").
#[clippy::msrv = "1.89"]
mod avx512 {
    use std::arch::x86_64::*;

    /// `out[2i] = code[bytes[i] >> 4]·scale`, `out[2i+1] = code[bytes[i] & 15]·scale`, for
    /// `out.len() = 2·bytes.len()`, a multiple of 32.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dequantize_pairs(
        code: &[f32; 16],
        scale: f32,
        bytes: &[u8],
        out: &mut [f32],
    ) {
        let table = _mm512_loadu_ps(code.as_ptr());
        let scale = _mm512_set1_ps(scale);
        let low_nibble = _mm512_set1_epi32(15);
        for (chunk, dst) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(chunk.as_ptr() as *const __m128i));
            // Each 32-bit lane holds (high nibble, low nibble) as two 16-bit indices, so the
            // 32 indices in 16-bit order are the output order.
            let idx16 = _mm512_or_si512(
                _mm512_srli_epi32(b, 4),
                _mm512_slli_epi32(_mm512_and_si512(b, low_nibble), 16),
            );
            let first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx16));
            let second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(idx16));
            let v0 = _mm512_mul_ps(_mm512_permutexvar_ps(first, table), scale);
            let v1 = _mm512_mul_ps(_mm512_permutexvar_ps(second, table), scale);
            _mm512_storeu_ps(dst.as_mut_ptr(), v0);
            _mm512_storeu_ps(dst.as_mut_ptr().add(16), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::FourBitTensor;
    use proptest::prelude::*;

    fn tensor(len: usize, blocksize: usize, quant_type: FourBitType, dq: bool) -> FourBitTensor {
        let w: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 97) as f32))
            .collect();
        FourBitTensor::quantize(&w, &[len], blocksize, quant_type, dq).unwrap()
    }

    /// Element by element from the codebook: what every kernel must reproduce bit for bit.
    fn reference(q: &FourBitTensor, start: usize, end: usize) -> Vec<f32> {
        let codes = q.codes();
        let scales = q.absmax_values();
        let code = q.quant_type().code();
        (start..end)
            .map(|i| code[codes[i] as usize] * scales[i / q.blocksize()])
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_kernel_gives_the_reference_bits(
            len in 1usize..2000,
            a in 0usize..2000,
            b in 0usize..2000,
            fp4 in any::<bool>(),
            dq in any::<bool>(),
        ) {
            let quant_type = if fp4 { FourBitType::Fp4 } else { FourBitType::Nf4 };
            let q = tensor(len, 64, quant_type, dq);
            let (start, end) = ((a % (len + 1)).min(b % (len + 1)), (a % (len + 1)).max(b % (len + 1)));
            let want = reference(&q, start, end);
            for kernel in DequantKernel::available() {
                let mut out = vec![f32::NAN; end - start];
                q.dequantize_range_with(kernel, start, end, &mut out).unwrap();
                let same = out.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "{} {start}..{end} of {len}", kernel.name());
            }
        }
    }

    #[test]
    fn whole_tensor_matches_the_reference() {
        let q = tensor(4096 * 3 + 17, 128, FourBitType::Nf4, true);
        let want = reference(&q, 0, q.len());
        let got = q.dequantize();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn unavailable_kernel_is_refused_by_name() {
        if DequantKernel::Avx512.is_available() {
            return;
        }
        let q = tensor(64, 64, FourBitType::Nf4, false);
        let mut out = vec![0.0; 64];
        let e = q
            .dequantize_range_with(DequantKernel::Avx512, 0, 64, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("avx512"), "{e}");
    }
}
