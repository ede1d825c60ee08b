//! A frozen base stored as ggml blocks ([`GgmlBase`]): the weight of a GGUF file kept in the
//! file's own encoding (`Q4_0`, `Q4_K`, `F16`, ... — every type of `quant_core::ggml`), so
//! training over a llama.cpp model holds about the file's bytes, not an `f32` copy.
//!
//! As for the NF4 base, the weight never exists as a whole `f32` matrix on the hot path:
//! `y = x·Wᵀ` decodes a band of rows of `W` into a reusable buffer and hands it to the GEMM
//! entry point; `dx = dy·W` decodes a band of *columns* of `W` — whole blocks of every row, the
//! band's width being a multiple of the block size — and writes those columns of `dx` in one
//! product. Tiles run on rayon's pool with one buffer per worker (the runner is shared with
//! [`crate::qlora::Nf4Base`]). Decoding is ggml's `dequantize_row_*`, bit for bit, so the
//! products are those of the dequantized matrix llama.cpp sees, up to summation order.
//!
//! ```
//! use lora_core::ggml_base::GgmlBase;
//! use lora_core::{AdapterOptions, FrozenBase, InitLoraWeights, LoraLinear};
//! use quant_core::ggml::GgmlType;
//! use ndarray::Array2;
//!
//! let w = Array2::from_shape_fn((8, 256), |(i, j)| ((i * 256 + j) as f32 * 0.37).sin());
//! let base = GgmlBase::quantize(w.view(), None, GgmlType::Q4_K, "q_proj").unwrap();
//! assert_eq!(base.storage_bytes(), 8 * 144); // one 144-byte super-block per row
//! let mut layer = LoraLinear::new(base, "q_proj");
//! let mut options = AdapterOptions::new(2, 4.0);
//! options.init = InitLoraWeights::Random;
//! layer.add_adapter("default", &options, 7).unwrap();
//! let x = Array2::from_shape_fn((3, 256), |(t, j)| ((t + j) as f32 * 0.1).cos());
//! let y = layer.forward(x.view()).unwrap();
//! let dx = layer.backward(Array2::ones((3, 8)).view()).unwrap();
//! assert_eq!((y.dim(), dx.dim()), ((3, 8), (3, 256)));
//! ```

use std::borrow::Cow;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2};
use quant_core::ggml::{self, GgmlType};
use quant_core::linalg::ComputeDtype;

use crate::base::FrozenBase;
use crate::error::{check_finite, LoraError, Result};
use crate::linear::LoraLinear;
use crate::tiled::{tiled_matmul, tiled_matmul_transposed, TiledWeight};

/// Default tile: 256 rows of `W` per band of `x·Wᵀ`, 256 columns per band of `dy·W` (the
/// widths the NF4 base measured best; 256 is also one K super-block).
pub const DEFAULT_TILE: usize = 256;

/// A frozen `W: (out, in)` stored as rows of ggml blocks, with an optional `f32` bias.
#[derive(Clone, Debug)]
pub struct GgmlBase {
    ty: GgmlType,
    /// Row-major: row `i` is `blocks[i·row_bytes .. (i+1)·row_bytes]`.
    blocks: Vec<u8>,
    row_bytes: usize,
    out_features: usize,
    in_features: usize,
    bias: Option<Array1<f32>>,
    tile: usize,
    parallel_tiles: bool,
    /// The precision of the products on each decoded tile.
    compute_dtype: ComputeDtype,
    context: String,
}

impl GgmlBase {
    /// A base over `blocks` (as a GGUF file stores a `(out, in)` tensor of type `ty`: `out`
    /// rows of `in / block_values` blocks). Errors when the rows are not whole blocks, the
    /// byte count disagrees with the shape, the bias has the wrong length, or any decoded
    /// value (or bias element) is not finite — checked once here, band by band, so a corrupt
    /// scale is reported with its row and column instead of poisoning training.
    pub fn from_blocks(
        ty: GgmlType,
        blocks: Vec<u8>,
        out_features: usize,
        in_features: usize,
        bias: Option<Array1<f32>>,
        context: &str,
    ) -> Result<Self> {
        if out_features == 0 || in_features == 0 {
            return Err(LoraError::shape(
                format!("ggml base {context}"),
                "a non-empty (out, in) matrix",
                format!("({out_features}, {in_features})"),
            ));
        }
        if in_features % ty.block_values() != 0 {
            let fallback = ggml::fallback_type(ty, in_features)
                .map(|f| format!("llama.cpp stores such rows as {f}"))
                .unwrap_or_else(|e| e.to_string());
            return Err(LoraError::option(
                format!("row length of the {ty} base {context}"),
                in_features,
                format!(
                    "not a multiple of the {}-value block ({fallback})",
                    ty.block_values()
                ),
            ));
        }
        let row_bytes = ty
            .bytes_for(in_features)
            .map_err(quant_core::QuantError::from)?;
        let expected = out_features.checked_mul(row_bytes).ok_or_else(|| {
            LoraError::shape(
                format!("ggml base {context}"),
                "a size that fits in memory",
                format!("({out_features}, {in_features}) of {ty}"),
            )
        })?;
        if blocks.len() != expected {
            return Err(LoraError::shape(
                format!("{ty} blocks of the ggml base {context} ({out_features}, {in_features})"),
                format!("{expected} bytes"),
                blocks.len(),
            ));
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(LoraError::shape(
                    format!("bias of the ggml base {context}"),
                    out_features,
                    b.len(),
                ));
            }
            check_finite(|| format!("bias of the ggml base {context}"), b.iter())?;
        }
        let base = GgmlBase {
            ty,
            blocks,
            row_bytes,
            out_features,
            in_features,
            bias,
            tile: DEFAULT_TILE,
            parallel_tiles: true,
            compute_dtype: ComputeDtype::F32,
            context: context.to_string(),
        };
        base.check_decoded_finite()?;
        Ok(base)
    }

    /// Quantizes `weight: (out, in)` to `ty` with ggml's reference quantizer (the blocks
    /// `llama-quantize` writes without an importance matrix).
    pub fn quantize(
        weight: ArrayView2<'_, f32>,
        bias: Option<Array1<f32>>,
        ty: GgmlType,
        context: &str,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.dim();
        check_finite(
            || format!("weight of the ggml base {context}"),
            weight.iter(),
        )?;
        let standard = weight.as_standard_layout();
        let values = standard.as_slice().expect("standard layout is contiguous");
        if in_features == 0 {
            return Err(LoraError::shape(
                format!("ggml base {context}"),
                "a non-empty (out, in) matrix",
                format!("{:?}", weight.dim()),
            ));
        }
        let blocks = ggml::quantize_rows(ty, values, in_features)?;
        Self::from_blocks(ty, blocks, out_features, in_features, bias, context)
    }

    /// The ggml type of the blocks.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// The stored blocks, row-major (what a GGUF file holds for this tensor).
    pub fn blocks(&self) -> &[u8] {
        &self.blocks
    }

    /// Tile width of the products and whether tiles run in parallel.
    pub fn tiling(&self) -> (usize, bool) {
        (self.tile, self.parallel_tiles)
    }

    /// Changes the tile width (> 0; column bands are rounded up to whole blocks) and whether
    /// tiles run in parallel.
    pub fn set_tiling(&mut self, tile: usize, parallel_tiles: bool) -> Result<()> {
        if tile == 0 {
            return Err(LoraError::option(
                format!("tile width of the ggml base {}", self.context),
                tile,
                "a tile must hold at least one row or column",
            ));
        }
        self.tile = tile;
        self.parallel_tiles = parallel_tiles;
        Ok(())
    }

    /// The same base with `weight` re-quantized to this base's type (same bias and tiling).
    pub fn requantized(&self, weight: ArrayView2<'_, f32>) -> Result<Self> {
        let mut base = GgmlBase::quantize(weight, self.bias.clone(), self.ty, &self.context)?;
        base.tile = self.tile;
        base.parallel_tiles = self.parallel_tiles;
        base.compute_dtype = self.compute_dtype;
        Ok(base)
    }

    /// Rows `rows` of `W` decoded into `out` (`rows.len() · in` values).
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        Ok(ggml::dequantize_rows(
            self.ty,
            &self.blocks,
            self.in_features,
            rows,
            out,
        )?)
    }

    fn check_decoded_finite(&self) -> Result<()> {
        let band = DEFAULT_TILE.min(self.out_features);
        let mut buffer = vec![0.0f32; band * self.in_features];
        for start in (0..self.out_features).step_by(band) {
            let end = (start + band).min(self.out_features);
            let buf = &mut buffer[..(end - start) * self.in_features];
            self.dequantize_rows(start..end, buf)?;
            if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
                let (row, col) = (start + i / self.in_features, i % self.in_features);
                return Err(LoraError::NonFinite {
                    context: format!(
                        "decoded {} weight of the ggml base {} at row {row}, column {col} \
                         (a non-finite block scale)",
                        self.ty, self.context
                    ),
                    index: row * self.in_features + col,
                    value: buf[i],
                });
            }
        }
        Ok(())
    }
}

impl TiledWeight for GgmlBase {
    fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }
    fn describe(&self) -> String {
        format!("ggml base {}", self.context)
    }
    fn decode_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        self.dequantize_rows(rows, out)
    }
    /// Whole blocks of every row: `cols` starts and ends on block boundaries (or at the row's
    /// end, itself a boundary).
    fn decode_columns(&self, cols: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let (bv, bb) = (self.ty.block_values(), self.ty.block_bytes());
        let (b0, b1) = (cols.start / bv * bb, cols.end / bv * bb);
        for (i, out_row) in out.chunks_exact_mut(cols.len()).enumerate() {
            let row = &self.blocks[i * self.row_bytes..(i + 1) * self.row_bytes];
            ggml::dequantize_into(self.ty, &row[b0..b1], out_row)?;
        }
        Ok(())
    }
    fn column_step(&self) -> usize {
        self.ty.block_values()
    }
}

impl FrozenBase for GgmlBase {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn in_features(&self) -> usize {
        self.in_features
    }

    /// `y[:, rows] = x · W[rows, :]ᵀ` one band of rows of `W` at a time.
    fn matmul_into(&self, x: ArrayView2<'_, f32>, y: ArrayViewMut2<'_, f32>) -> Result<()> {
        tiled_matmul(
            self,
            x,
            y,
            self.tile,
            self.parallel_tiles,
            self.compute_dtype,
        )
    }

    /// `dx[:, cols] = dy · W[:, cols] + β·dx[:, cols]` one band of whole-block columns of `W`
    /// at a time: each output element is written once, with the full inner dimension `out`.
    fn matmul_transposed_into(
        &self,
        dy: ArrayView2<'_, f32>,
        beta: f32,
        dx: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        tiled_matmul_transposed(
            self,
            dy,
            beta,
            dx,
            self.tile,
            self.parallel_tiles,
            self.compute_dtype,
        )
    }

    /// Decodes the whole weight (not used by forward or backward).
    fn dense_weight(&self) -> Result<Cow<'_, Array2<f32>>> {
        let mut out = vec![0.0f32; self.out_features * self.in_features];
        self.dequantize_rows(0..self.out_features, &mut out)?;
        let w = Array2::from_shape_vec((self.out_features, self.in_features), out)
            .map_err(|e| LoraError::shape("dequantized ggml weight", "(out, in)", e))?;
        Ok(Cow::Owned(w))
    }

    fn weight_mut(&mut self) -> Result<&mut Array2<f32>> {
        Err(LoraError::state(
            "editing the base weight in place (merge, PiSSA)",
            &self.context,
            format!(
                "a {} ggml base cannot be mutated in place; use merge_to_f32 or \
                 merge_to_ggml, which produce a new weight",
                self.ty
            ),
        ))
    }
    fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_ref().map(|b| b.view())
    }
    fn parameter_count(&self) -> usize {
        self.out_features * self.in_features + self.bias.as_ref().map_or(0, |b| b.len())
    }
    /// The block bytes (plus an `f32` bias): what the GGUF file holds for this weight.
    fn storage_bytes(&self) -> usize {
        self.blocks.len() + self.bias.as_ref().map_or(0, |b| 4 * b.len())
    }
    fn storage_kind(&self) -> &'static str {
        match self.ty {
            GgmlType::F32 => "ggml-f32",
            GgmlType::F16 => "ggml-f16",
            GgmlType::BF16 => "ggml-bf16",
            GgmlType::Q4_0 => "ggml-q4_0",
            GgmlType::Q4_1 => "ggml-q4_1",
            GgmlType::Q5_0 => "ggml-q5_0",
            GgmlType::Q5_1 => "ggml-q5_1",
            GgmlType::Q8_0 => "ggml-q8_0",
            GgmlType::Q2_K => "ggml-q2_k",
            GgmlType::Q3_K => "ggml-q3_k",
            GgmlType::Q4_K => "ggml-q4_k",
            GgmlType::Q5_K => "ggml-q5_k",
            GgmlType::Q6_K => "ggml-q6_k",
        }
    }
    fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }
    fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
    }
}

impl LoraLinear<GgmlBase> {
    /// `deq(W) + Σ_active s·B·A` (DoRA-normalised where applicable) as a new dense `f32`
    /// weight; the layer is unchanged.
    pub fn merge_to_f32(&self) -> Result<Array2<f32>> {
        self.merged_weight()
    }

    /// The active adapters folded into the base and re-quantized to the base's ggml type with
    /// ggml's reference quantizer: a new base (bias kept); the layer is unchanged.
    pub fn merge_to_ggml(&self) -> Result<GgmlBase> {
        let merged = self.merged_weight()?;
        self.base().requantized(merged.view())
    }
}
