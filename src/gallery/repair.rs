//! `biogate gallery repair`: bring a damaged gallery back to a state that opens, keeping
//! everything that can be kept, moving every damaged file aside (never deleting it),
//! and saying exactly what was lost and whose it was.
//!
//! - `MANIFEST` damaged or missing: restored from `MANIFEST.copy` (both bad: an error;
//!   nothing can tell which files make up the gallery).
//! - A segment with bad row chunks: rewritten without the rows of those chunks, under
//!   the same segment id (so pending deletions still reach it); the subjects whose
//!   templates were in them are named, with how many were lost.
//! - A segment that does not open (missing, header or metadata damaged, another
//!   gallery's): dropped; its subjects are named when its checksummed id table is
//!   legible, else only its row count is known.
//! - A damaged log: every intact record is kept in a new log; each damaged record is
//!   named by its subject (read from its checksummed key) or, when its head is damaged
//!   too, by a best guess or as unreadable. A lost deletion is reported as a subject
//!   that is searchable again.
//!
//! Damaged files are hard-linked into `DIR/damaged/` with a timestamp before the new
//! manifest is committed, with a JSON report beside them; the originals then go as
//! orphans. A repair of a healthy gallery changes nothing and says so.

use super::DAMAGED_DIR;
use super::files::{keep_aside, lock_dir, remove_orphans, write_segment_file};
use super::manifest::{MANIFEST_COPY_FILE, MANIFEST_FILE, Manifest, SegmentEntry, segment_file_name, wal_file_name};
use super::reader::{expected_log_header, identity_matches, open_segment};
use super::segment::Segment;
use super::wal::{self, WalHeader, WalRecord, WalWriter};
use crate::error::{Error, Result};
use crate::storage::Storage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Something a repair could not keep.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Loss {
    /// The damaged file.
    pub file: String,
    /// The subject affected, when known.
    pub subject: Option<String>,
    /// Whether `subject` was read from checksummed bytes (otherwise a best guess from a
    /// damaged record).
    pub subject_verified: bool,
    /// What was lost, in words.
    pub what: String,
}

/// What a repair did.
#[derive(Clone, Debug, Serialize)]
pub struct RepairReport {
    pub gallery: String,
    /// Nothing needed repair; nothing was changed.
    pub clean: bool,
    /// What was done, in order.
    pub actions: Vec<String>,
    /// Where the damaged files are kept.
    pub kept_aside: Vec<String>,
    /// What was lost.
    pub lost: Vec<Loss>,
    /// The JSON copy of this report under `damaged/`.
    pub report_file: Option<String>,
}

impl RepairReport {
    /// Subjects named as affected (verified or guessed), sorted and unique.
    pub fn subjects(&self) -> Vec<&str> {
        let mut s: Vec<&str> = self.lost.iter().filter_map(|l| l.subject.as_deref()).collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// Repair the gallery in `dir` (taking its writer lock). See the module docs.
pub fn repair(dir: &Path, storage: &Storage) -> Result<RepairReport> {
    if !dir.join(MANIFEST_FILE).exists() && !dir.join(MANIFEST_COPY_FILE).exists() {
        return Err(Error::NotFound(format!(
            "{} is not a biogate gallery (no {MANIFEST_FILE} and no {MANIFEST_COPY_FILE})",
            dir.display()
        )));
    }
    let _lock = lock_dir(dir)?;
    let mut report = RepairReport {
        gallery: dir.display().to_string(),
        clean: true,
        actions: Vec::new(),
        kept_aside: Vec::new(),
        lost: Vec::new(),
        report_file: None,
    };
    let mut damaged_files = Vec::new();

    // 1. The manifest.
    let primary = Manifest::load_file(dir, MANIFEST_FILE);
    let copy = Manifest::load_file(dir, MANIFEST_COPY_FILE);
    let mut manifest = match (primary, copy) {
        (Ok(m), copy) => {
            if copy.as_ref().ok() != Some(&m) {
                report
                    .actions
                    .push(format!("rewrote {MANIFEST_COPY_FILE} from {MANIFEST_FILE}"));
            }
            m
        }
        (Err(primary_error), Ok(copy)) => {
            if dir.join(MANIFEST_FILE).exists() {
                damaged_files.push(dir.join(MANIFEST_FILE));
            }
            report.clean = false;
            report.actions.push(format!(
                "restored {MANIFEST_FILE} from {MANIFEST_COPY_FILE} ({primary_error})"
            ));
            copy
        }
        (Err(primary_error), Err(copy_error)) => {
            return Err(Error::Corrupt(format!(
                "{}: cannot repair: {MANIFEST_FILE} ({primary_error}) and {MANIFEST_COPY_FILE} ({copy_error}) \
                 are both unusable, and nothing else says which files make up the gallery; restore them \
                 from a backup",
                dir.display()
            )));
        }
    };
    let original = manifest.clone();

    // 2. Segments.
    let mut segments = Vec::with_capacity(manifest.segments.len());
    for entry in original.segments.clone() {
        let path = dir.join(&entry.file);
        match open_segment(dir, &original, &entry).and_then(|seg| seg.verify_metadata().map(|()| seg)) {
            Ok(seg) => {
                let bad = seg.bad_chunks();
                if bad.is_empty() {
                    segments.push(entry);
                    continue;
                }
                report.clean = false;
                let kept = rewrite_without_chunks(storage, dir, &mut manifest, &seg, &bad, &mut report)?;
                damaged_files.push(path);
                if let Some(kept) = kept {
                    segments.push(SegmentEntry { id: entry.id, ..kept });
                }
            }
            Err(e) => {
                report.clean = false;
                if path.exists()
                    && let Some(kept) = restore_header(storage, dir, &mut manifest, &original, &entry)?
                {
                    report.actions.push(format!(
                        "rewrote segment {} as {} with its header restored from its intact copy ({e})",
                        entry.file, kept.file
                    ));
                    damaged_files.push(path);
                    segments.push(kept);
                    continue;
                }
                report.actions.push(format!("dropped segment {} ({e})", entry.file));
                // Another segment in its place names its own subjects, not the lost ones.
                let foreign = Segment::open(&path).is_ok_and(|s| !identity_matches(&entry, &s));
                match (path.exists() && !foreign)
                    .then(|| Segment::salvage_subject_ids(&path))
                    .flatten()
                {
                    Some(ids) => report.lost.extend(ids.into_iter().map(|s| Loss {
                        file: entry.file.clone(),
                        subject: Some(s),
                        subject_verified: true,
                        what: "every template of the subject in this segment".into(),
                    })),
                    None if foreign => report.lost.push(Loss {
                        file: entry.file.clone(),
                        subject: None,
                        subject_verified: false,
                        what: format!(
                            "{} templates; another segment's file is in its place, so the subjects it held \
                             are not known",
                            entry.rows
                        ),
                    }),
                    None => report.lost.push(Loss {
                        file: entry.file.clone(),
                        subject: None,
                        subject_verified: false,
                        what: format!("{} templates; the segment's subject ids are not legible", entry.rows),
                    }),
                }
                if path.exists() {
                    damaged_files.push(path);
                }
            }
        }
    }
    // Counted again by the next open (and kept by its writer).
    manifest.sealed_subjects = None;
    manifest.segments = segments;

    // 3. The log.
    let log_path = dir.join(&original.wal);
    let read = wal::read(&log_path, &expected_log_header(&original));
    // A replica's log names the last replicated batch its state includes
    // (`WalRecord::Applied`); after a loss that is no longer true, so the marks go and
    // the replica is rebuilt from its shard's log instead of trusting them.
    let marked_despite_loss = !report.lost.is_empty()
        && read
            .as_ref()
            .is_ok_and(|l| l.records.iter().any(|r| matches!(r, WalRecord::Applied { .. })));
    let rewrite = match read {
        Err(e) => Some((e.to_string(), None)),
        Ok(l) if marked_despite_loss => Some((
            "its replication marks no longer describe the repaired state".to_owned(),
            Some(l),
        )),
        Ok(_) => None,
    };
    if let Some((e, intact)) = rewrite {
        report.clean = false;
        let (records, first_seq) = if let Some(l) = intact {
            (l.records, l.header.first_seq)
        } else if log_path.exists() {
            let s = wal::salvage(&log_path, original.dim)?;
            for lost in &s.lost {
                report.lost.push(Loss {
                    file: original.wal.clone(),
                    subject: lost.subject.clone(),
                    subject_verified: lost.subject_verified,
                    what: match (lost.kind, lost.seq) {
                        (Some("delete"), _) => "a deletion: the subject is searchable again; delete it again".into(),
                        (Some("replication mark"), _) => {
                            "a replication mark: a cluster replica is rebuilt from its shard's log".into()
                        }
                        (_, Some(seq)) => {
                            format!("templates enrolled by log record {seq} (byte offset {})", lost.offset)
                        }
                        _ => format!("a log record at byte offset {} whose head is damaged", lost.offset),
                    },
                });
            }
            if s.unreadable > 0 {
                report.lost.push(Loss {
                    file: original.wal.clone(),
                    subject: None,
                    subject_verified: false,
                    what: format!("{} more log records of which nothing is legible", s.unreadable),
                });
            }
            // Damaged bytes that no record accounts for may have held records too.
            for &(from, to) in &s.damaged {
                if !s.lost.iter().any(|l| l.offset == from) && s.unreadable == 0 {
                    report.lost.push(Loss {
                        file: original.wal.clone(),
                        subject: None,
                        subject_verified: false,
                        what: format!(
                            "bytes {from}..{to} of the log are unreadable: any enrollments or deletions in them \
                             are lost (subjects unknown)"
                        ),
                    });
                }
            }
            if s.header.is_none() && s.records.is_empty() && s.damaged.is_empty() {
                report.lost.push(Loss {
                    file: original.wal.clone(),
                    subject: None,
                    subject_verified: false,
                    what: "the log's header is unreadable and no record survives: whatever it held is lost \
                           (subjects unknown)"
                        .into(),
                });
            }
            damaged_files.push(log_path.clone());
            let first = s
                .header
                .map_or(s.next_seq.saturating_sub(s.records.len() as u64), |h| h.first_seq);
            (s.records, first)
        } else {
            report.lost.push(Loss {
                file: original.wal.clone(),
                subject: None,
                subject_verified: false,
                what: "the log is missing: enrollments and deletions since the last seal are lost".into(),
            });
            (Vec::new(), 1)
        };
        let had_marks = records.iter().any(|r| matches!(r, WalRecord::Applied { .. }));
        let records: Vec<WalRecord> = if report.lost.is_empty() {
            records
        } else {
            records
                .into_iter()
                .filter(|r| !matches!(r, WalRecord::Applied { .. }))
                .collect()
        };
        if had_marks && !report.lost.is_empty() {
            report
                .actions
                .push("dropped the log's replication marks: a cluster replica is rebuilt from its shard's log".into());
        }
        let log_id = manifest.next_file_id;
        manifest.next_file_id += 1;
        let new_path = dir.join(wal_file_name(log_id));
        let header = WalHeader::expected(manifest.gallery_id, log_id, first_seq, manifest.dim, manifest.dtype);
        let mut writer = WalWriter::create(storage, &new_path, &header)?;
        // One group per record: every record kept was acknowledged.
        for r in &records {
            writer.append(std::slice::from_ref(r))?;
        }
        storage.sync_dir(dir)?;
        report.actions.push(format!(
            "wrote log {} with the {} intact records of {} ({e})",
            wal_file_name(log_id),
            records.len(),
            original.wal
        ));
        manifest.wal = wal_file_name(log_id);
        manifest.wal_id = log_id;
    }

    if report.clean && report.actions.is_empty() {
        remove_orphans(storage, dir, &manifest, None)?;
        return Ok(report);
    }

    // 4. Keep the damaged files aside, write the report beside them, then commit.
    for f in &damaged_files {
        let kept = keep_aside(storage, dir, f)?;
        report.kept_aside.push(kept.display().to_string());
    }
    if !report.clean {
        let path = dir
            .join(DAMAGED_DIR)
            .join(format!("{}-repair.json", crate::storage::utc_timestamp()));
        report.report_file = Some(path.display().to_string());
        let json = serde_json::to_vec_pretty(&report).expect("report serialises");
        storage.create_dir_all(&dir.join(DAMAGED_DIR))?;
        storage.write_file_atomically(&path, &json)?;
    }
    manifest.commit(storage, dir)?;
    remove_orphans(storage, dir, &manifest, None)?;
    tracing::warn!(
        gallery = %dir.display(),
        actions = report.actions.len(),
        lost = report.lost.len(),
        "repaired gallery"
    );
    Ok(report)
}

/// A segment that fails to open because its header (or the header's copy at its end)
/// is damaged: write it again with the intact copy in both places, under the same
/// segment id, if everything then verifies. Returns its new manifest entry.
fn restore_header(
    storage: &Storage,
    dir: &Path,
    manifest: &mut Manifest,
    original: &Manifest,
    entry: &SegmentEntry,
) -> Result<Option<SegmentEntry>> {
    let Some(bytes) = Segment::with_header_restored(&dir.join(&entry.file)) else {
        return Ok(None);
    };
    let file = segment_file_name(manifest.next_file_id);
    let path = dir.join(&file);
    storage.write_file_atomically(&path, &bytes)?;
    // The restored header is the one the manifest names (its identity is checked).
    let candidate = SegmentEntry {
        file: file.clone(),
        ..entry.clone()
    };
    let intact = open_segment(dir, original, &candidate).and_then(|seg| seg.check());
    if intact.is_err() {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    manifest.next_file_id += 1;
    Ok(Some(candidate))
}

/// Rewrite `seg` without the rows of its `bad` chunks into a new file; returns its
/// manifest entry (None if no row is left).
fn rewrite_without_chunks(
    storage: &Storage,
    dir: &Path,
    manifest: &mut Manifest,
    seg: &Segment,
    bad: &[u64],
    report: &mut RepairReport,
) -> Result<Option<SegmentEntry>> {
    let chunk_rows = seg.chunk_rows() as usize;
    let is_bad = |row: usize| bad.binary_search(&((row / chunk_rows) as u64)).is_ok();
    let mut lost: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for (row, &o) in seg.row_subjects().iter().enumerate() {
        let e = lost.entry(o).or_default();
        e.1 += 1;
        if is_bad(row) {
            e.0 += 1;
        }
    }
    let name = seg
        .path()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for (&o, &(gone, of)) in &lost {
        if gone > 0 {
            report.lost.push(Loss {
                file: name.clone(),
                subject: Some(seg.subject_id(o).to_owned()),
                subject_verified: true,
                what: if gone == of {
                    format!("all {of} of the subject's templates in this segment")
                } else {
                    format!("{gone} of the subject's {of} templates in this segment")
                },
            });
        }
    }
    let keep = (0..seg.rows()).filter(|&r| !is_bad(r)).count();
    let rows_lost = seg.rows() - keep;
    if keep == 0 {
        report
            .actions
            .push(format!("dropped segment {name}: every row chunk is damaged"));
        return Ok(None);
    }
    let file = segment_file_name(manifest.next_file_id);
    manifest.next_file_id += 1;
    write_segment_file(storage, dir, manifest, &file, |w| {
        for r in (0..seg.rows()).filter(|&r| !is_bad(r)) {
            w.push(seg.row(r), seg.scales()[r], seg.subject_id(seg.row_subjects()[r]))?;
        }
        Ok(())
    })?;
    report.actions.push(format!(
        "rewrote segment {name} as {file} without its {} damaged chunk(s) ({rows_lost} rows)",
        bad.len()
    ));
    let written = Segment::open(&dir.join(&file))?;
    Ok(Some(SegmentEntry::of(0, &file, &written)))
}
