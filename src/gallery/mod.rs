//! The on-disk gallery store: one directory per gallery.
//!
//! ```text
//! DIR/LOCK             held exclusively by the one writer process
//! DIR/MANIFEST         which segments and which log make up the gallery (atomic)
//! DIR/MANIFEST.copy    its copy, for `repair` when MANIFEST is damaged
//! DIR/seg-NNNNNN.bgs   sealed, memory-mapped segments (see format.rs)
//! DIR/wal-NNNNNN.log   the append log since the last seal or compaction (see wal.rs)
//! DIR/damaged/         what a repair moved aside (never deleted), with its report
//! ```
//!
//! Writes go through [`Gallery`] (the writer; exclusive lock), and every byte it writes
//! goes through one [`Storage`]. Searches read an immutable [`Snapshot`]:
//! [`Gallery::snapshot`] in the writer's process, or [`open_snapshot`] from any other
//! process without taking the lock.

pub mod format;
pub mod identity;
pub mod manifest;
pub mod mapguard;
pub mod memtable;
pub mod origin;
pub mod repair;
pub mod segment;
pub mod snapshot;
pub mod wal;

use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use crate::template::{Dtype, check_dim, check_subject_id, encode_row, normalize_into, row_stride};
use identity::FileIdentity;
use manifest::{Committed, Manifest, SegmentEntry, segment_file_name, wal_file_name};
use memtable::MemTable;
use rayon::prelude::*;
use segment::{Segment, SegmentWriter};
pub use snapshot::{LiveRow, Origin, SegmentView, Slab, SlabIdentity, Snapshot, SubjectIds};
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wal::{LogContents, WalHeader, WalRecord, WalWriter};

/// Folder inside a gallery where a repair keeps what it moved aside.
pub const DAMAGED_DIR: &str = "damaged";

const LOCK_FILE: &str = "LOCK";
/// How long to wait for a lock that looks held before reporting another writer.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Templates for one subject, as given by a caller (not yet normalised).
#[derive(Clone, Debug)]
pub struct Enrollment {
    pub subject: String,
    /// One or more templates, `dim` values each, row-major.
    pub templates: Vec<f32>,
}

/// A source of rows to import in bulk (a .npy file plus an id list, or memory).
pub trait ImportSource: Send {
    /// Template dimension of the source.
    fn dim(&self) -> usize;
    /// Total rows, if known (for progress).
    fn rows_hint(&self) -> Option<u64>;
    /// Append up to `max_rows` rows to `values` (f32, `dim` each) and their subject ids to
    /// `ids`; returns how many rows were appended (0 at the end).
    fn read_chunk(&mut self, max_rows: usize, values: &mut Vec<f32>, ids: &mut Vec<String>) -> Result<usize>;
    /// What to call the source in error messages (e.g. the file name).
    fn label(&self) -> String {
        "import".to_owned()
    }
}

/// How an import treats subjects the gallery already has.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// Allow adding templates to subjects already enrolled (otherwise an error: an
    /// accidental second import of the same file is the common case).
    pub add_to_existing: bool,
}

/// What an import did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    pub rows: u64,
    pub subjects: u64,
    pub segment: String,
}

/// What a compaction did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompactReport {
    pub rows_kept: u64,
    pub rows_dropped: u64,
    pub segments_before: usize,
    pub segments_after: usize,
}

/// Summary of a gallery, as `gallery info` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GalleryInfo {
    pub path: String,
    pub dim: usize,
    pub dtype: Dtype,
    pub rows: u64,
    pub subjects: u64,
    pub segments: usize,
    pub log_rows: u64,
    pub deleted_subjects_pending: usize,
    pub bytes_on_disk: u64,
    /// Things worth knowing that are not damage (a torn log tail the next writer cuts,
    /// a stale manifest copy the next writer rewrites).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The writer's handle on a gallery directory.
pub struct Gallery {
    dir: PathBuf,
    _lock: File,
    storage: Storage,
    manifest: Manifest,
    segments: Vec<SegmentView>,
    tombstones: usize,
    memtable: Arc<MemTable>,
    wal: WalWriter,
    /// The log file as opened (to notice it being changed under the process).
    wal_identity: FileIdentity,
    snapshot: Arc<Snapshot>,
    /// Set when a commit's outcome is unknown: no further writes until reopened.
    poisoned: Option<String>,
    /// The manifest's copy lags behind: keep the files it names.
    copy_stale: bool,
}

/// Everything read from a gallery directory (shared by the writer and readers).
struct LoadedState {
    manifest: Manifest,
    segments: Vec<SegmentView>,
    tombstones: usize,
    memtable: MemTable,
    log: LogContents,
}

impl LoadedState {
    fn into_snapshot(self) -> Snapshot {
        Snapshot::new(
            self.manifest.dim,
            self.manifest.dtype,
            self.segments,
            Arc::new(self.memtable),
        )
    }
}

/// A log to read back (see [`Gallery::log_probe`]).
pub struct LogProbe {
    path: PathBuf,
    header: WalHeader,
    durable_len: u64,
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

/// Open a segment the manifest names, checking that it is the one it names.
fn open_segment(dir: &Path, manifest: &Manifest, entry: &SegmentEntry) -> Result<Segment> {
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
    Ok(seg)
}

/// The header the manifest's active log must carry.
fn expected_log_header(manifest: &Manifest) -> WalHeader {
    WalHeader::expected(manifest.gallery_id, manifest.wal_id, 0, manifest.dim, manifest.dtype)
}

fn load_state(dir: &Path) -> Result<LoadedState> {
    let manifest = Manifest::load(dir)?;
    check_dim(manifest.dim)?;
    let mut segments = Vec::with_capacity(manifest.segments.len());
    for entry in &manifest.segments {
        segments.push(SegmentView {
            segment: Arc::new(open_segment(dir, &manifest, entry)?),
            dead_subjects: Vec::new(),
        });
    }
    let log = wal::read(&dir.join(&manifest.wal), &expected_log_header(&manifest))?;
    let mut memtable = MemTable::new(manifest.dtype, manifest.dim);
    let mut tombstones = 0;
    for record in &log.records {
        apply(record, &manifest, &mut segments, &mut memtable, &mut tombstones)?;
    }
    memtable.refresh_ranks();
    Ok(LoadedState {
        manifest,
        segments,
        tombstones,
        memtable,
        log,
    })
}

/// Apply one logged operation to the in-memory state.
fn apply(
    record: &WalRecord,
    manifest: &Manifest,
    segments: &mut [SegmentView],
    memtable: &mut MemTable,
    tombstones: &mut usize,
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
            memtable.push(subject, templates);
        }
        WalRecord::Delete {
            subject,
            segments_before,
        } => {
            *tombstones += 1;
            memtable.delete(subject);
            for (view, entry) in segments.iter_mut().zip(&manifest.segments) {
                if entry.id < *segments_before
                    && let Some(o) = view.segment.find_subject(subject)
                    && let Err(at) = view.dead_subjects.binary_search(&o)
                {
                    view.dead_subjects.insert(at, o);
                }
            }
        }
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
            Ok(s) => return Ok(s.into_snapshot()),
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
    let mut notes = Vec::new();
    if state.log.torn_bytes() > 0 {
        notes.push(format!(
            "{}: a torn tail of {} bytes (an interrupted, never acknowledged write) follows the last \
             intact record; the next writer cuts it",
            dir.join(&state.manifest.wal).display(),
            state.log.torn_bytes()
        ));
    }
    if !state.manifest.copy_matches(dir) {
        notes.push(format!(
            "{}: the manifest's copy is missing, damaged or stale; the next writer rewrites it",
            dir.join(manifest::MANIFEST_COPY_FILE).display()
        ));
    }
    let tombstones = state.tombstones;
    let manifest = state.manifest.clone();
    let mut info = info_of(dir, &manifest, &state.into_snapshot(), tombstones);
    info.notes = notes;
    Ok(info)
}

fn info_of(dir: &Path, manifest: &Manifest, snapshot: &Snapshot, tombstones: usize) -> GalleryInfo {
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
    GalleryInfo {
        path: dir.display().to_string(),
        dim: snapshot.dim(),
        dtype: snapshot.dtype(),
        rows: snapshot.live_rows() as u64,
        subjects: snapshot.live_subjects() as u64,
        segments: snapshot.segments().len(),
        log_rows: snapshot.memtable().rows() as u64,
        deleted_subjects_pending: tombstones,
        bytes_on_disk: bytes,
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
        &state.into_snapshot(),
        tombstones,
    ))
}

pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", path.display()))?;
    // The lock belongs to the open file description, which a child forked by any thread
    // of the holder shares until it execs; so a lock just released can look held for a
    // moment. Retry briefly before reporting another writer.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir.display().to_string())),
            Err(std::fs::TryLockError::Error(e)) => return Err(e).ctx(|| format!("locking {}", path.display())),
        }
    }
}

impl Gallery {
    /// Create a new, empty gallery in `dir` (created if missing; must hold no gallery).
    pub fn create(dir: &Path, dim: usize, dtype: Dtype) -> Result<Gallery> {
        Gallery::create_with(dir, dim, dtype, Storage::default())
    }

    /// [`Gallery::create`] writing through `storage`.
    pub fn create_with(dir: &Path, dim: usize, dtype: Dtype, storage: Storage) -> Result<Gallery> {
        check_dim(dim)?;
        storage.create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        if dir.join(manifest::MANIFEST_FILE).exists() || dir.join(manifest::MANIFEST_COPY_FILE).exists() {
            return Err(Error::AlreadyExists(format!("a gallery in {}", dir.display())));
        }
        let manifest = Manifest::new(dim, dtype, rand::random());
        let header = WalHeader::expected(manifest.gallery_id, manifest.wal_id, 1, dim, dtype);
        WalWriter::create(&storage, &dir.join(&manifest.wal), &header)?;
        storage.sync_dir(dir)?;
        manifest.commit(&storage, dir)?;
        drop(lock);
        Gallery::open_with(dir, storage)
    }

    /// Open the gallery in `dir` as its one writer: takes the lock, cuts a torn log
    /// tail, rewrites a stale manifest copy, removes files left by interrupted imports
    /// or compactions. Damage anywhere is an error naming the file; nothing is cut.
    pub fn open(dir: &Path) -> Result<Gallery> {
        Gallery::open_with(dir, Storage::default())
    }

    /// [`Gallery::open`] writing through `storage`.
    pub fn open_with(dir: &Path, storage: Storage) -> Result<Gallery> {
        if !dir.join(manifest::MANIFEST_FILE).exists() {
            // Load for its clear error without creating a LOCK file.
            Manifest::load(dir)?;
        }
        let lock = lock_dir(dir)?;
        let state = load_state(dir)?;
        if state.log.torn_bytes() > 0 {
            tracing::warn!(
                gallery = %dir.display(),
                bytes = state.log.torn_bytes(),
                "cutting a torn log tail (an interrupted write that was never acknowledged)"
            );
        }
        let wal_path = dir.join(&state.manifest.wal);
        let wal = WalWriter::open(&storage, &wal_path, &state.log)?;
        let wal_identity = File::open(&wal_path)
            .and_then(|f| FileIdentity::of_file(&f))
            .ctx(|| format!("reading {}", wal_path.display()))?;
        let mut copy_stale = false;
        if !state.manifest.copy_matches(dir) {
            tracing::warn!(gallery = %dir.display(), "rewriting the manifest's copy");
            if let Err(e) = state.manifest.refresh_copy(&storage, dir) {
                tracing::warn!(gallery = %dir.display(), error = %e, "could not rewrite the manifest's copy");
                copy_stale = true;
            }
        }
        let memtable = Arc::new(state.memtable);
        let snapshot = Arc::new(Snapshot::new(
            state.manifest.dim,
            state.manifest.dtype,
            state.segments.clone(),
            memtable.clone(),
        ));
        let gallery = Gallery {
            dir: dir.to_path_buf(),
            _lock: lock,
            storage,
            manifest: state.manifest,
            segments: state.segments,
            tombstones: state.tombstones,
            memtable,
            wal,
            wal_identity,
            snapshot,
            poisoned: None,
            copy_stale,
        };
        gallery.remove_orphans();
        Ok(gallery)
    }

    fn publish(&mut self) {
        self.snapshot = Arc::new(Snapshot::new(
            self.manifest.dim,
            self.manifest.dtype,
            self.segments.clone(),
            self.memtable.clone(),
        ));
    }

    /// The current state, for searches. Later writes never change a snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// The gallery's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Template dimension.
    pub fn dim(&self) -> usize {
        self.manifest.dim
    }
    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.manifest.dtype
    }

    /// Summary for `gallery info`.
    pub fn info(&self) -> Result<GalleryInfo> {
        Ok(info_of(&self.dir, &self.manifest, &self.snapshot, self.tombstones))
    }

    /// Why writes are refused, if they are (a storage failure left the state on disk
    /// unknown; reopening the gallery reads what is really there).
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.clone().or_else(|| self.wal.poisoned().map(str::to_owned))
    }

    fn check_writable(&self) -> Result<()> {
        match self.poisoned() {
            Some(why) => Err(Error::Poisoned(why)),
            None => Ok(()),
        }
    }

    /// Whether the files in use are still the ones opened: a segment or the log
    /// replaced, removed, truncated (or written in place and now damaged) under the
    /// process is an error naming the file. A segment written in place but intact is
    /// verified again and kept. Cheap: one stat per file.
    pub fn check_files(&self) -> Result<()> {
        for v in &self.segments {
            v.segment.check_file()?;
        }
        let path = self.dir.join(&self.manifest.wal);
        match self.wal_identity.compare(&path) {
            Some(change @ (identity::FileChange::Removed | identity::FileChange::Replaced)) => {
                Err(Error::corrupt(&path, format!("the log {change} under the process")))
            }
            // The log is ours to grow and write; only a cut below what it acknowledged is foreign.
            _ => match std::fs::metadata(&path) {
                Ok(m) if m.len() < self.wal.durable_len() => Err(Error::corrupt(
                    &path,
                    format!(
                        "the log was truncated under the process to {} bytes (below the {} acknowledged)",
                        m.len(),
                        self.wal.durable_len()
                    ),
                )),
                _ => Ok(()),
            },
        }
    }

    /// What a scrub needs to read the log back without holding the writer: the file,
    /// its expected header, and how much of it was acknowledged so far.
    pub fn log_probe(&self) -> LogProbe {
        LogProbe {
            path: self.dir.join(&self.manifest.wal),
            header: expected_log_header(&self.manifest),
            durable_len: self.wal.durable_len(),
        }
    }

    /// Enroll a batch durably: validates everything first (nothing changes on error),
    /// logs it with one fsync, then makes it visible to the next search. Returns the
    /// number of templates enrolled.
    pub fn enroll(&mut self, batch: &[Enrollment]) -> Result<usize> {
        if batch.is_empty() {
            return Err(Error::invalid("enrollment batch is empty"));
        }
        let dim = self.manifest.dim;
        let mut records = Vec::with_capacity(batch.len());
        let mut total = 0;
        for (i, e) in batch.iter().enumerate() {
            check_subject_id(&e.subject)?;
            if e.templates.is_empty() {
                return Err(Error::invalid(format!(
                    "enrollment {i} (subject {:?}) has no templates",
                    e.subject
                )));
            }
            if !e.templates.len().is_multiple_of(dim) {
                return Err(Error::invalid(format!(
                    "enrollment {i} (subject {:?}) has {} values, not a multiple of the gallery dimension {dim}",
                    e.subject,
                    e.templates.len()
                )));
            }
            wal::check_record_size(&e.subject, e.templates.len())?;
            let mut normalized = vec![0.0f32; e.templates.len()];
            for (t, (src, dst)) in e
                .templates
                .chunks_exact(dim)
                .zip(normalized.chunks_exact_mut(dim))
                .enumerate()
            {
                normalize_into(src, dst, || {
                    format!("enrollment {i} (subject {:?}) template {t}", e.subject)
                })?;
            }
            total += e.templates.len() / dim;
            records.push(WalRecord::Enroll {
                subject: e.subject.clone(),
                templates: normalized,
            });
        }
        self.check_writable()?;
        self.wal.append(&records)?;
        let memtable = Arc::make_mut(&mut self.memtable);
        for r in &records {
            apply(r, &self.manifest, &mut self.segments, memtable, &mut self.tombstones)?;
        }
        memtable.refresh_ranks();
        self.publish();
        Ok(total)
    }

    /// Delete a subject (all its templates), durably. Unknown subject: `NotFound`.
    pub fn delete_subject(&mut self, subject: &str) -> Result<()> {
        check_subject_id(subject)?;
        if !self.snapshot.has_subject(subject) {
            return Err(Error::NotFound(format!(
                "subject {subject:?} in gallery {}",
                self.dir.display()
            )));
        }
        self.check_writable()?;
        let record = WalRecord::Delete {
            subject: subject.to_owned(),
            segments_before: self.manifest.next_file_id,
        };
        self.wal.append(std::slice::from_ref(&record))?;
        let memtable = Arc::make_mut(&mut self.memtable);
        apply(
            &record,
            &self.manifest,
            &mut self.segments,
            memtable,
            &mut self.tombstones,
        )?;
        self.publish();
        Ok(())
    }

    /// Write a new segment file (see [`write_segment_file`]) and map it.
    fn write_segment(&self, file: &str, fill: impl FnOnce(&mut SegmentWriter) -> Result<()>) -> Result<Arc<Segment>> {
        write_segment_file(&self.storage, &self.dir, &self.manifest, file, fill)?;
        Ok(Arc::new(Segment::open(&self.dir.join(file))?))
    }

    /// Commit `manifest` as the gallery's new shape. Nothing else may change in memory
    /// unless this returns Ok. If it is unknown whether a restart would see the new
    /// manifest, the gallery stops accepting writes (see [`Gallery::poisoned`]).
    fn commit(&mut self, manifest: Manifest) -> Result<()> {
        match manifest.commit(&self.storage, &self.dir) {
            Ok(committed) => {
                self.copy_stale = committed == Committed::CopyStale;
                self.manifest = manifest;
                Ok(())
            }
            Err(e @ Error::OutcomeUnknown(_)) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Create log `log_id` (its records numbered on from this writer's), durably; the
    /// manifest does not name it yet.
    fn new_log(&self, log_id: u64) -> Result<(WalWriter, PathBuf)> {
        let path = self.dir.join(wal_file_name(log_id));
        let header = WalHeader::expected(
            self.manifest.gallery_id,
            log_id,
            self.wal.next_seq(),
            self.manifest.dim,
            self.manifest.dtype,
        );
        let writer = WalWriter::create(&self.storage, &path, &header)?;
        self.storage.sync_dir(&self.dir)?;
        Ok((writer, path))
    }

    /// Swap in the log at `path` after the manifest naming it was committed.
    fn switch_log(&mut self, writer: WalWriter, path: &Path) -> Result<()> {
        self.wal = writer;
        self.wal_identity = File::open(path)
            .and_then(|f| FileIdentity::of_file(&f))
            .ctx(|| format!("reading {}", path.display()))?;
        Ok(())
    }

    /// Bulk import: streams rows from `source` into a new sealed segment (normalised and
    /// encoded in parallel, never holding the whole input), then commits it atomically.
    /// Any bad row or duplicate subject aborts the import and leaves the gallery as it was.
    pub fn import(
        &mut self,
        source: &mut dyn ImportSource,
        options: ImportOptions,
        progress: &dyn Fn(u64),
    ) -> Result<ImportReport> {
        let dim = self.manifest.dim;
        if source.dim() != dim {
            return Err(Error::invalid(format!(
                "templates have dimension {}, the gallery has dimension {dim}",
                source.dim()
            )));
        }
        self.check_writable()?;
        let id = self.manifest.next_file_id;
        let file = segment_file_name(id);
        let mut counts = (0, 0);
        let segment = self.write_segment(&file, |writer| {
            counts = self.write_import(source, options, progress, writer)?;
            Ok(())
        })?;
        let (rows, subjects) = counts;
        let mut manifest = self.manifest.clone();
        manifest.segments.push(SegmentEntry {
            id,
            file: file.clone(),
            rows,
        });
        manifest.next_file_id += 1;
        if let Err(e) = self.commit(manifest) {
            if !matches!(e, Error::OutcomeUnknown(_)) {
                let _ = std::fs::remove_file(self.dir.join(&file));
            }
            return Err(e);
        }
        self.segments.push(SegmentView {
            segment,
            dead_subjects: Vec::new(),
        });
        self.publish();
        Ok(ImportReport {
            rows,
            subjects,
            segment: file,
        })
    }

    fn write_import(
        &self,
        source: &mut dyn ImportSource,
        options: ImportOptions,
        progress: &dyn Fn(u64),
        writer: &mut SegmentWriter,
    ) -> Result<(u64, u64)> {
        const CHUNK: usize = 4096;
        let (dim, dtype) = (self.manifest.dim, self.manifest.dtype);
        let stride = row_stride(dtype, dim);
        let mut encoded = vec![0u8; CHUNK * stride];
        let mut scales = vec![0.0f32; CHUNK];
        let mut done = 0u64;
        let label = source.label();
        // A reader thread fills the next chunk while this one is encoded and written, so
        // reading the input and writing the segment overlap (two chunks in flight at most).
        std::thread::scope(|scope| {
            let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Result<(Vec<f32>, Vec<String>)>>(1);
            scope.spawn(move || {
                loop {
                    let (mut values, mut ids) = (Vec::with_capacity(CHUNK * dim), Vec::with_capacity(CHUNK));
                    let read = source.read_chunk(CHUNK, &mut values, &mut ids);
                    let last = !matches!(read, Ok(n) if n > 0);
                    if chunks_tx.send(read.map(|_| (values, ids))).is_err() || last {
                        return;
                    }
                }
            });
            for chunk in chunks_rx {
                let (values, ids) = chunk?;
                let n = ids.len();
                if n == 0 {
                    break;
                }
                for (i, id) in ids.iter().enumerate() {
                    check_subject_id(id).map_err(|e| e.in_context(&format!("{label} row {}", done + i as u64)))?;
                }
                let describe = |i: usize| format!("{label} row {}", done + i as u64);
                encoded[..n * stride]
                    .par_chunks_exact_mut(stride)
                    .zip(values.par_chunks_exact(dim))
                    .zip(scales[..n].par_iter_mut())
                    .enumerate()
                    .try_for_each_init(
                        || vec![0.0f32; dim],
                        |unit, (i, ((out, row), scale))| {
                            normalize_into(row, unit, || describe(i))?;
                            *scale = encode_row(dtype, unit, out);
                            Ok::<(), Error>(())
                        },
                    )?;
                for (i, id) in ids.iter().enumerate() {
                    let first_row = writer.push(&encoded[i * stride..(i + 1) * stride], scales[i], id)?;
                    if first_row && !options.add_to_existing && self.snapshot.has_subject(id) {
                        return Err(Error::AlreadyExists(format!(
                            "subject {id:?} ({label} row {}) is already enrolled in {}; nothing was imported \
                             (pass --add-to-existing to add templates to enrolled subjects)",
                            done + i as u64,
                            self.dir.display()
                        )));
                    }
                }
                done += n as u64;
                progress(done);
            }
            Ok(())
        })?;
        if done == 0 {
            return Err(Error::invalid("the import source has no templates"));
        }
        Ok((done, writer.subjects() as u64))
    }

    /// Rows held in the log (and in memory) since the last seal or compaction.
    pub fn log_rows(&self) -> usize {
        self.memtable.rows()
    }

    /// Seal the log: write its rows into a new segment and start a new log that holds
    /// only the deletions still pending against older segments. Cheap (proportional to
    /// the log, not the gallery), so a server can do it while running; commits
    /// atomically through the manifest. Returns the number of rows sealed.
    pub fn seal_log(&mut self) -> Result<usize> {
        if self.memtable.rows() == 0 {
            return Ok(0);
        }
        self.rewrite_log(false)
    }

    /// Write what this process holds in memory for the log (its rows and pending
    /// deletions) into a new segment and a new log, keeping the old log file aside in
    /// `damaged/` instead of removing it: how a running server repairs a log damaged on
    /// disk without losing what it acknowledged. Returns the number of rows sealed.
    pub fn rewrite_log_from_memory(&mut self) -> Result<usize> {
        self.rewrite_log(true)
    }

    fn rewrite_log(&mut self, keep_old_log: bool) -> Result<usize> {
        self.check_writable()?;
        let rows = self.memtable.rows();
        let mut id = self.manifest.next_file_id;
        let mut manifest = self.manifest.clone();
        let mut sealed = None;
        if rows > 0 {
            let table = self.memtable.clone();
            let file = segment_file_name(id);
            let segment = self.write_segment(&file, |writer| {
                let stride = table.stride();
                for r in 0..rows {
                    let subject = &table.subject_ids()[table.row_subjects()[r] as usize];
                    writer.push(&table.data()[r * stride..(r + 1) * stride], table.scales()[r], subject)?;
                }
                Ok(())
            })?;
            manifest.segments.push(SegmentEntry {
                id,
                file: file.clone(),
                rows: rows as u64,
            });
            sealed = Some((segment, file));
            id += 1;
        }
        // Deletions pending against the older segments, once per subject, marked so they
        // reach every segment that existed when the subject was deleted (and none newer).
        let mut pending: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for (view, entry) in self.segments.iter().zip(&self.manifest.segments) {
            for &o in &view.dead_subjects {
                let mark = pending.entry(view.segment.subject_id(o)).or_insert(0);
                *mark = (*mark).max(entry.id + 1);
            }
        }
        let records: Vec<WalRecord> = pending
            .iter()
            .map(|(s, &before)| WalRecord::Delete {
                subject: (*s).to_owned(),
                segments_before: before,
            })
            .collect();
        let cleanup = |dir: &Path, sealed: &Option<(Arc<Segment>, String)>, log: Option<&Path>| {
            if let Some((_, f)) = sealed {
                let _ = std::fs::remove_file(dir.join(f));
            }
            if let Some(l) = log {
                let _ = std::fs::remove_file(l);
            }
        };
        let (mut wal, wal_path) = match self.new_log(id) {
            Ok(w) => w,
            Err(e) => {
                cleanup(&self.dir, &sealed, Some(&self.dir.join(wal_file_name(id))));
                return Err(e);
            }
        };
        if let Err(e) = wal.append(&records) {
            drop(wal);
            cleanup(&self.dir, &sealed, Some(&wal_path));
            return Err(e);
        }
        if keep_old_log {
            let old = self.dir.join(&self.manifest.wal);
            if let Err(e) = keep_aside(&self.storage, &self.dir, &old) {
                cleanup(&self.dir, &sealed, Some(&wal_path));
                return Err(e);
            }
        }
        manifest.wal = wal_file_name(id);
        manifest.wal_id = id;
        manifest.next_file_id = id + 1;
        if let Err(e) = self.commit(manifest) {
            if !matches!(e, Error::OutcomeUnknown(_)) {
                cleanup(&self.dir, &sealed, Some(&wal_path));
            }
            return Err(e);
        }
        // Committed: the new segment replaces the log's rows.
        self.switch_log(wal, &wal_path)?;
        if let Some((segment, _)) = sealed {
            self.segments.push(SegmentView {
                segment,
                dead_subjects: Vec::new(),
            });
        }
        self.tombstones = records.len();
        self.memtable = Arc::new(MemTable::new(self.manifest.dtype, self.manifest.dim));
        self.publish();
        self.remove_orphans();
        Ok(rows)
    }

    /// Rewrite every live row (segments minus deletions, plus the log's rows) into one
    /// new segment and start an empty log; commits atomically through the manifest.
    /// Rows are verified before they are copied, so damage is never sealed into a new
    /// file with fresh checksums.
    pub fn compact(&mut self) -> Result<CompactReport> {
        self.check_writable()?;
        let snapshot = self.snapshot.clone();
        snapshot.ensure_verified()?;
        let id = self.manifest.next_file_id;
        let wal_id = id + 1;
        let file = segment_file_name(id);
        let total_rows: usize = snapshot.slabs().iter().map(|s| s.rows()).sum();
        let mut kept = 0u64;
        let mut manifest = self.manifest.clone();
        manifest.segments.clear();
        let mut new_segments = Vec::new();
        let live_rows = snapshot.live_rows();
        if live_rows > 0 {
            let segment = self.write_segment(&file, |writer| {
                for (_, row) in snapshot.each_live_row() {
                    writer.push(row.bytes, row.scale, row.subject)?;
                    kept += 1;
                }
                snapshot.check_reads()
            })?;
            new_segments.push(SegmentView {
                segment,
                dead_subjects: Vec::new(),
            });
            manifest.segments.push(SegmentEntry {
                id,
                file: file.clone(),
                rows: kept,
            });
        }
        let (wal, wal_path) = match self.new_log(wal_id) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(self.dir.join(&file));
                let _ = std::fs::remove_file(self.dir.join(wal_file_name(wal_id)));
                return Err(e);
            }
        };
        manifest.wal = wal_file_name(wal_id);
        manifest.wal_id = wal_id;
        manifest.next_file_id = wal_id + 1;
        let segments_before = self.manifest.segments.len();
        if let Err(e) = self.commit(manifest) {
            if !matches!(e, Error::OutcomeUnknown(_)) {
                let _ = std::fs::remove_file(self.dir.join(&file));
                let _ = std::fs::remove_file(&wal_path);
            }
            return Err(e);
        }
        // Committed. Old files are now orphans; remove them.
        self.switch_log(wal, &wal_path)?;
        let report = CompactReport {
            rows_kept: kept,
            rows_dropped: total_rows as u64 - kept,
            segments_before,
            segments_after: new_segments.len(),
        };
        self.segments = new_segments;
        self.memtable = Arc::new(MemTable::new(self.manifest.dtype, self.manifest.dim));
        self.tombstones = 0;
        self.publish();
        self.remove_orphans();
        Ok(report)
    }

    /// Remove files of ours that the manifest does not name (interrupted imports and
    /// compactions, logs and segments replaced by a compaction). Only while the
    /// manifest's copy is current (it might name them otherwise). Failures are logged,
    /// not returned: the commit before this stands either way.
    fn remove_orphans(&self) {
        if self.copy_stale {
            return;
        }
        if let Err(e) = remove_orphans(&self.storage, &self.dir, &self.manifest) {
            tracing::warn!(gallery = %self.dir.display(), error = %e, "could not remove unreferenced files");
        }
    }
}

/// Write segment file `file` of the gallery in `dir` with the rows `fill` pushes:
/// streamed to `file.tmp`, fsynced, renamed into place and the rename made durable.
/// Nothing names it until the caller commits a manifest that does. On error the
/// temporary file is removed and nothing else changed.
pub(crate) fn write_segment_file(
    storage: &Storage,
    dir: &Path,
    manifest: &Manifest,
    file: &str,
    fill: impl FnOnce(&mut SegmentWriter) -> Result<()>,
) -> Result<()> {
    let tmp = dir.join(format!("{file}.tmp"));
    let written = SegmentWriter::create(storage, &tmp, manifest.dtype, manifest.dim, manifest.gallery_id)
        .and_then(|mut writer| {
            fill(&mut writer)?;
            writer.finish()
        })
        .and_then(|_| storage.rename(&tmp, &dir.join(file)))
        .and_then(|_| storage.sync_dir(dir));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Keep a file of the gallery in `dir` under `damaged/` (a hard link: the bytes stay
/// after the file's own name is removed as an orphan). Returns where it is kept.
pub(crate) fn keep_aside(storage: &Storage, dir: &Path, path: &Path) -> Result<PathBuf> {
    let aside = dir.join(DAMAGED_DIR);
    storage.create_dir_all(&aside)?;
    let name = format!(
        "{}-{}",
        crate::storage::utc_timestamp(),
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let to = aside.join(name);
    storage.hard_link(path, &to)?;
    storage.sync_dir(&aside)?;
    Ok(to)
}

/// Remove files of ours that the manifest does not name.
pub(crate) fn remove_orphans(storage: &Storage, dir: &Path, manifest: &Manifest) -> Result<()> {
    let keep: HashSet<&str> = manifest
        .segments
        .iter()
        .map(|s| s.file.as_str())
        .chain([manifest.wal.as_str()])
        .collect();
    for entry in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("seg-")
            || name.starts_with("wal-")
            || (name.starts_with("MANIFEST") && name.ends_with(".tmp"));
        if ours && !keep.contains(name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            tracing::info!(gallery = %dir.display(), file = name, "removing unreferenced file");
            storage.remove_file(&entry.path())?;
        }
    }
    Ok(())
}
