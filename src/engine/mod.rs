//! The search engine: validates a batch of probes, runs a backend over every slab of a
//! snapshot, merges per-slab selections into candidate lists of distinct subjects, and
//! applies the threshold.
//!
//! Data flows one way: probes -> [`EncodedProbes`] -> `Backend::search_slab` per slab
//! -> merge by subject id -> [`ProbeResult`]s.

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
#[cfg(not(feature = "gpu"))]
#[path = "gpu_absent.rs"]
pub mod gpu;
pub mod gpu_options;
pub mod kernels;
pub mod route;
pub mod topk;

use crate::error::{Error, Result};
use crate::gallery::{Slab, Snapshot};
use crate::template::{Dtype, i8_scale, normalize_rows, padded_dim, quantize_i8};
pub use route::{BackendChoice, open_engine};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
pub use topk::Hit;

/// Largest k accepted.
pub const MAX_K: usize = 1000;

/// A scoring backend. Implementations score one slab for a batch of probes and return,
/// per probe, its best `k` distinct subjects (slab-local ordinals) scoring at least
/// `floor`, best first, ordered as [`Hit::beats`] defines.
pub trait Backend: Send + Sync {
    /// Short name for logs and reports ("cpu", "gpu").
    fn name(&self) -> &'static str;
    /// See the trait docs.
    fn search_slab(&self, slab: &Slab<'_>, probes: &EncodedProbes, k: usize, floor: f32) -> Result<Vec<Vec<Hit>>>;
    /// Whether `search_slab` checks a segment's rows that were never verified against
    /// their checksums itself, answering nothing from them unless every chunk checks
    /// out (the CPU checks each chunk as it scores it, so a first search reads the rows
    /// once). Otherwise the engine verifies them before the search.
    fn verifies_rows(&self) -> bool {
        false
    }
}

/// Probes prepared for one storage dtype: normalised, zero padded to the row length,
/// and for i8 quantised (widened to i16 for the kernels) with their scales.
pub struct EncodedProbes {
    pub dtype: Dtype,
    pub count: usize,
    /// Padded components per probe (what the kernels loop over).
    pub len: usize,
    /// f32/f16 galleries: `count * len` normalised values.
    pub values: Vec<f32>,
    /// i8 galleries: `count * len` quantised values.
    pub quantized: Vec<i16>,
    /// i8 galleries: per-probe scale (1.0 otherwise).
    pub scales: Vec<f32>,
}

impl EncodedProbes {
    /// Normalise and encode `probes` (`count * dim` values) for a `dtype` gallery.
    pub fn new(dtype: Dtype, dim: usize, probes: &[f32]) -> Result<EncodedProbes> {
        let unit = normalize_rows(probes, dim, "probe")?;
        let count = unit.len() / dim;
        let len = padded_dim(dtype, dim);
        let mut out = EncodedProbes {
            dtype,
            count,
            len,
            values: Vec::new(),
            quantized: Vec::new(),
            scales: vec![1.0; count],
        };
        match dtype {
            Dtype::F32 | Dtype::F16 => {
                out.values = vec![0.0; count * len];
                for (src, dst) in unit.chunks_exact(dim).zip(out.values.chunks_exact_mut(len)) {
                    dst[..dim].copy_from_slice(src);
                }
            }
            Dtype::I8 => {
                out.quantized = vec![0; count * len];
                let mut q = vec![0i8; dim];
                for (i, (src, dst)) in unit
                    .chunks_exact(dim)
                    .zip(out.quantized.chunks_exact_mut(len))
                    .enumerate()
                {
                    let scale = i8_scale(src);
                    quantize_i8(src, scale, &mut q);
                    for (d, &v) in dst.iter_mut().zip(&q) {
                        *d = i16::from(v);
                    }
                    out.scales[i] = scale;
                }
            }
        }
        Ok(out)
    }

    /// Probe `i` for float galleries.
    pub fn float_probe(&self, i: usize) -> &[f32] {
        &self.values[i * self.len..(i + 1) * self.len]
    }
    /// Probe `i` for i8 galleries.
    pub fn i8_probe(&self, i: usize) -> &[i16] {
        &self.quantized[i * self.len..(i + 1) * self.len]
    }
}

/// What to search for.
#[derive(Clone, Copy, Debug)]
pub struct SearchParams {
    /// Candidates per probe (distinct subjects), 1..=[`MAX_K`].
    pub k: usize,
    /// Open-set decision threshold: only candidates scoring at least this are returned.
    pub threshold: Option<f32>,
}

impl SearchParams {
    /// Check k and the threshold.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 || self.k > MAX_K {
            return Err(Error::invalid(format!("k = {} is out of range 1..={MAX_K}", self.k)));
        }
        if let Some(t) = self.threshold
            && !(-1.0..=1.0).contains(&t)
        {
            return Err(Error::invalid(format!("threshold {t} is out of range [-1, 1]")));
        }
        Ok(())
    }
}

/// One entry of a candidate list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub subject: String,
    /// Cosine similarity of the subject's best template.
    pub score: f32,
}

/// The answer for one probe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeResult {
    /// With a threshold: whether any candidate reached it. Without one: no decision.
    pub matched: Option<bool>,
    /// Best first; ties by subject id ascending.
    pub candidates: Vec<Candidate>,
}

/// Routes searches to a backend and merges the results.
#[derive(Clone)]
pub struct Engine {
    backend: Arc<dyn Backend>,
    cpu: Arc<cpu::CpuBackend>,
}

impl Engine {
    /// An engine over the given backend.
    pub fn new(backend: Arc<dyn Backend>) -> Engine {
        Engine {
            backend,
            cpu: Arc::new(cpu::CpuBackend::new()),
        }
    }

    /// An engine over the CPU backend.
    pub fn cpu() -> Engine {
        Engine::new(Arc::new(cpu::CpuBackend::new()))
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// 1:1 verification: the score of `probe` against `subject`'s best live template, or
    /// `None` if the subject has none in this snapshot. Files written in place while
    /// they were read are handled as [`Engine::search`] does.
    pub fn verify(&self, snapshot: &Snapshot, probe: &[f32], subject: &str) -> Result<Option<f32>> {
        let subject = crate::template::canonical_subject_id(subject)?;
        self.until_files_unchanged(snapshot, || self.verify_once(snapshot, probe, &subject))
    }

    /// Run `read` until no segment file was written in place while it ran (a changed
    /// file is verified again in between; damage is an error).
    fn until_files_unchanged<T>(&self, snapshot: &Snapshot, mut read: impl FnMut() -> Result<T>) -> Result<T> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let answer = read()?;
            if snapshot.files_unchanged()? {
                return Ok(answer);
            }
        }
        Err(Error::Unavailable(format!(
            "segment files were written under {ATTEMPTS} reads in a row; try again"
        )))
    }

    fn verify_once(&self, snapshot: &Snapshot, probe: &[f32], subject: &str) -> Result<Option<f32>> {
        let dim = snapshot.dim();
        if probe.len() != dim {
            return Err(Error::invalid(format!(
                "probe has {} values, the gallery dimension is {dim}",
                probe.len()
            )));
        }
        let encoded = EncodedProbes::new(snapshot.dtype(), dim, probe)?;
        let now = crate::time_text::now_ms();
        if snapshot.expiry().gallery_expired(now) {
            return Err(snapshot.expiry().gallery_expired_error());
        }
        if snapshot.expiry().subject_expired(subject, now) {
            return Ok(None);
        }
        snapshot.ensure_verified()?;
        let mut best: Option<f32> = None;
        for slab in snapshot.slabs() {
            let Some(ordinal) = slab.find_subject(subject) else {
                continue;
            };
            let rows = slab.subject_rows(ordinal);
            for score in self.cpu.score_rows(&slab, &encoded, 0, &rows) {
                best = Some(best.map_or(score, |b| b.max(score)));
            }
        }
        snapshot.check_reads()?;
        Ok(best)
    }

    /// Search `probes` (row-major, `count * dim` f32 values) against `snapshot`.
    ///
    /// Before answering, the segment files are checked (a stat each) for having been
    /// written in place while they were read: a changed file is verified again (damage
    /// is refused) and the search runs again over the verified bytes, so no answer comes
    /// from bytes changed under the search once `stat` shows the change.
    pub fn search(&self, snapshot: &Snapshot, probes: &[f32], params: &SearchParams) -> Result<Vec<ProbeResult>> {
        self.until_files_unchanged(snapshot, || self.search_once(snapshot, probes, params))
    }

    fn search_once(&self, snapshot: &Snapshot, probes: &[f32], params: &SearchParams) -> Result<Vec<ProbeResult>> {
        params.validate()?;
        let dim = snapshot.dim();
        if probes.is_empty() {
            return Err(Error::invalid("the probe batch is empty"));
        }
        if !probes.len().is_multiple_of(dim) {
            return Err(Error::invalid(format!(
                "probes have {} values, not a multiple of the gallery dimension {dim}",
                probes.len()
            )));
        }
        let encoded = EncodedProbes::new(snapshot.dtype(), dim, probes)?;
        // Expired subjects are never returned: the backends are asked for as many more
        // candidates as there are expired live subjects, which are then dropped, so the
        // best k of the others are all among them (exact, on every backend).
        let now = crate::time_text::now_ms();
        if snapshot.expiry().gallery_expired(now) {
            return Err(snapshot.expiry().gallery_expired_error());
        }
        let expired: std::collections::HashSet<&str> = snapshot.expired_live(now).into_iter().collect();
        // Damaged rows never give an answer: each segment's metadata is verified before
        // anything is read, its rows before they are first scored or as they are (once;
        // see `Backend::verifies_rows`), and a read that faulted fails the search.
        snapshot.verify_metadata()?;
        if !self.backend.verifies_rows() {
            snapshot.ensure_verified()?;
        }
        let floor = params.threshold.unwrap_or(f32::NEG_INFINITY);
        let slabs = snapshot.slabs();
        let mut per_slab = Vec::with_capacity(slabs.len());
        for slab in &slabs {
            per_slab.push(
                self.backend
                    .search_slab(slab, &encoded, params.k + expired.len(), floor)?,
            );
        }
        let results = (0..encoded.count)
            .map(|q| {
                let mut best: HashMap<&str, f32> =
                    HashMap::with_capacity(per_slab.iter().map(|hits| hits[q].len()).sum());
                for (slab, hits) in slabs.iter().zip(&per_slab) {
                    for h in &hits[q] {
                        let id = slab.subject_id(h.subject);
                        if expired.contains(id) {
                            continue;
                        }
                        let e = best.entry(id).or_insert(h.score);
                        *e = e.max(h.score);
                    }
                }
                // The best k by score, then id; only they become owned strings.
                let mut merged: Vec<(&str, f32)> = best.into_iter().collect();
                let order = |a: &(&str, f32), b: &(&str, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0));
                if merged.len() > params.k {
                    merged.select_nth_unstable_by(params.k - 1, order);
                    merged.truncate(params.k);
                }
                merged.sort_unstable_by(order);
                let candidates: Vec<Candidate> = merged
                    .into_iter()
                    .map(|(subject, score)| Candidate {
                        subject: subject.to_owned(),
                        score,
                    })
                    .collect();
                ProbeResult {
                    matched: params.threshold.map(|_| !candidates.is_empty()),
                    candidates,
                }
            })
            .collect();
        snapshot.check_reads()?;
        Ok(results)
    }
}
