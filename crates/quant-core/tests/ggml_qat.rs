//! The trainable ggml block grids (`quant_core::ggml::qat`): initialisation is llama.cpp's
//! quantizer (the exported blocks equal llama.cpp's own for the reference rows), exported
//! blocks decode to the fake-quant weights bit for bit after training moved the scales, and
//! the LSQ gradients of `d` and `m` agree with central finite differences minus LSQ's
//! straight-through term (see `ste_lsq_finite_diff.rs` for why that is the right comparison).

use half::f16;
use ndarray::Array2;
use quant_core::ggml::qat::GgmlBlockQuantizer;
use quant_core::ggml::{dequantize, GgmlType};
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

fn golden(ty: GgmlType) -> (Array2<f32>, Vec<u8>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ggml")
        .join(format!("{}.safetensors", ty.name()));
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input").unwrap();
    let shape = (input.shape()[0], input.shape()[1]);
    let values = quant_core::io::tensor_to_f32("input", &input).unwrap();
    let blocks = st.tensor("blocks").unwrap().data().to_vec();
    (Array2::from_shape_vec(shape, values).unwrap(), blocks)
}

#[test]
fn initialisation_is_llama_cpp_quantizer_and_exports_its_blocks() {
    for ty in TYPES {
        let (w, blocks) = golden(ty);
        let mut q = GgmlBlockQuantizer::new(ty).unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let out = q.forward(w.view()).unwrap();
        let expected = dequantize(ty, &blocks, w.len()).unwrap();
        for (i, (a, b)) in out.dequantized.iter().zip(&expected).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ty} value {i}: {a} vs {b}");
        }
        assert_eq!(q.export_blocks(w.view()).unwrap(), blocks, "{ty} blocks");
    }
}

#[test]
fn exported_blocks_decode_to_the_fake_quant_weights_after_training_moved_the_scales() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let w = Array2::from_shape_fn((4, 96), |_| rng.random_range(-1.0f32..1.0));
    for ty in TYPES {
        let mut q = GgmlBlockQuantizer::new(ty).unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        // An optimizer's steps: scales and minima moved by amounts that are not f16 values.
        for p in q.params_mut() {
            *p *= rng.random_range(0.7f32..1.3);
        }
        let out = q.forward(w.view()).unwrap();
        let blocks = q.export_blocks(w.view()).unwrap();
        let decoded = dequantize(ty, &blocks, w.len()).unwrap();
        for (i, (a, b)) in out.dequantized.iter().zip(&decoded).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ty} value {i}: {a} vs {b}");
        }
    }
}

/// Σ g·ŵ in f64.
fn loss(q: &mut GgmlBlockQuantizer, w: &Array2<f32>, g: &Array2<f32>) -> (f64, Array2<u8>) {
    let out = q.forward(w.view()).unwrap();
    let l = out
        .dequantized
        .iter()
        .zip(g.iter())
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    (l, out.codes)
}

#[test]
fn scale_and_minimum_gradients_match_finite_differences_minus_the_ste_term() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for ty in TYPES {
        let (rows, cols) = (2, 64);
        let mut q = GgmlBlockQuantizer::new(ty).unwrap();
        let nb = rows * cols / 32;
        // f16-exact scales and minima, so that θ ± h (h = one f16 ulp, ≤ 2⁻¹¹ relative for
        // these scales: at most 0.07 of a step for Q8_0's 128 levels) is stored exactly.
        let d: Vec<f32> = (0..nb)
            .map(|_| f16::from_f32(rng.random_range(0.1f32..0.124)).to_f32())
            .collect();
        let m: Vec<f32> = (0..nb)
            .map(|_| f16::from_f32(rng.random_range(-2.0f32..-1.0)).to_f32())
            .collect();
        let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        let (qmax, zero) = match ty {
            GgmlType::Q4_0 => (15, 8),
            GgmlType::Q5_0 => (31, 16),
            GgmlType::Q8_0 => (255, 128),
            GgmlType::Q4_1 => (15, 0),
            _ => (31, 0),
        };
        // Values ≥ 0.1 step from every rounding boundary; a few beyond each clamp.
        let w = Array2::from_shape_fn((rows, cols), |(r, c)| {
            let b = (r * cols + c) / 32;
            let code = rng.random_range(0..=qmax);
            let mut u = rng.random_range(-0.4f32..0.4);
            if c % 11 == 0 {
                u = if code == 0 { -1.3 } else { 1.3 };
            }
            let level = if c % 11 == 0 && code != 0 { qmax } else { code };
            let mm = if has_min { m[b] } else { 0.0 };
            (level as f32 - zero as f32 + u) * d[b] + mm
        });
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let params: Vec<f32> = if has_min {
            d.iter().chain(&m).copied().collect()
        } else {
            d.clone()
        };
        q.params_mut().copy_from_slice(&params);
        let g = Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0));
        let (_, codes) = loss(&mut q, &w, &g);
        let grads = q.backward(g.view()).unwrap();
        let qp = match ty {
            GgmlType::Q4_0 => 7.0,
            GgmlType::Q5_0 => 15.0,
            GgmlType::Q8_0 => 127.0,
            GgmlType::Q4_1 => 15.0,
            _ => 31.0,
        };
        let lsq = 1.0 / (32.0f64 * qp).sqrt();
        let n_params = params.len();
        let mut clamped_seen = false;
        for p in 0..n_params {
            let b = p % nb;
            let theta = params[p];
            let below = f16::from_bits(f16::from_f32(theta).to_bits() - 1).to_f32();
            let h = (theta - below).abs();
            let mut plus = params.clone();
            plus[p] = theta + h;
            q.params_mut().copy_from_slice(&plus);
            let (lp, cp) = loss(&mut q, &w, &g);
            let mut minus = params.clone();
            minus[p] = theta - h;
            q.params_mut().copy_from_slice(&minus);
            let (lm, cm) = loss(&mut q, &w, &g);
            assert_eq!(cp, codes, "{ty} param {p}: a code changed under +h");
            assert_eq!(cm, codes, "{ty} param {p}: a code changed under −h");
            let fd = (lp - lm) / (2.0 * f64::from(h));
            // LSQ's straight-through term over the block's unclamped values.
            let mut ste = 0.0f64;
            for i in b * 32..(b + 1) * 32 {
                let (x, gi) = (w.as_slice().unwrap()[i], g.as_slice().unwrap()[i]);
                let mm = if has_min { m[b] } else { 0.0 };
                let level = f64::from(x - mm) / f64::from(d[b]) + f64::from(zero);
                let clamped = level < -0.5 || level > f64::from(qmax) + 0.5;
                clamped_seen |= clamped;
                if !clamped {
                    if p < nb {
                        let mm = if has_min { m[b] } else { 0.0 };
                        ste += f64::from(gi) * f64::from(x - mm) / f64::from(d[b]);
                    } else {
                        ste += f64::from(gi);
                    }
                }
            }
            let expected = (fd - ste) * lsq;
            let got = f64::from(grads.params[p]);
            assert!(
                (got - expected).abs() <= 1e-3 * (1.0 + expected.abs()),
                "{ty} param {p}: LSQ {got} vs FD − STE {expected}"
            );
        }
        assert!(clamped_seen, "{ty}: the clamps were exercised");
        // ∂L/∂w: straight through inside the code range, zero beyond a clamp.
        for (i, (&gw, &gi)) in grads.input.iter().zip(g.iter()).enumerate() {
            let b = i / 32;
            let x = w.as_slice().unwrap()[i];
            let mm = if has_min { m[b] } else { 0.0 };
            let level = f64::from(x - mm) / f64::from(d[b]) + f64::from(zero);
            let clamped = level < -0.5 || level > f64::from(qmax) + 0.5;
            assert_eq!(gw, if clamped { 0.0 } else { gi }, "{ty} ∂L/∂w[{i}]");
        }
        q.params_mut().copy_from_slice(&params);
    }
}

#[test]
fn misuse_is_an_error_naming_what_was_wrong() {
    assert!(GgmlBlockQuantizer::new(GgmlType::Q4_K)
        .unwrap_err()
        .to_string()
        .contains("q4_k"));
    let mut q = GgmlBlockQuantizer::new(GgmlType::Q4_0).unwrap();
    let w = Array2::<f32>::ones((2, 48));
    assert!(q.init_from_weights(w.view(), InitMethod::Absmax).is_err());
    let w = Array2::<f32>::ones((2, 64));
    assert!(q.forward(w.view()).is_err(), "uninitialised");
    let err = q
        .init_from_weights(w.view(), InitMethod::MseClipSearch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("MseClipSearch"), "{err}");
    q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
    assert!(q.backward(w.view()).is_err(), "backward before forward");
    assert!(q.forward(Array2::<f32>::ones((1, 64)).view()).is_err());
}

mod k_types {
    //! `Q4_K` and `Q6_K` (`quant_core::ggml::qat_k`): initialisation is llama.cpp's search
    //! (blocks equal llama.cpp's for the reference rows), exports decode to the fake-quant
    //! weights after training moved θ, and the LSQ gradients agree with central finite
    //! differences in the effective sub-block scale `S` and minimum `M` minus LSQ's
    //! straight-through term. θ reaches the forward only through the format's quantization of
    //! scales (piecewise constant), so the derivative that exists is the one in `S`, `M`.

    use super::*;
    use quant_core::ggml::qat_k::GgmlKQuantizer;

    const K_TYPES: [GgmlType; 2] = [GgmlType::Q4_K, GgmlType::Q6_K];

    #[test]
    fn initialisation_is_llama_cpp_search_and_exports_its_blocks() {
        for ty in K_TYPES {
            let (w, blocks) = golden(ty);
            let n = w.len();
            let w = w.into_shape_with_order((n / 256, 256)).unwrap();
            let mut q = GgmlKQuantizer::new(ty).unwrap();
            q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
            let out = q.forward(w.view()).unwrap();
            let expected = dequantize(ty, &blocks, w.len()).unwrap();
            for (i, (a, b)) in out.dequantized.iter().zip(&expected).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{ty} value {i}: {a} vs {b}");
            }
            assert_eq!(q.export_blocks(w.view()).unwrap(), blocks, "{ty} blocks");
        }
    }

    #[test]
    fn exported_blocks_decode_to_the_fake_quant_weights_after_training_moved_theta() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let w = Array2::from_shape_fn((3, 512), |_| rng.random_range(-1.0f32..1.0));
        for ty in K_TYPES {
            let mut q = GgmlKQuantizer::new(ty).unwrap();
            q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
            for p in q.params_mut() {
                *p *= rng.random_range(0.7f32..1.3);
            }
            let out = q.forward(w.view()).unwrap();
            let decoded = dequantize(ty, &q.export_blocks(w.view()).unwrap(), w.len()).unwrap();
            for (i, (a, b)) in out.dequantized.iter().zip(&decoded).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{ty} value {i}: {a} vs {b}");
            }
        }
    }

    /// `Σ g·ŵ` in f64 with ggml's code rule for given effective `S`, `M` of each sub-block;
    /// also the codes.
    fn loss_in_s(ty: GgmlType, x: &[f32], g: &[f32], sm: &[(f64, f64)]) -> (f64, Vec<i64>) {
        let len = if ty == GgmlType::Q4_K { 32 } else { 16 };
        let mut total = 0.0;
        let mut codes = Vec::with_capacity(x.len());
        for (i, (&xi, &gi)) in x.iter().zip(g).enumerate() {
            let (s, m) = sm[i / len];
            let (lo, hi) = if ty == GgmlType::Q4_K {
                (0, 15)
            } else {
                (-32, 31)
            };
            let q = ((f64::from(xi) + m) / s)
                .round()
                .clamp(lo as f64, hi as f64);
            codes.push(q as i64);
            total += f64::from(gi) * (s * q - m);
        }
        (total, codes)
    }

    #[test]
    fn scale_and_minimum_gradients_match_finite_differences_minus_the_ste_term() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for ty in K_TYPES {
            let w = Array2::from_shape_fn((2, 256), |(_, c)| {
                let v = rng.random_range(-1.0f32..1.0);
                // A few values far out, so some sub-blocks clamp at trained scales.
                if c % 37 == 0 {
                    v * 3.0
                } else {
                    v
                }
            });
            let mut q = GgmlKQuantizer::new(ty).unwrap();
            q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
            // Trained θ: smaller scales than the search's, so the far values clamp.
            for p in q.params_mut() {
                *p *= 0.8;
            }
            let g = Array2::from_shape_fn((2, 256), |_| rng.random_range(-1.0f32..1.0));
            q.forward(w.view()).unwrap();
            let grads = q.backward(g.view()).unwrap();
            let sm: Vec<(f64, f64)> = q
                .effective_scales()
                .iter()
                .map(|&(s, m)| (f64::from(s), f64::from(m)))
                .collect();
            let (x, gv) = (w.as_slice().unwrap(), g.as_slice().unwrap());
            let (len, qp) = if ty == GgmlType::Q4_K {
                (32, 15.0)
            } else {
                (16, 31.0)
            };
            let lsq = 1.0 / (len as f64 * qp).sqrt();
            let (_, codes) = loss_in_s(ty, x, gv, &sm);
            let n_sub = sm.len();
            let mut checked = 0;
            for j in 0..n_sub {
                for which in 0..if ty == GgmlType::Q4_K { 2 } else { 1 } {
                    let h = 1e-4 * sm[j].0.abs().max(1e-3);
                    let shifted = |sign: f64| {
                        let mut p = sm.clone();
                        if which == 0 {
                            p[j].0 += sign * h;
                        } else {
                            p[j].1 += sign * h;
                        }
                        loss_in_s(ty, x, gv, &p)
                    };
                    let ((lp, cp), (lm, cm)) = (shifted(1.0), shifted(-1.0));
                    if cp != codes || cm != codes {
                        continue; // a value sits on a rounding boundary: no derivative there
                    }
                    let fd = (lp - lm) / (2.0 * h);
                    let (s, m) = sm[j];
                    let mut ste = 0.0f64;
                    for k in j * len..(j + 1) * len {
                        let t = ((f64::from(x[k]) + m) / s).round();
                        let inside = if ty == GgmlType::Q4_K {
                            (0.0..=15.0).contains(&t)
                        } else {
                            (-32.0..=31.0).contains(&t)
                        };
                        if inside {
                            ste += f64::from(gv[k])
                                * if which == 0 {
                                    (f64::from(x[k]) + m) / s
                                } else {
                                    -1.0
                                };
                        }
                    }
                    let expected = (fd - ste) * lsq;
                    let got = f64::from(grads.params[which * n_sub + j]);
                    assert!(
                        (got - expected).abs() <= 2e-3 * (1.0 + expected.abs()),
                        "{ty} sub-block {j} ({}): LSQ {got} vs FD − STE {expected}",
                        if which == 0 { "scale" } else { "minimum" }
                    );
                    checked += 1;
                }
            }
            assert!(
                checked > n_sub / 2,
                "{ty}: {checked} of {n_sub} sub-blocks checked"
            );
            // ∂L/∂w: straight through inside the code range, zero beyond a clamp.
            let mut clamped_seen = false;
            for (k, (&gw, &gi)) in grads.input.iter().zip(gv).enumerate() {
                let (s, m) = sm[k / len];
                let t = ((f64::from(x[k]) + m) / s).round();
                let inside = if ty == GgmlType::Q4_K {
                    (0.0..=15.0).contains(&t)
                } else {
                    (-32.0..=31.0).contains(&t)
                };
                clamped_seen |= !inside;
                assert_eq!(gw, if inside { gi } else { 0.0 }, "{ty} ∂L/∂w[{k}]");
            }
            assert!(clamped_seen, "{ty}: the clamps were exercised");
        }
    }

    #[test]
    fn misuse_is_an_error_naming_what_was_wrong() {
        assert!(GgmlKQuantizer::new(GgmlType::Q5_K)
            .unwrap_err()
            .to_string()
            .contains("q5_k"));
        let mut q = GgmlKQuantizer::new(GgmlType::Q4_K).unwrap();
        let err = q
            .init_from_weights(Array2::<f32>::ones((2, 576)).view(), InitMethod::Absmax)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q5_0"), "names llama.cpp's fallback: {err}");
        let w = Array2::<f32>::ones((1, 256));
        assert!(q.forward(w.view()).is_err(), "uninitialised");
        assert!(q
            .init_from_weights(w.view(), InitMethod::MseClipSearch)
            .is_err());
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        assert!(q.backward(w.view()).is_err(), "backward before forward");
    }
}
