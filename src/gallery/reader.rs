//! Reading a gallery directory: the manifest, its segments and the log replayed into
//! memory, verified as they are read. Shared by the writer (which then keeps the state)
//! and by read-only users (`open_snapshot`, `info`, `check`), who take no lock.

use super::GalleryInfo;
use super::manifest::{self, Manifest, SegmentEntry};
use super::memtable::LogTable;
use super::segment::{Segment, subjects_in_order};
use super::snapshot::{Counts, SegmentView, Snapshot, subject_is_live};
use super::wal::{self, LogContents, WalHeader, WalRecord};
use crate::error::{Error, IoContext, Result};
use crate::template::check_dim;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything read from a gallery directory (shared by the writer and readers).
pub(super) struct LoadedState {
    pub(super) manifest: Manifest,
    pub(super) segments: Vec<SegmentView>,
    pub(super) tombstones: usize,
    pub(super) memtable: LogTable,
    pub(super) log: LogContents,
    /// Distinct subject ids in the segments, deletions not applied.
    pub(super) sealed_subjects: u64,
    pub(super) counts: Counts,
}

impl LoadedState {
    /// The snapshot of this state, with the retention state read from `dir` and the
    /// subjects expired by now hidden.
    fn into_snapshot(mut self, dir: &Path) -> Result<Snapshot> {
        let expiry = std::sync::Arc::new(super::expiry::Expiry::load(dir)?);
        let now = crate::time_text::now_ms();
        super::expiry::hide_expired(
            &expiry,
            i64::MIN,
            now,
            &mut self.segments,
            &mut self.memtable,
            &mut self.counts,
        );
        Ok(Snapshot::new(
            self.manifest.dim,
            self.manifest.dtype,
            self.segments,
            self.memtable,
            self.counts,
        )
        .with_expiry(expiry, now))
    }
}

/// Distinct subject ids in `segments`, deletions not applied: a merge of their sorted id
/// tables (O(subjects), no hashing). Only after a repair or for an older manifest; the
/// writer otherwise keeps the number in the manifest.
pub(super) fn count_sealed_subjects(segments: &[SegmentView]) -> u64 {
    if let [one] = segments {
        return one.segment.subjects() as u64;
    }
    distinct_ids(segments, false)
}

/// Distinct ids over the segments' sorted id tables (only those with live rows if
/// `live_only`), merged in O(subjects) time and O(segments) memory.
fn distinct_ids(segments: &[SegmentView], live_only: bool) -> u64 {
    let mapped: Vec<&Segment> = segments.iter().map(|v| v.segment.as_ref()).collect();
    let (mut distinct, mut last): (u64, Option<&str>) = (0, None);
    for (id, i, o) in subjects_in_order(&mapped) {
        if last != Some(id) && (!live_only || segments[i].is_live(o)) {
            distinct += 1;
            last = Some(id);
        }
    }
    distinct
}

/// Live templates and subjects counted from the data (what `check` compares the kept
/// counts with): O(rows) reads, O(segments + the log's subjects) memory.
fn recount(segments: &[SegmentView], memtable: &LogTable) -> Counts {
    let sealed_rows: u64 = segments
        .iter()
        .map(|v| v.segment.rows() as u64 - v.deleted.count())
        .sum();
    let log_only = memtable
        .live_subjects()
        .into_iter()
        .filter(|s| !segments.iter().any(|v| v.has_live_subject(s)))
        .count() as u64;
    Counts {
        rows: sealed_rows + memtable.rows() as u64,
        subjects: distinct_ids(segments, true) + log_only,
    }
}

/// A log to read back (see [`Gallery::log_probe`]).
pub struct LogProbe {
    pub(super) path: PathBuf,
    pub(super) header: WalHeader,
    pub(super) durable_len: u64,
}

impl LogProbe {
    /// Read the log and check that everything acknowledged when the probe was taken
    /// reads back intact (appends since only add to it): damage here would lose
    /// enrollments at the next restart.
    pub fn check(&self) -> Result<()> {
        let log = wal::read(&self.path, &self.header)?;
        if log.valid_len < self.durable_len {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "only {} of the {} bytes acknowledged read back intact",
                    log.valid_len, self.durable_len
                ),
            ));
        }
        Ok(())
    }
}

/// What `check` says of the end of a log whose final length was not recorded (see
/// wal/tail.rs): what is proven, and what cannot be told.
fn log_tail_note(path: &Path, log: &LogContents) -> Option<String> {
    let wal::TailProof::Unproven { proven_len } = log.tail else {
        return None;
    };
    let path = path.display();
    Some(if log.torn_bytes() > 0 {
        format!(
            "{path}: the last {} bytes (from byte {}) are an unfinished commit group: a write interrupted \
             by a crash (never acknowledged), or an acknowledged group cut short; cannot tell which, \
             because the log's final length was not recorded (its writer stopped within moments of its \
             last write, or is still writing). Bytes up to {proven_len} are proven acknowledged. The next \
             writer keeps a copy of these bytes in damaged/ and cuts them",
            log.torn_bytes(),
            log.valid_len
        )
    } else {
        let intact_after = match log.valid_len - proven_len {
            0 => String::new(),
            n => format!(" and the {n} bytes after them are intact"),
        };
        format!(
            "{path}: the log's final length was not recorded (its writer stopped within moments of its last \
             write, or is still writing): bytes up to {proven_len} are proven acknowledged{intact_after}; \
             cannot tell whether an acknowledged commit group followed byte {} and was cut off",
            log.valid_len
        )
    })
}

/// Open a segment the manifest names, checking that it is the one it names.
pub(super) fn open_segment(dir: &Path, manifest: &Manifest, entry: &SegmentEntry) -> Result<Segment> {
    let path = dir.join(&entry.file);
    let seg = match Segment::open(&path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::corrupt(&path, "the segment named by the manifest is missing"));
        }
        other => other?,
    };
    if seg.gallery_id() != manifest.gallery_id {
        return Err(Error::corrupt(&path, "the segment belongs to another gallery"));
    }
    if seg.dim() != manifest.dim || seg.dtype() != manifest.dtype || seg.rows() as u64 != entry.rows {
        return Err(Error::corrupt(&path, "segment does not match the manifest"));
    }
    if !identity_matches(entry, &seg) {
        return Err(Error::corrupt(
            &path,
            format!(
                "not the segment the manifest names (segment id {}): its header checksum is {:08x}, the \
                 manifest recorded {:08x}; another valid segment was copied or restored into its place. \
                 Nothing is served from it; `biogate gallery repair` drops it and reports its rows as lost",
                entry.id,
                seg.header_crc(),
                entry.header_crc.unwrap_or_default()
            ),
        ));
    }
    Ok(seg)
}

/// Whether `seg` is the file `entry` names (always, for an entry written before the
/// manifest recorded identities).
pub(super) fn identity_matches(entry: &SegmentEntry, seg: &Segment) -> bool {
    entry.header_crc.is_none_or(|crc| crc == seg.header_crc())
}

/// The header the manifest's active log must carry.
pub(super) fn expected_log_header(manifest: &Manifest) -> WalHeader {
    WalHeader::expected(manifest.gallery_id, manifest.wal_id, 0, manifest.dim, manifest.dtype)
}

pub(super) fn load_state(dir: &Path) -> Result<LoadedState> {
    let manifest = Manifest::load(dir)?;
    check_dim(manifest.dim)?;
    let mut segments = Vec::with_capacity(manifest.segments.len());
    for entry in &manifest.segments {
        segments.push(SegmentView::new(Arc::new(open_segment(dir, &manifest, entry)?)));
    }
    let log = wal::read(&dir.join(&manifest.wal), &expected_log_header(&manifest))?;
    let mut memtable = LogTable::new(manifest.dtype, manifest.dim);
    let mut tombstones = 0;
    let sealed_subjects = match manifest.sealed_subjects {
        Some(n) => n,
        None => count_sealed_subjects(&segments),
    };
    let mut counts = Counts {
        rows: manifest.segments.iter().map(|s| s.rows).sum(),
        subjects: sealed_subjects,
    };
    for record in &log.records {
        apply(
            record,
            &manifest,
            &mut segments,
            &mut memtable,
            &mut tombstones,
            &mut counts,
        )?;
    }
    memtable.refresh_ranks();
    Ok(LoadedState {
        manifest,
        segments,
        tombstones,
        memtable,
        log,
        sealed_subjects,
        counts,
    })
}

/// Apply one logged operation to the in-memory state.
pub(super) fn apply(
    record: &WalRecord,
    manifest: &Manifest,
    segments: &mut [SegmentView],
    memtable: &mut LogTable,
    tombstones: &mut usize,
    counts: &mut Counts,
) -> Result<()> {
    match record {
        WalRecord::Enroll { subject, templates } => {
            if templates.is_empty() || templates.len() % manifest.dim != 0 {
                return Err(Error::Corrupt(format!(
                    "log record for {subject:?} has {} values, not a multiple of dimension {}",
                    templates.len(),
                    manifest.dim
                )));
            }
            let new_subject = !subject_is_live(segments, memtable, subject);
            memtable.push(subject, templates);
            counts.rows += (templates.len() / manifest.dim) as u64;
            counts.subjects += u64::from(new_subject);
        }
        WalRecord::Delete {
            subject,
            segments_before,
        } => {
            *tombstones += 1;
            let was_live = subject_is_live(segments, memtable, subject);
            let mut removed = memtable.delete(subject) as u64;
            for (view, entry) in segments.iter_mut().zip(&manifest.segments) {
                if entry.id < *segments_before {
                    removed += view.delete_subject(subject);
                }
            }
            counts.rows = counts.rows.saturating_sub(removed);
            if was_live && !subject_is_live(segments, memtable, subject) {
                counts.subjects = counts.subjects.saturating_sub(1);
            }
        }
        WalRecord::Applied { .. } => {}
    }
    Ok(())
}

/// Open a read-only snapshot of the gallery in `dir`, without the writer lock (for
/// `identify`, `info` and `check` next to a running writer). Retries if a concurrent
/// compaction replaces files while we read.
pub fn open_snapshot(dir: &Path) -> Result<Snapshot> {
    let mut attempt = 0;
    loop {
        match load_state(dir) {
            Ok(s) => return s.into_snapshot(dir),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempt < 3 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Verify every checksum of the gallery in `dir` (manifest, segment headers, metadata
/// and row data, the log); returns the gallery's info when all is well.
pub fn check(dir: &Path) -> Result<GalleryInfo> {
    let state = load_state(dir)?;
    for view in &state.segments {
        view.segment.check()?;
    }
    let counted = recount(&state.segments, &state.memtable);
    if counted != state.counts {
        return Err(Error::corrupt(
            &dir.join(manifest::MANIFEST_FILE),
            format!(
                "the gallery's kept counts ({} templates, {} subjects) differ from a recount ({} templates, \
                 {} subjects); `biogate gallery repair` counts them again",
                state.counts.rows, state.counts.subjects, counted.rows, counted.subjects
            ),
        ));
    }
    let mut notes = Vec::new();
    if let Some(note) = log_tail_note(&dir.join(&state.manifest.wal), &state.log) {
        notes.push(note);
    }
    if !state.manifest.copy_matches(dir) {
        notes.push(format!(
            "{}: the manifest's copy is missing, damaged or stale; the next writer rewrites it",
            dir.join(manifest::MANIFEST_COPY_FILE).display()
        ));
    }
    let tombstones = state.tombstones;
    let manifest = state.manifest.clone();
    let mut info = info_of(dir, &manifest, &state.into_snapshot(dir)?, tombstones);
    info.notes = notes;
    Ok(info)
}

pub(super) fn info_of(dir: &Path, manifest: &Manifest, snapshot: &Snapshot, tombstones: usize) -> GalleryInfo {
    // The files the manifest names (a directory listing would race a concurrent drop).
    let bytes = manifest
        .segments
        .iter()
        .map(|s| s.file.as_str())
        .chain([
            manifest.wal.as_str(),
            manifest::MANIFEST_FILE,
            manifest::MANIFEST_COPY_FILE,
        ])
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    // Expired subjects are not counted, though their rows are here until a purge.
    let (expired_subjects, expired_rows) = snapshot.expired_counts(crate::time_text::now_ms());
    GalleryInfo {
        path: dir.display().to_string(),
        dim: snapshot.dim(),
        dtype: snapshot.dtype(),
        rows: snapshot.live_rows() as u64 - expired_rows,
        subjects: snapshot.live_subjects() as u64 - expired_subjects,
        segments: snapshot.segments().len(),
        log_rows: snapshot.log().rows() as u64,
        deleted_subjects_pending: tombstones,
        bytes_on_disk: bytes,
        expires_at: snapshot.expiry().gallery_ms.map(crate::time_text::format_time),
        expiring_subjects: snapshot.expiry().subjects.len() as u64,
        notes: Vec::new(),
    }
}

/// A short string that changes whenever the gallery's content may have changed (its
/// manifest, or its log's length): a resumable job over a gallery (dedup) checks it.
pub fn state_fingerprint(dir: &Path) -> Result<String> {
    let path = dir.join(manifest::MANIFEST_FILE);
    let bytes = std::fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
    let manifest = Manifest::load(dir)?;
    let log = dir.join(&manifest.wal);
    let log_len = std::fs::metadata(&log)
        .ctx(|| format!("reading {}", log.display()))?
        .len();
    Ok(format!("{:08x}-{log_len}", crc32fast::hash(&bytes)))
}

/// Gallery info without the writer lock.
pub fn info(dir: &Path) -> Result<GalleryInfo> {
    let state = load_state(dir)?;
    let tombstones = state.tombstones;
    Ok(info_of(
        dir,
        &state.manifest.clone(),
        &state.into_snapshot(dir)?,
        tombstones,
    ))
}
