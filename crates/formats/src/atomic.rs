//! The one crash-safe file write of the workspace.
//!
//! A file is written under a temporary name in the same directory (a rename is atomic only
//! within one file system), flushed and fsynced, renamed over the final name, and then the
//! directory is fsynced so the rename itself survives a power loss. Until [`AtomicFile::commit`]
//! the final name holds the old file, whole; dropping an uncommitted [`AtomicFile`] (an error,
//! a panic, an early return) deletes the temporary file.
//!
//! ```
//! use std::io::Write;
//! use formats::atomic::AtomicFile;
//! let dir = std::env::temp_dir().join(format!("formats-atomic-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("out.bin");
//! let mut file = AtomicFile::create(&path).unwrap();
//! file.write_all(b"streamed ").unwrap();
//! file.write_all(b"content").unwrap();
//! assert!(!path.exists(), "nothing under the final name before commit");
//! file.commit().unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"streamed content");
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{FormatError, Result};

/// A file being written under a temporary name; [`AtomicFile::commit`] puts it in place.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl std::fmt::Debug for AtomicFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicFile")
            .field("path", &self.path)
            .field("tmp", &self.tmp)
            .finish()
    }
}

/// A temporary name beside `path`, unique within this process (pid + counter), hidden.
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

impl AtomicFile {
    /// Creates the temporary file beside `path` (1 MiB write buffer).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| FormatError::io(&tmp, "cannot create", e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Writes all of `bytes`, with an error naming the temporary file.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let tmp = &self.tmp;
        self.out
            .as_mut()
            .expect("open until commit")
            .write_all(bytes)
            .map_err(|e| FormatError::io(tmp, "write failed", e))
    }

    /// Flushes, fsyncs the file, renames it over the final path and fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("open until commit");
        let result = (|| {
            let file = out
                .into_inner()
                .map_err(|e| FormatError::io(&self.tmp, "write failed", e.into_error()))?;
            file.sync_all()
                .map_err(|e| FormatError::io(&self.tmp, "sync failed", e))?;
            drop(file);
            std::fs::rename(&self.tmp, &self.path)
                .map_err(|e| FormatError::io(&self.path, "rename failed", e))?;
            sync_parent_dir(&self.path)
        })();
        if result.is_err() {
            // Best effort: whatever happened, the temporary file is garbage.
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.as_mut().expect("open until commit").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().expect("open until commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Fsyncs the directory holding `path`, so a rename into it is durable. On platforms where a
/// directory cannot be opened for syncing (Windows) this is a no-op.
fn sync_parent_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| FormatError::io(dir, "directory sync failed", e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `bytes` to `path` crash-safely (see the module docs).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("formats-wa-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("a.bin");
/// formats::atomic::write_atomic(&path, b"hello").unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(bytes)?;
    file.commit()
}

/// Like [`write_atomic`], with the content produced by a writer callback (for streaming).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    let tmp = file.tmp.clone();
    write(file.out.as_mut().expect("just created"))
        .map_err(|e| FormatError::io(&tmp, "write failed", e))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("formats-atomic-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn failed_save_leaves_the_old_file_whole() {
        let dir = temp_dir("fail");
        let path = dir.join("w.bin");
        write_atomic(&path, b"old contents").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropped_uncommitted_file_leaves_the_old_one() {
        let dir = temp_dir("drop");
        let path = dir.join("w.bin");
        write_atomic(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_bytes(b"new but unfinished").unwrap();
        assert!(f.temp_path().exists());
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_names_are_unique_within_a_process() {
        let p = Path::new("/x/y.bin");
        assert_ne!(temp_path(p), temp_path(p));
        assert_eq!(temp_path(p).parent(), Some(Path::new("/x")));
    }

    #[test]
    fn unwritable_directory_is_an_error_naming_the_file() {
        let err = write_atomic(Path::new("/nonexistent-dir-xyz/out.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("out.bin"), "{err}");
    }
}
