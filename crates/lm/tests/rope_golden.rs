//! Rotary embeddings against transformers 5.24 (`tests/data/rope/cases.json`, made by
//! `tools/interop/make_rope_golden.py`): for YaRN (defaults, betas without truncation,
//! mscale/mscale_all_dim, an explicit attention factor, a large θ, the pretrained length at
//! the config's top level), LongRoPE (Phi-3's short and long factors, an explicit factor and
//! attention factor), Llama 3, dynamic NTK and linear scaling, a config parsed by
//! `LlamaConfig` gives transformers' inverse frequencies and attention factor (1e-6
//! relative) and its rotary module's cos/sin over every position of the forward (1e-6
//! absolute).

use lm::rope::RopeTable;
use lm::LlamaConfig;
use ndarray::Array2;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/rope/cases.json");
    let text = std::fs::read_to_string(path).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["cases"].as_array().unwrap().clone()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn every_rope_case_matches_transformers() {
    let cases = cases();
    assert_eq!(cases.len(), 14);
    let mut worst_freq = 0.0f64;
    let mut worst_table = 0.0f64;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let config =
            LlamaConfig::from_json_value(&case["config"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rope = &config.architecture.ropes[0];
        let seq_len = case["seq_len"].as_u64().unwrap() as usize;
        let (inv_freq, attention) = rope.inv_freq(seq_len);
        let expected = floats(&case["inv_freq"]);
        assert_eq!(inv_freq.len(), expected.len(), "{name}");
        for (i, (got, want)) in inv_freq.iter().zip(&expected).enumerate() {
            let rel = (*got as f64 - want).abs() / want.abs();
            worst_freq = worst_freq.max(rel);
            assert!(rel <= 1e-6, "{name}: inv_freq[{i}] {got} vs {want}");
        }
        let want = case["attention_factor"].as_f64().unwrap();
        assert!(
            (attention as f64 - want).abs() <= 1e-6 * want,
            "{name}: attention factor {attention} vs {want}"
        );

        // cos/sin of every position: rotating [1, .., 1, 0, .., 0] gives [cos, sin].
        let dim = rope.dim;
        let half = dim / 2;
        let table = RopeTable::for_rope(rope, 0, seq_len, seq_len).unwrap();
        let mut x = Array2::<f32>::zeros((seq_len, dim));
        x.slice_mut(ndarray::s![.., ..half]).fill(1.0);
        let positions: Vec<usize> = (0..seq_len).collect();
        table.apply(x.view_mut(), &positions, 1, false).unwrap();
        let cos = case["cos"].as_array().unwrap();
        let sin = case["sin"].as_array().unwrap();
        for p in 0..seq_len {
            let (c, s) = (floats(&cos[p]), floats(&sin[p]));
            for i in 0..half {
                let dc = (x[[p, i]] as f64 - c[i]).abs();
                let ds = (x[[p, half + i]] as f64 - s[i]).abs();
                worst_table = worst_table.max(dc.max(ds));
                assert!(
                    dc <= 1e-6 && ds <= 1e-6,
                    "{name}: position {p}, frequency {i}: cos {} vs {}, sin {} vs {}",
                    x[[p, i]],
                    c[i],
                    x[[p, half + i]],
                    s[i]
                );
            }
        }
    }
    eprintln!("worst inv_freq relative error {worst_freq:e}, worst cos/sin {worst_table:e}");
}
