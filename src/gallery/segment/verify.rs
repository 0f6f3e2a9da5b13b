//! Checking a segment's bytes: its metadata and rows against their checksums before
//! anything is scored (once per process; the CPU search checks each chunk of rows as it
//! first scores it), by `check` and the scrub, after the file was
//! written in place under the process, and as the GPU upload copies them. The first
//! damage found is kept, and every later use is refused with it.

use super::super::identity::FileChange;
use super::Segment;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::atomic::Ordering;

impl Segment {
    /// Verify the metadata (scales, row subjects, the subject index and id table) once
    /// per process: O(rows). Later calls return at once; damage is kept and refused.
    pub fn verify_metadata(&self) -> Result<()> {
        if let Some(d) = self.damage.get() {
            return Err(Error::Corrupt(d.clone()));
        }
        if self.meta_verified.load(Ordering::Acquire) {
            return Ok(());
        }
        self.metadata_intact()
            .map_err(|e| Error::Corrupt(self.record_damage(corrupt_message(e))))?;
        self.meta_verified.store(true, Ordering::Release);
        Ok(())
    }

    fn metadata_intact(&self) -> Result<()> {
        // `meta_crc` covers the id table too; its own checksum is read only to say which
        // part is damaged (and by a repair, to name the subjects of a damaged segment).
        if let Err(e) = self.check_metadata() {
            if !self.ids_intact() {
                return Err(Error::corrupt(&self.path, "subject id table checksum mismatch"));
            }
            return Err(e);
        }
        self.validate_subjects()?;
        self.check_mapping()
    }

    fn ids_intact(&self) -> bool {
        let h = &self.header;
        let table = &self.map[h.subject_offsets_offset as usize..h.chunk_crcs_offset as usize];
        crc32fast::hash(table) == h.ids_crc
    }

    fn check_metadata(&self) -> Result<()> {
        let meta = &self.map[self.header.scales_offset as usize..self.footer_offset()];
        if crc32fast::hash(meta) != self.header.meta_crc {
            return Err(Error::corrupt(&self.path, "metadata checksum mismatch"));
        }
        self.check_footer()
    }

    /// Verify the rows once before they are first scored (later calls return at once);
    /// an error, now and from then on, if they or the file are damaged.
    pub fn ensure_verified(&self) -> Result<()> {
        if let Some(d) = self.damage.get() {
            return Err(Error::Corrupt(d.clone()));
        }
        if self.rows_verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.verifying.lock().unwrap_or_else(|p| p.into_inner());
        if self.rows_verified.load(Ordering::Acquire) {
            return Ok(());
        }
        self.check()?;
        self.meta_verified.store(true, Ordering::Release);
        self.rows_verified.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the rows still wait for their first verification. A search may then check
    /// each chunk as it scores it ([`Segment::chunk_checks_out`]) instead of reading
    /// every row twice, and answer only once every chunk has
    /// ([`Segment::rows_checked_by_search`]).
    pub fn rows_unverified(&self) -> bool {
        !self.rows_verified.load(Ordering::Acquire)
    }

    /// Whether `crc`, computed by a search over chunk `i`'s bytes as it scored them,
    /// is the chunk's checksum.
    pub fn chunk_checks_out(&self, i: u64, crc: u32) -> bool {
        self.chunk_crcs().get(i as usize) == Some(&crc)
    }

    /// A search checked every chunk while scoring it (and the metadata before): the
    /// rows count as verified, as after [`Segment::ensure_verified`]. A search that
    /// found a chunk that did not check out calls `ensure_verified` instead, which
    /// names the first bad chunk and keeps it as the damage.
    pub fn rows_checked_by_search(&self) -> Result<()> {
        self.check_mapping()?;
        self.rows_verified.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the file at the segment's path is still the one mapped, unchanged. A file
    /// written in place is verified again at once (it stays usable if intact); a
    /// replaced, removed or resized one is damage.
    pub fn check_file(&self) -> Result<()> {
        if let Some(d) = self.damage.get() {
            return Err(Error::Corrupt(d.clone()));
        }
        let mut identity = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        match identity.compare(&self.path) {
            None => Ok(()),
            Some(FileChange::Modified) => {
                tracing::warn!(segment = %self.path.display(), "segment file was written in place; verifying it again");
                self.check()?;
                *identity = identity.refreshed(&self.path);
                Ok(())
            }
            Some(change) => {
                let why = format!("{}: the file {change} under the process", self.path.display());
                Err(Error::Corrupt(self.record_damage(why)))
            }
        }
    }

    /// After a search read this segment: whether its file was written in place since it
    /// was last verified (a stat). If so it is verified again now, an error if damaged,
    /// `Ok(true)` if intact (the caller, which may have read it mid-write, reads it
    /// again). A file removed or replaced is not this check's business: the mapping still
    /// holds the verified bytes (and a merge removes the files of segments that searches
    /// in flight still read); the server's file check reports it.
    pub fn reverify_if_written(&self) -> Result<bool> {
        if let Some(d) = self.damage.get() {
            return Err(Error::Corrupt(d.clone()));
        }
        let mut identity = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        if identity.compare(&self.path) != Some(FileChange::Modified) {
            return Ok(false);
        }
        tracing::warn!(segment = %self.path.display(), "segment file was written in place; verifying it again before answering");
        self.check()?;
        *identity = identity.refreshed(&self.path);
        Ok(true)
    }

    /// Verify metadata and rows again chunk by chunk, calling `pace(bytes)` after each
    /// chunk (a scrub: rate-limited by the caller, in the background).
    pub fn scrub(&self, pace: &mut dyn FnMut(u64)) -> Result<()> {
        if let Some(d) = self.damage.get() {
            return Err(Error::Corrupt(d.clone()));
        }
        let outcome = self.metadata_intact().and_then(|_| {
            let h = &self.header;
            for i in 0..h.chunks() {
                self.check_chunk(i)?;
                pace((h.chunk_rows * h.row_stride).min(self.data().len() as u64));
            }
            self.check_mapping()
        });
        outcome.map_err(|e| Error::Corrupt(self.record_damage(corrupt_message(e))))
    }

    fn chunk_crcs(&self) -> &[u32] {
        self.section(self.header.chunk_crcs_offset, 4 * self.header.chunks())
    }

    fn chunk_range(&self, i: u64) -> std::ops::Range<usize> {
        let chunk_bytes = (self.header.chunk_rows * self.header.row_stride) as usize;
        let start = i as usize * chunk_bytes;
        start..(start + chunk_bytes).min(self.data().len())
    }

    fn chunk_error(&self, i: u64) -> Error {
        let h = &self.header;
        let first = i * h.chunk_rows;
        let last = (first + h.chunk_rows).min(h.rows) - 1;
        Error::corrupt(
            &self.path,
            format!("row data checksum mismatch in chunk {i} (rows {first}..={last})"),
        )
    }

    fn check_chunk(&self, i: u64) -> Result<()> {
        if crc32fast::hash(&self.data()[self.chunk_range(i)]) != self.chunk_crcs()[i as usize] {
            return Err(self.chunk_error(i));
        }
        Ok(())
    }

    /// Every chunk whose rows fail their checksum (for a repair).
    pub fn bad_chunks(&self) -> Vec<u64> {
        (0..self.header.chunks())
            .into_par_iter()
            .filter(|&i| self.check_chunk(i).is_err())
            .collect()
    }

    /// A checker for rows copied out in order (the GPU upload verifies what it copies).
    pub fn copy_verifier(&self) -> CopyVerifier<'_> {
        CopyVerifier {
            segment: self,
            chunk: 0,
            rows_in_chunk: 0,
            hasher: crc32fast::Hasher::new(),
        }
    }

    fn validate_subjects(&self) -> Result<()> {
        let offsets = self.subject_offsets();
        if offsets.first() != Some(&0)
            || offsets.last() != Some(&self.header.subject_bytes_len)
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(Error::corrupt(&self.path, "subject id table offsets"));
        }
        let ids = self.subject_bytes();
        if std::str::from_utf8(ids).is_err() {
            return Err(Error::corrupt(&self.path, "subject ids are not UTF-8"));
        }
        for i in 1..self.subjects() {
            if self.subject_id(i as u32 - 1) >= self.subject_id(i as u32) {
                return Err(Error::corrupt(&self.path, "subject ids are not sorted and unique"));
            }
        }
        let n = self.header.subjects as u32;
        if let Some(row) = self.row_subjects().iter().position(|&s| s >= n) {
            return Err(Error::corrupt(
                &self.path,
                format!("row {row} names a subject out of range"),
            ));
        }
        // The subject index: runs that tile `subject_rows`, each naming rows of its own
        // subject in ascending order, no run longer than `max_subject_rows`.
        let starts = self.subject_row_starts();
        let rows = self.subject_rows_table();
        let bad_index = || Error::corrupt(&self.path, "the subject index does not match the rows");
        if starts.first() != Some(&0) || starts.last().map(|&l| l as usize) != Some(rows.len()) {
            return Err(bad_index());
        }
        let row_subjects = self.row_subjects();
        for (o, w) in starts.windows(2).enumerate() {
            let run = rows.get(w[0] as usize..w[1] as usize).ok_or_else(bad_index)?;
            if run.is_empty()
                || run.len() as u64 > self.header.max_subject_rows
                || run.windows(2).any(|p| p[0] >= p[1])
                || run.iter().any(|&r| row_subjects.get(r as usize) != Some(&(o as u32)))
            {
                return Err(bad_index());
            }
        }
        Ok(())
    }

    /// Verify the metadata and every chunk of row data against their CRCs, in parallel.
    /// Names the first bad chunk, and keeps it as the segment's damage.
    pub fn check(&self) -> Result<()> {
        let outcome = self.metadata_intact().and_then(|_| {
            let bad = (0..self.header.chunks())
                .into_par_iter()
                .find_first(|&i| self.check_chunk(i).is_err());
            match bad {
                None => self.check_mapping(),
                Some(i) => Err(self.chunk_error(i)),
            }
        });
        outcome.map_err(|e| Error::Corrupt(self.record_damage(corrupt_message(e))))
    }
}

fn corrupt_message(e: Error) -> String {
    match e {
        Error::Corrupt(m) => m,
        other => other.to_string(),
    }
}

/// Checks rows copied out of a segment, in order from row 0, against the chunk CRCs as
/// they are copied (the GPU upload's own verification).
pub struct CopyVerifier<'a> {
    segment: &'a Segment,
    chunk: u64,
    rows_in_chunk: u64,
    hasher: crc32fast::Hasher,
}

impl CopyVerifier<'_> {
    /// The next whole rows, exactly as copied.
    pub fn feed(&mut self, mut rows: &[u8]) -> Result<()> {
        let h = &self.segment.header;
        let stride = h.row_stride as usize;
        while !rows.is_empty() {
            let want = ((h.chunk_rows - self.rows_in_chunk) as usize * stride).min(rows.len());
            self.hasher.update(&rows[..want]);
            self.rows_in_chunk += (want / stride) as u64;
            rows = &rows[want..];
            let last_chunk = self.chunk + 1 == h.chunks();
            let chunk_full = self.rows_in_chunk == h.chunk_rows
                || (last_chunk && self.chunk * h.chunk_rows + self.rows_in_chunk == h.rows);
            if chunk_full {
                let crc = std::mem::take(&mut self.hasher).finalize();
                if crc != self.segment.chunk_crcs()[self.chunk as usize] {
                    let e = self.segment.chunk_error(self.chunk);
                    return Err(Error::Corrupt(self.segment.record_damage(corrupt_message(e))));
                }
                self.chunk += 1;
                self.rows_in_chunk = 0;
            }
        }
        self.segment.check_mapping()
    }

    /// After the last row: an error unless every chunk was seen and matched.
    pub fn finish(self) -> Result<()> {
        if self.chunk != self.segment.header.chunks() {
            return Err(Error::Corrupt(format!(
                "{}: only {} of {} checksummed chunks were copied",
                self.segment.path.display(),
                self.chunk,
                self.segment.header.chunks()
            )));
        }
        Ok(())
    }
}
