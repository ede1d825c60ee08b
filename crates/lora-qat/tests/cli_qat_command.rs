//! `lora-qat qat` on the tiny Llama of `crates/lm/tests/data/llama`: the PTQ-vs-QAT table is
//! printed and every file written (PTQ and QAT GGUF in llama.cpp's type mix, report, loss
//! curve, the data-free sequences); Ctrl-C saves a checkpoint and `--resume` ends with the
//! very file an uninterrupted run writes; refused options are named.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quant_core::ggml::GgmlType;
use quant_core::gguf::GgufFile;

mod common;
use common::{base_model, bin, fails, jsonl_data, ok, run, s, temp_dir};

fn qat_args(out: &Path, steps: &str) -> Vec<String> {
    let model = base_model();
    [
        "qat",
        "--quiet",
        "--model",
        s(&model),
        "--type",
        "q4_0",
        "--out",
        s(out),
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--rank",
        "4",
        "--lr",
        "0.01",
        "--ctx",
        "16",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn tensor_type(path: &Path, name: &str) -> GgmlType {
    GgufFile::open(path).unwrap().tensor(name).unwrap().ty
}

#[test]
fn data_free_run_prints_the_table_and_writes_every_file() {
    let dir = temp_dir("qat-free");
    let out = dir.join("m-q4_0.gguf");
    let stdout = ok(&strs(&qat_args(&out, "3")));
    assert!(stdout.contains("| PTQ (`m-q4_0-ptq.gguf`) |"), "{stdout}");
    assert!(stdout.contains("| LoRA-QAT (`m-q4_0.gguf`) |"), "{stdout}");
    for f in [
        "m-q4_0.gguf",
        "m-q4_0-ptq.gguf",
        "m-q4_0-report.md",
        "m-q4_0-loss.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(dir.join("m-q4_0-report.md")).unwrap();
    assert!(report.contains("data-free KD on 6 sequences"), "{report}");
    assert!(report.contains("another seed"), "{report}");
    // Steps × batch sequences the teacher wrote, each starting with an allowed token.
    let seqs = std::fs::read_to_string(dir.join("m-q4_0.qat/teacher-sequences.jsonl")).unwrap();
    assert_eq!(seqs.lines().count(), 6);
    let metrics = std::fs::read_to_string(dir.join("m-q4_0.qat/metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    // llama.cpp's mix: projections in the type, the output matrix (rows of 32, not whole
    // Q6_K super-blocks) in Q8_0, the untied embedding in the type.
    for file in ["m-q4_0-ptq.gguf", "m-q4_0.gguf"] {
        let path = dir.join(file);
        assert_eq!(tensor_type(&path, "blk.0.attn_q.weight"), GgmlType::Q4_0);
        assert_eq!(
            tensor_type(&path, "output.weight"),
            GgmlType::Q8_0,
            "{file}"
        );
        assert_eq!(
            tensor_type(&path, "token_embd.weight"),
            GgmlType::Q4_0,
            "{file}"
        );
        assert_eq!(tensor_type(&path, "blk.0.attn_norm.weight"), GgmlType::F32);
    }
    // The QAT file holds other blocks than the PTQ one (the adapters and scales trained).
    assert_ne!(
        std::fs::read(dir.join("m-q4_0.gguf")).unwrap(),
        std::fs::read(dir.join("m-q4_0-ptq.gguf")).unwrap()
    );
}

#[test]
fn with_data_the_table_is_on_a_held_out_tenth() {
    let dir = temp_dir("qat-data");
    let data = jsonl_data(&dir);
    let out = dir.join("d.gguf");
    let mut args = qat_args(&out, "2");
    let ctx = args.iter().position(|a| a == "--ctx").unwrap();
    args[ctx + 1] = "4".into();
    args.extend(["--data", s(&data)].map(String::from));
    let stdout = ok(&strs(&args));
    assert!(stdout.contains("LoRA-QAT"), "{stdout}");
    let report = std::fs::read_to_string(dir.join("d-report.md")).unwrap();
    assert!(report.contains("10% of --data held out"), "{report}");
    assert!(!dir.join("d.qat/teacher-sequences.jsonl").exists());
}

/// Polls `metrics` until it has at least `rows` step rows or `child` ends.
fn wait_for_rows(child: &mut std::process::Child, metrics: &Path, rows: usize) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(text) = std::fs::read_to_string(metrics) {
            if text.lines().count() > rows {
                return true;
            }
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_file() {
    let steps = "400";
    let dir = temp_dir("qat-resume");
    let straight = dir.join("a.gguf");
    ok(&strs(&qat_args(&straight, steps)));

    let out = dir.join("b.gguf");
    let mut child = bin().args(qat_args(&out, steps)).spawn().unwrap();
    assert!(
        wait_for_rows(&mut child, &dir.join("b.qat/metrics.csv"), 2),
        "the run ended before it could be interrupted"
    );
    let interrupt = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted run reports failure");
    assert!(dir.join("b.qat/checkpoint.json").is_file());
    assert!(!out.exists(), "no QAT file before the run is complete");
    let metrics = std::fs::read_to_string(dir.join("b.qat/metrics.csv")).unwrap();
    let done = metrics.lines().count() - 1;
    assert!(done < 400, "interrupted after {done} steps");

    let mut resume = qat_args(&out, steps);
    resume.push("--resume".into());
    ok(&strs(&resume));
    let metrics = std::fs::read_to_string(dir.join("b.qat/metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 401);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&straight).unwrap(),
        "resumed after step {done}: the file differs from the uninterrupted run's"
    );
}

#[test]
fn refused_options_are_named() {
    let dir = temp_dir("qat-refused");
    let out = dir.join("r.gguf");
    let with = |extra: &[&str], ty: &str| -> String {
        let mut args = qat_args(&out, "2");
        let i = args.iter().position(|a| a == "q4_0").unwrap();
        args[i] = ty.to_string();
        args.extend(extra.iter().map(|e| e.to_string()));
        fails(&strs(&args))
    };
    assert!(with(&[], "f16").contains("--type f16"));
    assert!(with(&[], "q2_k").contains("--type q2_k"));
    assert!(with(&["--resume"], "q4_0").contains("checkpoint.json"));
    let data: PathBuf = jsonl_data(&dir);
    assert!(with(&["--data", s(&data), "--sequences", "4"], "q4_0").contains("--sequences"));
    assert!(with(&["--temperature", "0"], "q4_0").contains("--temperature"));
    let err = String::from_utf8_lossy(&run(&["qat", "--type", "q4_0"]).stderr).into_owned();
    assert!(err.contains("--model"), "{err}");
}
