//! Finite-difference and hand-made checks of the backward passes of the uniform, Pi and
//! NF4-grid quantizers and of every straight-through estimator.
//!
//! # Why the LSQ step gradient is compared to `FD − STE term`
//!
//! Take the loss `L(s) = Σ gᵢ·v̂ᵢ(s)` with fixed upstream gradients `gᵢ`. Between rounding
//! jumps every code `qᵢ` is constant, so `L` is linear in `s` with slope `Σ gᵢ·(qᵢ − z)`: a
//! central difference recovers it exactly as long as no value crosses a rounding boundary
//! between `s − h` and `s + h` (the tests build values at least 0.1 step away from every
//! boundary and also assert that no code changed). LSQ deliberately differs from that true
//! derivative inside the clamp range: it passes the rounding straight through, which adds
//! `−v/s` per unclamped value (`∂v̂/∂s = round(v/s) − v/s`). At the clamps LSQ *is* the true
//! derivative (`qmin − z` / `qmax − z`). Hence, before LSQ's gradient scale,
//! `LSQ = FD(L) − Σ_{unclamped} gᵢ·vᵢ/s`, which is what the tests check — for every bit
//! width, symmetric and asymmetric grids, both clamps, and each step of a per-block layout
//! perturbed on its own (which also checks the order of the parameter gradients).

use std::f32::consts::PI;

use ndarray::Array2;
use quant_core::codebook::NF4_CODE;
use quant_core::nf4_grid::Nf4GridQuantizer;
use quant_core::pi::PiQuantizer;
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
use quant_core::ste::Ste;
use quant_core::uniform::{Granularity, GroupLayout, UniformGrid, UniformQuantizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Σ g·ŵ in f64, from the quantizer's own f32 forward pass.
fn loss(
    q: &mut dyn DifferentiableQuantizer,
    w: &Array2<f32>,
    g: &Array2<f32>,
) -> (f64, Array2<u8>) {
    let out = q.forward(w.view()).unwrap();
    let l = out
        .dequantized
        .iter()
        .zip(g.iter())
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum();
    (l, out.codes)
}

/// Values `(k + offset)·s` with integer `k` spanning the code range and 3 steps beyond on
/// both sides (so both clamps are hit), offsets in ±0.4 (away from rounding boundaries).
fn values_away_from_boundaries(
    rng: &mut ChaCha8Rng,
    grid: UniformGrid,
    zero_point: f32,
    step: f32,
    n: usize,
) -> Vec<f32> {
    let lower = grid.qmin() - zero_point - 3.0;
    let upper = grid.qmax() - zero_point + 3.0;
    (0..n)
        .map(|_| {
            let k = rng.random_range(lower as i32..=upper as i32) as f32;
            (k + rng.random_range(-0.4f32..0.4)) * step
        })
        .collect()
}

fn random_grad(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
}

#[test]
fn lsq_step_gradient_is_the_finite_difference_minus_the_straight_through_term() {
    for seed in 0..8u64 {
        lsq_finite_difference_case(seed);
    }
}

fn lsq_finite_difference_case(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (rows, cols, block) = (2, 40, 16); // blocks of 16, 16, 8 per row: 6 steps
    for bits in 2..=8u32 {
        for symmetric in [true, false] {
            let grid = UniformGrid::new(bits, symmetric).unwrap();
            let layout =
                GroupLayout::new(rows, cols, Granularity::PerBlock { size: block }).unwrap();
            let n_groups = layout.num_groups();
            let steps: Vec<f32> = (0..n_groups).map(|j| 0.05 + 0.01 * j as f32).collect();
            let zps: Vec<f32> = (0..n_groups)
                .map(|j| {
                    if symmetric {
                        0.0
                    } else {
                        (j as f32 * 3.0).min(grid.qmax())
                    }
                })
                .collect();
            let mut data = vec![0.0f32; rows * cols];
            for r in 0..rows {
                for (g, range) in layout.row_segments(r) {
                    let vals =
                        values_away_from_boundaries(&mut rng, grid, zps[g], steps[g], range.len());
                    data[r * cols + range.start..r * cols + range.end].copy_from_slice(&vals);
                }
            }
            let w = Array2::from_shape_vec((rows, cols), data).unwrap();
            let g = random_grad(&mut rng, rows, cols);

            let mut q =
                UniformQuantizer::new(bits, symmetric, layout.granularity(), Ste::Lsq).unwrap();
            q.set_params((rows, cols), steps.clone(), zps.clone())
                .unwrap();
            q.forward(w.view()).unwrap();
            let grads = q.backward(g.view()).unwrap();
            assert_eq!(grads.params.len(), q.params().len());

            let sizes = layout.group_sizes();
            for j in 0..n_groups {
                let s = steps[j];
                let h = 3e-4 * s;
                let mut at = |step: f32| {
                    q.params_mut()[j] = step;
                    loss(&mut q, &w, &g)
                };
                let (l_plus, codes_plus) = at(s + h);
                let (l_minus, codes_minus) = at(s - h);
                q.params_mut()[j] = s;
                assert_eq!(
                    codes_plus, codes_minus,
                    "bits {bits}: a code moved, h too large"
                );
                // Divide by the f32 steps actually used: s ± h rounds to f32 itself.
                let fd = (l_plus - l_minus) / (f64::from(s + h) - f64::from(s - h));

                // The straight-through term of group j: Σ over its unclamped values of g·v/s.
                let (lower, upper) = (grid.qmin() - zps[j], grid.qmax() - zps[j]);
                let mut ste_term = 0.0f64;
                let mut abs_scale = 0.0f64;
                for r in 0..rows {
                    for (group, range) in layout.row_segments(r) {
                        if group != j {
                            continue;
                        }
                        for c in range {
                            let x = w[[r, c]] / s;
                            abs_scale += f64::from(g[[r, c]].abs()) * f64::from(x.abs());
                            if (lower..=upper).contains(&x) {
                                ste_term += f64::from(g[[r, c]]) * f64::from(x);
                            }
                        }
                    }
                }
                let grad_scale = 1.0 / ((sizes[j] as f64) * f64::from(grid.qmax())).sqrt();
                let expected = (fd - ste_term) * grad_scale;
                let got = f64::from(grads.params[j]);
                let tolerance = 1e-4 * abs_scale.max(1.0) * grad_scale;
                assert!(
                    (got - expected).abs() <= tolerance,
                    "bits {bits} symmetric {symmetric} group {j}: LSQ {got}, FD-based {expected}"
                );
            }
        }
    }
}

#[test]
fn lsq_hand_made_cases_cover_both_clamps() {
    // 2-bit symmetric, step 0.5: levels −2..=1 (values −1.0..=0.5).
    let w = Array2::from_shape_vec((1, 4), vec![-2.0f32, -0.3, 0.2, 1.7]).unwrap();
    let g = Array2::from_shape_vec((1, 4), vec![1.0f32, 2.0, -1.0, 0.5]).unwrap();
    let mut q = UniformQuantizer::new(2, true, Granularity::PerTensor, Ste::Lsq).unwrap();
    q.set_params((1, 4), vec![0.5], vec![0.0]).unwrap();
    let out = q.forward(w.view()).unwrap();
    // x = −4 (clamped to −2), −0.6 → −1, 0.4 → 0, 3.4 (clamped to 1).
    assert_eq!(out.dequantized.as_slice().unwrap(), &[-1.0, -0.5, 0.0, 0.5]);
    assert_eq!(out.codes.as_slice().unwrap(), &[0, 1, 2, 3]);
    let grads = q.backward(g.view()).unwrap();
    assert_eq!(grads.input.as_slice().unwrap(), &[0.0, 2.0, -1.0, 0.0]);
    // Σ g·∂v̂/∂s = 1·(−2) + 2·(−1 + 0.6) + (−1)·(0 − 0.4) + 0.5·1 = −1.9, times 1/√(4·1).
    assert!(
        (grads.params[0] - (-1.9 / 2.0)).abs() < 1e-6,
        "{}",
        grads.params[0]
    );
}

#[test]
fn each_estimator_gives_its_weight_gradient_through_the_uniform_quantizer() {
    // 3-bit symmetric, step 1: levels −4..=3. Values: interior, just outside the top, far out.
    let w = Array2::from_shape_vec((1, 5), vec![1.3f32, -2.2, 3.4, -6.0, 0.5]).unwrap();
    let g = Array2::from_shape_vec((1, 5), vec![1.0f32, -1.0, 1.0, 1.0, 2.0]).unwrap();
    let run = |ste: Ste| {
        let mut q = UniformQuantizer::new(3, true, Granularity::PerTensor, ste).unwrap();
        q.set_params((1, 5), vec![1.0], vec![0.0]).unwrap();
        q.forward(w.view()).unwrap();
        q.backward(g.view()).unwrap()
    };
    assert_eq!(
        run(Ste::Standard).input.as_slice().unwrap(),
        &[1.0, -1.0, 1.0, 1.0, 2.0]
    );
    assert_eq!(
        run(Ste::Lsq).input.as_slice().unwrap(),
        &[1.0, -1.0, 0.0, 0.0, 2.0]
    );
    // clip 0.5: range [−2, 1.5]; only 1.3 and 0.5 pass.
    let clipped = run(Ste::Clipped { clip: 0.5 });
    assert_eq!(
        clipped.input.as_slice().unwrap(),
        &[1.0, 0.0, 0.0, 0.0, 2.0]
    );
    // EWGS δ = 0.5: 1.3 → 1 (diff 0.3, g>0): 1.15; −2.2 → −2 (diff −0.2, g<0): −1·(1 + 0.1);
    // 0.5 → 0 (tie to even, diff 0.5, g>0): 2·1.25.
    let ewgs = run(Ste::Ewgs { delta: 0.5 });
    let expected = [1.15f32, -1.1, 0.0, 0.0, 2.5];
    for (got, want) in ewgs.input.iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
    // The step gradient is LSQ's for every estimator; only Lsq rescales it (1/√(5·3)).
    let unscaled = run(Ste::Standard).params[0];
    assert_eq!(run(Ste::Ewgs { delta: 0.5 }).params[0], unscaled);
    let lsq = run(Ste::Lsq).params[0];
    assert!((lsq - unscaled / 15f32.sqrt()).abs() < 1e-6);
}

#[test]
fn pi_alpha_gradient_is_pi_over_k_times_the_step_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let w = Array2::from_shape_fn((3, 24), |_| rng.random_range(-1.0f32..1.0));
    let g = random_grad(&mut rng, 3, 24);
    for k in 2..=5u32 {
        for (ste, symmetric) in [
            (Ste::Lsq, true),
            (Ste::Ewgs { delta: 0.3 }, true),
            (Ste::Lsq, false),
        ] {
            let mut pi = PiQuantizer::new(3, symmetric, Granularity::PerChannel, ste, k).unwrap();
            pi.init_from_weights(w.view(), InitMethod::MseClipSearch)
                .unwrap();
            let steps = pi.steps();
            let mut uniform =
                UniformQuantizer::new(3, symmetric, Granularity::PerChannel, ste).unwrap();
            uniform
                .set_params((3, 24), steps, pi.zero_points().to_vec())
                .unwrap();

            let a = pi.forward(w.view()).unwrap();
            let b = uniform.forward(w.view()).unwrap();
            assert_eq!(a, b, "same grid, same forward");
            let ga = pi.backward(g.view()).unwrap();
            let gb = uniform.backward(g.view()).unwrap();
            assert_eq!(ga.input, gb.input);
            assert_eq!(ga.params.len(), 3);
            for (alpha_grad, step_grad) in ga.params.iter().zip(&gb.params) {
                let want = step_grad * PI / k as f32;
                assert!((alpha_grad - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
        }
    }
}

#[test]
fn pi_alpha_gradient_matches_a_finite_difference_where_every_value_is_clamped() {
    // With every value beyond the grid, v̂ = ±level·α·π/k is linear in α and LSQ's gradient
    // is the true derivative: (π/k)·Σ g·level, times 1/√(N·Qp).
    let w = Array2::from_shape_vec((1, 4), vec![5.0f32, -7.0, 9.0, -4.5]).unwrap();
    let g = Array2::from_shape_vec((1, 4), vec![0.3f32, -1.2, 0.7, 2.0]).unwrap();
    let mut pi = PiQuantizer::new(3, true, Granularity::PerTensor, Ste::Lsq, 3).unwrap();
    pi.init_from_weights(Array2::from_elem((1, 4), 0.3f32).view(), InitMethod::Absmax)
        .unwrap();
    pi.params_mut()[0] = 0.25;
    pi.forward(w.view()).unwrap();
    let got = pi.backward(g.view()).unwrap().params[0];
    let h = 1e-3f32;
    pi.params_mut()[0] = 0.25 + h;
    let (lp, _) = loss(&mut pi, &w, &g);
    pi.params_mut()[0] = 0.25 - h;
    let (lm, _) = loss(&mut pi, &w, &g);
    let fd = (lp - lm) / (f64::from(0.25 + h) - f64::from(0.25 - h)) / (4.0f64 * 3.0).sqrt();
    assert!((f64::from(got) - fd).abs() < 1e-3, "{got} vs {fd}");
}

/// Values `(NF4[c] + small offset)·a`, at most 40% of the way to the neighbouring midpoint.
fn nf4_values_away_from_midpoints(rng: &mut ChaCha8Rng, scale: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let c = rng.random_range(0..16usize);
            let below = if c > 0 {
                NF4_CODE[c] - NF4_CODE[c - 1]
            } else {
                0.0
            };
            let above = if c < 15 {
                NF4_CODE[c + 1] - NF4_CODE[c]
            } else {
                0.0
            };
            let offset = rng.random_range(-0.4f32..0.4) * 0.5;
            let x = NF4_CODE[c]
                + if offset < 0.0 {
                    offset * below
                } else {
                    offset * above
                };
            x * scale
        })
        .collect()
}

#[test]
fn nf4_scale_gradient_matches_a_finite_difference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, cols) = (3, 20);
    let scales = [0.5f32, 1.5, 0.02];
    let mut data = Vec::new();
    for &a in &scales {
        data.extend(nf4_values_away_from_midpoints(&mut rng, a, cols));
    }
    let w = Array2::from_shape_vec((rows, cols), data).unwrap();
    let g = random_grad(&mut rng, rows, cols);
    for ste in [Ste::Standard, Ste::Lsq] {
        let mut q = Nf4GridQuantizer::new(Granularity::PerChannel, ste).unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        q.params_mut().copy_from_slice(&scales);
        q.forward(w.view()).unwrap();
        let grads = q.backward(g.view()).unwrap();
        assert_eq!(grads.params.len(), 3);
        let factor = if ste == Ste::Lsq {
            1.0 / (cols as f64).sqrt()
        } else {
            1.0
        };
        for (j, &a) in scales.iter().enumerate() {
            let h = 1e-4 * a;
            q.params_mut()[j] = a + h;
            let (lp, cp) = loss(&mut q, &w, &g);
            q.params_mut()[j] = a - h;
            let (lm, cm) = loss(&mut q, &w, &g);
            q.params_mut()[j] = a;
            assert_eq!(cp, cm, "a code moved");
            let fd = (lp - lm) / (f64::from(a + h) - f64::from(a - h)) * factor;
            let got = f64::from(grads.params[j]);
            assert!(
                (got - fd).abs() < 2e-3 * fd.abs().max(1.0),
                "{ste:?} row {j}: {got} vs {fd}"
            );
        }
    }
}

#[test]
fn nf4_weight_gradients_follow_each_estimator() {
    // Scale 2: x = w/2 = [0.3, 1.2 (clamped), −0.9, 0.05].
    let w = Array2::from_shape_vec((1, 4), vec![0.6f32, 2.4, -1.8, 0.1]).unwrap();
    let g = Array2::from_shape_vec((1, 4), vec![1.0f32, 1.0, -1.0, 1.0]).unwrap();
    let run = |ste: Ste| {
        let mut q = Nf4GridQuantizer::new(Granularity::PerTensor, ste).unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        q.params_mut()[0] = 2.0;
        let out = q.forward(w.view()).unwrap();
        (out, q.backward(g.view()).unwrap())
    };
    let (out, standard) = run(Ste::Standard);
    // 0.3 → 0.3379 (code 11), 1.2 → 1 (15), −0.9 → −1 (0), 0.05 → 0.0796 (8).
    assert_eq!(out.codes.as_slice().unwrap(), &[11, 15, 0, 8]);
    assert_eq!(standard.input.as_slice().unwrap(), &[1.0, 1.0, -1.0, 1.0]);
    let (_, lsq) = run(Ste::Lsq);
    assert_eq!(lsq.input.as_slice().unwrap(), &[1.0, 0.0, -1.0, 1.0]);
    let (_, clipped) = run(Ste::Clipped { clip: 0.5 });
    assert_eq!(clipped.input.as_slice().unwrap(), &[1.0, 0.0, 0.0, 1.0]);
    let (_, ewgs) = run(Ste::Ewgs { delta: 0.5 });
    let gap_11 = NF4_CODE[11] - NF4_CODE[10]; // 0.3 lies below code 11's value
    let gap_0 = NF4_CODE[1] - NF4_CODE[0]; // −0.9 lies above code 0's value
    let gap_8 = NF4_CODE[8] - NF4_CODE[7]; // 0.05 lies below code 8's value
    let expected = [
        1.0 + 0.5 * (0.3 - NF4_CODE[11]) / gap_11,
        0.0,
        -(1.0 - 0.5 * (-0.9 - NF4_CODE[0]) / gap_0),
        1.0 + 0.5 * (0.05 - NF4_CODE[8]) / gap_8,
    ];
    for (got, want) in ewgs.input.iter().zip(expected) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    // Scale gradient Σ g·code value, the same for every estimator except Lsq's 1/√N.
    let want = NF4_CODE[11] + NF4_CODE[15] - NF4_CODE[0] + NF4_CODE[8];
    assert!((standard.params[0] - want).abs() < 1e-6);
    assert!((lsq.params[0] - want / 2.0).abs() < 1e-6);
}

#[test]
fn parameter_gradients_are_ordered_like_the_group_layout() {
    // Gradient only on group j must show up only in params[j], for every quantizer kind.
    let (rows, cols) = (2, 10);
    let granularity = Granularity::PerBlock { size: 4 }; // 3 blocks per row, 6 groups
    let layout = GroupLayout::new(rows, cols, granularity).unwrap();
    let w = Array2::from_shape_fn((rows, cols), |(r, c)| ((r * cols + c) as f32 * 0.9).sin());
    let quantizers: Vec<Box<dyn DifferentiableQuantizer>> = vec![
        Box::new(UniformQuantizer::new(4, false, granularity, Ste::Lsq).unwrap()),
        Box::new(PiQuantizer::new(3, true, granularity, Ste::Standard, 4).unwrap()),
        Box::new(Nf4GridQuantizer::new(granularity, Ste::Lsq).unwrap()),
    ];
    for mut q in quantizers {
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        assert_eq!(q.params().len(), layout.num_groups());
        for r in 0..rows {
            for (j, range) in layout.row_segments(r) {
                let mut g = Array2::<f32>::zeros((rows, cols));
                for c in range {
                    g[[r, c]] = 1.0;
                }
                q.forward(w.view()).unwrap();
                let grads = q.backward(g.view()).unwrap();
                assert_eq!(grads.params.len(), layout.num_groups());
                for (i, &p) in grads.params.iter().enumerate() {
                    if i != j {
                        assert_eq!(p, 0.0, "{q:?}: group {j} leaked into params[{i}]");
                    }
                }
                assert_ne!(grads.params[j], 0.0, "{q:?}: group {j}");
            }
        }
    }
}
