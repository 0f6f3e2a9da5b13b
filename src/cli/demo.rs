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
    outln!(
        "biogate demo: {} subjects x {} templates, d = {}, dtype {}, {} synthetic data",
        spec.subjects,
        spec.samples,
        spec.dim,
        a.dtype,
        spec.difficulty
    );
    let data = generate(&spec)?;
    let data_dir = std::env::temp_dir().join(format!("biogate-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(data_dir.clone());
    let dir = data_dir.join("galleries").join("demo");
    let mut g = Gallery::create(&dir, spec.dim, a.dtype)?;
    let t = Instant::now();
    let mut source = MemoryImport::new(spec.dim, &data.gallery, &data.gallery_ids)?;
    let report = g.import(&mut source, ImportOptions::default(), &|_| {})?;
    outln!(
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
    outln!(
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
    outln!(
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
    outln!(
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
    // The border day's travellers: mated probes matched to their own subject at the
    // threshold (a probe the matcher misses would make a traveller who never entered),
    // one per subject.
    let mut seen = std::collections::HashSet::new();
    let travellers: Vec<usize> = mated
        .iter()
        .zip(&data.mated_ids)
        .enumerate()
        .filter(|(_, (r, id))| {
            r.candidates
                .first()
                .is_some_and(|c| &c.subject == *id && c.score >= threshold)
        })
        .filter(|(_, (_, id))| seen.insert(id.as_str()))
        .map(|(i, _)| i)
        .take(400)
        .collect();
    drop(g);
    runtime()?.block_on(demo_over_grpc(&data_dir, &data, k, &travellers))
}

/// The same gallery served over gRPC on loopback: identify through a real client.
async fn demo_over_grpc(
    data_dir: &std::path::Path,
    data: &biogate::synth::SynthData,
    k: usize,
    travellers: &[usize],
) -> Result<()> {
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
    outln!(
        "over gRPC (server on {}): {} concurrent single-probe requests, {right} matched to their subject, {:.0} probes/s; one request {:.2} ms",
        server.addr,
        data.mated_ids.len(),
        data.mated_ids.len() as f64 / wall,
        one.elapsed().as_secs_f64() * 1e3
    );
    outln!("\na day at the border (CDG), over the same server:");
    let day = border_day(&client, data_dir, data, travellers).await;
    outln!(
        "\nto serve your own galleries: biogate serve   (then: biogate client galleries; the reports: biogate encounters --help)"
    );
    server.shutdown().await?;
    day
}

/// A day at the border on the demo's server: two flight galleries derived from the
/// master by their manifests, a watchlist, entries at gates and exits two weeks later
/// with encounter contexts, one traveller who never leaves, one watchlist hit; then the
/// programme's reports from the encounter log.
async fn border_day(
    client: &biogate::client::Client,
    data_dir: &std::path::Path,
    data: &biogate::synth::SynthData,
    travellers: &[usize],
) -> Result<()> {
    use biogate::client::remote_error;
    use biogate::encounters::{EncounterStore, Format, Report, StatsBy};
    use biogate::server::proto::EncounterContext;
    use biogate::time_text::parse_time;
    let dim = data.dim;
    let threshold = 0.4;
    let half = travellers.len() / 2;
    let flights = [
        ("flight-AF0123", &travellers[..half]),
        ("flight-LH0456", &travellers[half..]),
    ];
    for (name, people) in flights {
        let manifest: Vec<String> = people.iter().map(|&i| data.mated_ids[i].clone()).collect();
        let t = Instant::now();
        let info = client
            .derive_gallery(name, "demo", &manifest)
            .await
            .map_err(remote_error)?;
        outln!(
            "  {name}: derived from the master's {} subjects by its manifest in {:.1} ms ({} travellers)",
            data.gallery_ids.len() / 2,
            t.elapsed().as_secs_f64() * 1e3,
            info.subjects
        );
    }
    // The watchlist: one traveller of the first flight, derived from the master too.
    let wanted = travellers[7];
    client
        .derive_gallery("watchlist", "demo", std::slice::from_ref(&data.mated_ids[wanted]))
        .await
        .map_err(remote_error)?;
    let context = |direction: &str, gate: String, time: &str| EncounterContext {
        location: "CDG".into(),
        gate,
        direction: direction.into(),
        device: "egate".into(),
        capture_time: time.into(),
    };
    let second =
        |base: &str, s: usize| parse_time(base, "t").map(|t| biogate::time_text::format_time(t + s as i64 * 1000));
    // Entries: each flight's travellers at four gates, against the flight and the watchlist.
    let mut hits = Vec::new();
    for (f, &(name, people)) in flights.iter().enumerate() {
        let base = ["2026-03-01T06:00:00Z", "2026-03-01T09:30:00Z"][f];
        for (n, &i) in people.iter().enumerate() {
            let gate = format!("{}{}", ["A", "B"][f], n % 4 + 1);
            let answer = client
                .identify_at(
                    &[(name, 1, Some(threshold)), ("watchlist", 1, Some(threshold))],
                    &data.mated[i * dim..(i + 1) * dim],
                    dim,
                    context("entry", gate.clone(), &second(base, n * 7)?),
                    None,
                )
                .await
                .map_err(remote_error)?;
            if let Some(hit) = answer.galleries[1].results[0]
                .candidates
                .first()
                .filter(|_| answer.galleries[1].results[0].matched)
            {
                hits.push(format!("{} at gate {gate} (score {:.3})", hit.subject, hit.score));
            }
        }
    }
    // Exits two weeks later, against the master; the overstayer does not leave.
    let overstayer = travellers[3];
    for (n, &i) in travellers.iter().enumerate().filter(|(_, i)| **i != overstayer) {
        client
            .identify_at(
                &[("demo", 1, Some(threshold))],
                &data.mated[i * dim..(i + 1) * dim],
                dim,
                context(
                    "exit",
                    format!("X{}", n % 2 + 1),
                    &second("2026-03-15T12:00:00Z", n * 5)?,
                ),
                None,
            )
            .await
            .map_err(remote_error)?;
    }
    outln!(
        "  {} entries and {} exits at gates; watchlist hits: {}",
        travellers.len(),
        travellers.len() - 1,
        hits.join("; ")
    );
    let store = EncounterStore::open(data_dir)?;
    outln!("\nencounters stats --by location:");
    out!(
        "{}",
        Report::stats(&store.stats(StatsBy::Location)?, StatsBy::Location).render(Format::Table)
    );
    let as_of = "2026-07-01T00:00:00Z";
    outln!("\nencounters overstays --max-stay 90d --as-of {as_of}:");
    let over = store.overstays(90 * 86_400_000, parse_time(as_of, "as_of")?)?;
    out!("{}", Report::overstays(&over).render(Format::Table));
    outln!("\nencounters history {}:", data.mated_ids[wanted]);
    out!(
        "{}",
        Report::history(&store.history(&data.mated_ids[wanted])?).render(Format::Table)
    );
    if over.len() != 1 || over[0].subject != data.mated_ids[overstayer] || hits.is_empty() {
        return Err(Error::Internal(
            "the border day's reports are not what it planted".into(),
        ));
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
