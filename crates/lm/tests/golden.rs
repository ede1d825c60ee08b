//! Agreement with transformers' `LlamaForCausalLM` on the tiny reference checkpoint
//! (`tests/data/llama`, copied from the project's golden data).

mod common;

use common::data_dir;

use lm::{cross_entropy, LlamaModel};
use ndarray::{Array2, Array3, Axis};
use safetensors::SafeTensors;

struct Io {
    input_ids: Array2<u32>,
    labels: Array2<i64>,
    base_logits: Array3<f32>,
    base_loss: f32,
}

fn read_io() -> Io {
    let bytes = std::fs::read(data_dir().join("io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ids: Vec<u32> = i64s("input_ids").into_iter().map(|v| v as u32).collect();
    Io {
        input_ids: Array2::from_shape_vec((2, 8), ids).unwrap(),
        labels: Array2::from_shape_vec((2, 8), i64s("labels")).unwrap(),
        base_logits: Array3::from_shape_vec((2, 8, 64), f32s("base_logits")).unwrap(),
        base_loss: f32s("base_loss")[0],
    }
}

fn base_model() -> LlamaModel {
    LlamaModel::from_pretrained(data_dir().join("base")).unwrap()
}

#[test]
fn logits_and_loss_match_transformers() {
    let io = read_io();
    let mut model = base_model();
    let pass = model.forward(io.input_ids.view(), None).unwrap();
    let max_diff = pass
        .logits()
        .iter()
        .zip(io.base_logits.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-4, "max |logits − transformers| = {max_diff}");
    eprintln!("max |logits − transformers| = {max_diff:e}");
    let ce = cross_entropy(pass.logits().view(), io.labels.view()).unwrap();
    eprintln!(
        "|loss − transformers| = {:e}",
        (ce.loss - io.base_loss).abs()
    );
    assert!(
        (ce.loss - io.base_loss).abs() <= 1e-5,
        "loss {} vs transformers {}",
        ce.loss,
        io.base_loss
    );
}

#[test]
fn cached_incremental_logits_equal_full_forward() {
    let io = read_io();
    let mut model = base_model();
    let row: Vec<u32> = io.input_ids.row(1).to_vec();
    let full = model
        .forward(io.input_ids.view(), None)
        .unwrap()
        .into_logits();
    let mut cache = model.new_kv_cache();
    // A prompt of three tokens, then one token at a time.
    let prefix = model.forward_cached(&row[..3], &mut cache).unwrap();
    let mut rows = vec![prefix.row(2).to_owned()];
    for &t in &row[3..] {
        rows.push(
            model
                .forward_cached(&[t], &mut cache)
                .unwrap()
                .row(0)
                .to_owned(),
        );
    }
    assert_eq!(cache.len(), 8);
    for (i, r) in rows.iter().enumerate() {
        let pos = i + 2;
        let expected = full.index_axis(Axis(0), 1).row(pos).to_owned();
        let diff = (r - &expected)
            .mapv(f32::abs)
            .fold(0.0f32, |m, &v| m.max(v));
        assert!(
            diff <= 1e-5,
            "position {pos}: cached logits differ by {diff}"
        );
    }
}

#[test]
fn right_padded_rows_match_unpadded_forward() {
    let io = read_io();
    let mut model = base_model();
    // Row 1 truncated to 5 tokens, right-padded with arbitrary ids and masked.
    let mut ids = io.input_ids.clone();
    let mut mask = Array2::from_elem((2, 8), true);
    for t in 5..8 {
        ids[[1, t]] = 0;
        mask[[1, t]] = false;
    }
    let padded = model
        .forward(ids.view(), Some(mask.view()))
        .unwrap()
        .into_logits();
    let short = io.input_ids.slice(ndarray::s![1..2, ..5]).to_owned();
    let alone = model.forward(short.view(), None).unwrap().into_logits();
    for t in 0..5 {
        for v in 0..64 {
            let d = (padded[[1, t, v]] - alone[[0, t, v]]).abs();
            assert!(d <= 1e-5, "position {t} vocab {v} differs by {d}");
        }
    }
    // The unpadded row is unaffected by the other row's padding.
    let diff = (&padded.index_axis(Axis(0), 0) - &io.base_logits.index_axis(Axis(0), 0))
        .mapv(f32::abs)
        .fold(0.0f32, |m, &v| m.max(v));
    assert!(diff <= 1e-4);
}

#[test]
fn save_and_reload_round_trips() {
    let io = read_io();
    let mut model = base_model();
    let dir = std::env::temp_dir().join(format!("lm-save-{}", std::process::id()));
    model.save_pretrained(&dir).unwrap();
    let mut reloaded = LlamaModel::from_pretrained(&dir).unwrap();
    assert_eq!(&reloaded, &model);
    let a = model
        .forward(io.input_ids.view(), None)
        .unwrap()
        .into_logits();
    let b = reloaded
        .forward(io.input_ids.view(), None)
        .unwrap()
        .into_logits();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).unwrap();
}
