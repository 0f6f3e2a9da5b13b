//! The `biogate` command line: a thin layer over the library. Every verb parses its
//! flags, calls one library function, and prints the result.

use biogate::engine::{BackendChoice, Engine, SearchParams, open_engine};
use biogate::error::{Error, Result};
use biogate::gallery::{self, Gallery, ImportOptions};
use biogate::npy::{MemoryImport, NpyImport, read_matrix};
use biogate::server::config::Config;
use biogate::synth::{SynthSpec, generate, write_dir};
use biogate::template::Dtype;
use biogate::{ProbeResult, bench};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "biogate",
    version,
    about = "Exact 1:N biometric identification over a memory-mapped gallery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesise a gallery, enroll it, identify mated and non-mated probes, print accuracy and speed.
    Demo(DemoArgs),
    /// Write identity-structured synthetic templates (gallery, mated and non-mated probes).
    Synth(SynthArgs),
    /// Create, import into, inspect, check, compact and edit galleries.
    #[command(subcommand)]
    Gallery(GalleryCommand),
    /// Search probes against a gallery; one JSON line (or CSV rows) per probe.
    Identify(IdentifyArgs),
    /// Measure probes/s and gallery GB/s per dtype and batch size.
    Bench(BenchArgs),
    /// Accuracy report: rank-1/rank-k rates, FNIR at FPIR 0.001/0.003/0.01, DET and score plots.
    Eval(EvalArgs),
    /// N:N de-duplication: pairs of different subjects with near-identical templates.
    Dedup(DedupArgs),
    /// Serve galleries over gRPC (defaults: ./biogate-data on 127.0.0.1:50051).
    Serve(ServeArgs),
    /// Talk to a running server.
    Client(ClientArgs),
}

#[derive(Args)]
struct EvalArgs {
    dir: PathBuf,
    /// Probes of enrolled subjects (.npy).
    #[arg(long)]
    mated: PathBuf,
    /// Subject id of each mated probe, one per line.
    #[arg(long)]
    mated_ids: PathBuf,
    /// Probes of people who are not enrolled (.npy).
    #[arg(long)]
    nonmated: PathBuf,
    /// Candidate list length (rank-k rate, recall@k).
    #[arg(short, default_value_t = 20)]
    k: usize,
    /// Rank criterion R for FNIR (1: identification mode; k: investigation mode).
    #[arg(long, default_value_t = 1)]
    rank: usize,
    /// Also re-encode the gallery as f32, f16 and i8 in memory and report what each costs.
    #[arg(long)]
    compare_dtypes: bool,
    /// Directory for report.md, report.json and the plots.
    #[arg(long)]
    out: PathBuf,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
}

#[derive(Args)]
struct DedupArgs {
    dir: PathBuf,
    /// Report pairs of different subjects scoring at or above this.
    #[arg(long)]
    threshold: Option<f32>,
    /// Report each template's K nearest other subjects.
    #[arg(long)]
    top: Option<usize>,
    /// Probes per engine batch.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Output CSV (subject_a,subject_b,score), sorted by score; OUT.checkpoint holds progress.
    #[arg(long)]
    out: PathBuf,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (flags and environment variables override it).
    #[arg(long, env = "BIOGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Where galleries and the audit log live.
    #[arg(long, env = "BIOGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "BIOGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Prometheus metrics address, or "off".
    #[arg(long, env = "BIOGATE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Most probes per engine batch.
    #[arg(long, env = "BIOGATE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// Microseconds the engine waits for more work before running a partial batch.
    #[arg(long, env = "BIOGATE_MAX_WAIT_US")]
    max_wait_us: Option<u64>,
    /// cpu, gpu or auto (default: the configuration's `backend`, else auto).
    #[arg(long, env = "BIOGATE_BACKEND")]
    backend: Option<BackendChoice>,
}

#[derive(Args)]
struct ClientArgs {
    /// Server address.
    #[arg(long, env = "BIOGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token.
    #[arg(long, env = "BIOGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; enables TLS.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long)]
    client_key: Option<PathBuf>,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Identify probes; one JSON line per probe.
    Identify {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        probes: PathBuf,
        #[arg(short, default_value_t = 10)]
        k: u32,
        #[arg(long)]
        threshold: Option<f32>,
    },
    /// Verify one probe (a row of a .npy) against a claimed subject.
    Verify {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        probes: PathBuf,
        #[arg(long, default_value_t = 0)]
        row: usize,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        threshold: Option<f32>,
    },
    /// Enroll templates (.npy) with one subject id per row.
    Enroll {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        templates: PathBuf,
        #[arg(long)]
        ids: PathBuf,
    },
    /// List galleries.
    Galleries,
    /// Create a gallery.
    CreateGallery {
        name: String,
        #[arg(long)]
        dim: u32,
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
    /// Drop a gallery and delete its data.
    DropGallery { name: String },
    /// Repair a gallery on the server (one that is NOT_SERVING) without a restart.
    RepairGallery { name: String },
    /// Rewrite a gallery's live rows into one segment, dropping deleted rows.
    CompactGallery { name: String },
}

#[derive(Args)]
struct DemoArgs {
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

#[derive(Args)]
struct SynthArgs {
    /// Number of enrolled subjects.
    #[arg(long)]
    subjects: usize,
    /// Templates per enrolled subject.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Template dimension.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Mated probes (and as many non-mated probes).
    #[arg(long, default_value_t = 1000)]
    probes: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum GalleryCommand {
    /// Create an empty gallery.
    Create {
        dir: PathBuf,
        #[arg(long)]
        dim: usize,
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
    /// Import templates (.npy, float32 or float16) with one subject id per row.
    Import {
        dir: PathBuf,
        /// (rows, dim) matrix.
        #[arg(long)]
        templates: PathBuf,
        /// Text file, one subject id per line, one line per row.
        #[arg(long)]
        ids: PathBuf,
        /// Allow adding templates to subjects already enrolled.
        #[arg(long)]
        add_to_existing: bool,
    },
    /// Print the gallery's size and shape.
    Info {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify every checksum (manifest, metadata, row data, the log).
    Check { dir: PathBuf },
    /// Repair a damaged gallery: keep everything intact, move damaged files aside into
    /// DIR/damaged/ (never deleted) and name the subjects affected.
    Repair {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Seal the log and drop deleted rows into one new segment.
    Compact { dir: PathBuf },
    /// Delete a subject and all its templates.
    Delete {
        dir: PathBuf,
        #[arg(long)]
        subject: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Json,
    Csv,
}

#[derive(Args)]
struct IdentifyArgs {
    dir: PathBuf,
    /// (n, dim) probe matrix (.npy).
    #[arg(long)]
    probes: PathBuf,
    /// Candidates per probe.
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Decision threshold (cosine similarity); only candidates at or above it are listed.
    #[arg(long)]
    threshold: Option<f32>,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    format: OutputFormat,
    /// Score the rows without verifying their checksums first (faster on a cold
    /// gallery; a damaged row would then be scored silently).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Args)]
struct BenchArgs {
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
    /// Load-test the gRPC server on loopback instead (--rows x --dim gallery of the first
    /// --dtypes entry; concurrency levels from --concurrency).
    #[arg(long)]
    grpc: bool,
    /// Concurrent single-probe clients for --grpc.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    concurrency: Vec<usize>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "biogate=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo(a),
        Command::Synth(a) => {
            let spec = SynthSpec {
                subjects: a.subjects,
                samples: a.samples,
                dim: a.dim,
                probes: a.probes,
                seed: a.seed,
            };
            let bar = progress((a.subjects * a.samples) as u64, "synth");
            write_dir(&spec, &a.out, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!(
                "wrote {} gallery rows ({} subjects x {}), {} mated and {} non-mated probes to {}",
                a.subjects * a.samples,
                a.subjects,
                a.samples,
                a.probes,
                a.probes,
                a.out.display()
            );
            Ok(())
        }
        Command::Gallery(g) => gallery_command(g),
        Command::Identify(a) => identify(a),
        Command::Bench(a) => bench_command(a),
        Command::Eval(a) => eval_command(a),
        Command::Dedup(a) => dedup_command(a),
        Command::Serve(a) => runtime()?.block_on(serve(a)),
        Command::Client(a) => runtime()?.block_on(client(a)),
    }
}

fn eval_command(a: EvalArgs) -> Result<()> {
    let snapshot = gallery::open_snapshot(&a.dir)?;
    let (_, mdim, mated) = read_matrix(&a.mated)?;
    let (_, ndim, nonmated) = read_matrix(&a.nonmated)?;
    for (d, p) in [(mdim, &a.mated), (ndim, &a.nonmated)] {
        if d != snapshot.dim() {
            return Err(Error::invalid(format!(
                "{}: dimension {d}, the gallery has {}",
                p.display(),
                snapshot.dim()
            )));
        }
    }
    let ids = biogate::npy::read_ids(&a.mated_ids)?;
    let engine = engine_for(a.backend)?;
    tracing::info!(gallery = %a.dir.display(), mated = ids.len(), nonmated = nonmated.len() / ndim, "eval");
    let mut reports = Vec::new();
    if a.compare_dtypes {
        for dtype in Dtype::ALL {
            let s = biogate::eval::reencode(&snapshot, dtype)?;
            reports.push(biogate::eval::evaluate(
                &engine, &s, &mated, &ids, &nonmated, a.k, a.rank,
            )?);
        }
    } else {
        reports.push(biogate::eval::evaluate(
            &engine, &snapshot, &mated, &ids, &nonmated, a.k, a.rank,
        )?);
    }
    biogate::report::write_report(&a.out, &reports)?;
    print!("{}", biogate::report::summary_table(&reports));
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}

fn dedup_command(a: DedupArgs) -> Result<()> {
    let options = biogate::dedup::DedupOptions {
        threshold: a.threshold,
        top: a.top,
        batch: a.batch,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("dedup [{bar:40}] {pos}/{len} templates ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    tracing::info!(gallery = %a.dir.display(), threshold = ?a.threshold, top = ?a.top, "dedup");
    let t = Instant::now();
    let outcome = biogate::dedup::dedup(&engine_for(a.backend)?, &a.dir, options, &a.out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        true
    })?;
    bar.finish_and_clear();
    match outcome {
        biogate::dedup::DedupOutcome::Finished {
            pairs,
            rows,
            resumed_from,
        } => println!(
            "searched {rows} templates against the gallery in {:.1} s{}: {pairs} pairs written to {}",
            t.elapsed().as_secs_f64(),
            if resumed_from > 0 {
                format!(" (resumed at {resumed_from})")
            } else {
                String::new()
            },
            a.out.display()
        ),
        biogate::dedup::DedupOutcome::Interrupted { rows_done, rows } => {
            println!("stopped at {rows_done} of {rows}; run again to resume")
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().map_err(|e| Error::Io {
        context: "starting the async runtime".into(),
        source: e,
    })
}

async fn serve(a: ServeArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = a.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = a.listen {
        config.listen = l;
    }
    if let Some(m) = a.metrics_listen {
        config.metrics_listen = match m.as_str() {
            "off" | "" => None,
            other => Some(
                other
                    .parse()
                    .map_err(|e| Error::invalid(format!("--metrics-listen {other:?}: {e}")))?,
            ),
        };
    }
    if let Some(b) = a.max_batch {
        config.max_batch = b;
    }
    if let Some(w) = a.max_wait_us {
        config.max_wait_us = w;
    }
    if let Some(b) = a.backend {
        config.backend = b;
    }
    let data_dir = config.data_dir.clone();
    let handle = biogate::server::start(config).await?;
    let scheme = "http";
    println!(
        "biogate serving {} on {} (metrics: {})",
        data_dir.display(),
        handle.addr,
        handle
            .metrics_addr
            .map(|m| format!("http://{m}/metrics"))
            .unwrap_or_else(|| "off".into())
    );
    println!(
        "try: biogate client --addr {scheme}://{} galleries   (or: grpcurl -plaintext {} list)",
        handle.addr, handle.addr
    );
    wait_for_signal().await;
    handle.shutdown().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn client(a: ClientArgs) -> Result<()> {
    use biogate::client::{Client, ConnectOptions, pack};
    use biogate::server::proto;
    let options = ConnectOptions {
        addr: a.addr.clone(),
        token: a.token.clone(),
        ca_cert: a.ca_cert.clone(),
        client_cert: a.client_cert.clone(),
        client_key: a.client_key.clone(),
        domain: None,
    };
    let c = Client::connect(&options).await?;
    let rpc = biogate::client::rpc_error;
    match a.command {
        ClientCommand::Identify {
            gallery,
            probes,
            k,
            threshold,
        } => {
            let (_, dim, values) = read_matrix(&probes)?;
            for (b, chunk) in values.chunks(256 * dim).enumerate() {
                let results = c.identify(&gallery, chunk, dim, k, threshold).await?;
                for (i, r) in results.iter().enumerate() {
                    let candidates: Vec<_> = r
                        .candidates
                        .iter()
                        .map(|c| serde_json::json!({"subject": c.subject, "score": c.score}))
                        .collect();
                    let matched = if r.decided {
                        serde_json::json!(r.matched)
                    } else {
                        serde_json::Value::Null
                    };
                    println!(
                        "{}",
                        serde_json::json!({"probe": b * 256 + i, "matched": matched, "candidates": candidates})
                    );
                }
            }
        }
        ClientCommand::Verify {
            gallery,
            probes,
            row,
            subject,
            threshold,
        } => {
            let (rows, dim, values) = read_matrix(&probes)?;
            if row >= rows {
                return Err(Error::invalid(format!(
                    "--row {row}: {} has {rows} rows",
                    probes.display()
                )));
            }
            let req = proto::VerifyRequest {
                gallery,
                probe: pack(&values[row * dim..(row + 1) * dim]),
                subject,
                threshold,
            };
            let r = c.inner.clone().verify(c.request(req)).await.map_err(rpc)?.into_inner();
            let matched = if r.decided {
                serde_json::json!(r.matched)
            } else {
                serde_json::Value::Null
            };
            println!("{}", serde_json::json!({"score": r.score, "matched": matched}));
        }
        ClientCommand::Enroll {
            gallery,
            templates,
            ids,
        } => {
            let (_, dim, values) = read_matrix(&templates)?;
            let ids = biogate::npy::read_ids(&ids)?;
            if ids.len() * dim != values.len() {
                return Err(Error::invalid(format!(
                    "{} ids for {} rows",
                    ids.len(),
                    values.len() / dim
                )));
            }
            let r = c.enroll(&gallery, &values, dim, &ids).await?;
            println!("enrolled {} subjects ({} templates) durably", r.subjects, r.templates);
        }
        ClientCommand::Galleries => {
            let r = c
                .inner
                .clone()
                .list_galleries(c.request(proto::ListGalleriesRequest {}))
                .await
                .map_err(rpc)?
                .into_inner();
            println!(
                "{:<24} {:>5} {:>5} {:>12} {:>12} {:>8}  state",
                "name", "dim", "dtype", "templates", "subjects", "backend"
            );
            for g in r.galleries {
                let why = if g.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", g.reason)
                };
                println!(
                    "{:<24} {:>5} {:>5} {:>12} {:>12} {:>8}  {}{why}",
                    g.name, g.dim, g.dtype, g.rows, g.subjects, g.backend, g.state
                );
            }
        }
        ClientCommand::CreateGallery { name, dim, dtype } => {
            let req = proto::CreateGalleryRequest {
                name,
                dim,
                dtype: dtype.name().into(),
            };
            let g = c
                .inner
                .clone()
                .create_gallery(c.request(req))
                .await
                .map_err(rpc)?
                .into_inner();
            println!("created gallery {} (dim {}, dtype {})", g.name, g.dim, g.dtype);
        }
        ClientCommand::DropGallery { name } => {
            c.inner
                .clone()
                .drop_gallery(c.request(proto::DropGalleryRequest { name: name.clone() }))
                .await
                .map_err(rpc)?;
            println!("dropped gallery {name}");
        }
        ClientCommand::RepairGallery { name } => {
            let r = c
                .inner
                .clone()
                .repair_gallery(c.request(proto::RepairGalleryRequest { name: name.clone() }))
                .await
                .map_err(rpc)?
                .into_inner();
            if r.clean && r.actions.is_empty() {
                println!("gallery {name}: nothing to repair");
            }
            for a in &r.actions {
                println!("did:   {a}");
            }
            for l in &r.lost {
                let who = if l.subject.is_empty() {
                    "unknown subjects".to_owned()
                } else {
                    format!("subject {:?}", l.subject)
                };
                println!("lost:  {who}: {} ({})", l.what, l.file);
            }
            if let Some(g) = r.gallery {
                println!(
                    "gallery {name} is now {}{}",
                    g.state,
                    if g.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", g.reason)
                    }
                );
            }
        }
        ClientCommand::CompactGallery { name } => {
            let r = c
                .inner
                .clone()
                .compact_gallery(c.request(proto::CompactGalleryRequest { name: name.clone() }))
                .await
                .map_err(rpc)?
                .into_inner();
            println!(
                "compacted {name}: kept {} rows, dropped {}, {} segment(s) -> {}",
                r.rows_kept, r.rows_dropped, r.segments_before, r.segments_after
            );
        }
    }
    Ok(())
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn gallery_command(command: GalleryCommand) -> Result<()> {
    match command {
        GalleryCommand::Create { dir, dim, dtype } => {
            Gallery::create(&dir, dim, dtype)?;
            tracing::info!(gallery = %dir.display(), dim, %dtype, "created gallery");
            println!("created gallery {} (dim {dim}, dtype {dtype})", dir.display());
        }
        GalleryCommand::Import {
            dir,
            templates,
            ids,
            add_to_existing,
        } => {
            let mut g = Gallery::open(&dir)?;
            let mut source = NpyImport::open(&templates, &ids)?;
            let bar = progress(
                biogate::gallery::ImportSource::rows_hint(&source).unwrap_or(0),
                "import",
            );
            let t = Instant::now();
            let report = g.import(&mut source, ImportOptions { add_to_existing }, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            tracing::info!(gallery = %dir.display(), rows = report.rows, subjects = report.subjects, "imported");
            println!(
                "imported {} templates of {} subjects into {} in {:.2} s ({})",
                report.rows,
                report.subjects,
                dir.display(),
                t.elapsed().as_secs_f64(),
                report.segment
            );
        }
        GalleryCommand::Info { dir, json } => {
            let t = Instant::now();
            gallery::open_snapshot(&dir)?;
            let open_ms = t.elapsed().as_secs_f64() * 1e3;
            let info = gallery::info(&dir)?;
            if json {
                println!("{}", serde_json::to_string(&info).expect("serialises"));
            } else {
                println!("gallery    {}", info.path);
                println!("dim        {}", info.dim);
                println!("dtype      {}", info.dtype);
                println!("templates  {}", info.rows);
                println!("subjects   {}", info.subjects);
                println!("segments   {}", info.segments);
                println!("log rows   {} (not yet compacted)", info.log_rows);
                println!("deletions  {} (not yet compacted)", info.deleted_subjects_pending);
                println!("disk       {:.1} MB", info.bytes_on_disk as f64 / 1e6);
                println!("opened in  {open_ms:.1} ms (headers, metadata checksums, the log; rows stay on disk)");
            }
        }
        GalleryCommand::Check { dir } => {
            let t = Instant::now();
            let info = gallery::check(&dir)?;
            println!(
                "ok: {} templates of {} subjects, every checksum verified in {:.2} s",
                info.rows,
                info.subjects,
                t.elapsed().as_secs_f64()
            );
            for note in &info.notes {
                println!("note: {note}");
            }
        }
        GalleryCommand::Repair { dir, json } => {
            let report = gallery::repair::repair(&dir, &biogate::storage::Storage::default())?;
            if json {
                println!("{}", serde_json::to_string(&report).expect("serialises"));
            } else if report.clean && report.actions.is_empty() {
                println!("{}: nothing to repair", dir.display());
            } else {
                println!("repaired {}", dir.display());
                for a in &report.actions {
                    println!("  did:   {a}");
                }
                for k in &report.kept_aside {
                    println!("  kept:  {k}");
                }
                for l in &report.lost {
                    let who = match (&l.subject, l.subject_verified) {
                        (Some(s), true) => format!("subject {s:?}"),
                        (Some(s), false) => format!("probably subject {s:?} (read from a damaged record)"),
                        (None, _) => "unknown subjects".into(),
                    };
                    println!("  lost:  {who}: {} ({})", l.what, l.file);
                }
                if report.lost.is_empty() {
                    println!("  nothing acknowledged was lost");
                }
                if let Some(f) = &report.report_file {
                    println!("  report: {f}");
                }
            }
        }
        GalleryCommand::Compact { dir } => {
            let mut g = Gallery::open(&dir)?;
            let r = g.compact()?;
            tracing::info!(gallery = %dir.display(), kept = r.rows_kept, dropped = r.rows_dropped, "compacted");
            println!(
                "compacted {}: kept {} rows, dropped {} deleted rows, {} segment(s) -> {}",
                dir.display(),
                r.rows_kept,
                r.rows_dropped,
                r.segments_before,
                r.segments_after
            );
        }
        GalleryCommand::Delete { dir, subject } => {
            let mut g = Gallery::open(&dir)?;
            g.delete_subject(&subject)?;
            tracing::info!(gallery = %dir.display(), subject = %subject, "deleted subject");
            println!("deleted subject {subject:?} from {}", dir.display());
        }
    }
    Ok(())
}

fn engine_for(choice: BackendChoice) -> Result<Engine> {
    let (engine, gpu) = open_engine(choice)?;
    if let Some(gpu) = gpu {
        tracing::info!(backend = %choice, gpu = %gpu.describe(), "engine");
    }
    Ok(engine)
}

fn identify(a: IdentifyArgs) -> Result<()> {
    let snapshot = gallery::open_snapshot(&a.dir)?;
    if a.no_verify {
        snapshot.trust_rows();
    }
    let (count, dim, probes) = read_matrix(&a.probes)?;
    if dim != snapshot.dim() {
        return Err(Error::invalid(format!(
            "{}: probes have dimension {dim}, the gallery has dimension {}",
            a.probes.display(),
            snapshot.dim()
        )));
    }
    if count == 0 {
        return Err(Error::invalid(format!("{}: no probes", a.probes.display())));
    }
    let engine = engine_for(a.backend)?;
    let params = SearchParams {
        k: a.k,
        threshold: a.threshold,
    };
    params.validate()?;
    tracing::info!(gallery = %a.dir.display(), probes = count, k = a.k, threshold = ?a.threshold, backend = engine.backend_name(), "identify");
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if let OutputFormat::Csv = a.format {
        writeln!(out, "probe,rank,subject,score,matched").ok();
    }
    const BATCH: usize = 1024;
    for (b, chunk) in probes.chunks(BATCH * dim).enumerate() {
        let results = engine.search(&snapshot, chunk, &params)?;
        for (i, r) in results.iter().enumerate() {
            write_result(&mut out, b * BATCH + i, r, a.format).map_err(|e| Error::Io {
                context: "writing results".into(),
                source: e,
            })?;
        }
    }
    out.flush().map_err(|e| Error::Io {
        context: "writing results".into(),
        source: e,
    })
}

fn write_result(out: &mut impl Write, probe: usize, r: &ProbeResult, format: OutputFormat) -> std::io::Result<()> {
    match format {
        OutputFormat::Json => {
            let line = serde_json::json!({"probe": probe, "matched": r.matched, "candidates": r.candidates});
            writeln!(out, "{line}")
        }
        OutputFormat::Csv => {
            let matched = r.matched.map(|m| m.to_string()).unwrap_or_default();
            for (rank, c) in r.candidates.iter().enumerate() {
                // Ids never hold control characters; quote them for commas and quotes.
                let id = c.subject.replace('"', "\"\"");
                writeln!(out, "{probe},{},\"{id}\",{},{matched}", rank + 1, c.score)?;
            }
            if r.candidates.is_empty() {
                writeln!(out, "{probe},,,,{matched}")?;
            }
            Ok(())
        }
    }
}

fn bench_command(a: BenchArgs) -> Result<()> {
    if a.grpc {
        let dtype = a.dtypes.first().copied().unwrap_or(Dtype::F32);
        let rows = runtime()?.block_on(biogate::bench_grpc::run(
            a.rows,
            a.dim,
            dtype,
            &a.concurrency,
            a.min_seconds,
        ))?;
        if a.json {
            for r in &rows {
                println!("{}", serde_json::to_string(r).expect("serialises"));
            }
        } else {
            println!(
                "gallery: {} x {} {dtype}, k = 10, cpu engine, {} threads",
                a.rows,
                a.dim,
                rayon::current_num_threads()
            );
            print!("{}", biogate::bench_grpc::format_table(&rows));
        }
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
        return print_bench(&device, &rows, a.json);
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
    let mut all = Vec::new();
    for &dtype in &a.dtypes {
        let snapshot = biogate::Snapshot::from_rows(&gallery, dim, dtype);
        all.extend(bench::run(
            &engine,
            gpu.as_deref(),
            &snapshot,
            &probes,
            &a.batches,
            a.k,
            min_time,
        )?);
    }
    print_bench(&device, &all, a.json)
}

fn print_bench(device: &str, rows: &[bench::BenchRow], json: bool) -> Result<()> {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r).expect("serialises"));
        }
    } else {
        println!("device: {device}");
        print!("{}", bench::format_table(rows));
    }
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let spec = SynthSpec {
        subjects: a.subjects,
        samples: 2,
        dim: a.dim,
        probes: 500,
        seed: 42,
    };
    println!(
        "biogate demo: {} subjects x {} templates, d = {}, dtype {}",
        spec.subjects, spec.samples, spec.dim, a.dtype
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
        "speed (cpu, {} threads): one probe in {:.2} ms; a batch of {} probes at {:.0} probes/s",
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
            client.identify("demo", &probe, dim, k as u32, Some(0.4)).await
        }));
    }
    for (t, id) in tasks.into_iter().zip(&data.mated_ids) {
        let r = t.await.map_err(|e| Error::invalid(e.to_string()))??;
        right += usize::from(r[0].matched && r[0].candidates.first().is_some_and(|c| &c.subject == id));
    }
    let wall = t.elapsed().as_secs_f64();
    let one = Instant::now();
    client
        .identify("demo", &data.mated[..dim], dim, k as u32, Some(0.4))
        .await?;
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
