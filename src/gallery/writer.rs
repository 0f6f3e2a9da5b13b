//! The writer: [`Gallery`] holds the lock and the state read at open, and makes every
//! change durable before it is visible: enrollments and deletions through the log;
//! seals and compactions as new files committed through the manifest. One commit path
//! ([`Gallery::commit`]); after a storage failure whose outcome is unknown it refuses
//! writes until reopened.

use super::expiry::{Expiry, check_future};
use super::files::{keep_aside, keep_log_tail, lock_dir, remove_orphans, write_segment_file};
use super::identity::{self, FileIdentity};
use super::manifest::{self, Committed, Manifest, SegmentEntry, segment_file_name, wal_file_name};
use super::memtable::LogTable;
use super::reader::{LogProbe, apply, expected_log_header, info_of, load_state};
use super::segment::{Segment, SegmentWriter};
use super::snapshot::{Counts, SegmentView, Snapshot};
use super::wal::{self, WalHeader, WalRecord, WalWriter};
use super::{CompactReport, Enrollment, GalleryInfo};
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use crate::template::{Dtype, canonical_subject_id, check_dim, normalize_into};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The writer's handle on a gallery directory.
pub struct Gallery {
    pub(super) dir: PathBuf,
    pub(super) _lock: File,
    pub(super) storage: Storage,
    pub(super) manifest: Manifest,
    pub(super) segments: Vec<SegmentView>,
    pub(super) tombstones: usize,
    /// Live templates and subjects, kept as each change is applied.
    pub(super) counts: Counts,
    pub(super) memtable: LogTable,
    pub(super) wal: WalWriter,
    /// The log file as opened (to notice it being changed under the process).
    pub(super) wal_identity: FileIdentity,
    pub(super) snapshot: Arc<Snapshot>,
    /// When the gallery and its subjects expire (`EXPIRY`; see expiry.rs).
    pub(super) expiry: Arc<Expiry>,
    /// Set when a commit's outcome is unknown: no further writes until reopened.
    pub(super) poisoned: Option<String>,
    /// The manifest's copy lags behind: keep the files it names.
    pub(super) copy_stale: bool,
    /// The file a planned merge is writing (see `compaction.rs`): kept from orphan
    /// removal, and the log is not sealed meanwhile.
    pub(super) merging: Option<String>,
    /// Expired subjects whose rows are hidden in memory (marked dead in `segments`,
    /// removed from `memtable`, left out of `counts`) but not yet deleted through the
    /// log (expiry.rs); the purge deletes them.
    pub(super) hidden: std::collections::BTreeSet<String>,
    /// Every subject that expired by this instant (ms) is hidden.
    pub(super) hidden_through: i64,
    /// The last [`WalRecord::Applied`] logged: the replicated batch this state includes
    /// (a cluster replica's; `None` for a gallery of its own).
    pub(super) replicated_through: Option<u64>,
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
        let wal_path = dir.join(&state.manifest.wal);
        if state.log.torn_bytes() > 0 {
            // Unfinished: a write a crash interrupted, or (the log's final length was
            // not recorded, see wal/tail.rs) an acknowledged group cut short. The bytes
            // are kept before they are cut, so nothing is destroyed on a guess.
            let kept = keep_log_tail(&storage, dir, &wal_path, state.log.valid_len)?;
            tracing::warn!(
                gallery = %dir.display(),
                bytes = state.log.torn_bytes(),
                offset = state.log.valid_len,
                kept = %kept.display(),
                "cutting an unfinished last commit group of the log: a write interrupted by a crash \
                 (never acknowledged), or an acknowledged group cut short, which cannot be told apart \
                 because the log's final length was not recorded; the bytes are kept"
            );
        }
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
        let memtable = state.memtable;
        let expiry = Arc::new(Expiry::load(dir)?);
        let snapshot = Arc::new(Snapshot::new(
            state.manifest.dim,
            state.manifest.dtype,
            Vec::new(),
            memtable.clone(),
            state.counts,
        ));
        let recounted = state.manifest.sealed_subjects.is_none();
        let mut gallery = Gallery {
            dir: dir.to_path_buf(),
            _lock: lock,
            storage,
            manifest: state.manifest,
            segments: state.segments,
            tombstones: state.tombstones,
            counts: state.counts,
            memtable,
            wal,
            wal_identity,
            snapshot,
            expiry,
            poisoned: None,
            copy_stale,
            merging: None,
            hidden: std::collections::BTreeSet::new(),
            hidden_through: i64::MIN,
            replicated_through: replicated_through(&state.log.records),
        };
        gallery.publish();
        // Deletions in the log carry segment marks; a mark above the next id (a merge
        // reserved an id and the process ended before committing it) must stay above
        // every segment made from now on, or it would reach them on the next replay.
        let highest_mark = state
            .log
            .records
            .iter()
            .filter_map(|r| match r {
                WalRecord::Delete { segments_before, .. } => Some(*segments_before),
                WalRecord::Enroll { .. } | WalRecord::Applied { .. } => None,
            })
            .max()
            .unwrap_or(0);
        gallery.manifest.next_file_id = gallery.manifest.next_file_id.max(highest_mark);
        let unnamed = gallery.manifest.segments.iter().any(|e| e.header_crc.is_none());
        if recounted || unnamed {
            // Counted at open (after a repair, or an older manifest): keep the number,
            // so the next open reads it instead of every id. And an older manifest's
            // segments get their identities recorded (each opened segment passed its
            // header checks just now).
            let mut manifest = gallery.manifest.clone();
            manifest.sealed_subjects = Some(state.sealed_subjects);
            for (entry, view) in manifest.segments.iter_mut().zip(&gallery.segments) {
                entry.header_crc = Some(view.segment.header_crc());
            }
            gallery.commit(manifest)?;
        }
        gallery.remove_orphans();
        Ok(gallery)
    }

    /// Build the snapshot searches read from the state, the subjects expired by now
    /// hidden first.
    pub(super) fn publish(&mut self) {
        self.hide_expired(crate::time_text::now_ms(), false);
        self.snapshot = Arc::new(
            Snapshot::new(
                self.manifest.dim,
                self.manifest.dtype,
                self.segments.clone(),
                self.memtable.clone(),
                self.counts,
            )
            .with_expiry(self.expiry.clone(), self.hidden_through),
        );
    }

    /// Hide the rows of the subjects that expired since the last time (or, with
    /// `all`, of every expired subject that has live rows: after rows were added that
    /// an earlier expiry covers, by an import). See expiry.rs.
    pub(super) fn hide_expired(&mut self, now_ms: i64, all: bool) {
        let after = if all { i64::MIN } else { self.hidden_through };
        let hidden = super::expiry::hide_expired(
            &self.expiry,
            after,
            now_ms,
            &mut self.segments,
            &mut self.memtable,
            &mut self.counts,
        );
        self.hidden.extend(hidden);
        self.hidden_through = self.hidden_through.max(now_ms);
    }

    /// If a subject expired since the current snapshot was built, build one that hides
    /// it (a server calls this every tick, so expired rows cost searches nothing).
    /// Returns whether it did.
    pub fn hide_newly_expired(&mut self) -> bool {
        if !self.snapshot.expiry_due(crate::time_text::now_ms()) {
            return false;
        }
        self.publish();
        true
    }

    /// Whether a purge has work: expired subjects hidden or still live.
    pub fn expired_pending(&self, now_ms: i64) -> bool {
        !self.hidden.is_empty() || !self.snapshot.expired_live(now_ms).is_empty()
    }

    /// Distinct subject ids in the segments, deletions not applied (the manifest's
    /// `sealed_subjects`).
    pub(super) fn sealed_subjects(&self) -> u64 {
        self.manifest.sealed_subjects.unwrap_or_default()
    }

    /// How many of `subjects` no segment names (deleted or not): what a new segment
    /// holding them adds to [`Gallery::sealed_subjects`].
    pub(super) fn unsealed<'s>(&self, subjects: impl Iterator<Item = &'s str>) -> u64 {
        subjects
            .filter(|s| self.segments.iter().all(|v| v.segment.find_subject(s).is_none()))
            .count() as u64
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

    pub(super) fn check_writable(&self) -> Result<()> {
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

    /// Record the log's final length durably if anything was appended since it last was
    /// (see `WalWriter::record_final_length`): a server does this once a log has been
    /// idle for a moment, and every close does it.
    pub fn record_log_length(&mut self) -> Result<()> {
        self.wal.record_final_length()
    }

    /// Whether the log's final length is recorded (nothing appended since).
    pub fn log_length_recorded(&self) -> bool {
        self.wal.final_length_recorded()
    }

    /// How long the log has been idle with its final length unrecorded (None: it is
    /// recorded).
    pub fn log_unrecorded_for(&self) -> Option<std::time::Duration> {
        self.wal.unrecorded_for()
    }

    /// Close the gallery: record the log's final length durably (after this, a cut of
    /// the log anywhere is refused as damage) and release the lock. Dropping a gallery
    /// does the same but can only log a failure; this returns it.
    pub fn close(mut self) -> Result<()> {
        self.wal.record_final_length()
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
        self.enroll_expiring(batch, &vec![None; batch.len()])
    }

    /// [`Gallery::enroll`], each subject with its expiry (`expires[i]`, ms since the
    /// epoch; None: it does not expire, and an earlier expiry is cleared). An expiry
    /// must be in the future. The expiries are committed before the enrollment is
    /// logged (expiry.rs says why that order).
    pub fn enroll_expiring(&mut self, batch: &[Enrollment], expires: &[Option<i64>]) -> Result<usize> {
        if batch.is_empty() {
            return Err(Error::invalid("enrollment batch is empty"));
        }
        if expires.len() != batch.len() {
            return Err(Error::invalid(format!(
                "{} expiries for {} enrollments",
                expires.len(),
                batch.len()
            )));
        }
        let now = crate::time_text::now_ms();
        for (i, (e, at)) in batch.iter().zip(expires).enumerate() {
            if let Some(t) = at {
                check_future(*t, now, &format!("enrollment {i} (subject {:?}) expires_at", e.subject))?;
            }
        }
        let (records, total) = self.enrollment_records(batch)?;
        self.check_writable()?;
        if self.expiry.gallery_expired(now) {
            return Err(self.expiry.gallery_expired_error());
        }
        self.hide_expired(now, false);
        // A subject whose templates expired is enrolled afresh: its expired templates
        // are deleted first, durably, before its expiry changes (so no crash can bring
        // them back), and are never used again.
        let expired_first: Vec<WalRecord> = records
            .iter()
            .map(WalRecord::subject)
            .filter(|s| self.hidden.contains(*s))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|s| WalRecord::Delete {
                subject: s.to_owned(),
                segments_before: self.manifest.next_file_id,
            })
            .collect();
        if !expired_first.is_empty() {
            self.log_and_apply(&expired_first)?;
            for r in &expired_first {
                self.hidden.remove(r.subject());
            }
        }
        // The records carry the canonical ids; the expiries are keyed by them too.
        if records
            .iter()
            .zip(expires)
            .any(|(r, at)| self.expiry.subject_ms(r.subject()) != *at)
        {
            let mut next = (*self.expiry).clone();
            for (r, at) in records.iter().zip(expires) {
                next.set(r.subject(), *at);
            }
            self.commit_expiry(next)?;
        }
        self.log_and_apply(&records)?;
        Ok(total)
    }

    /// Check and normalise a batch of enrollments into log records; the templates count.
    fn enrollment_records(&self, batch: &[Enrollment]) -> Result<(Vec<WalRecord>, usize)> {
        let dim = self.manifest.dim;
        let mut records = Vec::with_capacity(batch.len());
        let mut total = 0;
        for (i, e) in batch.iter().enumerate() {
            let subject = canonical_subject_id(&e.subject)?;
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
                subject: subject.into_owned(),
                templates: normalized,
            });
        }
        Ok((records, total))
    }

    /// Apply batch number `through` of a cluster shard's log as one commit group:
    /// `enrollments` (checked and normalised as [`Gallery::enroll`] does), `deletions` (a
    /// subject this replica does not hold is skipped: every replica applies the same
    /// batches in the same order, so they all skip it), and the mark that the state now
    /// includes the batch. After a crash the gallery holds the batch and says so, or
    /// holds neither ([`Gallery::replicated_through`]). No expiries: a cluster's
    /// galleries have none.
    pub fn apply_replicated(&mut self, enrollments: &[Enrollment], deletions: &[String], through: u64) -> Result<()> {
        let (mut records, _) = if enrollments.is_empty() {
            (Vec::new(), 0)
        } else {
            self.enrollment_records(enrollments)?
        };
        for subject in deletions {
            let subject = canonical_subject_id(subject)?;
            if self.snapshot.has_subject(&subject) {
                records.push(WalRecord::Delete {
                    subject: subject.into_owned(),
                    segments_before: self.manifest.next_file_id,
                });
            }
        }
        records.push(WalRecord::Applied { through });
        self.check_writable()?;
        self.log_and_apply(&records)
    }

    /// The last replicated batch this gallery's state includes, as logged with it
    /// ([`Gallery::apply_replicated`]); `None` if none was ever logged.
    pub fn replicated_through(&self) -> Option<u64> {
        self.replicated_through
    }

    /// The number the next logged record will get: it grows by one for each record and
    /// never goes back (seals and compactions carry it on), so it tells whether a commit
    /// group reached the log.
    pub fn log_position(&self) -> u64 {
        self.wal.next_seq()
    }

    /// Make `next` the gallery's retention state, durably, and publish it. If the
    /// commit fails, the state is read back from the file (whichever it holds).
    pub(super) fn commit_expiry(&mut self, next: Expiry) -> Result<()> {
        match next.commit(&self.storage, &self.dir) {
            Ok(()) => {
                self.expiry = Arc::new(next);
                self.publish();
                Ok(())
            }
            Err(e) => {
                match Expiry::load(&self.dir) {
                    Ok(on_disk) => self.expiry = Arc::new(on_disk),
                    Err(read) => self.poisoned = Some(format!("{e}; reading EXPIRY back: {read}")),
                }
                self.publish();
                Err(e)
            }
        }
    }

    /// When the whole gallery expires (None: never), durably. Must be in the future.
    pub fn set_gallery_expiry(&mut self, at: Option<i64>) -> Result<()> {
        if let Some(t) = at {
            check_future(t, crate::time_text::now_ms(), "expires_at")?;
        }
        self.check_writable()?;
        let mut next = (*self.expiry).clone();
        next.gallery_ms = at;
        self.commit_expiry(next)
    }

    /// The gallery's retention state.
    pub fn expiry(&self) -> &Expiry {
        &self.expiry
    }

    /// Delete every live subject expired at `now_ms` (one log append and fsync), then
    /// drop the entries of subjects no longer live. Returns the subjects deleted; their
    /// rows go at the next compaction. A crash at any point leaves the expired
    /// subjects deleted or still expired (never answered either way) and every other
    /// subject as it was.
    pub fn purge_expired(&mut self, now_ms: i64) -> Result<Vec<String>> {
        self.hide_expired(now_ms, false);
        let expired: Vec<String> = self.hidden.iter().cloned().collect();
        if !expired.is_empty() {
            self.check_writable()?;
            let records: Vec<WalRecord> = expired
                .iter()
                .map(|s| WalRecord::Delete {
                    subject: s.clone(),
                    segments_before: self.manifest.next_file_id,
                })
                .collect();
            self.log_and_apply(&records)?;
            self.hidden.clear();
        }
        let stale: Vec<String> = self
            .expiry
            .subjects
            .keys()
            .filter(|s| !self.snapshot.has_subject(s))
            .cloned()
            .collect();
        if !stale.is_empty() {
            let mut next = (*self.expiry).clone();
            for s in &stale {
                next.set(s, None);
            }
            self.commit_expiry(next)?;
        }
        Ok(expired)
    }

    /// Log `records` durably (one append, one fsync), then apply them to the state in
    /// memory and publish the new snapshot.
    fn log_and_apply(&mut self, records: &[WalRecord]) -> Result<()> {
        self.wal.append(records)?;
        if let Some(through) = replicated_through(records) {
            self.replicated_through = Some(through);
        }
        let memtable = &mut self.memtable;
        for r in records {
            apply(
                r,
                &self.manifest,
                &mut self.segments,
                memtable,
                &mut self.tombstones,
                &mut self.counts,
            )?;
        }
        memtable.refresh_ranks();
        self.publish();
        Ok(())
    }

    /// Delete a subject (all its templates), durably. Unknown subject: `NotFound`.
    pub fn delete_subject(&mut self, subject: &str) -> Result<()> {
        let subject = &*canonical_subject_id(subject)?;
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
        self.log_and_apply(std::slice::from_ref(&record))
    }

    /// Write a new segment file (see [`write_segment_file`]) and map it.
    pub(super) fn write_segment(
        &self,
        file: &str,
        fill: impl FnOnce(&mut SegmentWriter) -> Result<()>,
    ) -> Result<Arc<Segment>> {
        write_segment_file(&self.storage, &self.dir, &self.manifest, file, fill)?;
        Ok(Arc::new(Segment::open(&self.dir.join(file))?))
    }

    /// Commit `manifest` as the gallery's new shape. Nothing else may change in memory
    /// unless this returns Ok. If it is unknown whether a restart would see the new
    /// manifest, the gallery stops accepting writes (see [`Gallery::poisoned`]).
    pub(super) fn commit(&mut self, manifest: Manifest) -> Result<()> {
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
        if self.merging.is_some() {
            // Deferred until the merge commits: the log keeps growing meanwhile.
            tracing::debug!(gallery = %self.dir.display(), "sealing waits for a merge");
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
        if let Some(file) = &self.merging {
            return Err(Error::Aborted(format!(
                "{}: a merge into {file} is running; try again when it ends",
                self.dir.display()
            )));
        }
        let rows = self.memtable.rows();
        let mut id = self.manifest.next_file_id;
        let mut manifest = self.manifest.clone();
        let mut sealed = None;
        if rows > 0 {
            let table = self.memtable.clone();
            let file = segment_file_name(id);
            let segment = self.write_segment(&file, |writer| {
                for (bytes, scale, subject) in table.each_row() {
                    writer.push(bytes, scale, subject)?;
                }
                Ok(())
            })?;
            manifest.segments.push(SegmentEntry::of(id, &file, &segment));
            manifest.sealed_subjects = Some(self.sealed_subjects() + self.unsealed(table.live_subjects().into_iter()));
            sealed = Some((segment, file));
            id += 1;
        }
        // Deletions pending against the older segments, once per subject, marked so they
        // reach every segment that existed when the subject was deleted (and none newer).
        let mut pending: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for (view, entry) in self.segments.iter().zip(&self.manifest.segments) {
            let row_subjects = view.segment.row_subjects();
            for row in view.deleted.iter() {
                let mark = pending.entry(view.segment.subject_id(row_subjects[row])).or_insert(0);
                *mark = (*mark).max(entry.id + 1);
            }
        }
        let mut records: Vec<WalRecord> = pending
            .iter()
            .map(|(s, &before)| WalRecord::Delete {
                subject: (*s).to_owned(),
                segments_before: before,
            })
            .collect();
        // The replication mark goes on in the new log, with the state it describes.
        records.extend(self.replicated_through.map(|through| WalRecord::Applied { through }));
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
            self.segments.push(SegmentView::new(segment));
        }
        self.tombstones = records.iter().filter(|r| matches!(r, WalRecord::Delete { .. })).count();
        self.memtable = LogTable::new(self.manifest.dtype, self.manifest.dim);
        self.publish();
        self.remove_orphans();
        Ok(rows)
    }

    /// Rewrite the log without the deletions that no longer apply to any segment (after
    /// a merge dropped their rows); nothing to do when it holds none.
    pub fn prune_log(&mut self) -> Result<()> {
        if self.tombstones > 0 {
            self.rewrite_log(false)?;
        }
        Ok(())
    }

    /// Rows stored (live or deleted, segments and log) and segments: what a compaction
    /// report compares with.
    pub fn footprint(&self) -> (u64, usize) {
        let rows = self.memtable.rows() as u64 + self.manifest.segments.iter().map(|s| s.rows).sum::<u64>();
        (rows, self.segments.len())
    }

    /// What a compaction did, from the footprint before it.
    pub fn compact_report(&self, before: (u64, usize)) -> CompactReport {
        let (rows_before, segments_before) = before;
        CompactReport {
            rows_kept: self.counts.rows,
            rows_dropped: rows_before.saturating_sub(self.counts.rows),
            segments_before,
            segments_after: self.segments.len(),
        }
    }

    /// Remove files of ours that the manifest does not name (interrupted imports and
    /// compactions, logs and segments replaced by a compaction). Only while the
    /// manifest's copy is current (it might name them otherwise). Failures are logged,
    /// not returned: the commit before this stands either way.
    pub(super) fn remove_orphans(&self) {
        if self.copy_stale {
            return;
        }
        if let Err(e) = remove_orphans(&self.storage, &self.dir, &self.manifest, self.merging.as_deref()) {
            tracing::warn!(gallery = %self.dir.display(), error = %e, "could not remove unreferenced files");
        }
    }
}

/// The last replication mark among `records`.
fn replicated_through(records: &[WalRecord]) -> Option<u64> {
    records.iter().rev().find_map(|r| match r {
        WalRecord::Applied { through } => Some(*through),
        _ => None,
    })
}
