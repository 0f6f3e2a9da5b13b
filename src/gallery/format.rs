//! The on-disk layout of a sealed segment file (`seg-NNNNNN.bgs`).
//!
//! ```text
//! offset 0       SegmentHeader (4096 bytes, #[repr(C)], read with bytemuck)
//! data_offset    rows x row_stride bytes: the encoded templates, each row zero padded
//!                to a 64-byte multiple (data_offset is 4096-aligned, so rows are too)
//! scales_offset  rows x f32: per-row dequantisation scale (1.0 for f32/f16)
//! row_subject    rows x u32: each row's subject ordinal in this segment
//! subject_row_starts (subjects + 1) x u32: where each subject's rows start in `subject_rows`
//! subject_rows   rows x u32: row indices grouped by subject ordinal (ascending within one)
//! subject_offs   (subjects + 1) x u64: byte offsets into the subject-id bytes
//! subject_bytes  the subject ids, UTF-8, sorted ascending, unique
//! chunk_crcs     chunks x u32: CRC32 of each `chunk_rows` block of row data
//! footer         a copy of the header (4096 bytes), so a damaged header can be restored
//! ```
//!
//! Subject ordinals are assigned in sorted id order, so comparing ordinals inside a
//! segment is the same as comparing ids (the engine's tie-break). The header carries the
//! counts (`rows`, `subjects`, `max_subject_rows`), so nothing per row or per subject is
//! read to open a segment or to describe it. A subject's rows are found in place
//! (binary search of the sorted ids, then its run of `subject_rows`).
//!
//! Open verifies the header's CRC and layout; `meta_crc` (every byte from
//! `scales_offset` to the footer) and the footer (equal to the header) are verified
//! once per process before the segment's rows are first scored, with the chunk CRCs of
//! the row data, and by `gallery check` and the server's scrub. All integers are
//! little-endian.

use bytemuck::{Pod, Zeroable};

/// Identifies a biogate segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"BIOGSEG\0";
/// Bumped on any incompatible layout change.
pub const SEGMENT_VERSION: u32 = 3;
/// Size of the header; the row data starts at this (page-aligned) offset.
pub const HEADER_BYTES: usize = 4096;
/// Target size of one checksummed chunk of row data.
pub const CHUNK_TARGET_BYTES: usize = 1 << 20;

/// The fixed-size header at the start of every segment file.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct SegmentHeader {
    pub magic: [u8; 8],
    pub version: u32,
    pub dtype: u32,
    pub dim: u32,
    /// CRC32 of the header with this field set to zero.
    pub header_crc: u32,
    pub rows: u64,
    pub row_stride: u64,
    pub chunk_rows: u64,
    pub subjects: u64,
    pub data_offset: u64,
    pub scales_offset: u64,
    pub row_subject_offset: u64,
    pub subject_offsets_offset: u64,
    pub subject_bytes_offset: u64,
    pub subject_bytes_len: u64,
    pub chunk_crcs_offset: u64,
    pub file_len: u64,
    /// CRC32 of bytes `scales_offset..file_len - HEADER_BYTES` (up to the footer).
    pub meta_crc: u32,
    /// CRC32 of the subject offsets and id bytes (`subject_offsets_offset..chunk_crcs_offset`).
    pub ids_crc: u32,
    /// The gallery this segment belongs to (as in its manifest).
    pub gallery_id: u64,
    /// `(subjects + 1) x u32`: start of each subject's run in `subject_rows`.
    pub subject_row_starts_offset: u64,
    /// `rows x u32`: row indices grouped by subject.
    pub subject_rows_offset: u64,
    /// Most rows of one subject (what the GPU's exact selection must keep per subject).
    pub max_subject_rows: u64,
    pub _reserved: [u8; HEADER_BYTES - 160],
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() == HEADER_BYTES);

impl SegmentHeader {
    /// CRC32 of the header bytes with `header_crc` zeroed.
    pub fn compute_crc(&self) -> u32 {
        let mut copy = *self;
        copy.header_crc = 0;
        crc32fast::hash(bytemuck::bytes_of(&copy))
    }

    /// Number of checksummed chunks of row data.
    pub fn chunks(&self) -> u64 {
        if self.rows == 0 {
            0
        } else {
            self.rows.div_ceil(self.chunk_rows)
        }
    }
}

/// Rows per checksummed chunk for a given stride (about 1 MiB of data per chunk).
pub fn chunk_rows_for(stride: usize) -> u64 {
    (CHUNK_TARGET_BYTES / stride).max(1) as u64
}

/// Round `x` up to a multiple of `align` (a power of two).
pub fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}
