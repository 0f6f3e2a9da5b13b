//! The CPU backend: exact, multi-threaded (rayon), SIMD where the CPU has it, and
//! batch-aware. The gallery is walked in cache-sized blocks of rows; every probe of the
//! batch is scored against a block while it is hot in cache, four probes per pass,
//! so a batch costs far less than its probes one at a time. A segment searched for the
//! first time is checked against its checksums in the same pass, chunk by chunk, and
//! answers only if every chunk checks out. It is also the oracle the GPU backend is
//! tested against.

use super::kernels::{Isa, tile_f16, tile_f32, tile_i8};
use super::topk::{Hit, TopSubjects};
use super::{Backend, EncodedProbes};
use crate::error::Result;
use crate::gallery::segment::Segment;
use crate::gallery::{Slab, SubjectIds};
use crate::template::{Dtype, i8_score};
use rayon::prelude::*;

/// Bytes of gallery rows scored as one block (sized for a core's L2 cache).
const BLOCK_BYTES: usize = 192 * 1024;
/// Probes per register tile.
const PROBE_GROUP: usize = 4;

/// Exact search on the CPU.
pub struct CpuBackend {
    isa: Isa,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    /// The fastest kernels this CPU supports.
    pub fn new() -> CpuBackend {
        CpuBackend { isa: Isa::detect() }
    }

    /// Force the portable kernels (tests compare them with the SIMD ones).
    pub fn portable() -> CpuBackend {
        CpuBackend { isa: Isa::Portable }
    }

    /// Which kernels are in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Score every probe against rows `start..end` of `slab` and offer the scores.
    fn scan_block(
        &self,
        slab: &Slab<'_>,
        probes: &EncodedProbes,
        start: usize,
        end: usize,
        tops: &mut [TopSubjects],
        scratch: &mut Scratch,
    ) {
        let n = end - start;
        let bytes = slab.rows_bytes(start..end);
        let subjects = &slab.row_subjects()[start..end];
        let scales = &slab.scales()[start..end];
        for g in (0..probes.count).step_by(PROBE_GROUP) {
            let group = g..(g + PROBE_GROUP).min(probes.count);
            let m = group.len();
            scratch.scores.resize(m * n, 0.0);
            match slab.dtype() {
                Dtype::F32 => {
                    let rows: &[f32] = bytemuck::cast_slice(bytes);
                    let p: [&[f32]; PROBE_GROUP] =
                        std::array::from_fn(|j| probes.float_probe(group.start + j.min(m - 1)));
                    tile_f32(self.isa, &p[..m], rows, probes.len, &mut scratch.scores);
                }
                Dtype::F16 => {
                    let rows: &[half::f16] = bytemuck::cast_slice(bytes);
                    let p: [&[f32]; PROBE_GROUP] =
                        std::array::from_fn(|j| probes.float_probe(group.start + j.min(m - 1)));
                    tile_f16(self.isa, &p[..m], rows, probes.len, &mut scratch.scores);
                }
                Dtype::I8 => {
                    let rows: &[i8] = bytemuck::cast_slice(bytes);
                    let p: [&[i16]; PROBE_GROUP] = std::array::from_fn(|j| probes.i8_probe(group.start + j.min(m - 1)));
                    scratch.raw.resize(m * n, 0);
                    tile_i8(self.isa, &p[..m], rows, probes.len, &mut scratch.raw);
                    for (j, q) in group.clone().enumerate() {
                        let ps = probes.scales[q];
                        let raw = &scratch.raw[j * n..(j + 1) * n];
                        for ((out, &raw), &rs) in scratch.scores[j * n..(j + 1) * n].iter_mut().zip(raw).zip(scales) {
                            *out = i8_score(raw, ps, rs);
                        }
                    }
                }
            }
            for (j, q) in group.enumerate() {
                let top = &mut tops[q];
                for (r, &score) in scratch.scores[j * n..(j + 1) * n].iter().enumerate() {
                    if score >= top.bar() {
                        let subject = subjects[r];
                        if !slab.is_dead_row(start + r) {
                            top.offer(score, subject, slab.rank(subject));
                        }
                    }
                }
            }
        }
    }
}

impl CpuBackend {
    /// As the plain scan, over a segment whose rows were never verified: in parallel
    /// over its checksummed chunks, each chunk hashed block by block just before the
    /// block is scored (its bytes are then read from memory once). `None` if a chunk's
    /// checksum does not match: then nothing scored is used.
    fn scan_verifying(
        &self,
        slab: &Slab<'_>,
        segment: &Segment,
        probes: &EncodedProbes,
        k: usize,
        floor: f32,
    ) -> Option<Vec<TopSubjects>> {
        let rows = slab.rows();
        let chunk = (segment.chunk_rows() as usize).max(1);
        let block = (BLOCK_BYTES / slab.stride()).clamp(4, chunk.max(4));
        let fresh = || vec![TopSubjects::new(k, floor); probes.count];
        (0..rows.div_ceil(chunk))
            .into_par_iter()
            .try_fold(
                || (fresh(), Scratch::default()),
                |(mut tops, mut scratch), c| {
                    let (first, end) = (c * chunk, ((c + 1) * chunk).min(rows));
                    let mut crc = crc32fast::Hasher::new();
                    for start in (first..end).step_by(block) {
                        let stop = (start + block).min(end);
                        crc.update(slab.rows_bytes(start..stop));
                        self.scan_block(slab, probes, start, stop, &mut tops, &mut scratch);
                    }
                    segment
                        .chunk_checks_out(c as u64, crc.finalize())
                        .then_some((tops, scratch))
                },
            )
            .map(|done| done.map(|(tops, _)| tops))
            .try_reduce(fresh, |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    x.merge(y);
                }
                Some(a)
            })
    }

    /// Score one probe against the given rows of a slab with the same kernels a search
    /// uses, so that 1:1 verification agrees bit for bit with identification.
    pub fn score_rows(&self, slab: &Slab<'_>, probes: &EncodedProbes, probe: usize, rows: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows.len());
        let mut one = [0.0f32];
        for &r in rows {
            let bytes = slab.row(r);
            match slab.dtype() {
                Dtype::F32 => tile_f32(
                    self.isa,
                    &[probes.float_probe(probe)],
                    bytemuck::cast_slice(bytes),
                    probes.len,
                    &mut one,
                ),
                Dtype::F16 => tile_f16(
                    self.isa,
                    &[probes.float_probe(probe)],
                    bytemuck::cast_slice(bytes),
                    probes.len,
                    &mut one,
                ),
                Dtype::I8 => {
                    let mut raw = [0i32];
                    tile_i8(
                        self.isa,
                        &[probes.i8_probe(probe)],
                        bytemuck::cast_slice(bytes),
                        probes.len,
                        &mut raw,
                    );
                    one[0] = i8_score(raw[0], probes.scales[probe], slab.scales()[r]);
                }
            }
            out.push(one[0]);
        }
        out
    }
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    raw: Vec<i32>,
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn search_slab(&self, slab: &Slab<'_>, probes: &EncodedProbes, k: usize, floor: f32) -> Result<Vec<Vec<Hit>>> {
        if let SubjectIds::Segment(segment) = slab.ids()
            && segment.rows_unverified()
        {
            segment.verify_metadata()?;
            if let Some(tops) = self.scan_verifying(slab, segment, probes, k, floor) {
                segment.rows_checked_by_search()?;
                return Ok(tops.into_iter().map(TopSubjects::into_sorted).collect());
            }
            // A chunk did not check out: nothing scored is used. Verifying the whole
            // segment names the first bad chunk and keeps it as the damage; should it
            // pass (the bytes changed under the scan), the rows are scanned again.
            segment.ensure_verified()?;
        }
        let rows = slab.rows();
        let block = (BLOCK_BYTES / slab.stride()).max(4);
        let blocks = rows.div_ceil(block);
        let fresh = || vec![TopSubjects::new(k, floor); probes.count];
        let tops = (0..blocks)
            .into_par_iter()
            .fold(
                || (fresh(), Scratch::default()),
                |(mut tops, mut scratch), b| {
                    let start = b * block;
                    self.scan_block(slab, probes, start, (start + block).min(rows), &mut tops, &mut scratch);
                    (tops, scratch)
                },
            )
            .map(|(tops, _)| tops)
            .reduce(fresh, |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    x.merge(y);
                }
                a
            });
        Ok(tops.into_iter().map(TopSubjects::into_sorted).collect())
    }

    fn verifies_rows(&self) -> bool {
        true
    }
}
