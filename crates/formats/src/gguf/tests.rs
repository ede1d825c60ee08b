//! Unit tests of `gguf` (moved out of the module file).

use super::*;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("formats-gguf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn header_layout_offsets_and_alignment_by_hand() {
    let dir = temp_dir("layout");
    let path = dir.join("a.gguf");
    let meta = vec![
        ("general.alignment".to_string(), GgufValue::U32(64)),
        (
            "t.arr".to_string(),
            GgufValue::Array(GgufArray::String(vec!["a".into(), "bc".into()])),
        ),
    ];
    let specs = vec![
        TensorSpec::new("n", vec![3], GgmlType::F32),
        TensorSpec::new("q", vec![1, 32], GgmlType::Q4_0),
    ];
    let mut w = GgufWriter::create(&path, &meta, &specs).unwrap();
    assert_eq!(w.tensors()[1].offset, 64, "12 bytes padded to 64");
    w.write_tensor("n", &f32_bytes(&[1.0, 2.0, 3.0])).unwrap();
    w.write_tensor("q", &[0x11; 18]).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2);
    assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 2);
    // First key: u64 length 17, "general.alignment", type 4 (u32), 64.
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 17);
    assert_eq!(&bytes[32..49], b"general.alignment");
    assert_eq!(u32::from_le_bytes(bytes[49..53].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(bytes[53..57].try_into().unwrap()), 64);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(bytes.len() as u64, f.data_offset + 64 + 64);
    assert_eq!(
        f.read_tensor_bytes("n").unwrap(),
        f32_bytes(&[1.0, 2.0, 3.0])
    );
    assert_eq!(f.read_tensor_bytes("q").unwrap(), vec![0x11; 18]);
    assert_eq!(f.tensor("q").unwrap().shape, vec![1, 32]);
    assert_eq!(
        f.metadata("t.arr"),
        Some(&GgufValue::Array(GgufArray::String(vec![
            "a".into(),
            "bc".into()
        ])))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn out_of_order_or_missing_tensors_leave_no_file() {
    let dir = temp_dir("order");
    let path = dir.join("b.gguf");
    let specs = vec![
        TensorSpec::new("a", vec![2], GgmlType::F32),
        TensorSpec::new("b", vec![2], GgmlType::F32),
    ];
    let mut w = GgufWriter::create(&path, &[], &specs).unwrap();
    assert!(w.write_tensor("b", &f32_bytes(&[1.0, 2.0])).is_err());
    assert!(w.write_tensor("a", &[0u8; 4]).is_err(), "wrong size");
    w.write_tensor("a", &f32_bytes(&[1.0, 2.0])).unwrap();
    let err = w.finish().unwrap_err();
    assert!(err.to_string().contains("next: b"), "{err}");
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "temp file removed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_files_are_errors() {
    let dir = temp_dir("corrupt");
    let path = dir.join("c.gguf");
    std::fs::write(&path, b"GGML\x03\0\0\0").unwrap();
    assert!(GgufFile::open(&path)
        .unwrap_err()
        .to_string()
        .contains("magic"));
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // absurd key length
    std::fs::write(&path, &bytes).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
