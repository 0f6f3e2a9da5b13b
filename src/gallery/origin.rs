//! Identities of row sources (a segment, the log's rows) for caches that outlive one
//! search, such as the GPU's resident copy of a gallery. Below everything else in the
//! store: segments and memtables carry one; snapshots hand them out.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

/// The identity of a segment or of the log's rows, for caches that outlive one search
/// (the GPU's resident copy of the gallery). Unique per process; clones of one memtable
/// share it, because a clone only ever appends to the rows they share.
#[derive(Clone, Debug)]
pub struct Origin {
    uid: u64,
    alive: Arc<()>,
}

impl Default for Origin {
    fn default() -> Self {
        Origin::new()
    }
}

impl Origin {
    /// A new identity.
    pub fn new() -> Origin {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Origin {
            uid: NEXT.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
        }
    }
    /// The process-unique number.
    pub fn uid(&self) -> u64 {
        self.uid
    }
    /// A handle that stops upgrading once every holder of this origin is gone.
    pub fn watch(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }
}
