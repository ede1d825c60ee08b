//! Unit tests of `checkpoint` (moved out of the module file, which keeps the code).

use super::*;
use crate::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
use crate::params::ParamStore;
use proptest::prelude::*;
use rand::{Rng, RngCore};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qat-train-ckpt-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample(step: u64, fill: f32) -> Checkpoint {
    let mut rng = TrainRng::new(3);
    let _: u64 = rng.random();
    let mut c = Checkpoint::new(step, rng.state());
    c.add_tensor("a.lora_A", vec![2, 2], vec![fill; 4]).unwrap();
    c.add_tensor("a.step", vec![1], vec![0.01]).unwrap();
    c.data_cursor = DataCursor { epoch: 2, index: 5 };
    c.config = serde_json::json!({"lora_lr": 0.0002, "preset": "default"});
    c.extra = serde_json::json!({"best_val_loss": 1.25});
    c
}

#[test]
fn failed_save_leaves_the_old_checkpoint_whole() {
    let dir = temp_dir("fail");
    let path = dir.join("last.json");
    let old = sample(1, 1.0);
    let old_files = old.save(&path).unwrap();
    let new = sample(2, 2.0);
    // A directory where the new tensor file must go: its rename fails mid-save.
    let blocked = dir.join(format!("last.{}.safetensors", new.id()));
    std::fs::create_dir(&blocked).unwrap();
    let err = new.save(&path).unwrap_err().to_string();
    assert!(err.contains("last.step2-"), "{err}");
    assert_eq!(Checkpoint::load(&path).unwrap(), old);
    assert!(old_files.tensors.exists());
    // Once the obstacle is gone the save succeeds and the old tensor file is removed.
    std::fs::remove_dir(&blocked).unwrap();
    let files = new.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap(), new);
    assert!(!old_files.tensors.exists() && files.tensors.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mismatched_or_corrupted_pairs_are_errors_naming_file_and_key() {
    let dir = temp_dir("pair");
    let a = sample(1, 1.0).save(&dir.join("a.json")).unwrap();
    let b = sample(1, 2.0).save(&dir.join("b.json")).unwrap();
    // Point a.json at b's tensors.
    std::fs::copy(&b.tensors, &a.tensors).unwrap();
    let err = Checkpoint::load(&a.json).unwrap_err().to_string();
    assert!(
        err.contains("checkpoint_id") && err.contains(&a.tensors.display().to_string()),
        "{err}"
    );
    // Corrupt a value but keep the header: the hash catches it.
    let good = sample(3, 1.0).save(&dir.join("c.json")).unwrap();
    let mut bytes = std::fs::read(&good.tensors).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&good.tensors, &bytes).unwrap();
    let err = Checkpoint::load(&good.json).unwrap_err().to_string();
    assert!(err.contains("corrupted"), "{err}");
    let err = Checkpoint::load(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
    std::fs::write(dir.join("bad.json"), "{\"format\": 1}").unwrap();
    let err = Checkpoint::load(&dir.join("bad.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.json") && err.contains("json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_tensors_are_rejected() {
    let mut c = sample(1, 1.0);
    assert!(c.add_tensor("a.step", vec![1], vec![0.0]).is_err());
    assert!(c.add_tensor("x", vec![3], vec![0.0]).is_err());
    let err = c
        .add_tensor("nan", vec![1], vec![f32::NAN])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`nan`"), "{err}");
}

#[test]
fn parameters_and_optimizer_state_resume_training_exactly() {
    let dir = temp_dir("resume");
    let mut store = ParamStore::new();
    store
        .add("q.lora_A", vec![2, 2], vec![0.1, -0.2, 0.3, 0.4])
        .unwrap();
    store.add("q.step", vec![1], vec![0.05]).unwrap();
    let groups = ParamGroups::adapters_and_quantizer_steps(0.01, 0.001, 0.0).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default(), groups.clone()).unwrap();
    let grads = |k: usize, s: &mut ParamStore| {
        let k = k as f32;
        s.set_grad("q.lora_A", &[0.1 * k, -0.2, 0.3, k]).unwrap();
        s.set_grad("q.step", &[0.5 - k]).unwrap();
    };
    for k in 0..3 {
        grads(k, &mut store);
        opt.step(&mut store, 1.0).unwrap();
    }
    let mut ckpt = Checkpoint::new(opt.step_count(), TrainRng::new(0).state());
    ckpt.add_params(&mut store).unwrap();
    ckpt.set_optimizer(&opt.state()).unwrap();
    let path = dir.join("ckpt.json");
    ckpt.save(&path).unwrap();

    let loaded = Checkpoint::load(&path).unwrap();
    let mut restored = ParamStore::new();
    restored.add("q.lora_A", vec![2, 2], vec![0.0; 4]).unwrap();
    restored.add("q.step", vec![1], vec![0.0]).unwrap();
    loaded.restore_params(&mut restored).unwrap();
    let mut resumed = AdamW::new(AdamWConfig::default(), groups).unwrap();
    resumed
        .load_state(loaded.optimizer_state().unwrap().unwrap())
        .unwrap();
    for k in 3..6 {
        grads(k, &mut store);
        grads(k, &mut restored);
        opt.step(&mut store, 1.0).unwrap();
        resumed.step(&mut restored, 1.0).unwrap();
    }
    assert_eq!(store, restored);
    let mut other = ParamStore::new();
    other.add("unknown", vec![1], vec![0.0]).unwrap();
    assert!(loaded
        .restore_params(&mut other)
        .unwrap_err()
        .to_string()
        .contains("unknown"));
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// save → load is the identity, RNG position included.
    #[test]
    fn save_load_identity(
        step in 0u64..1_000_000,
        values in proptest::collection::vec(-1e30f32..1e30, 0..40),
        draws in 0usize..50,
        seed: u64,
        stream: u64,
        epoch: u64,
        index in 0usize..1000,
    ) {
        let dir = temp_dir("prop");
        let mut rng = TrainRng::with_stream(seed, stream);
        for _ in 0..draws {
            rng.next_u32();
        }
        let mut c = Checkpoint::new(step, rng.state());
        c.add_tensor("w", vec![values.len()], values.clone()).unwrap();
        c.add_tensor("empty", vec![0, 3], vec![]).unwrap();
        c.data_cursor = DataCursor { epoch, index };
        c.extra = serde_json::json!({"draws": draws});
        let path = dir.join("p.json");
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        prop_assert_eq!(&back, &c);
        let mut restored = TrainRng::from_state(&back.rng);
        for _ in 0..10 {
            prop_assert_eq!(restored.next_u64(), rng.next_u64());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
