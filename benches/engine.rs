//! Criterion benches of the CPU engine and, when a GPU adapter exists, the GPU
//! backend, per storage dtype and batch size (time from submit to results on the host).
//!
//!     cargo bench --bench engine            (N = 200,000, d = 512, k = 10)
//!     BIOGATE_BENCH_ROWS=50000 cargo bench --bench engine
//!     BIOGATE_BENCH_BACKENDS=gpu cargo bench --bench engine     (cpu,gpu by default)
//!     cargo bench --bench engine -- expired     (subjects expired, not yet purged)

use biogate::Snapshot;
use biogate::engine::gpu::{GpuBackend, GpuOptions};
use biogate::template::Dtype;
use biogate::template::random_unit_rows;
use biogate::{Engine, SearchParams};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

fn engine(c: &mut Criterion) {
    let rows: usize = std::env::var("BIOGATE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dim = 512;
    let gallery = random_unit_rows(rows, dim, 7);
    let probes = random_unit_rows(256, dim, 8);
    let backends = std::env::var("BIOGATE_BENCH_BACKENDS").unwrap_or_else(|_| "cpu,gpu".into());
    let mut engines = Vec::new();
    if backends.split(',').any(|b| b == "cpu") {
        engines.push(("cpu", Engine::cpu()));
    }
    if backends.split(',').any(|b| b == "gpu") {
        match GpuBackend::open(GpuOptions::default()) {
            Ok(Some(gpu)) => {
                eprintln!("GPU: {}", gpu.describe());
                engines.push(("gpu", Engine::new(std::sync::Arc::new(gpu))));
            }
            Ok(None) => eprintln!("no GPU adapter: GPU benches skipped"),
            Err(e) => eprintln!("GPU benches skipped: {e}"),
        }
    }
    let params = SearchParams { k: 10, threshold: None };
    for (name, engine) in &engines {
        for dtype in Dtype::ALL {
            let snapshot = Snapshot::from_rows(&gallery, dim, dtype);
            let mut group = c.benchmark_group(format!("{name}_{dtype}_{rows}x{dim}"));
            group.sample_size(10).measurement_time(Duration::from_secs(4));
            for batch in [1, 16, 256] {
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, &batch| {
                    b.iter(|| engine.search(&snapshot, &probes[..batch * dim], &params).unwrap())
                });
            }
            group.finish();
        }
    }
}

/// Searches of a gallery on disk (20,000 subjects, d = 512, f32) holding E subjects
/// expired but not yet purged: hidden from the snapshot (what every search after the
/// server's next tick reads), and still to be dropped by the search itself (a snapshot
/// built just before they expired: the engine asks for k + E candidates).
fn expired(c: &mut Criterion) {
    use biogate::gallery::{Enrollment, Gallery};
    let (rows, dim) = (20_000, 512);
    let data = random_unit_rows(rows, dim, 9);
    let probes = random_unit_rows(16, dim, 10);
    let params = SearchParams { k: 10, threshold: None };
    let engine = Engine::cpu();
    for expired in [0usize, 100, 1000, 3000] {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), dim, Dtype::F32).unwrap();
        let batch: Vec<Enrollment> = (0..rows)
            .map(|i| Enrollment {
                subject: format!("s{i:06}"),
                templates: data[i * dim..(i + 1) * dim].to_vec(),
            })
            .collect();
        let soon = biogate::time_text::now_ms() + 1500;
        let expires: Vec<Option<i64>> = (0..rows).map(|i| (i < expired).then_some(soon)).collect();
        g.enroll_expiring(&batch, &expires).unwrap();
        g.seal_log().unwrap();
        let before = g.snapshot(); // built before they expire: the search drops them
        std::thread::sleep(Duration::from_millis(1600));
        g.hide_newly_expired();
        let hidden = g.snapshot();
        assert_eq!(hidden.live_subjects(), rows - expired);
        let mut group = c.benchmark_group(format!("expired_{expired}_of_{rows}x{dim}_f32"));
        group.sample_size(10).measurement_time(Duration::from_secs(3));
        for batch in [1, 16] {
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new("hidden", batch), &batch, |b, &batch| {
                b.iter(|| engine.search(&hidden, &probes[..batch * dim], &params).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("dropped_by_search", batch), &batch, |b, &batch| {
                b.iter(|| engine.search(&before, &probes[..batch * dim], &params).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, engine, expired);
criterion_main!(benches);
