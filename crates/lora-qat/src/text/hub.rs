//! Model names: a directory, a file, or a Hugging Face hub id (`org/name`) resolved in the
//! local hub cache, never over the network.
//!
//! The cache layout is huggingface_hub's: `<cache>/models--org--name/refs/<revision>` holds a
//! commit hash and `<cache>/models--org--name/snapshots/<hash>/` the files. The cache is
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

use super::{TextError, TextResult};

/// The hub cache directory the environment names (see the module docs).
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

fn hub_cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty("HF_HUB_CACHE")
        .or_else(|| non_empty("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| non_empty("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `spec` has the form of a hub id: `org/name` with the characters the hub allows.
fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

/// Resolves `--model`: an existing path is returned as it is; otherwise `org/name` is looked
/// up in the hub cache at `revision` (a branch or tag under `refs/`, or a commit hash under
/// `snapshots/`; default `main`). Errors say where it was looked for.
///
/// ```
/// # let root = std::env::temp_dir().join(format!("hub-doc-{}", std::process::id()));
/// # let snap = root.join("models--org--tiny/snapshots/abc123");
/// # std::fs::create_dir_all(&snap).unwrap();
/// # std::fs::create_dir_all(root.join("models--org--tiny/refs")).unwrap();
/// # std::fs::write(root.join("models--org--tiny/refs/main"), "abc123").unwrap();
/// use lora_qat::text::hub::resolve_model_in;
/// assert_eq!(resolve_model_in("org/tiny", None, Some(&root)).unwrap(), snap);
/// let err = resolve_model_in("org/absent", None, Some(&root)).unwrap_err().to_string();
/// assert!(err.contains("not in the local Hugging Face cache"), "{err}");
/// # std::fs::remove_dir_all(&root).unwrap();
/// ```
pub fn resolve_model_in(
    spec: &str,
    revision: Option<&str>,
    cache: Option<&Path>,
) -> TextResult<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        if revision.is_some() {
            return Err(TextError::Model(format!(
                "--revision applies to a hub id, but --model {spec} is a local path"
            )));
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(TextError::Model(format!(
            "--model {spec}: no such file or directory (and not a hub id of the form org/name)"
        )));
    }
    let Some(cache) = cache else {
        return Err(TextError::Model(format!(
            "--model {spec}: no such path, and no Hugging Face cache is known (set HF_HUB_CACHE \
             or HF_HOME)"
        )));
    };
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let revision = revision.unwrap_or("main");
    let not_cached = |detail: String| {
        TextError::Model(format!(
            "--model {spec} (revision {revision}) is not in the local Hugging Face cache: \
             {detail}; download it first (e.g. `huggingface-cli download {spec}`), this tool \
             never uses the network"
        ))
    };
    if !repo.is_dir() {
        return Err(not_cached(format!("{} does not exist", repo.display())));
    }
    let ref_file = repo.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        let text = std::fs::read_to_string(&ref_file).map_err(|source| TextError::Io {
            path: ref_file.clone(),
            source,
        })?;
        text.trim().to_string()
    } else {
        revision.to_string()
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(not_cached(format!(
            "{} holds no commit hash",
            ref_file.display()
        )));
    }
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_cached(format!("{} does not exist", snapshot.display())));
    }
    Ok(snapshot)
}

/// [`resolve_model_in`] with the cache the environment names ([`hub_cache_dir`]).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> TextResult<PathBuf> {
    resolve_model_in(spec, revision, hub_cache_dir().as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn cache_dir_follows_the_environment_in_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b"), ("HOME", "/c")]);
        assert_eq!(hub_cache_dir_from(all), Some(PathBuf::from("/a")));
        let home = env(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/b"), ("HOME", "/c")]);
        assert_eq!(hub_cache_dir_from(home), Some(PathBuf::from("/b/hub")));
        let user = env(&[("HOME", "/c")]);
        assert_eq!(
            hub_cache_dir_from(user),
            Some(PathBuf::from("/c/.cache/huggingface/hub"))
        );
        assert_eq!(hub_cache_dir_from(env(&[])), None);
    }

    #[test]
    fn hub_ids_and_revisions() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("plain"));
        let root = std::env::temp_dir().join(format!("hub-test-{}", std::process::id()));
        let repo = root.join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/c1")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/c2")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "c1\n").unwrap();
        std::fs::write(repo.join("refs/dev"), "c2").unwrap();
        let r = |rev| resolve_model_in("org/m", rev, Some(&root));
        assert_eq!(r(None).unwrap(), repo.join("snapshots/c1"));
        assert_eq!(r(Some("dev")).unwrap(), repo.join("snapshots/c2"));
        assert_eq!(r(Some("c2")).unwrap(), repo.join("snapshots/c2"));
        let err = r(Some("v9")).unwrap_err().to_string();
        assert!(err.contains("snapshots/v9 does not exist"), "{err}");
        let err = resolve_model_in("org/m", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_CACHE"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
