//! The one seam between biogate and the file system for everything it writes: the
//! store (log, segments, manifest, repair) and the audit log.
//!
//! Every create, write, fsync, truncation, rename, link and removal goes through a
//! [`Storage`]. In production it does exactly the system call. In tests a
//! [`FaultPlan`] makes one chosen call (or every call from one on, like a disk that
//! stays full) fail with ENOSPC or EIO, so a test can walk a fault over every point of
//! an operation and prove that each fault is a clear error and loses nothing that was
//! acknowledged (SQLite's test VFS does the same). A write that faults first writes
//! half of its buffer, as a real short write would. Reads and memory maps do not go
//! through here: they cannot lose data.

use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The kinds of call that can be faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Write,
    Sync,
    Truncate,
    Rename,
    Link,
    Remove,
    SyncDir,
}

/// Decides, before each call, whether it fails.
pub trait FaultHook: Send + Sync {
    /// `Some(error)` makes the call fail with it.
    fn before(&self, op: Op, path: &Path) -> Option<std::io::Error>;
}

/// Where biogate's writes go. Cheap to clone; `Storage::default()` is the real file system.
#[derive(Clone, Default)]
pub struct Storage {
    faults: Option<Arc<dyn FaultHook>>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.faults.is_some() {
            "Storage(faulty)"
        } else {
            "Storage"
        })
    }
}

impl Storage {
    /// Storage whose calls consult `hook` first (tests).
    pub fn with_faults(hook: Arc<dyn FaultHook>) -> Storage {
        Storage { faults: Some(hook) }
    }

    fn check(&self, op: Op, path: &Path) -> std::io::Result<()> {
        match self.faults.as_ref().and_then(|h| h.before(op, path)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Create (or truncate) `path` for writing.
    pub fn create(&self, path: &Path) -> Result<StoredFile> {
        self.check(Op::Create, path)
            .and_then(|_| File::create(path))
            .ctx(|| format!("creating {}", path.display()))
            .map(|file| self.wrap(file, path))
    }

    /// Open an existing file for writing at its end.
    pub fn open_append(&self, path: &Path) -> Result<StoredFile> {
        OpenOptions::new()
            .append(true)
            .open(path)
            .ctx(|| format!("opening {} for appending", path.display()))
            .map(|file| self.wrap(file, path))
    }

    /// Open an existing file for writing at chosen offsets (not appending).
    pub fn open_write(&self, path: &Path) -> Result<StoredFile> {
        OpenOptions::new()
            .write(true)
            .open(path)
            .ctx(|| format!("opening {} for writing", path.display()))
            .map(|file| self.wrap(file, path))
    }

    fn wrap(&self, file: File, path: &Path) -> StoredFile {
        StoredFile {
            file,
            path: path.to_path_buf(),
            storage: self.clone(),
        }
    }

    /// Rename `from` to `to` (atomic on one file system; not durable until [`Storage::sync_dir`]).
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.check(Op::Rename, to)
            .and_then(|_| std::fs::rename(from, to))
            .ctx(|| format!("renaming {} to {}", from.display(), to.display()))
    }

    /// A second name for a file (to keep damaged bytes aside while the original name goes).
    pub fn hard_link(&self, from: &Path, to: &Path) -> Result<()> {
        self.check(Op::Link, to)
            .and_then(|_| std::fs::hard_link(from, to))
            .ctx(|| format!("linking {} as {}", from.display(), to.display()))
    }

    /// Remove a file.
    pub fn remove_file(&self, path: &Path) -> Result<()> {
        self.check(Op::Remove, path)
            .and_then(|_| std::fs::remove_file(path))
            .ctx(|| format!("removing {}", path.display()))
    }

    /// Create a directory (and its parents).
    pub fn create_dir_all(&self, dir: &Path) -> Result<()> {
        self.check(Op::Create, dir)
            .and_then(|_| std::fs::create_dir_all(dir))
            .ctx(|| format!("creating {}", dir.display()))
    }

    /// fsync a directory so that creations, renames and removals in it are durable.
    pub fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.check(Op::SyncDir, dir)
            .and_then(|_| File::open(dir))
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing directory {}", dir.display()))
    }

    /// Replace `path` with `bytes` atomically and durably: write `path.tmp`, fsync it,
    /// rename it over `path`, fsync the directory. A crash leaves the old or the new
    /// content, never a mix. The one way biogate commits a small file.
    ///
    /// An error before the rename leaves the old content (and no temporary file). If
    /// the rename happened but the directory could not be synced, the new content is in
    /// place but may not survive a crash: that is [`Error::OutcomeUnknown`].
    pub fn write_file_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let staged = self.create(&tmp).and_then(|mut f| {
            f.write_all_ctx(bytes)?;
            f.sync_all()
        });
        // rename(2) either happens or not; when it reports failure it did not.
        if let Err(e) = staged.and_then(|_| self.rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(|e| {
            Error::OutcomeUnknown(format!(
                "{}: the new content is in place but syncing its directory failed ({e}); whether \
                 it survives a crash is unknown",
                path.display()
            ))
        })
    }
}

/// A file opened for writing through a [`Storage`].
pub struct StoredFile {
    file: File,
    path: PathBuf,
    storage: Storage,
}

impl StoredFile {
    /// The path it was opened with (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Start writing bytes `offset..offset + len` to the device now, without waiting,
    /// and wait for the range written before it (`previous`) to reach it: a long
    /// stream of writes then overlaps the disk with the work that makes them, keeps
    /// at most two ranges dirty, and the final fsync has little left. A hint only
    /// (Linux `sync_file_range`): durability still comes from the fsync.
    pub fn start_writeback(&self, offset: u64, len: u64, previous: Option<(u64, u64)>) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = self.file.as_raw_fd();
            // SAFETY: plain syscalls on an open descriptor; ranges need not be valid.
            unsafe {
                if let Some((at, n)) = previous {
                    libc::sync_file_range(
                        fd,
                        at as libc::off64_t,
                        n as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
                libc::sync_file_range(
                    fd,
                    offset as libc::off64_t,
                    len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len, previous);
    }

    /// Write all of `buf`, naming the file on error.
    pub fn write_all_ctx(&mut self, buf: &[u8]) -> Result<()> {
        let path = self.path.clone();
        self.write_all(buf).ctx(|| format!("writing {}", path.display()))
    }

    /// Write all of `buf` at byte `offset` (a file opened with [`Storage::open_write`]
    /// or [`Storage::create`]); a fault writes half of it first, as a short write would.
    pub fn write_all_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.path.clone();
        let result = match self.storage.check(Op::Write, &self.path) {
            Err(e) => {
                let half = buf.len() / 2;
                if half > 0 {
                    let _ = self.file.write_all_at(&buf[..half], offset);
                }
                Err(e)
            }
            Ok(()) => self.file.write_all_at(buf, offset),
        };
        result.ctx(|| format!("writing {}", path.display()))
    }

    /// fdatasync: the data written so far is durable when this returns Ok.
    pub fn sync_data(&mut self) -> Result<()> {
        self.storage
            .check(Op::Sync, &self.path)
            .and_then(|_| self.file.sync_data())
            .ctx(|| format!("syncing {}", self.path.display()))
    }

    /// fsync (data and metadata).
    pub fn sync_all(&mut self) -> Result<()> {
        self.storage
            .check(Op::Sync, &self.path)
            .and_then(|_| self.file.sync_all())
            .ctx(|| format!("syncing {}", self.path.display()))
    }

    /// Cut or extend the file to `len` bytes.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        self.storage
            .check(Op::Truncate, &self.path)
            .and_then(|_| self.file.set_len(len))
            .ctx(|| format!("truncating {} to {len} bytes", self.path.display()))
    }

    /// Current size on disk, in bytes.
    pub fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .ctx(|| format!("reading the size of {}", self.path.display()))
    }
}

impl Write for StoredFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.storage.check(Op::Write, &self.path) {
            // A fault mid-write: half the buffer reaches the file, as a short write would.
            let half = buf.len() / 2;
            if half > 0 {
                self.file.write_all(&buf[..half])?;
            }
            return Err(e);
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for StoredFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Which calls a [`FaultPlan`] counts.
type CallFilter = dyn Fn(Op, &Path) -> bool + Send + Sync;

/// A UTC timestamp for file names, e.g. `20261127T140437.123456789Z`.
pub fn utc_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::time_text::civil_from_days(days as i64);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// A [`FaultHook`] for tests: counts the calls it sees and fails the `fail_at`-th one
/// (0-based) with `errno`, or every one from it on when `sticky`.
pub struct FaultPlan {
    fail_at: Option<usize>,
    errno: i32,
    sticky: bool,
    /// Only calls this accepts are counted and faulted (all, if none).
    only: Option<Box<CallFilter>>,
    seen: AtomicUsize,
    calls: Mutex<Vec<(Op, PathBuf)>>,
}

/// ENOSPC: the disk is full.
pub const ENOSPC: i32 = 28;
/// EIO: the device failed.
pub const EIO: i32 = 5;

impl FaultPlan {
    /// Count calls without failing any (to learn how many points an operation has).
    pub fn counting() -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            fail_at: None,
            errno: 0,
            sticky: false,
            only: None,
            seen: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Fail call number `at` with `errno` (and, if `sticky`, every later call too).
    pub fn fail(at: usize, errno: i32, sticky: bool) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            fail_at: Some(at),
            errno,
            sticky,
            only: None,
            seen: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Like [`FaultPlan::fail`], counting only the calls `only` accepts (e.g. those
    /// on the audit log); `at: None` only counts them.
    pub fn fail_where(
        only: impl Fn(Op, &Path) -> bool + Send + Sync + 'static,
        at: Option<usize>,
        errno: i32,
        sticky: bool,
    ) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            fail_at: at,
            errno,
            sticky,
            only: Some(Box::new(only)),
            seen: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Calls seen so far.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// The calls seen, in order (for messages naming the faulted point).
    pub fn calls(&self) -> Vec<(Op, PathBuf)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl FaultHook for FaultPlan {
    fn before(&self, op: Op, path: &Path) -> Option<std::io::Error> {
        if self.only.as_ref().is_some_and(|only| !only(op, path)) {
            return None;
        }
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        self.calls
            .lock()
            .expect("fault plan lock")
            .push((op, path.to_path_buf()));
        let fails = match self.fail_at {
            Some(at) => n == at || (self.sticky && n > at),
            None => false,
        };
        fails.then(|| std::io::Error::from_raw_os_error(self.errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_fails_exactly_the_chosen_call_and_a_faulted_write_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::fail(1, ENOSPC, false);
        let s = Storage::with_faults(plan.clone());
        let path = dir.path().join("f");
        let mut f = s.create(&path).unwrap(); // call 0
        let e = f.write_all_ctx(b"abcdefgh").unwrap_err(); // call 1 fails
        assert!(
            matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC)),
            "{e}"
        );
        assert!(e.to_string().contains("writing"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"abcd",
            "half the buffer reached the file"
        );
        f.write_all_ctx(b"ij").unwrap(); // call 2 succeeds: not sticky
        assert_eq!(plan.seen(), 3);
        assert_eq!(plan.calls()[1].0, Op::Write);

        let sticky = FaultPlan::fail(0, EIO, true);
        let s = Storage::with_faults(sticky);
        assert!(s.create(&dir.path().join("g")).is_err());
        assert!(s.sync_dir(dir.path()).is_err());
    }

    #[test]
    fn timestamps_are_civil_utc() {
        let t = utc_timestamp();
        assert_eq!(t.len(), "20261127T140437.123456789Z".len(), "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[8] == b'T',
            "{t}"
        );
    }

    #[test]
    fn atomic_writes_replace_the_whole_file_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let s = Storage::default();
        s.write_file_atomically(&path, b"one").unwrap();
        for at in 0..5 {
            let plan = FaultPlan::fail(at, EIO, false);
            let r = Storage::with_faults(plan).write_file_atomically(&path, b"two!");
            let now = std::fs::read(&path).unwrap();
            if r.is_err() && at < 3 {
                assert_eq!(now, b"one", "fault at {at}");
            } else {
                assert!(now == b"one" || now == b"two!", "fault at {at}");
            }
            s.write_file_atomically(&path, b"one").unwrap();
        }
        assert!(!dir.path().join("m.tmp").exists());
    }
}
