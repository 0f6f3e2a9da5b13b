//! The border workflow: flight galleries derived from a master gallery by a manifest.

mod common;

use biogate::gallery::derive::check_subject_list;
use biogate::gallery::{self, Gallery};
use biogate::template::Dtype;
use biogate::{Engine, SearchParams};
use common::{build, copy_dir, random_rows, rng};

const DIM: usize = 20;

/// A derived gallery answers exactly as the master with every other subject deleted:
/// same candidates, same scores bit for bit, same tie order; for every dtype, from a
/// master with segments, a log and deletions.
#[test]
fn a_derived_gallery_answers_as_the_master_restricted_to_its_subjects() {
    for dtype in Dtype::ALL {
        let work = tempfile::tempdir().unwrap();
        let (mut master, _) = build(&work.path().join("master"), DIM, dtype, 600, 3);
        master.seal_log().unwrap();
        let everyone: Vec<String> = {
            let mut s: Vec<String> = master
                .snapshot()
                .each_live_row()
                .map(|(_, r)| r.subject.to_owned())
                .collect();
            s.sort();
            s.dedup();
            s
        };
        // The manifest: every third subject, one deleted from the master, two unknown.
        let mut manifest: Vec<String> = everyone.iter().step_by(3).cloned().collect();
        master.delete_subject(&manifest[1]).unwrap();
        let gone = manifest[1].clone();
        manifest.push("not-enrolled-1".into());
        manifest.insert(0, "not-enrolled-0".into());
        let (flight, report) = Gallery::derive(
            &master.snapshot(),
            &work.path().join("flight"),
            &manifest,
            Default::default(),
        )
        .unwrap();
        assert_eq!(
            report.missing,
            vec!["not-enrolled-0".to_string(), gone.clone(), "not-enrolled-1".into()]
        );
        assert_eq!(report.subjects as usize, manifest.len() - 3);
        // The master restricted: a copy with every other subject deleted.
        drop(master);
        copy_dir(&work.path().join("master"), &work.path().join("restricted"));
        let mut restricted = Gallery::open(&work.path().join("restricted")).unwrap();
        for s in everyone.iter().filter(|s| !manifest.contains(s) && **s != gone) {
            restricted.delete_subject(s).unwrap();
        }
        let probes = random_rows(&mut rng(8), 8, DIM);
        for params in [
            SearchParams { k: 1, threshold: None },
            SearchParams { k: 15, threshold: None },
            SearchParams {
                k: 200,
                threshold: Some(0.1),
            },
        ] {
            let want = Engine::cpu().search(&restricted.snapshot(), &probes, &params).unwrap();
            let got = Engine::cpu().search(&flight.snapshot(), &probes, &params).unwrap();
            assert_eq!(got, want, "{dtype} {params:?}");
        }
        assert_eq!(flight.snapshot().counts(), restricted.snapshot().counts());
        drop(flight);
        gallery::check(&work.path().join("flight")).unwrap();
    }
}

#[test]
fn a_bad_manifest_is_refused_naming_the_entry_and_creates_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (master, _) = build(&work.path().join("master"), DIM, Dtype::I8, 90, 4);
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = check_subject_list(&ids(&["a", "b", "a"])).err().unwrap().to_string();
    assert!(e.contains("entry 2") && e.contains("repeats entry 0"), "{e}");
    let e = check_subject_list(&ids(&["a", ""])).err().unwrap().to_string();
    assert!(e.contains("entry 1"), "{e}");
    let dst = work.path().join("flight");
    let e = Gallery::derive(&master.snapshot(), &dst, &ids(&["x", "x"]), Default::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("repeats"), "{e}");
    assert!(!dst.exists(), "nothing created");
    // Nobody on the list is enrolled: an empty gallery, every name listed as missing.
    let (g, report) = Gallery::derive(&master.snapshot(), &dst, &ids(&["x", "y"]), Default::default()).unwrap();
    assert_eq!((report.subjects, report.missing.len()), (0, 2));
    assert_eq!(g.snapshot().live_rows(), 0);
}
