//! Sealed segments: written once by [`SegmentWriter`], then memory-mapped read-only by
//! [`Segment`] and scored in place (no copy into the heap).
//!
//! `mod.rs` opens a segment (its header, footer copy and layout: O(1) of its size) and
//! reads it in place; `verify.rs` checks its bytes (metadata, rows, the file under the
//! process) before anything is scored; `writer.rs` writes one.

mod verify;
mod writer;

pub use verify::CopyVerifier;
pub use writer::SegmentWriter;

use super::format::{HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_VERSION, SegmentHeader};
use super::identity::FileIdentity;
use super::mapguard;
use super::origin::Origin;
use crate::error::{Error, IoContext, Result};
use crate::template::{Dtype, check_dim, row_stride};
use memmap2::Mmap;
use std::fs::File;
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

    fn footer_offset(&self) -> usize {
        self.header.file_len as usize - HEADER_BYTES
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
