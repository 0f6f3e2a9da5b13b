//! `biogate bench`: probes/s per dtype and batch size, or the gRPC server under load.

use super::runtime;
use biogate::bench;
use biogate::engine::BackendChoice;
use biogate::engine::open_engine;
use biogate::error::{Error, Result};
use biogate::gallery;
use biogate::npy::read_matrix;
use biogate::template::Dtype;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Gallery rows to synthesise (ignored with --gallery-npy).
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,1024")]
    batches: Vec<usize>,
    /// Storage dtypes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,i8")]
    dtypes: Vec<Dtype>,
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Bench on an existing gallery directory (its own dtype; random probes).
    #[arg(long, conflicts_with = "gallery_npy")]
    gallery: Option<PathBuf>,
    /// Bench on this gallery matrix instead (e.g. from cpu_peers.py --save).
    #[arg(long, requires = "probes_npy")]
    gallery_npy: Option<PathBuf>,
    /// Probes for --gallery-npy.
    #[arg(long)]
    probes_npy: Option<PathBuf>,
    /// Minimum seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    min_seconds: f64,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Before timing a gallery, check the backend's answers for up to 64 probes against
    /// the CPU engine's (i8: the same subjects and score bits; f32: scores within 1e-5;
    /// f16: within 2e-3) and fail on any difference.
    #[arg(long)]
    check: bool,
    /// Load-test the gRPC server on loopback instead (--rows x --dim gallery of the first
    /// --dtypes entry; concurrency levels from --concurrency).
    #[arg(long)]
    grpc: bool,
    /// Concurrent single-probe clients for --grpc.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    concurrency: Vec<usize>,
    /// With --grpc: also make a watchlist of this many subjects, and have every request
    /// search the gallery and the watchlist at once (a flight plus a watchlist).
    #[arg(long)]
    watchlist: Option<usize>,
    /// With --grpc: run each concurrency level again with an encounter context on every
    /// request (what recording encounters costs).
    #[arg(long)]
    encounters: bool,
    /// Instead: load a running server or cluster router at this address (e.g.
    /// http://127.0.0.1:50050) with single-probe Identify calls on --target-gallery, at
    /// each --concurrency.
    #[arg(long, requires = "target_gallery", conflicts_with = "grpc")]
    target: Option<String>,
    /// The gallery to search with --target.
    #[arg(long, requires = "target")]
    target_gallery: Option<String>,
    /// Instead: build an encounter database of this many encounters (a temporary
    /// directory) and time the overstay report, a history and the stats over it.
    #[arg(long)]
    encounter_reports: Option<usize>,
}

pub(crate) fn run(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.encounter_reports {
        let dir = std::env::temp_dir().join(format!("biogate-encounter-bench-{}", std::process::id()));
        let timed = biogate::encounters::bench_reports(n, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        for (what, seconds) in timed? {
            outln!("{what:<48} {seconds:>9.3} s");
        }
        return Ok(());
    }
    if let (Some(addr), Some(gallery)) = (&a.target, &a.target_gallery) {
        let rows = runtime()?.block_on(biogate::bench_grpc::run_against(
            addr,
            gallery,
            &a.concurrency,
            a.min_seconds,
        ))?;
        print_load(&rows, a.json, None)?;
        return Ok(());
    }
    if a.grpc {
        let dtype = a.dtypes.first().copied().unwrap_or(Dtype::F32);
        let rows = runtime()?.block_on(biogate::bench_grpc::run(
            a.rows,
            a.dim,
            dtype,
            &a.concurrency,
            a.min_seconds,
            a.watchlist,
            a.encounters,
        ))?;
        let header = format!(
            "gallery: {} x {} {dtype}, k = 10{}, cpu engine, {} threads",
            a.rows,
            a.dim,
            a.watchlist
                .map(|n| format!("; with a watchlist of {n} (k = 10, threshold 0.5) in every request"))
                .unwrap_or_default(),
            rayon::current_num_threads()
        );
        print_load(&rows, a.json, Some(header))?;
        return Ok(());
    }
    let (engine, gpu) = open_engine(a.backend)?;
    let device = match &gpu {
        Some(g) => format!("GPU {} (backend {})", g.describe(), a.backend),
        None => format!("CPU, {} threads", rayon::current_num_threads()),
    };
    let max_batch = a.batches.iter().copied().max().unwrap_or(1);
    let min_time = Duration::from_secs_f64(a.min_seconds);
    if let Some(dir) = &a.gallery {
        let snapshot = gallery::open_snapshot(dir)?;
        let probes = biogate::template::random_unit_rows(max_batch, snapshot.dim(), 8);
        let rows = bench::run(&engine, gpu.as_deref(), &snapshot, &probes, &a.batches, a.k, min_time)?;
        if a.check {
            eprintln!("{}", bench::check_against_cpu(&engine, &snapshot, &probes, a.k)?);
        }
        print_header(&device, a.json)?;
        return print_rows(&rows, a.json);
    }
    let (gallery, probes, dim) = match (&a.gallery_npy, &a.probes_npy) {
        (Some(g), Some(p)) => {
            let (_, dim, gallery) = read_matrix(g)?;
            let (_, pdim, probes) = read_matrix(p)?;
            if pdim != dim {
                return Err(Error::invalid("gallery and probes have different dimensions"));
            }
            (gallery, probes, dim)
        }
        _ => (
            biogate::template::random_unit_rows(a.rows, a.dim, 7),
            biogate::template::random_unit_rows(max_batch, a.dim, 8),
            a.dim,
        ),
    };
    // Each dtype's rows are printed as soon as they are measured (a run cut short keeps
    // them), after its check against the CPU engine.
    print_header(&device, a.json)?;
    for &dtype in &a.dtypes {
        let snapshot = biogate::Snapshot::from_rows(&gallery, dim, dtype);
        if a.check {
            eprintln!("{}", bench::check_against_cpu(&engine, &snapshot, &probes, a.k)?);
        }
        let rows = bench::run(&engine, gpu.as_deref(), &snapshot, &probes, &a.batches, a.k, min_time)?;
        print_rows(&rows, a.json)?;
    }
    Ok(())
}

fn print_rows(rows: &[bench::BenchRow], json: bool) -> Result<()> {
    if json {
        for r in rows {
            outln!("{}", serde_json::to_string(r).expect("serialises"));
        }
    } else {
        for r in rows {
            out!("{}", bench::table_row(r));
        }
    }
    Ok(())
}

/// The device and the table's header (nothing for JSON, one object per row).
fn print_header(device: &str, json: bool) -> Result<()> {
    if !json {
        outln!("device: {device}");
        out!("{}", bench::table_header());
    }
    Ok(())
}

/// A load benchmark's rows: JSON lines, or a table under `header`.
fn print_load(rows: &[biogate::bench_grpc::LoadRow], json: bool, header: Option<String>) -> Result<()> {
    if json {
        for r in rows {
            outln!("{}", serde_json::to_string(r).expect("serialises"));
        }
    } else {
        if let Some(h) = header {
            outln!("{h}");
        }
        out!("{}", biogate::bench_grpc::format_table(rows));
    }
    Ok(())
}
