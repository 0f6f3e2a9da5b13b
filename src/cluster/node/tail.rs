//! Tail and apply: each replica follows its shard's log and applies the batches in
//! commit order (the cursor written after each), publishes its applied mark, and
//! reloads from the checkpoint when the batches it needs were deleted.

use super::{Node, Replica};
use crate::cluster::batch::{self, Op};
use crate::cluster::keys::{self, LogEntry};
use crate::error::{Error, Result};
use crate::gallery::Enrollment;
use std::time::Duration;

impl Node {
    /// Apply the shard's batches in order as they are committed.
    pub(super) async fn tail(node_weak: std::sync::Weak<Node>, replica: std::sync::Weak<Replica>) {
        let Some(mut changes) = node_weak.upgrade().map(|n| n.view.changed()) else {
            return;
        };
        let mut published = None;
        loop {
            let (Some(node), Some(r)) = (node_weak.upgrade(), replica.upgrade()) else {
                return;
            };
            // A replica no longer held (dropped, or moved away while a commit or a
            // checkpoint still had it) is not checkpointed any more, and not tailed
            // once no commit waits on it (one that does waits for its batch applied).
            let held = node.is_held(&r);
            if !held && r.commit.try_lock().is_ok() {
                return;
            }
            let at = *r.applied.borrow();
            let next = node.view.log_after(&r.gallery, r.shard, at);
            if next.first().is_some_and(|(first, _)| *first > at + 1) {
                // The batches this replica needs were deleted after a checkpoint. Not at
                // once: a view that has not yet seen the newer checkpoint would load the
                // same one again.
                tracing::warn!(gallery = %r.gallery, shard = r.shard, applied = at, "the log before the checkpoint is gone: reloading from the checkpoint");
                drop((node, r));
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (Some(node), Some(r)) = (node_weak.upgrade(), replica.upgrade()) else {
                    return;
                };
                node.forget(&r).await;
                return;
            }
            let mut failed = false;
            for (seq, entry) in next {
                if seq != *r.applied.borrow() + 1 || entry.gallery_created_ms != r.created_ms {
                    break;
                }
                if let Err(e) = node.apply(&r, seq, &entry).await {
                    tracing::error!(gallery = %r.gallery, shard = r.shard, seq, error = %e, "applying a batch failed; retrying");
                    failed = true;
                    break;
                }
            }
            let now = *r.applied.borrow();
            // Published again whenever etcd holds another batch than this one, or none:
            // a put whose answer was lost can still land after a later one (the nemesis
            // saw a mark stay at 100 while the replica had applied 103), and the mark
            // goes with the lease it was put under (a node paused past its lease) or
            // under a late deletion of a dropped gallery's replica of the same name
            // (the nemesis saw a replica of a re-created `fl` never serve, its mark gone).
            let mark = node.view.read(|st| {
                st.applied
                    .get(&(r.gallery.clone(), r.shard))
                    .and_then(|a| a.get(&node.name))
                    .copied()
            });
            if (published != Some(now) || (held && node.view.connected() && mark != Some(now)))
                && let Ok(seq) = node.publish_applied(&r).await
            {
                published = Some(seq);
            }
            if !failed && held {
                node.checkpoint_if_due(&r);
            }
            drop((node, r));
            if failed || published.is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
            }
        }
    }

    async fn apply(&self, r: &Replica, seq: u64, entry: &LogEntry) -> Result<()> {
        let bytes = self.objects.get(&entry.object).await?;
        let ops = batch::decode(&bytes, &entry.object)?;
        let mut enrollments = Vec::new();
        let mut deletions = Vec::new();
        for op in ops {
            match op {
                Op::Enroll { subject, templates } => enrollments.push(Enrollment { subject, templates }),
                Op::Delete { subject } => deletions.push(subject),
            }
        }
        let writer = r.entry.clone();
        let seal_at = self.seal_log_rows;
        let position = tokio::task::spawn_blocking(move || {
            writer.write(|g| {
                // Already applied (its cursor write failed after the batch's commit
                // group reached the disk): applying it again would enroll it twice.
                if g.replicated_through().is_none_or(|t| t < seq) {
                    g.apply_replicated(&enrollments, &deletions, seq)?;
                }
                let position = g.log_position();
                if g.log_rows() >= seal_at
                    && let Err(e) = g.seal_log()
                {
                    tracing::error!(gallery = %g.dir().display(), error = %e, "sealing the log failed");
                }
                Ok(position)
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("apply task: {e}")))??;
        self.write_cursor(&r.gallery, r.shard, r.created_ms, seq, position)?;
        r.applied.send_replace(seq);
        Ok(())
    }

    /// Drop a replica here (its files and cursor); the next pass of the shard map opens
    /// it again, from the checkpoint.
    async fn forget(&self, r: &Replica) {
        if !self.is_held(r) {
            return; // already replaced: its applied key is the new one's
        }
        // Its applied key first, while it is still held (nothing opens it again yet,
        // so this cannot delete the key of the replica that replaces it).
        let _ = self
            .etcd
            .delete(&keys::applied_key(&r.gallery, r.shard, &self.name))
            .await;
        // Its files and its place together, under the lock the pass that opens
        // replicas takes: once that pass sees the place empty, the files it finds are
        // its own to load, never dropped by this afterwards.
        let key = (r.gallery.clone(), r.shard);
        let mut held = self.replicas.lock().expect("replicas lock");
        if !held.get(&key).is_some_and(|h| std::ptr::eq(h.as_ref(), r)) {
            return; // already replaced
        }
        held.remove(&key);
        if let Err(e) = self.drop_local(&r.gallery, r.shard) {
            tracing::error!(gallery = %r.gallery, shard = r.shard, error = %e, "dropping the replica to reload it");
        }
    }
}
