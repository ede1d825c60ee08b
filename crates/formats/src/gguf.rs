//! The GGUF container (version 3, little-endian), as llama.cpp and gguf-py read and write it:
//! a header (magic `GGUF`, version, tensor count, metadata count), typed metadata key/values,
//! tensor infos (name, dimensions innermost first, [`GgmlType`] id, offset into the data
//! section), zero padding up to `general.alignment` (32 when absent), then the tensor data,
//! each tensor starting at an aligned offset.
//!
//! [`GgufWriter`] streams: it computes every offset from the declared shapes and types, writes
//! the header to a temporary file next to the target, takes the tensors' bytes one at a time
//! in the declared order and renames the file into place only when all were written, so an
//! interrupted or failed export never leaves a half-written file under the final name.
//! [`GgufFile`] reads the header and fetches single tensors (or bands of their rows) by
//! seeking. This module knows nothing of models or quantizers: names and metadata are the
//! caller's, and decoding blocks to `f32` is `quant_core::ggml`'s (which also adds
//! `read_tensor_f32` / `write_tensor_f32` to these types, in `quant_core::gguf`).
//!
//! Shapes in this API are row-major (`[rows, cols]`, as numpy and safetensors); the file
//! stores them reversed (`ne[0]` = the contiguous dimension), as ggml does.
//!
//! ```
//! use formats::GgmlType;
//! use formats::gguf::{GgufFile, GgufValue, GgufWriter, TensorSpec};
//! let dir = std::env::temp_dir().join(format!("formats-gguf-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("t.gguf");
//! let meta = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
//! let specs = vec![TensorSpec::new("w", vec![2, 3], GgmlType::F32)];
//! let mut writer = GgufWriter::create(&path, &meta, &specs).unwrap();
//! let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
//! writer.write_tensor("w", &bytes).unwrap();
//! writer.finish().unwrap();
//! let file = GgufFile::open(&path).unwrap();
//! assert_eq!(file.metadata_str("general.architecture"), Some("llama"));
//! assert_eq!(file.tensor("w").unwrap().shape, vec![2, 3]);
//! assert_eq!(file.read_tensor_bytes("w").unwrap(), bytes);
//! // Rows 1..2 only, read by seeking:
//! assert_eq!(file.read_tensor_rows_bytes("w", 1..2).unwrap(), bytes[12..]);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::atomic::AtomicFile;
use crate::error::{FormatError, Result};
use crate::ggml_type::GgmlType;

/// `GGUF` as the first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this module writes (it reads 2 and 3, which share the layout).
pub const VERSION: u32 = 3;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

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

    fn elem_type(&self) -> u32 {
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

/// A tensor to be written: name, row-major shape, type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, ty: GgmlType) -> Self {
        TensorSpec {
            name: name.into(),
            shape,
            ty,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tensor as listed in a file: its spec, data offset (relative to the data section) and size.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (the file's dimensions reversed).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the first byte relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::format(
        format!("GGUF file {}", path.display()),
        format!("{what}: {e}"),
    )
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

fn alignment_of(metadata: &[(String, GgufValue)], context: &str) -> Result<u64> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, GgufValue::U32(a))) if *a > 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(FormatError::format(
            context,
            format!("{ALIGNMENT_KEY} is {v:?}, expected a power-of-two u32"),
        )),
    }
}

/// Writes a GGUF file tensor by tensor (see the module docs).
pub struct GgufWriter {
    path: PathBuf,
    out: AtomicFile,
    infos: Vec<TensorInfo>,
    next: usize,
    /// Bytes of data written so far (relative to the data section).
    written: u64,
    alignment: u64,
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("path", &self.path)
            .field("next", &self.next)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl GgufWriter {
    /// Writes the header, metadata and tensor infos of `tensors` (offsets computed from their
    /// shapes and types) to a temporary file beside `path`. Errors on duplicate names, a
    /// shape that is not a whole number of blocks along its rows, or an unwritable directory.
    pub fn create(
        path: &Path,
        metadata: &[(String, GgufValue)],
        tensors: &[TensorSpec],
    ) -> Result<Self> {
        let context = format!("GGUF file {}", path.display());
        let alignment = alignment_of(metadata, &context)?;
        let mut seen = std::collections::HashSet::new();
        for (k, _) in metadata {
            if !seen.insert(k.as_str()) {
                return Err(FormatError::format(&context, format!("duplicate key {k}")));
            }
        }
        let mut infos = Vec::with_capacity(tensors.len());
        let mut names = std::collections::HashSet::new();
        let mut offset = 0u64;
        for spec in tensors {
            if !names.insert(spec.name.as_str()) {
                return Err(FormatError::format(
                    &context,
                    format!("duplicate tensor {}", spec.name),
                ));
            }
            let row = spec.shape.last().copied().unwrap_or(1);
            if row % spec.ty.block_values() != 0 {
                return Err(FormatError::shape(
                    format!("{context}: tensor {} of type {}", spec.name, spec.ty.name()),
                    format!("rows of a multiple of {} values", spec.ty.block_values()),
                    format!("{:?}", spec.shape),
                ));
            }
            let size = spec.ty.bytes_for(spec.len())? as u64;
            infos.push(TensorInfo {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                ty: spec.ty,
                offset,
                size,
            });
            offset = align_up(offset + size, alignment);
        }

        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(infos.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut header, value);
        }
        for info in &infos {
            put_string(&mut header, &info.name);
            header.extend_from_slice(&(info.shape.len() as u32).to_le_bytes());
            for &d in info.shape.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&info.ty.id().to_le_bytes());
            header.extend_from_slice(&info.offset.to_le_bytes());
        }
        let padded = align_up(header.len() as u64, alignment) as usize;
        header.resize(padded, 0);

        let mut out = AtomicFile::create(path)?;
        out.write_bytes(&header)?;
        Ok(GgufWriter {
            path: path.to_path_buf(),
            out,
            infos,
            next: 0,
            written: 0,
            alignment,
        })
    }

    /// The tensor infos with their computed offsets, in writing order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// Name of the next tensor expected, if any.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.infos.get(self.next)
    }

    /// Appends the encoded bytes of tensor `name`, which must be the next one declared.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let info = self.infos.get(self.next).ok_or_else(|| {
            FormatError::format(
                format!("GGUF file {}", self.path.display()),
                format!("tensor {name} written after all declared tensors"),
            )
        })?;
        if info.name != name {
            return Err(FormatError::format(
                format!("GGUF file {}", self.path.display()),
                format!("tensor {name} written where {} was declared", info.name),
            ));
        }
        if bytes.len() as u64 != info.size {
            return Err(FormatError::shape(
                format!("GGUF tensor {name}"),
                format!("{} bytes", info.size),
                bytes.len(),
            ));
        }
        debug_assert_eq!(self.written, info.offset);
        let end = align_up(info.offset + info.size, self.alignment);
        let pad = (end - info.offset - info.size) as usize;
        self.out.write_bytes(bytes)?;
        self.out.write_bytes(&vec![0u8; pad])?;
        self.written = end;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written, flushes, syncs and renames the file into
    /// place. Dropping the writer without calling this removes the temporary file.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.infos.get(self.next) {
            return Err(FormatError::format(
                format!("GGUF file {}", self.path.display()),
                format!(
                    "finished with {} of {} tensors written (next: {})",
                    self.next,
                    self.infos.len(),
                    missing.name
                ),
            ));
        }
        self.out.commit()
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => buf.push(*v),
        GgufValue::I8(v) => buf.push(*v as u8),
        GgufValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => buf.push(u8::from(*v)),
        GgufValue::String(s) => put_string(buf, s),
        GgufValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Array(a) => {
            buf.extend_from_slice(&a.elem_type().to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                GgufArray::String(v) => v.iter().for_each(|s| put_string(buf, s)),
                GgufArray::F32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                GgufArray::I32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                GgufArray::U32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                GgufArray::Other(_, v) => v.iter().for_each(|x| put_value(buf, x)),
            }
        }
    }
}

/// A GGUF file's header, read; tensors are fetched on demand.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

struct HeaderReader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    /// Bytes left in the file, bounding every length read (no huge allocations on garbage).
    remaining: u64,
    position: u64,
}

impl HeaderReader<'_> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.remaining {
            return Err(io_err(
                self.path,
                "truncated or corrupt header",
                format!(
                    "{what} of {n} bytes at offset {} past the end of the file",
                    self.position
                ),
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| io_err(self.path, "read failed", e))?;
        self.remaining -= n;
        self.position += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("length N"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes).map_err(|e| io_err(self.path, &format!("{what} is not UTF-8"), e))
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            9 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: bounds n before allocating.
                if n > self.remaining {
                    return Err(io_err(
                        self.path,
                        "corrupt header",
                        format!("{what}: array of {n} elements exceeds the file"),
                    ));
                }
                let n = n as usize;
                GgufValue::Array(match elem {
                    8 => {
                        GgufArray::String((0..n).map(|_| self.string(what)).collect::<Result<_>>()?)
                    }
                    6 => GgufArray::F32(
                        (0..n)
                            .map(|_| Ok(f32::from_le_bytes(self.array(what)?)))
                            .collect::<Result<_>>()?,
                    ),
                    5 => GgufArray::I32(
                        (0..n)
                            .map(|_| Ok(i32::from_le_bytes(self.array(what)?)))
                            .collect::<Result<_>>()?,
                    ),
                    4 => GgufArray::U32((0..n).map(|_| self.u32(what)).collect::<Result<_>>()?),
                    9 => {
                        return Err(io_err(
                            self.path,
                            "unsupported metadata",
                            format!("{what}: nested arrays"),
                        ))
                    }
                    other => GgufArray::Other(
                        other,
                        (0..n)
                            .map(|_| self.value(other, what))
                            .collect::<Result<_>>()?,
                    ),
                })
            }
            other => {
                return Err(io_err(
                    self.path,
                    "corrupt header",
                    format!("{what}: unknown value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Reads and checks the header of the GGUF file at `path` (magic, version 2 or 3,
    /// metadata, tensor infos, aligned offsets inside the file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err(path, "cannot stat", e))?
            .len();
        let mut r = HeaderReader {
            inner: BufReader::new(file),
            path,
            remaining: len,
            position: 0,
        };
        let magic: [u8; 4] = r.array("magic")?;
        if magic != MAGIC {
            return Err(io_err(
                path,
                "not a GGUF file",
                format!("magic {magic:?}, expected \"GGUF\""),
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(io_err(
                path,
                "unsupported version",
                format!("{version} (this reader handles 2 and 3)"),
            ));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let mut metadata = Vec::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of {key}"))?;
            let value = r.value(ty, &key)?;
            if metadata.iter().any(|(k, _)| *k == key) {
                // llama.cpp refuses a repeated key too: which value would count is undefined.
                return Err(io_err(
                    path,
                    "corrupt metadata",
                    format!("duplicate key {key}"),
                ));
            }
            metadata.push((key, value));
        }
        let alignment = alignment_of(&metadata, &format!("GGUF file {}", path.display()))?;
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name #{i}"))?;
            let n_dims = r.u32(&format!("dimensions of {name}"))?;
            if n_dims > 4 {
                return Err(io_err(
                    path,
                    "corrupt tensor info",
                    format!("{name}: {n_dims} dimensions (ggml has at most 4)"),
                ));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(r.u64(&format!("dimension of {name}"))? as usize);
            }
            shape.reverse();
            let ty = GgmlType::from_id(r.u32(&format!("type of {name}"))?)
                .map_err(|e| io_err(path, &format!("tensor {name}"), e))?;
            let offset = r.u64(&format!("offset of {name}"))?;
            if offset % alignment != 0 {
                return Err(io_err(
                    path,
                    "corrupt tensor info",
                    format!(
                        "{name}: offset {offset} is not a multiple of the alignment {alignment}"
                    ),
                ));
            }
            let row = shape.last().copied().unwrap_or(1);
            if row % ty.block_values() != 0 {
                return Err(io_err(
                    path,
                    "corrupt tensor info",
                    format!(
                        "{name}: rows of {row} values are not whole {} blocks of {}",
                        ty.name(),
                        ty.block_values()
                    ),
                ));
            }
            let n = crate::safetensors_stream::checked_len(&shape).ok_or_else(|| {
                io_err(
                    path,
                    "corrupt tensor info",
                    format!("{name}: dimensions {shape:?} overflow"),
                )
            })?;
            let size = ty
                .bytes_for(n)
                .map_err(|e| io_err(path, &format!("tensor {name}"), e))?
                as u64;
            if tensors.iter().any(|t: &TensorInfo| t.name == name) {
                return Err(io_err(
                    path,
                    "corrupt tensor info",
                    format!("duplicate tensor name {name}"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                shape,
                ty,
                offset,
                size,
            });
        }
        let data_offset = align_up(r.position, alignment);
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|e| e.checked_add(t.size));
            if end.is_none_or(|e| e > len) {
                return Err(io_err(
                    path,
                    "truncated file",
                    format!("tensor {} ends past the end of the file", t.name),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The string metadata value under `key`.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.metadata(key) {
            Some(GgufValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of tensor `name`.
    pub fn read_tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info_or_err(name)?;
        self.read_at(name, info.offset, info.size)
    }

    /// The stored bytes of rows `rows` of tensor `name` (rows along its first row-major
    /// dimension, a 1-D tensor being one row; every row is a whole number of blocks, as the
    /// writer and reader check).
    pub fn read_tensor_rows_bytes(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<u8>> {
        let info = self.info_or_err(name)?;
        // A 1-D tensor is one row (its values may be blocks).
        let n_rows = if info.shape.len() >= 2 {
            info.shape[0]
        } else {
            1
        };
        if rows.start > rows.end || rows.end > n_rows {
            return Err(FormatError::shape(
                format!("GGUF tensor {name} of shape {:?}", info.shape),
                format!("a row range within 0..{n_rows}"),
                format!("{rows:?}"),
            ));
        }
        let row_bytes = if n_rows == 0 {
            0
        } else {
            info.size / n_rows as u64
        };
        self.read_at(
            name,
            info.offset + rows.start as u64 * row_bytes,
            (rows.end - rows.start) as u64 * row_bytes,
        )
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| {
            FormatError::format(
                format!("GGUF file {}", self.path.display()),
                format!("no tensor {name}"),
            )
        })
    }

    /// `len` bytes at `offset` into the data section (checked inside the file by `open`).
    fn read_at(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut file = File::open(&self.path).map_err(|e| io_err(&self.path, "cannot open", e))?;
        file.seek(SeekFrom::Start(self.data_offset + offset))
            .map_err(|e| io_err(&self.path, "seek failed", e))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact(&mut buf)
            .map_err(|e| io_err(&self.path, &format!("reading tensor {name}"), e))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
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
}
