//! The parameter-free pieces of the decoder layer and RMSNorm, each with an explicit forward
//! and backward: RMSNorm, rotary embeddings, causal grouped-query attention and SwiGLU.
//!
//! Activations are row-major `(tokens, features)` matrices with `tokens = batch·seq` (row
//! `b·seq + t`); heads are contiguous column blocks of `head_dim`, so a head of a batch row is
//! a strided view and every product goes to `quant_core::linalg::gemm` without copies.

use ndarray::{s, Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use quant_core::linalg::gemm;
use rayon::prelude::*;

use crate::error::{LmError, Result};

/// `y = x·rsqrt(mean(x²) + eps)·w` per row, in `f32` as transformers' `LlamaRMSNorm`;
/// writes the per-row `rsqrt(mean(x²) + eps)` into `rstd` for the backward pass.
///
/// ```
/// use lm::layers::rms_norm_forward;
/// use ndarray::{array, Array2};
/// let x = array![[3.0f32, 4.0]];
/// let mut y = Array2::zeros((1, 2));
/// let mut rstd = [0.0f32];
/// rms_norm_forward(x.view(), array![1.0f32, 2.0].view(), 0.0, y.view_mut(), &mut rstd).unwrap();
/// let r = 1.0 / 12.5f32.sqrt();
/// assert!((y[[0, 1]] - 8.0 * r).abs() < 1e-6);
/// ```
pub fn rms_norm_forward(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    eps: f32,
    mut out: ArrayViewMut2<'_, f32>,
    rstd: &mut [f32],
) -> Result<()> {
    let (rows, dim) = x.dim();
    if weight.len() != dim || out.dim() != (rows, dim) || rstd.len() != rows {
        return Err(LmError::shape(
            "rms_norm_forward (x, weight, out, rstd)",
            format!("x {rows}×{dim}, weight {dim}, out {rows}×{dim}, rstd {rows}"),
            format!(
                "weight {}, out {}×{}, rstd {}",
                weight.len(),
                out.nrows(),
                out.ncols(),
                rstd.len()
            ),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter_mut())
        .for_each(|((mut y, xr), r)| {
            let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            *r = 1.0 / (mean_sq + eps).sqrt();
            for ((yv, &xv), &wv) in y.iter_mut().zip(xr.iter()).zip(weight.iter()) {
                *yv = wv * (xv * *r);
            }
        });
    Ok(())
}

/// Recomputes [`rms_norm_forward`]'s output from its input and saved `rstd` (bit-identical),
/// so a backward pass need not keep the normalised activations.
///
/// ```
/// use lm::layers::{rms_norm_apply, rms_norm_forward};
/// use ndarray::{array, Array2};
/// let (x, w) = (array![[1.0f32, -2.0, 0.5]], array![0.9f32, 1.1, 1.0]);
/// let (mut y, mut again) = (Array2::zeros((1, 3)), Array2::zeros((1, 3)));
/// let mut rstd = [0.0f32];
/// rms_norm_forward(x.view(), w.view(), 1e-6, y.view_mut(), &mut rstd).unwrap();
/// rms_norm_apply(x.view(), w.view(), &rstd, again.view_mut()).unwrap();
/// assert_eq!(y, again);
/// ```
pub fn rms_norm_apply(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    rstd: &[f32],
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (rows, dim) = x.dim();
    if weight.len() != dim || out.dim() != (rows, dim) || rstd.len() != rows {
        return Err(LmError::shape(
            "rms_norm_apply (x, weight, rstd, out)",
            format!("x {rows}×{dim}, weight {dim}, rstd {rows}, out {rows}×{dim}"),
            format!(
                "weight {}, rstd {}, out {}×{}",
                weight.len(),
                rstd.len(),
                out.nrows(),
                out.ncols()
            ),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter())
        .for_each(|((mut y, xr), &r)| {
            for ((yv, &xv), &wv) in y.iter_mut().zip(xr.iter()).zip(weight.iter()) {
                *yv = wv * (xv * r);
            }
        });
    Ok(())
}

/// Backward of [`rms_norm_forward`]: **adds** `∂L/∂x` into `grad_input` (the residual stream's
/// gradient is already there) and adds `∂L/∂w` into `grad_weight` when given.
///
/// With `g = dy⊙w` and `r = rstd`: `dx = r·g − x·r³·mean(g⊙x)`, `dw = Σ_rows dy⊙x·r`.
pub fn rms_norm_backward(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    rstd: &[f32],
    grad_output: ArrayView2<'_, f32>,
    mut grad_input: ArrayViewMut2<'_, f32>,
    grad_weight: Option<ArrayViewMut1<'_, f32>>,
) -> Result<()> {
    let (rows, dim) = x.dim();
    if weight.len() != dim
        || rstd.len() != rows
        || grad_output.dim() != (rows, dim)
        || grad_input.dim() != (rows, dim)
    {
        return Err(LmError::shape(
            "rms_norm_backward (x, weight, rstd, grad_output, grad_input)",
            format!("x {rows}×{dim}, weight {dim}, rstd {rows}, grads {rows}×{dim}"),
            format!(
                "weight {}, rstd {}, grad_output {:?}, grad_input {:?}",
                weight.len(),
                rstd.len(),
                grad_output.dim(),
                grad_input.dim()
            ),
        ));
    }
    grad_input
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(grad_output.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter())
        .for_each(|(((mut dx, xr), dy), &r)| {
            let dot: f32 = dy
                .iter()
                .zip(weight.iter())
                .zip(xr.iter())
                .map(|((d, w), xv)| d * w * xv)
                .sum();
            let coef = r * r * r * dot / dim as f32;
            for (((dxv, &dyv), &wv), &xv) in dx
                .iter_mut()
                .zip(dy.iter())
                .zip(weight.iter())
                .zip(xr.iter())
            {
                *dxv += r * dyv * wv - coef * xv;
            }
        });
    if let Some(mut gw) = grad_weight {
        if gw.len() != dim {
            return Err(LmError::shape(
                "rms_norm_backward grad_weight",
                dim,
                gw.len(),
            ));
        }
        // Sequential over rows: a column sum shared by all rows cannot be split without a reduction.
        for ((xr, dy), &r) in x
            .axis_iter(Axis(0))
            .zip(grad_output.axis_iter(Axis(0)))
            .zip(rstd)
        {
            for ((g, &xv), &dyv) in gw.iter_mut().zip(xr.iter()).zip(dy.iter()) {
                *g += dyv * xv * r;
            }
        }
    }
    Ok(())
}

/// Cosines and sines of rotary embeddings for a run of positions, transformers' default RoPE:
/// `inv_freq[i] = 1/θ^(2i/d)`, angle = position·inv_freq, both halves of a head share them.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    head_dim: usize,
    first_position: usize,
    /// `(positions, head_dim/2)`.
    cos: Array2<f32>,
    sin: Array2<f32>,
}

impl RopeTable {
    /// The table for positions `first_position .. first_position + len`.
    ///
    /// ```
    /// use lm::layers::RopeTable;
    /// let table = RopeTable::new(10000.0, 4, 0, 3).unwrap();
    /// // Position 0 does not rotate.
    /// let mut x = ndarray::array![[1.0f32, 2.0, 3.0, 4.0]];
    /// table.apply(x.view_mut(), &[0], 1, false).unwrap();
    /// assert_eq!(x, ndarray::array![[1.0, 2.0, 3.0, 4.0]]);
    /// ```
    pub fn new(theta: f32, head_dim: usize, first_position: usize, len: usize) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(LmError::invalid(
                "head_dim",
                head_dim,
                "RoPE needs a positive even head_dim",
            ));
        }
        let half = head_dim / 2;
        // In f32 as transformers computes inv_freq and the angles (float32 pow and matmul).
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Array2::zeros((len, half));
        let mut sin = Array2::zeros((len, half));
        for p in 0..len {
            let pos = (first_position + p) as f32;
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = (pos * f) as f64;
                cos[[p, i]] = angle.cos() as f32;
                sin[[p, i]] = angle.sin() as f32;
            }
        }
        Ok(RopeTable {
            head_dim,
            first_position,
            cos,
            sin,
        })
    }

    /// Rotates every head of every row in place: `x·cos + rotate_half(x)·sin` (forward), or
    /// by the opposite angle (`inverse`, which is the backward pass: the rotation is orthogonal).
    /// `positions[r]` is the position of row `r`; `x` has `n_heads·head_dim` columns.
    pub fn apply(
        &self,
        mut x: ArrayViewMut2<'_, f32>,
        positions: &[usize],
        n_heads: usize,
        inverse: bool,
    ) -> Result<()> {
        let hd = self.head_dim;
        let half = hd / 2;
        if x.ncols() != n_heads * hd || positions.len() != x.nrows() {
            return Err(LmError::shape(
                "RoPE input (rows, n_heads·head_dim) and positions",
                format!("{} positions, {} columns", x.nrows(), n_heads * hd),
                format!("{} positions, {} columns", positions.len(), x.ncols()),
            ));
        }
        let table_len = self.cos.nrows();
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p < self.first_position || p - self.first_position >= table_len)
        {
            return Err(LmError::invalid(
                "position",
                p,
                format!(
                    "outside the RoPE table {}..{}",
                    self.first_position,
                    self.first_position + table_len
                ),
            ));
        }
        let sign = if inverse { -1.0f32 } else { 1.0 };
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(positions.par_iter())
            .for_each(|(mut row, &p)| {
                let cos = self.cos.row(p - self.first_position);
                let sin = self.sin.row(p - self.first_position);
                for h in 0..n_heads {
                    let mut head = row.slice_mut(s![h * hd..(h + 1) * hd]);
                    for i in 0..half {
                        let (c, sn) = (cos[i], sign * sin[i]);
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c - b * sn;
                        head[i + half] = b * c + a * sn;
                    }
                }
            });
        Ok(())
    }
}

/// The geometry of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn check(&self, what: &str, a: &ArrayView2<'_, f32>, heads: usize) -> Result<()> {
        let expected = (self.batch * self.seq, heads * self.head_dim);
        if a.dim() != expected {
            return Err(LmError::shape(
                format!("attention {what}"),
                format!("{}×{}", expected.0, expected.1),
                format!("{}×{}", a.nrows(), a.ncols()),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(LmError::invalid(
                "n_kv_heads",
                self.n_kv_heads,
                format!("must divide n_heads = {}", self.n_heads),
            ));
        }
        Ok(())
    }
}

/// Query rows per block in causal attention: a block only multiplies against the keys its
/// last row can see, which skips most of the masked upper triangle (about 3/8 of the work at
/// 256 positions) while keeping each product large enough for the GEMM kernel.
const QUERY_BLOCK: usize = 64;

/// One head of causal attention with the softmax probabilities written to `probs`.
///
/// Query row `i` sits at position `query_offset + i` and attends to keys `j <= query_offset + i`
/// whose `key_mask[j]` is true. A query with no visible key gets probability 0 everywhere and
/// a zero output (transformers' output there is unspecified; such rows carry no loss).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_head(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    key_mask: Option<&[bool]>,
    query_offset: usize,
    scale: f32,
    mut probs: ArrayViewMut2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (n_queries, n_keys) = (q.nrows(), k.nrows());
    for r0 in (0..n_queries).step_by(QUERY_BLOCK) {
        let r1 = (r0 + QUERY_BLOCK).min(n_queries);
        let key_end = (query_offset + r1).min(n_keys);
        let mut block = probs.slice_mut(s![r0..r1, ..]);
        block.slice_mut(s![.., key_end..]).fill(0.0);
        let mut scores = block.slice_mut(s![.., ..key_end]);
        gemm(
            scale,
            q.slice(s![r0..r1, ..]),
            k.slice(s![..key_end, ..]).t(),
            0.0,
            scores.view_mut(),
        )?;
        for (i, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
            let last_visible = query_offset + r0 + i;
            let visible = |j: usize| j <= last_visible && key_mask.is_none_or(|m| m[j]);
            let mut max = f32::NEG_INFINITY;
            for (j, &sv) in row.iter().enumerate() {
                if visible(j) && sv > max {
                    max = sv;
                }
            }
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let mut sum = 0.0f32;
            for (j, p) in row.iter_mut().enumerate() {
                *p = if visible(j) { (*p - max).exp() } else { 0.0 };
                sum += *p;
            }
            let inv = 1.0 / sum;
            row.mapv_inplace(|p| p * inv);
        }
        gemm(
            1.0,
            scores.view(),
            v.slice(s![..key_end, ..]),
            0.0,
            out.slice_mut(s![r0..r1, ..]),
        )?;
    }
    Ok(())
}

/// Splits a view into consecutive chunks of `size` along `axis` (the last may be shorter),
/// all borrowing from the original so they can go to different threads.
pub(crate) fn split_chunks<'a>(
    view: ArrayViewMut2<'a, f32>,
    axis: Axis,
    size: usize,
) -> Vec<ArrayViewMut2<'a, f32>> {
    let mut chunks = Vec::new();
    let mut rest = view;
    if size == 0 {
        return vec![rest];
    }
    while rest.len_of(axis) > size {
        let (head, tail) = rest.split_at(axis, size);
        chunks.push(head);
        rest = tail;
    }
    chunks.push(rest);
    chunks
}

/// Causal grouped-query attention over a batch.
///
/// `q: (batch·seq, n_heads·head_dim)`, `k`, `v: (batch·seq, n_kv_heads·head_dim)` (already
/// rotated), query head `h` uses key/value head `h / (n_heads / n_kv_heads)` as transformers'
/// `repeat_kv`. Scores are scaled by `1/√head_dim`. `key_mask` (one flag per row, false =
/// padding) hides padded keys. Writes softmax probabilities into `probs: (batch·n_heads, seq,
/// seq)` for the backward pass and the per-head outputs into `out: (batch·seq, n_heads·head_dim)`.
/// Runs (batch, head) pairs in parallel.
///
/// ```
/// use lm::layers::{attention_forward, AttentionShape};
/// use ndarray::{array, Array2, Array3};
/// // One sequence of two tokens, two query heads sharing one key/value head (GQA).
/// let shape = AttentionShape { batch: 1, seq: 2, n_heads: 2, n_kv_heads: 1, head_dim: 2 };
/// let q = array![[1.0f32, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]];
/// let k = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let v = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let mut probs = Array3::zeros((2, 2, 2));
/// let mut out = Array2::zeros((2, 4));
/// attention_forward(shape, q.view(), k.view(), v.view(), None, &mut probs, out.view_mut()).unwrap();
/// // The first token sees only itself (causal); the second weighs both keys.
/// assert_eq!(out.row(0).to_vec(), vec![1.0, 2.0, 1.0, 2.0]);
/// let p = 1.0 / (1.0 + (-1.0f32 / 2f32.sqrt()).exp()); // softmax of scores 1/√2 and 0
/// assert!((probs[[0, 1, 0]] - p).abs() < 1e-6 && (probs[[1, 1, 1]] - p).abs() < 1e-6);
/// ```
pub fn attention_forward(
    shape: AttentionShape,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    key_mask: Option<&[bool]>,
    probs: &mut Array3<f32>,
    out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    shape.validate()?;
    shape.check("q", &q, n_heads)?;
    shape.check("k", &k, n_kv_heads)?;
    shape.check("v", &v, n_kv_heads)?;
    shape.check("output", &out.view(), n_heads)?;
    if probs.dim() != (batch * n_heads, seq, seq) {
        return Err(LmError::shape(
            "attention probabilities (batch·heads, seq, seq)",
            format!("{:?}", (batch * n_heads, seq, seq)),
            format!("{:?}", probs.dim()),
        ));
    }
    if let Some(m) = key_mask {
        if m.len() != batch * seq {
            return Err(LmError::shape("attention key mask", batch * seq, m.len()));
        }
    }
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut tasks = Vec::with_capacity(batch * n_heads);
    for (b, rows) in split_chunks(out, Axis(0), seq).into_iter().enumerate() {
        for (h, head_out) in split_chunks(rows, Axis(1), head_dim)
            .into_iter()
            .enumerate()
        {
            tasks.push((b, h, head_out));
        }
    }
    tasks
        .into_par_iter()
        .zip(probs.outer_iter_mut().into_par_iter())
        .try_for_each(|((b, h, head_out), p)| {
            let rows = b * seq..(b + 1) * seq;
            let kv = h / group;
            attend_head(
                q.slice(s![rows.clone(), h * head_dim..(h + 1) * head_dim]),
                k.slice(s![rows.clone(), kv * head_dim..(kv + 1) * head_dim]),
                v.slice(s![rows.clone(), kv * head_dim..(kv + 1) * head_dim]),
                key_mask.map(|m| &m[rows.clone()]),
                0,
                scale,
                p,
                head_out,
            )
        })
}

/// Backward of [`attention_forward`]: from the saved `q, k, v, probs` and `∂L/∂out`, writes
/// `∂L/∂q`, `∂L/∂k`, `∂L/∂v` (overwriting). Runs (batch, key/value head) pairs in parallel;
/// the query heads of a group are summed into their shared key/value gradient in order.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: AttentionShape,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    probs: &Array3<f32>,
    grad_out: ArrayView2<'_, f32>,
    grad_q: ArrayViewMut2<'_, f32>,
    grad_k: ArrayViewMut2<'_, f32>,
    grad_v: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    shape.validate()?;
    shape.check("q", &q, n_heads)?;
    shape.check("k", &k, n_kv_heads)?;
    shape.check("v", &v, n_kv_heads)?;
    shape.check("grad_out", &grad_out, n_heads)?;
    shape.check("grad_q", &grad_q.view(), n_heads)?;
    shape.check("grad_k", &grad_k.view(), n_kv_heads)?;
    shape.check("grad_v", &grad_v.view(), n_kv_heads)?;
    if probs.dim() != (batch * n_heads, seq, seq) {
        return Err(LmError::shape(
            "attention probabilities (batch·heads, seq, seq)",
            format!("{:?}", (batch * n_heads, seq, seq)),
            format!("{:?}", probs.dim()),
        ));
    }
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut tasks = Vec::with_capacity(batch * n_kv_heads);
    let q_rows = split_chunks(grad_q, Axis(0), seq);
    let k_rows = split_chunks(grad_k, Axis(0), seq);
    let v_rows = split_chunks(grad_v, Axis(0), seq);
    for (b, ((gq, gk), gv)) in q_rows.into_iter().zip(k_rows).zip(v_rows).enumerate() {
        let gqs = split_chunks(gq, Axis(1), group * head_dim);
        let gks = split_chunks(gk, Axis(1), head_dim);
        let gvs = split_chunks(gv, Axis(1), head_dim);
        for (j, ((gq, gk), gv)) in gqs.into_iter().zip(gks).zip(gvs).enumerate() {
            tasks.push((b, j, gq, gk, gv));
        }
    }
    tasks
        .into_par_iter()
        .try_for_each(|(b, j, mut gq, mut gk, mut gv)| {
            let rows = b * seq..(b + 1) * seq;
            let kj = k.slice(s![rows.clone(), j * head_dim..(j + 1) * head_dim]);
            let vj = v.slice(s![rows.clone(), j * head_dim..(j + 1) * head_dim]);
            // Query blocks accumulate into the shared key/value gradients.
            gk.fill(0.0);
            gv.fill(0.0);
            // One scratch matrix per task, reused across the query heads and blocks.
            let mut ds_buf = Array2::<f32>::zeros((QUERY_BLOCK.min(seq), seq));
            for g in 0..group {
                let h = j * group + g;
                let cols = h * head_dim..(h + 1) * head_dim;
                let p_head = probs.index_axis(Axis(0), b * n_heads + h);
                let d_o_head = grad_out.slice(s![rows.clone(), cols.clone()]);
                let q_head = q.slice(s![rows.clone(), cols]);
                for r0 in (0..seq).step_by(QUERY_BLOCK) {
                    // Causal: the block's rows see only keys before its end; P is zero beyond.
                    let r1 = (r0 + QUERY_BLOCK).min(seq);
                    let p = p_head.slice(s![r0..r1, ..r1]);
                    let d_o = d_o_head.slice(s![r0..r1, ..]);
                    let mut ds = ds_buf.slice_mut(s![..r1 - r0, ..r1]);
                    // dV += Pᵀ·dO
                    gemm(1.0, p.t(), d_o, 1.0, gv.slice_mut(s![..r1, ..]))?;
                    // dP = dO·Vᵀ, then dS = P⊙(dP − rowsum(dP⊙P)) in place.
                    gemm(1.0, d_o, vj.slice(s![..r1, ..]).t(), 0.0, ds.view_mut())?;
                    for (mut dsr, pr) in ds.axis_iter_mut(Axis(0)).zip(p.axis_iter(Axis(0))) {
                        let dot: f32 = dsr.iter().zip(pr.iter()).map(|(a, b)| a * b).sum();
                        for (d, &pv) in dsr.iter_mut().zip(pr.iter()) {
                            *d = pv * (*d - dot);
                        }
                    }
                    // dQ = scale·dS·K, dK += scale·dSᵀ·Q
                    gemm(
                        scale,
                        ds.view(),
                        kj.slice(s![..r1, ..]),
                        0.0,
                        gq.slice_mut(s![r0..r1, g * head_dim..(g + 1) * head_dim]),
                    )?;
                    gemm(
                        scale,
                        ds.t(),
                        q_head.slice(s![r0..r1, ..]),
                        1.0,
                        gk.slice_mut(s![..r1, ..]),
                    )?;
                }
            }
            Ok::<(), LmError>(())
        })
}

/// `out = silu(gate)⊙up` with `gate_up: (rows, 2·intermediate)` holding `gate | up`.
///
/// ```
/// use lm::layers::swiglu_forward;
/// use ndarray::{array, Array2};
/// let gate_up = array![[0.0f32, 2.0, 5.0, 3.0]]; // gate [0, 2], up [5, 3]
/// let mut out = Array2::zeros((1, 2));
/// swiglu_forward(gate_up.view(), out.view_mut()).unwrap();
/// let silu2 = 2.0 / (1.0 + (-2.0f32).exp());
/// assert_eq!(out[[0, 0]], 0.0);
/// assert!((out[[0, 1]] - silu2 * 3.0).abs() < 1e-6);
/// ```
pub fn swiglu_forward(gate_up: ArrayView2<'_, f32>, mut out: ArrayViewMut2<'_, f32>) -> Result<()> {
    let inter = out.ncols();
    if gate_up.dim() != (out.nrows(), 2 * inter) {
        return Err(LmError::shape(
            "swiglu gate|up vs output",
            format!("{}×{}", out.nrows(), 2 * inter),
            format!("{}×{}", gate_up.nrows(), gate_up.ncols()),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .for_each(|(mut o, gu)| {
            let (g, u) = gu.split_at(Axis(0), inter);
            for ((ov, &gv), &uv) in o.iter_mut().zip(g.iter()).zip(u.iter()) {
                *ov = gv / (1.0 + (-gv).exp()) * uv;
            }
        });
    Ok(())
}

/// Backward of [`swiglu_forward`]: writes `∂L/∂gate | ∂L/∂up` into `grad_gate_up`.
/// `d up = d out·silu(g)`, `d gate = d out·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(
    gate_up: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    mut grad_gate_up: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let inter = grad_out.ncols();
    if gate_up.dim() != (grad_out.nrows(), 2 * inter) || grad_gate_up.dim() != gate_up.dim() {
        return Err(LmError::shape(
            "swiglu backward gate|up, grad_out, grad_gate_up",
            format!("{}×{}", grad_out.nrows(), 2 * inter),
            format!("{:?}, {:?}", gate_up.dim(), grad_gate_up.dim()),
        ));
    }
    grad_gate_up
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .zip(grad_out.axis_iter(Axis(0)).into_par_iter())
        .for_each(|((dgu, gu), d_o)| {
            let (g, u) = gu.split_at(Axis(0), inter);
            let (mut dg, mut du) = dgu.split_at(Axis(0), inter);
            for i in 0..inter {
                let (gv, uv, dov) = (g[i], u[i], d_o[i]);
                let sig = 1.0 / (1.0 + (-gv).exp());
                du[i] = dov * gv * sig;
                dg[i] = dov * uv * sig * (1.0 + gv * (1.0 - sig));
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Central finite differences of `L = Σ out ⊙ R` (R fixed random) against each backward.
    //! Sums are taken in f64; the tolerances catch a wrong sign or factor, not rounding.

    use super::*;
    use ndarray::{Array1, Array2};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const EPS: f32 = 1e-2;

    fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
    }

    fn weighted_sum(out: &Array2<f32>, weights: &Array2<f32>) -> f64 {
        out.iter()
            .zip(weights)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    /// Compares `analytic` with central differences of `loss` over every element of `input`.
    fn check(
        what: &str,
        input: &mut Array2<f32>,
        analytic: &Array2<f32>,
        loss: impl Fn(&Array2<f32>) -> f64,
    ) {
        for idx in 0..input.len() {
            let (r, c) = (idx / input.ncols(), idx % input.ncols());
            let orig = input[[r, c]];
            input[[r, c]] = orig + EPS;
            let plus = loss(input);
            input[[r, c]] = orig - EPS;
            let minus = loss(input);
            input[[r, c]] = orig;
            let numeric = (plus - minus) / (2.0 * EPS as f64);
            let a = analytic[[r, c]] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs(),
                "{what}[{r}, {c}]: analytic {a}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut x = random(&mut rng, 4, 6);
        let weight = Array1::from_shape_fn(6, |_| rng.random_range(0.5f32..1.5));
        let r = random(&mut rng, 4, 6);
        let forward = |x: &Array2<f32>, w: &Array1<f32>| {
            let mut y = Array2::zeros((4, 6));
            let mut rstd = vec![0.0; 4];
            rms_norm_forward(x.view(), w.view(), 1e-5, y.view_mut(), &mut rstd).unwrap();
            (y, rstd)
        };
        let (_, rstd) = forward(&x, &weight);
        let mut dx = Array2::zeros((4, 6));
        let mut dw = Array1::zeros(6);
        rms_norm_backward(
            x.view(),
            weight.view(),
            &rstd,
            r.view(),
            dx.view_mut(),
            Some(dw.view_mut()),
        )
        .unwrap();
        check("rmsnorm dx", &mut x, &dx, |x| {
            weighted_sum(&forward(x, &weight).0, &r)
        });
        let mut w2 = weight.clone().insert_axis(Axis(0));
        let dw2 = dw.insert_axis(Axis(0));
        check("rmsnorm dw", &mut w2, &dw2, |w| {
            weighted_sum(&forward(&x, &w.row(0).to_owned()).0, &r)
        });
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let table = RopeTable::new(10000.0, 8, 3, 6).unwrap();
        let positions = [3, 5, 8, 4];
        let mut x = random(&mut rng, 4, 16);
        let r = random(&mut rng, 4, 16);
        let forward = |x: &Array2<f32>| {
            let mut y = x.clone();
            table.apply(y.view_mut(), &positions, 2, false).unwrap();
            y
        };
        let mut dx = r.clone();
        table.apply(dx.view_mut(), &positions, 2, true).unwrap();
        check("rope dx", &mut x, &dx, |x| weighted_sum(&forward(x), &r));
        // Rotation preserves each pair's norm; an unrotated position 0 is the identity.
        let y = forward(&x);
        let norm = |a: &Array2<f32>| a.iter().map(|v| v * v).sum::<f32>();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4);
    }

    #[test]
    fn gqa_attention_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let shape = AttentionShape {
            batch: 2,
            seq: 5,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let n = 10;
        let mut q = random(&mut rng, n, 16);
        let mut k = random(&mut rng, n, 8);
        let mut v = random(&mut rng, n, 8);
        let r = random(&mut rng, n, 16);
        // Row 1 is right-padded after 3 tokens.
        let mask: Vec<bool> = (0..n).map(|i| i < 8).collect();
        let forward = |q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>| {
            let mut probs = Array3::zeros((8, 5, 5));
            let mut out = Array2::zeros((n, 16));
            attention_forward(
                shape,
                q.view(),
                k.view(),
                v.view(),
                Some(&mask),
                &mut probs,
                out.view_mut(),
            )
            .unwrap();
            (out, probs)
        };
        let (_, probs) = forward(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (
            Array2::zeros((n, 16)),
            Array2::zeros((n, 8)),
            Array2::zeros((n, 8)),
        );
        attention_backward(
            shape,
            q.view(),
            k.view(),
            v.view(),
            &probs,
            r.view(),
            dq.view_mut(),
            dk.view_mut(),
            dv.view_mut(),
        )
        .unwrap();
        // Causality: a key after the query gets no probability.
        assert_eq!(probs[[0, 1, 2]], 0.0);
        // Padded keys get none either, and their values get no gradient.
        assert_eq!(probs[[4, 4, 3]], 0.0);
        assert!(dv.row(8).iter().all(|&g| g == 0.0));
        let (k0, v0, q0) = (k.clone(), v.clone(), q.clone());
        check("attention dq", &mut q, &dq, |q| {
            weighted_sum(&forward(q, &k0, &v0).0, &r)
        });
        check("attention dk", &mut k, &dk, |k| {
            weighted_sum(&forward(&q0, k, &v0).0, &r)
        });
        check("attention dv", &mut v, &dv, |v| {
            weighted_sum(&forward(&q0, &k0, v).0, &r)
        });
    }

    /// Attention straight from the definition, in f64, one (batch, head) at a time.
    fn naive_attention(
        shape: AttentionShape,
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
    ) -> Array2<f64> {
        let AttentionShape {
            batch,
            seq,
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = shape;
        let mut out = Array2::<f64>::zeros((batch * seq, n_heads * hd));
        for b in 0..batch {
            for h in 0..n_heads {
                let kv = h / (n_heads / n_kv_heads);
                for i in 0..seq {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    q[[b * seq + i, h * hd + d]] as f64
                                        * k[[b * seq + j, kv * hd + d]] as f64
                                })
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for (j, sc) in scores.iter().enumerate() {
                        let p = (sc - max).exp() / total;
                        for d in 0..hd {
                            out[[b * seq + i, h * hd + d]] +=
                                p * v[[b * seq + j, kv * hd + d]] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocked_causal_attention_over_several_query_blocks() {
        // 150 positions: two full query blocks and a short one.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let shape = AttentionShape {
            batch: 2,
            seq: 150,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let n = 300;
        let q = random(&mut rng, n, 16);
        let k = random(&mut rng, n, 8);
        let v = random(&mut rng, n, 8);
        let r = random(&mut rng, n, 16);
        let forward = |q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>| {
            let mut probs = Array3::zeros((8, 150, 150));
            let mut out = Array2::zeros((n, 16));
            attention_forward(
                shape,
                q.view(),
                k.view(),
                v.view(),
                None,
                &mut probs,
                out.view_mut(),
            )
            .unwrap();
            (out, probs)
        };
        let (out, probs) = forward(&q, &k, &v);
        let reference = naive_attention(shape, &q, &k, &v);
        for (a, b) in out.iter().zip(reference.iter()) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (mut dq, mut dk, mut dv) = (
            Array2::zeros((n, 16)),
            Array2::zeros((n, 8)),
            Array2::zeros((n, 8)),
        );
        attention_backward(
            shape,
            q.view(),
            k.view(),
            v.view(),
            &probs,
            r.view(),
            dq.view_mut(),
            dk.view_mut(),
            dv.view_mut(),
        )
        .unwrap();
        let loss = |inputs: &[Array2<f32>; 3]| {
            naive_attention(shape, &inputs[0], &inputs[1], &inputs[2])
                .iter()
                .zip(r.iter())
                .map(|(a, &b)| a * b as f64)
                .sum::<f64>()
        };
        let inputs = [q.clone(), k.clone(), v.clone()];
        let grads = [&dq, &dk, &dv];
        // Rows in every query block of both sequences, so keys late in a sequence are covered.
        let eps = 1e-2f32;
        for row in [0usize, 63, 64, 127, 128, 149, 150, 214, 299] {
            for (which, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
                let col = (row * 7 + which) % inputs[which].ncols();
                let mut plus = inputs.clone();
                plus[which][[row, col]] += eps;
                let mut minus = inputs.clone();
                minus[which][[row, col]] -= eps;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
                let a = grads[which][[row, col]] as f64;
                assert!(
                    (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs(),
                    "{name}[{row}, {col}]: analytic {a}, numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut gate_up = random(&mut rng, 3, 10).mapv(|v| 3.0 * v);
        let r = random(&mut rng, 3, 5);
        let forward = |gu: &Array2<f32>| {
            let mut out = Array2::zeros((3, 5));
            swiglu_forward(gu.view(), out.view_mut()).unwrap();
            out
        };
        let mut grad = Array2::zeros((3, 10));
        swiglu_backward(gate_up.view(), r.view(), grad.view_mut()).unwrap();
        check("swiglu d(gate|up)", &mut gate_up, &grad, |gu| {
            weighted_sum(&forward(gu), &r)
        });
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let x = Array2::<f32>::zeros((2, 4));
        let mut y = Array2::<f32>::zeros((2, 4));
        let e = rms_norm_forward(
            x.view(),
            Array1::zeros(3).view(),
            1e-6,
            y.view_mut(),
            &mut [0.0; 2],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rms_norm_forward"), "{e}");
        let e = RopeTable::new(1e4, 5, 0, 2).unwrap_err();
        assert!(e.to_string().contains("head_dim"), "{e}");
        let table = RopeTable::new(1e4, 4, 0, 2).unwrap();
        let e = table.apply(y.view_mut(), &[0, 2], 1, false).unwrap_err();
        assert!(e.to_string().contains("position = 2"), "{e}");
    }
}
