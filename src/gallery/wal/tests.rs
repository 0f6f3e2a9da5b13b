//! The log's round trip, torn tails, damage, salvage and failed writes.

use super::format::SECTOR;
use super::*;
use crate::error::Error;
use crate::storage::Storage;
use crate::template::Dtype;
use std::path::Path;

const DIM: usize = 3;

fn header() -> WalHeader {
    WalHeader::expected(42, 1, 10, DIM, Dtype::F32)
}

fn enroll(s: &str, n: usize) -> WalRecord {
    WalRecord::Enroll {
        subject: s.into(),
        templates: (0..n * DIM).map(|i| i as f32 * 0.25 - 1.0).collect(),
    }
}

/// Groups: [a], [b, bob-delete, c], [d].
fn groups() -> Vec<Vec<WalRecord>> {
    vec![
        vec![enroll("alice", 1)],
        vec![
            enroll("bob", 2),
            WalRecord::Delete {
                subject: "bob".into(),
                segments_before: 7,
            },
            enroll("carol", 200),
        ],
        vec![enroll("dave", 1)],
    ]
}

/// Write the groups; returns the file's bytes and each group's end offset. With
/// `crash`, the writer is never closed (as if the process died after the last ack).
fn write_log_with(path: &Path, crash: bool) -> (Vec<u8>, Vec<u64>) {
    let mut w = WalWriter::create(&Storage::default(), path, &header()).unwrap();
    let mut ends = Vec::new();
    for g in groups() {
        w.append(&g).unwrap();
        ends.push(std::fs::metadata(path).unwrap().len());
    }
    if crash {
        std::mem::forget(w);
    } else {
        drop(w);
    }
    (std::fs::read(path).unwrap(), ends)
}

fn write_log(path: &Path) -> (Vec<u8>, Vec<u64>) {
    write_log_with(path, false)
}

#[test]
fn records_round_trip_a_torn_last_group_is_cut_and_a_deeper_cut_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.log");
    let (full, ends) = write_log_with(&path, true);
    let all: Vec<WalRecord> = groups().concat();
    let r = read(&path, &header()).unwrap();
    assert_eq!(r.records, all);
    assert_eq!((r.valid_len, r.next_seq), (full.len() as u64, 15));
    for cut in WAL_HEADER_BYTES as u64..full.len() as u64 {
        std::fs::write(&path, &full[..cut as usize]).unwrap();
        if cut < ends[1] {
            // Groups 1 and 2 were acknowledged before group 3 was written (its ack
            // slot says so): a cut into them is damage, and repair reports it.
            let e = read(&path, &header()).unwrap_err().to_string();
            assert!(e.contains("was cut"), "cut at {cut}: {e}");
            let s = salvage(&path, DIM).unwrap();
            assert!(s.unreadable > 0, "cut at {cut}: {s:?}");
            continue;
        }
        // A cut inside the last group is what a crash leaves: a torn tail.
        let r = read(&path, &header()).unwrap();
        assert_eq!(r.records, groups()[..2].concat(), "cut at {cut}");
        assert_eq!(r.valid_len, ends[1]);
    }
    // After a clean close every cut is recognised.
    let (full, _) = write_log(&path);
    for cut in [WAL_HEADER_BYTES + 1, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        assert!(read(&path, &header()).is_err(), "cut at {cut}");
    }
    let (full, ends) = write_log_with(&path, true);
    // A final group whose pages did not all reach the disk (a zeroed block) is torn
    // too: the log ends with carol's group, written by a process that then died.
    let mut w = WalWriter::create(&Storage::default(), &path, &header()).unwrap();
    w.append(&groups()[0]).unwrap();
    w.append(&groups()[1]).unwrap();
    std::mem::forget(w);
    let mut zeroed = std::fs::read(&path).unwrap();
    assert_eq!(zeroed.len() as u64, ends[1]);
    let carol_body = ends[1] as usize - 200 * DIM * 4 + 1024;
    let block = carol_body.next_multiple_of(SECTOR);
    zeroed[block..block + SECTOR].fill(0);
    std::fs::write(&path, &zeroed).unwrap();
    assert_eq!(read(&path, &header()).unwrap().records, groups()[0]);
    // So is a zero-filled tail after the last group.
    let mut padded = full.clone();
    padded.extend_from_slice(&[0u8; 100]);
    std::fs::write(&path, &padded).unwrap();
    assert_eq!(read(&path, &header()).unwrap().records, all);
}

#[test]
fn a_flipped_byte_anywhere_is_damage_not_a_torn_tail_and_repair_names_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.log");
    let (full, _) = write_log(&path);
    let (mut refused, mut verified) = (0, 0);
    for at in WAL_HEADER_BYTES..full.len() {
        let mut bad = full.clone();
        bad[at] ^= 0x55;
        std::fs::write(&path, &bad).unwrap();
        match read(&path, &header()) {
            Ok(r) => panic!("flip at {at} accepted with {} records", r.records.len()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("wal.log") && msg.contains("offset"), "{msg}");
                refused += 1;
            }
        }
        let s = salvage(&path, DIM).unwrap();
        let all = groups().concat();
        // Nothing invented: every kept record is one that was written.
        for r in &s.records {
            assert!(all.contains(r), "flip at {at}: invented {r:?}");
        }
        // Every record is kept or accounted for as lost.
        assert_eq!(s.torn_bytes, 0, "flip at {at}");
        assert_eq!(
            s.records.len() + s.lost.len() + s.unreadable as usize,
            5,
            "flip at {at}: {s:?}"
        );
        // A verified name is right: a subject whose record was not kept.
        for l in s.lost.iter().filter(|l| l.subject_verified) {
            let name = l.subject.as_deref().unwrap();
            assert!(
                all.iter().any(|r| r.subject() == name && !s.records.contains(r)),
                "flip at {at}: {name} named but not lost"
            );
        }
        if s.lost.iter().all(|l| l.subject_verified) {
            verified += 1;
        }
    }
    // Only a flip inside a key (tag, mark, subject id) or in its checksum leaves the
    // subject unverifiable (it is then reported as a guess).
    let key_bytes: usize = groups()
        .concat()
        .iter()
        .map(|r| 1 + r.subject().len() + if matches!(r, WalRecord::Delete { .. }) { 8 } else { 0 } + 4)
        .sum();
    assert_eq!(verified, full.len() - WAL_HEADER_BYTES - key_bytes);
    assert_eq!(refused, full.len() - WAL_HEADER_BYTES);
    // A body flip names its subject from the checksummed key.
    let mut bad = full.clone();
    bad[full.len() - 3] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let s = salvage(&path, DIM).unwrap();
    assert_eq!(s.lost.len(), 1);
    assert_eq!(s.lost[0].subject.as_deref(), Some("dave"));
    assert!(s.lost[0].subject_verified);
}

#[test]
fn the_header_is_checked_and_a_missing_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.log");
    write_log(&path);
    let other = WalHeader {
        gallery_id: 43,
        ..header()
    };
    assert!(read(&path, &other).unwrap_err().to_string().contains("another gallery"));
    let renamed = WalHeader { log_id: 2, ..header() };
    assert!(read(&path, &renamed).unwrap_err().to_string().contains("log 1 where"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        read(&path, &header())
            .unwrap_err()
            .to_string()
            .contains("header checksum")
    );
    // Salvage still reads the records, numbering from the first one it finds.
    assert_eq!(salvage(&path, DIM).unwrap().records, groups().concat());
    std::fs::remove_file(&path).unwrap();
    let e = read(&path, &header()).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt(_)) && e.to_string().contains("missing"),
        "{e}"
    );
}

#[test]
fn a_failed_append_leaves_nothing_and_a_failed_fsync_poisons_the_writer() {
    use crate::storage::{ENOSPC, FaultPlan};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.log");
    // create: Create, Write, Sync; then append: Write (records), Write (ack slot), Sync.
    for (fault, poisons) in [(3usize, false), (4, false), (5, true)] {
        let plan = FaultPlan::fail(fault, ENOSPC, false);
        let mut w = WalWriter::create(&Storage::with_faults(plan), &path, &header()).unwrap();
        assert!(w.append(&[enroll("a", 1)]).is_err());
        let r = read(&path, &header()).unwrap();
        assert!(r.records.is_empty() && r.torn_bytes() == 0, "fault {fault}");
        assert_eq!(w.poisoned().is_some(), poisons, "fault {fault}");
        let again = w.append(&[enroll("b", 1)]);
        assert_eq!(again.is_err(), poisons, "fault {fault}");
    }
}
