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

/// Below this many values per batch, channels are observed on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

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

mod search;
mod stats;
#[cfg(test)]
mod tests;

use search::mse_optimal_range;
pub use stats::{RunningStats, StreamingHistogram};
