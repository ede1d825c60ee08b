//! Unit tests of `optim` (moved out of the module file, which keeps the code).

use super::*;
use crate::params::ParamStore;
use proptest::prelude::*;

fn store(values: &[f32], grads: &[f32]) -> ParamStore {
    let mut s = ParamStore::new();
    s.add("lora_A", vec![values.len()], values.to_vec())
        .unwrap();
    s.set_grad("lora_A", grads).unwrap();
    s
}

/// Hand-computed in f64 from the formula of torch.optim.AdamW, two steps.
#[test]
fn adamw_two_steps_match_hand_computed_values() {
    let (lr, wd, b1, b2, eps) = (0.01f64, 0.1, 0.9, 0.999, 1e-8);
    let p0 = [0.5f64, -1.5, 2.0];
    let g1 = [0.1f64, -0.3, 0.0];
    let g2 = [-0.2f64, 0.05, 1.0];
    let mut s = store(&[0.5, -1.5, 2.0], &[0.1, -0.3, 0.0]);
    let groups = ParamGroups::single(lr as f32, wd as f32).unwrap();
    let config = AdamWConfig {
        betas: (b1 as f32, b2 as f32),
        eps: eps as f32,
    };
    let mut opt = AdamW::new(config, groups).unwrap();
    opt.step(&mut s, 1.0).unwrap();
    s.set_grad("lora_A", &[-0.2, 0.05, 1.0]).unwrap();
    opt.step(&mut s, 1.0).unwrap();
    for i in 0..3 {
        let (mut p, mut m, mut v) = (p0[i], 0.0, 0.0);
        for (t, g) in [(1, g1[i]), (2, g2[i])] {
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let m_hat = m / (1.0 - b1.powi(t));
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr * m_hat / denom;
        }
        let got = f64::from(s.get("lora_A").unwrap().value[i]);
        assert!((got - p).abs() < 1e-6, "element {i}: {got} vs {p}");
    }
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn nesterov_sgd_with_weight_decay_matches_hand_computed_values() {
    let mut s = store(&[1.0], &[0.5]);
    let config = SgdConfig {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
    };
    let mut opt = Sgd::new(config, ParamGroups::single(0.1, 0.01).unwrap()).unwrap();
    opt.step(&mut s, 1.0).unwrap();
    // d = 0.5 + 0.01·1 = 0.51; b = 0.51; d = 0.51 + 0.9·0.51 = 0.969; p = 1 − 0.0969
    let p1 = 1.0 - 0.1 * 0.969;
    opt.step(&mut s, 0.5).unwrap();
    // d = 0.5 + 0.01·p1; b = 0.9·0.51 + d; d += 0.9·b; p = p1 − 0.05·d
    let d: f64 = 0.5 + 0.01 * p1;
    let b = 0.9 * 0.51 + d;
    let p2 = p1 - 0.05 * (d + 0.9 * b);
    let got = f64::from(s.get("lora_A").unwrap().value[0]);
    assert!((got - p2).abs() < 1e-6, "{got} vs {p2}");
    assert_eq!(s.get("lora_A").unwrap().grad, vec![0.5], "grads untouched");
}

#[test]
fn sgd_dampening_scales_later_gradients_into_the_buffer() {
    let mut s = store(&[0.0], &[1.0]);
    let config = SgdConfig {
        momentum: 0.5,
        dampening: 0.5,
        nesterov: false,
    };
    let mut opt = Sgd::new(config, ParamGroups::single(1.0, 0.0).unwrap()).unwrap();
    opt.step(&mut s, 1.0).unwrap(); // b = g = 1 (no dampening on the first step)
    opt.step(&mut s, 1.0).unwrap(); // b = 0.5·1 + 0.5·1 = 1
    opt.step(&mut s, 1.0).unwrap(); // b = 1
    assert_eq!(s.get("lora_A").unwrap().value, vec![-3.0]);
    let state = opt.state();
    assert_eq!(
        state.tensors,
        vec![("lora_A.momentum_buffer".to_string(), vec![1.0])]
    );
}

#[test]
fn groups_give_each_parameter_its_learning_rate() {
    let mut s = ParamStore::new();
    s.add("q.lora_A", vec![1], vec![0.0]).unwrap();
    s.add("q.step", vec![1], vec![0.0]).unwrap();
    s.set_grad("q.lora_A", &[1.0]).unwrap();
    s.set_grad("q.step", &[1.0]).unwrap();
    let groups = ParamGroups::adapters_and_quantizer_steps(0.1, 0.01, 0.0).unwrap();
    let mut opt = Sgd::new(SgdConfig::default(), groups).unwrap();
    opt.step(&mut s, 2.0).unwrap();
    assert!((s.get("q.lora_A").unwrap().value[0] + 0.2).abs() < 1e-7);
    assert!((s.get("q.step").unwrap().value[0] + 0.02).abs() < 1e-7);
    let only_lora = ParamGroups::new(vec![ParamGroup {
        name: "adapters".into(),
        matcher: NameMatcher::Contains("lora_".into()),
        lr: 0.1,
        weight_decay: 0.0,
    }])
    .unwrap();
    let mut opt = Sgd::new(SgdConfig::default(), only_lora).unwrap();
    let err = opt.step(&mut s, 1.0).unwrap_err().to_string();
    assert!(err.contains("q.step") && err.contains("adapters"), "{err}");
}

#[test]
fn non_finite_gradient_changes_nothing() {
    let mut s = ParamStore::new();
    s.add("a", vec![1], vec![1.0]).unwrap();
    s.add("b", vec![2], vec![1.0, 1.0]).unwrap();
    s.set_grad("a", &[1.0]).unwrap();
    s.set_grad("b", &[1.0, f32::INFINITY]).unwrap();
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        ParamGroups::single(0.1, 0.0).unwrap(),
    )
    .unwrap();
    let err = opt.step(&mut s, 1.0).unwrap_err().to_string();
    assert!(err.contains("`b`") && err.contains("index 1"), "{err}");
    assert_eq!(s.get("a").unwrap().value, vec![1.0]);
    assert_eq!(opt.step_count(), 0);
    assert!(opt.state().tensors.is_empty());
}

#[test]
fn invalid_configs_are_errors() {
    let g = ParamGroups::single(0.1, 0.0).unwrap();
    let bad_beta = AdamWConfig {
        betas: (1.0, 0.999),
        eps: 1e-8,
    };
    assert!(AdamW::new(bad_beta, g.clone()).is_err());
    let nesterov = SgdConfig {
        nesterov: true,
        ..SgdConfig::default()
    };
    assert!(Sgd::new(nesterov, g.clone()).is_err());
    assert!(ParamGroups::single(f32::NAN, 0.0).is_err());
    assert!(GradientAccumulation::new(0).is_err());
    let mut opt = Sgd::new(SgdConfig::default(), g).unwrap();
    assert!(opt.step(&mut ParamStore::new(), -1.0).is_err());
}

#[test]
fn loading_a_state_of_another_kind_or_size_is_an_error() {
    let mut s = store(&[1.0, 2.0], &[0.1, 0.2]);
    let mut adam = AdamW::new(
        AdamWConfig::default(),
        ParamGroups::single(0.1, 0.0).unwrap(),
    )
    .unwrap();
    adam.step(&mut s, 1.0).unwrap();
    let mut sgd = Sgd::new(SgdConfig::default(), ParamGroups::single(0.1, 0.0).unwrap()).unwrap();
    assert!(sgd.load_state(adam.state()).is_err());
    let mut state = adam.state();
    state.tensors[0].1.push(0.0);
    let mut other = AdamW::new(
        AdamWConfig::default(),
        ParamGroups::single(0.1, 0.0).unwrap(),
    )
    .unwrap();
    other.load_state(state).unwrap();
    let err = other.step(&mut s, 1.0).unwrap_err().to_string();
    assert!(err.contains("optimizer state of `lora_A`"), "{err}");
}

proptest! {
    /// Saving the state mid-run and loading it into a fresh optimizer continues the run
    /// bit for bit.
    #[test]
    fn state_round_trip_resumes_identically(
        grads in proptest::collection::vec(-1.0f32..1.0, 8),
        momentum in 0.0f32..0.99,
    ) {
        for use_adam in [true, false] {
            let make = || -> Box<dyn Optimizer> {
                let groups = ParamGroups::single(0.05, 0.01).unwrap();
                if use_adam {
                    Box::new(AdamW::new(AdamWConfig::default(), groups).unwrap())
                } else {
                    Box::new(Sgd::new(SgdConfig { momentum, ..SgdConfig::default() }, groups).unwrap())
                }
            };
            let mut a = store(&[0.3, -0.7], &grads[0..2]);
            let mut opt = make();
            opt.step(&mut a, 1.0).unwrap();
            a.set_grad("lora_A", &grads[2..4]).unwrap();
            opt.step(&mut a, 1.0).unwrap();
            let state = opt.state();
            let rebuilt = OptimizerState::from_parts(&state.meta_json(), state.tensors.clone()).unwrap();
            let mut resumed = make();
            resumed.load_state(rebuilt).unwrap();
            let mut b = a.clone();
            for chunk in grads[4..].chunks(2) {
                a.set_grad("lora_A", chunk).unwrap();
                b.set_grad("lora_A", chunk).unwrap();
                opt.step(&mut a, 0.5).unwrap();
                resumed.step(&mut b, 0.5).unwrap();
            }
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(opt.state(), resumed.state());
        }
    }
}
