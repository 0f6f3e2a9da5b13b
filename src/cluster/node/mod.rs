//! A shard server: `biogate serve --etcd ...`. It registers under a lease, holds the
//! replicas the shard map gives it (each a gallery in its own registry, named
//! `{gallery}.s{shard}`), applies each shard's batches in commit order, commits the
//! writes it is sent, and, while it holds the coordinator key, places replicas.
//!
//! The commit order of an enrollment (or deletion), as [`Node::commit`] runs it:
//! 1. the batch is written to the object store (durably) under a unique name;
//! 2. this replica catches up to the last batch it knows of, and checks the batch
//!    against that state (a deletion names an enrolled subject);
//! 3. it is committed as `/biogate/log/{g}/{s}/{seq}` for the next `seq` by an etcd
//!    transaction that succeeds only if that key does not exist yet and this node's
//!    last-commit key is as read before (another writer took the number: catch up,
//!    check again, take the next; a refused retry of this very batch is told by that
//!    key, which the transaction moves to it);
//! 4. it is applied here, then on every live replica in the shard map (each reports
//!    `/biogate/applied/...`), for up to `VISIBLE_WAIT`;
//! 5. `/biogate/visible/{g}/{s}` is raised to `seq`, and the caller is answered.
//!
//! A replica that has not applied the visible batch is not searched (see
//! `ClusterState::serving`), so an acknowledged write is seen by every search.
//!
//! Each replica keeps a cursor file beside its gallery (`DATA/cluster/{g}.s{s}.cursor`):
//! the last batch applied and the gallery's log position after it. A batch is one
//! commit group of the gallery's log, so after a crash the log position says whether
//! the batch after the cursor's reached the disk.

mod checkpointing;
mod commit;
mod coordination;
mod membership;
pub mod reads;
mod tail;
mod write_path;

pub use coordination::next_replicas;
pub use write_path::start_node;

use super::checkpoint;
use super::etcd::{self, Etcd};
use super::keys::{self, GalleryMeta};
use super::objects::Objects;
use super::view::View;
use crate::error::{Error, IoContext, Result};
use crate::server::registry::{GalleryEntry, Registry};
use crate::storage::Storage;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A node's lease: it disappears from the cluster this long after it stops.
pub const LEASE_TTL_S: i64 = 3;
/// How long a commit waits for the other replicas before it is acknowledged anyway
/// (a replica still behind is not searched until it catches up).
pub const VISIBLE_WAIT: Duration = Duration::from_secs(3);
/// How long a node may be down before the coordinator places its replicas elsewhere.
pub const REPLACE_AFTER: Duration = Duration::from_secs(30);
/// How long a commit waits for this replica to catch up or apply.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// How `serve` joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub etcd: Vec<String>,
    /// The object store's URL (`file:///dir`, or `s3://...` with the `s3` feature).
    pub store: String,
    /// This node's name (unique in the cluster; its replicas are placed by it).
    pub node: String,
    /// The address routers and other nodes reach this one at (default: the bound one).
    pub advertise: Option<String>,
    /// Take a checkpoint of a shard every this many batches (checkpoint.rs).
    pub checkpoint_every: u64,
}

/// The default of [`ClusterOptions::checkpoint_every`].
pub const CHECKPOINT_EVERY: u64 = 512;

/// A replica this node holds.
struct Replica {
    gallery: String,
    shard: u32,
    created_ms: i64,
    entry: Arc<GalleryEntry>,
    /// The last batch applied.
    applied: watch::Sender<u64>,
    /// One commit at a time from this node.
    commit: tokio::sync::Mutex<()>,
    /// One publication of its applied batch at a time.
    publishing: tokio::sync::Mutex<()>,
    tail: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A checkpoint of it is under way (checkpointing.rs).
    checkpointing: std::sync::atomic::AtomicBool,
    /// Checkpoints failed in a row, and when the next may start (checkpointing.rs).
    checkpoint_backoff: Mutex<(u32, Instant)>,
    /// The revision of this node's last-commit key of the shard, when known (commit.rs).
    last_commit: Mutex<Option<i64>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(t) = self.tail.lock().expect("tail lock").take() {
            t.abort();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    created_ms: i64,
    seq: u64,
    position: u64,
}

/// A shard server's part in the cluster.
pub struct Node {
    pub name: String,
    address: String,
    etcd: Arc<Etcd>,
    pub view: Arc<View>,
    objects: Objects,
    registry: Arc<Registry>,
    storage: Storage,
    cursors: PathBuf,
    seal_log_rows: usize,
    checkpoint_every: u64,
    lease: AtomicI64,
    /// Until when the lease surely holds (its time to live counted from before the
    /// call that granted or renewed it): after that this node may already be out of
    /// the cluster, and it answers no read of its replicas (reads.rs).
    lease_until: Mutex<Instant>,
    replicas: Mutex<HashMap<(String, u32), Arc<Replica>>>,
    /// Nodes of the shard maps that are down, since when (while coordinating).
    missing_since: Mutex<HashMap<String, Instant>>,
    batches: AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

impl Node {
    /// Join the cluster: check the store, register `address` under a lease, and start
    /// following the shard map.
    pub async fn join(
        options: &ClusterOptions,
        address: String,
        registry: Arc<Registry>,
        data_dir: &std::path::Path,
        seal_log_rows: usize,
    ) -> Result<Arc<Node>> {
        crate::server::registry::check_gallery_name(&options.node)
            .map_err(|_| Error::Config(format!("--node {:?}: use letters, digits, '_', '-', '.'", options.node)))?;
        let etcd = Arc::new(Etcd::connect(&options.etcd)?);
        let objects = Objects::open(&options.store)?;
        // Every node must use the same store: the first one to join names it.
        let r = etcd
            .txn(
                "the store check",
                etcd::TxnRequest {
                    compare: vec![etcd::absent(keys::STORE)],
                    success: vec![etcd::put_op(keys::STORE, options.store.as_bytes().to_vec(), 0)],
                    failure: Vec::new(),
                },
            )
            .await?;
        if !r.succeeded {
            let set = etcd.get(keys::STORE).await?.map(|kv| kv.value).unwrap_or_default();
            if set != options.store.as_bytes() {
                return Err(Error::Config(format!(
                    "--store {}: this cluster's object store is {}",
                    options.store,
                    String::from_utf8_lossy(&set)
                )));
            }
        }
        Self::claim_name(&etcd, &options.node, &address).await?;
        let asked = Instant::now();
        let lease = etcd.grant_lease(LEASE_TTL_S).await?;
        let info = keys::NodeInfo {
            address: address.clone(),
        };
        etcd.put(&keys::node_key(&options.node), keys::encode(&info), lease)
            .await?;
        let view = View::start(etcd.clone(), Duration::from_secs(5)).await;
        let cursors = data_dir.join("cluster");
        std::fs::create_dir_all(&cursors).ctx(|| format!("creating {}", cursors.display()))?;
        let node = Arc::new(Node {
            name: options.node.clone(),
            address,
            etcd,
            view,
            objects,
            registry,
            storage: Storage::default(),
            cursors,
            seal_log_rows,
            checkpoint_every: options.checkpoint_every.max(1),
            lease: AtomicI64::new(lease),
            lease_until: Mutex::new(asked + Duration::from_secs(LEASE_TTL_S as u64)),
            replicas: Mutex::new(HashMap::new()),
            missing_since: Mutex::new(HashMap::new()),
            batches: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(Self::keep_alive(Arc::downgrade(&node))),
            tokio::spawn(Self::follow_map(Arc::downgrade(&node))),
        ];
        node.tasks.lock().expect("tasks lock").extend(tasks);
        tracing::info!(node = %node.name, address = %node.address, store = %node.objects.url(), "joined the cluster");
        Ok(node)
    }

    /// Make sure no other live process uses `name`: its key must be absent, or name
    /// this address (this node's previous run, killed before its lease ran out), or go
    /// within a lease's time.
    async fn claim_name(etcd: &Etcd, name: &str, address: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(LEASE_TTL_S as u64 + 1);
        loop {
            let Some(kv) = etcd.get(&keys::node_key(name)).await? else {
                return Ok(());
            };
            let held_by = keys::decode::<keys::NodeInfo>(&keys::node_key(name), &kv.value)?.address;
            if held_by == address {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Config(format!(
                    "--node {name}: a live node at {held_by} already has that name"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Leave: revoke the lease (the node and its applied marks go at once).
    pub async fn leave(&self) {
        let lease = self.lease.load(Ordering::Relaxed);
        if let Err(e) = self.etcd.revoke_lease(lease).await {
            tracing::warn!(error = %e, "could not revoke the node's lease (it expires by itself)");
        }
    }

    /// Hold the replicas the shard map gives this node; place replicas while this node
    /// is the coordinator. Runs on every change of the cluster's keys.
    async fn follow_map(node: std::sync::Weak<Node>) {
        let Some(mut changes) = node.upgrade().map(|n| n.view.changed()) else {
            return;
        };
        loop {
            {
                let Some(node) = node.upgrade() else { return };
                if let Err(e) = node.reconcile().await {
                    tracing::warn!(error = %e, "holding this node's replicas");
                }
                if let Err(e) = node.coordinate().await {
                    tracing::warn!(error = %e, "placing replicas");
                }
            }
            // Wake on a change, or each second (a lost race is retried).
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }

    /// Open (and start tailing) the replicas the map gives this node; stop the ones it
    /// no longer does; drop those of galleries that are gone.
    async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let wanted: Vec<(String, u32, GalleryMeta)> = self.view.read(|st| {
            let mut out = Vec::new();
            for (g, meta) in &st.galleries {
                for s in 0..meta.shards {
                    if st.shard_map(g, s).is_some_and(|m| m.replicas.contains(&self.name)) {
                        out.push((g.clone(), s, meta.clone()));
                    }
                }
            }
            out
        });
        let galleries = self.view.read(|st| st.galleries.clone());
        let connected = self.view.connected();
        let held: Vec<((String, u32), Arc<Replica>)> = self
            .replicas
            .lock()
            .expect("replicas lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((g, s), r) in held {
            let gone = galleries.get(&g).is_none_or(|m| m.created_ms != r.created_ms);
            let unwanted = !wanted.iter().any(|w| w.0 == g && w.1 == s);
            if connected && (gone || unwanted) {
                self.replicas.lock().expect("replicas lock").remove(&(g.clone(), s));
                drop(r);
                let _ = self.etcd.delete(&keys::applied_key(&g, s, &self.name)).await;
                if gone {
                    if let Err(e) = self.drop_local(&g, s) {
                        // sweep_dropped tries again (the replica is no longer held).
                        tracing::error!(gallery = %g, shard = s, error = %e, "dropping the replica of a dropped gallery");
                        continue;
                    }
                    tracing::info!(gallery = %g, shard = s, "dropped the replica of a dropped gallery");
                } else {
                    tracing::info!(gallery = %g, shard = s, "no longer holds this replica (data kept)");
                }
            }
        }
        // One replica that cannot be opened (its checkpoint unreadable, its disk full)
        // must not keep the others from serving: each is tried, the failures reported.
        let mut failures = Vec::new();
        for (g, s, meta) in wanted {
            if self.holds_replica(&g, s) {
                continue;
            }
            let replica = match self.open_replica(&g, s, &meta).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(gallery = %g, shard = s, error = %e, "opening a replica failed; retrying on the next pass");
                    failures.push(format!("{g} shard {s}: {e}"));
                    continue;
                }
            };
            self.replicas
                .lock()
                .expect("replicas lock")
                .insert((g.clone(), s), replica.clone());
            let at = *replica.applied.borrow();
            if let Err(e) = self.publish_applied(&replica).await {
                // The tail publishes it again once etcd answers.
                tracing::warn!(gallery = %g, shard = s, error = %e, "publishing a replica's applied batch");
            }
            let tail = tokio::spawn(Self::tail(Arc::downgrade(self), Arc::downgrade(&replica)));
            *replica.tail.lock().expect("tail lock") = Some(tail);
            tracing::info!(gallery = %g, shard = s, applied = at, "holding a replica");
        }
        if connected && let Err(e) = self.sweep_dropped(&galleries) {
            failures.push(format!("sweeping dropped replicas: {e}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Unavailable(failures.join("; ")))
        }
    }

    /// Drop local replicas (kept from before, not held now) of galleries that were
    /// dropped, or dropped and made again, while this node was not looking.
    fn sweep_dropped(&self, galleries: &std::collections::BTreeMap<String, GalleryMeta>) -> Result<()> {
        let mut failures = Vec::new();
        for entry in self.registry.all() {
            let Some((g, s)) = entry
                .name
                .rsplit_once(".s")
                .and_then(|(g, s)| Some((g.to_owned(), s.parse::<u32>().ok()?)))
            else {
                continue;
            };
            if self.holds_replica(&g, s) {
                continue;
            }
            // Only a replica (it has a cursor): never a gallery of this data directory's
            // single-server days that happens to be named like one.
            let Some(created) = std::fs::read(self.cursor_path(&g, s))
                .ok()
                .and_then(|b| serde_json::from_slice::<Cursor>(&b).ok())
                .map(|c| c.created_ms)
            else {
                continue;
            };
            if galleries.get(&g).map(|m| m.created_ms) != Some(created) {
                match self.drop_local(&g, s) {
                    Ok(()) => {
                        tracing::info!(gallery = %g, shard = s, "dropped a local replica of a gallery that is gone")
                    }
                    Err(e) => failures.push(format!("{g} shard {s}: {e}")),
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "dropping local replicas: {}",
                failures.join("; ")
            )))
        }
    }

    fn holds_replica(&self, g: &str, s: u32) -> bool {
        self.replicas
            .lock()
            .expect("replicas lock")
            .contains_key(&(g.to_owned(), s))
    }

    fn cursor_path(&self, g: &str, s: u32) -> PathBuf {
        self.cursors.join(format!("{}.cursor", keys::replica_name(g, s)))
    }

    fn drop_local(&self, g: &str, s: u32) -> Result<()> {
        let local = keys::replica_name(g, s);
        if self.registry.get(&local).is_ok() {
            self.registry.drop_gallery(&local)?;
        }
        let cursor = self.cursor_path(g, s);
        if cursor.exists() {
            self.storage.remove_file(&cursor)?;
        }
        Ok(())
    }

    /// Open a replica's local gallery, or make it afresh when there is none, it belongs
    /// to an older gallery of the same name, or its cursor is missing: from the shard's
    /// checkpoint if it has one, else empty.
    async fn open_replica(&self, g: &str, s: u32, meta: &GalleryMeta) -> Result<Arc<Replica>> {
        let local = keys::replica_name(g, s);
        let cursor: Option<Cursor> = std::fs::read(self.cursor_path(g, s))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let existing = self.registry.get(&local).ok();
        let reuse = match (&existing, &cursor) {
            (Some(entry), Some(c)) => {
                c.created_ms == meta.created_ms
                    && entry.problem().is_none()
                    // Without a replication mark (a replica from before it, or one a
                    // repair stripped) only an unmoved log position proves the cursor:
                    // anything else is rebuilt from the checkpoint and the shard's log.
                    && entry
                        .write(|gal| Ok(gal.replicated_through().is_some() || gal.log_position() == c.position))
                        .unwrap_or(false)
            }
            _ => false,
        };
        let (entry, applied) = if reuse {
            let entry = existing.expect("checked");
            let c = cursor.expect("checked");
            let (position, marked) = entry.write(|gal| Ok((gal.log_position(), gal.replicated_through())))?;
            // The gallery logs the batch it applied with the batch (one commit group):
            // that mark is the truth, whatever the cursor file says.
            // (Without a mark the position is the cursor's: checked above.)
            let applied = marked.unwrap_or(c.seq);
            if applied != c.seq || position != c.position {
                self.write_cursor(g, s, meta.created_ms, applied, position)?;
            }
            (entry, applied)
        } else {
            if existing.is_some() {
                self.drop_local(g, s)?;
            }
            let checkpoint = self.view.read(|st| {
                st.checkpoints
                    .get(&(g.to_owned(), s))
                    .map(|c| c.0.clone())
                    .filter(|c| c.gallery_created_ms == meta.created_ms)
            });
            let (entry, applied) = match checkpoint {
                Some(cp) => {
                    let loading = self.registry.root().join(format!(".loading-{local}"));
                    checkpoint::download(&self.objects, &cp, &loading).await?;
                    let entry = match self.registry.adopt(&local, &loading) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = self.drop_local(g, s);
                            return Err(e);
                        }
                    };
                    // The files' own mark is the truth (a checkpoint staged after a
                    // batch whose cursor write failed holds that batch too).
                    let applied = entry.write(|gal| Ok(gal.replicated_through()))?.unwrap_or(cp.seq);
                    tracing::info!(gallery = %g, shard = s, seq = applied, files = cp.files.len(), "loaded the shard's checkpoint");
                    (entry, applied)
                }
                None => (self.registry.create(&local, meta.dim, meta.dtype)?, 0),
            };
            let position = entry.write(|gal| Ok(gal.log_position()))?;
            self.write_cursor(g, s, meta.created_ms, applied, position)?;
            (entry, applied)
        };
        Ok(Arc::new(Replica {
            gallery: g.to_owned(),
            shard: s,
            created_ms: meta.created_ms,
            entry,
            applied: watch::channel(applied).0,
            commit: tokio::sync::Mutex::new(()),
            publishing: tokio::sync::Mutex::new(()),
            tail: Mutex::new(None),
            checkpointing: Default::default(),
            checkpoint_backoff: Mutex::new((0, Instant::now())),
            last_commit: Mutex::new(None),
        }))
    }

    fn write_cursor(&self, g: &str, s: u32, created_ms: i64, seq: u64, position: u64) -> Result<()> {
        let c = Cursor {
            created_ms,
            seq,
            position,
        };
        self.storage
            .write_file_atomically(&self.cursor_path(g, s), &serde_json::to_vec(&c).expect("cursor"))
    }

    /// Whether `r` is the replica this node holds for its shard (not one replaced).
    fn is_held(&self, r: &Replica) -> bool {
        let key = (r.gallery.clone(), r.shard);
        self.replicas
            .lock()
            .expect("replicas lock")
            .get(&key)
            .is_some_and(|h| std::ptr::eq(h.as_ref(), r))
    }

    fn replica_of_local(&self, local: &str) -> Option<Arc<Replica>> {
        self.replicas
            .lock()
            .expect("replicas lock")
            .values()
            .find(|r| r.entry.name == local)
            .cloned()
    }

    /// Whether `local` (a gallery of this node's registry) is a cluster replica.
    pub fn holds(&self, local: &str) -> bool {
        self.replica_of_local(local).is_some()
    }

    /// Compare: the gallery replica `r` belongs to is still the one in etcd: not
    /// dropped, nor dropped and made again under its name (a commit or checkpoint of an
    /// older gallery's replica must never land in a new one's keys, whose replicas
    /// would then wait on it forever).
    fn same_gallery(&self, r: &Replica) -> Result<etcd::pb::Compare> {
        self.view.read(
            |st| match (st.galleries.get(&r.gallery), st.gallery_revisions.get(&r.gallery)) {
                (Some(meta), Some(revision)) if meta.created_ms == r.created_ms => {
                    Ok(etcd::unchanged_since(&keys::gallery_key(&r.gallery), *revision))
                }
                _ => Err(Error::NotFound(format!("gallery {:?} was dropped", r.gallery))),
            },
        )
    }
}
