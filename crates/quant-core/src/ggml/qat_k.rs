//! ggml's `Q4_K` and `Q6_K` super-block grids as a [`DifferentiableQuantizer`] (issue 13):
//! the K types' counterpart of [`super::qat::GgmlBlockQuantizer`].
//!
//! A super-block of 256 consecutive values of a row is cut into sub-blocks (`Q4_K`: 8 of 32
//! values with a scale and a minimum; `Q6_K`: 16 of 16 values with a signed scale), and the
//! sub-block scales are themselves quantized against f16 super-scales: `Q4_K` stores 6-bit
//! `sc`, `m` and f16 `d`, `dmin` (value `d·sc·q − dmin·m`, `q ∈ [0, 15]`); `Q6_K` stores
//! 8-bit signed `sc` and f16 `d` (value `d·sc·q`, `q ∈ [−32, 31]`).
//!
//! The learnable parameters θ are the **sub-block scales (and minima) before that
//! quantization**, as `quantize_row_q{4,6}_K_ref` computes them in its search. Every forward
//! quantizes θ the way ggml's reference quantizer does — `Q4_K`: `d = f16(max θ/63)`,
//! `sc = nearest_int(63/max θ · θ)` clamped to `[0, 63]` (the same for the minima);
//! `Q6_K`: the θ of largest magnitude `θ*`, `d = f16(−θ*/128)`,
//! `sc = min(127, nearest_int(−128/θ* · θ))` — then computes the codes with ggml's final pass
//! (`nearest_int((x + dmin·m)/(d·sc))`, `nearest_int(x/(d·sc))`, clamped) and the values
//! with ggml's dequantization, product by product. So the sub-scales are always used in the
//! precision the format stores, [`GgmlKQuantizer::export_blocks`] writes blocks whose ggml
//! dequantization is the fake-quant weight bit for bit, and right after
//! [`DifferentiableQuantizer::init_from_weights`] (ggml's own search) the forward equals
//! ggml's round trip. θ stays `f32` between steps (a master copy) and all have the magnitude
//! of a step, so one learning rate fits them (unlike `d` and the integer `sc`, which differ
//! by a factor of ~60).
//!
//! Backward (LSQ with straight-through rounding, through the quantization of θ as well): with
//! `S = d·sc ≈ θ` the effective scale and `M = dmin·m` the effective minimum of a sub-block,
//! inside the code range `∂ŵ/∂x = 1`, `∂ŵ/∂S = q − (x + M)/S` (`q − x/S`), `∂ŵ/∂M = 0`; at a
//! clamp `∂ŵ/∂x = 0`, `∂ŵ/∂S = q`, `∂ŵ/∂M = −1`. The scale and minimum gradients are
//! multiplied by LSQ's `1/√(n·Qp)` (`n` = 32, `Qp` = 15 for `Q4_K`; 16 and 31 for `Q6_K`).
//! A sub-block whose effective scale is zero passes the gradient to its inputs only.
//!
//! ```
//! use ndarray::Array2;
//! use quant_core::ggml::{dequantize, quantize, qat_k::GgmlKQuantizer, GgmlType};
//! use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
//! let w = Array2::from_shape_fn((2, 256), |(i, j)| ((i * 256 + j) as f32 * 0.37).sin());
//! for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
//!     let mut q = GgmlKQuantizer::new(ty).unwrap();
//!     q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
//!     let out = q.forward(w.view()).unwrap();
//!     let ggml = dequantize(ty, &quantize(ty, w.as_slice().unwrap()).unwrap(), 512).unwrap();
//!     assert_eq!(out.dequantized.as_slice().unwrap(), &ggml[..]);
//!     let blocks = q.export_blocks(w.view()).unwrap();
//!     assert_eq!(dequantize(ty, &blocks, 512).unwrap(), ggml);
//! }
//! ```

use half::f16;
use ndarray::{Array2, ArrayView2};

use super::kquants::{q4_k_float_scales, q6_k_float_scales, q6_k_max_scale};
use super::search::{nearest_int, GROUP_MAX_EPS};
use super::{GgmlType, QK_K};
use crate::error::{check_finite, QuantError, Result};
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};

/// One super-block's scales as the format stores them.
struct Stored {
    /// f16 bits of `d` (and `dmin`, `Q4_K` only).
    d: f16,
    dmin: f16,
    /// Quantized sub-block scales (`Q4_K`: 0..=63; `Q6_K`: −128..=127).
    sc: [i32; 16],
    /// Quantized sub-block minima (`Q4_K` only, 0..=63).
    m: [i32; 16],
    /// `Q6_K`: the whole block is zero (ggml writes zero bytes).
    zero: bool,
}

/// A trainable `Q4_K` or `Q6_K` grid (see the module docs).
#[derive(Clone, Debug)]
pub struct GgmlKQuantizer {
    ty: GgmlType,
    /// `(rows, cols)` of the weight the parameters were initialised for.
    shape: Option<(usize, usize)>,
    /// `Q4_K`: every sub-block's scale (super-blocks row-major, 8 each), then every minimum;
    /// `Q6_K`: every sub-block's signed scale (16 per super-block).
    params: Vec<f32>,
    /// The last forward's input, row-major.
    last_input: Option<Vec<f32>>,
}

impl GgmlKQuantizer {
    /// A quantizer on `ty`'s grid (`Q4_K` or `Q6_K`), uninitialised.
    pub fn new(ty: GgmlType) -> Result<Self> {
        if !matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
            return Err(QuantError::invalid(
                "ggml type of a super-block quantizer",
                ty,
                "trainable K grids exist for q4_k and q6_k",
            ));
        }
        Ok(GgmlKQuantizer {
            ty,
            shape: None,
            params: Vec::new(),
            last_input: None,
        })
    }

    /// The ggml type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// Sub-blocks per super-block and values per sub-block.
    fn sub(&self) -> (usize, usize) {
        match self.ty {
            GgmlType::Q4_K => (8, 32),
            _ => (16, 16),
        }
    }

    fn super_blocks(&self) -> usize {
        self.shape.map_or(0, |(r, c)| r * c / QK_K)
    }

    fn check_shape(&self, dim: (usize, usize)) -> Result<()> {
        match self.shape {
            None => Err(QuantError::invalid(
                format!("{} super-block quantizer state", self.ty),
                "uninitialised",
                "call init_from_weights before forward",
            )),
            Some(s) if s != dim => Err(QuantError::shape(
                format!("{} super-block quantizer input", self.ty),
                format!("{s:?}"),
                format!("{dim:?}"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Super-block `i`'s θ quantized as ggml's reference quantizer stores scales.
    fn stored(&self, i: usize) -> Stored {
        let (n_sub, _) = self.sub();
        let scales = &self.params[i * n_sub..(i + 1) * n_sub];
        let mut s = Stored {
            d: f16::ZERO,
            dmin: f16::ZERO,
            sc: [0; 16],
            m: [0; 16],
            zero: false,
        };
        if self.ty == GgmlType::Q4_K {
            let nb = self.super_blocks();
            let mins = &self.params[(nb + i) * n_sub..(nb + i + 1) * n_sub];
            let six_bit = |values: &[f32], out: &mut [i32; 16]| {
                let max = values
                    .iter()
                    .fold(0.0f32, |m, &v| if v > m { v } else { m });
                let inv = if max > 0.0 { 63.0 / max } else { 0.0 };
                for (o, &v) in out.iter_mut().zip(values) {
                    *o = nearest_int(inv * v).clamp(0, 63);
                }
                f16::from_f32(max / 63.0)
            };
            s.d = six_bit(scales, &mut s.sc);
            s.dmin = six_bit(mins, &mut s.m);
        } else {
            let mut all = [0.0f32; 16];
            all.copy_from_slice(scales);
            let (max_scale, max_abs) = q6_k_max_scale(&all);
            if max_abs < GROUP_MAX_EPS {
                s.zero = true;
                return s;
            }
            let iscale = -128.0f32 / max_scale;
            for (o, &v) in s.sc.iter_mut().zip(scales) {
                *o = nearest_int(iscale * v).clamp(-128, 127);
            }
            s.d = f16::from_f32(1.0 / iscale);
        }
        s
    }

    /// For each value of super-block `i` of `x`: (code, clamped?, effective scale `S`,
    /// effective minimum `M`, dequantized value), by ggml's final code pass and its
    /// dequantization. Codes are unsigned (`Q6_K`: `q + 32`).
    fn block_values(
        &self,
        s: &Stored,
        x: &[f32],
        mut visit: impl FnMut(usize, i32, bool, f32, f32, f32),
    ) {
        let (n_sub, len) = self.sub();
        let (d, dmin) = (s.d.to_f32(), s.dmin.to_f32());
        for j in 0..n_sub {
            let scale = d * s.sc[j] as f32;
            let min = dmin * s.m[j] as f32;
            let sub = x.iter().enumerate().skip(j * len).take(len);
            for (k, &xk) in sub {
                if self.ty == GgmlType::Q4_K {
                    let (q, clamped) = if scale == 0.0 {
                        (0, false)
                    } else {
                        let t = nearest_int((xk + min) / scale);
                        (t.clamp(0, 15), !(0..=15).contains(&t))
                    };
                    visit(k, q, clamped, scale, min, scale * q as f32 - min);
                } else if s.zero {
                    visit(k, 0, false, 0.0, 0.0, 0.0);
                } else {
                    let (q, clamped) = if scale == 0.0 {
                        (0, false)
                    } else {
                        let t = nearest_int(xk / scale);
                        (t.clamp(-32, 31), !(-32..=31).contains(&t))
                    };
                    // ggml multiplies `d·sc` first, then the code.
                    visit(k, q + 32, clamped, scale, 0.0, scale * q as f32);
                }
            }
        }
    }

    fn flat_input(&self, w: ArrayView2<'_, f32>, what: &str) -> Result<Vec<f32>> {
        self.check_shape(w.dim())?;
        let data: Vec<f32> = w.iter().copied().collect();
        check_finite(&format!("{} super-block quantizer {what}", self.ty), &data)?;
        Ok(data)
    }

    /// Every sub-block's effective scale `S = d·sc` and minimum `M = dmin·m` (`0` for
    /// `Q6_K`) as the forward uses them, in row-major sub-block order: θ after the
    /// format's quantization of scales.
    pub fn effective_scales(&self) -> Vec<(f32, f32)> {
        let (n_sub, _) = self.sub();
        (0..self.super_blocks())
            .flat_map(|i| {
                let s = self.stored(i);
                let (d, dmin) = (s.d.to_f32(), s.dmin.to_f32());
                (0..n_sub).map(move |j| {
                    if s.zero {
                        (0.0, 0.0)
                    } else {
                        (d * s.sc[j] as f32, dmin * s.m[j] as f32)
                    }
                })
            })
            .collect()
    }

    /// The super-blocks of `w` quantized with the current parameters, in ggml's layout:
    /// decoding them with `quant_core::ggml::dequantize` gives
    /// [`DifferentiableQuantizer::forward`]'s dequantized weights bit for bit.
    pub fn export_blocks(&mut self, w: ArrayView2<'_, f32>) -> Result<Vec<u8>> {
        let data = self.flat_input(w, "input")?;
        let mut out = Vec::with_capacity(self.ty.bytes_for(data.len())?);
        for (i, x) in data.chunks_exact(QK_K).enumerate() {
            let s = self.stored(i);
            let mut l = [0u8; QK_K];
            self.block_values(&s, x, |k, q, _, _, _, _| l[k] = q as u8);
            if self.ty == GgmlType::Q4_K {
                out.extend_from_slice(&s.d.to_le_bytes());
                out.extend_from_slice(&s.dmin.to_le_bytes());
                let mut packed = [0u8; 12];
                for j in 0..8 {
                    let (ls, lm) = (s.sc[j] as u8, s.m[j] as u8);
                    if j < 4 {
                        packed[j] = ls;
                        packed[j + 4] = lm;
                    } else {
                        packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                        packed[j - 4] |= (ls >> 4) << 6;
                        packed[j] |= (lm >> 4) << 6;
                    }
                }
                out.extend_from_slice(&packed);
                for j in (0..QK_K).step_by(64) {
                    out.extend((0..32).map(|k| l[j + k] | (l[j + k + 32] << 4)));
                }
            } else if s.zero {
                out.extend(std::iter::repeat_n(0u8, 210));
            } else {
                let mut ql = [0u8; QK_K / 2];
                let mut qh = [0u8; QK_K / 4];
                for (h, j) in (0..QK_K).step_by(128).enumerate() {
                    for k in 0..32 {
                        let v = |o: usize| l[j + k + o];
                        ql[h * 64 + k] = (v(0) & 0xF) | ((v(64) & 0xF) << 4);
                        ql[h * 64 + k + 32] = (v(32) & 0xF) | ((v(96) & 0xF) << 4);
                        qh[h * 32 + k] = (v(0) >> 4)
                            | ((v(32) >> 4) << 2)
                            | ((v(64) >> 4) << 4)
                            | ((v(96) >> 4) << 6);
                    }
                }
                out.extend_from_slice(&ql);
                out.extend_from_slice(&qh);
                out.extend(s.sc.iter().map(|&c| c as i8 as u8));
                out.extend_from_slice(&s.d.to_le_bytes());
            }
        }
        Ok(out)
    }
}

impl DifferentiableQuantizer for GgmlKQuantizer {
    fn bits(&self) -> u32 {
        match self.ty {
            GgmlType::Q4_K => 4,
            _ => 6,
        }
    }

    /// ggml's reference search: θ = the sub-block scales (and minima) it finds.
    /// `MseClipSearch` is refused: the grid's initialisation is ggml's own.
    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        let data = super::qat::checked_init_weights(self.ty, "super-block", QK_K, w, method)?;
        let (rows, cols) = w.dim();
        let nb = data.len() / QK_K;
        let mut scales = Vec::with_capacity(nb * 16);
        let mut mins = Vec::new();
        for x in data.chunks_exact(QK_K) {
            if self.ty == GgmlType::Q4_K {
                let (s, m) = q4_k_float_scales(x);
                scales.extend_from_slice(&s);
                mins.extend_from_slice(&m);
            } else {
                let mut l = [0i8; QK_K];
                scales.extend_from_slice(&q6_k_float_scales(x, &mut l));
            }
        }
        scales.extend(mins);
        self.params = scales;
        self.shape = Some((rows, cols));
        self.last_input = None;
        Ok(())
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        let data = self.flat_input(w, "input")?;
        check_finite(
            &format!("{} super-block quantizer scales", self.ty),
            &self.params,
        )?;
        let mut codes = vec![0u8; data.len()];
        let mut values = vec![0.0f32; data.len()];
        for (i, ((x, cs), vs)) in data
            .chunks_exact(QK_K)
            .zip(codes.chunks_exact_mut(QK_K))
            .zip(values.chunks_exact_mut(QK_K))
            .enumerate()
        {
            let s = self.stored(i);
            self.block_values(&s, x, |k, q, _, _, _, v| {
                cs[k] = q as u8;
                vs[k] = v;
            });
        }
        let dim = w.dim();
        self.last_input = Some(data);
        let shaped_err = |e: ndarray::ShapeError| {
            QuantError::shape(
                format!("{} super-block quantizer output", self.ty),
                "(rows, cols)",
                e,
            )
        };
        Ok(QuantizerOutput {
            codes: Array2::from_shape_vec(dim, codes).map_err(shaped_err)?,
            dequantized: Array2::from_shape_vec(dim, values).map_err(shaped_err)?,
        })
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        self.check_shape(grad_output.dim())?;
        let data = self.last_input.as_ref().ok_or_else(|| {
            QuantError::invalid(
                format!("{} super-block quantizer state", self.ty),
                "no forward pass",
                "call forward before backward",
            )
        })?;
        let grad: Vec<f32> = grad_output.iter().copied().collect();
        let (n_sub, len) = self.sub();
        let (qp, offset) = match self.ty {
            GgmlType::Q4_K => (15.0f32, 0),
            _ => (31.0, 32),
        };
        let lsq = 1.0 / (len as f32 * qp).sqrt();
        let nb = self.super_blocks();
        let mut grad_in = vec![0.0f32; grad.len()];
        let mut grad_params = vec![0.0f32; self.params.len()];
        for (i, x) in data.chunks_exact(QK_K).enumerate() {
            let s = self.stored(i);
            let g = &grad[i * QK_K..(i + 1) * QK_K];
            let gi = &mut grad_in[i * QK_K..(i + 1) * QK_K];
            let mut g_scale = [0.0f32; 16];
            let mut g_min = [0.0f32; 16];
            self.block_values(&s, x, |k, code, clamped, scale, min, _| {
                let j = k / len;
                let level = (code - offset) as f32;
                if scale == 0.0 {
                    gi[k] = g[k];
                } else if clamped {
                    g_scale[j] += g[k] * level;
                    g_min[j] -= g[k];
                } else {
                    g_scale[j] += g[k] * (level - (x[k] + min) / scale);
                    gi[k] = g[k];
                }
            });
            for j in 0..n_sub {
                grad_params[i * n_sub + j] = g_scale[j] * lsq;
                if self.ty == GgmlType::Q4_K {
                    grad_params[(nb + i) * n_sub + j] = g_min[j] * lsq;
                }
            }
        }
        Ok(QuantizerGrads {
            input: Array2::from_shape_vec(grad_output.dim(), grad_in).map_err(|e| {
                QuantError::shape(
                    format!("{} super-block quantizer gradient", self.ty),
                    "(rows, cols)",
                    e,
                )
            })?,
            params: grad_params,
        })
    }

    fn params(&self) -> &[f32] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }
}
