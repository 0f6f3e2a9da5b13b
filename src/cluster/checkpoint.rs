//! Checkpoints: a replica's sealed gallery files in the object store, so that a new
//! replica loads segments instead of replaying a shard's whole log, and the log before
//! a checkpoint can be deleted.
//!
//! ```text
//! etcd:          /biogate/checkpoints/{g}/{s}  {"seq","prefix","files","gallery_created_ms","node"}
//! object store:  galleries/{g}-{created_ms}/{s}/checkpoints/{seq}-{node}-{nonce}/{file}
//! ```
//!
//! One replica of each shard takes them (the first live one in the shard map), every
//! `checkpoint_every` batches: under the gallery's writer lock it seals the log, then
//! hard-links the immutable files (segments, manifests, EXPIRY) and copies the log's
//! bytes into a staging folder, which it uploads after letting go of the lock. The
//! checkpoint is published (a transaction that only raises its `seq`) after every file
//! is in the store; then the log's batches at or before the lowest `applied` of the live
//! replicas, and before the last batch, are deleted, as are older checkpoints.
//! A replica that finds the batches it needs deleted reloads from the checkpoint.

use super::keys;
use super::objects::Objects;
use crate::error::{Error, IoContext, Result};
use crate::server::registry::GalleryEntry;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// The last batch it includes.
    pub seq: u64,
    /// Where its files are in the object store.
    pub prefix: String,
    pub files: Vec<String>,
    pub gallery_created_ms: i64,
    /// The node that took it.
    pub node: String,
}

/// Where a checkpoint taken by `node` goes: named by its batch, its node and a random
/// nonce, so two replicas that both believe they take the shard's checkpoint (around a
/// lease blip) never write into, or delete, each other's files. Each deletes only the
/// prefix it made.
pub fn prefix(g: &str, created_ms: i64, s: u32, seq: u64, node: &str, nonce: u64) -> String {
    format!(
        "{}/{s:04}/checkpoints/{seq:020}-{node}-{nonce:016x}",
        keys::objects_prefix(g, created_ms)
    )
}

/// Seal `entry`'s log and put its files into `staging` (created here): immutable files
/// hard-linked, the log (appended in place) copied. Runs under the writer lock, so the
/// files are one consistent state. Returns the file names.
pub fn stage(entry: &GalleryEntry, staging: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(staging).ctx(|| format!("creating {}", staging.display()))?;
    entry.write(|g| {
        if let Err(e) = g.seal_log() {
            // The log's rows are copied with it: the checkpoint is whole either way.
            tracing::warn!(gallery = %g.dir().display(), error = %e, "sealing before a checkpoint failed");
        }
        let dir = g.dir().to_path_buf();
        let mut files = Vec::new();
        for e in std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e
                .file_type()
                .ctx(|| format!("reading {}", e.path().display()))?
                .is_file();
            if !is_file || name == "LOCK" || name.ends_with(".tmp") {
                continue;
            }
            let to = staging.join(&name);
            if name.ends_with(".log") {
                std::fs::copy(e.path(), &to).ctx(|| format!("copying {}", e.path().display()))?;
            } else {
                std::fs::hard_link(e.path(), &to).ctx(|| format!("linking {}", e.path().display()))?;
            }
            files.push(name);
        }
        files.sort();
        Ok(files)
    })
}

/// Upload the staged files under `prefix` (each in parts).
pub async fn upload(objects: &Objects, staging: &Path, prefix: &str, files: &[String]) -> Result<()> {
    for f in files {
        objects.put_file(&format!("{prefix}/{f}"), &staging.join(f)).await?;
    }
    Ok(())
}

/// Download checkpoint `cp` into `into` (made afresh), every file fsynced with the folder.
pub async fn download(objects: &Objects, cp: &Checkpoint, into: &Path) -> Result<()> {
    if into.exists() {
        std::fs::remove_dir_all(into).ctx(|| format!("removing {}", into.display()))?;
    }
    std::fs::create_dir_all(into).ctx(|| format!("creating {}", into.display()))?;
    for f in &cp.files {
        if f.contains('/') || f.starts_with('.') {
            return Err(Error::Corrupt(format!("checkpoint {}: file name {f:?}", cp.prefix)));
        }
        objects.get_file(&format!("{}/{f}", cp.prefix), &into.join(f)).await?;
    }
    std::fs::File::open(into)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing {}", into.display()))?;
    Ok(())
}

/// Where a replica's checkpoint is staged or downloaded on a node.
pub fn staging_dir(cluster_dir: &Path, local: &str, what: &str) -> PathBuf {
    cluster_dir.join(format!("{what}-{local}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_checkpointing_one_batch_write_apart() {
        let a = prefix("fl", 7, 1, 42, "n1", 1);
        let b = prefix("fl", 7, 1, 42, "n2", 1);
        let c = prefix("fl", 7, 1, 42, "n1", 2);
        assert!(a != b && a != c && b != c);
        // No prefix is a path-segment prefix of another's files.
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
            assert!(!y.starts_with(&format!("{x}/")) && !x.starts_with(&format!("{y}/")));
        }
        assert_eq!(
            a,
            "galleries/fl-7/0001/checkpoints/00000000000000000042-n1-0000000000000001"
        );
    }
}
