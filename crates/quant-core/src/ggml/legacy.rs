//! The 32-value block types: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`. Each block is an f16
//! scale `d` (and an f16 minimum `m` for the `_1` types) followed by the codes. The
//! encoders follow ggml's `quantize_row_*_ref` operation for operation (same f32 arithmetic,
//! same truncations and clamps), so their bytes equal llama.cpp's; the decoders follow
//! `dequantize_row_*` (an integer code converted to f32, one product with `d`, one sum with
//! `m` — never a fused multiply-add).

use half::f16;

use super::QK;

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The first value of largest magnitude, sign kept (ggml's `max` of the symmetric types).
fn signed_absmax(block: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in block {
        // Strictly greater: the first value of largest magnitude wins.
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(block: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in block {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int8_t)x` for the quantizers' arguments, which lie in `[0, 128)`: truncation.
fn trunc_i8(x: f32) -> i32 {
    i32::from(x as i8)
}

/// `quantize_row_q8_0_ref` for one block.
pub(super) fn encode_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    // `f32::round` rounds half away from zero, as C's `roundf`.
    out.extend(block.iter().map(|&x| ((x * id).round() as i8) as u8));
}

/// `quantize_row_q4_0_ref` for one block: `d = max / −8`, code `min(15, trunc(x/d + 8.5))`.
pub(super) fn encode_q4_0(block: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(block) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let code = |x: f32| trunc_i8(x * id + 8.5).min(15) as u8;
    for j in 0..QK / 2 {
        out.push(code(block[j]) | (code(block[j + QK / 2]) << 4));
    }
}

/// `quantize_row_q4_1_ref` for one block: `d = (max − min)/15`, `m = min`, code
/// `min(15, trunc((x − min)/d + 0.5))`.
pub(super) fn encode_q4_1(block: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(block);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let code = |x: f32| trunc_i8((x - min) * id + 0.5).min(15) as u8;
    for j in 0..QK / 2 {
        out.push(code(block[j]) | (code(block[j + QK / 2]) << 4));
    }
}

/// The 5-bit codes of a block split as ggml stores them: `qh` holds bit 4 of code `j` at
/// bit `j`, `qs[j]` the low nibbles of codes `j` and `j + 16`.
pub(super) fn push_5bit(codes: &[u8; QK], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (j, &c) in codes.iter().enumerate() {
        qh |= u32::from((c & 0x10) >> 4) << j;
    }
    out.extend_from_slice(&qh.to_le_bytes());
    for j in 0..QK / 2 {
        out.push((codes[j] & 0x0F) | ((codes[j + QK / 2] & 0x0F) << 4));
    }
}

/// `quantize_row_q5_0_ref` for one block: `d = max / −16`, code
/// `min(31, trunc(x/d + 16.5))`.
pub(super) fn encode_q5_0(block: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(block) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let mut codes = [0u8; QK];
    for (c, &x) in codes.iter_mut().zip(block) {
        *c = trunc_i8(x * id + 16.5).min(31) as u8;
    }
    push_5bit(&codes, out);
}

/// `quantize_row_q5_1_ref` for one block: `d = (max − min)/31`, `m = min`, code
/// `trunc((x − min)/d + 0.5)` (ggml clamps nothing here; only 5 bits are stored).
pub(super) fn encode_q5_1(block: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(block);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let mut codes = [0u8; QK];
    for (c, &x) in codes.iter_mut().zip(block) {
        // C's `(uint8_t)` of a value in [0, 32]: truncation.
        *c = ((x - min) * id + 0.5) as u8;
    }
    push_5bit(&codes, out);
}

/// `dequantize_row_q8_0` for one block.
pub(super) fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..2 + QK]) {
        *o = f32::from(q as i8) * d;
    }
}

/// `dequantize_row_q4_0` for one block.
pub(super) fn decode_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..2 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
        out[j + QK / 2] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// `dequantize_row_q4_1` for one block.
pub(super) fn decode_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..4 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = f32::from(q & 0x0F) * d + m;
        out[j + QK / 2] = f32::from(q >> 4) * d + m;
    }
}

/// The 32 five-bit codes of a `Q5_0`/`Q5_1` block from `qh` (4 bytes) and `qs` (16).
fn codes_5bit(qh: &[u8], qs: &[u8]) -> [i32; QK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut codes = [0i32; QK];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + QK / 2)) & 1) << 4;
        codes[j] = i32::from(q & 0x0F) | h0 as i32;
        codes[j + QK / 2] = i32::from(q >> 4) | h1 as i32;
    }
    codes
}

/// `dequantize_row_q5_0` for one block.
pub(super) fn decode_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let codes = codes_5bit(&block[2..6], &block[6..6 + QK / 2]);
    for (o, c) in out.iter_mut().zip(codes) {
        *o = (c - 16) as f32 * d;
    }
}

/// `dequantize_row_q5_1` for one block.
pub(super) fn decode_q5_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let codes = codes_5bit(&block[4..8], &block[8..8 + QK / 2]);
    for (o, c) in out.iter_mut().zip(codes) {
        *o = c as f32 * d + m;
    }
}
