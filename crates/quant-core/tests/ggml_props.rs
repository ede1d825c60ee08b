//! Properties of the ggml block formats for random inputs of every type: sizes, row bands
//! equal to the matching slice of a whole decode, closed-form error bounds where they exist,
//! a loose bound (the block's value range) for the searched K types, and a GGUF file round
//! trip of the encoded tensor.

use proptest::prelude::*;
use quant_core::ggml::{dequantize, dequantize_rows, error_bound, quantize_rows, ALL_TYPES};
use quant_core::gguf::{GgufFile, GgufWriter, ReadTensorF32, TensorSpec};

fn values(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-4.0f32..4.0, len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn encode_decode_sizes_bands_and_bounds(
        ty_index in 0usize..ALL_TYPES.len(),
        rows in 1usize..4,
        x in values(3 * 512),
        band in (0usize..3, 1usize..3),
    ) {
        let ty = ALL_TYPES[ty_index];
        let row_len = 512;
        let x = &x[..rows * row_len];
        let q = quantize_rows(ty, x, row_len).unwrap();
        prop_assert_eq!(q.len(), ty.bytes_for(x.len()).unwrap());
        let all = dequantize(ty, &q, x.len()).unwrap();
        let (start, len) = (band.0.min(rows - 1), band.1);
        let end = (start + len).min(rows);
        let mut out = vec![0.0f32; (end - start) * row_len];
        dequantize_rows(ty, &q, row_len, start..end, &mut out).unwrap();
        prop_assert_eq!(&out[..], &all[start * row_len..end * row_len]);
        let bv = ty.block_values().max(32);
        for (xb, yb) in x.chunks(bv).zip(all.chunks(bv)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (lo, hi) = xb.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let bound = error_bound(ty, amax).unwrap_or((hi - lo).max(amax));
            for (a, b) in xb.iter().zip(yb) {
                prop_assert!((a - b).abs() <= bound * 1.0001 + 1e-6, "{}: {} → {} (bound {})", ty, a, b, bound);
            }
        }
    }

    #[test]
    fn gguf_files_hand_back_what_was_written(
        ty_index in 0usize..ALL_TYPES.len(),
        x in values(2 * 256),
    ) {
        let ty = ALL_TYPES[ty_index];
        let dir = std::env::temp_dir().join(format!("qc-ggml-props-{}-{ty_index}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let q = quantize_rows(ty, &x, 256).unwrap();
        let mut w = GgufWriter::create(&path, &[], &[TensorSpec::new("w", vec![2, 256], ty)]).unwrap();
        w.write_tensor("w", &q).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&path).unwrap();
        prop_assert_eq!(f.read_tensor_bytes("w").unwrap(), q.clone());
        prop_assert_eq!(f.read_tensor_rows_bytes("w", 1..2).unwrap(), q[q.len() / 2..].to_vec());
        prop_assert_eq!(f.read_tensor_f32("w").unwrap(), dequantize(ty, &q, 512).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
