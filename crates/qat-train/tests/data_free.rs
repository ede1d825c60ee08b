//! Data-free distillation end to end on a tiny model: the full-precision teacher writes the
//! training sequences (`qat_train::data_free`, LLM-QAT) and a LoRA-QAT student on ggml's Q4_0
//! grid, initialised as the teacher's PTQ copy, learns the teacher's logits on them — the KD
//! loss falls — and the same seed gives the same run.

use lm::{LlamaConfig, LlamaModel};
use lora_core::{LoraConfig, QatMode};
use qat_train::config::TrainConfig;
use qat_train::data_free::{teacher_sequences, DataFreeConfig};
use qat_train::metrics::MetricsLog;
use qat_train::trainer::Trainer;
use quant_core::config::QatConfig;
use quant_core::ggml::GgmlType;

fn teacher() -> LlamaModel {
    // Width 32: whole Q4_0 blocks in every projection row.
    LlamaModel::random(LlamaConfig::new(40, 32, 64, 2, 4, 2).unwrap(), 21).unwrap()
}

/// (KD loss per step, the data the teacher wrote).
fn run(seed: u64) -> (Vec<f64>, qat_train::data::Dataset) {
    let mut t = teacher();
    let config = DataFreeConfig {
        sequences: 8,
        seq_len: 24,
        ..DataFreeConfig::new(seed)
    };
    let data = teacher_sequences(&mut t, &config, &mut |_, _| {}).unwrap();
    let mut student = t.clone();
    let lora = LoraConfig::new(
        4,
        8.0,
        &["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    );
    student
        .inject_qat_adapters(
            &lora,
            &QatConfig::ggml(GgmlType::Q4_0).unwrap(),
            QatMode::QuantizeMerged,
            "default",
            seed,
        )
        .unwrap();
    let train = TrainConfig::from_json_str(
        r#"{"max_steps": 30, "batch_size": 4, "optimizer": {"lr": 0.01, "quantizer_lr": 1e-4},
            "loss": {"weights": {"task": 0.0, "kd": 1.0, "reasoning": 0.0, "temperature": 1.0}}}"#,
    )
    .unwrap();
    let mut trainer = Trainer::new(train, student, Some(t), data.clone(), None).unwrap();
    let mut log = MetricsLog::default();
    trainer.train(&mut [&mut log], None).unwrap();
    (log.steps.iter().map(|m| m.total_loss).collect(), data)
}

#[test]
fn student_learns_the_teachers_logits_on_the_teachers_own_sequences() {
    let (losses, data) = run(3);
    assert_eq!(data.len(), 8);
    assert!(data.examples().iter().all(|e| e.input_ids.len() == 24));
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(first > 0.0, "PTQ start differs from the teacher: {first}");
    assert!(
        last < 0.6 * first,
        "KD loss {first:.5} → {last:.5}: {losses:?}"
    );
    let (again, data_again) = run(3);
    assert_eq!(data, data_again, "same seed, same sequences");
    assert_eq!(losses, again, "same seed, same run");
    let (_, other) = run(4);
    assert_ne!(data, other, "another seed, other sequences");
}
