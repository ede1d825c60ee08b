//! The tensors transformers writes for a bitsandbytes 4-bit checkpoint, and back.
//!
//! A quantized weight named `X` becomes (bitsandbytes' `QuantState.as_dict(packed=True)`):
//!
//! | name | dtype | shape | content |
//! |---|---|---|---|
//! | `X` | u8 | `[ceil(n/2), 1]` | packed codes, first element in the high nibble |
//! | `X.absmax` | u8 / f32 | `[blocks]` | 8-bit absmax codes when double-quantized, else f32 absmaxes |
//! | `X.quant_map` | f32 | `[16]` | the 4-bit codebook |
//! | `X.nested_absmax` | f32 | `[ceil(blocks/256)]` | second-level absmaxes (double quant only) |
//! | `X.nested_quant_map` | f32 | `[256]` | the 8-bit dynamic map (double quant only) |
//! | `X.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8 | `[len]` | UTF-8 JSON, see [`quant_state_json`] |
//!
//! Tensors are given in a crate-neutral form, [`BnbTensor`] (dtype, shape, little-endian
//! bytes), so any safetensors writer can store them; [`from_bnb_tensors`] reads them back
//! through a lookup closure, and [`from_safetensors`] wraps it for a loaded
//! `safetensors::SafeTensors`.
//!
//! ```
//! use quant_core::nf4::{FourBitTensor, FourBitType};
//! use quant_core::nf4::bnb_layout::{from_bnb_tensors, to_bnb_tensors};
//! use std::collections::HashMap;
//!
//! let w: Vec<f32> = (0..64 * 32).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
//! let q = FourBitTensor::quantize(&w, &[64, 32], 64, FourBitType::Nf4, true).unwrap();
//! let tensors: HashMap<_, _> = to_bnb_tensors("proj.weight", &q).into_iter().collect();
//! assert_eq!(tensors["proj.weight"].shape, vec![1024, 1]);
//! let back = from_bnb_tensors("proj.weight", |name| tensors.get(name).cloned()).unwrap();
//! assert_eq!(back, q);
//! ```

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{BlockScales, DoubleQuantAbsmax, FourBitTensor, FourBitType, DYNAMIC_MAP_LEN};
use crate::error::{QuantError, Result};

/// Element type of a [`BnbTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnbDtype {
    /// Unsigned bytes.
    U8,
    /// Little-endian IEEE `f32`.
    F32,
}

impl BnbDtype {
    fn size(self) -> usize {
        match self {
            BnbDtype::U8 => 1,
            BnbDtype::F32 => 4,
        }
    }
}

/// One stored tensor: dtype, shape and its raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbTensor {
    /// Element type.
    pub dtype: BnbDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw little-endian data, `shape.product() · dtype size` bytes.
    pub bytes: Vec<u8>,
}

impl BnbTensor {
    /// A u8 tensor.
    pub fn from_u8(shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        BnbTensor {
            dtype: BnbDtype::U8,
            shape,
            bytes,
        }
    }

    /// An f32 tensor, stored little-endian.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        BnbTensor {
            dtype: BnbDtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Checks dtype and that the byte length matches the shape.
    fn checked(&self, name: &str, dtype: BnbDtype) -> Result<()> {
        if self.dtype != dtype {
            return Err(QuantError::format(
                format!("bnb tensor {name}"),
                format!("dtype is {:?}, expected {dtype:?}", self.dtype),
            ));
        }
        let numel: usize = self.shape.iter().product();
        if numel * dtype.size() != self.bytes.len() {
            return Err(QuantError::format(
                format!("bnb tensor {name}"),
                format!(
                    "{} bytes for shape {:?} of {dtype:?}",
                    self.bytes.len(),
                    self.shape
                ),
            ));
        }
        Ok(())
    }

    fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.checked(name, BnbDtype::F32)?;
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn to_u8(&self, name: &str) -> Result<Vec<u8>> {
        self.checked(name, BnbDtype::U8)?;
        Ok(self.bytes.clone())
    }
}

/// Formats a float as Python's `repr` does (shortest round-trip digits; exponent form below
/// 1e-4 or from 1e16 up, with a signed two-digit exponent; `.0` on integral values) — what
/// `json.dumps` writes for `nested_offset`.
///
/// ```
/// use quant_core::nf4::bnb_layout::python_float_repr;
/// assert_eq!(python_float_repr(0.05326412245631218), "0.05326412245631218");
/// assert_eq!(python_float_repr(1e-5), "1e-05");
/// assert_eq!(python_float_repr(0.0001), "0.0001");
/// assert_eq!(python_float_repr(2.0), "2.0");
/// assert_eq!(python_float_repr(-1.5e16), "-1.5e+16");
/// assert_eq!(python_float_repr(1234567.0), "1234567.0");
/// ```
pub fn python_float_repr(value: f64) -> String {
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .to_string();
    }
    if !value.is_finite() {
        // Python's json.dumps spelling (allow_nan=True).
        return if value.is_nan() {
            "NaN".to_string()
        } else if value > 0.0 {
            "Infinity".to_string()
        } else {
            "-Infinity".to_string()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits as `d.ddde±x`.
    let sci = format!("{:e}", value.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} always has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if value < 0.0 { "-" } else { "" };
    // Position of the decimal point after the first `decpt` digits.
    let decpt = exponent + 1;
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exponent < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exponent.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(decpt as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// The quant-state JSON bitsandbytes packs into `X.quant_state.bitsandbytes__<type>`,
/// byte-for-byte as Python's `json.dumps` writes it: keys `quant_type, blocksize, dtype,
/// shape` and, when double-quantized, `nested_blocksize, nested_dtype, nested_offset`.
///
/// ```
/// use quant_core::nf4::{FourBitTensor, FourBitType};
/// use quant_core::nf4::bnb_layout::quant_state_json;
/// let q = FourBitTensor::quantize(&[1.0; 64], &[2, 32], 64, FourBitType::Fp4, false).unwrap();
/// assert_eq!(quant_state_json(&q),
///     r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [2, 32]}"#);
/// ```
pub fn quant_state_json(tensor: &FourBitTensor) -> String {
    let shape: Vec<String> = tensor.shape().iter().map(|d| d.to_string()).collect();
    let mut json = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{}]",
        tensor.quant_type().name(),
        tensor.blocksize(),
        shape.join(", ")
    );
    if let BlockScales::DoubleQuant(dq) = tensor.scales() {
        json.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            dq.blocksize2,
            python_float_repr(f64::from(dq.offset))
        ));
    }
    json.push('}');
    json
}

/// Name of the quant-state tensor of `name`.
pub fn quant_state_key(name: &str, quant_type: FourBitType) -> String {
    format!("{name}.quant_state.bitsandbytes__{}", quant_type.name())
}

/// The tensors transformers saves for the 4-bit weight `name` (see the module docs).
pub fn to_bnb_tensors(name: &str, tensor: &FourBitTensor) -> Vec<(String, BnbTensor)> {
    let packed = tensor.packed().to_vec();
    let mut out = vec![(
        name.to_string(),
        BnbTensor::from_u8(vec![packed.len(), 1], packed),
    )];
    match tensor.scales() {
        BlockScales::Plain(absmax) => out.push((
            format!("{name}.absmax"),
            BnbTensor::from_f32(vec![absmax.len()], absmax),
        )),
        BlockScales::DoubleQuant(dq) => {
            out.push((
                format!("{name}.absmax"),
                BnbTensor::from_u8(vec![dq.codes.len()], dq.codes.clone()),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                BnbTensor::from_f32(vec![dq.absmax2.len()], &dq.absmax2),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                BnbTensor::from_f32(vec![dq.code2.len()], &dq.code2),
            ));
        }
    }
    out.push((
        format!("{name}.quant_map"),
        BnbTensor::from_f32(vec![16], tensor.quant_type().code()),
    ));
    let json = quant_state_json(tensor).into_bytes();
    out.push((
        quant_state_key(name, tensor.quant_type()),
        BnbTensor::from_u8(vec![json.len()], json),
    ));
    out
}

fn field<'a>(ctx: &str, state: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a Value> {
    state
        .get(key)
        .ok_or_else(|| QuantError::format(ctx, format!("missing key \"{key}\"")))
}

fn usize_field(ctx: &str, state: &serde_json::Map<String, Value>, key: &str) -> Result<usize> {
    field(ctx, state, key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| QuantError::format(ctx, format!("\"{key}\" is not a non-negative integer")))
}

fn float_dtype_field(ctx: &str, state: &serde_json::Map<String, Value>, key: &str) -> Result<()> {
    match field(ctx, state, key)?.as_str() {
        Some("float32" | "float16" | "bfloat16") => Ok(()),
        other => Err(QuantError::format(
            ctx,
            format!("\"{key}\" is {other:?}, expected float32, float16 or bfloat16"),
        )),
    }
}

/// Reads the 4-bit weight `name` back from its bnb tensors, fetched by `lookup(tensor_name)`.
///
/// Errors (as [`QuantError::Format`] naming the tensor) when a tensor is missing, has the
/// wrong dtype or length, the JSON is malformed or names an unknown quant type, or the stored
/// `quant_map` is not the built-in table of that type.
pub fn from_bnb_tensors(
    name: &str,
    mut lookup: impl FnMut(&str) -> Option<BnbTensor>,
) -> Result<FourBitTensor> {
    // The key's suffix tells the type; the JSON must agree.
    let (state_key, key_type, state_tensor) = [FourBitType::Nf4, FourBitType::Fp4]
        .into_iter()
        .find_map(|t| {
            let key = quant_state_key(name, t);
            lookup(&key).map(|tensor| (key, t, tensor))
        })
        .ok_or_else(|| {
            QuantError::format(
                format!("bnb weight {name}"),
                format!("missing tensor {name}.quant_state.bitsandbytes__<nf4|fp4>"),
            )
        })?;
    let mut get = |key: String| {
        lookup(&key).ok_or_else(|| {
            QuantError::format(
                format!("bnb weight {name}"),
                format!("missing tensor {key}"),
            )
        })
    };
    let ctx = state_key.as_str();
    let json_bytes = state_tensor.to_u8(ctx)?;
    let state: Value = serde_json::from_slice(&json_bytes)
        .map_err(|e| QuantError::format(ctx, format!("not valid JSON: {e}")))?;
    let state = state
        .as_object()
        .ok_or_else(|| QuantError::format(ctx, "JSON is not an object"))?;

    let type_name = field(ctx, state, "quant_type")?
        .as_str()
        .ok_or_else(|| QuantError::format(ctx, "\"quant_type\" is not a string"))?;
    let quant_type = FourBitType::from_name(type_name).map_err(|_| {
        QuantError::format(
            ctx,
            format!("unknown quant_type \"{type_name}\" (expected nf4 or fp4)"),
        )
    })?;
    if quant_type != key_type {
        return Err(QuantError::format(
            ctx,
            format!("quant_type \"{type_name}\" disagrees with the tensor name"),
        ));
    }
    let blocksize = usize_field(ctx, state, "blocksize")?;
    float_dtype_field(ctx, state, "dtype")?;
    let shape: Vec<usize> = field(ctx, state, "shape")?
        .as_array()
        .ok_or_else(|| QuantError::format(ctx, "\"shape\" is not a list"))?
        .iter()
        .map(|d| d.as_u64().and_then(|v| usize::try_from(v).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| QuantError::format(ctx, "\"shape\" holds a non-integer"))?;

    let packed = get(name.to_string())?.to_u8(name)?;
    let quant_map_key = format!("{name}.quant_map");
    let quant_map = get(quant_map_key.clone())?.to_f32(&quant_map_key)?;
    if quant_map.as_slice() != quant_type.code().as_slice() {
        return Err(QuantError::format(
            quant_map_key,
            format!("does not match the built-in {type_name} table"),
        ));
    }

    let absmax_key = format!("{name}.absmax");
    let absmax = get(absmax_key.clone())?;
    let scales = if state.contains_key("nested_blocksize") {
        let blocksize2 = usize_field(ctx, state, "nested_blocksize")?;
        float_dtype_field(ctx, state, "nested_dtype")?;
        let offset = field(ctx, state, "nested_offset")?
            .as_f64()
            .ok_or_else(|| QuantError::format(ctx, "\"nested_offset\" is not a number"))?
            as f32;
        let nested_key = format!("{name}.nested_absmax");
        let map_key = format!("{name}.nested_quant_map");
        let absmax2 = get(nested_key.clone())?.to_f32(&nested_key)?;
        let code2 = get(map_key.clone())?.to_f32(&map_key)?;
        if code2.len() != DYNAMIC_MAP_LEN {
            return Err(QuantError::format(
                map_key,
                format!("{} entries, expected {DYNAMIC_MAP_LEN}", code2.len()),
            ));
        }
        BlockScales::DoubleQuant(DoubleQuantAbsmax {
            codes: absmax.to_u8(&absmax_key)?,
            absmax2,
            offset,
            code2,
            blocksize2,
        })
    } else {
        BlockScales::Plain(absmax.to_f32(&absmax_key)?)
    };

    FourBitTensor::from_parts(shape, blocksize, quant_type, packed, scales).map_err(|e| {
        QuantError::format(
            format!("bnb weight {name}"),
            format!("inconsistent parts: {e}"),
        )
    })
}

/// [`from_bnb_tensors`] reading from a loaded safetensors file.
pub fn from_safetensors(name: &str, file: &SafeTensors<'_>) -> Result<FourBitTensor> {
    // A tensor of a dtype no bnb 4-bit part uses is reported by name instead of as missing.
    let mut unsupported: Option<QuantError> = None;
    let result = from_bnb_tensors(name, |key| {
        let view = file.tensor(key).ok()?;
        let dtype = match view.dtype() {
            Dtype::U8 => BnbDtype::U8,
            Dtype::F32 => BnbDtype::F32,
            other => {
                unsupported.get_or_insert_with(|| {
                    QuantError::format(
                        format!("bnb tensor {key}"),
                        format!("dtype {other:?} is neither U8 nor F32"),
                    )
                });
                return None;
            }
        };
        Some(BnbTensor {
            dtype,
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        })
    });
    match (result, unsupported) {
        (Err(_), Some(err)) => Err(err),
        (result, _) => result,
    }
}

/// Names of the 4-bit weights stored in a safetensors file (every `X` with an
/// `X.quant_state.bitsandbytes__*` entry), sorted.
pub fn bnb_weight_names(file: &SafeTensors<'_>) -> Vec<String> {
    let mut names: Vec<String> = file
        .names()
        .into_iter()
        .filter_map(|n| {
            n.strip_suffix(".quant_state.bitsandbytes__nf4")
                .or_else(|| n.strip_suffix(".quant_state.bitsandbytes__fp4"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

impl From<BnbTensor> for crate::io::OwnedTensor {
    fn from(t: BnbTensor) -> Self {
        crate::io::OwnedTensor {
            dtype: match t.dtype {
                BnbDtype::U8 => safetensors::Dtype::U8,
                BnbDtype::F32 => safetensors::Dtype::F32,
            },
            shape: t.shape,
            data: t.bytes,
        }
    }
}
