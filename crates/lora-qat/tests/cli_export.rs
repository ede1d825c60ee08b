//! `lora-qat merge`, `export-gguf` and `inspect` through the binary, on the tiny reference
//! Llama and PEFT adapters in `crates/lm/tests/data/llama`.

mod common;
use common::{fails, lm_data, ok, temp_dir};

fn data(rel: &str) -> String {
    lm_data(rel).display().to_string()
}

#[test]
fn merge_export_and_inspect() {
    let tmp = temp_dir("flow");
    let merged = tmp.join("merged");
    let m = merged.to_str().unwrap();
    let stdout = ok(&[
        "merge",
        "--model",
        &data("base"),
        "--adapter",
        &data("adapter_lora"),
        "--out",
        m,
        "--dtype",
        "f16",
        "--max-shard-size",
        "20KB",
    ]);
    assert!(stdout.contains("merged 14 modules"), "{stdout}");
    let report = ok(&["inspect", m]);
    assert!(report.contains("F16: 21 tensors"), "{report}");
    assert!(
        report.contains("has model.safetensors.index.json"),
        "{report}"
    );

    let gguf = tmp.join("m.gguf");
    let g = gguf.to_str().unwrap();
    ok(&["export-gguf", "--model", m, "--out", g, "--type", "q8_0"]);
    let report = ok(&["inspect", g]);
    assert!(
        report.contains("general.architecture = \"llama\""),
        "{report}"
    );
    assert!(report.contains("blk.1.ffn_down.weight"), "{report}");
    assert!(report.contains("model of family llama"), "{report}");
    assert!(report.contains("q8_0: 16 tensors"), "{report}");

    let lora = tmp.join("lora.gguf");
    ok(&[
        "export-gguf",
        "--model",
        &data("base"),
        "--adapter",
        &data("adapter_lora"),
        "--lora",
        "--out",
        lora.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    let report = ok(&["inspect", lora.to_str().unwrap()]);
    assert!(report.contains("adapter.lora.alpha = 8"), "{report}");
    assert!(report.contains("LoRA adapter of family llama"), "{report}");

    let report = ok(&["inspect", &data("adapter_dora")]);
    assert!(report.contains("DoRA true"), "{report}");
    let report = ok(&["inspect", &data("base_bnb4/model.safetensors")]);
    assert!(report.contains("bitsandbytes 4-bit"), "{report}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_options_and_unwritable_outputs_are_clear_errors() {
    let tmp = temp_dir("errors");
    let err = fails(&[
        "export-gguf",
        "--model",
        &data("base"),
        "--out",
        tmp.join("x.gguf").to_str().unwrap(),
        "--type",
        "iq4_nl",
    ]);
    assert!(err.contains("iq4_nl"), "{err}");
    let err = fails(&[
        "export-gguf",
        "--model",
        &data("base"),
        "--adapter",
        &data("adapter_dora"),
        "--lora",
        "--out",
        tmp.join("x.gguf").to_str().unwrap(),
        "--type",
        "f32",
    ]);
    assert!(err.contains("use_dora"), "{err}");
    let err = fails(&[
        "merge",
        "--model",
        &data("base"),
        "--adapter",
        &data("adapter_lora"),
        "--out",
        tmp.join("o").to_str().unwrap(),
        "--quantize",
        "int8",
    ]);
    assert!(err.contains("nf4"), "{err}");
    // An output under a regular file cannot be created, even by root.
    let blocker = tmp.join("file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let err = fails(&[
        "export-gguf",
        "--model",
        &data("base"),
        "--out",
        blocker.join("m.gguf").to_str().unwrap(),
    ]);
    assert!(err.contains("m.gguf"), "{err}");
    let err = fails(&[
        "merge",
        "--model",
        &data("base"),
        "--adapter",
        &data("adapter_lora"),
        "--out",
        blocker.join("out").to_str().unwrap(),
    ]);
    assert!(err.contains("file/out"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("file")],
        "nothing else was written"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
