//! Agreement with PEFT's files and formulas on the reference tiny Llama (copied into
//! `tests/data/` from the shared golden set: `base_model.safetensors` is the base model,
//! `adapter_{lora,rslora,dora,qlora}/` are adapters as PEFT 0.21.2 saved them).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use lora_core::peft::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
use lora_core::{AdapterSet, LoraError};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

const Q_PROJ: &str = "model.layers.0.self_attn.q_proj";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-core-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn tensor(st: &SafeTensors<'_>, key: &str) -> (Vec<usize>, Vec<f32>) {
    let view = st.tensor(key).unwrap();
    assert_eq!(view.dtype(), Dtype::F32, "{key}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

fn matrix(st: &SafeTensors<'_>, key: &str) -> Array2<f32> {
    let (shape, values) = tensor(st, key);
    Array2::from_shape_vec((shape[0], shape[1]), values).unwrap()
}

/// Every `*_proj` linear of the base model, as an adapter set.
fn base_set() -> AdapterSet {
    let bytes = fs::read(data("base_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut set = AdapterSet::new();
    for name in st.names() {
        if let Some(module) = name.strip_suffix(".weight") {
            if module.ends_with("_proj") {
                set.add_module(module, matrix(&st, name), None).unwrap();
            }
        }
    }
    assert_eq!(set.shapes().len(), 14);
    set
}

struct Golden {
    w: Array2<f32>,
    a: Array2<f32>,
    b: Array2<f32>,
    m: Option<Array1<f32>>,
}

fn golden(variant: &str) -> Golden {
    let base = fs::read(data("base_model.safetensors")).unwrap();
    let base = SafeTensors::deserialize(&base).unwrap();
    let file = fs::read(data(&format!("adapter_{variant}")).join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&file).unwrap();
    let key = |suffix: &str| format!("base_model.model.{Q_PROJ}.{suffix}");
    Golden {
        w: matrix(&base, &format!("{Q_PROJ}.weight")),
        a: matrix(&st, &key("lora_A.weight")),
        b: matrix(&st, &key("lora_B.weight")),
        m: st
            .tensor(&key("lora_magnitude_vector"))
            .ok()
            .map(|_| Array1::from_vec(tensor(&st, &key("lora_magnitude_vector")).1)),
    }
}

/// `W + s·B·A` in f64, by loops.
fn adapted_weight(g: &Golden, s: f64) -> Array2<f64> {
    let (out, inp) = g.w.dim();
    let r = g.a.nrows();
    Array2::from_shape_fn((out, inp), |(j, i)| {
        g.w[[j, i]] as f64
            + s * (0..r)
                .map(|k| g.b[[j, k]] as f64 * g.a[[k, i]] as f64)
                .sum::<f64>()
    })
}

fn rows_norm(w: &Array2<f64>) -> Array1<f64> {
    w.map_axis(ndarray::Axis(1), |row| {
        row.iter().map(|v| v * v).sum::<f64>().sqrt()
    })
}

fn assert_close(what: &str, got: &Array2<f32>, want: &Array2<f64>, rel: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (idx, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            (g as f64 - w).abs() <= rel * scale,
            "{what}[{idx}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn check_q_proj(variant: &str, expected_scale: f64) {
    let mut set = base_set();
    set.load_adapter(&data(&format!("adapter_{variant}")), variant, 0)
        .unwrap();
    let g = golden(variant);
    let layer = set.layer(Q_PROJ).unwrap();
    let adapter = layer.adapter(variant).unwrap();
    assert_eq!(adapter.a(), &g.a);
    assert_eq!(adapter.b(), &g.b);
    assert_eq!(adapter.magnitude(), g.m.as_ref());
    assert!((adapter.scale() as f64 - expected_scale).abs() < 1e-6);

    let adapted = adapted_weight(&g, expected_scale);
    // What the layer must compute: x·W'ᵀ, or for DoRA (m/‖W'‖_row) ⊙ x·W'ᵀ.
    let effective = match &g.m {
        None => adapted.clone(),
        Some(m) => {
            let norm = rows_norm(&adapted);
            Array2::from_shape_fn(adapted.dim(), |(j, i)| {
                m[j] as f64 / norm[j] * adapted[[j, i]]
            })
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let x = Array2::from_shape_fn((6, 32), |_| rng.random_range(-1.0f32..1.0));
    let want = Array2::from_shape_fn((6, 32), |(t, j)| {
        (0..32)
            .map(|i| x[[t, i]] as f64 * effective[[j, i]])
            .sum::<f64>()
    });
    let mut set_eval = set.clone();
    set_eval.set_training(false);
    let y = set_eval
        .layer_mut(Q_PROJ)
        .unwrap()
        .forward(x.view())
        .unwrap();
    assert_close(&format!("{variant} output"), &y, &want, 1e-5);
    let merged = set.layer(Q_PROJ).unwrap().merged_weight().unwrap();
    assert_close(
        &format!("{variant} merged weight"),
        &merged,
        &effective,
        1e-6,
    );
}

#[test]
fn lora_layer_agrees_with_the_formula_and_merges_to_w_plus_sba() {
    check_q_proj("lora", 8.0 / 4.0);
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_r() {
    check_q_proj("rslora", 16.0 / 8f64.sqrt());
}

#[test]
fn dora_layer_is_magnitude_over_norm_times_adapted_product() {
    check_q_proj("dora", 8.0 / 4.0);
}

#[test]
fn dora_magnitude_was_initialised_to_the_adapted_row_norm() {
    // PEFT creates m as ‖W + s·B·A‖_row; the reference adapter was saved untrained, so the
    // stored m must equal that norm — the same definition this crate uses.
    let g = golden("dora");
    let norm = rows_norm(&adapted_weight(&g, 2.0));
    for (m, n) in g.m.as_ref().unwrap().iter().zip(norm.iter()) {
        assert!((*m as f64 - n).abs() <= 1e-5 * n, "{m} vs {n}");
    }
    // And a fresh DoRA adapter from these A, B gets the same m.
    let mut layer = lora_core::LoraLinear::dense(g.w.clone(), None, Q_PROJ).unwrap();
    let mut options = lora_core::AdapterOptions::new(4, 8.0);
    options.use_dora = true;
    let plain = lora_core::LoraAdapter::from_weights(
        g.a.clone(),
        g.b.clone(),
        None,
        &lora_core::AdapterOptions::new(4, 8.0),
        0,
        Q_PROJ,
    )
    .unwrap();
    let m = plain.dora_weight_norm(g.w.view()).unwrap();
    let with_m = lora_core::LoraAdapter::from_weights(
        g.a.clone(),
        g.b.clone(),
        Some(m),
        &options,
        0,
        Q_PROJ,
    )
    .unwrap();
    layer.insert_adapter("dora", with_m).unwrap();
    for (a, b) in layer
        .adapter("dora")
        .unwrap()
        .magnitude()
        .unwrap()
        .iter()
        .zip(g.m.as_ref().unwrap().iter())
    {
        assert!((a - b).abs() <= 1e-5 * b.abs());
    }
}

#[test]
fn every_reference_adapter_loads_with_its_options() {
    for (variant, r, rslora, dora) in [
        ("lora", 4, false, false),
        ("rslora", 8, true, false),
        ("dora", 4, false, true),
        ("qlora", 4, false, false),
    ] {
        let mut set = base_set();
        set.load_adapter(&data(&format!("adapter_{variant}")), "default", 1)
            .unwrap();
        let config = set.config("default").unwrap();
        assert_eq!(
            (config.r, config.use_rslora, config.use_dora),
            (r, rslora, dora)
        );
        assert_eq!(set.modules_of("default").len(), 14, "{variant}");
        // Unknown fields are kept for writing back.
        assert_eq!(config.extra["task_type"], "CAUSAL_LM");
    }
}

#[test]
fn save_then_load_is_bit_identical_and_keeps_peft_keys() {
    let mut set = base_set();
    set.load_adapter(&data("adapter_dora"), "dora", 0).unwrap();
    let dir = scratch("save-dora");
    save_adapter(&dir, &set, "dora").unwrap();
    // Same tensor names as PEFT's own file.
    let ours = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let theirs = fs::read(data("adapter_dora").join(WEIGHTS_FILE)).unwrap();
    let mut ours_names = SafeTensors::deserialize(&ours)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    let mut their_names = SafeTensors::deserialize(&theirs)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    ours_names.sort();
    their_names.sort();
    assert_eq!(ours_names, their_names);
    // Every tensor's bytes are identical to PEFT's.
    let (o, t) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(&theirs).unwrap(),
    );
    for name in &ours_names {
        assert_eq!(
            o.tensor(name).unwrap().data(),
            t.tensor(name).unwrap().data(),
            "{name}"
        );
    }
    // The config keeps PEFT's fields and reads back equal.
    let text = fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["use_dora"], true);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["peft_version"], "0.21.2");
    set.load_adapter(&dir, "again", 0).unwrap();
    assert_eq!(set.config("again").unwrap(), set.config("dora").unwrap());
    for path in set.modules_of("dora") {
        let layer = set.layer(&path).unwrap();
        let (a, b) = (
            layer.adapter("dora").unwrap(),
            layer.adapter("again").unwrap(),
        );
        assert_eq!((a.a(), a.b(), a.magnitude()), (b.a(), b.b(), b.magnitude()));
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// Copies the reference LoRA adapter into a scratch dir, lets `edit` change its tensors or
/// config, and returns the load error.
fn load_error(
    name: &str,
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> LoraError {
    let dir = scratch(name);
    let bytes = fs::read(data("adapter_lora").join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .names()
        .into_iter()
        .map(|n| {
            let (shape, values) = tensor(&st, n);
            (n.to_string(), shape, values)
        })
        .collect();
    edit_tensors(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    fs::write(
        dir.join(WEIGHTS_FILE),
        safetensors::serialize(views, None::<HashMap<String, String>>).unwrap(),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(data("adapter_lora").join(CONFIG_FILE)).unwrap())
            .unwrap();
    edit_config(&mut config);
    fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    let err = load_adapter(&dir, &base_set().shapes()).unwrap_err();
    fs::remove_dir_all(&dir).unwrap();
    err
}

const A_KEY: &str = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight";

#[test]
fn missing_extra_and_misshapen_keys_are_named() {
    let e = load_error("missing", |t| t.retain(|(n, _, _)| n != A_KEY), |_| {});
    assert!(
        e.to_string().contains(A_KEY) && e.to_string().contains("missing"),
        "{e}"
    );

    let extra = "base_model.model.model.layers.0.mlp.up_proj.lora_C.weight";
    let e = load_error(
        "extra",
        |t| t.push((extra.into(), vec![2], vec![0.0, 1.0])),
        |_| {},
    );
    assert!(
        e.to_string().contains(extra) && e.to_string().contains("unexpected"),
        "{e}"
    );

    let e = load_error(
        "shape",
        |t| {
            let entry = t.iter_mut().find(|(n, _, _)| n == A_KEY).unwrap();
            entry.1 = vec![2, 64];
            entry.2.truncate(128);
        },
        |_| {},
    );
    assert!(
        e.to_string().contains(A_KEY) && e.to_string().contains("[4, 32]"),
        "{e}"
    );

    let e = load_error(
        "nan",
        |t| t.iter_mut().find(|(n, _, _)| n == A_KEY).unwrap().2[5] = f32::NAN,
        |_| {},
    );
    assert!(
        e.to_string().contains(A_KEY) && e.to_string().contains("index 5"),
        "{e}"
    );
}

#[test]
fn unsupported_options_are_named() {
    for (option, value) in [
        ("bias", serde_json::json!("all")),
        ("lora_bias", serde_json::json!(true)),
        ("layers_to_transform", serde_json::json!([0])),
        ("peft_type", serde_json::json!("IA3")),
        ("lora_dropout", serde_json::json!(1.5)),
    ] {
        let e = load_error(
            &format!("opt-{option}"),
            |_| {},
            |c| c[option] = value.clone(),
        );
        assert!(e.to_string().contains(option), "{option}: {e}");
    }
}

#[test]
fn a_failed_save_leaves_the_old_files_whole() {
    let mut set = base_set();
    set.load_adapter(&data("adapter_lora"), "default", 0)
        .unwrap();
    let dir = scratch("atomic");
    save_adapter(&dir, &set, "default").unwrap();
    let before = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    // Block the temporary file's name with a directory so that creating it fails. The crash-
    // safe writer names it `.<file>.tmp-<pid>-<n>` with a per-process counter `n` that other
    // tests of this binary advance too, so every name this binary can reach is blocked.
    for n in 0..2000 {
        let blocker = dir.join(format!(".{WEIGHTS_FILE}.tmp-{}-{n}", std::process::id()));
        fs::create_dir(&blocker).unwrap();
    }
    set.load_adapter(&data("adapter_rslora"), "other", 0)
        .unwrap();
    let e = save_adapter(&dir, &set, "other").unwrap_err();
    assert!(e.to_string().contains(".tmp-"), "{e}");
    assert_eq!(fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);
    load_adapter(&dir, &set.shapes()).unwrap();
    fs::remove_dir_all(&dir).unwrap();
}
