//! What a node checks before it answers a read the router sent to one of its replicas.
//!
//! The router chooses a replica from its view of etcd (brought up to etcd's revision
//! before each read, router/replicas.rs): a replica of the gallery in the catalogue
//! whose applied batch has reached the shard's visible one. By the time the read
//! arrives the node may hold something else under the name: a replica of a gallery
//! dropped and made again (its own view behind, or cut off from etcd), or one reloaded
//! from an older checkpoint. So the router says what it chose, in two headers, and the
//! node answers only from that; otherwise UNAVAILABLE, and the router asks another
//! replica. A read without the headers (a client talking to the node directly) is
//! answered as before.
//!
//! A node whose lease may have lapsed (not renewed within its time to live, counted
//! from before the renewal was asked) fences itself against direct clients: it answers
//! no unmarked read of a replica until it has renewed it or registered again, since it
//! may already be out of the cluster and behind (a drop, a commit it has not seen). A
//! router's marked read is checked as above instead: when etcd has lost its quorum no
//! node can renew its lease, and searches through the router go on.

use super::Node;
use crate::error::{Error, Result};
use tonic::metadata::MetadataMap;

/// The `created_ms` of the gallery the router expects the replica to belong to.
const CREATED_MS: &str = "biogate-replica-created-ms";
/// The batch the replica must have applied (the shard's visible batch).
const APPLIED: &str = "biogate-replica-applied";

/// Mark a read for a replica of the gallery made at `created_ms` that has applied
/// `applied` at least.
pub fn expect(metadata: &mut MetadataMap, created_ms: i64, applied: u64) {
    metadata.insert(CREATED_MS, created_ms.into());
    metadata.insert(APPLIED, applied.into());
}

fn header<T: std::str::FromStr>(metadata: &MetadataMap, name: &str) -> Result<Option<T>> {
    let Some(v) = metadata.get(name) else { return Ok(None) };
    v.to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| Error::invalid(format!("{name}: not a number")))
}

impl Node {
    /// Whether this node may answer a read of `local` marked by [`expect`]: it holds
    /// the replica, of that gallery, and has applied that batch.
    /// An unmarked read of a replica (a client talking to the node, not through a
    /// router) is refused while the node's lease may have lapsed: it may be out of the
    /// cluster already, its replicas placed elsewhere and behind. A marked read is
    /// checked against what the router read from etcd instead (and when etcd has no
    /// quorum, so that no lease can be renewed, the router's reads still go on).
    pub fn check_read(&self, local: &str, metadata: &MetadataMap) -> Result<()> {
        let created_ms: Option<i64> = header(metadata, CREATED_MS)?;
        let applied: Option<u64> = header(metadata, APPLIED)?;
        let replica = self.replica_of_local(local);
        let marked = created_ms.is_some() || applied.is_some();
        if replica.is_some() && !marked && !self.lease_holds() {
            return Err(Error::Unavailable(format!(
                "{local}: node {} could not renew its lease in time (etcd unreachable, or the node paused): it answers no read until it has",
                self.name
            )));
        }
        if !marked {
            return Ok(());
        }
        let Some(r) = replica else {
            return Err(Error::Unavailable(format!(
                "{local}: node {} does not hold this replica now",
                self.name
            )));
        };
        if let Some(c) = created_ms
            && c != r.created_ms
        {
            return Err(Error::Unavailable(format!(
                "{local}: node {} holds the replica of another gallery of that name (made at {} ms, not {c})",
                self.name, r.created_ms
            )));
        }
        let at = *r.applied.borrow();
        if let Some(a) = applied
            && at < a
        {
            return Err(Error::Unavailable(format!(
                "{local}: node {} has applied batch {at} of {a}",
                self.name
            )));
        }
        Ok(())
    }
}
