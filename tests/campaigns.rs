//! Long campaigns, run by scripts (not in CI's time): `scripts/kill9-campaign.sh`.
//!
//! kill -9 of a real server process while clients enroll, delete and compact (again
//! and again, so kills land mid-compaction) and the server seals its log (every 40
//! templates), `BIOGATE_TRIALS` times (default 200) on
//! one data directory. After every restart: each acknowledged enrollment is there and
//! is its own best match, each acknowledged deletion stays deleted, and the gallery's
//! checksums all verify. Operations in flight at the kill may land or not.
#![cfg(feature = "cli")]

mod common;

use biogate::client::{Client, ConnectOptions, pack};
use biogate::server::proto;
use common::{random_rows, rng, unit};
use rand::Rng;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DIM: usize = 64;

/// A server process, killed (-9) when dropped, so a failing assertion leaves none behind.
struct Server(Child);

impl Server {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(bin: &str, config: &std::path::Path) -> Server {
    Server(
        Command::new(bin)
            .args(["serve", "--metrics-listen", "off", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn connect(addr: &str) -> Client {
    for _ in 0..400 {
        if let Ok(c) = Client::connect(&ConnectOptions {
            addr: addr.into(),
            ..Default::default()
        })
        .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server did not come up");
}

/// A server configuration in `work` (data in `work/data`, a free loopback port, the CPU
/// backend, a default gallery `g` of `dtype`), with `more` settings (TOML; a table last).
fn server_config(work: &std::path::Path, dtype: &str, more: &str) -> (std::path::PathBuf, u16) {
    let data = work.join("data");
    let port = common::server::free_port();
    let config = work.join("biogate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nlisten = \"127.0.0.1:{port}\"\nbackend = \"cpu\"\n\
             default_gallery = {{ name = \"g\", dim = {DIM}, dtype = \"{dtype}\" }}\n{more}"
        ),
    )
    .unwrap();
    (config, port)
}

/// What the clients were told, per subject: Some(template) enrolled, None deleted.
type Acked = BTreeMap<String, Option<Vec<f32>>>;

#[test]
#[ignore = "a long campaign: scripts/kill9-campaign.sh"]
fn kill9_campaign() {
    let trials = common::env_number("BIOGATE_TRIALS", 200);
    let work = tempfile::tempdir().unwrap();
    let (config, port) = server_config(
        work.path(),
        "i8",
        "seal_log_rows = 40\n[audit]\nrotate_bytes = 1048576\n",
    );
    let data = work.path().join("data");
    let bin = env!("CARGO_BIN_EXE_biogate");
    let addr = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut acked: Acked = BTreeMap::new();
    let mut r = rng(2026);
    let (mut enrolled, mut deleted, mut compactions, mut uncertain) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    for trial in 0..trials {
        let mut server = spawn(bin, &config);
        let c = rt.block_on(connect(&addr));
        let kill_after = Duration::from_millis(r.random_range(20..400));
        let seed = r.random::<u64>();
        let live: Vec<String> = acked
            .iter()
            .filter(|(_, t)| t.is_some())
            .map(|(s, _)| s.clone())
            .collect();
        // Clients run until the server dies under them; they report what was acknowledged.
        let work_done = rt.block_on(async {
            let enroller = {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for batch in 0.. {
                        let n = 1 + (batch % 4);
                        let rows = random_rows(&mut rng(seed ^ batch as u64), n, DIM);
                        let names: Vec<String> = (0..n).map(|i| format!("t{trial}-b{batch}-{i}")).collect();
                        if c.enroll("g", &rows, DIM, &names).await.is_err() {
                            break;
                        }
                        for (i, name) in names.into_iter().enumerate() {
                            done.push((name, Some(rows[i * DIM..(i + 1) * DIM].to_vec())));
                        }
                        tokio::time::sleep(Duration::from_millis(4)).await;
                    }
                    done
                })
            };
            let deleter = {
                let c = c.clone();
                tokio::spawn(async move {
                    let (mut done, mut in_flight) = (Vec::new(), None);
                    for s in live.iter().step_by(17).take(6) {
                        let req = proto::DeleteSubjectRequest {
                            gallery: "g".into(),
                            subject: s.clone(),
                        };
                        match c.raw().delete_subject(c.request(req)).await {
                            Ok(_) => done.push((s.clone(), None)),
                            Err(_) => {
                                // Cut off by the kill: it may or may not have landed.
                                in_flight = Some(s.clone());
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (done, in_flight)
                })
            };
            let compactor = {
                let c = c.clone();
                tokio::spawn(async move {
                    // Compact again and again, so that some kills land mid-compaction.
                    let (mut n, mut pause) = (0, rng(seed).random_range(0..20u64));
                    loop {
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        let req = proto::CompactGalleryRequest { name: "g".into() };
                        if c.raw().compact_gallery(c.request(req)).await.is_err() {
                            return n;
                        }
                        n += 1;
                        pause = (pause * 7 + 13) % 40;
                    }
                })
            };
            tokio::time::sleep(kill_after).await;
            server.kill();
            let e = enroller.await.unwrap();
            let d = deleter.await.unwrap();
            let k = compactor.await.unwrap();
            (e, d, k)
        });
        let (e, (d, in_flight), k) = work_done;
        if let Some(s) = in_flight {
            acked.remove(&s);
            uncertain += 1;
        }
        enrolled += e.len();
        deleted += d.len();
        compactions += k;
        acked.extend(e);
        acked.extend(d);

        // Restart and check everything that was acknowledged.
        let mut server = spawn(bin, &config);
        let c = rt.block_on(connect(&addr));
        let live: Vec<(&String, &Vec<f32>)> = acked.iter().filter_map(|(s, t)| t.as_ref().map(|t| (s, t))).collect();
        for chunk in live.chunks(256) {
            let probes: Vec<f32> = chunk.iter().flat_map(|(_, t)| unit(t)).collect();
            let res = rt.block_on(c.identify("g", &probes, DIM, 1, None)).unwrap();
            for ((name, _), got) in chunk.iter().zip(&res) {
                let top = &got.candidates[0];
                assert!(
                    &top.subject == *name && top.score > 0.99,
                    "trial {trial}: acknowledged {name} lost (top: {top:?})"
                );
            }
        }
        for (name, _) in acked.iter().filter(|(_, t)| t.is_none()) {
            let req = proto::VerifyRequest {
                gallery: "g".into(),
                probe: pack(&[1.0; DIM]),
                subject: name.clone(),
                threshold: None,
            };
            let e = rt.block_on(c.raw().verify(c.request(req))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "trial {trial}: deleted {name} is back");
        }
        server.kill();
        biogate::gallery::check(&data.join("galleries/g")).unwrap_or_else(|e| panic!("trial {trial}: check: {e}"));
        if trial % 20 == 19 {
            eprintln!(
                "trial {}: {enrolled} enrollments and {deleted} deletions acknowledged, {compactions} compactions, \
                 0 lost ({:.0} s)",
                trial + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let info = biogate::gallery::info(&data.join("galleries/g")).unwrap();
    eprintln!(
        "kill -9 campaign: {trials} trials, {enrolled} enrollments and {deleted} deletions acknowledged, \
         {compactions} compactions completed (and in every trial one more call cut off by the kill), \
         {uncertain} deletions cut off by a kill (either outcome allowed), {} segments at the end, \
         0 acknowledged operations lost ({:.0} s)",
        info.segments,
        started.elapsed().as_secs_f64()
    );
}

/// The window after kill -9 in which the last commit group of a log cannot be proven
/// (wal/tail.rs): a real server with `log_idle_ms = 50` enrolls one batch, is killed
/// `d` ms after the answer (d drawn from 0..300), and its log is then cut by one byte.
/// Per delay bucket: how often the cut was refused (the final length was recorded) and
/// how often `check` could only say "cannot tell". `scripts/log-tail-window.sh`.
#[test]
#[ignore = "a long campaign: scripts/log-tail-window.sh"]
fn log_tail_window_campaign() {
    let trials = common::env_number("BIOGATE_TRIALS", 200);
    let bin = env!("CARGO_BIN_EXE_biogate");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut r = rng(7);
    // bucket (ms, 25 wide) -> (proven, cannot tell)
    let mut buckets: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for trial in 0..trials {
        let work = tempfile::tempdir().unwrap();
        let (config, port) = server_config(work.path(), "f32", "log_idle_ms = 50\n");
        let data = work.path().join("data");
        let mut server = spawn(bin, &config);
        let c = rt.block_on(connect(&format!("http://127.0.0.1:{port}")));
        let rows = random_rows(&mut rng(trial as u64), 3, DIM);
        let names: Vec<String> = (0..3).map(|i| format!("s{trial}-{i}")).collect();
        rt.block_on(c.enroll("g", &rows, DIM, &names)).unwrap();
        let delay = r.random_range(0..300u64);
        std::thread::sleep(Duration::from_millis(delay));
        server.kill();
        let dir = data.join("galleries/g");
        let log = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
            .unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let proven = match biogate::gallery::check(&dir) {
            Err(e) => {
                assert!(e.to_string().contains("was cut"), "trial {trial}: {e}");
                true
            }
            Ok(info) => {
                assert!(
                    info.notes.iter().any(|n| n.contains("cannot tell")),
                    "trial {trial}: a cut was accepted in silence: {:?}",
                    info.notes
                );
                false
            }
        };
        let b = buckets.entry(delay / 25 * 25).or_default();
        if proven {
            b.0 += 1;
        } else {
            b.1 += 1;
        }
    }
    eprintln!(
        "log tail window: {trials} trials (log_idle_ms = 50, kill -9 d ms after the last answer, log cut by 1 byte)"
    );
    for (from, (proven, unknown)) in &buckets {
        eprintln!(
            "  d in [{from:3}, {:3}) ms: cut refused {proven:3}, cannot tell {unknown:3}",
            from + 25
        );
    }
}
