//! `biogate bench`: probes/s and gallery GB/s per dtype and batch size, measured on a
//! gallery held in memory (random unit vectors, or a given .npy such as the one
//! `scripts/cpu_peers.py --make` writes, so peers are timed on the same data).

use crate::engine::gpu::GpuBackend;
use crate::engine::{Engine, SearchParams};
use crate::error::{Error, Result};
use crate::gallery::Snapshot;
use crate::template::{Dtype, row_stride};

use serde::Serialize;
use std::time::{Duration, Instant};

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub backend: String,
    pub dtype: Dtype,
    pub rows: usize,
    pub dim: usize,
    pub batch: usize,
    pub k: usize,
    /// Median wall time of one batch, from submit to results on the host.
    pub batch_ms: f64,
    pub probes_per_s: f64,
    /// Gallery bytes scanned per second (one pass per batch).
    pub gallery_gb_per_s: f64,
    /// Multiply-adds x 2 per second, in tera (TOP/s for i8).
    pub tera_ops_per_s: f64,
    /// GPU time of the median batch's scan and merge passes (TIMESTAMP_QUERY), if known.
    pub scan_ms: Option<f64>,
    pub merge_ms: Option<f64>,
    /// Gallery bytes the scan pass reads per second of its own time (one pass).
    pub scan_gb_per_s: Option<f64>,
    /// The scan pass's multiply-adds x 2 per second of its own time, in tera.
    pub scan_tera_ops_per_s: Option<f64>,
    /// GPU: the gallery's upload (the first search's extra cost), if it happened here.
    pub upload_ms: Option<f64>,
    pub upload_gb_per_s: Option<f64>,
    /// Which GPU kernels searched the batches (KernelTimes::path).
    pub path: Option<&'static str>,
}

/// Time `engine` on `snapshot` for each batch size; every batch is repeated until
/// `min_time` has passed (at least 3 times) and the median is reported. With `gpu`
/// (the engine's GPU), the kernels' own time is reported too.
pub fn run(
    engine: &Engine,
    gpu: Option<&GpuBackend>,
    snapshot: &Snapshot,
    probes: &[f32],
    batches: &[usize],
    k: usize,
    min_time: Duration,
) -> Result<Vec<BenchRow>> {
    let dim = snapshot.dim();
    let rows: usize = snapshot.slabs().iter().map(|s| s.rows()).sum();
    let params = SearchParams { k, threshold: None };
    let mut out = Vec::new();
    for &batch in batches {
        if batch * dim > probes.len() {
            return Err(Error::invalid(format!(
                "batch {batch} needs more probes than the {} given",
                probes.len() / dim
            )));
        }
        let q = &probes[..batch * dim];
        let before = gpu.and_then(|g| g.last_upload()).map(|u| u.number);
        engine.search(snapshot, q, &params)?; // warm-up: page in (and upload) the gallery
        let upload = gpu.and_then(|g| g.last_upload()).filter(|u| Some(u.number) != before);
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || (start.elapsed() < min_time && times.len() < 1000) {
            let t = Instant::now();
            engine.search(snapshot, q, &params)?;
            let kernels = gpu.and_then(|g| g.last_kernel_times());
            times.push((t.elapsed().as_secs_f64(), kernels));
        }
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (median, kernels) = times[times.len() / 2];
        let bytes = (rows * row_stride(snapshot.dtype(), dim)) as f64;
        let ops = 2.0 * (rows * dim * batch) as f64;
        let scan = kernels.map(|k| k.scan.as_secs_f64()).filter(|&s| s > 0.0);
        let merge = kernels.map(|k| k.merge.as_secs_f64()).filter(|&s| s > 0.0);
        out.push(BenchRow {
            backend: engine.backend_name().to_owned(),
            dtype: snapshot.dtype(),
            rows,
            dim,
            batch,
            k,
            batch_ms: median * 1e3,
            probes_per_s: batch as f64 / median,
            gallery_gb_per_s: bytes / median / 1e9,
            tera_ops_per_s: ops / median / 1e12,
            scan_ms: scan.map(|s| s * 1e3),
            merge_ms: merge.map(|m| m * 1e3),
            scan_gb_per_s: scan.map(|s| bytes / s / 1e9),
            scan_tera_ops_per_s: scan.map(|s| ops / s / 1e12),
            upload_ms: upload.map(|u| u.time.as_secs_f64() * 1e3),
            upload_gb_per_s: upload.map(|u| u.bytes as f64 / u.time.as_secs_f64() / 1e9),
            path: kernels.map(|k| k.path),
        });
    }
    Ok(out)
}

/// Compare `engine`'s answers for the first 64 probes (at most) with the CPU engine's:
/// i8 the same subjects and score bits, floats scores within the dtype's tolerance
/// (1e-5 for f32, 2e-3 for f16) rank by rank, and the same subjects except where
/// rounding swapped a near tie. Says what was compared, or fails naming the probe and
/// rank that differ.
pub fn check_against_cpu(engine: &Engine, snapshot: &Snapshot, probes: &[f32], k: usize) -> Result<String> {
    let dim = snapshot.dim();
    let count = (probes.len() / dim).min(64);
    let probes = &probes[..count * dim];
    let params = SearchParams { k, threshold: None };
    let got = engine.search(snapshot, probes, &params)?;
    let want = Engine::cpu().search(snapshot, probes, &params)?;
    let dtype = snapshot.dtype();
    let tolerance = match dtype {
        Dtype::I8 => 0.0,
        Dtype::F32 => 1e-5,
        Dtype::F16 => 2e-3,
    };
    let (mut worst, mut swaps) = (0.0f32, 0);
    for (q, (a, b)) in got.iter().zip(&want).enumerate() {
        if a.candidates.len() != b.candidates.len() {
            return Err(Error::Internal(format!(
                "check failed: probe {q} has {} candidates on {}, {} on the CPU",
                a.candidates.len(),
                engine.backend_name(),
                b.candidates.len()
            )));
        }
        for (rank, (x, y)) in a.candidates.iter().zip(&b.candidates).enumerate() {
            let diff = (x.score - y.score).abs();
            worst = worst.max(diff);
            let exact = x.subject == y.subject && x.score.to_bits() == y.score.to_bits();
            let near_tie = || {
                b.candidates
                    .iter()
                    .any(|c| c.subject == x.subject && (c.score - x.score).abs() <= 2.0 * tolerance)
                    || b.candidates
                        .last()
                        .is_some_and(|c| (c.score - x.score).abs() <= 2.0 * tolerance)
            };
            let ok = match dtype {
                Dtype::I8 => exact,
                _ => diff <= tolerance && (x.subject == y.subject || near_tie()),
            };
            if !ok {
                return Err(Error::Internal(format!(
                    "check failed: probe {q}, rank {rank}: {} answered {:?} {}, the CPU {:?} {}",
                    engine.backend_name(),
                    x.subject,
                    x.score,
                    y.subject,
                    y.score
                )));
            }
            swaps += usize::from(x.subject != y.subject);
        }
    }
    Ok(format!(
        "check: {dtype}, {count} probes, k = {k}: the same answers as the CPU engine (largest score difference {worst:.2e}, {swaps} near ties in another order)"
    ))
}

/// The table's header line. The GPU's own columns (from timestamp queries): the scan
/// and merge passes' time, what the scan achieved (GB/s of gallery, TOP/s), the
/// gallery's upload before the first search, and the kernels that ran.
pub fn table_header() -> String {
    format!(
        "{:<7} {:<5} {:>10} {:>5} {:>6} {:>10} {:>12} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>10}  {}\n",
        "backend",
        "dtype",
        "rows",
        "dim",
        "batch",
        "batch ms",
        "probes/s",
        "GB/s",
        "TOP/s",
        "scan ms",
        "merge ms",
        "scan GB/s",
        "scan TOP/s",
        "upload ms",
        "path"
    )
}

/// One row of the table under [`table_header`].
pub fn table_row(r: &BenchRow) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    format!(
        "{:<7} {:<5} {:>10} {:>5} {:>6} {:>10.3} {:>12.1} {:>8.2} {:>7.3} {:>8} {:>8} {:>8} {:>8} {:>10}  {}\n",
        r.backend,
        r.dtype,
        r.rows,
        r.dim,
        r.batch,
        r.batch_ms,
        r.probes_per_s,
        r.gallery_gb_per_s,
        r.tera_ops_per_s,
        opt(r.scan_ms, 3),
        opt(r.merge_ms, 3),
        opt(r.scan_gb_per_s, 1),
        opt(r.scan_tera_ops_per_s, 2),
        opt(r.upload_ms, 1),
        r.path.unwrap_or("-"),
    )
}
