//! Criterion benches of the CPU engine and, when a GPU adapter exists, the GPU
//! backend, per storage dtype and batch size (time from submit to results on the host).
//!
//!     cargo bench --bench engine            (N = 200,000, d = 512, k = 10)
//!     BIOGATE_BENCH_ROWS=50000 cargo bench --bench engine
//!     BIOGATE_BENCH_BACKENDS=gpu cargo bench --bench engine     (cpu,gpu by default)

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

criterion_group!(benches, engine);
criterion_main!(benches);
