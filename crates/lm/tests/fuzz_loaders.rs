//! Mutation fuzzing of a Hugging Face model directory as `LlamaModel::from_pretrained` reads
//! it: `config.json` and `model.safetensors` of the golden tiny Llama (and the bnb-4bit one),
//! truncated, bit-flipped, with lying sizes, offsets and absurd numbers
//! (`formats/tests/support/mutate.rs`). The result is a model or an error naming the file —
//! never a panic, never an allocation sized by an unchecked number. A few hundred cases in
//! CI; thousands: `cargo test --release -p lm --test fuzz_loaders -- --ignored`.

#[path = "../../formats/tests/support/mutate.rs"]
mod mutate;

mod common;

use common::data_dir;
use lm::LlamaModel;
use mutate::{apply, cases, mutations, scratch, without_panic};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn fuzz_file(model: &str, file: &str, n: u32) {
    let golden = data_dir().join(model);
    let dir = scratch(&format!("lm-{model}-{file}"));
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden.join(f), dir.join(f)).unwrap();
    }
    LlamaModel::from_pretrained(&dir).unwrap();
    let valid = std::fs::read(golden.join(file)).unwrap();
    let rejected = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&mutations(), |ms| {
            std::fs::write(dir.join(file), apply(&valid, &ms)).unwrap();
            if let Err(e) = without_panic(file, &ms, || LlamaModel::from_pretrained(&dir)) {
                let text = e.to_string();
                // A config whose sizes disagree with the weights is reported at the tensor
                // that does not fit (`tensor `…` has shape …, expected …`): also named.
                // A `quantization_config` option is named by its key; a bnb weight's parts
                // by the tensor's checkpoint name (`model.layers.1.….weight.quant_map`).
                let named = text.contains(file)
                    || text.contains("tensor `")
                    || text.contains("config option `")
                    || [
                        "model.layers.",
                        "model.embed_tokens",
                        "model.norm",
                        "lm_head",
                    ]
                    .iter()
                    .any(|t| text.contains(t));
                prop_assert!(
                    named,
                    "error names neither {file} nor a tensor: {text} ({ms:?})"
                );
                rejected.set(rejected.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{model}/{file}: {} of {n} mutated files rejected",
        rejected.get()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_config_json_is_an_error_naming_the_file() {
    fuzz_file("base", "config.json", cases(300));
    fuzz_file("base_bnb4", "config.json", cases(100));
}

#[test]
fn mutated_checkpoints_are_errors_naming_the_file() {
    fuzz_file("base", "model.safetensors", cases(300));
    fuzz_file("base_bnb4", "model.safetensors", cases(100));
}

/// Thousands of cases: `cargo test --release -p lm --test fuzz_loaders -- --ignored`.
#[test]
#[ignore = "long: thousands of mutated model files"]
fn thousands_of_mutated_model_files() {
    fuzz_file("base", "config.json", 3000);
    fuzz_file("base", "model.safetensors", 3000);
    fuzz_file("base_bnb4", "model.safetensors", 2000);
}
