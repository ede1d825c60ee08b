//! Loading variants (half precision, shards, tied heads) and the errors for what cannot load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lm::{LlamaConfig, LlamaModel, LmError};
use ndarray::array;
use safetensors::{Dtype, SafeTensors};

fn base_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama/base")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The reference tensors as (name, shape, f32 values).
fn base_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(base_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => unreachable!("test writes float tensors only"),
            };
            (n.clone(), s.clone(), bytes)
        })
        .collect();
    let views: Vec<_> = encoded
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn write_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn logits(model: &mut LlamaModel) -> ndarray::Array3<f32> {
    let ids = array![[1u32, 17, 4, 9, 33, 2]];
    model.forward(ids.view(), None).unwrap().into_logits()
}

#[test]
fn half_precision_checkpoints_convert_to_f32() {
    let mut reference = LlamaModel::from_pretrained(base_dir()).unwrap();
    let expected = logits(&mut reference);
    for (dtype, tol) in [(Dtype::F16, 5e-3f32), (Dtype::BF16, 5e-2)] {
        let dir = temp_dir(&format!("{dtype:?}"));
        write_config(&dir, |_| {});
        write(&dir.join("model.safetensors"), &base_tensors(), dtype);
        let mut model = LlamaModel::from_pretrained(&dir).unwrap();
        let diff = (&logits(&mut model) - &expected)
            .mapv(f32::abs)
            .fold(0.0f32, |m, &v| m.max(v));
        assert!(
            diff > 0.0 && diff < tol,
            "{dtype:?}: max logit difference {diff}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let dir = temp_dir("sharded");
    write_config(&dir, |_| {});
    let tensors = base_tensors();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = HashMap::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        write(&dir.join(file), part, Dtype::F32);
        for (name, _, _) in part {
            weight_map.insert(name.clone(), file.to_string());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let mut sharded = LlamaModel::from_pretrained(&dir).unwrap();
    let mut reference = LlamaModel::from_pretrained(base_dir()).unwrap();
    assert_eq!(logits(&mut sharded), logits(&mut reference));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tied_checkpoints_have_no_lm_head_and_round_trip() {
    let config = {
        let mut c = LlamaConfig::new(32, 16, 24, 1, 2, 2).unwrap();
        c.tie_word_embeddings = true;
        c
    };
    let mut model = LlamaModel::random(config, 9).unwrap();
    let dir = temp_dir("tied");
    model.save_pretrained(&dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let names = SafeTensors::deserialize(&bytes).unwrap().names().len();
    assert_eq!(
        names,
        1 + 9 + 1,
        "embedding, one layer, final norm; no lm_head.weight"
    );
    let mut reloaded = LlamaModel::from_pretrained(&dir).unwrap();
    assert!(reloaded.config().tie_word_embeddings);
    let ids = array![[1u32, 3, 5]];
    assert_eq!(
        reloaded.forward(ids.view(), None).unwrap().into_logits(),
        model.forward(ids.view(), None).unwrap().into_logits()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_init_is_seeded() {
    let config = LlamaConfig::new(32, 16, 24, 1, 2, 2).unwrap();
    let a = LlamaModel::random(config.clone(), 1).unwrap();
    assert_eq!(a, LlamaModel::random(config.clone(), 1).unwrap());
    assert_ne!(a, LlamaModel::random(config, 2).unwrap());
    let e = a.embed_tokens().dense().unwrap().value();
    let std = (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
    assert!(
        (std - 0.02).abs() < 0.004,
        "initializer_range 0.02, measured {std}"
    );
}

fn load_err(dir: &Path) -> String {
    match LlamaModel::from_pretrained(dir) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_named() {
    let tensors = base_tensors();
    let dir = temp_dir("bad-tensors");
    write_config(&dir, |_| {});

    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    write(&dir.join("model.safetensors"), &without, Dtype::F32);
    let e = load_err(&dir);
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`") && e.contains("[64, 32]"),
        "{e}"
    );

    let mut extra = tensors.clone();
    extra.push((
        "model.layers.0.self_attn.q_proj.bias".into(),
        vec![32],
        vec![0.0; 32],
    ));
    write(&dir.join("model.safetensors"), &extra, Dtype::F32);
    let e = load_err(&dir);
    assert!(
        e.contains("unexpected tensor `model.layers.0.self_attn.q_proj.bias`"),
        "{e}"
    );

    let mut misshaped = tensors.clone();
    let k = misshaped
        .iter_mut()
        .find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    k.1 = vec![32, 16];
    write(&dir.join("model.safetensors"), &misshaped, Dtype::F32);
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[16, 32]"),
        "{e}"
    );

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_config_options_are_rejected_by_name() {
    let dir = temp_dir("bad-config");
    std::fs::copy(
        base_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let cases: Vec<(&str, serde_json::Value)> = vec![
        // Llama's biases are implemented now: a checkpoint without them names the tensor.
        ("partial_rotary_factor", serde_json::json!(0.5)),
        ("sliding_window", serde_json::json!(4)),
        ("hidden_act", serde_json::json!("gelu")),
        ("model_type", serde_json::json!("gpt2")),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "ntk-by-parts", "factor": 2.0}),
        ),
        ("attention_dropout", serde_json::json!(0.1)),
        ("num_key_value_heads", serde_json::json!(3)),
        ("vocab_size", serde_json::json!("64")),
        (
            "quantization_config",
            serde_json::json!({"quant_method": "bitsandbytes"}),
        ),
    ];
    for (key, value) in cases {
        write_config(&dir, |c| c[key] = value.clone());
        let e = load_err(&dir);
        assert!(e.contains(key), "{key}: {e}");
    }
    // Harmless unknown keys and a top-level rope_theta are fine.
    write_config(&dir, |c| {
        c["some_future_flag"] = serde_json::json!({"x": 1});
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = serde_json::json!(10000.0);
    });
    LlamaModel::from_pretrained(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_keeps_token_ids_and_quantization_config() {
    let json = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [2, 7], "bos_token_id": 1,
        "quantization_config": {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4"}}"#;
    let c = LlamaConfig::from_json_str(json).unwrap();
    assert_eq!(c.eos_token_ids, vec![2, 7]);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.num_key_value_heads, 2, "defaults to num_attention_heads");
    assert_eq!(
        c.quantization_config.as_ref().unwrap()["bnb_4bit_quant_type"],
        "nf4"
    );
    let round = LlamaConfig::from_json_value(&c.to_json_value()).unwrap();
    assert_eq!(round.eos_token_ids, c.eos_token_ids);
    assert_eq!(round.quantization_config, None, "saved weights are f32");
}

#[test]
fn caller_mistakes_in_forward_are_errors_with_where() {
    let mut model = LlamaModel::from_pretrained(base_dir()).unwrap();
    let e = model.forward(array![[1u32, 64]].view(), None).unwrap_err();
    assert!(
        matches!(
            e,
            LmError::TokenOutOfRange {
                position: 1,
                value: 64,
                ..
            }
        ),
        "{e}"
    );
    let long = ndarray::Array2::<u32>::zeros((1, 65));
    assert!(matches!(
        model.forward(long.view(), None).unwrap_err(),
        LmError::SequenceTooLong { len: 65, max: 64 }
    ));
    let mask = array![[true]];
    let e = model
        .forward(array![[1u32, 2]].view(), Some(mask.view()))
        .unwrap_err();
    assert!(e.to_string().contains("attention_mask"), "{e}");
    let pass = model.forward(array![[1u32, 2]].view(), None).unwrap();
    let e = model
        .backward(pass, ndarray::Array3::zeros((1, 2, 3)).view())
        .unwrap_err();
    assert!(e.to_string().contains("grad_logits"), "{e}");
    let e = model
        .linear_module_mut("model.layers.9.mlp.up_proj")
        .unwrap_err();
    assert!(e.to_string().contains("model.layers.9.mlp.up_proj"), "{e}");
}

#[test]
fn non_finite_values_are_reported_with_where() {
    let mut model = LlamaModel::from_pretrained(base_dir()).unwrap();
    // A NaN in the LM head's row 5 poisons that vocabulary entry at every position.
    model
        .visit_parameters(|name, p| {
            if name == "lm_head.weight" {
                p.value[5 * 32 + 3] = f32::NAN;
            }
            Ok(())
        })
        .unwrap();
    let e = model
        .forward(array![[1u32, 2, 9, 4]].view(), None)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("logits at (batch 0, position 0, vocab 5)"),
        "{e}"
    );
    // A non-finite upstream gradient is caught before it spreads.
    let mut model = LlamaModel::from_pretrained(base_dir()).unwrap();
    let pass = model.forward(array![[1u32, 2]].view(), None).unwrap();
    let mut g = ndarray::Array3::<f32>::zeros((1, 2, 64));
    g[[0, 1, 5]] = f32::INFINITY;
    let e = model.backward(pass, g.view()).unwrap_err();
    assert!(
        e.to_string()
            .contains("grad_logits at (batch 0, position 1, vocab 5)"),
        "{e}"
    );
}
