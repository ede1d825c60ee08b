//! Invariants of NF4/FP4 quantization (proptest) and its error reporting.

use proptest::prelude::*;
use quant_core::nf4::{BlockScales, FourBitTensor, FourBitType};
use quant_core::QuantError;

fn quant_type() -> impl Strategy<Value = FourBitType> {
    prop_oneof![Just(FourBitType::Nf4), Just(FourBitType::Fp4)]
}

fn blocksize() -> impl Strategy<Value = usize> {
    prop_oneof![Just(32usize), Just(64), Just(128), Just(256)]
}

/// Values with a wide dynamic range: a few huge, most small, some exact zeros.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            8 => -1.0f32..1.0,
            2 => -1e4f32..1e4,
            1 => Just(0.0f32),
            1 => -1e-6f32..1e-6,
        ],
        1..max_len,
    )
}

fn block_absmax(values: &[f32], blocksize: usize, block: usize) -> f32 {
    values[block * blocksize..((block + 1) * blocksize).min(values.len())]
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn dequantized_error_is_within_half_the_largest_code_gap(
        values in values(700),
        blocksize in blocksize(),
        quant_type in quant_type(),
        double_quant in any::<bool>(),
    ) {
        let q = FourBitTensor::quantize(&values, &[values.len()], blocksize, quant_type, double_quant).unwrap();
        let half_gap = quant_type.max_half_gap();
        let scales = q.absmax_values();
        let deq = q.dequantize();
        for (i, (&x, &d)) in values.iter().zip(deq.iter()).enumerate() {
            let absmax = block_absmax(&values, blocksize, i / blocksize);
            // With double quant the decoded scale differs from the true absmax; |code| <= 1
            // bounds what that adds.
            let scale_error = (scales[i / blocksize] - absmax).abs();
            let bound = half_gap * absmax * (1.0 + 1e-6) + scale_error + 1e-30;
            prop_assert!((x - d).abs() <= bound, "element {}: {} -> {} (bound {})", i, x, d, bound);
        }
        if !double_quant {
            for (b, &s) in scales.iter().enumerate() {
                prop_assert_eq!(s, block_absmax(&values, blocksize, b));
            }
        }
    }

    #[test]
    fn packing_and_unpacking_agree(
        values in values(300),
        blocksize in blocksize(),
        quant_type in quant_type(),
        double_quant in any::<bool>(),
    ) {
        let q = FourBitTensor::quantize(&values, &[values.len()], blocksize, quant_type, double_quant).unwrap();
        let codes = q.codes();
        prop_assert_eq!(codes.len(), values.len());
        prop_assert_eq!(q.packed().len(), values.len().div_ceil(2));
        for (i, &byte) in q.packed().iter().enumerate() {
            let low = codes.get(2 * i + 1).copied().unwrap_or(quant_type.zero_code());
            prop_assert_eq!(byte, (codes[2 * i] << 4) | low);
        }
        let scales = q.absmax_values();
        let deq = q.dequantize();
        for (i, (&c, &d)) in codes.iter().zip(deq.iter()).enumerate() {
            prop_assert_eq!(d, quant_type.code()[c as usize] * scales[i / blocksize]);
        }
        // Reassembling from the parts gives the same tensor.
        let rebuilt = FourBitTensor::from_parts(
            q.shape().to_vec(), q.blocksize(), q.quant_type(), q.packed().to_vec(), q.scales().clone(),
        ).unwrap();
        prop_assert_eq!(rebuilt, q);
    }

    #[test]
    fn any_row_range_equals_the_slice_of_the_full_dequant(
        rows in 1usize..24,
        cols in 1usize..70,
        seed_values in prop::collection::vec(-3.0f32..3.0, 24 * 70),
        blocksize in blocksize(),
        quant_type in quant_type(),
        double_quant in any::<bool>(),
        range in (0usize..24, 0usize..25),
    ) {
        let n = rows * cols;
        let q = FourBitTensor::quantize(&seed_values[..n], &[rows, cols], blocksize, quant_type, double_quant).unwrap();
        let full = q.dequantize();
        let full = full.as_slice().unwrap();
        let (a, b) = (range.0.min(rows), range.1.min(rows));
        let (start, end) = (a.min(b), a.max(b));
        let mut tile = vec![f32::NAN; (end - start) * cols];
        q.dequantize_rows(start, end, &mut tile).unwrap();
        prop_assert_eq!(&tile[..], &full[start * cols..end * cols]);
        let mut all = vec![0.0; n];
        q.dequantize_into(&mut all).unwrap();
        prop_assert_eq!(&all[..], full);
    }
}

#[test]
fn zero_size_input_is_an_empty_error() {
    let err = FourBitTensor::quantize(&[], &[0, 4], 64, FourBitType::Nf4, false).unwrap_err();
    assert!(matches!(err, QuantError::Empty { .. }), "{err}");
}

#[test]
fn length_and_shape_must_agree() {
    let err = FourBitTensor::quantize(&[1.0; 6], &[2, 4], 64, FourBitType::Nf4, false).unwrap_err();
    assert!(matches!(err, QuantError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("expected 8, got 6"), "{err}");
}

#[test]
fn blocksize_must_be_a_power_of_two_in_range() {
    for bad in [0, 16, 48, 100, 8192] {
        let err =
            FourBitTensor::quantize(&[1.0; 64], &[64], bad, FourBitType::Fp4, false).unwrap_err();
        assert!(
            matches!(&err, QuantError::InvalidParameter { name, .. } if name == "blocksize"),
            "{bad}: {err}"
        );
    }
    for good in [32, 64, 4096] {
        assert!(FourBitTensor::quantize(&[1.0; 64], &[64], good, FourBitType::Fp4, true).is_ok());
    }
}

#[test]
fn non_finite_input_names_the_first_bad_index() {
    let mut v = vec![0.5f32; 200];
    v[137] = f32::INFINITY;
    v[150] = f32::NAN;
    let err = FourBitTensor::quantize(&v, &[200], 64, FourBitType::Nf4, true).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 137, .. }),
        "{err}"
    );
}

#[test]
fn output_buffers_and_ranges_are_checked() {
    let q = FourBitTensor::quantize(&[0.25; 60], &[6, 10], 32, FourBitType::Nf4, false).unwrap();
    let mut short = vec![0.0; 59];
    assert!(matches!(
        q.dequantize_into(&mut short),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let mut tile = vec![0.0; 20];
    assert!(q.dequantize_rows(5, 7, &mut tile).is_err());
    assert!(q.dequantize_rows(3, 2, &mut tile).is_err());
    assert!(q.dequantize_rows(0, 1, &mut tile).is_err()); // needs 10, got 20
    assert!(q.dequantize_range(50, 61, &mut tile).is_err());
    let flat = FourBitTensor::quantize(&[0.25; 60], &[60], 32, FourBitType::Nf4, false).unwrap();
    let err = flat.dequantize_rows(0, 1, &mut tile).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}

#[test]
fn from_parts_rejects_inconsistent_scales() {
    let q = FourBitTensor::quantize(&[0.5; 300], &[300], 32, FourBitType::Nf4, true).unwrap();
    let BlockScales::DoubleQuant(mut dq) = q.scales().clone() else {
        unreachable!()
    };
    dq.absmax2.push(1.0);
    let err = FourBitTensor::from_parts(
        vec![300],
        32,
        FourBitType::Nf4,
        q.packed().to_vec(),
        BlockScales::DoubleQuant(dq),
    )
    .unwrap_err();
    assert!(err.to_string().contains("absmax2"), "{err}");
    let err = FourBitTensor::from_parts(
        vec![300],
        32,
        FourBitType::Nf4,
        q.packed().to_vec(),
        BlockScales::Plain(vec![f32::NAN; 10]),
    )
    .unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn bits_per_weight_counts_what_is_stored() {
    let w = vec![0.1f32; 4096 * 4];
    let plain = FourBitTensor::quantize(&w, &[4, 4096], 64, FourBitType::Nf4, false).unwrap();
    assert_eq!(plain.stored_bytes(), 8192 + 256 * 4);
    assert_eq!(plain.bits_per_weight(), 4.5);
    let dq = FourBitTensor::quantize(&w, &[4, 4096], 64, FourBitType::Nf4, true).unwrap();
    // 256 absmax codes, one absmax2, the offset, the 256-entry map.
    assert_eq!(dq.stored_bytes(), 8192 + 256 + 4 + 4 + 1024);
    assert!((dq.bits_per_weight() - 8.0 * 9480.0 / 16384.0).abs() < 1e-12);
}

/// `DoubleQuantAbsmax`'s fields are public: inconsistent ones are errors on use.
#[test]
fn inconsistent_double_quant_fields_are_errors_on_use() {
    use quant_core::nf4::DoubleQuantAbsmax;
    let good = DoubleQuantAbsmax::quantize(&[0.5, 1.0, 2.0]).unwrap();
    assert_eq!(good.decode().unwrap().len(), 3);
    let mut dq = good.clone();
    dq.code2.truncate(10);
    assert!(dq.decode().unwrap_err().to_string().contains("code2"));
    let mut dq = good.clone();
    dq.blocksize2 = 0;
    assert!(dq.scale(0).unwrap_err().to_string().contains("blocksize2"));
    assert!(dq.decode().is_err());
    let mut dq = good.clone();
    dq.absmax2.clear();
    assert!(dq.scale(2).unwrap_err().to_string().contains("absmax2"));
    assert!(good.scale(3).unwrap_err().to_string().contains("codes"));
}
