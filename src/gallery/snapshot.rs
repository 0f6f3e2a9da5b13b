//! An immutable view of a gallery at one instant: what a search reads.
//!
//! Enrollment builds a new snapshot and swaps it in; a search keeps the one it started
//! with, so searches never block writers and never see half an update.

use super::memtable::MemTable;
use super::segment::Segment;
use crate::template::Dtype;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// A sealed segment plus the ordinals of its subjects deleted since it was sealed.
#[derive(Clone)]
pub struct SegmentView {
    pub segment: Arc<Segment>,
    /// Sorted, unique.
    pub dead_subjects: Vec<u32>,
}

/// Everything a search needs, frozen.
#[derive(Clone)]
pub struct Snapshot {
    dim: usize,
    dtype: Dtype,
    segments: Vec<SegmentView>,
    memtable: Arc<MemTable>,
    /// Counted once per snapshot (a snapshot never changes): (live rows, live subjects).
    counts: OnceLock<(usize, usize)>,
}

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

/// What a cache needs to know to reuse rows it copied from a slab earlier.
#[derive(Clone, Debug)]
pub struct SlabIdentity {
    pub uid: u64,
    /// Rows `0..n` are the same for equal `uid` and `removals` (a segment never changes;
    /// the log's rows only grow until a deletion removes some, which bumps this).
    pub removals: u64,
    /// Subjects known to the slab: tie-break ranks of the log's rows change only when it grows.
    pub subjects: usize,
    /// Dead once no snapshot can hand out this slab again.
    pub alive: Weak<()>,
}

/// Where a slab's subject ids come from.
#[derive(Clone, Copy)]
pub enum SubjectIds<'a> {
    Segment(&'a Segment),
    Memtable(&'a MemTable),
}

/// A run of encoded rows the engine scans in one go: a segment or the log's rows.
#[derive(Clone, Copy)]
pub struct Slab<'a> {
    pub dtype: Dtype,
    pub dim: usize,
    /// Bytes per row (a multiple of 64).
    pub stride: usize,
    /// `rows * stride` bytes.
    pub data: &'a [u8],
    /// Per-row scale (i8 dequantisation; 1.0 otherwise).
    pub scales: &'a [f32],
    /// Per-row subject ordinal (local to this slab).
    pub row_subject: &'a [u32],
    /// Sorted-id rank per ordinal; `None` when ordinals are already in id order.
    pub subject_rank: Option<&'a [u32]>,
    /// Sorted ordinals whose rows must be skipped (deleted subjects).
    pub dead_subjects: &'a [u32],
    /// Ordinal to id.
    pub ids: SubjectIds<'a>,
}

impl<'a> Slab<'a> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.scales.len()
    }
    /// The id of a subject ordinal.
    pub fn subject_id(&self, ordinal: u32) -> &'a str {
        match self.ids {
            SubjectIds::Segment(s) => s.subject_id(ordinal),
            SubjectIds::Memtable(m) => &m.subject_ids()[ordinal as usize],
        }
    }
    /// The ordinal of a subject id in this slab, if it has one.
    pub fn find_subject(&self, id: &str) -> Option<u32> {
        match self.ids {
            SubjectIds::Segment(s) => s.find_subject(id),
            SubjectIds::Memtable(m) => m.find_subject(id),
        }
    }

    /// The tie-break rank of a subject ordinal (smaller id, smaller rank).
    #[inline]
    pub fn rank(&self, ordinal: u32) -> u32 {
        match self.subject_rank {
            Some(r) => r[ordinal as usize],
            None => ordinal,
        }
    }
    /// Whether the subject's rows here are deleted.
    #[inline]
    pub fn is_dead(&self, ordinal: u32) -> bool {
        !self.dead_subjects.is_empty() && self.dead_subjects.binary_search(&ordinal).is_ok()
    }
    /// Which rows these are, for caches (see [`SlabIdentity`]).
    pub fn identity(&self) -> SlabIdentity {
        match self.ids {
            SubjectIds::Segment(s) => SlabIdentity {
                uid: s.origin().uid(),
                removals: 0,
                subjects: s.subjects(),
                alive: s.origin().watch(),
            },
            SubjectIds::Memtable(m) => SlabIdentity {
                uid: m.origin().uid(),
                removals: m.removals(),
                subjects: m.subject_ids().len(),
                alive: m.origin().watch(),
            },
        }
    }
}

impl Snapshot {
    /// Assemble a snapshot (the gallery does this after every change).
    pub fn new(dim: usize, dtype: Dtype, segments: Vec<SegmentView>, memtable: Arc<MemTable>) -> Snapshot {
        Snapshot {
            dim,
            dtype,
            segments,
            memtable,
            counts: OnceLock::new(),
        }
    }

    /// A snapshot of rows held only in memory (benchmarks, tests, demos).
    pub fn in_memory(mut memtable: MemTable, dim: usize, dtype: Dtype) -> Snapshot {
        memtable.refresh_ranks();
        Snapshot::new(dim, dtype, Vec::new(), Arc::new(memtable))
    }

    /// Template dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// The slabs to scan: every segment, then the log's rows.
    pub fn slabs(&self) -> Vec<Slab<'_>> {
        let mut slabs: Vec<Slab<'_>> = self
            .segments
            .iter()
            .map(|v| Slab {
                dtype: self.dtype,
                dim: self.dim,
                stride: crate::template::row_stride(self.dtype, self.dim),
                data: v.segment.data(),
                scales: v.segment.scales(),
                row_subject: v.segment.row_subjects(),
                subject_rank: None,
                dead_subjects: &v.dead_subjects,
                ids: SubjectIds::Segment(&v.segment),
            })
            .collect();
        if self.memtable.rows() > 0 {
            slabs.push(Slab {
                dtype: self.dtype,
                dim: self.dim,
                stride: self.memtable.stride(),
                data: self.memtable.data(),
                scales: self.memtable.scales(),
                row_subject: self.memtable.row_subjects(),
                subject_rank: Some(self.memtable.ranks()),
                dead_subjects: &[],
                ids: SubjectIds::Memtable(&self.memtable),
            });
        }
        slabs
    }
    /// Sealed segments with their deletion marks.
    pub fn segments(&self) -> &[SegmentView] {
        &self.segments
    }
    /// The log's rows.
    pub fn memtable(&self) -> &MemTable {
        &self.memtable
    }

    /// Verify each segment's rows before they are first scored (a no-op once done); the
    /// segment's damage, naming the file, if any is found.
    pub fn ensure_verified(&self) -> crate::error::Result<()> {
        self.segments.iter().try_for_each(|v| v.segment.ensure_verified())
    }

    /// After reading rows: an error if a read faulted because a file was truncated
    /// under the process (cheap unless such a fault ever happened).
    pub fn check_reads(&self) -> crate::error::Result<()> {
        if super::mapguard::faults() == 0 {
            return Ok(());
        }
        self.segments.iter().try_for_each(|v| v.segment.after_read())
    }

    /// Accept the segments' rows without verifying them (`--no-verify`).
    pub fn trust_rows(&self) {
        for v in &self.segments {
            v.segment.trust_rows();
        }
    }

    /// The first damage known in any segment of this snapshot.
    pub fn damage(&self) -> Option<String> {
        self.segments.iter().find_map(|v| v.segment.damage().map(str::to_owned))
    }

    /// Live rows (templates) searchable in this snapshot.
    pub fn live_rows(&self) -> usize {
        self.counts().0
    }

    fn counts(&self) -> (usize, usize) {
        *self
            .counts
            .get_or_init(|| (self.count_live_rows(), self.count_live_subjects()))
    }

    fn count_live_rows(&self) -> usize {
        self.slabs()
            .iter()
            .map(|s| {
                if s.dead_subjects.is_empty() {
                    s.rows()
                } else {
                    s.row_subject.iter().filter(|&&o| !s.is_dead(o)).count()
                }
            })
            .sum()
    }

    /// Whether `subject` has any live row.
    pub fn has_subject(&self, subject: &str) -> bool {
        self.memtable.has_subject(subject)
            || self.segments.iter().any(|v| {
                v.segment
                    .find_subject(subject)
                    .is_some_and(|o| v.dead_subjects.binary_search(&o).is_err())
            })
    }

    /// Number of distinct live subjects (reads every id once per snapshot, then cached).
    pub fn live_subjects(&self) -> usize {
        self.counts().1
    }

    fn count_live_subjects(&self) -> usize {
        let mut seen: HashSet<&str> = self.memtable.live_subjects().collect();
        for v in &self.segments {
            for o in 0..v.segment.subjects() as u32 {
                if v.dead_subjects.binary_search(&o).is_err() {
                    seen.insert(v.segment.subject_id(o));
                }
            }
        }
        seen.len()
    }
}
