//! The K types: super-blocks of 256 values cut into sub-blocks whose scales are themselves
//! quantized against one or two f16 super-scales. Encoders follow ggml's
//! `quantize_row_q{2,3,4,5,6}_K_ref` (the searches are in [`super::search`]); decoders follow
//! `dequantize_row_q*_K`, product by product. Byte layouts (ggml-common.h):
//!
//! | type | layout (bytes) | value |
//! | --- | --- | --- |
//! | `Q2_K` (84) | `scales[16]` (low nibble scale, high nibble min), `qs[64]` (2-bit), `d`, `dmin` | `d·sc·q − dmin·m` |
//! | `Q3_K` (110) | `hmask[32]` (3rd bit), `qs[64]` (2 low bits), `scales[12]` (16 × 6-bit), `d` | `d·(sc − 32)·(q − 4·!h)` |
//! | `Q4_K` (144) | `d`, `dmin`, `scales[12]` (8 × 6-bit scale + 8 × 6-bit min), `qs[128]` | `d·sc·q − dmin·m` |
//! | `Q5_K` (176) | `d`, `dmin`, `scales[12]`, `qh[32]` (5th bit), `qs[128]` | `d·sc·q − dmin·m` |
//! | `Q6_K` (210) | `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` (i8), `d` | `d·sc·(q − 32)` |

use half::f16;

use super::search::{
    make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int, Qkx2, GROUP_MAX_EPS,
};
use super::QK_K;

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Round trip through f16, as the encoders re-read the scale they stored.
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of `Q4_K`/`Q5_K`.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 signed 6-bit scales of a `Q3_K` block (`scale − 32`).
fn q3_k_scales(scales: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 {
            scales[j] & 0xF
        } else {
            scales[j - 8] >> 4
        };
        let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = i32::from(low | (high << 4)) - 32;
    }
    out
}

/// Packs 2-bit codes as `Q2_K`/`Q3_K` do: byte `l` of each 32-byte group of a 128-value half
/// holds codes `l`, `l + 32`, `l + 64`, `l + 96` in bits 0–1, 2–3, 4–5, 6–7.
fn pack_2bit(l: &[u8], qs: &mut [u8]) {
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for k in 0..32 {
            qs[h * 32 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

/// `quantize_row_q2_K_ref` for one super-block.
pub(super) fn encode_q2_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0.0f32; 16];
    let (mut mins, mut scales) = ([0.0f32; 16], [0.0f32; 16]);
    let q4scale = 15.0f32;
    let p = Qkx2 {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(&p, xs, &weights, &mut l[16 * j..16 * j + 16], &mut laux);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sc = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        max_scale / q4scale
    } else {
        0.0
    };
    let dmin = if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        max_min / q4scale
    } else {
        0.0
    };
    let (d16, dmin16) = (f16_round(d), f16_round(dmin));
    for j in 0..16 {
        let dj = d16 * f32::from(sc[j] & 0xF);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin16 * f32::from(sc[j] >> 4);
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / dj).clamp(0, 3);
            l[16 * j + ii] = q as u8;
        }
    }
    let mut qs = [0u8; QK_K / 4];
    pack_2bit(&l, &mut qs);
    out.extend_from_slice(&sc);
    out.extend_from_slice(&qs);
    out.extend_from_slice(&f16_bytes(d));
    out.extend_from_slice(&f16_bytes(dmin));
}

/// `dequantize_row_q2_K` for one super-block.
pub(super) fn decode_q2_k(block: &[u8], y: &mut [f32]) {
    let scales = &block[..16];
    let qs = &block[16..80];
    let d = f16_at(block, 80);
    let min = f16_at(block, 82);
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0xF);
                let ml = min * f32::from(sc >> 4);
                let base = half * 128 + j * 32 + part * 16;
                for k in 0..16 {
                    let code = (q[part * 16 + k] >> shift) & 3;
                    y[base + k] = dl * f32::from(code) - ml;
                }
            }
        }
    }
}

/// `quantize_row_q3_K_ref` for one super-block.
pub(super) fn encode_q3_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }
    let mut packed = [0u8; 12];
    let d = if max_scale != 0.0 {
        let iscale = -32.0f32 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            // C: `int8_t l = nearest_int(...)`, then clamped to [-32, 31] and offset by 32.
            let li = i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32;
            let li = li as u8;
            if j < 8 {
                packed[j] = li & 0xF;
            } else {
                packed[j - 8] |= (li & 0xF) << 4;
            }
            packed[j % 4 + 8] |= (li >> 4) << (2 * (j / 4));
        }
        1.0 / iscale
    } else {
        0.0
    };
    let d16 = f16_round(d);
    let sc = q3_k_scales(&packed);
    for j in 0..16 {
        let dj = d16 * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    let mut hmask = [0u8; QK_K / 8];
    let mut lu = [0u8; QK_K];
    let (mut m, mut hm) = (0usize, 1u8);
    for j in 0..QK_K {
        let mut v = l[j] as u8;
        if v > 3 {
            hmask[m] |= hm;
            v -= 4;
        }
        lu[j] = v;
        m += 1;
        if m == QK_K / 8 {
            m = 0;
            hm = hm.wrapping_shl(1);
        }
    }
    let mut qs = [0u8; QK_K / 4];
    pack_2bit(&lu, &mut qs);
    out.extend_from_slice(&hmask);
    out.extend_from_slice(&qs);
    out.extend_from_slice(&packed);
    out.extend_from_slice(&f16_bytes(d));
}

/// `dequantize_row_q3_K` for one super-block.
pub(super) fn decode_q3_k(block: &[u8], y: &mut [f32]) {
    let hm = &block[..32];
    let qs = &block[32..96];
    let scales = q3_k_scales(&block[96..108]);
    let d_all = f16_at(block, 108);
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                let base = half * 128 + j * 32 + part * 16;
                for k in 0..16 {
                    let low = i32::from((q[part * 16 + k] >> shift) & 3);
                    let high = if hm[part * 16 + k] & m != 0 { 0 } else { 4 };
                    y[base + k] = dl * (low - high) as f32;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// The shared part of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: the 8 sub-block
/// searches, the 6-bit scales and mins packed into 12 bytes, the two f16 super-scales and the
/// final codes `L[i] ∈ [0, nmax]`.
struct Fitted {
    /// The searches' sub-block scales and minima before their 6-bit quantization (what a
    /// trainable `Q4_K` grid starts from, `super::qat_k`).
    scales: [f32; 8],
    mins: [f32; 8],
    d: [u8; 2],
    dmin: [u8; 2],
    packed: [u8; 12],
    l: [u8; QK_K],
}

fn fit_q45_k(x: &[f32], p: &Qkx2) -> Fitted {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let (mut mins, mut scales) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(p, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // C: `uint8_t ls = nearest_int(...)` (truncated to a byte), then `MIN(63, ls)`.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_bytes(max_scale / 63.0);
    let dmin = f16_bytes(max_min / 63.0);
    let (d16, dmin16) = (
        f16::from_le_bytes(d).to_f32(),
        f16::from_le_bytes(dmin).to_f32(),
    );
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d16 * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin16 * f32::from(m);
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, p.nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    Fitted {
        scales,
        mins,
        d,
        dmin,
        packed,
        l,
    }
}

/// `make_qkx2_quants`' parameters in `quantize_row_q4_K_ref`.
const Q4_K_SEARCH: Qkx2 = Qkx2 {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
    use_mad: false,
};

/// `quantize_row_q4_K_ref` for one super-block.
pub(super) fn encode_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let f = fit_q45_k(x, &Q4_K_SEARCH);
    out.extend_from_slice(&f.d);
    out.extend_from_slice(&f.dmin);
    out.extend_from_slice(&f.packed);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|k| f.l[j + k] | (f.l[j + k + 32] << 4)));
    }
}

/// The 8 sub-block scales and minima `quantize_row_q4_K_ref` finds for one super-block,
/// before it quantizes them to 6 bits against `d = max/63`, `dmin = max/63`.
pub(super) fn q4_k_float_scales(x: &[f32]) -> ([f32; 8], [f32; 8]) {
    let f = fit_q45_k(x, &Q4_K_SEARCH);
    (f.scales, f.mins)
}

/// `dequantize_row_q4_K` for one super-block.
pub(super) fn decode_q4_k(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let min = f16_at(block, 2);
    let scales = &block[4..16];
    let qs = &block[16..144];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let q = &qs[g * 32..g * 32 + 32];
        for k in 0..32 {
            y[g * 64 + k] = d1 * f32::from(q[k] & 0xF) - m1;
            y[g * 64 + 32 + k] = d2 * f32::from(q[k] >> 4) - m2;
        }
    }
}

/// `quantize_row_q5_K_ref` for one super-block.
pub(super) fn encode_q5_k(x: &[f32], out: &mut Vec<u8>) {
    let p = Qkx2 {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let f = fit_q45_k(x, &p);
    let mut qh = [0u8; QK_K / 8];
    let mut ql = [0u8; QK_K / 2];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (g, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = f.l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = f.l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[g * 32 + j] = l1 | (l2 << 4);
        }
        m1 = m1.wrapping_shl(2);
        m2 = m2.wrapping_shl(2);
    }
    out.extend_from_slice(&f.d);
    out.extend_from_slice(&f.dmin);
    out.extend_from_slice(&f.packed);
    out.extend_from_slice(&qh);
    out.extend_from_slice(&ql);
}

/// `dequantize_row_q5_K` for one super-block.
pub(super) fn decode_q5_k(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let min = f16_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    let ql = &block[48..176];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let q = &ql[g * 32..g * 32 + 32];
        for k in 0..32 {
            let h1 = if qh[k] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[k] & u2 != 0 { 16 } else { 0 };
            y[g * 64 + k] = d1 * f32::from((q[k] & 0xF) + h1) - m1;
            y[g * 64 + 32 + k] = d2 * f32::from((q[k] >> 4) + h2) - m2;
        }
    }
}

/// The 16 sub-block scales `quantize_row_q6_K_ref` finds for one super-block (signed, before
/// their 8-bit quantization against `d = −max/128`), with the codes of that search.
pub(super) fn q6_k_float_scales(x: &[f32], l: &mut [i8; QK_K]) -> [f32; 16] {
    let mut scales = [0.0f32; 16];
    for ib in 0..16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
    }
    scales
}

/// `quantize_row_q6_K_ref`'s super-scale choice: the scale of largest magnitude (the first of
/// equal ones), and that magnitude.
pub(super) fn q6_k_max_scale(scales: &[f32; 16]) -> (f32, f32) {
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for &scale in scales {
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    (max_scale, max_abs_scale)
}

/// `quantize_row_q6_K_ref` for one super-block.
pub(super) fn encode_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let scales = q6_k_float_scales(x, &mut l);
    let (max_scale, max_abs_scale) = q6_k_max_scale(&scales);
    if max_abs_scale < GROUP_MAX_EPS {
        // ggml zeroes the whole block (d = +0).
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d = 1.0 / iscale;
    let mut sc = [0i8; 16];
    for (s, &v) in sc.iter_mut().zip(&scales) {
        // C: `int8_t = MIN(127, nearest_int(...))`.
        *s = nearest_int(iscale * v).min(127) as i8;
    }
    let d16 = f16_round(d);
    for j in 0..16 {
        let dj = d16 * f32::from(sc[j]);
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for k in 0..32 {
            let v = |o: usize| l[j + k + o] as u8;
            ql[h * 64 + k] = (v(0) & 0xF) | ((v(64) & 0xF) << 4);
            ql[h * 64 + k + 32] = (v(32) & 0xF) | ((v(96) & 0xF) << 4);
            qh[h * 32 + k] =
                (v(0) >> 4) | ((v(32) >> 4) << 2) | ((v(64) >> 4) << 4) | ((v(96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&f16_bytes(d));
}

/// `dequantize_row_q6_K` for one super-block.
pub(super) fn decode_q6_k(block: &[u8], y: &mut [f32]) {
    let ql_all = &block[..128];
    let qh_all = &block[128..192];
    let sc_all = &block[192..208];
    let d = f16_at(block, 208);
    for h in 0..2 {
        let ql = &ql_all[h * 64..h * 64 + 64];
        let qh = &qh_all[h * 32..h * 32 + 32];
        let sc = &sc_all[h * 8..h * 8 + 8];
        let y = &mut y[h * 128..h * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |o: usize| f32::from(sc[is + o] as i8);
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}
