//! Writing a segment: rows streamed to the file as they come, then the per-row and
//! per-subject metadata, the chunk checksums and the header (twice), one fsync.

use super::super::format::{HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_VERSION, SegmentHeader, align_up, chunk_rows_for};
use crate::error::{Error, IoContext, Result};
use crate::storage::{Storage, StoredFile};
use crate::template::{Dtype, check_dim, row_stride};
use std::collections::HashMap;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
