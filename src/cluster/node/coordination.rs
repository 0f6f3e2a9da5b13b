//! Replica placement: the node holding the coordinator key keeps each shard's replicas
//! where the placement puts them, adding new ones before removing those they replace.

use super::{Node, REPLACE_AFTER};
use crate::cluster::etcd;
use crate::cluster::keys::{self, ClusterState};
use crate::error::Result;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Node {
    /// While this node is the coordinator (it holds `/biogate/coordinator` under its
    /// lease), keep each shard's replicas where [`keys::placement`] puts them among the
    /// live nodes and those down for less than [`REPLACE_AFTER`]. A node placed anew is
    /// added first; the replicas it replaces are removed only once every placed replica
    /// has caught up, so a shard never has fewer serving replicas than before.
    pub(super) async fn coordinate(&self) -> Result<()> {
        let (coordinator, connected) = (self.view.read(|st| st.coordinator.clone()), self.view.connected());
        if !connected {
            return Ok(());
        }
        match coordinator {
            Some(c) if c == self.name => {}
            Some(_) => return Ok(()),
            None => {
                let lease = self.lease.load(Ordering::Relaxed);
                let txn = etcd::TxnRequest {
                    compare: vec![etcd::absent(keys::COORDINATOR)],
                    success: vec![etcd::put_op(keys::COORDINATOR, self.name.as_bytes().to_vec(), lease)],
                    failure: Vec::new(),
                };
                if !self.etcd.txn("taking the coordinator key", txn).await?.succeeded {
                    return Ok(());
                }
                tracing::info!(node = %self.name, "coordinating replica placement");
            }
        }
        let now = Instant::now();
        let changes = self.view.read(|st| {
            let live = st.live_nodes();
            let mut out = Vec::new();
            if live.is_empty() {
                return out;
            }
            // A node that went down a moment ago (a restart) keeps its place for
            // REPLACE_AFTER: its replicas wait for it instead of being rebuilt elsewhere.
            let mut missing = self.missing_since.lock().expect("missing lock");
            missing.retain(|n, _| !st.nodes.contains_key(n));
            for (map, _) in st.shards.values() {
                for n in &map.replicas {
                    if !st.nodes.contains_key(n) {
                        missing.entry(n.clone()).or_insert(now);
                    }
                }
            }
            let mut placeable = live.clone();
            placeable.extend(
                missing
                    .iter()
                    .filter(|(_, since)| now.duration_since(**since) < REPLACE_AFTER)
                    .map(|(n, _)| n.clone()),
            );
            placeable.sort();
            let live = placeable;
            for (g, meta) in &st.galleries {
                for s in 0..meta.shards {
                    let (current, revision) = st.shards.get(&(g.clone(), s)).cloned().unwrap_or_default();
                    let next = next_replicas(st, g, s, meta.replicas, &live, &current.replicas);
                    if next != current.replicas {
                        out.push((g.clone(), s, next, revision));
                    }
                }
            }
            out
        });
        for (g, s, replicas, revision) in changes {
            let key = keys::shard_key(&g, s);
            let txn = etcd::TxnRequest {
                compare: vec![etcd::unchanged_since(&key, revision), gallery_exists(&g)],
                success: vec![etcd::put_op(
                    &key,
                    keys::encode(&keys::ShardMap {
                        replicas: replicas.clone(),
                    }),
                    0,
                )],
                failure: Vec::new(),
            };
            if self.etcd.txn(&format!("placing {key}"), txn).await?.succeeded {
                tracing::info!(gallery = %g, shard = s, replicas = %replicas.join(","), "placed replicas");
            }
        }
        Ok(())
    }
}

/// The shard map's next replica list: the placement's nodes added to the current ones;
/// once every placed node has caught up, the placement alone.
pub fn next_replicas(
    st: &ClusterState,
    g: &str,
    s: u32,
    replicas: u32,
    live: &[String],
    current: &[String],
) -> Vec<String> {
    let want = keys::placement(g, s, replicas, live);
    let visible = st.visible.get(&(g.to_owned(), s)).map_or(0, |v| v.0);
    let applied = st.applied.get(&(g.to_owned(), s));
    let ready = |n: &String| applied.and_then(|a| a.get(n)).is_some_and(|&a| a >= visible);
    if want.iter().all(ready) {
        return want;
    }
    let mut next = current.to_vec();
    next.extend(want.into_iter().filter(|n| !current.contains(n)));
    next
}

/// Compare: the gallery still exists.
fn gallery_exists(g: &str) -> etcd::pb::Compare {
    etcd::present(&keys::gallery_key(g))
}
