//! Segment format: round trip for every dtype at odd sizes, and every kind of damage
//! (header, row data, metadata, truncation, manifest) reported clearly by open or check.

mod common;

use biogate::Error;
use biogate::gallery::segment::Segment;
use biogate::gallery::{self, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::{Dtype, encode_row, row_stride};
use common::{random_rows, rng, unit};
use std::path::{Path, PathBuf};

fn import(dir: &Path, dim: usize, dtype: Dtype, rows: usize) -> (Vec<f32>, Vec<String>) {
    let mut g = Gallery::create(dir, dim, dtype).unwrap();
    let data = random_rows(&mut rng(dim as u64), rows, dim);
    let ids: Vec<String> = (0..rows)
        .map(|i| format!("subj-{:04}", (i * 7919) % (rows / 2 + 1)))
        .collect();
    g.import(
        &mut MemoryImport::new(dim, &data, &ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    (data, ids)
}

fn only_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bgs"))
        .collect();
    assert_eq!(segs.len(), 1);
    segs.pop().unwrap()
}

#[test]
fn round_trip_every_dtype_at_odd_sizes() {
    for dtype in Dtype::ALL {
        for dim in [1, 17, 513] {
            let dir = tempfile::tempdir().unwrap();
            let rows = 2057;
            let (data, ids) = import(dir.path(), dim, dtype, rows);
            let seg = Segment::open(&only_segment(dir.path())).unwrap();
            seg.check().unwrap();
            assert_eq!((seg.rows(), seg.dim(), seg.dtype()), (rows, dim, dtype));
            let stride = row_stride(dtype, dim);
            assert_eq!(
                seg.data().as_ptr() as usize % 4096,
                0,
                "rows are page aligned in the map"
            );
            let mut expected = vec![0u8; stride];
            for i in 0..rows {
                let scale = encode_row(dtype, &unit(&data[i * dim..(i + 1) * dim]), &mut expected);
                assert_eq!(
                    &seg.data()[i * stride..(i + 1) * stride],
                    &expected[..],
                    "{dtype} dim {dim} row {i}"
                );
                assert_eq!(seg.scales()[i], scale);
                assert_eq!(seg.subject_id(seg.row_subjects()[i]), ids[i]);
            }
            let mut distinct = ids.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(seg.subjects(), distinct.len());
            for (o, id) in distinct.iter().enumerate() {
                assert_eq!(seg.find_subject(id), Some(o as u32));
            }
            assert_eq!(seg.find_subject("nobody"), None);
            let info = gallery::check(dir.path()).unwrap();
            assert_eq!((info.rows, info.subjects), (rows as u64, distinct.len() as u64));
        }
    }
}

fn damaged(edit: impl Fn(&Path)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), 40, Dtype::F16, 20000); // stride 128 B: 8192 rows per 1 MiB chunk
    let seg = only_segment(dir.path());
    edit(&seg);
    (dir, seg)
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn corrupt_message(e: Error) -> String {
    match e {
        Error::Corrupt(m) => m,
        other => panic!("expected a corruption error, got {other}"),
    }
}

#[test]
fn a_corrupted_header_is_refused_on_open() {
    for offset in [0, 9, 20, 60] {
        let (dir, seg) = damaged(|p| flip(p, offset));
        let msg = corrupt_message(Gallery::open(dir.path()).err().expect("open must fail"));
        assert!(msg.contains(&seg.display().to_string()), "{msg}");
        assert!(msg.contains("magic") || msg.contains("header checksum"), "{msg}");
    }
}

#[test]
fn a_damaged_header_or_footer_is_restored_by_repair_from_the_other() {
    for offset in [Some(20usize), None] {
        let (dir, seg) = damaged(|p| {
            let at = offset.unwrap_or(std::fs::metadata(p).unwrap().len() as usize - 4000);
            flip(p, at)
        });
        assert!(Gallery::open(dir.path()).is_err());
        let report = gallery::repair::repair(dir.path(), &Default::default()).unwrap();
        assert!(report.lost.is_empty(), "{report:?}");
        assert_eq!(report.kept_aside.len(), 1, "{report:?}");
        assert!(
            !seg.exists(),
            "the damaged file is kept aside under damaged/, not in place"
        );
        let info = gallery::check(dir.path()).unwrap();
        assert_eq!(info.rows, 20000);
    }
}

#[test]
fn a_flipped_byte_in_row_data_is_found_by_check_naming_the_rows() {
    let (dir, _) = damaged(|p| flip(p, 4096 + 128 * 10_000 + 5));
    // Opening stays cheap (row data is not read)...
    Gallery::open(dir.path()).unwrap();
    // ...and check finds it.
    let msg = corrupt_message(gallery::check(dir.path()).unwrap_err());
    assert!(
        msg.contains("row data checksum mismatch in chunk 1 (rows 8192..=16383)"),
        "{msg}"
    );
}

#[test]
fn flipped_metadata_is_refused_before_any_answer_and_truncation_on_open() {
    // Open reads only the header: damaged metadata is found by the verification that
    // runs before a segment is first scored, and by `check`.
    let search = |dir: &std::path::Path| {
        let snapshot = gallery::open_snapshot(dir).expect("opening reads only the header");
        biogate::Engine::cpu().search(&snapshot, &[0.5; 40], &biogate::SearchParams { k: 3, threshold: None })
    };
    let (dir, seg) = damaged(|_| {});
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    flip(&seg, len - 4096 - 3); // the chunk checksums, just before the footer
    let msg = corrupt_message(search(dir.path()).err().unwrap());
    assert!(msg.contains("metadata checksum"), "{msg}");
    let msg = corrupt_message(gallery::check(dir.path()).err().unwrap());
    assert!(msg.contains("metadata checksum"), "{msg}");
    // The id table names itself, so a repair knows whether the ids can be read.
    let header: biogate::gallery::format::SegmentHeader =
        bytemuck::pod_read_unaligned(&std::fs::read(&seg).unwrap()[..4096]);
    let (dir, _) = damaged(|p| flip(p, header.subject_bytes_offset as usize + 1));
    let msg = corrupt_message(search(dir.path()).err().unwrap());
    assert!(msg.contains("subject id table"), "{msg}");
    // So is the subject index (each subject's rows), which 1:1 verification reads.
    let (dir, _) = damaged(|p| flip(p, header.subject_rows_offset as usize + 4));
    let msg = corrupt_message(search(dir.path()).err().unwrap());
    assert!(msg.contains("metadata checksum"), "{msg}");
    // The footer (the header's copy) is checked too.
    let (dir, seg) = damaged(|p| flip(p, len - 3));
    let msg = corrupt_message(gallery::open_snapshot(dir.path()).err().unwrap());
    assert!(
        msg.contains(&seg.display().to_string()) && msg.contains("copy at the end"),
        "{msg}"
    );

    for keep in [100u64, 4096, 4096 + 128 * 10, len as u64 - 1] {
        let (dir, seg) = damaged(|_| {});
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let msg = corrupt_message(Gallery::open(dir.path()).err().unwrap());
        assert!(msg.contains("truncated"), "cut at {keep}: {msg}");
    }
}

#[test]
fn a_damaged_or_missing_manifest_is_a_clear_error() {
    let (dir, _) = damaged(|_| {});
    let manifest = dir.path().join("MANIFEST");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"dim\": 40", "\"dim\": 41", 1)).unwrap();
    let msg = corrupt_message(Gallery::open(dir.path()).err().unwrap());
    assert!(msg.contains("MANIFEST") && msg.contains("checksum"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let e = Gallery::open(empty.path()).err().unwrap();
    assert!(
        matches!(e, Error::NotFound(_)) && e.to_string().contains("not a biogate gallery"),
        "{e}"
    );
    assert!(
        !empty.path().join("LOCK").exists(),
        "opening a non-gallery leaves nothing behind"
    );
}

#[test]
fn a_foreign_file_is_not_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bgs");
    std::fs::write(&p, vec![7u8; 8192]).unwrap();
    let msg = corrupt_message(Segment::open(&p).err().unwrap());
    assert!(msg.contains("bad magic"), "{msg}");
}
