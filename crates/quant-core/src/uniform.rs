//! Long because it holds one grid's whole story — the grid, its initialisation (with the
//! MSE clip search), the stored form and the learned-step quantizer, and their unit tests;
//! the per-group training loops live in `uniform/segment.rs`.
//!
//! Uniform integer grids: symmetric and zero-point quantization of 2-D tensors at tensor,
//! channel, token or block granularity, their initialisation (absmax and an MSE-optimal clip
//! search), the stored form [`UniformQuantized`], and the learned-step differentiable
//! quantizer [`UniformQuantizer`].
//!
//! # Grid
//!
//! A value `x` of a group with scale `s` and integer zero point `z` gets the code
//! `q = clamp(round(x/s) + z, qmin, qmax)` (round half to even) and dequantizes to
//! `(q − z)·s`.
//!
//! * **Symmetric**: `z = 0`, `qmin = −2^(b−1)`, `qmax = 2^(b−1) − 1`. Absmax init uses
//!   `s = max|x| / qmax`, so both `+max|x|` and `−max|x|` are representable without clipping
//!   (the extra negative level `qmin` is then only reached by clipped values).
//! * **Asymmetric**: `qmin = 0`, `qmax = 2^b − 1`. Absmax init uses the group range extended to
//!   contain 0, `[lo, hi] = [min(min x, 0), max(max x, 0)]`: `s = (hi − lo)/(2^b − 1)`,
//!   `z = clamp(round(−lo/s), 0, 2^b − 1)`, so 0 is exactly representable.
//! * **MSE clip search** ([`mse_clip_search`]): tries clip ratios `r` on an even grid from
//!   `max_ratio` down to `min_ratio` (default 1.0 … 0.3 in steps of 0.01), sets the absmax
//!   parameters of the range `r·[lo, hi]`, and keeps the ratio with the least squared
//!   fake-quantization error of the group (ties keep the larger ratio, so the result is never
//!   worse than absmax).
//! * A group whose range is zero (all zeros, or so small the scale underflows) gets scale 1 and
//!   zero point 0: it dequantizes to exact zeros instead of NaN.
//!
//! Stored codes are unsigned: `q − qmin`.
//!
//! # Granularity
//!
//! For a tensor of shape `(rows, cols)` in row-major order ([`Granularity`]): per-tensor is one
//! group; per-channel (weights `(out, in)`) and per-token (activations `[tokens, features]`)
//! are one group per row; per-block is contiguous blocks of `size` along each row, the last
//! block of a row possibly shorter, numbered row-major (`row·⌈cols/size⌉ + block`). Every group
//! is therefore one contiguous range of the row-major data.
//!
//! ```
//! use ndarray::array;
//! use quant_core::quantizer::InitMethod;
//! use quant_core::uniform::{quantize_tensor, Granularity, GridKind, TensorQuantSpec};
//!
//! let w = array![[0.5f32, -1.0, 0.25, 0.0], [2.0, 1.0, -2.0, 0.5]];
//! let spec = TensorQuantSpec {
//!     kind: GridKind::Uniform,
//!     bits: 3,
//!     granularity: Granularity::PerChannel,
//!     symmetric: true,
//!     init: InitMethod::Absmax,
//! };
//! let q = quantize_tensor(w.view(), &spec).unwrap();
//! assert_eq!(q.scales(), &[1.0 / 3.0, 2.0 / 3.0]);
//! let w_hat = q.dequantize();
//! assert!((w_hat[[1, 2]] + 2.0).abs() < 1e-6);
//! // 8 codes · 3 bits = 3 bytes, plus two f32 scales: (24 + 64) / 8 bits per weight.
//! assert_eq!(q.bits_per_weight(), 11.0);
//! ```

use std::ops::Range;

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::error::{check_bits, check_finite, check_non_empty, QuantError, Result};
use crate::packing::PackedCodes;
use crate::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};
use crate::rounding::{fake_quant_scalar, quantize_scalar, round_half_even};
use crate::ste::{lsq_grad_scale, Ste};

mod segment;

/// Which values share one scale (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per row of an `(out, in)` weight (per output channel).
    PerChannel,
    /// One scale per row of a `[tokens, features]` activation (same math as per-channel).
    PerToken,
    /// Contiguous blocks of `size` values along each row; the last block may be short.
    PerBlock {
        /// Values per block (> 0).
        size: usize,
    },
}

impl Granularity {
    /// Errors on a zero block size, naming `granularity.per_block.size`.
    pub fn validate(&self) -> Result<()> {
        match self {
            Granularity::PerBlock { size: 0 } => Err(QuantError::invalid(
                "granularity.per_block.size",
                0,
                "a block must hold at least one value",
            )),
            _ => Ok(()),
        }
    }
}

/// How a `(rows, cols)` row-major tensor splits into groups under a [`Granularity`].
///
/// ```
/// use quant_core::uniform::{Granularity, GroupLayout};
/// let layout = GroupLayout::new(2, 5, Granularity::PerBlock { size: 2 }).unwrap();
/// assert_eq!(layout.num_groups(), 6);
/// assert_eq!(layout.group_sizes(), vec![2, 2, 1, 2, 2, 1]);
/// let segments: Vec<_> = layout.row_segments(1).collect();
/// assert_eq!(segments, vec![(3, 0..2), (4, 2..4), (5, 4..5)]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    rows: usize,
    cols: usize,
    granularity: Granularity,
}

impl GroupLayout {
    /// Errors on an empty shape or a zero block size.
    pub fn new(rows: usize, cols: usize, granularity: Granularity) -> Result<Self> {
        granularity.validate()?;
        check_non_empty("tensor to quantize (rows)", rows)?;
        check_non_empty("tensor to quantize (cols)", cols)?;
        Ok(GroupLayout {
            rows,
            cols,
            granularity,
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The granularity.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    fn segment_len(&self) -> usize {
        match self.granularity {
            Granularity::PerBlock { size } => size,
            _ => self.cols,
        }
    }

    fn segments_per_row(&self) -> usize {
        self.cols.div_ceil(self.segment_len())
    }

    /// Number of groups (scales).
    pub fn num_groups(&self) -> usize {
        match self.granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel | Granularity::PerToken => self.rows,
            Granularity::PerBlock { .. } => self.rows * self.segments_per_row(),
        }
    }

    /// The `(group, column range)` pieces of row `row`, left to right.
    pub fn row_segments(&self, row: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
        let seg = self.segment_len();
        let cols = self.cols;
        let base = match self.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel | Granularity::PerToken => row,
            Granularity::PerBlock { .. } => row * self.segments_per_row(),
        };
        (0..self.segments_per_row()).map(move |j| (base + j, j * seg..((j + 1) * seg).min(cols)))
    }

    /// Number of values in each group.
    pub fn group_sizes(&self) -> Vec<usize> {
        match self.granularity {
            Granularity::PerTensor => vec![self.rows * self.cols],
            _ => (0..self.rows)
                .flat_map(|r| self.row_segments(r).map(|(_, cols)| cols.len()))
                .collect(),
        }
    }

    /// The values of each group of the row-major `data`, indexed by group.
    pub fn group_slices<'a>(&self, data: &'a [f32]) -> Vec<&'a [f32]> {
        match self.granularity {
            Granularity::PerTensor => vec![data],
            _ => (0..self.rows)
                .flat_map(|r| {
                    let row = &data[r * self.cols..(r + 1) * self.cols];
                    self.row_segments(r).map(move |(_, cols)| &row[cols])
                })
                .collect(),
        }
    }
}

/// A uniform integer grid: bit width and whether it is symmetric.
///
/// ```
/// use quant_core::uniform::UniformGrid;
/// let g = UniformGrid::new(3, true).unwrap();
/// assert_eq!((g.qmin(), g.qmax()), (-4.0, 3.0));
/// let g = UniformGrid::new(3, false).unwrap();
/// assert_eq!((g.qmin(), g.qmax()), (0.0, 7.0));
/// assert!(UniformGrid::new(9, true).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniformGrid {
    bits: u32,
    symmetric: bool,
}

impl UniformGrid {
    /// Errors unless `2 <= bits <= 8`.
    pub fn new(bits: u32, symmetric: bool) -> Result<Self> {
        check_bits("uniform quantizer", bits, 2, 8)?;
        Ok(UniformGrid { bits, symmetric })
    }

    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Zero point fixed at 0 and a signed code range.
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }

    /// Lowest code.
    pub fn qmin(&self) -> f32 {
        if self.symmetric {
            -((1u32 << (self.bits - 1)) as f32)
        } else {
            0.0
        }
    }

    /// Highest code; also LSQ's number of positive levels `Qp`.
    pub fn qmax(&self) -> f32 {
        if self.symmetric {
            ((1u32 << (self.bits - 1)) - 1) as f32
        } else {
            ((1u32 << self.bits) - 1) as f32
        }
    }

    /// Absmax parameters for a group whose values lie in `[lo, hi]` (`lo ≤ 0 ≤ hi`).
    fn params_for_range(&self, lo: f32, hi: f32) -> GroupParams {
        let levels = ((1u32 << self.bits) - 1) as f32;
        let (mut scale, zero_point) = if self.symmetric {
            (hi.max(-lo) / self.qmax(), 0.0)
        } else {
            // Divide before subtracting so that a range near f32::MAX cannot overflow.
            let scale = hi / levels - lo / levels;
            (scale, round_half_even(-lo / scale).clamp(0.0, levels))
        };
        // Near f32::MAX the end levels (q − z)·s could round past f32::MAX (a rounded-up
        // scale, or a zero point shifting the grid by half a step): shrink the step so that
        // every level stays finite.
        let reach = (zero_point - self.qmin()).max(self.qmax() - zero_point);
        if scale.is_finite() && !(reach * scale).is_finite() {
            scale = f32::MAX / reach * (1.0 - f32::EPSILON);
        }
        let zero_point = zero_point as i32;
        if scale.is_finite() && scale >= f32::MIN_POSITIVE {
            GroupParams { scale, zero_point }
        } else {
            // A zero (or underflowing) range: any positive scale maps everything to ~0.
            GroupParams {
                scale: 1.0,
                zero_point: 0,
            }
        }
    }
}

/// Scale and integer zero point of one group.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupParams {
    /// Step between adjacent levels (> 0).
    pub scale: f32,
    /// Code of the value 0 (always 0 on a symmetric grid).
    pub zero_point: i32,
}

/// The grid of clip ratios the MSE search tries: `steps` ratios evenly spaced from
/// `max_ratio` down to `min_ratio`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipSearch {
    /// Smallest ratio tried (> 0).
    pub min_ratio: f32,
    /// Largest ratio tried (≥ `min_ratio`); 1.0 is the absmax range.
    pub max_ratio: f32,
    /// Number of ratios (≥ 1; 1 tries `max_ratio` only).
    pub steps: usize,
}

impl Default for ClipSearch {
    /// 1.00, 0.99, …, 0.30.
    fn default() -> Self {
        ClipSearch {
            min_ratio: 0.3,
            max_ratio: 1.0,
            steps: 71,
        }
    }
}

impl ClipSearch {
    /// Errors naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if !(self.min_ratio.is_finite() && self.min_ratio > 0.0) {
            return Err(QuantError::invalid(
                "clip_search.min_ratio",
                self.min_ratio,
                "must be finite and positive",
            ));
        }
        if !(self.max_ratio.is_finite() && self.max_ratio >= self.min_ratio) {
            return Err(QuantError::invalid(
                "clip_search.max_ratio",
                self.max_ratio,
                format!("must be finite and at least min_ratio = {}", self.min_ratio),
            ));
        }
        if self.steps == 0 {
            return Err(QuantError::invalid(
                "clip_search.steps",
                0,
                "at least one ratio must be tried",
            ));
        }
        Ok(())
    }

    /// The ratios, largest first.
    pub fn ratios(&self) -> Vec<f32> {
        if self.steps == 1 {
            return vec![self.max_ratio];
        }
        let span = f64::from(self.max_ratio - self.min_ratio);
        (0..self.steps)
            .map(|k| (f64::from(self.max_ratio) - span * k as f64 / (self.steps - 1) as f64) as f32)
            .collect()
    }

    /// The ratio with the least `error(ratio)` (first, i.e. largest, on ties) and its error.
    /// Large groups evaluate ratios in parallel.
    pub(crate) fn best_ratio(
        &self,
        group_len: usize,
        error: impl Fn(f32) -> f64 + Sync,
    ) -> (f32, f64) {
        let ratios = self.ratios();
        let errors: Vec<f64> = if group_len >= 1 << 15 {
            ratios.par_iter().map(|&r| error(r)).collect()
        } else {
            ratios.iter().map(|&r| error(r)).collect()
        };
        let mut best = (ratios[0], errors[0]);
        for (&r, &e) in ratios.iter().zip(&errors).skip(1) {
            if e < best.1 {
                best = (r, e);
            }
        }
        best
    }
}

/// `(min(min x, 0), max(max x, 0))`.
fn range_with_zero(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Absmax parameters of one group (see the [module docs](self)).
///
/// ```
/// use quant_core::uniform::{absmax_params, UniformGrid};
/// let p = absmax_params(&[-1.5, 0.75, 3.0], UniformGrid::new(3, true).unwrap()).unwrap();
/// assert_eq!((p.scale, p.zero_point), (1.0, 0));
/// let p = absmax_params(&[0.0, 0.0], UniformGrid::new(4, true).unwrap()).unwrap();
/// assert_eq!(p.scale, 1.0); // all zeros: no NaN
/// ```
pub fn absmax_params(values: &[f32], grid: UniformGrid) -> Result<GroupParams> {
    check_non_empty("absmax group", values.len())?;
    check_finite("absmax group", values)?;
    let (lo, hi) = range_with_zero(values);
    Ok(grid.params_for_range(lo, hi))
}

/// Sum of squared fake-quantization errors of `values` with `params`, exactly as
/// [`fake_quant_scalar`] quantizes.
fn squared_error(values: &[f32], grid: UniformGrid, params: GroupParams) -> f64 {
    let (zp, qmin, qmax) = (params.zero_point as f32, grid.qmin(), grid.qmax());
    values
        .iter()
        .map(|&x| {
            let e = f64::from(x - fake_quant_scalar(x, params.scale, zp, qmin, qmax));
            e * e
        })
        .sum()
}

/// Adding and subtracting 1.5·2^23 rounds an f32 of magnitude below 2^22 to an integer, half
/// to even, under the default rounding mode — without the `roundeven` libm call that
/// `f32::round_ties_even` becomes on baseline x86-64, so the loop below vectorizes.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Fast estimate of [`squared_error`] for ranking clip ratios: multiplies by `1/scale`
/// instead of dividing and clamps before rounding (equal to rounding then clamping for
/// integer bounds). It can differ from the exact error only for values within an ulp of a
/// rounding boundary, which does not matter for choosing a ratio; the chosen ratio's error
/// is recomputed exactly.
fn squared_error_estimate(values: &[f32], grid: UniformGrid, params: GroupParams) -> f64 {
    const LANES: usize = 8;
    const BLOCK: usize = 1024;
    let scale = params.scale;
    let inv = 1.0 / scale;
    let zp = params.zero_point as f32;
    let (lo, hi) = (grid.qmin() - zp, grid.qmax() - zp);
    let err = |x: f32| {
        let y = (x * inv).clamp(lo, hi);
        let e = x - ((y + ROUND_MAGIC) - ROUND_MAGIC) * scale;
        e * e
    };
    let mut total = 0.0f64;
    // f32 lane sums over short blocks (vectorizable), accumulated in f64.
    for block in values.chunks(BLOCK) {
        let mut lanes = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += err(x);
            }
        }
        let tail_sum: f32 = tail.iter().map(|&x| err(x)).sum();
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail_sum);
    }
    total
}

/// What [`mse_clip_search`] found for one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipSearchResult {
    /// The parameters of the best clip ratio.
    pub params: GroupParams,
    /// The best ratio (1.0 = absmax).
    pub ratio: f32,
    /// Mean squared fake-quantization error with `params`.
    pub mse: f64,
}

/// The clip ratio of `search` that minimises the mean squared fake-quantization error of one
/// group on `grid` (any bit width). Reused by [`InitMethod::MseClipSearch`]; exposed for
/// calibration.
///
/// ```
/// use quant_core::uniform::{absmax_params, mse_clip_search, ClipSearch, UniformGrid};
/// let grid = UniformGrid::new(3, true).unwrap();
/// // One outlier: clipping it pays off for the 256 other values.
/// let mut w: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
/// w.push(0.5);
/// let found = mse_clip_search(&w, grid, &ClipSearch::default()).unwrap();
/// assert!(found.ratio < 1.0);
/// assert!(found.params.scale < absmax_params(&w, grid).unwrap().scale);
/// ```
pub fn mse_clip_search(
    values: &[f32],
    grid: UniformGrid,
    search: &ClipSearch,
) -> Result<ClipSearchResult> {
    search.validate()?;
    check_non_empty("clip search group", values.len())?;
    check_finite("clip search group", values)?;
    let (lo, hi) = range_with_zero(values);
    let (ratio, _) = search.best_ratio(values.len(), |r| {
        squared_error_estimate(values, grid, grid.params_for_range(r * lo, r * hi))
    });
    let params = grid.params_for_range(ratio * lo, ratio * hi);
    Ok(ClipSearchResult {
        params,
        ratio,
        mse: squared_error(values, grid, params) / values.len() as f64,
    })
}

/// Copies a view into a row-major `Vec` (any strides).
pub(crate) fn row_major(w: ArrayView2<'_, f32>) -> Vec<f32> {
    // A standard-layout view is one memcpy; element-wise iteration is several times slower.
    match w.as_slice() {
        Some(contiguous) => contiguous.to_vec(),
        None => w.iter().copied().collect(),
    }
}

/// The row-major values of a view: borrowed when it is already contiguous (no copy of a
/// weight-sized buffer), copied by [`row_major`] otherwise.
pub(crate) fn row_major_cow<'a>(w: ArrayView2<'a, f32>) -> std::borrow::Cow<'a, [f32]> {
    match w.to_slice() {
        Some(contiguous) => std::borrow::Cow::Borrowed(contiguous),
        None => std::borrow::Cow::Owned(row_major(w)),
    }
}

/// [`row_major`] into `buffer` (cleared first; its capacity is reused).
pub(crate) fn row_major_into(w: ArrayView2<'_, f32>, mut buffer: Vec<f32>) -> Vec<f32> {
    buffer.clear();
    match w.as_slice() {
        Some(contiguous) => buffer.extend_from_slice(contiguous),
        None => buffer.extend(w.iter().copied()),
    }
    buffer
}

/// Per-group parameters of `w` under `granularity`, initialised by `method`.
///
/// ```
/// use ndarray::array;
/// use quant_core::quantizer::InitMethod;
/// use quant_core::uniform::{init_params, ClipSearch, Granularity, UniformGrid};
/// let w = array![[1.0f32, -3.0], [0.5, 0.25]];
/// let grid = UniformGrid::new(4, true).unwrap();
/// let p = init_params(w.view(), Granularity::PerChannel, grid, InitMethod::Absmax,
///                     &ClipSearch::default()).unwrap();
/// assert_eq!(p[0].scale, 3.0 / 7.0);
/// assert_eq!(p[1].scale, 0.5 / 7.0);
/// ```
pub fn init_params(
    w: ArrayView2<'_, f32>,
    granularity: Granularity,
    grid: UniformGrid,
    method: InitMethod,
    search: &ClipSearch,
) -> Result<Vec<GroupParams>> {
    let (rows, cols) = w.dim();
    let layout = GroupLayout::new(rows, cols, granularity)?;
    let data = row_major(w);
    check_finite("weights to initialise from", &data)?;
    search.validate()?;
    let groups = layout.group_slices(&data);
    groups
        .par_iter()
        .map(|values| match method {
            InitMethod::Absmax => absmax_params(values, grid),
            InitMethod::MseClipSearch => mse_clip_search(values, grid, search).map(|r| r.params),
        })
        .collect()
}

/// A 2-D tensor quantized to a uniform grid, as stored.
///
/// * `codes`: the unsigned codes `q − qmin` of all `rows·cols` values in row-major order,
///   packed as in [`crate::packing`] (`bits` wide).
/// * `scales`: one `f32` per group, in group order (see [`GroupLayout`]: per-tensor 1;
///   per-channel / per-token one per row; per-block `row·⌈cols/size⌉ + block`).
/// * `zero_points`: for asymmetric grids one `u8` per group in the same order (the code of
///   0.0); empty for symmetric grids, whose zero point is 0.
///
/// Value `i` of group `g` dequantizes to `(codes[i] + qmin − zero_points[g])·scales[g]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "UniformQuantizedParts")]
pub struct UniformQuantized {
    shape: (usize, usize),
    bits: u32,
    granularity: Granularity,
    symmetric: bool,
    codes: PackedCodes,
    scales: Vec<f32>,
    zero_points: Vec<u8>,
}

/// The raw serialized form of [`UniformQuantized`], checked on deserialization.
#[derive(serde::Deserialize)]
struct UniformQuantizedParts {
    shape: (usize, usize),
    bits: u32,
    granularity: Granularity,
    symmetric: bool,
    codes: PackedCodes,
    scales: Vec<f32>,
    zero_points: Vec<u8>,
}

impl TryFrom<UniformQuantizedParts> for UniformQuantized {
    type Error = QuantError;
    fn try_from(p: UniformQuantizedParts) -> Result<Self> {
        UniformQuantized::from_parts(
            p.shape,
            p.bits,
            p.granularity,
            p.symmetric,
            p.codes,
            p.scales,
            p.zero_points,
        )
    }
}

impl UniformQuantized {
    /// Assembles a stored tensor, checking that every part agrees with the shape, bits and
    /// granularity (code count and width, one positive finite scale per group, one zero point
    /// per group within the code range when asymmetric, none when symmetric).
    ///
    /// ```
    /// use quant_core::packing::PackedCodes;
    /// use quant_core::uniform::{Granularity, UniformQuantized};
    ///
    /// // 2×2, 4-bit asymmetric, per-channel: row 0 has zero point 3, row 1 has 4.
    /// let codes = PackedCodes::pack(&[0, 3, 4, 15], 4).unwrap();
    /// let q = UniformQuantized::from_parts(
    ///     (2, 2), 4, Granularity::PerChannel, false, codes, vec![0.5, 0.25], vec![3, 4],
    /// ).unwrap();
    /// assert_eq!(q.dequantize(), ndarray::array![[-1.5, 0.0], [0.0, 2.75]]);
    /// // 2 code bytes + 2 scales + 2 zero points = 16 + 64 + 16 bits over 4 weights.
    /// assert_eq!(q.bits_per_weight(), 24.0);
    /// ```
    pub fn from_parts(
        shape: (usize, usize),
        bits: u32,
        granularity: Granularity,
        symmetric: bool,
        codes: PackedCodes,
        scales: Vec<f32>,
        zero_points: Vec<u8>,
    ) -> Result<Self> {
        let grid = UniformGrid::new(bits, symmetric)?;
        let layout = GroupLayout::new(shape.0, shape.1, granularity)?;
        let context = "stored uniform tensor";
        if codes.bits() != bits {
            return Err(QuantError::shape(
                format!("{context} code width"),
                bits,
                codes.bits(),
            ));
        }
        if codes.len() != shape.0 * shape.1 {
            return Err(QuantError::shape(
                format!("{context} code count"),
                shape.0 * shape.1,
                codes.len(),
            ));
        }
        if scales.len() != layout.num_groups() {
            return Err(QuantError::shape(
                format!("{context} scale count"),
                layout.num_groups(),
                scales.len(),
            ));
        }
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(QuantError::invalid(
                format!("scales[{i}]"),
                scales[i],
                "must be finite and positive",
            ));
        }
        let expected_zps = if symmetric { 0 } else { layout.num_groups() };
        if zero_points.len() != expected_zps {
            return Err(QuantError::shape(
                format!("{context} zero point count (symmetric = {symmetric})"),
                expected_zps,
                zero_points.len(),
            ));
        }
        if let Some(i) = zero_points.iter().position(|&z| f32::from(z) > grid.qmax()) {
            return Err(QuantError::invalid(
                format!("zero_points[{i}]"),
                zero_points[i],
                format!("must be at most {}", grid.qmax()),
            ));
        }
        Ok(UniformQuantized {
            shape,
            bits,
            granularity,
            symmetric,
            codes,
            scales,
            zero_points,
        })
    }

    /// Quantizes `w` with given per-group parameters (as [`init_params`] returns).
    pub fn quantize_with_params(
        w: ArrayView2<'_, f32>,
        bits: u32,
        granularity: Granularity,
        symmetric: bool,
        params: &[GroupParams],
    ) -> Result<Self> {
        let grid = UniformGrid::new(bits, symmetric)?;
        let (rows, cols) = w.dim();
        let layout = GroupLayout::new(rows, cols, granularity)?;
        if params.len() != layout.num_groups() {
            return Err(QuantError::shape(
                "quantization parameters (one per group)",
                layout.num_groups(),
                params.len(),
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if !(p.scale.is_finite() && p.scale > 0.0) {
                return Err(QuantError::invalid(
                    format!("params[{i}].scale"),
                    p.scale,
                    "must be finite and positive",
                ));
            }
            if (symmetric && p.zero_point != 0)
                || !(0.0..=grid.qmax()).contains(&(p.zero_point as f32))
            {
                return Err(QuantError::invalid(
                    format!("params[{i}].zero_point"),
                    p.zero_point,
                    format!(
                        "must be 0 (symmetric) or in 0..={} (asymmetric)",
                        grid.qmax()
                    ),
                ));
            }
        }
        let data = row_major(w);
        check_finite("tensor to quantize", &data)?;
        let scales: Vec<f32> = params.iter().map(|p| p.scale).collect();
        let zps: Vec<f32> = params.iter().map(|p| p.zero_point as f32).collect();
        let mut codes = vec![0u8; data.len()];
        let (qmin, qmax) = (grid.qmin(), grid.qmax());
        codes
            .par_chunks_mut(cols)
            .zip(data.par_chunks(cols))
            .enumerate()
            .for_each(|(r, (code_row, row))| {
                for (g, range) in layout.row_segments(r) {
                    for c in range {
                        let q = quantize_scalar(row[c], scales[g], zps[g], qmin, qmax);
                        code_row[c] = (q - qmin) as u8;
                    }
                }
            });
        let zero_points = if symmetric {
            Vec::new()
        } else {
            params.iter().map(|p| p.zero_point as u8).collect()
        };
        Ok(UniformQuantized {
            shape: (rows, cols),
            bits,
            granularity,
            symmetric,
            codes: PackedCodes::pack(&codes, bits)?,
            scales,
            zero_points,
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }
    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Granularity of the scales.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }
    /// Whether the grid is symmetric (no zero points stored).
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }
    /// Packed unsigned codes `q − qmin`, row-major.
    pub fn codes(&self) -> &PackedCodes {
        &self.codes
    }
    /// One scale per group.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// One zero point per group (asymmetric), empty when symmetric.
    pub fn zero_points(&self) -> &[u8] {
        &self.zero_points
    }

    /// `(q − z)·s` for every value.
    pub fn dequantize(&self) -> Array2<f32> {
        let (rows, cols) = self.shape;
        // `from_parts` and the constructors guarantee a valid layout and grid.
        let layout = GroupLayout {
            rows,
            cols,
            granularity: self.granularity,
        };
        let qmin = UniformGrid {
            bits: self.bits,
            symmetric: self.symmetric,
        }
        .qmin();
        let codes = self.codes.unpack();
        let mut out = Array2::<f32>::zeros((rows, cols));
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(codes.par_chunks(cols))
            .enumerate()
            .for_each(|(r, (mut out_row, code_row))| {
                for (g, range) in layout.row_segments(r) {
                    let zp = self.zero_points.get(g).map_or(0.0, |&z| f32::from(z));
                    for c in range {
                        out_row[c] = (f32::from(code_row[c]) + qmin - zp) * self.scales[g];
                    }
                }
            });
        out
    }

    /// Storage cost in bits per weight, from what is actually stored: packed code bytes,
    /// 32 bits per scale and 8 per zero point, divided by the number of weights.
    pub fn bits_per_weight(&self) -> f64 {
        let stored_bits =
            self.codes.stored_bytes() * 8 + self.scales.len() * 32 + self.zero_points.len() * 8;
        stored_bits as f64 / (self.shape.0 * self.shape.1) as f64
    }

    /// RMSE and max-abs error of the dequantized tensor against `original`.
    pub fn error_stats(&self, original: ArrayView2<'_, f32>) -> Result<ErrorStats> {
        error_stats(original, self.dequantize().view())
    }
}

/// Per-tensor reconstruction error.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorStats {
    /// `√(mean (a − b)²)`.
    pub rmse: f64,
    /// `max |a − b|`.
    pub max_abs: f64,
}

/// [`ErrorStats`] of `approx` against `reference` (same shape, finite, non-empty).
///
/// ```
/// use ndarray::array;
/// use quant_core::uniform::error_stats;
/// let s = error_stats(array![[1.0f32, 2.0]].view(), array![[1.0f32, 4.0]].view()).unwrap();
/// assert_eq!(s.max_abs, 2.0);
/// assert!((s.rmse - 2f64.sqrt()).abs() < 1e-12);
/// ```
pub fn error_stats(
    reference: ArrayView2<'_, f32>,
    approx: ArrayView2<'_, f32>,
) -> Result<ErrorStats> {
    if reference.dim() != approx.dim() {
        return Err(QuantError::shape(
            "error_stats operands",
            format!("{:?}", reference.dim()),
            format!("{:?}", approx.dim()),
        ));
    }
    check_non_empty("error_stats reference", reference.len())?;
    let a = row_major(reference);
    let b = row_major(approx);
    check_finite("error_stats reference", &a)?;
    check_finite("error_stats approximation", &b)?;
    let (sse, max_abs) = a.iter().zip(&b).fold((0.0f64, 0.0f64), |(s, m), (&x, &y)| {
        let e = f64::from(x) - f64::from(y);
        (s + e * e, m.max(e.abs()))
    });
    Ok(ErrorStats {
        rmse: (sse / a.len() as f64).sqrt(),
        max_abs,
    })
}

/// Root-mean-square error of `approx` against `reference`.
pub fn rmse(reference: ArrayView2<'_, f32>, approx: ArrayView2<'_, f32>) -> Result<f64> {
    error_stats(reference, approx).map(|s| s.rmse)
}

/// Largest absolute error of `approx` against `reference`.
pub fn max_abs_error(reference: ArrayView2<'_, f32>, approx: ArrayView2<'_, f32>) -> Result<f64> {
    error_stats(reference, approx).map(|s| s.max_abs)
}

/// Which uniform grid [`quantize_tensor`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GridKind {
    /// Scale initialised directly.
    Uniform,
    /// Step `α·π/k` ([`crate::pi`]); stored with scale = `α·π/k`.
    Pi {
        /// The divisor `k` (2..=5).
        k: u32,
    },
}

/// Everything [`quantize_tensor`] needs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorQuantSpec {
    /// Uniform or Pi step.
    pub kind: GridKind,
    /// 2..=8.
    pub bits: u32,
    /// Which values share a scale.
    pub granularity: Granularity,
    /// Symmetric (no zero point) or asymmetric.
    pub symmetric: bool,
    /// Absmax or MSE clip search (default grid of ratios).
    pub init: InitMethod,
}

/// One-shot quantization of a 2-D `f32` tensor to its stored form: initialise the scales from
/// the tensor, then quantize with them. For [`GridKind::Pi`] the initial step is converted to
/// `α = step·k/π` and the stored scale is `α·π/k`, exactly what [`crate::pi::PiQuantizer`]
/// computes with.
pub fn quantize_tensor(w: ArrayView2<'_, f32>, spec: &TensorQuantSpec) -> Result<UniformQuantized> {
    let grid = UniformGrid::new(spec.bits, spec.symmetric)?;
    let mut params = init_params(w, spec.granularity, grid, spec.init, &ClipSearch::default())?;
    if let GridKind::Pi { k } = spec.kind {
        crate::pi::check_k(k)?;
        for p in &mut params {
            p.scale = crate::pi::pi_step(crate::pi::alpha_for_step(p.scale, k), k);
        }
    }
    UniformQuantized::quantize_with_params(w, spec.bits, spec.granularity, spec.symmetric, &params)
}

/// A uniform quantizer with a learned step per group (LSQ-style), usable in training through
/// [`DifferentiableQuantizer`].
///
/// Parameters ([`DifferentiableQuantizer::params`]) are the steps, one per group in the order
/// of [`GroupLayout`]. On an asymmetric grid the zero points are set by
/// [`DifferentiableQuantizer::init_from_weights`] and then **kept fixed**: only the steps are
/// learned. The weight gradient follows the configured [`Ste`] and the step gradient is LSQ's
/// (see [`crate::ste`]); with [`Ste::Lsq`] it is scaled by `1/√(N·Qp)` with `Qp = qmax`
/// (`2^(b−1) − 1` symmetric; `2^b − 1` asymmetric, LSQ's choice for unsigned data). The
/// quantizer is bound to the shape it was initialised with.
///
/// ```
/// use ndarray::array;
/// use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
/// use quant_core::ste::Ste;
/// use quant_core::uniform::{Granularity, UniformQuantizer};
///
/// let w = array![[0.3f32, -0.6, 0.9], [0.1, 0.2, -0.05]];
/// let mut q = UniformQuantizer::new(4, true, Granularity::PerChannel, Ste::Lsq).unwrap();
/// q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
/// assert_eq!(q.params().len(), 2);
/// let out = q.forward(w.view()).unwrap();
/// assert!((out.dequantized[[0, 2]] - 0.9).abs() < 1e-6);
/// assert_eq!(out.codes[[0, 2]], 15); // q = 7, code = q − qmin = 7 + 8
/// let grads = q.backward(ndarray::Array2::ones((2, 3)).view()).unwrap();
/// assert_eq!(grads.params.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct UniformQuantizer {
    grid: UniformGrid,
    granularity: Granularity,
    ste: Ste,
    clip_search: ClipSearch,
    layout: Option<GroupLayout>,
    steps: Vec<f32>,
    zero_points: Vec<f32>,
    /// The last forward input (row-major) and the steps it was quantized with, so that an
    /// optimizer update between forward and backward cannot make them disagree.
    last_forward: Option<(Vec<f32>, Vec<f32>)>,
}

impl UniformQuantizer {
    /// A quantizer awaiting [`DifferentiableQuantizer::init_from_weights`].
    pub fn new(bits: u32, symmetric: bool, granularity: Granularity, ste: Ste) -> Result<Self> {
        granularity.validate()?;
        ste.validate()?;
        Ok(UniformQuantizer {
            grid: UniformGrid::new(bits, symmetric)?,
            granularity,
            ste,
            clip_search: ClipSearch::default(),
            layout: None,
            steps: Vec::new(),
            zero_points: Vec::new(),
            last_forward: None,
        })
    }

    /// Uses `search` for [`InitMethod::MseClipSearch`] instead of the default ratios.
    pub fn with_clip_search(mut self, search: ClipSearch) -> Result<Self> {
        search.validate()?;
        self.clip_search = search;
        Ok(self)
    }

    /// The grid.
    pub fn grid(&self) -> UniformGrid {
        self.grid
    }

    /// The estimator used in [`DifferentiableQuantizer::backward`].
    pub fn ste(&self) -> Ste {
        self.ste
    }

    /// The granularity.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// The fixed zero points (all 0 when symmetric), one per group.
    pub fn zero_points(&self) -> &[f32] {
        &self.zero_points
    }

    /// Quantizes `w` with the current steps into the stored form.
    pub fn export(&self, w: ArrayView2<'_, f32>) -> Result<UniformQuantized> {
        let layout = self.checked_layout(w.dim())?;
        self.check_steps()?;
        let params: Vec<GroupParams> = self
            .steps
            .iter()
            .zip(&self.zero_points)
            .map(|(&scale, &z)| GroupParams {
                scale,
                zero_point: z as i32,
            })
            .collect();
        UniformQuantized::quantize_with_params(
            w,
            self.grid.bits,
            layout.granularity,
            self.grid.symmetric,
            &params,
        )
    }

    fn checked_layout(&self, dim: (usize, usize)) -> Result<GroupLayout> {
        let layout = self.layout.ok_or_else(|| {
            QuantError::invalid(
                "uniform quantizer state",
                "uninitialised",
                "call init_from_weights before forward",
            )
        })?;
        if layout.shape() != dim {
            return Err(QuantError::shape(
                "uniform quantizer input (shape it was initialised with)",
                format!("{:?}", layout.shape()),
                format!("{dim:?}"),
            ));
        }
        Ok(layout)
    }

    fn check_steps(&self) -> Result<()> {
        match self.steps.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            Some(i) => Err(QuantError::invalid(
                format!("step[{i}]"),
                self.steps[i],
                "must be finite and positive (an optimizer update may have pushed it there)",
            )),
            None => Ok(()),
        }
    }

    /// The forward pass: `ŵ` into `dequantized` and, when given, the codes into `codes`
    /// (both row-major, `w`'s length); keeps `w` and the steps for backward.
    fn run_forward(
        &mut self,
        w: ArrayView2<'_, f32>,
        codes: Option<&mut [u8]>,
        dequantized: &mut [f32],
    ) -> Result<()> {
        let layout = self.checked_layout(w.dim())?;
        self.check_steps()?;
        // Reuse the previous forward's buffer: refilling warm pages costs a copy, a fresh
        // weight-sized allocation costs a page fault per 4 KiB on top.
        let reused = self.last_forward.take().map(|(buffer, _)| buffer);
        let data = row_major_into(w, reused.unwrap_or_default());
        self.quantize_kept(layout, data, codes, dequantized)
    }

    /// [`Self::run_forward`] on `data`, the row-major input of `layout`'s shape (checked, with
    /// the steps, by the caller), which is kept for backward. The finiteness check rides
    /// along the quantization pass (one pass over the weight instead of two); only when it
    /// finds a bad value is `data` searched for the first one, for the error.
    fn quantize_kept(
        &mut self,
        layout: GroupLayout,
        data: Vec<f32>,
        codes: Option<&mut [u8]>,
        dequantized: &mut [f32],
    ) -> Result<()> {
        let cols = layout.shape().1;
        let (qmin, qmax) = (self.grid.qmin(), self.grid.qmax());
        let (steps, zps) = (&self.steps, &self.zero_points);
        let kernel = segment::Kernel::detect();
        let quantize_row =
            |r: usize, code_row: Option<&mut [u8]>, deq_row: &mut [f32], row: &[f32]| -> bool {
                let mut code_row = code_row;
                let mut finite = true;
                for (g, range) in layout.row_segments(r) {
                    let grid = SegmentGrid::new(steps[g], zps[g], qmin, qmax);
                    let deq = &mut deq_row[range.clone()];
                    match code_row.as_deref_mut() {
                        Some(code_row) => {
                            let codes = &mut code_row[range.clone()];
                            for ((code, out), &x) in codes
                                .iter_mut()
                                .zip(deq.iter_mut())
                                .zip(&row[range.clone()])
                            {
                                let (_, q) = grid.locate(x);
                                *code = (q + grid.code_offset) as u8;
                                *out = q * grid.step;
                            }
                            finite &= segment::all_finite(&row[range]);
                        }
                        None => finite &= kernel.fake_quant(grid, &row[range], deq),
                    }
                }
                finite
            };
        let finite = match codes {
            Some(codes) => codes
                .par_chunks_mut(cols)
                .zip(dequantized.par_chunks_mut(cols))
                .zip(data.par_chunks(cols))
                .enumerate()
                .map(|(r, ((c, d), x))| quantize_row(r, Some(c), d, x))
                .reduce(|| true, |a, b| a & b),
            None => dequantized
                .par_chunks_mut(cols)
                .zip(data.par_chunks(cols))
                .enumerate()
                .map(|(r, (d, x))| quantize_row(r, None, d, x))
                .reduce(|| true, |a, b| a & b),
        };
        if !finite {
            check_finite("uniform quantizer input", &data)?;
        }
        self.last_forward = Some((data, self.steps.clone()));
        Ok(())
    }

    /// The backward pass on a row-major `∂L/∂ŵ` of shape `dim`: `∂L/∂w` into `grad_input`,
    /// returns `∂L/∂θ`.
    fn run_backward(
        &self,
        grad: &[f32],
        dim: (usize, usize),
        grad_input: &mut [f32],
    ) -> Result<Vec<f32>> {
        let (data, steps) = self.backward_state(dim)?;
        let layout = self.checked_layout(dim)?;
        let cols = dim.1;
        let (qmin, qmax) = (self.grid.qmin(), self.grid.qmax());
        let (zps, ste) = (&self.zero_points, self.ste);
        let kernel = segment::Kernel::detect();
        let partials: Vec<Vec<(usize, f64)>> = grad_input
            .par_chunks_mut(cols)
            .zip(data.par_chunks(cols))
            .zip(grad.par_chunks(cols))
            .enumerate()
            .map(|(r, ((gin_row, row), g_row))| {
                layout
                    .row_segments(r)
                    .map(|(g, range)| {
                        let grid = SegmentGrid::new(steps[g], zps[g], qmin, qmax);
                        let gin = &mut gin_row[range.clone()];
                        let (x, up) = (&row[range.clone()], &g_row[range]);
                        (g, kernel.backward(ste, grid, x, up, gin))
                    })
                    .collect()
            })
            .collect();
        // A partial is finite exactly when its gradients are: the check costs no pass of
        // its own unless there is a bad value to find.
        if partials.iter().flatten().any(|(_, p)| !p.is_finite()) {
            check_finite("uniform quantizer grad_output", grad)?;
        }
        Ok(self.step_grads(&layout, partials))
    }

    /// [`UniformQuantizer::run_backward`] with `∂L/∂ŵ` overwritten by `∂L/∂w`. Each element
    /// of the gradient is read once before its own slot is written, so one segment copy of
    /// the incoming gradient (one group's width) is all the scratch it needs.
    fn run_backward_in_place(&self, grad: &mut [f32], dim: (usize, usize)) -> Result<Vec<f32>> {
        let (data, steps) = self.backward_state(dim)?;
        let layout = self.checked_layout(dim)?;
        let cols = dim.1;
        let (qmin, qmax) = (self.grid.qmin(), self.grid.qmax());
        let (zps, ste) = (&self.zero_points, self.ste);
        let kernel = segment::Kernel::detect();
        // Per segment: (group, step partial, the first non-finite gradient as (flat index,
        // value), found in the segment's copy when the partial says there is one).
        type Partial = (usize, f64, Option<(usize, f32)>);
        let partials: Vec<Vec<Partial>> = grad
            .par_chunks_mut(cols)
            .zip(data.par_chunks(cols))
            .enumerate()
            .map_init(Vec::new, |upstream: &mut Vec<f32>, (r, (g_row, row))| {
                layout
                    .row_segments(r)
                    .map(|(g, range)| {
                        let grid = SegmentGrid::new(steps[g], zps[g], qmin, qmax);
                        upstream.clear();
                        upstream.extend_from_slice(&g_row[range.clone()]);
                        let x = &row[range.clone()];
                        let start = r * cols + range.start;
                        let partial = kernel.backward(ste, grid, x, upstream, &mut g_row[range]);
                        let bad = (!partial.is_finite())
                            .then(|| upstream.iter().position(|v| !v.is_finite()))
                            .flatten()
                            .map(|i| (start + i, upstream[i]));
                        (g, partial, bad)
                    })
                    .collect()
            })
            .collect();
        if let Some((index, value)) = partials
            .iter()
            .flatten()
            .filter_map(|p| p.2)
            .min_by_key(|b| b.0)
        {
            return Err(QuantError::NonFinite {
                context: "uniform quantizer grad_output".to_string(),
                index,
                value,
            });
        }
        let partials = partials
            .into_iter()
            .map(|row| row.into_iter().map(|(g, p, _)| (g, p)).collect())
            .collect();
        Ok(self.step_grads(&layout, partials))
    }

    /// The saved forward input and steps, checked against a backward of shape `dim`.
    fn backward_state(&self, dim: (usize, usize)) -> Result<(&[f32], &[f32])> {
        let (data, steps) = self.last_forward.as_ref().ok_or_else(|| {
            QuantError::invalid(
                "uniform quantizer state",
                "no forward pass",
                "call forward before backward",
            )
        })?;
        self.checked_layout(dim)?;
        Ok((data, steps))
    }

    /// Sums the per-segment step partials per group and applies LSQ's gradient scale.
    fn step_grads(&self, layout: &GroupLayout, partials: Vec<Vec<(usize, f64)>>) -> Vec<f32> {
        let qmax = self.grid.qmax();
        let mut step_grads = vec![0.0f64; layout.num_groups()];
        for (g, partial) in partials.into_iter().flatten() {
            step_grads[g] += partial;
        }
        let sizes = layout.group_sizes();
        step_grads
            .iter()
            .zip(&sizes)
            .map(|(&sum, &n)| {
                let scale = if self.ste.scales_step_grad() {
                    lsq_grad_scale(n, qmax)
                } else {
                    1.0
                };
                (sum * f64::from(scale)) as f32
            })
            .collect()
    }

    /// Sets the steps and zero points directly (for example from a checkpoint).
    pub fn set_params(
        &mut self,
        shape: (usize, usize),
        steps: Vec<f32>,
        zero_points: Vec<f32>,
    ) -> Result<()> {
        let layout = GroupLayout::new(shape.0, shape.1, self.granularity)?;
        for (name, len) in [("steps", steps.len()), ("zero_points", zero_points.len())] {
            if len != layout.num_groups() {
                return Err(QuantError::shape(
                    format!("uniform quantizer {name} (one per group)"),
                    layout.num_groups(),
                    len,
                ));
            }
        }
        for (i, &z) in zero_points.iter().enumerate() {
            let valid = if self.grid.symmetric {
                z == 0.0
            } else {
                z.fract() == 0.0 && (0.0..=self.grid.qmax()).contains(&z)
            };
            if !valid {
                return Err(QuantError::invalid(
                    format!("zero_points[{i}]"),
                    z,
                    "must be 0 (symmetric) or an integer code (asymmetric)",
                ));
            }
        }
        self.layout = Some(layout);
        self.steps = steps;
        self.zero_points = zero_points;
        self.last_forward = None;
        self.check_steps()
    }
}

impl DifferentiableQuantizer for UniformQuantizer {
    fn bits(&self) -> u32 {
        self.grid.bits
    }

    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, method: InitMethod) -> Result<()> {
        let params = init_params(w, self.granularity, self.grid, method, &self.clip_search)?;
        let (rows, cols) = w.dim();
        self.layout = Some(GroupLayout::new(rows, cols, self.granularity)?);
        self.steps = params.iter().map(|p| p.scale).collect();
        self.zero_points = params.iter().map(|p| p.zero_point as f32).collect();
        self.last_forward = None;
        Ok(())
    }

    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        let (rows, cols) = w.dim();
        let mut codes = vec![0u8; rows * cols];
        let mut dequantized = vec![0.0f32; rows * cols];
        self.run_forward(w, Some(&mut codes), &mut dequantized)?;
        Ok(QuantizerOutput {
            codes: shaped(rows, cols, codes)?,
            dequantized: shaped(rows, cols, dequantized)?,
        })
    }

    fn forward_dequantized_into(
        &mut self,
        w: ArrayView2<'_, f32>,
        out: &mut Array2<f32>,
    ) -> Result<()> {
        if out.dim() != w.dim() || !out.is_standard_layout() {
            *out = Array2::zeros(w.dim());
        }
        let out = out
            .as_slice_mut()
            .ok_or_else(|| QuantError::shape("uniform quantizer output", "row-major", "strided"))?;
        self.run_forward(w, None, out)
    }

    fn forward_dequantized_owned(
        &mut self,
        w: Array2<f32>,
        out: &mut Array2<f32>,
    ) -> Result<Array2<f32>> {
        if !w.is_standard_layout() {
            self.forward_dequantized_into(w.view(), out)?;
            return Ok(w);
        }
        let dim = w.dim();
        let layout = self.checked_layout(dim)?;
        self.check_steps()?;
        if out.dim() != dim || !out.is_standard_layout() {
            *out = Array2::zeros(dim);
        }
        let out = out
            .as_slice_mut()
            .ok_or_else(|| QuantError::shape("uniform quantizer output", "row-major", "strided"))?;
        // `w` itself becomes the kept input; the previous one goes back to the caller.
        let previous = self.last_forward.take().map(|(buffer, _)| buffer);
        // A standard-layout array is contiguous from its first element, at `offset`.
        let (mut data, offset) = w.into_raw_vec_and_offset();
        data.drain(..offset.unwrap_or(0));
        data.truncate(dim.0 * dim.1);
        self.quantize_kept(layout, data, None, out)?;
        Ok(match previous {
            Some(buffer) if buffer.len() == dim.0 * dim.1 => shaped(dim.0, dim.1, buffer)?,
            _ => Array2::zeros(dim),
        })
    }

    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let (rows, cols) = grad_output.dim();
        let mut grad_input = vec![0.0f32; rows * cols];
        let params = {
            let grad = row_major_cow(grad_output);
            self.run_backward(&grad, grad_output.dim(), &mut grad_input)?
        };
        Ok(QuantizerGrads {
            input: shaped(rows, cols, grad_input)?,
            params,
        })
    }

    fn backward_in_place(&mut self, grad: &mut Array2<f32>) -> Result<Vec<f32>> {
        let dim = grad.dim();
        match grad.as_slice_mut() {
            Some(values) => self.run_backward_in_place(values, dim),
            None => {
                let grads = self.backward(grad.view())?;
                *grad = grads.input;
                Ok(grads.params)
            }
        }
    }

    fn params(&self) -> &[f32] {
        &self.steps
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.steps
    }
}

/// One group's grid in step units: the clamp range `[lower, upper] = [qmin − z, qmax − z]` of
/// `q − z` and the step.
#[derive(Clone, Copy)]
struct SegmentGrid {
    step: f32,
    lower: f32,
    upper: f32,
    /// `z − qmin`: adds to `q − z` to give the stored unsigned code.
    code_offset: f32,
}

impl SegmentGrid {
    #[inline]
    fn new(step: f32, zero_point: f32, qmin: f32, qmax: f32) -> Self {
        SegmentGrid {
            step,
            lower: qmin - zero_point,
            upper: qmax - zero_point,
            code_offset: zero_point - qmin,
        }
    }

    /// `(x/s, q − z)` with `q = clamp(round(x/s) + z, qmin, qmax)`, bit for bit as
    /// [`quantize_scalar`] computes it, but branch-free and without the `roundeven` libm call:
    /// `x/s` is first clamped to one step beyond the range (which cannot change the clamped
    /// result, the bounds being integers) so that it is small enough for the
    /// [`ROUND_MAGIC`] rounding, which is half to even. Inputs are finite (checked).
    #[inline(always)]
    fn locate(&self, x: f32) -> (f32, f32) {
        let u = x / self.step;
        let near = u.max(self.lower - 1.0).min(self.upper + 1.0);
        let rounded = (near + ROUND_MAGIC) - ROUND_MAGIC;
        (u, rounded.max(self.lower).min(self.upper))
    }
}

/// Writes `∂L/∂x` of one group into `grad_input` and returns the group's unscaled step
/// gradient `Σ g·∂v̂/∂s` (LSQ's derivative, in step units). One monomorphic, branch-free loop
/// per estimator; the sum runs in eight `f64` lanes so that it vectorizes. Runs through
/// [`segment::Kernel::backward`], which compiles it for the CPU's vector width.
#[inline(always)]
fn backward_segment_body(
    ste: Ste,
    grid: SegmentGrid,
    x: &[f32],
    grad: &[f32],
    grad_input: &mut [f32],
) -> f64 {
    #[inline(always)]
    fn run(
        grid: SegmentGrid,
        x: &[f32],
        grad: &[f32],
        grad_input: &mut [f32],
        input_grad: impl Fn(f32, f32, f32) -> f32,
    ) -> f64 {
        const LANES: usize = 8;
        let mut lanes = [0.0f64; LANES];
        let (lower, upper) = (grid.lower, grid.upper);
        let mut tail = 0.0f64;
        let n = x.len();
        let full = n - n % LANES;
        let mut i = 0;
        while i < full {
            for lane in 0..LANES {
                let (u, q) = grid.locate(x[i + lane]);
                let g = grad[i + lane];
                grad_input[i + lane] = input_grad(g, u, q);
                let d = if u < lower {
                    lower
                } else if u > upper {
                    upper
                } else {
                    q - u
                };
                lanes[lane] += f64::from(g) * f64::from(d);
            }
            i += LANES;
        }
        for j in full..n {
            let (u, q) = grid.locate(x[j]);
            let g = grad[j];
            grad_input[j] = input_grad(g, u, q);
            let d = if u < lower {
                lower
            } else if u > upper {
                upper
            } else {
                q - u
            };
            tail += f64::from(g) * f64::from(d);
        }
        lanes.iter().sum::<f64>() + tail
    }
    let (lower, upper) = (grid.lower, grid.upper);
    match ste {
        Ste::Standard => run(grid, x, grad, grad_input, |g, _, _| g),
        Ste::Clipped { clip } => {
            let (lo, hi) = (clip * lower, clip * upper);
            run(grid, x, grad, grad_input, move |g, u, _| {
                if lo <= u && u <= hi {
                    g
                } else {
                    0.0
                }
            })
        }
        Ste::Lsq => run(grid, x, grad, grad_input, move |g, u, _| {
            if lower <= u && u <= upper {
                g
            } else {
                0.0
            }
        }),
        Ste::Ewgs { delta } => run(grid, x, grad, grad_input, move |g, u, q| {
            let sign = if g > 0.0 {
                1.0
            } else if g < 0.0 {
                -1.0
            } else {
                0.0
            };
            if lower <= u && u <= upper {
                g * (1.0 + delta * sign * (u - q))
            } else {
                0.0
            }
        }),
    }
}

/// A row-major `Vec` of exactly `rows·cols` values as an array.
pub(crate) fn shaped<T>(rows: usize, cols: usize, data: Vec<T>) -> Result<Array2<T>> {
    Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| QuantError::shape("row-major buffer", format!("{rows}×{cols}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ste::{lsq_step_derivative, GridPoint};

    /// The buffer-reusing pair (`forward_dequantized_into`, `backward_in_place`) gives the
    /// allocating pair's numbers bit for bit, for every granularity and estimator, including
    /// into a wrongly shaped buffer and on a strided gradient.
    #[test]
    fn buffer_reusing_forward_and_backward_are_bit_identical() {
        let (rows, cols) = (9, 70);
        let w = Array2::from_shape_fn((rows, cols), |(i, j)| {
            ((i * cols + j) as f32 * 0.37).sin() * 1.3
        });
        let g = Array2::from_shape_fn((rows, cols), |(i, j)| ((i + 3 * j) as f32 * 0.11).cos());
        let bits_of = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for granularity in [
            Granularity::PerTensor,
            Granularity::PerChannel,
            Granularity::PerBlock { size: 16 },
        ] {
            for ste in [Ste::Standard, Ste::Lsq, Ste::Clipped { clip: 0.9 }] {
                for symmetric in [true, false] {
                    let mut a = UniformQuantizer::new(3, symmetric, granularity, ste).unwrap();
                    a.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
                    let mut b = a.clone();
                    let want = a.forward(w.view()).unwrap().dequantized;
                    let mut out = Array2::zeros((2, 2));
                    b.forward_dequantized_into(w.view(), &mut out).unwrap();
                    assert_eq!(bits_of(&out), bits_of(&want), "{granularity:?} {ste:?}");
                    let want = a.backward(g.view()).unwrap();
                    let mut in_place = g.clone();
                    let params = b.backward_in_place(&mut in_place).unwrap();
                    assert_eq!(
                        bits_of(&in_place),
                        bits_of(&want.input),
                        "{granularity:?} {ste:?}"
                    );
                    assert_eq!(params, want.params);
                    // A column-major gradient goes through the allocating path.
                    let mut strided = g.t().as_standard_layout().into_owned().reversed_axes();
                    b.backward_in_place(&mut strided).unwrap();
                    assert_eq!(
                        bits_of(&strided.as_standard_layout().into_owned()),
                        bits_of(&want.input)
                    );
                    // The owned forward keeps `w` itself (no copy) and gives the same bits,
                    // then the same backward.
                    let mut c = a.clone();
                    let mut out = Array2::zeros((1, 1));
                    let spare = c.forward_dequantized_owned(w.clone(), &mut out).unwrap();
                    assert_eq!(spare.dim(), w.dim());
                    assert_eq!(
                        bits_of(&out),
                        bits_of(&a.forward(w.view()).unwrap().dequantized)
                    );
                    let mut in_place = g.clone();
                    assert_eq!(c.backward_in_place(&mut in_place).unwrap(), want.params);
                    assert_eq!(bits_of(&in_place), bits_of(&want.input));
                }
            }
        }
    }

    /// The finiteness checks ride along the quantization passes; they still name the first
    /// bad element of the input or of the gradient, in every path.
    #[test]
    fn non_finite_inputs_and_gradients_name_the_first_bad_index() {
        let (rows, cols) = (6, 40);
        let w = Array2::from_shape_fn((rows, cols), |(i, j)| ((i * cols + j) as f32).sin());
        let mut q = UniformQuantizer::new(3, true, Granularity::PerChannel, Ste::Lsq).unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let first_bad = |e: QuantError| match e {
            QuantError::NonFinite { index, .. } => index,
            other => panic!("unexpected {other}"),
        };
        let mut bad_w = w.clone();
        bad_w[[4, 3]] = f32::INFINITY;
        bad_w[[2, 7]] = f32::NAN;
        let mut out = Array2::zeros((1, 1));
        let e = q
            .forward_dequantized_into(bad_w.view(), &mut out)
            .unwrap_err();
        assert_eq!(first_bad(e), 2 * cols + 7);
        let e = q
            .clone()
            .forward_dequantized_owned(bad_w.clone(), &mut out)
            .unwrap_err();
        assert_eq!(first_bad(e), 2 * cols + 7);
        assert_eq!(
            first_bad(q.forward(bad_w.view()).unwrap_err()),
            2 * cols + 7
        );
        q.forward(w.view()).unwrap();
        let mut g = Array2::<f32>::ones((rows, cols));
        g[[5, 0]] = f32::NEG_INFINITY;
        g[[1, 39]] = f32::NAN;
        assert_eq!(first_bad(q.backward(g.view()).unwrap_err()), 39 + cols);
        let mut in_place = g.clone();
        assert_eq!(
            first_bad(q.backward_in_place(&mut in_place).unwrap_err()),
            39 + cols
        );
    }

    /// The branch-free kernels agree bit for bit with the scalar definitions
    /// ([`quantize_scalar`], [`Ste::input_grad`], [`lsq_step_derivative`]) on ties, clamped
    /// values, zero points and every estimator.
    #[test]
    fn segment_kernels_match_the_scalar_definitions() {
        let steps = [0.1f32, 0.25, 1.0 / 3.0, 7.0];
        let mut values: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.0125).collect();
        values.extend([1e6, -1e6, 0.0, -0.0, 0.05, -0.05, 0.15, 0.35, -0.45]);
        let grads: Vec<f32> = (0..values.len())
            .map(|i| ((i as f32) * 0.7).sin())
            .collect();
        let stes = [
            Ste::Standard,
            Ste::Clipped { clip: 0.7 },
            Ste::Lsq,
            Ste::Ewgs { delta: 0.3 },
        ];
        for bits in [2, 3, 8] {
            for symmetric in [true, false] {
                let grid = UniformGrid::new(bits, symmetric).unwrap();
                let (qmin, qmax) = (grid.qmin(), grid.qmax());
                let zeros: &[f32] = if symmetric { &[0.0] } else { &[0.0, 1.0, qmax] };
                for &s in &steps {
                    for &z in zeros {
                        let seg = SegmentGrid::new(s, z, qmin, qmax);
                        for &x in &values {
                            let q = quantize_scalar(x, s, z, qmin, qmax);
                            let (u, qz) = seg.locate(x);
                            assert_eq!(qz, q - z, "x = {x}, s = {s}, z = {z}");
                            assert_eq!(u, x / s);
                            assert_eq!((qz + seg.code_offset) as u8, (q - qmin) as u8);
                        }
                        for ste in stes {
                            let mut gin = vec![0.0f32; values.len()];
                            let sum = backward_segment_body(ste, seg, &values, &grads, &mut gin);
                            let mut want_sum = 0.0f64;
                            for (i, &x) in values.iter().enumerate() {
                                let u = x / s;
                                let xq = quantize_scalar(x, s, z, qmin, qmax) - z;
                                let at = GridPoint {
                                    value: u,
                                    quantized: xq,
                                    lower: qmin - z,
                                    upper: qmax - z,
                                    step: 1.0,
                                };
                                assert_eq!(gin[i], ste.input_grad(grads[i], at), "{ste:?} x = {x}");
                                want_sum += f64::from(grads[i])
                                    * f64::from(lsq_step_derivative(u, xq, qmin - z, qmax - z));
                            }
                            assert!((sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_fast_error_estimate_matches_the_exact_error() {
        for bits in 2..=8 {
            for symmetric in [true, false] {
                let grid = UniformGrid::new(bits, symmetric).unwrap();
                let values: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.123).sin() * 3.0).collect();
                for ratio in [1.0f32, 0.7, 0.31] {
                    let (lo, hi) = range_with_zero(&values);
                    let params = grid.params_for_range(ratio * lo, ratio * hi);
                    let exact = squared_error(&values, grid, params);
                    let fast = squared_error_estimate(&values, grid, params);
                    assert!(
                        (exact - fast).abs() <= 1e-5 * exact,
                        "{bits} {symmetric} {ratio}"
                    );
                }
            }
        }
        // The magic-number rounding is half to even, like round_half_even.
        for y in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 127.5, -128.0] {
            assert_eq!((y + ROUND_MAGIC) - ROUND_MAGIC, round_half_even(y));
        }
    }
}
