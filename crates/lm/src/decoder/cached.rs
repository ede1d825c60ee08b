//! A decoder layer's attention against key/value caches ([`super::KeysFrom::Caches`]): the
//! rows of several sequences, each at its own cache length, projected together by the layer
//! (one product of all rows per projection) and attending here, sequence by sequence, to
//! that sequence's cached keys and values — masked by the layer's window, as in training.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::LayerContext;
use crate::attention::{attend_head, split_chunks, AttentionMask};
use crate::error::{LmError, Result};

/// One sequence's share of a cached pass: its cached keys and values of this layer
/// (row-major `(offset, kv_width)`, to which its rows' are appended), how many positions are
/// cached (`offset`; its queries sit at `offset ..`) and how many rows it has in the pass.
pub(crate) struct CachedSequence<'a> {
    pub keys: &'a mut Vec<f32>,
    pub values: &'a mut Vec<f32>,
    pub offset: usize,
    pub rows: usize,
}

/// Appends every sequence's keys and values (columns `q_width ..` of `qkv`, rotated) to its
/// cache and writes its attention output rows of `attn_out`. Sequences and heads run on
/// rayon's pool.
pub(super) fn attend(
    ctx: &LayerContext<'_>,
    sequences: Vec<CachedSequence<'_>>,
    qkv: ArrayView2<'_, f32>,
    attn_out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (q_width, kv_width, hd) = (ctx.q_width(), ctx.kv_width(), ctx.head_dim);
    let rows: usize = sequences.iter().map(|q| q.rows).sum();
    if rows != qkv.nrows() || rows != attn_out.nrows() {
        return Err(LmError::shape(
            "cached attention rows (qkv, output)",
            format!("{rows} rows of {} sequences", sequences.len()),
            format!("{}, {}", qkv.nrows(), attn_out.nrows()),
        ));
    }
    if let Some((b, _)) = sequences
        .iter()
        .enumerate()
        .find(|(_, q)| q.keys.len() != q.offset * kv_width || q.values.len() != q.keys.len())
    {
        return Err(LmError::invalid(
            "cached keys and values",
            format!("sequence {b}"),
            "hold a different number of positions than the cache says",
        ));
    }
    let group = ctx.heads / ctx.kv_heads.max(1);
    let options = ctx.options(AttentionMask::default());
    let mut outs = Vec::with_capacity(sequences.len());
    let (mut rest, mut first) = (attn_out, 0);
    for q in &sequences {
        let (head, tail) = rest.split_at(Axis(0), q.rows);
        outs.push((first, head));
        rest = tail;
        first += q.rows;
    }
    sequences
        .into_par_iter()
        .zip(outs)
        .try_for_each(|(seq, (first, out))| {
            let own = qkv.slice(s![first..first + seq.rows, ..]);
            for row in own.axis_iter(Axis(0)) {
                seq.keys
                    .extend(row.slice(s![q_width..q_width + kv_width]).iter());
                seq.values
                    .extend(row.slice(s![q_width + kv_width..]).iter());
            }
            let total = seq.offset + seq.rows;
            let k_all = ArrayView2::from_shape((total, kv_width), &seq.keys[..])
                .map_err(|e| LmError::shape("cached keys", format!("{total}×{kv_width}"), e))?;
            let v_all = ArrayView2::from_shape((total, kv_width), &seq.values[..])
                .map_err(|e| LmError::shape("cached values", format!("{total}×{kv_width}"), e))?;
            split_chunks(out, Axis(1), hd)
                .into_par_iter()
                .enumerate()
                .try_for_each(|(h, out)| {
                    let kv = h / group;
                    let mut probs = Array2::<f32>::zeros((seq.rows, total));
                    attend_head(
                        own.slice(s![.., h * hd..(h + 1) * hd]),
                        k_all.slice(s![.., kv * hd..(kv + 1) * hd]),
                        v_all.slice(s![.., kv * hd..(kv + 1) * hd]),
                        &options,
                        seq.offset,
                        probs.view_mut(),
                        out,
                    )
                })
        })
}
