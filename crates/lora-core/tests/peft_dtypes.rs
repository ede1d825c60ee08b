//! PEFT files as they are published: adapters saved as f32, f16 and bf16 round-trip (values
//! within the stored type's rounding, dtype as asked); `fan_in_fan_out: true` is refused by
//! name; LoftQ is created from `adapter_config.json` (`init_lora_weights: "loftq"` with
//! `loftq_config`) as PEFT computes it.

use lora_core::peft::{load_adapter, save_adapters_as, SaveDtype, CONFIG_FILE, WEIGHTS_FILE};
use lora_core::qlora::{loftq_init, LoftqConfig, Nf4Options};
use lora_core::{AdapterOptions, AdapterSet, InitLoraWeights, LoraAdapter, LoraConfig};
use ndarray::Array2;
use proptest::prelude::*;
use safetensors::{Dtype, SafeTensors};

const MODULE: &str = "model.layers.0.self_attn.q_proj";

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-core-dtypes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The largest relative error round to nearest even allows (half an ulp).
fn half_ulp(dtype: SaveDtype) -> f32 {
    match dtype {
        SaveDtype::F32 => 0.0,
        SaveDtype::F16 => 2f32.powi(-11),
        SaveDtype::Bf16 => 2f32.powi(-8),
    }
}

/// The largest absolute error below the stored type's normal range: half its smallest
/// subnormal (f16's subnormals are 2^-24 apart, so a value near zero loses relative precision).
fn half_subnormal(dtype: SaveDtype) -> f32 {
    match dtype {
        SaveDtype::F16 => 2f32.powi(-25),
        SaveDtype::F32 | SaveDtype::Bf16 => f32::MIN_POSITIVE,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn save_then_load_keeps_values_within_the_dtypes_rounding(
        dtype in prop_oneof![Just(SaveDtype::F32), Just(SaveDtype::F16), Just(SaveDtype::Bf16)],
        r in 1usize..4,
        out in 4usize..9,
        inp in 4usize..9,
        seed in any::<u64>(),
        dora in any::<bool>(),
    ) {
        let mut options = AdapterOptions::new(r, 2.0 * r as f64);
        options.init = InitLoraWeights::Random;
        let mut adapter = LoraAdapter::new(&options, out, inp, seed, "q").unwrap();
        if dora {
            let w = Array2::from_shape_fn((out, inp), |(i, j)| ((i * 7 + j) as f32 * 0.3).sin());
            adapter.init_dora_magnitude(w.view()).unwrap();
        }
        let mut config = LoraConfig::new(r, 2.0 * r as f64, &["q_proj"]);
        config.use_dora = dora;
        let dir = scratch(&format!("prop-{seed}"));
        save_adapters_as(&dir, &config, [(MODULE, &adapter)], dtype).unwrap();
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let want = match dtype {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::Bf16 => Dtype::BF16,
        };
        prop_assert!(file.tensors().iter().all(|(_, v)| v.dtype() == want));
        let loaded = load_adapter(&dir, &[(MODULE.to_string(), (out, inp))].into()).unwrap();
        let weights = &loaded.modules[MODULE];
        let bound = half_ulp(dtype);
        let floor = half_subnormal(dtype);
        let close = |a: f32, b: f32| (a - b).abs() <= bound * b.abs() + floor;
        prop_assert!(weights.a.iter().zip(adapter.a()).all(|(&x, &y)| close(x, y)));
        prop_assert!(weights.b.iter().zip(adapter.b()).all(|(&x, &y)| close(x, y)));
        if let (Some(m), Some(want)) = (&weights.magnitude, adapter.magnitude()) {
            prop_assert!(m.iter().zip(want).all(|(&x, &y)| close(x, y)));
        }
        // A second save of what was loaded reproduces the file byte for byte.
        let dir2 = scratch(&format!("prop2-{seed}"));
        let again = LoraAdapter::from_weights(
            weights.a.clone(), weights.b.clone(), weights.magnitude.clone(),
            &AdapterOptions { use_dora: dora, ..options.clone() }, 0, "q").unwrap();
        save_adapters_as(&dir2, &config, [(MODULE, &again)], dtype).unwrap();
        prop_assert_eq!(bytes, std::fs::read(dir2.join(WEIGHTS_FILE)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dir2).unwrap();
    }
}

#[test]
fn f16_overflow_is_an_error_naming_the_key_and_index() {
    let a = Array2::from_elem((1, 4), 1.0e5f32);
    let b = Array2::from_elem((4, 1), 1.0f32);
    let adapter =
        LoraAdapter::from_weights(a, b, None, &AdapterOptions::new(1, 1.0), 0, "q").unwrap();
    let dir = scratch("overflow");
    let config = LoraConfig::new(1, 1.0, &["q_proj"]);
    let err = save_adapters_as(&dir, &config, [(MODULE, &adapter)], SaveDtype::F16).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("lora_A.weight") && text.contains("index 0"),
        "{text}"
    );
    assert!(!dir.join(WEIGHTS_FILE).exists(), "nothing written");
    // bf16 has f32's range.
    save_adapters_as(&dir, &config, [(MODULE, &adapter)], SaveDtype::Bf16).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fan_in_fan_out_is_refused_by_name() {
    let adapter = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 4, 4, 1, "q").unwrap();
    let dir = scratch("fifo");
    let mut config = LoraConfig::new(2, 4.0, &["q_proj"]);
    save_adapters_as(&dir, &config, [(MODULE, &adapter)], SaveDtype::F32).unwrap();
    config.fan_in_fan_out = true;
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let err = load_adapter(&dir, &[(MODULE.to_string(), (4, 4))].into()).unwrap_err();
    assert!(err.to_string().contains("fan_in_fan_out"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn weight() -> Array2<f32> {
    Array2::from_shape_fn((24, 64), |(i, j)| {
        ((i * 64 + j) as f32 * 0.37).sin() * 0.1 + ((i + 3 * j) as f32 * 0.05).cos() * 0.02
    })
}

#[test]
fn loftq_from_adapter_config_is_peft_s_computation() {
    let json = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"],
        "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}"#;
    let config: LoraConfig = serde_json::from_str(json).unwrap();
    config.validate().unwrap();
    let w = weight();
    let mut set = AdapterSet::new();
    set.add_module(MODULE, w.clone(), None).unwrap();
    set.add_adapter("default", config.clone(), 3).unwrap();
    let layer = set.layer(MODULE).unwrap();
    let adapter = layer.adapter("default").unwrap();

    // PEFT: NF4 (blocksize 64, no double quant) and SVD alternate; lora_A = √S·Vᵀ and
    // lora_B = U·√S unscaled — what loftq_init gives with a unit adapter scale.
    let reference = loftq_init(
        w.view(),
        &AdapterOptions::new(4, 4.0),
        &LoftqConfig {
            loftq_bits: 4,
            loftq_iter: 2,
            quantization: Nf4Options {
                double_quant: false,
                ..Nf4Options::default()
            },
        },
        MODULE,
    )
    .unwrap();
    assert_eq!(adapter.a(), &reference.a);
    assert_eq!(adapter.b(), &reference.b);
    let base = layer.base().weight();
    let deq = lora_core::FrozenBase::dense_weight(&reference.base).unwrap();
    assert_eq!(base, &*deq, "the base became deq(Q), as PEFT sets it");
    // deq(Q) + B·A is closer to W than deq(Q) alone.
    let ba = adapter.b().dot(adapter.a());
    let err = |m: &Array2<f32>| (&w - m).iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(err(&(base + &ba)) < err(base));

    // The config is written back with the same settings.
    let again: LoraConfig = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn bad_loftq_settings_are_named() {
    let read = |extra: &str| -> String {
        let json = format!(r#"{{"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], {extra}}}"#);
        let config: LoraConfig = serde_json::from_str(&json).unwrap();
        config.validate().unwrap_err().to_string()
    };
    assert!(read(r#""init_lora_weights": "loftq""#).contains("loftq_config"));
    assert!(
        read(r#""init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}"#)
            .contains("loftq_config.loftq_bits")
    );
    assert!(
        read(r#""init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}"#)
            .contains("loftq_config.loftq_iter")
    );
    assert!(read(r#""loftq_config": {"loftq_bits": 4}"#).contains("not \"loftq\""));
    // PEFT writes an empty loftq_config on every other adapter: that is fine.
    let json = r#"{"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], "loftq_config": {}}"#;
    let config: LoraConfig = serde_json::from_str(json).unwrap();
    config.validate().unwrap();
    // A quantized base cannot take deq(Q): refused by name before any work.
    let mut qlora =
        lora_core::QLoraLinear::qlora(weight().view(), None, &Nf4Options::default(), MODULE)
            .unwrap();
    let mut options = AdapterOptions::new(4, 4.0);
    options.init = InitLoraWeights::Loftq {
        loftq_bits: 4,
        loftq_iter: 1,
    };
    let err = qlora.add_adapter("x", &options, 0).unwrap_err();
    assert!(err.to_string().contains("NF4"), "{err}");
}
