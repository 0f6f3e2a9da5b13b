//! Helpers shared by the integration tests: random data and a reference search that
//! the engine is checked against (float64 for f32/f16, exact integers for i8).
#![allow(dead_code)]

use biogate::template::{Dtype, i8_scale, i8_score, normalize_into, quantize_i8};
use biogate::{Candidate, ProbeResult};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::StandardNormal;
use std::collections::HashMap;

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Gaussian rows with random per-row magnitudes (so normalisation matters).
pub fn random_rows(rng: &mut SmallRng, n: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let scale: f32 = rng.random_range(0.1..10.0);
        for _ in 0..dim {
            let x: f32 = rng.sample(StandardNormal);
            out.push(x * scale);
        }
    }
    out
}

pub fn unit(row: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; row.len()];
    normalize_into(row, &mut out, || "test row".into()).unwrap();
    out
}

/// The live templates of a gallery as the test believes them to be.
#[derive(Clone, Default)]
pub struct Model {
    pub rows: Vec<(String, Vec<f32>)>,
}

impl Model {
    pub fn add(&mut self, subject: &str, raw: &[f32], dim: usize) {
        for r in raw.chunks_exact(dim) {
            self.rows.push((subject.to_owned(), unit(r)));
        }
    }
    pub fn delete(&mut self, subject: &str) {
        self.rows.retain(|(s, _)| s != subject);
    }
    pub fn subjects(&self) -> Vec<String> {
        let mut s: Vec<String> = self.rows.iter().map(|(s, _)| s.clone()).collect();
        s.sort();
        s.dedup();
        s
    }
}

fn i8_quantized(row: &[f32]) -> (Vec<i8>, f32) {
    let s = i8_scale(row);
    let mut q = vec![0i8; row.len()];
    quantize_i8(row, s, &mut q);
    (q, s)
}

/// Per-subject best score of a raw probe: float64 cosine for f32/f16 (of the unrounded
/// normalised rows), the exact i8 formula for i8.
pub fn reference_scores(model: &Model, probe: &[f32], dtype: Dtype) -> HashMap<String, f64> {
    let p = unit(probe);
    let mut best: HashMap<String, f64> = HashMap::new();
    let (qp, sp) = i8_quantized(&p);
    for (subject, row) in &model.rows {
        let score = match dtype {
            Dtype::F32 | Dtype::F16 => p
                .iter()
                .zip(row)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>(),
            Dtype::I8 => {
                let (qr, sr) = i8_quantized(row);
                let raw: i64 = qp.iter().zip(&qr).map(|(&a, &b)| i64::from(a) * i64::from(b)).sum();
                f64::from(i8_score(raw as i32, sp, sr))
            }
        };
        let e = best.entry(subject.clone()).or_insert(f64::NEG_INFINITY);
        *e = e.max(score);
    }
    best
}

/// The exact expected list: sorted by score desc then id, cut to k, thresholded.
pub fn reference_list(scores: &HashMap<String, f64>, k: usize, threshold: Option<f32>) -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = scores.iter().map(|(s, &v)| (s.clone(), v)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.retain(|(_, v)| threshold.is_none_or(|t| *v >= f64::from(t)));
    all.truncate(k);
    all
}

/// Check one engine answer against the reference with tolerance `tol` on scores
/// (0 means bit-identical, as for i8). Panics with the probe and rank on mismatch.
pub fn assert_matches_reference(
    probe_index: usize,
    got: &ProbeResult,
    scores: &HashMap<String, f64>,
    k: usize,
    threshold: Option<f32>,
    tol: f64,
) {
    let c: &[Candidate] = &got.candidates;
    let ctx = |rank: usize| format!("probe {probe_index}, rank {rank}");
    // Distinct, sorted, each score close to the subject's reference best.
    for (rank, cand) in c.iter().enumerate() {
        let r = scores
            .get(&cand.subject)
            .unwrap_or_else(|| panic!("{}: unknown subject {}", ctx(rank), cand.subject));
        assert!(
            (f64::from(cand.score) - r).abs() <= tol,
            "{}: {} scored {} but reference is {r}",
            ctx(rank),
            cand.subject,
            cand.score
        );
        if rank > 0 {
            let prev = &c[rank - 1];
            assert!(
                prev.score > cand.score || (prev.score == cand.score && prev.subject < cand.subject),
                "{}: not sorted (score desc, id asc)",
                ctx(rank)
            );
        }
        if let Some(t) = threshold {
            assert!(cand.score >= t, "{}: below threshold", ctx(rank));
        }
    }
    assert_eq!(
        got.matched,
        threshold.map(|_| !c.is_empty()),
        "probe {probe_index}: decision"
    );
    if tol == 0.0 {
        let want = reference_list(scores, k, threshold);
        let got: Vec<(String, f64)> = c.iter().map(|c| (c.subject.clone(), f64::from(c.score))).collect();
        assert_eq!(
            got, want,
            "probe {probe_index}: candidate list differs from the exact reference"
        );
        return;
    }
    // Complete: nobody missing who clearly belongs.
    let listed: std::collections::HashSet<&str> = c.iter().map(|c| c.subject.as_str()).collect();
    let floor = if c.len() == k {
        f64::from(c[k - 1].score) + 2.0 * tol
    } else {
        f64::NEG_INFINITY
    };
    for (s, &v) in scores {
        if listed.contains(s.as_str()) {
            continue;
        }
        let qualifies = threshold.is_none_or(|t| v >= f64::from(t) + tol);
        assert!(
            !(qualifies && v > floor),
            "probe {probe_index}: subject {s} (reference {v}) is missing from {:?}",
            c.iter().map(|c| (&c.subject, c.score)).collect::<Vec<_>>()
        );
    }
}
