//! Timings of the hot paths at training sizes (`cargo test --release -p qat-train --test
//! throughput -- --ignored --nocapture`); ignored by default because they take seconds.

use std::time::Instant;

use ndarray::Array2;
use qat_train::loss::{cross_entropy, kd_loss, reasoning_loss, ReasoningLossConfig};
use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
use qat_train::params::ParamStore;

fn matrix(rows: usize, cols: usize, salt: usize) -> Array2<f32> {
    // Deterministic, cheap, not constant: a hash of the index mapped to [-4, 4).
    Array2::from_shape_fn((rows, cols), |(r, c)| {
        let h = (r * 7919 + c * 104_729 + salt * 15_485_863) % 10_007;
        h as f32 / 10_007.0 * 8.0 - 4.0
    })
}

fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> T) {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{label}: {ms:.1} ms");
}

#[test]
#[ignore = "timing; run explicitly"]
fn hot_path_timings() {
    let (rows, vocab) = (1024, 32_000);
    let logits = matrix(rows, vocab, 1);
    let teacher = matrix(rows, vocab, 2);
    let targets: Vec<i64> = (0..rows as i64).map(|i| (i * 31) % vocab as i64).collect();
    time("cross_entropy [1024, 32000]", 3, || {
        cross_entropy(logits.view(), &targets).unwrap()
    });
    time("kd_loss T=2 [1024, 32000]", 3, || {
        kd_loss(logits.view(), teacher.view(), 2.0, None).unwrap()
    });
    let (hs, ht) = (matrix(1024, 2048, 3), matrix(1024, 2048, 4));
    let steps: Vec<bool> = (0..1024).map(|i| i % 16 == 15).collect();
    let answer: Vec<bool> = (0..1024).map(|i| i >= 1000).collect();
    time("reasoning_loss [1024, 2048]", 3, || {
        reasoning_loss(
            hs.view(),
            ht.view(),
            &steps,
            &answer,
            &ReasoningLossConfig::default(),
        )
        .unwrap()
    });
    let mut store = ParamStore::new();
    for i in 0..64 {
        store
            .add(
                &format!("l{i}.lora_A"),
                vec![16, 4096],
                vec![0.01; 16 * 4096],
            )
            .unwrap();
        store
            .add(
                &format!("l{i}.lora_B"),
                vec![4096, 16],
                vec![0.01; 16 * 4096],
            )
            .unwrap();
    }
    for p in 0..store.len() {
        let name = store.iter().nth(p).unwrap().name.clone();
        store.set_grad(&name, &vec![1e-3; 16 * 4096]).unwrap();
    }
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        ParamGroups::single(1e-4, 0.01).unwrap(),
    )
    .unwrap();
    time("AdamW step, 8.4M parameters", 5, || {
        opt.step(&mut store, 1.0).unwrap()
    });
}
