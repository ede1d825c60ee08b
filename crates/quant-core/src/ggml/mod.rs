//! ggml's tensor types as GGUF files store them — `F32`, `F16`, `BF16`, the 32-value blocks
//! `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` and the 256-value K types `Q2_K` … `Q6_K` — with
//! encoders bit-identical to ggml's reference quantizers (`quantize_row_*_ref` in
//! `ggml-quants.c`, what `llama_model_quantize` runs without an importance matrix) and decoders
//! bit-identical to `dequantize_row_*`. The block layouts are in docs/FORMATS.md; the type ids
//! and block sizes are the `formats` crate's ([`GgmlType`]).
//!
//! - [`legacy`]: the 32-value types (`d = max/−8` for `Q4_0`, `(max − min)/15` and `m = min`
//!   for `Q4_1`, ...).
//! - [`kquants`]: the K types and their packed sub-block scales; their scale searches
//!   (`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`) are in [`search`].
//!
//! A row whose length is not a whole number of blocks cannot be stored in a block type; what
//! llama.cpp then does is [`fallback_type`].
//!
//! ```
//! use quant_core::ggml::{dequantize, quantize, GgmlType};
//! let x: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 32.0).collect();
//! for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q4_K, GgmlType::Q6_K] {
//!     let blocks = quantize(ty, &x).unwrap();
//!     assert_eq!(blocks.len(), ty.bytes_for(256).unwrap());
//!     let back = dequantize(ty, &blocks, 256).unwrap();
//!     assert!(back.iter().zip(&x).all(|(b, x)| (b - x).abs() < 0.3), "{ty}");
//! }
//! ```

use std::ops::Range;

use half::f16;

use crate::error::{QuantError, Result};

pub mod kquants;
pub mod legacy;
pub mod qat;
pub mod qat_k;
pub mod search;

pub use formats::ggml_type::{GgmlType, ALL_TYPES, QK, QK_K};

/// Values per block of the 32-value types.
pub const BLOCK_VALUES: usize = QK;

/// The worst-case absolute error of one value after a round trip, given the largest
/// magnitude `amax` of its block: half a step for `Q8_0`, a whole step for `Q4_0` (the
/// side opposite the block's extreme is clipped at `7·d`, one step short of `amax`), plus
/// the `f16` rounding of the scale (at most `2⁻¹¹` relative); `f16`'s half-ulp for `F16`,
/// bf16's for `BF16`; zero for `F32`. The other block types have no closed-form bound
/// (their scales come from a search) and are refused.
pub fn error_bound(ty: GgmlType, amax: f32) -> Result<f32> {
    let f16_rel = 1.0 / 2048.0;
    Ok(match ty {
        GgmlType::F32 => 0.0,
        // f16 has an 11-bit significand; below its normal range the step is 2^-24.
        GgmlType::F16 => amax * f16_rel + 6.0e-8,
        GgmlType::BF16 => amax / 256.0,
        GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * f16_rel * 1.01,
        GgmlType::Q4_0 => amax / 8.0 + amax * f16_rel * 1.01,
        other => {
            return Err(QuantError::invalid(
                "ggml type for error_bound",
                other,
                "a closed-form bound exists for f32, f16, bf16, q8_0 and q4_0 only",
            ))
        }
    })
}

/// The type llama.cpp stores a tensor in when `ty` is requested for rows of `row_len` values
/// (`llama_tensor_get_type`'s `convert_incompatible_tensor` rule): `ty` itself when the rows
/// are whole blocks; otherwise `Q4_K → Q5_0`, `Q5_K → Q5_1`, `Q6_K → Q8_0`, and `F16` when the
/// 32-value fallback does not divide the rows either. llama.cpp sends `Q2_K`/`Q3_K` to
/// `IQ4_NL`, which this crate does not implement: an error says so (unless the rows are not
/// whole 32-blocks either, where llama.cpp's answer is `F16`). For the 32-value types
/// llama.cpp has no fallback and stops ("Unsupported tensor size"): an error here too.
///
/// ```
/// use quant_core::ggml::{fallback_type, GgmlType};
/// assert_eq!(fallback_type(GgmlType::Q4_K, 4096).unwrap(), GgmlType::Q4_K);
/// assert_eq!(fallback_type(GgmlType::Q4_K, 576).unwrap(), GgmlType::Q5_0);
/// assert_eq!(fallback_type(GgmlType::Q6_K, 100).unwrap(), GgmlType::F16);
/// assert!(fallback_type(GgmlType::Q3_K, 576).is_err());
/// assert!(fallback_type(GgmlType::Q4_0, 100).is_err());
/// ```
pub fn fallback_type(ty: GgmlType, row_len: usize) -> Result<GgmlType> {
    if row_len % ty.block_values() == 0 {
        return Ok(ty);
    }
    let narrower = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_K | GgmlType::Q3_K => {
            if row_len % QK != 0 {
                return Ok(GgmlType::F16);
            }
            return Err(QuantError::invalid(
                format!("ggml type {ty} for rows of"),
                row_len,
                "rows are not whole 256-value super-blocks and llama.cpp's fallback type \
                 for them, IQ4_NL, is not supported",
            ));
        }
        _ => {
            return Err(QuantError::invalid(
                format!("ggml type {ty} for rows of"),
                row_len,
                format!(
                    "rows are not whole {}-value blocks and llama.cpp has no fallback for \
                     this type (\"Unsupported tensor size\")",
                    ty.block_values()
                ),
            ))
        }
    };
    Ok(if row_len % narrower.block_values() == 0 {
        narrower
    } else {
        GgmlType::F16
    })
}

fn check_finite(context: &str, values: &[f32]) -> Result<()> {
    crate::error::check_finite(context, values)
}

/// Encodes `values` (row-major, a whole number of blocks for the block types) as `ty`.
/// Errors on a NaN or infinity (ggml would write garbage), a value outside f16's range for
/// `F16`, or a partial block.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    check_finite(&format!("{ty} quantization input"), values)?;
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
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        _ => {
            let encode = block_encoder(ty);
            for block in values.chunks_exact(ty.block_values()) {
                encode(block, &mut out);
            }
        }
    }
    Ok(out)
}

/// Encodes a row-major matrix of rows of `row_len` values; errors (naming llama.cpp's
/// fallback type, see [`fallback_type`]) when a row is not a whole number of blocks.
pub fn quantize_rows(ty: GgmlType, values: &[f32], row_len: usize) -> Result<Vec<u8>> {
    if row_len == 0 || values.len() % row_len != 0 {
        return Err(QuantError::shape(
            format!("{ty} rows of {row_len} values"),
            "a whole number of non-empty rows",
            format!("{} values", values.len()),
        ));
    }
    if row_len % ty.block_values() != 0 {
        let hint = match fallback_type(ty, row_len) {
            Ok(f) => format!("llama.cpp would store this tensor as {f}"),
            Err(e) => e.to_string(),
        };
        return Err(QuantError::invalid(
            format!("row length for {ty}"),
            row_len,
            format!(
                "not a multiple of the {}-value block; {hint}",
                ty.block_values()
            ),
        ));
    }
    quantize(ty, values)
}

type BlockEncoder = fn(&[f32], &mut Vec<u8>);
type BlockDecoder = fn(&[u8], &mut [f32]);

fn block_encoder(ty: GgmlType) -> BlockEncoder {
    match ty {
        GgmlType::Q4_0 => legacy::encode_q4_0,
        GgmlType::Q4_1 => legacy::encode_q4_1,
        GgmlType::Q5_0 => legacy::encode_q5_0,
        GgmlType::Q5_1 => legacy::encode_q5_1,
        GgmlType::Q8_0 => legacy::encode_q8_0,
        GgmlType::Q2_K => kquants::encode_q2_k,
        GgmlType::Q3_K => kquants::encode_q3_k,
        GgmlType::Q4_K => kquants::encode_q4_k,
        GgmlType::Q5_K => kquants::encode_q5_k,
        GgmlType::Q6_K => kquants::encode_q6_k,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("float types have no blocks")
        }
    }
}

fn block_decoder(ty: GgmlType) -> BlockDecoder {
    match ty {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, o| o[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => legacy::decode_q4_0,
        GgmlType::Q4_1 => legacy::decode_q4_1,
        GgmlType::Q5_0 => legacy::decode_q5_0,
        GgmlType::Q5_1 => legacy::decode_q5_1,
        GgmlType::Q8_0 => legacy::decode_q8_0,
        GgmlType::Q2_K => kquants::decode_q2_k,
        GgmlType::Q3_K => kquants::decode_q3_k,
        GgmlType::Q4_K => kquants::decode_q4_k,
        GgmlType::Q5_K => kquants::decode_q5_k,
        GgmlType::Q6_K => kquants::decode_q6_k,
    }
}

/// Decodes `bytes` (a whole number of blocks of `ty`) into `out`, whose length must be the
/// number of values they hold.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = ty.bytes_for(out.len())?;
    if bytes.len() != expected {
        return Err(QuantError::shape(
            format!("{ty} data of {} values", out.len()),
            format!("{expected} bytes"),
            bytes.len(),
        ));
    }
    match ty {
        // Whole-slice conversions for the float types (the per-value decoder would do too,
        // one call per value).
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let decode = block_decoder(ty);
            for (o, b) in out
                .chunks_exact_mut(ty.block_values())
                .zip(bytes.chunks_exact(ty.block_bytes()))
            {
                decode(b, o);
            }
        }
    }
    Ok(())
}

/// Decodes `n` values of type `ty` from `bytes` (which must be exactly their size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let expected = ty.bytes_for(n)?;
    if bytes.len() != expected {
        return Err(QuantError::shape(
            format!("{ty} data of {n} values"),
            format!("{expected} bytes"),
            bytes.len(),
        ));
    }
    let mut out = vec![0.0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Decodes rows `rows` of a row-major matrix of rows of `row_len` values stored as `ty` in
/// `bytes` (all its rows) into `out` (`rows.len() · row_len` values) — the band a tiled
/// product needs, without decoding the rest.
///
/// ```
/// use quant_core::ggml::{dequantize, dequantize_rows, quantize, GgmlType};
/// let x: Vec<f32> = (0..4 * 64).map(|i| (i % 17) as f32 - 8.0).collect();
/// let q = quantize(GgmlType::Q5_1, &x).unwrap();
/// let all = dequantize(GgmlType::Q5_1, &q, x.len()).unwrap();
/// let mut band = vec![0.0; 2 * 64];
/// dequantize_rows(GgmlType::Q5_1, &q, 64, 1..3, &mut band).unwrap();
/// assert_eq!(band, all[64..192]);
/// ```
pub fn dequantize_rows(
    ty: GgmlType,
    bytes: &[u8],
    row_len: usize,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    let row_bytes = ty.bytes_for(row_len)?;
    let n_rows = bytes.len().checked_div(row_bytes).unwrap_or(0);
    if row_bytes == 0 || bytes.len() % row_bytes != 0 {
        return Err(QuantError::shape(
            format!("{ty} matrix with rows of {row_len} values"),
            format!("a multiple of {row_bytes} bytes"),
            bytes.len(),
        ));
    }
    if rows.start > rows.end || rows.end > n_rows {
        return Err(QuantError::shape(
            format!("{ty} matrix of {n_rows} rows"),
            format!("a row range within 0..{n_rows}"),
            format!("{rows:?}"),
        ));
    }
    let n = (rows.end - rows.start) * row_len;
    if out.len() != n {
        return Err(QuantError::shape(
            format!("{ty} rows {rows:?} output"),
            format!("{n} values"),
            out.len(),
        ));
    }
    dequantize_into(
        ty,
        &bytes[rows.start * row_bytes..rows.end * row_bytes],
        out,
    )
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
