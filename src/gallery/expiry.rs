//! Retention: when a gallery ends (a flight's after departure) and when each subject's
//! templates must no longer be used (`expires_at` on enrollment, or a rule's default).
//!
//! Kept in `EXPIRY` beside the manifest (a JSON line and its crc32, replaced atomically;
//! absent = nothing expires). It is keyed by subject id, not by rows, so seals, merges
//! and compactions never touch it. The writer commits a subject's new expiry (set or
//! cleared) *before* it logs the enrollment that carries it: after a crash between the
//! two, an entry may name a subject that was never enrolled (ignored: only live
//! subjects expire) or give a re-enrolled subject's old templates the expiry its
//! failed re-enrollment asked for.
//!
//! From the instant of expiry a subject is never returned, verified or counted, and it
//! costs a search nothing: its rows are *hidden* ([`hide_expired`]), marked dead in the
//! snapshot in memory like deleted rows (nothing is logged), by every snapshot built
//! after it expired; a server builds one within a tick of each expiry
//! (`server::supervisor`). A search that meets subjects expired since its snapshot was
//! built asks the backend for that many more candidates and drops them (exact on every
//! backend). A purge then deletes them through the log and takes their rows off the
//! disk. Re-enrolling an expired subject deletes its expired templates first (in the
//! same commit group): they are never used again.

use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The file's name in the gallery directory.
pub const EXPIRY_FILE: &str = "EXPIRY";

/// A gallery's retention state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    /// When the whole gallery expires (ms since the epoch, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_ms: Option<i64>,
    /// Subjects that expire, and when.
    #[serde(default)]
    pub subjects: BTreeMap<String, i64>,
    /// The same entries ordered by time (not stored).
    #[serde(skip)]
    by_time: BTreeSet<(i64, String)>,
}

impl Expiry {
    /// Read `dir/EXPIRY` (none: nothing expires). A damaged file is an error naming it.
    pub fn load(dir: &Path) -> Result<Expiry> {
        let path = dir.join(EXPIRY_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Expiry::default()),
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        let (body, crc) = text
            .rsplit_once("\ncrc32:")
            .ok_or_else(|| Error::corrupt(&path, "no checksum line"))?;
        let crc = u32::from_str_radix(crc.trim(), 16).map_err(|_| Error::corrupt(&path, "malformed checksum line"))?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err(Error::corrupt(&path, "checksum mismatch"));
        }
        let mut expiry: Expiry =
            serde_json::from_str(body).map_err(|e| Error::corrupt(&path, format!("not an expiry table: {e}")))?;
        expiry.by_time = expiry.subjects.iter().map(|(s, &t)| (t, s.clone())).collect();
        Ok(expiry)
    }

    /// Replace `dir/EXPIRY` with this state, durably and atomically.
    pub fn commit(&self, storage: &Storage, dir: &Path) -> Result<()> {
        let body = serde_json::to_string(self).expect("an expiry table serialises");
        let bytes = format!("{body}\ncrc32:{:08x}\n", crc32fast::hash(body.as_bytes()));
        storage.write_file_atomically(&dir.join(EXPIRY_FILE), bytes.as_bytes())
    }

    /// Nothing expires.
    pub fn is_empty(&self) -> bool {
        self.gallery_ms.is_none() && self.subjects.is_empty()
    }

    /// Set (Some) or clear (None) a subject's expiry.
    pub fn set(&mut self, subject: &str, at: Option<i64>) {
        if let Some(old) = self.subjects.remove(subject) {
            self.by_time.remove(&(old, subject.to_owned()));
        }
        if let Some(t) = at {
            self.subjects.insert(subject.to_owned(), t);
            self.by_time.insert((t, subject.to_owned()));
        }
    }

    /// When `subject` expires, if it does.
    pub fn subject_ms(&self, subject: &str) -> Option<i64> {
        self.subjects.get(subject).copied()
    }

    /// Whether the gallery has expired at `now_ms`.
    pub fn gallery_expired(&self, now_ms: i64) -> bool {
        self.gallery_ms.is_some_and(|t| t <= now_ms)
    }

    /// Whether `subject` has expired at `now_ms`.
    pub fn subject_expired(&self, subject: &str, now_ms: i64) -> bool {
        self.subjects.get(subject).is_some_and(|&t| t <= now_ms)
    }

    /// Subjects whose expiry is at or before `now_ms` (live or not), oldest first.
    pub fn expired(&self, now_ms: i64) -> impl Iterator<Item = &str> {
        self.by_time
            .iter()
            .take_while(move |(t, _)| *t <= now_ms)
            .map(|(_, s)| s.as_str())
    }

    /// Subjects whose expiry is after `after_ms` and at or before `now_ms` (live or
    /// not), oldest first: those a snapshot that hid everything expired by `after_ms`
    /// must still leave out.
    pub fn expired_between(&self, after_ms: i64, now_ms: i64) -> impl Iterator<Item = &str> {
        let from = after_ms.saturating_add(1);
        let range = if from <= now_ms {
            self.by_time.range((from, String::new())..)
        } else {
            self.by_time.range((i64::MAX, String::new())..(i64::MAX, String::new()))
        };
        range.take_while(move |(t, _)| *t <= now_ms).map(|(_, s)| s.as_str())
    }

    /// An error for a search, verification or write of a gallery that has expired.
    pub fn gallery_expired_error(&self) -> Error {
        Error::NotFound(format!(
            "the gallery expired at {} (its templates are no longer used)",
            crate::time_text::format_time(self.gallery_ms.unwrap_or_default())
        ))
    }
}

/// Hide the rows of the subjects that expired after `after_ms` and by `now_ms` and are
/// live in `segments` and `log`: marked dead (segments) or removed (the log's rows)
/// in memory, `counts` brought down. Nothing is logged: the expiry itself, on disk,
/// is what says they are gone (every open hides them again). Returns the subjects
/// hidden.
pub(super) fn hide_expired(
    expiry: &Expiry,
    after_ms: i64,
    now_ms: i64,
    segments: &mut [super::snapshot::SegmentView],
    log: &mut super::memtable::LogTable,
    counts: &mut super::snapshot::Counts,
) -> Vec<String> {
    let newly: Vec<String> = expiry
        .expired_between(after_ms, now_ms)
        .filter(|s| super::snapshot::subject_is_live(segments, log, s))
        .map(str::to_owned)
        .collect();
    let ids: Vec<&str> = newly.iter().map(String::as_str).collect();
    let mut rows = log.delete_many(&ids) as u64;
    for s in &ids {
        rows += segments.iter_mut().map(|v| v.delete_subject(s)).sum::<u64>();
    }
    counts.rows = counts.rows.saturating_sub(rows);
    counts.subjects = counts.subjects.saturating_sub(newly.len() as u64);
    if !newly.is_empty() {
        log.refresh_ranks();
    }
    newly
}

/// Check an expiry asked for at `now_ms` (`field` names it): it must be in the future.
pub fn check_future(at_ms: i64, now_ms: i64, field: &str) -> Result<()> {
    if at_ms <= now_ms {
        return Err(Error::invalid(format!(
            "{field}: {} is not in the future (now is {})",
            crate::time_text::format_time(at_ms),
            crate::time_text::format_time(now_ms)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Expiry::load(dir.path()).unwrap().is_empty());
        let mut e = Expiry {
            gallery_ms: Some(500),
            ..Expiry::default()
        };
        e.set("b", Some(20));
        e.set("a", Some(10));
        e.set("c", Some(30));
        e.set("c", None);
        e.set("a", Some(25));
        e.commit(&Storage::default(), dir.path()).unwrap();
        let back = Expiry::load(dir.path()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.expired(24).collect::<Vec<_>>(), ["b"]);
        assert_eq!(back.expired(25).collect::<Vec<_>>(), ["b", "a"]);
        assert!(back.subject_expired("a", 25) && !back.subject_expired("a", 24) && !back.subject_expired("c", 99));
        assert!(back.gallery_expired(500) && !back.gallery_expired(499));
        let path = dir.path().join(EXPIRY_FILE);
        let text = std::fs::read_to_string(&path).unwrap().replace("25", "26");
        std::fs::write(&path, text).unwrap();
        let err = Expiry::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("EXPIRY") && err.contains("checksum"), "{err}");
        assert!(
            check_future(5, 5, "expires_at")
                .unwrap_err()
                .to_string()
                .contains("expires_at")
        );
    }
}
