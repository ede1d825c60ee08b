//! Published-style adapters: PEFT's golden adapter files (`tests/data/llama/adapter_*`)
//! converted to f16 and bf16 (as most adapters on the Hub are stored) load, widen to f32, and
//! give PEFT's logits within the rounding of the stored type; saving with each
//! `--save-dtype` writes that dtype and loads back.

mod common;

use common::{data_dir, io_ids, max_abs_diff, read_f32s};
use std::path::{Path, PathBuf};

use lm::LlamaModel;
use lora_core::peft::SaveDtype;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-adapter-dtypes-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies adapter directory `src` to `dst` with every f32 tensor stored as `dtype`.
fn convert(src: &Path, dst: &Path, dtype: Dtype) {
    std::fs::copy(
        src.join("adapter_config.json"),
        dst.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned = Vec::new();
    for (name, view) in file.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let data: Vec<u8> = view
            .data()
            .chunks_exact(4)
            .flat_map(|c| {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                match dtype {
                    Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                    Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                    _ => unreachable!(),
                }
            })
            .collect();
        owned.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dst.join("adapter_model.safetensors"), out).unwrap();
}

fn logits_with(adapter: &Path) -> ndarray::Array3<f32> {
    let (ids, _) = io_ids();
    let mut model = LlamaModel::from_pretrained(data_dir().join("base")).unwrap();
    assert_eq!(model.load_adapter(adapter, "default", 0).unwrap(), 14);
    model.forward(ids.view(), None).unwrap().logits().clone()
}

#[test]
fn f16_and_bf16_adapter_files_give_peft_logits_within_their_rounding() {
    let io = read_f32s(&data_dir().join("io.safetensors"));
    // Logits here are O(1); a relative rounding of 2⁻¹¹ (f16) or 2⁻⁸ (bf16) of A, B and
    // the magnitude moves them by far less than these bounds (measured: see the eprintln).
    for (variant, dtype, tolerance) in [
        ("lora", Dtype::F16, 2e-3f32),
        ("lora", Dtype::BF16, 1.5e-2),
        ("dora", Dtype::F16, 2e-3),
        ("dora", Dtype::BF16, 1.5e-2),
        ("rslora", Dtype::BF16, 1.5e-2),
    ] {
        let dir = temp_dir(&format!("{variant}-{dtype:?}"));
        convert(&data_dir().join(format!("adapter_{variant}")), &dir, dtype);
        let logits = logits_with(&dir);
        let diff = max_abs_diff(&logits, &io[&format!("{variant}_logits")]);
        eprintln!("{variant} {dtype:?}: max |logits − PEFT f32| = {diff:e}");
        assert!(diff <= tolerance, "{variant} {dtype:?}: {diff}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn save_dtype_writes_that_dtype_and_loads_back() {
    let mut model = LlamaModel::from_pretrained(data_dir().join("base")).unwrap();
    model
        .load_adapter(data_dir().join("adapter_lora"), "default", 0)
        .unwrap();
    for (save, want) in [
        (SaveDtype::F32, Dtype::F32),
        (SaveDtype::F16, Dtype::F16),
        (SaveDtype::Bf16, Dtype::BF16),
    ] {
        let dir = temp_dir(&format!("save-{}", save.name()));
        model.save_adapter_as(&dir, "default", save).unwrap();
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert!(file.tensors().iter().all(|(_, v)| v.dtype() == want));
        let logits = logits_with(&dir);
        let reference = logits_with(&data_dir().join("adapter_lora"));
        let diff = logits
            .iter()
            .zip(reference.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let tolerance = match save {
            SaveDtype::F32 => 0.0,
            SaveDtype::F16 => 2e-3,
            SaveDtype::Bf16 => 1.5e-2,
        };
        assert!(diff <= tolerance, "{}: {diff}", save.name());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
