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
