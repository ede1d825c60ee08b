//! Calibration statistics: streaming observers of activations or weights that turn what they
//! saw into clipping ranges and quantization parameters, saved as a reproducible artifact.
//!
//! * [`RunningStats`]: count, min, max, mean and variance with `f64` accumulators. Each batch
//!   is summarised exactly (two passes over the batch) and folded in with Chan et al.'s
//!   parallel update, so the result does not depend on how the stream was cut into batches
//!   beyond rounding.
//! * [`StreamingHistogram`]: a fixed number of equal-width bins whose range grows as new
//!   minima/maxima arrive (see its docs for the re-binning method).
//! * [`CalibrationObserver`]: per-tensor and per-channel statistics and histograms over a
//!   stream of `ArrayView2<f32>` batches, plus a SHA-256 of everything seen, finished into a
//!   serde [`CalibrationArtifact`] by a [`CalibrationMethod`]: [`CalibrationMethod::MinMax`],
//!   [`CalibrationMethod::Percentile`] or [`CalibrationMethod::MseOptimal`].
//!
//! Quantization parameters follow the formulas of PyTorch's observers
//! (`_calculate_qparams`): symmetric grids are signed, `q ∈ [−2^(b−1), 2^(b−1) − 1]`,
//! `scale = max(|lower|, |upper|) / ((qmax − qmin)/2)`, zero point 0; asymmetric grids are
//! unsigned, `q ∈ [0, 2^b − 1]`, `scale = (upper − lower)/(qmax − qmin)`,
//! `zero_point = qmin − round(lower/scale)`; the range is widened to contain 0 and the scale
//! is at least `f32::EPSILON`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ndarray::ArrayView2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{check_bits, QuantError, Result};
use crate::hadamard::{check_finite_fast, check_finite_matrix};
use crate::rounding::round_half_even;

/// Bit widths the calibration grids support.
const MIN_BITS: u32 = 2;
const MAX_BITS: u32 = 16;

/// Version written into every [`CalibrationArtifact`]; loading rejects any other.
pub const ARTIFACT_FORMAT_VERSION: u32 = 1;

/// Evenly spaced candidate cuts of the first sweep of each one-dimensional MSE search.
const MSE_SWEEP_STEPS: usize = 48;

/// Each refinement level evaluates this many points between the best point's neighbours.
const MSE_REFINE_STEPS: usize = 16;

/// Refinement levels after the sweep: the cut ends within `(1/48)·(2/16)² ≈ 3·10⁻⁴` of the
/// data range of the best point — finer than the 2048-bin histogram resolves — after about
/// 48 + 2·17 evaluations (a single 128 + 129 sweep-and-refine reached 1/16 384 at 3× the
/// cost, which made per-channel MSE calibration of 4096 channels take 4 s).
const MSE_REFINE_LEVELS: usize = 2;

/// Coordinate-descent rounds (lower, then upper clip) of the asymmetric MSE search. On
/// Gaussian and exponential data at 2–16 bits a third round moved one clip, by 0.0016 of a
/// range 10.7 wide, for no measurable change in error.
const MSE_ASYMMETRIC_ROUNDS: usize = 2;

/// Below this many values per batch, channels are observed on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Count, min, max, mean and variance of a stream of `f32`, with `f64` accumulators.
///
/// ```
/// use quant_core::calibration::RunningStats;
/// let mut stats = RunningStats::new();
/// stats.observe(&[1.0, 2.0]).unwrap();
/// stats.observe(&[3.0, 4.0]).unwrap();
/// assert_eq!(stats.count(), 4);
/// assert_eq!(stats.min(), Some(1.0));
/// assert_eq!(stats.mean(), Some(2.5));
/// assert_eq!(stats.variance(), Some(1.25)); // population variance
/// assert!(stats.observe(&[f32::NAN]).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningStats {
    count: u64,
    mean: f64,
    /// Sum of squared deviations from the mean.
    m2: f64,
    min: f32,
    max: f32,
}

impl Default for RunningStats {
    fn default() -> Self {
        Self::new()
    }
}

impl RunningStats {
    /// Nothing observed yet.
    pub fn new() -> Self {
        Self {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    /// The exact statistics of one slice (two passes: mean, then squared deviations).
    fn of_slice(values: &[f32]) -> Self {
        if values.is_empty() {
            return Self::new();
        }
        let mut sum = 0.0f64;
        let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values {
            sum += v as f64;
            min = min.min(v);
            max = max.max(v);
        }
        let mean = sum / values.len() as f64;
        let m2 = values
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum();
        Self {
            count: values.len() as u64,
            mean,
            m2,
            min,
            max,
        }
    }

    /// Adds `values` to the stream.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] naming the first NaN or infinity (nothing is added then).
    pub fn observe(&mut self, values: &[f32]) -> Result<()> {
        check_finite_fast("RunningStats::observe values", values)?;
        self.merge(&Self::of_slice(values));
        Ok(())
    }

    /// Folds in the statistics of another stream (Chan, Golub & LeVeque's pairwise update):
    /// `δ = μ_b − μ_a`, `μ = μ_a + δ·n_b/n`, `M2 = M2_a + M2_b + δ²·n_a·n_b/n`.
    pub fn merge(&mut self, other: &RunningStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value seen, `None` before any.
    pub fn min(&self) -> Option<f32> {
        (self.count > 0).then_some(self.min)
    }

    /// Largest value seen, `None` before any.
    pub fn max(&self) -> Option<f32> {
        (self.count > 0).then_some(self.max)
    }

    /// Mean, `None` before any value.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Population variance (divides by `n`, like `torch.var(unbiased=False)`), `None` before
    /// any value.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 0).then(|| self.m2 / self.count as f64)
    }

    /// Sample variance (divides by `n − 1`), `None` before two values.
    pub fn sample_variance(&self) -> Option<f64> {
        (self.count > 1).then(|| self.m2 / (self.count - 1) as f64)
    }
}

/// A histogram with a fixed number of equal-width bins over a range that grows with the data.
///
/// **Re-binning.** The first batch sets the range to its `[min, max]` (a tiny range around the
/// value if all are equal). When a later batch falls outside, the bin width is multiplied by
/// the smallest power of two `2ᵏ` for which a range starting `j` new bin widths left of the
/// old start (the smallest such `j ≥ 0`) covers both the old range and the batch. Every new
/// bin edge is then an old bin edge, so each new bin is the exact union of `2ᵏ` old ones and
/// re-binning only adds integer counts. This differs from PyTorch's `HistogramObserver`,
/// which redistributes each old bin over a new range fitted exactly to `[min, max]` assuming
/// mass uniform within bins (an approximation that compounds over batches); here counts are
/// never smeared, at the price of a range up to twice as wide as the data, i.e. up to half
/// the resolution. Queries clamp to the exact observed `[min, max]`.
///
/// ```
/// use quant_core::calibration::StreamingHistogram;
/// let mut histogram = StreamingHistogram::new(4).unwrap();
/// histogram.observe(&[0.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
/// histogram.observe(&[-4.0]).unwrap(); // grows the range by re-binning
/// assert_eq!(histogram.total(), 6);
/// assert_eq!(histogram.counts().iter().sum::<u64>(), 6);
/// assert!(histogram.lower() <= -4.0 && histogram.upper() >= 4.0);
/// assert_eq!(histogram.quantile(1.0), Some(4.0));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StreamingHistogram {
    counts: Vec<u64>,
    /// Left edge of bin 0.
    lower: f64,
    bin_width: f64,
    total: u64,
    min: f32,
    max: f32,
}

impl StreamingHistogram {
    /// An empty histogram with `bins` bins.
    ///
    /// # Errors
    /// [`QuantError::InvalidParameter`] when `bins < 2`.
    pub fn new(bins: usize) -> Result<Self> {
        if bins < 2 {
            return Err(QuantError::invalid(
                "histogram bins",
                bins,
                "a histogram needs at least 2 bins",
            ));
        }
        Ok(Self {
            counts: vec![0; bins],
            lower: 0.0,
            bin_width: 0.0,
            total: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        })
    }

    /// Adds `values`, growing the range first if they fall outside it.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] naming the first NaN or infinity (nothing is added then).
    pub fn observe(&mut self, values: &[f32]) -> Result<()> {
        check_finite_fast("StreamingHistogram::observe values", values)?;
        self.observe_finite(values);
        Ok(())
    }

    /// [`Self::observe`] for values already checked to be finite.
    fn observe_finite(&mut self, values: &[f32]) {
        let Some((batch_min, batch_max)) = min_max(values) else {
            return;
        };
        if self.total == 0 {
            self.start_range(batch_min, batch_max);
        } else {
            self.grow_to(
                batch_min.min(self.min) as f64,
                batch_max.max(self.max) as f64,
            );
        }
        self.min = self.min.min(batch_min);
        self.max = self.max.max(batch_max);
        let bins = self.counts.len();
        let inv_width = 1.0 / self.bin_width;
        for &v in values {
            let index = ((v as f64 - self.lower) * inv_width) as usize;
            // The `as` cast saturates negatives at 0; values at the upper edge land in the
            // last bin.
            self.counts[index.min(bins - 1)] += 1;
        }
        self.total += values.len() as u64;
    }

    fn start_range(&mut self, min: f32, max: f32) {
        let bins = self.counts.len() as f64;
        let span = max as f64 - min as f64;
        if span > 0.0 {
            // The tiny widening keeps the data max inside the range despite rounding, so the
            // next batch with the same max does not force a re-binning.
            self.bin_width = span / bins * (1.0 + 1e-12);
            self.lower = min as f64;
        } else {
            // All values equal: a range ~2⁻²⁰ of their magnitude, centred on them; the first
            // distinct value grows it.
            let magnitude = (min as f64).abs().max(f32::MIN_POSITIVE as f64);
            self.bin_width = magnitude * 2f64.powi(-20) / bins;
            self.lower = min as f64 - self.bin_width * bins / 2.0;
        }
    }

    /// Widens the range to cover `[needed_lower, needed_upper]` by merging aligned groups of
    /// `2ᵏ` bins (see the type's docs).
    fn grow_to(&mut self, needed_lower: f64, needed_upper: f64) {
        let bins = self.counts.len();
        if needed_lower >= self.lower && needed_upper <= self.upper() {
            return;
        }
        let old_width = self.bin_width;
        let mut factor = 2.0f64;
        let (new_width, shift) = loop {
            let width = old_width * factor;
            // Smallest whole number of new bins to move the start left by.
            let shift = ((self.lower - needed_lower) / width).ceil().max(0.0);
            let new_lower = self.lower - shift * width;
            if new_lower <= needed_lower && new_lower + bins as f64 * width >= needed_upper {
                break (width, shift);
            }
            factor *= 2.0;
        };
        let new_lower = self.lower - shift * new_width;
        let mut merged = vec![0u64; bins];
        for (i, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            // Old bins nest inside new ones; the centre decides which without rounding doubt.
            let centre = self.lower + (i as f64 + 0.5) * old_width;
            let index = ((centre - new_lower) / new_width) as usize;
            merged[index.min(bins - 1)] += count;
        }
        self.counts = merged;
        self.lower = new_lower;
        self.bin_width = new_width;
    }

    /// Bin counts, left to right.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Left edge of the first bin (0 before any value).
    pub fn lower(&self) -> f64 {
        self.lower
    }

    /// Right edge of the last bin (0 before any value).
    pub fn upper(&self) -> f64 {
        self.lower + self.bin_width * self.counts.len() as f64
    }

    /// Width of every bin (0 before any value).
    pub fn bin_width(&self) -> f64 {
        self.bin_width
    }

    /// Number of values seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (`q ∈ [0, 1]`) assuming values spread uniformly within each bin,
    /// clamped to the exact observed `[min, max]`; `None` before any value or for `q` outside
    /// `[0, 1]` or NaN.
    pub fn quantile(&self, q: f64) -> Option<f32> {
        if self.total == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let target = q * self.total as f64;
        let mut below = 0.0f64;
        let mut last_nonempty = 0usize;
        for (i, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            last_nonempty = i;
            let count = count as f64;
            if below + count >= target {
                let within = ((target - below) / count).clamp(0.0, 1.0);
                let value = self.lower + (i as f64 + within) * self.bin_width;
                return Some((value as f32).clamp(self.min, self.max));
            }
            below += count;
        }
        // Only reachable through rounding of `target` at q = 1.
        let value = self.lower + (last_nonempty + 1) as f64 * self.bin_width;
        Some((value as f32).clamp(self.min, self.max))
    }

    /// Expected total squared error `Σ ∫ (x − Q(x))²` of fake-quantizing with `range`, with
    /// each bin's mass spread uniformly over the part of the bin inside the observed
    /// `[min, max]`. Exact for that density, in `O(bins)` whatever the bit width: see
    /// [`GridError::integral`].
    fn expected_squared_error(&self, range: &QuantRange) -> f64 {
        let grid = GridError::new(range);
        let (data_min, data_max) = (self.min as f64, self.max as f64);
        let mut error = 0.0f64;
        for (i, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let count = count as f64;
            let a = (self.lower + i as f64 * self.bin_width).max(data_min);
            let b = (self.lower + (i + 1) as f64 * self.bin_width).min(data_max);
            error += if b > a {
                count / (b - a) * grid.integral(a, b)
            } else {
                // The bin's mass sits on one point (the data range is narrower than a bin).
                count * grid.point(a)
            };
        }
        error
    }
}

/// Closed-form integrals of the squared rounding error `(x − Q(x))²` of a uniform grid with
/// levels `lowest, lowest + s, …, highest` (round to nearest, clamp beyond the ends).
///
/// The real line splits into the cell of `lowest` (`x < lowest + s/2`), interior cells of
/// width `s` centred on the other levels, and the cell of `highest` (`x ≥ highest − s/2`).
/// Over a whole interior cell the integral is `s³/12`, so an interval is its two partial end
/// cells plus a count of whole cells.
struct GridError {
    step: f64,
    lowest: f64,
    highest: f64,
    /// `lowest + s/2`: where the interior cells start.
    low_edge: f64,
    /// `highest − s/2`: where the interior cells end.
    high_edge: f64,
}

impl GridError {
    fn new(range: &QuantRange) -> Self {
        let step = range.scale as f64;
        let lowest = (range.qmin - range.zero_point) as f64 * step;
        let highest = (range.qmax - range.zero_point) as f64 * step;
        Self {
            step,
            lowest,
            highest,
            low_edge: lowest + 0.5 * step,
            high_edge: highest - 0.5 * step,
        }
    }

    /// `∫ₐᵇ (x − q)² dx`.
    fn piece(a: f64, b: f64, q: f64) -> f64 {
        let (u, v) = (a - q, b - q);
        (v * v * v - u * u * u) / 3.0
    }

    /// `(x − Q(x))²` at one point.
    fn point(&self, x: f64) -> f64 {
        let q = if x < self.low_edge {
            self.lowest
        } else if x >= self.high_edge {
            self.highest
        } else {
            self.low_edge + ((x - self.low_edge) / self.step).floor() * self.step + 0.5 * self.step
        };
        (x - q) * (x - q)
    }

    /// `∫ₐᵇ (x − Q(x))² dx` for `a < b`.
    fn integral(&self, a: f64, b: f64) -> f64 {
        let mut total = 0.0;
        if a < self.low_edge {
            total += Self::piece(a, b.min(self.low_edge), self.lowest);
        }
        if b > self.high_edge {
            total += Self::piece(a.max(self.high_edge), b, self.highest);
        }
        let (u, v) = (a.max(self.low_edge), b.min(self.high_edge));
        if u < v {
            let s = self.step;
            // Interior cell j spans [low_edge + j·s, low_edge + (j+1)·s), level at its centre.
            let cell_of = |x: f64| ((x - self.low_edge) / s).floor();
            let (first, last) = (cell_of(u), cell_of(v).max(cell_of(u)));
            let centre = |j: f64| self.low_edge + (j + 0.5) * s;
            if first == last {
                total += Self::piece(u, v, centre(first));
            } else {
                let first_end = self.low_edge + (first + 1.0) * s;
                let last_start = self.low_edge + last * s;
                total += Self::piece(u, first_end, centre(first));
                total += (last - first - 1.0) * s * s * s / 12.0;
                total += Self::piece(last_start, v, centre(last));
            }
        }
        total
    }
}

fn min_max(values: &[f32]) -> Option<(f32, f32)> {
    let first = *values.first()?;
    Some(
        values
            .iter()
            .fold((first, first), |(lo, hi), &v| (lo.min(v), hi.max(v))),
    )
}

/// Which axis of a `(rows, cols)` batch indexes channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelAxis {
    /// One channel per column: activations `[tokens, features]`, where every batch adds
    /// tokens (rows) and the features stay fixed.
    Columns,
    /// One channel per row: weights `(out, in)` per output channel (PyTorch's
    /// `ch_axis = 0`); every batch must have the same number of rows.
    Rows,
}

/// How an observer is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserverConfig {
    /// Bins of the per-tensor histogram (PyTorch's `HistogramObserver` uses 2048).
    pub histogram_bins: usize,
    /// Per-channel statistics along this axis, or per-tensor only.
    pub channel_axis: Option<ChannelAxis>,
    /// Bins of each per-channel histogram (fewer than per tensor: there is one per channel).
    pub channel_histogram_bins: usize,
}

impl Default for ObserverConfig {
    /// 2048 per-tensor bins, no channels, 256 bins per channel when channels are enabled.
    fn default() -> Self {
        Self {
            histogram_bins: 2048,
            channel_axis: None,
            channel_histogram_bins: 256,
        }
    }
}

/// How a clipping range is chosen from what was observed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// The observed `[min, max]`.
    MinMax,
    /// `p ∈ (0, 100]`: upper clip at the `p`-th percentile, lower clip at the `(100 − p)`-th
    /// (so `p = 99.9` cuts 0.1 % from each tail; `p = 100` is min/max; for `p < 50` the two
    /// are swapped so that lower ≤ upper), interpolated within histogram bins.
    Percentile(f64),
    /// The range minimising the expected squared quantization error under the histogram for
    /// a `bits`-bit grid (symmetric: one clip `c`, range `[−c, c]`; asymmetric: lower and
    /// upper clip by coordinate descent). Never worse than min/max under the histogram, since
    /// min/max is the first candidate.
    MseOptimal {
        /// Bit width of the grid the error is measured for.
        bits: u32,
    },
}

/// A clipping range and the grid parameters it gives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantRange {
    /// Lower clip (before widening to contain 0).
    pub lower: f32,
    /// Upper clip (before widening to contain 0).
    pub upper: f32,
    /// Grid step.
    pub scale: f32,
    /// Integer code of 0.0.
    pub zero_point: i32,
    /// Smallest code.
    pub qmin: i32,
    /// Largest code.
    pub qmax: i32,
}

impl QuantRange {
    /// The grid for the clip range `[lower, upper]` at `bits` bits (formulas in the module
    /// docs).
    ///
    /// # Errors
    /// [`QuantError::BitsOutOfRange`] outside 2..=16; [`QuantError::InvalidParameter`] for a
    /// non-finite bound or `lower > upper`.
    ///
    /// ```
    /// use quant_core::calibration::QuantRange;
    /// let symmetric = QuantRange::from_clip(-1.0, 2.0, 8, true).unwrap();
    /// assert_eq!((symmetric.qmin, symmetric.qmax, symmetric.zero_point), (-128, 127, 0));
    /// assert!((symmetric.scale - 2.0 / 127.5).abs() < 1e-7);
    /// let asymmetric = QuantRange::from_clip(-1.0, 2.0, 8, false).unwrap();
    /// assert_eq!((asymmetric.qmin, asymmetric.qmax, asymmetric.zero_point), (0, 255, 85));
    /// ```
    pub fn from_clip(lower: f32, upper: f32, bits: u32, symmetric: bool) -> Result<Self> {
        check_bits("QuantRange", bits, MIN_BITS, MAX_BITS)?;
        if !lower.is_finite() || !upper.is_finite() || lower > upper {
            return Err(QuantError::invalid(
                "QuantRange clip",
                format!("[{lower}, {upper}]"),
                "bounds must be finite with lower ≤ upper",
            ));
        }
        let lo = lower.min(0.0);
        let hi = upper.max(0.0);
        Ok(if symmetric {
            let qmin = -(1i32 << (bits - 1));
            let qmax = (1i32 << (bits - 1)) - 1;
            let absmax = (-lo).max(hi);
            let scale = (absmax / ((qmax - qmin) as f32 / 2.0)).max(f32::EPSILON);
            Self {
                lower,
                upper,
                scale,
                zero_point: 0,
                qmin,
                qmax,
            }
        } else {
            let qmin = 0i32;
            let qmax = ((1u32 << bits) - 1) as i32;
            let scale = ((hi - lo) / (qmax - qmin) as f32).max(f32::EPSILON);
            let zero_point = (qmin - round_half_even(lo / scale) as i32).clamp(qmin, qmax);
            Self {
                lower,
                upper,
                scale,
                zero_point,
                qmin,
                qmax,
            }
        })
    }
}

/// A summary of [`RunningStats`] for the artifact.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StatsSummary {
    /// Values seen.
    pub count: u64,
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
    /// Mean.
    pub mean: f64,
    /// Population variance.
    pub variance: f64,
}

/// The result for one tensor or channel.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelCalibration {
    /// What was observed.
    pub stats: StatsSummary,
    /// The range and grid the method chose.
    pub range: QuantRange,
}

/// Everything a calibration run produced, reproducibly: the results, how they were obtained,
/// and a fingerprint of the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationArtifact {
    /// [`ARTIFACT_FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// How ranges were chosen.
    pub method: CalibrationMethod,
    /// Bit width of the grids.
    pub bits: u32,
    /// Symmetric (signed, zero point 0) or asymmetric (unsigned, zero point) grids.
    pub symmetric: bool,
    /// The channel axis, if per-channel results were computed.
    pub channel_axis: Option<ChannelAxis>,
    /// The whole-tensor result.
    pub per_tensor: ChannelCalibration,
    /// One result per channel (empty without a channel axis).
    pub per_channel: Vec<ChannelCalibration>,
    /// Batches observed.
    pub batches_seen: u64,
    /// Values observed.
    pub values_seen: u64,
    /// Lower-case hex SHA-256 of the observed stream (see [`CalibrationObserver`]).
    pub data_sha256: String,
    /// Unix seconds when the artifact was made (or as given by the caller).
    pub timestamp_unix: u64,
}

/// Statistics and histogram of one tensor or channel.
#[derive(Debug, Clone)]
struct ChannelState {
    stats: RunningStats,
    histogram: StreamingHistogram,
}

impl ChannelState {
    fn new(bins: usize) -> Result<Self> {
        Ok(Self {
            stats: RunningStats::new(),
            histogram: StreamingHistogram::new(bins)?,
        })
    }

    /// `values` are finite (checked per batch).
    fn observe_finite(&mut self, values: &[f32]) {
        self.stats.merge(&RunningStats::of_slice(values));
        self.histogram.observe_finite(values);
    }

    fn calibrate(
        &self,
        method: CalibrationMethod,
        bits: u32,
        symmetric: bool,
    ) -> Result<ChannelCalibration> {
        let (Some(min), Some(max), Some(mean), Some(variance)) = (
            self.stats.min(),
            self.stats.max(),
            self.stats.mean(),
            self.stats.variance(),
        ) else {
            return Err(QuantError::Empty {
                context: "calibration: no values observed".to_string(),
            });
        };
        let range = match method {
            CalibrationMethod::MinMax => QuantRange::from_clip(min, max, bits, symmetric)?,
            CalibrationMethod::Percentile(p) => {
                let upper_q = self.histogram.quantile(p / 100.0).unwrap_or(max);
                let lower_q = self.histogram.quantile(1.0 - p / 100.0).unwrap_or(min);
                QuantRange::from_clip(lower_q.min(upper_q), lower_q.max(upper_q), bits, symmetric)?
            }
            CalibrationMethod::MseOptimal { .. } => {
                mse_optimal_range(&self.histogram, min, max, bits, symmetric)?
            }
        };
        Ok(ChannelCalibration {
            stats: StatsSummary {
                count: self.stats.count(),
                min,
                max,
                mean,
                variance,
            },
            range,
        })
    }
}

/// The clip range minimising [`StreamingHistogram::expected_squared_error`] on a `bits`-bit
/// grid. Clips are parametrised as cuts: fractions of the data range removed from an end.
/// Symmetric: one clip `c = absmax·(1 − cut)`, range `[−c, c]`. Asymmetric: a lower and an
/// upper cut, optimised alternately (coordinate descent, `MSE_ASYMMETRIC_ROUNDS` rounds).
/// Each one-dimensional search is [`minimize_cut`], which never accepts a worse point, so
/// the result is never worse than min/max (no cut) under the histogram.
fn mse_optimal_range(
    histogram: &StreamingHistogram,
    min: f32,
    max: f32,
    bits: u32,
    symmetric: bool,
) -> Result<QuantRange> {
    let error_of = |lower: f32, upper: f32| -> Result<f64> {
        let range = QuantRange::from_clip(lower, upper, bits, symmetric)?;
        Ok(histogram.expected_squared_error(&range))
    };
    if symmetric {
        let absmax = min.abs().max(max.abs()) as f64;
        let clip = |cut: f64| (absmax * (1.0 - cut)) as f32;
        let cut = minimize_cut(0.0, 1.0, |cut| error_of(-clip(cut), clip(cut)))?;
        return QuantRange::from_clip(-clip(cut), clip(cut), bits, true);
    }
    let (min64, span) = (min as f64, max as f64 - min as f64);
    let bounds = |lower_cut: f64, upper_cut: f64| {
        let lower = (min64 + span * lower_cut) as f32;
        let upper = (min64 + span * (1.0 - upper_cut)) as f32;
        (lower, upper.max(lower))
    };
    let (mut lower_cut, mut upper_cut) = (0.0f64, 0.0f64);
    for _ in 0..MSE_ASYMMETRIC_ROUNDS {
        // The two cuts together always leave part of the range.
        lower_cut = minimize_cut(lower_cut, 1.0 - upper_cut, |cut| {
            let (lo, hi) = bounds(cut, upper_cut);
            error_of(lo, hi)
        })?;
        upper_cut = minimize_cut(upper_cut, 1.0 - lower_cut, |cut| {
            let (lo, hi) = bounds(lower_cut, cut);
            error_of(lo, hi)
        })?;
    }
    let (lower, upper) = bounds(lower_cut, upper_cut);
    QuantRange::from_clip(lower, upper, bits, false)
}

/// The cut in `[0, max_cut)` minimising `f`, starting from `current` (kept unless strictly
/// beaten): a sweep over `0, max_cut/N, …, (N−1)·max_cut/N`, then `MSE_REFINE_LEVELS` rounds
/// of evenly spaced points between the best point's neighbours.
fn minimize_cut(current: f64, max_cut: f64, f: impl Fn(f64) -> Result<f64>) -> Result<f64> {
    let highest = max_cut * (MSE_SWEEP_STEPS - 1) as f64 / MSE_SWEEP_STEPS as f64;
    let mut best = (f(current)?, current);
    let consider = |cut: f64, best: &mut (f64, f64)| -> Result<()> {
        let error = f(cut)?;
        if error < best.0 {
            *best = (error, cut);
        }
        Ok(())
    };
    let mut spacing = max_cut / MSE_SWEEP_STEPS as f64;
    for i in 0..MSE_SWEEP_STEPS {
        consider(i as f64 * spacing, &mut best)?;
    }
    for _ in 0..MSE_REFINE_LEVELS {
        let from = (best.1 - spacing).max(0.0);
        let to = (best.1 + spacing).min(highest);
        if to <= from {
            break;
        }
        for i in 0..=MSE_REFINE_STEPS {
            consider(
                from + (to - from) * i as f64 / MSE_REFINE_STEPS as f64,
                &mut best,
            )?;
        }
        spacing = (to - from) / MSE_REFINE_STEPS as f64;
    }
    Ok(best.1)
}

/// Streaming per-tensor (and optionally per-channel) statistics over batches of activations
/// or weights, finished into a [`CalibrationArtifact`].
///
/// **Data hash.** For every batch, in order: its row and column counts as little-endian
/// `u64`, then its values in row-major order as little-endian `f32` bytes. The same data cut
/// into differently shaped batches hashes differently (the shapes differ), and the memory
/// layout of a batch does not matter.
///
/// ```
/// use ndarray::array;
/// use quant_core::calibration::{CalibrationMethod, CalibrationObserver, ObserverConfig};
///
/// let mut observer = CalibrationObserver::new(ObserverConfig::default()).unwrap();
/// observer.observe(array![[0.5f32, -1.0], [2.0, 0.0]].view()).unwrap();
/// observer.observe(array![[-3.0f32, 1.0]].view()).unwrap();
/// let artifact = observer.finish(CalibrationMethod::MinMax, 8, false, Some(1_700_000_000)).unwrap();
/// assert_eq!((artifact.per_tensor.range.lower, artifact.per_tensor.range.upper), (-3.0, 2.0));
/// assert_eq!((artifact.batches_seen, artifact.values_seen), (2, 6));
/// assert_eq!(artifact.data_sha256.len(), 64);
///
/// let err = observer.observe(array![[1.0f32, f32::NAN]].view()).unwrap_err();
/// assert!(err.to_string().contains("index 1"));
/// ```
#[derive(Debug, Clone)]
pub struct CalibrationObserver {
    config: ObserverConfig,
    tensor: ChannelState,
    channels: Vec<ChannelState>,
    batches: u64,
    hasher: Sha256,
}

impl CalibrationObserver {
    /// An observer that has seen nothing.
    ///
    /// # Errors
    /// [`QuantError::InvalidParameter`] when a histogram would have fewer than 2 bins.
    pub fn new(config: ObserverConfig) -> Result<Self> {
        if config.channel_axis.is_some() {
            // Validate now rather than at the first batch.
            StreamingHistogram::new(config.channel_histogram_bins)?;
        }
        Ok(Self {
            config,
            tensor: ChannelState::new(config.histogram_bins)?,
            channels: Vec::new(),
            batches: 0,
            hasher: Sha256::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ObserverConfig {
        &self.config
    }

    /// Adds one batch `(rows, cols)`.
    ///
    /// # Errors
    /// [`QuantError::Empty`] for a batch with no values; [`QuantError::ShapeMismatch`] when
    /// the channel count differs from earlier batches; [`QuantError::NonFinite`] naming the
    /// batch number and the first bad value's row-major index in it. Nothing is recorded from
    /// a batch that errors.
    pub fn observe(&mut self, batch: ArrayView2<'_, f32>) -> Result<()> {
        let (rows, cols) = batch.dim();
        let context = format!("calibration batch {}", self.batches);
        if rows == 0 || cols == 0 {
            return Err(QuantError::Empty {
                context: format!("{context} ({rows}×{cols})"),
            });
        }
        check_finite_matrix(&context, batch)?;
        let channel_count = match self.config.channel_axis {
            None => 0,
            Some(ChannelAxis::Columns) => cols,
            Some(ChannelAxis::Rows) => rows,
        };
        if self.batches > 0 && channel_count != self.channels.len() {
            return Err(QuantError::shape(
                format!("{context} channel count ({:?})", self.config.channel_axis),
                self.channels.len(),
                channel_count,
            ));
        }
        if self.batches == 0 && channel_count > 0 {
            self.channels =
                vec![ChannelState::new(self.config.channel_histogram_bins)?; channel_count];
        }

        let row_major = batch.as_standard_layout();
        let values = row_major
            .as_slice()
            .expect("a standard-layout array is contiguous");
        self.hasher.update((rows as u64).to_le_bytes());
        self.hasher.update((cols as u64).to_le_bytes());
        if cfg!(target_endian = "little") {
            self.hasher.update(bytemuck::cast_slice::<f32, u8>(values));
        } else {
            for v in values {
                self.hasher.update(v.to_le_bytes());
            }
        }
        self.tensor.observe_finite(values);

        if let Some(axis) = self.config.channel_axis {
            // Channel-major data so every channel is one contiguous slice.
            let transposed;
            let per_channel: &[f32] = match axis {
                ChannelAxis::Rows => values,
                ChannelAxis::Columns => {
                    transposed = batch.t().as_standard_layout().into_owned();
                    transposed
                        .as_slice()
                        .expect("a standard-layout array is contiguous")
                }
            };
            let length = per_channel.len() / channel_count;
            if per_channel.len() >= PARALLEL_MIN_VALUES {
                self.channels
                    .par_iter_mut()
                    .zip(per_channel.par_chunks_exact(length))
                    .for_each(|(state, chunk)| state.observe_finite(chunk));
            } else {
                for (state, chunk) in self
                    .channels
                    .iter_mut()
                    .zip(per_channel.chunks_exact(length))
                {
                    state.observe_finite(chunk);
                }
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Batches observed so far.
    pub fn batches_seen(&self) -> u64 {
        self.batches
    }

    /// Whole-tensor statistics so far.
    pub fn tensor_stats(&self) -> &RunningStats {
        &self.tensor.stats
    }

    /// Whole-tensor histogram so far.
    pub fn tensor_histogram(&self) -> &StreamingHistogram {
        &self.tensor.histogram
    }

    /// Statistics of channel `index`, if channels are observed and it exists.
    pub fn channel_stats(&self, index: usize) -> Option<&RunningStats> {
        self.channels.get(index).map(|c| &c.stats)
    }

    /// Histogram of channel `index`, if channels are observed and it exists.
    pub fn channel_histogram(&self, index: usize) -> Option<&StreamingHistogram> {
        self.channels.get(index).map(|c| &c.histogram)
    }

    /// Number of channels (0 before the first batch or without a channel axis).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Lower-case hex SHA-256 of the stream so far (see the type's docs for what is hashed).
    pub fn data_sha256(&self) -> String {
        self.hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The artifact for `method` on `bits`-bit grids, symmetric or not, stamped with
    /// `timestamp_unix` or, when `None`, the current time. Per-channel ranges are computed in
    /// parallel.
    ///
    /// # Errors
    /// [`QuantError::Empty`] before any batch; [`QuantError::BitsOutOfRange`] outside 2..=16;
    /// [`QuantError::InvalidParameter`] for a percentile outside `(0, 100]`, for
    /// `MseOptimal { bits }` disagreeing with `bits`, or a clock before 1970.
    pub fn finish(
        &self,
        method: CalibrationMethod,
        bits: u32,
        symmetric: bool,
        timestamp_unix: Option<u64>,
    ) -> Result<CalibrationArtifact> {
        check_bits("calibration", bits, MIN_BITS, MAX_BITS)?;
        match method {
            CalibrationMethod::Percentile(p) if !(p > 0.0 && p <= 100.0) => {
                return Err(QuantError::invalid(
                    "calibration percentile",
                    p,
                    "must lie in (0, 100]",
                ));
            }
            CalibrationMethod::MseOptimal { bits: search_bits } if search_bits != bits => {
                return Err(QuantError::invalid(
                    "MseOptimal bits",
                    search_bits,
                    format!("the artifact is for {bits}-bit grids; the search must use the same"),
                ));
            }
            _ => {}
        }
        if self.batches == 0 {
            return Err(QuantError::Empty {
                context: "calibration finish: no batch observed".to_string(),
            });
        }
        let timestamp_unix = match timestamp_unix {
            Some(t) => t,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_err(|e| {
                    QuantError::invalid("system clock", format!("{e:?}"), "is before 1970")
                })?
                .as_secs(),
        };
        let per_tensor = self.tensor.calibrate(method, bits, symmetric)?;
        let per_channel = self
            .channels
            .par_iter()
            .map(|c| c.calibrate(method, bits, symmetric))
            .collect::<Result<Vec<_>>>()?;
        Ok(CalibrationArtifact {
            format_version: ARTIFACT_FORMAT_VERSION,
            method,
            bits,
            symmetric,
            channel_axis: self.config.channel_axis,
            per_tensor,
            per_channel,
            batches_seen: self.batches,
            values_seen: self.tensor.stats.count(),
            data_sha256: self.data_sha256(),
            timestamp_unix,
        })
    }
}

impl CalibrationArtifact {
    /// Checks what serde cannot: version, bit width, hash format, channel list and finite,
    /// ordered ranges with positive scales. `context` names the source in errors.
    ///
    /// # Errors
    /// [`QuantError::Format`] naming `context` and the first problem found.
    pub fn validate(&self, context: &str) -> Result<()> {
        let fail = |reason: String| Err(QuantError::format(context, reason));
        if self.format_version != ARTIFACT_FORMAT_VERSION {
            return fail(format!(
                "format_version {} (this build reads {ARTIFACT_FORMAT_VERSION})",
                self.format_version
            ));
        }
        if !(MIN_BITS..=MAX_BITS).contains(&self.bits) {
            return fail(format!(
                "bits {} outside {MIN_BITS}..={MAX_BITS}",
                self.bits
            ));
        }
        if self.data_sha256.len() != 64
            || !self
                .data_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return fail(format!(
                "data_sha256 {:?} is not 64 lower-case hex digits",
                self.data_sha256
            ));
        }
        if self.channel_axis.is_none() && !self.per_channel.is_empty() {
            return fail(format!(
                "{} per-channel results without a channel axis",
                self.per_channel.len()
            ));
        }
        let all = std::iter::once(("per_tensor".to_string(), &self.per_tensor)).chain(
            self.per_channel
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("per_channel[{i}]"), c)),
        );
        for (name, c) in all {
            let r = &c.range;
            let s = &c.stats;
            let finite = [r.lower, r.upper, r.scale, s.min, s.max]
                .iter()
                .all(|v| v.is_finite())
                && s.mean.is_finite()
                && s.variance.is_finite();
            if !finite || r.lower > r.upper || r.scale <= 0.0 || r.qmin >= r.qmax || s.min > s.max {
                return fail(format!("{name} has an invalid range or statistics: {c:?}"));
            }
        }
        Ok(())
    }

    /// Writes the artifact as pretty JSON. The bytes go to a temporary file in the same
    /// directory, are flushed to disk, and the file is then renamed over `path`, so a failed
    /// save leaves any earlier file at `path` whole.
    ///
    /// # Errors
    /// [`QuantError::Format`] naming `path` when the artifact is invalid ([`Self::validate`])
    /// or any file operation fails; the temporary file is removed then.
    ///
    /// ```
    /// use ndarray::array;
    /// use quant_core::calibration::{
    ///     CalibrationArtifact, CalibrationMethod, CalibrationObserver, ObserverConfig,
    /// };
    /// let mut observer = CalibrationObserver::new(ObserverConfig::default()).unwrap();
    /// observer.observe(array![[1.0f32, -2.0, 3.0]].view()).unwrap();
    /// let artifact = observer.finish(CalibrationMethod::MinMax, 4, true, Some(0)).unwrap();
    /// let dir = std::env::temp_dir().join(format!("calibration-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("layer0.json");
    /// artifact.save_json(&path).unwrap();
    /// assert_eq!(CalibrationArtifact::load_json(&path).unwrap(), artifact);
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn save_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let context = format!("calibration artifact {}", path.display());
        self.validate(&context)?;
        let io_error =
            |what: &str, e: std::io::Error| QuantError::format(&context, format!("{what}: {e}"));
        let file_name = path
            .file_name()
            .ok_or_else(|| QuantError::format(&context, "the path does not name a file"))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| QuantError::format(&context, format!("serializing: {e}")))?;
        let directory = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temporary = directory.join(format!(
            ".{}.{}.{nanos}.tmp",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let write = || -> Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temporary)
                .map_err(|e| io_error("creating the temporary file", e))?;
            file.write_all(&json)
                .map_err(|e| io_error("writing the temporary file", e))?;
            file.sync_all()
                .map_err(|e| io_error("flushing the temporary file", e))?;
            fs::rename(&temporary, path).map_err(|e| io_error("renaming into place", e))
        };
        let result = write();
        if result.is_err() {
            // Best effort: the error that matters is the one being returned.
            let _ = fs::remove_file(&temporary);
        }
        result
    }

    /// Reads an artifact written by [`Self::save_json`] and validates it.
    ///
    /// # Errors
    /// [`QuantError::Format`] naming `path` when it cannot be read, is not a valid artifact
    /// JSON, or fails [`Self::validate`].
    pub fn load_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let context = format!("calibration artifact {}", path.display());
        let bytes =
            fs::read(path).map_err(|e| QuantError::format(&context, format!("reading: {e}")))?;
        let artifact: Self = serde_json::from_slice(&bytes)
            .map_err(|e| QuantError::format(&context, format!("parsing JSON: {e}")))?;
        artifact.validate(&context)?;
        Ok(artifact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Midpoint-rule integral of `(x − Q(x))²` with `Q` the crate's scalar fake quantizer.
    fn numeric_integral(range: &QuantRange, a: f64, b: f64) -> f64 {
        let n = 200_000;
        let h = (b - a) / n as f64;
        (0..n)
            .map(|i| {
                let x = a + (i as f64 + 0.5) * h;
                let q = crate::rounding::fake_quant_scalar(
                    x as f32,
                    range.scale,
                    range.zero_point as f32,
                    range.qmin as f32,
                    range.qmax as f32,
                ) as f64;
                (x - q).powi(2) * h
            })
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// The closed form agrees with brute-force integration, across the clamped ends,
        /// partial cells and runs of whole cells.
        #[test]
        fn closed_form_grid_error_matches_numeric_integration(
            bits in 2u32..6,
            symmetric in any::<bool>(),
            lower in -5.0f32..0.0,
            upper in 0.1f32..5.0,
            a in -8.0f64..8.0,
            width in 0.01f64..6.0,
        ) {
            let range = QuantRange::from_clip(lower, upper, bits, symmetric).unwrap();
            let grid = GridError::new(&range);
            let b = a + width;
            let exact = grid.integral(a, b);
            let numeric = numeric_integral(&range, a, b);
            prop_assert!(
                (exact - numeric).abs() <= 1e-4 * (1.0 + numeric),
                "{exact} vs {numeric}"
            );
        }
    }
}
