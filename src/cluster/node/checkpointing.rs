//! A node's checkpoints of the shards it holds first: staged under the writer lock,
//! uploaded under a prefix of its own, published by transaction, then the log before
//! them deleted (checkpoint.rs gives the layout).

use super::{Node, Replica, gallery_exists};
use crate::cluster::keys::{self, LogEntry};
use crate::cluster::{checkpoint, etcd};
use crate::error::{Error, IoContext, Result};

impl Node {
    /// Whether this node takes the shard's next checkpoint now: it is the first live
    /// replica in the map, and `checkpoint_every` batches were applied since the last.
    pub(super) fn checkpoint_due(&self, r: &Replica) -> bool {
        let applied = *r.applied.borrow();
        self.view.read(|st| {
            let key = (r.gallery.clone(), r.shard);
            let first_live = st
                .shard_map(&r.gallery, r.shard)
                .and_then(|m| m.replicas.iter().find(|n| st.nodes.contains_key(*n)));
            let last = st.checkpoints.get(&key).map_or(0, |c| c.0.seq);
            first_live == Some(&self.name) && applied >= last + self.checkpoint_every
        })
    }

    /// Take a checkpoint of replica `r` at its applied batch, publish it, then delete
    /// the log's batches every live replica has passed and the older checkpoint.
    pub(super) async fn checkpoint(&self, r: &Replica) -> Result<()> {
        let seq = *r.applied.borrow();
        let local = keys::replica_name(&r.gallery, r.shard);
        let staging = checkpoint::staging_dir(&self.cursors, &local, "staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).ctx(|| format!("removing {}", staging.display()))?;
        }
        let (entry, dir) = (r.entry.clone(), staging.clone());
        let files = tokio::task::spawn_blocking(move || checkpoint::stage(&entry, &dir))
            .await
            .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))??;
        let prefix = checkpoint::prefix(&r.gallery, r.created_ms, r.shard, seq, &self.name, rand::random());
        let uploaded = checkpoint::upload(&self.objects, &staging, &prefix, &files).await;
        let _ = std::fs::remove_dir_all(&staging);
        uploaded?;
        let cp = checkpoint::Checkpoint {
            seq,
            prefix,
            files,
            gallery_created_ms: r.created_ms,
            node: self.name.clone(),
        };
        let key = keys::checkpoint_key(&r.gallery, r.shard);
        let (older, revision) = self.view.read(|st| {
            st.checkpoints
                .get(&(r.gallery.clone(), r.shard))
                .map_or((None, 0), |c| (Some(c.0.clone()), c.1))
        });
        let txn = etcd::TxnRequest {
            compare: vec![etcd::unchanged_since(&key, revision), gallery_exists(&r.gallery)],
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
            Ok(_) => self
                .etcd
                .get(&key)
                .await?
                .is_some_and(|kv| kv.value == keys::encode(&cp)),
            Err(e) => match self.etcd.get(&key).await {
                Ok(kv) if kv.as_ref().is_some_and(|kv| kv.value == keys::encode(&cp)) => true,
                // Not (yet) published: the files stay (a late commit would name them);
                // the next checkpoint's publication deletes them as the older one.
                _ => return Err(e),
            },
        };
        if !published {
            // Another replica's checkpoint won: delete what this one alone wrote.
            self.objects.delete_prefix(&cp.prefix).await?;
            return Ok(());
        }
        tracing::info!(gallery = %r.gallery, shard = r.shard, seq, files = cp.files.len(), "took a checkpoint");
        if let Some(old) = older.filter(|o| o.prefix != cp.prefix) {
            self.objects.delete_prefix(&old.prefix).await?;
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
            self.etcd
                .delete_range(
                    &keys::log_key(&r.gallery, r.shard, *first),
                    &keys::log_key(&r.gallery, r.shard, floor + 1),
                )
                .await?;
            for (_, e) in &gone {
                self.objects.delete(&e.object).await?;
            }
            tracing::info!(gallery = %r.gallery, shard = r.shard, batches = gone.len(), up_to = floor, "deleted the log before the checkpoint");
        }
        Ok(())
    }
}
