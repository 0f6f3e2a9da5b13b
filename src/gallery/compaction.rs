//! Compaction while serving: sealed segments merged into one, deleted rows dropped,
//! without holding the writer while rows are copied.
//!
//! A merge goes in three steps. [`Gallery::plan_merge`] (the writer, briefly) picks the
//! segments, reserves the new segment's id and keeps their views as of that instant.
//! [`MergePlan::build`] (no lock: searches and enrollments go on) verifies their rows
//! and writes every row live at the plan into the new segment. [`Gallery::commit_merge`]
//! (the writer, briefly) marks in it the subjects deleted since the plan, commits the
//! manifest that names it instead of its inputs, and swaps the snapshot: a search sees
//! the inputs or the merged segment, never both and never neither.
//!
//! Why deletions are not lost: a deletion logged after the plan carries a segment mark
//! above the reserved id, so it applies to the merged segment when the log is replayed;
//! one logged before carries a mark at or below it, and its rows are not in the merged
//! segment. While a merge is planned the log is not sealed (sealing rewrites those
//! marks against the segments it knows), a full compaction waits, and the reserved
//! file is never removed as an orphan. A crash at any step leaves the old manifest (the
//! new file an orphan the next writer removes) or the new one (the inputs orphans).

use super::CompactReport;
use super::files::write_segment_file;
use super::manifest::{Manifest, SegmentEntry, segment_file_name};
use super::segment::{Segment, subjects_in_order};
use super::snapshot::SegmentView;
use super::writer::Gallery;
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::path::PathBuf;
use std::sync::Arc;

/// When segments are merged in the background (size-tiered).
#[derive(Clone, Copy, Debug)]
pub struct MergePolicy {
    /// Merge once this many segments are within `tier_ratio` of each other in size.
    pub fan_in: usize,
    /// Segments whose row counts differ by at most this factor are in one tier.
    pub tier_ratio: f64,
    /// A segment with at least this share of its rows deleted is rewritten.
    pub deleted_share: f64,
}

impl Default for MergePolicy {
    fn default() -> MergePolicy {
        MergePolicy {
            fan_in: 4,
            tier_ratio: 4.0,
            deleted_share: 0.25,
        }
    }
}

impl MergePolicy {
    /// Indices (into `segments`) of what to merge now, if anything: the smallest tier
    /// of `fan_in` or more segments, or else the segments with too much deleted.
    pub fn choose(&self, segments: &[SegmentView]) -> Vec<usize> {
        let mut by_size: Vec<usize> = (0..segments.len()).collect();
        let rows = |i: usize| segments[i].segment.rows().max(1) as f64;
        by_size.sort_by(|&a, &b| rows(a).total_cmp(&rows(b)));
        for start in 0..by_size.len() {
            let tier: Vec<usize> = by_size[start..]
                .iter()
                .copied()
                .take_while(|&i| rows(i) <= rows(by_size[start]) * self.tier_ratio)
                .collect();
            if tier.len() >= self.fan_in.max(2) {
                let mut chosen = tier;
                chosen.sort_unstable();
                return chosen;
            }
        }
        (0..segments.len())
            .filter(|&i| {
                let v = &segments[i];
                v.deleted.count() as f64 >= self.deleted_share * v.segment.rows().max(1) as f64
            })
            .collect()
    }
}

/// Which segments a merge takes.
#[derive(Clone, Copy, Debug)]
pub enum MergeScope {
    /// What the policy chooses (maybe nothing).
    Policy(MergePolicy),
    /// Every segment (a full compaction; the caller seals the log first).
    Everything,
    /// Every segment holding deleted rows, and no other (a retention purge: the rows
    /// of the subjects it deleted leave the disk without rewriting the rest).
    WithDeletions,
}

/// A merge planned against the gallery as it was at one instant.
pub struct MergePlan {
    dir: PathBuf,
    storage: Storage,
    manifest: Manifest,
    /// The reserved id and file of the merged segment.
    id: u64,
    file: String,
    /// The inputs (manifest entry and view) as of the plan.
    inputs: Vec<(SegmentEntry, SegmentView)>,
    /// The other segments as of the plan.
    others: Vec<SegmentView>,
    segments_before: usize,
}

/// A merged segment written and mapped, not yet committed.
pub struct BuiltMerge {
    plan: MergePlan,
    segment: Option<Arc<Segment>>,
    rows_kept: u64,
    /// Ids in the inputs that are in neither the merged segment nor any other segment
    /// of the plan (what leaves `sealed_subjects`, unless a segment added since has it).
    gone: Vec<String>,
}

impl MergePlan {
    /// The reserved file name of the merged segment.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Verify the inputs' rows and write every row live at the plan into the merged
    /// segment; find the ids the merge removes from the segments. Runs without the
    /// writer. On error the merged file is removed and nothing else changed.
    pub fn build(self) -> Result<BuiltMerge> {
        for (_, v) in &self.inputs {
            v.segment.ensure_verified()?;
        }
        let live: u64 = self
            .inputs
            .iter()
            .map(|(_, v)| v.segment.rows() as u64 - v.deleted.count())
            .sum();
        let mut rows_kept = 0;
        let segment = if live > 0 {
            write_segment_file(&self.storage, &self.dir, &self.manifest, &self.file, |writer| {
                // Subjects in id order over all inputs, each subject's live rows
                // together: the writer keeps the ids as they come, never hashing them,
                // and the merged file has each subject's rows side by side.
                let inputs: Vec<&Segment> = self.inputs.iter().map(|(_, v)| v.segment.as_ref()).collect();
                for (id, i, o) in subjects_in_order(&inputs) {
                    let v = &self.inputs[i].1;
                    for &row in v.segment.subject_rows(o) {
                        let row = row as usize;
                        if !v.deleted.contains(row) {
                            writer.push(v.segment.row(row), v.segment.scales()[row], id)?;
                            rows_kept += 1;
                        }
                    }
                }
                self.inputs.iter().try_for_each(|(_, v)| v.segment.after_read())
            })?;
            Some(Arc::new(Segment::open(&self.dir.join(&self.file))?))
        } else {
            None
        };
        let merged = segment.as_deref();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (_, v) in &self.inputs {
            // Only subjects whose rows were deleted can be missing from the merge.
            let subjects = v.segment.row_subjects();
            for row in v.deleted.iter() {
                let id = v.segment.subject_id(subjects[row]);
                if !seen.insert(id)
                    || merged.is_some_and(|m| m.find_subject(id).is_some())
                    || self.others.iter().any(|s| s.segment.find_subject(id).is_some())
                {
                    continue;
                }
                gone.push(id.to_owned());
            }
        }
        // An id gone from one input may still be in another input's live rows (then it
        // is in the merged segment, found above) or dead there too (counted once).
        Ok(BuiltMerge {
            plan: self,
            segment,
            rows_kept,
            gone,
        })
    }
}

impl BuiltMerge {
    /// Remove the merged file (a merge abandoned).
    fn discard(&self) {
        let _ = std::fs::remove_file(self.plan.dir.join(&self.plan.file));
    }
}

impl Gallery {
    /// Rewrite every live row (segments minus deletions, plus the log's rows) into one
    /// segment: the log is sealed, every segment merged into one (rows verified before
    /// they are copied, so damage is never sealed into a new file with fresh
    /// checksums), and the log rewritten without deletions that no longer apply. Each
    /// step commits atomically through the manifest; a failure between steps leaves a
    /// gallery with the same content.
    pub fn compact(&mut self) -> Result<CompactReport> {
        let before = self.footprint();
        if self.merging.is_some() {
            return Err(Error::Aborted(format!(
                "{}: a merge is running; try again when it ends",
                self.dir.display()
            )));
        }
        self.check_writable()?;
        self.seal_log()?;
        self.merge(MergeScope::Everything)?;
        self.prune_log()?;
        Ok(self.compact_report(before))
    }

    /// Plan a merge (see the module documentation). `None` when there is nothing to
    /// merge. Aborted while another merge is planned.
    pub fn plan_merge(&mut self, scope: MergeScope) -> Result<Option<MergePlan>> {
        self.check_writable()?;
        if let Some(file) = &self.merging {
            return Err(Error::Aborted(format!(
                "{}: a merge into {file} is running; try again when it ends",
                self.dir.display()
            )));
        }
        let chosen: Vec<usize> = match scope {
            MergeScope::Everything => (0..self.segments.len()).collect(),
            MergeScope::Policy(policy) => policy.choose(&self.segments),
            MergeScope::WithDeletions => (0..self.segments.len())
                .filter(|&i| !self.segments[i].deleted.is_empty())
                .collect(),
        };
        let worth_it = match scope {
            MergeScope::Everything => self.segments.len() > 1 || self.segments.iter().any(|v| !v.deleted.is_empty()),
            MergeScope::Policy(_) | MergeScope::WithDeletions => !chosen.is_empty(),
        };
        if !worth_it {
            return Ok(None);
        }
        let id = self.manifest.next_file_id;
        // Reserved: deletions logged from now on carry a mark above it.
        self.manifest.next_file_id += 1;
        let file = segment_file_name(id);
        self.merging = Some(file.clone());
        let inputs = chosen
            .iter()
            .map(|&i| (self.manifest.segments[i].clone(), self.segments[i].clone()))
            .collect();
        let others = (0..self.segments.len())
            .filter(|i| !chosen.contains(i))
            .map(|i| self.segments[i].clone())
            .collect();
        Ok(Some(MergePlan {
            dir: self.dir.clone(),
            storage: self.storage.clone(),
            manifest: self.manifest.clone(),
            id,
            file,
            inputs,
            others,
            segments_before: self.segments.len(),
        }))
    }

    /// Give up a planned merge (its build failed): later merges and seals may run.
    pub fn abandon_merge(&mut self, plan_file: &str) {
        if self.merging.as_deref() == Some(plan_file) {
            self.merging = None;
            let _ = std::fs::remove_file(self.dir.join(plan_file));
        }
    }

    /// Commit a built merge: the merged segment replaces its inputs, with the subjects
    /// deleted since the plan deleted in it too.
    pub fn commit_merge(&mut self, built: BuiltMerge) -> Result<CompactReport> {
        if self.merging.as_deref() != Some(built.plan.file.as_str()) {
            built.discard();
            return Err(Error::Aborted(format!(
                "{}: the merge into {} was abandoned",
                self.dir.display(),
                built.plan.file
            )));
        }
        self.merging = None;
        let outcome = self.commit_built(&built);
        // Not committed: the file goes. Outcome unknown: a restart may see the manifest
        // that names it, so it stays (an orphan if not).
        if matches!(&outcome, Err(e) if !matches!(e, Error::OutcomeUnknown(_))) {
            built.discard();
        }
        outcome
    }

    fn commit_built(&mut self, built: &BuiltMerge) -> Result<CompactReport> {
        self.check_writable()?;
        let plan = &built.plan;
        let positions: Option<Vec<usize>> = plan
            .inputs
            .iter()
            .map(|(entry, _)| self.manifest.segments.iter().position(|e| e.id == entry.id))
            .collect();
        let Some(positions) = positions else {
            return Err(Error::Aborted(format!(
                "{}: the segments planned for a merge changed before it was committed",
                self.dir.display()
            )));
        };
        let mut merged = built.segment.clone().map(SegmentView::new);
        // Subjects deleted since the plan: deleted in the merged segment too.
        if let Some(view) = merged.as_mut() {
            for ((_, then), &at) in plan.inputs.iter().zip(&positions) {
                let now = &self.segments[at];
                let subjects = now.segment.row_subjects();
                for range in now.deleted.differing_rows(&then.deleted) {
                    let end = range.end.min(subjects.len());
                    for (row, &o) in subjects.iter().enumerate().take(end).skip(range.start) {
                        if now.deleted.contains(row) && !then.deleted.contains(row) {
                            view.delete_subject(now.segment.subject_id(o));
                        }
                    }
                }
            }
        }
        // Ids that leave the segments, unless a segment added since the plan has them.
        let added: Vec<&SegmentView> = self
            .segments
            .iter()
            .filter(|v| {
                !plan.others.iter().any(|o| Arc::ptr_eq(&o.segment, &v.segment))
                    && !plan.inputs.iter().any(|(_, i)| Arc::ptr_eq(&i.segment, &v.segment))
            })
            .collect();
        let gone = built
            .gone
            .iter()
            .filter(|id| added.iter().all(|v| v.segment.find_subject(id).is_none()))
            .count() as u64;
        let first = positions.iter().copied().min().unwrap_or(0);
        let mut manifest = self.manifest.clone();
        let mut segments = self.segments.clone();
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        for &at in sorted.iter().rev() {
            manifest.segments.remove(at);
            segments.remove(at);
        }
        if let (Some(view), Some(segment)) = (merged, &built.segment) {
            manifest
                .segments
                .insert(first, SegmentEntry::of(plan.id, &plan.file, segment));
            segments.insert(first, view);
        }
        manifest.sealed_subjects = Some(self.sealed_subjects().saturating_sub(gone));
        self.commit(manifest)?;
        let input_rows: u64 = plan.inputs.iter().map(|(e, _)| e.rows).sum();
        self.segments = segments;
        self.publish();
        self.remove_orphans();
        Ok(CompactReport {
            rows_kept: built.rows_kept,
            rows_dropped: input_rows - built.rows_kept,
            segments_before: plan.segments_before,
            segments_after: self.segments.len(),
        })
    }

    /// Merge now, in this thread (plan, build, commit): what the command line and
    /// tests use; a server builds without the writer (see the module documentation).
    pub fn merge(&mut self, scope: MergeScope) -> Result<Option<CompactReport>> {
        let Some(plan) = self.plan_merge(scope)? else {
            return Ok(None);
        };
        let file = plan.file().to_owned();
        match plan.build() {
            Ok(built) => self.commit_merge(built).map(Some),
            Err(e) => {
                self.abandon_merge(&file);
                Err(e)
            }
        }
    }
}
