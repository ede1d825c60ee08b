//! `qat_train::loss::cross_entropy` on logits `[batch·seq, vocab]` with
//! `Batch::shifted_targets` equals `lm::cross_entropy`'s shifted loss on `(batch, seq, vocab)`:
//! the trainer can use either, and they agree on the Hugging Face label shift.

use ndarray::Array3;
use qat_train::data::{BatchConfig, DataLoader, Dataset, Example};
use qat_train::loss::cross_entropy;

#[test]
fn shifted_cross_entropy_agrees_with_lm() {
    let mut prompt_masked = Example::new(vec![3, 1, 4, 1, 5]);
    prompt_masked.labels = Some(vec![-100, -100, 4, 1, 5]);
    let ds = Dataset::new(vec![prompt_masked, Example::new(vec![2, 7, 1])]).unwrap();
    let config = BatchConfig {
        batch_size: 2,
        pad_id: 0,
        max_len: None,
        shuffle: false,
        drop_last: false,
        seed: 0,
    };
    let batch = DataLoader::new(ds, config).unwrap().next_batch().unwrap();
    let (b, seq, vocab) = (2, 5, 11);
    let logits = Array3::from_shape_fn((b, seq, vocab), |(i, t, v)| {
        ((i * 31 + t * 17 + v * 7) % 13) as f32 * 0.37 - 2.0
    });
    let reference = lm::cross_entropy(logits.view(), batch.labels.view()).unwrap();
    let flat = logits
        .view()
        .into_shape_with_order((b * seq, vocab))
        .unwrap();
    let ours = cross_entropy(flat, &batch.shifted_targets()).unwrap();
    assert_eq!(ours.counted, reference.counted);
    assert!(
        (ours.value - f64::from(reference.loss)).abs() < 1e-6,
        "{} vs lm {}",
        ours.value,
        reference.loss
    );
    let reference_grad = reference
        .grad_logits
        .into_shape_with_order((b * seq, vocab))
        .unwrap();
    let max_diff = ours
        .grad
        .iter()
        .zip(reference_grad.iter())
        .map(|(a, r)| (a - r).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-6, "max |Δgrad| = {max_diff}");
}
