//! NF4/FP4 with double quantization against bitsandbytes on seeded random matrices
//! (`tests/data/bnb_random/*.safetensors`, made by `make.py` beside them with bitsandbytes
//! 0.50.2 on the CPU): blocksizes 32 to 4096, short last blocks, and tensors of more than 256
//! blocks (several nested absmax blocks). Packed codes, every double-quantized absmax code, the
//! nested absmaxes and the offset must be bit-identical. Three absmax codes of these cases (one
//! each in `r130x70_b32_nf4`, `r33x130_b128_nf4`, `r64x300_b64_fp4`) differ from the nearest
//! map entry, so the cases tell bitsandbytes' lookup-table rule from an argmin.

use quant_core::nf4::{BlockScales, FourBitTensor, FourBitType};
use safetensors::SafeTensors;

fn f32s(file: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    file.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn random_cases_match_bitsandbytes_bit_for_bit() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bnb_random");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the ten random cases in {}",
        dir.display()
    );
    let mut over_256_blocks = 0;
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let blocksize: usize = meta["blocksize"].parse().unwrap();
        let quant_type = FourBitType::from_name(&meta["quant_type"]).unwrap();
        let input = file.tensor("input").unwrap();
        let shape = input.shape().to_vec();
        let x = f32s(&file, "input");
        let q = FourBitTensor::quantize(&x, &shape, blocksize, quant_type, true).unwrap();
        let case = path.file_name().unwrap().to_string_lossy();
        assert_eq!(
            q.packed(),
            file.tensor("packed").unwrap().data(),
            "{case}: packed"
        );
        let BlockScales::DoubleQuant(dq) = q.scales() else {
            panic!("{case}: not double-quantized")
        };
        let theirs = file.tensor("absmax_codes").unwrap().data().to_vec();
        let differing: Vec<(usize, u8, u8)> = dq
            .codes
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (&a, &b))| (i, a, b))
            .collect();
        assert_eq!(differing, vec![], "{case}: (block, ours, bitsandbytes)");
        assert_eq!(dq.codes.len(), theirs.len(), "{case}: code count");
        let absmax2: Vec<u32> = dq.absmax2.iter().map(|v| v.to_bits()).collect();
        let want2: Vec<u32> = f32s(&file, "absmax2").iter().map(|v| v.to_bits()).collect();
        assert_eq!(absmax2, want2, "{case}: nested absmax");
        assert_eq!(
            dq.offset.to_bits(),
            f32s(&file, "offset")[0].to_bits(),
            "{case}: offset"
        );
        if dq.codes.len() > 256 {
            over_256_blocks += 1;
        }
    }
    assert!(over_256_blocks >= 3, "cases with more than 256 blocks");
}
