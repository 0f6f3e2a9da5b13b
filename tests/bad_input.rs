//! Bad input gets a clear error naming what was wrong, and changes nothing: not the
//! search results, not a byte of the gallery directory.

mod common;

use biogate::gallery::{self, Enrollment, Gallery, ImportOptions};
use biogate::npy::{MemoryImport, NpyImport, write_ids, write_matrix};
use biogate::template::Dtype;
use biogate::{Engine, Error, SearchParams};
use common::{random_rows, rng};
use std::collections::BTreeMap;
use std::path::Path;

const DIM: usize = 24;

/// Every file in the directory with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn setup() -> (tempfile::TempDir, Gallery, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gallery::create(dir.path(), DIM, Dtype::F32).unwrap();
    let data = random_rows(&mut rng(2), 10, DIM);
    let ids: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    g.import(
        &mut MemoryImport::new(DIM, &data[..8 * DIM], &ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    g.enroll(&[Enrollment {
        subject: "t".into(),
        templates: data[8 * DIM..].to_vec(),
    }])
    .unwrap();
    (dir, g, data)
}

fn expect_invalid(r: Result<impl std::fmt::Debug, Error>, needle: &str) {
    match r {
        Err(Error::InvalidInput(m)) => assert!(m.contains(needle), "message {m:?} should name {needle:?}"),
        other => panic!("expected invalid input naming {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_enrollments_are_refused_and_change_nothing() {
    let (dir, mut g, data) = setup();
    let before = contents(dir.path());
    let snap = g.snapshot();
    let good = data[..DIM].to_vec();
    let mut nan = good.clone();
    nan[5] = f32::NAN;
    let mut inf = good.clone();
    inf[0] = f32::INFINITY;
    let cases: Vec<(Vec<Enrollment>, &str)> = vec![
        (vec![], "empty"),
        (
            vec![Enrollment {
                subject: "x".into(),
                templates: good[..DIM - 1].to_vec(),
            }],
            "dimension 24",
        ),
        (
            vec![Enrollment {
                subject: "x".into(),
                templates: vec![],
            }],
            "no templates",
        ),
        (
            vec![Enrollment {
                subject: "x".into(),
                templates: nan,
            }],
            "component 5",
        ),
        (
            vec![Enrollment {
                subject: "x".into(),
                templates: inf,
            }],
            "non-finite",
        ),
        (
            vec![Enrollment {
                subject: "x".into(),
                templates: vec![0.0; DIM],
            }],
            "zero vector",
        ),
        (
            vec![Enrollment {
                subject: "".into(),
                templates: good.clone(),
            }],
            "1 to 128 bytes",
        ),
        (
            vec![Enrollment {
                subject: "y".repeat(129),
                templates: good.clone(),
            }],
            "129 bytes",
        ),
        // One bad enrollment in a batch: the good one before it is not applied either.
        (
            vec![
                Enrollment {
                    subject: "ok".into(),
                    templates: good.clone(),
                },
                Enrollment {
                    subject: "bad".into(),
                    templates: vec![0.0; DIM],
                },
            ],
            "enrollment 1 (subject \"bad\")",
        ),
    ];
    for (batch, needle) in cases {
        expect_invalid(g.enroll(&batch), needle);
    }
    match g.delete_subject("nobody") {
        Err(Error::NotFound(m)) => assert!(m.contains("nobody")),
        other => panic!("{other:?}"),
    }
    assert_eq!(contents(dir.path()), before, "the directory is byte-for-byte unchanged");
    assert!(!g.snapshot().has_subject("ok"));
    assert_eq!(g.snapshot().live_rows(), snap.live_rows());
}

#[test]
fn bad_searches_are_refused() {
    let (_dir, g, data) = setup();
    let e = Engine::cpu();
    let s = g.snapshot();
    let p = |k, threshold| SearchParams { k, threshold };
    let probe = &data[..DIM];
    expect_invalid(e.search(&s, &[], &p(5, None)), "empty");
    expect_invalid(
        e.search(&s, &data[..DIM + 3], &p(5, None)),
        "not a multiple of the gallery dimension 24",
    );
    expect_invalid(e.search(&s, probe, &p(0, None)), "k = 0");
    expect_invalid(e.search(&s, probe, &p(1_000_000, None)), "k = 1000000");
    expect_invalid(e.search(&s, probe, &p(5, Some(1.5))), "threshold 1.5");
    expect_invalid(e.search(&s, probe, &p(5, Some(f32::NAN))), "threshold NaN");
    let mut two = data[..2 * DIM].to_vec();
    two[DIM + 3] = f32::NAN;
    expect_invalid(e.search(&s, &two, &p(5, None)), "probe 1 has a non-finite value");
    expect_invalid(e.search(&s, &[0.0; DIM], &p(5, None)), "probe 0 is a zero vector");
}

#[test]
fn bad_imports_are_refused_and_leave_nothing_behind() {
    let (dir, mut g, data) = setup();
    let work = tempfile::tempdir().unwrap();
    let before = contents(dir.path());
    let rows = 5000;
    let fresh = random_rows(&mut rng(8), rows, DIM);
    let ids: Vec<String> = (0..rows).map(|i| format!("new{i}")).collect();

    // Duplicate: importing subjects that are already enrolled (the same file twice).
    let dup_ids: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    match g.import(
        &mut MemoryImport::new(DIM, &data[..8 * DIM], &dup_ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    ) {
        Err(Error::AlreadyExists(m)) => assert!(m.contains("\"s0\"") && m.contains("--add-to-existing"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A NaN deep in the file, after thousands of good rows were already streamed out.
    let mut bad = fresh.clone();
    bad[4321 * DIM + 7] = f32::NAN;
    write_matrix(&work.path().join("bad.npy"), DIM, &bad).unwrap();
    write_ids(&work.path().join("ids.txt"), &ids).unwrap();
    let mut src = NpyImport::open(&work.path().join("bad.npy"), &work.path().join("ids.txt")).unwrap();
    expect_invalid(
        g.import(&mut src, ImportOptions::default(), &|_| {}),
        "bad.npy row 4321",
    );
    // Wrong dimension.
    write_matrix(&work.path().join("wide.npy"), DIM + 1, &fresh[..10 * (DIM + 1)]).unwrap();
    let mut src = NpyImport::open(&work.path().join("wide.npy"), &work.path().join("ids.txt")).unwrap();
    expect_invalid(g.import(&mut src, ImportOptions::default(), &|_| {}), "dimension 25");
    // Fewer ids than rows; more ids than rows.
    write_matrix(&work.path().join("ok.npy"), DIM, &fresh).unwrap();
    write_ids(&work.path().join("short.txt"), &ids[..100]).unwrap();
    let mut src = NpyImport::open(&work.path().join("ok.npy"), &work.path().join("short.txt")).unwrap();
    expect_invalid(
        g.import(&mut src, ImportOptions::default(), &|_| {}),
        "short.txt has 100 lines",
    );
    let mut long = ids.clone();
    long.push("extra".into());
    write_ids(&work.path().join("long.txt"), &long).unwrap();
    let mut src = NpyImport::open(&work.path().join("ok.npy"), &work.path().join("long.txt")).unwrap();
    expect_invalid(g.import(&mut src, ImportOptions::default(), &|_| {}), "1 more lines");
    // An empty file and a file that is not .npy.
    write_matrix(&work.path().join("empty.npy"), DIM, &[]).unwrap();
    write_ids(&work.path().join("none.txt"), &[]).unwrap();
    let mut src = NpyImport::open(&work.path().join("empty.npy"), &work.path().join("none.txt")).unwrap();
    expect_invalid(g.import(&mut src, ImportOptions::default(), &|_| {}), "no templates");
    std::fs::write(work.path().join("junk.npy"), b"hello").unwrap();
    expect_invalid(
        NpyImport::open(&work.path().join("junk.npy"), &work.path().join("ids.txt")).map(|_| ()),
        "not a valid .npy",
    );

    assert_eq!(
        contents(dir.path()),
        before,
        "no segment, temporary file or manifest change"
    );
    // And the good file imports afterwards.
    let mut src = NpyImport::open(&work.path().join("ok.npy"), &work.path().join("ids.txt")).unwrap();
    assert_eq!(
        g.import(&mut src, ImportOptions::default(), &|_| {}).unwrap().rows,
        rows as u64
    );
}

#[test]
fn a_second_writer_gets_a_clear_error() {
    let (dir, g, _) = setup();
    match Gallery::open(dir.path()) {
        Err(Error::Locked(m)) => assert!(m.contains(&dir.path().display().to_string())),
        other => panic!("expected Locked, got {:?}", other.err()),
    }
    match Gallery::create(dir.path(), DIM, Dtype::F32) {
        Err(Error::Locked(_)) | Err(Error::AlreadyExists(_)) => {}
        other => panic!("{:?}", other.err()),
    }
    // Another process (the CLI) is refused too, and changes nothing.
    let before = contents(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args(["gallery", "delete"])
        .arg(dir.path())
        .args(["--subject", "s1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked by another writer"));
    assert_eq!(contents(dir.path()), before);
    // Readers do not need the lock.
    assert_eq!(gallery::info(dir.path()).unwrap().subjects, 9);
    drop(g);
    Gallery::open(dir.path()).unwrap();
    // Creating over an existing gallery is refused.
    match Gallery::create(dir.path(), DIM, Dtype::F32) {
        Err(Error::AlreadyExists(_)) => {}
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn ids_that_look_the_same_are_one_subject_and_ids_that_hide_characters_are_refused() {
    let (dir, mut g, data) = setup();
    // "José" with a combining accent, then precomposed: one subject, two templates.
    let decomposed = "jose\u{301}-77";
    let precomposed = "jos\u{e9}-77";
    g.enroll(&[Enrollment {
        subject: decomposed.into(),
        templates: data[..DIM].to_vec(),
    }])
    .unwrap();
    g.enroll(&[Enrollment {
        subject: precomposed.into(),
        templates: data[DIM..2 * DIM].to_vec(),
    }])
    .unwrap();
    let snapshot = g.snapshot();
    assert!(snapshot.has_subject(precomposed));
    assert_eq!(snapshot.live_subjects(), 9 + 1);
    let r = Engine::cpu()
        .search(&snapshot, &data[..DIM], &SearchParams { k: 1, threshold: None })
        .unwrap();
    assert_eq!(
        r[0].candidates[0].subject, precomposed,
        "answers carry the canonical form"
    );
    assert!(
        Engine::cpu()
            .verify(&snapshot, &data[DIM..2 * DIM], decomposed)
            .unwrap()
            .unwrap()
            > 0.999
    );
    // Deleting by either form deletes the one subject.
    g.delete_subject(decomposed).unwrap();
    assert!(!g.snapshot().has_subject(precomposed));

    // Characters that change how an id displays are refused, naming the character and
    // where it is, and nothing changes.
    let before = contents(dir.path());
    for (id, what, at) in [
        ("AB\u{202e}DC-1", "bidirectional", 2),
        ("\u{2066}passport-9", "bidirectional", 0),
        ("p\u{200b}4411", "invisible", 1),
        ("x\u{7}y", "control", 1),
        ("trailing\u{feff}", "invisible", 8),
    ] {
        let e = g
            .enroll(&[Enrollment {
                subject: id.into(),
                templates: data[..DIM].to_vec(),
            }])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(what) && e.contains(&format!("at character {at}")),
            "{id:?}: {e}"
        );
        assert!(matches!(g.delete_subject(id), Err(Error::InvalidInput(_))), "{id:?}");
    }
    assert_eq!(contents(dir.path()), before);
}
