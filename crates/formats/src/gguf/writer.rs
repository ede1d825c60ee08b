//! [`GgufWriter`]: header, metadata and tensor infos up front, then tensor data streamed
//! in declared order through the crash-safe writer.

use super::*;

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
