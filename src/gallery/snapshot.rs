//! An immutable view of a gallery at one instant: what a search reads.
//!
//! Enrollment builds a new snapshot and swaps it in; a search keeps the one it started
//! with, so searches never block writers and never see half an update.

use super::deletions::DeletedRows;
use super::expiry::Expiry;
use super::memtable::{LogTable, MemTable};
pub use super::origin::Origin;
use super::segment::Segment;
use crate::template::Dtype;
use std::sync::{Arc, Weak};

/// A sealed segment plus its rows deleted since it was sealed.
#[derive(Clone)]
pub struct SegmentView {
    pub segment: Arc<Segment>,
    /// Shared with the snapshots that hold it; a deletion copies what it changes.
    pub deleted: Arc<DeletedRows>,
}

impl SegmentView {
    /// A segment with nothing deleted.
    pub fn new(segment: Arc<Segment>) -> SegmentView {
        let deleted = Arc::new(DeletedRows::new(segment.rows()));
        SegmentView { segment, deleted }
    }

    /// Whether subject `ordinal` has live rows here (a subject's rows are deleted
    /// together, so its first row says).
    pub fn is_live(&self, ordinal: u32) -> bool {
        self.segment
            .subject_rows(ordinal)
            .first()
            .is_some_and(|&row| !self.deleted.contains(row as usize))
    }

    /// Whether `subject` has live rows here.
    pub fn has_live_subject(&self, subject: &str) -> bool {
        self.segment.find_subject(subject).is_some_and(|o| self.is_live(o))
    }

    /// Delete every row of `subject`; how many rows were live.
    pub fn delete_subject(&mut self, subject: &str) -> u64 {
        let Some(o) = self.segment.find_subject(subject).filter(|&o| self.is_live(o)) else {
            return 0;
        };
        let deleted = Arc::make_mut(&mut self.deleted);
        let rows = self.segment.subject_rows(o);
        rows.iter().map(|&r| u64::from(deleted.insert(r as usize))).sum()
    }
}

/// Live templates and subjects: kept up to date by the writer as it applies each
/// change (never counted by reading every id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rows: u64,
    pub subjects: u64,
}

/// Whether `subject` has a live row in `segments` or the log's rows.
pub fn subject_is_live(segments: &[SegmentView], log: &LogTable, subject: &str) -> bool {
    log.has_subject(subject) || segments.iter().any(|v| v.has_live_subject(subject))
}

/// Everything a search needs, frozen.
#[derive(Clone)]
pub struct Snapshot {
    dim: usize,
    dtype: Dtype,
    segments: Vec<SegmentView>,
    log: LogTable,
    counts: Counts,
    /// When the gallery and its subjects expire (see expiry.rs).
    expiry: Arc<Expiry>,
    /// Every subject that expired by this instant (ms) has its rows hidden here.
    hidden_through: i64,
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
/// Read-only; its parts are reached through methods so that what a row is (its bytes,
/// scale, subject, and whether it is live) is said in one place.
#[derive(Clone, Copy)]
pub struct Slab<'a> {
    dtype: Dtype,
    dim: usize,
    /// Bytes per row (a multiple of 64).
    stride: usize,
    /// `rows * stride` bytes.
    data: &'a [u8],
    /// Per-row scale (i8 dequantisation; 1.0 otherwise).
    scales: &'a [f32],
    /// Per-row subject ordinal (local to this slab).
    row_subject: &'a [u32],
    /// Sorted-id rank per ordinal; `None` when ordinals are already in id order.
    subject_rank: Option<&'a [u32]>,
    /// Rows deleted since the segment was sealed (the log's rows are removed instead).
    deleted: Option<&'a DeletedRows>,
    /// Ordinal to id.
    ids: SubjectIds<'a>,
}

/// One live row of a slab.
#[derive(Clone, Copy, Debug)]
pub struct LiveRow<'a> {
    /// Its index in the slab.
    pub row: usize,
    /// Its subject's ordinal in the slab, and id.
    pub ordinal: u32,
    pub subject: &'a str,
    /// The encoded row (one stride) and its scale.
    pub bytes: &'a [u8],
    pub scale: f32,
}

impl<'a> Slab<'a> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.scales.len()
    }
    /// Storage dtype of the rows.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Template dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Bytes per row (a multiple of 64).
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// The encoded bytes of rows `rows` (contiguous).
    pub fn rows_bytes(&self, rows: std::ops::Range<usize>) -> &'a [u8] {
        &self.data[rows.start * self.stride..rows.end * self.stride]
    }
    /// The encoded bytes of row `row`.
    pub fn row(&self, row: usize) -> &'a [u8] {
        self.rows_bytes(row..row + 1)
    }
    /// Per-row scales (i8 dequantisation; 1.0 otherwise).
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }
    /// Per-row subject ordinals (local to this slab).
    pub fn row_subjects(&self) -> &'a [u32] {
        self.row_subject
    }
    /// The rows deleted since the segment was sealed (None for the log's rows).
    pub fn deleted(&self) -> Option<&'a DeletedRows> {
        self.deleted
    }
    /// Whether any row is deleted.
    pub fn has_deletions(&self) -> bool {
        self.deleted.is_some_and(|d| !d.is_empty())
    }
    /// Where the subject ids come from (the segment, or the log's rows).
    pub fn ids(&self) -> SubjectIds<'a> {
        self.ids
    }
    /// Every row whose subject is not deleted, in order.
    pub fn live_rows(&self) -> impl Iterator<Item = LiveRow<'a>> + use<'a> {
        let slab = *self;
        (0..slab.rows()).filter_map(move |row| {
            let ordinal = slab.row_subject[row];
            (!slab.is_dead_row(row)).then(|| LiveRow {
                row,
                ordinal,
                subject: slab.subject_id(ordinal),
                bytes: slab.row(row),
                scale: slab.scales[row],
            })
        })
    }
    /// The id of a subject ordinal.
    pub fn subject_id(&self, ordinal: u32) -> &'a str {
        match self.ids {
            SubjectIds::Segment(s) => s.subject_id(ordinal),
            SubjectIds::Memtable(m) => m.subject_id(ordinal),
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
    /// Whether row `row` is deleted.
    #[inline]
    pub fn is_dead_row(&self, row: usize) -> bool {
        self.deleted.is_some_and(|d| d.contains(row))
    }
    /// The live rows of subject `ordinal`, ascending (in place for a segment; the log's
    /// rows are few and scanned).
    pub fn subject_rows(&self, ordinal: u32) -> Vec<usize> {
        match self.ids {
            SubjectIds::Segment(s) => s
                .subject_rows(ordinal)
                .iter()
                .map(|&r| r as usize)
                .filter(|&r| !self.is_dead_row(r))
                .collect(),
            SubjectIds::Memtable(_) => (0..self.rows()).filter(|&r| self.row_subject[r] == ordinal).collect(),
        }
    }
    /// Most rows of one subject (what an exact per-row selection must keep per subject).
    pub fn max_subject_rows(&self) -> usize {
        match self.ids {
            SubjectIds::Segment(s) => s.max_subject_rows(),
            SubjectIds::Memtable(m) => m.max_subject_rows(),
        }
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
                subjects: m.subject_count(),
                alive: m.origin().watch(),
            },
        }
    }
}

impl Snapshot {
    /// Assemble a snapshot (the gallery does this after every change, with the counts
    /// it keeps).
    pub fn new(dim: usize, dtype: Dtype, segments: Vec<SegmentView>, log: LogTable, counts: Counts) -> Snapshot {
        Snapshot {
            dim,
            dtype,
            segments,
            log,
            counts,
            expiry: Arc::new(Expiry::default()),
            hidden_through: i64::MIN,
        }
    }

    /// The same snapshot with the gallery's retention state; the rows of every subject
    /// that expired by `hidden_through` (ms) are already hidden in it (expiry.rs).
    pub fn with_expiry(mut self, expiry: Arc<Expiry>, hidden_through: i64) -> Snapshot {
        self.expiry = expiry;
        self.hidden_through = hidden_through;
        self
    }

    /// Whether a subject expired after this snapshot hid the expired ones (a newer
    /// snapshot would hide it: see `Gallery::hide_expired`).
    pub fn expiry_due(&self, now_ms: i64) -> bool {
        self.expiry
            .expired_between(self.hidden_through, now_ms)
            .next()
            .is_some()
    }

    /// The gallery's retention state.
    pub fn expiry(&self) -> &Expiry {
        &self.expiry
    }

    /// Live subjects whose expiry is at or before `now_ms`: never to be returned,
    /// verified or counted. Only those that expired after the snapshot hid the expired
    /// ones can be live (usually none; looked up in O(log) of the expiries).
    pub fn expired_live(&self, now_ms: i64) -> Vec<&str> {
        self.expiry
            .expired_between(self.hidden_through, now_ms)
            .filter(|s| self.has_subject(s))
            .collect()
    }

    /// Subjects and live rows of `expired_live(now_ms)` (what counts leave out).
    pub fn expired_counts(&self, now_ms: i64) -> (u64, u64) {
        let expired = self.expired_live(now_ms);
        let slabs = self.slabs();
        let mut rows = 0u64;
        for s in &expired {
            for slab in &slabs {
                if let Some(ordinal) = slab.find_subject(s) {
                    rows += slab.subject_rows(ordinal).len() as u64;
                }
            }
        }
        (expired.len() as u64, rows)
    }

    /// An in-memory snapshot with one subject per row (`r000000000`, ...): benchmarks,
    /// the backend cost model's calibration.
    pub fn from_rows(rows: &[f32], dim: usize, dtype: Dtype) -> Snapshot {
        let mut table = MemTable::new(dtype, dim);
        for (i, row) in rows.chunks_exact(dim).enumerate() {
            table.push(&format!("r{i:09}"), row);
        }
        Snapshot::in_memory(table, dim, dtype)
    }

    /// A snapshot of rows held only in memory (benchmarks, tests, demos).
    pub fn in_memory(memtable: MemTable, dim: usize, dtype: Dtype) -> Snapshot {
        let counts = Counts {
            rows: memtable.rows() as u64,
            subjects: memtable.live_subjects().count() as u64,
        };
        Snapshot::new(dim, dtype, Vec::new(), LogTable::from_table(memtable), counts)
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
                deleted: Some(&v.deleted),
                ids: SubjectIds::Segment(&v.segment),
            })
            .collect();
        for piece in self.log.pieces().iter().filter(|p| p.rows() > 0) {
            slabs.push(Slab {
                dtype: self.dtype,
                dim: self.dim,
                stride: piece.stride(),
                data: piece.data(),
                scales: piece.scales(),
                row_subject: piece.row_subjects(),
                subject_rank: Some(piece.ranks()),
                deleted: None,
                ids: SubjectIds::Memtable(piece),
            });
        }
        slabs
    }
    /// Sealed segments with their deletion marks.
    pub fn segments(&self) -> &[SegmentView] {
        &self.segments
    }
    /// The log's rows.
    pub fn log(&self) -> &LogTable {
        &self.log
    }

    /// Verify each segment's rows before they are first scored (a no-op once done); the
    /// segment's damage, naming the file, if any is found.
    pub fn ensure_verified(&self) -> crate::error::Result<()> {
        self.segments.iter().try_for_each(|v| v.segment.ensure_verified())
    }

    /// Verify each segment's metadata (scales, subjects, the subject index) before any
    /// of it is used (a no-op once done).
    pub fn verify_metadata(&self) -> crate::error::Result<()> {
        self.segments.iter().try_for_each(|v| v.segment.verify_metadata())
    }

    /// After reading rows: an error if a read faulted because a file was truncated
    /// under the process (cheap unless such a fault ever happened).
    pub fn check_reads(&self) -> crate::error::Result<()> {
        if super::mapguard::faults() == 0 {
            return Ok(());
        }
        self.segments.iter().try_for_each(|v| v.segment.after_read())
    }

    /// After a search read the segments: whether any file was written in place since it
    /// was verified ([`Segment::reverify_if_written`]): an error if one is now damaged,
    /// `Ok(false)` if one was written but is intact (read it again), `Ok(true)` if none
    /// was. One stat per segment.
    pub fn files_unchanged(&self) -> crate::error::Result<bool> {
        let mut unchanged = true;
        for v in &self.segments {
            if v.segment.reverify_if_written()? {
                unchanged = false;
            }
        }
        Ok(unchanged)
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
        self.counts.rows as usize
    }

    /// Live templates and subjects (kept by the writer; O(1)).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Every live row of every slab, in scan order, with its slab's index.
    pub fn each_live_row(&self) -> impl Iterator<Item = (usize, LiveRow<'_>)> + '_ {
        self.slabs()
            .into_iter()
            .enumerate()
            .flat_map(|(i, slab)| slab.live_rows().map(move |r| (i, r)))
    }

    /// Whether `subject` has any live row (looked up in place: binary searches).
    pub fn has_subject(&self, subject: &str) -> bool {
        subject_is_live(&self.segments, &self.log, subject)
    }

    /// Number of distinct live subjects (kept by the writer; O(1)).
    pub fn live_subjects(&self) -> usize {
        self.counts.subjects as usize
    }
}
