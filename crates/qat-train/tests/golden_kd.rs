//! `kd_loss` against PyTorch: `tests/data/kd.safetensors` is a copy of the project's
//! `/work/shared/golden/kd.safetensors` (torch 2.15, CPU): for T in {1, 2, 4},
//! `T{T}_student`, `T{T}_teacher` f32[6, 33], `T{T}_loss` f32[1] =
//! T²·KL(softmax(teacher/T) ‖ softmax(student/T)) averaged over rows, `T{T}_grad_student`.

use ndarray::Array2;
use qat_train::loss::kd_loss;
use safetensors::SafeTensors;

fn tensor(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let values = quant_core::io::tensor_to_f32(name, &view).unwrap();
    (view.shape().to_vec(), values)
}

fn matrix(st: &SafeTensors<'_>, name: &str) -> Array2<f32> {
    let (shape, values) = tensor(st, name);
    Array2::from_shape_vec((shape[0], shape[1]), values).unwrap()
}

#[test]
fn kd_loss_and_gradient_match_pytorch() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kd.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for t in [1u32, 2, 4] {
        let student = matrix(&st, &format!("T{t}_student"));
        let teacher = matrix(&st, &format!("T{t}_teacher"));
        let (_, loss) = tensor(&st, &format!("T{t}_loss"));
        let grad = matrix(&st, &format!("T{t}_grad_student"));
        let out = kd_loss(student.view(), teacher.view(), t as f32, None).unwrap();
        let loss_err = (out.value - f64::from(loss[0])).abs();
        assert!(
            loss_err <= 1e-6,
            "T={t}: loss {} vs torch {} (|Δ| = {loss_err:e})",
            out.value,
            loss[0]
        );
        let grad_err = out
            .grad
            .iter()
            .zip(grad.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(grad_err <= 1e-6, "T={t}: max |Δgrad| = {grad_err:e}");
        println!("T={t}: |Δloss| = {loss_err:e}, max |Δgrad| = {grad_err:e}");
    }
}
