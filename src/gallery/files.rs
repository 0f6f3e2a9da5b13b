//! The gallery directory's files as files: the writer lock, writing a segment file
//! durably, keeping damaged files aside, removing files no manifest names. Every byte
//! goes through the [`Storage`] seam.

use super::DAMAGED_DIR;
use super::manifest::Manifest;
use super::segment::SegmentWriter;
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "LOCK";
/// How long to wait for a lock that looks held before reporting another writer.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Copy the bytes of the log at `path` from `offset` to its end into `damaged/` (an
/// unfinished last commit group, before the writer cuts it), durably. Returns the copy.
pub(crate) fn keep_log_tail(storage: &Storage, dir: &Path, path: &Path, offset: u64) -> Result<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut bytes)
        })
        .ctx(|| format!("reading the unfinished tail of {}", path.display()))?;
    let aside = dir.join(DAMAGED_DIR);
    storage.create_dir_all(&aside)?;
    let to = aside.join(format!(
        "{}-{}.tail-at-{offset}",
        crate::storage::utc_timestamp(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut file = storage.create(&to)?;
    file.write_all_ctx(&bytes)?;
    file.sync_all()?;
    storage.sync_dir(&aside)?;
    Ok(to)
}

/// Remove files of ours that the manifest does not name, except `in_progress` (a
/// segment a merge is writing, and its temporary file).
pub(crate) fn remove_orphans(
    storage: &Storage,
    dir: &Path,
    manifest: &Manifest,
    in_progress: Option<&str>,
) -> Result<()> {
    let writing = in_progress.map(|f| format!("{f}.tmp"));
    let keep: HashSet<&str> = manifest
        .segments
        .iter()
        .map(|s| s.file.as_str())
        .chain([manifest.wal.as_str()])
        .chain(in_progress)
        .chain(writing.as_deref())
        .collect();
    for entry in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("seg-")
            || name.starts_with("wal-")
            || (name.starts_with("MANIFEST") && name.ends_with(".tmp"))
            || name == "EXPIRY.tmp";
        if ours && !keep.contains(name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            tracing::info!(gallery = %dir.display(), file = name, "removing unreferenced file");
            storage.remove_file(&entry.path())?;
        }
    }
    Ok(())
}
