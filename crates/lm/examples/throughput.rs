//! Forward+backward tokens/s of a full-parameter training step on the project's benchmark
//! shape (d = 512, 8 layers, 8 heads, vocab 4096, seq 256), batch 4 by default.
//!
//! `cargo run --release -p lm --example throughput -- [batch] [steps]`

use std::time::Instant;

use lm::{LlamaConfig, LlamaModel};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), lm::LmError> {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().unwrap_or(0));
    let batch = args.next().filter(|&b| b > 0).unwrap_or(4);
    let steps = args.next().filter(|&s| s > 0).unwrap_or(2);
    let seq = 256;
    let mut config = LlamaConfig::new(4096, 512, 1376, 8, 8, 8)?;
    config.max_position_embeddings = seq;
    let mut model = LlamaModel::random(config, 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids = Array2::from_shape_simple_fn((batch, seq), || rng.random_range(0..4096u32));
    let labels = ids.mapv(i64::from);
    let tokens = (batch * seq) as f64;

    for trainable in [true, false] {
        model.set_base_trainable(trainable);
        // One untimed step warms allocations and thread pools.
        model.loss_and_backward(ids.view(), labels.view(), None)?;
        let start = Instant::now();
        for _ in 0..steps {
            model.loss_and_backward(ids.view(), labels.view(), None)?;
        }
        let step = start.elapsed().as_secs_f64() / steps as f64;
        println!(
            "forward+backward, base {}: {:.3} s/step, {:.0} tokens/s (batch {batch}, seq {seq})",
            if trainable { "trainable" } else { "frozen" },
            step,
            tokens / step
        );
    }
    let start = Instant::now();
    model.forward(ids.view(), None)?;
    let fwd = start.elapsed().as_secs_f64();
    println!("forward only: {:.3} s, {:.0} tokens/s", fwd, tokens / fwd);
    Ok(())
}
