//! bitsandbytes-compatible 4-bit blockwise quantization (NF4 and FP4), bit-identical to
//! `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`, with double quantization of the
//! block scales and the checkpoint layout transformers writes (see [`bnb_layout`]).
//!
//! # Format
//!
//! * **Blocks.** The tensor is flattened in row-major order and cut into blocks of `blocksize`
//!   consecutive values (a power of two, 32..=4096); the last block may be short. Each block
//!   keeps its absmax `a = max |x|` as its scale.
//! * **Codes.** Each value is scaled by `1/a` (computed once per block in `f32`, then
//!   multiplied — bitsandbytes' arithmetic) and mapped to one of the 16 values of the
//!   codebook ([`FourBitType::code`]): the nearest one, where a value exactly on the `f32`
//!   midpoint of two adjacent sorted code values goes to the **lower** one. NF4's table is
//!   sorted, so the code is the rank; FP4's table puts the sign in bit 3, so the rank in sorted
//!   order is remapped to bitsandbytes' code. FP4 has two zeros (+0 = code 0, −0 = code 8):
//!   tiny negative values get code 0 and tiny positive ones code 8, as in bitsandbytes.
//!   A block whose absmax is 0 codes every value as the code of 0.
//! * **Packing.** Two codes a byte, the **first element in the high nibble**. An odd-length
//!   tensor pads the last low nibble with the code of 0.0 (7 for NF4, 0 for FP4) — what
//!   bitsandbytes produces by quantizing a zero.
//! * **Dequantization.** `code_value[c] · a` in `f32`.
//! * **Double quantization** (`compress_statistics=True`): `offset = mean(absmax)` (PyTorch's
//!   CPU cascade sum, see [`torch_cpu_mean_f32`]); `absmax − offset` is quantized in blocks of
//!   256 with bitsandbytes' signed 8-bit dynamic map ([`bnb_dynamic_map_signed`]) as its CPU
//!   kernel does (through a 65536-bin lookup table, below), keeping one `f32` absmax per 256
//!   scales. The
//!   effective scale of block `b` is `map[code_b] · absmax2[b / 256] + offset`.
//! * **Storage.** [`FourBitTensor::stored_bytes`] counts `ceil(n/2)` packed bytes plus either
//!   4 bytes per block, or 1 byte per block + 4 per 256 blocks + 4 (offset) + 1024 (the map).
//!   NF4 with blocksize 64: 4.5 bits per weight plain, ≈4.127 double-quantized (large tensors).
//!
//! # Exact arithmetic (what reproduces bitsandbytes' bits)
//!
//! * Scaling is `x · (1/a)` with the reciprocal rounded to `f32` first (bitsandbytes' CPU
//!   kernel); on the reference data `x / a` happens to give the same codes.
//! * The 256-entry dynamic map comes out bit-identical only when `torch.linspace` is emulated
//!   as PyTorch's CPU kernel computes it (`f32` step; first half `start + step·i`, second half
//!   `end − step·(steps−1−i)`, each a fused multiply-add).
//! * The offset is PyTorch's CPU `mean` (cascade sum with 8-lane vectors, 4-way interleaving,
//!   then `/ n`). From 32768 blocks on (e.g. 4096×4096 at blocksize 64) PyTorch splits the sum
//!   across its threads, so the last bit of the offset depends on `torch.get_num_threads()`;
//!   [`FourBitTensor::quantize`] matches one thread, [`FourBitTensor::into_double_quant`]
//!   any given count. bitsandbytes on CUDA sums in yet another order.
//! * The 8-bit codes are not always the nearest map entry: bitsandbytes' CPU kernel
//!   (`quantize_cpu_impl`) rounds `x/a` to one of 65536 bins,
//!   `trunc((clamp(x/a, −1, 1) + 1)·0.5·65535 + 0.5)`, and takes the entry nearest to the
//!   bin's sample point `−1 + 2i/65535` (midpoint ties to the lower index); an all-zero block
//!   codes 0. A value within half a bin of a midpoint can so get the farther entry.
//!
//! # Against the reference data
//!
//! Packed codes, absmaxes, offsets, second-level absmaxes, 8-bit codes and the map are
//! bit-identical to all eight `tests/data/nf4` files. Two observations differ from the
//! reference README: the odd-length padding nibble is the code of 0.0 (7 for NF4), not
//! code 0; and requantizing the f32 llama checkpoint reproduces every tensor of the
//! transformers bnb-4bit checkpoint byte for byte (packed, absmax codes, quant_map,
//! nested_absmax, nested_quant_map, quant-state JSON; `tests/nf4_bnb_layout.rs`).
//!
//! ```
//! use quant_core::nf4::{FourBitTensor, FourBitType};
//!
//! let w: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let q = FourBitTensor::quantize(&w, &[4, 32], 64, FourBitType::Nf4, true).unwrap();
//! let back = q.dequantize();
//! assert_eq!(back.shape(), &[4, 32]);
//! for (a, b) in w.iter().zip(back.iter()) {
//!     assert!((a - b).abs() <= 0.16 * 1.01);
//! }
//! assert!(q.bits_per_weight() > 4.0);
//! ```

pub mod bnb_layout;
mod dequant;
mod dynamic_map;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::codebook::{FP4_CODE, NF4_CODE};
use crate::error::{check_finite, check_non_empty, QuantError, Result};

pub use dequant::DequantKernel;
pub use dynamic_map::{
    bnb_dynamic_map_signed, torch_cpu_mean_f32, torch_cpu_mean_f32_threads, DYNAMIC_MAP_LEN,
};

/// Smallest block size bitsandbytes supports for 4-bit quantization.
pub const MIN_BLOCKSIZE: usize = 32;
/// Largest block size bitsandbytes supports for 4-bit quantization.
pub const MAX_BLOCKSIZE: usize = 4096;
/// Block size of the second-level quantization of the absmaxes (bitsandbytes' default).
pub const DOUBLE_QUANT_BLOCKSIZE: usize = 256;

/// Number of 4-bit blocks each rayon task handles; large enough to amortise scheduling.
const BLOCKS_PER_TASK: usize = 256;

/// The two 4-bit codebooks of bitsandbytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FourBitType {
    /// NormalFloat4: quantiles of N(0,1), sorted, with an exact zero (code 7).
    Nf4,
    /// bitsandbytes' 4-bit float (e2m1 scaled to max 1), sign in bit 3.
    Fp4,
}

impl FourBitType {
    /// The 16 code values, indexed by code.
    ///
    /// ```
    /// use quant_core::nf4::FourBitType;
    /// assert_eq!(FourBitType::Nf4.code()[7], 0.0);
    /// assert_eq!(FourBitType::Fp4.code()[11], -1.0);
    /// ```
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4_CODE,
            FourBitType::Fp4 => &FP4_CODE,
        }
    }

    /// The name bitsandbytes uses: `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    /// Parses `"nf4"` / `"fp4"`.
    ///
    /// ```
    /// use quant_core::nf4::FourBitType;
    /// assert_eq!(FourBitType::from_name("fp4").unwrap(), FourBitType::Fp4);
    /// assert!(FourBitType::from_name("int4").is_err());
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(FourBitType::Nf4),
            "fp4" => Ok(FourBitType::Fp4),
            other => Err(QuantError::invalid(
                "quant_type",
                other,
                "expected \"nf4\" or \"fp4\"",
            )),
        }
    }

    /// The code a value of exactly 0.0 gets (also the padding nibble of odd-length tensors).
    pub fn zero_code(self) -> u8 {
        self.rounding().code_of(0.0)
    }

    /// Half the largest gap between adjacent sorted code values: the worst-case rounding error
    /// of one element, in units of its block's absmax.
    ///
    /// ```
    /// use quant_core::nf4::FourBitType;
    /// assert!((FourBitType::Nf4.max_half_gap() - 0.1519).abs() < 1e-4); // between −1 and −0.696
    /// ```
    pub fn max_half_gap(self) -> f32 {
        let sorted = self.rounding().sorted_values;
        sorted
            .windows(2)
            .map(|w| (w[1] - w[0]) / 2.0)
            .fold(0.0, f32::max)
    }

    fn rounding(self) -> CodeRounding {
        CodeRounding::new(self.code())
    }
}

/// Nearest-code rounding on one codebook: the 15 `f32` midpoints of the sorted values, and the
/// bitsandbytes code of each sorted rank.
#[derive(Debug, Clone, Copy)]
struct CodeRounding {
    midpoints: [f32; 15],
    rank_to_code: [u8; 16],
    sorted_values: [f32; 16],
}

impl CodeRounding {
    fn new(code: &[f32; 16]) -> Self {
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Stable, so FP4's +0 (code 0) ranks before −0 (code 8), as in bitsandbytes.
        order.sort_by(|&a, &b| {
            code[a as usize]
                .partial_cmp(&code[b as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let sorted_values: [f32; 16] = std::array::from_fn(|i| code[order[i] as usize]);
        let midpoints = std::array::from_fn(|i| (sorted_values[i] + sorted_values[i + 1]) / 2.0);
        CodeRounding {
            midpoints,
            rank_to_code: order,
            sorted_values,
        }
    }

    /// Rank of `scaled` = number of midpoints strictly below it (bucketize, right=False).
    /// Summing comparisons instead of branching lets the compiler vectorise the loop.
    #[inline(always)]
    fn rank_of(&self, scaled: f32) -> u8 {
        let mut rank = 0u8;
        for &m in &self.midpoints {
            rank += u8::from(m < scaled);
        }
        rank
    }

    #[inline(always)]
    fn code_of(&self, scaled: f32) -> u8 {
        self.rank_to_code[self.rank_of(scaled) as usize]
    }
}

/// Double-quantized block scales: the absmaxes minus their mean, coded with an 8-bit map.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantAbsmax {
    /// One 8-bit code per 4-bit block (index into `code2`).
    pub codes: Vec<u8>,
    /// One `f32` absmax per `blocksize2` codes.
    pub absmax2: Vec<f32>,
    /// The mean of the original absmaxes, added back after decoding.
    pub offset: f32,
    /// The 256-entry sorted map the codes index (bitsandbytes' signed dynamic map).
    pub code2: Vec<f32>,
    /// Number of codes per `absmax2` entry.
    pub blocksize2: usize,
}

impl DoubleQuantAbsmax {
    /// Double-quantizes per-block absmaxes the way bitsandbytes does.
    ///
    /// ```
    /// use quant_core::nf4::DoubleQuantAbsmax;
    /// let dq = DoubleQuantAbsmax::quantize(&[1.0, 2.0, 3.0]).unwrap();
    /// assert_eq!(dq.offset, 2.0);
    /// let back = dq.decode().unwrap();
    /// assert!(back.iter().zip([1.0, 2.0, 3.0]).all(|(a, b)| (a - b).abs() < 1e-2));
    /// ```
    pub fn quantize(absmax: &[f32]) -> Result<Self> {
        Self::quantize_with_torch_threads(absmax, 1)
    }

    /// [`DoubleQuantAbsmax::quantize`] with the offset computed as PyTorch does with
    /// `torch_threads` intra-op threads (see [`torch_cpu_mean_f32_threads`]); only matters
    /// from 32768 blocks on.
    pub fn quantize_with_torch_threads(absmax: &[f32], torch_threads: usize) -> Result<Self> {
        check_non_empty("DoubleQuantAbsmax::quantize absmax", absmax.len())?;
        check_finite("DoubleQuantAbsmax::quantize absmax", absmax)?;
        let offset = torch_cpu_mean_f32_threads(absmax, torch_threads);
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let map: [f32; DYNAMIC_MAP_LEN] = bnb_dynamic_map_signed()
            .try_into()
            .expect("the dynamic map has 256 entries");
        let (codes, absmax2) =
            dynamic_map::quantize_blockwise_8bit(&centred, &map, DOUBLE_QUANT_BLOCKSIZE);
        let code2 = map.to_vec();
        Ok(DoubleQuantAbsmax {
            codes,
            absmax2,
            offset,
            code2,
            blocksize2: DOUBLE_QUANT_BLOCKSIZE,
        })
    }

    /// The effective scale of block `block`: `code2[codes[b]] · absmax2[b / blocksize2] +
    /// offset`. The fields are public, so they are checked here: a block past the codes, a
    /// code past `code2`, a missing `absmax2` entry or `blocksize2 = 0` is an error naming it.
    ///
    /// ```
    /// use quant_core::nf4::DoubleQuantAbsmax;
    /// let mut dq = DoubleQuantAbsmax::quantize(&[1.0, 2.0, 3.0]).unwrap();
    /// assert!(dq.scale(1).is_ok());
    /// dq.absmax2.clear();
    /// assert!(dq.scale(1).unwrap_err().to_string().contains("absmax2"));
    /// ```
    pub fn scale(&self, block: usize) -> Result<f32> {
        let code = *self.codes.get(block).ok_or_else(|| {
            QuantError::shape(
                "DoubleQuantAbsmax codes (block index)",
                block + 1,
                self.codes.len(),
            )
        })?;
        let value = *self.code2.get(code as usize).ok_or_else(|| {
            QuantError::shape(
                "DoubleQuantAbsmax code2 (8-bit code)",
                code as usize + 1,
                self.code2.len(),
            )
        })?;
        if self.blocksize2 == 0 {
            return Err(QuantError::invalid(
                "blocksize2",
                0,
                "must be positive (bitsandbytes uses 256)",
            ));
        }
        let absmax2 = *self.absmax2.get(block / self.blocksize2).ok_or_else(|| {
            QuantError::shape(
                format!(
                    "DoubleQuantAbsmax absmax2 (one per {} codes)",
                    self.blocksize2
                ),
                block / self.blocksize2 + 1,
                self.absmax2.len(),
            )
        })?;
        Ok(value * absmax2 + self.offset)
    }

    /// [`DoubleQuantAbsmax::scale`] on parts already validated (inside a [`FourBitTensor`],
    /// whose constructor checked them and whose fields are private).
    #[inline]
    fn scale_validated(&self, block: usize) -> f32 {
        self.code2[self.codes[block] as usize] * self.absmax2[block / self.blocksize2] + self.offset
    }

    /// All effective scales; inconsistent parts are an error (see `scale`).
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.validate(self.codes.len())?;
        Ok((0..self.codes.len())
            .map(|b| self.scale_validated(b))
            .collect())
    }

    /// Errors unless the parts are consistent with `n_blocks` 4-bit blocks.
    fn validate(&self, n_blocks: usize) -> Result<()> {
        let ctx = "DoubleQuantAbsmax";
        if self.codes.len() != n_blocks {
            return Err(QuantError::shape(
                format!("{ctx} codes (one per 4-bit block)"),
                n_blocks,
                self.codes.len(),
            ));
        }
        if self.blocksize2 == 0 {
            return Err(QuantError::invalid(
                "blocksize2",
                0,
                "must be positive (bitsandbytes uses 256)",
            ));
        }
        let want2 = n_blocks.div_ceil(self.blocksize2);
        if self.absmax2.len() != want2 {
            return Err(QuantError::shape(
                format!("{ctx} absmax2 (one per {} codes)", self.blocksize2),
                want2,
                self.absmax2.len(),
            ));
        }
        if self.code2.len() != DYNAMIC_MAP_LEN {
            return Err(QuantError::shape(
                format!("{ctx} code2"),
                DYNAMIC_MAP_LEN,
                self.code2.len(),
            ));
        }
        check_finite("DoubleQuantAbsmax absmax2", &self.absmax2)?;
        check_finite("DoubleQuantAbsmax code2", &self.code2)?;
        check_finite("DoubleQuantAbsmax offset", &[self.offset])?;
        Ok(())
    }
}

/// The per-block scales of a [`FourBitTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum BlockScales {
    /// One `f32` absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized absmaxes.
    DoubleQuant(DoubleQuantAbsmax),
}

/// A tensor quantized to 4-bit NF4/FP4 codes in blocks, as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct FourBitTensor {
    shape: Vec<usize>,
    blocksize: usize,
    quant_type: FourBitType,
    packed: Vec<u8>,
    scales: BlockScales,
}

/// Errors unless `blocksize` is a power of two in `MIN_BLOCKSIZE..=MAX_BLOCKSIZE`.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !blocksize.is_power_of_two() || !(MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        return Err(QuantError::invalid(
            "blocksize",
            blocksize,
            format!("must be a power of two in {MIN_BLOCKSIZE}..={MAX_BLOCKSIZE}"),
        ));
    }
    Ok(())
}

fn element_count(context: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            QuantError::invalid("shape", format!("{shape:?}"), "element count overflows")
        })
        .and_then(|n| {
            check_non_empty(context, n)?;
            Ok(n)
        })
}

/// Max |x| of a block (0 for an all-zero block); +inf or NaN when the block holds a
/// non-finite value.
///
/// Works on the bit patterns with the sign cleared: for non-negative floats the integer order
/// is the numeric order, infinities and NaNs sort above every finite value, and integer max
/// vectorises — so one pass yields both the absmax and the finiteness check.
#[inline]
fn block_absmax(block: &[f32]) -> f32 {
    let mut lanes = [0u32; 8];
    let mut chunks = block.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = (*l).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    f32::from_bits(lanes.iter().fold(tail, |m, &l| m.max(l)))
}

/// Elements coded per step of the vectorised kernel (a multiple of every SIMD width; every
/// block size is a multiple of it, so only a short last block has a remainder).
const QUANT_LANES: usize = 32;

/// Codes one block into `out` (`ceil(len/2)` bytes), high nibble first, padding an odd tail
/// with the zero code. `IDENTITY` skips the rank→code remap (NF4, whose table is sorted).
#[inline(always)]
fn quantize_block<const IDENTITY: bool>(
    rounding: &CodeRounding,
    block: &[f32],
    absmax: f32,
    zero: u8,
    out: &mut [u8],
) {
    // 1/absmax then multiply, as bitsandbytes does; an all-zero block scales by 0 → code of 0.
    let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
    let map = &rounding.rank_to_code;
    let code = |rank: u32| -> u8 {
        if IDENTITY {
            rank as u8
        } else {
            map[rank as usize]
        }
    };
    let mut chunks = block.chunks_exact(QUANT_LANES);
    let (out_full, tail_out) = out.split_at_mut(block.len() / QUANT_LANES * (QUANT_LANES / 2));
    const PAIRS: usize = QUANT_LANES / 2;
    for (chunk, bytes) in (&mut chunks).zip(out_full.chunks_exact_mut(PAIRS)) {
        let chunk: &[f32; QUANT_LANES] = chunk.try_into().expect("chunks_exact length");
        let bytes: &mut [u8; PAIRS] = bytes.try_into().expect("chunks_exact_mut length");
        // High-nibble (even) and low-nibble (odd) elements in separate arrays, so ranking and
        // packing are plain lane-wise operations the compiler vectorises.
        let mut even = [0.0f32; PAIRS];
        let mut odd = [0.0f32; PAIRS];
        for j in 0..PAIRS {
            even[j] = chunk[2 * j] * inv;
            odd[j] = chunk[2 * j + 1] * inv;
        }
        // Midpoints outer, lanes inner: each midpoint is one broadcast compare over all lanes.
        let mut rank_even = [0u32; PAIRS];
        let mut rank_odd = [0u32; PAIRS];
        for &m in &rounding.midpoints {
            for j in 0..PAIRS {
                rank_even[j] += u32::from(m < even[j]);
                rank_odd[j] += u32::from(m < odd[j]);
            }
        }
        for j in 0..PAIRS {
            bytes[j] = if IDENTITY {
                ((rank_even[j] << 4) | rank_odd[j]) as u8
            } else {
                (map[(rank_even[j] & 15) as usize] << 4) | map[(rank_odd[j] & 15) as usize]
            };
        }
    }
    let tail = chunks.remainder();
    let mut pairs = tail.chunks_exact(2);
    for (byte, pair) in tail_out.iter_mut().zip(&mut pairs) {
        let hi = code(u32::from(rounding.rank_of(pair[0] * inv)));
        let lo = code(u32::from(rounding.rank_of(pair[1] * inv)));
        *byte = (hi << 4) | lo;
    }
    if let [last] = pairs.remainder() {
        tail_out[tail.len() / 2] = (code(u32::from(rounding.rank_of(last * inv))) << 4) | zero;
    }
}

/// One rayon task of [`FourBitTensor::quantize`]: consecutive blocks of values to absmaxes and
/// packed bytes.
struct QuantizeTask<'a> {
    rounding: &'a CodeRounding,
    /// True when the rank is the code (NF4).
    identity: bool,
    zero: u8,
    blocksize: usize,
}

impl QuantizeTask<'_> {
    fn run(&self, values: &[f32], absmax: &mut [f32], bytes: &mut [u8]) {
        for ((block, a), out) in values
            .chunks(self.blocksize)
            .zip(absmax.iter_mut())
            .zip(bytes.chunks_mut(self.blocksize / 2))
        {
            *a = block_absmax(block);
            if self.identity {
                quantize_block::<true>(self.rounding, block, *a, self.zero, out);
            } else {
                quantize_block::<false>(self.rounding, block, *a, self.zero, out);
            }
        }
    }
}

impl FourBitTensor {
    /// Quantizes `values` (row-major, `shape`) in blocks of `blocksize` to `quant_type`,
    /// double-quantizing the block absmaxes when `double_quant`.
    ///
    /// Errors on an empty tensor, `values.len()` ≠ product of `shape`, a block size that is
    /// not a power of two in 32..=4096, or a NaN/infinity (naming its flat index).
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let q = FourBitTensor::quantize(&[0.5, -1.0, 0.0], &[3], 64, FourBitType::Nf4, false).unwrap();
    /// // Codes 12 (0.4407, nearer 0.5 than 0.5626), 0 (−1) and 7 (0), padded with 7.
    /// assert_eq!(q.packed(), &[0xC0, 0x77]);
    /// assert_eq!(q.absmax_values(), vec![1.0]);
    /// assert!(FourBitTensor::quantize(&[1.0, f32::NAN], &[2], 64, FourBitType::Nf4, false).is_err());
    /// ```
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        blocksize: usize,
        quant_type: FourBitType,
        double_quant: bool,
    ) -> Result<Self> {
        let n = element_count("FourBitTensor::quantize input", shape)?;
        if values.len() != n {
            return Err(QuantError::shape(
                format!("FourBitTensor::quantize values for shape {shape:?}"),
                n,
                values.len(),
            ));
        }
        check_blocksize(blocksize)?;

        let rounding = quant_type.rounding();
        let zero = quant_type.zero_code();
        let n_blocks = n.div_ceil(blocksize);
        let mut absmax = vec![0.0f32; n_blocks];
        let mut packed = vec![0u8; n.div_ceil(2)];
        let task_values = BLOCKS_PER_TASK * blocksize;
        packed
            .par_chunks_mut(task_values / 2)
            .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(values.par_chunks(task_values))
            .for_each(|((bytes, amax), vals)| {
                let task = QuantizeTask {
                    rounding: &rounding,
                    identity: quant_type == FourBitType::Nf4,
                    zero,
                    blocksize,
                };
                task.run(vals, amax, bytes);
            });

        // Non-finite inputs surface as a non-finite block absmax (see `block_absmax`).
        if let Some(block) = absmax.iter().position(|a| !a.is_finite()) {
            let start = block * blocksize;
            let end = (start + blocksize).min(n);
            check_finite("FourBitTensor::quantize input", &values[start..end]).map_err(
                |e| match e {
                    QuantError::NonFinite {
                        context,
                        index,
                        value,
                    } => QuantError::NonFinite {
                        context,
                        index: start + index,
                        value,
                    },
                    other => other,
                },
            )?;
        }
        let scales = if double_quant {
            BlockScales::DoubleQuant(DoubleQuantAbsmax::quantize(&absmax)?)
        } else {
            BlockScales::Plain(absmax)
        };
        Ok(FourBitTensor {
            shape: shape.to_vec(),
            blocksize,
            quant_type,
            packed,
            scales,
        })
    }

    /// Replaces plain `f32` block scales by double-quantized ones, computing the offset as
    /// PyTorch does with `torch_threads` intra-op threads — for bit-identity with a
    /// bitsandbytes run on a CPU with that many threads when the tensor has 32768 blocks or
    /// more ([`FourBitTensor::quantize`] matches one thread). Already double-quantized scales
    /// are returned unchanged.
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let w = vec![0.5f32; 4096];
    /// let direct = FourBitTensor::quantize(&w, &[4096], 64, FourBitType::Nf4, true).unwrap();
    /// let plain = FourBitTensor::quantize(&w, &[4096], 64, FourBitType::Nf4, false).unwrap();
    /// assert_eq!(plain.into_double_quant(1).unwrap(), direct);
    /// ```
    pub fn into_double_quant(self, torch_threads: usize) -> Result<Self> {
        let BlockScales::Plain(absmax) = &self.scales else {
            return Ok(self);
        };
        let dq = DoubleQuantAbsmax::quantize_with_torch_threads(absmax, torch_threads)?;
        Ok(FourBitTensor {
            scales: BlockScales::DoubleQuant(dq),
            ..self
        })
    }

    /// [`FourBitTensor::quantize`] on an ndarray of any layout (read in logical row-major order).
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let w = ndarray::Array2::<f32>::from_shape_fn((8, 8), |(i, j)| (i as f32) - (j as f32));
    /// let q = FourBitTensor::quantize_array(w.view().into_dyn(), 64, FourBitType::Fp4, false).unwrap();
    /// assert_eq!(q.shape(), &[8, 8]);
    /// ```
    pub fn quantize_array(
        values: ArrayViewD<'_, f32>,
        blocksize: usize,
        quant_type: FourBitType,
        double_quant: bool,
    ) -> Result<Self> {
        let shape = values.shape().to_vec();
        match values.as_slice() {
            Some(flat) => Self::quantize(flat, &shape, blocksize, quant_type, double_quant),
            None => {
                let flat: Vec<f32> = values.iter().copied().collect();
                Self::quantize(&flat, &shape, blocksize, quant_type, double_quant)
            }
        }
    }

    /// Assembles a tensor from stored parts (e.g. a checkpoint), checking every length.
    ///
    /// ```
    /// use quant_core::nf4::{BlockScales, FourBitTensor, FourBitType};
    /// let q = FourBitTensor::from_parts(vec![2, 2], 64, FourBitType::Nf4, vec![0xF0, 0x7F],
    ///     BlockScales::Plain(vec![2.0])).unwrap();
    /// assert_eq!(q.dequantize().into_raw_vec_and_offset().0, vec![2.0, -2.0, 0.0, 2.0]);
    /// assert!(FourBitTensor::from_parts(vec![2, 2], 64, FourBitType::Nf4, vec![0],
    ///     BlockScales::Plain(vec![2.0])).is_err());
    /// ```
    pub fn from_parts(
        shape: Vec<usize>,
        blocksize: usize,
        quant_type: FourBitType,
        packed: Vec<u8>,
        scales: BlockScales,
    ) -> Result<Self> {
        let n = element_count("FourBitTensor::from_parts shape", &shape)?;
        check_blocksize(blocksize)?;
        if packed.len() != n.div_ceil(2) {
            return Err(QuantError::shape(
                format!("FourBitTensor::from_parts packed bytes for shape {shape:?}"),
                n.div_ceil(2),
                packed.len(),
            ));
        }
        let n_blocks = n.div_ceil(blocksize);
        match &scales {
            BlockScales::Plain(absmax) => {
                if absmax.len() != n_blocks {
                    return Err(QuantError::shape(
                        "FourBitTensor::from_parts absmax (one per block)",
                        n_blocks,
                        absmax.len(),
                    ));
                }
                check_finite("FourBitTensor::from_parts absmax", absmax)?;
            }
            BlockScales::DoubleQuant(dq) => dq.validate(n_blocks)?,
        }
        Ok(FourBitTensor {
            shape,
            blocksize,
            quant_type,
            packed,
            scales,
        })
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of values per block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> FourBitType {
        self.quant_type
    }

    /// Packed codes, two a byte, first element in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The stored block scales.
    pub fn scales(&self) -> &BlockScales {
        &self.scales
    }

    /// Number of quantized values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Always false: an empty tensor cannot be built.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        self.len().div_ceil(self.blocksize)
    }

    /// The 4-bit code of every element, unpacked (high nibble first).
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let q = FourBitTensor::quantize(&[1.0, -1.0, 0.0], &[3], 32, FourBitType::Nf4, false).unwrap();
    /// assert_eq!(q.codes(), vec![15, 0, 7]);
    /// ```
    pub fn codes(&self) -> Vec<u8> {
        let n = self.len();
        (0..n)
            .map(|i| {
                let byte = self.packed[i / 2];
                if i % 2 == 0 {
                    byte >> 4
                } else {
                    byte & 0x0f
                }
            })
            .collect()
    }

    /// The effective per-block scales (decoded when double-quantized).
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.scales {
            BlockScales::Plain(a) => a.clone(),
            BlockScales::DoubleQuant(dq) => {
                (0..dq.codes.len()).map(|b| dq.scale_validated(b)).collect()
            }
        }
    }

    /// Bytes actually stored: packed codes plus the scales (`f32` absmaxes, or 8-bit codes,
    /// second-level `f32` absmaxes, the `f32` offset and the 256-entry `f32` map).
    pub fn stored_bytes(&self) -> usize {
        let f32_bytes = std::mem::size_of::<f32>();
        let scales = match &self.scales {
            BlockScales::Plain(a) => a.len() * f32_bytes,
            BlockScales::DoubleQuant(dq) => {
                dq.codes.len() + (dq.absmax2.len() + 1 + dq.code2.len()) * f32_bytes
            }
        };
        self.packed.len() + scales
    }

    /// `8 · stored_bytes() / len()`.
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let w = vec![0.25f32; 4096];
    /// let plain = FourBitTensor::quantize(&w, &[4096], 64, FourBitType::Nf4, false).unwrap();
    /// assert_eq!(plain.bits_per_weight(), 4.5); // 4 + 32/64
    /// ```
    pub fn bits_per_weight(&self) -> f64 {
        (8 * self.stored_bytes()) as f64 / self.len() as f64
    }

    /// Dequantizes the whole tensor.
    pub fn dequantize(&self) -> ArrayD<f32> {
        let mut out = vec![0.0f32; self.len()];
        self.dequantize_flat(&mut out);
        ArrayD::from_shape_vec(IxDyn(&self.shape), out)
            .expect("the element count is the product of the shape")
    }

    /// Dequantizes the whole tensor into `out` (row-major, length `len()`).
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.len() {
            return Err(QuantError::shape(
                "FourBitTensor::dequantize_into output length",
                self.len(),
                out.len(),
            ));
        }
        self.dequantize_flat(out);
        Ok(())
    }

    fn dequantize_flat(&self, out: &mut [f32]) {
        let (kernel, quant_type) = (DequantKernel::detect(), self.quant_type);
        let bs = self.blocksize;
        let task_values = BLOCKS_PER_TASK * bs;
        let scales = self.absmax_values();
        out.par_chunks_mut(task_values)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first_block = task * BLOCKS_PER_TASK;
                for (k, block_out) in chunk.chunks_mut(bs).enumerate() {
                    let block = first_block + k;
                    dequant::dequantize_segment(
                        kernel,
                        quant_type,
                        scales[block],
                        &self.packed,
                        block * bs,
                        block_out,
                    );
                }
            });
    }

    /// Dequantizes the flat elements `start..end` into `out` (length `end − start`), serially:
    /// for tile-by-tile use where the caller provides the parallelism.
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let w: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
    /// let q = FourBitTensor::quantize(&w, &[100], 32, FourBitType::Nf4, true).unwrap();
    /// let mut part = vec![0.0; 41];
    /// q.dequantize_range(27, 68, &mut part).unwrap();
    /// assert_eq!(&part[..], &q.dequantize().as_slice().unwrap()[27..68]);
    /// ```
    pub fn dequantize_range(&self, start: usize, end: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_range_with(DequantKernel::detect(), start, end, out)
    }

    /// [`FourBitTensor::dequantize_range`] on a chosen kernel (every kernel gives the same
    /// bits; tests and benchmarks run each one this CPU has). A kernel the CPU lacks is
    /// refused by name.
    ///
    /// ```
    /// use quant_core::nf4::{DequantKernel, FourBitTensor, FourBitType};
    /// let w: Vec<f32> = (0..300).map(|i| (i as f32 * 0.1).sin()).collect();
    /// let q = FourBitTensor::quantize(&w, &[300], 64, FourBitType::Nf4, false).unwrap();
    /// let all = q.dequantize();
    /// for kernel in DequantKernel::available() {
    ///     let mut part = vec![0.0; 250];
    ///     q.dequantize_range_with(kernel, 7, 257, &mut part).unwrap();
    ///     assert_eq!(&part[..], &all.as_slice().unwrap()[7..257]);
    /// }
    /// ```
    pub fn dequantize_range_with(
        &self,
        kernel: DequantKernel,
        start: usize,
        end: usize,
        out: &mut [f32],
    ) -> Result<()> {
        if !kernel.is_available() {
            return Err(QuantError::invalid(
                "4-bit dequantization kernel",
                kernel.name(),
                "this CPU lacks the instructions it needs (use DequantKernel::detect())",
            ));
        }
        let n = self.len();
        if start > end || end > n {
            return Err(QuantError::invalid(
                "element range",
                format!("{start}..{end}"),
                format!("must satisfy start <= end <= {n}"),
            ));
        }
        if out.len() != end - start {
            return Err(QuantError::shape(
                format!("FourBitTensor::dequantize_range output for {start}..{end}"),
                end - start,
                out.len(),
            ));
        }
        let bs = self.blocksize;
        let mut index = start;
        let mut out = out;
        while index < end {
            let block = index / bs;
            let seg_end = ((block + 1) * bs).min(end);
            let scale = match &self.scales {
                BlockScales::Plain(a) => a[block],
                BlockScales::DoubleQuant(dq) => dq.scale_validated(block),
            };
            let (seg, rest) = out.split_at_mut(seg_end - index);
            dequant::dequantize_segment(kernel, self.quant_type, scale, &self.packed, index, seg);
            out = rest;
            index = seg_end;
        }
        Ok(())
    }

    /// Dequantizes rows `row_start..row_end` of a 2-D `(rows, cols)` tensor into `out`
    /// (length `(row_end − row_start)·cols`, row-major). Rows may begin mid-block.
    ///
    /// ```
    /// use quant_core::nf4::{FourBitTensor, FourBitType};
    /// let w: Vec<f32> = (0..15 * 7).map(|i| (i as f32).sin()).collect();
    /// let q = FourBitTensor::quantize(&w, &[15, 7], 32, FourBitType::Fp4, false).unwrap();
    /// let mut tile = vec![0.0; 3 * 7];
    /// q.dequantize_rows(4, 7, &mut tile).unwrap();
    /// assert_eq!(&tile[..], &q.dequantize().as_slice().unwrap()[28..49]);
    /// assert!(q.dequantize_rows(14, 16, &mut tile).is_err());
    /// ```
    pub fn dequantize_rows(&self, row_start: usize, row_end: usize, out: &mut [f32]) -> Result<()> {
        let [rows, cols] = self.shape[..] else {
            return Err(QuantError::shape(
                "FourBitTensor::dequantize_rows tensor rank",
                2,
                self.shape.len(),
            ));
        };
        if row_start > row_end || row_end > rows {
            return Err(QuantError::invalid(
                "row range",
                format!("{row_start}..{row_end}"),
                format!("must satisfy start <= end <= {rows} rows"),
            ));
        }
        if out.len() != (row_end - row_start) * cols {
            return Err(QuantError::shape(
                format!("FourBitTensor::dequantize_rows output for rows {row_start}..{row_end} of {cols} columns"),
                (row_end - row_start) * cols,
                out.len(),
            ));
        }
        self.dequantize_range(row_start * cols, row_end * cols, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_tables() {
        let nf4 = FourBitType::Nf4.rounding();
        assert_eq!(nf4.rank_to_code, std::array::from_fn(|i| i as u8));
        let fp4 = FourBitType::Fp4.rounding();
        assert_eq!(
            fp4.rank_to_code,
            [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
        );
        assert_eq!(FourBitType::Nf4.zero_code(), 7);
        assert_eq!(FourBitType::Fp4.zero_code(), 0);
    }

    #[test]
    fn midpoint_ties_go_down() {
        let r = FourBitType::Nf4.rounding();
        for (i, &m) in r.midpoints.iter().enumerate() {
            assert_eq!(r.rank_of(m) as usize, i);
            let above = if m > 0.0 {
                f32::from_bits(m.to_bits() + 1)
            } else {
                f32::from_bits(m.to_bits() - 1)
            };
            assert_eq!(r.rank_of(above) as usize, i + 1);
        }
    }

    #[test]
    fn fp4_tiny_values_use_signed_zero_codes_as_bitsandbytes() {
        let q =
            FourBitTensor::quantize(&[1.0, 1e-4, -1e-4, 0.0], &[4], 32, FourBitType::Fp4, false)
                .unwrap();
        assert_eq!(q.codes(), vec![3, 8, 0, 0]);
    }

    #[test]
    fn all_zero_block_codes_zero() {
        let q = FourBitTensor::quantize(&[0.0; 64], &[64], 32, FourBitType::Nf4, true).unwrap();
        assert!(q.codes().iter().all(|&c| c == 7));
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }
}
