//! Model sources and pluggable bases: a model built through [`ModelSource`] from a lazily
//! read checkpoint equals `from_pretrained`; a model whose projections are ggml blocks (as a
//! GGUF reader builds it) computes what the dequantized dense model computes, forward and
//! backward, and takes LoRA, DoRA and LoRA-QAT adapters like a dense one.

mod common;

use std::path::PathBuf;

use common::{data_dir, io_ids};
use lm::lazy_checkpoint::LazyCheckpoint;
use lm::{cross_entropy, Checkpoint, LinearModule, LlamaConfig, LlamaModel, ModelSource, Result};
use lora_core::{FrozenBase, GgmlBase, InitLoraWeights, LoraConfig, QatMode};
use ndarray::{ArrayD, ArrayViewD, Axis};
use quant_core::config::QatConfig;
use quant_core::ggml::GgmlType;

fn max_diff(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>) -> f32 {
    common::max_abs(a, b)
}

fn arch_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/arch")
        .join(family)
        .join("base")
}

#[test]
fn lazy_checkpoint_source_builds_what_from_pretrained_loads() {
    for dir in [
        data_dir().join("base"),
        data_dir().join("base_bnb4"),
        arch_dir("qwen2"),
        arch_dir("phi3"),
    ] {
        let expected = LlamaModel::from_pretrained(&dir).unwrap();
        let mut lazy = LazyCheckpoint::open(&dir).unwrap();
        let config = lazy.config.clone();
        let built = LlamaModel::from_source(config, &mut lazy).unwrap();
        assert_eq!(built, expected, "{}", dir.display());
        let kinds: Vec<&str> = built.layers()[0]
            .linears()
            .into_iter()
            .map(|(_, l)| l.kind())
            .collect();
        let bnb = dir.ends_with("base_bnb4");
        assert!(
            kinds
                .iter()
                .all(|k| *k == if bnb { "NF4" } else { "dense f32" }),
            "{kinds:?}"
        );
    }
}

#[test]
fn a_source_missing_a_tensor_is_an_error_naming_it() {
    struct Empty;
    impl ModelSource for Empty {
        fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
            Err(lm::LmError::MissingTensor {
                key: name.to_string(),
                expected: shape.to_vec(),
            })
        }
        fn take_linear(&mut self, path: &str, _: (usize, usize), _: bool) -> Result<LinearModule> {
            Err(lm::LmError::MissingTensor {
                key: format!("{path}.weight"),
                expected: vec![],
            })
        }
    }
    let config = LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap();
    let err = LlamaModel::from_source(config, &mut Empty).unwrap_err();
    assert!(
        err.to_string().contains("model.embed_tokens.weight"),
        "{err}"
    );
}

/// A source that re-encodes every projection of a checkpoint as ggml blocks of `ty`, as a
/// GGUF file would hold them (biases stay `f32` in the base).
struct GgmlSource {
    ckpt: Checkpoint,
    ty: GgmlType,
}

impl ModelSource for GgmlSource {
    fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        self.ckpt.take_f32(name, shape)
    }
    fn take_linear(
        &mut self,
        path: &str,
        shape: (usize, usize),
        bias: bool,
    ) -> Result<LinearModule> {
        let dense = self.ckpt.take_linear(path, shape, bias)?;
        let w = dense.base_weight()?;
        let b = dense.base_bias().map(|b| b.to_owned());
        let base = GgmlBase::quantize(w.view(), b, self.ty, path)?;
        Ok(LinearModule::ggml(base))
    }
    fn discard(&mut self, name: &str) {
        self.ckpt.discard(name)
    }
}

fn ggml_model(dir: &std::path::Path, ty: GgmlType) -> LlamaModel {
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let mut source = GgmlSource {
        ckpt: Checkpoint::open_dir(dir).unwrap(),
        ty,
    };
    let model = LlamaModel::from_source(config, &mut source).unwrap();
    source.ckpt.finish().unwrap();
    model
}

/// The dense model computing with the ggml model's dequantized weights.
fn dequantized_twin(model: &LlamaModel, dir: &std::path::Path) -> LlamaModel {
    let mut dense = LlamaModel::from_pretrained(dir).unwrap();
    let mut ggml = model.clone();
    let weights: Vec<_> = ggml
        .linear_modules_mut()
        .map(|(p, l)| {
            let base = l.base().unwrap();
            assert!(base.storage_kind().starts_with("ggml-"), "{p}");
            (p, base.dense_weight().unwrap().into_owned())
        })
        .collect();
    for (path, w) in weights {
        let lin = dense.linear_module_mut(&path).unwrap();
        let bias = lin.base_bias().map(|b| b.to_owned());
        *lin = LinearModule::dense(w, bias);
    }
    dense
}

#[test]
fn ggml_f32_projections_compute_exactly_what_dense_ones_do() {
    let dir = arch_dir("qwen2");
    let mut ggml = ggml_model(&dir, GgmlType::F32);
    let mut dense = LlamaModel::from_pretrained(&dir).unwrap();
    let (ids, _) = io_ids();
    let ids = ids.mapv(|v| v % dense.config().vocab_size as u32);
    let a = ggml.logits(ids.view(), None).unwrap();
    let b = dense.logits(ids.view(), None).unwrap();
    let diff = max_diff(a.view().into_dyn(), b.view().into_dyn());
    assert!(diff <= 1e-5, "ggml F32 vs dense logits differ by {diff}");
    assert_eq!(
        ggml.layers()[0].linear("self_attn.q_proj").unwrap().kind(),
        "ggml"
    );
    assert!(ggml.layers()[0]
        .linear("self_attn.q_proj")
        .unwrap()
        .base_bias()
        .is_some());
}

/// Forward and the input gradient through frozen Q8_0 projections equal the dequantized
/// dense model's; so do LoRA and DoRA adapter gradients injected over them.
#[test]
fn ggml_q8_0_model_matches_its_dequantized_twin_with_lora_and_dora() {
    let dir = data_dir().join("base");
    let (ids, labels) = io_ids();
    for (use_dora, name) in [(false, "lora"), (true, "dora")] {
        let mut ggml = ggml_model(&dir, GgmlType::Q8_0);
        let mut dense = dequantized_twin(&ggml, &dir);
        let mut config = LoraConfig::new(4, 8.0, &common::PROJECTIONS);
        config.init_lora_weights = InitLoraWeights::Random;
        config.use_dora = use_dora;
        for model in [&mut ggml, &mut dense] {
            assert_eq!(model.inject_adapters(&config, name, 3).unwrap(), 14);
        }
        assert_eq!(
            ggml.layers()[0].linear("mlp.up_proj").unwrap().kind(),
            "LoRA over ggml"
        );
        let mut results = Vec::new();
        for model in [&mut ggml, &mut dense] {
            model.set_training(false);
            let pass = model.forward(ids.view(), None).unwrap();
            let ce = cross_entropy(pass.logits().view(), labels.view()).unwrap();
            let logits = pass.logits().clone();
            let dx = model.backward(pass, ce.grad_logits.view()).unwrap();
            results.push((logits, dx, model.adapter_gradients(name).unwrap()));
        }
        let logits = max_diff(
            results[0].0.view().into_dyn(),
            results[1].0.view().into_dyn(),
        );
        let dx = max_diff(
            results[0].1.view().into_dyn(),
            results[1].1.view().into_dyn(),
        );
        assert!(logits <= 1e-5, "{name}: logits differ by {logits}");
        assert!(dx <= 1e-6, "{name}: input gradients differ by {dx}");
        for ((ka, ga), (kb, gb)) in results[0].2.iter().zip(&results[1].2) {
            assert_eq!(ka, kb);
            let scale = gb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = max_diff(ga.view(), gb.view()) / scale;
            assert!(
                diff <= 1e-4,
                "{name}: {ka} differs by {diff} (relative to max)"
            );
        }
        // Merged back into dense f32 weights, the model computes the same logits.
        ggml.merge_and_unload().unwrap();
        let merged = ggml.logits(ids.view(), None).unwrap();
        let diff = max_diff(merged.view().into_dyn(), results[0].0.view().into_dyn());
        assert!(diff <= 1e-4, "{name}: merged logits differ by {diff}");
    }
}

/// LoRA-QAT over a ggml base trains over the base's dequantized weight: the same layer
/// (and loss) as LoRA-QAT over the dequantized dense model.
#[test]
fn lora_qat_over_a_ggml_base_equals_lora_qat_over_its_dequantized_weight() {
    let dir = data_dir().join("base");
    let (ids, labels) = io_ids();
    let mut ggml = ggml_model(&dir, GgmlType::Q8_0);
    let mut dense = dequantized_twin(&ggml, &dir);
    let mut config = LoraConfig::new(2, 4.0, &["q_proj", "down_proj"]);
    config.init_lora_weights = InitLoraWeights::Random;
    let mut losses = Vec::new();
    for model in [&mut ggml, &mut dense] {
        let n = model
            .inject_qat_adapters(
                &config,
                &QatConfig::piq3(),
                QatMode::QuantizeMerged,
                "qat",
                5,
            )
            .unwrap();
        assert_eq!(n, 4);
        losses.push(
            model
                .loss_and_backward(ids.view(), labels.view(), None)
                .unwrap(),
        );
    }
    assert!((losses[0] - losses[1]).abs() <= 1e-6, "{losses:?}");
    assert_eq!(
        ggml.quantizer_gradients("qat").unwrap(),
        dense.quantizer_gradients("qat").unwrap()
    );
}

/// A frozen ggml projection with a bias: `x·deq(W)ᵀ + b`, `dx = dy·deq(W)`, accumulation
/// into a strided output, and the bias attached after construction.
#[test]
fn a_frozen_ggml_module_forward_and_backward_use_the_decoded_weight() {
    let w = ndarray::Array2::from_shape_fn((5, 64), |(i, j)| ((i * 64 + j) as f32 * 0.11).sin());
    let base = GgmlBase::quantize(w.view(), None, GgmlType::Q4_0, "proj").unwrap();
    let decoded = base.dense_weight().unwrap().into_owned();
    let mut module = LinearModule::ggml(base);
    let bias = ndarray::Array1::from_shape_fn(5, |i| i as f32);
    module.attach_bias(bias.clone(), "proj").unwrap();
    let x = ndarray::Array2::from_shape_fn((3, 64), |(t, j)| ((t + 2 * j) as f32 * 0.05).cos());
    let mut y = ndarray::Array2::<f32>::ones((3, 7));
    module
        .forward(x.view(), y.slice_mut(ndarray::s![.., 1..6]), true)
        .unwrap();
    let expected = x.dot(&decoded.t()) + bias.view().insert_axis(Axis(0)) + 1.0;
    let diff = max_diff(
        y.slice(ndarray::s![.., 1..6]).into_dyn(),
        expected.view().into_dyn(),
    );
    assert!(diff <= 1e-4, "{diff}");
    let dy = ndarray::Array2::from_shape_fn((3, 5), |(t, i)| (t * 5 + i) as f32 * 0.1);
    let mut dx = ndarray::Array2::zeros((3, 64));
    module
        .backward(x.view(), dy.view(), dx.view_mut(), false)
        .unwrap();
    let diff = max_diff(dx.view().into_dyn(), dy.dot(&decoded).view().into_dyn());
    assert!(diff <= 1e-4, "{diff}");
    // Quantized bases never train: nothing is visited, and the wrong bias length is refused.
    module.set_base_trainable(true);
    let mut visited = 0;
    module
        .visit_parameters("proj", &mut |_, _| {
            visited += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(visited, 0);
    let err = module
        .attach_bias(ndarray::Array1::zeros(4), "proj")
        .unwrap_err();
    assert!(err.to_string().contains("proj.bias"), "{err}");
}

/// LoRA-QAT over NF4 projections (a QLoRA checkpoint's, or quantized here) likewise trains
/// over their dequantized weight.
#[test]
fn lora_qat_over_an_nf4_base_equals_lora_qat_over_its_dequantized_weight() {
    let (ids, labels) = io_ids();
    let mut nf4 = LlamaModel::from_pretrained(data_dir().join("base_bnb4")).unwrap();
    let mut dense = nf4.clone();
    for (_, lin) in dense.linear_modules_mut() {
        if let Some(base) = lin.base().filter(|b| b.kind() == "NF4") {
            let w = base.dense_weight().unwrap().into_owned();
            *lin = LinearModule::dense(w, None);
        }
    }
    let mut config = LoraConfig::new(2, 4.0, &["v_proj", "up_proj"]);
    config.init_lora_weights = InitLoraWeights::Random;
    let mut losses = Vec::new();
    for model in [&mut nf4, &mut dense] {
        let n = model
            .inject_qat_adapters(
                &config,
                &QatConfig::piq3(),
                QatMode::QuantizeMerged,
                "qat",
                8,
            )
            .unwrap();
        assert_eq!(n, 4);
        losses.push(
            model
                .loss_and_backward(ids.view(), labels.view(), None)
                .unwrap(),
        );
    }
    assert_eq!(
        nf4.layers()[0].linear("self_attn.v_proj").unwrap().kind(),
        "LoRA-QAT"
    );
    assert_eq!(
        nf4.layers()[0].linear("self_attn.q_proj").unwrap().kind(),
        "NF4"
    );
    assert!((losses[0] - losses[1]).abs() <= 1e-6, "{losses:?}");
    assert_eq!(
        nf4.quantizer_gradients("qat").unwrap(),
        dense.quantizer_gradients("qat").unwrap()
    );
}
