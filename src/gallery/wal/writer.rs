//! The writer side of a log: commit groups appended durably, the ack slots kept, a
//! failed append rolled back (or the writer poisoned).

use super::format::{Ack, MAX_BODY_BYTES, MAX_KEY_BYTES, SLOT_BYTES, WAL_HEADER_BYTES, WalHeader, WalRecord};
use super::reader::LogContents;
use crate::error::{Error, Result};
use crate::storage::{Storage, StoredFile};
use std::path::{Path, PathBuf};

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
    /// The newest ack slot records `durable_len` as the final length (nothing appended
    /// since): a cut anywhere would be recognised.
    final_recorded: bool,
    /// When the last group was appended.
    appended_at: std::time::Instant,
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
            closed: true,
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
            final_recorded: true,
            appended_at: std::time::Instant::now(),
        })
    }

    /// Open a log that [`read`](super::read) accepted for appending: its torn tail cut
    /// (the caller keeps a copy first where it cannot be proven unacknowledged), then its
    /// final length recorded unless it already was.
    pub fn open(storage: &Storage, path: &Path, contents: &LogContents) -> Result<WalWriter> {
        let mut file = storage.open_write(path)?;
        if file.size()? != contents.valid_len {
            file.set_len(contents.valid_len)?;
            file.sync_all()?;
        }
        let mut writer = WalWriter {
            file,
            path: path.to_path_buf(),
            next_seq: contents.next_seq,
            durable_len: contents.valid_len,
            generation: contents.generation,
            poisoned: None,
            final_recorded: contents.tail == super::TailProof::Complete,
            appended_at: std::time::Instant::now(),
        };
        writer.record_final_length()?;
        Ok(writer)
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

    /// Whether the log's final length is recorded (nothing appended since it was).
    pub fn final_length_recorded(&self) -> bool {
        self.final_recorded
    }

    /// How long since the last append, if the final length is not recorded since.
    pub fn unrecorded_for(&self) -> Option<std::time::Duration> {
        (!self.final_recorded).then(|| self.appended_at.elapsed())
    }

    /// The next ack slot, recording what is durable now (`closed`: and that nothing
    /// follows it).
    fn next_ack(&self, closed: bool) -> Ack {
        Ack {
            generation: self.generation + 1,
            len: self.durable_len,
            next_seq: self.next_seq,
            closed,
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
        let ack = self.next_ack(false);
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
                self.final_recorded = false;
                self.appended_at = std::time::Instant::now();
                Ok(())
            }
            Err((e, fsync_failed)) => Err(self.roll_back(e, fsync_failed)),
        }
    }

    /// Record the log's final length in an ack slot, durably (one write and one
    /// fdatasync; nothing if it is recorded already): until the next append, a cut
    /// anywhere in the log is recognised as damage. A clean close does this, and so does
    /// the server once a log has been idle for a moment, so that only a crash within
    /// that moment leaves the last group unprovable (tail.rs). A failure leaves the
    /// length unrecorded (the data it would cover was already durable) and is returned.
    pub fn record_final_length(&mut self) -> Result<()> {
        if self.poisoned.is_some() || self.final_recorded {
            return Ok(());
        }
        let ack = self.next_ack(true);
        self.file.write_all_at(&ack.encode(), ack.offset())?;
        self.file.sync_data()?;
        self.generation = ack.generation;
        self.final_recorded = true;
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
        if let Err(e) = self.record_final_length() {
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
