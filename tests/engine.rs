//! The CPU engine against a float64 reference (f32, f16) and an exact integer reference
//! (i8) on random data of odd sizes: several segments plus the log, deletions, several
//! templates per subject, thresholds, ties, and k = 1, 7, 100.

mod common;

use biogate::engine::cpu::CpuBackend;
use biogate::gallery::{Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::Dtype;
use biogate::{Engine, SearchParams, Snapshot};
use common::{build, check_engine, random_rows, rng};
use std::sync::Arc;

#[test]
fn engine_matches_reference_on_odd_sizes() {
    for dtype in Dtype::ALL {
        for (dim, rows) in [(1, 40), (17, 2057), (513, 300), (64, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let (g, model) = build(dir.path(), dim, dtype, rows, dim as u64 * 31 + rows as u64);
            let probes = random_rows(&mut rng(5), 9, dim);
            for engine in [Engine::cpu(), Engine::new(Arc::new(CpuBackend::portable()))] {
                check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
            }
            // The same answers after compaction (one segment, no log, deletions applied)
            // and after reopening from disk.
            let mut g = g;
            g.compact().unwrap();
            check_engine(&Engine::cpu(), &g.snapshot(), &model, &probes, dtype);
            drop(g);
            let reopened = Gallery::open(dir.path()).unwrap();
            check_engine(&Engine::cpu(), &reopened.snapshot(), &model, &probes, dtype);
        }
    }
}

#[test]
fn sealing_the_log_keeps_every_answer_and_pending_deletions() {
    for dtype in Dtype::ALL {
        let dir = tempfile::tempdir().unwrap();
        // Segments, log rows, deletions against segments and a re-enrolled subject.
        let (mut g, mut model) = build(dir.path(), 17, dtype, 2057, 5);
        let probes = random_rows(&mut rng(6), 9, 17);
        let log_before = g.log_rows();
        assert!(log_before > 0);
        assert_eq!(g.seal_log().unwrap(), log_before);
        assert_eq!(g.log_rows(), 0);
        check_engine(&Engine::cpu(), &g.snapshot(), &model, &probes, dtype);
        // Deleting and enrolling after the seal, then reopening, still agrees.
        let victim = model.subjects()[3].clone();
        g.delete_subject(&victim).unwrap();
        model.delete(&victim);
        let t = random_rows(&mut rng(7), 2, 17);
        g.enroll(&[Enrollment {
            subject: victim.clone(),
            templates: t.clone(),
        }])
        .unwrap();
        model.add(&victim, &t, 17);
        g.seal_log().unwrap();
        drop(g);
        let g = Gallery::open(dir.path()).unwrap();
        check_engine(&Engine::cpu(), &g.snapshot(), &model, &probes, dtype);
        assert_eq!(g.info().unwrap().segments, 4, "two imports and two seals");
        biogate::gallery::check(dir.path()).unwrap();
    }
}

#[test]
fn ties_are_broken_by_subject_id_everywhere() {
    // Identical templates under many ids, spread over a segment and the log: every
    // score ties, so the list must be the smallest ids in order.
    for dtype in Dtype::ALL {
        let dir = tempfile::tempdir().unwrap();
        let dim = 33;
        let mut g = Gallery::create(dir.path(), dim, dtype).unwrap();
        let row = random_rows(&mut rng(1), 1, dim);
        let ids: Vec<String> = (0..50).rev().map(|i| format!("id-{i:03}")).collect();
        let seg_ids: Vec<String> = ids.iter().step_by(2).cloned().collect();
        let values: Vec<f32> = seg_ids.iter().flat_map(|_| row.clone()).collect();
        g.import(
            &mut MemoryImport::new(dim, &values, &seg_ids).unwrap(),
            ImportOptions::default(),
            &|_| {},
        )
        .unwrap();
        let log: Vec<Enrollment> = ids
            .iter()
            .skip(1)
            .step_by(2)
            .map(|s| Enrollment {
                subject: s.clone(),
                templates: row.clone(),
            })
            .collect();
        g.enroll(&log).unwrap();
        let res = Engine::cpu()
            .search(&g.snapshot(), &row, &SearchParams { k: 7, threshold: None })
            .unwrap();
        let got: Vec<&str> = res[0].candidates.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(
            got,
            ["id-000", "id-001", "id-002", "id-003", "id-004", "id-005", "id-006"],
            "{dtype}"
        );
        assert!(res[0].candidates.windows(2).all(|w| w[0].score == w[1].score));
    }
}

#[test]
fn a_subject_is_scored_by_its_best_template() {
    let dir = tempfile::tempdir().unwrap();
    let dim = 8;
    let mut g = Gallery::create(dir.path(), dim, Dtype::F32).unwrap();
    let probe = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let near = [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let far = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let mid = [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let e = |s: &str, rows: &[&[f32; 8]]| Enrollment {
        subject: s.into(),
        templates: rows.iter().flat_map(|r| r.to_vec()).collect(),
    };
    g.enroll(&[e("alice", &[&far, &near, &far]), e("bob", &[&mid])])
        .unwrap();
    let res = Engine::cpu()
        .search(&g.snapshot(), &probe, &SearchParams { k: 5, threshold: None })
        .unwrap();
    let c = &res[0].candidates;
    assert_eq!(c.len(), 2, "distinct subjects only");
    assert_eq!(c[0].subject, "alice");
    assert!((c[0].score - 0.993_883_7).abs() < 1e-6);
    assert_eq!(c[1].subject, "bob");
    let res = Engine::cpu()
        .search(
            &g.snapshot(),
            &probe,
            &SearchParams {
                k: 5,
                threshold: Some(0.99),
            },
        )
        .unwrap();
    assert_eq!(res[0].matched, Some(true));
    assert_eq!(res[0].candidates.len(), 1);
    let res = Engine::cpu()
        .search(
            &g.snapshot(),
            &far,
            &SearchParams {
                k: 5,
                threshold: Some(0.999),
            },
        )
        .unwrap();
    assert_eq!(res[0].matched, Some(true), "alice has a template equal to the probe");
    let res = Engine::cpu()
        .search(
            &g.snapshot(),
            &[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            &SearchParams {
                k: 5,
                threshold: Some(0.5),
            },
        )
        .unwrap();
    assert_eq!(res[0].matched, Some(false));
    assert!(res[0].candidates.is_empty());
}

#[test]
fn i8_scores_stay_within_the_documented_bound_of_the_exact_cosine() {
    use biogate::template::{i8_score_error_bound, padded_dim};
    let dim = 512;
    let mut r = rng(3);
    let rows = random_rows(&mut r, 200, dim);
    let probe = random_rows(&mut r, 1, dim);
    let mut table = biogate::gallery::memtable::MemTable::new(Dtype::I8, dim);
    let units: Vec<Vec<f32>> = rows.chunks_exact(dim).map(common::unit).collect();
    for (i, u) in units.iter().enumerate() {
        table.push(&format!("s{i:04}"), u);
    }
    let snap = Snapshot::in_memory(table, dim, Dtype::I8);
    let res = Engine::cpu()
        .search(
            &snap,
            &probe,
            &SearchParams {
                k: 200,
                threshold: None,
            },
        )
        .unwrap();
    let p = common::unit(&probe);
    let mut worst: f64 = 0.0;
    for c in &res[0].candidates {
        let i: usize = c.subject[1..].parse().unwrap();
        let exact: f64 = p
            .iter()
            .zip(&units[i])
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let err = (f64::from(c.score) - exact).abs();
        assert!(err <= i8_score_error_bound(&p, &units[i]), "row {i}: error {err}");
        worst = worst.max(err);
    }
    assert!(
        worst < 0.01,
        "typical i8 error should be far below the bound, got {worst}"
    );
    assert_eq!(padded_dim(Dtype::I8, dim), 512);
}
