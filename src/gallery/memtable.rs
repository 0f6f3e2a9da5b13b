//! Rows enrolled through the log since the last compaction, encoded like a segment's
//! rows but held in memory. Snapshots share it through an `Arc`; a writer copies it
//! only if a search still holds the old version (`Arc::make_mut`).

use super::origin::Origin;
use crate::template::{Dtype, encode_row, row_stride};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// The log's rows in memory, in the gallery's storage dtype.
#[derive(Clone)]
pub struct MemTable {
    dtype: Dtype,
    dim: usize,
    stride: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
    row_subject: Vec<u32>,
    /// Subject ids by ordinal, as one byte string and the offsets between them: a
    /// snapshot's copy of the table is a few memcpys, not an allocation per subject.
    id_bytes: Vec<u8>,
    id_offsets: Vec<u32>,
    /// Hash of an id -> its ordinal (plain numbers: copied, not allocated, with the
    /// table); ids whose hash another id already had are in `collided`.
    index: HashMap<u64, u32>,
    collided: Vec<u32>,
    rows_per_subject: Vec<u32>,
    /// `rank[ordinal]` = position of the subject's id in sorted order (the tie-break).
    rank: Vec<u32>,
    /// Ordinals in id order (what `rank` inverts), kept so that a few new subjects are
    /// inserted rather than everything sorted again.
    sorted: Vec<u32>,
    /// Shared by clones: a clone only appends to the rows it shares with the original.
    origin: Origin,
    /// Deletions so far (they remove rows, so resident copies must start again).
    removals: u64,
}

impl MemTable {
    /// An empty table for rows of `dtype` x `dim`.
    pub fn new(dtype: Dtype, dim: usize) -> MemTable {
        MemTable {
            dtype,
            dim,
            stride: row_stride(dtype, dim),
            data: Vec::new(),
            scales: Vec::new(),
            row_subject: Vec::new(),
            id_bytes: Vec::new(),
            id_offsets: vec![0],
            index: HashMap::new(),
            collided: Vec::new(),
            rows_per_subject: Vec::new(),
            rank: Vec::new(),
            sorted: Vec::new(),
            origin: Origin::new(),
            removals: 0,
        }
    }

    /// Append normalised templates (`dim` values each) for `subject`.
    pub fn push(&mut self, subject: &str, templates: &[f32]) {
        let ordinal = match self.find_subject(subject) {
            Some(o) => o,
            None => {
                let o = self.subject_count() as u32;
                self.id_bytes.extend_from_slice(subject.as_bytes());
                self.id_offsets.push(self.id_bytes.len() as u32);
                if let Some(other) = self.index.insert(id_hash(subject), o) {
                    // Two ids, one hash: keep the first in the index, this one aside.
                    self.index.insert(id_hash(subject), other);
                    self.collided.push(o);
                }
                self.rows_per_subject.push(0);
                o
            }
        };
        for row in templates.chunks_exact(self.dim) {
            let start = self.data.len();
            self.data.resize(start + self.stride, 0);
            let scale = encode_row(self.dtype, row, &mut self.data[start..]);
            self.scales.push(scale);
            self.row_subject.push(ordinal);
            self.rows_per_subject[ordinal as usize] += 1;
        }
    }

    /// Remove every row of `subject`; returns how many rows went.
    pub fn delete(&mut self, subject: &str) -> usize {
        self.delete_many(std::iter::once(subject))
    }

    /// Remove every row of each of `subjects` in one pass over the rows (hiding a
    /// thousand expired subjects moves the table once, not once per subject); returns
    /// how many rows went.
    pub fn delete_many<'a>(&mut self, subjects: impl IntoIterator<Item = &'a str>) -> usize {
        let mut gone = vec![false; self.subject_count()];
        let mut removed = 0;
        for subject in subjects {
            if let Some(o) = self.find_subject(subject) {
                let o = o as usize;
                removed += std::mem::take(&mut self.rows_per_subject[o]) as usize;
                gone[o] = true;
            }
        }
        if removed == 0 {
            return 0;
        }
        let mut keep = 0;
        for row in 0..self.scales.len() {
            if !gone[self.row_subject[row] as usize] {
                if keep != row {
                    self.data
                        .copy_within(row * self.stride..(row + 1) * self.stride, keep * self.stride);
                    self.scales[keep] = self.scales[row];
                    self.row_subject[keep] = self.row_subject[row];
                }
                keep += 1;
            }
        }
        self.data.truncate(keep * self.stride);
        self.scales.truncate(keep);
        self.row_subject.truncate(keep);
        self.removals += 1;
        removed
    }

    /// Recompute the tie-break ranks after new subjects were pushed (once per batch:
    /// a snapshot must never be taken with stale ranks).
    /// O(subjects) when a few are new (each inserted in id order), O(n log n) when many.
    pub fn refresh_ranks(&mut self) {
        let (known, now) = (self.sorted.len(), self.subject_count());
        if known == now {
            return;
        }
        let mut sorted = std::mem::take(&mut self.sorted);
        if (now - known) * 16 > now {
            sorted = (0..now as u32).collect();
            sorted.sort_unstable_by(|&a, &b| self.subject_id(a).cmp(self.subject_id(b)));
        } else {
            for o in known as u32..now as u32 {
                let id = self.subject_id(o);
                let at = sorted.partition_point(|&s| self.subject_id(s) < id);
                sorted.insert(at, o);
            }
        }
        self.sorted = sorted;
        self.rank.resize(now, 0);
        for (r, &o) in self.sorted.iter().enumerate() {
            self.rank[o as usize] = r as u32;
        }
    }

    /// Whether ranks are current (no subject pushed since `refresh_ranks`).
    pub fn ranks_current(&self) -> bool {
        self.sorted.len() == self.subject_count()
    }

    /// Identity for caches of these rows.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
    /// Deletions applied so far.
    pub fn removals(&self) -> u64 {
        self.removals
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.scales.len()
    }
    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Encoded rows.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// The encoded bytes of row `row`.
    pub fn row(&self, row: usize) -> &[u8] {
        &self.data[row * self.stride..(row + 1) * self.stride]
    }
    /// Per-row scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Per-row subject ordinal.
    pub fn row_subjects(&self) -> &[u32] {
        &self.row_subject
    }
    /// Subjects known (including subjects whose rows were all deleted).
    pub fn subject_count(&self) -> usize {
        self.id_offsets.len() - 1
    }
    /// The id of subject `ordinal`.
    pub fn subject_id(&self, ordinal: u32) -> &str {
        let o = ordinal as usize;
        let bytes = &self.id_bytes[self.id_offsets[o] as usize..self.id_offsets[o + 1] as usize];
        std::str::from_utf8(bytes).expect("ids are pushed as str")
    }
    /// Sorted-id rank of each ordinal.
    pub fn ranks(&self) -> &[u32] {
        assert_eq!(self.rank.len(), self.subject_count(), "refresh_ranks() after pushing");
        &self.rank
    }
    /// The ordinal of a subject id (it may have no rows left after a deletion).
    pub fn find_subject(&self, subject: &str) -> Option<u32> {
        match self.index.get(&id_hash(subject)) {
            Some(&o) if self.subject_id(o) == subject => Some(o),
            Some(_) => self.collided.iter().copied().find(|&o| self.subject_id(o) == subject),
            None => None,
        }
    }

    /// Most rows of one subject here.
    pub fn max_subject_rows(&self) -> usize {
        self.rows_per_subject.iter().copied().max().unwrap_or(0) as usize
    }

    /// Whether `subject` has rows here.
    pub fn has_subject(&self, subject: &str) -> bool {
        self.find_subject(subject)
            .is_some_and(|o| self.rows_per_subject[o as usize] > 0)
    }
    /// Ids of subjects that have rows here.
    pub fn live_subjects(&self) -> impl Iterator<Item = &str> {
        (0..self.subject_count() as u32)
            .filter(|&o| self.rows_per_subject[o as usize] > 0)
            .map(|o| self.subject_id(o))
    }
}

/// The log's rows in memory, in pieces of about `PIECE_BYTES` of rows each: snapshots
/// share every piece, and a write copies only the newest piece (or a piece a deletion
/// changes) while a search holds it, so an enrollment costs the same with 100 or
/// 100,000 rows in the log. Each piece is a slab of its own (its own subject ordinals
/// and ranks); a subject may have rows in several, merged by id like segments.
#[derive(Clone)]
pub struct LogTable {
    dtype: Dtype,
    dim: usize,
    piece_rows: usize,
    pieces: Vec<Arc<MemTable>>,
}

/// Bytes of encoded rows per piece of the log.
pub const PIECE_BYTES: usize = 4 << 20;

impl LogTable {
    /// An empty log table for rows of `dtype` x `dim`.
    pub fn new(dtype: Dtype, dim: usize) -> LogTable {
        LogTable {
            dtype,
            dim,
            piece_rows: (PIECE_BYTES / row_stride(dtype, dim)).max(64),
            pieces: Vec::new(),
        }
    }

    /// One piece holding `table` whatever its size (in-memory galleries).
    pub fn from_table(mut table: MemTable) -> LogTable {
        table.refresh_ranks();
        let mut log = LogTable::new(table.dtype, table.dim);
        if table.rows() > 0 {
            log.pieces.push(Arc::new(table));
        }
        log
    }

    /// The pieces, oldest first.
    pub fn pieces(&self) -> &[Arc<MemTable>] {
        &self.pieces
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.pieces.iter().map(|p| p.rows()).sum()
    }

    /// Append normalised templates for `subject` to the newest piece (a new one when it
    /// is full; the full one keeps its ranks current).
    pub fn push(&mut self, subject: &str, templates: &[f32]) {
        if self.pieces.last().is_none_or(|p| p.rows() >= self.piece_rows) {
            self.refresh_ranks();
            self.pieces.push(Arc::new(MemTable::new(self.dtype, self.dim)));
        }
        let newest = self.pieces.last_mut().expect("a piece was just ensured");
        Arc::make_mut(newest).push(subject, templates);
    }

    /// Remove every row of `subject` from every piece; how many rows went.
    pub fn delete(&mut self, subject: &str) -> usize {
        self.delete_many(&[subject])
    }

    /// Remove every row of each of `subjects`, one pass per piece that holds any.
    pub fn delete_many(&mut self, subjects: &[&str]) -> usize {
        self.pieces
            .iter_mut()
            .map(|p| {
                let held: Vec<&str> = subjects.iter().copied().filter(|s| p.has_subject(s)).collect();
                if held.is_empty() {
                    0
                } else {
                    Arc::make_mut(p).delete_many(held)
                }
            })
            .sum()
    }

    /// Recompute the newest piece's ranks after pushes (see [`MemTable::refresh_ranks`]).
    pub fn refresh_ranks(&mut self) {
        if let Some(newest) = self.pieces.last_mut()
            && !newest.ranks_current()
        {
            Arc::make_mut(newest).refresh_ranks();
        }
    }

    /// Whether `subject` has rows here.
    pub fn has_subject(&self, subject: &str) -> bool {
        self.pieces.iter().any(|p| p.has_subject(subject))
    }

    /// Ids of subjects that have rows here, each once.
    pub fn live_subjects(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.pieces
            .iter()
            .flat_map(|p| p.live_subjects())
            .filter(|s| seen.insert(*s))
            .collect()
    }

    /// Every row, oldest first: its encoded bytes, scale and subject.
    pub fn each_row(&self) -> impl Iterator<Item = (&[u8], f32, &str)> {
        self.pieces
            .iter()
            .flat_map(|p| (0..p.rows()).map(move |r| (p.row(r), p.scales()[r], p.subject_id(p.row_subjects()[r]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_by_hash_and_a_collision_is_resolved_by_the_id() {
        let mut t = MemTable::new(Dtype::F32, 2);
        t.push("a", &[1.0, 0.0]);
        // Pretend "b" hashes like "a".
        t.index.insert(id_hash("b"), 0);
        t.push("b", &[0.0, 1.0]);
        t.push("c", &[0.6, 0.8]);
        t.push("b", &[0.8, 0.6]);
        assert_eq!(t.collided, vec![1]);
        assert_eq!(
            (t.find_subject("a"), t.find_subject("b"), t.find_subject("c")),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(t.find_subject("d"), None);
        assert_eq!(t.rows(), 4);
        t.refresh_ranks();
        assert_eq!(t.ranks(), &[0, 1, 2]);
        assert_eq!(t.delete("b"), 2);
        assert!(!t.has_subject("b") && t.has_subject("c"));
        assert_eq!(t.live_subjects().collect::<Vec<_>>(), ["a", "c"]);
        // New subjects later in id order and earlier: ranks follow the ids.
        t.push("0", &[1.0, 1.0]);
        t.push("z", &[1.0, 1.0]);
        t.refresh_ranks();
        assert_eq!(t.ranks(), &[1, 2, 3, 0, 4]);
    }

    #[test]
    fn deleting_many_at_once_leaves_what_deleting_one_by_one_leaves() {
        let mut log = LogTable::new(Dtype::F32, 2);
        log.piece_rows = 3; // several pieces
        for i in 0..12 {
            let v = i as f32 / 12.0;
            log.push(&format!("s{}", i % 5), &[v, 1.0 - v]);
        }
        let mut one_by_one = log.clone();
        let gone = ["s1", "s3", "nobody"];
        let rows: usize = gone.iter().map(|s| one_by_one.delete(s)).sum();
        assert_eq!(log.delete_many(&gone), rows);
        assert_eq!(rows, 5);
        let rows_of = |l: &LogTable| {
            l.each_row()
                .map(|(r, s, id)| (r.to_vec(), s, id.to_owned()))
                .collect::<Vec<_>>()
        };
        assert_eq!(rows_of(&log), rows_of(&one_by_one));
        assert!(!log.has_subject("s1") && !log.has_subject("s3") && log.has_subject("s4"));
        assert_eq!(log.delete_many(&gone), 0);
    }
}
