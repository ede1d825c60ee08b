//! Each combination type against a direct computation on small matrices (in `f64`, by loops).

use lora_core::combine::{combine, Combination, CombinationType, MajoritySign};
use lora_core::{AdapterOptions, AdapterSet, InitLoraWeights, LoraAdapter, LoraConfig};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OUT: usize = 5;
const IN: usize = 4;

fn adapter(rng: &mut ChaCha8Rng, r: usize, alpha: f64, rslora: bool) -> LoraAdapter {
    let mut o = AdapterOptions::new(r, alpha);
    o.use_rslora = rslora;
    let a = Array2::from_shape_fn((r, IN), |_| rng.random_range(-1.0f32..1.0));
    let b = Array2::from_shape_fn((OUT, r), |_| rng.random_range(-1.0f32..1.0));
    LoraAdapter::from_weights(a, b, None, &o, 0, "t").unwrap()
}

/// `s·B·A` in f64.
fn delta(ad: &LoraAdapter) -> Array2<f64> {
    let s = ad.options().scale();
    Array2::from_shape_fn((OUT, IN), |(j, i)| {
        s * (0..ad.rank())
            .map(|k| ad.b()[[j, k]] as f64 * ad.a()[[k, i]] as f64)
            .sum::<f64>()
    })
}

fn assert_delta(what: &str, got: &LoraAdapter, want: &Array2<f64>) {
    assert_eq!(got.scale(), 1.0, "{what}: combined adapters have scale 1");
    let d = got.delta_weight().unwrap();
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (g, w) in d.iter().zip(want.iter()) {
        assert!((*g as f64 - w).abs() <= 2e-5 * scale, "{what}: {g} vs {w}");
    }
}

fn three(seed: u64) -> Vec<LoraAdapter> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    vec![
        adapter(&mut rng, 2, 4.0, false),
        adapter(&mut rng, 1, 3.0, true),
        adapter(&mut rng, 1, 1.0, false),
    ]
}

fn zeros() -> Array2<f64> {
    Array2::zeros((OUT, IN))
}

fn pairs<'a>(ads: &'a [LoraAdapter], w: &[f64]) -> Vec<(&'a LoraAdapter, f64)> {
    ads.iter().zip(w.iter().copied()).collect()
}

fn weighted(
    ads: &[LoraAdapter],
    w: &[f64],
    f: impl Fn(usize, &Array2<f64>) -> Array2<f64>,
) -> Vec<Array2<f64>> {
    ads.iter()
        .enumerate()
        .map(|(i, a)| f(i, &delta(a)) * w[i])
        .collect()
}

#[test]
fn cat_is_the_exact_weighted_sum_with_summed_rank() {
    let ads = three(1);
    let w = [0.7, -1.3, 2.0];
    let c = combine(
        &pairs(&ads, &w),
        &Combination::new(CombinationType::Cat),
        0,
        "t",
    )
    .unwrap();
    assert_eq!(c.rank(), 4);
    let want: Array2<f64> = weighted(&ads, &w, |_, d| d.clone())
        .into_iter()
        .fold(zeros(), |acc, d| acc + d);
    assert_delta("cat", &c, &want);
}

#[test]
fn svd_at_full_rank_is_the_weighted_sum_and_defaults_to_the_max_rank() {
    let ads = three(2);
    let w = [0.5, 1.5, -1.0];
    let want: Array2<f64> = weighted(&ads, &w, |_, d| d.clone())
        .into_iter()
        .fold(zeros(), |acc, d| acc + d);
    let mut comb = Combination::new(CombinationType::Svd);
    comb.svd_rank = Some(4);
    assert_delta(
        "svd",
        &combine(&pairs(&ads, &w), &comb, 0, "t").unwrap(),
        &want,
    );
    let default_rank = combine(
        &pairs(&ads, &w),
        &Combination::new(CombinationType::Svd),
        0,
        "t",
    )
    .unwrap();
    assert_eq!(default_rank.rank(), 2);
    comb.svd_rank = Some(5);
    assert!(
        combine(&pairs(&ads, &w), &comb, 0, "t").is_err(),
        "rank above min(out, in)"
    );
}

#[test]
fn linear_needs_equal_ranks_and_is_exact_when_the_sum_fits_the_rank() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let first = adapter(&mut rng, 2, 2.0, false);
    // Same A (row space) so Σ wᵢΔWᵢ has rank ≤ 2 and the rank-2 refactoring is exact.
    let b2 = Array2::from_shape_fn((OUT, 2), |_| rng.random_range(-1.0f32..1.0));
    let second = LoraAdapter::from_weights(
        first.a().clone(),
        b2,
        None,
        &AdapterOptions::new(2, 6.0),
        0,
        "t",
    )
    .unwrap();
    let ads = vec![first, second];
    let w = [0.25, 0.75];
    let want: Array2<f64> = weighted(&ads, &w, |_, d| d.clone())
        .into_iter()
        .fold(zeros(), |acc, d| acc + d);
    let c = combine(
        &pairs(&ads, &w),
        &Combination::new(CombinationType::Linear),
        0,
        "t",
    )
    .unwrap();
    assert_eq!(c.rank(), 2);
    assert_delta("linear", &c, &want);
    let e = combine(
        &pairs(&three(4), &[1.0, 1.0, 1.0]),
        &Combination::new(CombinationType::Linear),
        0,
        "t",
    )
    .unwrap_err();
    assert!(e.to_string().contains("equal ranks"), "{e}");
}

/// PEFT's magnitude pruning, by sorting in the test.
fn trim(d: &Array2<f64>, density: f64) -> Array2<f64> {
    let k = (density * d.len() as f64) as usize;
    let mut mags: Vec<f64> = d.iter().map(|v| v.abs()).collect();
    mags.sort_by(|a, b| b.total_cmp(a));
    let threshold = if k == 0 { f64::INFINITY } else { mags[k - 1] };
    d.mapv(|v| if v.abs() >= threshold { v } else { 0.0 })
}

fn ties_reference(trimmed: &[Array2<f64>], w: &[f64], method: MajoritySign) -> Array2<f64> {
    Array2::from_shape_fn((OUT, IN), |ij| {
        let sign = |v: f64| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        };
        let vote: f64 = match method {
            MajoritySign::Total => trimmed.iter().map(|t| t[ij]).sum(),
            MajoritySign::Frequency => trimmed.iter().map(|t| sign(t[ij])).sum(),
        };
        let majority = if vote >= 0.0 { 1.0 } else { -1.0 };
        let agreeing: Vec<f64> = trimmed
            .iter()
            .zip(w)
            .filter(|(t, _)| sign(t[ij]) == majority)
            .map(|(t, wi)| wi * t[ij])
            .collect();
        agreeing.iter().sum::<f64>() / agreeing.len().max(1) as f64
    })
}

#[test]
fn ties_trims_elects_and_takes_the_disjoint_mean() {
    let ads = three(5);
    let w = [1.0, 0.5, 2.0];
    for method in [MajoritySign::Total, MajoritySign::Frequency] {
        let mut comb = Combination::new(CombinationType::Ties).with_density(0.5);
        comb.svd_rank = Some(4);
        comb.majority_sign = method;
        let c = combine(&pairs(&ads, &w), &comb, 0, "t").unwrap();
        let trimmed: Vec<_> = ads.iter().map(|a| trim(&delta(a), 0.5)).collect();
        assert_delta("ties", &c, &ties_reference(&trimmed, &w, method));
    }
    let e = combine(
        &pairs(&ads, &w),
        &Combination::new(CombinationType::Ties),
        0,
        "t",
    )
    .unwrap_err();
    assert!(e.to_string().contains("density"), "{e}");
}

#[test]
fn magnitude_prune_is_the_weighted_sum_of_trimmed_deltas() {
    let ads = three(6);
    let w = [1.0, -1.0, 0.5];
    let mut comb = Combination::new(CombinationType::MagnitudePrune).with_density(0.3);
    comb.svd_rank = Some(4);
    let c = combine(&pairs(&ads, &w), &comb, 0, "t").unwrap();
    let want: Array2<f64> = weighted(&ads, &w, |_, d| trim(d, 0.3))
        .into_iter()
        .fold(zeros(), |acc, d| acc + d);
    assert_delta("magnitude_prune", &c, &want);
}

/// DARE's masks, replaying the documented stream: ChaCha8 seeded with `seed ^ combination.seed`,
/// one `f64` draw per element, tensor by tensor, row-major; keep when `draw < density`.
fn dare_masks(n: usize, density: f64, seed: u64) -> Vec<Array2<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            Array2::from_shape_fn((OUT, IN), |_| {
                if rng.random::<f64>() < density {
                    1.0 / density
                } else {
                    0.0
                }
            })
        })
        .collect()
}

#[test]
fn dare_linear_and_dare_ties_drop_with_the_seeded_stream_and_rescale() {
    let ads = three(7);
    let w = [0.8, 1.2, -0.4];
    let (density, seed) = (0.6, 99u64);
    let masks = dare_masks(3, density, seed ^ 5);
    let dropped: Vec<Array2<f64>> = ads.iter().zip(&masks).map(|(a, m)| delta(a) * m).collect();

    let mut comb = Combination::new(CombinationType::DareLinear).with_density(density);
    comb.svd_rank = Some(4);
    comb.seed = 5;
    let c = combine(&pairs(&ads, &w), &comb, seed, "t").unwrap();
    let want: Array2<f64> = dropped
        .iter()
        .zip(&w)
        .map(|(d, wi)| d * *wi)
        .fold(zeros(), |acc, d| acc + d);
    assert_delta("dare_linear", &c, &want);

    comb.kind = CombinationType::DareTies;
    let c = combine(&pairs(&ads, &w), &comb, seed, "t").unwrap();
    assert_delta(
        "dare_ties",
        &c,
        &ties_reference(&dropped, &w, MajoritySign::Total),
    );

    comb.density = Some(0.0);
    assert!(
        combine(&pairs(&ads, &w), &comb, seed, "t").is_err(),
        "DARE density 0 divides by 0"
    );
}

#[test]
fn names_parse_like_peft_and_dora_is_refused() {
    for (name, kind) in [
        ("linear", CombinationType::Linear),
        ("cat", CombinationType::Cat),
        ("svd", CombinationType::Svd),
        ("ties_svd", CombinationType::Ties),
        ("dare_linear", CombinationType::DareLinear),
        ("dare_ties_svd", CombinationType::DareTies),
        ("magnitude_prune", CombinationType::MagnitudePrune),
    ] {
        assert_eq!(name.parse::<CombinationType>().unwrap(), kind);
    }
    assert!("average"
        .parse::<CombinationType>()
        .unwrap_err()
        .to_string()
        .contains("average"));

    let mut layer = lora_core::LoraLinear::dense(Array2::eye(4), None, "t").unwrap();
    let mut o = AdapterOptions::new(1, 1.0);
    o.use_dora = true;
    layer.add_adapter("d", &o, 0).unwrap();
    let d = layer.adapter("d").unwrap();
    let e = combine(&[(d, 1.0)], &Combination::new(CombinationType::Cat), 0, "t").unwrap_err();
    assert!(e.to_string().contains("DoRA"), "{e}");
}

#[test]
fn a_set_combination_gets_a_config_that_describes_it() {
    let mut set = AdapterSet::new();
    set.add_module("m.layers.0.q_proj", Array2::eye(6), None)
        .unwrap();
    set.add_module("m.layers.0.v_proj", Array2::eye(6), None)
        .unwrap();
    let mut c1 = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    c1.init_lora_weights = InitLoraWeights::Random;
    let mut c2 = LoraConfig::new(3, 3.0, &["q_proj"]);
    c2.init_lora_weights = InitLoraWeights::Random;
    set.add_adapter("one", c1, 1).unwrap();
    set.add_adapter("two", c2, 2).unwrap();
    set.add_weighted_adapter(
        &["one", "two"],
        &[1.0, 1.0],
        "both",
        &Combination::new(CombinationType::Cat),
    )
    .unwrap();
    // Only q_proj holds both adapters.
    assert_eq!(
        set.modules_of("both"),
        vec!["m.layers.0.q_proj".to_string()]
    );
    let config = set.config("both").unwrap();
    assert_eq!((config.r, config.lora_alpha), (5, 5.0));
    let layer = set.layer("m.layers.0.q_proj").unwrap();
    let want = layer.adapter("one").unwrap().delta_weight().unwrap()
        + layer.adapter("two").unwrap().delta_weight().unwrap();
    let got = layer.adapter("both").unwrap().delta_weight().unwrap();
    assert!(got
        .iter()
        .zip(want.iter())
        .all(|(a, b)| (a - b).abs() < 1e-5));
    let e = set
        .add_weighted_adapter(
            &["one"],
            &[1.0, 2.0],
            "bad",
            &Combination::new(CombinationType::Cat),
        )
        .unwrap_err();
    assert!(e.to_string().contains("weights"), "{e}");
}

/// Empty or mismatched inputs to the ΔW combinators are errors, not panics.
#[test]
fn combinators_refuse_empty_and_mismatched_input() {
    use lora_core::combine::{disjoint_merge, weighted_sum, MajoritySign};
    let a = ndarray::Array2::<f32>::ones((2, 3));
    let b = ndarray::Array2::<f32>::ones((3, 2));
    assert!(weighted_sum(&[], &[])
        .unwrap_err()
        .to_string()
        .contains("at least one"));
    let err = weighted_sum(&[a.clone(), b.clone()], &[1.0, 1.0]).unwrap_err();
    assert!(err.to_string().contains("tensor 1"), "{err}");
    let err = weighted_sum(std::slice::from_ref(&a), &[1.0, 2.0]).unwrap_err();
    assert!(err.to_string().contains("weights"), "{err}");
    assert!(disjoint_merge(&[], &[], MajoritySign::Total).is_err());
    assert!(disjoint_merge(&[a.clone(), b], &[1.0, 1.0], MajoritySign::Frequency).is_err());
    assert_eq!(
        disjoint_merge(std::slice::from_ref(&a), &[2.0], MajoritySign::Total).unwrap(),
        &a * 2.0
    );
}
