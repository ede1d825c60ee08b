//! The tile runner shared by the quantized bases ([`crate::qlora::Nf4Base`],
//! [`crate::ggml_base::GgmlBase`]): a product whose weight is decoded one band at a time
//! writes one band of output columns per tile.

use std::cell::Cell;

use ndarray::{ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::error::Result;

/// Runs `run_tile(buffer, (t, out[:, t·tile..]))` for every tile of `tile` columns of `out`,
/// on the rayon pool or on the calling thread. The decoding buffers are kept per thread
/// between calls ([`TileBuffer`]): a fresh 2 MiB tile buffer on every product costs a page
/// fault per 4 KiB on first touch, more than decoding into warm memory.
pub(crate) fn for_each_column_tile<F>(
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
