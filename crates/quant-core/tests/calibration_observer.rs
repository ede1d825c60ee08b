//! Calibration observers: streaming statistics against direct computation, histogram
//! re-binning, percentile and MSE-optimal clipping, the data hash, and the JSON artifact.

use std::path::PathBuf;

use ndarray::{s, Array2, ArrayView2};
use proptest::prelude::*;
use quant_core::calibration::{
    CalibrationArtifact, CalibrationMethod, CalibrationObserver, ChannelAxis, ObserverConfig,
    QuantRange, RunningStats, StreamingHistogram,
};
use quant_core::error::QuantError;
use quant_core::rounding::fake_quant_scalar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn gaussian(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    (0..count).map(|_| normal.sample(&mut rng)).collect()
}

fn column_observer() -> CalibrationObserver {
    CalibrationObserver::new(ObserverConfig {
        channel_axis: Some(ChannelAxis::Columns),
        ..ObserverConfig::default()
    })
    .unwrap()
}

/// Direct two-pass statistics in f64: (min, max, mean, population variance).
fn direct_stats<'a>(values: impl Iterator<Item = &'a f32> + Clone) -> (f32, f32, f64, f64) {
    let n = values.clone().count() as f64;
    let mean = values.clone().map(|&v| v as f64).sum::<f64>() / n;
    let variance = values
        .clone()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let min = values.clone().fold(f32::INFINITY, |m, &v| m.min(v));
    let max = values.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    (min, max, mean, variance)
}

fn assert_stats_match(stats: &RunningStats, expected: (f32, f32, f64, f64), what: &str) {
    let (min, max, mean, variance) = expected;
    assert_eq!(stats.min(), Some(min), "{what} min");
    assert_eq!(stats.max(), Some(max), "{what} max");
    let tol = 1e-9 * (1.0 + mean.abs() + variance);
    assert!(
        (stats.mean().unwrap() - mean).abs() < tol,
        "{what} mean {:?} vs {mean}",
        stats.mean()
    );
    assert!(
        (stats.variance().unwrap() - variance).abs() < tol,
        "{what} variance {:?} vs {variance}",
        stats.variance()
    );
}

/// Sorted cut points in `1..len` from arbitrary numbers.
fn cuts(raw: &[usize], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw
        .iter()
        .filter(|_| len > 1)
        .map(|r| 1 + r % (len - 1))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Activations `[tokens, features]` cut into batches of tokens: per-tensor and
    /// per-column statistics equal direct computation on the whole matrix.
    #[test]
    fn streamed_statistics_match_direct_computation(
        rows in 1usize..60,
        cols in 1usize..7,
        offset in -100.0f32..100.0,
        spread in 0.001f32..1000.0,
        raw_cuts in prop::collection::vec(any::<usize>(), 0..6),
        seed in any::<u64>(),
    ) {
        let data = Array2::from_shape_vec(
            (rows, cols),
            gaussian(rows * cols, seed).iter().map(|v| offset + spread * v).collect(),
        )
        .unwrap();
        let mut observer = column_observer();
        let mut start = 0;
        let mut batches = 0u64;
        for end in cuts(&raw_cuts, rows).into_iter().chain(std::iter::once(rows)) {
            observer.observe(data.slice(s![start..end, ..])).unwrap();
            start = end;
            batches += 1;
        }
        prop_assert_eq!(observer.batches_seen(), batches);
        prop_assert_eq!(observer.tensor_stats().count(), (rows * cols) as u64);
        assert_stats_match(observer.tensor_stats(), direct_stats(data.iter()), "tensor");
        prop_assert_eq!(observer.channel_count(), cols);
        for c in 0..cols {
            let column = data.column(c);
            assert_stats_match(
                observer.channel_stats(c).unwrap(),
                direct_stats(column.iter()),
                &format!("column {c}"),
            );
            let histogram = observer.channel_histogram(c).unwrap();
            prop_assert_eq!(histogram.counts().iter().sum::<u64>(), rows as u64);
        }
        let histogram = observer.tensor_histogram();
        prop_assert_eq!(histogram.counts().iter().sum::<u64>(), (rows * cols) as u64);
        let (min, max, _, _) = direct_stats(data.iter());
        prop_assert!(histogram.lower() <= min as f64 && histogram.upper() >= max as f64);
    }

    /// Weights `(out, in)` per output row, cut into batches of columns.
    #[test]
    fn per_row_channels_match_direct_computation(
        rows in 1usize..6,
        cols in 1usize..50,
        raw_cuts in prop::collection::vec(any::<usize>(), 0..5),
        seed in any::<u64>(),
    ) {
        let data = Array2::from_shape_vec((rows, cols), gaussian(rows * cols, seed)).unwrap();
        let mut observer = CalibrationObserver::new(ObserverConfig {
            channel_axis: Some(ChannelAxis::Rows),
            ..ObserverConfig::default()
        })
        .unwrap();
        let mut start = 0;
        for end in cuts(&raw_cuts, cols).into_iter().chain(std::iter::once(cols)) {
            observer.observe(data.slice(s![.., start..end])).unwrap();
            start = end;
        }
        for r in 0..rows {
            let row = data.row(r);
            assert_stats_match(
                observer.channel_stats(r).unwrap(),
                direct_stats(row.iter()),
                &format!("row {r}"),
            );
        }
    }

    /// Chan's merge of two halves equals observing everything at once.
    #[test]
    fn merging_running_stats_equals_one_pass(
        values in prop::collection::vec(-1e4f32..1e4, 2..200),
        split in any::<usize>(),
    ) {
        let split = split % values.len();
        let (mut left, mut right, mut whole) =
            (RunningStats::new(), RunningStats::new(), RunningStats::new());
        left.observe(&values[..split]).unwrap();
        right.observe(&values[split..]).unwrap();
        whole.observe(&values).unwrap();
        left.merge(&right);
        prop_assert_eq!(left.count(), whole.count());
        prop_assert_eq!(left.min(), whole.min());
        prop_assert_eq!(left.max(), whole.max());
        let (a, b) = (left.variance().unwrap(), whole.variance().unwrap());
        prop_assert!((a - b).abs() <= 1e-9 * (1.0 + b));
        let (a, b) = (left.sample_variance().unwrap(), whole.sample_variance().unwrap());
        prop_assert!((a - b).abs() <= 1e-9 * (1.0 + b));
    }

    /// However the range grows, re-binning conserves counts and keeps the data inside.
    #[test]
    fn histogram_rebinning_conserves_counts(
        batches in prop::collection::vec(prop::collection::vec(-1e6f32..1e6, 1..30), 1..12),
        bins in 2usize..64,
    ) {
        let mut histogram = StreamingHistogram::new(bins).unwrap();
        let mut total = 0u64;
        for batch in &batches {
            histogram.observe(batch).unwrap();
            total += batch.len() as u64;
            prop_assert_eq!(histogram.counts().iter().sum::<u64>(), total);
            prop_assert_eq!(histogram.total(), total);
        }
        let all: Vec<f32> = batches.concat();
        let (min, max, _, _) = direct_stats(all.iter());
        prop_assert!(histogram.lower() <= min as f64 && histogram.upper() >= max as f64);
        prop_assert_eq!(histogram.quantile(0.0), Some(min));
        prop_assert_eq!(histogram.quantile(1.0), Some(max));
    }
}

#[test]
fn histogram_starting_from_a_constant_batch_grows_correctly() {
    let mut histogram = StreamingHistogram::new(16).unwrap();
    histogram.observe(&[3.0; 10]).unwrap();
    histogram.observe(&[0.0; 5]).unwrap();
    histogram.observe(&[-1e6, 1e6]).unwrap();
    assert_eq!(histogram.counts().iter().sum::<u64>(), 17);
    assert!(histogram.lower() <= -1e6 && histogram.upper() >= 1e6);
    // Not much wider than needed: at most twice the data range (plus one bin).
    assert!(histogram.upper() - histogram.lower() <= 2.0 * 2e6 * (1.0 + 1.0 / 16.0));
    // The median (3.0) is only known to within the bin that holds it.
    let median = histogram.quantile(0.5).unwrap() as f64;
    assert!(
        (median - 3.0).abs() <= histogram.bin_width(),
        "median {median}"
    );
}

#[test]
fn percentile_of_a_uniform_stream_with_growing_range() {
    // 0.5/N, 1.5/N, … fed in ascending batches: every batch grows the range.
    let n = 100_000usize;
    let values: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
    let mut observer = CalibrationObserver::new(ObserverConfig::default()).unwrap();
    for chunk in values.chunks(n / 10) {
        observer
            .observe(ArrayView2::from_shape((1, chunk.len()), chunk).unwrap())
            .unwrap();
    }
    let histogram = observer.tensor_histogram();
    for q in [0.01, 0.1, 0.5, 0.9, 0.999] {
        let got = histogram.quantile(q).unwrap() as f64;
        assert!((got - q).abs() < 2e-3, "quantile {q}: {got}");
    }
    let artifact = observer
        .finish(CalibrationMethod::Percentile(99.0), 8, false, Some(0))
        .unwrap();
    let range = artifact.per_tensor.range;
    assert!((range.lower - 0.01).abs() < 2e-3 && (range.upper - 0.99).abs() < 2e-3);
}

#[test]
fn percentile_of_a_gaussian() {
    let values = gaussian(200_000, 5);
    let mut observer = CalibrationObserver::new(ObserverConfig::default()).unwrap();
    for chunk in values.chunks(10_000) {
        observer
            .observe(ArrayView2::from_shape((chunk.len() / 4, 4), chunk).unwrap())
            .unwrap();
    }
    // Φ⁻¹(0.975) = 1.95996, Φ⁻¹(0.99) = 2.32635.
    for (p, z) in [(97.5, 1.95996f32), (99.0, 2.32635)] {
        let artifact = observer
            .finish(CalibrationMethod::Percentile(p), 8, false, Some(0))
            .unwrap();
        let range = artifact.per_tensor.range;
        assert!(
            (range.upper - z).abs() < 0.03,
            "p {p}: upper {}",
            range.upper
        );
        assert!(
            (range.lower + z).abs() < 0.03,
            "p {p}: lower {}",
            range.lower
        );
    }
    // p = 100 is min/max.
    let full = observer
        .finish(CalibrationMethod::Percentile(100.0), 8, true, Some(0))
        .unwrap();
    let minmax = observer
        .finish(CalibrationMethod::MinMax, 8, true, Some(0))
        .unwrap();
    assert_eq!(full.per_tensor.range, minmax.per_tensor.range);
}

/// Empirical mean squared error of fake-quantizing `values` with `range`.
fn empirical_mse(values: &[f32], range: &QuantRange) -> f64 {
    values
        .iter()
        .map(|&v| {
            let q = fake_quant_scalar(
                v,
                range.scale,
                range.zero_point as f32,
                range.qmin as f32,
                range.qmax as f32,
            );
            ((v - q) as f64).powi(2)
        })
        .sum::<f64>()
        / values.len() as f64
}

#[test]
fn mse_optimal_clip_beats_minmax_on_a_gaussian() {
    let values = gaussian(100_000, 17);
    let mut observer = CalibrationObserver::new(ObserverConfig::default()).unwrap();
    observer
        .observe(ArrayView2::from_shape((values.len() / 8, 8), &values).unwrap())
        .unwrap();
    let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for symmetric in [true, false] {
        let mut previous_top = 0.0f32;
        for bits in [2u32, 3, 4, 5, 8] {
            let minmax = observer
                .finish(CalibrationMethod::MinMax, bits, symmetric, Some(0))
                .unwrap()
                .per_tensor
                .range;
            let optimal = observer
                .finish(
                    CalibrationMethod::MseOptimal { bits },
                    bits,
                    symmetric,
                    Some(0),
                )
                .unwrap()
                .per_tensor
                .range;
            let (mse_minmax, mse_optimal) = (
                empirical_mse(&values, &minmax),
                empirical_mse(&values, &optimal),
            );
            let clip = optimal.upper.max(-optimal.lower);
            assert!(
                clip < absmax,
                "{bits}-bit symmetric={symmetric}: clip {clip} vs absmax {absmax}"
            );
            assert!(
                mse_optimal < mse_minmax,
                "{bits}-bit symmetric={symmetric}: MSE {mse_optimal} vs min/max {mse_minmax}"
            );
            // More levels afford a wider grid. Symmetric: compare the top level, not the clip
            // (on the signed grid it is c·qmax/((qmax − qmin)/2), only 2/3 of c at 2 bits).
            // Asymmetric: compare the span, since forcing 0 onto the grid can put the top
            // level of a 2-bit grid at 2 steps on one side.
            let top = if symmetric {
                (optimal.qmax - optimal.zero_point) as f32 * optimal.scale
            } else {
                (optimal.qmax - optimal.qmin) as f32 * optimal.scale
            };
            assert!(
                top > previous_top,
                "{bits}-bit reach {top} ≤ {previous_top}"
            );
            previous_top = top;
            if bits <= 4 {
                // Optimal uniform clipping of N(0, 1) lies around 1.7σ (2 bits) to 2.6σ
                // (4 bits); anything far outside means the search is broken.
                assert!((1.2..3.2).contains(&clip), "{bits}-bit clip {clip}");
            }
            if !symmetric {
                assert!(optimal.lower < 0.0 && optimal.upper > 0.0);
            }
        }
    }
}

#[test]
fn per_channel_ranges_follow_each_channel() {
    // Column c holds N(0, (c+1)²): per-channel clips must scale with the column.
    let (rows, cols) = (4000usize, 3usize);
    let base = gaussian(rows * cols, 8);
    let data = Array2::from_shape_fn((rows, cols), |(r, c)| base[r * cols + c] * (c + 1) as f32);
    let mut observer = column_observer();
    observer.observe(data.view()).unwrap();
    let artifact = observer
        .finish(CalibrationMethod::MseOptimal { bits: 3 }, 3, true, Some(0))
        .unwrap();
    assert_eq!(artifact.per_channel.len(), cols);
    let clips: Vec<f32> = artifact.per_channel.iter().map(|c| c.range.upper).collect();
    for (c, clip) in clips.iter().enumerate() {
        let ratio = clip / clips[0];
        assert!(
            (ratio - (c + 1) as f32).abs() < 0.2 * (c + 1) as f32,
            "clips {clips:?}"
        );
    }
}

#[test]
fn data_hash_identifies_the_stream() {
    let a = Array2::from_shape_vec((3, 4), gaussian(12, 1)).unwrap();
    let b = Array2::from_shape_vec((2, 4), gaussian(8, 2)).unwrap();
    let hash_of = |batches: &[ArrayView2<'_, f32>]| {
        let mut observer = column_observer();
        for batch in batches {
            observer.observe(*batch).unwrap();
        }
        observer.data_sha256()
    };
    let reference = hash_of(&[a.view(), b.view()]);
    assert_eq!(reference.len(), 64);
    assert_eq!(reference, hash_of(&[a.view(), b.view()]), "same stream");
    // The same values in column-major memory hash the same.
    let a_column_major = {
        let mut t = Array2::<f32>::zeros((4, 3));
        t.assign(&a.t());
        t
    };
    assert_eq!(reference, hash_of(&[a_column_major.t(), b.view()]));
    let mut changed = a.clone();
    changed[[2, 3]] += 1e-6;
    assert_ne!(
        reference,
        hash_of(&[changed.view(), b.view()]),
        "one value changed"
    );
    assert_ne!(reference, hash_of(&[b.view(), a.view()]), "order changed");
    assert_ne!(reference, hash_of(&[a.view()]), "batch missing");
    let empty = CalibrationObserver::new(ObserverConfig::default()).unwrap();
    // SHA-256 of nothing.
    assert_eq!(
        empty.data_sha256(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn non_finite_input_is_reported_by_batch_and_index_and_not_recorded() {
    let mut observer = column_observer();
    observer
        .observe(Array2::<f32>::ones((2, 3)).view())
        .unwrap();
    let hash_before = observer.data_sha256();
    let mut bad = Array2::<f32>::zeros((2, 3));
    bad[[1, 2]] = f32::NAN;
    let err = observer.observe(bad.view()).unwrap_err();
    match &err {
        QuantError::NonFinite { context, index, .. } => {
            assert_eq!(*index, 5);
            assert!(context.contains("batch 1"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    // Column-major input reports the same row-major index.
    let mut bad_t = Array2::<f32>::zeros((3, 2));
    bad_t[[0, 1]] = f32::INFINITY;
    let err = observer.observe(bad_t.t()).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 3, .. }),
        "{err}"
    );
    assert_eq!(observer.batches_seen(), 1);
    assert_eq!(observer.data_sha256(), hash_before);
    assert_eq!(observer.tensor_stats().count(), 6);
}

#[test]
fn caller_mistakes_are_errors() {
    let mut observer = column_observer();
    assert!(matches!(
        observer.finish(CalibrationMethod::MinMax, 8, true, Some(0)),
        Err(QuantError::Empty { .. })
    ));
    assert!(matches!(
        observer.observe(Array2::<f32>::zeros((0, 3)).view()),
        Err(QuantError::Empty { .. })
    ));
    observer
        .observe(Array2::<f32>::ones((2, 3)).view())
        .unwrap();
    assert!(matches!(
        observer.observe(Array2::<f32>::ones((2, 4)).view()),
        Err(QuantError::ShapeMismatch { .. })
    ));
    for p in [0.0, -1.0, 100.5, f64::NAN] {
        assert!(
            matches!(
                observer.finish(CalibrationMethod::Percentile(p), 8, true, Some(0)),
                Err(QuantError::InvalidParameter { .. })
            ),
            "percentile {p}"
        );
    }
    assert!(matches!(
        observer.finish(CalibrationMethod::MseOptimal { bits: 4 }, 3, true, Some(0)),
        Err(QuantError::InvalidParameter { .. })
    ));
    for bits in [0, 1, 17] {
        assert!(matches!(
            observer.finish(CalibrationMethod::MinMax, bits, true, Some(0)),
            Err(QuantError::BitsOutOfRange { .. })
        ));
    }
    assert!(StreamingHistogram::new(1).is_err());
    assert!(CalibrationObserver::new(ObserverConfig {
        histogram_bins: 0,
        ..ObserverConfig::default()
    })
    .is_err());
    assert!(QuantRange::from_clip(2.0, 1.0, 8, true).is_err());
}

#[test]
fn timestamp_is_taken_at_finish_unless_given() {
    let mut observer = column_observer();
    observer
        .observe(Array2::<f32>::ones((1, 2)).view())
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamped = observer
        .finish(CalibrationMethod::MinMax, 8, true, None)
        .unwrap();
    assert!(stamped.timestamp_unix >= now && stamped.timestamp_unix <= now + 60);
    let given = observer
        .finish(CalibrationMethod::MinMax, 8, true, Some(123))
        .unwrap();
    assert_eq!(given.timestamp_unix, 123);
}

/// A scratch directory unique to this test process and name, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "quant-core-calibration-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sample_artifact() -> CalibrationArtifact {
    let mut observer = column_observer();
    let data = Array2::from_shape_vec((50, 3), gaussian(150, 4)).unwrap();
    observer.observe(data.view()).unwrap();
    observer
        .finish(
            CalibrationMethod::Percentile(99.5),
            4,
            false,
            Some(1_763_900_000),
        )
        .unwrap()
}

#[test]
fn artifact_round_trips_through_json() {
    let dir = ScratchDir::new("round-trip");
    let path = dir.0.join("layer.json");
    let artifact = sample_artifact();
    artifact.save_json(&path).unwrap();
    assert_eq!(
        dir.entries(),
        vec!["layer.json".to_string()],
        "no temp file left"
    );
    let loaded = CalibrationArtifact::load_json(&path).unwrap();
    assert_eq!(loaded, artifact);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"percentile\": 99.5"), "{text}");
    assert!(text.contains(&artifact.data_sha256));
    // Overwriting works and keeps the directory clean.
    let mut newer = artifact.clone();
    newer.timestamp_unix += 1;
    newer.save_json(&path).unwrap();
    assert_eq!(CalibrationArtifact::load_json(&path).unwrap(), newer);
    assert_eq!(dir.entries(), vec!["layer.json".to_string()]);
}

#[test]
fn failed_saves_leave_the_old_file_whole_and_name_the_file() {
    let dir = ScratchDir::new("failed-save");
    let path = dir.0.join("layer.json");
    let artifact = sample_artifact();
    artifact.save_json(&path).unwrap();
    let old_bytes = std::fs::read(&path).unwrap();

    let mut invalid = artifact.clone();
    invalid.bits = 99;
    let err = invalid.save_json(&path).unwrap_err();
    assert!(err.to_string().contains("layer.json"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), old_bytes);

    // A rename that fails (the target is a non-empty directory) cleans up its temp file.
    let blocked = dir.0.join("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let err = artifact.save_json(&blocked).unwrap_err();
    assert!(err.to_string().contains("blocked"), "{err}");
    assert_eq!(
        dir.entries(),
        vec!["blocked".to_string(), "layer.json".to_string()]
    );
    assert_eq!(std::fs::read(&path).unwrap(), old_bytes);

    // Loading names the file on every failure.
    let missing = dir.0.join("missing.json");
    let err = CalibrationArtifact::load_json(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.json"), "{err}");
    let truncated = dir.0.join("truncated.json");
    std::fs::write(&truncated, &old_bytes[..old_bytes.len() / 2]).unwrap();
    let err = CalibrationArtifact::load_json(&truncated).unwrap_err();
    assert!(
        matches!(&err, QuantError::Format { context, .. } if context.contains("truncated.json")),
        "{err}"
    );
    let tampered = dir.0.join("tampered.json");
    let text = String::from_utf8(old_bytes)
        .unwrap()
        .replace(&artifact.data_sha256, "not-a-hash");
    std::fs::write(&tampered, text).unwrap();
    let err = CalibrationArtifact::load_json(&tampered).unwrap_err();
    assert!(err.to_string().contains("data_sha256"), "{err}");
}

#[test]
fn shuffled_batches_give_the_same_ranges() {
    // Batch order changes the hash but not (beyond rounding) the statistics or MinMax.
    let data = Array2::from_shape_vec((60, 5), gaussian(300, 12)).unwrap();
    let mut order: Vec<usize> = (0..6).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(3));
    let run = |order: &[usize]| {
        let mut observer = column_observer();
        for &b in order {
            observer
                .observe(data.slice(s![b * 10..(b + 1) * 10, ..]))
                .unwrap();
        }
        observer
            .finish(CalibrationMethod::MinMax, 8, false, Some(0))
            .unwrap()
    };
    let (a, b) = (run(&[0, 1, 2, 3, 4, 5]), run(&order));
    assert_eq!(a.per_tensor.range, b.per_tensor.range);
    assert!((a.per_tensor.stats.variance - b.per_tensor.stats.variance).abs() < 1e-12);
    assert_ne!(a.data_sha256, b.data_sha256);
}
