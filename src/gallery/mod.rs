//! The on-disk gallery store: one directory per gallery.
//!
//! ```text
//! DIR/LOCK             held exclusively by the one writer process
//! DIR/MANIFEST         which segments and which log make up the gallery (atomic)
//! DIR/seg-NNNNNN.bgs   sealed, memory-mapped segments (see format.rs)
//! DIR/wal-NNNNNN.log   the append log since the last compaction (see wal.rs)
//! ```
//!
//! Writes go through [`Gallery`] (the writer; exclusive lock). Searches read an
//! immutable [`Snapshot`]: [`Gallery::snapshot`] in the writer's process, or
//! [`open_snapshot`] from any other process without taking the lock.

pub mod format;
pub mod manifest;
pub mod memtable;
pub mod segment;
pub mod snapshot;
pub mod wal;

use crate::error::{Error, IoContext, Result};
use crate::template::{Dtype, check_dim, check_subject_id, encode_row, normalize_into, row_stride};
use manifest::{Manifest, SegmentEntry, segment_file_name, sync_dir, wal_file_name};
use memtable::MemTable;
use rayon::prelude::*;
use segment::{Segment, SegmentWriter};
pub use snapshot::{Origin, SegmentView, Slab, SlabIdentity, Snapshot, SubjectIds};
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wal::{WalRecord, WalWriter};

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
}

/// The writer's handle on a gallery directory.
pub struct Gallery {
    dir: PathBuf,
    _lock: File,
    manifest: Manifest,
    segments: Vec<SegmentView>,
    tombstones: usize,
    memtable: Arc<MemTable>,
    wal: WalWriter,
    snapshot: Arc<Snapshot>,
}

/// Everything read from a gallery directory (shared by the writer and readers).
struct LoadedState {
    manifest: Manifest,
    segments: Vec<SegmentView>,
    tombstones: usize,
    memtable: MemTable,
    wal_valid_len: u64,
    wal_torn_bytes: u64,
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

fn load_state(dir: &Path) -> Result<LoadedState> {
    let manifest = Manifest::load(dir)?;
    check_dim(manifest.dim)?;
    let mut segments = Vec::with_capacity(manifest.segments.len());
    for entry in &manifest.segments {
        let seg = Segment::open(&dir.join(&entry.file))?;
        if seg.dim() != manifest.dim || seg.dtype() != manifest.dtype || seg.rows() as u64 != entry.rows {
            return Err(Error::corrupt(seg.path(), "segment does not match the manifest"));
        }
        segments.push(SegmentView {
            segment: Arc::new(seg),
            dead_subjects: Vec::new(),
        });
    }
    let contents = wal::read(&dir.join(&manifest.wal))?;
    let mut memtable = MemTable::new(manifest.dtype, manifest.dim);
    let mut tombstones = 0;
    for record in &contents.records {
        apply(record, &manifest, &mut segments, &mut memtable, &mut tombstones)?;
    }
    memtable.refresh_ranks();
    Ok(LoadedState {
        manifest,
        segments,
        tombstones,
        memtable,
        wal_valid_len: contents.valid_len,
        wal_torn_bytes: contents.file_len - contents.valid_len,
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
    if state.wal_torn_bytes > 0 {
        return Err(Error::Corrupt(format!(
            "{}: log has a torn tail of {} bytes after the last intact record (the next writer cuts it)",
            dir.join(&state.manifest.wal).display(),
            state.wal_torn_bytes
        )));
    }
    let tombstones = state.tombstones;
    info_of(dir, &state.into_snapshot(), tombstones)
}

fn info_of(dir: &Path, snapshot: &Snapshot, tombstones: usize) -> Result<GalleryInfo> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok(GalleryInfo {
        path: dir.display().to_string(),
        dim: snapshot.dim(),
        dtype: snapshot.dtype(),
        rows: snapshot.live_rows() as u64,
        subjects: snapshot.live_subjects() as u64,
        segments: snapshot.segments().len(),
        log_rows: snapshot.memtable().rows() as u64,
        deleted_subjects_pending: tombstones,
        bytes_on_disk: bytes,
    })
}

/// Gallery info without the writer lock.
pub fn info(dir: &Path) -> Result<GalleryInfo> {
    let state = load_state(dir)?;
    let tombstones = state.tombstones;
    info_of(dir, &state.into_snapshot(), tombstones)
}

fn lock_dir(dir: &Path) -> Result<File> {
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
        check_dim(dim)?;
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let lock = lock_dir(dir)?;
        if dir.join(manifest::MANIFEST_FILE).exists() {
            return Err(Error::AlreadyExists(format!("a gallery in {}", dir.display())));
        }
        let manifest = Manifest::new(dim, dtype);
        File::create(dir.join(&manifest.wal))
            .and_then(|f| f.sync_all())
            .ctx(|| format!("creating log in {}", dir.display()))?;
        manifest.store(dir)?;
        drop(lock);
        Gallery::open(dir)
    }

    /// Open the gallery in `dir` as its one writer: takes the lock, cuts a torn log
    /// tail, removes files left by interrupted imports or compactions.
    pub fn open(dir: &Path) -> Result<Gallery> {
        if !dir.join(manifest::MANIFEST_FILE).exists() {
            // Load for its clear "not a gallery" error without creating a LOCK file.
            Manifest::load(dir)?;
        }
        let lock = lock_dir(dir)?;
        let state = load_state(dir)?;
        if state.wal_torn_bytes > 0 {
            tracing::warn!(
                gallery = %dir.display(),
                bytes = state.wal_torn_bytes,
                "cut a torn log tail (a write that was never acknowledged)"
            );
        }
        let wal = WalWriter::open(&dir.join(&state.manifest.wal), state.wal_valid_len)?;
        remove_orphans(dir, &state.manifest)?;
        let memtable = Arc::new(state.memtable);
        let snapshot = Arc::new(Snapshot::new(
            state.manifest.dim,
            state.manifest.dtype,
            state.segments.clone(),
            memtable.clone(),
        ));
        Ok(Gallery {
            dir: dir.to_path_buf(),
            _lock: lock,
            manifest: state.manifest,
            segments: state.segments,
            tombstones: state.tombstones,
            memtable,
            wal,
            snapshot,
        })
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
        info_of(&self.dir, &self.snapshot, self.tombstones)
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
        let id = self.manifest.next_file_id;
        let file = segment_file_name(id);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let result = self.write_import(source, options, progress, &tmp);
        let (rows, subjects) = match result {
            Ok(counts) => counts,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let final_path = self.dir.join(&file);
        std::fs::rename(&tmp, &final_path).ctx(|| format!("renaming {}", tmp.display()))?;
        sync_dir(&self.dir)?;
        let segment = Arc::new(Segment::open(&final_path)?);
        let mut manifest = self.manifest.clone();
        manifest.segments.push(SegmentEntry {
            id,
            file: file.clone(),
            rows,
        });
        manifest.next_file_id += 1;
        manifest.store(&self.dir)?;
        self.manifest = manifest;
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
        tmp: &Path,
    ) -> Result<(u64, u64)> {
        const CHUNK: usize = 4096;
        let (dim, dtype) = (self.manifest.dim, self.manifest.dtype);
        let stride = row_stride(dtype, dim);
        let mut writer = SegmentWriter::create(tmp, dtype, dim)?;
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
        let subjects = writer.subjects() as u64;
        writer.finish()?;
        Ok((done, subjects))
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
        let rows = self.memtable.rows();
        if rows == 0 {
            return Ok(0);
        }
        let (dim, dtype) = (self.manifest.dim, self.manifest.dtype);
        let id = self.manifest.next_file_id;
        let wal_id = id + 1;
        let file = segment_file_name(id);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let mut writer = SegmentWriter::create(&tmp, dtype, dim)?;
        let table = self.memtable.clone();
        let stride = table.stride();
        for r in 0..rows {
            let subject = &table.subject_ids()[table.row_subjects()[r] as usize];
            if let Err(e) = writer.push(&table.data()[r * stride..(r + 1) * stride], table.scales()[r], subject) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        writer.finish()?;
        let path = self.dir.join(&file);
        std::fs::rename(&tmp, &path).ctx(|| format!("renaming {}", tmp.display()))?;
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
        let mut manifest = self.manifest.clone();
        manifest.segments.push(SegmentEntry {
            id,
            file,
            rows: rows as u64,
        });
        manifest.wal = wal_file_name(wal_id);
        manifest.next_file_id = wal_id + 1;
        let wal_path = self.dir.join(&manifest.wal);
        let mut wal = WalWriter::open(&wal_path, 0)?;
        wal.append(&records)?;
        sync_dir(&self.dir)?;
        manifest.store(&self.dir)?;
        // Committed: the new segment replaces the log's rows.
        self.manifest = manifest;
        self.wal = wal;
        self.segments.push(SegmentView {
            segment: Arc::new(Segment::open(&path)?),
            dead_subjects: Vec::new(),
        });
        self.tombstones = records.len();
        self.memtable = Arc::new(MemTable::new(dtype, dim));
        self.publish();
        remove_orphans(&self.dir, &self.manifest)?;
        Ok(rows)
    }

    /// Rewrite every live row (segments minus deletions, plus the log's rows) into one
    /// new segment and start an empty log; commits atomically through the manifest.
    pub fn compact(&mut self) -> Result<CompactReport> {
        let (dim, dtype) = (self.manifest.dim, self.manifest.dtype);
        let id = self.manifest.next_file_id;
        let wal_id = id + 1;
        let file = segment_file_name(id);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let snapshot = self.snapshot.clone();
        let total_rows: usize = snapshot.slabs().iter().map(|s| s.rows()).sum();
        let mut kept = 0u64;
        let mut writer = SegmentWriter::create(&tmp, dtype, dim)?;
        for slab in snapshot.slabs() {
            for row in 0..slab.rows() {
                let ordinal = slab.row_subject[row];
                if slab.is_dead(ordinal) {
                    continue;
                }
                let bytes = &slab.data[row * slab.stride..(row + 1) * slab.stride];
                if let Err(e) = writer.push(bytes, slab.scales[row], slab.subject_id(ordinal)) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                kept += 1;
            }
        }
        let mut manifest = self.manifest.clone();
        manifest.segments.clear();
        let mut new_segments = Vec::new();
        if kept > 0 {
            writer.finish()?;
            let path = self.dir.join(&file);
            std::fs::rename(&tmp, &path).ctx(|| format!("renaming {}", tmp.display()))?;
            new_segments.push(SegmentView {
                segment: Arc::new(Segment::open(&path)?),
                dead_subjects: Vec::new(),
            });
            manifest.segments.push(SegmentEntry { id, file, rows: kept });
        } else {
            drop(writer);
            let _ = std::fs::remove_file(&tmp);
        }
        manifest.wal = wal_file_name(wal_id);
        manifest.next_file_id = wal_id + 1;
        let wal_path = self.dir.join(&manifest.wal);
        File::create(&wal_path)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("creating {}", wal_path.display()))?;
        sync_dir(&self.dir)?;
        manifest.store(&self.dir)?;
        // Committed. Old files are now orphans; remove them.
        let old = std::mem::replace(&mut self.manifest, manifest);
        self.wal = WalWriter::open(&wal_path, 0)?;
        let report = CompactReport {
            rows_kept: kept,
            rows_dropped: total_rows as u64 - kept,
            segments_before: old.segments.len(),
            segments_after: new_segments.len(),
        };
        self.segments = new_segments;
        self.memtable = Arc::new(MemTable::new(dtype, dim));
        self.tombstones = 0;
        self.publish();
        remove_orphans(&self.dir, &self.manifest)?;
        Ok(report)
    }
}

/// Remove files of ours that the manifest does not name (interrupted imports and
/// compactions, logs and segments replaced by a compaction).
fn remove_orphans(dir: &Path, manifest: &Manifest) -> Result<()> {
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
        let ours = name.starts_with("seg-") || name.starts_with("wal-") || name == "MANIFEST.tmp";
        if ours && !keep.contains(name) {
            tracing::info!(gallery = %dir.display(), file = name, "removing unreferenced file");
            std::fs::remove_file(entry.path()).ctx(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}
