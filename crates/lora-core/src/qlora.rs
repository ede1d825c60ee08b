//! QLoRA: a frozen base stored as bitsandbytes-compatible NF4 ([`Nf4Base`]) and LoftQ
//! initialisation ([`loftq_init`]); the layer over it ([`crate::QLoraLinear`]), merging back
//! to `f32` or NF4, is in [`crate::qlora_layer`].
//!
//! The base never exists as a whole `f32` matrix on the hot path. `y = x·Wᵀ` dequantizes a
//! tile of rows of `W` (a tile of output columns of `y`) into a reusable buffer and hands it to
//! the GEMM entry point; `dx = dy·W` dequantizes a tile of *columns* of `W` (rows of `Wᵀ`)
//! and writes the matching columns of `dx` in one product with the full inner dimension, so
//! `dx` is written once per element instead of being re-read once per tile. Tiles run in
//! parallel on rayon's pool (each worker keeps one buffer); the products inside a tile may
//! split further on the same pool.

use std::borrow::Cow;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis};
use quant_core::linalg::{gemm, ComputeDtype};
use quant_core::nf4::bnb_layout::{from_safetensors, to_bnb_tensors, BnbTensor};
use quant_core::nf4::{check_blocksize, FourBitTensor, FourBitType};
use safetensors::SafeTensors;

use crate::adapter::AdapterOptions;
use crate::base::FrozenBase;
use crate::error::{check_finite, LoraError, Result};
use crate::svd::truncated_svd;
use crate::tiled::{tiled_matmul, tiled_matmul_transposed, TiledWeight};

/// How a weight is quantized to NF4 and how the tiled products are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nf4Options {
    /// Values per absmax block (a power of two in 32..=4096); QLoRA uses 64.
    pub blocksize: usize,
    /// Quantize the block absmaxes to 8 bits (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
    /// Rows (forward) or columns (backward) of `W` dequantized at a time (> 0).
    pub tile: usize,
    /// Run tiles in parallel on rayon's pool (each product then mostly single-threaded)
    /// instead of one tile at a time with each product threaded.
    pub parallel_tiles: bool,
}

impl Default for Nf4Options {
    /// Blocksize 64 with double quantization (QLoRA's defaults), 256-wide tiles run in
    /// parallel. Measured at 512×2048×2048 on the 2-core reference machine (under load, so
    /// ±10%; `qat_timing::nf4_tiling_sweep`): `x·Wᵀ` is within noise of the dense product for
    /// tiles of 64–256 rows, while `dy·W` needs column tiles of at least 256 (64: ~1.4×,
    /// 128: ~1.2×, 256: ~1.05× the dense time, 512 no better); parallel and sequential tiles
    /// were within noise of each other.
    fn default() -> Self {
        Nf4Options {
            blocksize: 64,
            double_quant: true,
            tile: 256,
            parallel_tiles: true,
        }
    }
}

impl Nf4Options {
    fn validate(&self, context: &str) -> Result<()> {
        check_blocksize(self.blocksize)?;
        if self.tile == 0 {
            return Err(LoraError::option(
                format!("NF4 tile width of {context}"),
                0,
                "a tile must hold at least one row or column",
            ));
        }
        Ok(())
    }
}

/// A frozen base weight `(out, in)` stored as NF4 codes with (optionally double-quantized)
/// block absmaxes, bit-identical to bitsandbytes' `Params4bit`, and an optional `f32` bias.
///
/// ```
/// use lora_core::base::FrozenBase;
/// use lora_core::qlora::{Nf4Base, Nf4Options};
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((8, 64), |(i, j)| ((i * 64 + j) as f32 * 0.37).sin());
/// let base = Nf4Base::quantize(w.view(), None, &Nf4Options::default(), "proj").unwrap();
/// let x = Array2::from_shape_fn((3, 64), |(t, j)| (t + j) as f32 * 0.01);
/// let mut y = Array2::zeros((3, 8));
/// base.matmul_into(x.view(), y.view_mut()).unwrap();
/// // The same product through the dequantized weight.
/// let w_hat = base.dense_weight().unwrap();
/// let reference = x.dot(&w_hat.t());
/// assert!(y.iter().zip(reference.iter()).all(|(a, b)| (a - b).abs() < 1e-4));
/// // 4-bit codes plus block scales (and double quant's 256-entry map): below the f32 size.
/// assert!(base.storage_bytes() < 8 * 64 * 4);
/// ```
#[derive(Clone, Debug)]
pub struct Nf4Base {
    weight: FourBitTensor,
    out_features: usize,
    in_features: usize,
    bias: Option<Array1<f32>>,
    options: Nf4Options,
    /// The precision of the products on each dequantized tile.
    compute_dtype: ComputeDtype,
    context: String,
}

impl Nf4Base {
    /// Quantizes `weight: (out, in)` to NF4 as bitsandbytes does; `bias` has length `out`.
    /// Errors on an empty or non-finite weight or bias, or bad options, naming `context`.
    pub fn quantize(
        weight: ArrayView2<'_, f32>,
        bias: Option<Array1<f32>>,
        options: &Nf4Options,
        context: &str,
    ) -> Result<Self> {
        options.validate(context)?;
        check_finite(|| format!("base weight of {context}"), weight.iter())?;
        let tensor = FourBitTensor::quantize_array(
            weight.into_dyn(),
            options.blocksize,
            FourBitType::Nf4,
            options.double_quant,
        )?;
        Self::from_four_bit(tensor, bias, options.tile, context)
    }

    /// A base from an already quantized 2-D NF4 tensor `(out, in)`.
    pub fn from_four_bit(
        weight: FourBitTensor,
        bias: Option<Array1<f32>>,
        tile: usize,
        context: &str,
    ) -> Result<Self> {
        let [out_features, in_features] = weight.shape()[..] else {
            return Err(LoraError::shape(
                format!("NF4 base weight of {context}"),
                "a 2-D (out, in) tensor",
                format!("{:?}", weight.shape()),
            ));
        };
        if weight.quant_type() != FourBitType::Nf4 {
            return Err(LoraError::option(
                format!("quant_type of the base weight of {context}"),
                weight.quant_type().name(),
                "a QLoRA base is NF4",
            ));
        }
        if out_features == 0 || in_features == 0 {
            return Err(LoraError::shape(
                format!("NF4 base weight of {context}"),
                "a non-empty (out, in) matrix",
                format!("{:?}", weight.shape()),
            ));
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(LoraError::shape(
                    format!("base bias of {context}"),
                    out_features,
                    b.len(),
                ));
            }
            check_finite(|| format!("base bias of {context}"), b.iter())?;
        }
        let options = Nf4Options {
            blocksize: weight.blocksize(),
            double_quant: matches!(
                weight.scales(),
                quant_core::nf4::BlockScales::DoubleQuant(_)
            ),
            tile,
            parallel_tiles: true,
        };
        options.validate(context)?;
        Ok(Nf4Base {
            weight,
            out_features,
            in_features,
            bias,
            options,
            compute_dtype: ComputeDtype::F32,
            context: context.to_string(),
        })
    }

    /// Reads the weight of `module` (e.g. `model.layers.0.self_attn.q_proj`) from a
    /// transformers/bitsandbytes 4-bit checkpoint: `module.weight`, `.absmax`, `.quant_map`,
    /// `.nested_absmax`, `.nested_quant_map` and `.quant_state.bitsandbytes__nf4`. A
    /// `module.bias` stored as `f32` is read too. Errors name the missing or malformed key.
    pub fn from_bnb_safetensors(file: &SafeTensors<'_>, module: &str) -> Result<Self> {
        let weight = from_safetensors(&format!("{module}.weight"), file)?;
        let bias_key = format!("{module}.bias");
        let bias = match file.tensor(&bias_key) {
            Err(_) => None,
            Ok(view) => {
                if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                    return Err(LoraError::shape(
                        format!("checkpoint tensor {bias_key}"),
                        "an F32 vector",
                        format!("{:?} {:?}", view.dtype(), view.shape()),
                    ));
                }
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>();
                Some(Array1::from(values))
            }
        };
        Self::from_four_bit(weight, bias, Nf4Options::default().tile, module)
    }

    /// The tensors of this base's weight in bitsandbytes' checkpoint layout, under
    /// `module.weight*` (the bias, if any, is not included).
    pub fn to_bnb_tensors(&self, module: &str) -> Vec<(String, BnbTensor)> {
        to_bnb_tensors(&format!("{module}.weight"), &self.weight)
    }

    /// The 4-bit weight.
    pub fn weight(&self) -> &FourBitTensor {
        &self.weight
    }

    /// The options the weight was quantized with and the tile width of the products.
    pub fn options(&self) -> Nf4Options {
        self.options
    }

    /// Changes the tile width of the products (> 0) and whether tiles run in parallel.
    pub fn set_tiling(&mut self, tile: usize, parallel_tiles: bool) -> Result<()> {
        let options = Nf4Options {
            tile,
            parallel_tiles,
            ..self.options
        };
        options.validate(&self.context)?;
        self.options = options;
        Ok(())
    }

    /// The 4-bit tensor, without the bias.
    pub(crate) fn into_four_bit(self) -> FourBitTensor {
        self.weight
    }

    /// The same base with `weight` re-quantized with this base's options (same bias).
    pub(crate) fn requantized(&self, weight: ArrayView2<'_, f32>) -> Result<Self> {
        Nf4Base::quantize(weight, self.bias.clone(), &self.options, &self.context)
    }
}

impl TiledWeight for Nf4Base {
    fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }
    fn describe(&self) -> String {
        format!("NF4 base {}", self.context)
    }
    fn decode_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        Ok(self.weight.dequantize_rows(rows.start, rows.end, out)?)
    }
    /// Row `i` of the band is `W[i, cols]`: whole blocks when the band and the row length are
    /// multiples of the blocksize, partial blocks (still exact) otherwise.
    fn decode_columns(&self, cols: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let width = cols.len();
        for (i, out_row) in out.chunks_exact_mut(width).enumerate() {
            let start = i * self.in_features + cols.start;
            self.weight
                .dequantize_range(start, start + width, out_row)?;
        }
        Ok(())
    }
}

impl FrozenBase for Nf4Base {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn in_features(&self) -> usize {
        self.in_features
    }

    /// `y[:, rows] = x · W[rows, :]ᵀ` one tile of rows of `W` at a time.
    fn matmul_into(&self, x: ArrayView2<'_, f32>, y: ArrayViewMut2<'_, f32>) -> Result<()> {
        let Nf4Options {
            tile,
            parallel_tiles,
            ..
        } = self.options;
        tiled_matmul(self, x, y, tile, parallel_tiles, self.compute_dtype)
    }

    /// `dx[:, cols] = dy · W[:, cols] + β·dx[:, cols]` one tile of columns of `W` at a time:
    /// each output element is written once, with the full inner dimension `out`.
    fn matmul_transposed_into(
        &self,
        dy: ArrayView2<'_, f32>,
        beta: f32,
        dx: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let Nf4Options {
            tile,
            parallel_tiles,
            ..
        } = self.options;
        tiled_matmul_transposed(self, dy, beta, dx, tile, parallel_tiles, self.compute_dtype)
    }

    /// Dequantizes the whole weight (not used by forward or backward).
    fn dense_weight(&self) -> Result<Cow<'_, Array2<f32>>> {
        let mut out = vec![0.0f32; self.out_features * self.in_features];
        self.weight.dequantize_into(&mut out)?;
        let w = Array2::from_shape_vec((self.out_features, self.in_features), out)
            .map_err(|e| LoraError::shape("dequantized NF4 weight", "(out, in)", e))?;
        Ok(Cow::Owned(w))
    }

    fn weight_mut(&mut self) -> Result<&mut Array2<f32>> {
        Err(LoraError::state(
            "editing the base weight in place (merge, PiSSA)",
            &self.context,
            "a 4-bit NF4 base cannot be mutated in place; use merge_to_f32 or merge_to_nf4, \
             which produce a new base",
        ))
    }
    fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_ref().map(|b| b.view())
    }
    fn parameter_count(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, |b| b.len())
    }
    fn storage_bytes(&self) -> usize {
        self.weight.stored_bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.len())
    }
    fn storage_kind(&self) -> &'static str {
        "nf4"
    }
    fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }
    fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
    }
}

/// LoftQ's options (PEFT's `loftq_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoftqConfig {
    /// Bits of the base quantization; only 4 (NF4) is supported, as with bitsandbytes.
    pub loftq_bits: u32,
    /// Alternations of quantization and SVD (≥ 1).
    pub loftq_iter: usize,
    /// How the base is quantized in every iteration and stored (PEFT quantizes with
    /// blocksize 64 and no double quantization).
    pub quantization: Nf4Options,
}

/// What [`loftq_init`] produces.
#[derive(Clone, Debug)]
pub struct LoftqResult {
    /// The NF4 base `Q`.
    pub base: Nf4Base,
    /// `A: (r, in)` and `B: (out, r)` with `s·B·A ≈ W − deq(Q)`.
    pub a: Array2<f32>,
    /// See [`LoftqResult::a`].
    pub b: Array2<f32>,
    /// `‖W − (deq(Q) + s·B·A)‖_F` after each iteration (non-increasing in practice).
    pub errors: Vec<f64>,
}

/// LoftQ (Li et al., 2023), as PEFT's `loftq_init`: starting from `R = W`, repeat
/// `loftq_iter` times: `Q = nf4(R)`; `L·Rᵀ = rank-r SVD of W − deq(Q)` (`L = U√S`,
/// `Rᵀ = √S·Vᵀ`); `R = W − L·Rᵀ`. The base is the last `Q`; the adapter holds the last
/// low-rank factors.
///
/// PEFT assigns `lora_B = L`, `lora_A = Rᵀ` directly, which reproduces `W` only when the
/// adapter scale `s = α/r` is 1. Here the scale is folded in — `A = Rᵀ/√s`, `B = L/√s` — so
/// that `deq(Q) + s·B·A` is the LoftQ approximation for any `α`. Every quantization uses
/// `config.quantization`, so the SVD fits the stored base exactly.
///
/// ```
/// use lora_core::qlora::{loftq_init, LoftqConfig, Nf4Options};
/// use lora_core::AdapterOptions;
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((32, 64), |(i, j)| ((i * 64 + j) as f32 * 0.7).sin());
/// let config = LoftqConfig { loftq_bits: 4, loftq_iter: 3, quantization: Nf4Options::default() };
/// let r = loftq_init(w.view(), &AdapterOptions::new(4, 8.0), &config, "proj").unwrap();
/// assert_eq!((r.a.dim(), r.b.dim()), ((4, 64), (32, 4)));
/// assert!(r.errors[2] <= r.errors[0] * (1.0 + 1e-6));
/// ```
pub fn loftq_init(
    weight: ArrayView2<'_, f32>,
    adapter: &AdapterOptions,
    config: &LoftqConfig,
    context: &str,
) -> Result<LoftqResult> {
    let nf4_options = &config.quantization;
    let (out_features, in_features) = weight.dim();
    adapter.validate(out_features, in_features, context)?;
    if config.loftq_bits != 4 {
        return Err(LoraError::option(
            format!("loftq_config.loftq_bits for {context}"),
            config.loftq_bits,
            "only 4-bit (NF4) LoftQ is supported",
        ));
    }
    if config.loftq_iter == 0 {
        return Err(LoraError::option(
            format!("loftq_config.loftq_iter for {context}"),
            0,
            "at least one iteration is needed",
        ));
    }
    check_finite(|| format!("base weight of {context}"), weight.iter())?;
    let scale = adapter.scale() as f32;
    let root = scale.sqrt();
    let mut residual = weight.to_owned();
    let mut errors = Vec::with_capacity(config.loftq_iter);
    let mut last = None;
    for _ in 0..config.loftq_iter {
        let base = Nf4Base::quantize(residual.view(), None, nf4_options, context)?;
        let dequantized = base.dense_weight()?.into_owned();
        let target = &weight - &dequantized;
        let svd = truncated_svd(target.view(), adapter.r, context)?;
        let sqrt_s = svd.s.mapv(f32::sqrt);
        // L = U·√S (out, r), Rᵀ = √S·Vᵀ (r, in); fold the adapter scale: s·B·A = L·Rᵀ.
        let b = &svd.u * &sqrt_s.view().insert_axis(Axis(0)) / root;
        let a = &svd.vt * &sqrt_s.view().insert_axis(Axis(1)) / root;
        let mut low_rank = Array2::zeros((out_features, in_features));
        gemm(scale, b.view(), a.view(), 0.0, low_rank.view_mut())?;
        residual = &weight - &low_rank;
        let error = (&target - &low_rank)
            .iter()
            .map(|&e| f64::from(e) * f64::from(e))
            .sum::<f64>()
            .sqrt();
        errors.push(error);
        last = Some((base, a, b));
    }
    let (base, a, b) = last
        .ok_or_else(|| LoraError::state("LoftQ", context, "no iteration ran (loftq_iter is 0)"))?;
    Ok(LoftqResult { base, a, b, errors })
}

/// `‖W − approx‖_F` in `f64`, the error measure of LoftQ and the QLoRA tests.
pub fn frobenius_error(weight: ArrayView2<'_, f32>, approx: ArrayView2<'_, f32>) -> Result<f64> {
    if weight.dim() != approx.dim() {
        return Err(LoraError::shape(
            "frobenius_error operands",
            format!("{:?}", weight.dim()),
            format!("{:?}", approx.dim()),
        ));
    }
    Ok(weight
        .iter()
        .zip(approx.iter())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum::<f64>()
        .sqrt())
}

/// The largest `|W − deq(Q)|` the NF4 grid allows per element of `weight: (out, in)` quantized
/// as `quantized`: with `a` the block's true absmax and `a'` its stored (possibly
/// double-quantized) absmax, `|w − c·a'| ≤ |w − c·a| + |c|·|a − a'| ≤ g·a + |a − a'|`, `g` the
/// widest half gap between adjacent NF4 levels and `|c| ≤ 1` the chosen level.
///
/// ```
/// use lora_core::qlora::{nf4_error_bound, Nf4Base, Nf4Options};
/// use lora_core::base::FrozenBase;
/// use ndarray::Array2;
/// let w = Array2::from_shape_fn((4, 64), |(i, j)| ((i * 64 + j) as f32).sin());
/// let base = Nf4Base::quantize(w.view(), None, &Nf4Options::default(), "w").unwrap();
/// let bound = nf4_error_bound(w.view(), base.weight()).unwrap();
/// let w_hat = base.dense_weight().unwrap();
/// assert!(w.iter().zip(w_hat.iter()).zip(bound.iter()).all(|((a, b), e)| (a - b).abs() <= *e));
/// ```
pub fn nf4_error_bound(
    weight: ArrayView2<'_, f32>,
    quantized: &FourBitTensor,
) -> Result<Array2<f32>> {
    let (rows, cols) = weight.dim();
    if quantized.shape() != [rows, cols] {
        return Err(LoraError::shape(
            "nf4_error_bound: quantized weight",
            format!("{:?}", [rows, cols]),
            format!("{:?}", quantized.shape()),
        ));
    }
    let flat: Vec<f32> = weight.iter().copied().collect();
    let stored = quantized.absmax_values();
    let half_gap = FourBitType::Nf4.max_half_gap();
    let mut bound = vec![0.0f32; flat.len()];
    for ((values, out), &stored_absmax) in flat
        .chunks(quantized.blocksize())
        .zip(bound.chunks_mut(quantized.blocksize()))
        .zip(&stored)
    {
        let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // A relative slack of 1e-5 covers the f32 rounding of the scaled levels.
        let e = (half_gap * absmax + (absmax - stored_absmax).abs()) * (1.0 + 1e-5);
        out.fill(e + f32::MIN_POSITIVE);
    }
    Array2::from_shape_vec((rows, cols), bound)
        .map_err(|e| LoraError::shape("nf4_error_bound", "(out, in)", e))
}
