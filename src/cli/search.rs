//! The verbs that search a gallery: `identify`, `eval`, `dedup`.

use super::engine_for;
use biogate::ProbeResult;
use biogate::engine::{BackendChoice, SearchParams};
use biogate::error::{Error, Result};
use biogate::gallery;
use biogate::npy::read_matrix;
use biogate::template::Dtype;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct IdentifyArgs {
    dir: PathBuf,
    /// (n, dim) probe matrix (.npy).
    #[arg(long)]
    probes: PathBuf,
    /// Candidates per probe.
    #[arg(short, default_value_t = 10)]
    k: usize,
    /// Decision threshold (cosine similarity); only candidates at or above it are listed.
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f32>,
    /// cpu, gpu, or auto (the GPU where a cost model measured at start-up says it is faster).
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    format: OutputFormat,
    /// Score the rows without checking their checksums (each chunk is otherwise checked
    /// as it is first scored; a damaged row would then be scored silently).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OutputFormat {
    Json,
    Csv,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
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
pub(crate) struct DedupArgs {
    dir: PathBuf,
    /// Report pairs of different subjects scoring at or above this.
    #[arg(long, allow_negative_numbers = true)]
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

pub(crate) fn identify(a: IdentifyArgs) -> Result<()> {
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
    tracing::info!(gallery = %a.dir.display(), probes = count, k = a.k, threshold = %shown(a.threshold), backend = engine.backend_name(), "identify");
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

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
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
    out!("{}", biogate::report::summary_table(&reports));
    outln!("report: {}", a.out.join("report.md").display());
    Ok(())
}

pub(crate) fn dedup(a: DedupArgs) -> Result<()> {
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
    tracing::info!(gallery = %a.dir.display(), threshold = %shown(a.threshold), top = %shown(a.top), "dedup");
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
        } => outln!(
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
            outln!("stopped at {rows_done} of {rows}; run again to resume")
        }
    }
    Ok(())
}

/// An optional value as a log shows it: the value, or "none".
fn shown<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
}
