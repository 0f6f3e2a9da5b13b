//! Corruption campaign (seeded, reproducible): byte flips, zeroed pages, truncations
//! and deletions of every file kind (MANIFEST, its copy, segments, the log) of galleries
//! of every dtype, 234 cases. Each case is tried as a reader would (search through the
//! engine, rows verified first) and as an operator would (open the writer and `check`;
//! on an error, `repair`, then open and `check` again).
//!
//! Outcomes: a clean error, or the answers served exactly as before the damage. A
//! wrong answer served must never happen, nor may acknowledged data be lost in
//! silence: whatever a repair cannot keep it must report, by subject when the bytes
//! that name it survive. `cargo test --release --test corruption -- --nocapture`
//! prints the table kept in RELIABILITY.md.

mod common;

use biogate::gallery::{self, Gallery};
use biogate::template::Dtype;
use biogate::{Engine, ProbeResult, SearchParams};
use common::{build, content, copy_dir, random_rows, rng};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const DIM: usize = 24;

fn search(dir: &Path, probes: &[f32]) -> biogate::Result<Vec<ProbeResult>> {
    let snapshot = gallery::open_snapshot(dir)?;
    Engine::cpu().search(&snapshot, probes, &SearchParams { k: 10, threshold: None })
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip(u64, u8),
    ZeroPage(u64),
    Truncate(u64),
    Delete,
}

impl Damage {
    fn kind(&self) -> &'static str {
        match self {
            Damage::Flip(..) => "byte flip",
            Damage::ZeroPage(_) => "zeroed 4 KiB page",
            Damage::Truncate(_) => "truncation",
            Damage::Delete => "deletion",
        }
    }

    fn apply(&self, path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        match *self {
            Damage::Flip(at, mask) => bytes[at as usize] ^= mask,
            Damage::ZeroPage(page) => {
                let start = (page as usize * 4096).min(bytes.len());
                let end = (start + 4096).min(bytes.len());
                bytes[start..end].fill(0);
            }
            Damage::Truncate(len) => bytes.truncate(len as usize),
            Damage::Delete => {
                std::fs::remove_file(path).unwrap();
                return;
            }
        }
        std::fs::write(path, bytes).unwrap();
    }
}

fn file_kind(name: &str) -> &'static str {
    match name {
        "MANIFEST" => "MANIFEST",
        "MANIFEST.copy" => "MANIFEST.copy",
        n if n.starts_with("seg-") => "segment",
        _ => "log",
    }
}

#[test]
fn no_damage_is_served_and_no_acknowledged_data_is_lost_in_silence() {
    let work = tempfile::tempdir().unwrap();
    let mut table: BTreeMap<(String, &str), BTreeMap<&str, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut r = rng(2026);
    for dtype in Dtype::ALL {
        // Two imported segments, a sealed one, and a log with enrollments and deletions.
        let golden = work.path().join(format!("golden-{dtype}"));
        let (mut g, _) = build(&golden, DIM, dtype, 300, 7);
        g.seal_log().unwrap();
        g.enroll(&[biogate::gallery::Enrollment {
            subject: "late-1".into(),
            templates: random_rows(&mut rng(1), 2, DIM),
        }])
        .unwrap();
        let victim = g.snapshot().segments()[0].segment.subject_id(5).to_owned();
        g.delete_subject(&victim).unwrap();
        drop(g);
        let mut probes = random_rows(&mut rng(5), 12, DIM);
        probes.extend(random_rows(&mut rng(1), 2, DIM));
        let answers = search(&golden, &probes).unwrap();
        let acked = content(&golden);
        let mut files: Vec<String> = std::fs::read_dir(&golden)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "LOCK")
            .collect();
        files.sort();
        assert_eq!(files.len(), 6, "{files:?}");
        for file in &files {
            let len = std::fs::metadata(golden.join(file)).unwrap().len();
            let mut damages: Vec<Damage> = (0..8)
                .map(|_| Damage::Flip(r.random_range(0..len), 1 << r.random_range(0..8)))
                .collect();
            for _ in 0..2 {
                damages.push(Damage::ZeroPage(r.random_range(0..len.div_ceil(4096))));
                damages.push(Damage::Truncate(r.random_range(0..len)));
            }
            damages.push(Damage::Delete);
            for damage in damages {
                cases += 1;
                let case = format!("{dtype} {file} {damage:?}");
                let dir = work.path().join("case");
                let _ = std::fs::remove_dir_all(&dir);
                copy_dir(&golden, &dir);
                damage.apply(&dir.join(file));
                let mut outcome: Vec<&str> = Vec::new();
                // As a reader: a clean error, or exactly the answers from before.
                match search(&dir, &probes) {
                    Err(_) => outcome.push("search: clean error"),
                    Ok(got) if got == answers => outcome.push("search: served correctly"),
                    Ok(_) => {
                        outcome.push("search: WRONG ANSWER");
                        failures.push(format!("{case}: a wrong answer was served"));
                    }
                }
                // As an operator: open and check; on an error, repair.
                let healthy = Gallery::open(&dir).map(drop).and_then(|_| gallery::check(&dir));
                match healthy {
                    Ok(_) => {
                        if content(&dir) == acked {
                            outcome.push("store: intact");
                        } else {
                            outcome.push("store: LOST IN SILENCE");
                            failures.push(format!("{case}: opened and checked, but the content changed"));
                        }
                    }
                    Err(_) => match gallery::repair::repair(&dir, &Default::default()) {
                        Err(e) => {
                            outcome.push("store: unrepairable (clean error)");
                            eprintln!("{case}: repair refused: {e}");
                        }
                        Ok(report) => {
                            if let Err(e) = Gallery::open(&dir).map(drop).and_then(|_| gallery::check(&dir)) {
                                failures.push(format!("{case}: still broken after repair: {e}"));
                                continue;
                            }
                            let now = content(&dir);
                            let now_set: BTreeSet<&(String, u32)> = now.iter().collect();
                            let acked_set: BTreeSet<&(String, u32)> = acked.iter().collect();
                            // Subjects with a row gone, or rows that were not there.
                            let changed: BTreeSet<&str> = acked_set
                                .symmetric_difference(&now_set)
                                .map(|(s, _)| s.as_str())
                                .collect();
                            let named: BTreeSet<&str> = report
                                .lost
                                .iter()
                                .filter(|l| l.subject_verified)
                                .filter_map(|l| l.subject.as_deref())
                                .collect();
                            // A deleted subject back in the gallery (its deletion lost) counts
                            // as changed too; it must be reported like a lost enrollment.
                            let unnamed = report.lost.iter().any(|l| !l.subject_verified);
                            if changed.is_empty() {
                                outcome.push("repair: nothing lost");
                            } else if changed.is_subset(&named) {
                                outcome.push("repair: losses named by subject");
                            } else if unnamed {
                                outcome.push("repair: destroyed, reported without every name");
                            } else {
                                outcome.push("repair: LOST IN SILENCE");
                                failures.push(format!(
                                    "{case}: {changed:?} changed, report named {named:?}: {:?}",
                                    report.lost
                                ));
                            }
                            if !report.kept_aside.is_empty() {
                                outcome.push("repair: damaged file kept aside");
                            }
                        }
                    },
                }
                for o in outcome {
                    *table
                        .entry((file_kind(file).to_owned(), damage.kind()))
                        .or_default()
                        .entry(o)
                        .or_default() += 1;
                }
            }
        }
    }
    eprintln!("corruption campaign: {cases} cases");
    for ((file, damage), outcomes) in &table {
        eprintln!("  {file:14} {damage:18} {outcomes:?}");
    }
    let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
    for outcomes in table.values() {
        for (o, n) in outcomes {
            *totals.entry(o).or_default() += n;
        }
    }
    eprintln!("  totals: {totals:?}");
    assert!(cases >= 200, "{cases} cases");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
