//! Mutation fuzzing of qat-train's loaders: JSONL token data (`Dataset::from_jsonl_file`) and
//! the checkpoint pair (`Checkpoint::load`: the JSON and its tensor file), truncated,
//! bit-flipped, with lying sizes, offsets and absurd numbers
//! (`formats/tests/support/mutate.rs`). The result is a value or an error naming the file —
//! never a panic. A few hundred cases in CI; thousands:
//! `cargo test --release -p qat-train --test fuzz_loaders -- --ignored`.

#[path = "../../formats/tests/support/mutate.rs"]
mod mutate;

use std::path::Path;

use mutate::{apply, cases, mutations, scratch, without_panic};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use qat_train::checkpoint::{Checkpoint, TrainRng};
use qat_train::data::Dataset;

fn run<T, E: std::fmt::Display>(
    n: u32,
    valid: &[u8],
    target: &Path,
    load: impl Fn() -> Result<T, E>,
) -> u32 {
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let dir_name = target.parent().unwrap().display().to_string();
    let rejected = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&mutations(), |ms| {
            std::fs::write(target, apply(valid, &ms)).unwrap();
            if let Err(e) = without_panic(&name, &ms, &load) {
                let text = e.to_string();
                // A mutated name inside the file may point at another file of the same
                // directory (a checkpoint's tensor file): naming that file names the cause.
                prop_assert!(
                    text.contains(&name) || text.contains(&dir_name),
                    "error does not name {name}: {text} ({ms:?})"
                );
                rejected.set(rejected.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("{name}: {} of {n} mutated files rejected", rejected.get());
    rejected.get()
}

fn jsonl_cases(n: u32) {
    let dir = scratch("qat-jsonl");
    let path = dir.join("train.jsonl");
    let valid = concat!(
        "{\"input_ids\": [1, 5, 9, 2], \"labels\": [-100, 5, 9, 2]}\n",
        "{\"input_ids\": [1, 7, 2], \"labels\": [-100, 7, 2], \"step_mask\": [false, true, false], ",
        "\"answer_mask\": [false, false, true]}\n",
        "\n",
        "{\"input_ids\": [3, 4, 5, 6, 7], \"labels\": [3, 4, 5, 6, 7], \"text\": \"x\"}\n"
    )
    .as_bytes();
    std::fs::write(&path, valid).unwrap();
    assert_eq!(Dataset::from_jsonl_file(&path).unwrap().len(), 3);
    run(n, valid, &path, || Dataset::from_jsonl_file(&path));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn checkpoint_cases(n: u32) {
    let dir = scratch("qat-ckpt");
    let json = dir.join("checkpoint.json");
    let mut ckpt = Checkpoint::new(3, TrainRng::new(7).state());
    ckpt.add_tensor("base_model.model.x.lora_A.weight", vec![2, 3], vec![0.5; 6])
        .unwrap();
    ckpt.add_tensor(
        "optimizer.x.exp_avg",
        vec![6],
        (0..6).map(|i| i as f32).collect(),
    )
    .unwrap();
    ckpt.config = serde_json::json!({"lr": 0.001, "max_steps": 10});
    ckpt.extra = serde_json::json!({"total_steps": 10, "best_eval": null});
    let files = ckpt.save(&json).unwrap();
    Checkpoint::load(&json).unwrap();
    let valid_json = std::fs::read(&json).unwrap();
    let valid_tensors = std::fs::read(&files.tensors).unwrap();
    let load = || Checkpoint::load(&json).and_then(|c| c.optimizer_state().map(|_| c));
    run(n, &valid_json, &json, load);
    std::fs::write(&json, &valid_json).unwrap();
    run(n, &valid_tensors, &files.tensors, load);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_jsonl_data_is_an_error_naming_the_file() {
    jsonl_cases(cases(400));
}

#[test]
fn mutated_checkpoints_are_errors_naming_the_file() {
    checkpoint_cases(cases(300));
}

/// Thousands of cases: `cargo test --release -p qat-train --test fuzz_loaders -- --ignored`.
#[test]
#[ignore = "long: thousands of mutated files"]
fn thousands_of_mutated_files() {
    jsonl_cases(5000);
    checkpoint_cases(3000);
}
