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
use std::collections::{BTreeMap, BTreeSet};

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
pub const COMMITTED: &str = "/biogate/committed/";

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
pub fn visible_prefix(g: &str) -> String {
    format!("{VISIBLE}{g}/")
}
/// The last batch a node committed to a shard (node/commit.rs): how a commit whose
/// answer was lost learns, exactly, whether and where it took effect.
pub fn committed_key(g: &str, s: u32, node: &str) -> String {
    format!("{COMMITTED}{g}/{s:04}/{node}")
}

/// The value at [`committed_key`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LastCommit {
    /// The batch's object (unique to one commit).
    pub object: String,
    pub seq: u64,
}

/// The value at [`checkpoint_key`]: a shard's latest checkpoint (taken by checkpoint.rs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// The last batch it includes.
    pub seq: u64,
    /// Where the files it uploaded are in the object store.
    pub prefix: String,
    pub files: Vec<String>,
    /// Files it did not upload because the checkpoint before it already had them (an
    /// immutable segment of the same identity): file name -> object path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub elsewhere: BTreeMap<String, String>,
    /// The identity of each immutable file (segments: the gallery's id and the header's
    /// CRC, which covers every byte), so the next checkpoint can reuse its object.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identities: BTreeMap<String, String>,
    pub gallery_created_ms: i64,
    /// The node that took it.
    pub node: String,
}

impl Checkpoint {
    /// Where file `f` of this checkpoint is in the object store.
    pub fn object(&self, f: &str) -> String {
        self.elsewhere
            .get(f)
            .cloned()
            .unwrap_or_else(|| format!("{}/{f}", self.prefix))
    }

    /// Every object this checkpoint needs.
    pub fn objects(&self) -> BTreeSet<String> {
        self.files.iter().map(|f| self.object(f)).collect()
    }
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
    /// How subjects are placed on its shards (absent in entries written before it was
    /// named: those galleries keep [`ShardHash::Fnv1aMod`]).
    #[serde(default)]
    pub shard_hash: ShardHash,
}

impl GalleryMeta {
    /// The shard of `subject` (its canonical id) in this gallery.
    pub fn shard_of(&self, subject: &str) -> u32 {
        self.shard_hash.shard_of(subject, self.shards)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardMap {
    /// The nodes holding a replica, in placement order.
    pub replicas: Vec<String>,
}

/// A replica's applied batch, as its node publishes it: with the gallery it belongs to,
/// so a replica of a dropped gallery is never counted as serving one made again under
/// its name. (Nodes before this published the bare number.)
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AppliedMark {
    pub seq: u64,
    pub gallery_created_ms: i64,
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

/// How a gallery places subjects on its shards: fixed when it is created and kept in
/// its catalogue entry, so every node, router and release agrees on it forever.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShardHash {
    /// FNV-1a of the id modulo the shard count: galleries created before the hash was
    /// named (their entries name none). With a power-of-two count the shard depends only
    /// on the low bits of each byte (2 shards: the parity of the odd bytes, so ids that
    /// differ only in letter case share a shard).
    #[default]
    Fnv1aMod,
    /// FNV-1a of the id, mixed by a 64-bit finaliser (every input bit reaches every
    /// output bit), the shard taken from the high bits (multiply-shift): new galleries.
    Mixed,
}

impl ShardHash {
    /// The shard of `subject` (its canonical id) among `shards`.
    pub fn shard_of(self, subject: &str, shards: u32) -> u32 {
        let shards = u64::from(shards.max(1));
        let h = fnv1a(subject);
        match self {
            ShardHash::Fnv1aMod => (h % shards) as u32,
            ShardHash::Mixed => ((u128::from(mix64(h)) * u128::from(shards)) >> 64) as u32,
        }
    }
}

fn fnv1a(subject: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser.
fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shard of `subject` among `shards` in a gallery created now ([`ShardHash::Mixed`]).
pub fn shard_of(subject: &str, shards: u32) -> u32 {
    ShardHash::Mixed.shard_of(subject, shards)
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
    /// Gallery -> the revision its catalogue key was written at (it is written once):
    /// which gallery of that name, when one is dropped and made again.
    pub gallery_revisions: BTreeMap<String, i64>,
    pub shards: BTreeMap<(String, u32), (ShardMap, i64)>,
    /// (gallery, shard) -> node -> applied batch.
    pub applied: BTreeMap<(String, u32), BTreeMap<String, u64>>,
    pub visible: BTreeMap<(String, u32), (u64, i64)>,
    /// (gallery, shard) -> the last committed batch.
    pub committed: BTreeMap<(String, u32), u64>,
    /// (gallery, shard) -> its latest checkpoint, and the key's revision.
    pub checkpoints: BTreeMap<(String, u32), (Checkpoint, i64)>,
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

    /// Real-looking ids (passport numbers, national ids with fixed prefixes, ids that
    /// differ only in letter case) and their shards among 2, 3, 4 and 16, pinned:
    /// changing either hash would move every subject of every cluster.
    const PINNED: [(&str, [u32; 4], [u32; 4]); 8] = [
        // (id, Fnv1aMod shards among [2, 3, 4, 16], Mixed shards among [2, 3, 4, 16])
        ("P12345678", [1, 1, 3, 15], [1, 1, 2, 8]),
        ("p12345678", [1, 0, 3, 15], [0, 0, 0, 3]),
        ("X48219370", [1, 0, 1, 5], [1, 1, 2, 10]),
        ("DE-1990-004711", [0, 0, 2, 14], [0, 0, 0, 0]),
        ("de-1990-004711", [0, 0, 2, 14], [1, 2, 3, 12]),
        ("AB123456C", [0, 2, 2, 2], [1, 1, 2, 9]),
        ("ab123456c", [0, 0, 2, 2], [1, 2, 3, 15]),
        ("", [1, 2, 1, 5], [1, 2, 3, 14]),
    ];

    #[test]
    fn shards_of_real_looking_ids_are_pinned() {
        for (id, fnv, mixed) in PINNED {
            for (i, shards) in [2, 3, 4, 16].into_iter().enumerate() {
                assert_eq!(
                    ShardHash::Fnv1aMod.shard_of(id, shards),
                    fnv[i],
                    "{id:?} among {shards}, Fnv1aMod"
                );
                assert_eq!(
                    ShardHash::Mixed.shard_of(id, shards),
                    mixed[i],
                    "{id:?} among {shards}, Mixed"
                );
            }
        }
        assert_eq!(shard_of("P12345678", 16), ShardHash::Mixed.shard_of("P12345678", 16));
    }

    /// A document number followed by its ICAO 9303 check digit (weights 7, 3, 1; the
    /// machine-readable zone of a passport).
    fn mrz_number(number: &str) -> String {
        let weights = [7, 3, 1];
        let sum: u32 = number
            .chars()
            .enumerate()
            .map(|(i, c)| c.to_digit(10).unwrap_or(c as u32 - 'A' as u32 + 10) * weights[i % 3])
            .sum();
        format!("{number}{}", sum % 10)
    }

    #[test]
    fn document_numbers_with_check_digits_spread_under_the_mixed_hash() {
        // Under Fnv1aMod every such id lands in one of two shards (a check digit fixes
        // the low bits FNV-1a modulo a power of two depends on); Mixed spreads them.
        for shards in [2u32, 16] {
            let mut fnv = vec![0usize; shards as usize];
            let mut mixed = vec![0usize; shards as usize];
            for i in 0..20_000 {
                let id = mrz_number(&format!("L{i:08}"));
                fnv[ShardHash::Fnv1aMod.shard_of(&id, shards) as usize] += 1;
                mixed[ShardHash::Mixed.shard_of(&id, shards) as usize] += 1;
            }
            let mean = 20_000 / shards as usize;
            assert!(*fnv.iter().max().unwrap() >= 2 * mean - mean / 10, "{shards}: {fnv:?}");
            assert!(*mixed.iter().max().unwrap() < mean + mean / 10, "{shards}: {mixed:?}");
        }
    }

    #[test]
    fn an_entry_without_a_hash_keeps_the_old_one_and_new_entries_name_theirs() {
        let old = br#"{"dim":4,"dtype":"f32","shards":2,"replicas":2,"created_ms":5}"#;
        let meta: GalleryMeta = decode("k", old).unwrap();
        assert_eq!(meta.shard_hash, ShardHash::Fnv1aMod);
        let new = GalleryMeta {
            shard_hash: ShardHash::Mixed,
            ..meta
        };
        let text = String::from_utf8(encode(&new)).unwrap();
        assert!(text.contains(r#""shard_hash":"mixed""#), "{text}");
        assert_eq!(decode::<GalleryMeta>("k", text.as_bytes()).unwrap(), new);
    }

    #[test]
    fn ids_differing_only_in_case_spread_under_the_mixed_hash() {
        // Under Fnv1aMod with 2 shards, an id and its lower-case form always share a
        // shard; under Mixed about half of such pairs do not.
        let (mut fnv_same, mut mixed_same) = (0, 0);
        for i in 0..2000 {
            let upper = format!("AB{i:06}C");
            let lower = upper.to_lowercase();
            fnv_same += usize::from(ShardHash::Fnv1aMod.shard_of(&upper, 2) == ShardHash::Fnv1aMod.shard_of(&lower, 2));
            mixed_same += usize::from(ShardHash::Mixed.shard_of(&upper, 2) == ShardHash::Mixed.shard_of(&lower, 2));
        }
        assert_eq!(fnv_same, 2000);
        assert!((800..1200).contains(&mixed_same), "{mixed_same}");
    }

    /// Four families of a million real-looking ids each; for each hash and shard count,
    /// the fullest shard's load over the mean (1.000 = perfectly even).
    /// `cargo test --release --lib -- --ignored --nocapture shard_balance_report`
    /// (BENCHMARKS.md, "Shard balance").
    #[test]
    #[ignore = "a report: BENCHMARKS.md, shard balance"]
    fn shard_balance_report() {
        type Family = (&'static str, fn(u64) -> String);
        let families: [Family; 5] = [
            ("passport numbers P + 8 digits, in issue order", |i| {
                format!("P{:08}", 10_000_000 + i)
            }),
            ("ICAO 9303 document numbers with their check digit", |i| {
                mrz_number(&format!("L{i:08}"))
            }),
            ("national ids DE-YYYY-NNNNNN", |i| {
                format!("DE-{}-{:06}", 1940 + i % 80, i / 80)
            }),
            ("case pairs AB123456C / ab123456c", |i| {
                let id = format!("AB{:06}C", i / 2);
                if i % 2 == 0 { id } else { id.to_lowercase() }
            }),
            ("gate ids GATE-07-YYYYMMDD-NNNN", |i| {
                format!(
                    "GATE-07-2026{:02}{:02}-{:04}",
                    1 + (i / 31 / 10_000) % 12,
                    1 + (i / 10_000) % 31,
                    i % 10_000
                )
            }),
        ];
        println!("| ids (1,000,000) | hash | 2 | 4 | 8 | 16 | 64 |");
        println!("|---|---|---|---|---|---|---|");
        for (name, make) in families {
            let ids: Vec<String> = (0..1_000_000).map(make).collect();
            for hash in [ShardHash::Fnv1aMod, ShardHash::Mixed] {
                let mut row = format!("| {name} | {hash:?} |");
                for shards in [2u32, 4, 8, 16, 64] {
                    let mut counts = vec![0u64; shards as usize];
                    for id in &ids {
                        counts[hash.shard_of(id, shards) as usize] += 1;
                    }
                    let mean = ids.len() as f64 / f64::from(shards);
                    let max = *counts.iter().max().unwrap() as f64;
                    row.push_str(&format!(" {:.3} |", max / mean));
                }
                println!("{row}");
            }
        }
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
