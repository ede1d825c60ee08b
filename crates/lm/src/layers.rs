//! The elementwise pieces of the decoder layer, each with an explicit forward and backward:
//! RMSNorm (with the weight as stored or, for Gemma, as `1 + w`) and the gated MLP (SwiGLU,
//! GeGLU with tanh GELU: one gated product, monomorphised per activation). Rotary embeddings
//! are in [`crate::rope`], attention in [`crate::attention`] (re-exported here under their
//! old paths).
//!
//! Activations are row-major `(tokens, features)` matrices with `tokens = batch·seq` (row
//! `b·seq + t`); heads are contiguous column blocks of `head_dim`, so a head of a batch row is
//! a strided view and every product goes to `quant_core::linalg::gemm` without copies.

use std::borrow::Cow;

use ndarray::{Array1, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rayon::prelude::*;

pub use crate::attention::{attention_backward, attention_forward, AttentionShape};
use crate::error::{LmError, Result};
use crate::family::{Activation, NormKind};
pub use crate::rope::RopeTable;
use crate::vmath::RowKernel;

/// The weight an RMSNorm multiplies by: `w`, or `1 + w` for Gemma's norms. The gradient of
/// either with respect to `w` is the gradient with respect to the effective weight.
///
/// ```
/// use lm::family::NormKind;
/// let w = ndarray::array![0.5f32, -0.25];
/// assert_eq!(lm::layers::effective_norm_weight(NormKind::OnePlusWeight, w.view()).to_vec(), vec![1.5, 0.75]);
/// ```
pub fn effective_norm_weight(kind: NormKind, weight: ArrayView1<'_, f32>) -> Cow<'_, [f32]> {
    match kind {
        NormKind::Weight => match weight.to_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(weight.to_vec()),
        },
        NormKind::OnePlusWeight => Cow::Owned(weight.iter().map(|w| 1.0 + w).collect()),
    }
}

/// The effective weight as an owned vector view helper for the norm functions.
pub(crate) fn norm_weight_array(kind: NormKind, weight: ArrayView1<'_, f32>) -> Array1<f32> {
    Array1::from(effective_norm_weight(kind, weight).into_owned())
}

/// `y = x·rsqrt(mean(x²) + eps)·w` per row, in `f32` as transformers' `LlamaRMSNorm`;
/// writes the per-row `rsqrt(mean(x²) + eps)` into `rstd` for the backward pass.
///
/// ```
/// use lm::layers::rms_norm_forward;
/// use ndarray::{array, Array2};
/// let x = array![[3.0f32, 4.0]];
/// let mut y = Array2::zeros((1, 2));
/// let mut rstd = [0.0f32];
/// rms_norm_forward(x.view(), array![1.0f32, 2.0].view(), 0.0, y.view_mut(), &mut rstd).unwrap();
/// let r = 1.0 / 12.5f32.sqrt();
/// assert!((y[[0, 1]] - 8.0 * r).abs() < 1e-6);
/// ```
pub fn rms_norm_forward(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    eps: f32,
    mut out: ArrayViewMut2<'_, f32>,
    rstd: &mut [f32],
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::RmsNorm);
    let (rows, dim) = x.dim();
    if weight.len() != dim || out.dim() != (rows, dim) || rstd.len() != rows {
        return Err(LmError::shape(
            "rms_norm_forward (x, weight, out, rstd)",
            format!("x {rows}×{dim}, weight {dim}, out {rows}×{dim}, rstd {rows}"),
            format!(
                "weight {}, out {}×{}, rstd {}",
                weight.len(),
                out.nrows(),
                out.ncols(),
                rstd.len()
            ),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter_mut())
        .for_each(|((mut y, xr), r)| {
            let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            *r = 1.0 / (mean_sq + eps).sqrt();
            for ((yv, &xv), &wv) in y.iter_mut().zip(xr.iter()).zip(weight.iter()) {
                *yv = wv * (xv * *r);
            }
        });
    Ok(())
}

/// Recomputes [`rms_norm_forward`]'s output from its input and saved `rstd` (bit-identical),
/// so a backward pass need not keep the normalised activations.
///
/// ```
/// use lm::layers::{rms_norm_apply, rms_norm_forward};
/// use ndarray::{array, Array2};
/// let (x, w) = (array![[1.0f32, -2.0, 0.5]], array![0.9f32, 1.1, 1.0]);
/// let (mut y, mut again) = (Array2::zeros((1, 3)), Array2::zeros((1, 3)));
/// let mut rstd = [0.0f32];
/// rms_norm_forward(x.view(), w.view(), 1e-6, y.view_mut(), &mut rstd).unwrap();
/// rms_norm_apply(x.view(), w.view(), &rstd, again.view_mut()).unwrap();
/// assert_eq!(y, again);
/// ```
pub fn rms_norm_apply(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    rstd: &[f32],
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::RmsNorm);
    let (rows, dim) = x.dim();
    if weight.len() != dim || out.dim() != (rows, dim) || rstd.len() != rows {
        return Err(LmError::shape(
            "rms_norm_apply (x, weight, rstd, out)",
            format!("x {rows}×{dim}, weight {dim}, rstd {rows}, out {rows}×{dim}"),
            format!(
                "weight {}, rstd {}, out {}×{}",
                weight.len(),
                rstd.len(),
                out.nrows(),
                out.ncols()
            ),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter())
        .for_each(|((mut y, xr), &r)| {
            for ((yv, &xv), &wv) in y.iter_mut().zip(xr.iter()).zip(weight.iter()) {
                *yv = wv * (xv * r);
            }
        });
    Ok(())
}

/// Backward of [`rms_norm_forward`]: **adds** `∂L/∂x` into `grad_input` (the residual stream's
/// gradient is already there) and adds `∂L/∂w` into `grad_weight` when given.
///
/// With `g = dy⊙w` and `r = rstd`: `dx = r·g − x·r³·mean(g⊙x)`, `dw = Σ_rows dy⊙x·r`.
pub fn rms_norm_backward(
    x: ArrayView2<'_, f32>,
    weight: ArrayView1<'_, f32>,
    rstd: &[f32],
    grad_output: ArrayView2<'_, f32>,
    mut grad_input: ArrayViewMut2<'_, f32>,
    grad_weight: Option<ArrayViewMut1<'_, f32>>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::RmsNorm);
    let (rows, dim) = x.dim();
    if weight.len() != dim
        || rstd.len() != rows
        || grad_output.dim() != (rows, dim)
        || grad_input.dim() != (rows, dim)
    {
        return Err(LmError::shape(
            "rms_norm_backward (x, weight, rstd, grad_output, grad_input)",
            format!("x {rows}×{dim}, weight {dim}, rstd {rows}, grads {rows}×{dim}"),
            format!(
                "weight {}, rstd {}, grad_output {:?}, grad_input {:?}",
                weight.len(),
                rstd.len(),
                grad_output.dim(),
                grad_input.dim()
            ),
        ));
    }
    grad_input
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(x.axis_iter(Axis(0)).into_par_iter())
        .zip(grad_output.axis_iter(Axis(0)).into_par_iter())
        .zip(rstd.par_iter())
        .for_each(|(((mut dx, xr), dy), &r)| {
            let dot: f32 = dy
                .iter()
                .zip(weight.iter())
                .zip(xr.iter())
                .map(|((d, w), xv)| d * w * xv)
                .sum();
            let coef = r * r * r * dot / dim as f32;
            for (((dxv, &dyv), &wv), &xv) in dx
                .iter_mut()
                .zip(dy.iter())
                .zip(weight.iter())
                .zip(xr.iter())
            {
                *dxv += r * dyv * wv - coef * xv;
            }
        });
    if let Some(mut gw) = grad_weight {
        if gw.len() != dim {
            return Err(LmError::shape(
                "rms_norm_backward grad_weight",
                dim,
                gw.len(),
            ));
        }
        // Sequential over rows: a column sum shared by all rows cannot be split without a reduction.
        for ((xr, dy), &r) in x
            .axis_iter(Axis(0))
            .zip(grad_output.axis_iter(Axis(0)))
            .zip(rstd)
        {
            for ((g, &xv), &dyv) in gw.iter_mut().zip(xr.iter()).zip(dy.iter()) {
                *g += dyv * xv * r;
            }
        }
    }
    Ok(())
}

/// `√(2/π)`, the tanh-GELU constant.
const GELU_C: f32 = 0.797_884_6;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (PyTorch's `gelu(approximate="tanh")`).
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
}

/// The derivative of [`gelu_tanh`].
fn gelu_tanh_grad(x: f32) -> f32 {
    let t = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
}

/// `silu(x) = x·σ(x)`.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The derivative of [`silu`]: `σ(x)·(1 + x·(1 − σ(x)))`.
fn silu_grad(x: f32) -> f32 {
    let sig = 1.0 / (1.0 + (-x).exp());
    sig * (1.0 + x * (1.0 - sig))
}

/// `out = act(gate)⊙up` for `gate_up: (rows, 2·intermediate)` holding `gate | up`; `act` is
/// SiLU (SwiGLU: Llama, Qwen, Mistral, Phi-3) or tanh GELU (GeGLU: Gemma).
///
/// ```
/// use lm::family::Activation;
/// use ndarray::{array, Array2};
/// let gate_up = array![[1.0f32, 2.0]];
/// let mut out = Array2::zeros((1, 1));
/// lm::layers::gated_forward(Activation::GeluTanh, gate_up.view(), out.view_mut()).unwrap();
/// assert!((out[[0, 0]] - 2.0 * 0.841192).abs() < 1e-5);
/// // SwiGLU: gate [0, 2], up [5, 3].
/// let gate_up = array![[0.0f32, 2.0, 5.0, 3.0]];
/// let mut out = Array2::zeros((1, 2));
/// lm::layers::gated_forward(Activation::Silu, gate_up.view(), out.view_mut()).unwrap();
/// assert_eq!(out[[0, 0]], 0.0);
/// assert!((out[[0, 1]] - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
/// ```
pub fn gated_forward(
    activation: Activation,
    gate_up: ArrayView2<'_, f32>,
    out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::GatedActivation);
    match activation {
        Activation::Silu => silu_rows_forward(RowKernel::detect(), gate_up, out),
        Activation::GeluTanh => gated_rows_forward(gelu_tanh, gate_up, out),
    }
}

/// Backward of [`gated_forward`]: writes `∂L/∂gate | ∂L/∂up` into `grad_gate_up`:
/// `d up = d out·act(g)`, `d gate = d out·u·act′(g)`.
pub fn gated_backward(
    activation: Activation,
    gate_up: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    grad_gate_up: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let _timer = crate::profile::scope(crate::profile::Op::GatedActivation);
    match activation {
        Activation::Silu => {
            silu_rows_backward(RowKernel::detect(), gate_up, grad_out, grad_gate_up)
        }
        Activation::GeluTanh => {
            gated_rows_backward(gelu_tanh, gelu_tanh_grad, gate_up, grad_out, grad_gate_up)
        }
    }
}

/// SwiGLU forward on `kernel` ([`RowKernel`]: one vectorised `σ` per element); rows that are
/// not contiguous take the scalar path.
fn silu_rows_forward(
    kernel: RowKernel,
    gate_up: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let inter = out.ncols();
    let contiguous = gate_up.row(0).as_slice().is_some() && out.row(0).as_slice().is_some();
    if gate_up.dim() != (out.nrows(), 2 * inter) || out.nrows() == 0 || !contiguous {
        return gated_rows_forward(silu, gate_up, out);
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .for_each(|(mut o, gu)| {
            let (gu, o) = (
                gu.to_slice().unwrap_or_default(),
                o.as_slice_mut().unwrap_or_default(),
            );
            let (g, u) = gu.split_at(inter);
            kernel.silu_gate(g, u, o);
        });
    Ok(())
}

/// SwiGLU backward on `kernel`, as [`silu_rows_forward`].
fn silu_rows_backward(
    kernel: RowKernel,
    gate_up: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    mut grad_gate_up: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let inter = grad_out.ncols();
    let shapes_ok = gate_up.dim() == (grad_out.nrows(), 2 * inter)
        && grad_gate_up.dim() == gate_up.dim()
        && grad_out.nrows() > 0;
    if !shapes_ok
        || gate_up.row(0).as_slice().is_none()
        || grad_out.row(0).as_slice().is_none()
        || grad_gate_up.row(0).as_slice().is_none()
    {
        return gated_rows_backward(silu, silu_grad, gate_up, grad_out, grad_gate_up);
    }
    grad_gate_up
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .zip(grad_out.axis_iter(Axis(0)).into_par_iter())
        .for_each(|((mut dgu, gu), d_o)| {
            let gu = gu.to_slice().unwrap_or_default();
            let d_o = d_o.to_slice().unwrap_or_default();
            let (g, u) = gu.split_at(inter);
            let (dg, du) = dgu.as_slice_mut().unwrap_or_default().split_at_mut(inter);
            kernel.silu_gate_backward(g, u, d_o, dg, du);
        });
    Ok(())
}

/// The gated product row by row in parallel, monomorphised per activation.
fn gated_rows_forward(
    act: impl Fn(f32) -> f32 + Sync,
    gate_up: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let inter = out.ncols();
    if gate_up.dim() != (out.nrows(), 2 * inter) {
        return Err(LmError::shape(
            "gated MLP gate|up vs output",
            format!("{}×{}", out.nrows(), 2 * inter),
            format!("{}×{}", gate_up.nrows(), gate_up.ncols()),
        ));
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .for_each(|(mut o, gu)| {
            let (g, u) = gu.split_at(Axis(0), inter);
            for ((ov, &gv), &uv) in o.iter_mut().zip(g.iter()).zip(u.iter()) {
                *ov = act(gv) * uv;
            }
        });
    Ok(())
}

fn gated_rows_backward(
    act: impl Fn(f32) -> f32 + Sync,
    act_grad: impl Fn(f32) -> f32 + Sync,
    gate_up: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    mut grad_gate_up: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let inter = grad_out.ncols();
    if gate_up.dim() != (grad_out.nrows(), 2 * inter) || grad_gate_up.dim() != gate_up.dim() {
        return Err(LmError::shape(
            "gated MLP backward gate|up, grad_out, grad_gate_up",
            format!("{}×{}", grad_out.nrows(), 2 * inter),
            format!("{:?}, {:?}", gate_up.dim(), grad_gate_up.dim()),
        ));
    }
    grad_gate_up
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(gate_up.axis_iter(Axis(0)).into_par_iter())
        .zip(grad_out.axis_iter(Axis(0)).into_par_iter())
        .for_each(|((dgu, gu), d_o)| {
            let (g, u) = gu.split_at(Axis(0), inter);
            let (mut dg, mut du) = dgu.split_at(Axis(0), inter);
            for i in 0..inter {
                du[i] = d_o[i] * act(g[i]);
                dg[i] = d_o[i] * u[i] * act_grad(g[i]);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Central finite differences of `L = Σ out ⊙ R` (R fixed random) against each backward.
    //! Sums are taken in f64; the tolerances catch a wrong sign or factor, not rounding.

    use super::*;
    use ndarray::{Array1, Array2};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const EPS: f32 = 1e-2;

    fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
    }

    fn weighted_sum(out: &Array2<f32>, weights: &Array2<f32>) -> f64 {
        out.iter()
            .zip(weights)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    /// Compares `analytic` with central differences of `loss` over every element of `input`.
    fn check(
        what: &str,
        input: &mut Array2<f32>,
        analytic: &Array2<f32>,
        loss: impl Fn(&Array2<f32>) -> f64,
    ) {
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
    fn vectorised_swiglu_matches_the_scalar_path_on_every_kernel() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (rows, inter) = (5, 37);
        let gate_up = random(&mut rng, rows, 2 * inter).mapv(|v| 8.0 * v);
        let grad_out = random(&mut rng, rows, inter);
        let mut scalar = Array2::zeros((rows, inter));
        gated_rows_forward(silu, gate_up.view(), scalar.view_mut()).unwrap();
        let mut scalar_grad = Array2::zeros((rows, 2 * inter));
        gated_rows_backward(
            silu,
            silu_grad,
            gate_up.view(),
            grad_out.view(),
            scalar_grad.view_mut(),
        )
        .unwrap();
        let close = |a: &Array2<f32>, b: &Array2<f32>| {
            a.iter()
                .zip(b)
                .all(|(&x, &y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
        };
        let mut results = Vec::new();
        for kernel in RowKernel::available() {
            let mut out = Array2::zeros((rows, inter));
            silu_rows_forward(kernel, gate_up.view(), out.view_mut()).unwrap();
            let mut grad = Array2::zeros((rows, 2 * inter));
            silu_rows_backward(kernel, gate_up.view(), grad_out.view(), grad.view_mut()).unwrap();
            assert!(
                close(&out, &scalar) && close(&grad, &scalar_grad),
                "{kernel:?}"
            );
            results.push((out, grad));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut x = random(&mut rng, 4, 6);
        let weight = Array1::from_shape_fn(6, |_| rng.random_range(0.5f32..1.5));
        let r = random(&mut rng, 4, 6);
        let forward = |x: &Array2<f32>, w: &Array1<f32>| {
            let mut y = Array2::zeros((4, 6));
            let mut rstd = vec![0.0; 4];
            rms_norm_forward(x.view(), w.view(), 1e-5, y.view_mut(), &mut rstd).unwrap();
            (y, rstd)
        };
        let (_, rstd) = forward(&x, &weight);
        let mut dx = Array2::zeros((4, 6));
        let mut dw = Array1::zeros(6);
        rms_norm_backward(
            x.view(),
            weight.view(),
            &rstd,
            r.view(),
            dx.view_mut(),
            Some(dw.view_mut()),
        )
        .unwrap();
        check("rmsnorm dx", &mut x, &dx, |x| {
            weighted_sum(&forward(x, &weight).0, &r)
        });
        let mut w2 = weight.clone().insert_axis(Axis(0));
        let dw2 = dw.insert_axis(Axis(0));
        check("rmsnorm dw", &mut w2, &dw2, |w| {
            weighted_sum(&forward(&x, &w.row(0).to_owned()).0, &r)
        });
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let table = RopeTable::new(10000.0, 8, 3, 6).unwrap();
        let positions = [3, 5, 8, 4];
        let mut x = random(&mut rng, 4, 16);
        let r = random(&mut rng, 4, 16);
        let forward = |x: &Array2<f32>| {
            let mut y = x.clone();
            table.apply(y.view_mut(), &positions, 2, false).unwrap();
            y
        };
        let mut dx = r.clone();
        table.apply(dx.view_mut(), &positions, 2, true).unwrap();
        check("rope dx", &mut x, &dx, |x| weighted_sum(&forward(x), &r));
        // Rotation preserves each pair's norm; an unrotated position 0 is the identity.
        let y = forward(&x);
        let norm = |a: &Array2<f32>| a.iter().map(|v| v * v).sum::<f32>();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4);
    }

    #[test]
    fn geglu_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let mut gate_up = random(&mut rng, 3, 10).mapv(|v| 3.0 * v);
        let r = random(&mut rng, 3, 5);
        let forward = |gu: &Array2<f32>| {
            let mut out = Array2::zeros((3, 5));
            gated_forward(Activation::GeluTanh, gu.view(), out.view_mut()).unwrap();
            out
        };
        let mut grad = Array2::zeros((3, 10));
        gated_backward(
            Activation::GeluTanh,
            gate_up.view(),
            r.view(),
            grad.view_mut(),
        )
        .unwrap();
        check("geglu d(gate|up)", &mut gate_up, &grad, |gu| {
            weighted_sum(&forward(gu), &r)
        });
    }

    #[test]
    fn one_plus_weight_norm_backward_matches_finite_differences() {
        // Gemma's x̂·(1 + w): the stored weight's gradient through the effective weight.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = random(&mut rng, 3, 5);
        let mut w = random(&mut rng, 1, 5);
        let r = random(&mut rng, 3, 5);
        let forward = |w: &Array2<f32>| {
            let eff = norm_weight_array(NormKind::OnePlusWeight, w.row(0));
            let mut y = Array2::zeros((3, 5));
            let mut rstd = vec![0.0; 3];
            rms_norm_forward(x.view(), eff.view(), 1e-6, y.view_mut(), &mut rstd).unwrap();
            (y, rstd)
        };
        let (_, rstd) = forward(&w);
        let eff = norm_weight_array(NormKind::OnePlusWeight, w.row(0));
        let mut dx = Array2::zeros((3, 5));
        let mut dw = Array1::zeros(5);
        rms_norm_backward(
            x.view(),
            eff.view(),
            &rstd,
            r.view(),
            dx.view_mut(),
            Some(dw.view_mut()),
        )
        .unwrap();
        let dw = dw.insert_axis(Axis(0));
        check("(1+w) norm dw", &mut w, &dw, |w| {
            weighted_sum(&forward(w).0, &r)
        });
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut gate_up = random(&mut rng, 3, 10).mapv(|v| 3.0 * v);
        let r = random(&mut rng, 3, 5);
        let forward = |gu: &Array2<f32>| {
            let mut out = Array2::zeros((3, 5));
            gated_forward(Activation::Silu, gu.view(), out.view_mut()).unwrap();
            out
        };
        let mut grad = Array2::zeros((3, 10));
        gated_backward(Activation::Silu, gate_up.view(), r.view(), grad.view_mut()).unwrap();
        check("swiglu d(gate|up)", &mut gate_up, &grad, |gu| {
            weighted_sum(&forward(gu), &r)
        });
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let x = Array2::<f32>::zeros((2, 4));
        let mut y = Array2::<f32>::zeros((2, 4));
        let e = rms_norm_forward(
            x.view(),
            Array1::zeros(3).view(),
            1e-6,
            y.view_mut(),
            &mut [0.0; 2],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rms_norm_forward"), "{e}");
        let e = RopeTable::new(1e4, 5, 0, 2).unwrap_err();
        assert!(e.to_string().contains("head_dim"), "{e}");
        let table = RopeTable::new(1e4, 4, 0, 2).unwrap();
        let e = table.apply(y.view_mut(), &[0, 2], 1, false).unwrap_err();
        assert!(e.to_string().contains("position = 2"), "{e}");
    }
}
