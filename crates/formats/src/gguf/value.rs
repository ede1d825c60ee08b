//! GGUF metadata values and arrays: their type ids, accessors and one-line summaries.

/// A metadata value with its GGUF type.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// A homogeneous array: the element type id and the elements.
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The arrays GGUF metadata uses (token lists, scores, token types, merges, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    String(Vec<String>),
    F32(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    /// Any other element type, kept as read (element type id, values).
    Other(u32, Vec<GgufValue>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::String(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::Other(_, v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn elem_type(&self) -> u32 {
        match self {
            GgufArray::String(_) => 8,
            GgufArray::F32(_) => 6,
            GgufArray::I32(_) => 5,
            GgufArray::U32(_) => 4,
            GgufArray::Other(t, _) => *t,
        }
    }
}

impl GgufValue {
    /// The GGUF value type id (`GGUF_TYPE_*`).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// An unsigned integer value of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float value (`F32` or `F64`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays summarised by type and length).
    pub fn summary(&self) -> String {
        match self {
            GgufValue::String(s) => format!("{s:?}"),
            GgufValue::Array(a) => {
                let head = match a {
                    GgufArray::String(v) => format!("{:?}", &v[..v.len().min(5)]),
                    GgufArray::F32(v) => format!("{:?}", &v[..v.len().min(5)]),
                    GgufArray::I32(v) => format!("{:?}", &v[..v.len().min(5)]),
                    GgufArray::U32(v) => format!("{:?}", &v[..v.len().min(5)]),
                    GgufArray::Other(_, v) => format!("{:?}", &v[..v.len().min(5)]),
                };
                format!("array[{}] of type {} {head}", a.len(), a.elem_type())
            }
            GgufValue::U8(v) => v.to_string(),
            GgufValue::I8(v) => v.to_string(),
            GgufValue::U16(v) => v.to_string(),
            GgufValue::I16(v) => v.to_string(),
            GgufValue::U32(v) => v.to_string(),
            GgufValue::I32(v) => v.to_string(),
            GgufValue::F32(v) => v.to_string(),
            GgufValue::Bool(v) => v.to_string(),
            GgufValue::U64(v) => v.to_string(),
            GgufValue::I64(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
        }
    }
}
