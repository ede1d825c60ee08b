//! ggml's 32-value block grids as a [`DifferentiableQuantizer`] (issue 13): LoRA-QAT trains on
//! the grid the model is deployed on, and the trained blocks export bit for bit.
//!
//! One block of 32 consecutive values of a row has a scale `d` (and, for `Q4_1`/`Q5_1`, a
//! minimum `m`). The learnable parameters θ are those per-block values; `params()` lists every
//! `d` (blocks row-major), then every `m`. The forward is exactly ggml's: the code of `x` is
//! ggml's reference rule computed with `1/d` from the `f32` parameter —
//! `floor(x/d + 8.5)` (`Q4_0`), `floor(x/d + 16.5)` (`Q5_0`), `roundf(x/d)` (`Q8_0`),
//! `floor((x − m)/d + 0.5)` (`Q4_1`, `Q5_1`), clamped to the code range (ggml truncates, the
//! same for the non-negative arguments its own scales give) — and the value is ggml's
//! dequantization of that code with `d` and `m` **rounded to f16**, as a block stores them.
//! So [`GgmlBlockQuantizer::export_blocks`] writes blocks whose ggml dequantization is the
//! fake-quant weight bit for bit, and right after [`DifferentiableQuantizer::init_from_weights`]
//! (ggml's `quantize_row_*_ref`, whose `f32` scale and minimum become θ) the forward equals
//! ggml's own round trip. θ stays `f32` between steps so small optimizer updates accumulate
//! (a master copy, as mixed-precision training keeps); only its f16 rounding is ever used as
//! a scale.
//!
//! Backward (LSQ, Esser et al. 2020, with the straight-through rounding): for `ŵ = (q − z)·d`
//! (symmetric) or `ŵ = q·d + m`, inside the code range `∂ŵ/∂x = 1`,
//! `∂ŵ/∂d = (q − z) − x/d` (`q − (x − m)/d`), `∂ŵ/∂m = 0`; at a clamp `∂ŵ/∂x = 0`,
//! `∂ŵ/∂d = q − z` (`q`), `∂ŵ/∂m = 1`. Scale and minimum gradients are multiplied by LSQ's
//! `1/√(32·Qp)` (`Qp` = the largest positive level: 7, 15, 127 for `Q4_0`, `Q5_0`, `Q8_0`; 15,
//! 31 for `Q4_1`, `Q5_1`). The derivative passes through the f16 rounding of θ unchanged.
//!
//! ```
//! use ndarray::Array2;
//! use quant_core::ggml::{dequantize, quantize, qat::GgmlBlockQuantizer, GgmlType};
//! use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
//! let w = Array2::from_shape_fn((2, 64), |(i, j)| ((i * 64 + j) as f32 * 0.7).sin());
//! let mut q = GgmlBlockQuantizer::new(GgmlType::Q4_0).unwrap();
//! q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
//! let out = q.forward(w.view()).unwrap();
//! // At initialisation the fake quantization is ggml's own round trip...
//! let ggml = dequantize(GgmlType::Q4_0, &quantize(GgmlType::Q4_0, w.as_slice().unwrap()).unwrap(), 128).unwrap();
//! assert_eq!(out.dequantized.as_slice().unwrap(), &ggml[..]);
//! // ...and the exported blocks decode to the fake-quant weights, bit for bit.
//! let blocks = q.export_blocks(w.view()).unwrap();
//! assert_eq!(dequantize(GgmlType::Q4_0, &blocks, 128).unwrap(), ggml);
//! ```

use half::f16;
use ndarray::{Array2, ArrayView2};

use super::{legacy, GgmlType, QK};
use crate::error::{check_finite, QuantError, Result};
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};

/// The code rule of one 32-value type.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Grid {
    /// Largest code (15, 31, or 255 for `Q8_0`'s offset codes).
    qmax: i32,
    /// Code of zero for the symmetric types (8, 16, 128); 0 for the types with a minimum.
    zero: i32,
    has_min: bool,
    bits: u32,
}

impl Grid {
    fn of(ty: GgmlType) -> Result<Self> {
        Ok(match ty {
            GgmlType::Q4_0 => Grid {
                qmax: 15,
                zero: 8,
                has_min: false,
                bits: 4,
            },
            GgmlType::Q5_0 => Grid {
                qmax: 31,
                zero: 16,
                has_min: false,
                bits: 5,
            },
            GgmlType::Q8_0 => Grid {
                qmax: 255,
                zero: 128,
                has_min: false,
                bits: 8,
            },
            GgmlType::Q4_1 => Grid {
                qmax: 15,
                zero: 0,
                has_min: true,
                bits: 4,
            },
            GgmlType::Q5_1 => Grid {
                qmax: 31,
                zero: 0,
                has_min: true,
                bits: 5,
            },
            other => {
                return Err(QuantError::invalid(
                    "ggml type of a block quantizer",
                    other,
                    "trainable ggml grids exist for q4_0, q4_1, q5_0, q5_1 and q8_0",
                ))
            }
        })
    }

    /// The largest positive level (LSQ's `Qp`).
    fn qp(&self) -> f32 {
        if self.has_min {
            self.qmax as f32
        } else if self.bits == 8 {
            127.0
        } else {
            (self.qmax - self.zero) as f32
        }
    }

    /// (unsigned code, clamped?) of `x` with the `f32` parameters, by ggml's rule.
    fn code(&self, x: f32, d: f32, m: f32) -> (i32, bool) {
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let t = if self.has_min {
            ((x - m) * id + 0.5).floor()
        } else if self.bits == 8 {
            (x * id).round() + self.zero as f32
        } else {
            (x * id + self.zero as f32 + 0.5).floor()
        };
        if t < 0.0 {
            (0, true)
        } else if t > self.qmax as f32 {
            (self.qmax, true)
        } else {
            (t as i32, false)
        }
    }
}
/// What both ggml grids check before ggml's own quantizer initialises them: the init method
/// (only absmax, i.e. ggml's search), rows that are whole `block`s (naming llama.cpp's
/// fallback type otherwise) and finite values; returns the weight's values in row order.
/// `kind` names the quantizer in errors ("block", "super-block").
pub(super) fn checked_init_weights(
    ty: GgmlType,
    kind: &str,
    block: usize,
    w: ArrayView2<'_, f32>,
    method: InitMethod,
) -> Result<Vec<f32>> {
    if method != InitMethod::Absmax {
        return Err(QuantError::invalid(
            format!("init method of the {ty} {kind} quantizer"),
            format!("{method:?}"),
            "a ggml grid initialises with ggml's own quantizer (use absmax)",
        ));
    }
    let (rows, cols) = w.dim();
    if rows == 0 || cols == 0 || cols % block != 0 {
        let hint = super::fallback_type(ty, cols.max(1))
            .map(|f| format!("llama.cpp stores such rows as {f}"))
            .unwrap_or_else(|e| e.to_string());
        return Err(QuantError::shape(
            format!("{ty} {kind} quantizer weight"),
            format!("non-empty rows of a multiple of {block} values ({hint})"),
            format!("{:?}", w.dim()),
        ));
    }
    let data: Vec<f32> = w.iter().copied().collect();
    check_finite(&format!("{ty} {kind} quantizer weight"), &data)?;
    Ok(data)
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// A trainable ggml block grid (see the module docs).
#[derive(Clone, Debug)]
pub struct GgmlBlockQuantizer {
    ty: GgmlType,
    grid: Grid,
    /// `(rows, cols)` of the weight the parameters were initialised for.
    shape: Option<(usize, usize)>,
    /// Every block's `d`, then (types with a minimum) every block's `m`.
    params: Vec<f32>,
    /// The last forward's input, row-major.
    last_input: Option<Vec<f32>>,
}

impl GgmlBlockQuantizer {
    /// A quantizer on `ty`'s grid (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` or `Q8_0`), uninitialised.
    pub fn new(ty: GgmlType) -> Result<Self> {
        Ok(GgmlBlockQuantizer {
            ty,
            grid: Grid::of(ty)?,
            shape: None,
            params: Vec::new(),
            last_input: None,
        })
    }

    /// The ggml type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    fn blocks(&self) -> usize {
        self.shape.map_or(0, |(r, c)| r * c / QK)
    }

    fn check_shape(&self, dim: (usize, usize)) -> Result<()> {
        match self.shape {
            None => Err(QuantError::invalid(
                format!("{} block quantizer state", self.ty),
                "uninitialised",
                "call init_from_weights before forward",
            )),
            Some(s) if s != dim => Err(QuantError::shape(
                format!("{} block quantizer input", self.ty),
                format!("{s:?}"),
                format!("{dim:?}"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// `(d, m)` of block `b` as `f32` parameters.
    fn block_params(&self, b: usize) -> (f32, f32) {
        let nb = self.blocks();
        let m = if self.grid.has_min {
            self.params[nb + b]
        } else {
            0.0
        };
        (self.params[b], m)
    }

    /// Codes (unsigned) and values of row-major `data` with the current parameters.
    fn quantize_values(&self, data: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut codes = vec![0u8; data.len()];
        let mut values = vec![0.0f32; data.len()];
        for (b, ((xs, cs), vs)) in data
            .chunks_exact(QK)
            .zip(codes.chunks_exact_mut(QK))
            .zip(values.chunks_exact_mut(QK))
            .enumerate()
        {
            let (d, m) = self.block_params(b);
            let (d16, m16) = (f16_round(d), f16_round(m));
            for ((&x, c), v) in xs.iter().zip(cs.iter_mut()).zip(vs.iter_mut()) {
                let (q, _) = self.grid.code(x, d, m);
                *c = q as u8;
                // ggml's dequantization: integer code (minus the zero) times d, plus m.
                *v = if self.grid.has_min {
                    q as f32 * d16 + m16
                } else {
                    (q - self.grid.zero) as f32 * d16
                };
            }
        }
        (codes, values)
    }

    /// The blocks of `w` quantized with the current parameters, in ggml's layout: decoding
    /// them with `quant_core::ggml::dequantize` gives [`DifferentiableQuantizer::forward`]'s
    /// dequantized weights bit for bit.
    pub fn export_blocks(&mut self, w: ArrayView2<'_, f32>) -> Result<Vec<u8>> {
        self.check_shape(w.dim())?;
        let data: Vec<f32> = w.iter().copied().collect();
        check_finite(&format!("{} block quantizer input", self.ty), &data)?;
        let (codes, _) = self.quantize_values(&data);
        let mut out = Vec::with_capacity(self.ty.bytes_for(data.len())?);
        for (b, cs) in codes.chunks_exact(QK).enumerate() {
            let (d, m) = self.block_params(b);
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            if self.grid.has_min {
                out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
            }
            let codes: &[u8; QK] = cs.try_into().expect("32 codes");
            match self.ty {
                GgmlType::Q8_0 => out.extend(codes.iter().map(|&c| (c as i32 - 128) as i8 as u8)),
                GgmlType::Q5_0 | GgmlType::Q5_1 => legacy::push_5bit(codes, &mut out),
                _ => out.extend((0..QK / 2).map(|j| codes[j] | (codes[j + QK / 2] << 4))),
            }
        }
        Ok(out)
    }
}

impl DifferentiableQuantizer for GgmlBlockQuantizer {
    fn bits(&self) -> u32 {
        self.grid.bits
    }

    /// ggml's reference quantizer: θ = its `f32` `d` (and `m = min`) of every block.
    /// `MseClipSearch` is refused: the grid's initialisation is ggml's own.
    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        let data = checked_init_weights(self.ty, "block", QK, w, method)?;
        let (rows, cols) = w.dim();
        let nb = data.len() / QK;
        let mut d = Vec::with_capacity(nb);
        let mut m = Vec::with_capacity(if self.grid.has_min { nb } else { 0 });
        for block in data.chunks_exact(QK) {
            let (min, max) = block
                .iter()
                .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let signed_max = block.iter().fold((0.0f32, 0.0f32), |(amax, max), &v| {
                if amax < v.abs() {
                    (v.abs(), v)
                } else {
                    (amax, max)
                }
            });
            match self.ty {
                GgmlType::Q4_0 => d.push(signed_max.1 / -8.0),
                GgmlType::Q5_0 => d.push(signed_max.1 / -16.0),
                GgmlType::Q8_0 => d.push(signed_max.0 / 127.0),
                GgmlType::Q4_1 => {
                    d.push((max - min) / 15.0);
                    m.push(min);
                }
                _ => {
                    d.push((max - min) / 31.0);
                    m.push(min);
                }
            }
        }
        d.extend(m);
        self.params = d;
        self.shape = Some((rows, cols));
        self.last_input = None;
        Ok(())
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        self.check_shape(w.dim())?;
        let data: Vec<f32> = w.iter().copied().collect();
        check_finite(&format!("{} block quantizer input", self.ty), &data)?;
        check_finite(&format!("{} block quantizer scales", self.ty), &self.params)?;
        let (codes, values) = self.quantize_values(&data);
        let (rows, cols) = w.dim();
        self.last_input = Some(data);
        let shaped_err = |e: ndarray::ShapeError| {
            QuantError::shape(
                format!("{} block quantizer output", self.ty),
                "(rows, cols)",
                e,
            )
        };
        Ok(QuantizerOutput {
            codes: Array2::from_shape_vec((rows, cols), codes).map_err(shaped_err)?,
            dequantized: Array2::from_shape_vec((rows, cols), values).map_err(shaped_err)?,
        })
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        self.check_shape(grad_output.dim())?;
        let data = self.last_input.as_ref().ok_or_else(|| {
            QuantError::invalid(
                format!("{} block quantizer state", self.ty),
                "no forward pass",
                "call forward before backward",
            )
        })?;
        let grad: Vec<f32> = grad_output.iter().copied().collect();
        let nb = self.blocks();
        let lsq = 1.0 / (QK as f32 * self.grid.qp()).sqrt();
        let mut grad_in = vec![0.0f32; grad.len()];
        let mut grad_params = vec![0.0f32; self.params.len()];
        for b in 0..nb {
            let (d, m) = self.block_params(b);
            let (d16, m16) = (f16_round(d), f16_round(m));
            let (mut gd, mut gm) = (0.0f32, 0.0f32);
            for i in b * QK..(b + 1) * QK {
                let (x, g) = (data[i], grad[i]);
                let (q, clamped) = self.grid.code(x, d, m);
                let level = (q - self.grid.zero) as f32;
                if clamped || d16 == 0.0 {
                    // The true derivative; a zero scale passes the gradient to nothing else.
                    gd += g * level;
                    gm += g;
                    if d16 == 0.0 && !clamped {
                        grad_in[i] = g;
                    }
                } else {
                    gd += g * (level - (x - m16) / d16);
                    grad_in[i] = g;
                }
            }
            grad_params[b] = gd * lsq;
            if self.grid.has_min {
                grad_params[nb + b] = gm * lsq;
            }
        }
        Ok(QuantizerGrads {
            input: Array2::from_shape_vec(grad_output.dim(), grad_in).map_err(|e| {
                QuantError::shape(
                    format!("{} block quantizer gradient", self.ty),
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

/// Any trainable ggml grid: the 32-value block types ([`GgmlBlockQuantizer`]) or `Q4_K` /
/// `Q6_K` ([`super::qat_k::GgmlKQuantizer`]), built from the type alone; what QAT configs
/// name as `q4_0` … `q6_k` (`crate::config::QuantizerKind`).
///
/// ```
/// use quant_core::ggml::{qat::GgmlQatQuantizer, GgmlType};
/// assert_eq!(GgmlQatQuantizer::new(GgmlType::Q6_K).unwrap().ggml_type(), GgmlType::Q6_K);
/// assert!(GgmlQatQuantizer::new(GgmlType::Q3_K).is_err());
/// ```
#[derive(Clone, Debug)]
pub enum GgmlQatQuantizer {
    /// `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`.
    Block(GgmlBlockQuantizer),
    /// `Q4_K`, `Q6_K`.
    Super(super::qat_k::GgmlKQuantizer),
}

impl GgmlQatQuantizer {
    /// The trainable grid of `ty`; other types are an error naming them.
    pub fn new(ty: GgmlType) -> Result<Self> {
        Ok(match ty {
            GgmlType::Q4_K | GgmlType::Q6_K => {
                GgmlQatQuantizer::Super(super::qat_k::GgmlKQuantizer::new(ty)?)
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                GgmlQatQuantizer::Block(GgmlBlockQuantizer::new(ty)?)
            }
            other => {
                return Err(QuantError::invalid(
                    "ggml type of a trainable grid",
                    other,
                    "trainable ggml grids exist for q4_0, q4_1, q5_0, q5_1, q8_0, q4_k and q6_k",
                ))
            }
        })
    }

    /// The ggml type the blocks are stored in.
    pub fn ggml_type(&self) -> GgmlType {
        match self {
            GgmlQatQuantizer::Block(q) => q.ggml_type(),
            GgmlQatQuantizer::Super(q) => q.ggml_type(),
        }
    }

    /// The blocks of `w` with the current parameters in ggml's layout, decoding bit for bit
    /// to the forward's fake-quant weights.
    pub fn export_blocks(&mut self, w: ArrayView2<'_, f32>) -> Result<Vec<u8>> {
        match self {
            GgmlQatQuantizer::Block(q) => q.export_blocks(w),
            GgmlQatQuantizer::Super(q) => q.export_blocks(w),
        }
    }

    fn inner(&self) -> &dyn DifferentiableQuantizer {
        match self {
            GgmlQatQuantizer::Block(q) => q,
            GgmlQatQuantizer::Super(q) => q,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn DifferentiableQuantizer {
        match self {
            GgmlQatQuantizer::Block(q) => q,
            GgmlQatQuantizer::Super(q) => q,
        }
    }
}

impl DifferentiableQuantizer for GgmlQatQuantizer {
    fn bits(&self) -> u32 {
        self.inner().bits()
    }

    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        self.inner_mut().init_from_weights(w, method)
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        self.inner_mut().forward(w)
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        self.inner_mut().backward(grad_output)
    }

    fn params(&self) -> &[f32] {
        self.inner().params()
    }

    fn params_mut(&mut self) -> &mut [f32] {
        self.inner_mut().params_mut()
    }
}
