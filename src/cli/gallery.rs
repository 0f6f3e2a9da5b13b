//! `biogate gallery ...`: create, import, info, check, repair, compact, delete.

use super::progress;
use biogate::error::Result;
use biogate::gallery::{self, Gallery, ImportOptions};
use biogate::npy::NpyImport;
use biogate::template::Dtype;
use clap::Subcommand;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub(crate) enum GalleryCommand {
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
    /// Make a gallery of the listed subjects' templates, copied from MASTER (a flight's
    /// gallery from its passenger manifest). Listed subjects MASTER lacks are named.
    Derive {
        master: PathBuf,
        dst: PathBuf,
        /// Text file, one subject id per line, each once.
        #[arg(long)]
        subjects: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Copy the master's rows without verifying its checksums first (a server has
        /// verified them since it started; a damaged row would be copied silently).
        #[arg(long)]
        no_verify: bool,
        /// RFC 3339 time at which the new gallery expires (answers nothing from then on).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Delete a subject and all its templates.
    Delete {
        dir: PathBuf,
        #[arg(long)]
        subject: String,
    },
}

pub(crate) fn run(command: GalleryCommand) -> Result<()> {
    match command {
        GalleryCommand::Create { dir, dim, dtype } => {
            Gallery::create(&dir, dim, dtype)?;
            tracing::info!(gallery = %dir.display(), dim, %dtype, "created gallery");
            outln!("created gallery {} (dim {dim}, dtype {dtype})", dir.display());
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
            outln!(
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
                outln!("{}", serde_json::to_string(&info).expect("serialises"));
            } else {
                outln!("gallery    {}", info.path);
                outln!("dim        {}", info.dim);
                outln!("dtype      {}", info.dtype);
                outln!("templates  {}", info.rows);
                outln!("subjects   {}", info.subjects);
                outln!("segments   {}", info.segments);
                outln!("log rows   {} (not yet compacted)", info.log_rows);
                outln!("deletions  {} (not yet compacted)", info.deleted_subjects_pending);
                outln!("disk       {:.1} MB", info.bytes_on_disk as f64 / 1e6);
                if let Some(t) = &info.expires_at {
                    outln!("expires    {t}");
                }
                if info.expiring_subjects > 0 {
                    outln!("expiring   {} subjects have an expiry", info.expiring_subjects);
                }
                outln!(
                    "opened in  {open_ms:.1} ms (headers and the log; metadata and rows are verified before first use)"
                );
            }
        }
        GalleryCommand::Check { dir } => {
            let t = Instant::now();
            let info = gallery::check(&dir)?;
            outln!(
                "ok: {} templates of {} subjects, every checksum verified in {:.2} s",
                info.rows,
                info.subjects,
                t.elapsed().as_secs_f64()
            );
            for note in &info.notes {
                outln!("note: {note}");
            }
        }
        GalleryCommand::Repair { dir, json } => {
            let report = gallery::repair::repair(&dir, &biogate::storage::Storage::default())?;
            if json {
                outln!("{}", serde_json::to_string(&report).expect("serialises"));
            } else if report.clean && report.actions.is_empty() {
                outln!("{}: nothing to repair", dir.display());
            } else {
                outln!("repaired {}", dir.display());
                for a in &report.actions {
                    outln!("  did:   {a}");
                }
                for k in &report.kept_aside {
                    outln!("  kept:  {k}");
                }
                for l in &report.lost {
                    let who = match (&l.subject, l.subject_verified) {
                        (Some(s), true) => format!("subject {s:?}"),
                        (Some(s), false) => format!("probably subject {s:?} (read from a damaged record)"),
                        (None, _) => "unknown subjects".into(),
                    };
                    outln!("  lost:  {who}: {} ({})", l.what, l.file);
                }
                if report.lost.is_empty() {
                    outln!("  nothing acknowledged was lost");
                }
                if let Some(f) = &report.report_file {
                    outln!("  report: {f}");
                }
            }
        }
        GalleryCommand::Derive {
            master,
            dst,
            subjects,
            json,
            no_verify,
            expires_at,
        } => {
            let expires_at = expires_at
                .map(|t| biogate::time_text::parse_time(&t, "--expires-at"))
                .transpose()?;
            let ids = biogate::npy::read_ids(&subjects)?;
            let t = Instant::now();
            let snapshot = biogate::gallery::open_snapshot(&master)?;
            if no_verify {
                snapshot.trust_rows();
            }
            let (_, report) = Gallery::derive_expiring(&snapshot, &dst, &ids, expires_at, Default::default())?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            tracing::info!(master = %master.display(), gallery = %dst.display(), subjects = report.subjects, "derived");
            if json {
                outln!("{}", serde_json::to_string(&report).expect("report serialises"));
            } else {
                outln!(
                    "derived {} from {}: {} subjects ({} templates) in {ms:.1} ms",
                    dst.display(),
                    master.display(),
                    report.subjects,
                    report.rows
                );
                if !report.missing.is_empty() {
                    const SHOWN: usize = 20;
                    let shown: Vec<&str> = report.missing.iter().take(SHOWN).map(String::as_str).collect();
                    let more = report.missing.len().saturating_sub(SHOWN);
                    outln!(
                        "{} listed subject(s) not in {}: {}{}",
                        report.missing.len(),
                        master.display(),
                        shown.join(", "),
                        if more > 0 {
                            format!(" and {more} more (--json lists all)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        GalleryCommand::Compact { dir } => {
            let mut g = Gallery::open(&dir)?;
            let r = g.compact()?;
            tracing::info!(gallery = %dir.display(), kept = r.rows_kept, dropped = r.rows_dropped, "compacted");
            outln!(
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
            outln!("deleted subject {subject:?} from {}", dir.display());
        }
    }
    Ok(())
}
