//! `lora-qat bench layer` at tiny sizes: one JSON line per benchmark, in order.

use std::process::Command;

#[test]
fn bench_layer_prints_one_json_object_per_benchmark() {
    let output = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args(["bench", "layer", "--m", "8", "--d", "64", "--r", "4"])
        .args(["--runs", "1", "--json"])
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    let names: Vec<&str> = lines.iter().map(|v| v["bench"].as_str().unwrap()).collect();
    assert_eq!(names, ["lora_fwd_bwd", "qlora_fwd_bwd", "lora_qat_fwd_bwd"]);
    for line in &lines {
        let ms = line["ms"].as_f64().unwrap();
        assert!(ms.is_finite() && ms >= 0.0, "{line}");
        assert_eq!(line["runs"].as_u64(), Some(1));
    }
}

#[test]
fn bench_layer_rejects_a_rank_above_the_width() {
    let output = Command::new(env!("CARGO_BIN_EXE_lora-qat"))
        .args([
            "bench", "layer", "--m", "8", "--d", "4", "--r", "8", "--runs", "1",
        ])
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("r <= d"));
}
