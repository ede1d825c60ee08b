//! Mutation fuzzing of a model directory's text files: `tokenizer.json`,
//! `tokenizer_config.json` (special tokens, `chat_template`), `chat_template.jinja` and
//! `generation_config.json` of a small SmolLM2 tokenizer, truncated, bit-flipped, given lying
//! numbers and absurd counts (`formats/tests/support/mutate.rs`). Loading the directory —
//! and, when it loads, encoding, decoding and rendering the chat template — gives a value or
//! an error naming the mutated file, never a panic (the `tokenizers` crate's own panics are
//! caught at `ModelText::from_dir`). CI runs a few hundred cases per file; the ignored test
//! runs thousands: `cargo test --release -p lora-qat --test fuzz_text -- --ignored`.

#[path = "../../formats/tests/support/mutate.rs"]
mod mutate;

use std::path::{Path, PathBuf};

use lora_qat::text::{ChatMessage, ModelText};
use mutate::{apply, cases, mutations, scratch, without_panic};
use proptest::test_runner::{Config, TestRunner};

const FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/text/smollm2_small")
}

/// Loads `dir` and uses what loaded; an error (from loading or use) is returned as text.
fn load_and_use(dir: &Path) -> Result<(), String> {
    let text = ModelText::from_dir(dir).map_err(|e| e.to_string())?;
    let ids = text
        .encode("Hello world, 12 apples!", true)
        .map_err(|e| e.to_string())?;
    let _ = text.decode(&ids, false).map_err(|e| e.to_string())?;
    // Ids past the vocabulary: an error or a string, never a panic.
    let _ = text.decode(&[u32::MAX, 0, 1 << 30], true);
    if let Some(template) = text.chat_template() {
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello."),
        ];
        let _ = template.render(&messages, true);
    }
    Ok(())
}

fn fuzz_file(file: &str, default_cases: u32) {
    let dir = scratch(&format!("text-{}", file.replace('.', "-")));
    let original = std::fs::read(source().join(file)).unwrap();
    for f in FILES {
        std::fs::copy(source().join(f), dir.join(f)).unwrap();
    }
    load_and_use(&dir).expect("the unmutated directory loads");
    let mut runner = TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    });
    let (errors, loaded) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    runner
        .run(&mutations(), |muts| {
            std::fs::write(dir.join(file), apply(&original, &muts)).unwrap();
            match without_panic(file, &muts, || load_and_use(&dir)) {
                Ok(()) => loaded.set(loaded.get() + 1),
                Err(e) => {
                    errors.set(errors.get() + 1);
                    assert!(
                        e.contains(file),
                        "{file} {muts:?}: error does not name it: {e}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{file}: {} errors naming it, {} mutated files still loaded",
        errors.get(),
        loaded.get()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_tokenizer_json_is_an_error_naming_the_file() {
    fuzz_file("tokenizer.json", 300);
}

#[test]
fn mutated_tokenizer_config_is_an_error_naming_the_file() {
    fuzz_file("tokenizer_config.json", 200);
}

#[test]
fn mutated_chat_template_is_an_error_naming_the_file() {
    fuzz_file("chat_template.jinja", 200);
}

#[test]
fn mutated_generation_config_is_an_error_naming_the_file() {
    fuzz_file("generation_config.json", 100);
}

/// Thousands of cases per file:
/// `cargo test --release -p lora-qat --test fuzz_text -- --ignored`.
#[test]
#[ignore = "long: thousands of mutated text files"]
fn thousands_of_mutated_text_files() {
    for file in FILES {
        fuzz_file(file, 3000);
    }
}
