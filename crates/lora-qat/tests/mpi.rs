//! `mpirun -np 2 lora-qat train` (a build with `--features mpi`) against one process on the
//! tiny reference Llama of `crates/lm/tests/data/llama`: with the same global batch the two
//! ranks give the adapter one process gives within 1e-6 relative, for LoRA, DoRA, QLoRA,
//! LoRA-QAT and teacher distillation, and a run resumes with another rank count.
//!
//! Runs only with the feature (`cargo test --release -p lora-qat --features mpi --test mpi`)
//! and skips, saying so, when `mpirun` is not on the PATH (`.ci/run` installs OpenMPI). The
//! failure tests (a killed rank, a stopped rank) are `#[ignore]`d: they take ~10–20 s
//! each; run them with `-- --ignored`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn base_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/data/llama/base")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-qat-mpi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether `mpirun` runs here; says so when it does not.
fn have_mpirun() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: no `mpirun` on the PATH (install openmpi-bin and libopenmpi-dev)");
    }
    ok
}

/// `mpirun -np N lora-qat train ...` (N = 1: the binary alone, no launcher).
fn train_command(ranks: usize, args: &[&str]) -> Command {
    let exe = env!("CARGO_BIN_EXE_lora-qat");
    let mut cmd = if ranks == 1 {
        Command::new(exe)
    } else {
        let mut cmd = Command::new("mpirun");
        cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            // Loopback only: the test never reaches beyond this machine.
            .args(["--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"])
            .arg(exe);
        cmd
    };
    cmd.arg("train").arg("--quiet").args(args);
    // One thread per rank: the two ranks share the machine's cores.
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

fn train(ranks: usize, args: &[&str]) -> Output {
    let out = train_command(ranks, args).output().unwrap();
    assert!(
        out.status.success(),
        "{ranks} rank(s): lora-qat train {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Twelve pre-tokenized examples of uneven lengths (ids below the vocabulary of 64).
fn jsonl_data(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let lines: Vec<String> = (0..12u32)
        .map(|a| {
            let ids: Vec<u32> = (0..5 + a % 5).map(|i| (a * 7 + i * 3) % 64).collect();
            format!("{{\"input_ids\": {ids:?}}}")
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Every tensor of a safetensors file as f32 (f32 files only, as the trainer writes them).
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Largest `max|a − b| / max|a|` over the tensors of two adapter files (same names).
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let mut worst = 0.0f64;
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        if scale > 0.0 {
            worst = worst.max(diff / scale);
        } else {
            assert_eq!(diff, 0.0, "{name}: zero on one side only");
        }
    }
    worst
}

/// `(step, total_loss, grad_norm)` per row of metrics.csv, parsed.
fn metrics(out: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (st, l, g) = (col("step"), col("total_loss"), col("grad_norm"));
    lines
        .map(|line| {
            let c: Vec<&str> = line.split(',').collect();
            (c[st].parse().unwrap(), c[l].parse().unwrap(), c[g].parse().unwrap())
        })
        .collect()
}

/// A config with two micro-batches of 3 per step (a global batch of 6) and a warm-up of 2
/// steps (LoRA-QAT calibrates at step 2).
fn config_file(dir: &Path) -> PathBuf {
    let path = dir.join("train.json");
    std::fs::write(
        &path,
        r#"{"batch_size": 3, "gradient_accumulation": 2, "seed": 5, "max_grad_norm": 1.0,
            "quant_warmup_steps": 2, "optimizer": {"lr": 0.01}}"#,
    )
    .unwrap();
    path
}

/// Trains `extra` on 1 and 2 ranks and returns the adapters' largest relative difference.
fn one_against_two(tag: &str, extra: &[&str], adapter_file: &str) -> f64 {
    let dir = temp_dir(tag);
    let data = jsonl_data(&dir);
    let config = config_file(&dir);
    let model = base_model();
    let common = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--config",
        s(&config),
        "--max-steps",
        "6",
        "--rank",
        "4",
        "--dropout",
        "0.1",
    ];
    let (one, two) = (dir.join("one"), dir.join("two"));
    train(1, &[&common[..], extra, &["--out", s(&one)]].concat());
    let out = train(2, &[&common[..], extra, &["--out", s(&two)]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("error"), "{stderr}");
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 6);
    assert_eq!(m2.len(), 6, "only rank 0 writes metrics.csv, once per step");
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() <= 1e-5 * a.1.abs().max(1.0), "{tag}: loss {a:?} {b:?}");
        assert!((a.2 - b.2).abs() <= 1e-4 * a.2.abs().max(1e-3), "{tag}: norm {a:?} {b:?}");
    }
    let worst = max_relative_difference(
        &one.join("adapter").join(adapter_file),
        &two.join("adapter").join(adapter_file),
    );
    eprintln!("{tag}: 2 ranks against 1 process, largest relative difference {worst:.3e}");
    std::fs::remove_dir_all(&dir).unwrap();
    worst
}

#[test]
fn two_ranks_give_the_lora_and_dora_adapters_of_one_process() {
    if !have_mpirun() {
        return;
    }
    for (tag, kind) in [("lora", "lora"), ("dora", "dora")] {
        let worst = one_against_two(tag, &["--adapter-type", kind], "adapter_model.safetensors");
        assert!(worst <= 1e-6, "{tag}: {worst:e}");
    }
}

#[test]
fn two_ranks_give_the_qlora_and_lora_qat_adapters_of_one_process() {
    if !have_mpirun() {
        return;
    }
    let qlora = one_against_two(
        "qlora",
        &["--adapter-type", "qlora", "--quantizer", "nf4"],
        "adapter_model.safetensors",
    );
    assert!(qlora <= 1e-6, "qlora: {qlora:e}");
    let qat = one_against_two(
        "lora-qat",
        &["--adapter-type", "lora-qat", "--quantizer", "uniform", "--bits", "3"],
        "adapter_model.safetensors",
    );
    assert!(qat <= 1e-6, "lora-qat: {qat:e}");
}

#[test]
fn two_ranks_distil_from_a_teacher_as_one_process_does() {
    if !have_mpirun() {
        return;
    }
    let teacher = base_model();
    let worst = one_against_two(
        "teacher",
        &["--teacher", s(&teacher)],
        "adapter_model.safetensors",
    );
    assert!(worst <= 1e-6, "teacher: {worst:e}");
}

#[test]
fn a_run_saved_on_two_ranks_resumes_on_one_and_back() {
    if !have_mpirun() {
        return;
    }
    let dir = temp_dir("resume");
    let data = jsonl_data(&dir);
    let config = config_file(&dir);
    let model = base_model();
    let common = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--config",
        s(&config),
        "--rank",
        "4",
        "--dropout",
        "0.1",
    ];
    let (straight, split) = (dir.join("straight"), dir.join("split"));
    train(1, &[&common[..], &["--max-steps", "9", "--out", s(&straight)]].concat());
    train(2, &[&common[..], &["--max-steps", "3", "--out", s(&split)]].concat());
    train(1, &[&common[..], &["--max-steps", "6", "--resume", "--out", s(&split)]].concat());
    train(2, &[&common[..], &["--max-steps", "9", "--resume", "--out", s(&split)]].concat());
    assert_eq!(metrics(&split).len(), 9);
    let worst = max_relative_difference(
        &straight.join("adapter/adapter_model.safetensors"),
        &split.join("adapter/adapter_model.safetensors"),
    );
    eprintln!("resume 2 → 1 → 2 ranks against one straight run: {worst:.3e}");
    assert!(worst <= 1e-6, "{worst:e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_step_that_cannot_be_shared_out_is_refused_by_name() {
    if !have_mpirun() {
        return;
    }
    let dir = temp_dir("split");
    let data = jsonl_data(&dir);
    let model = base_model();
    let out = train_command(
        2,
        &["--model", s(&model), "--data", s(&data), "--max-steps", "1", "--out", s(&dir.join("o"))],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gradient_accumulation = 1") && stderr.contains("multiple of 2"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The PIDs of `lora-qat` processes below `parent` (mpirun → ranks), from /proc.
fn rank_pids(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![parent];
    while let Some(pid) = queue.pop() {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == "lora-qat" {
                found.push(child);
            }
            queue.push(child);
        }
    }
    found.sort_unstable();
    found
}

/// Starts a long two-rank run, sends `signal` to its second rank after the first steps, and
/// returns the launcher's exit, stderr and how long it took to end after the signal.
fn signal_a_rank(tag: &str, signal: &str, timeout: &str) -> (bool, String, Duration) {
    let dir = temp_dir(tag);
    let data = jsonl_data(&dir);
    let config = config_file(&dir);
    let model = base_model();
    let out = dir.join("out");
    let mut child = train_command(
        2,
        &[
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--config",
            s(&config),
            "--max-steps",
            "1000000",
            "--collective-timeout",
            timeout,
            "--out",
            s(&out),
        ],
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let started = Instant::now();
    let ranks = loop {
        let pids = rank_pids(child.id());
        if pids.len() == 2 || started.elapsed() > Duration::from_secs(30) {
            break pids;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ranks.len(), 2, "two ranks did not start");
    std::thread::sleep(Duration::from_secs(3));
    // The higher PID is not necessarily rank 1; either rank will do.
    let victim = ranks[1];
    let status = Command::new("kill").args([signal, &victim.to_string()]).status().unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    let deadline = Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if signalled.elapsed() > deadline {
            let _ = child.kill();
            panic!("{tag}: the job did not end within {deadline:?} of {signal}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = signalled.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    // A stopped rank survives its job's end only when the launcher could not kill it.
    let _ = Command::new("kill").args(["-9", &victim.to_string()]).status();
    let _ = std::fs::remove_dir_all(&dir);
    (exit.success(), stderr, took)
}

#[test]
#[ignore = "takes ~10 s; run with --ignored"]
fn a_killed_rank_ends_the_job_with_an_error() {
    if !have_mpirun() {
        return;
    }
    let (ok, stderr, took) = signal_a_rank("killed", "-9", "600");
    eprintln!("killed rank: job ended {took:?} later:\n{stderr}");
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("signal 9") || stderr.contains("Killed"), "{stderr}");
}

#[test]
#[ignore = "takes ~15 s; run with --ignored"]
fn a_hanging_rank_ends_the_job_after_the_collective_timeout() {
    if !have_mpirun() {
        return;
    }
    let (ok, stderr, took) = signal_a_rank("stopped", "-STOP", "3");
    eprintln!("stopped rank: job ended {took:?} later:\n{stderr}");
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("no progress for 3.0 s"), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}
