//! Identity-structured synthetic templates that behave like face embeddings.
//!
//! Each subject is a random unit centre `c`; each sample is `normalise(c + e)` with
//! `e ~ N(0, r^2/d I)` and `r^2` drawn per sample from [0.25, 0.67]. Two samples of
//! one subject then have cosine about `1/(1+r^2)`, i.e. 0.6-0.8 (mated), and samples
//! of different subjects about 0 +- 1/sqrt(d) (0.044 at d = 512) (non-mated).
//! Every row comes from its own seeded generator, so data is reproducible and can be
//! produced in parallel and streamed to disk.

use crate::error::{Error, Result};
use crate::npy::{NpyMatrixWriter, write_ids};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::path::Path;

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct SynthSpec {
    pub subjects: usize,
    pub samples: usize,
    pub dim: usize,
    /// Mated probes and, separately, non-mated probes.
    pub probes: usize,
    pub seed: u64,
}

/// Generated data held in memory (for demos and tests; `write_dir` streams instead).
pub struct SynthData {
    pub dim: usize,
    pub gallery: Vec<f32>,
    pub gallery_ids: Vec<String>,
    pub mated: Vec<f32>,
    pub mated_ids: Vec<String>,
    pub nonmated: Vec<f32>,
}

/// The id of synthetic subject `s`.
pub fn subject_id(s: usize) -> String {
    format!("subject-{s:08}")
}

fn rng_for(seed: u64, stream: u64, a: u64, b: u64) -> SmallRng {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for x in [stream, a, b] {
        h = (h ^ x).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    SmallRng::seed_from_u64(h)
}

fn centre(spec: &SynthSpec, s: usize, out: &mut [f32]) {
    let mut rng = rng_for(spec.seed, 1, s as u64, 0);
    for x in out.iter_mut() {
        *x = rng.sample(StandardNormal);
    }
    normalise(out);
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let inv = (1.0 / n.max(1e-30)) as f32;
    v.iter_mut().for_each(|x| *x *= inv);
}

/// Sample `j` of subject `s` (j >= spec.samples gives fresh, never-enrolled captures).
fn sample(spec: &SynthSpec, s: usize, j: usize, out: &mut [f32]) {
    centre(spec, s, out);
    let mut rng = rng_for(spec.seed, 2, s as u64, j as u64);
    let r2: f32 = rng.random_range(0.25..0.67);
    let sigma = (r2 / spec.dim as f32).sqrt();
    for x in out.iter_mut() {
        let e: f32 = rng.sample(StandardNormal);
        *x += sigma * e;
    }
    normalise(out);
}

fn check(spec: &SynthSpec) -> Result<()> {
    crate::template::check_dim(spec.dim)?;
    if spec.subjects == 0 || spec.samples == 0 {
        return Err(Error::invalid("synth needs at least one subject and one sample"));
    }
    Ok(())
}

fn gallery_rows(spec: &SynthSpec, first: usize, count: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; count * spec.dim];
    out.par_chunks_exact_mut(spec.dim).enumerate().for_each(|(i, row)| {
        let r = first + i;
        sample(spec, r / spec.samples, r % spec.samples, row);
    });
    out
}

fn mated_subject(spec: &SynthSpec, i: usize) -> usize {
    rng_for(spec.seed, 3, i as u64, 0).random_range(0..spec.subjects)
}

fn mated_rows(spec: &SynthSpec) -> (Vec<f32>, Vec<String>) {
    let mut out = vec![0.0f32; spec.probes * spec.dim];
    out.par_chunks_exact_mut(spec.dim).enumerate().for_each(|(i, row)| {
        sample(spec, mated_subject(spec, i), spec.samples + i, row);
    });
    let ids = (0..spec.probes).map(|i| subject_id(mated_subject(spec, i))).collect();
    (out, ids)
}

fn nonmated_rows(spec: &SynthSpec) -> Vec<f32> {
    let mut out = vec![0.0f32; spec.probes * spec.dim];
    out.par_chunks_exact_mut(spec.dim).enumerate().for_each(|(i, row)| {
        sample(spec, spec.subjects + i, 0, row);
    });
    out
}

/// Generate everything in memory.
pub fn generate(spec: &SynthSpec) -> Result<SynthData> {
    check(spec)?;
    let rows = spec.subjects * spec.samples;
    let (mated, mated_ids) = mated_rows(spec);
    Ok(SynthData {
        dim: spec.dim,
        gallery: gallery_rows(spec, 0, rows),
        gallery_ids: (0..rows).map(|r| subject_id(r / spec.samples)).collect(),
        mated,
        mated_ids,
        nonmated: nonmated_rows(spec),
    })
}

/// Write DIR/gallery.npy, gallery_ids.txt, mated.npy, mated_ids.txt, nonmated.npy,
/// streaming the gallery in chunks.
pub fn write_dir(spec: &SynthSpec, dir: &Path, progress: &dyn Fn(u64)) -> Result<()> {
    use crate::error::IoContext;
    check(spec)?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let rows = spec.subjects * spec.samples;
    let mut w = NpyMatrixWriter::create(&dir.join("gallery.npy"), rows as u64, spec.dim)?;
    let chunk = 16384;
    for first in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - first);
        w.write(&gallery_rows(spec, first, n))?;
        progress((first + n) as u64);
    }
    w.finish()?;
    let ids: Vec<String> = (0..rows).map(|r| subject_id(r / spec.samples)).collect();
    write_ids(&dir.join("gallery_ids.txt"), &ids)?;
    let (mated, mated_ids) = mated_rows(spec);
    let mut w = NpyMatrixWriter::create(&dir.join("mated.npy"), spec.probes as u64, spec.dim)?;
    w.write(&mated)?;
    w.finish()?;
    write_ids(&dir.join("mated_ids.txt"), &mated_ids)?;
    let mut w = NpyMatrixWriter::create(&dir.join("nonmated.npy"), spec.probes as u64, spec.dim)?;
    w.write(&nonmated_rows(spec))?;
    w.finish()
}
