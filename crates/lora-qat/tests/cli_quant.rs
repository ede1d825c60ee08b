//! End-to-end tests of `lora-qat quantize` and `lora-qat bench quant` through the binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use quant_core::io::OwnedTensor;
use safetensors::SafeTensors;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-qat"))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-qat-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TINY: &str = "examples/tiny-llama/model.safetensors";
const BNB4: &str = "crates/quant-core/tests/data/llama/base_bnb4_model.safetensors";

/// Quantizing the shipped checkpoint's projections to NF4 + double quant writes the same
/// tensors, under the same names and shapes, as transformers + bitsandbytes saved for it.
#[test]
fn nf4_output_matches_the_bitsandbytes_checkpoint() {
    let dir = temp_dir("nf4");
    let out = dir.join("q.safetensors");
    let status = bin()
        .args([
            "quantize",
            "--method",
            "nf4",
            "--double-quant",
            "--blocksize",
            "64",
        ])
        .args(["--include", r"model\.layers\..*_proj\.weight"])
        .arg(repo_file(TINY))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("14 tensors"), "{stdout}");
    assert!(
        stdout.contains("rmse") && stdout.contains("bits/w"),
        "{stdout}"
    );

    let ours = std::fs::read(&out).unwrap();
    let ours = SafeTensors::deserialize(&ours).unwrap();
    let reference = std::fs::read(repo_file(BNB4)).unwrap();
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let mut ours_names: Vec<_> = ours.names();
    let mut ref_names: Vec<_> = reference.names();
    ours_names.sort();
    ref_names.sort();
    assert_eq!(
        ours_names, ref_names,
        "same tensor names as the bnb checkpoint"
    );

    let mut differing = Vec::new();
    for name in ref_names {
        let (a, b) = (ours.tensor(name).unwrap(), reference.tensor(name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}");
        if a.data() != b.data() {
            differing.push(name.to_string());
        }
    }
    // Every tensor is bit-identical to the checkpoint transformers wrote.
    assert_eq!(differing, Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn uniform_and_pi_outputs_read_back_in_the_packed_layout() {
    let dir = temp_dir("uniform");
    for (method, extra) in [
        (
            "uniform",
            vec!["--bits", "3", "--granularity", "per-channel"],
        ),
        (
            "pi",
            vec![
                "--bits",
                "2",
                "--granularity",
                "per-block:16",
                "--asymmetric",
            ],
        ),
        (
            "uniform",
            vec!["--bits", "8", "--granularity", "per-tensor", "--mse-clip"],
        ),
    ] {
        let out = dir.join(format!("{method}.safetensors"));
        let output = bin()
            .args(["quantize", "--method", method])
            .args(&extra)
            .arg(repo_file(TINY))
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bytes = std::fs::read(&out).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        // Norm weights (1-D) are copied unchanged.
        assert!(file.names().contains(&"model.norm.weight"));
        let source = std::fs::read(repo_file(TINY)).unwrap();
        let source = SafeTensors::deserialize(&source).unwrap();
        let (q, state) =
            quant_core::packed_layout::from_tensors("model.layers.1.mlp.up_proj.weight", |k| {
                file.tensor(k).ok().map(|v| OwnedTensor::from_view(&v))
            })
            .unwrap();
        assert_eq!(state.shape, (64, 32));
        let w = quant_core::io::tensor_to_f32(
            "up",
            &source.tensor("model.layers.1.mlp.up_proj.weight").unwrap(),
        )
        .unwrap();
        let w = ndarray::Array2::from_shape_vec((64, 32), w).unwrap();
        let rmse = q.error_stats(w.view()).unwrap().rmse;
        let bits = state.bits as i32;
        let w_rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt() as f64;
        assert!(
            rmse < w_rms * 4.0 / 2f64.powi(bits),
            "{method}: rmse {rmse} at {bits} bits"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_no_output() {
    let dir = temp_dir("errors");
    let out = dir.join("never.safetensors");
    let cases: [(&[&str], &str); 4] = [
        (&["--method", "uniform", "--bits", "9"], "9 bits"),
        (&["--method", "nf4", "--blocksize", "48"], "blocksize"),
        (&["--include", "no_such_tensor"], "matches --include"),
        (&["--include", "(unclosed"], "--include"),
    ];
    for (args, expected) in cases {
        let output = bin()
            .arg("quantize")
            .args(args)
            .arg(repo_file(TINY))
            .arg(&out)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
    let not_safetensors = dir.join("notes.txt");
    std::fs::write(&not_safetensors, "hello").unwrap();
    let output = bin()
        .arg("quantize")
        .arg(&not_safetensors)
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("notes.txt"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_quant_prints_json_lines() {
    let output = bin()
        .args(["bench", "quant", "--json", "--runs", "1"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let benches: Vec<String> = stdout
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["ms"].as_f64().unwrap() > 0.0, "{line}");
            assert!(v["runs"].as_u64().unwrap() >= 1, "{line}");
            v["bench"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        benches,
        ["nf4_quantize_4096", "nf4_dequantize_4096", "hadamard_4096"]
    );
}
