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

use super::keys::{self, Checkpoint};
use super::objects::Objects;
use crate::error::{Error, IoContext, Result};
use crate::server::registry::GalleryEntry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a checkpoint's staging holds: its files, and the identities of the immutable ones.
pub struct Staged {
    pub files: Vec<String>,
    pub identities: BTreeMap<String, String>,
    /// The last batch the files hold (the replica's mark).
    pub through: Option<u64>,
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
/// files are one consistent state.
pub fn stage(entry: &GalleryEntry, staging: &Path) -> Result<Staged> {
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
        // The staged manifest names the segments and their identities.
        let manifest = crate::gallery::manifest::Manifest::load(staging)?;
        let identities = manifest
            .segments
            .iter()
            .filter_map(|s| {
                let crc = s.header_crc?;
                Some((s.file.clone(), format!("{:016x}-{crc:08x}", manifest.gallery_id)))
            })
            .filter(|(f, _)| files.contains(f))
            .collect();
        Ok(Staged {
            files,
            identities,
            through: g.replicated_through(),
        })
    })
}

/// Upload `cp`'s staged files under its prefix, except the immutable ones `older`
/// already holds under the same identity (segments do not change): those it names
/// where they are. Only `older`, the checkpoint published when this one began, is
/// reused: its publication is what this one's must replace, so a checkpoint that
/// deletes `older`'s objects can only be one whose publication made this one's fail.
pub async fn upload(objects: &Objects, staging: &Path, cp: &mut Checkpoint, older: Option<&Checkpoint>) -> Result<()> {
    for f in &cp.files {
        let reusable = older.and_then(|o| {
            let same =
                o.files.contains(f) && o.identities.contains_key(f) && o.identities.get(f) == cp.identities.get(f);
            same.then(|| o.object(f))
        });
        match reusable {
            Some(object) => {
                cp.elsewhere.insert(f.clone(), object);
            }
            None => {
                objects
                    .put_file(&format!("{}/{f}", cp.prefix), &staging.join(f))
                    .await?
            }
        }
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
        objects.get_file(&cp.object(f), &into.join(f)).await?;
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

    fn checkpoint(prefix: &str, files: &[(&str, Option<&str>)]) -> Checkpoint {
        Checkpoint {
            seq: 1,
            prefix: prefix.into(),
            files: files.iter().map(|(f, _)| f.to_string()).collect(),
            elsewhere: BTreeMap::new(),
            identities: files
                .iter()
                .filter_map(|(f, id)| Some((f.to_string(), (*id)?.to_string())))
                .collect(),
            gallery_created_ms: 0,
            node: "n1".into(),
        }
    }

    #[tokio::test]
    async fn a_checkpoint_uploads_only_what_the_one_before_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let objects = Objects::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        for f in ["MANIFEST", "seg-1.bgs", "seg-2.bgs", "seg-3.bgs", "wal-4.log"] {
            std::fs::write(staging.join(f), f).unwrap();
        }
        // The one before: seg-1 and seg-2 (seg-2 since rewritten: another identity).
        let mut older = checkpoint(
            "a",
            &[
                ("MANIFEST", None),
                ("seg-1.bgs", Some("g-1")),
                ("seg-2.bgs", Some("g-2")),
            ],
        );
        upload(&objects, &staging, &mut older, None).await.unwrap();
        let mut cp = checkpoint(
            "b",
            &[
                ("MANIFEST", None),
                ("seg-1.bgs", Some("g-1")),
                ("seg-2.bgs", Some("g-2b")),
                ("seg-3.bgs", Some("g-3")),
                ("wal-4.log", None),
            ],
        );
        upload(&objects, &staging, &mut cp, Some(&older)).await.unwrap();
        assert_eq!(
            cp.elsewhere,
            BTreeMap::from([("seg-1.bgs".to_string(), "a/seg-1.bgs".to_string())])
        );
        let listed = |p: &str| {
            let mut v: Vec<String> = std::fs::read_dir(dir.path().join("store").join(p))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(listed("b"), ["MANIFEST", "seg-2.bgs", "seg-3.bgs", "wal-4.log"]);
        // Every file of the new one is where it says, and reads back.
        let into = dir.path().join("loaded");
        download(&objects, &cp, &into).await.unwrap();
        for f in &cp.files {
            assert_eq!(std::fs::read_to_string(into.join(f)).unwrap(), *f);
        }
        // What the older one alone needs is what its successor deletes.
        let unused: Vec<String> = older.objects().difference(&cp.objects()).cloned().collect();
        assert_eq!(unused, ["a/MANIFEST", "a/seg-2.bgs"]);
    }

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
