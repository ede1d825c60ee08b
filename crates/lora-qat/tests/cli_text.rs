//! The text commands end to end on the tiny reference Llama (vocabulary 64) with a word-level
//! tokenizer and a chat template: `generate --prompt/--chat/--stop`, hub ids in a fake local
//! cache, `train` on chat JSONL (loss curve, validation split), `eval` on a text file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{base_model, s, temp_dir};

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lora-qat"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tiny model with a word-level tokenizer ("w0".."w59" = ids 0..59, `<|user|>` 60,
/// `<|assistant|>` 61, `<|end|>` 62 (eos), `[UNK]` 63) and a chat template.
fn text_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(base_model().join(file), model.join(file)).unwrap();
    }
    let vocab: Vec<String> = (0..60).map(|i| format!("\"w{i}\": {i}")).collect();
    let added: Vec<String> = ["<|user|>", "<|assistant|>", "<|end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                r#"{{"id": {}, "content": "{t}", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#,
                60 + i
            )
        })
        .collect();
    let tokenizer = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{}],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}, "<|user|>": 60, "<|assistant|>": 61, "<|end|>": 62, "[UNK]": 63}}, "unk_token": "[UNK]"}}}}"#,
        added.join(", "),
        vocab.join(", ")
    );
    std::fs::write(model.join("tokenizer.json"), tokenizer).unwrap();
    let config = serde_json::json!({
        "eos_token": "<|end|>",
        "chat_template": "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }} {% else %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    });
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    model
}

#[test]
fn generate_takes_text_chat_and_stop_strings() {
    let dir = temp_dir("generate");
    let model = text_model(&dir);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--max-new",
            "8",
            "--ignore-eos",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let go = |extra: &[&str]| {
        let a = args(extra);
        ok(run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
    };
    // Greedy text generation equals greedy generation from the same ids.
    let text = go(&["--prompt", "w1 w2 w3"]);
    let ids = go(&["--prompt-ids", "1,2,3"]);
    let words: Vec<String> = ids
        .trim()
        .split(',')
        .map(|id| match id.parse::<u32>().unwrap() {
            i @ 0..=59 => format!("w{i}"),
            60..=62 => String::new(), // special tokens are not printed
            _ => "[UNK]".into(),
        })
        .filter(|w| !w.is_empty())
        .collect();
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        words,
        "{text:?} vs {ids:?}"
    );
    // Seeded sampling repeats; the chat template changes the prompt.
    let sampled = go(&[
        "--prompt",
        "w1 w2 w3",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]);
    assert_eq!(
        sampled,
        go(&[
            "--prompt",
            "w1 w2 w3",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--seed",
            "3"
        ])
    );
    let chat = go(&["--chat", "--system", "w9", "--prompt", "w1 w2 w3"]);
    assert_ne!(chat, text);
    // A stop string ends the output before it.
    let first = text.split_whitespace().nth(1).unwrap().to_string();
    let stopped = go(&["--prompt", "w1 w2 w3", "--stop", &first]);
    assert_eq!(
        stopped.trim_end(),
        text.split(&first).next().unwrap().trim_end()
    );
    // Bad sampling values and a model without a template are refused by name.
    let bad = run(
        &args(&["--prompt", "w1", "--top-p", "1.5"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("top_p"),
        "{bad:?}"
    );
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    let bad = run(
        &args(&["--chat", "--prompt", "w1"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no chat template"),
        "{bad:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hub_ids_resolve_in_the_local_cache_only() {
    let dir = temp_dir("hub");
    let model = text_model(&dir);
    let cache = dir.join("hub");
    let snapshot = cache.join("models--tiny-org--tiny-llama/snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(cache.join("models--tiny-org--tiny-llama/refs")).unwrap();
    std::fs::write(
        cache.join("models--tiny-org--tiny-llama/refs/main"),
        "0123abcd",
    )
    .unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
    let by_path = ok(run(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "w1 w2",
            "--max-new",
            "4",
        ],
        &[],
    ));
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let by_id = ok(run(
        &[
            "generate",
            "--model",
            "tiny-org/tiny-llama",
            "--prompt",
            "w1 w2",
            "--max-new",
            "4",
        ],
        &env,
    ));
    assert_eq!(by_id, by_path);
    // HF_HOME/hub is the fallback.
    let home = [("HF_HOME", dir.as_path())];
    let by_home = ok(run(
        &[
            "generate",
            "--model",
            "tiny-org/tiny-llama",
            "--prompt",
            "w1 w2",
            "--max-new",
            "4",
        ],
        &home,
    ));
    assert_eq!(by_home, by_path);
    let absent = run(
        &["generate", "--model", "tiny-org/absent", "--prompt", "w1"],
        &env,
    );
    let err = String::from_utf8_lossy(&absent.stderr);
    assert!(
        !absent.status.success() && err.contains("not in the local Hugging Face cache"),
        "{err}"
    );
    let absent = run(
        &[
            "eval",
            "--model",
            "tiny-org/tiny-llama",
            "--revision",
            "v2",
            "--data",
            "x",
        ],
        &env,
    );
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("revision v2"),
        "{absent:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_on_chat_jsonl_writes_the_loss_curve_and_eval_reads_text() {
    let dir = temp_dir("train");
    let model = text_model(&dir);
    let data = dir.join("chat.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("w{} w{}", i, i + 1)},
                {"role": "assistant", "content": format!("w{} w{} w{}", i + 2, i + 3, i + 4)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.join("out");
    ok(run(
        &[
            "train",
            "--quiet",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--validation-split",
            "0.25",
            "--max-seq-len",
            "16",
            "--lr",
            "0.01",
        ],
        &[],
    ));
    let png = std::fs::read(out.join("loss_curve.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let tokens = header.iter().position(|h| *h == "tokens").unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    // 4 conversations of 2 + 3 + 3 + 4 tokens ("<|user|> a b <|end|> <|assistant|> c d e <|end|>").
    assert_eq!(row[tokens], "36", "{csv}");

    // --packing: documents packed into sequences of 32 tokens train through the segmented
    // forward pass (3 conversations of 9 tokens per packed sequence).
    let packed_out = dir.join("packed");
    ok(run(
        &[
            "train",
            "--quiet",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&packed_out),
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--max-seq-len",
            "32",
            "--packing",
        ],
        &[],
    ));
    let csv = std::fs::read_to_string(packed_out.join("metrics.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row[tokens], "27", "{csv}");

    // eval: perplexity of a text file.
    let text = dir.join("eval.txt");
    std::fs::write(&text, "w1 w2 w3 w4\nw5 w6 w7\n").unwrap();
    let report = ok(run(
        &["eval", "--model", s(&model), "--data", s(&text)],
        &[],
    ));
    assert!(
        report.starts_with("perplexity ") && report.contains("of 2 examples"),
        "{report}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
