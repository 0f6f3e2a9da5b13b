//! N:N de-duplication: every pair of different subjects whose templates score at or
//! above a threshold (or that are among a template's K nearest other subjects), found by
//! searching the gallery against itself in engine-sized batches.
//!
//! Each live template is a probe; its candidate list (distinct subjects, best template
//! each) minus its own subject gives pairs. A pair is reported once, as (a, b) with
//! a < b, scored by the best template pair found from either side. Output: CSV
//! `subject_a,subject_b,score`, sorted by score (descending), then ids.
//!
//! Resumable: progress is saved to `OUT.checkpoint` (every few seconds and when asked to
//! stop); a later run with the same gallery and options continues from there and writes
//! exactly what one uninterrupted run writes. Scores do not depend on how probes are
//! batched, so the resumed part reproduces the same pairs.

use crate::engine::{Engine, MAX_K, SearchParams};
use crate::error::{Error, Result};
use crate::gallery::open_snapshot;
use crate::storage::Storage;
use crate::template::decode_row;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What counts as a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DedupOptions {
    /// Report pairs scoring at or above this.
    pub threshold: Option<f32>,
    /// Report each template's `top` nearest other subjects (with `threshold`, only those
    /// at or above it).
    pub top: Option<usize>,
    /// Probes per engine batch.
    pub batch: usize,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum DedupOutcome {
    /// All rows searched; the CSV is written and the checkpoint removed.
    Finished { pairs: usize, rows: u64, resumed_from: u64 },
    /// Stopped on request; the checkpoint holds the progress.
    Interrupted { rows_done: u64, rows: u64 },
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    fingerprint: String,
    options: DedupOptions,
    rows_total: u64,
    rows_done: u64,
    pairs: Vec<(String, String, f32)>,
}

/// The checkpoint file that goes with an output path.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".checkpoint");
    PathBuf::from(p)
}

/// Run (or resume) a de-duplication of the gallery in `dir`, writing `out`.
/// `progress(done, total)` is called after every batch; returning false stops the run
/// with a checkpoint (as an operator's interrupt would).
pub fn dedup(
    engine: &Engine,
    dir: &Path,
    options: DedupOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<DedupOutcome> {
    if options.threshold.is_none() && options.top.is_none() {
        return Err(Error::invalid("dedup needs --threshold, --top, or both"));
    }
    if let Some(t) = options.threshold
        && !(-1.0..=1.0).contains(&t)
    {
        return Err(Error::invalid(format!("threshold {t} is out of range [-1, 1]")));
    }
    if options.top.is_some_and(|k| k == 0 || k >= MAX_K) || options.batch == 0 {
        return Err(Error::invalid(format!(
            "--top must be in 1..{MAX_K} and --batch positive"
        )));
    }
    let snapshot = open_snapshot(dir)?;
    let fingerprint = crate::gallery::state_fingerprint(dir)?;
    let rows: Vec<(u32, u32)> = snapshot
        .each_live_row()
        .map(|(s, r)| (s as u32, r.row as u32))
        .collect();
    let total = rows.len() as u64;
    let ckpt_path = checkpoint_path(out);
    let mut pairs: HashMap<(String, String), f32> = HashMap::new();
    let mut done = 0u64;
    if let Ok(text) = std::fs::read(&ckpt_path) {
        let c: Checkpoint =
            serde_json::from_slice(&text).map_err(|e| Error::Corrupt(format!("{}: {e}", ckpt_path.display())))?;
        if c.fingerprint != fingerprint || c.options != options || c.rows_total != total {
            return Err(Error::invalid(format!(
                "{} was made for another gallery state or other options; remove it to start over",
                ckpt_path.display()
            )));
        }
        done = c.rows_done;
        pairs = c.pairs.into_iter().map(|(a, b, s)| ((a, b), s)).collect();
        tracing::info!(checkpoint = %ckpt_path.display(), rows_done = done, "resuming dedup");
    }
    let resumed_from = done;
    let save = |done: u64, pairs: &HashMap<(String, String), f32>| -> Result<()> {
        let c = Checkpoint {
            fingerprint: fingerprint.clone(),
            options,
            rows_total: total,
            rows_done: done,
            pairs: pairs.iter().map(|((a, b), s)| (a.clone(), b.clone(), *s)).collect(),
        };
        Storage::default().write_file_atomically(&ckpt_path, &serde_json::to_vec(&c).expect("checkpoint serialises"))
    };
    let k = match options.top {
        Some(top) => top + 1,
        None => MAX_K,
    };
    let params = SearchParams {
        k,
        threshold: options.threshold,
    };
    let slabs = snapshot.slabs();
    let dim = snapshot.dim();
    let mut last_save = Instant::now();
    let mut values = Vec::with_capacity(options.batch * dim);
    while done < total {
        let end = (done + options.batch as u64).min(total);
        values.clear();
        let mut probe_subjects = Vec::with_capacity((end - done) as usize);
        for &(s, r) in &rows[done as usize..end as usize] {
            let slab = &slabs[s as usize];
            let r = r as usize;
            values.extend(decode_row(slab.dtype(), dim, slab.row(r), slab.scales()[r]));
            probe_subjects.push(slab.subject_id(slab.row_subjects()[r]));
        }
        let results = engine.search(&snapshot, &values, &params)?;
        for (i, (result, me)) in results.iter().zip(&probe_subjects).enumerate() {
            if options.top.is_none() && result.candidates.len() == MAX_K {
                return Err(Error::invalid(format!(
                    "template {} ({me}) has {MAX_K} or more subjects at or above the threshold: raise it or use --top",
                    done + i as u64
                )));
            }
            let others = result.candidates.iter().filter(|c| c.subject != **me);
            for c in others.take(options.top.unwrap_or(usize::MAX)) {
                let key = if **me < *c.subject {
                    (me.to_string(), c.subject.clone())
                } else {
                    (c.subject.clone(), me.to_string())
                };
                let e = pairs.entry(key).or_insert(c.score);
                *e = e.max(c.score);
            }
        }
        done = end;
        let keep_going = progress(done, total);
        if !keep_going {
            save(done, &pairs)?;
            return Ok(DedupOutcome::Interrupted {
                rows_done: done,
                rows: total,
            });
        }
        if last_save.elapsed() > Duration::from_secs(5) && done < total {
            save(done, &pairs)?;
            last_save = Instant::now();
        }
    }
    let mut sorted: Vec<((String, String), f32)> = pairs.into_iter().collect();
    sorted.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    let mut csv = String::from("subject_a,subject_b,score\n");
    for ((a, b), s) in &sorted {
        csv += &format!("\"{}\",\"{}\",{s}\n", a.replace('"', "\"\""), b.replace('"', "\"\""));
    }
    Storage::default().write_file_atomically(out, csv.as_bytes())?;
    let _ = std::fs::remove_file(&ckpt_path);
    Ok(DedupOutcome::Finished {
        pairs: sorted.len(),
        rows: total,
        resumed_from,
    })
}
