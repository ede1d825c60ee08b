//! Project chores, run as `cargo xtask <task>`.
//!
//! * `ci` — what CI runs: `cargo fmt --check`, `cargo clippy -D warnings` on every target,
//!   the whole test suite in release (unit, integration and doc tests), and a smoke run of
//!   every criterion bench in `--test` mode (each benchmark body runs once), then — where
//!   `mpirun` is on the PATH — clippy and the MPI tests of the `mpi` feature
//!   (`mpirun -np 2 lora-qat train` against one process); elsewhere it says they are skipped.
//! * `bench` — the criterion benches for real (`cargo bench --workspace`), extra arguments
//!   passed through to criterion.
//! * `golden` — checks that the reference files copied into the crates are identical to
//!   `../shared/golden/` when that directory exists beside the repository.
//! * `interop [--only CHECKS] [--strict] [--seed N]`, `bench-compare`, `real-model` — developer
//!   tools against the Python references and the real SmolLM2 model (`interop.rs`,
//!   docs/INTEROP.md); they need Python and the network, CI never runs them.

mod interop;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let result = match task {
        "ci" => ci(),
        "bench" => run("cargo", &bench_args(&args[1..])),
        "golden" => golden(),
        "interop" => interop::interop(&args[1..]),
        "bench-compare" => interop::bench_compare(),
        "real-model" => interop::real_model(),
        _ => {
            eprintln!(
                "usage: cargo xtask <ci | bench [criterion args] | golden | interop [--only \
                 CHECKS] [--strict] [--seed N] | bench-compare | real-model>"
            );
            return if task == "help" || task == "--help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask {task}: {message}");
            ExitCode::FAILURE
        }
    }
}

fn bench_args(extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ["bench", "--workspace"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !extra.is_empty() {
        v.push("--".into());
        v.extend(extra.iter().cloned());
    }
    v
}

fn ci() -> Result<(), String> {
    let steps: [(&str, &[&str]); 4] = [
        ("format", &["fmt", "--all", "--", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ],
        ),
        // Unit, integration and doc tests of every crate, optimised (the numeric tests are
        // too slow in debug).
        ("tests", &["test", "--workspace", "--release"]),
        // Each criterion benchmark body runs once: benches stay compiling and correct.
        ("bench smoke", &["bench", "--workspace", "--", "--test"]),
    ];
    let total = Instant::now();
    for (name, args) in steps {
        let start = Instant::now();
        eprintln!("==> xtask ci: {name}: cargo {}", args.join(" "));
        run("cargo", args)?;
        eprintln!(
            "==> xtask ci: {name} passed in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
    mpi_tests()?;
    eprintln!(
        "==> xtask ci: all steps passed in {:.1}s",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The `mpi` feature's clippy and tests, where an MPI launcher exists (`.ci/run` installs
/// OpenMPI); otherwise says they are skipped.
fn mpi_tests() -> Result<(), String> {
    let have_mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_mpirun {
        eprintln!(
            "==> xtask ci: MPI tests SKIPPED: no `mpirun` on the PATH (install openmpi-bin, \
             libopenmpi-dev and libclang-dev, as .ci/run does)"
        );
        return Ok(());
    }
    let steps: [(&str, &[&str]); 2] = [
        (
            "clippy (mpi)",
            &[
                "clippy",
                "-p",
                "qat-train",
                "-p",
                "lora-qat",
                "--features",
                "lora-qat/mpi",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "MPI tests (mpirun -np 2)",
            &[
                "test",
                "--release",
                "-p",
                "lora-qat",
                "--features",
                "mpi",
                "--test",
                "mpi",
            ],
        ),
    ];
    for (name, args) in steps {
        let start = Instant::now();
        eprintln!("==> xtask ci: {name}: cargo {}", args.join(" "));
        run("cargo", args)?;
        eprintln!(
            "==> xtask ci: {name} passed in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub(crate) fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let status = Command::new(program)
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("could not start `{program}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Every file under `crates/*/tests/data/` whose name and size match a file in
/// `../shared/golden/` must be byte-identical to it.
fn golden() -> Result<(), String> {
    let root = workspace_root();
    let shared = root.join("../shared/golden");
    if !shared.is_dir() {
        eprintln!(
            "xtask golden: no {} beside the repository; nothing to compare",
            shared.display()
        );
        return Ok(());
    }
    let mut references = Vec::new();
    collect_files(&shared, &mut references).map_err(|e| e.to_string())?;
    let mut copies = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).map_err(|e| e.to_string())? {
        let data = krate.map_err(|e| e.to_string())?.path().join("tests/data");
        if data.is_dir() {
            collect_files(&data, &mut copies).map_err(|e| e.to_string())?;
        }
    }
    let (mut checked, mut differing) = (0usize, Vec::new());
    for copy in &copies {
        let Some(rel) = relative_to_golden(copy) else {
            continue;
        };
        let reference = shared.join(&rel);
        if !reference.is_file() {
            continue;
        }
        checked += 1;
        let a = std::fs::read(copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        let b = std::fs::read(&reference).map_err(|e| format!("{}: {e}", reference.display()))?;
        if a != b {
            differing.push(format!(
                "{} differs from {}",
                copy.display(),
                reference.display()
            ));
        }
    }
    eprintln!("xtask golden: {checked} copied reference files compared");
    if differing.is_empty() {
        Ok(())
    } else {
        Err(differing.join("\n"))
    }
}

/// `crates/x/tests/data/nf4/a.safetensors` → `nf4/a.safetensors`.
fn relative_to_golden(path: &Path) -> Option<PathBuf> {
    let s = path.to_string_lossy();
    let idx = s.find("/tests/data/")?;
    Some(PathBuf::from(&s[idx + "/tests/data/".len()..]))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}
