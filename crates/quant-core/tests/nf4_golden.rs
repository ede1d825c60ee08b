//! NF4/FP4 against bitsandbytes' own outputs (`tests/data/nf4/*.safetensors`, copied from the
//! reference set; see its README): packed codes, absmaxes and double-quant codes bit-identical,
//! dequantized values equal.

use quant_core::nf4::{bnb_dynamic_map_signed, BlockScales, FourBitTensor, FourBitType};
use safetensors::SafeTensors;

const CASES: [&str; 4] = [
    "normal_64x64_b64",
    "odd_37x53_b64",
    "heavy_tail_48x96_b32",
    "wide_16x1024_b128",
];

fn data_path(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nf4")
        .join(file)
}

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn load(case: &str, quant_type: FourBitType) -> Self {
        let path = data_path(&format!("{case}_{}.safetensors", quant_type.name()));
        Golden {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn file(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let file = self.file();
        let view = file.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn u8s(&self, name: &str) -> Vec<u8> {
        let file = self.file();
        let view = file.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::U8, "{name}");
        view.data().to_vec()
    }

    fn shape(&self) -> Vec<usize> {
        self.file().tensor("input").unwrap().shape().to_vec()
    }

    fn blocksize(&self) -> usize {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata().as_ref().unwrap()["blocksize"]
            .parse()
            .unwrap()
    }
}

fn assert_close(context: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{context}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(f32::MIN_POSITIVE),
            "{context}[{i}]: got {g}, want {w}"
        );
    }
}

fn for_each_case(mut check: impl FnMut(&str, FourBitType, &Golden)) {
    for case in CASES {
        for quant_type in [FourBitType::Nf4, FourBitType::Fp4] {
            check(case, quant_type, &Golden::load(case, quant_type));
        }
    }
}

#[test]
fn code_tables_equal_reference() {
    for_each_case(|case, quant_type, golden| {
        assert_eq!(
            golden.f32s("code").as_slice(),
            quant_type.code().as_slice(),
            "{case}"
        );
    });
}

#[test]
fn dynamic_map_equals_reference_bit_for_bit() {
    let map = bnb_dynamic_map_signed();
    for_each_case(|case, _, golden| {
        let want = golden.f32s("dq_code2");
        let got_bits: Vec<u32> = map.iter().map(|v| v.to_bits()).collect();
        let want_bits: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got_bits, want_bits, "{case}");
    });
}

#[test]
fn plain_quantization_is_bit_identical() {
    for_each_case(|case, quant_type, golden| {
        let ctx = format!("{case} {}", quant_type.name());
        let input = golden.f32s("input");
        let q = FourBitTensor::quantize(
            &input,
            &golden.shape(),
            golden.blocksize(),
            quant_type,
            false,
        )
        .unwrap();
        assert_eq!(q.packed(), golden.u8s("packed").as_slice(), "{ctx} packed");
        let BlockScales::Plain(absmax) = q.scales() else {
            panic!("{ctx}: expected plain scales")
        };
        assert_eq!(absmax, &golden.f32s("absmax"), "{ctx} absmax");
        let deq = q.dequantize();
        assert_eq!(deq.shape(), golden.shape().as_slice());
        assert_close(
            &format!("{ctx} dequant"),
            deq.as_slice().unwrap(),
            &golden.f32s("dequant"),
        );
    });
}

#[test]
fn double_quantization_is_bit_identical() {
    for_each_case(|case, quant_type, golden| {
        let ctx = format!("{case} {}", quant_type.name());
        let q = FourBitTensor::quantize(
            &golden.f32s("input"),
            &golden.shape(),
            golden.blocksize(),
            quant_type,
            true,
        )
        .unwrap();
        assert_eq!(q.packed(), golden.u8s("packed").as_slice(), "{ctx} packed");
        let BlockScales::DoubleQuant(dq) = q.scales() else {
            panic!("{ctx}: expected double-quantized scales")
        };
        assert_eq!(dq.offset, golden.f32s("dq_offset")[0], "{ctx} offset");
        assert_eq!(dq.absmax2, golden.f32s("dq_absmax2"), "{ctx} absmax2");
        assert_eq!(dq.codes, golden.u8s("dq_absmax_codes"), "{ctx} codes");
        assert_eq!(dq.blocksize2, 256);
        assert_close(
            &format!("{ctx} dq_dequant"),
            q.dequantize().as_slice().unwrap(),
            &golden.f32s("dq_dequant"),
        );
    });
}

#[test]
fn row_tiles_match_reference_dequant() {
    // Tiles of 3 rows over the odd 37×53 case start mid-block and on odd elements.
    for quant_type in [FourBitType::Nf4, FourBitType::Fp4] {
        let golden = Golden::load("odd_37x53_b64", quant_type);
        let q = FourBitTensor::quantize(&golden.f32s("input"), &[37, 53], 64, quant_type, true)
            .unwrap();
        let want = golden.f32s("dq_dequant");
        let mut tile = vec![0.0f32; 3 * 53];
        for start in (0..37).step_by(3) {
            let end = (start + 3).min(37);
            let out = &mut tile[..(end - start) * 53];
            q.dequantize_rows(start, end, out).unwrap();
            assert_close(
                &format!("{} rows {start}..{end}", quant_type.name()),
                out,
                &want[start * 53..end * 53],
            );
        }
    }
}
