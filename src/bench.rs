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
    /// GPU time of the search kernels of the median batch (TIMESTAMP_QUERY), if known.
    pub kernel_ms: Option<f64>,
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
        engine.search(snapshot, q, &params)?; // warm-up: page in the gallery
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || (start.elapsed() < min_time && times.len() < 1000) {
            let t = Instant::now();
            engine.search(snapshot, q, &params)?;
            let kernel = gpu.and_then(|g| g.last_kernel_time()).map(|d| d.as_secs_f64() * 1e3);
            times.push((t.elapsed().as_secs_f64(), kernel));
        }
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (median, kernel_ms) = times[times.len() / 2];
        let bytes = (rows * row_stride(snapshot.dtype(), dim)) as f64;
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
            tera_ops_per_s: 2.0 * (rows * dim * batch) as f64 / median / 1e12,
            kernel_ms,
        });
    }
    Ok(out)
}

/// The table as text.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<7} {:<5} {:>10} {:>5} {:>6} {:>12} {:>14} {:>12} {:>8} {:>10}\n",
        "backend", "dtype", "rows", "dim", "batch", "batch ms", "probes/s", "gallery GB/s", "TOP/s", "kernel ms"
    );
    for r in rows {
        let kernel = r.kernel_ms.map_or("-".to_owned(), |k| format!("{k:.3}"));
        s += &format!(
            "{:<7} {:<5} {:>10} {:>5} {:>6} {:>12.3} {:>14.1} {:>12.2} {:>8.3} {:>10}\n",
            r.backend,
            r.dtype,
            r.rows,
            r.dim,
            r.batch,
            r.batch_ms,
            r.probes_per_s,
            r.gallery_gb_per_s,
            r.tera_ops_per_s,
            kernel
        );
    }
    s
}
