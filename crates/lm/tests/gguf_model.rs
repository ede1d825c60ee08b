//! GGUF files as model sources. Every family's reference checkpoint (`tests/data/arch/*`,
//! transformers' logits) is written as llama.cpp lays it out (tensor names, Q/K rows
//! permuted for llama, Gemma norms `1 + w`, llama.cpp's metadata keys) and read back: logits
//! within 1e-4 of transformers' and the KV-cache greedy tokens equal. Every one of the 13
//! tensor types un-permutes as blocks exactly as the decoded rows would; bad files are refused
//! naming the key or tensor. The `real_model` tests (ignored; `cargo xtask real-model`) read
//! SmolLM2-135M-Instruct's Q4_1 file against the transformers directory made from it.

mod common;

use std::path::{Path, PathBuf};

use common::{max_abs_diff, read_f32s};
use lm::gguf::names::FamilyNames;
use lm::gguf::permute_rope_rows;
use lm::gguf_model::GgufModelFile;
use lm::{Family, LlamaModel, Sampling};
use ndarray::Array2;
use quant_core::ggml::{self, GgmlType};
use quant_core::gguf::{GgufValue, GgufWriter, TensorSpec};
use safetensors::SafeTensors;
use serde_json::Value;

fn arch_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/arch")
        .join(family)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-gguf-model-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// llama.cpp's architecture name of a transformers `model_type`.
fn gguf_arch(model_type: &str) -> &'static str {
    match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma2" => "gemma2",
        "gemma3_text" => "gemma3",
        "phi3" => "phi3",
        other => panic!("no GGUF architecture for {other}"),
    }
}

/// The GGUF name of a Hugging Face tensor (the shared table).
fn gguf_name(family: Family, hf: &str) -> String {
    FamilyNames::of(family)
        .to_gguf(hf)
        .unwrap()
        .unwrap_or_else(|| panic!("no GGUF name for {hf}"))
        .name
}

/// Writes the checkpoint in `dir` as llama.cpp's converter would: projections in `ty`
/// (`F32` for every tensor when `ty` is `F32`), other tensors `F32`.
fn write_gguf(dir: &Path, out: &Path, ty: GgmlType, extra: &[(String, GgufValue)]) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let parsed = lm::LlamaConfig::from_json_value(&config).unwrap();
    let family = parsed.family();
    let model_type = config["model_type"].as_str().unwrap();
    let arch = gguf_arch(model_type);
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(arch.into()),
        ),
        (
            "general.name".to_string(),
            GgufValue::String(format!("tiny {model_type}")),
        ),
        (key("block_count"), u32v(parsed.num_hidden_layers)),
        (key("context_length"), u32v(parsed.max_position_embeddings)),
        (key("embedding_length"), u32v(parsed.hidden_size)),
        (key("feed_forward_length"), u32v(parsed.intermediate_size)),
        (
            key("attention.head_count"),
            u32v(parsed.num_attention_heads),
        ),
        (
            key("attention.head_count_kv"),
            u32v(parsed.num_key_value_heads),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(parsed.rms_norm_eps),
        ),
        (key("rope.freq_base"), GgufValue::F32(parsed.rope_theta)),
        (key("attention.key_length"), u32v(parsed.head_dim)),
        (key("attention.value_length"), u32v(parsed.head_dim)),
        (key("rope.dimension_count"), u32v(parsed.head_dim)),
    ];
    if let Some(w) = config["sliding_window"].as_u64() {
        meta.push((key("attention.sliding_window"), u32v(w as usize)));
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(v) = config[k].as_f64() {
            meta.push((key(k), GgufValue::F32(v as f32)));
        }
    }
    if family == Family::Gemma3 {
        let pattern = config["sliding_window_pattern"].as_u64().unwrap();
        meta.push((
            key("attention.sliding_window_pattern"),
            u32v(pattern as usize),
        ));
        let full = &config["rope_parameters"]["full_attention"];
        meta.retain(|(k, _)| k != &key("rope.freq_base"));
        meta.push((
            key("rope.freq_base"),
            GgufValue::F32(full["rope_theta"].as_f64().unwrap() as f32),
        ));
        meta.push((
            key("rope.scaling.type"),
            GgufValue::String(full["rope_type"].as_str().unwrap().into()),
        ));
        meta.push((
            key("rope.scaling.factor"),
            GgufValue::F32(full["factor"].as_f64().unwrap() as f32),
        ));
    }
    for (hf_key, gguf_key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = config[hf_key].as_u64() {
            meta.push((gguf_key.to_string(), u32v(id as usize)));
        }
    }
    meta.extend(extra.iter().cloned());

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)> = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).unwrap();
        let shape = view.shape().to_vec();
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let llama = matches!(family, Family::Llama | Family::Mistral);
        if llama && (name.contains("q_proj") || name.contains("k_proj")) {
            let heads = if name.contains("q_proj") {
                parsed.num_attention_heads
            } else {
                parsed.num_key_value_heads
            };
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            values = permute_rope_rows(&values, shape[0], cols, heads).unwrap();
        }
        if matches!(family, Family::Gemma2 | Family::Gemma3) && name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let is_matrix = shape.len() == 2 && !name.contains("embed_tokens");
        let t = if is_matrix && shape[1] % ty.block_values() == 0 {
            ty
        } else {
            GgmlType::F32
        };
        let data = ggml::quantize(t, &values).unwrap();
        let g = gguf_name(family, &name);
        tensors.push((g, shape, t, data));
    }
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s, t, _)| TensorSpec::new(n.clone(), s.clone(), *t))
        .collect();
    let mut writer = GgufWriter::create(out, &meta, &specs).unwrap();
    for (n, _, _, data) in &tensors {
        writer.write_tensor(n, data).unwrap();
    }
    writer.finish().unwrap();
}

fn i64s(path: &Path, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn every_family_from_gguf_matches_transformers() {
    let tmp = temp_dir("families");
    for family in ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"] {
        let path = tmp.join(format!("{family}.gguf"));
        write_gguf(&arch_dir(family).join("base"), &path, GgmlType::F32, &[]);
        let source = GgufModelFile::open(&path).unwrap();
        let reference = LlamaModel::from_pretrained(arch_dir(family).join("base")).unwrap();
        assert_eq!(source.config(), reference.config(), "{family}: config");
        let mut model = source.load_dequantized().unwrap();
        let io_path = arch_dir(family).join("io.safetensors");
        let io = read_f32s(&io_path);
        let ids = i64s(&io_path, "input_ids");
        let seq = io["base_logits"].shape()[1];
        let ids = Array2::from_shape_vec(
            (ids.len() / seq, seq),
            ids.iter().map(|&v| v as u32).collect(),
        )
        .unwrap();
        let logits = model.logits(ids.view(), None).unwrap();
        let err = max_abs_diff(&logits, &io["base_logits"]);
        eprintln!("{family}: GGUF logits vs transformers {err:e}");
        assert!(err <= 1e-4, "{family}: logits differ by {err}");
        let prompt: Vec<u32> = i64s(&io_path, "greedy_prompt")
            .iter()
            .map(|&v| v as u32)
            .collect();
        let expected: Vec<u32> = i64s(&io_path, "greedy_tokens")
            .iter()
            .map(|&v| v as u32)
            .collect();
        let generated = model
            .generate(&prompt, expected.len(), &Sampling::Greedy, None)
            .unwrap();
        assert_eq!(
            &generated[..expected.len()],
            &expected[..],
            "{family}: greedy"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn llama_from_gguf_equals_the_directory() {
    let tmp = temp_dir("llama");
    let dir = common::data_dir().join("base");
    let path = tmp.join("llama.gguf");
    write_gguf(&dir, &path, GgmlType::F32, &[]);
    let mut from_gguf = LlamaModel::open(&path).unwrap();
    let mut from_dir = LlamaModel::open(&dir).unwrap();
    let (ids, _) = common::io_ids();
    let a = from_gguf.logits(ids.view(), None).unwrap();
    let b = from_dir.logits(ids.view(), None).unwrap();
    assert_eq!(
        a, b,
        "F32 GGUF (Q/K permuted and back) computes as the directory"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A Llama with rows of 256 (one K super-block), so every type holds whole blocks.
fn wide_llama(dir: &Path) {
    wide_llama_tied(dir, false)
}

/// [`wide_llama`] with the LM head tied to the embedding or not.
fn wide_llama_tied(dir: &Path, tied: bool) {
    let mut config = lm::LlamaConfig::new(64, 256, 256, 1, 4, 2).unwrap();
    config.tie_word_embeddings = tied;
    LlamaModel::random(config, 11)
        .unwrap()
        .save_pretrained(dir)
        .unwrap();
}

#[test]
fn every_type_unpermutes_as_blocks_like_decoded_rows() {
    let tmp = temp_dir("types");
    let dir = tmp.join("wide");
    wide_llama(&dir);
    for ty in quant_core::ggml::ALL_TYPES {
        let path = tmp.join(format!("{}.gguf", ty.name()));
        write_gguf(&dir, &path, ty, &[]);
        let source = GgufModelFile::open(&path).unwrap();
        for (hf, heads) in [
            ("model.layers.0.self_attn.q_proj.weight", 4),
            ("model.layers.0.self_attn.k_proj.weight", 2),
        ] {
            let info = source.tensor_info(hf).unwrap().clone();
            assert_eq!(info.ty, ty);
            // Decode the stored (permuted) rows, then un-permute the values...
            let raw = source.gguf().read_tensor_bytes(&info.name).unwrap();
            let n = info.shape[0] * info.shape[1];
            let decoded = ggml::dequantize(ty, &raw, n).unwrap();
            let expected =
                lm::gguf::unpermute_rope_rows(&decoded, info.shape[0], info.shape[1], heads)
                    .unwrap();
            // ...equals un-permuting the blocks, then decoding.
            let (_, _, blocks) = source.read_blocks(hf).unwrap();
            assert_eq!(ggml::dequantize(ty, &blocks, n).unwrap(), expected, "{ty}");
            assert_eq!(source.read_f32(hf).unwrap().1, expected, "{ty}");
        }
        let model = source.load_dequantized().unwrap();
        assert_eq!(model.config().hidden_size, 256, "{ty}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bad_files_are_refused_naming_the_key_or_tensor() {
    let tmp = temp_dir("bad");
    let dir = common::data_dir().join("base");
    let good = tmp.join("good.gguf");
    write_gguf(&dir, &good, GgmlType::Q8_0, &[]);
    let bytes = std::fs::read(&good).unwrap();

    // Truncated: the last tensor ends past the end.
    let truncated = tmp.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let err = GgufModelFile::open(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("truncated") && err.contains(".weight"),
        "{err}"
    );

    // Unknown type: patch the type id of the first tensor info (after its name and dims).
    let name = b"blk.0.attn_k.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let mut patched = bytes.clone();
    let type_at = at + name.len() + 4 + 2 * 8;
    patched[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let unknown = tmp.join("unknown.gguf");
    std::fs::write(&unknown, &patched).unwrap();
    let err = GgufModelFile::open(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("99"),
        "{err}"
    );

    // Metadata that disagrees with the shapes.
    let wrong = tmp.join("wrong.gguf");
    write_gguf(&dir, &wrong, GgmlType::F32, &[]);
    let text_meta = [("llama.feed_forward_length".to_string(), GgufValue::U32(48))];
    // Re-write with the wrong value replacing the right one.
    let mut file = quant_core::gguf::GgufFile::open(&wrong).unwrap();
    for (k, v) in file.metadata.iter_mut() {
        if k == &text_meta[0].0 {
            *v = text_meta[0].1.clone();
        }
    }
    rewrite(&file, &tmp.join("wrong2.gguf"));
    let err = GgufModelFile::open(tmp.join("wrong2.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.0.ffn_") && err.contains("disagrees with the metadata"),
        "{err}"
    );

    // Missing metadata key.
    let mut file = quant_core::gguf::GgufFile::open(&good).unwrap();
    file.metadata.retain(|(k, _)| k != "llama.block_count");
    rewrite(&file, &tmp.join("nokey.gguf"));
    let err = GgufModelFile::open(tmp.join("nokey.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("llama.block_count"), "{err}");

    // Unsupported architecture.
    let mut file = quant_core::gguf::GgufFile::open(&good).unwrap();
    for (k, v) in file.metadata.iter_mut() {
        if k == "general.architecture" {
            *v = GgufValue::String("gpt2".into());
        }
    }
    rewrite(&file, &tmp.join("gpt2.gguf"));
    let err = GgufModelFile::open(tmp.join("gpt2.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("general.architecture") && err.contains("gpt2"),
        "{err}"
    );

    // A `rope_freqs` tensor whose values are not divisors (here: other bytes) is refused by name.
    let llama3 = tmp.join("llama3.gguf");
    write_gguf(
        &arch_dir("llama3").join("base"),
        &llama3,
        GgmlType::F32,
        &[],
    );
    let mut file = quant_core::gguf::GgufFile::open(&llama3).unwrap();
    file.tensors.push(quant_core::gguf::TensorInfo {
        name: "rope_freqs.weight".into(),
        shape: vec![8],
        ty: GgmlType::F32,
        offset: 0,
        size: 32,
    });
    rewrite(&file, &tmp.join("llama3b.gguf"));
    let err = GgufModelFile::open(tmp.join("llama3b.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_freqs.weight"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Writes `file`'s metadata and tensors (data copied from the file it was read from; a tensor
/// added to the list is written as zeros) to `out`.
fn rewrite(file: &quant_core::gguf::GgufFile, out: &Path) {
    let specs: Vec<TensorSpec> = file
        .tensors
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.shape.clone(), t.ty))
        .collect();
    let mut writer = GgufWriter::create(out, &file.metadata, &specs).unwrap();
    for t in &file.tensors {
        let data = file
            .read_tensor_bytes(&t.name)
            .unwrap_or_else(|_| vec![0u8; t.size as usize]);
        writer.write_tensor(&t.name, &data).unwrap();
    }
    writer.finish().unwrap();
}

fn real_model_paths() -> Option<(PathBuf, PathBuf)> {
    let gguf = PathBuf::from(std::env::var_os("LORA_QAT_REAL_MODEL")?);
    let hf = std::env::var_os("LORA_QAT_REAL_MODEL_HF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/models/smollm2-hf"));
    Some((gguf, hf))
}

/// Logits of the Q4_1 file (dequantized by ggml's decoding) against the transformers
/// directory made from it (`AutoModelForCausalLM.from_pretrained(.., gguf_file=..)`): 1e-4.
/// Run with `cargo xtask real-model` (or LORA_QAT_REAL_MODEL=FILE.gguf cargo test --release
/// -p lm --test gguf_model -- --ignored real_model).
#[test]
#[ignore = "needs the real model: cargo xtask real-model"]
fn real_model_gguf_logits_equal_the_transformers_directory() {
    let (gguf, hf) = real_model_paths().expect("LORA_QAT_REAL_MODEL");
    let source = GgufModelFile::open(&gguf).unwrap();
    let reference = LlamaModel::from_pretrained(&hf).unwrap();
    assert_eq!(source.config(), reference.config());
    let mut model = source.load_dequantized().unwrap();
    let mut reference = reference;
    let ids = Array2::from_shape_vec(
        (1, 12),
        vec![1u32, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 198, 1],
    )
    .unwrap();
    let a = model.logits(ids.view(), None).unwrap();
    let b = reference.logits(ids.view(), None).unwrap();
    let err = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    eprintln!("SmolLM2 Q4_1: logits vs the transformers directory {err:e}");
    assert!(err <= 1e-4, "{err}");
    let greedy_a = model
        .generate(&[1, 9690, 198], 16, &Sampling::Greedy, None)
        .unwrap();
    let greedy_b = reference
        .generate(&[1, 9690, 198], 16, &Sampling::Greedy, None)
        .unwrap();
    assert_eq!(greedy_a, greedy_b);
}

/// The quantized base of every type computes as the dequantized one (the blocks decode to
/// the same weights; only the products' summation order differs): logits within 1e-5 of the
/// largest logit, and LoRA, DoRA and LoRA-QAT train over it (finite adapter gradients equal
/// to those over the f32 decoding within 1e-4 relative). Resident base bytes: the file's
/// projection bytes plus the f32 embedding and norms.
#[test]
fn quantized_base_of_every_type_computes_as_the_dequantized_one() {
    use lora_core::{LoraConfig, QatMode};
    let tmp = temp_dir("quantized");
    let ids = Array2::from_shape_vec((1, 6), vec![3u32, 17, 5, 9, 22, 1]).unwrap();
    let labels = ids.mapv(i64::from);
    let targets = common::PROJECTIONS;
    for (ty, tied) in quant_core::ggml::ALL_TYPES
        .into_iter()
        .flat_map(|ty| [(ty, false), (ty, true)])
    {
        let dir = tmp.join(format!("wide-tied-{tied}"));
        if !dir.exists() {
            wide_llama_tied(&dir, tied);
        }
        let path = tmp.join(format!("{}-tied-{tied}.gguf", ty.name()));
        write_gguf(&dir, &path, ty, &[]);
        let source = GgufModelFile::open(&path).unwrap();
        let mut quantized = source.load_quantized().unwrap();
        let mut dense = source.load_dequantized().unwrap();
        let q_kind = quantized.layers()[0]
            .linear("self_attn.q_proj")
            .unwrap()
            .kind();
        assert_eq!(q_kind, "ggml", "{ty}");
        let a = quantized.logits(ids.view(), None).unwrap();
        let b = dense.logits(ids.view(), None).unwrap();
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&a, &b.into_dyn());
        assert!(err <= 1e-5 * scale.max(1.0), "{ty}: logits differ by {err}");

        // The embedding stays in its blocks; a lookup decodes exactly the rows of the
        // dequantized matrix (bit for bit), and the tied head (above: logits) is their product.
        assert_eq!(quantized.embed_tokens().dense(), None, "{ty}");
        let lookup = [63u32, 0, 17, 17, 40];
        let rows = quantized.embed_tokens().gather(&lookup, None).unwrap();
        let dense_e = dense.embed_tokens().dense().unwrap().value();
        for (r, &id) in lookup.iter().enumerate() {
            let same = rows
                .row(r)
                .iter()
                .zip(dense_e.row(id as usize))
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty}: embedding row {id}");
        }
        assert!(quantized.embed_tokens().gather(&[64], None).is_err());

        // Resident bytes: every matrix (embedding, projections, the untied head) as stored in
        // the file; only the norms stay f32.
        let matrix_bytes: u64 = source
            .gguf()
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.size)
            .sum();
        let report = quantized.memory_report();
        let ggml_bytes: usize = report
            .base_bytes_by_kind
            .iter()
            .filter(|(k, _)| k.starts_with("ggml"))
            .map(|(_, b)| *b)
            .sum();
        assert_eq!(ggml_bytes as u64, matrix_bytes, "{ty}: {report}");
        let norm_bytes = source.tensor_bytes() - matrix_bytes;
        assert_eq!(
            report.base_bytes() as u64,
            source.tensor_bytes(),
            "{ty}: {report}"
        );
        assert!(norm_bytes > 0);

        for (kind, dora) in [("LoRA", false), ("DoRA", true)] {
            let mut lora = LoraConfig::new(4, 8.0, &targets);
            lora.use_dora = dora;
            // B non-zero from the start, so every gradient flows.
            lora.init_lora_weights = lora_core::InitLoraWeights::Random;
            let mut q = source.load_quantized().unwrap();
            let mut d = source.load_dequantized().unwrap();
            q.inject_adapters(&lora, "a", 5).unwrap();
            d.inject_adapters(&lora, "a", 5).unwrap();
            let lq = q
                .loss_and_backward(ids.view(), labels.view(), None)
                .unwrap();
            let ld = d
                .loss_and_backward(ids.view(), labels.view(), None)
                .unwrap();
            assert!(
                (lq - ld).abs() <= 1e-5 * ld.abs().max(1.0),
                "{ty} {kind}: {lq} vs {ld}"
            );
            let gq = q.adapter_gradients("a").unwrap();
            let gd = d.adapter_gradients("a").unwrap();
            for ((name, x), (_, y)) in gq.iter().zip(&gd) {
                let norm = y.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                let diff = x
                    .iter()
                    .zip(y)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(x.iter().all(|v| v.is_finite()), "{ty} {kind} {name}");
                assert!(diff / norm <= 1e-4, "{ty} {kind} {name}: {}", diff / norm);
            }
        }
        let mut q = source.load_quantized().unwrap();
        let lora = LoraConfig::new(4, 8.0, &targets);
        q.inject_qat_adapters(
            &lora,
            &quant_core::config::QatConfig::piq3(),
            QatMode::QuantizeMerged,
            "qat",
            5,
        )
        .unwrap();
        let loss = q
            .loss_and_backward(ids.view(), labels.view(), None)
            .unwrap();
        assert!(loss.is_finite(), "{ty}: LoRA-QAT loss {loss}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
