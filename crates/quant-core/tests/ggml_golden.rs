//! ggml's block formats against llama.cpp's own output (`tests/data/ggml/<type>.safetensors`,
//! copied from the reference set: six rows of a real model's weight, the blocks
//! `llama_model_quantize` wrote for them, and gguf-py's dequantization of those blocks).
//!
//! - Decoding: our dequantization of `blocks` equals `dequant` bit for bit.
//! - Encoding: our quantization of `input` equals `blocks` byte for byte.

use quant_core::ggml::{dequantize, dequantize_rows, quantize_rows, GgmlType};
use safetensors::SafeTensors;

const TYPES: [&str; 9] = [
    "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k",
];

struct Golden {
    ty: GgmlType,
    row_len: usize,
    input: Vec<f32>,
    blocks: Vec<u8>,
    dequant: Vec<f32>,
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = st.tensor(name).unwrap();
    quant_core::io::tensor_to_f32(name, &view).unwrap()
}

fn load(name: &str) -> Golden {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ggml")
        .join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let ty = GgmlType::from_name(&meta["type"]).unwrap();
    let row_len: usize = meta["row_length"].parse().unwrap();
    Golden {
        ty,
        row_len,
        input: f32s(&st, "input"),
        blocks: st.tensor("blocks").unwrap().data().to_vec(),
        dequant: f32s(&st, "dequant"),
    }
}

#[test]
fn dequantization_of_llama_cpp_blocks_is_bit_identical_to_ggml() {
    for name in TYPES {
        let g = load(name);
        assert_eq!(g.ty.name(), name);
        let ours = dequantize(g.ty, &g.blocks, g.input.len()).unwrap();
        let mismatches: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].to_bits() != g.dequant[i].to_bits())
            .collect();
        assert!(
            mismatches.is_empty(),
            "{name}: {} of {} values differ, first at {} ({} vs {})",
            mismatches.len(),
            ours.len(),
            mismatches[0],
            ours[mismatches[0]],
            g.dequant[mismatches[0]]
        );
        // Row bands decode to the same values as the whole matrix.
        let rows = g.input.len() / g.row_len;
        let mut band = vec![0.0f32; 2 * g.row_len];
        dequantize_rows(g.ty, &g.blocks, g.row_len, 3..5, &mut band).unwrap();
        assert_eq!(band, ours[3 * g.row_len..5 * g.row_len], "{name} rows 3..5");
        assert!(dequantize_rows(g.ty, &g.blocks, g.row_len, 5..rows + 1, &mut band).is_err());
    }
}

#[test]
fn quantization_of_the_input_reproduces_llama_cpp_blocks_byte_for_byte() {
    let mut failures = Vec::new();
    for name in TYPES {
        let g = load(name);
        let ours = quantize_rows(g.ty, &g.input, g.row_len).unwrap();
        assert_eq!(ours.len(), g.blocks.len(), "{name}");
        let bb = g.ty.block_bytes();
        let bad: Vec<usize> = (0..ours.len() / bb)
            .filter(|&b| ours[b * bb..(b + 1) * bb] != g.blocks[b * bb..(b + 1) * bb])
            .collect();
        if !bad.is_empty() {
            failures.push(format!(
                "{name}: {} of {} blocks differ (first: block {})",
                bad.len(),
                ours.len() / bb,
                bad[0]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random bytes of every type (scale fields set to finite f16, one subnormal) decoded by
/// gguf-py (`tests/data/ggml/random_blocks.safetensors`, made by `make_random_blocks.py`
/// there): the only reference for `Q2_K`, which the real-model set lacks, and every code and
/// sub-scale bit pattern for the others.
#[test]
fn dequantization_of_random_blocks_matches_gguf_py_bit_for_bit() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ggml/random_blocks.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in [
        "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
        "q6_k",
    ] {
        let ty = GgmlType::from_name(name).unwrap();
        let blocks = st
            .tensor(&format!("{name}.blocks"))
            .unwrap()
            .data()
            .to_vec();
        let expected = f32s(&st, &format!("{name}.dequant"));
        let ours = dequantize(ty, &blocks, expected.len()).unwrap();
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name} value {i}: {a} vs {b}");
        }
    }
}

/// A `Q2_K` super-block built by hand: `d = 0.5`, `dmin = 0.25`, sub-block `j` has scale
/// `j % 16` and min `15 − j`, codes `(i / 16 + i) % 4` packed as ggml does.
#[test]
fn q2_k_hand_built_block_decodes_to_d_sc_q_minus_dmin_m() {
    let mut block = vec![0u8; 84];
    for (j, sc) in block.iter_mut().take(16).enumerate() {
        *sc = (j as u8) | ((15 - j as u8) << 4);
    }
    let code = |i: usize| ((i / 16 + i) % 4) as u8;
    for half in 0..2 {
        for l in 0..32 {
            let base = half * 128;
            block[16 + half * 32 + l] = code(base + l)
                | (code(base + l + 32) << 2)
                | (code(base + l + 64) << 4)
                | (code(base + l + 96) << 6);
        }
    }
    block[80..82].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block[82..84].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
    let y = dequantize(GgmlType::Q2_K, &block, 256).unwrap();
    for (i, v) in y.iter().enumerate() {
        let j = i / 16;
        let expected = 0.5 * j as f32 * f32::from(code(i)) - 0.25 * (15 - j) as f32;
        assert_eq!(*v, expected, "value {i}");
    }
}

#[test]
fn q2_k_quantizer_round_trips_within_its_grid_and_is_stable() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..512).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let q = quantize_rows(GgmlType::Q2_K, &x, 512).unwrap();
    let y = dequantize(GgmlType::Q2_K, &q, 512).unwrap();
    // Each 16-value sub-block spans at most 2 in 3 steps (plus f16/4-bit scale rounding).
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        assert!((a - b).abs() < 0.75, "value {i}: {a} → {b}");
    }
    let rms = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 512.0).sqrt();
    assert!(rms < 0.2, "rms error {rms}");
    assert_eq!(
        quantize_rows(GgmlType::Q2_K, &x, 512).unwrap(),
        q,
        "deterministic"
    );
}

#[test]
fn rows_that_are_not_whole_blocks_are_refused_naming_llama_cpp_fallback() {
    use quant_core::ggml::fallback_type;
    let x = vec![0.5f32; 576 * 2];
    let err = quantize_rows(GgmlType::Q4_K, &x, 576)
        .unwrap_err()
        .to_string();
    assert!(err.contains("576") && err.contains("q5_0"), "{err}");
    let err = quantize_rows(GgmlType::Q4_0, &x[..100], 50)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unsupported tensor size"), "{err}");
    // llama.cpp's convert_incompatible_tensor mapping.
    let cases = [
        (GgmlType::Q4_K, 576, Some(GgmlType::Q5_0)),
        (GgmlType::Q5_K, 576, Some(GgmlType::Q5_1)),
        (GgmlType::Q6_K, 576, Some(GgmlType::Q8_0)),
        (GgmlType::Q6_K, 1536, Some(GgmlType::Q6_K)),
        (GgmlType::Q4_K, 100, Some(GgmlType::F16)),
        (GgmlType::Q2_K, 100, Some(GgmlType::F16)),
        (GgmlType::Q2_K, 576, None),
        (GgmlType::Q3_K, 576, None),
        (GgmlType::Q8_0, 48, None),
        (GgmlType::Q8_0, 64, Some(GgmlType::Q8_0)),
        (GgmlType::F16, 7, Some(GgmlType::F16)),
    ];
    for (ty, row, expected) in cases {
        assert_eq!(fallback_type(ty, row).ok(), expected, "{ty} rows of {row}");
    }
}
