//! Accuracy of 1:N identification, with the definitions NIST FRTE 1:N uses.
//!
//! A *mated* search is a probe of a subject who is enrolled; a *non-mated* search is a
//! probe of someone who is not. For a threshold `T` and a rank criterion `R`:
//!
//! * `FPIR(T)` (false positive identification rate) = the fraction of non-mated searches
//!   that return at least one candidate scoring at or above `T`, i.e. whose top score
//!   is `>= T`.
//! * `FNIR(T, R)` (false negative identification rate) = the fraction of mated searches
//!   whose mate is *not* returned at rank `<= R` with a score `>= T`. biogate reports
//!   identification mode, `R = 1` (the mate must be the top candidate), unless told
//!   otherwise.
//! * The rank-`r` identification rate (closed set, no threshold) = the fraction of mated
//!   searches whose mate is at rank `<= r`; recall@k is the rank-k rate.
//!
//! The threshold reported for a target FPIR `f` over `n` non-mated searches is the
//! lowest score `T` with `FPIR(T) <= f`: with the top scores sorted descending and
//! `m = floor(f * n)`, `T` is the next f32 above the `(m+1)`-th score, so at most `m`
//! searches reach it. When scores tie across that cut, all of them fall below `T` and
//! the achieved FPIR is lower than the target; it is reported beside the target.

use crate::engine::{Engine, SearchParams};
use crate::error::{Error, Result};
use crate::gallery::Snapshot;
use serde::Serialize;

/// Where each mated search found its mate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MateOutcome {
    /// 1-based rank of the mate in the candidate list, if it was listed.
    pub rank: Option<usize>,
    /// The mate's score, if it was listed.
    pub score: Option<f32>,
}

/// FPIR at threshold `t` over the top scores of non-mated searches.
pub fn fpir(nonmated_top: &[f32], t: f32) -> f64 {
    if nonmated_top.is_empty() {
        return 0.0;
    }
    nonmated_top.iter().filter(|&&s| s >= t).count() as f64 / nonmated_top.len() as f64
}

/// FNIR at threshold `t` with rank criterion `r` (see the module docs).
pub fn fnir(mated: &[MateOutcome], t: f32, r: usize) -> f64 {
    if mated.is_empty() {
        return 0.0;
    }
    let hits = mated
        .iter()
        .filter(|m| matches!((m.rank, m.score), (Some(rank), Some(s)) if rank <= r && s >= t))
        .count();
    1.0 - hits as f64 / mated.len() as f64
}

/// Closed-set rank-`r` identification rate.
pub fn rank_rate(mated: &[MateOutcome], r: usize) -> f64 {
    if mated.is_empty() {
        return 0.0;
    }
    mated.iter().filter(|m| m.rank.is_some_and(|k| k <= r)).count() as f64 / mated.len() as f64
}

/// The lowest threshold whose FPIR is at most `target` (module docs).
pub fn threshold_for_fpir(nonmated_top: &[f32], target: f64) -> f32 {
    let mut sorted = nonmated_top.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let allowed = (target * sorted.len() as f64 + 1e-9).floor() as usize;
    match sorted.get(allowed) {
        Some(&s) => s.next_up(),
        None => f32::NEG_INFINITY,
    }
}

/// One operating point.
#[derive(Clone, Debug, Serialize)]
pub struct OperatingPoint {
    pub target_fpir: f64,
    pub threshold: f32,
    /// FPIR actually achieved at `threshold` (<= target; lower when scores tie).
    pub fpir: f64,
    pub fnir: f64,
}

/// Everything measured for one gallery (one storage dtype).
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub dtype: String,
    pub mated_searches: usize,
    pub nonmated_searches: usize,
    pub k: usize,
    pub rank_criterion: usize,
    pub rank1: f64,
    pub rank_k: f64,
    pub operating_points: Vec<OperatingPoint>,
    /// Per mated search: the mate's rank and score (for histograms and re-analysis).
    pub mated: Vec<MateOutcome>,
    /// Per non-mated search: the top score.
    pub nonmated_top: Vec<f32>,
}

/// The FPIR targets reported by default (0.003 is NIST FRTE's operating point).
pub const FPIR_TARGETS: [f64; 3] = [0.001, 0.003, 0.01];

/// Run the mated and non-mated searches and compute the metrics.
pub fn evaluate(
    engine: &Engine,
    snapshot: &Snapshot,
    mated: &[f32],
    mated_ids: &[String],
    nonmated: &[f32],
    k: usize,
    rank_criterion: usize,
) -> Result<EvalReport> {
    let dim = snapshot.dim();
    if mated.len() != mated_ids.len() * dim {
        return Err(Error::invalid(format!(
            "{} mated ids for {} mated probes of dimension {dim}",
            mated_ids.len(),
            mated.len() / dim
        )));
    }
    if mated_ids.is_empty() || nonmated.is_empty() {
        return Err(Error::invalid("evaluation needs mated and non-mated probes"));
    }
    if rank_criterion == 0 || rank_criterion > k {
        return Err(Error::invalid(format!(
            "rank criterion {rank_criterion} must be in 1..=k ({k})"
        )));
    }
    if let Some((i, id)) = mated_ids.iter().enumerate().find(|(_, id)| !snapshot.has_subject(id)) {
        return Err(Error::invalid(format!(
            "mated probe {i} names subject {id:?}, who is not enrolled in the gallery"
        )));
    }
    let mut outcomes = Vec::with_capacity(mated_ids.len());
    for (chunk, ids) in mated.chunks(1024 * dim).zip(mated_ids.chunks(1024)) {
        for (r, id) in engine
            .search(snapshot, chunk, &SearchParams { k, threshold: None })?
            .iter()
            .zip(ids)
        {
            let at = r.candidates.iter().position(|c| &c.subject == id);
            outcomes.push(MateOutcome {
                rank: at.map(|i| i + 1),
                score: at.map(|i| r.candidates[i].score),
            });
        }
    }
    let mut nonmated_top = Vec::with_capacity(nonmated.len() / dim);
    for chunk in nonmated.chunks(1024 * dim) {
        for r in engine.search(snapshot, chunk, &SearchParams { k: 1, threshold: None })? {
            nonmated_top.push(r.candidates.first().map_or(f32::NEG_INFINITY, |c| c.score));
        }
    }
    let operating_points = FPIR_TARGETS
        .iter()
        .map(|&target| {
            let t = threshold_for_fpir(&nonmated_top, target);
            OperatingPoint {
                target_fpir: target,
                threshold: t,
                fpir: fpir(&nonmated_top, t),
                fnir: fnir(&outcomes, t, rank_criterion),
            }
        })
        .collect();
    Ok(EvalReport {
        dtype: snapshot.dtype().name().into(),
        mated_searches: outcomes.len(),
        nonmated_searches: nonmated_top.len(),
        k,
        rank_criterion,
        rank1: rank_rate(&outcomes, 1),
        rank_k: rank_rate(&outcomes, k),
        operating_points,
        mated: outcomes,
        nonmated_top,
    })
}

/// The same gallery re-encoded in memory in another storage dtype (for
/// `--compare-dtypes`). Starts from the stored rows, so the source must be f32 to
/// compare f32 against the others fairly.
pub fn reencode(snapshot: &Snapshot, dtype: crate::template::Dtype) -> Result<Snapshot> {
    use crate::template::{Dtype, decode_row};
    if snapshot.dtype() != Dtype::F32 {
        return Err(Error::invalid(format!(
            "--compare-dtypes needs an f32 gallery (this one stores {}): f32 is the reference",
            snapshot.dtype()
        )));
    }
    let dim = snapshot.dim();
    let mut table = crate::gallery::memtable::MemTable::new(dtype, dim);
    for (_, row) in snapshot.each_live_row() {
        table.push(row.subject, &decode_row(snapshot.dtype(), dim, row.bytes, row.scale));
    }
    Ok(Snapshot::in_memory(table, dim, dtype))
}

/// Points of the DET curve (FPIR, FNIR), one per distinct threshold, FPIR ascending.
pub fn det_curve(report: &EvalReport) -> Vec<(f64, f64)> {
    let mut thresholds: Vec<f32> = report
        .nonmated_top
        .iter()
        .copied()
        .chain(report.mated.iter().filter_map(|m| m.score))
        .filter(|s| s.is_finite())
        .collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    // Sorted copies make each point O(log n).
    let mut non: Vec<f32> = report.nonmated_top.clone();
    non.sort_by(f32::total_cmp);
    let mut mate: Vec<f32> = report
        .mated
        .iter()
        .filter(|m| m.rank.is_some_and(|r| r <= report.rank_criterion))
        .filter_map(|m| m.score)
        .collect();
    mate.sort_by(f32::total_cmp);
    let at_or_above = |v: &[f32], t: f32| v.len() - v.partition_point(|&s| s < t);
    let (n_non, n_mate) = (
        report.nonmated_top.len().max(1) as f64,
        report.mated.len().max(1) as f64,
    );
    thresholds
        .iter()
        .map(|&t| {
            (
                at_or_above(&non, t) as f64 / n_non,
                1.0 - at_or_above(&mate, t) as f64 / n_mate,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rank: usize, score: f32) -> MateOutcome {
        MateOutcome {
            rank: Some(rank),
            score: Some(score),
        }
    }

    #[test]
    fn hand_computed_rates() {
        // Four mated searches: mate at rank 1 (0.9), rank 1 (0.5), rank 2 (0.8), missing.
        let mated = [
            m(1, 0.9),
            m(1, 0.5),
            m(2, 0.8),
            MateOutcome {
                rank: None,
                score: None,
            },
        ];
        assert_eq!(rank_rate(&mated, 1), 0.5);
        assert_eq!(rank_rate(&mated, 2), 0.75);
        assert_eq!(fnir(&mated, 0.6, 1), 0.75); // only the 0.9 hit counts
        assert_eq!(fnir(&mated, 0.6, 2), 0.5); // 0.9 and the rank-2 0.8
        assert_eq!(fnir(&mated, 0.5, 1), 0.5); // >= is inclusive
        let non = [0.1, 0.3, 0.3, 0.7];
        assert_eq!(fpir(&non, 0.3), 0.75);
        assert_eq!(fpir(&non, 0.31), 0.25);
        assert_eq!(fpir(&non, 0.71), 0.0);
    }

    #[test]
    fn thresholds_hit_exact_fpir_targets_and_respect_ties() {
        // 1000 distinct scores: FPIR 0.003 allows exactly 3 above the threshold.
        let non: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
        let t = threshold_for_fpir(&non, 0.003);
        assert_eq!(fpir(&non, t), 0.003);
        assert!(t > 0.996 && t <= 0.997, "{t}");
        assert_eq!(fpir(&non, threshold_for_fpir(&non, 0.01)), 0.01);
        assert_eq!(fpir(&non, threshold_for_fpir(&non, 0.001)), 0.001);
        // Ties across the cut: 5 equal top scores, target allows 3: all 5 fall below.
        let mut tied = non.clone();
        for s in tied.iter_mut().rev().take(5) {
            *s = 0.999;
        }
        let t = threshold_for_fpir(&tied, 0.003);
        assert_eq!(fpir(&tied, t), 0.0);
        assert!(t > 0.999);
        // Ties below the cut do not matter: 4 distinct tops, then a tie.
        let t = threshold_for_fpir(&[0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1], 0.3);
        assert_eq!(t, 0.5f32.next_up());
        // A target that allows everything.
        assert_eq!(threshold_for_fpir(&non, 1.0), f32::NEG_INFINITY);
    }
}
