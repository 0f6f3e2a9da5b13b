//! What the cluster keeps in etcd: the key layout, the JSON values, where a subject
//! lives (its shard), and where a shard's replicas should be (its placement).
//!
//! ```text
//! /biogate/store                          the object store's URL (set by the first node)
//! /biogate/nodes/{node}                   {"address"}                     under the node's lease
//! /biogate/coordinator                    the node that places replicas   under its lease
//! /biogate/galleries/{g}                  {"dim","dtype","shards","replicas","created_ms"}
//! /biogate/shards/{g}/{s}                 {"replicas": [node, ...]}       the shard map
//! /biogate/log/{g}/{s}/{seq}              {"object","ops","node"}         the shard's commit order
//! /biogate/applied/{g}/{s}/{node}         last batch the replica applied  under the node's lease
//! /biogate/visible/{g}/{s}                last batch acknowledged as visible
//! /biogate/checkpoints/{g}/{s}            the shard's latest checkpoint (checkpoint.rs)
//! ```
//!
//! `{s}` is 4 digits and `{seq}` 20, so keys sort in number order. In the object
//! store a batch is `galleries/{g}-{created_ms}/{s}/batches/{node}-{ms}-{n}.bgb`.

use crate::error::{Error, Result};
use crate::template::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ROOT: &str = "/biogate/";
pub const STORE: &str = "/biogate/store";
pub const COORDINATOR: &str = "/biogate/coordinator";
pub const NODES: &str = "/biogate/nodes/";
pub const GALLERIES: &str = "/biogate/galleries/";
pub const SHARDS: &str = "/biogate/shards/";
pub const LOG: &str = "/biogate/log/";
pub const APPLIED: &str = "/biogate/applied/";
pub const VISIBLE: &str = "/biogate/visible/";
pub const CHECKPOINTS: &str = "/biogate/checkpoints/";

/// Most shards a gallery may have.
pub const MAX_SHARDS: u32 = 1024;
/// Longest cluster gallery name (a replica's local name adds ".s" and the shard).
pub const MAX_GALLERY_NAME: usize = 56;

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}
pub fn gallery_key(g: &str) -> String {
    format!("{GALLERIES}{g}")
}
pub fn shard_key(g: &str, s: u32) -> String {
    format!("{SHARDS}{g}/{s:04}")
}
pub fn log_prefix(g: &str, s: u32) -> String {
    format!("{LOG}{g}/{s:04}/")
}
pub fn log_key(g: &str, s: u32, seq: u64) -> String {
    format!("{LOG}{g}/{s:04}/{seq:020}")
}
pub fn applied_key(g: &str, s: u32, node: &str) -> String {
    format!("{APPLIED}{g}/{s:04}/{node}")
}
pub fn visible_key(g: &str, s: u32) -> String {
    format!("{VISIBLE}{g}/{s:04}")
}
pub fn checkpoint_key(g: &str, s: u32) -> String {
    format!("{CHECKPOINTS}{g}/{s:04}")
}

/// The name a shard's replica has in a node's own registry of galleries.
pub fn replica_name(g: &str, s: u32) -> String {
    format!("{g}.s{s}")
}

/// Where a gallery's objects live in the object store (a gallery dropped and made
/// again under the same name has other objects).
pub fn objects_prefix(g: &str, created_ms: i64) -> String {
    format!("galleries/{g}-{created_ms}")
}

/// Where a shard's batches live in the object store.
pub fn batch_prefix(g: &str, created_ms: i64, s: u32) -> String {
    format!("{}/{s:04}/batches", objects_prefix(g, created_ms))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Where its gRPC server listens.
    pub address: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GalleryMeta {
    pub dim: usize,
    pub dtype: Dtype,
    pub shards: u32,
    pub replicas: u32,
    /// When it was created (ms since the epoch); a replica made for an older gallery of
    /// the same name is dropped, not reused.
    pub created_ms: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardMap {
    /// The nodes holding a replica, in placement order.
    pub replicas: Vec<String>,
}

/// One committed batch of a shard's log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    /// The batch's path in the object store.
    pub object: String,
    /// Enrollments and deletions in it.
    pub ops: u32,
    /// The node that committed it.
    pub node: String,
    /// The gallery it was committed for (its `created_ms`).
    pub gallery_created_ms: i64,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("cluster values serialise")
}

pub fn decode<T: for<'a> Deserialize<'a>>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("etcd key {key}: {e}")))
}

/// The shard of `subject` among `shards`: FNV-1a of its id, so every node, router and
/// release agrees on it forever.
pub fn shard_of(subject: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// Where shard `s` of `g` should have its replicas among `live` nodes: the `replicas`
/// nodes that rank highest by a hash of (node, gallery, shard) (rendezvous hashing, so
/// a node joining or leaving moves only the replicas it wins or held).
pub fn placement(g: &str, s: u32, replicas: u32, live: &[String]) -> Vec<String> {
    let mut ranked: Vec<(u64, &String)> = live
        .iter()
        .map(|n| {
            let key = format!("{n}\0{g}\0{s}");
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in key.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // Mix the bits so that names differing in their last byte spread.
            h ^= h >> 33;
            h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^= h >> 33;
            (h, n)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    ranked
        .into_iter()
        .take(replicas as usize)
        .map(|(_, n)| n.clone())
        .collect()
}

/// A key's last part after `prefix` split by '/' (e.g. gallery, shard, node).
pub fn parts<'a>(key: &'a str, prefix: &str) -> Vec<&'a str> {
    key.strip_prefix(prefix)
        .map(|r| r.split('/').collect())
        .unwrap_or_default()
}

/// The typed view of the cluster's keys (everything but the log entries, which
/// replicas read for their own shards).
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub store: Option<String>,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub galleries: BTreeMap<String, GalleryMeta>,
    pub shards: BTreeMap<(String, u32), (ShardMap, i64)>,
    /// (gallery, shard) -> node -> applied batch.
    pub applied: BTreeMap<(String, u32), BTreeMap<String, u64>>,
    pub visible: BTreeMap<(String, u32), (u64, i64)>,
    /// (gallery, shard) -> the last committed batch.
    pub committed: BTreeMap<(String, u32), u64>,
    /// (gallery, shard) -> its latest checkpoint, and the key's revision.
    pub checkpoints: BTreeMap<(String, u32), (super::checkpoint::Checkpoint, i64)>,
    pub coordinator: Option<String>,
}

impl ClusterState {
    /// The replicas of a shard that a search may use: live, in the shard map, and
    /// caught up to the shard's visible batch.
    pub fn serving(&self, g: &str, s: u32) -> Vec<(String, String)> {
        let key = (g.to_owned(), s);
        let Some((map, _)) = self.shards.get(&key) else {
            return Vec::new();
        };
        let visible = self.visible.get(&key).map_or(0, |v| v.0);
        let applied = self.applied.get(&key);
        map.replicas
            .iter()
            .filter_map(|n| {
                let info = self.nodes.get(n)?;
                let at = applied.and_then(|a| a.get(n)).copied()?;
                (at >= visible).then(|| (n.clone(), info.address.clone()))
            })
            .collect()
    }

    /// Live nodes, by name.
    pub fn live_nodes(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    pub fn shard_map(&self, g: &str, s: u32) -> Option<&ShardMap> {
        self.shards.get(&(g.to_owned(), s)).map(|m| &m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Pinned: changing the hash would move every subject of every cluster.
        assert_eq!(shard_of("subject-0", 7), shard_of("subject-0", 7));
        assert_eq!(shard_of("", 4), (0xcbf2_9ce4_8422_2325u64 % 4) as u32);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("s{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn placement_moves_only_what_a_new_node_wins() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let four: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mut moved = 0;
        for s in 0..64 {
            let before = placement("g", s, 2, &three);
            let after = placement("g", s, 2, &four);
            assert_eq!(before.len(), 2);
            for n in &after {
                if n != "d" {
                    assert!(before.contains(n), "shard {s}: {before:?} -> {after:?}");
                }
            }
            moved += usize::from(after.contains(&"d".to_owned()));
        }
        assert!((16..=48).contains(&moved), "{moved} of 64 shards gave d a replica");
        assert_eq!(placement("g", 0, 5, &three).len(), 3);
    }
}
