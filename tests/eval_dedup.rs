//! Accuracy metrics and de-duplication: hand-computed cases, an independent float64
//! computation on synthetic data, planted duplicates, and interrupt/resume.

mod common;

use biogate::Engine;
use biogate::dedup::{DedupOptions, DedupOutcome, checkpoint_path, dedup};
use biogate::eval::{evaluate, fnir, fpir};
use biogate::gallery::{Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::Dtype;
use common::{Model, reference_scores, rng, unit};
use rand::Rng;
use rand_distr::StandardNormal;

/// A small gallery where every score is known: 2-D unit vectors at chosen angles.
#[test]
fn metrics_on_a_gallery_where_every_number_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), 2, Dtype::F32).unwrap();
    let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
    g.enroll(&[
        Enrollment {
            subject: "a".into(),
            templates: at(0.0),
        },
        Enrollment {
            subject: "b".into(),
            templates: at(90.0),
        },
        Enrollment {
            subject: "c".into(),
            templates: at(180.0),
        },
    ])
    .unwrap();
    // Mated: a at 10 deg (a rank 1, cos 10 = 0.985), b at 40 deg (a is closer, cos 40;
    // b at rank 2 with cos 50 = 0.643), c at 170 deg (rank 1, 0.985).
    let mated: Vec<f32> = [10.0, 40.0, 170.0].iter().flat_map(|&d| at(d)).collect();
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    // Non-mated tops: 45 deg -> 0.707 (a and b tie), 135 -> 0.707, 60 -> 0.866 (b).
    let nonmated: Vec<f32> = [45.0, 135.0, 60.0].iter().flat_map(|&d| at(d)).collect();
    let r = evaluate(&Engine::cpu(), &g.snapshot(), &mated, &ids, &nonmated, 3, 1).unwrap();
    assert_eq!(r.rank1, 2.0 / 3.0);
    assert_eq!(r.rank_k, 1.0);
    assert_eq!(r.mated[1].rank, Some(2));
    assert!((r.mated[1].score.unwrap() - 50f32.to_radians().cos()).abs() < 1e-6);
    assert_eq!(r.mated[0].rank, Some(1));
    let tops: Vec<f32> = r.nonmated_top.clone();
    assert!((tops[0] - 0.70710677).abs() < 1e-6 && (tops[2] - 0.8660254).abs() < 1e-6);
    // At a threshold of 0.8: FPIR 1/3 (only the 60 deg probe), FNIR 1/3 (b is at rank 2).
    assert!((fpir(&tops, 0.8) - 1.0 / 3.0).abs() < 1e-12);
    assert!((fnir(&r.mated, 0.8, 1) - 1.0 / 3.0).abs() < 1e-12);
    // With rank criterion 2, b (0.643 at rank 2) counts as found at 0.6, not at 0.7.
    assert_eq!(fnir(&r.mated, 0.6, 2), 0.0);
    assert!((fnir(&r.mated, 0.7, 2) - 1.0 / 3.0).abs() < 1e-12);
    // FPIR target 0.01 over 3 searches allows none: threshold just above 0.866.
    let p = &r.operating_points[2];
    assert_eq!(p.target_fpir, 0.01);
    assert_eq!(p.fpir, 0.0);
    assert!(p.threshold > 0.8660254 && p.threshold < 0.8661);
    assert!(
        (p.fnir - 1.0 / 3.0).abs() < 1e-12,
        "a and c are found at 0.985; b is at rank 2"
    );
    // A mated id that is not enrolled is refused.
    let bad = vec!["a".to_string(), "zed".to_string(), "c".to_string()];
    let e = evaluate(&Engine::cpu(), &g.snapshot(), &mated, &bad, &nonmated, 3, 1).unwrap_err();
    assert!(
        e.to_string().contains("mated probe 1") && e.to_string().contains("zed"),
        "{e}"
    );
}

/// Overlapping score distributions (low dimension, heavy noise) so every metric is
/// non-trivial; checked against a brute-force float64 computation.
#[test]
fn metrics_match_an_independent_float64_computation() {
    let dim = 24;
    let mut r = rng(21);
    let subjects = 400;
    let centre: Vec<Vec<f32>> = (0..subjects)
        .map(|_| (0..dim).map(|_| r.sample(StandardNormal)).collect())
        .collect();
    let noisy = |c: &[f32], r: &mut rand::rngs::SmallRng| -> Vec<f32> {
        c.iter()
            .map(|&x| x + 1.1 * r.sample::<f32, _>(StandardNormal))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), dim, Dtype::F32).unwrap();
    let mut model = Model::default();
    let mut values = Vec::new();
    let mut ids = Vec::new();
    for (s, c) in centre.iter().enumerate() {
        let t = noisy(c, &mut r);
        model.add(&format!("s{s:04}"), &t, dim);
        values.extend(t);
        ids.push(format!("s{s:04}"));
    }
    g.import(
        &mut MemoryImport::new(dim, &values, &ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    let mated_subjects: Vec<usize> = (0..600).map(|_| r.random_range(0..subjects)).collect();
    let mated: Vec<f32> = mated_subjects.iter().flat_map(|&s| noisy(&centre[s], &mut r)).collect();
    let mated_ids: Vec<String> = mated_subjects.iter().map(|s| format!("s{s:04}")).collect();
    let nonmated: Vec<f32> = (0..700)
        .flat_map(|_| (0..dim).map(|_| r.sample::<f32, _>(StandardNormal)).collect::<Vec<_>>())
        .collect();
    let k = 10;
    let report = evaluate(&Engine::cpu(), &g.snapshot(), &mated, &mated_ids, &nonmated, k, 1).unwrap();

    // Brute force in f64.
    let mut ranks = Vec::new();
    for (i, id) in mated_ids.iter().enumerate() {
        let scores = reference_scores(&model, &mated[i * dim..(i + 1) * dim], Dtype::F32);
        let mine = scores[id];
        let rank = 1 + scores
            .iter()
            .filter(|(s, v)| **v > mine || (**v == mine && *s < id))
            .count();
        ranks.push((rank, mine));
    }
    let tops: Vec<f64> = (0..700)
        .map(|i| {
            reference_scores(&model, &nonmated[i * dim..(i + 1) * dim], Dtype::F32)
                .values()
                .cloned()
                .fold(f64::MIN, f64::max)
        })
        .collect();
    let rank1 = ranks.iter().filter(|r| r.0 == 1).count() as f64 / 600.0;
    let rankk = ranks.iter().filter(|r| r.0 <= k).count() as f64 / 600.0;
    assert!(
        rank1 > 0.2 && rank1 < 0.98,
        "the data should make this non-trivial: {rank1}"
    );
    assert_eq!(report.rank1, rank1);
    assert_eq!(report.rank_k, rankk);
    for p in &report.operating_points {
        let t = f64::from(p.threshold);
        let fp = tops.iter().filter(|&&s| s >= t).count() as f64 / 700.0;
        let fnr = 1.0 - ranks.iter().filter(|r| r.0 == 1 && r.1 >= t).count() as f64 / 600.0;
        assert!((p.fpir - fp).abs() < 1e-12, "FPIR at {t}: {} vs {fp}", p.fpir);
        assert!((p.fnir - fnr).abs() < 1e-12, "FNIR at {t}: {} vs {fnr}", p.fnir);
        assert!(p.fpir <= p.target_fpir);
        // The threshold is the lowest that meets the target: one ulp lower exceeds it.
        assert!(
            fpir(&report.nonmated_top, p.threshold.next_down()) > p.target_fpir,
            "{p:?}"
        );
    }
    assert!(
        report.operating_points[1].fnir > 0.0,
        "FNIR at FPIR 0.003 is non-trivial here"
    );
}

/// 300 subjects x 2 samples; five of them enrolled a second time under another id.
fn planted(dir: &std::path::Path, dtype: Dtype) -> Vec<(String, String)> {
    let spec = biogate::synth::SynthSpec {
        subjects: 300,
        samples: 2,
        dim: 128,
        probes: 5,
        seed: 9,
        difficulty: biogate::synth::Difficulty::Easy,
    };
    let data = biogate::synth::generate(&spec).unwrap();
    let mut g = Gallery::create(dir, 128, dtype).unwrap();
    g.import(
        &mut MemoryImport::new(128, &data.gallery, &data.gallery_ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    // The same people under new ids: their fresh captures (the mated probes).
    let mut planted = Vec::new();
    for (i, id) in data.mated_ids.iter().enumerate() {
        let alias = format!("alias-{i}");
        g.enroll(&[Enrollment {
            subject: alias.clone(),
            templates: data.mated[i * 128..(i + 1) * 128].to_vec(),
        }])
        .unwrap();
        planted.push(if *id < alias {
            (id.clone(), alias)
        } else {
            (alias, id.clone())
        });
    }
    planted.sort();
    planted
}

fn read_pairs(path: &std::path::Path) -> Vec<(String, String, f32)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].trim_matches('"').to_owned(),
                f[1].trim_matches('"').to_owned(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn dedup_finds_exactly_the_planted_duplicates() {
    for dtype in Dtype::ALL {
        let dir = tempfile::tempdir().unwrap();
        let planted = planted(&dir.path().join("g"), dtype);
        let out = dir.path().join("pairs.csv");
        let opts = DedupOptions {
            threshold: Some(0.5),
            top: None,
            batch: 100,
        };
        let outcome = dedup(&Engine::cpu(), &dir.path().join("g"), opts, &out, &mut |_, _| true).unwrap();
        assert!(
            matches!(
                outcome,
                DedupOutcome::Finished {
                    pairs: 5,
                    rows: 605,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let pairs = read_pairs(&out);
        let mut found: Vec<(String, String)> = pairs.iter().map(|p| (p.0.clone(), p.1.clone())).collect();
        assert!(pairs.windows(2).all(|w| w[0].2 >= w[1].2), "sorted by score");
        assert!(
            pairs.iter().all(|p| p.0 < p.1),
            "each pair once, as (a, b) with a < b; no self-pairs"
        );
        found.sort();
        assert_eq!(found, planted, "{dtype}");
        assert!(!checkpoint_path(&out).exists());
    }
}

#[test]
fn top_mode_pairs_each_template_with_its_nearest_other_subject() {
    let dir = tempfile::tempdir().unwrap();
    let planted = planted(&dir.path().join("g"), Dtype::F32);
    let out = dir.path().join("pairs.csv");
    let opts = DedupOptions {
        threshold: None,
        top: Some(1),
        batch: 64,
    };
    dedup(&Engine::cpu(), &dir.path().join("g"), opts, &out, &mut |_, _| true).unwrap();
    let pairs = read_pairs(&out);
    // Every planted pair is among each side's nearest other subject, and on top.
    let top5: Vec<(String, String)> = {
        let mut v: Vec<_> = pairs[..5].iter().map(|p| (p.0.clone(), p.1.clone())).collect();
        v.sort();
        v
    };
    assert_eq!(top5, planted);
    assert!(pairs.len() > 300, "every template contributes its nearest neighbour");
    let mut seen = std::collections::HashSet::new();
    assert!(
        pairs
            .iter()
            .all(|p| p.0 != p.1 && seen.insert((p.0.clone(), p.1.clone())))
    );
}

#[test]
fn interrupted_and_resumed_dedup_writes_what_one_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g");
    planted(&g, Dtype::I8);
    let opts = DedupOptions {
        threshold: Some(0.2),
        top: Some(3),
        batch: 50,
    };
    let whole = dir.path().join("whole.csv");
    dedup(&Engine::cpu(), &g, opts, &whole, &mut |_, _| true).unwrap();

    let parts = dir.path().join("parts.csv");
    let mut calls = 0;
    let first = dedup(&Engine::cpu(), &g, opts, &parts, &mut |_, _| {
        calls += 1;
        calls < 3
    })
    .unwrap();
    assert_eq!(
        first,
        DedupOutcome::Interrupted {
            rows_done: 150,
            rows: 605
        }
    );
    assert!(checkpoint_path(&parts).exists() && !parts.exists());
    // Different options do not silently reuse the checkpoint.
    let other = DedupOptions {
        threshold: Some(0.3),
        ..opts
    };
    assert!(
        dedup(&Engine::cpu(), &g, other, &parts, &mut |_, _| true)
            .unwrap_err()
            .to_string()
            .contains("remove it")
    );
    let second = dedup(&Engine::cpu(), &g, opts, &parts, &mut |_, _| true).unwrap();
    assert!(
        matches!(second, DedupOutcome::Finished { resumed_from: 150, .. }),
        "{second:?}"
    );
    assert_eq!(std::fs::read(&parts).unwrap(), std::fs::read(&whole).unwrap());
    assert!(read_pairs(&whole).len() > 5);

    // A gallery that changed since the checkpoint is refused too.
    let mut calls = 0;
    dedup(&Engine::cpu(), &g, opts, &parts, &mut |_, _| {
        calls += 1;
        calls < 2
    })
    .unwrap();
    let mut gw = Gallery::open(&g).unwrap();
    gw.enroll(&[Enrollment {
        subject: "late".into(),
        templates: unit(&[1.0; 128]),
    }])
    .unwrap();
    drop(gw);
    let e = dedup(&Engine::cpu(), &g, opts, &parts, &mut |_, _| true).unwrap_err();
    assert!(e.to_string().contains("another gallery state"), "{e}");
}

/// `synth`'s default (realistic) data is as hard as the field: FNIR at FPIR 0.003
/// between 0.1% and 5% (NIST FRTE 1:N's range from mugshots to harder imagery), and a
/// DET curve, not a corner, while easy data separates mates from non-mates entirely.
#[test]
fn realistic_synthetic_data_gives_a_det_curve_and_a_field_like_fnir() {
    use biogate::synth::{Difficulty, SynthSpec, generate};
    for (difficulty, fnir_range) in [(Difficulty::Easy, 0.0..=0.0), (Difficulty::Realistic, 0.001..=0.05)] {
        let spec = SynthSpec {
            subjects: 8000,
            samples: 1,
            dim: 128,
            probes: 3000,
            seed: 1,
            difficulty,
        };
        let data = generate(&spec).unwrap();
        let snapshot = biogate::Snapshot::from_rows(&data.gallery, spec.dim, Dtype::F32);
        // from_rows names row r "r{r:09}"; the gallery ids of synth are one row each.
        let row_ids: Vec<String> = data
            .mated_ids
            .iter()
            .map(|id| {
                let row = data.gallery_ids.iter().position(|g| g == id).unwrap();
                format!("r{row:09}")
            })
            .collect();
        let report = evaluate(&Engine::cpu(), &snapshot, &data.mated, &row_ids, &data.nonmated, 20, 1).unwrap();
        let at_0003 = report
            .operating_points
            .iter()
            .find(|p| p.target_fpir == 0.003)
            .unwrap()
            .fnir;
        assert!(
            fnir_range.contains(&at_0003),
            "{difficulty}: FNIR at FPIR 0.003 = {at_0003}"
        );
        if difficulty == Difficulty::Realistic {
            let mut points = biogate::eval::det_curve(&report);
            points.dedup_by(|a, b| a == b);
            assert!(points.len() >= 10, "a DET curve, not a corner: {points:?}");
        }
    }
}
