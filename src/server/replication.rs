//! Where a server's writes go. A server writes straight to its own galleries; a node of
//! a cluster (`serve --etcd`) is given a [`Replication`] when it starts, and every write
//! to one of its replicas goes through it (the shard's log), never to the gallery. The
//! server knows nothing of etcd: the cluster implements this trait
//! (`cluster::node::Node`) and starts the server with it (`cluster::node::start_node`).

use super::registry::Registry;
use crate::error::Result;
use crate::gallery::Enrollment;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

/// One write to a replica, in the order the client sent it.
pub enum Write {
    /// An enrollment, and when it expires (unix ms), if the client said.
    Enroll {
        enrollment: Enrollment,
        expires_at: Option<i64>,
    },
    /// The deletion of a subject.
    Delete { subject: String },
}

/// A write path's answer, later.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A replicated write path, and what comes with it: the checks of reads the router
/// sent, and leaving on shutdown.
pub trait Replication: Send + Sync {
    /// This node's name, for messages.
    fn node_name(&self) -> &str;

    /// Commit `writes` to the log of the shard whose replica is the local gallery
    /// `local`; answers once they are visible to every search (the batch's number).
    /// An answer that was lost is `Error::OutcomeUnknown`, never a plain failure.
    fn commit<'a>(&'a self, local: &'a str, writes: Vec<Write>) -> Pending<'a, u64>;

    /// Refuse a read of `local` that the router meant for another replica (another
    /// gallery of the name, or a later batch than this one has applied).
    fn check_read(&self, local: &str, metadata: &tonic::metadata::MetadataMap) -> Result<()>;

    /// Leave (the server is shutting down).
    fn leave(&self) -> Pending<'_, ()>;
}

/// What a starting server gives the code that joins it to a cluster, once it listens.
pub struct Joining {
    pub registry: Arc<Registry>,
    /// The address the server is bound to.
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub seal_log_rows: usize,
}

/// Joins a starting server to a cluster: its write path.
pub type Join = Box<dyn FnOnce(Joining) -> Pending<'static, Arc<dyn Replication>> + Send>;
