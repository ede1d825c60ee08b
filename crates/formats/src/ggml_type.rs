//! ggml's tensor types as a container sees them: the `ggml_type` id stored in a GGUF tensor
//! info, the name llama.cpp prints, and the block geometry (values and bytes per block) that
//! sizes a tensor's data. What the bytes of a block mean — and the quantizers that write them —
//! is `quant_core::ggml`'s business.
//!
//! ```
//! use formats::GgmlType;
//! assert_eq!(GgmlType::from_id(12).unwrap(), GgmlType::Q4_K);
//! assert_eq!(GgmlType::Q4_K.block_values(), 256);
//! assert_eq!(GgmlType::Q4_K.bytes_for(512).unwrap(), 288);
//! assert!(GgmlType::from_id(16).unwrap_err().to_string().contains("IQ2_XXS"));
//! ```

use crate::error::{FormatError, Result};

/// Values per block of the 32-value types (`Q4_0` … `Q8_0`).
pub const QK: usize = 32;
/// Values per super-block of the K types (`Q2_K` … `Q6_K`).
pub const QK_K: usize = 256;

/// The ggml tensor types this workspace reads and writes, with their `ggml_type` ids.
// ggml's own spellings (`Q4_K`, not `Q4K`), so the names match the llama.cpp sources.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// `GGML_TYPE_F32` = 0.
    F32,
    /// `GGML_TYPE_F16` = 1.
    F16,
    /// `GGML_TYPE_BF16` = 30.
    BF16,
    /// `GGML_TYPE_Q4_0` = 2: f16 `d`, 16 bytes of 4-bit codes.
    Q4_0,
    /// `GGML_TYPE_Q4_1` = 3: f16 `d`, f16 `m`, 16 bytes of 4-bit codes.
    Q4_1,
    /// `GGML_TYPE_Q5_0` = 6: f16 `d`, 4 bytes of fifth bits, 16 bytes of low nibbles.
    Q5_0,
    /// `GGML_TYPE_Q5_1` = 7: f16 `d`, f16 `m`, 4 bytes of fifth bits, 16 of low nibbles.
    Q5_1,
    /// `GGML_TYPE_Q8_0` = 8: f16 `d`, 32 signed bytes.
    Q8_0,
    /// `GGML_TYPE_Q2_K` = 10: 256 values, 16 sub-blocks of 16 with 4-bit scale and min.
    Q2_K,
    /// `GGML_TYPE_Q3_K` = 11: 256 values, 16 sub-blocks of 16 with 6-bit signed scales.
    Q3_K,
    /// `GGML_TYPE_Q4_K` = 12: 256 values, 8 sub-blocks of 32 with 6-bit scale and min.
    Q4_K,
    /// `GGML_TYPE_Q5_K` = 13: as `Q4_K` plus a fifth bit per value.
    Q5_K,
    /// `GGML_TYPE_Q6_K` = 14: 256 values, 16 sub-blocks of 16 with 8-bit signed scales.
    Q6_K,
}

/// Every type, in id order.
pub const ALL_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::BF16,
];

/// ggml's names of ids this workspace does not handle, for the error message.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

impl GgmlType {
    /// The `ggml_type` id stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type of a `ggml_type` id; errors (naming ggml's type when known) for the others.
    pub fn from_id(id: u32) -> Result<Self> {
        if let Some(ty) = ALL_TYPES.iter().find(|t| t.id() == id) {
            return Ok(*ty);
        }
        let reason = match unsupported_name(id) {
            Some(name) => format!("ggml type {name} is not supported"),
            None => "not a ggml type id".to_string(),
        };
        Err(FormatError::invalid(
            "ggml_type",
            id,
            format!("{reason}; supported: {}", supported_list()),
        ))
    }

    /// Lower-case name as llama.cpp prints it (`f32`, `q4_0`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q2_K => "q2_k",
            GgmlType::Q3_K => "q3_k",
            GgmlType::Q4_K => "q4_k",
            GgmlType::Q5_K => "q5_k",
            GgmlType::Q6_K => "q6_k",
        }
    }

    /// The type named `name` (as [`GgmlType::name`], case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        ALL_TYPES
            .iter()
            .find(|t| t.name() == lower)
            .copied()
            .ok_or_else(|| {
                FormatError::invalid(
                    "ggml type",
                    name,
                    format!("expected one of {}", supported_list()),
                )
            })
    }

    /// Values per block (1 for the float types, 32, or 256 for the K types).
    pub fn block_values(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                QK
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                QK_K
            }
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK / 2,
            GgmlType::Q4_1 => 4 + QK / 2,
            GgmlType::Q5_0 => 2 + 4 + QK / 2,
            GgmlType::Q5_1 => 4 + 4 + QK / 2,
            GgmlType::Q8_0 => 2 + QK,
            // scales[16], qs[64], d, dmin
            GgmlType::Q2_K => QK_K / 16 + QK_K / 4 + 4,
            // hmask[32], qs[64], scales[12], d
            GgmlType::Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            // d, dmin, scales[12], qs[128]
            GgmlType::Q4_K => 4 + 12 + QK_K / 2,
            // d, dmin, scales[12], qh[32], qs[128]
            GgmlType::Q5_K => 4 + 12 + QK_K / 8 + QK_K / 2,
            // ql[128], qh[64], scales[16], d
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Whether the type is a plain float (one value per "block").
    pub fn is_float(self) -> bool {
        self.block_values() == 1
    }

    /// Bytes of `n` values; errors when `n` is not a whole number of blocks or the size
    /// overflows.
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        if n % self.block_values() != 0 {
            return Err(FormatError::shape(
                format!("{} tensor", self.name()),
                format!("a multiple of {} values", self.block_values()),
                n,
            ));
        }
        (n / self.block_values())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| {
                FormatError::shape(
                    format!("{} tensor", self.name()),
                    "a size that fits in memory",
                    format!("{n} values"),
                )
            })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn supported_list() -> String {
    ALL_TYPES
        .iter()
        .map(|t| format!("{} ({})", t.name(), t.id()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml_common_h() {
        let expected = [
            (GgmlType::Q4_0, 18),
            (GgmlType::Q4_1, 20),
            (GgmlType::Q5_0, 22),
            (GgmlType::Q5_1, 24),
            (GgmlType::Q8_0, 34),
            (GgmlType::Q2_K, 84),
            (GgmlType::Q3_K, 110),
            (GgmlType::Q4_K, 144),
            (GgmlType::Q5_K, 176),
            (GgmlType::Q6_K, 210),
        ];
        for (ty, bytes) in expected {
            assert_eq!(ty.block_bytes(), bytes, "{ty}");
        }
    }

    #[test]
    fn ids_and_names_round_trip() {
        for ty in ALL_TYPES {
            assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
            assert_eq!(GgmlType::from_name(&ty.name().to_uppercase()).unwrap(), ty);
        }
        assert!(GgmlType::from_id(99).is_err());
        assert!(GgmlType::from_name("q4_k_m").is_err());
    }

    #[test]
    fn partial_blocks_and_overflow_are_errors() {
        assert!(GgmlType::Q4_K.bytes_for(255).is_err());
        assert!(GgmlType::Q8_0.bytes_for(usize::MAX - 31).is_err());
        assert_eq!(GgmlType::BF16.bytes_for(3).unwrap(), 6);
    }
}
