//! Safetensors files one tensor at a time, for models larger than memory.
//!
//! The format: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each name
//! to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the
//! header, contiguous and in order, no holes) plus an optional `"__metadata__"` string map,
//! then the data. The `safetensors` crate's serializer needs every tensor in memory at once;
//! [`StreamingSafetensorsWriter`] instead computes the header from the declared dtypes and
//! shapes, writes it, then takes the tensors' bytes one by one in the declared order (through
//! a temporary file renamed into place by [`StreamingSafetensorsWriter::finish`]).
//! [`SafetensorsReader`] parses only the header and reads single tensors by seeking.
//!
//! ```
//! use formats::safetensors_stream::{SafetensorsReader, StreamingSafetensorsWriter};
//! use safetensors::Dtype;
//! let dir = std::env::temp_dir().join(format!("formats-sts-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("m.safetensors");
//! let specs = vec![("a".to_string(), Dtype::F32, vec![2]), ("b".to_string(), Dtype::U8, vec![3])];
//! let mut w = StreamingSafetensorsWriter::create(&path, &specs, None).unwrap();
//! w.write_tensor("a", &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
//! w.write_tensor("b", &[1, 2, 3]).unwrap();
//! w.finish().unwrap();
//! // The safetensors crate reads it back.
//! let bytes = std::fs::read(&path).unwrap();
//! let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
//! assert_eq!(st.tensor("b").unwrap().data(), &[1, 2, 3]);
//! let r = SafetensorsReader::open(&path).unwrap();
//! assert_eq!(r.read_f32("a").unwrap(), vec![1.0, 2.0]);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use crate::atomic::AtomicFile;
use crate::error::{FormatError, Result};

fn err(path: &Path, reason: impl std::fmt::Display) -> FormatError {
    FormatError::format(
        format!("safetensors file {}", path.display()),
        reason.to_string(),
    )
}

/// Bytes of `n` elements of `dtype` (whole bytes only: sub-byte dtypes are rejected).
pub fn dtype_bytes(dtype: Dtype, n: usize) -> Result<usize> {
    if dtype.bitsize() % 8 != 0 {
        return Err(FormatError::invalid(
            "safetensors dtype",
            format!("{dtype:?}"),
            "sub-byte dtypes are not supported",
        ));
    }
    n.checked_mul(dtype.bitsize() / 8).ok_or_else(|| {
        FormatError::shape(
            format!("{dtype:?} tensor"),
            "a size that fits in memory",
            format!("{n} elements"),
        )
    })
}

/// The number of elements of `shape`, `None` when the product overflows (a corrupt header).
pub fn checked_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Name, dtype and shape of a stored tensor, and where its bytes are in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Bytes of data.
    pub len: u64,
}

/// A safetensors file's header; tensor data is read on demand.
#[derive(Clone, Debug)]
pub struct SafetensorsReader {
    pub path: PathBuf,
    /// Tensors by name.
    pub tensors: BTreeMap<String, StoredTensorInfo>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<HashMap<String, String>>,
}

impl SafetensorsReader {
    /// Reads and checks the header of `path` (JSON, dtypes, shapes agreeing with the offsets,
    /// data inside the file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| err(path, format!("cannot stat: {e}")))?
            .len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| err(path, format!("header length: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len.saturating_sub(8) || header_len > 100_000_000 {
            return Err(err(
                path,
                format!("header length {header_len} exceeds the file"),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| err(path, format!("header: {e}")))?;
        let json: Map<String, Value> = serde_json::from_slice(&header)
            .map_err(|e| err(path, format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        let mut metadata = None;
        for (name, entry) in json {
            if name == "__metadata__" {
                let m: HashMap<String, String> = serde_json::from_value(entry)
                    .map_err(|e| err(path, format!("__metadata__: {e}")))?;
                metadata = Some(m);
                continue;
            }
            let bad = |reason: String| err(path, format!("tensor {name}: {reason}"));
            let dtype: Dtype = serde_json::from_value(entry["dtype"].clone())
                .map_err(|e| bad(format!("dtype: {e}")))?;
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone())
                .map_err(|e| bad(format!("shape: {e}")))?;
            let offsets: [u64; 2] = serde_json::from_value(entry["data_offsets"].clone())
                .map_err(|e| bad(format!("data_offsets: {e}")))?;
            let n = checked_len(&shape).ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
            let expected = dtype_bytes(dtype, n).map_err(|e| bad(e.to_string()))? as u64;
            if offsets[1] < offsets[0] || offsets[1] - offsets[0] != expected {
                return Err(bad(format!(
                    "data_offsets {offsets:?} do not hold {expected} bytes of {dtype:?} {shape:?}"
                )));
            }
            if data_start
                .checked_add(offsets[1])
                .is_none_or(|end| end > file_len)
            {
                return Err(bad("data past the end of the file".into()));
            }
            tensors.insert(
                name,
                StoredTensorInfo {
                    dtype,
                    shape,
                    start: data_start + offsets[0],
                    len: expected,
                },
            );
        }
        Ok(SafetensorsReader {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// The info of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&StoredTensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self
            .info(name)
            .ok_or_else(|| err(&self.path, format!("no tensor {name}")))?;
        let mut file =
            File::open(&self.path).map_err(|e| err(&self.path, format!("cannot open: {e}")))?;
        file.seek(SeekFrom::Start(info.start))
            .map_err(|e| err(&self.path, format!("seek to {name}: {e}")))?;
        let mut buf = vec![0u8; info.len as usize];
        file.read_exact(&mut buf)
            .map_err(|e| err(&self.path, format!("reading {name}: {e}")))?;
        Ok(buf)
    }

    /// Tensor `name` as `f32` (from F32, F16 or BF16).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .info(name)
            .ok_or_else(|| err(&self.path, format!("no tensor {name}")))?;
        let bytes = self.read_bytes(name)?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(|e| err(&self.path, format!("tensor {name}: {e}")))?;
        crate::io::tensor_to_f32(name, &view)
    }
}

/// Writes a safetensors file tensor by tensor (see the module docs).
pub struct StreamingSafetensorsWriter {
    path: PathBuf,
    out: AtomicFile,
    /// (name, bytes) in writing order.
    expected: Vec<(String, u64)>,
    next: usize,
}

impl std::fmt::Debug for StreamingSafetensorsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingSafetensorsWriter")
            .field("path", &self.path)
            .field("next", &self.next)
            .finish()
    }
}

impl StreamingSafetensorsWriter {
    /// Writes the header for `tensors` (name, dtype, shape, in the order their data will be
    /// written) and `metadata` to a temporary file beside `path`.
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: Option<&HashMap<String, String>>,
    ) -> Result<Self> {
        let mut header = Map::new();
        if let Some(m) = metadata {
            header.insert("__metadata__".into(), json!(m));
        }
        let mut offset = 0u64;
        let mut expected = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            if name == "__metadata__" || header.contains_key(name) {
                return Err(err(
                    path,
                    format!("duplicate or reserved tensor name {name}"),
                ));
            }
            let n: usize = shape.iter().product();
            let bytes = dtype_bytes(*dtype, n)? as u64;
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            expected.push((name.clone(), bytes));
            offset += bytes;
        }
        let mut text = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| err(path, format!("header: {e}")))?;
        // As the reference serializer: pad the header with spaces to a multiple of 8 so the
        // data starts aligned.
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let mut out = AtomicFile::create(path)?;
        out.write_bytes(&(text.len() as u64).to_le_bytes())?;
        out.write_bytes(&text)?;
        Ok(StreamingSafetensorsWriter {
            path: path.to_path_buf(),
            out,
            expected,
            next: 0,
        })
    }

    /// Appends the bytes of tensor `name`, which must be the next one declared.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (expected_name, len) = self
            .expected
            .get(self.next)
            .ok_or_else(|| err(&self.path, format!("tensor {name} after all declared ones")))?;
        if expected_name != name {
            return Err(err(
                &self.path,
                format!("tensor {name} written where {expected_name} was declared"),
            ));
        }
        if bytes.len() as u64 != *len {
            return Err(FormatError::shape(
                format!("safetensors tensor {name}"),
                format!("{len} bytes"),
                bytes.len(),
            ));
        }
        self.out.write_bytes(bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written, syncs and renames the file into place.
    /// Dropping the writer unfinished removes the temporary file.
    pub fn finish(self) -> Result<()> {
        self.finish_uncommitted()?.commit()
    }

    /// Checks every declared tensor was written and returns the file still under its
    /// temporary name, for [`crate::atomic::commit_in_order`] with the other files of one
    /// output (nothing replaces an old file before all new ones are complete).
    pub fn finish_uncommitted(self) -> Result<AtomicFile> {
        if let Some((missing, _)) = self.expected.get(self.next) {
            return Err(err(
                &self.path,
                format!("finished before tensor {missing} was written"),
            ));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_reference_serializer_writes_and_rejects_bad_offsets() {
        let dir = std::env::temp_dir().join(format!("formats-sts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ref.safetensors");
        let t = crate::io::OwnedTensor::f32(vec![2, 2], &[1.0, -2.0, 3.5, 4.0]).unwrap();
        crate::io::write_safetensors(&path, &[("w".into(), t)], None).unwrap();
        let r = SafetensorsReader::open(&path).unwrap();
        assert_eq!(r.info("w").unwrap().shape, vec![2, 2]);
        assert_eq!(r.read_f32("w").unwrap(), vec![1.0, -2.0, 3.5, 4.0]);
        assert!(r.read_bytes("missing").is_err());
        // Truncating the file puts the data past its end.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = SafetensorsReader::open(&path).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("formats-sts-unf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.safetensors");
        let specs = vec![("a".to_string(), Dtype::F32, vec![1])];
        let w = StreamingSafetensorsWriter::create(&path, &specs, None).unwrap();
        assert!(w.finish().is_err());
        let mut w = StreamingSafetensorsWriter::create(&path, &specs, None).unwrap();
        assert!(w.write_tensor("b", &[0; 4]).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
