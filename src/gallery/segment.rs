//! Sealed segments: written once by [`SegmentWriter`], then memory-mapped read-only by
//! [`Segment`] and scored in place (no copy into the heap).

use super::format::{HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_VERSION, SegmentHeader, align_up, chunk_rows_for};
use super::identity::{FileChange, FileIdentity};
use super::mapguard;
use super::origin::Origin;
use crate::error::{Error, IoContext, Result};
use crate::storage::{Storage, StoredFile};
use crate::template::{Dtype, check_dim, row_stride};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// A sealed, memory-mapped segment. Cheap to share behind an `Arc`.
///
/// Opening it reads and verifies only its header (and the header's copy at the end):
/// nothing per row or per subject, so a segment of 100M subjects opens in microseconds.
/// Its metadata and rows are verified before they are first scored
/// ([`Segment::ensure_verified`]) and again by every scrub. The first damage found is
/// kept ([`Segment::damage`]) and every later use is refused with it.
pub struct Segment {
    path: PathBuf,
    header: SegmentHeader,
    /// Declared before `map`: unregistered before the mapping goes away.
    guard: mapguard::Guard,
    map: Mmap,
    origin: Origin,
    identity: Mutex<FileIdentity>,
    meta_verified: AtomicBool,
    rows_verified: AtomicBool,
    verifying: Mutex<()>,
    damage: OnceLock<String>,
}

impl Segment {
    /// Map a segment and verify its header, the header's copy at the end and the layout
    /// they describe: O(1) of the segment's size. The metadata (scales, subjects, ids)
    /// and rows are verified by [`Segment::verify_metadata`] and
    /// [`Segment::ensure_verified`] before anything is scored, and by [`Segment::check`].
    pub fn open(path: &Path) -> Result<Segment> {
        let file = File::open(path).ctx(|| format!("opening segment {}", path.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("reading size of {}", path.display()))?
            .len();
        if len < HEADER_BYTES as u64 {
            return Err(Error::corrupt(
                path,
                format!("truncated: {len} bytes is shorter than the {HEADER_BYTES}-byte header"),
            ));
        }
        let identity = FileIdentity::of_file(&file).ctx(|| format!("reading {}", path.display()))?;
        // SAFETY: segment files are immutable once sealed (written to a temporary name,
        // fsynced, renamed); biogate never writes to a mapped segment, and the gallery
        // lock keeps other biogate writers out. A file truncated by someone else is
        // caught by the SIGBUS guard (mapguard) instead of killing the process.
        let map = unsafe { Mmap::map(&file) }.ctx(|| format!("mapping {}", path.display()))?;
        // Huge pages where the kernel keeps file pages in large folios (Linux 6.x, THP
        // "madvise"): a process then maps a 6 GB segment with thousands of page-table
        // entries instead of millions of faults (BENCHMARKS.md: 100M subjects). A hint;
        // where unsupported it changes nothing.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let guard = mapguard::register(map.as_ptr(), map.len());
        let header = match read_header(&map, 0) {
            Ok(h) => h,
            Err(why) => {
                let footer = len
                    .checked_sub(HEADER_BYTES as u64)
                    .map(|at| read_header(&map, at as usize));
                let hint = if matches!(footer, Some(Ok(_))) {
                    " (its copy at the end of the file is intact: `biogate gallery repair` restores it)"
                } else {
                    ""
                };
                return Err(Error::corrupt(path, format!("{why}{hint}")));
            }
        };
        if header.file_len != len {
            return Err(Error::corrupt(
                path,
                format!(
                    "truncated or extended: header says {} bytes, file has {len}",
                    header.file_len
                ),
            ));
        }
        let segment = Segment {
            path: path.to_path_buf(),
            header,
            guard,
            map,
            origin: Origin::new(),
            identity: Mutex::new(identity),
            meta_verified: AtomicBool::new(false),
            rows_verified: AtomicBool::new(false),
            verifying: Mutex::new(()),
            damage: OnceLock::new(),
        };
        segment.validate_layout()?;
        segment.check_footer()?;
        segment.check_mapping()?;
        Ok(segment)
    }

    /// [`Segment::open`], then [`Segment::verify_metadata`] (a repair, which must know
    /// the metadata is sound before it copies rows by it).
    pub fn open_verified(path: &Path) -> Result<Segment> {
        let segment = Segment::open(path)?;
        segment.verify_metadata()?;
        Ok(segment)
    }

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

    /// The bytes of a segment whose header (or its copy at the end) is damaged, with the
    /// intact copy written over the damaged one, if that makes every checksum hold.
    /// `None` if neither copy is intact or anything else is damaged.
    pub fn with_header_restored(path: &Path) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(path).ok()?;
        let len = bytes.len();
        let footer_at = len.checked_sub(HEADER_BYTES)?;
        let good = [0, footer_at]
            .into_iter()
            .find_map(|at| read_header(&bytes, at).ok().filter(|h| h.file_len == len as u64))?;
        let copy = bytemuck::bytes_of(&good).to_vec();
        bytes[..HEADER_BYTES].copy_from_slice(&copy);
        bytes[footer_at..].copy_from_slice(&copy);
        Some(bytes)
    }

    /// Read the subject ids of a segment that may not open (for a repair naming what a
    /// damaged segment held): `None` unless its header and id table verify.
    pub fn salvage_subject_ids(path: &Path) -> Option<Vec<String>> {
        let bytes = std::fs::read(path).ok()?;
        let footer_at = bytes.len().checked_sub(HEADER_BYTES)?;
        let header = read_header(&bytes, 0)
            .or_else(|_| read_header(&bytes, footer_at))
            .ok()?;
        let offs_at = header.subject_offsets_offset as usize;
        let ids_at = header.subject_bytes_offset as usize;
        let end = ids_at.checked_add(header.subject_bytes_len as usize)?;
        let table = bytes.get(offs_at..header.chunk_crcs_offset as usize)?;
        if crc32fast::hash(table) != header.ids_crc || end > bytes.len() {
            return None;
        }
        let offsets: Vec<u64> = bytes
            .get(offs_at..ids_at)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let id_bytes = &bytes[ids_at..end];
        offsets
            .windows(2)
            .map(|w| {
                let s = id_bytes.get(w[0] as usize..w[1] as usize)?;
                std::str::from_utf8(s).ok().map(str::to_owned)
            })
            .collect()
    }

    fn ids_intact(&self) -> bool {
        let h = &self.header;
        let table = &self.map[h.subject_offsets_offset as usize..h.chunk_crcs_offset as usize];
        crc32fast::hash(table) == h.ids_crc
    }

    fn footer_offset(&self) -> usize {
        self.header.file_len as usize - HEADER_BYTES
    }

    fn check_metadata(&self) -> Result<()> {
        let meta = &self.map[self.header.scales_offset as usize..self.footer_offset()];
        if crc32fast::hash(meta) != self.header.meta_crc {
            return Err(Error::corrupt(&self.path, "metadata checksum mismatch"));
        }
        self.check_footer()
    }

    fn check_footer(&self) -> Result<()> {
        if self.map[self.footer_offset()..] != *bytemuck::bytes_of(&self.header) {
            return Err(Error::corrupt(
                &self.path,
                "the header's copy at the end of the file is damaged (`biogate gallery repair` restores it)",
            ));
        }
        Ok(())
    }

    /// An error if a read of the mapping faulted (the file was truncated under us).
    fn check_mapping(&self) -> Result<()> {
        if self.guard.faulted() {
            let why = format!(
                "{}: the file was truncated under the process (a read past its new end faulted)",
                self.path.display()
            );
            return Err(Error::Corrupt(self.record_damage(why)));
        }
        Ok(())
    }

    fn record_damage(&self, why: String) -> String {
        let first = self.damage.get_or_init(|| why.clone());
        if first == &why {
            tracing::error!(segment = %self.path.display(), damage = %why, "damaged segment: its gallery stops answering");
        }
        first.clone()
    }

    /// The first damage found in this segment, if any: every use of it is then refused.
    pub fn damage(&self) -> Option<&str> {
        self.damage.get().map(String::as_str)
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

    /// Skip verification for this mapping (`--no-verify`): the caller accepts that
    /// damaged rows or metadata would be used.
    pub fn trust_rows(&self) {
        self.meta_verified.store(true, Ordering::Release);
        self.rows_verified.store(true, Ordering::Release);
    }

    /// After a read of the mapping: an error if it faulted.
    pub fn after_read(&self) -> Result<()> {
        self.check_mapping()
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

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.header.row_stride as usize
    }

    /// Rows per checksummed chunk.
    pub fn chunk_rows(&self) -> u64 {
        self.header.chunk_rows
    }

    /// The gallery this segment was written for.
    pub fn gallery_id(&self) -> u64 {
        self.header.gallery_id
    }

    /// The CRC32 of its header: the file's identity, which the manifest records.
    pub fn header_crc(&self) -> u32 {
        self.header.header_crc
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

    fn validate_layout(&self) -> Result<()> {
        let h = &self.header;
        let bad = |what: &str| Err(Error::corrupt(&self.path, format!("inconsistent header: {what}")));
        let Some(dtype) = Dtype::from_code(h.dtype) else {
            return bad("unknown dtype");
        };
        if check_dim(h.dim as usize).is_err() {
            return bad("dimension out of range");
        }
        if h.row_stride != row_stride(dtype, h.dim as usize) as u64 || h.chunk_rows == 0 {
            return bad("row stride");
        }
        let data_end = h
            .rows
            .checked_mul(h.row_stride)
            .and_then(|b| b.checked_add(h.data_offset));
        let sections = [
            (h.data_offset, Some(HEADER_BYTES as u64)),
            (h.scales_offset, data_end),
            (h.row_subject_offset, Some(h.scales_offset + 4 * h.rows)),
            (h.subject_row_starts_offset, Some(h.row_subject_offset + 4 * h.rows)),
            (
                h.subject_rows_offset,
                Some(h.subject_row_starts_offset + 4 * (h.subjects + 1)),
            ),
            (h.subject_offsets_offset, Some(h.subject_rows_offset + 4 * h.rows)),
            (
                h.subject_bytes_offset,
                Some(h.subject_offsets_offset + 8 * (h.subjects + 1)),
            ),
            (h.chunk_crcs_offset, Some(h.subject_bytes_offset + h.subject_bytes_len)),
            (
                h.file_len,
                Some(h.chunk_crcs_offset + 4 * h.chunks() + HEADER_BYTES as u64),
            ),
        ];
        for (offset, min) in sections {
            match min {
                Some(min) if offset >= min && offset <= h.file_len => {}
                _ => return bad("section offsets"),
            }
        }
        if h.rows > u64::from(u32::MAX) || h.subjects > h.rows || h.max_subject_rows > h.rows {
            return bad("counts");
        }
        if !h.data_offset.is_multiple_of(4096)
            || !h.scales_offset.is_multiple_of(8)
            || !h.subject_row_starts_offset.is_multiple_of(4)
            || !h.subject_rows_offset.is_multiple_of(4)
            || !h.subject_offsets_offset.is_multiple_of(8)
            || !h.chunk_crcs_offset.is_multiple_of(4)
        {
            return bad("section alignment");
        }
        Ok(())
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

    fn section<T: bytemuck::Pod>(&self, offset: u64, len: u64) -> &[T] {
        bytemuck::cast_slice(&self.map[offset as usize..(offset + len) as usize])
    }

    /// Where this segment lives on disk.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Storage dtype of the rows.
    pub fn dtype(&self) -> Dtype {
        Dtype::from_code(self.header.dtype).expect("validated on open")
    }
    /// Template dimension.
    pub fn dim(&self) -> usize {
        self.header.dim as usize
    }
    /// Identity for caches of these rows (the GPU's resident copy).
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
    /// Number of rows (templates).
    pub fn rows(&self) -> usize {
        self.header.rows as usize
    }
    /// Number of distinct subjects.
    pub fn subjects(&self) -> usize {
        self.header.subjects as usize
    }
    /// Most rows of one subject.
    pub fn max_subject_rows(&self) -> usize {
        self.header.max_subject_rows as usize
    }
    fn subject_row_starts(&self) -> &[u32] {
        self.section(self.header.subject_row_starts_offset, 4 * (self.header.subjects + 1))
    }
    fn subject_rows_table(&self) -> &[u32] {
        self.section(self.header.subject_rows_offset, 4 * self.header.rows)
    }
    /// The rows of subject `ordinal`, ascending (read in place; empty for an ordinal out
    /// of range, which only damage found later can produce).
    pub fn subject_rows(&self, ordinal: u32) -> &[u32] {
        let starts = self.subject_row_starts();
        let o = ordinal as usize;
        match (starts.get(o), starts.get(o + 1)) {
            (Some(&a), Some(&b)) => self.subject_rows_table().get(a as usize..b as usize).unwrap_or(&[]),
            _ => &[],
        }
    }
    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }
    /// The encoded rows, `rows * stride` bytes, 4096-aligned in memory.
    pub fn data(&self) -> &[u8] {
        let h = &self.header;
        &self.map[h.data_offset as usize..(h.data_offset + h.rows * h.row_stride) as usize]
    }
    /// The encoded bytes of row `row`.
    pub fn row(&self, row: usize) -> &[u8] {
        let stride = self.stride();
        &self.data()[row * stride..(row + 1) * stride]
    }
    /// Per-row scales.
    pub fn scales(&self) -> &[f32] {
        self.section(self.header.scales_offset, 4 * self.header.rows)
    }
    /// Per-row subject ordinal.
    pub fn row_subjects(&self) -> &[u32] {
        self.section(self.header.row_subject_offset, 4 * self.header.rows)
    }
    fn subject_offsets(&self) -> &[u64] {
        self.section(self.header.subject_offsets_offset, 8 * (self.header.subjects + 1))
    }
    fn subject_bytes(&self) -> &[u8] {
        let h = &self.header;
        &self.map[h.subject_bytes_offset as usize..(h.subject_bytes_offset + h.subject_bytes_len) as usize]
    }
    /// The id of subject `ordinal` (ordinals are in ascending id order).
    pub fn subject_id(&self, ordinal: u32) -> &str {
        let offs = self.subject_offsets();
        let (Some(&a), Some(&b)) = (offs.get(ordinal as usize), offs.get(ordinal as usize + 1)) else {
            return "";
        };
        // Verified before the segment's rows are scored; until then (a lookup for a
        // write) and in a file truncated under us (pages of zeros, see mapguard) a
        // damaged table reads as an empty id, which never matches a real one.
        self.subject_bytes()
            .get(a as usize..b as usize)
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or("")
    }
    /// The ordinal of a subject id, if this segment has it (binary search, no allocation).
    pub fn find_subject(&self, id: &str) -> Option<u32> {
        let (mut lo, mut hi) = (0u32, self.header.subjects as u32);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.subject_id(mid).cmp(id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }
}

/// The subjects of several segments in ascending id order (a merge of their sorted id
/// tables: O(segments) memory, no hashing), as `(id, segment index, ordinal)`; an id
/// in several segments comes once per segment, those entries adjacent.
pub fn subjects_in_order<'a>(segments: &[&'a Segment]) -> impl Iterator<Item = (&'a str, usize, u32)> + use<'a> {
    use std::cmp::Reverse;
    let segments = segments.to_vec();
    let mut heap: std::collections::BinaryHeap<Reverse<(&'a str, usize, u32)>> = segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.subjects() > 0)
        .map(|(i, s)| Reverse((s.subject_id(0), i, 0)))
        .collect();
    std::iter::from_fn(move || {
        let Reverse((id, i, o)) = heap.pop()?;
        let segment = segments[i];
        if (o as usize + 1) < segment.subjects() {
            heap.push(Reverse((segment.subject_id(o + 1), i, o + 1)));
        }
        Some((id, i, o))
    })
}

/// A segment header at byte `at` of `bytes`, if it is one biogate wrote and understands.
fn read_header(bytes: &[u8], at: usize) -> std::result::Result<SegmentHeader, String> {
    let raw = bytes
        .get(at..at + HEADER_BYTES)
        .ok_or_else(|| format!("truncated: shorter than the {HEADER_BYTES}-byte header"))?;
    let header: SegmentHeader = bytemuck::pod_read_unaligned(raw);
    if header.magic != SEGMENT_MAGIC {
        return Err("bad magic: not a biogate segment header".into());
    }
    if header.header_crc != header.compute_crc() {
        return Err("header checksum mismatch".into());
    }
    if header.version != SEGMENT_VERSION {
        return Err(format!(
            "format version {} is not supported (expected {SEGMENT_VERSION}; re-import the templates)",
            header.version
        ));
    }
    Ok(header)
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

/// The subject ids of a segment being written, and each one's ordinal.
enum SubjectTable {
    /// Every id so far arrived in ascending order, each subject's rows together (an
    /// import of a sorted id list, a seal): ordinals are already the sorted ones and
    /// nothing is hashed or held twice.
    Ascending { bytes: Vec<u8>, offsets: Vec<u64> },
    /// Ids in any order: ordinals by first arrival, sorted at the end.
    Hashed(HashMap<String, u32>),
}

impl SubjectTable {
    fn len(&self) -> usize {
        match self {
            SubjectTable::Ascending { offsets, .. } => offsets.len() - 1,
            SubjectTable::Hashed(map) => map.len(),
        }
    }

    /// The ordinal of `subject`, and whether it is new.
    fn ordinal(&mut self, subject: &str) -> (u32, bool) {
        if let SubjectTable::Ascending { bytes, offsets } = self {
            let n = offsets.len() - 1;
            let last = (n > 0).then(|| &bytes[offsets[n - 1] as usize..]);
            match last.map(|l| subject.as_bytes().cmp(l)) {
                Some(std::cmp::Ordering::Equal) => return ((n - 1) as u32, false),
                None | Some(std::cmp::Ordering::Greater) => {
                    bytes.extend_from_slice(subject.as_bytes());
                    offsets.push(bytes.len() as u64);
                    return (n as u32, true);
                }
                Some(std::cmp::Ordering::Less) => {
                    let map = offsets
                        .windows(2)
                        .enumerate()
                        .map(|(o, w)| {
                            let id = &bytes[w[0] as usize..w[1] as usize];
                            (String::from_utf8_lossy(id).into_owned(), o as u32)
                        })
                        .collect();
                    *self = SubjectTable::Hashed(map);
                }
            }
        }
        let SubjectTable::Hashed(map) = self else {
            unreachable!("converted above")
        };
        match map.get(subject) {
            Some(&o) => (o, false),
            None => {
                let o = map.len() as u32;
                map.insert(subject.to_owned(), o);
                (o, true)
            }
        }
    }

    /// The ids in sorted order (bytes and offsets), and the remapping of arrival
    /// ordinals to sorted ones when they differ.
    fn into_sorted(self) -> (Vec<u8>, Vec<u64>, Option<Vec<u32>>) {
        match self {
            SubjectTable::Ascending { bytes, offsets } => (bytes, offsets, None),
            SubjectTable::Hashed(map) => {
                let mut ids: Vec<(String, u32)> = map.into_iter().collect();
                ids.sort_unstable();
                let mut remap = vec![0u32; ids.len()];
                let mut offsets = Vec::with_capacity(ids.len() + 1);
                let mut bytes = Vec::new();
                offsets.push(0u64);
                for (sorted, (id, old)) in ids.iter().enumerate() {
                    remap[*old as usize] = sorted as u32;
                    bytes.extend_from_slice(id.as_bytes());
                    offsets.push(bytes.len() as u64);
                }
                (bytes, offsets, Some(remap))
            }
        }
    }
}

/// Streams encoded rows into a new segment file; nothing is visible until the caller
/// renames the finished file into place and records it in the manifest.
pub struct SegmentWriter {
    path: PathBuf,
    out: BufWriter<StoredFile>,
    header: SegmentHeader,
    scales: Vec<f32>,
    row_subject: Vec<u32>,
    subject_ids: SubjectTable,
    chunk_crcs: Vec<u32>,
    chunk_hasher: crc32fast::Hasher,
    rows_in_chunk: u64,
    /// Bytes before this were started towards the disk, the last range of them here.
    written_back: u64,
    writeback_previous: Option<(u64, u64)>,
}

impl SegmentWriter {
    /// Create (truncate) `path` for a segment of `dtype` rows of `dim` components
    /// belonging to gallery `gallery_id`.
    pub fn create(storage: &Storage, path: &Path, dtype: Dtype, dim: usize, gallery_id: u64) -> Result<SegmentWriter> {
        check_dim(dim)?;
        let file = storage.create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.seek(SeekFrom::Start(HEADER_BYTES as u64))
            .ctx(|| format!("writing {}", path.display()))?;
        let stride = row_stride(dtype, dim);
        let header = SegmentHeader {
            magic: SEGMENT_MAGIC,
            version: SEGMENT_VERSION,
            dtype: dtype.code(),
            dim: dim as u32,
            row_stride: stride as u64,
            chunk_rows: chunk_rows_for(stride),
            data_offset: HEADER_BYTES as u64,
            gallery_id,
            ..bytemuck::Zeroable::zeroed()
        };
        Ok(SegmentWriter {
            path: path.to_path_buf(),
            out,
            header,
            scales: Vec::new(),
            row_subject: Vec::new(),
            subject_ids: SubjectTable::Ascending {
                bytes: Vec::new(),
                offsets: vec![0],
            },
            chunk_crcs: Vec::new(),
            chunk_hasher: crc32fast::Hasher::new(),
            rows_in_chunk: 0,
            written_back: 0,
            writeback_previous: None,
        })
    }

    /// Bytes of one encoded row.
    pub fn stride(&self) -> usize {
        self.header.row_stride as usize
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.scales.len()
    }

    /// Append one already-encoded row (exactly one stride) with its scale and subject.
    /// Returns whether this is the subject's first row in the segment.
    pub fn push(&mut self, encoded: &[u8], scale: f32, subject: &str) -> Result<bool> {
        assert_eq!(encoded.len(), self.stride(), "encoded row must be one stride");
        if self.scales.len() >= u32::MAX as usize {
            return Err(Error::invalid(format!(
                "{}: a segment holds at most {} rows",
                self.path.display(),
                u32::MAX
            )));
        }
        let (ordinal, new) = self.subject_ids.ordinal(subject);
        self.out
            .write_all(encoded)
            .ctx(|| format!("writing {}", self.path.display()))?;
        self.chunk_hasher.update(encoded);
        self.rows_in_chunk += 1;
        if self.rows_in_chunk == self.header.chunk_rows {
            let hasher = std::mem::take(&mut self.chunk_hasher);
            self.chunk_crcs.push(hasher.finalize());
            self.rows_in_chunk = 0;
            self.write_back()?;
        }
        self.scales.push(scale);
        self.row_subject.push(ordinal);
        Ok(new)
    }

    /// Every `WRITEBACK_BYTES` of rows, start them towards the disk (see
    /// [`StoredFile::start_writeback`]): an import then runs at about the speed of the
    /// slower of the disk and the encoding, not their sum.
    fn write_back(&mut self) -> Result<()> {
        const WRITEBACK_BYTES: u64 = 32 << 20;
        let end = HEADER_BYTES as u64 + (self.scales.len() as u64 + 1) * self.header.row_stride;
        if end - self.written_back < WRITEBACK_BYTES {
            return Ok(());
        }
        self.out.flush().ctx(|| format!("writing {}", self.path.display()))?;
        let range = (self.written_back, end - self.written_back);
        self.out
            .get_ref()
            .start_writeback(range.0, range.1, self.writeback_previous);
        self.writeback_previous = Some(range);
        self.written_back = end;
        Ok(())
    }

    /// Distinct subjects written so far.
    pub fn subjects(&self) -> usize {
        self.subject_ids.len()
    }

    /// Write the metadata and header, fsync, and return the finished file's path. The
    /// metadata is written section by section as it is checksummed (never assembled in
    /// one buffer), so a segment of 100M subjects needs its per-row arrays once.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.rows_in_chunk > 0 {
            let hasher = std::mem::take(&mut self.chunk_hasher);
            self.chunk_crcs.push(hasher.finalize());
        }
        // Ordinals in sorted id order (already so when the ids arrived ascending).
        let subject_ids = std::mem::replace(
            &mut self.subject_ids,
            SubjectTable::Ascending {
                bytes: Vec::new(),
                offsets: Vec::new(),
            },
        );
        let (bytes, offsets, remap) = subject_ids.into_sorted();
        if let Some(remap) = remap {
            for s in &mut self.row_subject {
                *s = remap[*s as usize];
            }
        }
        let subjects = offsets.len() - 1;
        // The subject index: each subject's rows, ascending, in ordinal order (a
        // counting sort over the rows).
        let mut starts = vec![0u32; subjects + 1];
        for &s in &self.row_subject {
            starts[s as usize + 1] += 1;
        }
        let max_subject_rows = starts.iter().copied().max().unwrap_or(0);
        for i in 0..subjects {
            starts[i + 1] += starts[i];
        }
        let mut subject_rows = vec![0u32; self.row_subject.len()];
        {
            let mut next = starts.clone();
            for (row, &s) in self.row_subject.iter().enumerate() {
                subject_rows[next[s as usize] as usize] = row as u32;
                next[s as usize] += 1;
            }
        }
        let rows = self.scales.len() as u64;
        let h = &mut self.header;
        h.rows = rows;
        h.subjects = subjects as u64;
        h.max_subject_rows = u64::from(max_subject_rows);
        h.scales_offset = align_up(h.data_offset + rows * h.row_stride, 64);
        h.row_subject_offset = h.scales_offset + 4 * rows;
        h.subject_row_starts_offset = h.row_subject_offset + 4 * rows;
        h.subject_rows_offset = h.subject_row_starts_offset + 4 * (subjects as u64 + 1);
        h.subject_offsets_offset = align_up(h.subject_rows_offset + 4 * rows, 8);
        h.subject_bytes_offset = h.subject_offsets_offset + 8 * (subjects as u64 + 1);
        h.subject_bytes_len = bytes.len() as u64;
        h.chunk_crcs_offset = align_up(h.subject_bytes_offset + h.subject_bytes_len, 4);
        let footer_offset = h.chunk_crcs_offset + 4 * self.chunk_crcs.len() as u64;
        h.file_len = footer_offset + HEADER_BYTES as u64;
        let header = *h;

        let path = self.path.clone();
        let io = |what: &str| format!("{what} {}", path.display());
        // Zero padding up to the scales, then each section at its offset, the padding
        // between sections checksummed with them.
        let mut at = header.data_offset + rows * header.row_stride;
        self.out
            .write_all(&vec![0u8; (header.scales_offset - at) as usize])
            .ctx(|| io("writing"))?;
        at = header.scales_offset;
        let mut meta = crc32fast::Hasher::new();
        let mut ids = crc32fast::Hasher::new();
        let sections: [(u64, &[u8]); 7] = [
            (header.scales_offset, bytemuck::cast_slice(&self.scales)),
            (header.row_subject_offset, bytemuck::cast_slice(&self.row_subject)),
            (header.subject_row_starts_offset, bytemuck::cast_slice(&starts)),
            (header.subject_rows_offset, bytemuck::cast_slice(&subject_rows)),
            (header.subject_offsets_offset, bytemuck::cast_slice(&offsets)),
            (header.subject_bytes_offset, &bytes),
            (header.chunk_crcs_offset, bytemuck::cast_slice(&self.chunk_crcs)),
        ];
        // The id table's checksum covers `subject_offsets_offset..chunk_crcs_offset`:
        // the offsets, the ids and the padding after them.
        let id_table = header.subject_offsets_offset..header.chunk_crcs_offset;
        for (offset, section) in sections {
            let pad = vec![0u8; (offset - at) as usize];
            for (part, start) in [(pad.as_slice(), at), (section, offset)] {
                meta.update(part);
                if !part.is_empty() && id_table.contains(&start) {
                    ids.update(part);
                }
                self.out.write_all(part).ctx(|| io("writing"))?;
            }
            at = offset + section.len() as u64;
        }
        self.header.meta_crc = meta.finalize();
        self.header.ids_crc = ids.finalize();
        self.header.header_crc = self.header.compute_crc();
        // The header twice: at the start, and its copy at the end (a repair restores a
        // damaged one from the other).
        self.out
            .write_all(bytemuck::bytes_of(&self.header))
            .ctx(|| io("writing"))?;
        self.out.seek(SeekFrom::Start(0)).ctx(|| io("writing"))?;
        self.out
            .write_all(bytemuck::bytes_of(&self.header))
            .ctx(|| io("writing"))?;
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx(|| io("writing"))?;
        file.sync_all()?;
        Ok(path)
    }
}
