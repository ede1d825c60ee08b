//! `mpirun -np 2 lora-qat train` (a build with `--features mpi`) against one process on the
//! tiny reference Llama of `crates/lm/tests/data/llama`: with the same global batch, ranks of
//! one micro-batch each give the adapter one process gives bit for bit (LoRA, DoRA, QLoRA,
//! LoRA-QAT, teacher distillation; 2 and 4 ranks), ranks of several micro-batches within 1e-6
//! relative, and a run resumes with another rank count.
//!
//! Runs only with the feature (`cargo test --release -p lora-qat --features mpi --test mpi`)
//! and skips, saying so, when `mpirun` is not on the PATH (`.ci/run` installs OpenMPI). The
//! failure tests (a killed rank, a stopped rank) are `#[ignore]`d: they take ~10–20 s
//! each; run them with `-- --ignored`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{base_model, jsonl_data, s, temp_dir};

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
            .args([
                "--mca",
                "btl_tcp_if_include",
                "lo",
                "--mca",
                "oob_tcp_if_include",
                "lo",
            ])
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

/// Over the tensors of two adapter files (same names): the largest `max|a − b| / max|a|` and
/// the largest `‖a − b‖ / ‖a‖` (Frobenius).
fn relative_differences(a: &Path, b: &Path) -> (f64, f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let (mut worst_max, mut worst_norm) = (0.0f64, 0.0f64);
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
        let norm = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        let diff_norm = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from(p - q).powi(2))
            .sum::<f64>()
            .sqrt();
        if scale > 0.0 {
            worst_max = worst_max.max(diff / scale);
            worst_norm = worst_norm.max(diff_norm / norm);
        } else {
            assert_eq!(diff, 0.0, "{name}: zero on one side only");
        }
    }
    (worst_max, worst_norm)
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
            (
                c[st].parse().unwrap(),
                c[l].parse().unwrap(),
                c[g].parse().unwrap(),
            )
        })
        .collect()
}

/// A config with `accumulation` micro-batches of 2 per step and a warm-up of 2 steps
/// (LoRA-QAT calibrates at step 2).
fn config_file(dir: &Path, accumulation: usize) -> PathBuf {
    let path = dir.join("train.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"batch_size": 2, "gradient_accumulation": {accumulation}, "seed": 5,
                "max_grad_norm": 1.0, "quant_warmup_steps": 2,
                "optimizer": {{"lr": 0.01, "quantizer_lr": 0.00001}}}}"#
        ),
    )
    .unwrap();
    path
}

/// Trains `extra` for 6 steps of `accumulation` micro-batches on 1 process and on `ranks`
/// ranks; returns the adapters' relative differences (max-abs, Frobenius).
fn one_against(ranks: usize, accumulation: usize, tag: &str, extra: &[&str]) -> (f64, f64) {
    let dir = temp_dir(tag);
    let data = jsonl_data(&dir);
    let config = config_file(&dir, accumulation);
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
    ];
    let (one, many) = (dir.join("one"), dir.join("many"));
    train(1, &[&common[..], extra, &["--out", s(&one)]].concat());
    let out = train(ranks, &[&common[..], extra, &["--out", s(&many)]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("error: rank"), "{stderr}");
    let (m1, m2) = (metrics(&one), metrics(&many));
    assert_eq!(m1.len(), 6);
    assert_eq!(m2.len(), 6, "only rank 0 writes metrics.csv, once per step");
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a.0, b.0);
        assert!(
            (a.1 - b.1).abs() <= 1e-5 * a.1.abs().max(1.0),
            "{tag}: loss {a:?} {b:?}"
        );
        assert!(
            (a.2 - b.2).abs() <= 1e-4 * a.2.abs().max(1e-3),
            "{tag}: norm {a:?} {b:?}"
        );
    }
    let file = "adapter/adapter_model.safetensors";
    let (max_rel, norm_rel) = relative_differences(&one.join(file), &many.join(file));
    eprintln!(
        "{tag}: {ranks} ranks x {} micro-batch(es) against 1 process: max|d|/max|a| = \
         {max_rel:.3e}, |d|/|a| = {norm_rel:.3e}",
        accumulation / ranks
    );
    std::fs::remove_dir_all(&dir).unwrap();
    (max_rel, norm_rel)
}

/// Two ranks of one micro-batch each: the rank-ordered sum is one process's order, so the
/// adapters are equal bit for bit; returns the largest difference.
fn one_against_two(tag: &str, extra: &[&str]) -> f64 {
    one_against(2, 2, tag, extra).0
}

#[test]
fn two_ranks_give_the_lora_and_dora_adapters_of_one_process() {
    if !have_mpirun() {
        return;
    }
    for kind in ["lora", "dora"] {
        let worst = one_against_two(kind, &["--adapter-type", kind, "--dropout", "0.1"]);
        assert_eq!(worst, 0.0, "{kind}: {worst:e}");
    }
}

#[test]
fn two_ranks_give_the_qlora_and_lora_qat_adapters_of_one_process() {
    if !have_mpirun() {
        return;
    }
    let qlora = one_against_two(
        "qlora",
        &[
            "--adapter-type",
            "qlora",
            "--quantizer",
            "nf4",
            "--dropout",
            "0.1",
        ],
    );
    assert_eq!(qlora, 0.0, "qlora: {qlora:e}");
    let qat = one_against_two(
        "lora-qat",
        &[
            "--adapter-type",
            "lora-qat",
            "--quantizer",
            "uniform",
            "--bits",
            "3",
        ],
    );
    assert_eq!(qat, 0.0, "lora-qat: {qat:e}");
}

#[test]
fn two_ranks_distil_from_a_teacher_as_one_process_does() {
    if !have_mpirun() {
        return;
    }
    let teacher = base_model();
    let worst = one_against_two("teacher", &["--teacher", s(&teacher), "--dropout", "0.1"]);
    assert_eq!(worst, 0.0, "teacher: {worst:e}");
}

#[test]
fn four_ranks_of_one_micro_batch_each_give_one_process_bit_for_bit() {
    if !have_mpirun() {
        return;
    }
    let (worst, _) = one_against(4, 4, "four", &["--dropout", "0.1"]);
    assert_eq!(worst, 0.0, "{worst:e}");
}

/// Two micro-batches per rank: `(g0 + g1) + (g2 + g3)` against one process's
/// `((g0 + g1) + g2) + g3`, equal up to rounding.
#[test]
fn two_ranks_of_two_micro_batches_each_agree_within_1e_6() {
    if !have_mpirun() {
        return;
    }
    let (max_rel, norm_rel) = one_against(2, 4, "blocks", &["--dropout", "0.1"]);
    assert!(norm_rel <= 1e-6, "|d|/|a| = {norm_rel:e}");
    assert!(max_rel <= 1e-5, "max|d|/max|a| = {max_rel:e}");
}

#[test]
fn a_run_saved_on_two_ranks_resumes_on_one_and_back() {
    if !have_mpirun() {
        return;
    }
    let dir = temp_dir("resume");
    let data = jsonl_data(&dir);
    let config = config_file(&dir, 2);
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
    train(
        1,
        &[&common[..], &["--max-steps", "9", "--out", s(&straight)]].concat(),
    );
    train(
        2,
        &[&common[..], &["--max-steps", "3", "--out", s(&split)]].concat(),
    );
    train(
        1,
        &[
            &common[..],
            &["--max-steps", "6", "--resume", "--out", s(&split)],
        ]
        .concat(),
    );
    train(
        2,
        &[
            &common[..],
            &["--max-steps", "9", "--resume", "--out", s(&split)],
        ]
        .concat(),
    );
    assert_eq!(metrics(&split).len(), 9);
    let (worst, _) = relative_differences(
        &straight.join("adapter/adapter_model.safetensors"),
        &split.join("adapter/adapter_model.safetensors"),
    );
    eprintln!("resume 2 -> 1 -> 2 ranks against one straight run: {worst:.3e}");
    assert_eq!(worst, 0.0, "{worst:e}");
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
        &[
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--max-steps",
            "1",
            "--out",
            s(&dir.join("o")),
        ],
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

/// Ranks started with different arguments (MPMD: another seed, so another adapter init and
/// RNG) fail together at the start, each naming what differs, instead of drifting apart.
#[test]
fn ranks_that_disagree_fail_together_naming_the_difference() {
    if !have_mpirun() {
        return;
    }
    let dir = temp_dir("disagree");
    let data = jsonl_data(&dir);
    let config = config_file(&dir, 2);
    let model = base_model();
    let exe = env!("CARGO_BIN_EXE_lora-qat");
    let rank_args = |seed: &'static str| {
        vec![
            "-np".to_string(),
            "1".into(),
            exe.into(),
            "train".into(),
            "--quiet".into(),
            "--model".into(),
            s(&model).into(),
            "--data".into(),
            s(&data).into(),
            "--config".into(),
            s(&config).into(),
            "--seed".into(),
            seed.into(),
            "--max-steps".into(),
            "2".into(),
            "--out".into(),
            s(&dir.join("out")).into(),
        ]
    };
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args(rank_args("5"))
        .arg(":")
        .args(rank_args("6"))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: rank 1 of 2: invalid run state"),
        "{stderr}"
    );
    assert!(
        stderr.contains("differs from rank 0 (RNG seed: 6 here, 5 on rank 0)"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The PIDs of `lora-qat` processes below `parent` (mpirun → ranks), from /proc.
fn rank_pids(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![parent];
    while let Some(pid) = queue.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
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
    let config = config_file(&dir, 2);
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
    let status = Command::new("kill")
        .args([signal, &victim.to_string()])
        .status()
        .unwrap();
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
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // A stopped rank survives its job's end only when the launcher could not kill it.
    let _ = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
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
    assert!(
        stderr.contains("signal 9") || stderr.contains("Killed"),
        "{stderr}"
    );
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

/// Median `tokens / seconds` of the steps after the first, from metrics.csv.
fn median_tokens_per_second(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (t, sec) = (col("tokens"), col("seconds"));
    let mut rates: Vec<f64> = lines
        .skip(1)
        .map(|line| {
            let c: Vec<&str> = line.split(',').collect();
            c[t].parse::<f64>().unwrap() / c[sec].parse::<f64>().unwrap()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// The measurement of docs/SCALING.md: the shape of `lora-qat bench train` (random Llama,
/// width 512, 8 layers, 8 heads, MLP 1408, vocab 4096, LoRA r = 16 on all seven projections,
/// 4 sequences of 256 tokens per step) trained by `lora-qat train` as 2 ranks × 1 thread
/// against 1 process × 2 threads (and × 1 thread), the same global batch (2 micro-batches of
/// 2). Run alone on a quiet machine:
/// `cargo test --release -p lora-qat --features mpi --test mpi -- --ignored --nocapture bench_shape`.
#[test]
#[ignore = "a measurement (~2 min on 2 cores); run with --ignored --nocapture"]
fn bench_shape_two_ranks_against_two_threads() {
    if !have_mpirun() {
        return;
    }
    use rand::{Rng, SeedableRng};
    let dir = temp_dir("bench");
    let mut config = lm::LlamaConfig::new(4096, 512, 1408, 8, 8, 8).unwrap();
    config.max_position_embeddings = 256;
    let model_dir = dir.join("model");
    lm::LlamaModel::random(config, 0)
        .unwrap()
        .save_pretrained(&model_dir)
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let lines: Vec<String> = (0..32)
        .map(|_| {
            let ids: Vec<u32> = (0..256).map(|_| rng.random_range(0..4096u32)).collect();
            format!("{{\"input_ids\": {ids:?}}}")
        })
        .collect();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let train_json = dir.join("train.json");
    std::fs::write(
        &train_json,
        r#"{"batch_size": 2, "gradient_accumulation": 2, "max_steps": 6, "optimizer": {"lr": 0.0001}}"#,
    )
    .unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "--model",
            s(&model_dir),
            "--data",
            s(&data),
            "--config",
            s(&train_json),
            "--rank",
            "16",
            "--out",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let mut results = Vec::new();
    for (label, ranks, threads) in [
        ("1 process x 2 threads", 1, "2"),
        ("2 ranks x 1 thread", 2, "1"),
        ("1 process x 1 thread", 1, "1"),
    ] {
        let out = dir.join(format!("out-{ranks}-{threads}"));
        let a = args(&out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut cmd = train_command(ranks, &a);
        cmd.env("RAYON_NUM_THREADS", threads);
        let output = cmd.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rate = median_tokens_per_second(&out);
        eprintln!("{label}: {rate:.0} tokens/s (median of steps 2-6, global batch 4 x 256)");
        results.push(rate);
    }
    eprintln!(
        "2 ranks x 1 thread / 1 process x 2 threads = {:.2}; / 1 process x 1 thread = {:.2}",
        results[1] / results[0],
        results[1] / results[2]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
