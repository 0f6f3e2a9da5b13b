//! The end of the log: after a clean stop (a library close, a server's SIGTERM, even
//! one that lands during a background scrub) no cut of any length is accepted; after a
//! crash, only a crash within `log_idle_ms` of the last write leaves the last commit
//! group unprovable, `check` then says "cannot tell", and the bytes the writer cuts are
//! kept in `damaged/`.

mod common;

use biogate::gallery::{self, Enrollment, Gallery};
use biogate::template::Dtype;
use common::{copy_dir, random_rows, rng};
use std::path::{Path, PathBuf};

const DIM: usize = 24;

fn wal_path(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("wal-"))
        .unwrap()
}

/// A gallery with a sealed segment and five commit groups of different sizes in its
/// log (the last a deletion); returns it and the log's length after each group.
fn gallery_with_groups(dir: &Path) -> (Gallery, Vec<u64>) {
    let mut g = Gallery::create(dir, DIM, Dtype::I8).unwrap();
    let data = random_rows(&mut rng(23), 40, DIM);
    let enrollment = |s: &str, rows: std::ops::Range<usize>| Enrollment {
        subject: s.into(),
        templates: data[rows.start * DIM..rows.end * DIM].to_vec(),
    };
    g.enroll(&[enrollment("sealed-1", 0..2), enrollment("sealed-2", 2..3)])
        .unwrap();
    g.seal_log().unwrap();
    let mut ends = vec![std::fs::metadata(wal_path(dir)).unwrap().len()];
    let groups: Vec<Vec<Enrollment>> = vec![
        (0..7).map(|i| enrollment(&format!("t-{i}"), 3 + i..4 + i)).collect(),
        vec![enrollment("u-0", 10..13)],
        (0..3)
            .map(|i| enrollment(&format!("v-{i}"), 13 + 2 * i..15 + 2 * i))
            .collect(),
        (0..11).map(|i| enrollment(&format!("w-{i}"), 19 + i..20 + i)).collect(),
    ];
    for group in &groups {
        g.enroll(group).unwrap();
        ends.push(std::fs::metadata(wal_path(dir)).unwrap().len());
    }
    g.delete_subject("sealed-2").unwrap();
    ends.push(std::fs::metadata(wal_path(dir)).unwrap().len());
    (g, ends)
}

fn cut_copy(dir: &Path, len: u64) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir, copy.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(wal_path(copy.path()))
        .unwrap()
        .set_len(len)
        .unwrap();
    copy
}

fn tails_kept(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("damaged"))
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().contains(".tail-at-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn after_a_clean_close_every_cut_inside_the_last_three_groups_is_refused() {
    for close in ["close", "drop"] {
        let dir = tempfile::tempdir().unwrap();
        let (g, ends) = gallery_with_groups(dir.path());
        match close {
            "close" => g.close().unwrap(),
            _ => drop(g),
        }
        let full = *ends.last().unwrap();
        let from = ends[ends.len() - 4];
        let mut accepted = Vec::new();
        for len in from..full {
            let copy = cut_copy(dir.path(), len);
            let opened = Gallery::open(copy.path());
            let checked = gallery::check(copy.path());
            let read = gallery::open_snapshot(copy.path());
            if opened.is_ok() || checked.is_ok() || read.is_ok() {
                accepted.push(len);
                continue;
            }
            let e = opened.err().unwrap().to_string();
            assert!(e.contains("was cut"), "{close}, cut to {len}: {e}");
        }
        assert!(
            accepted.is_empty(),
            "{close}: {} cuts of {} accepted, e.g. {:?}",
            accepted.len(),
            full - from,
            &accepted[..accepted.len().min(5)]
        );
        // The whole gallery, uncut, opens and checks clean.
        Gallery::open(dir.path()).unwrap().close().unwrap();
        assert!(gallery::check(dir.path()).unwrap().notes.is_empty());
    }
}

#[test]
fn after_a_crash_only_the_last_group_is_unprovable_check_says_so_and_its_bytes_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (g, ends) = gallery_with_groups(dir.path());
    // The process dies here: its final length never recorded.
    std::mem::forget(g);
    let full = *ends.last().unwrap();
    let last = ends[ends.len() - 2];
    for len in ends[ends.len() - 4]..full {
        let copy = cut_copy(dir.path(), len);
        if len < last {
            // Inside an earlier group: the ack slot written with the last group proves
            // that group was acknowledged, so this is a cut.
            let e = Gallery::open(copy.path()).err().expect("refused").to_string();
            assert!(e.contains("was cut"), "cut to {len}: {e}");
            continue;
        }
        let info = gallery::check(copy.path()).unwrap();
        assert!(
            info.notes.iter().any(|n| n.contains("cannot tell")),
            "cut to {len}: {:?}",
            info.notes
        );
        let g = Gallery::open(copy.path()).unwrap();
        // The deletion of the last group is lost (unacknowledged or cut: unknowable);
        // everything before it is there.
        assert!(g.snapshot().has_subject("sealed-2") && g.snapshot().has_subject("w-10"));
        g.close().unwrap();
        let kept = tails_kept(copy.path());
        if len > last {
            assert_eq!(kept.len(), 1, "cut to {len}");
            let original = std::fs::read(wal_path(dir.path())).unwrap();
            assert_eq!(
                std::fs::read(&kept[0]).unwrap(),
                original[last as usize..len as usize],
                "cut to {len}"
            );
        } else {
            assert!(kept.is_empty(), "cut to {len}");
        }
        // Once the writer has opened and closed it, the log's length is proven again.
        assert!(gallery::check(copy.path()).unwrap().notes.is_empty(), "cut to {len}");
    }
}

#[test]
fn a_recorded_final_length_closes_the_window_even_without_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, ends) = gallery_with_groups(dir.path());
    assert!(!g.log_length_recorded());
    g.record_log_length().unwrap();
    assert!(g.log_length_recorded());
    std::mem::forget(g); // a crash after the log went idle and its length was recorded
    let full = *ends.last().unwrap();
    for len in [full - 1, ends[ends.len() - 2], ends[ends.len() - 2] + 40] {
        let copy = cut_copy(dir.path(), len);
        let e = Gallery::open(copy.path()).err().expect("refused").to_string();
        assert!(e.contains("was cut"), "cut to {len}: {e}");
    }
}

#[cfg(feature = "cli")]
mod server {
    use super::*;
    use biogate::client::{Client, ConnectOptions};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use common::server::free_port;

    fn serve(data: &Path, port: u16, extra: &str) -> Child {
        let config = data.join("test.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"off\"\nbackend = \"cpu\"\nseal_log_rows = 200\n{extra}\n"
            ),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_biogate"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    async fn client(port: u16) -> Client {
        for _ in 0..400 {
            let options = ConnectOptions {
                addr: format!("http://127.0.0.1:{port}"),
                ..Default::default()
            };
            if let Ok(c) = Client::connect(&options).await
                && c.list_galleries().await.is_ok()
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not come up");
    }

    /// A gallery with a sealed segment (250 subjects) and then two acknowledged Enroll
    /// calls of 7 subjects each in its log.
    async fn enroll_two_calls(c: &Client) {
        c.create_gallery("g", DIM as u32, "f32").await.unwrap();
        let data = random_rows(&mut rng(7), 264, DIM);
        let ids: Vec<String> = (0..264).map(|i| format!("s-{i:04}")).collect();
        c.enroll("g", &data[..250 * DIM], DIM, &ids[..250]).await.unwrap();
        for call in 0..2 {
            let at = 250 + 7 * call;
            c.enroll("g", &data[at * DIM..(at + 7) * DIM], DIM, &ids[at..at + 7])
                .await
                .unwrap();
        }
    }

    fn stop(mut child: Child, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        if signal == libc::SIGTERM {
            assert!(status.success(), "a clean stop exits 0: {status:?}");
        }
    }

    fn gallery_dir(data: &Path) -> PathBuf {
        data.join("galleries").join("g")
    }

    /// Cut the log by 1 byte and by the whole last group's length less one: what a
    /// gallery opened afterwards says.
    fn cuts_refused(data: &Path) -> Vec<(u64, bool)> {
        let dir = gallery_dir(data);
        let full = std::fs::metadata(wal_path(&dir)).unwrap().len();
        [1u64, 100, 1500]
            .into_iter()
            .map(|cut| {
                let copy = cut_copy(&dir, full - cut);
                let refused = Gallery::open(copy.path())
                    .err()
                    .is_some_and(|e| e.to_string().contains("was cut"));
                (cut, refused)
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_stopped_by_sigterm_during_a_scrub_records_its_final_length() {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        // No idle recording: only the clean stop can record the length. A scrub runs
        // every second, slowly, so the stop lands while one is reading.
        let child = serve(
            data.path(),
            port,
            "log_idle_ms = 0\nscrub_interval_s = 1\nscrub_mb_per_s = 1",
        );
        let c = client(port).await;
        enroll_two_calls(&c).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        stop(child, libc::SIGTERM);
        for (cut, refused) in cuts_refused(data.path()) {
            assert!(refused, "a cut of {cut} bytes after a clean stop was accepted");
        }
        // A restarted server holds all 264 subjects.
        let child = serve(data.path(), port, "");
        let c = client(port).await;
        assert_eq!(c.get_gallery("g").await.unwrap().subjects, 264);
        stop(child, libc::SIGTERM);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_kill_9_a_log_idle_for_a_moment_is_proven_and_one_killed_at_once_is_not() {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = serve(data.path(), port, "log_idle_ms = 50");
        let c = client(port).await;
        enroll_two_calls(&c).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop(child, libc::SIGKILL);
        for (cut, refused) in cuts_refused(data.path()) {
            assert!(
                refused,
                "a cut of {cut} bytes after an idle log was killed was accepted"
            );
        }
        // Without idle recording, a kill right after the last write leaves the last
        // group unprovable: a cut inside it is cut again, and `check` says so.
        let data = tempfile::tempdir().unwrap();
        let child = serve(data.path(), port, "log_idle_ms = 0");
        let c = client(port).await;
        enroll_two_calls(&c).await;
        stop(child, libc::SIGKILL);
        let dir = gallery_dir(data.path());
        let full = std::fs::metadata(wal_path(&dir)).unwrap().len();
        let copy = cut_copy(&dir, full - 1);
        let info = gallery::check(copy.path()).unwrap();
        assert!(info.notes.iter().any(|n| n.contains("cannot tell")), "{:?}", info.notes);
    }
}
