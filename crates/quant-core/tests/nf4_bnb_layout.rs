//! The transformers/bitsandbytes 4-bit checkpoint layout against a real checkpoint:
//! `tests/data/llama/base_bnb4_model.safetensors` is `base_model.safetensors` quantized by
//! bitsandbytes (NF4, blocksize 64, double quant) and saved by transformers.

use std::collections::HashMap;

use quant_core::nf4::bnb_layout::{
    bnb_weight_names, from_bnb_tensors, from_safetensors, quant_state_json, to_bnb_tensors,
    BnbDtype, BnbTensor,
};
use quant_core::nf4::{FourBitTensor, FourBitType};
use quant_core::QuantError;
use safetensors::SafeTensors;

fn read(file: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/llama")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32_tensor(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = file.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

fn stored(file: &SafeTensors<'_>, name: &str) -> BnbTensor {
    let view = file.tensor(name).unwrap();
    let dtype = match view.dtype() {
        safetensors::Dtype::U8 => BnbDtype::U8,
        safetensors::Dtype::F32 => BnbDtype::F32,
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    BnbTensor {
        dtype,
        shape: view.shape().to_vec(),
        bytes: view.data().to_vec(),
    }
}

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn linear_names() -> Vec<String> {
    let mut names: Vec<String> = (0..2)
        .flat_map(|layer| {
            LINEARS
                .iter()
                .map(move |l| format!("model.layers.{layer}.{l}.weight"))
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_quantized_linear_reads_back_within_the_nf4_bound() {
    let bnb_bytes = read("base_bnb4_model.safetensors");
    let base_bytes = read("base_model.safetensors");
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    let base = SafeTensors::deserialize(&base_bytes).unwrap();
    assert_eq!(bnb_weight_names(&bnb), linear_names());

    let half_gap = FourBitType::Nf4.max_half_gap();
    for name in linear_names() {
        let q = from_safetensors(&name, &bnb).unwrap();
        let (shape, weight) = f32_tensor(&base, &name);
        assert_eq!(q.shape(), shape.as_slice(), "{name}");
        assert_eq!(q.quant_type(), FourBitType::Nf4);
        assert_eq!(q.blocksize(), 64);
        let scales = q.absmax_values();
        let deq = q.dequantize();
        for (i, (&w, &d)) in weight.iter().zip(deq.iter()).enumerate() {
            let true_absmax = weight[i / 64 * 64..(i / 64 + 1) * 64]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = scales[i / 64];
            // Rounding error at the true scale plus what decoding the scale changed.
            let bound = half_gap * true_absmax + (scale - true_absmax).abs() + 1e-6;
            assert!(
                (w - d).abs() <= bound,
                "{name}[{i}]: {w} vs {d} (bound {bound})"
            );
        }
    }
}

/// Requantizing the f32 base reproduces every byte of transformers' bnb-4bit checkpoint,
/// including all double-quantized absmax codes: bitsandbytes' CPU kernel codes the centred
/// absmaxes through a 65536-bin lookup table (not the nearest map entry), which
/// `DoubleQuantAbsmax` follows.
#[test]
fn requantizing_the_f32_base_reproduces_the_checkpoint() {
    let bnb_bytes = read("base_bnb4_model.safetensors");
    let base_bytes = read("base_model.safetensors");
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    let base = SafeTensors::deserialize(&base_bytes).unwrap();

    let mut differing_codes = Vec::new();
    for name in linear_names() {
        let (shape, weight) = f32_tensor(&base, &name);
        let q = FourBitTensor::quantize(&weight, &shape, 64, FourBitType::Nf4, true).unwrap();
        let ours: HashMap<String, BnbTensor> = to_bnb_tensors(&name, &q).into_iter().collect();
        assert_eq!(ours.len(), 6, "{name}");
        for (key, tensor) in &ours {
            let theirs = stored(&bnb, key);
            assert_eq!(tensor.dtype, theirs.dtype, "{key} dtype");
            assert_eq!(tensor.shape, theirs.shape, "{key} shape");
            if key.ends_with(".absmax") {
                for (i, (&a, &b)) in tensor.bytes.iter().zip(&theirs.bytes).enumerate() {
                    if a != b {
                        differing_codes.push((name.clone(), i, a, b));
                    }
                }
            } else {
                assert!(
                    tensor.bytes == theirs.bytes,
                    "{key}: bytes differ{}",
                    if key.contains("quant_state") {
                        format!(
                            "\nours:   {}\ntheirs: {}",
                            String::from_utf8_lossy(&tensor.bytes),
                            String::from_utf8_lossy(&theirs.bytes)
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    assert_eq!(
        differing_codes,
        Vec::<(String, usize, u8, u8)>::new(),
        "absmax codes that differ from the checkpoint"
    );
}

#[test]
fn quant_state_json_matches_checkpoint_bytes() {
    let bnb_bytes = read("base_bnb4_model.safetensors");
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    for name in linear_names() {
        let q = from_safetensors(&name, &bnb).unwrap();
        let key = format!("{name}.quant_state.bitsandbytes__nf4");
        assert_eq!(
            quant_state_json(&q).into_bytes(),
            stored(&bnb, &key).bytes,
            "{key}"
        );
    }
}

#[test]
fn plain_and_fp4_layouts_round_trip() {
    let w: Vec<f32> = (0..3 * 50)
        .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
        .collect();
    for quant_type in [FourBitType::Nf4, FourBitType::Fp4] {
        for double_quant in [false, true] {
            let q = FourBitTensor::quantize(&w, &[3, 50], 32, quant_type, double_quant).unwrap();
            let tensors: HashMap<_, _> = to_bnb_tensors("w", &q).into_iter().collect();
            assert_eq!(tensors.len(), if double_quant { 6 } else { 4 });
            let absmax = &tensors["w.absmax"];
            assert_eq!(
                absmax.dtype,
                if double_quant {
                    BnbDtype::U8
                } else {
                    BnbDtype::F32
                }
            );
            let back = from_bnb_tensors("w", |k| tensors.get(k).cloned()).unwrap();
            assert_eq!(back, q);
        }
    }
}

fn layout_of(double_quant: bool) -> HashMap<String, BnbTensor> {
    let w: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).cos()).collect();
    let q = FourBitTensor::quantize(&w, &[4, 32], 64, FourBitType::Nf4, double_quant).unwrap();
    to_bnb_tensors("w", &q).into_iter().collect()
}

fn read_error(tensors: &HashMap<String, BnbTensor>) -> String {
    match from_bnb_tensors("w", |k| tensors.get(k).cloned()) {
        Err(e @ QuantError::Format { .. }) => e.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn corrupt_layouts_are_format_errors() {
    let mut t = layout_of(true);
    t.remove("w.nested_absmax");
    assert!(read_error(&t).contains("missing tensor w.nested_absmax"));

    let mut t = layout_of(true);
    t.get_mut("w").unwrap().bytes.pop();
    assert!(read_error(&t).contains("bnb tensor w"));

    let mut t = layout_of(true);
    t.get_mut("w.absmax").unwrap().bytes.push(0);
    t.get_mut("w.absmax").unwrap().shape = vec![3];
    assert!(read_error(&t).contains("codes"));

    let mut t = layout_of(false);
    t.get_mut("w.absmax").unwrap().dtype = BnbDtype::U8;
    assert!(read_error(&t).contains("dtype"));

    let mut t = layout_of(true);
    let json = String::from_utf8(t["w.quant_state.bitsandbytes__nf4"].bytes.clone()).unwrap();
    let bad = json.replace("\"nf4\"", "\"int4\"");
    t.insert(
        "w.quant_state.bitsandbytes__nf4".into(),
        BnbTensor::from_u8(vec![bad.len()], bad.into_bytes()),
    );
    assert!(read_error(&t).contains("unknown quant_type \"int4\""));

    let mut t = layout_of(true);
    t.insert(
        "w.quant_state.bitsandbytes__nf4".into(),
        BnbTensor::from_u8(vec![3], b"{\"q".to_vec()),
    );
    assert!(read_error(&t).contains("not valid JSON"));

    let mut t = layout_of(false);
    let json = String::from_utf8(t["w.quant_state.bitsandbytes__nf4"].bytes.clone()).unwrap();
    let bad = json.replace("\"blocksize\": 64", "\"blocksize\": 48");
    t.insert(
        "w.quant_state.bitsandbytes__nf4".into(),
        BnbTensor::from_u8(vec![bad.len()], bad.into_bytes()),
    );
    assert!(read_error(&t).contains("blocksize"));

    let mut t = layout_of(false);
    t.insert(
        "w.quant_map".into(),
        BnbTensor::from_f32(vec![16], FourBitType::Fp4.code()),
    );
    assert!(read_error(&t).contains("does not match the built-in nf4 table"));

    let t = HashMap::new();
    assert!(read_error(&t).contains("quant_state"));
}

#[test]
fn checkpoint_config_declares_nf4_double_quant() {
    let config: serde_json::Value = serde_json::from_slice(&read("base_bnb4_config.json")).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "bitsandbytes");
    assert_eq!(qc["bnb_4bit_quant_type"], FourBitType::Nf4.name());
    assert_eq!(qc["bnb_4bit_use_double_quant"], true);
    let base: serde_json::Value = serde_json::from_slice(&read("base_config.json")).unwrap();
    assert_eq!(base["hidden_size"], config["hidden_size"]);
}
