//! `--compute-dtype`: bench train names its bf16 row and reports the dtype; an unknown dtype is
//! refused with the supported names. (The numbers of the bf16 path are tested in
//! crates/lm/tests/bf16.rs and crates/qat-train/tests/bf16_training.rs.)

mod common;

use common::{fails, ok};

#[test]
fn bench_train_runs_in_bf16_and_says_so() {
    let out = ok(&[
        "bench",
        "train",
        "--small",
        "--runs",
        "1",
        "--json",
        "--compute-dtype",
        "bf16",
    ]);
    let record: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(record["bench"], "train_lora_r4_bf16", "{out}");
    assert_eq!(record["compute_dtype"], "bf16", "{out}");
    let f32_out = ok(&["bench", "train", "--small", "--runs", "1", "--json"]);
    assert!(f32_out.contains(r#""bench":"train_lora_r4""#), "{f32_out}");
}

#[test]
fn an_unknown_compute_dtype_is_refused_by_name() {
    let err = fails(&["bench", "train", "--small", "--compute-dtype", "fp8"]);
    assert!(err.contains("fp8") && err.contains("f32, bf16"), "{err}");
}
