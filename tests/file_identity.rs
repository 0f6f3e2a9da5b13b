//! Files that are valid but not the ones the gallery wrote, and bytes changed behind
//! the process: a segment copied over another of the same size, one restored from a
//! twin gallery that shares its id, and rows written in place with the modification
//! time set back (as `rsync --inplace -t` does). None of them is ever scored.

mod common;

use biogate::gallery::{self, Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::Dtype;
use biogate::{Engine, SearchParams};
use common::{copy_dir, random_rows, rng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const DIM: usize = 20;

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut s: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bgs"))
        .collect();
    s.sort();
    s
}

/// A gallery of `n` imported segments of 30 subjects each (`{prefix}{seg}-{i}`), and
/// their rows.
fn gallery_of_segments(dir: &Path, n: usize, prefix: &str, seed: u64) -> (Gallery, Vec<Vec<f32>>) {
    let mut g = Gallery::create(dir, DIM, Dtype::F16).unwrap();
    let mut all = Vec::new();
    for s in 0..n {
        let rows = random_rows(&mut rng(seed + s as u64), 30, DIM);
        let ids: Vec<String> = (0..30).map(|i| format!("{prefix}{s}-{i:02}")).collect();
        g.import(
            &mut MemoryImport::new(DIM, &rows, &ids).unwrap(),
            ImportOptions::default(),
            &|_| {},
        )
        .unwrap();
        all.push(rows);
    }
    (g, all)
}

fn top(g: &Gallery, probe: &[f32]) -> biogate::Result<String> {
    let r = Engine::cpu().search(&g.snapshot(), probe, &SearchParams { k: 1, threshold: None })?;
    Ok(r[0].candidates[0].subject.clone())
}

/// Everything a reader or an operator could do with the gallery refuses it.
fn refused_everywhere(dir: &Path, what: &str) -> String {
    let e = Gallery::open(dir)
        .err()
        .unwrap_or_else(|| panic!("{what}: opened"))
        .to_string();
    assert!(gallery::open_snapshot(dir).is_err(), "{what}: read");
    assert!(gallery::check(dir).is_err(), "{what}: checked");
    e
}

#[test]
fn a_valid_segment_copied_over_another_of_the_same_size_is_refused_and_repair_says_what_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (g, rows) = gallery_of_segments(dir.path(), 4, "s", 5);
    drop(g);
    let segs = segments(dir.path());
    for (from, to) in [(3usize, 1usize), (0, 2), (2, 3)] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let (src, dst) = (
            copy.path().join(segs[from].file_name().unwrap()),
            copy.path().join(segs[to].file_name().unwrap()),
        );
        assert_eq!(
            std::fs::metadata(&src).unwrap().len(),
            std::fs::metadata(&dst).unwrap().len()
        );
        std::fs::copy(&src, &dst).unwrap(); // cp: the same inode, rewritten
        let e = refused_everywhere(copy.path(), &format!("seg {from} over {to}"));
        assert!(e.contains("not the segment the manifest names"), "{e}");
        let report = gallery::repair::repair(copy.path(), &Default::default()).unwrap();
        // The lost rows are reported without naming the copied file's subjects (they
        // are not the ones lost).
        assert!(
            report
                .lost
                .iter()
                .any(|l| l.subject.is_none() && l.what.contains("another segment")),
            "{report:?}"
        );
        assert!(
            report.subjects().iter().all(|s| !s.starts_with(&format!("s{from}-"))),
            "{report:?}"
        );
        let g = Gallery::open(copy.path()).unwrap();
        for (s, r) in rows.iter().enumerate().filter(|(s, _)| *s != to) {
            assert_eq!(
                top(&g, &r[DIM..2 * DIM]).unwrap(),
                format!("s{s}-01"),
                "seg {from} over {to}"
            );
        }
        assert!(!g.snapshot().has_subject(&format!("s{to}-01")));
        drop(g);
        gallery::check(copy.path()).unwrap();
    }
}

#[test]
fn a_segment_restored_from_a_twin_gallery_with_the_same_id_and_counts_is_refused() {
    // A gallery copied whole (same gallery id), then each copy enrolled different people
    // and sealed: their seg-000003.bgs files have the same size, rows and subjects.
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = gallery_of_segments(dir.path(), 1, "base", 1);
    drop(g);
    let twin = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), twin.path());
    for (d, prefix, seed) in [(dir.path(), "ours", 10u64), (twin.path(), "twin", 20)] {
        let mut g = Gallery::open(d).unwrap();
        let rows = random_rows(&mut rng(seed), 12, DIM);
        let batch: Vec<Enrollment> = (0..12)
            .map(|i| Enrollment {
                subject: format!("{prefix}-{i:02}"),
                templates: rows[i * DIM..(i + 1) * DIM].to_vec(),
            })
            .collect();
        g.enroll(&batch).unwrap();
        g.seal_log().unwrap();
    }
    let (ours, theirs) = (segments(dir.path()), segments(twin.path()));
    assert_eq!(ours.len(), 2);
    assert_eq!(ours[1].file_name(), theirs[1].file_name());
    std::fs::copy(&theirs[1], &ours[1]).unwrap();
    let e = refused_everywhere(dir.path(), "twin's segment");
    assert!(e.contains("not the segment the manifest names"), "{e}");
}

#[test]
fn rows_written_in_place_with_the_mtime_set_back_are_never_scored() {
    let dir = tempfile::tempdir().unwrap();
    let (g, rows) = gallery_of_segments(dir.path(), 2, "s", 40);
    // Verified and answering.
    assert_eq!(top(&g, &rows[1][..DIM]).unwrap(), "s1-00");
    let seg = &segments(dir.path())[1];
    let mtime = std::fs::metadata(seg).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // 85 bytes of subject s1-00's row XORed in place, then the mtime put back.
    let f = std::fs::OpenOptions::new().write(true).read(true).open(seg).unwrap();
    let mut bytes = vec![0u8; 85];
    f.read_exact_at(&mut bytes, 4096).unwrap();
    for b in &mut bytes {
        *b ^= 0x5a;
    }
    f.write_all_at(&bytes, 4096).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(seg).unwrap().modified().unwrap(), mtime);
    // The very next search refuses the segment instead of answering from those bytes.
    for _ in 0..3 {
        let e = top(&g, &rows[1][..DIM]).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }
    let e = Engine::cpu()
        .verify(&g.snapshot(), &rows[1][..DIM], "s1-00")
        .unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn bytes_rewritten_identically_in_place_are_verified_again_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let (g, rows) = gallery_of_segments(dir.path(), 1, "s", 60);
    assert_eq!(top(&g, &rows[0][..DIM]).unwrap(), "s0-00");
    let seg = &segments(dir.path())[0];
    let bytes = std::fs::read(seg).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.write_all_at(&bytes[4096..8192], 4096).unwrap();
    drop(f);
    assert_eq!(top(&g, &rows[0][2 * DIM..3 * DIM]).unwrap(), "s0-02");
}
