//! ggml's tensor types as GGUF files store them: `F32`, `F16`, and the 32-value blocks
//! `Q8_0` and `Q4_0`, quantized bit-identically to ggml's reference quantizers
//! (`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` in `ggml-quants.c`), the ones llama.cpp
//! uses to create model files deterministically.
//!
//! - `Q8_0` (34 bytes per 32 values): `d = amax / 127` computed in `f32`, stored as `f16`
//!   (round to nearest even); `q[j] = roundf(x[j] · (1/d))` (ties away from zero) as `i8`,
//!   with `1/d` taken from the `f32` `d`, and `0` when `d == 0`. Value = `q · f16(d)`.
//! - `Q4_0` (18 bytes per 32 values): `max` is the first value of largest magnitude, sign
//!   kept; `d = max / -8`; `q[j] = min(15, trunc(x[j] · (1/d) + 8.5))`; byte `j` of the 16
//!   holds `q[j]` in its low nibble and `q[j + 16]` in its high nibble. Value = `(q − 8) ·
//!   f16(d)`. The value of largest magnitude maps to code 0 (`−8·d = max`), so the grid
//!   reaches `max` exactly and stops one step short on the other side (`+7·d`).
//!
//! ```
//! use quant_core::ggml::{dequantize, quantize, GgmlType};
//! let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
//! let q8 = quantize(GgmlType::Q8_0, &x).unwrap();
//! assert_eq!(q8.len(), 34);
//! let back = dequantize(GgmlType::Q8_0, &q8, 32).unwrap();
//! assert!(back.iter().zip(&x).all(|(b, x)| (b - x).abs() <= 16.0 / 127.0));
//! ```

use half::f16;

use crate::error::{QuantError, Result};

pub use formats::ggml_type::{GgmlType, ALL_TYPES, QK, QK_K};

/// Values per block of `Q8_0` and `Q4_0`.
pub const BLOCK_VALUES: usize = QK;

/// The worst-case absolute error of one value after a round trip, given the largest
/// magnitude `amax` of its block: half a step for `Q8_0`, a whole step for `Q4_0` (the
/// side opposite the block's extreme is clipped at `7·d`, one step short of `amax`), plus
/// the `f16` rounding of the scale (at most `2⁻¹¹` relative); `f16`'s half-ulp for `F16`,
/// bf16's for `BF16`; zero for `F32`.
pub fn error_bound(ty: GgmlType, amax: f32) -> Result<f32> {
    let f16_rel = 1.0 / 2048.0;
    Ok(match ty {
        GgmlType::F32 => 0.0,
        // f16 has an 11-bit significand; below its normal range the step is 2^-24.
        GgmlType::F16 => amax * f16_rel + 6.0e-8,
        GgmlType::BF16 => amax / 256.0,
        GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * f16_rel * 1.01,
        GgmlType::Q4_0 => amax / 8.0 + amax * f16_rel * 1.01,
        other => return Err(unsupported(other)),
    })
}

fn unsupported(ty: GgmlType) -> QuantError {
    QuantError::invalid(
        "ggml type",
        ty.name(),
        "this build quantizes f32, f16, bf16, q8_0 and q4_0",
    )
}

fn check_finite(context: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            context: context.to_string(),
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Encodes `values` (row-major, a whole number of blocks for the block types) as `ty`.
/// Errors on a NaN or infinity (ggml would write garbage) or a partial block.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    check_finite(&format!("{} quantization input", ty.name()), values)?;
    let mut out = Vec::with_capacity(ty.bytes_for(values.len())?);
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => {
            for (i, v) in values.iter().enumerate() {
                let h = f16::from_f32(*v);
                if !h.is_finite() {
                    return Err(QuantError::invalid(
                        format!("f16 value at index {i}"),
                        v,
                        "outside f16's range (|x| > 65504)",
                    ));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::Q8_0 => values
            .chunks_exact(BLOCK_VALUES)
            .for_each(|block| quantize_block_q8_0(block, &mut out)),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q4_0 => values
            .chunks_exact(BLOCK_VALUES)
            .for_each(|block| quantize_block_q4_0(block, &mut out)),
        other => return Err(unsupported(other)),
    }
    Ok(out)
}

/// `quantize_row_q8_0_ref` for one block of 32 values, appended to `out`.
fn quantize_block_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // `f32::round` rounds half away from zero, as C's `roundf`.
    out.extend(block.iter().map(|&x| ((x * id).round() as i8) as u8));
}

/// `quantize_row_q4_0_ref` for one block of 32 values, appended to `out`.
fn quantize_block_q4_0(block: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in block {
        // Strictly greater: the first value of largest magnitude wins, sign kept.
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // C's `(int8_t)(x*id + 8.5f)` truncates toward zero; the argument lies in [0, 17).
    let code = |x: f32| ((x * id + 8.5).trunc() as i32).min(15) as u8;
    let half = BLOCK_VALUES / 2;
    for j in 0..half {
        out.push(code(block[j]) | (code(block[j + half]) << 4));
    }
}

/// Decodes `n` values of type `ty` from `bytes` (which must be exactly their size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let expected = ty.bytes_for(n)?;
    if bytes.len() != expected {
        return Err(QuantError::shape(
            format!("{} data of {n} values", ty.name()),
            format!("{expected} bytes"),
            bytes.len(),
        ));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(ty.block_bytes()) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for block in bytes.chunks_exact(ty.block_bytes()) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let qs = &block[2..];
                // As ggml: the integer code minus 8, then one product with the scale.
                out.extend(qs.iter().map(|&q| (i32::from(q & 0x0F) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
        }
        other => return Err(unsupported(other)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_from(values: &[(usize, f32)]) -> Vec<f32> {
        let mut b = vec![0.0f32; 32];
        for &(i, v) in values {
            b[i] = v;
        }
        b
    }

    #[test]
    fn q8_0_hand_checked_block() {
        // amax = 127 → d = 1 exactly; x·1 rounds half away from zero: 2.5 → 3, −2.5 → −3,
        // 0.49 → 0, −0.5 → −1.
        let x = block_from(&[
            (0, 127.0),
            (1, 2.5),
            (2, -2.5),
            (3, 0.49),
            (4, -0.5),
            (31, -127.0),
        ]);
        let bytes = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(1.0).to_le_bytes());
        let q: Vec<i8> = bytes[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(&q[..5], &[127, 3, -3, 0, -1]);
        assert_eq!(q[31], -127);
        assert!(q[5..31].iter().all(|&v| v == 0));
    }

    #[test]
    fn q8_0_scale_is_rounded_to_f16_but_codes_use_the_f32_scale() {
        // amax = 1 → d = 1/127 (not an f16); id = 127 from the f32 d, so 0.5 → 63.5 → 64.
        let x = block_from(&[(0, 1.0), (1, 0.5), (2, -1.0)]);
        let bytes = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(1.0f32 / 127.0).to_le_bytes());
        let id = 1.0f32 / (1.0f32 / 127.0);
        assert_eq!(bytes[3] as i8, (0.5f32 * id).round() as i8);
        assert_eq!(bytes[2] as i8, 127);
        assert_eq!(bytes[4] as i8, -127);
    }

    #[test]
    fn zero_blocks_encode_as_zero_scale_and_zero_codes() {
        let x = vec![0.0f32; 64];
        let q8 = quantize(GgmlType::Q8_0, &x).unwrap();
        assert!(q8.iter().all(|&b| b == 0));
        let q4 = quantize(GgmlType::Q4_0, &x).unwrap();
        // d = 0 / −8 = −0.0 (f16 0x8000, as in C); id = 0 → every code is trunc(8.5) = 8.
        for block in q4.chunks_exact(18) {
            assert_eq!(&block[..2], &[0x00, 0x80]);
            assert!(block[2..].iter().all(|&b| b == 0x88));
        }
        assert!(dequantize(GgmlType::Q4_0, &q4, 64)
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn q4_0_positive_max_hand_checked() {
        // max = 8 → d = −1, id = −1: x=8 → trunc(−8+8.5)=0; x=−7 → 15; x=1.5 → trunc(7)=7;
        // x=0.5 → trunc(8.0)=8; x=−0.5 → trunc(9.0)=9; x=−8 → trunc(16.5)=16 → min 15.
        let mut x = block_from(&[(0, 8.0), (1, -7.0), (2, 1.5), (3, 0.5), (4, -0.5)]);
        x[16] = -8.0;
        x[17] = 3.0;
        let bytes = quantize(GgmlType::Q4_0, &x).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(-1.0).to_le_bytes());
        let qs = &bytes[2..];
        assert_eq!(qs[0], 15 << 4); // low: x[0]=8 → 0, high: x[16]=−8 → 15
        assert_eq!(qs[1], 15 | (trunc_code(3.0, -1.0) << 4));
        assert_eq!(qs[2] & 0x0F, 7);
        assert_eq!(qs[3] & 0x0F, 8);
        assert_eq!(qs[4] & 0x0F, 9);
        assert_eq!(qs[5], 0x88);
        let back = dequantize(GgmlType::Q4_0, &bytes, 32).unwrap();
        assert_eq!(back[0], 8.0);
        assert_eq!(back[16], -7.0, "the far side saturates at +7·d = −7");
    }

    fn trunc_code(x: f32, d: f32) -> u8 {
        ((x * (1.0 / d) + 8.5).trunc() as i32).min(15) as u8
    }

    #[test]
    fn q4_0_negative_max_and_ties_of_magnitude() {
        // −4 and +4 tie in magnitude: the first one (−4) sets max, so d = 0.5 and −4 → 0.
        let x = block_from(&[(3, -4.0), (7, 4.0), (8, 1.0), (9, 0.75)]);
        let bytes = quantize(GgmlType::Q4_0, &x).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(0.5).to_le_bytes());
        let qs = &bytes[2..];
        assert_eq!(qs[3] & 0x0F, 0);
        // 4·2 + 8.5 = 16.5 → 16 → clamped to 15.
        assert_eq!(qs[7] & 0x0F, 15);
        // 1·2 + 8.5 = 10.5 → 10; 0.75·2 + 8.5 = 10.0 → 10.
        assert_eq!(qs[8] & 0x0F, 10);
        assert_eq!(qs[9] & 0x0F, 10);
        // The reverse order makes +4 the max: d = −0.5.
        let y = block_from(&[(3, 4.0), (7, -4.0)]);
        let bytes = quantize(GgmlType::Q4_0, &y).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(-0.5).to_le_bytes());
    }

    #[test]
    fn round_trips_stay_within_the_error_bound() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..32 * 40)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len(), ty.bytes_for(x.len()).unwrap());
            let back = dequantize(ty, &bytes, x.len()).unwrap();
            for (bx, xb) in back.chunks(32).zip(x.chunks(32)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (b, v) in bx.iter().zip(xb) {
                    assert!(
                        (b - v).abs() <= error_bound(ty, amax).unwrap(),
                        "{ty:?}: {v} → {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(quantize(GgmlType::Q8_0, &[1.0; 31]).is_err());
        let mut x = vec![0.0f32; 32];
        x[5] = f32::NAN;
        let err = quantize(GgmlType::Q4_0, &x).unwrap_err();
        assert!(err.to_string().contains("index 5"), "{err}");
        assert!(quantize(GgmlType::F16, &[1e6]).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
        assert!(GgmlType::from_id(9).is_err());
        assert_eq!(GgmlType::from_name("Q8_0").unwrap(), GgmlType::Q8_0);
    }
}
