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

/// Fsyncs directory `dir`, so a removal or rename in it is durable (a no-op where a
/// directory cannot be opened for syncing).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FormatError::io(dir, "directory sync failed", e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Fsyncs the directory holding `path`, so a rename into it is durable.
fn sync_parent_dir(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
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

/// Writes several files of one directory as a unit: every file is written and fsynced under a
/// temporary name first, then the temporary names are renamed over the final ones **in the
/// order given**, and the directory is fsynced. A failure before the first rename leaves every
/// old file whole; a crash between two renames (a window of microseconds) leaves the files
/// named earlier in the list new and the later ones old — so callers put first the file that
/// records what the others must be (e.g. their [`sha256_hex`]), and a loader that checks it
/// detects a half-committed set. `files` are (path, content); an empty list writes nothing.
///
/// ```
/// use formats::atomic::{sha256_hex, write_atomic_group};
/// let dir = std::env::temp_dir().join(format!("formats-group-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let data = b"tensor bytes".to_vec();
/// let manifest = format!("data.bin {}", sha256_hex(&data)).into_bytes();
/// write_atomic_group(&[(dir.join("manifest.txt"), manifest), (dir.join("data.bin"), data)]).unwrap();
/// let text = std::fs::read_to_string(dir.join("manifest.txt")).unwrap();
/// assert!(text.ends_with(&sha256_hex(&std::fs::read(dir.join("data.bin")).unwrap())));
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write_atomic_group(files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let mut staged = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        let mut file = AtomicFile::create(path)?;
        file.write_bytes(bytes)?;
        staged.push(file);
    }
    commit_in_order(staged)
}

/// Commits files written through [`AtomicFile`] as one unit, as [`write_atomic_group`] does:
/// every file flushed and fsynced first, then renamed into place in the order given, then
/// each directory involved fsynced once. For writers that stream their files (a merge's
/// shards) and must not replace any old file before every new one is complete. A failure
/// before the first rename leaves every old file whole; no temporary file is left behind.
pub fn commit_in_order(files: Vec<AtomicFile>) -> Result<()> {
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let mut renamed = 0;
    let result = (|| {
        // Phase 1: every file complete on disk before any rename (files not reached yet
        // are dropped on an error, which deletes their temporaries).
        for mut file in files {
            let out = file.out.take().expect("open until commit");
            staged.push((file.tmp.clone(), file.path.clone()));
            let inner = out
                .into_inner()
                .map_err(|e| FormatError::io(&file.tmp, "write failed", e.into_error()))?;
            inner
                .sync_all()
                .map_err(|e| FormatError::io(&file.tmp, "sync failed", e))?;
        }
        // Phase 2: the renames, in the caller's order.
        for (tmp, path) in &staged {
            fault::before_rename().map_err(|e| FormatError::io(path, "rename failed", e))?;
            std::fs::rename(tmp, path).map_err(|e| FormatError::io(path, "rename failed", e))?;
            renamed += 1;
        }
        // Phase 3: each directory involved fsynced once, so the renames are durable.
        let mut synced: Vec<&Path> = Vec::new();
        for (_, path) in &staged {
            let parent = path.parent().unwrap_or(Path::new("."));
            if !synced.contains(&parent) {
                sync_parent_dir(path)?;
                synced.push(parent);
            }
        }
        Ok(())
    })();
    // Best effort: temporaries not renamed are garbage, whatever happened.
    for (tmp, _) in staged.iter().skip(renamed) {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The SHA-256 of `bytes` as 64 lowercase hex digits: how a file that records its siblings
/// (see [`write_atomic_group`]) names their content.
///
/// ```
/// assert_eq!(
///     formats::atomic::sha256_hex(b"abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fault injection for tests of crash safety: make the *n*-th rename of
/// [`write_atomic_group`] / [`commit_in_order`] on this thread fail, as a crash between two
/// files would stop it.
#[doc(hidden)]
pub mod fault {
    use std::cell::Cell;

    thread_local! {
        static RENAMES_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// After `renames` more successful renames of [`super::write_atomic_group`] or
    /// [`super::commit_in_order`] on this thread, the next one fails (once);
    /// `None` disarms.
    pub fn fail_group_rename_after(renames: Option<usize>) {
        RENAMES_LEFT.with(|c| c.set(renames));
    }

    pub(super) fn before_rename() -> std::io::Result<()> {
        RENAMES_LEFT.with(|c| match c.get() {
            None => Ok(()),
            Some(0) => {
                c.set(None);
                Err(std::io::Error::other("injected failure between two files"))
            }
            Some(n) => {
                c.set(Some(n - 1));
                Ok(())
            }
        })
    }
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
    #[test]
    fn group_failing_between_files_renames_only_the_earlier_ones() {
        let dir = temp_dir("group");
        let files = |tag: &str| -> Vec<(PathBuf, Vec<u8>)> {
            ["first", "second", "third"]
                .iter()
                .map(|n| (dir.join(n), format!("{tag} {n}").into_bytes()))
                .collect()
        };
        write_atomic_group(&files("old")).unwrap();
        fault::fail_group_rename_after(Some(1));
        let err = write_atomic_group(&files("new")).unwrap_err();
        assert!(err.to_string().contains("second"), "{err}");
        assert_eq!(std::fs::read(dir.join("first")).unwrap(), b"new first");
        assert_eq!(std::fs::read(dir.join("second")).unwrap(), b"old second");
        assert_eq!(std::fs::read(dir.join("third")).unwrap(), b"old third");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            3,
            "no temporaries left"
        );
        // Disarmed after one failure: the next group commits whole.
        write_atomic_group(&files("newer")).unwrap();
        assert_eq!(std::fs::read(dir.join("third")).unwrap(), b"newer third");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn group_failing_before_any_rename_leaves_every_old_file() {
        let dir = temp_dir("group-early");
        write_atomic_group(&[(dir.join("a"), b"old".to_vec())]).unwrap();
        // The second file's directory does not exist: its temporary cannot be created.
        let err = write_atomic_group(&[
            (dir.join("a"), b"new".to_vec()),
            (dir.join("missing").join("b"), b"new".to_vec()),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporaries left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
