//! Torn tail or damage: the rules, in one place.
//!
//! A crash can leave exactly one thing behind: the final commit group, unfinished. Its
//! bytes may run past the end of the file, its head may never have been written (zeros),
//! its end record may never have arrived, or some of its blocks may still be zeros (the
//! disk wrote the group's pages out of order). Such a group was never acknowledged (the
//! caller is told "done" only after the group's fdatasync), so it is a *torn tail*:
//! the next writer cuts it.
//!
//! Everything else that fails a check is *damage*: a record that fails its checksums
//! with an intact group end after it (written only after the bad record was durable),
//! a complete final record that fails its checksum, or a log shorter than an ack slot
//! says was acknowledged. Damage is an error naming the file and offset; nothing is
//! cut, and `repair` keeps what it can and names what it cannot.
//!
//! The ack slots say how far the log was acknowledged, and the writer records its final
//! length when it closes, and again whenever the log has been idle for a moment
//! (`WalWriter::record_final_length`). So the end of a log is judged by
//! [`judge_end`]:
//!
//! - a slot claims more than is intact: the log was **cut** (damage);
//! - the newest slot was written by a close and the log ends exactly there:
//!   [`TailProof::Complete`], nothing acknowledged can be missing;
//! - anything else: [`TailProof::Unproven`]. The writer was appending and never
//!   recorded its final length since (a crash, or a stop that skipped the close, within
//!   moments of the last write). Everything up to the slot's length is proven
//!   acknowledged; after it, an intact group is kept and an unfinished one is cut, but
//!   an unfinished last group is then indistinguishable from an acknowledged one cut
//!   short (`truncate`), and a whole acknowledged group cut off leaves no trace at all.
//!   `check` says "cannot tell" there, and the writer keeps the bytes it cuts.

use super::format::{Ack, HEAD_BYTES, Parsed, RECORD_MARKER, SECTOR, parse_head};
use crate::error::{Error, Result};
use std::path::Path;

/// What the ack slots prove about the end of a log that reads without damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailProof {
    /// The log's final length was recorded (a clean close, or the writer once the log
    /// was idle) and the log ends exactly there: nothing acknowledged is missing.
    Complete,
    /// Bytes up to `proven_len` are proven acknowledged; whether anything acknowledged
    /// followed them (and was cut off) cannot be told.
    Unproven { proven_len: u64 },
}

/// Judge the end of a log whose records read intact up to `valid_len` (of `file_len`
/// bytes), given its newest ack slot: a cut is damage; otherwise what is proven.
pub(super) fn judge_end(
    path: &Path,
    ack: Option<Ack>,
    valid_len: u64,
    file_len: u64,
    first_seq: u64,
) -> Result<TailProof> {
    match ack {
        Some(ack) if ack.len > valid_len => Err(Error::Corrupt(format!(
            "{}: the log was cut: {} bytes (records {first_seq}..{}) were acknowledged but only {valid_len} \
             bytes are intact; `biogate gallery repair` keeps what is there and reports the rest",
            path.display(),
            ack.len,
            ack.next_seq
        ))),
        Some(ack) if ack.closed && ack.len == valid_len && file_len == valid_len => Ok(TailProof::Complete),
        Some(ack) => Ok(TailProof::Unproven { proven_len: ack.len }),
        None => Ok(TailProof::Unproven {
            proven_len: super::format::WAL_HEADER_BYTES as u64,
        }),
    }
}

/// Whether an intact record head that ends a commit group, numbered after `after_seq`,
/// starts anywhere after `from`.
pub(super) fn intact_group_end_after(bytes: &[u8], from: usize, after_seq: Option<u64>) -> Option<usize> {
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
pub(super) fn has_zero_block(bytes: &[u8], from: usize, to: usize) -> bool {
    (from.next_multiple_of(SECTOR)..to)
        .step_by(SECTOR)
        .any(|b| b + SECTOR <= to && bytes[b..b + SECTOR].iter().all(|&x| x == 0))
}

/// Whether the record that failed to parse at `at` begins the final, unfinished write
/// (never acknowledged) rather than damage: nothing that ends a group follows it, and
/// it is visibly incomplete (runs past the end, a head of zeros, a group whose end
/// never arrived, or a block of zeros inside).
pub(super) fn is_torn(bytes: &[u8], at: usize, parsed: &Parsed, expected_seq: u64) -> bool {
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
