//! `biogate demo`: the main job on an embedded default, no setup.

use super::{engine_for, runtime};
use biogate::engine::{BackendChoice, SearchParams};
use biogate::error::{Error, Result};
use biogate::gallery::{Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::server::config::Config;
use biogate::synth::{SynthSpec, generate};
use biogate::template::Dtype;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Enrolled subjects.
    #[arg(long, default_value_t = 5000)]
    subjects: usize,
    /// Template dimension.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Storage dtype of the demo gallery.
    #[arg(long, value_enum, default_value_t = Dtype::I8)]
    dtype: Dtype,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    let spec = SynthSpec {
        subjects: a.subjects,
        samples: 2,
        dim: a.dim,
        probes: 500,
        seed: 42,
        difficulty: biogate::synth::Difficulty::Realistic,
    };
    println!(
        "biogate demo: {} subjects x {} templates, d = {}, dtype {}, {} synthetic data",
        spec.subjects, spec.samples, spec.dim, a.dtype, spec.difficulty
    );
    let data = generate(&spec)?;
    let data_dir = std::env::temp_dir().join(format!("biogate-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(data_dir.clone());
    let dir = data_dir.join("galleries").join("demo");
    let mut g = Gallery::create(&dir, spec.dim, a.dtype)?;
    let t = Instant::now();
    let mut source = MemoryImport::new(spec.dim, &data.gallery, &data.gallery_ids)?;
    let report = g.import(&mut source, ImportOptions::default(), &|_| {})?;
    println!(
        "enrolled {} templates in {:.1} ms (gallery at {})",
        report.rows,
        t.elapsed().as_secs_f64() * 1e3,
        dir.display()
    );
    let snapshot = g.snapshot();
    let engine = engine_for(a.backend)?;

    let k = 5;
    let t = Instant::now();
    let mated = engine.search(&snapshot, &data.mated, &SearchParams { k, threshold: None })?;
    let mated_s = t.elapsed().as_secs_f64();
    let nonmated = engine.search(&snapshot, &data.nonmated, &SearchParams { k: 1, threshold: None })?;
    let rank1 = mated
        .iter()
        .zip(&data.mated_ids)
        .filter(|(r, id)| r.candidates.first().is_some_and(|c| &c.subject == *id))
        .count();
    let rankk = mated
        .iter()
        .zip(&data.mated_ids)
        .filter(|(r, id)| r.candidates.iter().any(|c| &c.subject == *id))
        .count();
    let n = data.mated_ids.len() as f64;
    println!(
        "closed-set: rank-1 {:.1}%, rank-{k} {:.1}% of {} mated probes",
        100.0 * rank1 as f64 / n,
        100.0 * rankk as f64 / n,
        n
    );

    let threshold = 0.4;
    let false_matches = nonmated.iter().filter(|r| r.candidates[0].score >= threshold).count();
    let misses = mated
        .iter()
        .zip(&data.mated_ids)
        .filter(|(r, id)| {
            !r.candidates
                .first()
                .is_some_and(|c| &c.subject == *id && c.score >= threshold)
        })
        .count();
    println!(
        "open-set at threshold {threshold}: FNIR {:.2}% (mated probes not matched to their subject), FPIR {:.2}% (non-mated probes matched)",
        100.0 * misses as f64 / n,
        100.0 * false_matches as f64 / nonmated.len() as f64
    );
    let one = &data.mated[..spec.dim];
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        engine.search(&snapshot, one, &SearchParams { k, threshold: None })?;
    }
    let single = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "speed ({}, {} CPU threads): one probe in {:.2} ms; a batch of {} probes at {:.0} probes/s",
        engine.backend_name(),
        rayon::current_num_threads(),
        single * 1e3,
        data.mated_ids.len(),
        n / mated_s
    );
    if rank1 as f64 / n < 0.95 {
        return Err(Error::invalid("demo accuracy is unexpectedly low"));
    }
    drop(g);
    runtime()?.block_on(demo_over_grpc(&data_dir, &data, k))
}

/// The same gallery served over gRPC on loopback: identify through a real client.
async fn demo_over_grpc(data_dir: &std::path::Path, data: &biogate::synth::SynthData, k: usize) -> Result<()> {
    use biogate::client::{Client, ConnectOptions};
    let config = Config::loopback(data_dir);
    let server = biogate::server::start(config).await?;
    let client = Client::connect(&ConnectOptions {
        addr: format!("http://{}", server.addr),
        ..Default::default()
    })
    .await?;
    let dim = data.dim;
    let t = Instant::now();
    let mut right = 0;
    let mut tasks = Vec::new();
    for i in 0..data.mated_ids.len() {
        let (client, probe) = (client.clone(), data.mated[i * dim..(i + 1) * dim].to_vec());
        tasks.push(tokio::spawn(async move {
            client
                .identify("demo", &probe, dim, k as u32, Some(0.4))
                .await
                .map_err(biogate::client::remote_error)
        }));
    }
    for (t, id) in tasks.into_iter().zip(&data.mated_ids) {
        let r = t.await.map_err(|e| Error::Internal(e.to_string()))??;
        right += usize::from(r[0].matched && r[0].candidates.first().is_some_and(|c| &c.subject == id));
    }
    let wall = t.elapsed().as_secs_f64();
    let one = Instant::now();
    client
        .identify("demo", &data.mated[..dim], dim, k as u32, Some(0.4))
        .await
        .map_err(biogate::client::remote_error)?;
    println!(
        "over gRPC (server on {}): {} concurrent single-probe requests, {right} matched to their subject, {:.0} probes/s; one request {:.2} ms",
        server.addr,
        data.mated_ids.len(),
        data.mated_ids.len() as f64 / wall,
        one.elapsed().as_secs_f64() * 1e3
    );
    println!("to serve your own galleries: biogate serve   (then: biogate client galleries)");
    server.shutdown().await
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
