//! The store at scale's seams: counts kept as changes are applied (never counted by
//! reading every id) stay equal to a recount through every kind of change and every
//! reopen; deletions are one bit per row; 1:1 verification finds a subject's rows in
//! place. A replica's applied batch number is logged with the batch and survives
//! seals, compactions, reopens and crashes.

mod common;

use biogate::gallery::{self, Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::Dtype;
use common::{random_rows, rng};
use rand::Rng;
use std::collections::HashSet;

const DIM: usize = 12;

/// Live templates and subjects, counted the slow way.
fn recount(g: &Gallery) -> (u64, u64) {
    let snap = g.snapshot();
    let mut subjects = HashSet::new();
    let mut rows = 0;
    for (_, row) in snap.each_live_row() {
        rows += 1;
        subjects.insert(row.subject.to_owned());
    }
    (rows, subjects.len() as u64)
}

fn kept(g: &Gallery) -> (u64, u64) {
    let c = g.snapshot().counts();
    (c.rows, c.subjects)
}

#[test]
fn kept_counts_equal_a_recount_through_every_change_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), DIM, Dtype::I8).unwrap();
    let mut r = rng(77);
    let id = |r: &mut rand::rngs::SmallRng| format!("p{:03}", r.random_range(0..60));
    for step in 0..160 {
        let what = r.random_range(0..100);
        let label = match what {
            0..45 => {
                let n = r.random_range(1..4);
                let batch: Vec<Enrollment> = (0..n)
                    .map(|_| {
                        let templates = r.random_range(1..3);
                        Enrollment {
                            subject: id(&mut r),
                            templates: random_rows(&mut r, templates, DIM),
                        }
                    })
                    .collect();
                g.enroll(&batch).unwrap();
                "enroll"
            }
            45..70 => {
                let s = id(&mut r);
                match g.delete_subject(&s) {
                    Ok(()) | Err(biogate::Error::NotFound(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                "delete"
            }
            70..82 => {
                g.seal_log().unwrap();
                "seal"
            }
            82..90 => {
                let n = r.random_range(1..30);
                let data = random_rows(&mut r, n, DIM);
                let ids: Vec<String> = (0..n).map(|_| id(&mut r)).collect();
                let mut src = MemoryImport::new(DIM, &data, &ids).unwrap();
                g.import(&mut src, ImportOptions { add_to_existing: true }, &|_| {})
                    .unwrap();
                "import"
            }
            90..94 => {
                g.compact().unwrap();
                "compact"
            }
            _ => {
                drop(g);
                g = Gallery::open(dir.path()).unwrap();
                "reopen"
            }
        };
        assert_eq!(kept(&g), recount(&g), "step {step}: after {label}");
        let info = gallery::info(dir.path()).unwrap();
        assert_eq!(
            (info.rows, info.subjects),
            recount(&g),
            "step {step}: info after {label}"
        );
    }
    gallery::check(dir.path()).unwrap();
    // A repair forgets the kept number of sealed subjects; the next open counts them
    // again and keeps the count.
    drop(g);
    gallery::repair::repair(dir.path(), &Default::default()).unwrap();
    let g = Gallery::open(dir.path()).unwrap();
    assert_eq!(kept(&g), recount(&g));
    let manifest = std::fs::read_to_string(dir.path().join("MANIFEST")).unwrap();
    assert!(manifest.contains("sealed_subjects"), "{manifest}");
}

#[test]
fn verify_reads_a_subjects_rows_in_place_and_skips_deleted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), DIM, Dtype::F32).unwrap();
    let mut r = rng(3);
    let rows = random_rows(&mut r, 40, DIM);
    // Subjects' rows interleaved in the file: the index groups them.
    let ids: Vec<String> = (0..40).map(|i| format!("v{}", i % 7)).collect();
    let mut src = MemoryImport::new(DIM, &rows, &ids).unwrap();
    g.import(&mut src, ImportOptions::default(), &|_| {}).unwrap();
    let snap = g.snapshot();
    let seg = &snap.segments()[0].segment;
    assert_eq!(seg.max_subject_rows(), 6);
    let o = seg.find_subject("v3").unwrap();
    assert_eq!(seg.subject_rows(o), &[3, 10, 17, 24, 31, 38]);
    let engine = biogate::Engine::cpu();
    let probe = &rows[10 * DIM..11 * DIM];
    let score = engine.verify(&snap, probe, "v3").unwrap().unwrap();
    assert!((score - 1.0).abs() < 1e-5, "{score}");
    g.delete_subject("v3").unwrap();
    assert_eq!(g.snapshot().segments()[0].deleted.count(), 6);
    assert!(engine.verify(&g.snapshot(), probe, "v3").unwrap().is_none());
    // Enrolled again: only the new row counts.
    let other = random_rows(&mut r, 1, DIM);
    g.enroll(&[Enrollment {
        subject: "v3".into(),
        templates: other.clone(),
    }])
    .unwrap();
    g.seal_log().unwrap();
    let s = engine.verify(&g.snapshot(), &other, "v3").unwrap().unwrap();
    assert!((s - 1.0).abs() < 1e-5);
    let s = engine.verify(&g.snapshot(), probe, "v3").unwrap().unwrap();
    assert!(s < 0.99, "{s}");
}

#[test]
fn ids_in_ascending_order_and_out_of_it_make_the_same_segment() {
    let mut r = rng(9);
    let rows = random_rows(&mut r, 9, DIM);
    let ascending = ["a", "a", "b", "c", "c", "c", "d", "e", "f"];
    let shuffled = ["c", "a", "f", "c", "b", "a", "d", "c", "e"];
    let subjects_of = |ids: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), DIM, Dtype::F16).unwrap();
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let mut src = MemoryImport::new(DIM, &rows, &ids).unwrap();
        g.import(&mut src, ImportOptions::default(), &|_| {}).unwrap();
        gallery::check(dir.path()).unwrap();
        let snap = g.snapshot();
        let seg = &snap.segments()[0].segment;
        let table: Vec<(String, Vec<u32>)> = (0..seg.subjects() as u32)
            .map(|o| (seg.subject_id(o).to_owned(), seg.subject_rows(o).to_vec()))
            .collect();
        assert!(ids.iter().all(|id| seg.find_subject(id).is_some()));
        table
    };
    let a = subjects_of(&ascending);
    assert_eq!(
        a.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d", "e", "f"]
    );
    assert_eq!(a[2].1, [3, 4, 5]);
    let s = subjects_of(&shuffled);
    assert_eq!(
        s.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d", "e", "f"]
    );
    assert_eq!(s[2].1, [0, 3, 7]);
}

/// The log in pieces (4 MiB of rows each: 256 rows at dim 4096 f32): searches across
/// pieces, a subject in several pieces, deletions in old pieces, counts, seal and
/// reopen all agree with one segment holding the same rows; a write copies only the
/// newest piece while a snapshot holds the table.
#[test]
fn a_log_in_pieces_answers_like_one_segment() {
    const BIG: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let twin = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), BIG, Dtype::F32).unwrap();
    let mut r = rng(41);
    let rows = random_rows(&mut r, 700, BIG);
    let ids: Vec<String> = (0..700).map(|i| format!("q{:03}", (i * 7) % 300)).collect();
    for (i, chunk) in rows.chunks(BIG * 50).enumerate() {
        let batch: Vec<Enrollment> = chunk
            .chunks(BIG)
            .enumerate()
            .map(|(j, t)| Enrollment {
                subject: ids[i * 50 + j].clone(),
                templates: t.to_vec(),
            })
            .collect();
        let held = g.snapshot(); // a search holding the table while the write happens
        g.enroll(&batch).unwrap();
        let pieces = g.snapshot().log().pieces().to_vec();
        let old = held.log().pieces();
        // Every piece but the newest is shared with the held snapshot, not copied.
        for (a, b) in pieces.iter().zip(old).take(old.len().saturating_sub(1)) {
            assert!(std::sync::Arc::ptr_eq(a, b));
        }
    }
    assert_eq!(g.snapshot().log().pieces().len(), 3, "700 rows in pieces of 256");
    for s in ["q000", "q007", "q299"] {
        g.delete_subject(s).unwrap();
    }
    counts_equal(&g);
    let mut t = Gallery::create(twin.path(), BIG, Dtype::F32).unwrap();
    let mut src = MemoryImport::new(BIG, &rows, &ids).unwrap();
    t.import(&mut src, ImportOptions::default(), &|_| {}).unwrap();
    for s in ["q000", "q007", "q299"] {
        t.delete_subject(s).unwrap();
    }
    let probes = random_rows(&mut rng(3), 5, BIG);
    let mut probes_and_mates = probes.clone();
    probes_and_mates.extend_from_slice(&rows[BIG * 10..BIG * 12]);
    let params = biogate::SearchParams { k: 9, threshold: None };
    let engine = biogate::Engine::cpu();
    let want = engine.search(&t.snapshot(), &probes_and_mates, &params).unwrap();
    assert_eq!(engine.search(&g.snapshot(), &probes_and_mates, &params).unwrap(), want);
    drop(g);
    let mut g = Gallery::open(dir.path()).unwrap();
    assert_eq!(engine.search(&g.snapshot(), &probes_and_mates, &params).unwrap(), want);
    counts_equal(&g);
    g.seal_log().unwrap();
    assert_eq!(engine.search(&g.snapshot(), &probes_and_mates, &params).unwrap(), want);
    counts_equal(&g);
}

fn counts_equal(g: &Gallery) {
    assert_eq!(kept(g), recount(g));
}

#[test]
fn the_replicated_batch_is_logged_with_it_and_carried_through_seals_and_compactions() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), DIM, Dtype::F32).unwrap();
    assert_eq!(g.replicated_through(), None);
    let rows = random_rows(&mut rng(4), 6, DIM);
    let batch = |from: usize, to: usize| -> Vec<Enrollment> {
        (from..to)
            .map(|i| Enrollment {
                subject: format!("r{i}"),
                templates: rows[i * DIM..(i + 1) * DIM].to_vec(),
            })
            .collect()
    };
    g.apply_replicated(&batch(0, 3), &[], 1).unwrap();
    // A batch of nothing this replica holds is still a batch applied.
    g.apply_replicated(&[], &["nobody".into()], 2).unwrap();
    assert_eq!(g.replicated_through(), Some(2));
    g.apply_replicated(&[], &["r1".into()], 3).unwrap();
    g.seal_log().unwrap(); // the deletion of r1 is re-logged into the new log
    drop(g);
    let mut g = Gallery::open(dir.path()).unwrap();
    assert_eq!((g.replicated_through(), g.info().unwrap().subjects), (Some(3), 2));
    g.apply_replicated(&batch(3, 6), &[], 4).unwrap();
    g.compact().unwrap();
    drop(g);
    let mut g = Gallery::open(dir.path()).unwrap();
    assert_eq!((g.replicated_through(), g.info().unwrap().subjects), (Some(4), 5));
    // A crash right after a batch (the files copied as the process left them): the
    // number and the batch both survive.
    g.apply_replicated(&[], &["r0".into()], 5).unwrap();
    let crashed = tempfile::tempdir().unwrap();
    common::copy_dir(dir.path(), crashed.path());
    drop(g);
    let g = Gallery::open(crashed.path()).unwrap();
    assert_eq!((g.replicated_through(), g.info().unwrap().subjects), (Some(5), 4));
}

#[test]
fn a_repair_that_lost_data_drops_the_replication_marks() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), DIM, Dtype::F32).unwrap();
    let rows = random_rows(&mut rng(6), 4, DIM);
    for (i, batch) in [(0..2), (2..4)].into_iter().enumerate() {
        let e: Vec<Enrollment> = batch
            .map(|j| Enrollment {
                subject: format!("m{j}"),
                templates: rows[j * DIM..(j + 1) * DIM].to_vec(),
            })
            .collect();
        g.apply_replicated(&e, &[], i as u64 + 1).unwrap();
    }
    drop(g);
    // One byte of the first enrollment's templates flipped in the log.
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.windows(2).position(|w| w == b"m0").unwrap() + 2 + 8;
    bytes[at] ^= 0x55;
    std::fs::write(&log, &bytes).unwrap();
    let report = gallery::repair::repair(dir.path(), &Default::default()).unwrap();
    assert!(!report.lost.is_empty(), "{report:?}");
    assert!(
        report.actions.iter().any(|a| a.contains("replication marks")),
        "{report:?}"
    );
    // The batch marks no longer claim a state that lost an enrollment: a cluster node
    // rebuilds this replica from its shard's log instead of trusting them.
    let g = Gallery::open(dir.path()).unwrap();
    assert_eq!(g.replicated_through(), None);
}
