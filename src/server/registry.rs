//! The galleries a server holds, by name: each one directory under `DATA/galleries/`.
//!
//! Each gallery fails alone. One that does not open, or in which damage is found later
//! (a bad chunk, a file changed under the server), is kept in the registry as NOT
//! SERVING with the reason: its searches fail with DATA_LOSS (or UNAVAILABLE) naming
//! it, GetGallery and ListGalleries say why, and an admin can repair or drop it without
//! a restart, while the other galleries go on.
//!
//! Admin operations (create, drop, repair, compact) are serialised per gallery name, so
//! races between them give clean answers (ALREADY_EXISTS, NOT_FOUND, ABORTED).

use crate::error::{Error, IoContext, Result};
use crate::gallery::compaction::{MergePolicy, MergeScope};
use crate::gallery::derive::DeriveReport;
use crate::gallery::repair::RepairReport;
use crate::gallery::{CompactReport, Gallery, GalleryInfo, Snapshot};
use crate::storage::Storage;
use crate::template::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Why a gallery is not serving.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// Damage was found: searches fail with DATA_LOSS until it is repaired.
    Damaged(String),
    /// It could not be opened for another reason (I/O, locked by another process).
    Unavailable(String),
    /// It was dropped while a call held it.
    Dropped,
}

impl Problem {
    fn error(&self, name: &str) -> Error {
        match self {
            Problem::Damaged(why) => Error::Corrupt(format!(
                "gallery {name:?} is not serving: {why}; repair it (RepairGallery, or `biogate gallery repair`) or drop it"
            )),
            Problem::Unavailable(why) => Error::Unavailable(format!("gallery {name:?} is not serving: {why}")),
            Problem::Dropped => Error::Aborted(format!("gallery {name:?} was dropped")),
        }
    }

    /// The reason, in words.
    pub fn reason(&self) -> String {
        match self {
            Problem::Damaged(why) => format!("damaged: {why}"),
            Problem::Unavailable(why) => why.clone(),
            Problem::Dropped => "dropped".into(),
        }
    }

    fn from_open_error(e: &Error) -> Problem {
        match e {
            Error::Corrupt(m) => Problem::Damaged(m.clone()),
            other => Problem::Unavailable(other.to_string()),
        }
    }
}

/// What GetGallery and ListGalleries report.
#[derive(Clone, Debug)]
pub struct GalleryStatus {
    pub name: String,
    /// None when the gallery could not be opened.
    pub info: Option<GalleryInfo>,
    /// None when serving.
    pub problem: Option<Problem>,
    /// Why writes are refused while searches still work (a storage failure).
    pub read_only: Option<String>,
}

/// One served gallery.
pub struct GalleryEntry {
    pub name: String,
    dir: PathBuf,
    writer: Mutex<Option<Gallery>>,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    problem: RwLock<Option<Problem>>,
    /// Held by a merge from plan to commit (background merges and CompactGallery take
    /// turns).
    merge_lock: Mutex<()>,
    /// A background merge is running or about to.
    merge_running: AtomicBool,
}

impl GalleryEntry {
    fn open(name: String, dir: PathBuf, storage: &Storage) -> GalleryEntry {
        let (gallery, problem) = match Gallery::open_with(&dir, storage.clone()) {
            Ok(g) => (Some(g), None),
            Err(e) => {
                tracing::error!(gallery = %name, error = %e, "gallery did not open; it is not serving");
                (None, Some(Problem::from_open_error(&e)))
            }
        };
        GalleryEntry::new(name, dir, gallery, problem)
    }

    fn new(name: String, dir: PathBuf, gallery: Option<Gallery>, problem: Option<Problem>) -> GalleryEntry {
        let snapshot = gallery.as_ref().map(|g| g.snapshot());
        GalleryEntry {
            name,
            dir,
            writer: Mutex::new(gallery),
            snapshot: RwLock::new(snapshot),
            problem: RwLock::new(problem),
            merge_lock: Mutex::new(()),
            merge_running: AtomicBool::new(false),
        }
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Option<Gallery>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why it is not serving, if it is not.
    pub fn problem(&self) -> Option<Problem> {
        self.problem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Record damage found while serving (the first reason stays).
    pub fn mark_damaged(&self, why: String) {
        let mut p = self.problem.write().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::error!(gallery = %self.name, damage = %why, "gallery stops serving");
            *p = Some(Problem::Damaged(why));
        }
    }

    /// What searches read now, or why there is nothing to read. A subject that expired
    /// since the snapshot was built is hidden first, at once (expiry.rs), unless a write
    /// holds the gallery (the search then leaves it out itself, as exactly).
    pub fn snapshot(&self) -> Result<Arc<Snapshot>> {
        if let Some(p) = self.problem() {
            return Err(p.error(&self.name));
        }
        let current = self
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Problem::Dropped.error(&self.name))?;
        if current.expiry_due(crate::time_text::now_ms())
            && let Ok(mut guard) = self.writer.try_lock()
            && let Some(g) = guard.as_mut()
        {
            g.hide_newly_expired();
            let hidden = g.snapshot();
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(hidden.clone());
            return Ok(hidden);
        }
        Ok(current)
    }

    /// Run a write; the new snapshot is published before this returns, so the very
    /// next search sees it.
    pub fn write<T>(&self, f: impl FnOnce(&mut Gallery) -> Result<T>) -> Result<T> {
        if let Some(p) = self.problem() {
            return Err(p.error(&self.name));
        }
        let mut guard = self.lock_writer();
        let g = guard.as_mut().ok_or_else(|| Problem::Dropped.error(&self.name))?;
        let out = f(g);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(g.snapshot());
        if let Err(Error::Corrupt(why)) = &out {
            self.mark_damaged(why.clone());
        }
        out
    }

    /// Merge segments in a thread of its own when `policy` says so (at most one merge
    /// per gallery at a time); searches and enrollments go on meanwhile.
    pub fn merge_in_background(self: &Arc<Self>, policy: MergePolicy) {
        let due = self.snapshot().is_ok_and(|s| !policy.choose(s.segments()).is_empty());
        if !due || self.merge_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let entry = self.clone();
        let spawned = std::thread::Builder::new().name("biogate-merge".into()).spawn(move || {
            let _serial = entry.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
            match entry.merge(MergeScope::Policy(policy)) {
                Ok(Some(r)) => tracing::info!(
                    gallery = %entry.name,
                    segments_before = r.segments_before,
                    segments_after = r.segments_after,
                    rows_dropped = r.rows_dropped,
                    "merged segments"
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(gallery = %entry.name, error = %e, "merging segments failed"),
            }
            entry.merge_running.store(false, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::error!(gallery = %self.name, error = %e, "could not start a merge thread");
            self.merge_running.store(false, Ordering::SeqCst);
        }
    }

    /// Plan a merge (writer held briefly), build it (writer free: searches and
    /// enrollments go on), commit it (writer held briefly).
    fn merge(&self, scope: MergeScope) -> Result<Option<CompactReport>> {
        let Some(plan) = self.write(|g| g.plan_merge(scope))? else {
            return Ok(None);
        };
        let file = plan.file().to_owned();
        match plan.build() {
            Ok(built) => self.write(|g| g.commit_merge(built)).map(Some),
            Err(e) => {
                if let Some(g) = self.lock_writer().as_mut() {
                    g.abandon_merge(&file);
                }
                if let Error::Corrupt(why) = &e {
                    self.mark_damaged(why.clone());
                }
                Err(e)
            }
        }
    }

    /// Compact while serving: seal the log, merge every segment into one (rows copied
    /// without holding the writer), rewrite the log without stale deletions. Waits for
    /// a background merge to end first.
    pub fn compact(&self) -> Result<CompactReport> {
        self.compact_scope(MergeScope::Everything)
    }

    /// Take deleted subjects' templates off the disk: seal the log (a new log without
    /// their enrollment records), rewrite only the segments holding deleted rows, and
    /// prune the log. What a retention purge runs after deleting expired subjects.
    pub fn remove_deleted(&self) -> Result<CompactReport> {
        self.compact_scope(MergeScope::WithDeletions)
    }

    fn compact_scope(&self, scope: MergeScope) -> Result<CompactReport> {
        let _serial = self.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.write(|g| {
            let before = g.footprint();
            g.seal_log()?;
            Ok(before)
        })?;
        self.merge(scope)?;
        self.write(|g| {
            g.prune_log()?;
            Ok(g.compact_report(before))
        })
    }

    /// The supervisor's tick (every few tens of milliseconds; never waits for a
    /// write): hide the rows of subjects that expired since the snapshot was built
    /// (expiry.rs), and record the log's final length once it has been idle for
    /// `log_idle` (None: never), so that a cut of it is recognised even after a crash
    /// (wal/tail.rs).
    pub fn tick(&self, log_idle: Option<Duration>) {
        let Ok(mut guard) = self.writer.try_lock() else {
            return; // a write is running: look again next tick
        };
        let Some(g) = guard.as_mut() else { return };
        if g.hide_newly_expired() {
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(g.snapshot());
        }
        if let (Some(idle), Some(unrecorded)) = (log_idle, g.log_unrecorded_for())
            && unrecorded >= idle
            && let Err(e) = g.record_log_length()
        {
            tracing::warn!(gallery = %self.name, error = %e, "could not record the log's final length; trying again");
        }
    }

    /// Whether a retention purge has work here (subjects expired, hidden or not).
    pub fn expired_pending(&self, now_ms: i64) -> bool {
        self.lock_writer().as_ref().is_some_and(|g| g.expired_pending(now_ms))
    }

    /// Close the gallery for good (the server is stopping): writes are refused from now
    /// on, and the log's final length is recorded, so a cut of it is recognised.
    pub fn close(&self) -> Result<()> {
        {
            let mut p = self.problem.write().unwrap_or_else(|p| p.into_inner());
            if p.is_none() {
                *p = Some(Problem::Unavailable("the server is stopping".into()));
            }
        }
        let gallery = self.lock_writer().take();
        match gallery {
            Some(g) => g.close(),
            None => Ok(()),
        }
    }

    /// Summary for GetGallery / ListGalleries.
    pub fn status(&self) -> GalleryStatus {
        let guard = self.lock_writer();
        GalleryStatus {
            name: self.name.clone(),
            info: guard.as_ref().and_then(|g| g.info().ok()),
            problem: self.problem(),
            read_only: guard.as_ref().and_then(|g| g.poisoned()),
        }
    }

    /// Look for damage without waiting for a writer: files changed under the server and
    /// damage a search or the scrub already found. Returns the problem, if any.
    pub fn check_integrity(&self) -> Option<Problem> {
        if let Some(p) = self.problem() {
            return Some(p);
        }
        let found = {
            let Ok(guard) = self.writer.try_lock() else {
                return None; // a write is running; look again next time
            };
            let g = guard.as_ref()?;
            g.check_files()
                .err()
                .map(|e| e.to_string())
                .or_else(|| g.snapshot().damage())
        };
        if let Some(why) = found {
            self.mark_damaged(why);
        }
        self.problem()
    }

    /// Verify the current segments once (after opening; a search that needs one waits
    /// for it), then return.
    pub fn verify_once(&self) {
        if let Ok(s) = self.snapshot()
            && let Err(e) = s.ensure_verified()
        {
            self.mark_damaged(e.to_string());
        }
    }

    /// Scrub: verify every segment's metadata and rows again at the pace `pace`
    /// allows, and read the log back. Damage makes the gallery NOT_SERVING.
    pub fn scrub(&self, pace: &mut dyn FnMut(u64)) {
        let Ok(snapshot) = self.snapshot() else { return };
        for v in snapshot.segments() {
            if let Err(e) = v.segment.scrub(pace) {
                self.mark_damaged(e.to_string());
                return;
            }
        }
        let log = {
            let guard = self.lock_writer();
            guard.as_ref().map(|g| g.log_probe())
        };
        if let Some(Err(e)) = log.map(|p| p.check()) {
            self.mark_damaged(e.to_string());
        }
    }
}

/// All galleries, by name.
pub struct Registry {
    root: PathBuf,
    storage: Storage,
    galleries: RwLock<BTreeMap<String, Arc<GalleryEntry>>>,
    admin: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Check a gallery name: 1-64 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn check_gallery_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "gallery name {name:?} must be 1-64 characters of letters, digits, '_', '.', '-', not starting with '.'"
        )))
    }
}

/// Whether `dir` holds a gallery (a manifest, or its copy).
fn holds_a_gallery(dir: &Path) -> bool {
    use crate::gallery::manifest::{MANIFEST_COPY_FILE, MANIFEST_FILE};
    dir.join(MANIFEST_FILE).exists() || dir.join(MANIFEST_COPY_FILE).exists()
}

impl Registry {
    /// Open every gallery under `data_dir/galleries`; one that fails is kept as not serving.
    pub fn open(data_dir: &Path, storage: Storage) -> Result<Registry> {
        let root = data_dir.join("galleries");
        storage.create_dir_all(&root)?;
        let mut galleries = BTreeMap::new();
        for entry in std::fs::read_dir(&root).ctx(|| format!("listing {}", root.display()))? {
            let entry = entry.ctx(|| format!("listing {}", root.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(".dropped-") || name.starts_with(".loading-") {
                // A drop that crashed after moving the gallery aside: finish it.
                tracing::info!(dir = %entry.path().display(), "removing a dropped gallery");
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::error!(dir = %entry.path().display(), error = %e, "could not remove a dropped gallery");
                }
                continue;
            }
            if check_gallery_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let e = GalleryEntry::open(name.clone(), entry.path(), &storage);
            if let Ok(s) = e.snapshot() {
                tracing::info!(gallery = %name, rows = s.live_rows(), "loaded gallery");
            }
            galleries.insert(name, Arc::new(e));
        }
        Ok(Registry {
            root,
            storage,
            galleries: RwLock::new(galleries),
            admin: Mutex::new(HashMap::new()),
        })
    }

    /// Serialise admin operations on one name.
    fn admin_lock(&self, name: &str) -> Arc<Mutex<()>> {
        self.admin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// A gallery by name, serving or not, or NotFound.
    pub fn get(&self, name: &str) -> Result<Arc<GalleryEntry>> {
        self.galleries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("gallery {}", echo_name(name))))
    }

    /// Every gallery.
    pub fn all(&self) -> Vec<Arc<GalleryEntry>> {
        self.galleries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether no gallery exists.
    pub fn is_empty(&self) -> bool {
        self.galleries.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Add gallery `name`, made by `make` in its folder, unless one of that name exists
    /// (one admin operation on a name at a time).
    fn add<T>(
        &self,
        name: &str,
        make: impl FnOnce(PathBuf) -> Result<(GalleryEntry, T)>,
    ) -> Result<(Arc<GalleryEntry>, T)> {
        check_gallery_name(name)?;
        let lock = self.admin_lock(name);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.get(name).is_ok() {
            return Err(Error::AlreadyExists(format!("gallery {name:?}")));
        }
        // A folder under a name no gallery is served from, without a manifest, is what a
        // creation that failed part way left (a full disk): it would stand in the way of
        // every later one under the name. One with a manifest is a gallery (a drop that
        // failed, files copied in by hand): never removed here, the creation refuses it.
        let dir = self.root.join(name);
        if dir.exists() && !holds_a_gallery(&dir) {
            self.remove_unserved(name, &dir);
        }
        let existed = dir.exists();
        let (entry, made) = make(dir.clone()).inspect_err(|_| {
            // What this make itself left, whatever it is.
            if !existed && dir.exists() {
                self.remove_unserved(name, &dir);
            }
        })?;
        let entry = Arc::new(entry);
        self.galleries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), entry.clone());
        Ok((entry, made))
    }

    /// Create a new gallery.
    pub fn create(&self, name: &str, dim: usize, dtype: Dtype) -> Result<Arc<GalleryEntry>> {
        let (entry, ()) = self.add(name, |dir| {
            let gallery = Gallery::create_with(&dir, dim, dtype, self.storage.clone())?;
            Ok((GalleryEntry::new(name.to_owned(), dir, Some(gallery), None), ()))
        })?;
        Ok(entry)
    }

    /// Serve the gallery files in `prepared` (a folder under [`Registry::root`] whose
    /// name starts with ".loading-", e.g. a downloaded checkpoint) as gallery `name`:
    /// moved into place, then opened. A folder that does not open is left in place and
    /// the error returned (the caller drops the gallery).
    pub fn adopt(&self, name: &str, prepared: &Path) -> Result<Arc<GalleryEntry>> {
        let (entry, ()) = self.add(name, |dir| {
            self.storage.rename(prepared, &dir)?;
            self.storage.sync_dir(&self.root)?;
            Ok((GalleryEntry::open(name.to_owned(), dir, &self.storage), ()))
        })?;
        match entry.problem() {
            Some(p) => Err(Error::Corrupt(format!("gallery {name:?}: {}", p.reason()))),
            None => Ok(entry),
        }
    }

    /// Remove `dir`, gallery `name`'s folder, which no gallery is served from: moved
    /// aside first, as a drop does, so that a crash never leaves half of it in place.
    /// (Only what a failed creation left: see [`Registry::add`].)
    fn remove_unserved(&self, name: &str, dir: &Path) {
        let trash = self.root.join(format!(
            ".dropped-{name}-{}-{}",
            std::process::id(),
            crate::storage::utc_timestamp()
        ));
        if let Err(e) = self.storage.rename(dir, &trash) {
            tracing::error!(dir = %dir.display(), error = %e, "could not move aside what a failed creation left");
            return;
        }
        if let Err(e) = self.storage.sync_dir(&self.root) {
            tracing::warn!(dir = %self.root.display(), error = %e, "could not sync the galleries folder");
        }
        match std::fs::remove_dir_all(&trash) {
            Ok(()) => tracing::info!(gallery = %name, "removed what a failed creation left"),
            Err(e) => {
                tracing::error!(dir = %trash.display(), error = %e, "could not remove what a failed creation left; the next start does")
            }
        }
    }

    /// The folder galleries live in (`DATA/galleries`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Create gallery `name` from the templates of `subjects` in gallery `source` (see
    /// [`Gallery::derive`]); the source is read through its current snapshot, so its
    /// searches and enrollments go on.
    pub fn derive(
        &self,
        name: &str,
        source: &str,
        subjects: &[String],
        expires_at: Option<i64>,
    ) -> Result<(Arc<GalleryEntry>, DeriveReport)> {
        self.add(name, |dir| {
            let master = self.get(source)?.snapshot()?;
            let (gallery, report) =
                Gallery::derive_expiring(&master, &dir, subjects, expires_at, self.storage.clone())?;
            Ok((GalleryEntry::new(name.to_owned(), dir, Some(gallery), None), report))
        })
    }

    /// Drop a gallery (serving or not) and delete its files. Searches already running
    /// finish on their snapshot (the mapped files stay readable until they let go).
    pub fn drop_gallery(&self, name: &str) -> Result<()> {
        let lock = self.admin_lock(name);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.get(name)?;
        // Close the writer first: writes waiting on it then see the gallery gone.
        let gallery = entry.lock_writer().take();
        *entry.problem.write().unwrap_or_else(|p| p.into_inner()) = Some(Problem::Dropped);
        *entry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = None;
        drop(gallery);
        self.galleries.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        // Move it aside first so a crash mid-delete never leaves a half gallery in place.
        let dir = &entry.dir;
        let trash = self.root.join(format!(
            ".dropped-{name}-{}-{}",
            std::process::id(),
            crate::storage::utc_timestamp()
        ));
        if let Err(e) = self.storage.rename(dir, &trash) {
            // Still under its name: kept in the map (closed, refusing every use) so that
            // the drop can be asked again, and no creation is made over its files.
            self.galleries
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_owned(), entry.clone());
            return Err(e);
        }
        self.storage.sync_dir(&self.root)?;
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            tracing::error!(dir = %trash.display(), error = %e, "could not remove a dropped gallery; the next start does");
        }
        Ok(())
    }

    /// Repair a gallery (serving or not) and serve it again. A log damaged on disk while
    /// this process holds every acknowledged record is first rewritten from memory, so
    /// nothing is lost; then the files are repaired as `biogate gallery repair` does.
    pub fn repair(&self, name: &str) -> Result<RepairReport> {
        let lock = self.admin_lock(name);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.get(name)?;
        let mut guard = entry.lock_writer();
        let mut rewrote = None;
        if let Some(g) = guard.as_mut()
            && g.poisoned().is_none()
            && g.log_probe().check().is_err()
        {
            let rows = g.rewrite_log_from_memory()?;
            rewrote = Some(rows);
        }
        // Release the gallery (its lock and maps) and repair the files.
        *guard = None;
        *entry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = None;
        let repaired = crate::gallery::repair::repair(&entry.dir, &self.storage);
        let reopened = Gallery::open_with(&entry.dir, self.storage.clone());
        let mut problem = entry.problem.write().unwrap_or_else(|p| p.into_inner());
        match reopened {
            Ok(g) => {
                *entry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(g.snapshot());
                *guard = Some(g);
                *problem = None;
            }
            Err(e) => *problem = Some(Problem::from_open_error(&e)),
        }
        drop(problem);
        let mut report = repaired?;
        if let Some(rows) = rewrote {
            report.clean = false;
            report.actions.insert(
                0,
                format!(
                    "rewrote the log from the server's memory ({rows} rows sealed into a segment); \
                     the damaged log is kept in damaged/"
                ),
            );
        }
        tracing::warn!(gallery = %name, actions = ?report.actions, lost = report.lost.len(), "repaired gallery");
        Ok(report)
    }

    /// Close every gallery (the server is stopping; see [`GalleryEntry::close`]),
    /// waiting for writes in progress to end. Failures are logged, and the first
    /// returned after every gallery was tried.
    pub fn close_all(&self) -> Result<()> {
        let mut first = None;
        for entry in self.all() {
            if let Err(e) = entry.close() {
                tracing::error!(gallery = %entry.name, error = %e, "could not close the gallery cleanly");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Compact a gallery while it serves (see [`GalleryEntry::compact`]).
    pub fn compact(&self, name: &str) -> Result<CompactReport> {
        let lock = self.admin_lock(name);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.get(name)?.compact()
    }

    /// [`GalleryEntry::remove_deleted`] of gallery `name`.
    pub fn remove_deleted(&self, name: &str) -> Result<CompactReport> {
        let lock = self.admin_lock(name);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.get(name)?.remove_deleted()
    }
}

/// A gallery name as an error echoes it: at most 64 characters, so that an absurd name
/// (10 KB) cannot push the answer past a client's metadata limit and turn NOT_FOUND
/// into RESOURCE_EXHAUSTED.
pub fn echo_name(name: &str) -> String {
    const MOST: usize = 64;
    if name.chars().count() <= MOST {
        format!("{name:?}")
    } else {
        let cut: String = name.chars().take(MOST).collect();
        format!("{cut:?}... ({} bytes)", name.len())
    }
}
