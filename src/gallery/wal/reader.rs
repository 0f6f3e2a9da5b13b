//! Reading a log for a writer or a reader: every record of every complete commit group,
//! a torn tail told apart from damage (`tail.rs`), and what the ack slots prove.

use super::format::{Ack, Parsed, WAL_HEADER_BYTES, WalHeader, WalRecord, parse_record};
use super::salvage::LostRecord;
use super::tail::{TailProof, is_torn, judge_end};
use crate::error::{Error, IoContext, Result};
use std::io::Read;
use std::path::Path;

/// A reader's place in a log: intact records are kept a whole commit group at a time
/// (with, for a salvage, the damaged records of the group being read).
pub(super) struct Cursor {
    pub(super) at: usize,
    pub(super) seq: u64,
    pub(super) records: Vec<WalRecord>,
    pub(super) lost: Vec<LostRecord>,
    pub(super) open_records: Vec<WalRecord>,
    pub(super) open_lost: Vec<LostRecord>,
    /// End of the last whole group.
    pub(super) committed_at: usize,
}

impl Cursor {
    pub(super) fn new(at: usize, seq: u64) -> Cursor {
        Cursor {
            at,
            seq,
            records: Vec::new(),
            lost: Vec::new(),
            open_records: Vec::new(),
            open_lost: Vec::new(),
            committed_at: at,
        }
    }

    /// Read the record here: an intact one is taken and the cursor moves past it
    /// (None); anything else is returned, the cursor unmoved.
    pub(super) fn step(&mut self, bytes: &[u8], dim: usize) -> Option<Parsed> {
        match parse_record(bytes, self.at, dim, self.seq) {
            Parsed::Record {
                record,
                group_end,
                next,
            } => {
                self.open_records.push(record);
                self.seq += 1;
                self.at = next;
                if group_end {
                    self.close_group();
                }
                None
            }
            other => Some(other),
        }
    }

    /// The group being read ended here: keep it.
    pub(super) fn close_group(&mut self) {
        self.records.append(&mut self.open_records);
        self.lost.append(&mut self.open_lost);
        self.committed_at = self.at;
    }

    /// Drop the group being read (a torn tail).
    pub(super) fn drop_group(&mut self) {
        self.open_records.clear();
        self.open_lost.clear();
    }
}

/// Read the whole file (a missing file is an error: the manifest names it).
pub(super) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .ctx(|| format!("reading log {}", path.display()))?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Corrupt(format!(
            "{}: the log named by the manifest is missing",
            path.display()
        ))),
        Err(e) => Err(e).ctx(|| format!("opening log {}", path.display())),
    }
}

/// What reading a log found.
#[derive(Debug)]
pub struct LogContents {
    pub header: WalHeader,
    /// Every record of every complete commit group, in order.
    pub records: Vec<WalRecord>,
    /// The number the next record gets.
    pub next_seq: u64,
    /// Bytes up to the end of the last complete group; anything after is a torn tail.
    pub valid_len: u64,
    /// Length of the file as found.
    pub file_len: u64,
    /// What the ack slots prove about the end of the log (tail.rs).
    pub tail: TailProof,
    /// Generation of the newest ack slot.
    pub(super) generation: u64,
}

impl LogContents {
    /// Bytes after `valid_len`: an unfinished last group (a write a crash interrupted,
    /// or, where the tail is [`TailProof::Unproven`], possibly a group cut short).
    pub fn torn_bytes(&self) -> u64 {
        self.file_len - self.valid_len
    }
}

/// Read a log, checking its header against `expected` (its `first_seq` is not
/// compared). A torn tail is reported in the result; damage and a missing file are
/// `Error::Corrupt` naming the file and byte offset.
pub fn read(path: &Path, expected: &WalHeader) -> Result<LogContents> {
    let bytes = read_bytes(path)?;
    let header = WalHeader::decode(path, &bytes)?;
    let mismatch = |what: &str| Err(Error::corrupt(path, format!("log header names {what}")));
    if header.gallery_id != expected.gallery_id {
        return mismatch("another gallery");
    }
    if header.log_id != expected.log_id {
        return mismatch(&format!(
            "log {} where the manifest names log {}",
            header.log_id, expected.log_id
        ));
    }
    if (header.dim, header.dtype) != (expected.dim, expected.dtype) {
        return mismatch("another dimension or dtype");
    }
    let dim = header.dim as usize;
    let mut cur = Cursor::new(WAL_HEADER_BYTES, header.first_seq);
    while cur.at < bytes.len() {
        let Some(bad) = cur.step(&bytes, dim) else { continue };
        if is_torn(&bytes, cur.at, &bad, cur.seq) {
            break;
        }
        let reason = match bad {
            Parsed::BadHead { reason } | Parsed::BadBody { reason, .. } => reason,
            Parsed::Incomplete | Parsed::Record { .. } => unreachable!("a torn tail or taken"),
        };
        return Err(Error::Corrupt(format!(
            "{}: damaged record at byte offset {} (record number {}): {reason}; records \
             after it are intact, so this is damage, not an interrupted write. Nothing was cut; \
             `biogate gallery repair` keeps every intact record and names the subjects affected",
            path.display(),
            cur.at,
            cur.seq
        )));
    }
    let valid_len = cur.committed_at as u64;
    let ack = Ack::newest(&bytes);
    let tail = judge_end(path, ack, valid_len, bytes.len() as u64, header.first_seq)?;
    Ok(LogContents {
        header,
        next_seq: cur.seq - cur.open_records.len() as u64,
        records: cur.records,
        valid_len,
        file_len: bytes.len() as u64,
        tail,
        generation: ack.map_or(0, |a| a.generation),
    })
}
