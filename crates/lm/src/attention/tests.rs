//! Central finite differences of `L = Σ out ⊙ R` (R fixed random) against the backward,
//! with every mask and the soft cap, and the blocked kernel against the definition.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
}

fn weighted_sum(out: &Array2<f32>, weights: &Array2<f32>) -> f64 {
    out.iter()
        .zip(weights)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

fn check(
    what: &str,
    input: &mut Array2<f32>,
    analytic: &Array2<f32>,
    loss: impl Fn(&Array2<f32>) -> f64,
) {
    const EPS: f32 = 1e-2;
    for idx in 0..input.len() {
        let (r, c) = (idx / input.ncols(), idx % input.ncols());
        let orig = input[[r, c]];
        input[[r, c]] = orig + EPS;
        let plus = loss(input);
        input[[r, c]] = orig - EPS;
        let minus = loss(input);
        input[[r, c]] = orig;
        let numeric = (plus - minus) / (2.0 * EPS as f64);
        let a = analytic[[r, c]] as f64;
        assert!(
            (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs(),
            "{what}[{r}, {c}]: analytic {a}, numeric {numeric}"
        );
    }
}

#[test]
fn gqa_attention_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shape = AttentionShape {
        batch: 2,
        seq: 5,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let n = 10;
    let mut q = random(&mut rng, n, 16);
    let mut k = random(&mut rng, n, 8);
    let mut v = random(&mut rng, n, 8);
    let r = random(&mut rng, n, 16);
    // Row 1 is right-padded after 3 tokens.
    let mask: Vec<bool> = (0..n).map(|i| i < 8).collect();
    let mut options = AttentionOptions::causal(4);
    options.mask.key_mask = Some(&mask);
    let forward = |q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>| {
        let mut probs = Array3::zeros((8, 5, 5));
        let mut out = Array2::zeros((n, 16));
        attention_forward(
            shape,
            &options,
            q.view(),
            k.view(),
            v.view(),
            &mut probs,
            out.view_mut(),
        )
        .unwrap();
        (out, probs)
    };
    let (_, probs) = forward(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (
        Array2::zeros((n, 16)),
        Array2::zeros((n, 8)),
        Array2::zeros((n, 8)),
    );
    attention_backward(
        shape,
        &options,
        q.view(),
        k.view(),
        v.view(),
        &probs,
        r.view(),
        dq.view_mut(),
        dk.view_mut(),
        dv.view_mut(),
    )
    .unwrap();
    // Causality: a key after the query gets no probability.
    assert_eq!(probs[[0, 1, 2]], 0.0);
    // Padded keys get none either, and their values get no gradient.
    assert_eq!(probs[[4, 4, 3]], 0.0);
    assert!(dv.row(8).iter().all(|&g| g == 0.0));
    let (k0, v0, q0) = (k.clone(), v.clone(), q.clone());
    check("attention dq", &mut q, &dq, |q| {
        weighted_sum(&forward(q, &k0, &v0).0, &r)
    });
    check("attention dk", &mut k, &dk, |k| {
        weighted_sum(&forward(&q0, k, &v0).0, &r)
    });
    check("attention dv", &mut v, &dv, |v| {
        weighted_sum(&forward(&q0, &k0, v).0, &r)
    });
}

/// Attention straight from the definition, in f64, one (batch, head) at a time.
fn naive_attention(
    shape: AttentionShape,
    q: &Array2<f32>,
    k: &Array2<f32>,
    v: &Array2<f32>,
) -> Array2<f64> {
    let AttentionShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let mut out = Array2::<f64>::zeros((batch * seq, n_heads * hd));
    for b in 0..batch {
        for h in 0..n_heads {
            let kv = h / (n_heads / n_kv_heads);
            for i in 0..seq {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[[b * seq + i, h * hd + d]] as f64
                                    * k[[b * seq + j, kv * hd + d]] as f64
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    let p = (sc - max).exp() / total;
                    for d in 0..hd {
                        out[[b * seq + i, h * hd + d]] += p * v[[b * seq + j, kv * hd + d]] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn blocked_causal_attention_over_several_query_blocks() {
    // 150 positions: two full query blocks and a short one.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let shape = AttentionShape {
        batch: 2,
        seq: 150,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let n = 300;
    let q = random(&mut rng, n, 16);
    let k = random(&mut rng, n, 8);
    let v = random(&mut rng, n, 8);
    let r = random(&mut rng, n, 16);
    let options = AttentionOptions::causal(4);
    let forward = |q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>| {
        let mut probs = Array3::zeros((8, 150, 150));
        let mut out = Array2::zeros((n, 16));
        attention_forward(
            shape,
            &options,
            q.view(),
            k.view(),
            v.view(),
            &mut probs,
            out.view_mut(),
        )
        .unwrap();
        (out, probs)
    };
    let (out, probs) = forward(&q, &k, &v);
    let reference = naive_attention(shape, &q, &k, &v);
    for (a, b) in out.iter().zip(reference.iter()) {
        assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
    }
    let (mut dq, mut dk, mut dv) = (
        Array2::zeros((n, 16)),
        Array2::zeros((n, 8)),
        Array2::zeros((n, 8)),
    );
    attention_backward(
        shape,
        &options,
        q.view(),
        k.view(),
        v.view(),
        &probs,
        r.view(),
        dq.view_mut(),
        dk.view_mut(),
        dv.view_mut(),
    )
    .unwrap();
    let loss = |inputs: &[Array2<f32>; 3]| {
        naive_attention(shape, &inputs[0], &inputs[1], &inputs[2])
            .iter()
            .zip(r.iter())
            .map(|(a, &b)| a * b as f64)
            .sum::<f64>()
    };
    let inputs = [q.clone(), k.clone(), v.clone()];
    let grads = [&dq, &dk, &dv];
    // Rows in every query block of both sequences, so keys late in a sequence are covered.
    let eps = 1e-2f32;
    for row in [0usize, 63, 64, 127, 128, 149, 150, 214, 299] {
        for (which, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let col = (row * 7 + which) % inputs[which].ncols();
            let mut plus = inputs.clone();
            plus[which][[row, col]] += eps;
            let mut minus = inputs.clone();
            minus[which][[row, col]] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
            let a = grads[which][[row, col]] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs(),
                "{name}[{row}, {col}]: analytic {a}, numeric {numeric}"
            );
        }
    }
}

#[test]
fn softcap_window_and_segments_backward_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let shape = AttentionShape {
        batch: 2,
        seq: 6,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
    };
    let n = 12;
    // Scores large enough that the cap bends them.
    let mut q = random(&mut rng, n, 8).mapv(|v| 3.0 * v);
    let mut k = random(&mut rng, n, 4).mapv(|v| 3.0 * v);
    let mut v = random(&mut rng, n, 4);
    let r = random(&mut rng, n, 8);
    // Row 0 packs two segments (3 + 3 tokens), row 1 one.
    let segments: Vec<u32> = vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0];
    let options = AttentionOptions {
        scale: 0.3,
        softcap: Some(1.5),
        mask: AttentionMask {
            key_mask: None,
            segments: Some(&segments),
            sliding_window: Some(2),
        },
        compute_dtype: quant_core::linalg::ComputeDtype::F32,
    };
    let forward = |q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>| {
        let mut probs = Array3::zeros((4, 6, 6));
        let mut out = Array2::zeros((n, 8));
        attention_forward(
            shape,
            &options,
            q.view(),
            k.view(),
            v.view(),
            &mut probs,
            out.view_mut(),
        )
        .unwrap();
        (out, probs)
    };
    let (_, probs) = forward(&q, &k, &v);
    // Window 2: position 3 of row 1 sees 2 and 3 only; segments: position 3 of row 0
    // starts a segment and sees itself only.
    assert_eq!(probs[[2, 3, 1]], 0.0);
    assert!(probs[[2, 3, 2]] > 0.0);
    assert_eq!(probs[[0, 3, 2]], 0.0);
    assert!((probs[[0, 3, 3]] - 1.0).abs() < 1e-6);
    let (mut dq, mut dk, mut dv) = (
        Array2::zeros((n, 8)),
        Array2::zeros((n, 4)),
        Array2::zeros((n, 4)),
    );
    attention_backward(
        shape,
        &options,
        q.view(),
        k.view(),
        v.view(),
        &probs,
        r.view(),
        dq.view_mut(),
        dk.view_mut(),
        dv.view_mut(),
    )
    .unwrap();
    let (k0, v0, q0) = (k.clone(), v.clone(), q.clone());
    check("capped dq", &mut q, &dq, |q| {
        weighted_sum(&forward(q, &k0, &v0).0, &r)
    });
    check("capped dk", &mut k, &dk, |k| {
        weighted_sum(&forward(&q0, k, &v0).0, &r)
    });
    check("capped dv", &mut v, &dv, |v| {
        weighted_sum(&forward(&q0, &k0, v).0, &r)
    });
}
