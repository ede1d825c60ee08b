//! The text layer against transformers: chat templates rendered by `apply_chat_template`,
//! assistant-token masks from `return_assistant_tokens_mask`, tokenization of a directory's
//! tokenizer.json and of GGUF metadata, streaming detokenization and the training-data
//! formats. Reference data: `tests/data/text/` (made by its make_*.py with the interop venv;
//! `smollm2_small/` is SmolLM2's tokenizer cut to the tokens these texts use, ids kept).

use std::path::{Path, PathBuf};

use lora_qat::text::data::{chat_example, examples_from_file, DataFormat};
use lora_qat::text::{ChatTemplate, ModelText, TextStreamer};
use quant_core::gguf::{GgufArray, GgufValue, GgufWriter};
use serde_json::Value;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/text")
        .join(rel)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("reference.json")).unwrap()).unwrap()
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-qat-text-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn conversation(reference: &Value, name: &str) -> Value {
    if name == "tool" {
        reference["tool_conversation"].clone()
    } else {
        reference["conversations"][name].clone()
    }
}

#[test]
fn chat_templates_render_as_transformers() {
    let reference = reference();
    let renders = reference["renders"].as_array().unwrap();
    assert_eq!(renders.len(), 32);
    for r in renders {
        let name = r["template"].as_str().unwrap();
        let source = std::fs::read_to_string(data(&format!("templates/{name}.jinja"))).unwrap();
        let template = ChatTemplate::new(&source)
            .unwrap()
            .with_special_token("bos_token", "<|im_start|>")
            .with_special_token("eos_token", "<|im_end|>");
        let mut extra = serde_json::Map::new();
        if name == "llama31_style" {
            extra.insert("date_string".into(), "26 Jul 2024".into());
        }
        if r["tools"].as_bool().unwrap() {
            extra.insert("tools".into(), reference["tools"].clone());
        }
        let messages = conversation(&reference, r["conversation"].as_str().unwrap());
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let (text, _) = template.render_json(&messages, agp, &extra).unwrap();
        assert_eq!(
            text,
            r["text"].as_str().unwrap(),
            "{name} {} agp={agp}",
            r["conversation"]
        );
    }
}

fn small_text() -> ModelText {
    ModelText::from_dir(&data("smollm2_small")).unwrap()
}

/// The small tokenizer directory with `template` as its chat_template.jinja.
fn with_template(name: &str, template: &str) -> PathBuf {
    let dir = tmp_dir(name);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(data("smollm2_small").join(f), dir.join(f)).unwrap();
    }
    let source = std::fs::read_to_string(data(&format!("templates/{template}.jinja"))).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), source).unwrap();
    dir
}

#[test]
fn assistant_masks_equal_transformers() {
    let reference = reference();
    let generation_dir = with_template("gen", "smollm2_generation");
    // SmolLM2's own template (turns found by rendering prefixes) and the same template with
    // {% generation %} blocks (transformers' reference) give the same masks.
    for text in [small_text(), ModelText::from_dir(&generation_dir).unwrap()] {
        for m in reference["assistant_masks"].as_array().unwrap() {
            let messages = conversation(&reference, m["conversation"].as_str().unwrap());
            let example = chat_example(&text, &messages).unwrap();
            let ids: Vec<u32> = serde_json::from_value(m["input_ids"].clone()).unwrap();
            let mask: Vec<u8> = serde_json::from_value(m["assistant_masks"].clone()).unwrap();
            assert_eq!(example.input_ids, ids, "{}", m["conversation"]);
            let labels = example.labels.unwrap();
            let ours: Vec<u8> = labels.iter().map(|&l| u8::from(l != -100)).collect();
            assert_eq!(ours, mask, "{}", m["conversation"]);
            for (l, id) in labels.iter().zip(&ids) {
                assert!(*l == -100 || *l == i64::from(*id));
            }
        }
    }
    std::fs::remove_dir_all(generation_dir).unwrap();
}

#[test]
fn directory_tokenizer_matches_transformers() {
    let text = small_text();
    assert_eq!(text.eos_token(), Some("<|im_end|>"));
    assert_eq!(text.eos_ids(), &[2]);
    let reference = reference();
    for t in reference["tokenized"].as_array().unwrap() {
        let s = t["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(t["hf_dir_ids"].clone()).unwrap();
        assert_eq!(text.encode(s, true).unwrap(), ids, "{s:?}");
    }
    for d in reference["decoded"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(d["ids"].clone()).unwrap();
        assert_eq!(
            text.decode(&ids, false).unwrap(),
            d["text"].as_str().unwrap()
        );
    }
}

/// A GGUF file holding only tokenizer metadata: the small tokenizer's tokens at their ids
/// (gaps filled with unused tokens), merges, types and SmolLM2's special ids.
fn write_tokenizer_gguf(path: &Path, pre: &str, edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(data("smollm2_small/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let vocab = doc["model"]["vocab"].as_object().unwrap();
    let n = vocab
        .values()
        .map(|v| v.as_u64().unwrap() as usize)
        .max()
        .unwrap()
        + 1;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[unused{i}]")).collect();
    let mut types = vec![5i32; n];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
        types[id.as_u64().unwrap() as usize] = 1;
    }
    for a in doc["added_tokens"].as_array().unwrap() {
        types[a["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges: Vec<String> = doc["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    let template = std::fs::read_to_string(data("templates/smollm2.jinja")).unwrap();
    let s = |v: &str| GgufValue::String(v.into());
    let mut meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(merges)),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(2)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        ),
        ("tokenizer.chat_template".into(), s(&template)),
    ];
    edit(&mut meta);
    GgufWriter::create(path, &meta, &[])
        .unwrap()
        .finish()
        .unwrap();
}

fn check_gguf_tokenizer(text: &ModelText) {
    let reference = reference();
    let digits: Value =
        serde_json::from_str(&std::fs::read_to_string(data("smollm_pre_tokenizer.json")).unwrap())
            .unwrap();
    // llama.cpp's `smollm` pre-tokenizer splits digits one by one, as SmolLM2's own
    // tokenizer.json does (transformers' GGUF loader does not: the strings here have no digits
    // where the two differ).
    for t in digits["smollm_pre_tokenizer"].as_array().unwrap() {
        let s = t["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
        assert_eq!(text.encode(s, true).unwrap(), ids, "{s:?}");
    }
    for t in reference["tokenized"].as_array().unwrap() {
        let s = t["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
        assert_eq!(
            text.encode(s, true).unwrap(),
            ids,
            "{s:?} (transformers' GGUF tokenizer)"
        );
        assert_eq!(text.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(text.eos_token(), Some("<|im_end|>"));
    assert_eq!(text.bos_token(), Some("<|im_start|>"));
    assert_eq!(text.eos_ids(), &[2]);
    let messages = conversation(&reference, "single");
    let example = chat_example(text, &messages).unwrap();
    let expected: Vec<u32> =
        serde_json::from_value(reference["assistant_masks"][0]["input_ids"].clone()).unwrap();
    assert_eq!(example.input_ids, expected);
}

#[test]
fn gguf_metadata_alone_gives_the_tokenizer_and_template() {
    let dir = tmp_dir("gguf");
    let path = dir.join("tok.gguf");
    write_tokenizer_gguf(&path, "smollm", |_| {});
    check_gguf_tokenizer(&ModelText::load(&path).unwrap());

    // add_bos_token puts bos first, as llama.cpp's tokenizer does.
    write_tokenizer_gguf(&path, "smollm", |m| {
        m.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)));
    });
    let text = ModelText::load(&path).unwrap();
    assert_eq!(
        text.encode("Hello world", true).unwrap(),
        vec![1, 19556, 905]
    );
    assert_eq!(text.encode("Hello world", false).unwrap(), vec![19556, 905]);

    // Errors name the key.
    write_tokenizer_gguf(&path, "unheard-of", |_| {});
    let err = ModelText::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("unheard-of"),
        "{err}"
    );
    write_tokenizer_gguf(&path, "smollm", |m| {
        m.retain(|(k, _)| k != "tokenizer.ggml.merges")
    });
    let err = ModelText::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.merges") && err.contains("missing"),
        "{err}"
    );
    write_tokenizer_gguf(&path, "smollm", |m| {
        m.retain(|(k, _)| k != "tokenizer.ggml.eos_token_id");
        m.push((
            "tokenizer.ggml.eos_token_id".into(),
            GgufValue::U32(1 << 20),
        ));
    });
    let err = ModelText::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("eos_token_id") && err.contains("outside the vocabulary"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (98 MB, not committed). Run with
/// `LORA_QAT_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf cargo test --release -p
/// lora-qat --test text -- --ignored`.
#[test]
#[ignore]
fn real_smollm2_gguf_tokenizer() {
    let path = std::env::var("LORA_QAT_SMOLLM2_GGUF")
        .unwrap_or_else(|_| "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    check_gguf_tokenizer(&ModelText::load(Path::new(&path)).unwrap());
}

#[test]
fn streaming_never_splits_characters_and_honours_stop_strings() {
    let text = small_text();
    let s = "Ünïcödé — ça va? 日本語 🤗 Hello world";
    let ids = text.encode(s, false).unwrap();
    let mut streamer = TextStreamer::new(&text, true, &[]);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(streamer.push(id).unwrap());
    }
    pieces.push(streamer.finish().unwrap());
    assert_eq!(pieces.concat(), s);
    // The emoji is several byte-level tokens: nothing is emitted until it is whole.
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() >= 2,
        "{pieces:?}"
    );

    // A stop string is cut with what follows; text that might start one is held back.
    let stop = vec!["va?".to_string()];
    let mut streamer = TextStreamer::new(&text, true, &stop);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&streamer.push(id).unwrap());
        if streamer.stopped() {
            break;
        }
    }
    out.push_str(&streamer.finish().unwrap());
    assert!(streamer.stopped());
    assert_eq!(out, "Ünïcödé — ça ");
}

#[test]
fn data_files_are_read_by_content() {
    let dir = tmp_dir("data");
    let model = data("smollm2_small");
    let load = || ModelText::from_dir(&model);
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    // Chat: labels on the assistant turn only.
    let chat = write(
        "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Capital of Italy?\"}, {\"role\": \"assistant\", \"content\": \"Rome\"}]}\n\n",
    );
    let d = examples_from_file(&chat, load).unwrap();
    assert_eq!(d.format, DataFormat::Chat);
    let labels = d.dataset.examples()[0].labels.clone().unwrap();
    let trained: Vec<i64> = labels.into_iter().filter(|&l| l != -100).collect();
    assert_eq!(trained, vec![46292, 2, 198]); // "Rome", <|im_end|>, "\n"

    // Prompt-completion strings: the completion and eos.
    let pc = write(
        "pc.jsonl",
        "{\"prompt\": \"Hello\", \"completion\": \" world\"}\n",
    );
    let d = examples_from_file(&pc, load).unwrap();
    assert_eq!(d.format, DataFormat::PromptCompletion);
    let e = &d.dataset.examples()[0];
    assert_eq!(e.input_ids, vec![19556, 905, 2]);
    assert_eq!(e.labels.clone().unwrap(), vec![-100, 905, 2]);

    // Conversational prompt-completion.
    let pc = write(
        "pcc.jsonl",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"Capital of Italy?\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"Rome\"}]}\n",
    );
    let e = examples_from_file(&pc, load).unwrap().dataset.examples()[0].clone();
    let trained: Vec<i64> = e
        .labels
        .unwrap()
        .into_iter()
        .filter(|&l| l != -100)
        .collect();
    assert_eq!(trained, vec![46292, 2, 198]);

    // Text JSONL and plain lines: every token, eos appended.
    let t = write("t.jsonl", "{\"text\": \"Hello world\"}\n");
    let d = examples_from_file(&t, load).unwrap();
    assert_eq!(
        (d.format, d.dataset.examples()[0].input_ids.clone()),
        (DataFormat::Text, vec![19556, 905, 2])
    );
    let p = write("p.txt", "Hello world\n\nHello\n");
    let d = examples_from_file(&p, load).unwrap();
    assert_eq!(d.format, DataFormat::PlainLines);
    assert_eq!(d.dataset.len(), 2);

    // Pre-tokenized needs no tokenizer.
    let ids = write("ids.jsonl", "{\"input_ids\": [1, 2, 3]}\n");
    let d = examples_from_file(&ids, || panic!("not needed")).unwrap();
    assert_eq!(d.format, DataFormat::PreTokenized);

    // Mixed formats and bad lines name the line.
    let bad = write(
        "bad.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"text\": \"b\"}\n",
    );
    let err = examples_from_file(&bad, load).unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("text JSONL"),
        "{err}"
    );
    let bad = write("bad2.jsonl", "{\"messages\": \"nope\"}\n");
    let err = examples_from_file(&bad, load).unwrap_err().to_string();
    assert!(
        err.contains("line 1") && err.contains("not a list"),
        "{err}"
    );
    let bad = write("bad3.jsonl", "{\"foo\": 1}\n");
    let err = examples_from_file(&bad, load).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("foo"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
