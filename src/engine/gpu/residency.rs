//! The gallery's resident copy on the GPU.
//!
//! Each slab (a sealed segment, or the log's rows) is uploaded once, split into shards
//! no larger than one storage binding (whole tiles of [`TILE_ROWS`] rows, interleaved
//! for coalesced reads), and streamed through wgpu's staging memory in bounded chunks,
//! so host memory is never doubled. Later searches reuse it:
//!
//! - rows enrolled into the log since the last search are appended to the last shard
//!   (growing it on the GPU, copying buffer to buffer) and then to new shards;
//! - deletions of subjects in sealed segments reach the GPU as a tombstone mask: the
//!   per-row key (the subject's tie-break rank) of their rows is set to [`DEAD`];
//! - the log's tie-break ranks change when a new subject arrives; the keys are then
//!   rewritten (4 bytes per row, never the rows themselves);
//! - a slab no snapshot can hand out any more (compacted, sealed, gallery closed) is
//!   dropped at the next search.

use super::context::GpuContext;
use crate::engine::gpu_options::Upload;
use crate::error::Result;
use crate::gallery::deletions::DeletedRows;
use crate::gallery::{Slab, SubjectIds};
use crate::template::Dtype;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Rows interleaved together on the GPU (layout.wgsl `TILE_ROWS`): word `j` of the 64
/// rows of a tile are adjacent, so the 64 invocations scoring a tile read consecutive
/// 16-byte words (coalesced) instead of words a row apart. Shards hold whole tiles.
pub const TILE_ROWS: usize = 64;
/// The key of a row whose subject is deleted (the kernels skip it).
pub const DEAD: u32 = u32::MAX;
/// Bytes written to the GPU between waits for the staging memory to drain.
const UPLOAD_CHUNK: usize = 32 << 20;
/// Rows a growing log shard starts with.
const LOG_SHARD_START_ROWS: usize = 1024;

/// A run of rows that fits one storage binding.
pub struct Shard {
    /// Unique among the shards this process made (a grown shard gets a new one): names
    /// the bind groups made for it.
    pub id: u64,
    /// Index in the slab of the shard's first row.
    pub first_row: usize,
    /// Rows resident (the first `rows` of `capacity`).
    pub rows: usize,
    capacity: usize,
    pub gallery: wgpu::Buffer,
    pub keys: wgpu::Buffer,
    /// i8 galleries only.
    pub scales: Option<wgpu::Buffer>,
}

/// One slab's resident copy.
pub struct ResidentSlab {
    uid: u64,
    removals: u64,
    subjects: usize,
    alive: Weak<()>,
    is_log: bool,
    pub dtype: Dtype,
    pub stride: usize,
    pub shards: Vec<Shard>,
    /// Host copy of every row's key (to find what a change must rewrite).
    keys: Vec<u32>,
    /// The segment's deleted rows whose keys are [`DEAD`] (chunks shared with the
    /// snapshot's: comparing them finds what changed).
    deleted: Option<DeletedRows>,
    /// Rows per subject of the log (a segment's header says its most).
    rows_per_subject: Vec<u32>,
    /// The most rows any one subject has here (bounds the rows a search must keep).
    pub max_rows_per_subject: usize,
}

impl ResidentSlab {
    /// Rows resident.
    pub fn rows(&self) -> usize {
        self.keys.len()
    }
}

/// Every resident slab, and the largest shard allowed.
pub struct Residency {
    slabs: Vec<ResidentSlab>,
    shard_bytes: u64,
    last_upload: Option<Upload>,
    /// Counts the times a shard was dropped or replaced (what caches of bind groups
    /// must forget).
    changes: u64,
}

/// How a search may use a slab's resident copy.
pub enum Resident {
    /// Its index, for [`Residency::slab`].
    Ready(usize),
    /// The slab is an older version of the log than the one resident (a search holding
    /// an old snapshot): the caller scores it elsewhere rather than thrash the GPU copy.
    Stale,
}

fn key_of(slab: &Slab<'_>, row: usize, ordinal: u32) -> u32 {
    if slab.is_dead_row(row) {
        DEAD
    } else {
        slab.rank(ordinal)
    }
}

impl Residency {
    /// Shards of at most `shard_bytes` (the binding limit, or less to test sharding).
    pub fn new(shard_bytes: u64) -> Residency {
        Residency {
            slabs: Vec::new(),
            shard_bytes,
            last_upload: None,
            changes: 0,
        }
    }

    /// Changes when a shard is dropped or replaced.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The resident slab `index` (from [`Residency::sync`]).
    pub fn slab(&self, index: usize) -> &ResidentSlab {
        &self.slabs[index]
    }

    /// The last upload of a whole slab, if any.
    pub fn last_upload(&self) -> Option<Upload> {
        self.last_upload
    }

    /// Whether the shard `id` is still resident.
    pub fn holds_shard(&self, id: u64) -> bool {
        self.slabs.iter().flat_map(|s| &s.shards).any(|s| s.id == id)
    }

    /// Bytes resident on the GPU.
    pub fn bytes(&self) -> u64 {
        self.slabs
            .iter()
            .flat_map(|s| &s.shards)
            .map(|s| s.gallery.size() + s.keys.size() + s.scales.as_ref().map_or(0, |b| b.size()))
            .sum()
    }

    /// The resident copy of `slab` (its index, for [`Residency::slab`]), uploading or
    /// updating it first.
    pub fn sync(&mut self, ctx: &GpuContext, slab: &Slab<'_>) -> Result<Resident> {
        let before = self.slabs.len();
        self.slabs.retain(|s| s.alive.strong_count() > 0);
        if self.slabs.len() != before {
            self.changes += 1;
        }
        let id = slab.identity();
        let found = self.slabs.iter().position(|s| s.uid == id.uid);
        let index = match found {
            Some(i) if self.slabs[i].removals == id.removals => {
                if self.slabs[i].rows() > slab.rows() {
                    return Ok(Resident::Stale);
                }
                let shard_rows = self.shard_rows(slab.stride());
                if self.slabs[i].rows() < slab.rows() {
                    // Appended rows may replace the last shard with a larger one.
                    self.changes += 1;
                }
                let r = &mut self.slabs[i];
                let updated = ctx
                    .checked("updating the resident gallery", || r.update(ctx, slab, shard_rows))
                    .and_then(|r| r);
                if let Err(e) = updated {
                    // Half-applied: forget it; the next search uploads afresh.
                    self.slabs.swap_remove(i);
                    self.changes += 1;
                    return Err(e);
                }
                i
            }
            _ => {
                if let Some(i) = found {
                    self.slabs.swap_remove(i);
                    self.changes += 1;
                }
                let shard_rows = self.shard_rows(slab.stride());
                let started = Instant::now();
                let r = ctx.checked("uploading the gallery", || ResidentSlab::upload(ctx, slab, shard_rows))??;
                ctx.wait()?;
                self.last_upload = Some(Upload {
                    number: self.last_upload.map_or(1, |u| u.number + 1),
                    time: started.elapsed(),
                    bytes: (slab.rows() * slab.stride()) as u64,
                });
                self.slabs.push(r);
                self.slabs.len() - 1
            }
        };
        Ok(Resident::Ready(index))
    }

    /// Rows per shard: whole tiles, at least one.
    fn shard_rows(&self, stride: usize) -> usize {
        ((self.shard_bytes / stride as u64) as usize / TILE_ROWS).max(1) * TILE_ROWS
    }
}

impl ResidentSlab {
    fn upload(ctx: &GpuContext, slab: &Slab<'_>, shard_rows: usize) -> Result<ResidentSlab> {
        let id = slab.identity();
        let mut r = ResidentSlab {
            uid: id.uid,
            removals: id.removals,
            subjects: id.subjects,
            alive: id.alive,
            is_log: matches!(slab.ids(), SubjectIds::Memtable(_)),
            dtype: slab.dtype(),
            stride: slab.stride(),
            shards: Vec::new(),
            keys: Vec::with_capacity(slab.rows()),
            deleted: slab.deleted().cloned(),
            rows_per_subject: Vec::new(),
            max_rows_per_subject: slab.max_subject_rows(),
        };
        r.append(ctx, slab, shard_rows)?;
        Ok(r)
    }

    /// Bring the resident copy up to `slab` (same rows so far, maybe more, other marks).
    fn update(&mut self, ctx: &GpuContext, slab: &Slab<'_>, shard_rows: usize) -> Result<()> {
        if self.rows() < slab.rows() {
            self.append(ctx, slab, shard_rows)?;
        }
        let id = slab.identity();
        if self.is_log && id.subjects != self.subjects {
            // A new subject shifts the ranks of those after it: rewrite every key.
            self.subjects = id.subjects;
            let mut changed = false;
            for (row, key) in self.keys.iter_mut().enumerate() {
                let k = key_of(slab, row, slab.row_subjects()[row]);
                changed |= *key != k;
                *key = k;
            }
            if changed {
                self.write_keys(ctx, 0..self.rows());
            }
        }
        if let (Some(had), Some(now)) = (&self.deleted, slab.deleted()) {
            let changed = now.differing_rows(had);
            if !changed.is_empty() {
                self.apply_deletions(ctx, slab, &changed);
            }
        }
        Ok(())
    }

    /// Mark the rows deleted since the last search (only the chunks of marks that changed
    /// are looked at).
    fn apply_deletions(&mut self, ctx: &GpuContext, slab: &Slab<'_>, changed: &[std::ops::Range<usize>]) {
        let mut rewritten = 0;
        for range in changed {
            let rows = range.start.min(self.rows())..range.end.min(self.rows());
            let (mut first, mut last) = (usize::MAX, 0);
            for row in rows {
                let k = key_of(slab, row, slab.row_subjects()[row]);
                if self.keys[row] != k {
                    self.keys[row] = k;
                    first = first.min(row);
                    last = row;
                }
            }
            if first <= last {
                self.write_keys(ctx, first..last + 1);
                rewritten += last + 1 - first;
            }
        }
        self.deleted = slab.deleted().cloned();
        tracing::debug!(rows = rewritten, "GPU deletion marks updated");
    }

    /// Upload rows `rows()..slab.rows()`.
    fn append(&mut self, ctx: &GpuContext, slab: &Slab<'_>, shard_rows: usize) -> Result<()> {
        let start = self.rows();
        let end = slab.rows();
        for row in start..end {
            let ordinal = slab.row_subjects()[row];
            if self.is_log {
                let o = ordinal as usize;
                if o >= self.rows_per_subject.len() {
                    self.rows_per_subject.resize(o + 1, 0);
                }
                self.rows_per_subject[o] += 1;
                self.max_rows_per_subject = self.max_rows_per_subject.max(self.rows_per_subject[o] as usize);
            }
            self.keys.push(key_of(slab, row, ordinal));
        }
        // A segment's rows are checked against their chunk checksums as they are copied
        // (the bytes uploaded are the bytes verified).
        let mut verifier = match slab.ids() {
            SubjectIds::Segment(seg) if start == 0 => Some(seg.copy_verifier()),
            _ => None,
        };
        let mut row = start;
        while row < end {
            let needs_shard = self.shards.last().is_none_or(|s| s.rows == shard_rows);
            if needs_shard {
                let remaining = end - row;
                let capacity = if self.is_log {
                    remaining.next_power_of_two().max(LOG_SHARD_START_ROWS).min(shard_rows)
                } else {
                    remaining.min(shard_rows)
                };
                let shard = Shard::new(ctx, row, capacity, self.stride, self.dtype == Dtype::I8);
                self.shards.push(shard);
            }
            let shard = self.shards.last_mut().expect("a shard was just ensured");
            if shard.rows == shard.capacity {
                shard.grow(ctx, (shard.capacity * 2).min(shard_rows), self.stride);
            }
            let take = (shard.capacity - shard.rows).min(end - row);
            shard.write(ctx, slab, row, take, &self.keys[row..row + take], verifier.as_mut())?;
            row += take;
        }
        if let Some(v) = verifier {
            v.finish()?;
        }
        Ok(())
    }

    fn write_keys(&self, ctx: &GpuContext, range: std::ops::Range<usize>) {
        for shard in &self.shards {
            let lo = range.start.max(shard.first_row);
            let hi = range.end.min(shard.first_row + shard.rows);
            if lo < hi {
                let bytes: &[u8] = bytemuck::cast_slice(&self.keys[lo..hi]);
                ctx.queue
                    .write_buffer(&shard.keys, ((lo - shard.first_row) * 4) as u64, bytes);
            }
        }
    }
}

impl Shard {
    fn new(ctx: &GpuContext, first_row: usize, capacity: usize, stride: usize, with_scales: bool) -> Shard {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let capacity = capacity.div_ceil(TILE_ROWS) * TILE_ROWS;
        let buffer = |label: &str, bytes: usize| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        Shard {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            first_row,
            rows: 0,
            capacity,
            gallery: buffer("gallery rows", capacity * stride),
            keys: buffer("row keys", capacity * 4),
            scales: with_scales.then(|| buffer("row scales", capacity * 4)),
        }
    }

    /// Move to buffers of `capacity` rows, copying the resident rows on the GPU.
    fn grow(&mut self, ctx: &GpuContext, capacity: usize, stride: usize) {
        let bigger = Shard::new(ctx, self.first_row, capacity, stride, self.scales.is_some());
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.gallery, 0, &bigger.gallery, 0, (self.rows * stride) as u64);
        encoder.copy_buffer_to_buffer(&self.keys, 0, &bigger.keys, 0, (self.rows * 4) as u64);
        if let (Some(a), Some(b)) = (&self.scales, &bigger.scales) {
            encoder.copy_buffer_to_buffer(a, 0, b, 0, (self.rows * 4) as u64);
        }
        ctx.queue.submit([encoder.finish()]);
        *self = Shard {
            rows: self.rows,
            ..bigger
        };
    }

    /// Write slab rows `row..row + count` after the resident ones. Rows go up in whole
    /// interleaved tiles: a tile the last write left partly filled is written again.
    fn write(
        &mut self,
        ctx: &GpuContext,
        slab: &Slab<'_>,
        row: usize,
        count: usize,
        keys: &[u32],
        mut verifier: Option<&mut crate::gallery::segment::CopyVerifier<'_>>,
    ) -> Result<()> {
        let stride = slab.stride();
        let local = self.rows;
        let first_tile = local / TILE_ROWS;
        let end = row + count;
        let tile_bytes = TILE_ROWS * stride;
        let rows_per_chunk = (UPLOAD_CHUNK / tile_bytes).max(1) * TILE_ROWS;
        let mut staging = Vec::new();
        let mut at = self.first_row + first_tile * TILE_ROWS;
        let mut tile = first_tile;
        while at < end {
            let take = rows_per_chunk.min(end - at);
            let rows = slab.rows_bytes(at..at + take);
            if let Some(v) = verifier.as_deref_mut() {
                // Only the rows new to the GPU (a partial tile is written again).
                v.feed(&rows[(row.max(at) - at) * stride..])?;
            }
            interleave(rows, stride, &mut staging);
            ctx.queue
                .write_buffer(&self.gallery, (tile * tile_bytes) as u64, &staging);
            // Let the staging memory drain before queueing more.
            ctx.queue.submit([]);
            let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
            at += take;
            tile += take.div_ceil(TILE_ROWS);
        }
        ctx.queue
            .write_buffer(&self.keys, (local * 4) as u64, bytemuck::cast_slice(keys));
        if let Some(scales) = &self.scales {
            ctx.queue.write_buffer(
                scales,
                (local * 4) as u64,
                bytemuck::cast_slice(&slab.scales()[row..row + count]),
            );
        }
        self.rows += count;
        Ok(())
    }
}

/// Rows (`stride` bytes each, whole 16-byte words) in the GPU's interleaved layout:
/// tiles of [`TILE_ROWS`] rows, and within a tile word `j` of every row before word
/// `j + 1` of any. A last partial tile is padded with zero rows.
pub fn interleave(rows: &[u8], stride: usize, out: &mut Vec<u8>) {
    use rayon::prelude::*;
    let words = stride / 16;
    let count = rows.len() / stride;
    out.clear();
    out.resize(count.div_ceil(TILE_ROWS) * TILE_ROWS * stride, 0);
    out.par_chunks_mut(TILE_ROWS * stride)
        .enumerate()
        .for_each(|(t, tile)| {
            for lane in 0..TILE_ROWS.min(count - t * TILE_ROWS) {
                let src = &rows[(t * TILE_ROWS + lane) * stride..][..stride];
                for j in 0..words {
                    let dst = (j * TILE_ROWS + lane) * 16;
                    tile[dst..dst + 16].copy_from_slice(&src[j * 16..j * 16 + 16]);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn interleaving_puts_word_j_of_a_tiles_rows_together() {
        let stride = 32; // two 16-byte words per row
        let rows: Vec<u8> = (0..70 * stride).map(|i| (i / 16) as u8).collect(); // byte = global word index
        let mut out = Vec::new();
        super::interleave(&rows, stride, &mut out);
        assert_eq!(out.len(), 128 * stride, "two tiles, the second padded");
        let word = |w: usize| out[w * 16];
        assert_eq!((word(0), word(1), word(63)), (0, 2, 126), "word 0 of rows 0, 1, 63");
        assert_eq!((word(64), word(65)), (1, 3), "then word 1 of rows 0, 1");
        assert_eq!(
            (word(128), word(133), word(134)),
            (128, 138, 0),
            "tile 2: rows 64..69, then zeros"
        );
    }
}
