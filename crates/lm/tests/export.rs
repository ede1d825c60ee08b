//! Streaming merge and GGUF export: merged checkpoints compute the adapted model's logits,
//! GGUF files read back to the source within each type's bound, LoRA GGUF adapters keep
//! PEFT's matrices, and failures leave no file under the final name.

use std::path::{Path, PathBuf};

use lm::gguf::{export_gguf, export_gguf_lora, read_gguf};
use lm::lazy_checkpoint::LazyCheckpoint;
use lm::merge::{merge_checkpoint, MergeOptions};
use lm::{LlamaConfig, LlamaModel};
use ndarray::{array, Array2, Array3};
use quant_core::ggml::GgmlType;
use quant_core::gguf::{GgufFile, GgufValue, ReadTensorF32};
use safetensors::Dtype;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/llama")
        .join(rel)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ids() -> Array2<u32> {
    array![[1u32, 17, 4, 9, 33, 2, 60, 5], [3, 3, 8, 41, 0, 12, 63, 7]]
}

fn max_diff(a: &Array3<f32>, b: &Array3<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn adapted_logits(model_dir: &Path, adapter: &Path) -> Array3<f32> {
    let mut model = LlamaModel::from_pretrained(model_dir).unwrap();
    model.load_adapter(adapter, "default", 0).unwrap();
    model.logits(ids().view(), None).unwrap()
}

fn plain_logits(model_dir: &Path) -> Array3<f32> {
    let mut model = LlamaModel::from_pretrained(model_dir).unwrap();
    model.logits(ids().view(), None).unwrap()
}

#[test]
fn merged_checkpoints_compute_the_adapted_logits_for_lora_rslora_and_dora() {
    let tmp = temp_dir("merge");
    for variant in ["adapter_lora", "adapter_rslora", "adapter_dora"] {
        let out = tmp.join(variant);
        // Small shards force an index and several files.
        let options = MergeOptions {
            max_shard_bytes: 20_000,
            ..MergeOptions::default()
        };
        let report = merge_checkpoint(&data("base"), Some(&data(variant)), &out, &options).unwrap();
        assert_eq!(report.merged_modules, 14, "{variant}");
        assert!(report.shards.len() > 1, "{variant}: {report:?}");
        assert!(out.join("model.safetensors.index.json").is_file());
        let expected = adapted_logits(&data("base"), &data(variant));
        let got = plain_logits(&out);
        let diff = max_diff(&got, &expected);
        assert!(diff < 1e-4, "{variant}: max |Δlogit| = {diff}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn merged_dtypes_follow_the_option_and_config_says_so() {
    let tmp = temp_dir("dtype");
    let options = MergeOptions {
        dtype: Some(Dtype::BF16),
        ..MergeOptions::default()
    };
    merge_checkpoint(&data("base"), Some(&data("adapter_lora")), &tmp, &options).unwrap();
    let ckpt = LazyCheckpoint::open(&tmp).unwrap();
    assert!(ckpt
        .tensors()
        .all(|t| t.stored == lm::lazy_checkpoint::StoredAs::Float(Dtype::BF16)));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    // bf16 keeps 8 significant bits: the logits stay close, not equal.
    let diff = max_diff(
        &plain_logits(&tmp),
        &adapted_logits(&data("base"), &data("adapter_lora")),
    );
    assert!(diff < 0.05, "{diff}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_4bit_base_merges_dense_or_back_to_nf4() {
    let tmp = temp_dir("bnb");
    let bnb = data("base_bnb4");
    // The dequantized base alone, as a dense checkpoint: the reference model.
    let dense = tmp.join("dense");
    merge_checkpoint(&bnb, None, &dense, &MergeOptions::default()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dense.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    let merged = tmp.join("merged");
    let report = merge_checkpoint(
        &bnb,
        Some(&data("adapter_qlora")),
        &merged,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(report.merged_modules, 14);
    let diff = max_diff(
        &plain_logits(&merged),
        &adapted_logits(&dense, &data("adapter_qlora")),
    );
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");

    // Re-quantized: bnb tensors in transformers' layout, config announcing them, and each
    // weight within NF4's error of the dense merge.
    let nf4 = tmp.join("nf4");
    let options = MergeOptions {
        quantize_nf4: true,
        ..MergeOptions::default()
    };
    merge_checkpoint(&bnb, Some(&data("adapter_qlora")), &nf4, &options).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nf4.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let bytes = std::fs::read(nf4.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .tensor("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4")
        .is_ok());
    let q = LazyCheckpoint::open(&nf4).unwrap();
    let d = LazyCheckpoint::open(&merged).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (a, b) = (q.read_f32(name).unwrap(), d.read_f32(name).unwrap());
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        err > 0.0 && err < 0.2 * amax,
        "NF4 error {err} vs amax {amax}"
    );
    // The quantized checkpoint is itself a mergeable base.
    merge_checkpoint(&nf4, None, &tmp.join("again"), &MergeOptions::default()).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn adapters_whose_targets_are_missing_are_errors() {
    let tmp = temp_dir("missing");
    // A one-layer model has no model.layers.1.*: the adapter's tensors for it are extra.
    let config = LlamaConfig::from_file(data("base/config.json")).unwrap();
    let small = LlamaConfig {
        num_hidden_layers: 1,
        ..config
    };
    LlamaModel::random(small, 0)
        .unwrap()
        .save_pretrained(tmp.join("small"))
        .unwrap();
    let err = merge_checkpoint(
        &tmp.join("small"),
        Some(&data("adapter_lora")),
        &tmp.join("out"),
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.layers.1."), "{err}");
    assert!(!tmp.join("out/model.safetensors").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn block_bound(ty: GgmlType, source: &[f32], row: usize) -> Vec<f32> {
    // The bound of each value from its own block's largest magnitude.
    let block = ty.block_values().max(1);
    source
        .chunks(row)
        .flat_map(|r| {
            r.chunks(block).flat_map(|b| {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                std::iter::repeat_n(quant_core::ggml::error_bound(ty, amax).unwrap(), b.len())
            })
        })
        .collect()
}

#[test]
fn gguf_round_trips_within_each_types_bound_and_unpermutes_q_and_k() {
    let tmp = temp_dir("gguf");
    let base = data("base");
    let source = LazyCheckpoint::open(&base).unwrap();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
        let out = tmp.join(format!("m-{}.gguf", ty.name()));
        let report = export_gguf(&base, None, &out, ty).unwrap();
        assert!(report.f16_fallbacks.is_empty());
        let file = GgufFile::open(&out).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.metadata("llama.block_count"), Some(&GgufValue::U32(2)));
        assert_eq!(
            file.metadata("llama.attention.head_count_kv"),
            Some(&GgufValue::U32(2))
        );
        assert_eq!(
            file.metadata("general.file_type")
                .and_then(GgufValue::as_u64),
            Some(lm::gguf::file_type(ty) as u64)
        );
        assert!(file.tensor("output.weight").is_some());
        assert_eq!(file.tensor("output_norm.weight").unwrap().ty, GgmlType::F32);
        for t in &file.tensors {
            assert_eq!(t.offset % 32, 0);
        }
        let tensors = read_gguf(&out).unwrap().tensors;
        assert_eq!(tensors.len(), source.tensors().count());
        for (name, shape, values) in tensors {
            let expected = source.read_f32(&name).unwrap();
            assert_eq!(shape, source.tensor(&name).unwrap().shape, "{name}");
            let stored_ty = if shape.len() == 1 { GgmlType::F32 } else { ty };
            let bound = block_bound(stored_ty, &expected, *shape.last().unwrap());
            // The Q/K bounds are per GGUF block, i.e. per permuted row: compare bounds there.
            let bound = if name.contains("q_proj") || name.contains("k_proj") {
                let heads = if name.contains("q_proj") { 4 } else { 2 };
                let p = lm::gguf::permute_rope_rows(&expected, shape[0], shape[1], heads).unwrap();
                let b = block_bound(stored_ty, &p, shape[1]);
                lm::gguf::unpermute_rope_rows(&b, shape[0], shape[1], heads).unwrap()
            } else {
                bound
            };
            for (i, ((v, e), b)) in values.iter().zip(&expected).zip(&bound).enumerate() {
                assert!(
                    (v - e).abs() <= *b,
                    "{ty:?} {name}[{i}]: {v} vs {e} (bound {b})"
                );
            }
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn q_and_k_rows_are_permuted_as_llama_cpp_expects() {
    let tmp = temp_dir("perm");
    let out = tmp.join("m.gguf");
    export_gguf(&data("base"), None, &out, GgmlType::F32).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let source = LazyCheckpoint::open(data("base")).unwrap();
    let q = source
        .read_f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let stored = file.read_tensor_f32("blk.0.attn_q.weight").unwrap();
    let cols = 32;
    // Head 1 (rows 8..16, head_dim 8): GGUF row 8 + 2i + j is HF row 8 + 4j + i.
    for (i, j) in [(0, 0), (0, 1), (1, 0), (3, 1)] {
        let g = 8 + 2 * i + j;
        let h = 8 + 4 * j + i;
        assert_eq!(
            &stored[g * cols..(g + 1) * cols],
            &q[h * cols..(h + 1) * cols]
        );
    }
    // V is not permuted.
    assert_eq!(
        file.read_tensor_f32("blk.1.attn_v.weight").unwrap(),
        source
            .read_f32("model.layers.1.self_attn.v_proj.weight")
            .unwrap()
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn gguf_with_an_adapter_holds_the_merged_weights_and_tied_models_have_no_output() {
    let tmp = temp_dir("gguf-merge");
    let merged = tmp.join("merged");
    merge_checkpoint(
        &data("base"),
        Some(&data("adapter_dora")),
        &merged,
        &MergeOptions::default(),
    )
    .unwrap();
    let out = tmp.join("m.gguf");
    export_gguf(
        &data("base"),
        Some(&data("adapter_dora")),
        &out,
        GgmlType::F32,
    )
    .unwrap();
    let source = LazyCheckpoint::open(&merged).unwrap();
    for (name, _, values) in read_gguf(&out).unwrap().tensors {
        assert_eq!(values, source.read_f32(&name).unwrap(), "{name}");
    }

    let mut config = LlamaConfig::new(64, 32, 64, 1, 4, 2).unwrap();
    config.tie_word_embeddings = true;
    LlamaModel::random(config, 5)
        .unwrap()
        .save_pretrained(tmp.join("tied"))
        .unwrap();
    let out = tmp.join("tied.gguf");
    export_gguf(&tmp.join("tied"), None, &out, GgmlType::Q4_0).unwrap();
    let file = GgufFile::open(&out).unwrap();
    assert!(file.tensor("output.weight").is_none());
    assert!(file.tensor("token_embd.weight").is_some());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn rows_that_are_not_whole_blocks_fall_back_to_f16() {
    let tmp = temp_dir("fallback");
    // hidden 48: rows of 48 values are not whole 32-value blocks.
    LlamaModel::random(LlamaConfig::new(16, 48, 64, 1, 4, 2).unwrap(), 2)
        .unwrap()
        .save_pretrained(&tmp)
        .unwrap();
    let out = tmp.join("m.gguf");
    let report = export_gguf(&tmp, None, &out, GgmlType::Q8_0).unwrap();
    assert!(report
        .f16_fallbacks
        .contains(&"blk.0.attn_q.weight".to_string()));
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(
        file.tensor("blk.0.attn_q.weight").unwrap().ty,
        GgmlType::F16
    );
    assert_eq!(
        file.tensor("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q8_0
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn lora_adapters_export_as_gguf_adapters() {
    let tmp = temp_dir("lora");
    let out = tmp.join("a.gguf");
    export_gguf_lora(&data("base"), &data("adapter_lora"), &out, GgmlType::F32).unwrap();
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.metadata_str("general.type"), Some("adapter"));
    assert_eq!(file.metadata_str("adapter.type"), Some("lora"));
    assert_eq!(
        file.metadata("adapter.lora.alpha"),
        Some(&GgufValue::F32(8.0))
    );
    assert_eq!(file.tensors.len(), 28);
    let shapes: std::collections::BTreeMap<_, _> =
        LazyCheckpoint::open(data("base")).unwrap().linear_shapes();
    let adapter = lora_core::peft::load_adapter(&data("adapter_lora"), &shapes).unwrap();
    let q = &adapter.modules["model.layers.1.self_attn.q_proj"];
    let a = file.tensor("blk.1.attn_q.weight.lora_a").unwrap();
    assert_eq!(
        a.shape,
        vec![4, 32],
        "lora_a is [r, in] (ggml ne = [in, r])"
    );
    assert_eq!(
        file.read_tensor_f32("blk.1.attn_q.weight.lora_a").unwrap(),
        q.a.iter().copied().collect::<Vec<_>>()
    );
    let b = file.read_tensor_f32("blk.1.attn_q.weight.lora_b").unwrap();
    assert_eq!(
        lm::gguf::unpermute_rope_rows(&b, 32, 4, 4).unwrap(),
        q.b.iter().copied().collect::<Vec<_>>()
    );
    let v = &adapter.modules["model.layers.0.self_attn.v_proj"];
    assert_eq!(
        file.read_tensor_f32("blk.0.attn_v.weight.lora_b").unwrap(),
        v.b.iter().copied().collect::<Vec<_>>()
    );

    // rsLoRA: s = α/√r = 16/√8, so llama.cpp's alpha/r needs alpha = s·r = 16·√8.
    export_gguf_lora(&data("base"), &data("adapter_rslora"), &out, GgmlType::F16).unwrap();
    let alpha = GgufFile::open(&out)
        .unwrap()
        .metadata("adapter.lora.alpha")
        .and_then(GgufValue::as_f64)
        .unwrap();
    assert!((alpha - 16.0 * 8f64.sqrt()).abs() < 1e-4, "{alpha}");

    let err =
        export_gguf_lora(&data("base"), &data("adapter_dora"), &out, GgmlType::F32).unwrap_err();
    assert!(err.to_string().contains("use_dora"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn tokenizers_map_to_gguf_metadata_or_are_rejected() {
    let tmp = temp_dir("tok");
    LlamaModel::random(LlamaConfig::new(8, 32, 64, 1, 4, 2).unwrap(), 1)
        .unwrap()
        .save_pretrained(&tmp)
        .unwrap();
    let config = LlamaConfig::from_file(tmp.join("config.json")).unwrap();
    // Byte-level BPE (gpt2): ids 5..7 absent → [PAD5] .. unused; an added special token.
    let gpt2 = serde_json::json!({
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3},
                  "merges": [["a", "b"]]},
        "added_tokens": [{"id": 4, "content": "<|end|>", "special": true}],
    });
    std::fs::write(tmp.join("tokenizer.json"), gpt2.to_string()).unwrap();
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "unk_token": "a"}"#,
    )
    .unwrap();
    let meta: std::collections::HashMap<_, _> = lm::gguf::tokenizer_metadata(&tmp, &config)
        .unwrap()
        .into_iter()
        .collect();
    use quant_core::gguf::GgufArray;
    assert_eq!(
        meta["tokenizer.ggml.model"],
        GgufValue::String("gpt2".into())
    );
    let GgufValue::Array(GgufArray::String(tokens)) = &meta["tokenizer.ggml.tokens"] else {
        panic!()
    };
    assert_eq!(
        tokens,
        &["a", "b", "ab", "Ġ", "<|end|>", "[PAD5]", "[PAD6]", "[PAD7]"]
    );
    assert_eq!(
        meta["tokenizer.ggml.token_type"],
        GgufValue::Array(GgufArray::I32(vec![1, 1, 1, 1, 3, 5, 5, 5]))
    );
    assert_eq!(
        meta["tokenizer.ggml.merges"],
        GgufValue::Array(GgufArray::String(vec!["a b".into()]))
    );
    assert_eq!(meta["tokenizer.ggml.unknown_token_id"], GgufValue::U32(0));
    assert_eq!(meta["tokenizer.ggml.add_bos_token"], GgufValue::Bool(false));

    // Byte-fallback BPE (llama): byte tokens typed 6, scores −1000.
    let llama = serde_json::json!({
        "model": {"type": "BPE", "byte_fallback": true,
                  "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁a": 4},
                  "merges": []},
        "added_tokens": [{"id": 0, "content": "<unk>", "special": true},
                         {"id": 1, "content": "<s>", "special": true},
                         {"id": 2, "content": "</s>", "special": true}],
    });
    std::fs::write(tmp.join("tokenizer.json"), llama.to_string()).unwrap();
    let meta: std::collections::HashMap<_, _> = lm::gguf::tokenizer_metadata(&tmp, &config)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        meta["tokenizer.ggml.model"],
        GgufValue::String("llama".into())
    );
    assert_eq!(
        meta["tokenizer.ggml.token_type"],
        GgufValue::Array(GgufArray::I32(vec![3, 3, 3, 6, 1, 5, 5, 5]))
    );
    assert_eq!(
        meta["tokenizer.ggml.scores"],
        GgufValue::Array(GgufArray::F32(vec![-1000.0; 8]))
    );
    // The export carries them.
    let out = tmp.join("m.gguf");
    export_gguf(&tmp, None, &out, GgmlType::F16).unwrap();
    assert_eq!(
        GgufFile::open(&out)
            .unwrap()
            .metadata_str("tokenizer.ggml.model"),
        Some("llama")
    );

    let unigram = serde_json::json!({"model": {"type": "Unigram", "vocab": []}});
    std::fs::write(tmp.join("tokenizer.json"), unigram.to_string()).unwrap();
    let err = export_gguf(&tmp, None, &tmp.join("u.gguf"), GgmlType::F16).unwrap_err();
    assert!(err.to_string().contains("Unigram"), "{err}");
    assert!(!tmp.join("u.gguf").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[cfg(unix)]
#[test]
fn unwritable_outputs_are_errors_and_leave_no_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_dir("ro");
    let ro = tmp.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permissions: the check only means something for other users.
    let writable = std::fs::write(ro.join("probe"), b"x").is_ok();
    if !writable {
        let err = export_gguf(&data("base"), None, &ro.join("m.gguf"), GgmlType::Q8_0).unwrap_err();
        assert!(err.to_string().contains("m.gguf"), "{err}");
        let err = merge_checkpoint(
            &data("base"),
            Some(&data("adapter_lora")),
            &ro,
            &MergeOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
        assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
}
