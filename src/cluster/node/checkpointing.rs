//! A node's checkpoints of the shards it holds first, in the background: staged under
//! the writer lock, the files the last checkpoint lacks uploaded under a prefix of its
//! own, published by a transaction at the revision the last one was read at, then the
//! log before them and the last one's unused objects deleted (checkpoint.rs gives the
//! layout).

use super::{Node, Replica};
use crate::cluster::keys::{self, LogEntry};
use crate::cluster::{checkpoint, etcd};
use crate::error::{Error, IoContext, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The wait after a failed checkpoint, doubled with each failure in a row up to the max.
const CHECKPOINT_RETRY: Duration = Duration::from_millis(500);
const CHECKPOINT_RETRY_MAX: Duration = Duration::from_secs(30);

impl Node {
    /// Start a checkpoint of replica `r` in the background when it is due: this node is
    /// the first live replica in the shard's map, `checkpoint_every` batches were
    /// applied since the last checkpoint, and none of its own is under way. The apply
    /// loop (and so every commit waiting on it) never waits for an upload.
    pub(super) fn checkpoint_if_due(self: &Arc<Self>, r: &Arc<Replica>) {
        let Some(older) = self.checkpoint_due(r) else {
            return;
        };
        if Instant::now() < r.checkpoint_backoff.lock().expect("backoff lock").1 {
            return;
        }
        if r.checkpointing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (node, r) = (self.clone(), r.clone());
        tokio::spawn(async move {
            let outcome = node.checkpoint(&r, older).await;
            {
                // Each failure doubles the wait before the next try (a checkpoint seals
                // the log and stages every file: not something to repeat on every pass
                // of the apply loop while etcd or the store is away).
                let mut backoff = r.checkpoint_backoff.lock().expect("backoff lock");
                match &outcome {
                    Ok(()) => *backoff = (0, Instant::now()),
                    Err(e) => {
                        let wait = CHECKPOINT_RETRY
                            .saturating_mul(1 << backoff.0.min(6))
                            .min(CHECKPOINT_RETRY_MAX);
                        tracing::warn!(gallery = %r.gallery, shard = r.shard, error = %e, retry_in = ?wait, "taking a checkpoint failed");
                        *backoff = (backoff.0 + 1, Instant::now() + wait);
                    }
                }
            }
            r.checkpointing.store(false, Ordering::SeqCst);
        });
    }

    /// When a checkpoint of `r` is due, the shard's published checkpoint and the
    /// revision of its key, read together: the new one is published only if the key
    /// is still at that revision (no checkpoint, older or newer, replaced in between).
    fn checkpoint_due(&self, r: &Replica) -> Option<(Option<keys::Checkpoint>, i64)> {
        let applied = *r.applied.borrow();
        self.view.read(|st| {
            let key = (r.gallery.clone(), r.shard);
            let first_live = st
                .shard_map(&r.gallery, r.shard)
                .and_then(|m| m.replicas.iter().find(|n| st.nodes.contains_key(*n)));
            let current = st.checkpoints.get(&key);
            let last = current.map_or(0, |c| c.0.seq);
            (first_live == Some(&self.name) && applied >= last + self.checkpoint_every)
                .then(|| current.map_or((None, 0), |c| (Some(c.0.clone()), c.1)))
        })
    }

    /// Take a checkpoint of replica `r` at its applied batch, publish it in place of
    /// `older` (at its key's revision), then delete the log's batches every live
    /// replica has passed and the objects of `older` the new one does not reuse.
    async fn checkpoint(&self, r: &Replica, (older, revision): (Option<keys::Checkpoint>, i64)) -> Result<()> {
        let local = keys::replica_name(&r.gallery, r.shard);
        let staging = checkpoint::staging_dir(&self.cursors, &local, "staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).ctx(|| format!("removing {}", staging.display()))?;
        }
        let (entry, dir) = (r.entry.clone(), staging.clone());
        // Staged under the writer lock: the batch applied then is the one it holds.
        let staged = tokio::task::spawn_blocking(move || checkpoint::stage(&entry, &dir))
            .await
            .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))??;
        let Some(seq) = staged.through.filter(|s| older.as_ref().is_none_or(|o| *s > o.seq)) else {
            let _ = std::fs::remove_dir_all(&staging);
            return Ok(()); // nothing newer than the published checkpoint
        };
        let mut cp = keys::Checkpoint {
            seq,
            prefix: checkpoint::prefix(&r.gallery, r.created_ms, r.shard, seq, &self.name, rand::random()),
            files: staged.files,
            elsewhere: Default::default(),
            identities: staged.identities,
            gallery_created_ms: r.created_ms,
            node: self.name.clone(),
        };
        let uploaded = checkpoint::upload(&self.objects, &staging, &mut cp, older.as_ref()).await;
        let _ = std::fs::remove_dir_all(&staging);
        uploaded?;
        let key = keys::checkpoint_key(&r.gallery, r.shard);
        let txn = etcd::TxnRequest {
            compare: vec![etcd::unchanged_since(&key, revision), self.same_gallery(r)?],
            success: vec![etcd::put_op(&key, keys::encode(&cp), 0)],
            failure: Vec::new(),
        };
        let published = match self
            .etcd
            .txn(&format!("publishing checkpoint {seq} of {local}"), txn)
            .await
        {
            Ok(t) if t.succeeded => true,
            // A failed compare can be this very transaction retried on another member
            // after its first answer was lost: only the key itself says.
            Ok(_) => {
                let current = self.etcd.get(&key).await?;
                if current.as_ref().is_some_and(|kv| kv.value == keys::encode(&cp)) {
                    true
                } else {
                    // Not published now, but it may have been for a moment (this very
                    // transaction's lost first answer) and a later checkpoint may reuse
                    // its files: delete only what the current one does not name.
                    let named = current
                        .and_then(|kv| serde_json::from_slice::<keys::Checkpoint>(&kv.value).ok())
                        .map(|c| c.objects())
                        .unwrap_or_default();
                    let ours: Vec<String> = cp
                        .files
                        .iter()
                        .filter(|f| !cp.elsewhere.contains_key(*f))
                        .map(|f| cp.object(f))
                        .filter(|o| !named.contains(o))
                        .collect();
                    for object in ours {
                        self.objects.delete(&object).await?;
                    }
                    return Ok(());
                }
            }
            Err(e) => match self.etcd.get(&key).await {
                Ok(kv) if kv.as_ref().is_some_and(|kv| kv.value == keys::encode(&cp)) => true,
                // Not (yet) published: the files stay (a late commit would name them);
                // the next checkpoint's publication deletes them as the older one.
                _ => return Err(e),
            },
        };
        debug_assert!(published);
        tracing::info!(gallery = %r.gallery, shard = r.shard, seq, files = cp.files.len(), "took a checkpoint");
        if let Some(old) = older {
            let kept = cp.objects();
            for object in old.objects().difference(&kept) {
                self.objects.delete(object).await?;
            }
        }
        // The batches every live replica has applied (keeping the last one, which
        // numbers the next commit) are no longer needed.
        let floor = self.view.read(|st| {
            let key = (r.gallery.clone(), r.shard);
            let applied = st.applied.get(&key);
            let lowest = st
                .shard_map(&r.gallery, r.shard)
                .map(|m| {
                    m.replicas
                        .iter()
                        .filter(|n| st.nodes.contains_key(*n))
                        .map(|n| applied.and_then(|a| a.get(n)).copied().unwrap_or(0))
                        .min()
                        .unwrap_or(0)
                })
                .unwrap_or(0);
            let committed = st.committed.get(&key).copied().unwrap_or(0);
            lowest.min(seq).min(committed.saturating_sub(1))
        });
        let gone: Vec<(u64, LogEntry)> = self
            .view
            .log_after(&r.gallery, r.shard, 0)
            .into_iter()
            .take_while(|(n, _)| *n <= floor)
            .collect();
        if let Some((first, _)) = gone.first() {
            // Only while the gallery is still this replica's: the keys are named by
            // the gallery's name, and a gallery of the name made since has its own
            // batches under them (the nemesis saw a late deletion take the first batch
            // of the next `fl`, before one of its replicas had applied it).
            let deletion = etcd::TxnRequest {
                compare: vec![self.same_gallery(r)?],
                success: vec![etcd::delete_range_op(
                    &keys::log_key(&r.gallery, r.shard, *first),
                    &keys::log_key(&r.gallery, r.shard, floor + 1),
                )],
                failure: Vec::new(),
            };
            let paused = crate::cluster::fault_delay("BIOGATE_FAULT_SLOW_LOG_DELETION_MS");
            if !paused.is_zero() {
                tokio::time::sleep(paused).await;
            }
            let what = format!("deleting the log of {} shard {} up to {floor}", r.gallery, r.shard);
            if !self.etcd.txn(&what, deletion).await?.succeeded {
                return Err(Error::NotFound(format!("gallery {:?} was dropped", r.gallery)));
            }
            // Never an object a batch after the floor names (a batch's object is its
            // own by construction; this keeps a committed batch appliable even if two
            // entries ever named one).
            let kept: std::collections::BTreeSet<String> = self
                .view
                .log_after(&r.gallery, r.shard, floor)
                .into_iter()
                .map(|(_, e)| e.object)
                .collect();
            for (_, e) in gone.iter().filter(|(_, e)| !kept.contains(&e.object)) {
                self.objects.delete(&e.object).await?;
            }
            tracing::info!(gallery = %r.gallery, shard = r.shard, batches = gone.len(), up_to = floor, "deleted the log before the checkpoint");
        }
        Ok(())
    }
}
