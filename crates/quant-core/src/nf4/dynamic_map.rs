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

/// Number of bins of bitsandbytes' CPU code lookup table.
const LUT_BINS: usize = 65536;

/// bitsandbytes' CPU lookup table (`build_quantize_lut` in `csrc/cpu_ops.cpp`, 0.50): the
/// interval `[-1, 1]` is cut into 65536 evenly spaced sample points
/// `v_i = −1 + (2·i)/65535` (`f32`), and bin `i` holds the index of the map entry nearest to
/// `v_i` (the number of the 255 midpoints `(map[k] + map[k+1])·0.5` strictly below `v_i`, so
/// a sample exactly on a midpoint goes to the lower entry).
///
/// Why not simply the nearest entry: a value is first rounded to its bin (see
/// [`lut_bin`]) and then coded as the bin's sample point, so a value within half a bin
/// (`1/65535`) of a midpoint can get the entry on the other side — this is why bitsandbytes'
/// 8-bit codes are "not always the nearest" map entry. Near zero the map's entries are closer
/// together than a bin (the smallest are ±1e-6·0.55), so several entries are never chosen.
fn build_lut(map: &[f32; DYNAMIC_MAP_LEN]) -> Vec<u8> {
    let midpoints: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = vec![0u8; LUT_BINS];
    let mut code = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        // `-1.0f + (2.0f * i) / (kLUTSize - 1)`, every operation in f32 (no contraction:
        // a division cannot fuse).
        let sample = -1.0f32 + (2.0f32 * i as f32) / (LUT_BINS - 1) as f32;
        while code < DYNAMIC_MAP_LEN - 1 && midpoints[code] < sample {
            code += 1;
        }
        *slot = code as u8;
    }
    lut
}

/// The LUT bin of a scaled value: `uint16((clamp(v, −1, 1) + 1)·0.5·65535 + 0.5)` in `f32`,
/// operation by operation as written in `norm_to_lut_index` (bitsandbytes is compiled as ISO
/// C++17, where GCC does not contract `a·b + c` into a fused multiply-add), truncated toward
/// zero by the integer conversion.
#[inline]
fn lut_bin(scaled: f32) -> usize {
    let v = scaled.clamp(-1.0, 1.0);
    let position = (v + 1.0) * 0.5 * (LUT_BINS - 1) as f32 + 0.5;
    // `as usize` truncates like C's float-to-integer conversion; the range is [0.5, 65535.5].
    (position as usize).min(LUT_BINS - 1)
}

/// bitsandbytes' `quantize_blockwise` on the CPU (`quantize_cpu_impl`) with an 8-bit `map`:
/// per block of `blocksize` the absmax, then each `x·(1/absmax)` through the lookup table
/// ([`build_lut`], [`lut_bin`]). Returns `(codes, block_absmax)`. An all-zero block gets
/// absmax 0 and code 0 for every value (bitsandbytes writes 0 there; it decodes to 0 since
/// the block's absmax is 0).
pub(crate) fn quantize_blockwise_8bit(
    values: &[f32],
    map: &[f32; DYNAMIC_MAP_LEN],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let lut = build_lut(map);
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
            if amax == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0 / amax;
            for (o, &x) in out.iter_mut().zip(block) {
                *o = lut[lut_bin(x * inv)];
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

    /// The LUT's code for each bin is the map entry nearest to the bin's sample point.
    #[test]
    fn lut_bins_hold_the_entry_nearest_their_sample_point() {
        let map: [f32; DYNAMIC_MAP_LEN] = bnb_dynamic_map_signed().try_into().unwrap();
        let lut = build_lut(&map);
        for i in (0..LUT_BINS).step_by(7).chain([0, LUT_BINS - 1]) {
            let sample = -1.0f32 + (2.0f32 * i as f32) / (LUT_BINS - 1) as f32;
            let mut best = 0;
            for (k, &v) in map.iter().enumerate() {
                if (sample - v).abs() < (sample - map[best]).abs() {
                    best = k;
                }
            }
            let got = lut[i] as usize;
            // Equidistant entries (ties) go to the lower one in both rules; the f32 midpoint
            // can differ from the exact one by an ulp, so accept either side of an exact tie.
            assert!(
                got == best
                    || (sample - map[got]).abs() == (sample - map[best]).abs()
                    || (sample - 0.5 * (map[got.min(best)] + map[got.max(best)])).abs() == 0.0,
                "bin {i}: sample {sample}, lut {got}, nearest {best}"
            );
        }
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT_BINS - 1], 255);
    }

    /// A value just past a midpoint, but in a bin whose sample point is before it, gets the
    /// lower entry: the rule that makes bitsandbytes' code not the nearest one.
    #[test]
    fn a_value_takes_its_bins_code_not_its_nearest_entry() {
        let map: [f32; DYNAMIC_MAP_LEN] = bnb_dynamic_map_signed().try_into().unwrap();
        let lut = build_lut(&map);
        let mut differing = 0;
        for k in 128..254 {
            let mid = 0.5 * (map[k] + map[k + 1]);
            let above = f32::from_bits(mid.to_bits() + 64);
            let (codes, _) = quantize_blockwise_8bit(&[above, 1.0], &map, 2);
            let bin = lut_bin(above);
            assert_eq!(codes[0], lut[bin], "k = {k}");
            if codes[0] as usize == k {
                differing += 1;
            }
        }
        assert!(
            differing > 0,
            "some values just above a midpoint keep the lower code"
        );
        // Clamping and the ends.
        assert_eq!(lut_bin(-3.0), 0);
        assert_eq!(lut_bin(3.0), LUT_BINS - 1);
        assert_eq!(quantize_blockwise_8bit(&[0.0, 0.0], &map, 2).0, vec![0, 0]);
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
}
