//! `biogate bench --grpc`: the server under load on loopback. Builds a gallery, times
//! the engine alone at batch 1 and batch 256 on it, then starts the real server and
//! runs 1, 16 and 256 concurrent clients that each send single-probe Identify calls,
//! reporting throughput and p50/p99 latency beside the engine's own numbers. With a
//! watchlist, every request searches the gallery and the watchlist at once. With
//! encounters, each concurrency level runs twice, the second time with an encounter
//! context on every request (the cost of recording them).

use crate::client::{Client, ConnectOptions, remote_error};
use crate::engine::{Engine, SearchParams};
use crate::error::{Error, Result};
use crate::gallery::{Gallery, ImportOptions};
use crate::npy::MemoryImport;
use crate::server::config::Config;
use crate::template::Dtype;
use crate::template::random_unit_rows;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadRow {
    pub what: String,
    pub concurrency: usize,
    pub requests: usize,
    pub probes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Run the load benchmark on a `rows x dim` gallery of `dtype`.
pub async fn run(
    rows: usize,
    dim: usize,
    dtype: Dtype,
    concurrency: &[usize],
    seconds: f64,
    watchlist: Option<usize>,
    encounters: bool,
) -> Result<Vec<LoadRow>> {
    let dir = std::env::temp_dir().join(format!("biogate-grpc-bench-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let gallery_dir = dir.join("galleries").join("bench");
    std::fs::create_dir_all(dir.join("galleries")).map_err(|e| Error::Io {
        context: "bench dir".into(),
        source: e,
    })?;
    make_gallery(&gallery_dir, rows, dim, dtype, 7, "r")?;
    if let Some(n) = watchlist {
        make_gallery(&dir.join("galleries").join("watchlist"), n, dim, dtype, 9, "w")?;
    }
    let searches: Vec<(String, u32, Option<f32>)> = match watchlist {
        Some(_) => vec![("bench".into(), 10, None), ("watchlist".into(), 10, Some(0.5))],
        None => vec![("bench".into(), 10, None)],
    };
    let searches = Arc::new(searches);
    let probes = Arc::new(random_unit_rows(1024, dim, 8));
    let params = SearchParams { k: 10, threshold: None };
    let mut out = Vec::new();

    // The engine alone, on the same gallery.
    let snapshot = crate::gallery::open_snapshot(&gallery_dir)?;
    let engine = Engine::cpu();
    for batch in [1usize, 256] {
        engine.search(&snapshot, &probes[..batch * dim], &params)?;
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            engine.search(&snapshot, &probes[..batch * dim], &params)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        out.push(LoadRow {
            what: format!("engine batch {batch}"),
            concurrency: 1,
            requests: times.len(),
            probes_per_s: batch as f64 * 1e3 / percentile(&times, 0.5),
            p50_ms: percentile(&times, 0.5),
            p99_ms: percentile(&times, 0.99),
        });
    }
    drop(snapshot);

    // The real server on loopback.
    let config = Config::loopback(&dir);
    let server = crate::server::start(config).await?;
    let client = Client::connect(&ConnectOptions {
        addr: format!("http://{}", server.addr),
        ..Default::default()
    })
    .await?;
    let runs: &[bool] = if encounters { &[false, true] } else { &[false] };
    for (&c, &recording) in concurrency.iter().flat_map(|c| runs.iter().map(move |r| (c, r))) {
        let mut row = load(&client, &searches, &probes, dim, c, seconds, recording).await?;
        row.what = format!(
            "{}{}",
            if watchlist.is_some() {
                "grpc gallery+watchlist"
            } else {
                "grpc single-probe clients"
            },
            if recording { " + encounters" } else { "" }
        );
        out.push(row);
    }
    server.shutdown().await?;
    Ok(out)
}

/// `concurrency` clients sending single-probe Identify calls over `client`'s connection
/// for `seconds` (probes taken in turn from `probes`, 1024 of them); with `recording`,
/// each with an encounter context.
pub async fn load(
    client: &Client,
    searches: &Arc<Vec<(String, u32, Option<f32>)>>,
    probes: &Arc<Vec<f32>>,
    dim: usize,
    concurrency: usize,
    seconds: f64,
    recording: bool,
) -> Result<LoadRow> {
    let c = concurrency;
    let n_probes = probes.len() / dim;
    let warm: Vec<(&str, u32, Option<f32>)> = searches.iter().map(|(g, k, t)| (g.as_str(), *k, *t)).collect();
    // Warm up the connection and the gallery's pages.
    client
        .identify_in(&warm, &probes[..dim], dim)
        .await
        .map_err(remote_error)?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..c {
        let (client, probes, searches) = (client.clone(), probes.clone(), searches.clone());
        tasks.push(tokio::spawn(async move {
            let searches: Vec<(&str, u32, Option<f32>)> =
                searches.iter().map(|(g, k, t)| (g.as_str(), *k, *t)).collect();
            let mut latencies = Vec::new();
            let mut i = t;
            while latencies.len() < 2 || Instant::now() < deadline {
                let p = &probes[(i % n_probes) * dim..(i % n_probes + 1) * dim];
                let t0 = Instant::now();
                if recording {
                    let context = crate::server::proto::EncounterContext {
                        location: "BENCH".into(),
                        gate: format!("G{}", t % 64),
                        direction: if i % 2 == 0 { "entry" } else { "exit" }.into(),
                        device: format!("cam-{t}"),
                        capture_time: String::new(),
                    };
                    client
                        .identify_at(&searches, p, dim, context, None)
                        .await
                        .map_err(remote_error)?;
                } else if searches.len() == 1 {
                    let (g, k, threshold) = searches[0];
                    client.identify(g, p, dim, k, threshold).await.map_err(remote_error)?;
                } else {
                    client.identify_in(&searches, p, dim).await.map_err(remote_error)?;
                }
                latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                i += c;
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| Error::Internal(e.to_string()))??);
    }
    let wall = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok(LoadRow {
        what: "grpc single-probe clients".into(),
        concurrency: c,
        requests: all.len(),
        probes_per_s: all.len() as f64 / wall,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    })
}

/// Load a running server or router at `addr` (gallery `gallery`, random probes of its
/// dimension), at each of `concurrency`.
pub async fn run_against(addr: &str, gallery: &str, concurrency: &[usize], seconds: f64) -> Result<Vec<LoadRow>> {
    let client = Client::connect(&ConnectOptions {
        addr: addr.to_owned(),
        ..Default::default()
    })
    .await?;
    let info = client.get_gallery(gallery).await.map_err(remote_error)?;
    let dim = info.dim as usize;
    let probes = Arc::new(random_unit_rows(1024, dim, 8));
    let searches = Arc::new(vec![(gallery.to_owned(), 10, None)]);
    let mut out = Vec::new();
    for &c in concurrency {
        let mut row = load(&client, &searches, &probes, dim, c, seconds, false).await?;
        row.what = format!("{addr} {gallery}");
        out.push(row);
    }
    Ok(out)
}

/// The report as text.
pub fn format_table(rows: &[LoadRow]) -> String {
    let mut s = format!(
        "{:<26} {:>11} {:>9} {:>11} {:>9} {:>9}\n",
        "what", "concurrency", "requests", "probes/s", "p50 ms", "p99 ms"
    );
    for r in rows {
        s += &format!(
            "{:<26} {:>11} {:>9} {:>11.1} {:>9.2} {:>9.2}\n",
            r.what, r.concurrency, r.requests, r.probes_per_s, r.p50_ms, r.p99_ms
        );
    }
    s
}

/// An imported gallery of `rows` random unit templates, ids `{prefix}000000000`...
fn make_gallery(dir: &std::path::Path, rows: usize, dim: usize, dtype: Dtype, seed: u64, prefix: &str) -> Result<()> {
    let mut g = Gallery::create(dir, dim, dtype)?;
    let data = random_unit_rows(rows, dim, seed);
    let ids: Vec<String> = (0..rows).map(|i| format!("{prefix}{i:09}")).collect();
    g.import(
        &mut MemoryImport::new(dim, &data, &ids)?,
        ImportOptions::default(),
        &|_| {},
    )?;
    Ok(())
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
