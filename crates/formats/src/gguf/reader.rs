//! [`GgufFile`]: the header read with every length bounded by the bytes left in the file;
//! tensor data fetched on demand.

use super::*;

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
