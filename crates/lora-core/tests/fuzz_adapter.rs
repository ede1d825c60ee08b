//! Mutation fuzzing of PEFT adapter directories: `adapter_config.json` and
//! `adapter_model.safetensors` of the golden LoRA and DoRA adapters, truncated, bit-flipped,
//! with lying sizes and offsets and absurd numbers (`formats/tests/support/mutate.rs`). The
//! loader returns an adapter or an error naming the file — never a panic. A few hundred cases
//! in CI; thousands: `cargo test --release -p lora-core --test fuzz_adapter -- --ignored`.

#[path = "../../formats/tests/support/mutate.rs"]
mod mutate;

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::peft::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use mutate::{apply, cases, mutations, scratch, without_panic};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn shapes() -> BTreeMap<String, (usize, usize)> {
    let mut shapes = BTreeMap::new();
    for layer in 0..2 {
        for (module, shape) in [
            ("self_attn.q_proj", (32, 32)),
            ("self_attn.k_proj", (16, 32)),
            ("self_attn.v_proj", (16, 32)),
            ("self_attn.o_proj", (32, 32)),
            ("mlp.gate_proj", (64, 32)),
            ("mlp.up_proj", (64, 32)),
            ("mlp.down_proj", (32, 64)),
        ] {
            shapes.insert(format!("model.layers.{layer}.{module}"), shape);
        }
    }
    shapes
}

fn fuzz_file(variant: &str, file: &str, n: u32) {
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/adapter_{variant}"));
    let dir = scratch(&format!("adapter-{variant}-{file}"));
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(golden.join(f), dir.join(f)).unwrap();
    }
    let shapes = shapes();
    load_adapter(&dir, &shapes).unwrap();
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
            if let Err(e) = without_panic(file, &ms, || load_adapter(&dir, &shapes)) {
                let text = e.to_string();
                // Config errors name the option (lora_core::LoraError::InvalidOption) or the
                // file; weight errors name the file.
                let named = text.contains(file)
                    || (file == CONFIG_FILE && text.contains("invalid LoRA option"));
                prop_assert!(
                    named,
                    "error names neither file nor option: {text} ({ms:?})"
                );
                rejected.set(rejected.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{variant}/{file}: {} of {n} mutated files rejected",
        rejected.get()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_adapter_configs_are_errors_naming_the_file_or_option() {
    fuzz_file("lora", CONFIG_FILE, cases(300));
    fuzz_file("dora", CONFIG_FILE, cases(100));
}

#[test]
fn mutated_adapter_weights_are_errors_naming_the_file() {
    fuzz_file("lora", WEIGHTS_FILE, cases(300));
    fuzz_file("dora", WEIGHTS_FILE, cases(100));
}

/// Thousands of cases: `cargo test --release -p lora-core --test fuzz_adapter -- --ignored`.
#[test]
#[ignore = "long: thousands of mutated adapter files"]
fn thousands_of_mutated_adapter_files() {
    fuzz_file("lora", CONFIG_FILE, 3000);
    fuzz_file("lora", WEIGHTS_FILE, 3000);
    fuzz_file("dora", WEIGHTS_FILE, 2000);
}
