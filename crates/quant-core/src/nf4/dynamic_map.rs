//! The pieces of double quantization that must follow PyTorch/bitsandbytes to the bit:
//! bitsandbytes' signed 8-bit dynamic map, PyTorch's CPU `mean` of the block absmaxes, and the
//! blockwise 8-bit quantization of the centred absmaxes with that map.

use rayon::prelude::*;

/// Number of entries of an 8-bit quantization map.
pub const DYNAMIC_MAP_LEN: usize = 256;

/// `torch.linspace(start, end, steps, dtype=float32)` as PyTorch's CPU kernel computes it.
///
/// The step is `(end − start) / (steps − 1)` in `f32`; the first half of the points count up
/// from `start`, the second half count down from `end`, each `start + step·i` evaluated as one
/// fused multiply-add (the compiler contracts it, so a single rounding) — which is why the
/// dynamic map's values differ in the last bit from a naive `start + i·step`.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: the
/// 256 sorted `f32` values double quantization codes the centred absmaxes with.
///
/// For each decade `10^(i−6)`, `i = 0..7`, the `2^i` midpoints of `linspace(0.1, 1, 2^i + 1)`
/// are scaled by the decade and added with both signs; then `0` and `1` complete the 256.
///
/// ```
/// use quant_core::nf4::bnb_dynamic_map_signed;
/// let map = bnb_dynamic_map_signed();
/// assert_eq!(map.len(), 256);
/// assert_eq!(map[255], 1.0);
/// assert!(map.windows(2).all(|w| w[0] < w[1]));
/// assert_eq!(map.iter().filter(|&&v| v == 0.0).count(), 1);
/// ```
pub fn bnb_dynamic_map_signed() -> Vec<f32> {
    // `10 ** (i − 6)` is a Python float; multiplying an f32 tensor by it casts it to f32 first.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut map = Vec::with_capacity(DYNAMIC_MAP_LEN);
    for (i, &decade) in DECADES.iter().enumerate() {
        let bounds = torch_linspace_f32(0.1f64 as f32, 1.0, (1 << i) + 1);
        let scale = decade as f32;
        let means: Vec<f32> = bounds.windows(2).map(|b| (b[0] + b[1]) / 2.0).collect();
        map.extend(means.iter().map(|&m| scale * m));
        map.extend(means.iter().map(|&m| -scale * m));
    }
    map.push(0.0);
    map.push(1.0);
    map.sort_by(f32::total_cmp);
    map
}

/// `ceil(log2(x))` as c10's `CeilLog2` (1 for `x <= 2`).
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// PyTorch's `multi_row_sum` with 4 rows: a cascade of 4 accumulator levels over `size`
/// groups of 4 items, item `g·4 + k` of group `g` going to row `k`.
fn multi_row_sum<const W: usize>(load: &impl Fn(usize) -> [f32; W], size: usize) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    const ROWS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ROWS]; LEVELS];
    let add = |a: &mut [f32; W], b: [f32; W]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);

    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, row) in acc[0].iter_mut().enumerate() {
                add(row, load(i * ROWS + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(above[0].iter_mut()) {
                add(upper, *lower);
                *lower = [0.0; W];
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, row) in acc[0].iter_mut().enumerate() {
            add(row, load(i * ROWS + k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (row, upper) in first[0].iter_mut().zip(level) {
            add(row, *upper);
        }
    }
    acc[0]
}

/// PyTorch's `row_sum`: 4-way interleaved cascade over `size` items, then the rows folded.
fn row_sum<const W: usize>(load: &impl Fn(usize) -> [f32; W], size: usize) -> [f32; W] {
    let size_ilp = size / 4;
    let rows = multi_row_sum(load, size_ilp);
    let mut total = rows[0];
    for i in size_ilp * 4..size {
        total.iter_mut().zip(load(i)).for_each(|(t, v)| *t += v);
    }
    for row in &rows[1..] {
        total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
    }
    total
}

/// PyTorch's `cascade_sum` of one contiguous run with AVX2 (8-lane) vectors.
fn cascade_sum(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = values.len();
    if n < LANES {
        return row_sum(&|i: usize| [values[i]], n)[0];
    }
    let vectors = n / LANES;
    let load = |i: usize| -> [f32; LANES] {
        let mut v = [0.0f32; LANES];
        v.copy_from_slice(&values[i * LANES..(i + 1) * LANES]);
        v
    };
    let lanes = row_sum(&load, vectors);
    let mut total = 0.0f32;
    for &v in &values[vectors * LANES..] {
        total += v;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// PyTorch's `at::internal::GRAIN_SIZE`: reductions below it always run on one thread.
const TORCH_GRAIN_SIZE: usize = 32768;

/// `torch.Tensor.mean()` of a contiguous `f32` vector on the CPU with AVX2, as PyTorch computes
/// it with a single thread: its cascade sum (`SumKernel.cpp`) divided by the count.
///
/// ```
/// use quant_core::nf4::torch_cpu_mean_f32;
/// assert_eq!(torch_cpu_mean_f32(&[1.0, 2.0, 6.0]), 3.0);
/// ```
pub fn torch_cpu_mean_f32(values: &[f32]) -> f32 {
    torch_cpu_mean_f32_threads(values, 1)
}

/// `torch.Tensor.mean()` as PyTorch computes it with `torch_threads` intra-op threads.
///
/// From 32768 elements on (PyTorch's `GRAIN_SIZE`), PyTorch cuts the vector into
/// `min(threads, ceil(n / 32768))` equal chunks, cascade-sums each into a per-thread slot and
/// cascade-sums the `threads` slots, so the last bit of the mean depends on the thread count
/// the reference ran with (`torch.get_num_threads()`). Below that, every thread count gives
/// the single-thread result.
///
/// ```
/// use quant_core::nf4::torch_cpu_mean_f32_threads;
/// let v: Vec<f32> = (0..100_000).map(|i| (i % 977) as f32 * 0.001).collect();
/// let one = torch_cpu_mean_f32_threads(&v, 1);
/// let two = torch_cpu_mean_f32_threads(&v, 2);
/// assert!((one - two).abs() <= 1e-6 * one);
/// ```
pub fn torch_cpu_mean_f32_threads(values: &[f32], torch_threads: usize) -> f32 {
    let n = values.len();
    let threads = torch_threads.max(1);
    let sum = if n < TORCH_GRAIN_SIZE || threads == 1 {
        cascade_sum(values)
    } else {
        let used = threads.min(n.div_ceil(TORCH_GRAIN_SIZE));
        let chunk = n.div_ceil(used);
        let mut slots = vec![0.0f32; threads];
        for (slot, part) in slots.iter_mut().zip(values.chunks(chunk)) {
            *slot = cascade_sum(part);
        }
        cascade_sum(&slots)
    };
    sum / n as f32
}

/// Index of the entry of the sorted `map` nearest to `x`, ties to the lower index — what
/// `torch.argmin(|x − map|)` picks.
#[cfg(test)]
fn nearest_in_sorted_map(map: &[f32; DYNAMIC_MAP_LEN], x: f32) -> u8 {
    let mut out = [0u8; 1];
    nearest_batch(map, &[x], &mut out);
    out[0]
}

/// [`nearest_in_sorted_map`] for a batch of up to `NEAREST_BATCH` values. The binary searches
/// of the batch run in lock-step, so their dependent loads overlap instead of queueing.
const NEAREST_BATCH: usize = 8;

#[inline]
fn nearest_batch(map: &[f32; DYNAMIC_MAP_LEN], xs: &[f32], out: &mut [u8]) {
    debug_assert!(xs.len() <= NEAREST_BATCH && out.len() == xs.len());
    // count[j] = number of map entries <= xs[j], capped at 255 (binary lifting, branch-free).
    let mut count = [0usize; NEAREST_BATCH];
    let mut step = DYNAMIC_MAP_LEN / 2;
    while step > 0 {
        for (c, &x) in count.iter_mut().zip(xs) {
            *c += step * usize::from(map[*c + step - 1] <= x);
        }
        step /= 2;
    }
    for ((o, &c), &x) in out.iter_mut().zip(&count).zip(xs) {
        // The nearest entry is the last one <= x or the first one above it.
        let mut best = c.saturating_sub(1);
        if (x - map[c]).abs() < (x - map[best]).abs() {
            best = c;
        }
        // Equal rounded distances further left would win argmin's first-index rule.
        while best > 0 && (x - map[best - 1]).abs() == (x - map[best]).abs() {
            best -= 1;
        }
        *o = best as u8;
    }
}

/// bitsandbytes' `quantize_blockwise` with a sorted 8-bit `map`: per block of `blocksize` the
/// absmax, then each `x·(1/absmax)` clamped to `[-1, 1]` to its nearest map entry.
/// Returns `(codes, block_absmax)`. An all-zero block gets absmax 0 and the code of 0.
pub(crate) fn quantize_blockwise_8bit(
    values: &[f32],
    map: &[f32; DYNAMIC_MAP_LEN],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let absmax: Vec<f32> = values
        .par_chunks(blocksize)
        .map(|block| block.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect();
    let mut codes = vec![0u8; values.len()];
    codes
        .par_chunks_mut(blocksize)
        .zip(values.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .for_each(|((out, block), &amax)| {
            let inv = if amax > 0.0 { 1.0 / amax } else { 0.0 };
            for (o, v) in out
                .chunks_mut(NEAREST_BATCH)
                .zip(block.chunks(NEAREST_BATCH))
            {
                let mut scaled = [0.0f32; NEAREST_BATCH];
                for (s, &x) in scaled.iter_mut().zip(v) {
                    *s = (x * inv).clamp(-1.0, 1.0);
                }
                nearest_batch(map, &scaled[..v.len()], o);
            }
        });
    (codes, absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends() {
        let l = torch_linspace_f32(0.1, 1.0, 9);
        assert_eq!(l[0], 0.1);
        assert_eq!(l[8], 1.0);
    }

    #[test]
    fn mean_of_small_and_odd_lengths() {
        assert_eq!(torch_cpu_mean_f32(&[2.0]), 2.0);
        assert_eq!(torch_cpu_mean_f32(&[1.0, 2.0, 3.0]), 2.0);
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_cpu_mean_f32(&v), 499.5);
    }

    #[test]
    fn batched_search_equals_exhaustive_argmin() {
        let map: Vec<f32> = bnb_dynamic_map_signed();
        let map: [f32; DYNAMIC_MAP_LEN] = map.try_into().unwrap();
        let mut probes: Vec<f32> = map.to_vec();
        for w in map.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            probes.extend([
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits().wrapping_sub(1)),
            ]);
        }
        probes.extend((0..2001).map(|i| i as f32 / 1000.0 - 1.0));
        for &x in &probes {
            let x = x.clamp(-1.0, 1.0);
            let mut best = 0;
            for (k, &v) in map.iter().enumerate() {
                if (x - v).abs() < (x - map[best]).abs() {
                    best = k;
                }
            }
            assert_eq!(nearest_in_sorted_map(&map, x) as usize, best, "x = {x}");
        }
    }

    #[test]
    fn threaded_mean_splits_like_torch() {
        let small: Vec<f32> = (0..TORCH_GRAIN_SIZE - 1)
            .map(|i| (i % 97) as f32 * 0.013)
            .collect();
        for threads in [1, 2, 3, 16] {
            assert_eq!(
                torch_cpu_mean_f32_threads(&small, threads).to_bits(),
                torch_cpu_mean_f32(&small).to_bits()
            );
        }
        // 8 threads, but ceil(120000 / 32768) = 4 chunks of 30000; the unused slots stay 0.
        let big: Vec<f32> = (0..120_000).map(|i| (i % 1013) as f32 * 0.0071).collect();
        let parts: Vec<f32> = big.chunks(30_000).map(cascade_sum).collect();
        let slots = [parts[0], parts[1], parts[2], parts[3], 0.0, 0.0, 0.0, 0.0];
        let want = cascade_sum(&slots) / 120_000.0;
        assert_eq!(
            torch_cpu_mean_f32_threads(&big, 8).to_bits(),
            want.to_bits()
        );
    }

    #[test]
    fn nearest_prefers_lower_on_ties() {
        let map: [f32; DYNAMIC_MAP_LEN] = std::array::from_fn(|i| i as f32 - 128.0);
        assert_eq!(nearest_in_sorted_map(&map, 0.5), 128);
        assert_eq!(nearest_in_sorted_map(&map, 0.6), 129);
        assert_eq!(nearest_in_sorted_map(&map, -0.5), 127);
        assert_eq!(nearest_in_sorted_map(&map, -200.0), 0);
        assert_eq!(nearest_in_sorted_map(&map, 200.0), 255);
        assert_eq!(nearest_in_sorted_map(&map, 127.0), 255);
        assert_eq!(nearest_in_sorted_map(&map, -128.0), 0);
    }
}
