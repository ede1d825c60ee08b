//! The per-family GGUF name table (lm::gguf::names): every row maps both ways, the value
//! transforms sit where llama.cpp's converter puts them, and they invert.

use lm::family::Family;
use lm::gguf::names::{FamilyNames, HeadGroup, Transform};

const FAMILIES: [Family; 7] = [
    Family::Llama,
    Family::Mistral,
    Family::Qwen2,
    Family::Qwen3,
    Family::Gemma2,
    Family::Gemma3,
    Family::Phi3,
];

#[test]
fn every_row_maps_both_ways() {
    for family in FAMILIES {
        let names = FamilyNames::of(family);
        for t in names.layer {
            for suffix in [".weight", ".bias"] {
                let hf = format!("model.layers.7.{}{suffix}", t.hf);
                let m = names.to_gguf(&hf).unwrap().unwrap();
                assert_eq!(m.name, format!("blk.7.{}{suffix}", t.gguf));
                assert_eq!(m.layer, Some(7));
                assert_eq!(names.to_hf(&m.name).unwrap().name, hf, "{family}");
            }
        }
        for t in names.globals {
            let hf = format!("{}.weight", t.hf);
            match names.to_gguf(&hf) {
                Ok(Some(m)) => assert_eq!(names.to_hf(&m.name).unwrap().name, hf),
                _ => assert!(!names.untied_head && t.hf == "lm_head"),
            }
        }
    }
}

#[test]
fn permutation_only_for_llama_and_plus_one_only_for_gemma() {
    for family in FAMILIES {
        let names = FamilyNames::of(family);
        let rows = names.layer.iter().chain(names.globals);
        let permuted = rows
            .clone()
            .any(|t| matches!(t.transform, Transform::RopeRows(_)));
        let offset = rows.clone().any(|t| t.transform == Transform::PlusOne);
        assert_eq!(permuted, names.arch == "llama", "{family}");
        assert_eq!(offset, names.arch.starts_with("gemma"), "{family}");
        // Every norm of a Gemma model is offset (the converter's `endswith("norm.weight")`).
        for t in rows {
            if names.arch.starts_with("gemma") && t.hf.ends_with("norm") {
                assert_eq!(t.transform, Transform::PlusOne, "{}", t.hf);
            }
        }
    }
}

#[test]
fn unknown_names_are_errors_or_none() {
    let llama = FamilyNames::of(Family::Llama);
    assert!(llama
        .to_gguf("model.layers.0.self_attn.q_norm.weight")
        .is_err());
    assert!(llama
        .to_gguf("model.layers.x.self_attn.q_proj.weight")
        .is_err());
    assert!(llama
        .to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq")
        .unwrap()
        .is_none());
    assert!(FamilyNames::of(Family::Gemma2)
        .to_gguf("lm_head.weight")
        .is_err());
    assert!(llama.to_hf("blk.0.attn_qkv.weight").is_none());
    assert!(llama.to_hf("rope_freqs.weight").is_none());
    assert!(llama.extra("rope_freqs.weight").is_some());
    assert_eq!(
        FamilyNames::architectures(),
        ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
    );
}

#[test]
fn transforms_invert() {
    let values: Vec<f32> = (0..32).map(|i| i as f32).collect();
    for tr in [
        Transform::RopeRows(HeadGroup::Query),
        Transform::RopeRows(HeadGroup::KeyValue),
        Transform::PlusOne,
        Transform::Identity,
    ] {
        let g = tr.to_gguf(values.clone(), &[8, 4], (2, 1)).unwrap();
        assert_eq!(tr.to_hf(g, &[8, 4], (2, 1)).unwrap(), values);
    }
    // A 1-D bias permutes as a column.
    let b: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let g = Transform::RopeRows(HeadGroup::Query)
        .to_gguf(b, &[8], (2, 1))
        .unwrap();
    assert_eq!(g, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
}
