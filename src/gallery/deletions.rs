//! Rows deleted from a sealed segment since it was sealed: one bit per row.
//!
//! The bits live in chunks of 65,536 rows shared copy-on-write between snapshots: a
//! snapshot is a clone of a few pointers, a deletion copies the one 8 KiB chunk it
//! touches (if a search still holds it), and a segment with no deletions holds no
//! bits at all. Memory grows with the chunks deletions touched, not with the rows.

use std::sync::Arc;

const CHUNK_WORDS: usize = 1024;
/// Rows per chunk of bits.
pub const CHUNK_ROWS: usize = CHUNK_WORDS * 64;

type Chunk = [u64; CHUNK_WORDS];

/// The deleted rows of one segment.
#[derive(Clone, Default)]
pub struct DeletedRows {
    chunks: Vec<Option<Arc<Chunk>>>,
    count: u64,
}

impl DeletedRows {
    /// No row of a segment of `rows` rows deleted.
    pub fn new(rows: usize) -> DeletedRows {
        DeletedRows {
            chunks: vec![None; rows.div_ceil(CHUNK_ROWS)],
            count: 0,
        }
    }

    /// Whether `row` is deleted.
    #[inline]
    pub fn contains(&self, row: usize) -> bool {
        match self.chunks.get(row / CHUNK_ROWS) {
            Some(Some(chunk)) => {
                let bit = row % CHUNK_ROWS;
                chunk[bit / 64] >> (bit % 64) & 1 == 1
            }
            _ => false,
        }
    }

    /// Mark `row` deleted; whether it was live before.
    pub fn insert(&mut self, row: usize) -> bool {
        let slot = &mut self.chunks[row / CHUNK_ROWS];
        let chunk = Arc::make_mut(slot.get_or_insert_with(|| Arc::new([0; CHUNK_WORDS])));
        let bit = row % CHUNK_ROWS;
        let word = &mut chunk[bit / 64];
        let mask = 1u64 << (bit % 64);
        let new = *word & mask == 0;
        *word |= mask;
        self.count += u64::from(new);
        new
    }

    /// How many rows are deleted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no row is deleted.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The deleted rows, ascending (chunks and words with nothing deleted are skipped).
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.iter().flat_map(move |words| {
                words.iter().enumerate().flat_map(move |(w, &word)| {
                    let base = c * CHUNK_ROWS + w * 64;
                    (0..64).filter(move |b| word >> b & 1 == 1).map(move |b| base + b)
                })
            })
        })
    }

    /// The ranges of rows whose bits may differ between `self` and `other` (chunks not
    /// shared between them): what a cache of per-row marks must look at again.
    pub fn differing_rows(&self, other: &DeletedRows) -> Vec<std::ops::Range<usize>> {
        let n = self.chunks.len().max(other.chunks.len());
        (0..n)
            .filter(|&i| {
                let (a, b) = (
                    self.chunks.get(i).cloned().flatten(),
                    other.chunks.get(i).cloned().flatten(),
                );
                match (a, b) {
                    (None, None) => false,
                    (Some(a), Some(b)) => !Arc::ptr_eq(&a, &b),
                    _ => true,
                }
            })
            .map(|i| i * CHUNK_ROWS..(i + 1) * CHUNK_ROWS)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_set_once_and_shared_until_written() {
        let rows = 3 * CHUNK_ROWS + 17;
        let mut d = DeletedRows::new(rows);
        assert!(!d.contains(rows - 1) && d.is_empty());
        assert!(d.insert(5) && !d.insert(5));
        assert!(d.insert(rows - 1));
        assert_eq!(d.count(), 2);
        assert!(d.contains(5) && d.contains(rows - 1) && !d.contains(6) && !d.contains(CHUNK_ROWS + 5));
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![5, rows - 1]);
        let held = d.clone();
        assert!(d.differing_rows(&held).is_empty());
        d.insert(CHUNK_ROWS + 1);
        d.insert(7);
        assert_eq!(d.differing_rows(&held), vec![0..CHUNK_ROWS, CHUNK_ROWS..2 * CHUNK_ROWS]);
        assert!(!held.contains(7), "a snapshot holding the old bits keeps them");
        assert_eq!(DeletedRows::new(10).differing_rows(&held).len(), 2);
    }
}
