//! A node's membership: its lease renewed every second (registered again under a new
//! one when it lapsed), and each replica's applied mark published under it.

use super::{LEASE_TTL_S, Node, Replica};
use crate::cluster::{etcd, keys};
use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Node {
    /// Renew the lease every second; if it was lost, take a new one and register again.
    pub(super) async fn keep_alive(node: std::sync::Weak<Node>) {
        loop {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let Some(node) = node.upgrade() else { return };
            let lease = node.lease.load(Ordering::Relaxed);
            let asked = Instant::now();
            match node.etcd.keep_alive(lease).await {
                Ok(ttl) if ttl > 0 => node.lease_holds_until(asked + Duration::from_secs(ttl as u64)),
                Ok(_) => {
                    tracing::warn!(node = %node.name, "the node's lease expired: registering again");
                    if let Err(e) = node.register_again().await {
                        tracing::warn!(error = %e, "registering again failed; retrying");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the node's lease"),
            }
        }
    }

    pub(super) async fn register_again(&self) -> Result<()> {
        let asked = Instant::now();
        let lease = self.etcd.grant_lease(LEASE_TTL_S).await?;
        let info = keys::NodeInfo {
            address: self.address.clone(),
        };
        self.etcd
            .put(&keys::node_key(&self.name), keys::encode(&info), lease)
            .await?;
        // Only once it is registered under it (else the next pass renews a lease
        // nothing is registered under, and never registers again).
        self.lease.store(lease, Ordering::Relaxed);
        self.lease_holds_until(asked + Duration::from_secs(LEASE_TTL_S as u64));
        let held: Vec<Arc<Replica>> = self.replicas.lock().expect("replicas lock").values().cloned().collect();
        // Each one (a replica of a gallery dropped meanwhile keeps no other's mark
        // from being published); the apply loops publish whatever fails here again.
        for r in held {
            if let Err(e) = self.publish_applied(&r).await {
                tracing::warn!(gallery = %r.gallery, shard = r.shard, error = %e, "publishing a replica's applied batch");
            }
        }
        Ok(())
    }

    pub(super) fn lease_holds_until(&self, until: Instant) {
        *self.lease_until.lock().expect("lease lock") = until;
    }

    /// Whether this node's lease surely still holds.
    pub(super) fn lease_holds(&self) -> bool {
        Instant::now() < *self.lease_until.lock().expect("lease lock")
    }

    /// Publish the batch `r` has applied; returns it. One publication at a time per
    /// replica, each reading the batch once it has its turn: a publication that read
    /// an older batch can never land after a newer one (a node re-registering after a
    /// pause once put batch 33 over the tail's 34, and the mark stayed at 33).
    pub(super) async fn publish_applied(&self, r: &Replica) -> Result<u64> {
        let _one_at_a_time = r.publishing.lock().await;
        // A replica dropped (or replaced) shares its key with the one that replaces it:
        // a late publication of the old one would overwrite the new one's mark.
        if !self.is_held(r) {
            return Err(Error::NotFound(format!(
                "replica {}.s{} is no longer held here",
                r.gallery, r.shard
            )));
        }
        let seq = *r.applied.borrow();
        let key = keys::applied_key(&r.gallery, r.shard, &self.name);
        // Only while its gallery is the one in etcd: a mark put after a drop would
        // stay behind the dropped gallery (under this node's lease, for as long as it
        // lives).
        let mark = keys::encode(&keys::AppliedMark {
            seq,
            gallery_created_ms: r.created_ms,
        });
        let txn = etcd::TxnRequest {
            compare: vec![self.same_gallery(r)?],
            success: vec![etcd::put_op(&key, mark, self.lease.load(Ordering::Relaxed))],
            failure: Vec::new(),
        };
        if !self.etcd.txn(&format!("a write of {key}"), txn).await?.succeeded {
            return Err(Error::NotFound(format!("gallery {:?} was dropped", r.gallery)));
        }
        Ok(seq)
    }
}
