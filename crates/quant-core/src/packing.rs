//! Bit packing of unsigned quantization codes (1 to 8 bits per code).
//!
//! # Layout
//!
//! Every width uses the same rule: the codes form one **MSB-first bit stream**. Code `i`
//! occupies stream bits `[i·b, (i+1)·b)`, its most significant bit first, and stream bit `j`
//! is bit `7 − (j mod 8)` of byte `j / 8` (bit 7 being the most significant). The stream is
//! padded with zero bits to a whole byte, so a tensor of `n` codes of `b` bits takes exactly
//! `⌈n·b / 8⌉` bytes. For the widths quant-core stores this means:
//!
//! | bits | codes per byte group | byte layout (`c0` is the first code of the group) |
//! |------|----------------------|----------------------------------------------------|
//! | 8    | 1 code in 1 byte     | `byte = c0` |
//! | 4    | 2 codes in 1 byte    | `byte = c0 << 4 \| c1` — first code in the **high** nibble, as bitsandbytes |
//! | 2    | 4 codes in 1 byte    | `byte = c0 << 6 \| c1 << 4 \| c2 << 2 \| c3` |
//! | 3    | 8 codes in 3 bytes   | the 24-bit big-endian word `c0 << 21 \| c1 << 18 \| … \| c7` stored as bytes `[w >> 16, w >> 8, w]` |
//!
//! A tail shorter than a full group is packed the same way with the missing codes taken as 0
//! and only the bytes that hold at least one real bit stored: an odd 4-bit tail gives one byte
//! with the last code in the high nibble and a zero low nibble; a 3-bit tail of `m < 8` codes
//! gives `⌈3m/8⌉` bytes. Widths 5, 6 and 7 follow the same stream rule.
//!
//! ```
//! use quant_core::packing::PackedCodes;
//!
//! let packed = PackedCodes::pack(&[0x1, 0x2, 0xF], 4).unwrap();
//! assert_eq!(packed.bytes(), &[0x12, 0xF0]);
//! assert_eq!(packed.unpack(), vec![0x1, 0x2, 0xF]);
//! assert_eq!(packed.get(2).unwrap(), 0xF);
//!
//! // 3 bits: codes 1..=8 (mod 8) fill exactly three bytes.
//! let packed = PackedCodes::pack(&[1, 2, 3, 4, 5, 6, 7, 0], 3).unwrap();
//! assert_eq!(packed.bytes(), &[0b0010_1001, 0b1100_1011, 0b1011_1000]);
//! ```

use crate::error::{QuantError, Result};

/// Smallest and largest code width [`PackedCodes`] accepts.
pub const MIN_PACK_BITS: u32 = 1;
/// See [`MIN_PACK_BITS`].
pub const MAX_PACK_BITS: u32 = 8;

/// Unsigned codes of `bits` bits each, packed as described in the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "PackedCodesParts")]
pub struct PackedCodes {
    bits: u32,
    len: usize,
    bytes: Vec<u8>,
}

/// The raw serialized form of [`PackedCodes`], checked on deserialization.
#[derive(serde::Deserialize)]
struct PackedCodesParts {
    bits: u32,
    len: usize,
    bytes: Vec<u8>,
}

impl TryFrom<PackedCodesParts> for PackedCodes {
    type Error = QuantError;
    fn try_from(parts: PackedCodesParts) -> Result<Self> {
        PackedCodes::from_bytes(parts.bits, parts.len, parts.bytes)
    }
}

/// Bytes needed for `len` codes of `bits` bits: `⌈len·bits / 8⌉`.
///
/// ```
/// use quant_core::packing::packed_len;
/// assert_eq!(packed_len(9, 3).unwrap(), 4);
/// assert_eq!(packed_len(5, 4).unwrap(), 3);
/// assert!(packed_len(5, 9).is_err());
/// ```
pub fn packed_len(len: usize, bits: u32) -> Result<usize> {
    crate::error::check_bits("bit packing", bits, MIN_PACK_BITS, MAX_PACK_BITS)?;
    len.checked_mul(bits as usize)
        .map(|total_bits| total_bits.div_ceil(8))
        .ok_or_else(|| QuantError::invalid("len", len, "code count overflows the bit count"))
}

impl PackedCodes {
    /// Packs `codes`, each of which must be below `2^bits`.
    ///
    /// Errors if `bits` is outside 1..=8 or a code does not fit, naming the first such code's
    /// index.
    ///
    /// ```
    /// use quant_core::packing::PackedCodes;
    /// let packed = PackedCodes::pack(&[3, 0, 1, 2, 3], 2).unwrap();
    /// assert_eq!(packed.bytes(), &[0b11_00_01_10, 0b11_00_00_00]);
    /// let err = PackedCodes::pack(&[3, 4], 2).unwrap_err();
    /// assert!(err.to_string().contains("codes[1]"));
    /// ```
    pub fn pack(codes: &[u8], bits: u32) -> Result<Self> {
        let n_bytes = packed_len(codes.len(), bits)?;
        if bits < 8 {
            let limit = 1u16 << bits;
            if let Some(index) = codes.iter().position(|&c| u16::from(c) >= limit) {
                return Err(QuantError::invalid(
                    format!("codes[{index}]"),
                    codes[index],
                    format!("a {bits}-bit code must be below {limit}"),
                ));
            }
        }
        let mut bytes = vec![0u8; n_bytes];
        match bits {
            8 => bytes.copy_from_slice(codes),
            4 => {
                for (byte, pair) in bytes.iter_mut().zip(codes.chunks(2)) {
                    let low = pair.get(1).copied().unwrap_or(0);
                    *byte = (pair[0] << 4) | low;
                }
            }
            2 => {
                for (byte, quad) in bytes.iter_mut().zip(codes.chunks(4)) {
                    *byte = quad
                        .iter()
                        .enumerate()
                        .fold(0u8, |acc, (k, &c)| acc | (c << (6 - 2 * k)));
                }
            }
            3 => {
                for (group, octet) in bytes.chunks_mut(3).zip(codes.chunks(8)) {
                    let word = octet
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (k, &c)| acc | (u32::from(c) << (21 - 3 * k)));
                    // A tail group holds only the bytes that carry real bits.
                    for (k, byte) in group.iter_mut().enumerate() {
                        *byte = (word >> (16 - 8 * k)) as u8;
                    }
                }
            }
            _ => {
                for (i, &code) in codes.iter().enumerate() {
                    for bit in 0..bits {
                        if (code >> (bits - 1 - bit)) & 1 == 1 {
                            let stream_bit = i * bits as usize + bit as usize;
                            bytes[stream_bit / 8] |= 0x80 >> (stream_bit % 8);
                        }
                    }
                }
            }
        }
        Ok(PackedCodes {
            bits,
            len: codes.len(),
            bytes,
        })
    }

    /// Wraps already-packed bytes (for example read from a file), checking that there are
    /// exactly [`packed_len`]`(len, bits)` of them.
    ///
    /// ```
    /// use quant_core::packing::PackedCodes;
    /// let packed = PackedCodes::from_bytes(4, 3, vec![0x12, 0x30]).unwrap();
    /// assert_eq!(packed.unpack(), vec![1, 2, 3]);
    /// assert!(PackedCodes::from_bytes(4, 3, vec![0x12]).is_err());
    /// ```
    pub fn from_bytes(bits: u32, len: usize, bytes: Vec<u8>) -> Result<Self> {
        let expected = packed_len(len, bits)?;
        if bytes.len() != expected {
            return Err(QuantError::shape(
                format!("packed {bits}-bit codes of length {len}"),
                format!("{expected} bytes"),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok(PackedCodes { bits, len, bytes })
    }

    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no codes are stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bytes the codes occupy (`⌈len·bits / 8⌉`).
    pub fn stored_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Code `i`, or an error naming `i` when it is past the end.
    ///
    /// ```
    /// use quant_core::packing::PackedCodes;
    /// let packed = PackedCodes::pack(&[5, 6, 7], 3).unwrap();
    /// assert_eq!(packed.get(1).unwrap(), 6);
    /// assert!(packed.get(3).is_err());
    /// ```
    pub fn get(&self, i: usize) -> Result<u8> {
        if i >= self.len {
            return Err(QuantError::invalid(
                "code index",
                i,
                format!("only {} codes are stored", self.len),
            ));
        }
        Ok(self.code_at(i))
    }

    /// Code `i` for an index known to be in range.
    #[inline]
    fn code_at(&self, i: usize) -> u8 {
        let bits = self.bits as usize;
        match bits {
            8 => self.bytes[i],
            4 => (self.bytes[i / 2] >> (4 - 4 * (i % 2))) & 0x0F,
            2 => (self.bytes[i / 4] >> (6 - 2 * (i % 4))) & 0x03,
            _ => {
                // A code spans at most two bytes (bits ≤ 8): read them as one big-endian u16.
                let start = i * bits;
                let first = start / 8;
                let high = u16::from(self.bytes[first]) << 8;
                let low = self.bytes.get(first + 1).copied().map_or(0, u16::from);
                let window = high | low;
                let shift = 16 - bits - start % 8;
                ((window >> shift) & ((1u16 << bits) - 1)) as u8
            }
        }
    }

    /// All codes, in order.
    pub fn unpack(&self) -> Vec<u8> {
        let mut codes = Vec::with_capacity(self.len);
        match self.bits {
            8 => codes.extend_from_slice(&self.bytes),
            4 => {
                for &byte in &self.bytes {
                    codes.push(byte >> 4);
                    codes.push(byte & 0x0F);
                }
            }
            2 => {
                for &byte in &self.bytes {
                    codes.extend([byte >> 6, (byte >> 4) & 3, (byte >> 2) & 3, byte & 3]);
                }
            }
            3 => {
                for group in self.bytes.chunks(3) {
                    let word = group
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (k, &b)| acc | (u32::from(b) << (16 - 8 * k)));
                    codes.extend((0..8).map(|k| ((word >> (21 - 3 * k)) & 7) as u8));
                }
            }
            _ => codes.extend((0..self.len).map(|i| self.code_at(i))),
        }
        // Whole-byte decoding yields the padding codes of the tail too; drop them.
        codes.truncate(self.len);
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stored_bytes_follow_the_documented_sizes() {
        for (bits, len, bytes) in [
            (8, 5, 5),
            (4, 5, 3),
            (4, 4, 2),
            (2, 5, 2),
            (2, 8, 2),
            (3, 8, 3),
            (3, 9, 4),
            (3, 16, 6),
            (5, 3, 2),
        ] {
            let packed = PackedCodes::pack(&vec![0; len], bits).unwrap();
            assert_eq!(packed.stored_bytes(), bytes, "bits {bits} len {len}");
        }
    }

    #[test]
    fn three_bit_tail_uses_only_the_bytes_it_needs() {
        // 3 codes · 3 bits = 9 bits → 2 bytes: 111 000 1|01 then zero padding.
        let packed = PackedCodes::pack(&[7, 0, 5], 3).unwrap();
        assert_eq!(packed.bytes(), &[0b1110_0010, 0b1000_0000]);
        assert_eq!(packed.unpack(), vec![7, 0, 5]);
    }

    #[test]
    fn rejects_bad_widths_and_codes() {
        assert!(matches!(
            PackedCodes::pack(&[0], 0),
            Err(QuantError::BitsOutOfRange { bits: 0, .. })
        ));
        assert!(PackedCodes::pack(&[0], 9).is_err());
        let err = PackedCodes::pack(&[1, 2, 8, 9], 3).unwrap_err();
        assert!(err.to_string().contains("codes[2]"), "{err}");
    }

    #[test]
    fn deserialization_checks_the_byte_count() {
        let ok = r#"{"bits":4,"len":3,"bytes":[18,48]}"#;
        let packed: PackedCodes = serde_json::from_str(ok).unwrap();
        assert_eq!(packed.unpack(), vec![1, 2, 3]);
        let bad = r#"{"bits":4,"len":5,"bytes":[18,48]}"#;
        assert!(serde_json::from_str::<PackedCodes>(bad).is_err());
    }

    #[test]
    fn every_stored_width_round_trips_every_length_up_to_200() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for bits in [2u32, 3, 4, 8] {
            for len in 0..=200usize {
                let max = ((1u16 << bits) - 1) as u8;
                let codes: Vec<u8> = (0..len).map(|_| rng.random_range(0..=max)).collect();
                let packed = PackedCodes::pack(&codes, bits).unwrap();
                assert_eq!(packed.len(), len);
                assert_eq!(packed.unpack(), codes, "bits {bits} len {len}");
            }
        }
    }

    fn codes_strategy() -> impl Strategy<Value = (u32, Vec<u8>)> {
        (1u32..=8).prop_flat_map(|bits| {
            let max = ((1u16 << bits) - 1) as u8;
            (Just(bits), prop::collection::vec(0..=max, 0..=200))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trips_every_width_and_length((bits, codes) in codes_strategy()) {
            let packed = PackedCodes::pack(&codes, bits).unwrap();
            prop_assert_eq!(packed.stored_bytes(), (codes.len() * bits as usize).div_ceil(8));
            prop_assert_eq!(packed.unpack(), codes.clone());
            for (i, &c) in codes.iter().enumerate() {
                prop_assert_eq!(packed.get(i).unwrap(), c);
            }
            prop_assert!(packed.get(codes.len()).is_err());
        }

        #[test]
        fn fast_paths_match_the_generic_bit_stream((bits, codes) in codes_strategy()) {
            // Reference: write the MSB-first stream bit by bit.
            let mut expected = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
            for (i, &c) in codes.iter().enumerate() {
                for b in 0..bits as usize {
                    if (c >> (bits as usize - 1 - b)) & 1 == 1 {
                        let j = i * bits as usize + b;
                        expected[j / 8] |= 0x80 >> (j % 8);
                    }
                }
            }
            let packed = PackedCodes::pack(&codes, bits).unwrap();
            prop_assert_eq!(packed.bytes(), &expected[..]);
        }
    }
}
