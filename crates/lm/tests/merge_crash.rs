//! `merge` never replaces an earlier output before the new one is complete: every file of the
//! new output is written under a temporary name and all are renamed into place together at the
//! end (`formats::atomic::commit_in_order`, directory fsynced). A failure injected before the
//! renames (`formats::atomic::fault`) leaves the earlier output — single-file or sharded —
//! whole and loadable, with no temporary file left behind; a later merge replaces it.

use std::path::{Path, PathBuf};

use formats::atomic::fault::fail_group_rename_after;
use lm::merge::{merge_checkpoint, MergeOptions};
use lm::{LlamaConfig, LlamaModel};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-merge-crash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn sharded(max_shard_bytes: u64) -> MergeOptions {
    MergeOptions {
        max_shard_bytes,
        ..MergeOptions::default()
    }
}

#[test]
fn a_failed_merge_leaves_the_earlier_output_whole() {
    let tmp = temp_dir("keep");
    let config = LlamaConfig::new(32, 16, 32, 1, 2, 1).unwrap();
    let (first, second) = (tmp.join("first"), tmp.join("second"));
    let first_model = LlamaModel::random(config.clone(), 1).unwrap();
    first_model.save_pretrained(&first).unwrap();
    LlamaModel::random(config, 2)
        .unwrap()
        .save_pretrained(&second)
        .unwrap();
    let out = tmp.join("out");

    for (earlier, later) in [
        (sharded(4000), MergeOptions::default()),
        (MergeOptions::default(), sharded(4000)),
        (sharded(4000), sharded(4000)),
    ] {
        let _ = std::fs::remove_dir_all(&out);
        let report = merge_checkpoint(&first, None, &out, &earlier).unwrap();
        let before = snapshot(&out);
        // Stopped at the first rename, and (a crash while the files of the new output were
        // still being written) before it: the earlier output, byte for byte.
        fail_group_rename_after(Some(0));
        let err = merge_checkpoint(&second, None, &out, &later).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(
            snapshot(&out),
            before,
            "earlier output unchanged, no temporaries"
        );
        assert_eq!(LlamaModel::from_pretrained(&out).unwrap(), first_model);
        // A merge that completes replaces it (the earlier layout's index or single file goes).
        let later_report = merge_checkpoint(&second, None, &out, &later).unwrap();
        let reloaded = LlamaModel::from_pretrained(&out).unwrap();
        assert_ne!(reloaded, first_model);
        assert_eq!(
            out.join("model.safetensors.index.json").is_file(),
            later_report.shards.len() > 1,
            "earlier {} shard(s), later {}",
            report.shards.len(),
            later_report.shards.len()
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
