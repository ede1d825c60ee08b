//! The fast Walsh–Hadamard transform and the randomized Hadamard rotation used for
//! incoherence processing (QuIP#, QuaRot, SpinQuant-style).
//!
//! * [`fwht`] transforms one power-of-two-length vector in place with the orthonormal
//!   Sylvester–Hadamard matrix `H/√n` in `O(n log n)`, without allocating.
//! * [`fwht_rows`] does the same for every row of a matrix, across threads when the matrix is
//!   large.
//! * [`HadamardRotation`] is an orthogonal `R = H·D` for **any** `n ≥ 1`: `D` holds random
//!   ±1 signs drawn from a caller-given seed, and `H` is the orthonormal Hadamard matrix when
//!   `n` is a power of two. For other `n` see [`HadamardRotation`] for how `H` is built.
//!
//! Rotating the input dimension of a linear layer leaves its output unchanged:
//! `x·Wᵀ = (x·Rᵀ)·(W·Rᵀ)ᵀ` because `RᵀR = I`, while `W·Rᵀ` spreads a few large columns
//! (outliers) over all columns, which makes the weights far easier to quantize.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{QuantError, Result};

/// Below this many elements a batched transform stays on the calling thread: spawning rayon
/// tasks costs more than the transform itself.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// The butterflies of one contiguous block are all done before moving on, so that every
/// stage with a span below this length works on data that is still in L1 (16 KiB of f32).
const CACHE_BLOCK: usize = 4096;

/// Errors naming the first non-finite element, like [`crate::error::check_finite`], but with
/// an eight-lane accumulator so the common all-finite case vectorizes instead of running a
/// serial chain of dependent additions (that chain would cost more than the transform).
pub(crate) fn check_finite_fast(context: &str, values: &[f32]) -> Result<()> {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            // v·0 is 0 for every finite v and NaN for NaN or ±inf.
            *lane += v * 0.0;
        }
    }
    let mut tail = 0.0f32;
    for &v in chunks.remainder() {
        tail += v * 0.0;
    }
    if lanes.iter().all(|&l| l == 0.0) && tail == 0.0 {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            context: context.to_string(),
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// The unnormalized butterflies of the Sylvester–Hadamard transform; `x.len()` must be a
/// power of two (checked by callers).
fn butterflies(x: &mut [f32]) {
    let n = x.len();
    if n < 2 {
        return;
    }
    let block = n.min(CACHE_BLOCK);
    for chunk in x.chunks_exact_mut(block) {
        butterflies_from(chunk, 1);
    }
    // Stages whose span reaches across cache blocks.
    if block < n {
        butterflies_from(x, block);
    }
}

/// All stages with span `first_span, 2·first_span, …, len/2` on `x`.
fn butterflies_from(x: &mut [f32], first_span: usize) {
    let n = x.len();
    let mut span = first_span;
    if span == 1 && n >= 4 {
        // Spans 1 and 2 fused: a radix-4 step on groups of four, since a span-1 stage over
        // slices of length one would not vectorize.
        for g in x.chunks_exact_mut(4) {
            let (a, b, c, d) = (g[0], g[1], g[2], g[3]);
            let (s0, d0, s1, d1) = (a + b, a - b, c + d, c - d);
            g[0] = s0 + s1;
            g[1] = d0 + d1;
            g[2] = s0 - s1;
            g[3] = d0 - d1;
        }
        span = 4;
    }
    // Two stages per pass over memory where possible: half the loads and stores.
    while span * 4 <= n {
        radix4_stage(x, span);
        span *= 4;
    }
    if span < n {
        butterfly_stage(x, span);
    }
}

/// Stages `span` and `2·span` fused: on every group of `4·span` split into quarters
/// `(a, b, c, d)`, `(a, b, c, d) ← (a+b+c+d, a−b+c−d, a+b−c−d, a−b−c+d)` elementwise.
#[inline]
fn radix4_stage(x: &mut [f32], span: usize) {
    for group in x.chunks_exact_mut(4 * span) {
        let (first_half, second_half) = group.split_at_mut(2 * span);
        let (q0, q1) = first_half.split_at_mut(span);
        let (q2, q3) = second_half.split_at_mut(span);
        for (((a, b), c), d) in q0
            .iter_mut()
            .zip(q1.iter_mut())
            .zip(q2.iter_mut())
            .zip(q3.iter_mut())
        {
            let (sum_ab, diff_ab) = (*a + *b, *a - *b);
            let (sum_cd, diff_cd) = (*c + *d, *c - *d);
            *a = sum_ab + sum_cd;
            *b = diff_ab + diff_cd;
            *c = sum_ab - sum_cd;
            *d = diff_ab - diff_cd;
        }
    }
}

/// One stage: for every group of `2·span`, `(u, v) ← (u + v, u − v)` between its halves.
#[inline]
fn butterfly_stage(x: &mut [f32], span: usize) {
    for group in x.chunks_exact_mut(2 * span) {
        let (low, high) = group.split_at_mut(span);
        for (u, v) in low.iter_mut().zip(high.iter_mut()) {
            let (a, b) = (*u, *v);
            *u = a + b;
            *v = a - b;
        }
    }
}

/// `x ← (H/√n)·x` in place, without the length or finiteness checks.
fn fwht_unchecked(x: &mut [f32]) {
    butterflies(x);
    let n = x.len();
    if n > 1 {
        // 1/√n in f64 so that large n keep a correctly rounded scale.
        let scale = (1.0 / (n as f64).sqrt()) as f32;
        for v in x.iter_mut() {
            *v *= scale;
        }
    }
}

fn check_power_of_two(context: &str, n: usize) -> Result<()> {
    if n.is_power_of_two() {
        Ok(())
    } else {
        Err(QuantError::invalid(
            format!("{context} length"),
            n,
            "the Walsh–Hadamard transform needs a power-of-two length ≥ 1",
        ))
    }
}

/// The orthonormal fast Walsh–Hadamard transform in place: `x ← (H/√n)·x` with `H` the
/// Sylvester–Hadamard matrix (`H₁ = [1]`, `H₂ₖ = [[Hₖ, Hₖ], [Hₖ, −Hₖ]]`).
///
/// `O(n log n)`, no allocation. The transform is its own inverse (`H/√n` is symmetric and
/// orthogonal), so calling it twice gives `x` back up to rounding.
///
/// # Errors
/// [`QuantError::InvalidParameter`] when `x.len()` is not a power of two (including 0);
/// [`QuantError::NonFinite`] naming the first NaN or infinity (then `x` is left untouched).
///
/// ```
/// use quant_core::hadamard::fwht;
/// let mut x = [1.0f32, 0.0, 0.0, 0.0];
/// fwht(&mut x).unwrap();
/// assert_eq!(x, [0.5, 0.5, 0.5, 0.5]);
/// fwht(&mut x).unwrap();
/// assert_eq!(x, [1.0, 0.0, 0.0, 0.0]);
/// assert!(fwht(&mut [1.0f32, 2.0, 3.0]).is_err());
/// ```
pub fn fwht(x: &mut [f32]) -> Result<()> {
    check_power_of_two("fwht input", x.len())?;
    check_finite_fast("fwht input", x)?;
    fwht_unchecked(x);
    Ok(())
}

/// [`fwht`] applied to every row of `m` (shape `(rows, n)`, `n` a power of two), in place.
///
/// Rows are transformed in parallel with rayon once the matrix has at least 65 536 elements.
/// Rows that are not contiguous in memory are copied through a per-thread buffer.
///
/// # Errors
/// As [`fwht`]; a non-finite element is reported by its row-major flat index and `m` is left
/// untouched.
///
/// ```
/// use ndarray::array;
/// use quant_core::hadamard::fwht_rows;
/// let mut m = array![[1.0f32, 1.0], [1.0, -1.0]];
/// fwht_rows(m.view_mut()).unwrap();
/// let s = 2.0f32.sqrt();
/// assert!((m[[0, 0]] - s).abs() < 1e-6 && m[[0, 1]].abs() < 1e-6);
/// assert!(m[[1, 0]].abs() < 1e-6 && (m[[1, 1]] - s).abs() < 1e-6);
/// ```
pub fn fwht_rows(mut m: ArrayViewMut2<'_, f32>) -> Result<()> {
    let (rows, n) = m.dim();
    check_power_of_two("fwht_rows row", n)?;
    check_finite_matrix("fwht_rows input", m.view())?;
    if rows == 0 {
        return Ok(());
    }
    for_each_row(m.view_mut(), fwht_unchecked);
    Ok(())
}

/// Errors naming the first non-finite element of `m` by its row-major flat index.
pub(crate) fn check_finite_matrix(context: &str, m: ArrayView2<'_, f32>) -> Result<()> {
    if let Some(slice) = m.as_slice() {
        return check_finite_fast(context, slice);
    }
    let cols = m.ncols();
    for (r, row) in m.outer_iter().enumerate() {
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                context: context.to_string(),
                index: r * cols + c,
                value: row[c],
            });
        }
    }
    Ok(())
}

/// Runs `f` on every row of `m` as a contiguous slice, in parallel when `m` is large.
fn for_each_row<F>(mut m: ArrayViewMut2<'_, f32>, f: F)
where
    F: Fn(&mut [f32]) + Sync,
{
    let (rows, n) = m.dim();
    let parallel = rows > 1 && rows.saturating_mul(n) >= PARALLEL_MIN_ELEMENTS;
    if let Some(data) = m.as_slice_mut() {
        if n == 0 {
            return;
        }
        if parallel {
            data.par_chunks_exact_mut(n).for_each(&f);
        } else {
            data.chunks_exact_mut(n).for_each(&f);
        }
        return;
    }
    let run_row = |buffer: &mut Vec<f32>, mut row: ndarray::ArrayViewMut1<'_, f32>| {
        if let Some(slice) = row.as_slice_mut() {
            f(slice);
        } else {
            buffer.clear();
            buffer.extend(row.iter());
            f(buffer);
            row.iter_mut().zip(buffer.iter()).for_each(|(d, &s)| *d = s);
        }
    };
    if parallel {
        m.axis_iter_mut(Axis(0))
            .into_par_iter()
            .for_each_init(Vec::new, |buffer, row| run_row(buffer, row));
    } else {
        let mut buffer = Vec::new();
        for row in m.axis_iter_mut(Axis(0)) {
            run_row(&mut buffer, row);
        }
    }
}

/// The explicit orthonormal Sylvester–Hadamard matrix `H/√n` (`n` a power of two), mainly for
/// checking transforms against a materialised matrix. `O(n²)` memory.
///
/// ```
/// use quant_core::hadamard::hadamard_matrix;
/// let h = hadamard_matrix(2).unwrap();
/// let s = 0.5f32.sqrt();
/// assert_eq!(h, ndarray::array![[s, s], [s, -s]]);
/// ```
pub fn hadamard_matrix(n: usize) -> Result<Array2<f32>> {
    check_power_of_two("hadamard_matrix", n)?;
    let scale = (1.0 / (n as f64).sqrt()) as f32;
    // Entry (i, j) of the Sylvester matrix is (−1)^popcount(i & j).
    Ok(Array2::from_shape_fn((n, n), |(i, j)| {
        if (i & j).count_ones() % 2 == 0 {
            scale
        } else {
            -scale
        }
    }))
}

/// A seeded orthogonal rotation `R = H·D` of `Rⁿ` for any `n ≥ 1`.
///
/// `D = diag(±1)` with signs drawn from `ChaCha8Rng::seed_from_u64(seed)` (one
/// `random::<bool>()` per coordinate, in order), so the same `(n, seed)` always gives the
/// same rotation on every machine.
///
/// **How `H` is built.** With `p` the largest power of two `≤ n`:
/// * `n = p`: `H` is the orthonormal Hadamard matrix `Hₚ/√p`;
/// * otherwise `H = (I₍ₙ₋ₚ₎ ⊕ Hₚ)·D₂·(Hₚ ⊕ I₍ₙ₋ₚ₎)`: a Hadamard transform of the first `p`
///   coordinates, a second random sign flip `D₂` (drawn after `D`'s signs from the same
///   generator), then a Hadamard transform of the last `p`. The transform factors are
///   block-diagonal with power-of-two Hadamard blocks, so `H` is orthogonal and its inverse
///   is the transposed factors in reverse order.
///
/// Why two overlapping windows rather than one block-diagonal matrix: splitting `n` into its
/// binary decomposition `2ᵃ + 2ᵇ + …` (or into equal blocks of its largest power-of-two
/// divisor) leaves small blocks — for odd `n` a block of size 1, i.e. a coordinate that is
/// never mixed, so an outlier there is not spread at all. Since `p > n/2` the two windows
/// overlap and cover every coordinate, so each coordinate is mixed with at least `p` others,
/// at twice the cost of a single transform (still `O(n log n)`). `D₂` is needed because a
/// Walsh function cut to half its support is again a Walsh function: without it, the second
/// transform re-concentrates much of what the first one spread (measured: max/rms of an
/// outlier-heavy 384-column matrix only halved, instead of dropping to Gaussian levels).
///
/// **Serialization.** Serde stores only `{"dim": n, "seed": s}`; deserializing re-draws the
/// signs, which the seed determines, so a checkpoint stays small and the rotation exact.
///
/// ```
/// use quant_core::hadamard::HadamardRotation;
/// let rotation = HadamardRotation::new(6, 42).unwrap();
/// let original = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0];
/// let mut x = original;
/// rotation.apply(&mut x).unwrap();
/// let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
/// assert!((norm(&x) - norm(&original)).abs() < 1e-5);
/// rotation.apply_inverse(&mut x).unwrap();
/// for (a, b) in x.iter().zip(original.iter()) {
///     assert!((a - b).abs() < 1e-5);
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RotationSpec", into = "RotationSpec")]
pub struct HadamardRotation {
    dim: usize,
    seed: u64,
    /// The diagonal of `D`, ±1.
    signs: Vec<f32>,
    /// The diagonal of `D₂` on the overlap-mixing step, ±1; empty when `dim` is a power of two.
    middle_signs: Vec<f32>,
    /// Largest power of two `≤ dim`: the Hadamard window length.
    window: usize,
}

/// What a [`HadamardRotation`] is serialized as: everything else follows from it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationSpec {
    dim: usize,
    seed: u64,
}

impl From<HadamardRotation> for RotationSpec {
    fn from(rotation: HadamardRotation) -> Self {
        Self {
            dim: rotation.dim,
            seed: rotation.seed,
        }
    }
}

impl TryFrom<RotationSpec> for HadamardRotation {
    type Error = QuantError;

    fn try_from(spec: RotationSpec) -> Result<Self> {
        Self::new(spec.dim, spec.seed)
    }
}

impl HadamardRotation {
    /// The rotation of `Rⁿ` for `n = dim` and the given seed.
    ///
    /// # Errors
    /// [`QuantError::InvalidParameter`] when `dim == 0`.
    pub fn new(dim: usize, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(QuantError::invalid(
                "HadamardRotation dim",
                dim,
                "a rotation needs at least one coordinate",
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw_signs = |count: usize| -> Vec<f32> {
            (0..count)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect()
        };
        let signs = draw_signs(dim);
        // Largest power of two ≤ dim: the top set bit.
        let window = 1usize << (usize::BITS - 1 - dim.leading_zeros());
        let middle_signs = if window == dim {
            Vec::new()
        } else {
            draw_signs(dim)
        };
        Ok(Self {
            dim,
            seed,
            signs,
            middle_signs,
            window,
        })
    }

    /// The dimension `n` this rotation acts on.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The seed the signs were drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The diagonal of `D` (each entry ±1).
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    fn check_len(&self, context: &str, len: usize) -> Result<()> {
        if len == self.dim {
            Ok(())
        } else {
            Err(QuantError::shape(
                context,
                format!("length {}", self.dim),
                format!("length {len}"),
            ))
        }
    }

    /// `x ← R·x` with no checks; `x.len() == self.dim`.
    fn apply_unchecked(&self, x: &mut [f32]) {
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
        let p = self.window;
        fwht_unchecked(&mut x[..p]);
        if p != self.dim {
            for (v, s) in x.iter_mut().zip(&self.middle_signs) {
                *v *= s;
            }
            fwht_unchecked(&mut x[self.dim - p..]);
        }
    }

    /// `x ← Rᵀ·x = R⁻¹·x` with no checks: the factors of `R` transposed, in reverse order.
    fn apply_inverse_unchecked(&self, x: &mut [f32]) {
        let p = self.window;
        if p != self.dim {
            fwht_unchecked(&mut x[self.dim - p..]);
            for (v, s) in x.iter_mut().zip(&self.middle_signs) {
                *v *= s;
            }
        }
        fwht_unchecked(&mut x[..p]);
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
    }

    /// `x ← R·x` in place.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when `x.len() != self.dim()`; [`QuantError::NonFinite`]
    /// naming the first NaN or infinity (then `x` is left untouched).
    pub fn apply(&self, x: &mut [f32]) -> Result<()> {
        self.check_len("HadamardRotation::apply", x.len())?;
        check_finite_fast("HadamardRotation::apply input", x)?;
        self.apply_unchecked(x);
        Ok(())
    }

    /// `x ← Rᵀ·x` in place, the exact inverse of [`Self::apply`].
    ///
    /// # Errors
    /// As [`Self::apply`].
    pub fn apply_inverse(&self, x: &mut [f32]) -> Result<()> {
        self.check_len("HadamardRotation::apply_inverse", x.len())?;
        check_finite_fast("HadamardRotation::apply_inverse input", x)?;
        self.apply_inverse_unchecked(x);
        Ok(())
    }

    /// Every row `r` of `m` becomes `R·r`, i.e. `m ← m·Rᵀ`, in place.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when `m.ncols() != self.dim()`; [`QuantError::NonFinite`]
    /// naming the first bad element by its row-major flat index (then `m` is untouched).
    pub fn apply_rows(&self, m: ArrayViewMut2<'_, f32>) -> Result<()> {
        self.check_len("HadamardRotation::apply_rows (row length)", m.ncols())?;
        check_finite_matrix("HadamardRotation::apply_rows input", m.view())?;
        for_each_row(m, |row| self.apply_unchecked(row));
        Ok(())
    }

    /// Every row `r` of `m` becomes `Rᵀ·r`, i.e. `m ← m·R`, in place: the inverse of
    /// [`Self::apply_rows`].
    ///
    /// # Errors
    /// As [`Self::apply_rows`].
    pub fn apply_inverse_rows(&self, m: ArrayViewMut2<'_, f32>) -> Result<()> {
        self.check_len(
            "HadamardRotation::apply_inverse_rows (row length)",
            m.ncols(),
        )?;
        check_finite_matrix("HadamardRotation::apply_inverse_rows input", m.view())?;
        for_each_row(m, |row| self.apply_inverse_unchecked(row));
        Ok(())
    }

    /// `W·Rᵀ` for a weight `w` of shape `(out, in)` with `in = self.dim()`: the weight to use
    /// with rotated activations ([`Self::rotate_activations`]), since
    /// `x·Wᵀ = (x·Rᵀ)·(W·Rᵀ)ᵀ`.
    ///
    /// # Errors
    /// As [`Self::apply_rows`].
    ///
    /// ```
    /// use ndarray::array;
    /// use quant_core::hadamard::HadamardRotation;
    /// use quant_core::linalg::gemm;
    /// let rotation = HadamardRotation::new(3, 7).unwrap();
    /// let w = array![[1.0f32, 2.0, 3.0], [0.0, -1.0, 5.0]]; // (out=2, in=3)
    /// let x = array![[0.5f32, 1.0, -1.0]];                  // (tokens=1, in=3)
    /// let (w_rot, x_rot) = (rotation.rotate_input(w.view()).unwrap(),
    ///                       rotation.rotate_activations(x.view()).unwrap());
    /// let mut y = ndarray::Array2::zeros((1, 2));
    /// let mut y_rot = ndarray::Array2::zeros((1, 2));
    /// gemm(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap();
    /// gemm(1.0, x_rot.view(), w_rot.t(), 0.0, y_rot.view_mut()).unwrap();
    /// assert!((&y - &y_rot).iter().all(|d| d.abs() < 1e-5));
    /// ```
    pub fn rotate_input(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let mut out = w.as_standard_layout().into_owned();
        self.apply_rows(out.view_mut())?;
        Ok(out)
    }

    /// `W·R`: undoes [`Self::rotate_input`].
    ///
    /// # Errors
    /// As [`Self::apply_rows`].
    pub fn unrotate_input(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let mut out = w.as_standard_layout().into_owned();
        self.apply_inverse_rows(out.view_mut())?;
        Ok(out)
    }

    /// `x·Rᵀ` for activations `x` of shape `(tokens, in)`: what a layer whose weight went
    /// through [`Self::rotate_input`] must be fed.
    ///
    /// # Errors
    /// As [`Self::apply_rows`].
    pub fn rotate_activations(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.rotate_input(x)
    }

    /// `x·R`: undoes [`Self::rotate_activations`].
    ///
    /// # Errors
    /// As [`Self::apply_rows`].
    pub fn unrotate_activations(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.unrotate_input(x)
    }

    /// `R·W` for a weight `w` of shape `(out, in)` with `out = self.dim()`: rotates the output
    /// dimension (every column). A layer computing with `R·W` produces `y·Rᵀ` instead of
    /// `y = x·Wᵀ`; [`Self::unrotate_activations`] on that output gives `y` back.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when `w.nrows() != self.dim()`; [`QuantError::NonFinite`]
    /// naming the first bad element by its row-major flat index.
    ///
    /// ```
    /// use ndarray::array;
    /// use quant_core::hadamard::HadamardRotation;
    /// let rotation = HadamardRotation::new(2, 1).unwrap();
    /// let w = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
    /// let back = rotation.unrotate_output(rotation.rotate_output(w.view()).unwrap().view()).unwrap();
    /// assert!((&back - &w).iter().all(|d| d.abs() < 1e-5));
    /// ```
    pub fn rotate_output(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.columns_through(w, "HadamardRotation::rotate_output", false)
    }

    /// `Rᵀ·W`: undoes [`Self::rotate_output`].
    ///
    /// # Errors
    /// As [`Self::rotate_output`].
    pub fn unrotate_output(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.columns_through(w, "HadamardRotation::unrotate_output", true)
    }

    /// Applies `R` (or `Rᵀ`) to every column of `w` by transforming the rows of `wᵀ`, so the
    /// butterflies run over contiguous memory.
    fn columns_through(
        &self,
        w: ArrayView2<'_, f32>,
        context: &str,
        inverse: bool,
    ) -> Result<Array2<f32>> {
        self.check_len(&format!("{context} (row count)"), w.nrows())?;
        check_finite_matrix(&format!("{context} input"), w)?;
        let mut transposed = w.t().as_standard_layout().into_owned();
        if inverse {
            for_each_row(transposed.view_mut(), |col| {
                self.apply_inverse_unchecked(col)
            });
        } else {
            for_each_row(transposed.view_mut(), |col| self.apply_unchecked(col));
        }
        Ok(transposed.t().as_standard_layout().into_owned())
    }

    /// The explicit `n×n` matrix `R` (column `j` is `R·eⱼ`), for checks on small sizes.
    /// `O(n²)` memory.
    ///
    /// ```
    /// use quant_core::hadamard::HadamardRotation;
    /// let r = HadamardRotation::new(5, 3).unwrap().to_matrix();
    /// let rrt = r.dot(&r.t());
    /// for i in 0..5 {
    ///     for j in 0..5 {
    ///         let expected = if i == j { 1.0 } else { 0.0 };
    ///         assert!((rrt[[i, j]] - expected).abs() < 1e-5);
    ///     }
    /// }
    /// ```
    pub fn to_matrix(&self) -> Array2<f32> {
        // Rows of the identity through R give Rᵀ (row i ↦ R·eᵢ); transpose for R.
        let mut identity = Array2::<f32>::eye(self.dim);
        for_each_row(identity.view_mut(), |row| self.apply_unchecked(row));
        identity.reversed_axes().as_standard_layout().into_owned()
    }
}
