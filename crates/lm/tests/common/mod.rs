//! Readers of the reference data shared by the golden-agreement tests.
// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{Array2, Array3, ArrayD, IxDyn};
use safetensors::SafeTensors;

/// Every projection of a decoder layer (Llama's names): the `target_modules` of the tests that
/// adapt them all.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `tests/data/llama`: copies of the project's golden Llama checkpoints and adapters.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama")
}

pub fn read_f32s(path: &std::path::Path) -> BTreeMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(name, v)| {
            let values: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (
                name,
                ArrayD::from_shape_vec(IxDyn(v.shape()), values).unwrap(),
            )
        })
        .collect()
}

pub fn io_ids() -> (Array2<u32>, Array2<i64>) {
    let bytes = std::fs::read(data_dir().join("io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ids = i64s("input_ids").into_iter().map(|v| v as u32).collect();
    (
        Array2::from_shape_vec((2, 8), ids).unwrap(),
        Array2::from_shape_vec((2, 8), i64s("labels")).unwrap(),
    )
}

/// Largest absolute difference between computed logits and reference ones of the same shape.
pub fn max_abs_diff(a: &Array3<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference of two arrays of one shape (any dimension).
pub fn max_abs<D: ndarray::Dimension>(
    a: ndarray::ArrayView<'_, f32, D>,
    b: ndarray::ArrayView<'_, f32, D>,
) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `‖a − b‖ / ‖b‖` (Frobenius), the relative error of a gradient tensor.
pub fn relative(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let norm = b.iter().map(|v| v * v).sum::<f32>().sqrt();
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    err / norm.max(f32::MIN_POSITIVE)
}

/// `tests/data/arch/<family>`: a family's reference model and data.
pub fn arch_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/arch")
        .join(family)
}

/// An `i64` tensor of a family's `io.safetensors` with its shape.
pub fn arch_i64s(family: &str, name: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(arch_dir(family).join("io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

/// A family's reference batch: `input_ids` and `labels` of its `io.safetensors`.
pub fn arch_batch(family: &str) -> (Array2<u32>, Array2<i64>) {
    let (shape, ids) = arch_i64s(family, "input_ids");
    let (_, labels) = arch_i64s(family, "labels");
    let dim = (shape[0], shape[1]);
    (
        Array2::from_shape_vec(dim, ids.into_iter().map(|v| v as u32).collect()).unwrap(),
        Array2::from_shape_vec(dim, labels).unwrap(),
    )
}
