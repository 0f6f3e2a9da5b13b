//! The manifest: which segment files and which log make up the gallery right now.
//!
//! It is the gallery's single commit point. It is replaced atomically: written to
//! `MANIFEST.tmp`, fsynced, renamed over `MANIFEST`, then the directory is fsynced.
//! A crash leaves either the old or the new manifest, never a mix; files that no
//! manifest names (a half-written segment, an old log) are removed by the next writer.

use crate::error::{Error, IoContext, Result};
use crate::template::Dtype;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// File name of the manifest inside a gallery directory.
pub const MANIFEST_FILE: &str = "MANIFEST";
const FORMAT_VERSION: u32 = 1;

/// One sealed segment named by the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SegmentEntry {
    /// Monotonic id; deletions apply to segments with a smaller id than their mark.
    pub id: u64,
    /// File name inside the gallery directory.
    pub file: String,
    /// Row count, for `info` without opening the file.
    pub rows: u64,
}

/// The gallery's current shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub dim: usize,
    pub dtype: Dtype,
    pub segments: Vec<SegmentEntry>,
    /// File name of the active log.
    pub wal: String,
    /// The id the next segment (or log) file will get.
    pub next_file_id: u64,
}

impl Manifest {
    /// A manifest for a new, empty gallery.
    pub fn new(dim: usize, dtype: Dtype) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            dim,
            dtype,
            segments: Vec::new(),
            wal: wal_file_name(1),
            next_file_id: 2,
        }
    }

    /// Read and verify the manifest of the gallery in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "{} is not a biogate gallery (no {MANIFEST_FILE})",
                    dir.display()
                )));
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        let (body, crc_line) = text
            .rsplit_once("\ncrc32:")
            .ok_or_else(|| Error::corrupt(&path, "missing checksum line"))?;
        let crc =
            u32::from_str_radix(crc_line.trim(), 16).map_err(|_| Error::corrupt(&path, "malformed checksum line"))?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err(Error::corrupt(&path, "checksum mismatch"));
        }
        let m: Manifest = serde_json::from_str(body).map_err(|e| Error::corrupt(&path, e))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::corrupt(
                &path,
                format!("format version {} is not supported", m.format_version),
            ));
        }
        Ok(m)
    }

    /// Atomically replace the manifest in `dir` with `self`.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let body = serde_json::to_string_pretty(self).expect("manifest serialises");
        let text = format!("{body}\ncrc32:{:08x}\n", crc32fast::hash(body.as_bytes()));
        let tmp = dir.join("MANIFEST.tmp");
        let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).ctx(|| format!("renaming manifest in {}", dir.display()))?;
        sync_dir(dir)
    }
}

/// fsync a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// File name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("seg-{id:06}.bgs")
}

/// File name of log `id`.
pub fn wal_file_name(id: u64) -> String {
    format!("wal-{id:06}.log")
}
