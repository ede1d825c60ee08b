//! Generation with the key/value cache against decoding by repeated full forward passes.

use std::path::PathBuf;

use lm::{LlamaModel, LmError, Sampling};
use ndarray::{Array2, Axis};

fn base_model() -> LlamaModel {
    LlamaModel::from_pretrained(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama/base"),
    )
    .unwrap()
}

/// Greedy decoding without a cache: a full forward over the whole sequence per token.
fn greedy_without_cache(model: &mut LlamaModel, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..max_new {
        let ids = Array2::from_shape_vec((1, seq.len()), seq.clone()).unwrap();
        let logits = model.forward(ids.view(), None).unwrap().into_logits();
        let last = logits.index_axis(Axis(0), 0).row(seq.len() - 1).to_owned();
        let next = (0..last.len()).fold(0, |best, i| if last[i] > last[best] { i } else { best });
        seq.push(next as u32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn greedy_with_cache_equals_greedy_by_full_forward() {
    let mut model = base_model();
    let prompt = [1u32, 17, 4];
    let cached = model
        .generate(&prompt, 12, &Sampling::Greedy, None)
        .unwrap();
    assert_eq!(cached, greedy_without_cache(&mut model, &prompt, 12));
}

#[test]
fn generation_stops_after_eos() {
    let mut model = base_model();
    let prompt = [1u32, 17, 4];
    let free = model.generate(&prompt, 6, &Sampling::Greedy, None).unwrap();
    let stop = free[2];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let stopped = model
        .generate(&prompt, 6, &Sampling::Greedy, Some(stop))
        .unwrap();
    assert_eq!(stopped, free[..=first].to_vec());
}

#[test]
fn sampling_is_seeded_and_tends_to_greedy_when_cold() {
    let mut model = base_model();
    let prompt = [1u32, 5];
    let hot = |seed| Sampling::Temperature {
        temperature: 5.0,
        seed,
    };
    let a = model.generate(&prompt, 20, &hot(1), None).unwrap();
    assert_eq!(a, model.generate(&prompt, 20, &hot(1), None).unwrap());
    assert_ne!(a, model.generate(&prompt, 20, &hot(2), None).unwrap());
    let cold = Sampling::Temperature {
        temperature: 1e-4,
        seed: 3,
    };
    assert_eq!(
        model.generate(&prompt, 10, &cold, None).unwrap(),
        model
            .generate(&prompt, 10, &Sampling::Greedy, None)
            .unwrap()
    );
}

#[test]
fn bad_generation_arguments_are_errors() {
    let mut model = base_model();
    let e = model
        .generate(
            &[1],
            3,
            &Sampling::Temperature {
                temperature: 0.0,
                seed: 0,
            },
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
    assert!(model
        .generate(&[], 3, &Sampling::Greedy, None)
        .unwrap_err()
        .to_string()
        .contains("prompt_ids"));
    let e = model
        .generate(&[1; 60], 10, &Sampling::Greedy, None)
        .unwrap_err();
    assert!(
        matches!(e, LmError::SequenceTooLong { len: 69, max: 64 }),
        "{e}"
    );
    // A failed step leaves the cache as it was.
    let mut cache = model.new_kv_cache();
    model.forward_cached(&[1, 2, 3], &mut cache).unwrap();
    assert!(model.forward_cached(&[4, 99], &mut cache).is_err());
    assert_eq!(cache.len(), 3);
    let after = model.forward_cached(&[4], &mut cache).unwrap();
    let ids = Array2::from_shape_vec((1, 4), vec![1u32, 2, 3, 4]).unwrap();
    let full = model.forward(ids.view(), None).unwrap().into_logits();
    let diff = (&after.row(0) - &full.index_axis(Axis(0), 0).row(3))
        .mapv(f32::abs)
        .fold(0.0f32, |m, &v| m.max(v));
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn long_prefill_spanning_several_query_blocks_matches_full_forward() {
    let mut config = lm::LlamaConfig::new(48, 16, 32, 2, 4, 2).unwrap();
    config.max_position_embeddings = 200;
    config.initializer_range = 0.2;
    let mut model = LlamaModel::random(config, 21).unwrap();
    let tokens: Vec<u32> = (0..140u32).map(|i| (i * 7 + 3) % 48).collect();
    let full = model
        .logits(
            Array2::from_shape_vec((1, 140), tokens.clone())
                .unwrap()
                .view(),
            None,
        )
        .unwrap();
    let mut cache = model.new_kv_cache();
    // A 100-token prefill (two query blocks), a 30-token chunk at offset 100, then single steps.
    let mut rows = model.forward_cached(&tokens[..100], &mut cache).unwrap();
    for chunk in [&tokens[100..130], &tokens[130..131], &tokens[131..140]] {
        let more = model.forward_cached(chunk, &mut cache).unwrap();
        rows = ndarray::concatenate(Axis(0), &[rows.view(), more.view()]).unwrap();
    }
    let diff = (&rows - &full.index_axis(Axis(0), 0))
        .mapv(f32::abs)
        .fold(0.0f32, |m, &v| m.max(v));
    assert!(diff < 1e-4, "cached vs full logits differ by {diff}");
}
