//! The ggml-block base: tiled products against the dequantized dense matrix for every ggml
//! type, and LoRA / DoRA over a `Q4_0` and a `Q4_K` base against central finite differences
//! of an independent `f64` reference (the base being its exact dequantized weight).

use lora_core::base::FrozenBase;
use lora_core::ggml_base::GgmlBase;
use lora_core::{AdapterOptions, InitLoraWeights, LoraLinear};
use ndarray::{Array1, Array2};
use quant_core::ggml::{GgmlType, ALL_TYPES};
use quant_core::linalg::gemm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
}

fn max_rel_err(got: &Array2<f32>, want: &Array2<f32>) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want.iter())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs() / scale))
}

#[test]
fn tiled_products_equal_those_of_the_dequantized_matrix_for_every_type() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // 512 columns: two K super-blocks per row; 40 rows: tiles of 16 leave a partial band.
    let (out_f, in_f, tokens) = (40, 512, 6);
    let w = random(&mut rng, out_f, in_f);
    let x = random(&mut rng, tokens, in_f);
    let dy = random(&mut rng, tokens, out_f);
    let dx0 = random(&mut rng, tokens, in_f);
    let mut worst = Vec::new();
    for ty in ALL_TYPES {
        let mut base = GgmlBase::quantize(w.view(), None, ty, "proj").unwrap();
        assert_eq!(base.storage_bytes(), ty.bytes_for(out_f * in_f).unwrap());
        let dense = base.dense_weight().unwrap().into_owned();
        let mut y_ref = Array2::zeros((tokens, out_f));
        gemm(1.0, x.view(), dense.t(), 0.0, y_ref.view_mut()).unwrap();
        let mut dx_ref = dx0.clone();
        gemm(1.0, dy.view(), dense.view(), 0.5, dx_ref.view_mut()).unwrap();
        // Tiles of 16 rows and 16 → whole-block columns (32 or 256), parallel and not;
        // and one tile covering everything.
        for (tile, parallel) in [(16, true), (16, false), (4096, true)] {
            base.set_tiling(tile, parallel).unwrap();
            let mut y = Array2::zeros((tokens, out_f));
            base.matmul_into(x.view(), y.view_mut()).unwrap();
            let mut dx = dx0.clone();
            base.matmul_transposed_into(dy.view(), 0.5, dx.view_mut())
                .unwrap();
            let (ey, edx) = (max_rel_err(&y, &y_ref), max_rel_err(&dx, &dx_ref));
            assert!(ey <= 1e-5, "{ty} tile {tile}: x·Wᵀ relative error {ey}");
            assert!(edx <= 1e-5, "{ty} tile {tile}: dy·W relative error {edx}");
            worst.push((ty, ey.max(edx)));
        }
        // The decoded weight is the quantizer's round trip of W (a sanity check of the grid).
        let err = w
            .iter()
            .zip(dense.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 0.75, "{ty}: round trip error {err}");
    }
    let (ty, e) = worst.iter().fold(
        (GgmlType::F32, 0.0f32),
        |m, &(t, e)| if e > m.1 { (t, e) } else { m },
    );
    eprintln!("largest relative product error: {e:e} ({ty})");
}

#[test]
fn bad_blocks_and_shapes_are_errors_not_panics() {
    // Rows that are not whole blocks: refused, naming llama.cpp's fallback type.
    let w = Array2::<f32>::ones((2, 576));
    let err = GgmlBase::quantize(w.view(), None, GgmlType::Q4_K, "down")
        .unwrap_err()
        .to_string();
    assert!(err.contains("576") && err.contains("q5_0"), "{err}");
    // A byte count that disagrees with the shape.
    assert!(GgmlBase::from_blocks(GgmlType::Q4_0, vec![0; 17], 1, 32, None, "p").is_err());
    // A NaN scale is found at construction, with its row and column.
    let mut blocks = vec![0u8; 2 * 18];
    blocks[18..20].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let err = GgmlBase::from_blocks(GgmlType::Q4_0, blocks, 2, 32, None, "p")
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1, column 0"), "{err}");
    // A bias of the wrong length, a product with the wrong shape.
    let w = Array2::<f32>::ones((2, 32));
    assert!(GgmlBase::quantize(w.view(), Some(Array1::zeros(3)), GgmlType::Q8_0, "p").is_err());
    let base = GgmlBase::quantize(w.view(), None, GgmlType::Q8_0, "p").unwrap();
    let mut y = Array2::zeros((1, 3));
    assert!(base
        .matmul_into(Array2::zeros((1, 32)).view(), y.view_mut())
        .is_err());
    let mut base = base;
    assert!(base.weight_mut().is_err());
    assert!(base.set_tiling(0, true).is_err());
}

/// `L = Σ y ⊙ R` of an `f64` LoRA/DoRA layer over the fixed weight `w` (DoRA's row norm
/// detached, as PEFT does: computed once at the unperturbed parameters).
struct Reference {
    w: Array2<f64>,
    a: Array2<f64>,
    b: Array2<f64>,
    m: Option<Array1<f64>>,
    norm: Option<Array1<f64>>,
    scale: f64,
}

fn matmul_t(x: &Array2<f64>, w: &Array2<f64>) -> Array2<f64> {
    let (t, k) = x.dim();
    Array2::from_shape_fn((t, w.nrows()), |(i, j)| {
        (0..k).map(|p| x[[i, p]] * w[[j, p]]).sum()
    })
}

impl Reference {
    fn row_norms(&self) -> Array1<f64> {
        let delta = self.b.dot(&self.a) * self.scale;
        let v = &self.w + &delta;
        v.rows()
            .into_iter()
            .map(|r| r.dot(&r).sqrt())
            .collect::<Array1<f64>>()
    }

    fn loss(&self, x: &Array2<f64>, r: &Array2<f64>) -> f64 {
        let base = matmul_t(x, &self.w);
        let lora = matmul_t(&matmul_t(x, &self.a), &self.b) * self.scale;
        let y = match (&self.m, &self.norm) {
            (Some(m), Some(norm)) => {
                let g = m / norm;
                (&base + &lora) * &g.insert_axis(ndarray::Axis(0))
            }
            _ => base + lora,
        };
        (y * r).sum()
    }
}

fn numeric(f: &mut dyn FnMut(usize, f64) -> f64, len: usize) -> Vec<f64> {
    let h = 1e-6;
    (0..len).map(|i| (f(i, h) - f(i, -h)) / (2.0 * h)).collect()
}

fn assert_close(what: &str, analytic: &[f32], numeric: &[f64]) {
    let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "{what}: gradient unexpectedly ~0");
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            (a as f64 - n).abs() <= 2e-4 * scale + 1e-5,
            "{what}[{i}]: analytic {a} vs finite difference {n}"
        );
    }
}

fn check_backward(ty: GgmlType, dora: bool) {
    let (tokens, in_f, out_f, r) = (3, 256, 5, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(21 + dora as u64);
    let w = random(&mut rng, out_f, in_f);
    let base = GgmlBase::quantize(w.view(), None, ty, "proj").unwrap();
    let w_deq = base.dense_weight().unwrap().mapv(f64::from);
    let mut layer = LoraLinear::new(base, "proj");
    let mut options = AdapterOptions::new(r, 4.0);
    options.init = InitLoraWeights::Random;
    options.use_dora = dora;
    layer.add_adapter("default", &options, 5).unwrap();
    {
        // B ≠ 0 and m ≠ ‖W + s·B·A‖ so every term of the gradient matters.
        let ad = layer.adapter_mut("default").unwrap();
        let a = ad.a().clone();
        let b = random(&mut rng, out_f, r) * 0.3;
        let m = ad.magnitude().map(|m| m.mapv(|v| v * 1.3));
        ad.set_weights(a.view(), b.view(), m.as_ref().map(|m| m.view()))
            .unwrap();
    }
    let x = random(&mut rng, tokens, in_f);
    let rr = random(&mut rng, tokens, out_f);
    layer.forward(x.view()).unwrap();
    layer.zero_grad();
    let dx = layer.backward(rr.view()).unwrap();
    let ad = layer.adapter("default").unwrap();
    let mut rf = Reference {
        w: w_deq,
        a: ad.a().mapv(f64::from),
        b: ad.b().mapv(f64::from),
        m: ad.magnitude().map(|m| m.mapv(f64::from)),
        norm: None,
        scale: ad.options().scale(),
    };
    if dora {
        rf.norm = Some(rf.row_norms());
    }
    let mut x64 = x.mapv(f64::from);
    let r64 = rr.mapv(f64::from);
    let name = format!("{ty} {}", if dora { "DoRA" } else { "LoRA" });

    let n = x64.len();
    let num_dx = numeric(
        &mut |i, h| {
            x64.as_slice_mut().unwrap()[i] += h;
            let l = rf.loss(&x64, &r64);
            x64.as_slice_mut().unwrap()[i] -= h;
            l
        },
        n,
    );
    assert_close(&format!("{name} dX"), dx.as_slice().unwrap(), &num_dx);
    let n = rf.a.len();
    let num_da = numeric(
        &mut |i, h| {
            rf.a.as_slice_mut().unwrap()[i] += h;
            let l = rf.loss(&x64, &r64);
            rf.a.as_slice_mut().unwrap()[i] -= h;
            l
        },
        n,
    );
    assert_close(
        &format!("{name} dA"),
        ad.grad_a().as_slice().unwrap(),
        &num_da,
    );
    let n = rf.b.len();
    let num_db = numeric(
        &mut |i, h| {
            rf.b.as_slice_mut().unwrap()[i] += h;
            let l = rf.loss(&x64, &r64);
            rf.b.as_slice_mut().unwrap()[i] -= h;
            l
        },
        n,
    );
    assert_close(
        &format!("{name} dB"),
        ad.grad_b().as_slice().unwrap(),
        &num_db,
    );
    if dora {
        let n = out_f;
        let num_dm = numeric(
            &mut |i, h| {
                rf.m.as_mut().unwrap()[i] += h;
                let l = rf.loss(&x64, &r64);
                rf.m.as_mut().unwrap()[i] -= h;
                l
            },
            n,
        );
        assert_close(
            &format!("{name} dm"),
            ad.grad_magnitude().unwrap().as_slice().unwrap(),
            &num_dm,
        );
    }
}

#[test]
fn lora_over_q4_0_and_q4_k_bases_matches_finite_differences() {
    check_backward(GgmlType::Q4_0, false);
    check_backward(GgmlType::Q4_K, false);
}

#[test]
fn dora_over_q4_0_and_q4_k_bases_matches_finite_differences() {
    check_backward(GgmlType::Q4_0, true);
    check_backward(GgmlType::Q4_K, true);
}

#[test]
fn merging_into_a_ggml_base_requantizes_to_its_type() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let w = random(&mut rng, 8, 256);
    let base = GgmlBase::quantize(w.view(), None, GgmlType::Q6_K, "p").unwrap();
    let mut layer = LoraLinear::new(base, "p");
    let mut options = AdapterOptions::new(2, 2.0);
    options.init = InitLoraWeights::Random;
    layer.add_adapter("default", &options, 1).unwrap();
    assert!(
        layer.merge().is_err(),
        "a block base is not edited in place"
    );
    let merged = layer.merge_to_f32().unwrap();
    let requantized = layer.merge_to_ggml().unwrap();
    assert_eq!(requantized.ggml_type(), GgmlType::Q6_K);
    assert_eq!(
        requantized.blocks(),
        &quant_core::ggml::quantize(GgmlType::Q6_K, merged.as_slice().unwrap()).unwrap()[..]
    );
}
