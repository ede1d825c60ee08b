//! Grouped-query attention with explicit forward and backward: scaled scores (optionally
//! soft-capped, `cap·tanh(s/cap)`), masks that combine causality, a sliding window, padding
//! and packed segments, softmax, and the product with the values. One head of one sequence
//! is [`attend_head`]; the training pass runs every (batch, head) pair in parallel and the
//! key/value-cache decoder calls [`attend_head`] on the cached keys, so both use the same
//! scores, masks and caps.
//!
//! Queries run in blocks of [`QUERY_BLOCK`] rows: a block multiplies only against the keys
//! its last row can see, which skips most of the masked upper triangle.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayViewMut2, Axis};
use quant_core::linalg::{gemm_in, ComputeDtype};
use rayon::prelude::*;

use crate::error::{LmError, Result};

/// Which keys a query sees beyond causality (all flags per row of the `(batch·seq)` layout,
/// or per cached position for the decoder).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionMask<'a> {
    /// `false` = a padded key nobody sees.
    pub key_mask: Option<&'a [bool]>,
    /// Packed segments: a query sees only keys with its own segment number.
    pub segments: Option<&'a [u32]>,
    /// A query at position `i` sees keys `j > i − window` only.
    pub sliding_window: Option<usize>,
}

/// How scores are formed: `score = scale·q·k`, then `cap·tanh(score/cap)` when `softcap` is
/// set, then the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions<'a> {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub mask: AttentionMask<'a>,
    /// The precision of the `q·kᵀ` and `P·v` products and their backward (bf16: operands
    /// rounded, sums in `f32`); the softmax is `f32` either way.
    pub compute_dtype: ComputeDtype,
}

impl AttentionOptions<'_> {
    /// Plain causal attention scaled by `1/√head_dim`.
    pub fn causal(head_dim: usize) -> Self {
        AttentionOptions {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            mask: AttentionMask::default(),
            compute_dtype: ComputeDtype::F32,
        }
    }
}

impl<'a> AttentionOptions<'a> {
    /// The options of one sequence whose rows are `rows` of the batch layout.
    fn for_rows(&self, rows: std::ops::Range<usize>) -> AttentionOptions<'a> {
        AttentionOptions {
            mask: AttentionMask {
                key_mask: self.mask.key_mask.map(|m| &m[rows.clone()]),
                segments: self.mask.segments.map(|m| &m[rows]),
                sliding_window: self.mask.sliding_window,
            },
            ..*self
        }
    }
}

fn check_mask(mask: &AttentionMask<'_>, rows: usize) -> Result<()> {
    if let Some(m) = mask.key_mask {
        if m.len() != rows {
            return Err(LmError::shape("attention key mask", rows, m.len()));
        }
    }
    if let Some(m) = mask.segments {
        if m.len() != rows {
            return Err(LmError::shape("attention segment ids", rows, m.len()));
        }
    }
    if mask.sliding_window == Some(0) {
        return Err(LmError::invalid("sliding_window", 0, "must be positive"));
    }
    Ok(())
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

    /// The checks [`attention_forward`] and [`attention_backward`] share: the head counts,
    /// `q`, `k`, `v`, the probabilities' shape and the mask's lengths. Returns the number of
    /// query heads per key/value head.
    fn check_call(
        &self,
        options: &AttentionOptions<'_>,
        q: ArrayView2<'_, f32>,
        k: ArrayView2<'_, f32>,
        v: ArrayView2<'_, f32>,
        probs: (usize, usize, usize),
    ) -> Result<usize> {
        let (batch, seq, n_heads) = (self.batch, self.seq, self.n_heads);
        if self.n_kv_heads == 0 || n_heads % self.n_kv_heads != 0 {
            return Err(LmError::invalid(
                "n_kv_heads",
                self.n_kv_heads,
                format!("must divide n_heads = {n_heads}"),
            ));
        }
        self.check("q", &q, n_heads)?;
        self.check("k", &k, self.n_kv_heads)?;
        self.check("v", &v, self.n_kv_heads)?;
        if probs != (batch * n_heads, seq, seq) {
            return Err(LmError::shape(
                "attention probabilities (batch·heads, seq, seq)",
                format!("{:?}", (batch * n_heads, seq, seq)),
                format!("{probs:?}"),
            ));
        }
        check_mask(&options.mask, batch * seq)?;
        Ok(n_heads / self.n_kv_heads)
    }
}

/// Query rows per block in causal attention: a block only multiplies against the keys its
/// last row can see, which skips most of the masked upper triangle (about 3/8 of the work at
/// 256 positions) while keeping each product large enough for the GEMM kernel.
const QUERY_BLOCK: usize = 64;

/// One head of attention with the softmax probabilities written to `probs`.
///
/// Query row `i` sits at key index `query_offset + i` and sees keys `j <= query_offset + i`
/// that the mask allows (`mask` flags are per key index; the query's own segment is the one
/// at its index). A query with no visible key gets probability 0 everywhere and a zero
/// output (transformers' output there is unspecified; such rows carry no loss).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_head(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    options: &AttentionOptions<'_>,
    query_offset: usize,
    mut probs: ArrayViewMut2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (n_queries, n_keys) = (q.nrows(), k.nrows());
    let mask = options.mask;
    for r0 in (0..n_queries).step_by(QUERY_BLOCK) {
        let r1 = (r0 + QUERY_BLOCK).min(n_queries);
        let key_end = (query_offset + r1).min(n_keys);
        let mut block = probs.slice_mut(s![r0..r1, ..]);
        block.slice_mut(s![.., key_end..]).fill(0.0);
        let mut scores = block.slice_mut(s![.., ..key_end]);
        gemm_in(
            options.compute_dtype,
            options.scale,
            q.slice(s![r0..r1, ..]),
            k.slice(s![..key_end, ..]).t(),
            0.0,
            scores.view_mut(),
        )?;
        if let Some(cap) = options.softcap {
            scores.mapv_inplace(|sv| cap * (sv / cap).tanh());
        }
        for (i, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
            let query = query_offset + r0 + i;
            let visible = |j: usize| key_visible(&mask, query, j);
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
        gemm_in(
            options.compute_dtype,
            1.0,
            scores.view(),
            v.slice(s![..key_end, ..]),
            0.0,
            out.slice_mut(s![r0..r1, ..]),
        )?;
    }
    Ok(())
}

/// Whether the query at key index `query` sees key `key`: causal, inside the window, not
/// padding, same segment.
fn key_visible(mask: &AttentionMask<'_>, query: usize, key: usize) -> bool {
    key <= query
        && mask.sliding_window.is_none_or(|w| query - key < w)
        && mask.key_mask.is_none_or(|m| m[key])
        && mask.segments.is_none_or(|s| s[key] == s[query])
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
/// `repeat_kv`. Scores are formed as `options` says; its mask flags are one per row. Writes softmax probabilities into `probs: (batch·n_heads, seq,
/// seq)` for the backward pass and the per-head outputs into `out: (batch·seq, n_heads·head_dim)`.
/// Runs (batch, head) pairs in parallel.
///
/// ```
/// use lm::attention::{attention_forward, AttentionOptions, AttentionShape};
/// use ndarray::{array, Array2, Array3};
/// // One sequence of two tokens, two query heads sharing one key/value head (GQA).
/// let shape = AttentionShape { batch: 1, seq: 2, n_heads: 2, n_kv_heads: 1, head_dim: 2 };
/// let q = array![[1.0f32, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]];
/// let k = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let v = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let mut probs = Array3::zeros((2, 2, 2));
/// let mut out = Array2::zeros((2, 4));
/// let options = AttentionOptions::causal(2);
/// attention_forward(shape, &options, q.view(), k.view(), v.view(), &mut probs, out.view_mut()).unwrap();
/// // The first token sees only itself (causal); the second weighs both keys.
/// assert_eq!(out.row(0).to_vec(), vec![1.0, 2.0, 1.0, 2.0]);
/// let p = 1.0 / (1.0 + (-1.0f32 / 2f32.sqrt()).exp()); // softmax of scores 1/√2 and 0
/// assert!((probs[[0, 1, 0]] - p).abs() < 1e-6 && (probs[[1, 1, 1]] - p).abs() < 1e-6);
/// ```
pub fn attention_forward(
    shape: AttentionShape,
    options: &AttentionOptions<'_>,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    probs: &mut Array3<f32>,
    out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::AttentionForward);
    let AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads: _,
        head_dim,
    } = shape;
    let group = shape.check_call(options, q, k, v, probs.dim())?;
    shape.check("output", &out.view(), n_heads)?;
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
            let row_options = options.for_rows(rows.clone());
            attend_head(
                q.slice(s![rows.clone(), h * head_dim..(h + 1) * head_dim]),
                k.slice(s![rows.clone(), kv * head_dim..(kv + 1) * head_dim]),
                v.slice(s![rows.clone(), kv * head_dim..(kv + 1) * head_dim]),
                &row_options,
                0,
                p,
                head_out,
            )
        })
}

/// Backward of [`attention_forward`]: from the saved `q, k, v, probs` and `∂L/∂out`, writes
/// `∂L/∂q`, `∂L/∂k`, `∂L/∂v` (overwriting). Masked scores have probability 0 and so get no
/// gradient: the mask is in `probs`. With a soft cap the capped scores' derivative
/// `1 − tanh²(s/cap)` is recomputed from `q·k` per block. Runs (batch, key/value head) pairs in
/// parallel; the query heads of a group are summed into their shared key/value gradient in
/// order.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: AttentionShape,
    options: &AttentionOptions<'_>,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    probs: &Array3<f32>,
    grad_out: ArrayView2<'_, f32>,
    grad_q: ArrayViewMut2<'_, f32>,
    grad_k: ArrayViewMut2<'_, f32>,
    grad_v: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::AttentionBackward);
    let AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let group = shape.check_call(options, q, k, v, probs.dim())?;
    shape.check("grad_out", &grad_out, n_heads)?;
    shape.check("grad_q", &grad_q.view(), n_heads)?;
    shape.check("grad_k", &grad_k.view(), n_kv_heads)?;
    shape.check("grad_v", &grad_v.view(), n_kv_heads)?;
    let scale = options.scale;
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
            let mut capped_buf = match options.softcap {
                Some(_) => Array2::<f32>::zeros((QUERY_BLOCK.min(seq), seq)),
                None => Array2::<f32>::zeros((0, 0)),
            };
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
                    gemm_in(
                        options.compute_dtype,
                        1.0,
                        p.t(),
                        d_o,
                        1.0,
                        gv.slice_mut(s![..r1, ..]),
                    )?;
                    // dP = dO·Vᵀ, then dS = P⊙(dP − rowsum(dP⊙P)) in place.
                    gemm_in(
                        options.compute_dtype,
                        1.0,
                        d_o,
                        vj.slice(s![..r1, ..]).t(),
                        0.0,
                        ds.view_mut(),
                    )?;
                    for (mut dsr, pr) in ds.axis_iter_mut(Axis(0)).zip(p.axis_iter(Axis(0))) {
                        let dot: f32 = dsr.iter().zip(pr.iter()).map(|(a, b)| a * b).sum();
                        for (d, &pv) in dsr.iter_mut().zip(pr.iter()) {
                            *d = pv * (*d - dot);
                        }
                    }
                    if let Some(cap) = options.softcap {
                        // d score = d capped · (1 − tanh²(score/cap)).
                        let mut t = capped_buf.slice_mut(s![..r1 - r0, ..r1]);
                        gemm_in(
                            options.compute_dtype,
                            scale,
                            q_head.slice(s![r0..r1, ..]),
                            kj.slice(s![..r1, ..]).t(),
                            0.0,
                            t.view_mut(),
                        )?;
                        ds.zip_mut_with(&t, |d, &sv| {
                            let th = (sv / cap).tanh();
                            *d *= 1.0 - th * th;
                        });
                    }
                    // dQ = scale·dS·K, dK += scale·dSᵀ·Q
                    gemm_in(
                        options.compute_dtype,
                        scale,
                        ds.view(),
                        kj.slice(s![..r1, ..]),
                        0.0,
                        gq.slice_mut(s![r0..r1, g * head_dim..(g + 1) * head_dim]),
                    )?;
                    gemm_in(
                        options.compute_dtype,
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

#[cfg(test)]
mod tests;
