//! A differentiable quantizer on the NF4 grid with a learned absmax scale per group.
//!
//! Forward: each value `w` of a group with scale `a` is normalised, `x = clamp(w/a, −1, 1)`,
//! and gets the code of the nearest [`NF4_CODE`] value (a value exactly halfway between two
//! code values takes the lower one, as bitsandbytes' bucketize on the midpoints does); it
//! dequantizes to `ŵ = NF4_CODE[code]·a`. Groups follow [`Granularity`] on the 2-D weight;
//! per-block groups are blocks along each row, which coincide with bitsandbytes' blocks over
//! the flattened tensor when the row length is a multiple of the block size.
//!
//! Backward, with `g = ∂L/∂ŵ`:
//! * `∂L/∂w` follows the configured [`Ste`] on the normalised grid (`x = w/a`, `x_q` = the code
//!   value, range `[−1, 1]`, local step = the gap between the two code values around `x`).
//! * `∂L/∂a = Σ g·NF4_CODE[code]` over the group: the exact derivative of `ŵ = c(w/a)·a`
//!   wherever the codes do not change (almost everywhere). With [`Ste::Lsq`] it is multiplied
//!   by `1/√N` (`N` values per group): LSQ's `1/√(N·Qp)` balances a step that is about
//!   `|w|/√Qp`, whereas an absmax scale is on the order of `|w|` itself, so the `Qp` factor is
//!   dropped.
//!
//! Initialisation: [`InitMethod::Absmax`] sets `a = max|w|` of each group (1 for an all-zero
//! group); [`InitMethod::MseClipSearch`] tries `a = r·max|w|` over the ratios of
//! [`ClipSearch`] and keeps the one with the least squared error.
//!
//! ```
//! use ndarray::array;
//! use quant_core::nf4_grid::Nf4GridQuantizer;
//! use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
//! use quant_core::ste::Ste;
//! use quant_core::uniform::Granularity;
//!
//! let w = array![[2.0f32, -2.0, 0.0, 0.5]];
//! let mut q = Nf4GridQuantizer::new(Granularity::PerChannel, Ste::Standard).unwrap();
//! q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
//! assert_eq!(q.params(), &[2.0]);
//! let out = q.forward(w.view()).unwrap();
//! assert_eq!(out.codes.row(0).to_vec(), vec![15, 0, 7, 10]);
//! assert!((out.dequantized[[0, 3]] - 0.246_112_3 * 2.0).abs() < 1e-6);
//! ```

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::codebook::NF4_CODE;
use crate::error::{check_finite, QuantError, Result};
use crate::nf4::{check_blocksize, BlockScales, DoubleQuantAbsmax, FourBitTensor, FourBitType};
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};
use crate::ste::{GridPoint, Ste};
use crate::uniform::{
    row_major, row_major_cow, row_major_into, shaped, ClipSearch, Granularity, GroupLayout,
};

/// The NF4 code nearest to `x` (clamped to [−1, 1] first); exact midpoints go to the lower
/// code.
///
/// ```
/// use quant_core::nf4_grid::nearest_nf4_code;
/// assert_eq!(nearest_nf4_code(0.0), 7);
/// assert_eq!(nearest_nf4_code(3.0), 15);
/// assert_eq!(nearest_nf4_code(-0.7), 1);
/// ```
#[inline]
pub fn nearest_nf4_code(x: f32) -> u8 {
    let x = x.clamp(-1.0, 1.0);
    // Number of midpoints strictly below x: bucketize(x, midpoints, right=False). Counting
    // all 15 comparisons without branches is faster than a search on 16 entries.
    NF4_MIDPOINTS.iter().map(|&m| u8::from(m < x)).sum()
}

/// Midpoints between consecutive NF4 code values, `(NF4[i] + NF4[i+1]) / 2` in f32.
const NF4_MIDPOINTS: [f32; 15] = {
    let mut mid = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        mid[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    mid
};

/// Spacing of the NF4 grid around `x` for the code `code` it rounds to: the gap to the next
/// code value on the side where `x` lies (the outermost gap at the ends).
#[inline]
fn local_gap(x: f32, code: u8) -> f32 {
    let c = usize::from(code);
    let above = x >= NF4_CODE[c];
    match (above, c) {
        (true, 15) => NF4_CODE[15] - NF4_CODE[14],
        (true, _) => NF4_CODE[c + 1] - NF4_CODE[c],
        (false, 0) => NF4_CODE[1] - NF4_CODE[0],
        (false, _) => NF4_CODE[c] - NF4_CODE[c - 1],
    }
}

/// Sum of squared errors of `values` quantized to NF4 with scale `scale`.
fn nf4_squared_error(values: &[f32], scale: f32) -> f64 {
    values
        .iter()
        .map(|&w| {
            let code = nearest_nf4_code(w / scale);
            let e = f64::from(w - NF4_CODE[usize::from(code)] * scale);
            e * e
        })
        .sum()
}

/// The scale an all-zero (or underflowing) group gets, so that nothing divides by zero.
fn usable_scale(scale: f32) -> f32 {
    if scale.is_finite() && scale >= f32::MIN_POSITIVE {
        scale
    } else {
        1.0
    }
}

/// NF4-grid quantizer with one learned scale per group (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Nf4GridQuantizer {
    granularity: Granularity,
    ste: Ste,
    clip_search: ClipSearch,
    layout: Option<GroupLayout>,
    scales: Vec<f32>,
    /// Quantize with the double-quantized scales ([`Nf4GridQuantizer::with_double_quant`]).
    double_quant: bool,
    /// Last forward input (row-major) and the scales it was quantized with (the effective,
    /// double-quantized ones with double quantization).
    last_forward: Option<(Vec<f32>, Vec<f32>)>,
}

impl Nf4GridQuantizer {
    /// A quantizer awaiting [`DifferentiableQuantizer::init_from_weights`].
    pub fn new(granularity: Granularity, ste: Ste) -> Result<Self> {
        granularity.validate()?;
        ste.validate()?;
        Ok(Nf4GridQuantizer {
            granularity,
            ste,
            clip_search: ClipSearch::default(),
            layout: None,
            scales: Vec::new(),
            double_quant: false,
            last_forward: None,
        })
    }

    /// With `enabled`, every forward quantizes with the scales bitsandbytes would store for
    /// the learned ones under double quantization ([`DoubleQuantAbsmax`]: `absmax − mean` in
    /// 8-bit codes, blocks of 256) instead of the learned `f32` scales themselves; the
    /// backward treats that rounding of the scales as the identity (straight through), so the
    /// learned scales still train. A bitsandbytes export then holds exactly the codes and
    /// scales training computed with ([`Nf4GridQuantizer::export_bnb4`]).
    pub fn with_double_quant(mut self, enabled: bool) -> Self {
        self.double_quant = enabled;
        self.last_forward = None;
        self
    }

    /// Whether the forward uses double-quantized scales.
    pub fn double_quant(&self) -> bool {
        self.double_quant
    }

    /// The scales the forward quantizes with: the learned ones, or with double
    /// quantization their bitsandbytes double-quantized values (and that form itself).
    fn effective_scales(&self) -> Result<(Vec<f32>, Option<DoubleQuantAbsmax>)> {
        if !self.double_quant {
            return Ok((self.scales.clone(), None));
        }
        let dq = DoubleQuantAbsmax::quantize(&self.scales)?;
        let scales = dq.decode()?;
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(QuantError::invalid(
                format!("double-quantized scale[{i}]"),
                scales[i],
                format!(
                    "must be finite and positive (learned scale {}, mean of the scales {}): \
                     the scales are too spread for 8-bit codes around their mean",
                    self.scales[i], dq.offset
                ),
            ));
        }
        Ok((scales, Some(dq)))
    }

    /// The NF4 codes and scales the forward computes with for `w`, as bitsandbytes stores a
    /// 4-bit weight ([`FourBitTensor`]: codes two a byte over the row-major weight, blocks of
    /// the granularity's size, the scales double-quantized when the quantizer is): dequantized,
    /// it is the forward's output bit for bit. Needs per-block granularity with a block size
    /// bitsandbytes supports (a power of two, 32..=4096) that divides the rows, so that the
    /// blocks along each row are bitsandbytes' blocks over the flattened weight; anything else
    /// is an error naming it.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use quant_core::nf4_grid::Nf4GridQuantizer;
    /// use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
    /// use quant_core::ste::Ste;
    /// use quant_core::uniform::Granularity;
    /// let w = Array2::from_shape_fn((4, 64), |(i, j)| ((i * 64 + j) as f32 * 0.37).sin());
    /// let mut q = Nf4GridQuantizer::new(Granularity::PerBlock { size: 32 }, Ste::Lsq)
    ///     .unwrap()
    ///     .with_double_quant(true);
    /// q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
    /// let forward = q.forward(w.view()).unwrap().dequantized;
    /// let stored = q.export_bnb4(w.view()).unwrap();
    /// assert_eq!(stored.dequantize().into_raw_vec_and_offset().0,
    ///            forward.into_raw_vec_and_offset().0);
    /// ```
    pub fn export_bnb4(&mut self, w: ArrayView2<'_, f32>) -> Result<FourBitTensor> {
        let (rows, cols) = w.dim();
        let blocksize = match self.granularity {
            Granularity::PerBlock { size } if cols % size == 0 && check_blocksize(size).is_ok() => {
                size
            }
            other => {
                return Err(QuantError::invalid(
                    "granularity of the nf4 grid (bitsandbytes export)",
                    format!("{other:?} on rows of {cols}"),
                    "bitsandbytes stores blocks of a power of two 32..=4096 values over the \
                     flattened weight: train per_block with such a size dividing the rows",
                ))
            }
        };
        let (_, dq) = self.effective_scales()?;
        let out = self.forward(w)?;
        let codes: Vec<u8> = out.codes.iter().copied().collect();
        let packed: Vec<u8> = codes
            .chunks(2)
            .map(|pair| {
                (pair[0] << 4) | pair.get(1).copied().unwrap_or(FourBitType::Nf4.zero_code())
            })
            .collect();
        let scales = match dq {
            Some(dq) => BlockScales::DoubleQuant(dq),
            None => BlockScales::Plain(self.scales.clone()),
        };
        FourBitTensor::from_parts(
            vec![rows, cols],
            blocksize,
            FourBitType::Nf4,
            packed,
            scales,
        )
    }

    /// Uses `search` for [`InitMethod::MseClipSearch`].
    pub fn with_clip_search(mut self, search: ClipSearch) -> Result<Self> {
        search.validate()?;
        self.clip_search = search;
        Ok(self)
    }

    /// The estimator used in [`DifferentiableQuantizer::backward`].
    pub fn ste(&self) -> Ste {
        self.ste
    }

    fn checked_layout(&self, dim: (usize, usize)) -> Result<GroupLayout> {
        let layout = self.layout.ok_or_else(|| {
            QuantError::invalid(
                "nf4 grid quantizer state",
                "uninitialised",
                "call init_from_weights before forward",
            )
        })?;
        if layout.shape() != dim {
            return Err(QuantError::shape(
                "nf4 grid quantizer input (shape it was initialised with)",
                format!("{:?}", layout.shape()),
                format!("{dim:?}"),
            ));
        }
        Ok(layout)
    }
}

impl DifferentiableQuantizer for Nf4GridQuantizer {
    fn bits(&self) -> u32 {
        4
    }

    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        let (rows, cols) = w.dim();
        let layout = GroupLayout::new(rows, cols, self.granularity)?;
        let data = row_major(w);
        check_finite("nf4 grid weights to initialise from", &data)?;
        let search = self.clip_search;
        self.scales = layout
            .group_slices(&data)
            .par_iter()
            .map(|values| {
                let absmax = values.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
                match method {
                    InitMethod::Absmax => usable_scale(absmax),
                    InitMethod::MseClipSearch => {
                        let (ratio, _) = search.best_ratio(values.len(), |r| {
                            nf4_squared_error(values, usable_scale(r * absmax))
                        });
                        usable_scale(ratio * absmax)
                    }
                }
            })
            .collect();
        self.layout = Some(layout);
        self.last_forward = None;
        Ok(())
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        let layout = self.checked_layout(w.dim())?;
        if let Some(i) = self
            .scales
            .iter()
            .position(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(QuantError::invalid(
                format!("scale[{i}]"),
                self.scales[i],
                "must be finite and positive (an optimizer update may have pushed it there)",
            ));
        }
        let (effective, _) = self.effective_scales()?;
        // Reuse the previous forward's buffer (no fresh weight-sized allocation).
        let reused = self.last_forward.take().map(|(buffer, _)| buffer);
        let data = row_major_into(w, reused.unwrap_or_default());
        check_finite("nf4 grid quantizer input", &data)?;
        let (rows, cols) = w.dim();
        let mut codes = vec![0u8; data.len()];
        let mut dequantized = vec![0.0f32; data.len()];
        let scales = &effective;
        codes
            .par_chunks_mut(cols)
            .zip(dequantized.par_chunks_mut(cols))
            .zip(data.par_chunks(cols))
            .enumerate()
            .for_each(|(r, ((code_row, deq_row), row))| {
                for (g, range) in layout.row_segments(r) {
                    for c in range {
                        let code = nearest_nf4_code(row[c] / scales[g]);
                        code_row[c] = code;
                        deq_row[c] = NF4_CODE[usize::from(code)] * scales[g];
                    }
                }
            });
        self.last_forward = Some((data, effective));
        Ok(QuantizerOutput {
            codes: shaped(rows, cols, codes)?,
            dequantized: shaped(rows, cols, dequantized)?,
        })
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let (data, scales) = self.last_forward.as_ref().ok_or_else(|| {
            QuantError::invalid(
                "nf4 grid quantizer state",
                "no forward pass",
                "call forward before backward",
            )
        })?;
        let layout = self.checked_layout(grad_output.dim())?;
        let grad = row_major_cow(grad_output);
        let grad: &[f32] = &grad;
        check_finite("nf4 grid quantizer grad_output", grad)?;
        let (rows, cols) = layout.shape();
        let ste = self.ste;
        let mut grad_input = vec![0.0f32; data.len()];
        let partials: Vec<Vec<(usize, f64)>> = grad_input
            .par_chunks_mut(cols)
            .zip(data.par_chunks(cols))
            .zip(grad.par_chunks(cols))
            .enumerate()
            .map(|(r, ((gin_row, row), g_row))| {
                layout
                    .row_segments(r)
                    .map(|(g, range)| {
                        let gin = &mut gin_row[range.clone()];
                        let (x, up) = (&row[range.clone()], &g_row[range]);
                        (g, backward_segment(ste, scales[g], x, up, gin))
                    })
                    .collect()
            })
            .collect();
        let mut scale_grads = vec![0.0f64; layout.num_groups()];
        for (g, partial) in partials.into_iter().flatten() {
            scale_grads[g] += partial;
        }
        let params = scale_grads
            .iter()
            .zip(layout.group_sizes())
            .map(|(&sum, n)| {
                let factor = if ste.scales_step_grad() {
                    1.0 / (n as f64).sqrt()
                } else {
                    1.0
                };
                (sum * factor) as f32
            })
            .collect();
        Ok(QuantizerGrads {
            input: shaped(rows, cols, grad_input)?,
            params,
        })
    }

    fn params(&self) -> &[f32] {
        &self.scales
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.scales
    }
}

/// Writes `∂L/∂w` of one group with scale `scale` into `grad_input` and returns its unscaled
/// scale gradient `Σ g·NF4[code]`: one monomorphic loop per estimator (the estimator's
/// `match` is resolved outside the loop), the sum in eight `f64` lanes.
fn backward_segment(ste: Ste, scale: f32, w: &[f32], grad: &[f32], grad_input: &mut [f32]) -> f64 {
    #[inline(always)]
    fn run(
        scale: f32,
        w: &[f32],
        grad: &[f32],
        grad_input: &mut [f32],
        input_grad: impl Fn(f32, f32, f32, u8) -> f32,
    ) -> f64 {
        const LANES: usize = 8;
        let mut lanes = [0.0f64; LANES];
        for (k, ((gin, &x), &g)) in grad_input.iter_mut().zip(w).zip(grad).enumerate() {
            let u = x / scale;
            let code = nearest_nf4_code(u);
            let xq = NF4_CODE[usize::from(code)];
            *gin = input_grad(g, u, xq, code);
            lanes[k % LANES] += f64::from(g) * f64::from(xq);
        }
        lanes.iter().sum()
    }
    let at = |u: f32, xq: f32, code: u8, step: bool| GridPoint {
        value: u,
        quantized: xq,
        lower: -1.0,
        upper: 1.0,
        step: if step { local_gap(u, code) } else { 1.0 },
    };
    match ste {
        Ste::Ewgs { .. } => run(scale, w, grad, grad_input, |g, u, xq, code| {
            ste.input_grad(g, at(u, xq, code, true))
        }),
        Ste::Standard => run(scale, w, grad, grad_input, |g, _, _, _| g),
        Ste::Lsq => run(scale, w, grad, grad_input, |g, u, _, _| {
            if (-1.0..=1.0).contains(&u) {
                g
            } else {
                0.0
            }
        }),
        Ste::Clipped { clip } => run(scale, w, grad, grad_input, move |g, u, _, _| {
            if -clip <= u && u <= clip {
                g
            } else {
                0.0
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The per-estimator loops agree with [`Ste::input_grad`] on the NF4 grid.
    #[test]
    fn segment_backward_matches_the_scalar_estimators() {
        let w: Vec<f32> = (-300..=300).map(|i| i as f32 * 0.01).collect();
        let grad: Vec<f32> = (0..w.len()).map(|i| ((i as f32) * 0.3).cos()).collect();
        for ste in [
            Ste::Standard,
            Ste::Clipped { clip: 0.6 },
            Ste::Lsq,
            Ste::Ewgs { delta: 0.4 },
        ] {
            for scale in [0.5f32, 1.7] {
                let mut gin = vec![0.0; w.len()];
                let sum = backward_segment(ste, scale, &w, &grad, &mut gin);
                let mut want_sum = 0.0f64;
                for (i, &x) in w.iter().enumerate() {
                    let u = x / scale;
                    let code = nearest_nf4_code(u);
                    let xq = NF4_CODE[usize::from(code)];
                    let at = GridPoint {
                        value: u,
                        quantized: xq,
                        lower: -1.0,
                        upper: 1.0,
                        step: local_gap(u, code),
                    };
                    assert_eq!(gin[i], ste.input_grad(grad[i], at), "{ste:?} {x}");
                    want_sum += f64::from(grad[i]) * f64::from(xq);
                }
                assert!((sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0));
            }
        }
    }

    #[test]
    fn midpoints_go_to_the_lower_code() {
        for i in 0..15 {
            let m = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
            assert_eq!(nearest_nf4_code(m), i as u8, "midpoint {i}");
            let above = f32::from_bits(if m > 0.0 {
                m.to_bits() + 1
            } else {
                m.to_bits() - 1
            });
            assert_eq!(
                nearest_nf4_code(above),
                i as u8 + 1,
                "just above midpoint {i}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_code_is_the_nearest_value(x in -1.5f32..1.5) {
            let code = usize::from(nearest_nf4_code(x));
            let xc = x.clamp(-1.0, 1.0);
            let best = NF4_CODE
                .iter()
                .map(|&v| (v - xc).abs())
                .fold(f32::INFINITY, f32::min);
            prop_assert!((NF4_CODE[code] - xc).abs() <= best);
        }
    }
}
