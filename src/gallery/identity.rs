//! Which file a gallery opened, so that a file changed under a running process is
//! noticed: replaced (another inode at the path), removed, truncated, or written in
//! place (its modification time moved, or its status-change time: a writer can set
//! the modification time back, as `rsync --inplace -t` or `touch -d` do, but setting
//! it moves the ctime, which nobody but the kernel sets).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's identity and shape when it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// How a file differs from the one that was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileChange {
    /// Nothing at the path any more.
    Removed,
    /// Another file is at the path.
    Replaced,
    /// Same file, now `now` bytes where `was` were opened.
    Resized { was: u64, now: u64 },
    /// Same file and length, written since it was opened.
    Modified,
}

impl std::fmt::Display for FileChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileChange::Removed => write!(f, "was removed"),
            FileChange::Replaced => write!(f, "was replaced by another file"),
            FileChange::Resized { was, now } if now < was => write!(f, "was truncated from {was} to {now} bytes"),
            FileChange::Resized { was, now } => write!(f, "grew from {was} to {now} bytes"),
            FileChange::Modified => write!(f, "was written to in place"),
        }
    }
}

impl FileIdentity {
    fn of(m: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// The identity of an open file.
    pub fn of_file(file: &File) -> std::io::Result<FileIdentity> {
        file.metadata().map(|m| FileIdentity::of(&m))
    }

    /// How the file now at `path` differs from this one, if it does.
    pub fn compare(&self, path: &Path) -> Option<FileChange> {
        let now = match std::fs::metadata(path) {
            Ok(m) => FileIdentity::of(&m),
            Err(_) => return Some(FileChange::Removed),
        };
        if (now.dev, now.ino) != (self.dev, self.ino) {
            Some(FileChange::Replaced)
        } else if now.len != self.len {
            Some(FileChange::Resized {
                was: self.len,
                now: now.len,
            })
        } else if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns) {
            Some(FileChange::Modified)
        } else {
            None
        }
    }

    /// The same identity with the current modification and change times (after a
    /// written-in-place file was verified again and found intact).
    pub fn refreshed(&self, path: &Path) -> FileIdentity {
        std::fs::metadata(path)
            .map(|m| FileIdentity::of(&m))
            .ok()
            .filter(|n| (n.dev, n.ino, n.len) == (self.dev, self.ino, self.len))
            .unwrap_or(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let original = File::open(&p).unwrap(); // held, as a mapping holds it: its inode is not reused
        let id = FileIdentity::of_file(&original).unwrap();
        assert_eq!(id.compare(&p), None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4)
            .unwrap();
        assert_eq!(id.compare(&p), Some(FileChange::Resized { was: 10, now: 4 }));
        assert!(id.compare(&p).unwrap().to_string().contains("truncated"));
        // Written in place with its modification time set back: the ctime moved.
        let id = FileIdentity::of_file(&original).unwrap();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"X", 1).unwrap();
        f.set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        assert_eq!(id.compare(&p), Some(FileChange::Modified));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(id.compare(&p), Some(FileChange::Removed));
        std::fs::write(dir.path().join("g"), b"0123456789").unwrap();
        std::fs::rename(dir.path().join("g"), &p).unwrap();
        assert_eq!(id.compare(&p), Some(FileChange::Replaced));
    }
}
