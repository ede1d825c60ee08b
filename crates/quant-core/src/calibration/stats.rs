//! The streaming statistics behind calibration: exact running moments ([`RunningStats`]),
//! a re-binning histogram ([`StreamingHistogram`]) and the closed-form squared error of a
//! grid over a histogram bin (`GridError`).

use super::*;

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
    pub(super) fn of_slice(values: &[f32]) -> Self {
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
    pub(super) fn observe_finite(&mut self, values: &[f32]) {
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
    pub(super) fn expected_squared_error(&self, range: &QuantRange) -> f64 {
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
pub(super) struct GridError {
    step: f64,
    lowest: f64,
    highest: f64,
    /// `lowest + s/2`: where the interior cells start.
    low_edge: f64,
    /// `highest − s/2`: where the interior cells end.
    high_edge: f64,
}

impl GridError {
    pub(super) fn new(range: &QuantRange) -> Self {
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
    pub(super) fn integral(&self, a: f64, b: f64) -> f64 {
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
