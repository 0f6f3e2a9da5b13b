//! The cluster: galleries sharded over many `biogate serve` processes, coordinated by
//! etcd and stored in object storage, searched exactly through `biogate router`.
//!
//! - [`etcd`]: a client for the part of etcd's v3 API used here.
//! - [`keys`]: what lives in etcd, a subject's shard, replica placement.
//! - [`view`]: a live copy of those keys (read once, then watched).
//! - [`objects`] and [`batch`]: the object store and the log batches kept in it;
//!   [`checkpoint`]: a replica's sealed files kept there too.
//! - [`node`]: a shard server's part: lease, replicas, tailing, commits, placement.
//! - [`router`]: the stateless front door.
//!
//! ARCHITECTURE.md ("The cluster") gives the keys, the paths, the commit order and
//! what a reader of the shard map may assume.

pub mod batch;
pub mod checkpoint;
pub mod etcd;
pub mod keys;
pub mod node;
pub mod objects;
pub mod router;
pub mod view;

/// A delay injected by the fault knob `var` (milliseconds in the environment; none
/// when unset), for tests that need a slow part at a chosen place: a slow object store
/// (`BIOGATE_FAULT_SLOW_UPLOAD_MS`, objects.rs), a commit paused before it raises its
/// visible mark (`BIOGATE_FAULT_SLOW_VISIBLE_MS`, node/commit.rs), a watch that
/// delivers late (`BIOGATE_FAULT_SLOW_WATCH_MS`, view.rs), a checkpoint paused before
/// it deletes the log it covers (`BIOGATE_FAULT_SLOW_LOG_DELETION_MS`,
/// node/checkpointing.rs).
pub(crate) fn fault_delay(var: &str) -> std::time::Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis)
}
