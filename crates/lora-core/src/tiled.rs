//! The tiled products shared by the quantized bases ([`crate::qlora::Nf4Base`],
//! [`crate::ggml_base::GgmlBase`]): a base says how to decode a band of rows or of columns of
//! its `W` ([`TiledWeight`]); [`tiled_matmul`] (`y = x·Wᵀ`, a band of rows of `W` per band of
//! output columns) and [`tiled_matmul_transposed`] (`dx = dy·W + β·dx`, a band of columns of
//! `W` per band of `dx`'s columns, each element written once with the full inner dimension)
//! run the bands on rayon's pool, one reusable decoding buffer per worker.

use std::cell::Cell;
use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use quant_core::linalg::{gemm_in, ComputeDtype};
use rayon::prelude::*;

use crate::error::{LoraError, Result};

/// A frozen `W: (out, in)` that is decoded one band at a time.
pub(crate) trait TiledWeight: Sync {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// The base for messages: `NF4 base q_proj`.
    fn describe(&self) -> String;
    /// Rows `rows` of `W` into `out` (`rows.len() · in` values, row-major).
    fn decode_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()>;
    /// Columns `cols` of every row of `W` into `out` (`out · cols.len()` values, row-major);
    /// `cols` starts and (unless it reaches `in`) ends on a multiple of
    /// [`TiledWeight::column_step`].
    fn decode_columns(&self, cols: Range<usize>, out: &mut [f32]) -> Result<()>;
    /// The granularity of column bands (a ggml block's values; 1 when any band decodes).
    fn column_step(&self) -> usize {
        1
    }
}

fn check_dims(
    weight: &impl TiledWeight,
    what: &str,
    a: (usize, usize),
    a_cols: usize,
    out: (usize, usize),
    out_cols: usize,
) -> Result<()> {
    if a.1 != a_cols {
        return Err(LoraError::shape(
            format!("{what} input of the {}", weight.describe()),
            format!("(tokens, {a_cols})"),
            format!("{a:?}"),
        ));
    }
    if out != (a.0, out_cols) {
        return Err(LoraError::shape(
            format!("{what} output of the {}", weight.describe()),
            format!("({}, {out_cols})", a.0),
            format!("{out:?}"),
        ));
    }
    Ok(())
}

/// `y[:, rows] = x · W[rows, :]ᵀ`, `tile` rows of `W` at a time.
pub(crate) fn tiled_matmul(
    weight: &impl TiledWeight,
    x: ArrayView2<'_, f32>,
    y: ArrayViewMut2<'_, f32>,
    tile: usize,
    parallel: bool,
    dtype: ComputeDtype,
) -> Result<()> {
    let (out_features, cols) = weight.dims();
    check_dims(weight, "x·Wᵀ", x.dim(), cols, y.dim(), out_features)?;
    let run_tile = |buffer: &mut Vec<f32>, (t, y_tile): (usize, ArrayViewMut2<'_, f32>)| {
        let row_start = t * tile;
        let rows = y_tile.ncols();
        buffer.resize(rows * cols, 0.0);
        weight.decode_rows(row_start..row_start + rows, buffer)?;
        let w_tile = ArrayView2::from_shape((rows, cols), &buffer[..])
            .map_err(|e| LoraError::shape("row tile of W", rows * cols, e))?;
        gemm_in(dtype, 1.0, x, w_tile.t(), 0.0, y_tile)?;
        Ok(())
    };
    for_each_column_tile(y, tile, parallel, run_tile)
}

/// `dx[:, cols] = dy · W[:, cols] + β·dx[:, cols]`, bands of `tile` columns of `W` (rounded
/// up to whole [`TiledWeight::column_step`]s) at a time.
pub(crate) fn tiled_matmul_transposed(
    weight: &impl TiledWeight,
    dy: ArrayView2<'_, f32>,
    beta: f32,
    dx: ArrayViewMut2<'_, f32>,
    tile: usize,
    parallel: bool,
    dtype: ComputeDtype,
) -> Result<()> {
    let (rows, in_features) = weight.dims();
    check_dims(weight, "dy·W", dy.dim(), rows, dx.dim(), in_features)?;
    let step = weight.column_step();
    let tile = tile.div_ceil(step) * step;
    let run_tile = |buffer: &mut Vec<f32>, (t, dx_tile): (usize, ArrayViewMut2<'_, f32>)| {
        let col_start = t * tile;
        let width = dx_tile.ncols();
        buffer.resize(rows * width, 0.0);
        weight.decode_columns(col_start..col_start + width, buffer)?;
        let w_tile = ArrayView2::from_shape((rows, width), &buffer[..])
            .map_err(|e| LoraError::shape("column tile of W", rows * width, e))?;
        gemm_in(dtype, 1.0, dy, w_tile, beta, dx_tile)?;
        Ok(())
    };
    for_each_column_tile(dx, tile, parallel, run_tile)
}

/// Runs `run_tile(buffer, (t, out[:, t·tile..]))` for every tile of `tile` columns of `out`,
/// on the rayon pool or on the calling thread. The decoding buffers are kept per thread
/// between calls ([`TileBuffer`]): a fresh 2 MiB tile buffer on every product costs a page
/// fault per 4 KiB on first touch, more than decoding into warm memory.
fn for_each_column_tile<F>(
    mut out: ArrayViewMut2<'_, f32>,
    tile: usize,
    parallel: bool,
    run_tile: F,
) -> Result<()>
where
    F: Fn(&mut Vec<f32>, (usize, ArrayViewMut2<'_, f32>)) -> Result<()> + Sync + Send,
{
    let tiles = out.axis_chunks_iter_mut(Axis(1), tile);
    if parallel {
        tiles
            .into_par_iter()
            .enumerate()
            .try_for_each_init(TileBuffer::take, |buffer, item| {
                run_tile(&mut buffer.0, item)
            })
    } else {
        let mut buffer = TileBuffer::take();
        tiles
            .enumerate()
            .try_for_each(|item| run_tile(&mut buffer.0, item))
    }
}

thread_local! {
    /// This thread's tile buffer while no tile runs on it.
    static TILE_BUFFER: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A tile buffer taken from this thread's slot and given back on drop. A tile that starts on
/// a thread whose buffer is in use (rayon may run another tile inside a product's join)
/// finds the slot empty and allocates; the larger buffer is kept.
struct TileBuffer(Vec<f32>);

impl TileBuffer {
    fn take() -> Self {
        TileBuffer(TILE_BUFFER.with(Cell::take))
    }
}

impl Drop for TileBuffer {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut self.0);
        TILE_BUFFER.with(|slot| {
            let other = slot.take();
            slot.set(if other.capacity() > mine.capacity() {
                other
            } else {
                mine
            });
        });
    }
}
