//! LSQ (Esser et al. 2019) against the PyTorch reference in `tests/data/lsq.safetensors`
//! (a copy of `/work/shared/golden/lsq.safetensors`): for bits 2, 3, 4, 8, a vector `v`
//! of 300 values, a step `s`, an upstream gradient, and PyTorch's `v̂`, `∂L/∂v`, `∂L/∂s`.

use ndarray::{Array2, Axis};
use quant_core::quantizer::DifferentiableQuantizer;
use quant_core::ste::{lsq, Ste};
use quant_core::uniform::{Granularity, UniformQuantizer};
use safetensors::{Dtype, SafeTensors};

const TOLERANCE: f32 = 1e-5;

fn golden_bytes() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lsq.safetensors");
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn tensor(file: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Case {
    bits: u32,
    v: Vec<f32>,
    s: f32,
    grad_out: Vec<f32>,
    vhat: Vec<f32>,
    grad_v: Vec<f32>,
    grad_s: f32,
}

fn cases() -> Vec<Case> {
    let bytes = golden_bytes();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    [2u32, 3, 4, 8]
        .into_iter()
        .map(|bits| {
            let t = |name: &str| tensor(&file, &format!("b{bits}_{name}"));
            Case {
                bits,
                v: t("v"),
                s: t("s")[0],
                grad_out: t("grad_out"),
                vhat: t("vhat"),
                grad_v: t("grad_v"),
                grad_s: t("grad_s")[0],
            }
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= TOLERANCE,
            "{what}[{i}]: got {g}, PyTorch {e}"
        );
    }
}

#[test]
fn reference_function_matches_pytorch() {
    for case in cases() {
        let r = lsq(&case.v, &case.grad_out, case.s, case.bits).unwrap();
        let b = case.bits;
        assert_close(&format!("b{b} vhat"), &r.dequantized, &case.vhat);
        assert_close(&format!("b{b} grad_v"), &r.grad_input, &case.grad_v);
        assert_close(&format!("b{b} grad_s"), &[r.grad_step], &[case.grad_s]);
    }
}

#[test]
fn per_tensor_quantizer_matches_pytorch() {
    for case in cases() {
        let n = case.v.len();
        let mut q =
            UniformQuantizer::new(case.bits, true, Granularity::PerTensor, Ste::Lsq).unwrap();
        q.set_params((1, n), vec![case.s], vec![0.0]).unwrap();
        let w = Array2::from_shape_vec((1, n), case.v.clone()).unwrap();
        let out = q.forward(w.view()).unwrap();
        let g = Array2::from_shape_vec((1, n), case.grad_out.clone()).unwrap();
        let grads = q.backward(g.view()).unwrap();
        let b = case.bits;
        assert_close(
            &format!("b{b} vhat"),
            out.dequantized.as_slice().unwrap(),
            &case.vhat,
        );
        assert_close(
            &format!("b{b} grad_v"),
            grads.input.as_slice().unwrap(),
            &case.grad_v,
        );
        assert_close(&format!("b{b} grad_s"), &grads.params, &[case.grad_s]);
    }
}

/// Per-channel steps: row 0 is the reference vector with step `s`, row 1 is `2v` with step
/// `2s`. Doubling is exact in binary floating point, so `v/s` is bit-identical in both rows:
/// row 1 must give `2·v̂`, the same `∂L/∂v` and the same `∂L/∂s` (each row is its own group
/// of `n` values, so the gradient scale `1/√(n·Qp)` is unchanged).
#[test]
fn per_channel_quantizer_matches_pytorch_row_by_row() {
    for case in cases() {
        let n = case.v.len();
        let mut w = Array2::from_shape_vec((1, n), case.v.clone()).unwrap();
        let doubled = w.mapv(|x| 2.0 * x);
        w.append(Axis(0), doubled.view()).unwrap();
        let row = Array2::from_shape_vec((1, n), case.grad_out.clone()).unwrap();
        let mut g = row.clone();
        g.append(Axis(0), row.view()).unwrap();

        let mut q =
            UniformQuantizer::new(case.bits, true, Granularity::PerChannel, Ste::Lsq).unwrap();
        q.set_params((2, n), vec![case.s, 2.0 * case.s], vec![0.0, 0.0])
            .unwrap();
        let out = q.forward(w.view()).unwrap();
        let grads = q.backward(g.view()).unwrap();
        let b = case.bits;
        let doubled_vhat: Vec<f32> = case.vhat.iter().map(|x| 2.0 * x).collect();
        assert_close(
            &format!("b{b} row0 vhat"),
            &out.dequantized.row(0).to_vec(),
            &case.vhat,
        );
        assert_close(
            &format!("b{b} row1 vhat"),
            &out.dequantized.row(1).to_vec(),
            &doubled_vhat,
        );
        for r in 0..2 {
            assert_close(
                &format!("b{b} row{r} grad_v"),
                &grads.input.row(r).to_vec(),
                &case.grad_v,
            );
            assert_close(
                &format!("b{b} row{r} grad_s"),
                &grads.params[r..=r],
                &[case.grad_s],
            );
        }
    }
}

/// What the reference file covers: every case has interior values, only the 2-bit case has
/// values above `Qp`, and no case has values below `−Qn`. The lower clamp (`∂v̂/∂s = −Qn`)
/// is therefore checked by hand-made cases and finite differences in `ste_lsq_finite_diff.rs`.
#[test]
fn the_golden_cases_cover_the_interior_and_the_upper_clamp() {
    for case in cases() {
        let qn = (1u32 << (case.bits - 1)) as f32;
        let qp = qn - 1.0;
        let x: Vec<f32> = case.v.iter().map(|v| v / case.s).collect();
        assert!(
            x.iter().any(|&x| x > -qn && x < qp),
            "b{} interior",
            case.bits
        );
        let above = x.iter().filter(|&&x| x > qp).count();
        assert_eq!(above > 0, case.bits == 2, "b{} upper clamp", case.bits);
    }
}
