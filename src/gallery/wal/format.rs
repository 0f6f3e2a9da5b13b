//! The log's bytes: the file header, the two ack slots, and one record's head, key and
//! body, written and parsed (nothing here decides what a failed parse means: see
//! `tail.rs`).

use crate::error::{Error, Result};
use crate::template::Dtype;
use std::path::Path;

pub(super) const WAL_MAGIC: [u8; 8] = *b"BIOGWAL\0";
pub(super) const WAL_VERSION: u32 = 2;
/// The fixed part of the file header.
pub(super) const STATIC_HEADER_BYTES: usize = 64;
pub(super) const SLOT_BYTES: usize = 32;
/// Size of the file header with its two ack slots; records start here.
pub const WAL_HEADER_BYTES: usize = STATIC_HEADER_BYTES + 2 * SLOT_BYTES;
pub(super) const RECORD_MARKER: u32 = u32::from_le_bytes(*b"BGRC");
pub(super) const HEAD_BYTES: usize = 40;
pub(super) const FLAG_GROUP_END: u32 = 1;
pub(super) const TAG_ENROLL: u8 = 1;
pub(super) const TAG_DELETE: u8 = 2;
pub(super) const TAG_APPLIED: u8 = 3;
/// Largest body accepted (guards against a garbage length field).
pub(super) const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest key: tag, mark, and a subject id of at most 128 bytes.
pub(super) const MAX_KEY_BYTES: usize = 1 + 8 + 128;
/// Block size used to recognise a write that reached the disk only in part (a block of
/// zeros inside a record that fails its checksum).
pub(super) const SECTOR: usize = 512;

/// One logged operation.
#[derive(Clone, Debug, PartialEq)]
pub enum WalRecord {
    /// New templates (already L2-normalised, `dim` components each) for a subject.
    Enroll { subject: String, templates: Vec<f32> },
    /// Delete a subject: its rows in segments with id below `segments_before`, and its
    /// rows enrolled through the log before this record.
    Delete { subject: String, segments_before: u64 },
    /// A replica (cluster) applied its shard's batches through number `through`: logged
    /// in the batch's own commit group, so the number and the state it describes reach
    /// the disk together or not at all, and carried into every new log (a seal, a
    /// compaction), so it is never inferred.
    Applied { through: u64 },
}

impl WalRecord {
    /// The subject the record is about ("" for [`WalRecord::Applied`], about none).
    pub fn subject(&self) -> &str {
        match self {
            WalRecord::Enroll { subject, .. } | WalRecord::Delete { subject, .. } => subject,
            WalRecord::Applied { .. } => "",
        }
    }

    pub(super) fn encode_into(&self, seq: u64, group_end: bool, out: &mut Vec<u8>) {
        let mut key = Vec::with_capacity(16 + self.subject().len());
        let mut body: &[u8] = &[];
        match self {
            WalRecord::Enroll { subject, templates } => {
                key.push(TAG_ENROLL);
                key.extend_from_slice(subject.as_bytes());
                body = bytemuck::cast_slice(templates);
            }
            WalRecord::Delete {
                subject,
                segments_before,
            } => {
                key.push(TAG_DELETE);
                key.extend_from_slice(&segments_before.to_le_bytes());
                key.extend_from_slice(subject.as_bytes());
            }
            WalRecord::Applied { through } => {
                key.push(TAG_APPLIED);
                key.extend_from_slice(&through.to_le_bytes());
            }
        }
        let mut head = [0u8; HEAD_BYTES];
        head[0..4].copy_from_slice(&RECORD_MARKER.to_le_bytes());
        head[4..8].copy_from_slice(&(if group_end { FLAG_GROUP_END } else { 0 }).to_le_bytes());
        head[8..16].copy_from_slice(&seq.to_le_bytes());
        head[16..20].copy_from_slice(&(key.len() as u32).to_le_bytes());
        head[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
        head[24..28].copy_from_slice(&crc32fast::hash(&key).to_le_bytes());
        head[28..32].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
        let head_crc = crc32fast::hash(&head[..36]);
        head[36..40].copy_from_slice(&head_crc.to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&key);
        // f32 little-endian on every target biogate supports (checked at compile time below).
        out.extend_from_slice(body);
    }
}

const _: () = assert!(cfg!(target_endian = "little"), "the log stores f32 little-endian");

/// The log file's header: what the log belongs to and where its numbering starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Random id of the gallery (also in the manifest): a log from another gallery is refused.
    pub gallery_id: u64,
    /// The id in the log's file name: a log renamed or copied into place is refused.
    pub log_id: u64,
    /// Sequence number of the first record.
    pub first_seq: u64,
    pub dim: u32,
    pub dtype: u32,
}

impl WalHeader {
    pub(super) fn encode(&self) -> [u8; STATIC_HEADER_BYTES] {
        let mut b = [0u8; STATIC_HEADER_BYTES];
        b[0..8].copy_from_slice(&WAL_MAGIC);
        b[8..12].copy_from_slice(&WAL_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(WAL_HEADER_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.gallery_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.log_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..44].copy_from_slice(&self.dim.to_le_bytes());
        b[44..48].copy_from_slice(&self.dtype.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode(path: &Path, b: &[u8]) -> Result<WalHeader> {
        if b.len() < WAL_HEADER_BYTES {
            return Err(Error::corrupt(
                path,
                format!(
                    "{} bytes is shorter than the {WAL_HEADER_BYTES}-byte log header",
                    b.len()
                ),
            ));
        }
        if b[0..8] != WAL_MAGIC {
            return Err(Error::corrupt(path, "bad magic: not a biogate log (format 2)"));
        }
        if crc32fast::hash(&b[..60]) != u32_at(b, 60) {
            return Err(Error::corrupt(path, "log header checksum mismatch"));
        }
        let version = u32_at(b, 8);
        if version != WAL_VERSION || u32_at(b, 12) as usize != WAL_HEADER_BYTES {
            return Err(Error::corrupt(
                path,
                format!("log format version {version} is not supported"),
            ));
        }
        Ok(WalHeader {
            gallery_id: u64_at(b, 16),
            log_id: u64_at(b, 24),
            first_seq: u64_at(b, 32),
            dim: u32_at(b, 40),
            dtype: u32_at(b, 44),
        })
    }

    /// The header a gallery expects for log `log_id`.
    pub fn expected(gallery_id: u64, log_id: u64, first_seq: u64, dim: usize, dtype: Dtype) -> WalHeader {
        WalHeader {
            gallery_id,
            log_id,
            first_seq,
            dim: dim as u32,
            dtype: dtype.code(),
        }
    }
}

/// What one ack slot records: the log was acknowledged up to `len` bytes, records
/// numbered below `next_seq`. `closed`: nothing was appended after `len` when the slot
/// was written (a clean close, or the writer recording its final length once the log
/// went idle); an append writes a slot with `closed` unset, recording the length
/// *before* its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ack {
    pub(super) generation: u64,
    pub(super) len: u64,
    pub(super) next_seq: u64,
    pub(super) closed: bool,
}

/// An ack slot's flag: written by a close (see [`Ack::closed`]). Slots written by
/// biogate before the flag existed read as not closed.
const ACK_CLOSED: u32 = 1;

impl Ack {
    pub(super) fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.next_seq.to_le_bytes());
        b[24..28].copy_from_slice(&(if self.closed { ACK_CLOSED } else { 0 }).to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<Ack> {
        (b.len() >= SLOT_BYTES && crc32fast::hash(&b[..28]) == u32_at(b, 28) && b[..28].iter().any(|&x| x != 0)).then(
            || Ack {
                generation: u64_at(b, 0),
                len: u64_at(b, 8),
                next_seq: u64_at(b, 16),
                closed: u32_at(b, 24) & ACK_CLOSED != 0,
            },
        )
    }

    /// The newest valid slot of a file's header bytes.
    pub(super) fn newest(bytes: &[u8]) -> Option<Ack> {
        [0, 1]
            .into_iter()
            .filter_map(|i| {
                let at = STATIC_HEADER_BYTES + i * SLOT_BYTES;
                bytes.get(at..at + SLOT_BYTES).and_then(Ack::decode)
            })
            .max_by_key(|a| a.generation)
    }

    pub(super) fn offset(&self) -> u64 {
        (STATIC_HEADER_BYTES + (self.generation % 2) as usize * SLOT_BYTES) as u64
    }
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A record head whose own checksum holds: its lengths, number and flags can be trusted.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) group_end: bool,
    pub(super) key_len: usize,
    pub(super) body_len: usize,
    pub(super) key_crc: u32,
    pub(super) body_crc: u32,
}

impl Head {
    pub(super) fn total(&self) -> usize {
        HEAD_BYTES + self.key_len + self.body_len
    }
}

pub(super) fn parse_head(bytes: &[u8], at: usize) -> Option<Head> {
    let h = bytes.get(at..at + HEAD_BYTES)?;
    if u32_at(h, 0) != RECORD_MARKER || crc32fast::hash(&h[..36]) != u32_at(h, 36) {
        return None;
    }
    let head = Head {
        seq: u64_at(h, 8),
        group_end: u32_at(h, 4) & FLAG_GROUP_END != 0,
        key_len: u32_at(h, 16) as usize,
        body_len: u32_at(h, 20) as usize,
        key_crc: u32_at(h, 24),
        body_crc: u32_at(h, 28),
    };
    (head.key_len <= MAX_KEY_BYTES && head.body_len <= MAX_BODY_BYTES).then_some(head)
}

/// What is known of a record's key (tag and subject), checked or not.
pub(super) fn decode_key(key: &[u8]) -> Option<(u8, u64, String)> {
    let (&tag, rest) = key.split_first()?;
    let (mark, id) = match tag {
        TAG_ENROLL => (0, rest),
        TAG_DELETE => (u64::from_le_bytes(rest.get(..8)?.try_into().ok()?), rest.get(8..)?),
        TAG_APPLIED if rest.len() == 8 => return Some((tag, u64::from_le_bytes(rest.try_into().ok()?), String::new())),
        _ => return None,
    };
    let subject = std::str::from_utf8(id).ok()?;
    crate::template::check_stored_subject_id(subject).ok()?;
    Some((tag, mark, subject.to_owned()))
}

/// The result of reading one record at an offset.
pub(super) enum Parsed {
    Record {
        record: WalRecord,
        group_end: bool,
        next: usize,
    },
    /// The bytes end inside the record (or inside its head): an interrupted write.
    Incomplete,
    /// The head is intact but the key or body is not: the subject is known if the key is.
    BadBody {
        head: Head,
        subject: Option<(u8, String)>,
        reason: String,
    },
    /// The head itself fails its checks.
    BadHead { reason: String },
}

pub(super) fn parse_record(bytes: &[u8], at: usize, dim: usize, expected_seq: u64) -> Parsed {
    if bytes.len() - at < HEAD_BYTES {
        return Parsed::Incomplete;
    }
    let Some(head) = parse_head(bytes, at) else {
        let reason = if u32_at(bytes, at) != RECORD_MARKER {
            "no record marker"
        } else {
            "record head checksum mismatch"
        };
        return Parsed::BadHead { reason: reason.into() };
    };
    if head.seq != expected_seq {
        return Parsed::BadHead {
            reason: format!("sequence number {} where {expected_seq} was expected", head.seq),
        };
    }
    if bytes.len() - at < head.total() {
        return Parsed::Incomplete;
    }
    let key = &bytes[at + HEAD_BYTES..at + HEAD_BYTES + head.key_len];
    let body = &bytes[at + HEAD_BYTES + head.key_len..at + head.total()];
    let key_ok = crc32fast::hash(key) == head.key_crc;
    let decoded = if key_ok { decode_key(key) } else { None };
    let Some((tag, mark, subject)) = decoded else {
        return Parsed::BadBody {
            head,
            subject: None,
            reason: if key_ok {
                "malformed record key"
            } else {
                "record key checksum mismatch"
            }
            .into(),
        };
    };
    if crc32fast::hash(body) != head.body_crc {
        return Parsed::BadBody {
            head,
            subject: Some((tag, subject)),
            reason: "record body checksum mismatch".into(),
        };
    }
    let record = match tag {
        TAG_ENROLL if !body.is_empty() && body.len().is_multiple_of(4 * dim.max(1)) => WalRecord::Enroll {
            subject,
            templates: bytemuck::pod_collect_to_vec(body),
        },
        TAG_DELETE if body.is_empty() => WalRecord::Delete {
            subject,
            segments_before: mark,
        },
        TAG_APPLIED if body.is_empty() => WalRecord::Applied { through: mark },
        _ => {
            return Parsed::BadBody {
                head,
                subject: Some((tag, subject)),
                reason: format!(
                    "a {}-byte body does not fit the record kind or dimension {dim}",
                    body.len()
                ),
            };
        }
    };
    Parsed::Record {
        record,
        group_end: head.group_end,
        next: at + head.total(),
    }
}
