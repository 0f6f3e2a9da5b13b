//! A live copy of the cluster's keys in etcd (everything under `/biogate/`): read once,
//! then followed by a watch. Nodes and routers read the shard map, membership and
//! progress from it without asking etcd; a change wakes whoever waits on [`View::changed`].
//!
//! `BIOGATE_FAULT_SLOW_WATCH_MS` (fault injection, for tests) delays each watch answer
//! by that much, as an overloaded process or network would.
//!
//! If etcd cannot be reached the copy keeps the last state it knew (searches go on with
//! the last known map) and says so (`connected` false) until a member answers again;
//! then it is read afresh and the watch resumes.

use super::etcd::{Etcd, KeyValue, pb};
use super::keys::{self, ClusterState, GalleryMeta, LogEntry, NodeInfo, ShardMap};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The copy of the cluster's keys.
pub struct View {
    mirror: RwLock<Mirror>,
    changed: watch::Sender<u64>,
    connected: AtomicBool,
    /// How many times it began following etcd.
    follows: AtomicU64,
}

/// Node -> (applied batch, the gallery's `created_ms` if the node said).
type AppliedMarks = BTreeMap<String, (u64, Option<i64>)>;

#[derive(Default)]
struct Mirror {
    state: ClusterState,
    /// (gallery, shard) -> seq -> entry.
    log: BTreeMap<(String, u32), BTreeMap<u64, LogEntry>>,
    /// (gallery, shard) -> node -> its applied batch and the gallery it belongs to
    /// (None: published by an older node). `state.applied` holds the marks of the
    /// gallery now in the catalogue.
    applied_marks: BTreeMap<(String, u32), AppliedMarks>,
    version: u64,
}

impl View {
    /// Read the keys and follow them from then on (in a task that lives as long as the
    /// returned view). Waits for the first read, up to `first_read`.
    pub async fn start(etcd: Arc<Etcd>, first_read: Duration) -> Arc<View> {
        let view = Arc::new(View {
            mirror: RwLock::new(Mirror::default()),
            changed: watch::channel(0).0,
            connected: AtomicBool::new(false),
            follows: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&view);
        // Fault injection for tests: how much longer a view that lost etcd waits before
        // following it again (the moments after a member dies, made long).
        let slow_reconnect = super::fault_delay("BIOGATE_FAULT_SLOW_VIEW_RECONNECT_MS");
        tokio::spawn(async move {
            loop {
                let Some(view) = weak.upgrade() else { return };
                let lost = view.follow(&etcd).await.err();
                if let Some(e) = &lost {
                    if view.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "lost etcd: following it again");
                    }
                    view.bump();
                }
                drop(view);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if lost.is_some() && !slow_reconnect.is_zero() {
                    tokio::time::sleep(slow_reconnect).await;
                }
            }
        });
        let mut rx = view.changed();
        let _ = tokio::time::timeout(first_read, async {
            while !view.connected() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        view
    }

    /// Read everything, then apply the watch's events until it fails.
    async fn follow(&self, etcd: &Etcd) -> crate::Result<()> {
        let (kvs, revision) = etcd.get_prefix(keys::ROOT).await?;
        {
            let mut m = Mirror::default();
            for kv in &kvs {
                m.apply(kv, false);
            }
            let mut mirror = self.mirror.write().expect("view lock");
            m.version = mirror.version;
            *mirror = m;
        }
        self.follows.fetch_add(1, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        self.bump();
        let mut events = etcd.watch_prefix(keys::ROOT, revision + 1).await?;
        let slow = super::fault_delay("BIOGATE_FAULT_SLOW_WATCH_MS");
        loop {
            let r = events
                .message()
                .await
                .map_err(|s| crate::Error::Unavailable(format!("etcd watch: {}", s.message())))?
                .ok_or_else(|| crate::Error::Unavailable("etcd watch ended".into()))?;
            if !slow.is_zero() {
                tokio::time::sleep(slow).await;
            }
            if r.canceled {
                return Err(crate::Error::Unavailable(format!(
                    "etcd watch cancelled: {}",
                    r.cancel_reason
                )));
            }
            if r.events.is_empty() {
                continue;
            }
            {
                let mut mirror = self.mirror.write().expect("view lock");
                for e in &r.events {
                    if let Some(kv) = &e.kv {
                        mirror.apply(kv, e.r#type == pb::event::EventType::Delete as i32);
                    }
                }
            }
            self.bump();
        }
    }

    fn bump(&self) {
        let v = {
            let mut m = self.mirror.write().expect("view lock");
            m.version += 1;
            m.version
        };
        self.changed.send_replace(v);
    }

    /// Whether the copy is following etcd now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many times the copy began following etcd (read it all, then watched): a
    /// change says it followed etcd again since.
    pub fn follows(&self) -> u64 {
        self.follows.load(Ordering::Relaxed)
    }

    /// Told of every change.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Read the current state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.mirror.read().expect("view lock").state)
    }

    /// The shard's committed batches after `after`, in order.
    pub fn log_after(&self, g: &str, s: u32, after: u64) -> Vec<(u64, LogEntry)> {
        let m = self.mirror.read().expect("view lock");
        m.log
            .get(&(g.to_owned(), s))
            .map(|l| l.range(after + 1..).map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// Wait until `ready` holds (true) or `deadline` passes (false).
    pub async fn wait_for(&self, deadline: Instant, ready: impl Fn(&ClusterState) -> bool) -> bool {
        let mut rx = self.changed();
        loop {
            if self.read(&ready) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.read(&ready),
            }
        }
    }
}

impl Mirror {
    /// `state.applied` for gallery `g`: the marks of the gallery now in the catalogue.
    fn refresh_applied(&mut self, g: &str) {
        let st = &mut self.state;
        st.applied.retain(|(gallery, _), _| gallery != g);
        let Some(created_ms) = st.galleries.get(g).map(|m| m.created_ms) else {
            return;
        };
        for ((gallery, s), marks) in self.applied_marks.range((g.to_owned(), 0)..=(g.to_owned(), u32::MAX)) {
            debug_assert_eq!(gallery, g);
            let nodes: BTreeMap<String, u64> = marks
                .iter()
                .filter(|(_, (_, of))| of.is_none_or(|c| c == created_ms))
                .map(|(n, (seq, _))| (n.clone(), *seq))
                .collect();
            if !nodes.is_empty() {
                st.applied.insert((g.to_owned(), *s), nodes);
            }
        }
    }

    fn apply(&mut self, kv: &KeyValue, deleted: bool) {
        let Ok(key) = std::str::from_utf8(&kv.key) else { return };
        if let Err(e) = self.apply_key(key, &kv.value, kv.mod_revision, deleted) {
            tracing::warn!(key, error = %e, "ignoring a cluster key that does not parse");
        }
    }

    fn apply_key(&mut self, key: &str, value: &[u8], revision: i64, deleted: bool) -> crate::Result<()> {
        let st = &mut self.state;
        let shard_id =
            |p: &[&str]| -> Option<(String, u32)> { Some((p.first()?.to_string(), p.get(1)?.parse().ok()?)) };
        if key == keys::STORE {
            st.store = (!deleted).then(|| String::from_utf8_lossy(value).into_owned());
        } else if key == keys::COORDINATOR {
            st.coordinator = (!deleted).then(|| String::from_utf8_lossy(value).into_owned());
        } else if let Some(node) = key.strip_prefix(keys::NODES) {
            if deleted {
                st.nodes.remove(node);
            } else {
                st.nodes.insert(node.to_owned(), keys::decode::<NodeInfo>(key, value)?);
            }
        } else if let Some(g) = key.strip_prefix(keys::GALLERIES) {
            if deleted {
                st.galleries.remove(g);
                st.gallery_revisions.remove(g);
            } else {
                st.galleries
                    .insert(g.to_owned(), keys::decode::<GalleryMeta>(key, value)?);
                st.gallery_revisions.insert(g.to_owned(), revision);
            }
            let g = g.to_owned();
            self.refresh_applied(&g);
        } else if key.starts_with(keys::SHARDS) {
            let Some(id) = shard_id(&keys::parts(key, keys::SHARDS)) else {
                return Ok(());
            };
            if deleted {
                st.shards.remove(&id);
            } else {
                st.shards.insert(id, (keys::decode::<ShardMap>(key, value)?, revision));
            }
        } else if key.starts_with(keys::LOG) {
            let p = keys::parts(key, keys::LOG);
            let (Some(id), Some(Ok(seq))) = (shard_id(&p), p.get(2).map(|s| s.parse::<u64>())) else {
                return Ok(());
            };
            let log = self.log.entry(id.clone()).or_default();
            if deleted {
                log.remove(&seq);
            } else {
                log.insert(seq, keys::decode::<LogEntry>(key, value)?);
            }
            match log.last_key_value() {
                Some((last, _)) => st.committed.insert(id, *last),
                None => st.committed.remove(&id),
            };
        } else if key.starts_with(keys::APPLIED) {
            let p = keys::parts(key, keys::APPLIED);
            let (Some(id), Some(node)) = (shard_id(&p), p.get(2)) else {
                return Ok(());
            };
            let mark = if deleted {
                None
            } else if let Ok(m) = serde_json::from_slice::<keys::AppliedMark>(value) {
                Some((m.seq, Some(m.gallery_created_ms)))
            } else {
                Some((keys::decode::<u64>(key, value)?, None))
            };
            let nodes = self.applied_marks.entry(id.clone()).or_default();
            match mark {
                Some(m) => nodes.insert((*node).to_owned(), m),
                None => nodes.remove(*node),
            };
            self.refresh_applied(&id.0);
        } else if key.starts_with(keys::CHECKPOINTS) {
            let Some(id) = shard_id(&keys::parts(key, keys::CHECKPOINTS)) else {
                return Ok(());
            };
            if deleted {
                st.checkpoints.remove(&id);
            } else {
                st.checkpoints.insert(id, (keys::decode(key, value)?, revision));
            }
        } else if key.starts_with(keys::VISIBLE) {
            let Some(id) = shard_id(&keys::parts(key, keys::VISIBLE)) else {
                return Ok(());
            };
            if deleted {
                st.visible.remove(&id);
            } else {
                st.visible.insert(id, (keys::decode::<u64>(key, value)?, revision));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Dtype;

    fn gallery(created_ms: i64) -> Vec<u8> {
        keys::encode(&GalleryMeta {
            dim: 4,
            dtype: Dtype::F32,
            shards: 1,
            replicas: 2,
            created_ms,
            shard_hash: keys::ShardHash::Mixed,
        })
    }

    fn mark(seq: u64, gallery_created_ms: i64) -> Vec<u8> {
        keys::encode(&keys::AppliedMark {
            seq,
            gallery_created_ms,
        })
    }

    #[test]
    fn a_replica_of_a_dropped_gallery_never_counts_for_one_made_again() {
        let mut m = Mirror::default();
        let (g, n1, n2) = (
            keys::gallery_key("fl"),
            keys::applied_key("fl", 0, "n1"),
            keys::applied_key("fl", 0, "n2"),
        );
        let applied = |m: &Mirror| m.state.applied.get(&("fl".to_owned(), 0)).cloned().unwrap_or_default();
        // Marks may come before the gallery's key (a first read is in key order).
        m.apply_key(&n1, &mark(3, 100), 1, false).unwrap();
        assert!(applied(&m).is_empty());
        m.apply_key(&g, &gallery(100), 2, false).unwrap();
        assert_eq!(applied(&m), BTreeMap::from([("n1".to_owned(), 3)]));
        // Dropped and made again: n1's late mark of the old gallery is not n1 serving
        // the new one; n2's mark of the new one is.
        m.apply_key(&g, &[], 3, true).unwrap();
        m.apply_key(&g, &gallery(200), 4, false).unwrap();
        m.apply_key(&n1, &mark(5, 100), 5, false).unwrap();
        m.apply_key(&n2, &mark(0, 200), 6, false).unwrap();
        assert_eq!(applied(&m), BTreeMap::from([("n2".to_owned(), 0)]));
        assert!(m.state.serving("fl", 0).is_empty(), "no node is live in this test");
        // An older node's bare number counts (it cannot say which gallery).
        m.apply_key(&n1, b"7", 7, false).unwrap();
        assert_eq!(
            applied(&m),
            BTreeMap::from([("n1".to_owned(), 7), ("n2".to_owned(), 0)])
        );
    }
}
