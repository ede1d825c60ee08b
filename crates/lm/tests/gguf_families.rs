//! GGUF export of every family's tiny golden model (tests/data/arch/<family>/, transformers
//! checkpoints with a PEFT LoRA): the file has the architecture name, tensor names, shapes and
//! metadata llama.cpp's converter writes for the family, reads back (names un-mapped, rows
//! un-permuted, Gemma norms `−1`) to the checkpoint's values exactly in f32, and the LoRA
//! adapter exports under the same names. Options llama.cpp cannot express are refused.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use lm::gguf::names::FamilyNames;
use lm::gguf::{export_gguf, export_gguf_lora, read_gguf};
use lm::lazy_checkpoint::LazyCheckpoint;
use lm::LlamaConfig;
use quant_core::ggml::GgmlType;
use quant_core::gguf::{GgufFile, GgufValue, ReadTensorF32};

const FAMILIES: [&str; 7] = [
    "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
];

fn arch_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/arch")
        .join(family)
}

/// A fresh directory per call: tests run in parallel threads of one process, and two of them
/// editing the same base must not share (and delete) each other's copy.
fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lm-gguf-fam-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The GGUF names the converter writes for the family's golden model (2 layers).
fn expected_names(family: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["token_embd.weight", "output_norm.weight"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let layer: &[&str] = match family {
        "llama3" | "mistral" => &[
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ],
        "qwen2" => &[
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ],
        "qwen3" => &[
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_q_norm",
            "attn_k_norm",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ],
        "gemma2" => &[
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "post_attention_norm",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        ],
        "gemma3" => &[
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_q_norm",
            "attn_k_norm",
            "attn_output",
            "post_attention_norm",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        ],
        "phi3" => &[
            "attn_norm",
            "attn_qkv",
            "attn_output",
            "ffn_norm",
            "ffn_up",
            "ffn_down",
        ],
        _ => unreachable!(),
    };
    for l in 0..2 {
        for t in layer {
            names.insert(format!("blk.{l}.{t}.weight"));
        }
        if family == "qwen2" {
            for t in ["attn_q", "attn_k", "attn_v"] {
                names.insert(format!("blk.{l}.{t}.bias"));
            }
        }
    }
    match family {
        "llama3" => {
            names.insert("rope_freqs.weight".into());
        }
        "mistral" | "phi3" => {
            names.insert("output.weight".into());
        }
        _ => {}
    }
    names
}

fn meta_u64(file: &GgufFile, key: &str) -> u64 {
    file.metadata(key)
        .and_then(GgufValue::as_u64)
        .unwrap_or_else(|| panic!("{key} missing"))
}

fn meta_f32(file: &GgufFile, key: &str) -> f32 {
    match file.metadata(key) {
        Some(GgufValue::F32(v)) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

/// The family's golden base; Mistral's with its window (4, refused: llama.cpp's `llama` has
/// no sliding window) widened to the context, where it never hides a key.
fn base_dir(family: &str) -> PathBuf {
    if family == "mistral" {
        edited_base("mistral", "wide-window", |c| {
            c["sliding_window"] = 128.into()
        })
    } else {
        arch_dir(family).join("base")
    }
}

#[test]
fn every_family_exports_with_the_converters_names_and_reads_back_exactly() {
    let tmp = temp_dir("model");
    for family in FAMILIES {
        let base = base_dir(family);
        let config = LlamaConfig::from_file(base.join("config.json")).unwrap();
        let arch = FamilyNames::of(config.family()).arch;
        let out = tmp.join(format!("{family}.gguf"));
        let report = export_gguf(&base, None, &out, GgmlType::F32)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(report.arch, arch);
        let file = GgufFile::open(&out).unwrap();
        assert_eq!(file.metadata_str("general.architecture"), Some(arch));
        let names: BTreeSet<String> = file.tensors.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, expected_names(family), "{family}");

        // Metadata the converter writes for every family.
        let key = |k: &str| format!("{arch}.{k}");
        assert_eq!(meta_u64(&file, &key("block_count")), 2, "{family}");
        assert_eq!(meta_u64(&file, &key("embedding_length")), 64);
        assert_eq!(meta_u64(&file, &key("context_length")), 128);
        assert_eq!(
            meta_u64(&file, &key("feed_forward_length")),
            config.intermediate_size as u64
        );
        assert_eq!(meta_u64(&file, &key("attention.head_count")), 4);
        assert_eq!(meta_u64(&file, &key("attention.head_count_kv")), 2);
        assert_eq!(meta_u64(&file, &key("attention.key_length")), 16);
        assert_eq!(
            meta_f32(&file, &key("attention.layer_norm_rms_epsilon")),
            config.rms_norm_eps
        );
        assert_eq!(
            meta_f32(&file, &key("rope.freq_base")),
            config.architecture.ropes[0].theta
        );
        match family {
            "gemma2" => {
                assert_eq!(meta_f32(&file, &key("attn_logit_softcapping")), 1.0);
                assert_eq!(meta_f32(&file, &key("final_logit_softcapping")), 2.0);
                assert_eq!(meta_u64(&file, &key("attention.sliding_window")), 4);
            }
            "gemma3" => {
                assert_eq!(meta_u64(&file, &key("attention.sliding_window")), 4);
                assert_eq!(meta_f32(&file, &key("rope.freq_base_swa")), 10000.0);
                assert_eq!(file.metadata_str(&key("rope.scaling.type")), Some("linear"));
                assert_eq!(meta_f32(&file, &key("rope.scaling.factor")), 8.0);
                // Layers [sliding, full] are not llama.cpp's default (5 of 6 sliding).
                match file.metadata(&key("attention.sliding_window_pattern")) {
                    Some(GgufValue::Array(a)) => assert_eq!(a.len(), 2),
                    other => panic!("sliding_window_pattern: {other:?}"),
                }
            }
            "phi3" => {
                assert_eq!(meta_u64(&file, &key("attention.sliding_window")), 0);
                assert_eq!(
                    meta_u64(&file, &key("rope.scaling.original_context_length")),
                    4096
                );
                assert_eq!(meta_u64(&file, &key("rope.dimension_count")), 16);
            }
            "llama3" | "mistral" => {
                assert_eq!(meta_u64(&file, &key("rope.dimension_count")), 16);
                assert_eq!(
                    meta_u64(&file, &key("vocab_size")),
                    config.vocab_size as u64
                );
            }
            _ => {}
        }

        // Read back: the checkpoint's own values under its own names.
        let source = LazyCheckpoint::open(&base).unwrap();
        let back = read_gguf(&out).unwrap();
        assert_eq!(back.names.arch, arch);
        let stored: BTreeSet<String> = source
            .tensors()
            .map(|t| t.name.clone())
            .filter(|n| !n.ends_with("inv_freq"))
            .collect();
        let read: BTreeSet<String> = back.tensors.iter().map(|t| t.0.clone()).collect();
        assert_eq!(read, stored, "{family}");
        for (name, shape, values) in &back.tensors {
            assert_eq!(shape, &source.tensor(name).unwrap().shape, "{name}");
            let expected = source.read_f32(name).unwrap();
            if family.starts_with("gemma") && name.ends_with("norm.weight") {
                // `(w + 1) − 1` in f32 rounds to the spacing of f32 around 1 (2^-23).
                let worst = values
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst <= f32::EPSILON, "{family} {name}: {worst}");
            } else {
                assert_eq!(values, &expected, "{family} {name}");
            }
        }
        // The stored GGUF values carry the family's transforms.
        let raw = |n: &str| file.read_tensor_f32(n).unwrap();
        let hf = |n: &str| source.read_f32(n).unwrap();
        if family.starts_with("gemma") {
            let g = raw("blk.0.ffn_norm.weight");
            let h = hf("model.layers.0.pre_feedforward_layernorm.weight");
            assert!(g.iter().zip(&h).all(|(g, h)| *g == h + 1.0));
        } else {
            assert_eq!(
                raw("blk.0.attn_norm.weight"),
                hf("model.layers.0.input_layernorm.weight")
            );
        }
        let q = raw(if family == "phi3" {
            "blk.0.attn_qkv.weight"
        } else {
            "blk.0.attn_q.weight"
        });
        let hq = hf(if family == "phi3" {
            "model.layers.0.self_attn.qkv_proj.weight"
        } else {
            "model.layers.0.self_attn.q_proj.weight"
        });
        assert_eq!(
            q == hq,
            !matches!(family, "llama3" | "mistral"),
            "{family}: permuted iff llama"
        );
        if family == "llama3" {
            let (_, shape, f) = &back.extras[0];
            assert_eq!(shape, &vec![8]);
            // factor 8, low/high 1/4 over an original context of 32: high frequencies kept,
            // low ones divided by 8.
            assert_eq!(f[0], 1.0);
            assert_eq!(f[7], 8.0);
        }
    }
}

#[test]
fn every_familys_lora_exports_under_the_base_tensor_names() {
    let tmp = temp_dir("lora");
    for family in FAMILIES {
        let dir = arch_dir(family);
        let out = tmp.join(format!("{family}-lora.gguf"));
        let base = base_dir(family);
        let report = export_gguf_lora(&base, &dir.join("adapter_lora"), &out, GgmlType::F32)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let file = GgufFile::open(&out).unwrap();
        assert_eq!(file.metadata_str("general.architecture"), Some(report.arch));
        assert_eq!(file.metadata_str("general.type"), Some("adapter"));
        assert_eq!(file.metadata_str("adapter.type"), Some("lora"));
        let model = GgufFile::open(&{
            let m = tmp.join(format!("{family}.gguf"));
            export_gguf(&base, None, &m, GgmlType::F32).unwrap();
            m
        })
        .unwrap();
        let base_shapes: HashMap<&str, &Vec<usize>> = model
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), &t.shape))
            .collect();
        assert!(!file.tensors.is_empty());
        for t in &file.tensors {
            let (base, part) = t.name.rsplit_once('.').unwrap();
            let shape = base_shapes
                .get(base)
                .unwrap_or_else(|| panic!("{family}: {} has no base tensor", t.name));
            match part {
                "lora_a" => assert_eq!(t.shape[1], shape[1], "{}", t.name),
                "lora_b" => assert_eq!(t.shape[0], shape[0], "{}", t.name),
                other => panic!("{other}"),
            }
        }
        if family == "phi3" {
            assert!(file.tensor("blk.0.attn_qkv.weight.lora_b").is_some());
            assert!(file.tensor("blk.0.ffn_up.weight.lora_b").is_some());
        }
    }
}

/// A copy of a golden base whose config.json is edited by `edit`.
fn edited_base(family: &str, tag: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = arch_dir(family).join("base");
    let dir = temp_dir(tag);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// An edit of a config.json.
type ConfigEdit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn options_llama_cpp_cannot_express_are_refused_by_name() {
    let cases: Vec<(&str, &str, ConfigEdit)> = vec![
        // The golden Mistral's window of 4 (llama.cpp's `llama` has no sliding window).
        ("mistral", "sliding_window", Box::new(|_| {})),
        // llama.cpp's `phi3` reads the window but attends to every key.
        (
            "phi3",
            "sliding_window",
            Box::new(|c| c["sliding_window"] = 4.into()),
        ),
        (
            "gemma2",
            "query_pre_attn_scalar",
            Box::new(|c| c["query_pre_attn_scalar"] = 32.into()),
        ),
        (
            "gemma2",
            "tie_word_embeddings",
            Box::new(|c| c["tie_word_embeddings"] = false.into()),
        ),
        (
            "qwen2",
            "sliding_window",
            Box::new(|c| {
                c["use_sliding_window"] = true.into();
                c["sliding_window"] = 4.into();
                c["max_window_layers"] = 0.into();
                c["layer_types"] = serde_json::json!(["sliding_attention", "sliding_attention"]);
            }),
        ),
        (
            "qwen3",
            "rope_type",
            Box::new(|c| {
                c["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0,
                    "rope_theta": 10000.0, "original_max_position_embeddings": 64})
            }),
        ),
    ];
    for (family, key, edit) in cases {
        let dir = edited_base(family, key, edit);
        let err = export_gguf(&dir, None, &dir.join("m.gguf"), GgmlType::F32)
            .expect_err(key)
            .to_string();
        assert!(err.contains(key), "{family}: {err}");
        assert!(!dir.join("m.gguf").exists());
    }
}

/// The largest absolute difference of two arrays' elements.
fn max_abs_diff(a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Phi-3 LongRoPE: the `rope_factors_long/short` tensors, `rope.scaling.attn_factor` and the
/// original length come back as the same `longrope` parameters (the long factors used past
/// the original length), so the logits equal the checkpoint's, and the derived config.json
/// states the same rope.
#[test]
fn phi3_longrope_files_load_back_with_their_factors() {
    let base = edited_base("phi3", "longrope", |c| {
        c["original_max_position_embeddings"] = 32.into();
        c["rope_parameters"] = serde_json::json!({
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]});
    });
    let path = base.join("m.gguf");
    export_gguf(&base, None, &path, GgmlType::F32).unwrap();
    let source = lm::gguf_model::GgufModelFile::open(&path).unwrap();
    let from_dir = lm::LlamaModel::from_pretrained(&base).unwrap();
    assert_eq!(
        source.config().architecture.ropes,
        from_dir.config().architecture.ropes
    );
    assert!(source.explicit_rope_factors().is_none());
    let mut from_gguf = source.load_dequantized().unwrap();
    let mut from_dir = from_dir;
    for len in [12usize, 40] {
        let ids = ndarray::Array2::from_shape_fn((1, len), |(_, i)| ((i * 7 + 3) % 100) as u32);
        let a = from_gguf.logits(ids.view(), None).unwrap();
        let b = from_dir.logits(ids.view(), None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{len} tokens");
    }
    let reparsed = LlamaConfig::from_json_value(source.config_json()).unwrap();
    assert_eq!(
        reparsed.architecture.ropes,
        source.config().architecture.ropes
    );
}

/// Llama 3: the `rope_freqs` divisors give back `llama3` rope parameters that regenerate them
/// bit for bit (the derived config.json states them); divisors no such parameters make are
/// used as they are ([`lm::rope::RopeScaling::Factors`]), and a config.json of them is refused.
#[test]
fn llama3_rope_freqs_become_the_rope_parameters_or_explicit_divisors() {
    let tmp = temp_dir("llama3-rope");
    let base = arch_dir("llama3").join("base");
    let path = tmp.join("m.gguf");
    export_gguf(&base, None, &path, GgmlType::F32).unwrap();
    let source = lm::gguf_model::GgufModelFile::open(&path).unwrap();
    let mut from_dir = lm::LlamaModel::from_pretrained(&base).unwrap();
    let rope = &from_dir.config().architecture.ropes[0];
    let stored = GgufFile::open(&path)
        .unwrap()
        .read_tensor_f32("rope_freqs.weight")
        .unwrap();
    let lm::rope::RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max,
    } = source.config().architecture.ropes[0].scaling.clone()
    else {
        panic!("{:?}", source.config().architecture.ropes[0]);
    };
    let regenerated = lm::rope::factors::llama3_rope_freqs(
        rope.theta,
        rope.dim,
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max,
    );
    assert_eq!(regenerated, stored);
    let rope_json = &source.config_json()["rope_parameters"];
    assert_eq!(rope_json["rope_type"], "llama3", "{rope_json}");

    // The same file with one divisor moved: read with the divisors themselves.
    let edited = tmp.join("edited.gguf");
    let mut divisors = stored.clone();
    divisors[1] *= 1.01;
    rewrite_tensor(&path, &edited, "rope_freqs.weight", &divisors);
    let odd = lm::gguf_model::GgufModelFile::open(&edited).unwrap();
    assert_eq!(odd.explicit_rope_factors(), Some(&divisors[..]));
    assert_eq!(
        odd.config().architecture.ropes[0].scaling,
        lm::rope::RopeScaling::Factors {
            factors: divisors.clone()
        }
    );
    let Err(err) = lm::lazy_checkpoint::LazyCheckpoint::open_gguf(&edited) else {
        panic!("a config.json cannot state explicit divisors");
    };
    let err = err.to_string();
    assert!(err.contains("rope_freqs.weight"), "{err}");

    let ids = ndarray::Array2::from_shape_fn((1, 40), |(_, i)| ((i * 5 + 1) % 100) as u32);
    let expected = from_dir.logits(ids.view(), None).unwrap();
    let same = source
        .load_dequantized()
        .unwrap()
        .logits(ids.view(), None)
        .unwrap();
    assert_eq!(max_abs_diff(&same, &expected), 0.0);
    // With the stored divisors as they are (`llama3_rope_freqs` of the parameters), the
    // frequencies are llama.cpp's `θ_i / f_i`: within f32 rounding of transformers'.
    let mut exact = source.config().clone();
    exact.architecture.ropes[0].scaling = lm::rope::RopeScaling::Factors { factors: stored };
    let mut by_divisors = lm::LlamaModel::from_source(
        exact,
        &mut lm::gguf_model::GgufSource {
            file: &source,
            base: lm::gguf_model::GgufBase::Dequantized,
        },
    )
    .unwrap();
    let near = by_divisors.logits(ids.view(), None).unwrap();
    let err = max_abs_diff(&near, &expected);
    assert!(err <= 1e-4, "explicit divisors: logits differ by {err}");
    let odd_logits = odd
        .load_dequantized()
        .unwrap()
        .logits(ids.view(), None)
        .unwrap();
    assert!(max_abs_diff(&odd_logits, &expected) > 0.0);
}

/// `src` with tensor `name` (F32) holding `values`, written to `dst`.
fn rewrite_tensor(src: &Path, dst: &Path, name: &str, values: &[f32]) {
    let file = GgufFile::open(src).unwrap();
    let info = file.tensor(name).unwrap();
    assert_eq!(info.ty, GgmlType::F32);
    let mut bytes = std::fs::read(src).unwrap();
    let start = (file.data_offset + info.offset) as usize;
    for (i, v) in values.iter().enumerate() {
        bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(dst, bytes).unwrap();
}

/// The exporter and the GGUF model reader (`lm::gguf_model`) through the one table: every
/// family's exported f32 file loads back as a model computing the checkpoint's logits.
#[test]
fn exported_files_load_back_as_the_same_model() {
    let tmp = temp_dir("load");
    let ids =
        ndarray::Array2::from_shape_vec((1, 12), vec![3u32, 17, 4, 9, 33, 2, 60, 5, 1, 8, 41, 12])
            .unwrap();
    for family in FAMILIES {
        let base = base_dir(family);
        let path = tmp.join(format!("{family}.gguf"));
        export_gguf(&base, None, &path, GgmlType::F32).unwrap();
        let loaded = lm::gguf_model::GgufModelFile::open(&path).and_then(|f| f.load_dequantized());
        let mut from_gguf = loaded.unwrap_or_else(|e| panic!("{family}: {e}"));
        let mut from_dir = lm::LlamaModel::from_pretrained(&base).unwrap();
        let a = from_gguf.logits(ids.view(), None).unwrap();
        let b = from_dir.logits(ids.view(), None).unwrap();
        let err = max_abs_diff(&a, &b);
        // Gemma's norms come back as (w + 1) − 1 in f32 (within 2^-23); the rest exactly.
        assert!(err <= 1e-5, "{family}: logits differ by {err}");
    }
}

#[test]
fn yarn_files_load_back_as_the_same_model() {
    // YaRN is what llama.cpp's converter writes for Qwen2/Qwen3 long-context configs: the
    // factor, the original context and beta fast/slow; reading it back gives the same rope.
    let tmp = temp_dir("yarn");
    let ids =
        ndarray::Array2::from_shape_vec((1, 40), (0..40u32).map(|i| (i * 7 + 3) % 101).collect())
            .unwrap();
    for family in ["qwen2", "qwen3"] {
        let base = edited_base(family, &format!("yarn-{family}"), |c| {
            c["rope_parameters"] = serde_json::json!({
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 1000000.0
            });
        });
        let path = tmp.join(format!("{family}.gguf"));
        export_gguf(&base, None, &path, GgmlType::F32).unwrap();
        let source = lm::gguf_model::GgufModelFile::open(&path).unwrap();
        let rope_json = &source.config_json()["rope_parameters"];
        assert_eq!(rope_json["rope_type"], "yarn", "{family}: {rope_json}");
        assert_eq!(
            rope_json["original_max_position_embeddings"], 16,
            "{family}"
        );
        let vocab = source.config().vocab_size as u32;
        let ids = ids.mapv(|i| i % vocab);
        let mut from_gguf = source.load_dequantized().unwrap();
        let mut from_dir = lm::LlamaModel::from_pretrained(&base).unwrap();
        assert_eq!(
            from_gguf.config().architecture.ropes[0].scaling,
            from_dir.config().architecture.ropes[0].scaling,
            "{family}"
        );
        let a = from_gguf.logits(ids.view(), None).unwrap();
        let b = from_dir.logits(ids.view(), None).unwrap();
        let err = max_abs_diff(&a, &b);
        assert!(err <= 1e-5, "{family}: logits differ by {err}");
    }
}
