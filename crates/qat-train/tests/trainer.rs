//! The trainer really learns: a tiny model overfits a fixed batch, a held-out split of a
//! learnable task improves, distillation and the reasoning loss fall, and a resumed run is
//! bit-identical to an uninterrupted one.

use lm::{LlamaConfig, LlamaModel};
use lora_core::LoraConfig;
use qat_train::config::TrainConfig;
use qat_train::data::{Dataset, Example};
use qat_train::metrics::{MetricsLog, StepMetrics};
use qat_train::trainer::Trainer;

fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::new(24, 16, 32, 2, 2, 1).unwrap();
    c.initializer_range = 0.2;
    c
}

fn student(seed: u64, dropout: f64) -> LlamaModel {
    let mut model = LlamaModel::random(tiny_config(), seed).unwrap();
    let mut lora = LoraConfig::new(
        4,
        8.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
    );
    lora.lora_dropout = dropout;
    model.inject_adapters(&lora, "default", seed + 100).unwrap();
    model
}

/// Counting task: each example is `a, a+1, a+2, …` (mod 24) — learnable from any start.
fn counting(starts: impl Iterator<Item = u32>, len: u32) -> Dataset {
    Dataset::new(
        starts
            .map(|a| Example::new((0..len).map(|i| (a + i) % 24).collect()))
            .collect(),
    )
    .unwrap()
}

fn config(json: &str) -> TrainConfig {
    TrainConfig::from_json_str(json).unwrap()
}

#[test]
fn a_tiny_model_overfits_a_fixed_batch() {
    let data = Dataset::new(vec![
        Example::new(vec![3, 17, 5, 9, 22, 1, 14, 8]),
        Example::new(vec![11, 2, 19, 7, 0, 13]),
    ])
    .unwrap();
    let config = config(r#"{"max_steps": 100, "batch_size": 2, "optimizer": {"lr": 0.01}}"#);
    let mut trainer = Trainer::new(config, student(1, 0.0), None, data, None).unwrap();
    let mut log = MetricsLog::default();
    trainer.train(&mut [&mut log], None).unwrap();
    let (first, last) = (log.steps[0].total_loss, log.steps[99].total_loss);
    assert!(first > 2.5, "starts near ln 24: {first}");
    assert!(
        last < 0.05,
        "memorised: {first} → {last}: {:?}",
        log.steps
            .iter()
            .step_by(10)
            .map(|m| m.total_loss)
            .collect::<Vec<_>>()
    );
}

#[test]
fn loss_falls_on_a_held_out_split_of_a_learnable_task() {
    let train = counting((0..24).filter(|a| a % 4 != 3), 10);
    let held_out = counting((0..24).filter(|a| a % 4 == 3), 10);
    let config = config(
        r#"{"max_steps": 60, "batch_size": 6, "seed": 3, "optimizer": {"lr": 0.01},
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 5, "total_steps": 60, "min_ratio": 0.1},
            "eval_every": 20}"#,
    );
    let mut trainer = Trainer::new(config, student(2, 0.0), None, train, Some(held_out)).unwrap();
    let before = trainer.evaluate().unwrap().unwrap().total_loss;
    let mut log = MetricsLog::default();
    let summary = trainer.train(&mut [&mut log], None).unwrap();
    let after = summary.last_eval.unwrap().total_loss;
    assert_eq!(log.evals.len(), 3);
    assert!(after < 0.5 * before, "held-out loss {before} → {after}");
}

/// A teacher and a student with different random bases; data with step and answer masks.
fn distillation_setup(weights: &str, steps: u64) -> Trainer {
    let teacher = LlamaModel::random(tiny_config(), 50).unwrap();
    let examples = (0..8u32)
        .map(|a| {
            let ids: Vec<u32> = (0..12).map(|i| (a * 5 + i * 7) % 24).collect();
            let mut e = Example::new(ids);
            e.step_mask = Some((0..12).map(|i| i % 3 == 2 && i < 9).collect());
            e.answer_mask = Some((0..12).map(|i| i >= 10).collect());
            e
        })
        .collect();
    let config = config(&format!(
        r#"{{"max_steps": {steps}, "batch_size": 4, "optimizer": {{"lr": 0.03}},
            "loss": {{"weights": {weights},
                     "hidden": {{"weight": 0.5, "kind": "cosine", "layers": [{{"student": 0, "teacher": 0}}]}}}}}}"#
    ));
    Trainer::new(
        config,
        student(7, 0.0),
        Some(teacher),
        Dataset::new(examples).unwrap(),
        None,
    )
    .unwrap()
}

#[test]
fn distillation_and_reasoning_losses_fall() {
    let mut trainer = distillation_setup(
        r#"{"task": 0.0, "kd": 1.0, "reasoning": 1.0, "temperature": 2.0}"#,
        120,
    );
    let mut log = MetricsLog::default();
    trainer.train(&mut [&mut log], None).unwrap();
    let mean = |steps: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
        steps.iter().map(f).sum::<f64>() / steps.len() as f64
    };
    let (head, tail) = (&log.steps[..4], &log.steps[116..]);
    for (name, f) in [
        (
            "kd",
            (|m: &StepMetrics| m.kd_loss.unwrap()) as fn(&StepMetrics) -> f64,
        ),
        ("reasoning", |m| m.reasoning_loss.unwrap()),
        ("hidden", |m| m.hidden_loss.unwrap()),
    ] {
        let (a, b) = (mean(head, f), mean(tail, f));
        assert!(b < 0.6 * a, "{name} loss {a} → {b}");
    }
    assert!(log.steps[0].task_loss.is_none());
}

fn parameters(model: &mut LlamaModel) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model
        .visit_trainable_parameters(|name, p| {
            out.push((name.to_string(), p.value.to_vec()));
            Ok(())
        })
        .unwrap();
    out
}

/// `(step, total, kd, reasoning, grad norm)` of a step.
type StepLosses = (u64, f64, Option<f64>, Option<f64>, Option<f32>);

fn losses(log: &MetricsLog) -> Vec<StepLosses> {
    log.steps
        .iter()
        .map(|m| {
            (
                m.step,
                m.total_loss,
                m.kd_loss,
                m.reasoning_loss,
                m.grad_norm,
            )
        })
        .collect()
}

#[test]
fn resume_is_bit_identical() {
    // Dropout, shuffling over several epochs, accumulation, a schedule, a teacher with KD,
    // reasoning and hidden terms: everything a resume must carry.
    let make = || {
        let teacher = LlamaModel::random(tiny_config(), 50).unwrap();
        let examples = (0..7u32)
            .map(|a| {
                let mut e = Example::new((0..6 + a % 3).map(|i| (a * 3 + i * 5) % 24).collect());
                e.step_mask = Some((0..6 + a % 3).map(|i| i % 2 == 1).collect());
                e
            })
            .collect();
        let config = config(
            r#"{"max_steps": 8, "batch_size": 2, "gradient_accumulation": 2, "seed": 9,
                "optimizer": {"lr": 0.01},
                "schedule": {"kind": "warmup_linear", "warmup_steps": 2, "total_steps": 8, "min_ratio": 0.0},
                "loss": {"preset": "reasoning_focused",
                         "hidden": {"weight": 0.3, "kind": "mse", "layers": [{"student": 1, "teacher": 0}]}}}"#,
        );
        Trainer::new(
            config,
            student(4, 0.2),
            Some(teacher),
            Dataset::new(examples).unwrap(),
            None,
        )
        .unwrap()
    };
    let mut straight = make();
    let mut log_straight = MetricsLog::default();
    straight.train(&mut [&mut log_straight], None).unwrap();

    let dir = std::env::temp_dir().join(format!("qat-trainer-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.json");
    let mut first = make();
    let mut log = MetricsLog::default();
    for _ in 0..3 {
        let m = first.step().unwrap();
        log.steps.push(m);
    }
    first.save_checkpoint(&path).unwrap();
    drop(first);
    let mut resumed = make();
    resumed.load_checkpoint(&path).unwrap();
    assert_eq!(resumed.step_count(), 3);
    resumed.train(&mut [&mut log], None).unwrap();

    assert_eq!(losses(&log), losses(&log_straight));
    assert_eq!(
        parameters(resumed.student_mut()),
        parameters(straight.student_mut())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configuration_mistakes_are_errors_naming_the_field() {
    let data = counting(0..4, 5);
    let kd = config(
        r#"{"loss": {"weights": {"task": 1.0, "kd": 0.5, "reasoning": 0.0, "temperature": 2.0}}}"#,
    );
    let err = Trainer::new(kd, student(1, 0.0), None, data.clone(), None).unwrap_err();
    assert!(err.to_string().contains("teacher"), "{err}");
    let frozen = LlamaModel::random(tiny_config(), 1).unwrap();
    let err = Trainer::new(TrainConfig::default(), frozen, None, data.clone(), None).unwrap_err();
    assert!(err.to_string().contains("trainable"), "{err}");
    let bad_layer = config(
        r#"{"loss": {"hidden": {"weight": 1.0, "kind": "mse", "layers": [{"student": 5, "teacher": 0}]}}}"#,
    );
    let teacher = LlamaModel::random(tiny_config(), 2).unwrap();
    let err = Trainer::new(bad_layer, student(1, 0.0), Some(teacher), data, None).unwrap_err();
    assert!(
        err.to_string().contains("TrainConfig.loss.hidden.layers"),
        "{err}"
    );
    for (json, field) in [
        (r#"{"batch_size": 0}"#, "TrainConfig.batch_size"),
        (r#"{"max_grad_norm": -1}"#, "TrainConfig.max_grad_norm"),
        (
            r#"{"early_stopping": {"patience": 2}}"#,
            "TrainConfig.early_stopping",
        ),
        (r#"{"loss": {"preset": "nope"}}"#, "TrainConfig.loss.preset"),
    ] {
        let err = TrainConfig::from_json_str(json).unwrap_err().to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving() {
    // Learning rate 0: the validation loss never improves after the first evaluation.
    let config = config(
        r#"{"max_steps": 50, "batch_size": 2, "optimizer": {"lr": 0.0}, "eval_every": 2,
            "early_stopping": {"patience": 2}}"#,
    );
    let mut trainer = Trainer::new(
        config,
        student(1, 0.0),
        None,
        counting(0..4, 5),
        Some(counting(5..7, 5)),
    )
    .unwrap();
    let summary = trainer.train(&mut [], None).unwrap();
    assert!(summary.stopped_early);
    assert_eq!(
        summary.steps, 6,
        "evaluations at 2 (best), 4, 6 → patience 2 reached"
    );
}

fn qat_student(seed: u64) -> LlamaModel {
    use lora_core::QatMode;
    use quant_core::config::QatConfig;
    let mut model = LlamaModel::random(tiny_config(), seed).unwrap();
    let lora = LoraConfig::new(
        4,
        8.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    let qat = QatConfig {
        bits: 3,
        ..QatConfig::piq3()
    };
    model
        .inject_qat_adapters(&lora, &qat, QatMode::QuantizeMerged, "default", seed + 100)
        .unwrap();
    model
}

/// LoRA-QAT from an fp32 teacher (its own unquantized base) with KD + reasoning: two
/// full-precision warm-up steps, calibration on data when fake quantization turns on, the
/// quantizer steps training in their own group, and a bit-identical resume across the switch.
#[test]
fn lora_qat_student_distils_from_its_fp32_teacher_and_resumes_exactly() {
    let make = || {
        let teacher = LlamaModel::random(tiny_config(), 60).unwrap();
        let examples = (0..6u32)
            .map(|a| {
                let ids: Vec<u32> = (0..10).map(|i| (a * 5 + i * 7) % 24).collect();
                let mut e = Example::new(ids);
                e.step_mask = Some((0..10).map(|i| i % 3 == 2).collect());
                e.answer_mask = Some((0..10).map(|i| i == 9).collect());
                e
            })
            .collect();
        let config = config(
            r#"{"max_steps": 30, "batch_size": 3, "seed": 2, "quant_warmup_steps": 2,
                "optimizer": {"lr": 0.01, "quantizer_lr": 0.001},
                "calibration": {"batches": 2},
                "loss": {"weights": {"task": 0.0, "kd": 1.0, "reasoning": 1.0, "temperature": 2.0}}}"#,
        );
        Trainer::new(
            config,
            qat_student(60),
            Some(teacher),
            Dataset::new(examples).unwrap(),
            None,
        )
        .unwrap()
    };
    let steps_of = |model: &mut LlamaModel| -> Vec<f32> {
        let mut out = Vec::new();
        model
            .visit_trainable_parameters(|name, p| {
                if name.ends_with(lm::QUANTIZER_STEP_SUFFIX) {
                    out.extend_from_slice(p.value);
                }
                Ok(())
            })
            .unwrap();
        out
    };
    let mut straight = make();
    assert_eq!(straight.quantized_layers(), 14);
    let initial_steps = steps_of(straight.student_mut());
    let mut log_straight = MetricsLog::default();
    straight.train(&mut [&mut log_straight], None).unwrap();
    let report = straight.calibration().unwrap();
    assert_eq!(report.step, 2);
    assert_eq!(report.candidates.len(), 2);
    assert!(straight.fake_quant_active());
    assert_ne!(
        steps_of(straight.student_mut()),
        initial_steps,
        "steps train"
    );
    // From the first quantized steps to the last: the student recovers the teacher.
    let mean = |range: std::ops::Range<usize>, f: fn(&StepMetrics) -> f64| {
        range
            .clone()
            .map(|i| f(&log_straight.steps[i]))
            .sum::<f64>()
            / range.len() as f64
    };
    let kd = |m: &StepMetrics| m.kd_loss.unwrap();
    let reasoning = |m: &StepMetrics| m.reasoning_loss.unwrap();
    let (kd0, kd1) = (mean(2..5, kd), mean(27..30, kd));
    let (r0, r1) = (mean(2..5, reasoning), mean(27..30, reasoning));
    assert!(kd1 < 0.7 * kd0, "KD {kd0} → {kd1}");
    assert!(r1 < 0.7 * r0, "reasoning {r0} → {r1}");

    // Resume across the warm-up → quantized switch.
    let dir = std::env::temp_dir().join(format!("qat-trainer-qat-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.json");
    for k in [1u64, 2, 5] {
        let mut first_part = make();
        let mut log = MetricsLog::default();
        for _ in 0..k {
            log.steps.push(first_part.step().unwrap());
        }
        first_part.save_checkpoint(&path).unwrap();
        let mut resumed = make();
        resumed.load_checkpoint(&path).unwrap();
        resumed.train(&mut [&mut log], None).unwrap();
        assert_eq!(
            losses(&log),
            losses(&log_straight),
            "resumed after {k} steps"
        );
        assert_eq!(
            parameters(resumed.student_mut()),
            parameters(straight.student_mut())
        );
    }

    // Export: the adapter with its quantizer steps, and the quantized merged weights.
    straight
        .save_adapter(&dir.join("adapter"), "default")
        .unwrap();
    assert!(dir.join("adapter").join(lm::QAT_STATE_FILE).is_file());
    assert_eq!(
        straight
            .export_quantized(&dir.join("q.safetensors"))
            .unwrap(),
        14
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Packing changes the layout, not the loss: documents packed into one sequence (positions
/// restarting, attention within each, first tokens not targets) score what they score
/// unpacked, and training on packed batches learns.
#[test]
fn packed_documents_score_as_unpacked_and_train() {
    let docs = Dataset::new(vec![
        Example::new(vec![3, 4, 5, 6]),
        Example::new(vec![10, 11, 12]),
        Example::new(vec![20, 21, 22, 23, 0]),
    ])
    .unwrap();
    let packed = docs.packed(7).unwrap();
    assert_eq!(packed.len(), 2);
    let cfg = || config(r#"{"max_steps": 30, "batch_size": 3, "optimizer": {"lr": 0.01}}"#);
    let mut plain = Trainer::new(cfg(), student(5, 0.0), None, docs.clone(), None).unwrap();
    let unpacked_loss = plain.evaluate_dataset(&docs).unwrap().total_loss;
    let mut trainer = Trainer::new(cfg(), student(5, 0.0), None, packed.clone(), None).unwrap();
    let packed_loss = trainer.evaluate_dataset(&packed).unwrap().total_loss;
    assert!(
        (packed_loss - unpacked_loss).abs() < 1e-5,
        "packed {packed_loss} vs unpacked {unpacked_loss}"
    );
    let mut log = MetricsLog::default();
    trainer.train(&mut [&mut log], None).unwrap();
    let (first, last) = (
        log.steps[0].total_loss,
        log.steps.last().unwrap().total_loss,
    );
    assert!(last < 0.5 * first, "{first} -> {last}");
}
