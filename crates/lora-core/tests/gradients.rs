//! Finite-difference checks of every backward: LoRA, rsLoRA, DoRA, with and without dropout,
//! with a bias and with two active adapters, for dX, dA, dB and dm.
//!
//! The layer computes in `f32`; central differences of an `f32` loss would drown in rounding.
//! So the reference is an independent `f64` implementation of the same function written here
//! from the formulas, differentiated by central differences (h = 1e-6) in `f64`. The loss is
//! `L = Σ y ⊙ R` for a fixed random `R`, so `dy = R`.
//!
//! DoRA: PEFT detaches the row norm `‖W + s·B·A‖` (DoRA paper §4.3), so the gradient the layer
//! must produce is that of the function in which the norm is a constant equal to its value at
//! the current parameters. The reference therefore computes the norm once, at the unperturbed
//! `A` and `B`, and keeps it fixed while it perturbs `A`, `B` and `m`; a reference that
//! recomputed the norm would differentiate through it and disagree, by design.
//!
//! Dropout: the reference uses the very mask the layer drew in its forward
//! (`LoraAdapter::last_dropout_mask`), so both compute the same function.

use lora_core::{AdapterOptions, InitLoraWeights, LoraLinear};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
}

fn to64(a: &Array2<f32>) -> Array2<f64> {
    a.mapv(|v| v as f64)
}

/// One adapter of the `f64` reference.
#[derive(Clone)]
struct RefAdapter {
    a: Array2<f64>,
    b: Array2<f64>,
    m: Option<Array1<f64>>,
    scale: f64,
    mask: Option<Array2<f64>>,
    /// The detached DoRA norm, fixed at the unperturbed parameters.
    norm: Option<Array1<f64>>,
}

struct Reference {
    w: Array2<f64>,
    bias: Option<Array1<f64>>,
    adapters: Vec<RefAdapter>,
}

fn matmul_t(x: &Array2<f64>, w: &Array2<f64>) -> Array2<f64> {
    // x·wᵀ by loops, independent of the crate's GEMM.
    let (t, k) = x.dim();
    let n = w.nrows();
    assert_eq!(w.ncols(), k);
    Array2::from_shape_fn((t, n), |(i, j)| (0..k).map(|p| x[[i, p]] * w[[j, p]]).sum())
}

fn row_norms(w: &Array2<f64>, a: &RefAdapter) -> Array1<f64> {
    let (out, inp) = w.dim();
    let r = a.a.nrows();
    Array1::from_shape_fn(out, |j| {
        (0..inp)
            .map(|i| {
                let delta: f64 = (0..r).map(|k| a.b[[j, k]] * a.a[[k, i]]).sum();
                let v = w[[j, i]] + a.scale * delta;
                v * v
            })
            .sum::<f64>()
            .sqrt()
    })
}

impl Reference {
    fn forward(&self, x: &Array2<f64>) -> Array2<f64> {
        let mut y = matmul_t(x, &self.w);
        for ad in &self.adapters {
            let xd = match &ad.mask {
                Some(mask) => x * mask,
                None => x.clone(),
            };
            let lora = matmul_t(&matmul_t(&xd, &ad.a), &ad.b) * ad.scale;
            match (&ad.m, &ad.norm) {
                (None, _) => y += &lora,
                (Some(m), Some(norm)) => {
                    let base_d = matmul_t(&xd, &self.w);
                    for ((t, j), v) in y.indexed_iter_mut() {
                        let g = m[j] / norm[j];
                        *v += (g - 1.0) * base_d[[t, j]] + g * lora[[t, j]];
                    }
                }
                (Some(_), None) => unreachable!("DoRA reference needs its norm"),
            }
        }
        if let Some(b) = &self.bias {
            y += b;
        }
        y
    }

    fn loss(&self, x: &Array2<f64>, r: &Array2<f64>) -> f64 {
        (self.forward(x) * r).sum()
    }
}

/// Which parameter a finite difference perturbs.
#[derive(Clone, Copy)]
enum Param {
    X,
    A(usize),
    B(usize),
    M(usize),
}

fn param_slice<'a>(rf: &'a mut Reference, x: &'a mut Array2<f64>, p: Param) -> &'a mut [f64] {
    let array = match p {
        Param::X => return x.as_slice_mut().unwrap(),
        Param::A(k) => &mut rf.adapters[k].a,
        Param::B(k) => &mut rf.adapters[k].b,
        Param::M(k) => return rf.adapters[k].m.as_mut().unwrap().as_slice_mut().unwrap(),
    };
    array.as_slice_mut().unwrap()
}

/// Central differences of the loss with respect to every element of one parameter.
fn numeric_grad(rf: &mut Reference, x: &mut Array2<f64>, r: &Array2<f64>, p: Param) -> Vec<f64> {
    let h = 1e-6;
    let len = param_slice(rf, x, p).len();
    (0..len)
        .map(|i| {
            let orig = param_slice(rf, x, p)[i];
            param_slice(rf, x, p)[i] = orig + h;
            let plus = rf.loss(x, r);
            param_slice(rf, x, p)[i] = orig - h;
            let minus = rf.loss(x, r);
            param_slice(rf, x, p)[i] = orig;
            (plus - minus) / (2.0 * h)
        })
        .collect()
}

fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64]) {
    assert_eq!(analytic.len(), numeric.len(), "{what}");
    let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a as f64 - n).abs();
        assert!(
            err <= 2e-4 * scale + 1e-5,
            "{what}[{i}]: analytic {a} vs finite difference {n} (scale {scale})"
        );
    }
    // A gradient that is identically zero would pass trivially; these cases are all non-zero.
    assert!(scale > 1e-3, "{what}: gradient unexpectedly ~0");
}

struct Case {
    name: &'static str,
    adapters: Vec<AdapterOptions>,
    bias: bool,
    training: bool,
}

fn options(r: usize, alpha: f64, rslora: bool, dora: bool, dropout: f64) -> AdapterOptions {
    AdapterOptions {
        r,
        alpha,
        dropout,
        use_rslora: rslora,
        use_dora: dora,
        init: InitLoraWeights::Random,
    }
}

fn check(case: &Case, seed: u64) {
    let (tokens, in_f, out_f) = (5, 7, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random(&mut rng, out_f, in_f);
    let bias = case
        .bias
        .then(|| Array1::from_shape_fn(out_f, |_| rng.random_range(-1.0f32..1.0)));
    let mut layer = LoraLinear::dense(w.clone(), bias.clone(), case.name).unwrap();
    let names: Vec<String> = (0..case.adapters.len()).map(|i| format!("ad{i}")).collect();
    for (i, o) in case.adapters.iter().enumerate() {
        layer
            .add_adapter(&names[i], o, seed + 100 + i as u64)
            .unwrap();
        // Move m away from ‖W + s·B·A‖ so that DoRA's g ≠ 1 and every term matters.
        let ad = layer.adapter_mut(&names[i]).unwrap();
        if let Some(m) = ad.magnitude().cloned() {
            let m = m.mapv(|v| v * rng.random_range(0.5f32..1.5));
            let (a, b) = (ad.a().clone(), ad.b().clone());
            ad.set_weights(a.view(), b.view(), Some(m.view())).unwrap();
        }
    }
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    layer.set_active(&name_refs).unwrap();
    layer.set_training(case.training);

    let x = random(&mut rng, tokens, in_f);
    let r = random(&mut rng, tokens, out_f);
    let y = layer.forward(x.view()).unwrap();
    layer.zero_grad();
    let dx = layer.backward(r.view()).unwrap();

    let mut reference = Reference {
        w: to64(&w),
        bias: bias.map(|b| b.mapv(|v| v as f64)),
        adapters: Vec::new(),
    };
    for n in &names {
        let ad = layer.adapter(n).unwrap();
        let mut ra = RefAdapter {
            a: to64(ad.a()),
            b: to64(ad.b()),
            m: ad.magnitude().map(|m| m.mapv(|v| v as f64)),
            scale: ad.options().scale(),
            mask: ad.last_dropout_mask().map(to64),
            norm: None,
        };
        if case.training && ad.options().dropout > 0.0 {
            assert!(
                ra.mask.is_some(),
                "{}: dropout must have been drawn",
                case.name
            );
        }
        if ra.m.is_some() {
            ra.norm = Some(row_norms(&reference.w, &ra));
        }
        reference.adapters.push(ra);
    }
    let mut x64 = to64(&x);
    let r64 = to64(&r);

    // The forward agrees with the reference.
    let y_ref = reference.forward(&x64);
    for (a, b) in y.iter().zip(y_ref.iter()) {
        assert!(
            (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
            "{}: y {a} vs {b}",
            case.name
        );
    }

    let num_dx = numeric_grad(&mut reference, &mut x64, &r64, Param::X);
    assert_grad_close(
        &format!("{} dX", case.name),
        dx.as_slice().unwrap(),
        &num_dx,
    );

    for (k, n) in names.iter().enumerate() {
        let ad = layer.adapter(n).unwrap();
        let num_da = numeric_grad(&mut reference, &mut x64, &r64, Param::A(k));
        assert_grad_close(
            &format!("{} {n} dA", case.name),
            ad.grad_a().as_slice().unwrap(),
            &num_da,
        );
        let num_db = numeric_grad(&mut reference, &mut x64, &r64, Param::B(k));
        assert_grad_close(
            &format!("{} {n} dB", case.name),
            ad.grad_b().as_slice().unwrap(),
            &num_db,
        );
        if let Some(gm) = ad.grad_magnitude() {
            let num_dm = numeric_grad(&mut reference, &mut x64, &r64, Param::M(k));
            assert_grad_close(
                &format!("{} {n} dm", case.name),
                gm.as_slice().unwrap(),
                &num_dm,
            );
        }
    }
}

#[test]
fn lora_backward_matches_finite_differences() {
    check(
        &Case {
            name: "lora",
            adapters: vec![options(3, 6.0, false, false, 0.0)],
            bias: false,
            training: true,
        },
        1,
    );
}

#[test]
fn rslora_backward_matches_finite_differences() {
    check(
        &Case {
            name: "rslora",
            adapters: vec![options(4, 5.0, true, false, 0.0)],
            bias: true,
            training: true,
        },
        2,
    );
}

#[test]
fn dora_backward_with_detached_norm_matches_finite_differences() {
    check(
        &Case {
            name: "dora",
            adapters: vec![options(3, 6.0, false, true, 0.0)],
            bias: true,
            training: true,
        },
        3,
    );
}

#[test]
fn dropout_backward_uses_the_forward_mask() {
    for (name, dora) in [("lora+dropout", false), ("dora+dropout", true)] {
        check(
            &Case {
                name,
                adapters: vec![options(3, 6.0, false, dora, 0.3)],
                bias: false,
                training: true,
            },
            4,
        );
    }
}

#[test]
fn two_active_adapters_add_their_contributions_and_gradients() {
    check(
        &Case {
            name: "lora+dora",
            adapters: vec![
                options(2, 4.0, false, false, 0.0),
                options(3, 3.0, true, true, 0.0),
            ],
            bias: true,
            training: true,
        },
        5,
    );
}

#[test]
fn eval_mode_draws_no_dropout() {
    check(
        &Case {
            name: "eval",
            adapters: vec![options(3, 6.0, false, false, 0.5)],
            bias: false,
            training: false,
        },
        6,
    );
}

#[test]
fn gradients_accumulate_until_zero_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut layer = LoraLinear::dense(random(&mut rng, 4, 5), None, "acc").unwrap();
    layer
        .add_adapter("a", &options(2, 2.0, false, true, 0.0), 1)
        .unwrap();
    let x = random(&mut rng, 3, 5);
    let dy = random(&mut rng, 3, 4);
    layer.forward(x.view()).unwrap();
    layer.backward(dy.view()).unwrap();
    let once = layer.adapter("a").unwrap().grad_b().clone();
    let once_m = layer
        .adapter("a")
        .unwrap()
        .grad_magnitude()
        .unwrap()
        .clone();
    layer.backward(dy.view()).unwrap();
    let ad = layer.adapter("a").unwrap();
    for (t, o) in ad.grad_b().iter().zip(once.iter()) {
        assert!((t - 2.0 * o).abs() <= 1e-6 * (1.0 + o.abs()));
    }
    for (t, o) in ad.grad_magnitude().unwrap().iter().zip(once_m.iter()) {
        assert!((t - 2.0 * o).abs() <= 1e-6 * (1.0 + o.abs()));
    }
    layer.zero_grad();
    let ad = layer.adapter("a").unwrap();
    assert!(ad
        .grad_a()
        .iter()
        .chain(ad.grad_b().iter())
        .all(|&g| g == 0.0));
    assert!(ad.grad_magnitude().unwrap().iter().all(|&g| g == 0.0));
}
