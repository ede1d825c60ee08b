//! The project's own safetensors layout for uniform and Pi-quantized weights.
//!
//! A quantized 2-D weight `X` (stored form [`UniformQuantized`]) becomes up to four tensors:
//!
//! | key | dtype, shape | content |
//! |-----|--------------|---------|
//! | `X.qweight` | u8 `[⌈n·bits/8⌉]` | the codes `q − qmin`, packed MSB-first ([`crate::packing`]) |
//! | `X.qscale` | f32 `[groups]` | one step per group, groups in [`crate::uniform::GroupLayout`] order |
//! | `X.qzero` | u8 `[groups]` | asymmetric grids only: each group's zero point (the code of 0.0) |
//! | `X.qstate` | u8 `[len]` | UTF-8 JSON [`PackedState`]: format, version, grid, bits, granularity, symmetric, shape |
//!
//! Value `i` of group `g` dequantizes to `(code_i + qmin − zero_g)·scale_g` (zero 0 when
//! symmetric). For a Pi grid the stored scale is the step `α·π/k` itself, so a reader needs
//! nothing Pi-specific; `k` is kept in the state for provenance.
//!
//! ```
//! use ndarray::array;
//! use quant_core::packed_layout::{from_tensors, to_tensors};
//! use quant_core::quantizer::InitMethod;
//! use quant_core::uniform::{quantize_tensor, Granularity, GridKind, TensorQuantSpec};
//!
//! let w = array![[0.5f32, -1.0, 0.25], [2.0, 1.0, -2.0]];
//! let spec = TensorQuantSpec { kind: GridKind::Pi { k: 3 }, bits: 3,
//!     granularity: Granularity::PerChannel, symmetric: false, init: InitMethod::Absmax };
//! let q = quantize_tensor(w.view(), &spec).unwrap();
//! let tensors = to_tensors("w", &q, &spec).unwrap();
//! let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
//! assert_eq!(names, ["w.qweight", "w.qscale", "w.qzero", "w.qstate"]);
//! let (back, state) = from_tensors("w", |k| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone())).unwrap();
//! assert_eq!(back, q);
//! assert_eq!(state.grid, GridKind::Pi { k: 3 });
//! ```

use crate::error::{QuantError, Result};
use crate::io::OwnedTensor;
use crate::packing::PackedCodes;
use crate::uniform::{Granularity, GridKind, TensorQuantSpec, UniformQuantized};

/// Name of the layout in [`PackedState::format`].
pub const FORMAT_NAME: &str = "lora-qat.uniform";
/// Version of the layout in [`PackedState::version`].
pub const FORMAT_VERSION: u32 = 1;

/// The JSON stored under `X.qstate`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedState {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for files this version writes.
    pub version: u32,
    /// Uniform, or Pi with its `k`.
    pub grid: GridKind,
    /// Bits per code.
    pub bits: u32,
    /// Which weights share a scale.
    pub granularity: Granularity,
    /// Symmetric (no `X.qzero`) or asymmetric.
    pub symmetric: bool,
    /// `(rows, cols)` of the weight.
    pub shape: (usize, usize),
}

/// The tensors of the weight `name` in this layout (order: qweight, qscale, [qzero], qstate).
pub fn to_tensors(
    name: &str,
    q: &UniformQuantized,
    spec: &TensorQuantSpec,
) -> Result<Vec<(String, OwnedTensor)>> {
    let state = PackedState {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        grid: spec.kind,
        bits: q.bits(),
        granularity: q.granularity(),
        symmetric: q.symmetric(),
        shape: q.shape(),
    };
    let json = serde_json::to_vec(&state)
        .map_err(|e| QuantError::format(format!("{name}.qstate"), e.to_string()))?;
    let bytes = q.codes().bytes().to_vec();
    let mut out = vec![
        (
            format!("{name}.qweight"),
            OwnedTensor::u8(vec![bytes.len()], bytes)?,
        ),
        (
            format!("{name}.qscale"),
            OwnedTensor::f32(vec![q.scales().len()], q.scales())?,
        ),
    ];
    if !q.symmetric() {
        let zeros = q.zero_points().to_vec();
        out.push((
            format!("{name}.qzero"),
            OwnedTensor::u8(vec![zeros.len()], zeros)?,
        ));
    }
    out.push((
        format!("{name}.qstate"),
        OwnedTensor::u8(vec![json.len()], json)?,
    ));
    Ok(out)
}

/// Reads the weight `name` back; `lookup` returns the tensor stored under a key, if any.
/// Every inconsistency (missing key, wrong dtype, lengths that disagree with the state) is an
/// error naming the key.
pub fn from_tensors(
    name: &str,
    mut lookup: impl FnMut(&str) -> Option<OwnedTensor>,
) -> Result<(UniformQuantized, PackedState)> {
    let mut get = |suffix: &str, dtype: safetensors::Dtype| -> Result<OwnedTensor> {
        let key = format!("{name}.{suffix}");
        let t =
            lookup(&key).ok_or_else(|| QuantError::format(key.clone(), "missing from the file"))?;
        if t.dtype != dtype {
            return Err(QuantError::format(
                key,
                format!("dtype {:?}, expected {dtype:?}", t.dtype),
            ));
        }
        Ok(t)
    };
    use safetensors::Dtype;
    let state_key = format!("{name}.qstate");
    let state: PackedState = serde_json::from_slice(&get("qstate", Dtype::U8)?.data)
        .map_err(|e| QuantError::format(state_key.clone(), format!("invalid JSON: {e}")))?;
    if state.format != FORMAT_NAME || state.version != FORMAT_VERSION {
        return Err(QuantError::format(
            state_key,
            format!(
                "format {} version {} (this reader knows {FORMAT_NAME} version {FORMAT_VERSION})",
                state.format, state.version
            ),
        ));
    }
    let codes_len = state.shape.0 * state.shape.1;
    let codes = PackedCodes::from_bytes(state.bits, codes_len, get("qweight", Dtype::U8)?.data)
        .map_err(|e| QuantError::format(format!("{name}.qweight"), e.to_string()))?;
    let scales: Vec<f32> = get("qscale", Dtype::F32)?
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let zero_points = if state.symmetric {
        Vec::new()
    } else {
        get("qzero", Dtype::U8)?.data
    };
    let q = UniformQuantized::from_parts(
        state.shape,
        state.bits,
        state.granularity,
        state.symmetric,
        codes,
        scales,
        zero_points,
    )
    .map_err(|e| QuantError::format(format!("{name} (packed layout)"), e.to_string()))?;
    Ok((q, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantizer::InitMethod;
    use crate::uniform::quantize_tensor;
    use ndarray::Array2;
    use proptest::prelude::*;

    fn roundtrip(spec: TensorQuantSpec, w: &Array2<f32>) {
        let q = quantize_tensor(w.view(), &spec).unwrap();
        let tensors = to_tensors("m.w", &q, &spec).unwrap();
        let (back, state) = from_tensors("m.w", |k| {
            tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone())
        })
        .unwrap();
        assert_eq!(back, q);
        assert_eq!(state.grid, spec.kind);
        assert_eq!(back.dequantize(), q.dequantize());
    }

    proptest! {
        #[test]
        fn save_load_identity(
            rows in 1usize..6, cols in 1usize..40, bits in 2u32..=8, sym in any::<bool>(),
            pi in any::<bool>(), block in 1usize..9, g in 0usize..3, seed in any::<u64>(),
        ) {
            let w = Array2::from_shape_fn((rows, cols), |(r, c)| {
                (((r * 31 + c) as u64).wrapping_mul(seed | 1) % 1000) as f32 / 500.0 - 1.0
            });
            let granularity = [Granularity::PerTensor, Granularity::PerChannel,
                Granularity::PerBlock { size: block }][g];
            let kind = if pi { GridKind::Pi { k: 3 } } else { GridKind::Uniform };
            roundtrip(TensorQuantSpec { kind, bits, granularity, symmetric: sym,
                init: InitMethod::Absmax }, &w);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let w = Array2::from_shape_fn((2, 5), |(r, c)| (r + c) as f32 - 2.0);
        let spec = TensorQuantSpec {
            kind: GridKind::Uniform,
            bits: 3,
            granularity: Granularity::PerChannel,
            symmetric: false,
            init: InitMethod::Absmax,
        };
        let q = quantize_tensor(w.view(), &spec).unwrap();
        let tensors = to_tensors("x", &q, &spec).unwrap();
        let without = |skip: &str| {
            let tensors = tensors.clone();
            let skip = skip.to_string();
            move |k: &str| {
                (k != skip)
                    .then(|| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()))
                    .flatten()
            }
        };
        for key in ["x.qweight", "x.qscale", "x.qzero", "x.qstate"] {
            let err = from_tensors("x", without(key)).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let truncated = |k: &str| {
            tensors.iter().find(|(n, _)| n == k).map(|(n, t)| {
                let mut t = t.clone();
                if n == "x.qweight" {
                    t.data.pop();
                    t.shape = vec![t.data.len()];
                }
                t
            })
        };
        let err = from_tensors("x", truncated).unwrap_err().to_string();
        assert!(err.contains("x.qweight"), "{err}");
    }
}
