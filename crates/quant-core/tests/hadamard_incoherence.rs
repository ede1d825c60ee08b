//! The incoherence wrapper: forward rotates, quantizes and rotates back; backward is the exact
//! transpose chain. Checked against explicitly materialised rotation matrices and against
//! finite differences through a smooth inner map.

use ndarray::{Array2, ArrayView2};
use proptest::prelude::*;
use quant_core::error::{QuantError, Result};
use quant_core::hadamard::HadamardRotation;
use quant_core::incoherence::IncoherentQuantizer;
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod, QuantizerGrads, QuantizerOutput};
use quant_core::rounding::{quantize_scalar, round_half_even};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Test double: per-tensor symmetric uniform quantizer on `q ∈ [−2^(b−1), 2^(b−1) − 1]` with
/// one learnable step `s`, the standard straight-through estimator (gradient passes where
/// `w/s` is inside the grid, zero where clamped) and the LSQ step gradient
/// `∂ŵ/∂s = q − w/s` inside, `q` (the clamp level) outside — without LSQ's gradient scale.
#[derive(Debug, Clone)]
struct StepQuantizer {
    bits: u32,
    step: [f32; 1],
    last_input: Option<Array2<f32>>,
}

impl StepQuantizer {
    fn new(bits: u32, step: f32) -> Self {
        Self {
            bits,
            step: [step],
            last_input: None,
        }
    }
    fn range(&self) -> (f32, f32) {
        let half = (1i32 << (self.bits - 1)) as f32;
        (-half, half - 1.0)
    }
}

impl DifferentiableQuantizer for StepQuantizer {
    fn bits(&self) -> u32 {
        self.bits
    }
    fn init_from_weights(&mut self, w: ArrayView2<'_, f32>, _method: InitMethod) -> Result<()> {
        // Test double: every method uses absmax.
        let absmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        self.step[0] = if absmax > 0.0 {
            absmax / self.range().1
        } else {
            1.0
        };
        Ok(())
    }
    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        let (qmin, qmax) = self.range();
        let s = self.step[0];
        let q = w.mapv(|v| quantize_scalar(v, s, 0.0, qmin, qmax));
        self.last_input = Some(w.to_owned());
        Ok(QuantizerOutput {
            codes: q.mapv(|v| (v - qmin) as u8),
            dequantized: q.mapv(|v| v * s),
        })
    }
    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let w = self
            .last_input
            .as_ref()
            .ok_or_else(|| QuantError::invalid("backward", "before forward", "test double"))?;
        let (qmin, qmax) = self.range();
        let s = self.step[0];
        let mut input = Array2::zeros(w.dim());
        let mut step_grad = 0.0f32;
        for ((g_in, &g), &v) in input.iter_mut().zip(grad_output.iter()).zip(w.iter()) {
            let scaled = v / s;
            if scaled < qmin {
                step_grad += g * qmin;
            } else if scaled > qmax {
                step_grad += g * qmax;
            } else {
                *g_in = g;
                step_grad += g * (round_half_even(scaled) - scaled);
            }
        }
        Ok(QuantizerGrads {
            input,
            params: vec![step_grad],
        })
    }
    fn params(&self) -> &[f32] {
        &self.step
    }
    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.step
    }
}

/// Test double: the smooth elementwise map `ŵ = w + θ·w³` with exact gradients, so finite
/// differences of the whole wrapper can be checked.
#[derive(Debug, Clone)]
struct CubicMap {
    theta: [f32; 1],
    last_input: Option<Array2<f32>>,
}

impl DifferentiableQuantizer for CubicMap {
    fn bits(&self) -> u32 {
        8
    }
    fn init_from_weights(&mut self, _w: ArrayView2<'_, f32>, _method: InitMethod) -> Result<()> {
        Ok(())
    }
    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        let t = self.theta[0];
        self.last_input = Some(w.to_owned());
        Ok(QuantizerOutput {
            codes: Array2::zeros(w.dim()),
            dequantized: w.mapv(|v| v + t * v * v * v),
        })
    }
    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        let w = self.last_input.as_ref().unwrap();
        let t = self.theta[0];
        let input = ndarray::Zip::from(grad_output)
            .and(w)
            .map_collect(|&g, &v| g * (1.0 + 3.0 * t * v * v));
        let theta_grad = grad_output
            .iter()
            .zip(w.iter())
            .map(|(&g, &v)| g * v * v * v)
            .sum();
        Ok(QuantizerGrads {
            input,
            params: vec![theta_grad],
        })
    }
    fn params(&self) -> &[f32] {
        &self.theta
    }
    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.theta
    }
}

/// Test double: returns its input unchanged (an infinitely fine grid).
#[derive(Debug, Clone)]
struct PassThrough;

impl DifferentiableQuantizer for PassThrough {
    fn bits(&self) -> u32 {
        8
    }
    fn init_from_weights(&mut self, _w: ArrayView2<'_, f32>, _method: InitMethod) -> Result<()> {
        Ok(())
    }
    fn forward(&mut self, w: ArrayView2<'_, f32>) -> Result<QuantizerOutput> {
        Ok(QuantizerOutput {
            codes: Array2::zeros(w.dim()),
            dequantized: w.to_owned(),
        })
    }
    fn backward(&mut self, grad_output: ArrayView2<'_, f32>) -> Result<QuantizerGrads> {
        Ok(QuantizerGrads {
            input: grad_output.to_owned(),
            params: Vec::new(),
        })
    }
    fn params(&self) -> &[f32] {
        &[]
    }
    fn params_mut(&mut self) -> &mut [f32] {
        &mut []
    }
}

fn gaussian_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    Array2::from_shape_fn((rows, cols), |_| normal.sample(&mut rng))
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fine_inner_quantizer_gives_back_the_weights() {
    let w = gaussian_matrix(12, 20, 1);
    let mut wrapper =
        IncoherentQuantizer::with_seed(Box::new(StepQuantizer::new(8, 1.0)), 20, Some(12), 3)
            .unwrap();
    wrapper
        .init_from_weights(w.view(), InitMethod::Absmax)
        .unwrap();
    let step = wrapper.params()[0];
    let out = wrapper.forward(w.view()).unwrap();
    // Each rotated weight moves by ≤ step/2, so the error has Frobenius norm
    // ≤ step/2·√(out·in) in the rotated basis, and rotating back keeps that norm.
    let error = (&out.dequantized - &w)
        .iter()
        .map(|d| d * d)
        .sum::<f32>()
        .sqrt();
    assert!(
        error <= 0.5 * step * (240f32).sqrt() + 1e-5,
        "{error} vs step {step}"
    );
    assert!(
        max_abs_diff(&out.dequantized, &w) < 0.05,
        "8-bit round trip"
    );
}

#[test]
fn init_sees_the_rotated_weights() {
    let mut w = gaussian_matrix(8, 24, 2);
    w.column_mut(3).mapv_inplace(|v| v * 40.0);
    let mut wrapper =
        IncoherentQuantizer::with_seed(Box::new(StepQuantizer::new(4, 1.0)), 24, None, 5).unwrap();
    wrapper
        .init_from_weights(w.view(), InitMethod::Absmax)
        .unwrap();
    let rotated = wrapper.rotate_weight(w.view()).unwrap();
    let absmax = rotated.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!((wrapper.params()[0] - absmax / 7.0).abs() < 1e-6);
    assert_eq!(wrapper.bits(), 4);
    wrapper.params_mut()[0] = 0.125;
    assert_eq!(wrapper.inner().params(), &[0.125]);
}

/// Forward and backward against the chain written out with explicit `Q` and `R` matrices.
#[test]
fn forward_and_backward_match_explicit_rotation_matrices() {
    for &(out_features, in_features, with_output) in
        &[(5usize, 6usize, true), (4, 8, true), (3, 7, false)]
    {
        let seed = (out_features * 100 + in_features) as u64;
        let w = gaussian_matrix(out_features, in_features, seed);
        let g = gaussian_matrix(out_features, in_features, seed + 1);
        let out_dim = with_output.then_some(out_features);
        let mut wrapper = IncoherentQuantizer::with_seed(
            Box::new(StepQuantizer::new(3, 0.4)),
            in_features,
            out_dim,
            seed,
        )
        .unwrap();
        let r = wrapper.input_rotation().to_matrix();
        let q = match wrapper.output_rotation() {
            Some(rotation) => rotation.to_matrix(),
            None => Array2::eye(out_features),
        };

        let mut reference = StepQuantizer::new(3, 0.4);
        let w_rot = q.dot(&w).dot(&r.t());
        let expected_out = reference.forward(w_rot.view()).unwrap();
        let expected_deq = q.t().dot(&expected_out.dequantized).dot(&r);
        let expected_grads = reference.backward(q.dot(&g).dot(&r.t()).view()).unwrap();
        let expected_input_grad = q.t().dot(&expected_grads.input).dot(&r);

        let out = wrapper.forward(w.view()).unwrap();
        // Codes can only differ where a rotated weight sits within rounding of a decision
        // threshold; with Gaussian data and these seeds none does.
        assert_eq!(out.codes, expected_out.codes);
        assert!(max_abs_diff(&out.dequantized, &expected_deq) < 1e-5);
        let grads = wrapper.backward(g.view()).unwrap();
        assert!(max_abs_diff(&grads.input, &expected_input_grad) < 1e-5);
        assert_eq!(grads.params.len(), 1);
        assert!((grads.params[0] - expected_grads.params[0]).abs() < 1e-4);
    }
}

/// `L(W, θ) = Σ G ⊙ forward(W)` through a smooth inner map: the wrapper's backward must
/// match central finite differences in every weight and in θ.
#[test]
fn backward_matches_finite_differences_through_a_smooth_inner_map() {
    let (out_features, in_features) = (3usize, 5usize);
    let w = gaussian_matrix(out_features, in_features, 21);
    let g = gaussian_matrix(out_features, in_features, 22);
    let make = |theta: f32| {
        IncoherentQuantizer::with_seed(
            Box::new(CubicMap {
                theta: [theta],
                last_input: None,
            }),
            in_features,
            Some(out_features),
            9,
        )
        .unwrap()
    };
    let loss = |w: &Array2<f32>, theta: f32| -> f64 {
        let mut q = make(theta);
        let out = q.forward(w.view()).unwrap();
        out.dequantized
            .iter()
            .zip(g.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let theta = 0.3f32;
    let mut wrapper = make(theta);
    wrapper.forward(w.view()).unwrap();
    let grads = wrapper.backward(g.view()).unwrap();

    let eps = 1e-2f32;
    for i in 0..out_features {
        for j in 0..in_features {
            let (mut plus, mut minus) = (w.clone(), w.clone());
            plus[[i, j]] += eps;
            minus[[i, j]] -= eps;
            let numeric = (loss(&plus, theta) - loss(&minus, theta)) / (2.0 * eps as f64);
            let analytic = grads.input[[i, j]] as f64;
            assert!(
                (numeric - analytic).abs() < 2e-3 * (1.0 + analytic.abs()),
                "∂L/∂W[{i},{j}]: numeric {numeric}, analytic {analytic}"
            );
        }
    }
    let numeric = (loss(&w, theta + eps) - loss(&w, theta - eps)) / (2.0 * eps as f64);
    let analytic = grads.params[0] as f64;
    assert!(
        (numeric - analytic).abs() < 2e-3 * (1.0 + analytic.abs()),
        "∂L/∂θ: numeric {numeric}, analytic {analytic}"
    );
}

#[test]
fn wrapper_reports_caller_mistakes() {
    let mut wrapper = IncoherentQuantizer::with_seed(Box::new(PassThrough), 6, Some(4), 1).unwrap();
    let g = Array2::<f32>::zeros((4, 6));
    assert!(matches!(
        wrapper.backward(g.view()),
        Err(QuantError::InvalidParameter { .. })
    ));
    let wrong = Array2::<f32>::zeros((4, 5));
    assert!(matches!(
        wrapper.forward(wrong.view()),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let wrong_rows = Array2::<f32>::zeros((3, 6));
    assert!(matches!(
        wrapper.forward(wrong_rows.view()),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let mut w = Array2::<f32>::zeros((4, 6));
    w[[2, 3]] = f32::NAN;
    let err = wrapper.forward(w.view()).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 15, .. }),
        "{err}"
    );
    wrapper.forward(Array2::zeros((4, 6)).view()).unwrap();
    assert!(matches!(
        wrapper.backward(Array2::<f32>::zeros((6, 4)).view()),
        Err(QuantError::ShapeMismatch { .. })
    ));
    assert!(IncoherentQuantizer::with_seed(Box::new(PassThrough), 0, None, 1).is_err());
}

#[test]
fn explicit_rotations_can_be_shared() {
    let r = HadamardRotation::new(10, 4).unwrap();
    let wrapper = IncoherentQuantizer::new(Box::new(PassThrough), r.clone(), None);
    assert_eq!(wrapper.input_rotation(), &r);
    assert!(wrapper.output_rotation().is_none());
    let w = gaussian_matrix(7, 10, 8);
    let rotated = wrapper.rotate_weight(w.view()).unwrap();
    assert!(max_abs_diff(&rotated, &r.rotate_input(w.view()).unwrap()) < 1e-6);
    assert!(max_abs_diff(&wrapper.unrotate_weight(rotated.view()).unwrap(), &w) < 1e-5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn pass_through_inner_makes_the_wrapper_an_identity(
        out_features in 1usize..20,
        in_features in 1usize..40,
        with_output in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let w = gaussian_matrix(out_features, in_features, seed);
        let g = gaussian_matrix(out_features, in_features, seed ^ 1);
        let mut wrapper = IncoherentQuantizer::with_seed(
            Box::new(PassThrough),
            in_features,
            with_output.then_some(out_features),
            seed,
        )
        .unwrap();
        let out = wrapper.forward(w.view()).unwrap();
        prop_assert!(max_abs_diff(&out.dequantized, &w) < 1e-5);
        let grads = wrapper.backward(g.view()).unwrap();
        prop_assert!(max_abs_diff(&grads.input, &g) < 1e-5);
        prop_assert!(grads.params.is_empty());
    }
}
