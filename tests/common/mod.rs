//! Helpers shared by the integration tests: random data and a reference search that
//! the engine is checked against (float64 for f32/f16, exact integers for i8).
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod cluster;
#[cfg(feature = "cli")]
pub mod etcd_proxy;
#[cfg(feature = "server")]
pub mod server;

use biogate::gallery::{Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::{Dtype, i8_scale, i8_score, normalize_into, quantize_i8};
use biogate::{Candidate, Engine, ProbeResult, SearchParams, Snapshot};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::StandardNormal;
use std::collections::HashMap;

/// A number from the environment variable `name` (a campaign's size), else `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

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

/// Score tolerance against the reference: f32 1e-5, f16 storage 2e-3, i8 exact.
pub fn tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 1e-5,
        Dtype::F16 => 2e-3,
        Dtype::I8 => 0.0,
    }
}

/// Build a gallery of `rows` templates over about rows/3 subjects, split across two
/// imported segments and the log, with a few subjects deleted.
pub fn build(dir: &std::path::Path, dim: usize, dtype: Dtype, rows: usize, seed: u64) -> (Gallery, Model) {
    let mut r = rng(seed);
    let mut g = Gallery::create(dir, dim, dtype).unwrap();
    let mut model = Model::default();
    let subjects = (rows / 3).max(1);
    let data = random_rows(&mut r, rows, dim);
    let ids: Vec<String> = (0..rows)
        .map(|_| format!("s{:05}", r.random_range(0..subjects)))
        .collect();
    let (a, b) = (rows / 2, rows * 5 / 6);
    // Segment 1: rows [0, a); segment 2: rows [a, b) (adds to existing subjects);
    // the log: rows [b, rows) through enroll.
    if a > 0 {
        let mut src = MemoryImport::new(dim, &data[..a * dim], &ids[..a]).unwrap();
        g.import(&mut src, ImportOptions::default(), &|_| {}).unwrap();
    }
    if b > a {
        let mut src = MemoryImport::new(dim, &data[a * dim..b * dim], &ids[a..b]).unwrap();
        g.import(&mut src, ImportOptions { add_to_existing: true }, &|_| {})
            .unwrap();
    }
    for i in 0..a {
        model.add(&ids[i], &data[i * dim..(i + 1) * dim], dim);
    }
    for i in a..b {
        model.add(&ids[i], &data[i * dim..(i + 1) * dim], dim);
    }
    let batch: Vec<Enrollment> = (b..rows)
        .map(|i| Enrollment {
            subject: ids[i].clone(),
            templates: data[i * dim..(i + 1) * dim].to_vec(),
        })
        .collect();
    if !batch.is_empty() {
        g.enroll(&batch).unwrap();
        for e in &batch {
            model.add(&e.subject, &e.templates, dim);
        }
    }
    // Delete a few subjects (rows in segments and in the log), then re-enroll one.
    let subjects_now = model.subjects();
    for s in subjects_now.iter().step_by(7).take(4) {
        if subjects_now.len() > 1 {
            g.delete_subject(s).unwrap();
            model.delete(s);
        }
    }
    if subjects_now.len() > 8 {
        let back = &subjects_now[7];
        let t = random_rows(&mut r, 1, dim);
        g.enroll(&[Enrollment {
            subject: back.clone(),
            templates: t.clone(),
        }])
        .unwrap();
        model.add(back, &t, dim);
    }
    (g, model)
}

pub fn check_engine(engine: &Engine, snapshot: &Snapshot, model: &Model, probes: &[f32], dtype: Dtype) {
    let dim = snapshot.dim();
    let mut r = rng(99);
    for k in [1, 7, 100] {
        for threshold in [None, Some(0.0f32), Some(r.random_range(-0.2..0.3))] {
            let params = SearchParams { k, threshold };
            let results = engine.search(snapshot, probes, &params).unwrap();
            assert_eq!(results.len(), probes.len() / dim);
            for (i, got) in results.iter().enumerate() {
                let scores = reference_scores(model, &probes[i * dim..(i + 1) * dim], dtype);
                assert_matches_reference(i, got, &scores, k, threshold, tolerance(dtype));
            }
        }
    }
}

/// Copy the files of a gallery directory (not its subfolders).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A gallery's content: every live row as (subject, fingerprint of its encoded bytes
/// and scale), sorted. Equal contents hold the same templates for the same subjects.
pub fn content(dir: &std::path::Path) -> Vec<(String, u32)> {
    let snapshot = biogate::gallery::open_snapshot(dir).unwrap();
    let mut rows: Vec<(String, u32)> = snapshot
        .each_live_row()
        .map(|(_, r)| (r.subject.to_owned(), crc32fast::hash(r.bytes) ^ r.scale.to_bits()))
        .collect();
    rows.sort();
    rows
}

/// This test binary again, running only the ignored test `child` (a crash test's
/// child process) on the gallery in `dir`, from `start`, its stdout piped.
pub fn crash_child(child: &str, dir: &std::path::Path, start: u64) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", child, "--nocapture", "--test-threads=1"])
        .env("BIOGATE_CRASH_DIR", dir)
        .env("BIOGATE_CRASH_START", start.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `gallery::check` after a kill -9: every checksum holds; a torn log tail (an
/// unacknowledged write the next writer cuts) is reported, and allowed.
pub fn check_after_crash(dir: &std::path::Path) {
    if let Err(e) = biogate::gallery::check(dir) {
        assert!(e.to_string().contains("torn tail"), "{}: {e}", dir.display());
    }
}
