//! The manifest: which segment files and which log make up the gallery right now.
//!
//! It is the gallery's single commit point, and it names every file that must exist: a
//! missing one is an error, never an empty gallery. A commit replaces `MANIFEST`
//! atomically ([`Storage::write_file_atomically`]), then `MANIFEST.copy` the same way.
//! Opening reads `MANIFEST` alone; the copy is what `biogate gallery repair` restores
//! when `MANIFEST` is damaged or missing. Files that no manifest names (a half-written
//! segment, an old log) are removed by the next writer, but only while both copies
//! agree, so the copy never names a file that is gone.

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::template::Dtype;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the manifest inside a gallery directory.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// File name of its copy.
pub const MANIFEST_COPY_FILE: &str = "MANIFEST.copy";
const FORMAT_VERSION: u32 = 2;

/// One sealed segment named by the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SegmentEntry {
    /// Monotonic id; deletions apply to segments with a smaller id than their mark.
    pub id: u64,
    /// File name inside the gallery directory (a repaired segment keeps its id under a
    /// new file name).
    pub file: String,
    /// Row count, for `info` without opening the file.
    pub rows: u64,
    /// The file's identity: the CRC32 of its header, which covers the gallery id, the
    /// counts and the checksums of its metadata, ids and row chunks (so of every byte).
    /// Verified at every open: a valid segment copied over another (`cp seg-11 seg-9`),
    /// or one restored from another gallery or another day, is refused. Absent in
    /// manifests written before it existed (the next writer records it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_crc: Option<u32>,
}

impl SegmentEntry {
    /// The entry naming `segment`, written as `file` under segment id `id`.
    pub fn of(id: u64, file: &str, segment: &super::segment::Segment) -> SegmentEntry {
        SegmentEntry {
            id,
            file: file.to_owned(),
            rows: segment.rows() as u64,
            header_crc: Some(segment.header_crc()),
        }
    }
}

/// The gallery's current shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    /// Random id shared by the gallery's manifest, log headers and segment headers, so a
    /// file from another gallery is refused.
    pub gallery_id: u64,
    pub dim: usize,
    pub dtype: Dtype,
    pub segments: Vec<SegmentEntry>,
    /// File name of the active log.
    pub wal: String,
    /// Id of the active log (the number in its name, also in its header).
    pub wal_id: u64,
    /// The id the next segment (or log) file will get.
    pub next_file_id: u64,
    /// Distinct subject ids in the segments, deletions not applied (the log's records
    /// are applied to it at open, so live counts cost nothing per subject). Absent
    /// after a repair or in an older manifest: counted once at open then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_subjects: Option<u64>,
}

/// Whether a commit's second copy was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Both copies hold the new manifest.
    Both,
    /// `MANIFEST` is committed but its copy is stale: files the copy names must be kept
    /// until a later commit (or the next open) writes it.
    CopyStale,
}

impl Manifest {
    /// A manifest for a new, empty gallery.
    pub fn new(dim: usize, dtype: Dtype, gallery_id: u64) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            gallery_id,
            dim,
            dtype,
            segments: Vec::new(),
            wal: wal_file_name(1),
            wal_id: 1,
            next_file_id: 2,
            sealed_subjects: Some(0),
        }
    }

    /// Read and verify the manifest of the gallery in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        match Manifest::load_file(dir, MANIFEST_FILE) {
            Err(Error::NotFound(_)) if dir.join(MANIFEST_COPY_FILE).exists() => Err(Error::Corrupt(format!(
                "{}: {MANIFEST_FILE} is missing (its copy {MANIFEST_COPY_FILE} is there: \
                 `biogate gallery repair` restores it)",
                dir.display()
            ))),
            Err(Error::Corrupt(m)) if Manifest::load_file(dir, MANIFEST_COPY_FILE).is_ok() => Err(Error::Corrupt(
                format!("{m} (its copy {MANIFEST_COPY_FILE} is intact: `biogate gallery repair` restores it)"),
            )),
            other => other,
        }
    }

    /// Read and verify one of the two copies.
    pub fn load_file(dir: &Path, name: &str) -> Result<Manifest> {
        let path = dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "{} is not a biogate gallery (no {name})",
                    dir.display()
                )));
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("reading {}", path.display()),
                    source: e,
                });
            }
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| Error::corrupt(&path, "not UTF-8"))?;
        let (body, crc_line) = text
            .rsplit_once("\ncrc32:")
            .ok_or_else(|| Error::corrupt(&path, "missing checksum line"))?;
        let crc =
            u32::from_str_radix(crc_line.trim(), 16).map_err(|_| Error::corrupt(&path, "malformed checksum line"))?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err(Error::corrupt(&path, "checksum mismatch"));
        }
        let version: serde_json::Value = serde_json::from_str(body).map_err(|e| Error::corrupt(&path, e))?;
        if version.get("format_version").and_then(|v| v.as_u64()) != Some(u64::from(FORMAT_VERSION)) {
            return Err(Error::corrupt(
                &path,
                format!(
                    "format version {} is not supported (this biogate reads version {FORMAT_VERSION}; \
                     re-import the templates into a new gallery)",
                    version.get("format_version").unwrap_or(&serde_json::Value::Null)
                ),
            ));
        }
        serde_json::from_value(version).map_err(|e| Error::corrupt(&path, e))
    }

    fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_string_pretty(self).expect("manifest serialises");
        format!("{body}\ncrc32:{:08x}\n", crc32fast::hash(body.as_bytes())).into_bytes()
    }

    /// Commit `self` as the gallery's manifest: `MANIFEST`, then its copy.
    ///
    /// An error before `MANIFEST` is renamed into place leaves the old manifest (nothing
    /// committed). An error from the rename on leaves it unknown which one a restart will
    /// see: that is [`Error::OutcomeUnknown`], and the caller must stop writing. A failed
    /// copy is not an error (the commit stands) but is reported as [`Committed::CopyStale`].
    pub fn commit(&self, storage: &Storage, dir: &Path) -> Result<Committed> {
        let bytes = self.encode();
        storage.write_file_atomically(&dir.join(MANIFEST_FILE), &bytes)?;
        match storage.write_file_atomically(&dir.join(MANIFEST_COPY_FILE), &bytes) {
            Ok(()) => Ok(Committed::Both),
            Err(e) => {
                tracing::warn!(gallery = %dir.display(), error = %e, "could not update the manifest's copy");
                Ok(Committed::CopyStale)
            }
        }
    }

    /// Whether the copy holds exactly this manifest.
    pub fn copy_matches(&self, dir: &Path) -> bool {
        Manifest::load_file(dir, MANIFEST_COPY_FILE).is_ok_and(|c| &c == self)
    }

    /// Rewrite the copy from `self` (after a commit whose copy failed, or on open).
    pub fn refresh_copy(&self, storage: &Storage, dir: &Path) -> Result<()> {
        storage.write_file_atomically(&dir.join(MANIFEST_COPY_FILE), &self.encode())
    }
}

/// File name of segment file `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("seg-{id:06}.bgs")
}

/// File name of log `id`.
pub fn wal_file_name(id: u64) -> String {
    format!("wal-{id:06}.log")
}
