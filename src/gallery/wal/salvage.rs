//! What a repair can keep of a damaged log: every intact record of every acknowledged
//! group, and an account (by subject where the key is legible) of what it cannot keep.

use super::format::{
    Ack, HEAD_BYTES, MAX_KEY_BYTES, Parsed, TAG_APPLIED, TAG_DELETE, WAL_HEADER_BYTES, WalHeader, WalRecord,
    decode_key, parse_head, u32_at,
};
use super::reader::{Cursor, read_bytes};
use super::tail::is_torn;
use crate::error::Result;
use std::path::Path;

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
pub(super) fn legible_key(bytes: &[u8], at: usize) -> (Option<(u8, u64, String)>, bool) {
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

pub(super) fn kind_name(tag: u8) -> &'static str {
    match tag {
        TAG_DELETE => "delete",
        TAG_APPLIED => "replication mark",
        _ => "enroll",
    }
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
pub(super) fn bad_ended_group(bytes: &[u8], at: usize) -> Option<bool> {
    parse_head(bytes, at).map(|h| h.group_end)
}

/// If the log is shorter than its ack slot says was acknowledged, the records between
/// are gone: count them as unreadable.
pub(super) fn account_for_cut(bytes: &[u8], out: &mut Salvage) {
    if let Some(ack) = Ack::newest(bytes)
        && ack.next_seq > out.next_seq
    {
        out.damaged.push((bytes.len() as u64, ack.len));
        out.unreadable += ack.next_seq - out.next_seq;
        out.torn_bytes = 0;
        out.next_seq = ack.next_seq;
    }
}
