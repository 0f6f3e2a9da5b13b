//! Bulk import into a new sealed segment: a reader thread fills the next chunk of the
//! source while this one is normalised and encoded in parallel and written; the segment
//! is committed through the manifest like any other.

use super::manifest::{SegmentEntry, segment_file_name};
use super::segment::SegmentWriter;
use super::snapshot::SegmentView;
use super::writer::Gallery;
use super::{ImportOptions, ImportReport, ImportSource};
use crate::error::{Error, Result};
use crate::template::{canonical_subject_id, encode_row, normalize_into, row_stride};
use rayon::prelude::*;

impl Gallery {
    /// Bulk import: streams rows from `source` into a new sealed segment (normalised and
    /// encoded in parallel, never holding the whole input), then commits it atomically.
    /// Any bad row or duplicate subject aborts the import and leaves the gallery as it was.
    pub fn import(
        &mut self,
        source: &mut dyn ImportSource,
        options: ImportOptions,
        progress: &dyn Fn(u64),
    ) -> Result<ImportReport> {
        let dim = self.manifest.dim;
        if source.dim() != dim {
            return Err(Error::invalid(format!(
                "templates have dimension {}, the gallery has dimension {dim}",
                source.dim()
            )));
        }
        self.check_writable()?;
        let id = self.manifest.next_file_id;
        let file = segment_file_name(id);
        let mut counts = SegmentCounts::default();
        let segment = self.write_segment(&file, |writer| {
            counts = self.write_import(source, options, progress, writer)?;
            Ok(())
        })?;
        self.commit_new_segment(id, &file, segment, &counts)?;
        Ok(ImportReport {
            rows: counts.rows,
            subjects: counts.subjects,
            segment: file,
        })
    }

    /// Commit segment `file` (id `id`, written and mapped) as a new segment of the
    /// gallery, with what it adds to the counts; on a failed commit its file goes.
    pub(super) fn commit_new_segment(
        &mut self,
        id: u64,
        file: &str,
        segment: std::sync::Arc<super::segment::Segment>,
        counts: &SegmentCounts,
    ) -> Result<()> {
        let mut manifest = self.manifest.clone();
        manifest.sealed_subjects = Some(self.sealed_subjects() + counts.unsealed);
        manifest.segments.push(SegmentEntry::of(id, file, &segment));
        manifest.next_file_id = manifest.next_file_id.max(id + 1);
        if let Err(e) = self.commit(manifest) {
            if !matches!(e, Error::OutcomeUnknown(_)) {
                let _ = std::fs::remove_file(self.dir.join(file));
            }
            return Err(e);
        }
        self.segments.push(SegmentView::new(segment));
        self.counts.rows += counts.rows;
        self.counts.subjects += counts.live_new;
        // Rows of a subject whose expiry already passed are hidden at once.
        self.hide_expired(crate::time_text::now_ms(), true);
        self.publish();
        Ok(())
    }

    fn write_import(
        &self,
        source: &mut dyn ImportSource,
        options: ImportOptions,
        progress: &dyn Fn(u64),
        writer: &mut SegmentWriter,
    ) -> Result<SegmentCounts> {
        let (mut already_live, mut already_sealed) = (0, 0);
        const CHUNK: usize = 4096;
        let (dim, dtype) = (self.manifest.dim, self.manifest.dtype);
        let stride = row_stride(dtype, dim);
        let mut encoded = vec![0u8; CHUNK * stride];
        let mut scales = vec![0.0f32; CHUNK];
        let mut done = 0u64;
        let label = source.label();
        // A reader thread fills the next chunk while this one is encoded and written, so
        // reading the input and writing the segment overlap (two chunks in flight at most).
        std::thread::scope(|scope| {
            let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Result<(Vec<f32>, Vec<String>)>>(1);
            scope.spawn(move || {
                loop {
                    let (mut values, mut ids) = (Vec::with_capacity(CHUNK * dim), Vec::with_capacity(CHUNK));
                    let read = source.read_chunk(CHUNK, &mut values, &mut ids);
                    let last = !matches!(read, Ok(n) if n > 0);
                    if chunks_tx.send(read.map(|_| (values, ids))).is_err() || last {
                        return;
                    }
                }
            });
            for chunk in chunks_rx {
                let (values, mut ids) = chunk?;
                let n = ids.len();
                if n == 0 {
                    break;
                }
                for (i, id) in ids.iter_mut().enumerate() {
                    let canonical = canonical_subject_id(id)
                        .map_err(|e| e.in_context(&format!("{label} row {}", done + i as u64)))?;
                    if let std::borrow::Cow::Owned(c) = canonical {
                        *id = c;
                    }
                }
                let describe = |i: usize| format!("{label} row {}", done + i as u64);
                encoded[..n * stride]
                    .par_chunks_exact_mut(stride)
                    .zip(values.par_chunks_exact(dim))
                    .zip(scales[..n].par_iter_mut())
                    .enumerate()
                    .try_for_each_init(
                        || vec![0.0f32; dim],
                        |unit, (i, ((out, row), scale))| {
                            normalize_into(row, unit, || describe(i))?;
                            *scale = encode_row(dtype, unit, out);
                            Ok::<(), Error>(())
                        },
                    )?;
                for (i, id) in ids.iter().enumerate() {
                    let first_row = writer.push(&encoded[i * stride..(i + 1) * stride], scales[i], id)?;
                    if !first_row || (self.segments.is_empty() && self.memtable.rows() == 0) {
                        continue;
                    }
                    // A subject new to this import: is it new to the gallery?
                    let live = self.snapshot.has_subject(id);
                    if live && !options.add_to_existing {
                        return Err(Error::AlreadyExists(format!(
                            "subject {id:?} ({label} row {}) is already enrolled in {}; nothing was imported \
                             (pass --add-to-existing to add templates to enrolled subjects)",
                            done + i as u64,
                            self.dir.display()
                        )));
                    }
                    already_live += u64::from(live);
                    already_sealed += u64::from(self.unsealed(std::iter::once(id.as_str())) == 0);
                }
                done += n as u64;
                progress(done);
            }
            Ok(())
        })?;
        if done == 0 {
            return Err(Error::invalid("the import source has no templates"));
        }
        // Every subject of the segment, less those found above.
        let subjects = writer.subjects() as u64;
        Ok(SegmentCounts {
            rows: done,
            subjects,
            unsealed: subjects - already_sealed,
            live_new: subjects - already_live,
        })
    }
}

/// What a new segment adds: rows and subjects in it, subjects no other segment names,
/// subjects with no live row before it.
#[derive(Default)]
pub(super) struct SegmentCounts {
    pub(super) rows: u64,
    pub(super) subjects: u64,
    pub(super) unsealed: u64,
    pub(super) live_new: u64,
}
