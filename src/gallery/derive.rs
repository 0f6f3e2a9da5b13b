//! Galleries derived from another: a flight's gallery cut from a master gallery by the
//! passenger manifest, every template of the listed subjects copied in the master's
//! encoding (no re-encoding, so scores are bit for bit the master's).

use super::import::SegmentCounts;
use super::manifest::segment_file_name;
use super::snapshot::Snapshot;
use super::writer::Gallery;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::template::canonical_subject_id;
use std::collections::HashMap;
use std::path::Path;

/// What a derivation did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeriveReport {
    /// Subjects found in the master and copied.
    pub subjects: u64,
    /// Templates copied.
    pub rows: u64,
    /// Listed subjects the master has no live template of (not an error: a passenger
    /// may not be enrolled), in the order listed.
    pub missing: Vec<String>,
}

/// Check a subject list: valid ids, each once (compared in their canonical form, so
/// "e\u{301}" repeats "\u{e9}"). The error names the first bad entry by its position
/// (0-based) and nothing is created. Returns the canonical ids, in order.
pub fn check_subject_list(subjects: &[String]) -> Result<Vec<String>> {
    let mut first_at: HashMap<String, usize> = HashMap::with_capacity(subjects.len());
    let mut canonical = Vec::with_capacity(subjects.len());
    for (i, s) in subjects.iter().enumerate() {
        let id = canonical_subject_id(s)
            .map_err(|e| e.in_context(&format!("subjects: entry {i}")))?
            .into_owned();
        if let Some(j) = first_at.insert(id.clone(), i) {
            return Err(Error::invalid(format!(
                "subjects: entry {i} ({s:?}) repeats entry {j}; list each subject once"
            )));
        }
        canonical.push(id);
    }
    Ok(canonical)
}

impl Gallery {
    /// Create a gallery in `dir` holding every live template of `subjects` in `master`
    /// (its dimension and dtype), as one sealed segment. The master's rows are verified
    /// before they are copied. On error nothing is left in `dir`.
    pub fn derive(
        master: &Snapshot,
        dir: &Path,
        subjects: &[String],
        storage: Storage,
    ) -> Result<(Gallery, DeriveReport)> {
        Gallery::derive_expiring(master, dir, subjects, None, storage)
    }

    /// [`Gallery::derive`], the new gallery expiring at `expires_at` (ms since the
    /// epoch; in the future). Subjects expired in the master are not copied (they are
    /// listed as missing); the others keep their expiry.
    pub fn derive_expiring(
        master: &Snapshot,
        dir: &Path,
        subjects: &[String],
        expires_at: Option<i64>,
        storage: Storage,
    ) -> Result<(Gallery, DeriveReport)> {
        let subjects = &check_subject_list(subjects)?;
        let now = crate::time_text::now_ms();
        if let Some(t) = expires_at {
            super::expiry::check_future(t, now, "expires_at")?;
        }
        if master.expiry().gallery_expired(now) {
            return Err(master.expiry().gallery_expired_error());
        }
        master.ensure_verified()?;
        let existed = dir.exists();
        let mut g = Gallery::create_with(dir, master.dim(), master.dtype(), storage)?;
        let filled = g.fill_from(master, subjects, now).and_then(|report| {
            let mut expiry = super::expiry::Expiry::default();
            expiry.gallery_ms = expires_at;
            for s in subjects {
                if let Some(t) = master.expiry().subject_ms(s).filter(|_| g.snapshot().has_subject(s)) {
                    expiry.set(s, Some(t));
                }
            }
            if !expiry.is_empty() {
                g.commit_expiry(expiry)?;
            }
            Ok(report)
        });
        match filled {
            Ok(report) => Ok((g, report)),
            Err(e) => {
                drop(g);
                if !existed {
                    let _ = std::fs::remove_dir_all(dir);
                }
                Err(e)
            }
        }
    }

    fn fill_from(&mut self, master: &Snapshot, subjects: &[String], now_ms: i64) -> Result<DeriveReport> {
        let mut sorted: Vec<&str> = subjects
            .iter()
            .map(String::as_str)
            .filter(|s| !master.expiry().subject_expired(s, now_ms))
            .collect();
        sorted.sort_unstable();
        let slabs = master.slabs();
        let mut found = std::collections::HashSet::new();
        let mut rows = 0u64;
        let id = self.manifest.next_file_id;
        let file = segment_file_name(id);
        let any = sorted.iter().any(|s| master.has_subject(s));
        if any {
            let segment = self.write_segment(&file, |writer| {
                for &subject in &sorted {
                    for slab in &slabs {
                        let Some(o) = slab.find_subject(subject) else { continue };
                        for r in slab.subject_rows(o) {
                            writer.push(slab.row(r), slab.scales()[r], subject)?;
                            rows += 1;
                            found.insert(subject);
                        }
                    }
                }
                master.check_reads()
            })?;
            let n = found.len() as u64;
            let counts = SegmentCounts {
                rows,
                subjects: n,
                unsealed: n,
                live_new: n,
            };
            self.commit_new_segment(id, &file, segment, &counts)?;
        }
        Ok(DeriveReport {
            subjects: found.len() as u64,
            rows,
            missing: subjects
                .iter()
                .filter(|s| !found.contains(s.as_str()))
                .cloned()
                .collect(),
        })
    }
}
