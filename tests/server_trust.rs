//! The server under damage, hostile clients and full disks, with real files, a real
//! server on loopback and real clients: each gallery fails alone and is repaired
//! without a restart; damaged rows and files changed under the server take only their
//! gallery out of service (a truncated segment is an error, not a SIGBUS); a flood of
//! silent connections does not lock real clients out; every call is audited with its
//! outcome, and a full disk under the audit log gets truthful answers; racing admin
//! calls get clean answers.
#![cfg(feature = "server")]

mod common;

use biogate::gallery::{Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::server::proto;
use biogate::server::{ServerHandle, start, start_with};
use biogate::storage::{ENOSPC, FaultPlan, Op, Storage};
use biogate::template::Dtype;
use common::server::{DIM, config, connect, create, ids, metric, metrics, tokens};
use common::{random_rows, rng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn gallery_dir(data: &Path, name: &str) -> PathBuf {
    data.join("galleries").join(name)
}

/// A gallery made without a server: one imported segment of 40 subjects and 5 more
/// enrolled through the log. Returns the rows of the segment (subject `{name}-i`).
fn make_gallery(data: &Path, name: &str) -> Vec<f32> {
    let mut g = Gallery::create(&gallery_dir(data, name), DIM, Dtype::F32).unwrap();
    let rows = random_rows(&mut rng(name.len() as u64), 40, DIM);
    let names = ids(name, 40);
    g.import(
        &mut MemoryImport::new(DIM, &rows, &names).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    let more = random_rows(&mut rng(99), 5, DIM);
    let batch: Vec<Enrollment> = (0..5)
        .map(|i| Enrollment {
            subject: format!("{name}-log-{i}"),
            templates: more[i * DIM..(i + 1) * DIM].to_vec(),
        })
        .collect();
    g.enroll(&batch).unwrap();
    rows
}

fn segment_of(data: &Path, name: &str) -> PathBuf {
    std::fs::read_dir(gallery_dir(data, name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bgs"))
        .unwrap()
}

async fn health(h: &ServerHandle, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

async fn info(c: &biogate::client::Client, name: &str) -> Result<proto::GalleryInfo, tonic::Status> {
    c.raw()
        .get_gallery(c.request(proto::GetGalleryRequest { name: name.into() }))
        .await
        .map(|r| r.into_inner())
}

async fn identify(c: &biogate::client::Client, gallery: &str, probe: &[f32]) -> Result<String, tonic::Status> {
    let req = proto::IdentifyRequest {
        gallery: gallery.into(),
        probes: vec![biogate::client::pack(probe)],
        k: 1,
        threshold: None,
        ..Default::default()
    };
    let r = c.raw().identify(c.request(req)).await?.into_inner();
    Ok(r.results[0].candidates[0].subject.clone())
}

/// Poll `check` for up to five seconds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gallery_fails_alone_and_is_repaired_or_dropped_without_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let good = make_gallery(data.path(), "good");
    let bad = make_gallery(data.path(), "bad");
    make_gallery(data.path(), "gone");
    // A flipped byte in one MANIFEST (its copy is intact), a missing log in another.
    let manifest = gallery_dir(data.path(), "bad").join("MANIFEST");
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[30] ^= 0x04;
    std::fs::write(&manifest, bytes).unwrap();
    for e in std::fs::read_dir(gallery_dir(data.path(), "gone")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("wal-") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut cfg = config(data.path());
    cfg.file_check_interval_ms = 50;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;

    // The healthy gallery serves; the others say why they do not.
    assert_eq!(identify(&c, "good", &good[..DIM]).await.unwrap(), "good-00000");
    let b = info(&c, "bad").await.unwrap();
    assert_eq!(b.state, "NOT_SERVING");
    assert!(
        b.reason.contains("MANIFEST") && b.reason.contains("checksum"),
        "{}",
        b.reason
    );
    let g = info(&c, "gone").await.unwrap();
    assert!(g.reason.contains("missing"), "{}", g.reason);
    let listed = c
        .raw()
        .list_galleries(c.request(proto::ListGalleriesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, String)> = listed
        .galleries
        .iter()
        .map(|g| (g.name.clone(), g.state.clone()))
        .collect();
    assert_eq!(
        states,
        [("bad", "NOT_SERVING"), ("gone", "NOT_SERVING"), ("good", "SERVING")].map(|(a, b)| (a.into(), b.into()))
    );
    let e = identify(&c, "bad", &bad[..DIM]).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("\"bad\""), "{}", e.message());
    let e = c.enroll("bad", &bad[..DIM], DIM, &ids("x", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    eventually("per-gallery health", async || {
        health(&h, "biogate.v1.Biogate/bad").await == ServingStatus::NotServing
            && health(&h, "biogate.v1.Biogate/good").await == ServingStatus::Serving
    })
    .await;
    assert_eq!(health(&h, "biogate.v1.Biogate").await, ServingStatus::Serving);

    // Repair restores the manifest from its copy; nothing was lost, and it serves again.
    let r = c
        .raw()
        .repair_gallery(c.request(proto::RepairGalleryRequest { name: "bad".into() }))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.clean && r.lost.is_empty(), "{r:?}");
    assert!(
        r.actions.iter().any(|a| a.contains("restored MANIFEST")),
        "{:?}",
        r.actions
    );
    assert_eq!(r.gallery.unwrap().state, "SERVING");
    assert_eq!(identify(&c, "bad", &bad[5 * DIM..6 * DIM]).await.unwrap(), "bad-00005");
    assert_eq!(info(&c, "bad").await.unwrap().subjects, 45);
    eventually("health after repair", async || {
        health(&h, "biogate.v1.Biogate/bad").await == ServingStatus::Serving
    })
    .await;

    // A gallery whose log is gone: the repair says what is lost; or it can be dropped.
    let r = c
        .raw()
        .repair_gallery(c.request(proto::RepairGalleryRequest { name: "gone".into() }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.lost.iter().any(|l| l.what.contains("log is missing")), "{r:?}");
    c.raw()
        .drop_gallery(c.request(proto::DropGalleryRequest { name: "gone".into() }))
        .await
        .unwrap();
    assert_eq!(info(&c, "gone").await.unwrap_err().code(), Code::NotFound);
    assert!(!gallery_dir(data.path(), "gone").exists());
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_while_serving_stops_only_its_gallery_and_repair_names_the_subjects() {
    let data = tempfile::tempdir().unwrap();
    let a = make_gallery(data.path(), "a");
    let b = make_gallery(data.path(), "b");
    let mut cfg = config(data.path());
    cfg.file_check_interval_ms = 50;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    assert_eq!(identify(&c, "a", &a[..DIM]).await.unwrap(), "a-00000");

    // A byte of a row flipped in place (same file, same length): the file check sees
    // it written, verifies it again and takes the gallery out of service.
    let seg = segment_of(data.path(), "a");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 3 * 256 + 7] ^= 0x20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &bytes[..4096 + 1024], 0))
        .unwrap();
    eventually("the damaged gallery is NOT_SERVING", async || {
        info(&c, "a").await.unwrap().state == "NOT_SERVING"
    })
    .await;
    let e = identify(&c, "a", &a[..DIM]).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("checksum mismatch"), "{}", e.message());
    assert_eq!(
        identify(&c, "b", &b[..DIM]).await.unwrap(),
        "b-00000",
        "the other gallery goes on"
    );

    // The repair drops the damaged chunk's rows and names every subject they held.
    let r = c
        .raw()
        .repair_gallery(c.request(proto::RepairGalleryRequest { name: "a".into() }))
        .await
        .unwrap()
        .into_inner();
    let named: Vec<&str> = r
        .lost
        .iter()
        .filter(|l| l.subject_verified)
        .map(|l| l.subject.as_str())
        .collect();
    assert_eq!(named.len(), 40, "the whole segment is one chunk: {r:?}");
    assert!(named.contains(&"a-00003"));
    assert!(!r.kept_aside.is_empty() && r.kept_aside.iter().all(|k| Path::new(k).exists()));
    let i = info(&c, "a").await.unwrap();
    assert_eq!(
        (i.state.as_str(), i.subjects),
        ("SERVING", 5),
        "the log's subjects remain"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_truncated_under_the_server_is_an_error_not_a_crash() {
    let data = tempfile::tempdir().unwrap();
    let a = make_gallery(data.path(), "a");
    let b = make_gallery(data.path(), "b");
    let mut cfg = config(data.path());
    // Files are not checked between searches here: the search itself meets the cut.
    cfg.file_check_interval_ms = 3_600_000;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    assert_eq!(identify(&c, "a", &a[..DIM]).await.unwrap(), "a-00000");
    let seg = segment_of(data.path(), "a");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let e = identify(&c, "a", &a[..DIM]).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("truncated"), "{}", e.message());
    // The process survived and the other gallery still answers.
    assert_eq!(identify(&c, "b", &b[..DIM]).await.unwrap(), "b-00000");
    assert_eq!(info(&c, "a").await.unwrap().state, "NOT_SERVING");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_does_not_lock_out_real_clients() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_connections = 16;
    cfg.handshake_timeout_ms = 60_000;
    let h = start(cfg).await.unwrap();
    // Ten times the limit of connections that never send a byte.
    let mut silent = Vec::new();
    for _ in 0..160 {
        silent.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = tokio::time::timeout(Duration::from_secs(10), connect(&h, None))
        .await
        .expect("a real client gets in");
    create(&c, "g", "f32").await;
    let rows = random_rows(&mut rng(1), 3, DIM);
    c.enroll("g", &rows, DIM, &ids("s", 3)).await.unwrap();
    assert_eq!(identify(&c, "g", &rows[DIM..2 * DIM]).await.unwrap(), "s-00001");
    let m = metrics(&h).await;
    assert!(
        metric(&m, "biogate_refused_total{reason=\"silent_connection\"}") >= 144.0,
        "{m}"
    );
    assert!(metric(&m, "biogate_connections") <= 16.0, "{m}");
    drop(silent);
    h.shutdown().await.unwrap();

    // A connection that stays silent past the handshake timeout is closed.
    let mut cfg = config(data.path());
    cfg.handshake_timeout_ms = 200;
    let h = start(cfg).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    // The server speaks first (its HTTP/2 settings); then, hearing nothing, it hangs up.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await
            && n > 0
        {}
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was left open");
    h.shutdown().await.unwrap();
}

fn audit_lines(data: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_audited_with_its_outcome_and_never_a_token() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.tokens = tokens();
    let h = start(cfg).await.unwrap();
    let admin = connect(&h, Some("admin-token-0123456789")).await;
    let gate = connect(&h, Some("gate-token-0123456789")).await;
    let nobody = connect(&h, None).await;
    create(&admin, "g", "f32").await;
    let rows = random_rows(&mut rng(2), 2, DIM);
    admin.enroll("g", &rows, DIM, &ids("s", 2)).await.unwrap();
    assert_eq!(identify(&gate, "g", &rows[..DIM]).await.unwrap(), "s-00000");
    assert_eq!(
        identify(&nobody, "g", &rows[..DIM]).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let denied = gate
        .raw()
        .drop_gallery(gate.request(proto::DropGalleryRequest { name: "g".into() }))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        identify(&gate, "nope", &rows[..DIM]).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad = proto::CreateGalleryRequest {
        name: "h".into(),
        dim: 8,
        dtype: "f64".into(),
        ..Default::default()
    };
    let invalid = admin.raw().create_gallery(admin.request(bad)).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    h.shutdown().await.unwrap();

    let lines = audit_lines(data.path());
    let find = |method: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| l["method"] == method && l["outcome"] == outcome && l["phase"] == "done")
            .unwrap_or_else(|| panic!("no {method} {outcome} line in {lines:#?}"))
    };
    assert_eq!(find("Identify", "UNAUTHENTICATED")["caller"], "-");
    assert_eq!(find("Identify", "UNAUTHENTICATED")["code"], 16);
    assert_eq!(find("DropGallery", "PERMISSION_DENIED")["caller"], "gate-A12");
    assert_eq!(find("Identify", "NOT_FOUND")["gallery"], "nope");
    assert!(
        find("CreateGallery", "INVALID_ARGUMENT")["error"]
            .as_str()
            .unwrap()
            .contains("dtype")
    );
    let ok = find("Identify", "ok");
    assert_eq!(
        (&ok["caller"], &ok["subjects"][0][0]),
        (&"gate-A12".into(), &"s-00000".into())
    );
    assert!(ok["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // A write is recorded before it takes effect, then with its outcome.
    let enroll: Vec<&serde_json::Value> = lines.iter().filter(|l| l["method"] == "Enroll").collect();
    assert_eq!(enroll.len(), 2);
    assert_eq!(
        (&enroll[0]["phase"], &enroll[1]["phase"]),
        (&"intent".into(), &"done".into())
    );
    assert_eq!(enroll[0]["subjects"].as_array().unwrap().len(), 2);
    let text = std::fs::read_to_string(data.path().join("audit.log")).unwrap();
    assert!(!text.contains("token-0123456789"), "a token reached the audit log");
}

/// A server whose audit log fails the `nth` write (counting only its writes).
async fn server_with_failing_audit_write(data: &Path, nth: usize) -> ServerHandle {
    let plan = FaultPlan::fail_where(
        |op, path| op == Op::Write && path.ends_with("audit.log"),
        Some(nth),
        ENOSPC,
        false,
    );
    start_with(config(data), Storage::with_faults(plan)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_audit_log_is_answered_truthfully() {
    let rows = random_rows(&mut rng(3), 4, DIM);
    // Audit writes: CreateGallery intent (0) and done (1); Enroll intent (2), done (3);
    // Identify done (4). Cases 2 and 3 enroll one message: a stream's messages are
    // committed in groups as they arrive, each group with its own intent line, so
    // several messages may take more lines than two.
    // 1. The enrollment's intent cannot be written: nothing is enrolled, and the
    //    client is told so.
    let data = tempfile::tempdir().unwrap();
    let h = server_with_failing_audit_write(data.path(), 2).await;
    let c = connect(&h, None).await;
    create(&c, "g", "f32").await;
    let e = c.enroll("g", &rows, DIM, &ids("s", 4)).await.unwrap_err();
    assert!(
        e.code() == Code::ResourceExhausted && e.message().contains("nothing was done"),
        "{e}"
    );
    assert_eq!(info(&c, "g").await.unwrap().subjects, 0);
    h.shutdown().await.unwrap();

    // 2. The enrollment took effect but its outcome line cannot be written: the client
    //    is told the truth (done), the failure is counted.
    let data = tempfile::tempdir().unwrap();
    let h = server_with_failing_audit_write(data.path(), 3).await;
    let c = connect(&h, None).await;
    create(&c, "g", "f32").await;
    let done = c.enroll("g", &rows[..DIM], DIM, &ids("s", 1)).await.unwrap();
    assert_eq!(done.subjects, 1);
    assert_eq!(info(&c, "g").await.unwrap().subjects, 1);
    assert_eq!(metric(&metrics(&h).await, "biogate_audit_failures_total"), 1.0);

    // 3. A search whose line cannot be written: the answer is withheld.
    let data3 = tempfile::tempdir().unwrap();
    let h3 = server_with_failing_audit_write(data3.path(), 4).await;
    let c3 = connect(&h3, None).await;
    create(&c3, "g", "f32").await;
    c3.enroll("g", &rows[..DIM], DIM, &ids("s", 1)).await.unwrap();
    let e = identify(&c3, "g", &rows[..DIM]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("withheld"), "{}", e.message());
    assert_eq!(
        identify(&c3, "g", &rows[..DIM]).await.unwrap(),
        "s-00000",
        "the disk has room again"
    );
    h3.shutdown().await.unwrap();
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_admin_calls_get_clean_answers_and_are_audited_as_they_ended() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    let mut tasks = Vec::new();
    for t in 0..6 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..15 {
                let code = match (t + i) % 4 {
                    0 | 1 => {
                        let req = proto::CreateGalleryRequest {
                            name: "race".into(),
                            dim: DIM as u32,
                            dtype: "f16".into(),
                            ..Default::default()
                        };
                        ("create", c.raw().create_gallery(c.request(req)).await.map(drop))
                    }
                    2 => {
                        let req = proto::DropGalleryRequest { name: "race".into() };
                        ("drop", c.raw().drop_gallery(c.request(req)).await.map(drop))
                    }
                    _ => ("get", info(&c, "race").await.map(drop)),
                };
                codes.push((code.0, code.1.map_or_else(|s| s.code(), |_| Code::Ok)));
            }
            codes
        }));
    }
    let mut creates_ok = 0;
    for t in tasks {
        for (what, code) in t.await.unwrap() {
            assert!(
                matches!(code, Code::Ok | Code::AlreadyExists | Code::NotFound | Code::Aborted),
                "{what}: {code:?}"
            );
            creates_ok += usize::from(what == "create" && code == Code::Ok);
        }
    }
    h.shutdown().await.unwrap();
    let audited_ok = audit_lines(data.path())
        .iter()
        .filter(|l| l["method"] == "CreateGallery" && l["phase"] == "done" && l["outcome"] == "ok")
        .count();
    assert_eq!(
        audited_ok, creates_ok,
        "the audit trail says what the clients were told"
    );
    assert!(creates_ok > 0);
}
