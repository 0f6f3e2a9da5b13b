//! Rows enrolled through the log since the last compaction, encoded like a segment's
//! rows but held in memory. Snapshots share it through an `Arc`; a writer copies it
//! only if a search still holds the old version (`Arc::make_mut`).

use super::origin::Origin;
use crate::template::{Dtype, encode_row, row_stride};
use std::collections::HashMap;

/// The log's rows in memory, in the gallery's storage dtype.
#[derive(Clone)]
pub struct MemTable {
    dtype: Dtype,
    dim: usize,
    stride: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
    row_subject: Vec<u32>,
    subjects: Vec<String>,
    index: HashMap<String, u32>,
    rows_per_subject: Vec<u32>,
    /// `rank[ordinal]` = position of the subject's id in sorted order (the tie-break).
    rank: Vec<u32>,
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
            subjects: Vec::new(),
            index: HashMap::new(),
            rows_per_subject: Vec::new(),
            rank: Vec::new(),
            origin: Origin::new(),
            removals: 0,
        }
    }

    /// Append normalised templates (`dim` values each) for `subject`.
    pub fn push(&mut self, subject: &str, templates: &[f32]) {
        let ordinal = match self.index.get(subject) {
            Some(&o) => o,
            None => {
                let o = self.subjects.len() as u32;
                self.subjects.push(subject.to_owned());
                self.index.insert(subject.to_owned(), o);
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
        let Some(&ordinal) = self.index.get(subject) else {
            return 0;
        };
        let removed = self.rows_per_subject[ordinal as usize] as usize;
        if removed == 0 {
            return 0;
        }
        let mut keep = 0;
        for row in 0..self.scales.len() {
            if self.row_subject[row] != ordinal {
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
        self.rows_per_subject[ordinal as usize] = 0;
        self.removals += 1;
        removed
    }

    /// Recompute the tie-break ranks after new subjects were pushed (once per batch:
    /// a snapshot must never be taken with stale ranks).
    pub fn refresh_ranks(&mut self) {
        if self.rank.len() == self.subjects.len() {
            return;
        }
        let mut order: Vec<u32> = (0..self.subjects.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| self.subjects[a as usize].cmp(&self.subjects[b as usize]));
        self.rank = vec![0; order.len()];
        for (r, &o) in order.iter().enumerate() {
            self.rank[o as usize] = r as u32;
        }
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
    /// Subject ids by ordinal (including subjects whose rows were all deleted).
    pub fn subject_ids(&self) -> &[String] {
        &self.subjects
    }
    /// Sorted-id rank of each ordinal.
    pub fn ranks(&self) -> &[u32] {
        assert_eq!(self.rank.len(), self.subjects.len(), "refresh_ranks() after pushing");
        &self.rank
    }
    /// The ordinal of a subject id (it may have no rows left after a deletion).
    pub fn find_subject(&self, subject: &str) -> Option<u32> {
        self.index.get(subject).copied()
    }

    /// Most rows of one subject here.
    pub fn max_subject_rows(&self) -> usize {
        self.rows_per_subject.iter().copied().max().unwrap_or(0) as usize
    }

    /// Whether `subject` has rows here.
    pub fn has_subject(&self, subject: &str) -> bool {
        self.index
            .get(subject)
            .is_some_and(|&o| self.rows_per_subject[o as usize] > 0)
    }
    /// Ids of subjects that have rows here.
    pub fn live_subjects(&self) -> impl Iterator<Item = &str> {
        self.subjects
            .iter()
            .zip(&self.rows_per_subject)
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| s.as_str())
    }
}
