//! The main job end to end through the binary: `lora-qat demo --quick --json` with the
//! committed teacher (the CI smoke run), `lora-qat eval` on what it wrote, and (ignored: it
//! runs the quick demo twice) Ctrl-C then `--resume`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-qat"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-qat-cli-demo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn demo_args(dir: &Path) -> Vec<String> {
    vec![
        "demo".into(),
        "--quick".into(),
        "--runs-dir".into(),
        dir.join("runs").display().to_string(),
        "--work-dir".into(),
        dir.join("work").display().to_string(),
        "--json".into(),
        dir.join("summary.json").display().to_string(),
    ]
}

/// The only directory under `runs/`.
fn run_dir(dir: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.into_iter().next().unwrap()
}

fn check_summary(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let teacher = json["teacher_accuracy"].as_f64().unwrap();
    assert!(
        teacher >= 0.95,
        "the committed teacher solves the task: {json}"
    );
    let rows = json["rows"].as_array().unwrap();
    let bits: Vec<u64> = rows.iter().map(|r| r["bits"].as_u64().unwrap()).collect();
    assert_eq!(bits, vec![4, 3, 2]);
    for r in rows {
        for key in ["ptq_accuracy", "qat_accuracy"] {
            let a = r[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&a), "{key} = {a}");
        }
    }
    assert!(json["seconds"].as_f64().unwrap() > 0.0);
    json
}

#[test]
fn quick_demo_writes_the_table_report_and_adapters_and_eval_reads_them() {
    let dir = temp_dir("quick");
    let out = bin().args(demo_args(&dir)).output().unwrap();
    check(&out, "demo --quick");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| fp32 teacher |"), "{stdout}");
    let json = check_summary(&dir);
    // Even the short run keeps most of the teacher's accuracy at 3 bits.
    let teacher = json["teacher_accuracy"].as_f64().unwrap();
    let three = &json["rows"][1];
    assert!(
        three["qat_accuracy"].as_f64().unwrap() >= 0.9 * teacher,
        "{json}"
    );

    let run = run_dir(&dir);
    for file in [
        "report.md",
        "summary.json",
        "loss_curves.png",
        "metrics-2bit.csv",
        "test.jsonl",
        "adapters/2bit/adapter_config.json",
        "adapters/2bit/adapter_model.safetensors",
        "adapters/2bit/qat_quantizers.safetensors",
    ] {
        assert!(
            run.join(file).is_file(),
            "{file} missing in {}",
            run.display()
        );
    }
    let png = std::fs::read(run.join("loss_curves.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let csv = std::fs::read_to_string(run.join("metrics-2bit.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 40, "a header and one row per step");

    // The 2-bit adapter, merged and quantized, graded again by `eval` on the same problems.
    let teacher_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-teacher");
    let out = bin()
        .args(["eval", "--model", teacher_dir, "--adapter"])
        .arg(run.join("adapters/2bit"))
        .arg("--data")
        .arg(run.join("test.jsonl"))
        .output()
        .unwrap();
    check(&out, "eval");
    let text = String::from_utf8_lossy(&out.stdout);
    let qat_two = json["rows"][2]["qat_accuracy"].as_f64().unwrap();
    let expected = format!("exact-match {:.2}%", 100.0 * qat_two);
    assert!(text.contains("perplexity"), "{text}");
    assert!(text.contains(&expected), "expected {expected:?} in {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_without_an_interrupted_run_says_so() {
    let dir = temp_dir("no-state");
    let mut args = demo_args(&dir);
    args.push("--resume".into());
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("demo-state.json"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends SIGINT while LoRA-QAT trains, then resumes: the run finishes in the same
/// directory with the full table. Runs the quick demo about twice.
#[test]
#[ignore = "runs the quick demo twice (about a minute); run with --ignored"]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let dir = temp_dir("resume");
    let child = bin()
        .args(demo_args(&dir))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The teacher and the 4-bit PTQ evaluations come first; then LoRA-QAT trains.
    std::thread::sleep(Duration::from_secs(8));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stopped early: {stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(dir.join("work/demo-state.json").is_file());
    let interrupted_run = run_dir(&dir);

    let mut args = demo_args(&dir);
    args.push("--resume".into());
    let out = bin().args(args).output().unwrap();
    check(&out, "demo --resume");
    check_summary(&dir);
    assert_eq!(
        run_dir(&dir),
        interrupted_run,
        "the resumed run writes where it started"
    );
    assert!(interrupted_run.join("report.md").is_file());
    assert!(!dir.join("work/demo-state.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
