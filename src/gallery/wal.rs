//! The append log: every enrollment and deletion since the last compaction.
//!
//! A record on disk is `len: u32 | crc32(payload): u32 | payload`. A batch of records is
//! written with one `write` and made durable with one `fdatasync` (group commit); a
//! caller is told "done" only after that. On open, records are read until the first
//! one that is incomplete or fails its CRC: that torn tail (a crash mid-write) is cut
//! off, and everything before it, i.e. everything ever acknowledged, is replayed.

use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const TAG_ENROLL: u8 = 1;
const TAG_DELETE: u8 = 2;
/// Largest payload accepted when reading (guards against a garbage length field).
const MAX_RECORD_BYTES: usize = 64 << 20;

/// One logged operation.
#[derive(Clone, Debug, PartialEq)]
pub enum WalRecord {
    /// New templates (already L2-normalised, `dim` components each) for a subject.
    Enroll { subject: String, templates: Vec<f32> },
    /// Delete a subject: its rows in segments with id below `segments_before`, and its
    /// rows enrolled through the log before this record.
    Delete { subject: String, segments_before: u64 },
}

impl WalRecord {
    fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        let (tag, subject) = match self {
            WalRecord::Enroll { subject, .. } => (TAG_ENROLL, subject),
            WalRecord::Delete { subject, .. } => (TAG_DELETE, subject),
        };
        out.push(tag);
        out.extend_from_slice(&(subject.len() as u16).to_le_bytes());
        out.extend_from_slice(subject.as_bytes());
        match self {
            WalRecord::Enroll { templates, .. } => {
                out.extend_from_slice(&(templates.len() as u32).to_le_bytes());
                out.extend_from_slice(bytemuck::cast_slice(templates));
            }
            WalRecord::Delete { segments_before, .. } => {
                out.extend_from_slice(&segments_before.to_le_bytes());
            }
        }
        let payload_len = (out.len() - start - 8) as u32;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(payload: &[u8]) -> Option<WalRecord> {
        let (&tag, rest) = payload.split_first()?;
        let id_len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let subject = std::str::from_utf8(rest.get(2..2 + id_len)?).ok()?.to_owned();
        let rest = &rest[2 + id_len..];
        match tag {
            TAG_ENROLL => {
                let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                let bytes = rest.get(4..4 + 4 * n)?;
                if rest.len() != 4 + 4 * n {
                    return None;
                }
                let templates = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Some(WalRecord::Enroll { subject, templates })
            }
            TAG_DELETE if rest.len() == 8 => Some(WalRecord::Delete {
                subject,
                segments_before: u64::from_le_bytes(rest.try_into().ok()?),
            }),
            _ => None,
        }
    }
}

/// What reading a log found.
pub struct WalContents {
    /// Every intact record, in order.
    pub records: Vec<WalRecord>,
    /// Bytes of intact records; anything after this is a torn tail.
    pub valid_len: u64,
    /// Length of the file as found.
    pub file_len: u64,
}

/// Read every intact record of a log (a missing file is an empty log).
pub fn read(path: &Path) -> Result<WalContents> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .ctx(|| format!("reading log {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| format!("opening log {}", path.display())),
    }
    let mut records = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        if len > MAX_RECORD_BYTES || bytes.len() - at - 8 < len {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(record) = WalRecord::decode(payload) else {
            break;
        };
        records.push(record);
        at += 8 + len;
    }
    Ok(WalContents {
        records,
        valid_len: at as u64,
        file_len: bytes.len() as u64,
    })
}

/// The writer side of a log: appends batches durably.
pub struct WalWriter {
    path: PathBuf,
    file: File,
}

impl WalWriter {
    /// Open a log for appending, cutting it to `valid_len` first (the torn tail, if any).
    pub fn open(path: &Path, valid_len: u64) -> Result<WalWriter> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ctx(|| format!("opening log {}", path.display()))?;
        let len = file.metadata().ctx(|| format!("reading {}", path.display()))?.len();
        if len != valid_len {
            file.set_len(valid_len)
                .ctx(|| format!("cutting torn tail of {}", path.display()))?;
            file.sync_all().ctx(|| format!("syncing {}", path.display()))?;
        }
        Ok(WalWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Append `records` with one write and one fdatasync; returns once they are durable.
    pub fn append(&mut self, records: &[WalRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            r.encode_into(&mut buf);
            if buf.len() > MAX_RECORD_BYTES * 4 {
                self.write(&buf)?;
                buf.clear();
            }
        }
        self.write(&buf)?;
        self.file
            .sync_data()
            .ctx(|| format!("syncing log {}", self.path.display()))
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        let result = self.file.write_all(buf);
        if result.is_err() {
            // Best effort: leave no partial record behind for the next append to follow.
            // (Recovery would cut it anyway.)
            return result.ctx(|| format!("appending to log {}", self.path.display()));
        }
        Ok(())
    }
}

/// Check a record fits the on-disk limits before it is logged.
pub fn check_record_size(subject: &str, values: usize) -> Result<()> {
    if 64 + subject.len() + 4 * values > MAX_RECORD_BYTES {
        return Err(Error::invalid(format!(
            "enrollment of subject {subject:?} is too large ({values} values) for one log record"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        let records = vec![
            WalRecord::Enroll {
                subject: "alice".into(),
                templates: vec![0.5, -0.25, 1.0],
            },
            WalRecord::Delete {
                subject: "bob".into(),
                segments_before: 7,
            },
            WalRecord::Enroll {
                subject: "carol".into(),
                templates: vec![1.0; 6],
            },
        ];
        let mut w = WalWriter::open(&path, 0).unwrap();
        w.append(&records[..2]).unwrap();
        w.append(&records[2..]).unwrap();
        let full = std::fs::read(&path).unwrap();
        let read_back = read(&path).unwrap();
        assert_eq!(read_back.records, records);
        assert_eq!(read_back.valid_len, full.len() as u64);
        // Every cut inside the last record yields exactly the first two records.
        let mut first_two = Vec::new();
        records[0].encode_into(&mut first_two);
        records[1].encode_into(&mut first_two);
        for cut in first_two.len()..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let r = read(&path).unwrap();
            assert_eq!(r.records, records[..2], "cut at {cut}");
            assert_eq!(r.valid_len, first_two.len() as u64);
        }
        // A flipped byte in the last record drops it, not the earlier ones.
        let mut flipped = full.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read(&path).unwrap().records, records[..2]);
    }
}
