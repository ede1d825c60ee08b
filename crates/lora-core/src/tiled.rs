//! The tile runner shared by the quantized bases ([`crate::qlora::Nf4Base`],
//! [`crate::ggml_base::GgmlBase`]): a product whose weight is decoded one band at a time
//! writes one band of output columns per tile.

use ndarray::{ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::error::Result;

/// Runs `run_tile(buffer, (t, out[:, t·tile..]))` for every tile of `tile` columns of `out`,
/// on the rayon pool (one dequantization buffer per worker) or on the calling thread (one
/// buffer for all tiles).
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
            .try_for_each_init(Vec::new, run_tile)
    } else {
        let mut buffer = Vec::new();
        tiles
            .enumerate()
            .try_for_each(|item| run_tile(&mut buffer, item))
    }
}
