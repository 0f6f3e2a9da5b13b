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

mod format;
mod reader;
mod salvage;
mod tail;
#[cfg(test)]
mod tests;
mod writer;

pub use format::{WAL_HEADER_BYTES, WalHeader, WalRecord};
pub use reader::{LogContents, read};
pub use salvage::{LostRecord, Salvage, salvage};
pub use tail::TailProof;
pub use writer::{WalWriter, check_record_size};
