//! The append log: every enrollment and deletion since the last seal or compaction.
//!
//! ```text
//! file header (64 bytes)  magic "BIOGWAL\0" | version | header size | gallery id | log id
//!                         | first sequence number | dim | dtype | reserved | header crc32
//! two ack slots (2 x 32)  generation | acknowledged length | next sequence number | crc32
//! record head (40 bytes)  marker | flags | seq u64 | key_len | body_len | crc32(key)
//!                         | crc32(body) | reserved | crc32(head bytes 0..36)
//! key                     tag | (deletions: segments_before u64) | subject id
//! body                    enrollments: templates, f32 little-endian
//! ```
//!
//! Records are numbered consecutively from the header's first sequence number. A batch
//! (a commit group) is written with one `write` and made durable with one `fdatasync`;
//! its last record carries `GROUP_END`, and the caller is told "done" only after the
//! fsync. So on disk:
//!
//! - a **torn tail** is the one thing a crash can leave: the final, unfinished commit
//!   group (bytes that run past the end of the file, a head never written, or a group
//!   whose end never reached the disk). It was never acknowledged; the next writer cuts
//!   it, from the start of that group.
//! - anything else that fails its checks is **damage**: a bad record followed by an
//!   intact record that ends a group (which was written only after the bad one was
//!   durable), or a complete final record that fails its checksum. Damage is an error
//!   naming the file and offset; nothing is cut. `biogate gallery repair` keeps every
//!   intact record, moves the damaged file aside and names the subjects affected
//!   (the key has its own checksum, so a record whose templates are damaged still
//!   names its subject).
//!
//! Truncation is told apart from a torn write by the ack slots: each append also
//! records, in the older of two slots and under the same fdatasync, the length of the
//! log acknowledged *before* it (already durable, so a crash can never leave a slot
//! claiming more than is on disk). Closing the log records the final length. A log
//! shorter than its newest valid slot claims was cut: damage, not a torn tail. (Only
//! the group appended last before a crash is not covered; a crash there is
//! indistinguishable from a cut.)
//!
//! A failed write or fsync is rolled back by cutting the file to the end of the last
//! acknowledged group; after a failed fsync the writer refuses further appends until
//! the gallery is reopened (PostgreSQL's lesson: after a failed fsync the process may
//! not believe anything it wrote is durable).

use crate::error::{Error, IoContext, Result};
use crate::storage::{Storage, StoredFile};
use crate::template::Dtype;
use std::io::Read;
use std::path::{Path, PathBuf};

const WAL_MAGIC: [u8; 8] = *b"BIOGWAL\0";
const WAL_VERSION: u32 = 2;
/// The fixed part of the file header.
const STATIC_HEADER_BYTES: usize = 64;
const SLOT_BYTES: usize = 32;
/// Size of the file header with its two ack slots; records start here.
pub const WAL_HEADER_BYTES: usize = STATIC_HEADER_BYTES + 2 * SLOT_BYTES;
const RECORD_MARKER: u32 = u32::from_le_bytes(*b"BGRC");
const HEAD_BYTES: usize = 40;
const FLAG_GROUP_END: u32 = 1;
const TAG_ENROLL: u8 = 1;
const TAG_DELETE: u8 = 2;
/// Largest body accepted (guards against a garbage length field).
const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest key: tag, mark, and a subject id of at most 128 bytes.
const MAX_KEY_BYTES: usize = 1 + 8 + 128;
/// Block size used to recognise a write that reached the disk only in part (a block of
/// zeros inside a record that fails its checksum).
const SECTOR: usize = 512;

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
    /// The subject the record is about.
    pub fn subject(&self) -> &str {
        match self {
            WalRecord::Enroll { subject, .. } | WalRecord::Delete { subject, .. } => subject,
        }
    }

    fn encode_into(&self, seq: u64, group_end: bool, out: &mut Vec<u8>) {
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
    fn encode(&self) -> [u8; STATIC_HEADER_BYTES] {
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

    fn decode(path: &Path, b: &[u8]) -> Result<WalHeader> {
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
/// numbered below `next_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack {
    generation: u64,
    len: u64,
    next_seq: u64,
}

impl Ack {
    fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Ack> {
        (b.len() >= SLOT_BYTES && crc32fast::hash(&b[..28]) == u32_at(b, 28) && b[..28].iter().any(|&x| x != 0)).then(
            || Ack {
                generation: u64_at(b, 0),
                len: u64_at(b, 8),
                next_seq: u64_at(b, 16),
            },
        )
    }

    /// The newest valid slot of a file's header bytes.
    fn newest(bytes: &[u8]) -> Option<Ack> {
        [0, 1]
            .into_iter()
            .filter_map(|i| {
                let at = STATIC_HEADER_BYTES + i * SLOT_BYTES;
                bytes.get(at..at + SLOT_BYTES).and_then(Ack::decode)
            })
            .max_by_key(|a| a.generation)
    }

    fn offset(&self) -> u64 {
        (STATIC_HEADER_BYTES + (self.generation % 2) as usize * SLOT_BYTES) as u64
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A record head whose own checksum holds: its lengths, number and flags can be trusted.
#[derive(Clone, Copy, Debug)]
struct Head {
    seq: u64,
    group_end: bool,
    key_len: usize,
    body_len: usize,
    key_crc: u32,
    body_crc: u32,
}

impl Head {
    fn total(&self) -> usize {
        HEAD_BYTES + self.key_len + self.body_len
    }
}

fn parse_head(bytes: &[u8], at: usize) -> Option<Head> {
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
fn decode_key(key: &[u8]) -> Option<(u8, u64, String)> {
    let (&tag, rest) = key.split_first()?;
    let (mark, id) = match tag {
        TAG_ENROLL => (0, rest),
        TAG_DELETE => (u64::from_le_bytes(rest.get(..8)?.try_into().ok()?), rest.get(8..)?),
        _ => return None,
    };
    let subject = std::str::from_utf8(id).ok()?;
    crate::template::check_subject_id(subject).ok()?;
    Some((tag, mark, subject.to_owned()))
}

/// The result of reading one record at an offset.
enum Parsed {
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

fn parse_record(bytes: &[u8], at: usize, dim: usize, expected_seq: u64) -> Parsed {
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

/// Whether an intact record head that ends a commit group, numbered after `after_seq`,
/// starts anywhere after `from`.
fn intact_group_end_after(bytes: &[u8], from: usize, after_seq: Option<u64>) -> Option<usize> {
    let marker = RECORD_MARKER.to_le_bytes();
    (from..bytes.len().saturating_sub(HEAD_BYTES - 1))
        .filter(|&p| bytes[p..p + 4] == marker)
        .find(|&p| {
            parse_head(bytes, p)
                .is_some_and(|h| h.group_end && after_seq.is_none_or(|s| h.seq > s) && bytes.len() - p >= h.total())
        })
}

/// Whether an aligned block of zeros lies inside `bytes[from..to]`: a write that
/// reached the disk only in part.
fn has_zero_block(bytes: &[u8], from: usize, to: usize) -> bool {
    (from.next_multiple_of(SECTOR)..to)
        .step_by(SECTOR)
        .any(|b| b + SECTOR <= to && bytes[b..b + SECTOR].iter().all(|&x| x == 0))
}

/// Whether the record that failed to parse at `at` begins the final, unfinished write
/// (never acknowledged) rather than damage: nothing that ends a group follows it, and
/// it is visibly incomplete (runs past the end, a head of zeros, a group whose end
/// never arrived, or a block of zeros inside).
fn is_torn(bytes: &[u8], at: usize, parsed: &Parsed, expected_seq: u64) -> bool {
    if intact_group_end_after(bytes, at + 1, expected_seq.checked_sub(1)).is_some() {
        return false;
    }
    match parsed {
        Parsed::Incomplete => true,
        Parsed::BadHead { .. } => bytes[at..(at + HEAD_BYTES).min(bytes.len())].iter().all(|&b| b == 0),
        Parsed::BadBody { head, .. } => !head.group_end || has_zero_block(bytes, at, at + head.total()),
        Parsed::Record { .. } => false,
    }
}

/// A reader's place in a log: intact records are kept a whole commit group at a time
/// (with, for a salvage, the damaged records of the group being read).
struct Cursor {
    at: usize,
    seq: u64,
    records: Vec<WalRecord>,
    lost: Vec<LostRecord>,
    open_records: Vec<WalRecord>,
    open_lost: Vec<LostRecord>,
    /// End of the last whole group.
    committed_at: usize,
}

impl Cursor {
    fn new(at: usize, seq: u64) -> Cursor {
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
    fn step(&mut self, bytes: &[u8], dim: usize) -> Option<Parsed> {
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
    fn close_group(&mut self) {
        self.records.append(&mut self.open_records);
        self.lost.append(&mut self.open_lost);
        self.committed_at = self.at;
    }

    /// Drop the group being read (a torn tail).
    fn drop_group(&mut self) {
        self.open_records.clear();
        self.open_lost.clear();
    }
}

/// Read the whole file (a missing file is an error: the manifest names it).
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
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
    /// Generation of the newest ack slot.
    generation: u64,
}

impl LogContents {
    /// Bytes of torn tail (an interrupted, never acknowledged write) after `valid_len`.
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
    if let Some(ack) = ack
        && ack.len > valid_len
    {
        return Err(Error::Corrupt(format!(
            "{}: the log was cut: {} bytes (records {}..{}) were acknowledged but only {valid_len} bytes \
             are intact; `biogate gallery repair` keeps what is there and reports the rest",
            path.display(),
            ack.len,
            header.first_seq,
            ack.next_seq
        )));
    }
    Ok(LogContents {
        header,
        next_seq: cur.seq - cur.open_records.len() as u64,
        records: cur.records,
        valid_len,
        file_len: bytes.len() as u64,
        generation: ack.map_or(0, |a| a.generation),
    })
}

/// A record a repair could not keep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LostRecord {
    /// Byte offset where the damage starts.
    pub offset: u64,
    /// Its sequence number, when its head could be read.
    pub seq: Option<u64>,
    /// "enroll" or "delete", when known.
    pub kind: Option<&'static str>,
    /// The subject, when known.
    pub subject: Option<String>,
    /// Whether the subject was read from checksummed bytes (otherwise a best guess from
    /// a damaged record, or unknown).
    pub subject_verified: bool,
}

/// What a repair can keep of a log.
#[derive(Debug)]
pub struct Salvage {
    /// The header, when it was intact.
    pub header: Option<WalHeader>,
    /// Every intact record of every acknowledged group, in order.
    pub records: Vec<WalRecord>,
    /// Records that were acknowledged (they lie before an intact group end) but are damaged.
    pub lost: Vec<LostRecord>,
    /// Records whose number is skipped by the damage but of which nothing could be read.
    pub unreadable: u64,
    /// Damaged byte ranges.
    pub damaged: Vec<(u64, u64)>,
    /// Bytes of torn tail (never acknowledged) dropped at the end.
    pub torn_bytes: u64,
    /// The number after the last record kept.
    pub next_seq: u64,
}

/// The key of a record whose head is damaged. One damaged field leaves the other
/// intact: the key's own checksum finds its length (then the subject is verified), or
/// else the length field gives a best guess.
fn legible_key(bytes: &[u8], at: usize) -> (Option<(u8, u64, String)>, bool) {
    let field = |o: usize| bytes.get(at + o..at + o + 4).map(|b| u32_at(b, 0));
    let key_at = at + HEAD_BYTES;
    if let Some(key_crc) = field(24) {
        for len in 1..=MAX_KEY_BYTES {
            let Some(key) = bytes.get(key_at..key_at + len) else {
                break;
            };
            if crc32fast::hash(key) == key_crc
                && let Some(k) = decode_key(key)
            {
                return (Some(k), true);
            }
        }
    }
    let guess = field(16).and_then(|len| {
        let len = len as usize;
        (len <= MAX_KEY_BYTES)
            .then(|| bytes.get(key_at..key_at + len))
            .flatten()
            .and_then(decode_key)
    });
    (guess, false)
}

fn kind_name(tag: u8) -> &'static str {
    if tag == TAG_DELETE { "delete" } else { "enroll" }
}

/// Keep what can be kept of a log whose header or records are damaged (or that is
/// fine: then everything is kept). `dim` decodes the records when the header is
/// damaged too.
pub fn salvage(path: &Path, dim: usize) -> Result<Salvage> {
    let bytes = read_bytes(path)?;
    let header = WalHeader::decode(path, &bytes).ok();
    let mut out = Salvage {
        header,
        records: Vec::new(),
        lost: Vec::new(),
        unreadable: 0,
        damaged: Vec::new(),
        torn_bytes: 0,
        next_seq: 0,
    };
    if bytes.len() <= WAL_HEADER_BYTES {
        out.next_seq = header.map_or(0, |h| h.first_seq);
        account_for_cut(&bytes, &mut out);
        return Ok(out);
    }
    // Without a header, the numbering starts at the first intact record; the bytes
    // before it are damage.
    let mut at = WAL_HEADER_BYTES;
    let seq = match header {
        Some(h) => h.first_seq,
        None => match (WAL_HEADER_BYTES..bytes.len()).find_map(|p| parse_head(&bytes, p).map(|h| (p, h))) {
            Some((p, h)) => {
                if p > at {
                    out.damaged.push((at as u64, p as u64));
                    at = p;
                }
                h.seq
            }
            None => {
                out.damaged.push((WAL_HEADER_BYTES as u64, bytes.len() as u64));
                account_for_cut(&bytes, &mut out);
                return Ok(out);
            }
        },
    };
    let mut cur = Cursor::new(at, seq);
    while cur.at < bytes.len() {
        let Some(bad) = cur.step(&bytes, dim) else { continue };
        let at = cur.at;
        if is_torn(&bytes, at, &bad, cur.seq) {
            out.torn_bytes = (bytes.len() - cur.committed_at) as u64;
            cur.drop_group();
            break;
        }
        // Damage: describe the record, then go on at the next intact one.
        let (end, next_seq) = match bad {
            Parsed::BadBody { head, subject, .. } => {
                let verified = subject.is_some();
                // A damaged key may still be legible: report it as a guess.
                let subject = subject.or_else(|| {
                    let key = bytes.get(at + HEAD_BYTES..at + HEAD_BYTES + head.key_len)?;
                    decode_key(key).map(|(t, _, s)| (t, s))
                });
                cur.open_lost.push(LostRecord {
                    offset: at as u64,
                    seq: Some(head.seq),
                    kind: subject.as_ref().map(|(t, _)| kind_name(*t)),
                    subject: subject.map(|(_, s)| s),
                    subject_verified: verified,
                });
                (at + head.total(), cur.seq + 1)
            }
            _ => {
                let (guess, verified) = legible_key(&bytes, at);
                let resume = (at + 1..bytes.len())
                    .find_map(|p| parse_head(&bytes, p).filter(|h| h.seq >= cur.seq).map(|h| (p, h.seq)));
                let (end, next_seq) = resume.unwrap_or((bytes.len(), cur.seq + 1));
                if next_seq > cur.seq {
                    // At least one record's bytes are here; more if the numbering skips.
                    cur.open_lost.push(LostRecord {
                        offset: at as u64,
                        seq: None,
                        kind: guess.as_ref().map(|(t, _, _)| kind_name(*t)),
                        subject: guess.map(|(_, _, s)| s),
                        subject_verified: verified,
                    });
                    out.unreadable += next_seq - cur.seq - 1;
                }
                (end, next_seq)
            }
        };
        out.damaged.push((at as u64, end as u64));
        cur.seq = next_seq;
        cur.at = end;
        if matches!(bad_ended_group(&bytes, at), Some(true)) {
            cur.close_group();
        }
    }
    // Nothing more follows: what is open was acknowledged as far as anyone can tell.
    cur.close_group();
    out.records = cur.records;
    out.lost = cur.lost;
    out.next_seq = cur.seq;
    account_for_cut(&bytes, &mut out);
    Ok(out)
}

/// Whether the damaged record at `at` ended its commit group, when its head says so.
fn bad_ended_group(bytes: &[u8], at: usize) -> Option<bool> {
    parse_head(bytes, at).map(|h| h.group_end)
}

/// If the log is shorter than its ack slot says was acknowledged, the records between
/// are gone: count them as unreadable.
fn account_for_cut(bytes: &[u8], out: &mut Salvage) {
    if let Some(ack) = Ack::newest(bytes)
        && ack.next_seq > out.next_seq
    {
        out.damaged.push((bytes.len() as u64, ack.len));
        out.unreadable += ack.next_seq - out.next_seq;
        out.torn_bytes = 0;
        out.next_seq = ack.next_seq;
    }
}

/// The writer side of a log: appends commit groups durably.
pub struct WalWriter {
    file: StoredFile,
    path: PathBuf,
    next_seq: u64,
    /// End of the last acknowledged group: where the next group goes, and what a
    /// failed append is cut back to.
    durable_len: u64,
    /// Generation of the newest ack slot written.
    generation: u64,
    /// Set after a failed fsync or a failed rollback: no further appends.
    poisoned: Option<String>,
}

impl WalWriter {
    /// Create a new, empty log with `header`, durably (the caller syncs the directory).
    pub fn create(storage: &Storage, path: &Path, header: &WalHeader) -> Result<WalWriter> {
        let mut file = storage.create(path)?;
        let mut bytes = header.encode().to_vec();
        let first = Ack {
            generation: 1,
            len: WAL_HEADER_BYTES as u64,
            next_seq: header.first_seq,
        };
        bytes.extend_from_slice(&first.encode());
        bytes.extend_from_slice(&[0u8; SLOT_BYTES]);
        file.write_all_ctx(&bytes)?;
        file.sync_all()?;
        Ok(WalWriter {
            file,
            path: path.to_path_buf(),
            next_seq: header.first_seq,
            durable_len: WAL_HEADER_BYTES as u64,
            generation: 1,
            poisoned: None,
        })
    }

    /// Open a log that [`read`] accepted for appending, cutting its torn tail first.
    pub fn open(storage: &Storage, path: &Path, contents: &LogContents) -> Result<WalWriter> {
        let mut file = storage.open_write(path)?;
        if file.size()? != contents.valid_len {
            file.set_len(contents.valid_len)?;
            file.sync_all()?;
        }
        Ok(WalWriter {
            file,
            path: path.to_path_buf(),
            next_seq: contents.next_seq,
            durable_len: contents.valid_len,
            generation: contents.generation,
            poisoned: None,
        })
    }

    /// The number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes acknowledged as durable (the end of the last group appended).
    pub fn durable_len(&self) -> u64 {
        self.durable_len
    }

    /// Why appends are refused, if they are.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The next ack slot, recording what is durable now.
    fn next_ack(&self) -> Ack {
        Ack {
            generation: self.generation + 1,
            len: self.durable_len,
            next_seq: self.next_seq,
        }
    }

    /// Append `records` as one commit group: one write, one fdatasync (which also makes
    /// durable an ack slot recording the log's length before this group). Returns once
    /// they are durable. On failure nothing of the group stays in the log (it is cut
    /// back), or, if even that fails, the writer is poisoned and the error says the
    /// outcome is unknown.
    pub fn append(&mut self, records: &[WalRecord]) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for (i, r) in records.iter().enumerate() {
            r.encode_into(self.next_seq + i as u64, i + 1 == records.len(), &mut buf);
        }
        let ack = self.next_ack();
        let result = self
            .file
            .write_all_at(&buf, self.durable_len)
            .and_then(|_| self.file.write_all_at(&ack.encode(), ack.offset()))
            .map_err(|e| (e, false));
        let result = result.and_then(|_| self.file.sync_data().map_err(|e| (e, true)));
        match result {
            Ok(()) => {
                self.next_seq += records.len() as u64;
                self.durable_len += buf.len() as u64;
                self.generation = ack.generation;
                Ok(())
            }
            Err((e, fsync_failed)) => Err(self.roll_back(e, fsync_failed)),
        }
    }

    /// Record the final length in an ack slot, durably (a clean close): after this a
    /// cut anywhere in the log is recognised as damage.
    pub fn close(&mut self) -> Result<()> {
        if self.poisoned.is_some() {
            return Ok(());
        }
        let ack = self.next_ack();
        self.file.write_all_at(&ack.encode(), ack.offset())?;
        self.file.sync_data()?;
        self.generation = ack.generation;
        Ok(())
    }

    /// Cut the log back to the last acknowledged group after a failed append.
    fn roll_back(&mut self, cause: Error, fsync_failed: bool) -> Error {
        let durable_len = self.durable_len;
        let cut = self.file.set_len(durable_len).and_then(|_| self.file.sync_all());
        match cut {
            Ok(()) if !fsync_failed => cause,
            Ok(()) => {
                self.poisoned = Some(format!(
                    "an fsync of {} failed ({cause}); the failed batch was cut off, and no further \
                     writes are accepted until the gallery is reopened",
                    self.path.display()
                ));
                cause
            }
            Err(cut_error) => {
                let why = format!(
                    "appending to {} failed ({cause}) and cutting the failed batch off failed too \
                     ({cut_error}): whether that batch is durable is unknown until the gallery is reopened",
                    self.path.display()
                );
                self.poisoned = Some(why.clone());
                Error::OutcomeUnknown(why)
            }
        }
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(log = %self.path.display(), error = %e, "could not record the log's final length");
        }
    }
}

/// Check a record fits the on-disk limits before it is logged.
pub fn check_record_size(subject: &str, values: usize) -> Result<()> {
    if 4 * values > MAX_BODY_BYTES || subject.len() + 9 > MAX_KEY_BYTES {
        return Err(Error::invalid(format!(
            "enrollment of subject {subject:?} is too large ({values} values) for one log record"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 3;

    fn header() -> WalHeader {
        WalHeader::expected(42, 1, 10, DIM, Dtype::F32)
    }

    fn enroll(s: &str, n: usize) -> WalRecord {
        WalRecord::Enroll {
            subject: s.into(),
            templates: (0..n * DIM).map(|i| i as f32 * 0.25 - 1.0).collect(),
        }
    }

    /// Groups: [a], [b, bob-delete, c], [d].
    fn groups() -> Vec<Vec<WalRecord>> {
        vec![
            vec![enroll("alice", 1)],
            vec![
                enroll("bob", 2),
                WalRecord::Delete {
                    subject: "bob".into(),
                    segments_before: 7,
                },
                enroll("carol", 200),
            ],
            vec![enroll("dave", 1)],
        ]
    }

    /// Write the groups; returns the file's bytes and each group's end offset. With
    /// `crash`, the writer is never closed (as if the process died after the last ack).
    fn write_log_with(path: &Path, crash: bool) -> (Vec<u8>, Vec<u64>) {
        let mut w = WalWriter::create(&Storage::default(), path, &header()).unwrap();
        let mut ends = Vec::new();
        for g in groups() {
            w.append(&g).unwrap();
            ends.push(std::fs::metadata(path).unwrap().len());
        }
        if crash {
            std::mem::forget(w);
        } else {
            drop(w);
        }
        (std::fs::read(path).unwrap(), ends)
    }

    fn write_log(path: &Path) -> (Vec<u8>, Vec<u64>) {
        write_log_with(path, false)
    }

    #[test]
    fn records_round_trip_a_torn_last_group_is_cut_and_a_deeper_cut_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        let (full, ends) = write_log_with(&path, true);
        let all: Vec<WalRecord> = groups().concat();
        let r = read(&path, &header()).unwrap();
        assert_eq!(r.records, all);
        assert_eq!((r.valid_len, r.next_seq), (full.len() as u64, 15));
        for cut in WAL_HEADER_BYTES as u64..full.len() as u64 {
            std::fs::write(&path, &full[..cut as usize]).unwrap();
            if cut < ends[1] {
                // Groups 1 and 2 were acknowledged before group 3 was written (its ack
                // slot says so): a cut into them is damage, and repair reports it.
                let e = read(&path, &header()).unwrap_err().to_string();
                assert!(e.contains("was cut"), "cut at {cut}: {e}");
                let s = salvage(&path, DIM).unwrap();
                assert!(s.unreadable > 0, "cut at {cut}: {s:?}");
                continue;
            }
            // A cut inside the last group is what a crash leaves: a torn tail.
            let r = read(&path, &header()).unwrap();
            assert_eq!(r.records, groups()[..2].concat(), "cut at {cut}");
            assert_eq!(r.valid_len, ends[1]);
        }
        // After a clean close every cut is recognised.
        let (full, _) = write_log(&path);
        for cut in [WAL_HEADER_BYTES + 1, full.len() - 1] {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert!(read(&path, &header()).is_err(), "cut at {cut}");
        }
        let (full, ends) = write_log_with(&path, true);
        // A final group whose pages did not all reach the disk (a zeroed block) is torn
        // too: the log ends with carol's group, written by a process that then died.
        let mut w = WalWriter::create(&Storage::default(), &path, &header()).unwrap();
        w.append(&groups()[0]).unwrap();
        w.append(&groups()[1]).unwrap();
        std::mem::forget(w);
        let mut zeroed = std::fs::read(&path).unwrap();
        assert_eq!(zeroed.len() as u64, ends[1]);
        let carol_body = ends[1] as usize - 200 * DIM * 4 + 1024;
        let block = carol_body.next_multiple_of(SECTOR);
        zeroed[block..block + SECTOR].fill(0);
        std::fs::write(&path, &zeroed).unwrap();
        assert_eq!(read(&path, &header()).unwrap().records, groups()[0]);
        // So is a zero-filled tail after the last group.
        let mut padded = full.clone();
        padded.extend_from_slice(&[0u8; 100]);
        std::fs::write(&path, &padded).unwrap();
        assert_eq!(read(&path, &header()).unwrap().records, all);
    }

    #[test]
    fn a_flipped_byte_anywhere_is_damage_not_a_torn_tail_and_repair_names_the_subject() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        let (full, _) = write_log(&path);
        let (mut refused, mut verified) = (0, 0);
        for at in WAL_HEADER_BYTES..full.len() {
            let mut bad = full.clone();
            bad[at] ^= 0x55;
            std::fs::write(&path, &bad).unwrap();
            match read(&path, &header()) {
                Ok(r) => panic!("flip at {at} accepted with {} records", r.records.len()),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("wal.log") && msg.contains("offset"), "{msg}");
                    refused += 1;
                }
            }
            let s = salvage(&path, DIM).unwrap();
            let all = groups().concat();
            // Nothing invented: every kept record is one that was written.
            for r in &s.records {
                assert!(all.contains(r), "flip at {at}: invented {r:?}");
            }
            // Every record is kept or accounted for as lost.
            assert_eq!(s.torn_bytes, 0, "flip at {at}");
            assert_eq!(
                s.records.len() + s.lost.len() + s.unreadable as usize,
                5,
                "flip at {at}: {s:?}"
            );
            // A verified name is right: a subject whose record was not kept.
            for l in s.lost.iter().filter(|l| l.subject_verified) {
                let name = l.subject.as_deref().unwrap();
                assert!(
                    all.iter().any(|r| r.subject() == name && !s.records.contains(r)),
                    "flip at {at}: {name} named but not lost"
                );
            }
            if s.lost.iter().all(|l| l.subject_verified) {
                verified += 1;
            }
        }
        // Only a flip inside a key (tag, mark, subject id) or in its checksum leaves the
        // subject unverifiable (it is then reported as a guess).
        let key_bytes: usize = groups()
            .concat()
            .iter()
            .map(|r| 1 + r.subject().len() + if matches!(r, WalRecord::Delete { .. }) { 8 } else { 0 } + 4)
            .sum();
        assert_eq!(verified, full.len() - WAL_HEADER_BYTES - key_bytes);
        assert_eq!(refused, full.len() - WAL_HEADER_BYTES);
        // A body flip names its subject from the checksummed key.
        let mut bad = full.clone();
        bad[full.len() - 3] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let s = salvage(&path, DIM).unwrap();
        assert_eq!(s.lost.len(), 1);
        assert_eq!(s.lost[0].subject.as_deref(), Some("dave"));
        assert!(s.lost[0].subject_verified);
    }

    #[test]
    fn the_header_is_checked_and_a_missing_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        write_log(&path);
        let other = WalHeader {
            gallery_id: 43,
            ..header()
        };
        assert!(read(&path, &other).unwrap_err().to_string().contains("another gallery"));
        let renamed = WalHeader { log_id: 2, ..header() };
        assert!(read(&path, &renamed).unwrap_err().to_string().contains("log 1 where"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            read(&path, &header())
                .unwrap_err()
                .to_string()
                .contains("header checksum")
        );
        // Salvage still reads the records, numbering from the first one it finds.
        assert_eq!(salvage(&path, DIM).unwrap().records, groups().concat());
        std::fs::remove_file(&path).unwrap();
        let e = read(&path, &header()).unwrap_err();
        assert!(
            matches!(e, Error::Corrupt(_)) && e.to_string().contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_append_leaves_nothing_and_a_failed_fsync_poisons_the_writer() {
        use crate::storage::{ENOSPC, FaultPlan};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        // create: Create, Write, Sync; then append: Write (records), Write (ack slot), Sync.
        for (fault, poisons) in [(3usize, false), (4, false), (5, true)] {
            let plan = FaultPlan::fail(fault, ENOSPC, false);
            let mut w = WalWriter::create(&Storage::with_faults(plan), &path, &header()).unwrap();
            assert!(w.append(&[enroll("a", 1)]).is_err());
            let r = read(&path, &header()).unwrap();
            assert!(r.records.is_empty() && r.torn_bytes() == 0, "fault {fault}");
            assert_eq!(w.poisoned().is_some(), poisons, "fault {fault}");
            let again = w.append(&[enroll("b", 1)]);
            assert_eq!(again.is_err(), poisons, "fault {fault}");
        }
    }
}
