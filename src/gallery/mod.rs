//! The on-disk gallery store: one directory per gallery.
//!
//! ```text
//! DIR/LOCK             held exclusively by the one writer process
//! DIR/MANIFEST         which segments and which log make up the gallery (atomic)
//! DIR/MANIFEST.copy    its copy, for `repair` when MANIFEST is damaged
//! DIR/seg-NNNNNN.bgs   sealed, memory-mapped segments (see format.rs)
//! DIR/wal-NNNNNN.log   the append log since the last seal or compaction (see wal.rs)
//! DIR/damaged/         what a repair moved aside (never deleted), with its report
//! ```
//!
//! Writes go through [`Gallery`] (the writer; exclusive lock), and every byte it writes
//! goes through one [`Storage`]. Searches read an immutable [`Snapshot`]:
//! [`Gallery::snapshot`] in the writer's process, or [`open_snapshot`] from any other
//! process without taking the lock.

pub mod compaction;
pub mod deletions;
pub mod derive;
pub mod expiry;
mod files;
pub mod format;
pub mod identity;
mod import;
pub mod manifest;
pub mod mapguard;
pub mod memtable;
pub mod origin;
mod reader;
pub mod repair;
pub mod segment;
pub mod snapshot;
pub mod wal;
mod writer;

pub use reader::{LogProbe, check, info, open_snapshot, state_fingerprint};
pub use snapshot::{Counts, LiveRow, Origin, SegmentView, Slab, SlabIdentity, Snapshot, SubjectIds};
pub use writer::Gallery;

use crate::error::Result;
use crate::template::Dtype;

/// Folder inside a gallery where a repair keeps what it moved aside.
pub const DAMAGED_DIR: &str = "damaged";

/// Templates for one subject, as given by a caller (not yet normalised).
#[derive(Clone, Debug)]
pub struct Enrollment {
    pub subject: String,
    /// One or more templates, `dim` values each, row-major.
    pub templates: Vec<f32>,
}

/// A source of rows to import in bulk (a .npy file plus an id list, or memory).
pub trait ImportSource: Send {
    /// Template dimension of the source.
    fn dim(&self) -> usize;
    /// Total rows, if known (for progress).
    fn rows_hint(&self) -> Option<u64>;
    /// Append up to `max_rows` rows to `values` (f32, `dim` each) and their subject ids to
    /// `ids`; returns how many rows were appended (0 at the end).
    fn read_chunk(&mut self, max_rows: usize, values: &mut Vec<f32>, ids: &mut Vec<String>) -> Result<usize>;
    /// What to call the source in error messages (e.g. the file name).
    fn label(&self) -> String {
        "import".to_owned()
    }
}

/// How an import treats subjects the gallery already has.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// Allow adding templates to subjects already enrolled (otherwise an error: an
    /// accidental second import of the same file is the common case).
    pub add_to_existing: bool,
}

/// What an import did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    pub rows: u64,
    pub subjects: u64,
    pub segment: String,
}

/// What a compaction did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompactReport {
    pub rows_kept: u64,
    pub rows_dropped: u64,
    pub segments_before: usize,
    pub segments_after: usize,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Summary of a gallery, as `gallery info` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GalleryInfo {
    pub path: String,
    pub dim: usize,
    pub dtype: Dtype,
    pub rows: u64,
    pub subjects: u64,
    pub segments: usize,
    pub log_rows: u64,
    pub deleted_subjects_pending: usize,
    pub bytes_on_disk: u64,
    /// When the gallery expires (RFC 3339), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Subjects with an expiry (expired ones included until a purge deletes them).
    #[serde(skip_serializing_if = "is_zero")]
    pub expiring_subjects: u64,
    /// Things worth knowing that are not damage (a torn log tail the next writer cuts,
    /// a stale manifest copy the next writer rewrites).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}
