//! Unit tests of `data` (moved out of the module file, which keeps the code).

use super::*;
use proptest::prelude::*;

fn config(batch_size: usize, shuffle: bool, drop_last: bool) -> BatchConfig {
    BatchConfig {
        batch_size,
        pad_id: 9,
        max_len: None,
        shuffle,
        drop_last,
        seed: 42,
    }
}

fn dataset(n: usize) -> Dataset {
    Dataset::new(
        (0..n)
            .map(|i| Example::new(vec![i as u32; 1 + i % 4]))
            .collect(),
    )
    .unwrap()
}

#[test]
fn jsonl_errors_name_the_line() {
    let text = "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2], \"labels\": [1]}\n";
    let err = Dataset::from_jsonl_str(text, "d.jsonl")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "d.jsonl line 2: labels has 1 entries but input_ids has 2"
    );
    let err = Dataset::from_jsonl_str("\n{\"input_ids\": [1, -2]}", "d.jsonl")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("d.jsonl line 2:"), "{err}");
    let err = Dataset::from_jsonl_str("{\"input_ids\": [1], \"labels\": [-5]}", "d")
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels[0] = -5"), "{err}");
    let err = Dataset::from_jsonl_file(Path::new("/nonexistent/x.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.jsonl"), "{err}");
}

#[test]
fn masks_are_padded_with_false_and_truncation_applies() {
    let mut with_masks = Example::new(vec![1, 2, 3]);
    with_masks.step_mask = Some(vec![false, true, false]);
    with_masks.answer_mask = Some(vec![false, false, true]);
    with_masks.labels = Some(vec![-100, 2, 3]);
    let ds = Dataset::new(vec![with_masks, Example::new(vec![4, 5, 6, 7])]).unwrap();
    let mut cfg = config(2, false, false);
    cfg.max_len = Some(3);
    let batch = DataLoader::new(ds, cfg).unwrap().next_batch().unwrap();
    assert_eq!(batch.input_ids.dim(), (2, 3));
    assert_eq!(batch.num_tokens(), 6);
    assert_eq!(batch.labels.row(0).to_vec(), vec![-100, 2, 3]);
    assert_eq!(batch.labels.row(1).to_vec(), vec![4, 5, 6]);
    let steps = batch.step_mask.unwrap();
    assert_eq!(steps.row(0).to_vec(), vec![false, true, false]);
    assert_eq!(steps.row(1).to_vec(), vec![false; 3]);
    assert_eq!(
        batch.answer_mask.unwrap().row(0).to_vec(),
        vec![false, false, true]
    );
}

#[test]
fn bad_loader_configs_are_errors() {
    assert!(DataLoader::new(Dataset::default(), config(1, false, false)).is_err());
    assert!(DataLoader::new(dataset(3), config(0, false, false)).is_err());
    assert!(DataLoader::new(dataset(3), config(4, false, true)).is_err());
    let mut loader = DataLoader::new(dataset(3), config(2, true, false)).unwrap();
    assert!(loader
        .set_cursor(DataCursor { epoch: 0, index: 3 })
        .is_err());
    let mut dropping = DataLoader::new(dataset(5), config(2, true, true)).unwrap();
    assert!(dropping
        .set_cursor(DataCursor { epoch: 1, index: 4 })
        .is_err());
    dropping
        .set_cursor(DataCursor { epoch: 1, index: 2 })
        .unwrap();
    assert!(dataset(1).split(0.5, 0).is_err());
}

proptest! {
    /// Each epoch visits every example exactly once (the short last batch included, or
    /// dropped with drop_last), and epochs differ in order when shuffled.
    #[test]
    fn epochs_cover_the_dataset(n in 1usize..40, batch_size in 1usize..8, drop_last: bool, seed in 0u64..100) {
        prop_assume!(!drop_last || n >= batch_size);
        let mut cfg = config(batch_size, true, drop_last);
        cfg.seed = seed;
        let mut loader = DataLoader::new(dataset(n), cfg).unwrap();
        for epoch in 0..2u64 {
            let mut seen = Vec::new();
            for _ in 0..loader.batches_per_epoch() {
                prop_assert_eq!(loader.cursor().epoch, epoch);
                let b = loader.next_batch().unwrap();
                prop_assert!(b.example_indices.len() == batch_size || !drop_last);
                seen.extend(b.example_indices);
            }
            prop_assert_eq!(loader.cursor(), DataCursor { epoch: epoch + 1, index: 0 });
            let expected = if drop_last { n / batch_size * batch_size } else { n };
            prop_assert_eq!(seen.len(), expected);
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), expected);
        }
    }

    /// A loader restored from a cursor yields the same batches as the original.
    #[test]
    fn cursor_resume_yields_the_same_batches(n in 2usize..30, batch_size in 1usize..6, skip in 0usize..12) {
        let mut a = DataLoader::new(dataset(n), config(batch_size, true, false)).unwrap();
        for _ in 0..skip {
            a.next_batch().unwrap();
        }
        let json = serde_json::to_string(&a.cursor()).unwrap();
        let mut b = DataLoader::new(dataset(n), config(batch_size, true, false)).unwrap();
        b.set_cursor(serde_json::from_str(&json).unwrap()).unwrap();
        for _ in 0..5 {
            prop_assert_eq!(a.next_batch().unwrap(), b.next_batch().unwrap());
        }
    }

    /// Splits partition the dataset.
    #[test]
    fn split_partitions(n in 2usize..50, frac in 0.05f64..0.95, seed in 0u64..100) {
        let ds = dataset(n);
        if let Ok((train, val)) = ds.split(frac, seed) {
            prop_assert_eq!(train.len() + val.len(), n);
            let mut all: Vec<_> = train.examples().iter().chain(val.examples()).cloned().collect();
            all.sort_by_key(|e| e.input_ids.clone());
            let mut orig = ds.examples().to_vec();
            orig.sort_by_key(|e| e.input_ids.clone());
            prop_assert_eq!(all, orig);
        }
    }
}
