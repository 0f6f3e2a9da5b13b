//! The gRPC server on loopback with a real client: read-your-writes per gallery,
//! answers equal to the engine's, concurrency equal to sequential with batching
//! visible in the metrics, auth and mTLS refusals, bad input, health and graceful
//! shutdown, and kill -9 of a server process mid-enroll.
#![cfg(feature = "cli")]

mod common;

use biogate::client::{Client, ConnectOptions, pack};
use biogate::engine::BackendChoice;
use biogate::gallery;
use biogate::server::config::{Config, TlsConfig};
use biogate::server::proto;
use biogate::server::start;
use biogate::{Engine, SearchParams};
use common::server::{DIM, config, connect, create, ids, metric, metrics, tokens};
use common::{random_rows, rng, unit};
use rand::Rng;
use std::time::Duration;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_per_gallery_and_answers_equal_the_engine() {
    read_your_writes_on(BackendChoice::Cpu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_the_gpu_backend() {
    // Enrollments reach the GPU's resident copy before the next request; answers and
    // Verify (always on the CPU) agree bit for bit on the i8 gallery.
    read_your_writes_on(BackendChoice::Gpu).await;
}

async fn read_your_writes_on(backend: BackendChoice) {
    let data = tempfile::tempdir().unwrap();
    let h = match start(Config {
        backend,
        ..config(data.path())
    })
    .await
    {
        Ok(h) => h,
        Err(e) if backend == BackendChoice::Gpu && e.to_string().contains("no GPU adapter") => {
            assert_ne!(
                std::env::var("BIOGATE_REQUIRE_GPU").as_deref(),
                Ok("1"),
                "BIOGATE_REQUIRE_GPU=1: {e}"
            );
            eprintln!("NOTICE: no GPU adapter; GPU server test skipped");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let c = connect(&h, None).await;
    create(&c, "flight-LH123", "f32").await;
    create(&c, "watchlist", "i8").await;
    let mut r = rng(1);
    for (gallery, prefix) in [("flight-LH123", "pax"), ("watchlist", "wl")] {
        for round in 0..3 {
            let rows = random_rows(&mut r, 20, DIM);
            let names = ids(&format!("{prefix}{round}"), 20);
            let e = c.enroll(gallery, &rows, DIM, &names).await.unwrap();
            assert_eq!((e.subjects, e.templates), (20, 20));
            // The very next request sees every one of them.
            let res = c.identify(gallery, &rows, DIM, 1, None).await.unwrap();
            for (i, p) in res.iter().enumerate() {
                assert_eq!(p.candidates[0].subject, names[i], "{gallery} round {round} probe {i}");
            }
        }
    }
    // Each gallery holds exactly its own 60 enrollments.
    for gallery in ["flight-LH123", "watchlist"] {
        let info = c
            .raw()
            .get_gallery(c.request(proto::GetGalleryRequest { name: gallery.into() }))
            .await
            .unwrap();
        let info = info.into_inner();
        assert_eq!((info.rows, info.subjects), (60, 60), "{gallery}");
    }
    // Server answers equal the engine's own answers on the same data.
    let probes = random_rows(&mut r, 7, DIM);
    for gallery in ["flight-LH123", "watchlist"] {
        let served = c.identify(gallery, &probes, DIM, 10, Some(-0.5)).await.unwrap();
        let snapshot = gallery::open_snapshot(&data.path().join("galleries").join(gallery)).unwrap();
        let local = Engine::cpu()
            .search(
                &snapshot,
                &probes,
                &SearchParams {
                    k: 10,
                    threshold: Some(-0.5),
                },
            )
            .unwrap();
        for (s, l) in served.iter().zip(&local) {
            let s: Vec<(&str, f32)> = s.candidates.iter().map(|c| (c.subject.as_str(), c.score)).collect();
            let l: Vec<(&str, f32)> = l.candidates.iter().map(|c| (c.subject.as_str(), c.score)).collect();
            if backend == BackendChoice::Gpu && gallery == "flight-LH123" {
                // f32 on the GPU: the same list, scores within 1e-5 of the CPU's.
                assert_eq!(s.len(), l.len(), "{gallery}");
                for (a, b) in s.iter().zip(&l) {
                    assert!(a.0 == b.0 && (a.1 - b.1).abs() <= 1e-5, "{gallery}: {a:?} vs {b:?}");
                }
            } else {
                assert_eq!(s, l, "{gallery}");
            }
        }
    }
    // Verify agrees with identify's score for the same pair.
    let row = random_rows(&mut r, 1, DIM);
    let first = c.identify("watchlist", &row, DIM, 1, None).await.unwrap();
    let best = &first[0].candidates[0];
    let v = c
        .raw()
        .verify(c.request(proto::VerifyRequest {
            gallery: "watchlist".into(),
            probe: pack(&row),
            subject: best.subject.clone(),
            threshold: Some(best.score),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.score, v.decided, v.matched), (best.score, true, true));
    let list = c
        .raw()
        .list_galleries(c.request(proto::ListGalleriesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.galleries.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["flight-LH123", "watchlist"]);
    // Dropping a gallery removes it and its files.
    c.raw()
        .drop_gallery(c.request(proto::DropGalleryRequest {
            name: "flight-LH123".into(),
        }))
        .await
        .unwrap();
    assert!(!data.path().join("galleries/flight-LH123").exists());
    let e = c.identify("flight-LH123", &row, DIM, 1, None).await.unwrap_err();
    assert!(e.code() == Code::NotFound, "{e}");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_calls_equal_sequential_calls_and_are_batched() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_wait_us = 2000;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "f16").await;
    let mut r = rng(2);
    let rows = random_rows(&mut r, 3000, DIM);
    let names: Vec<String> = (0..3000).map(|i| format!("s{:04}", i / 3)).collect();
    c.enroll("g", &rows, DIM, &names).await.unwrap();
    let probes = random_rows(&mut r, 300, DIM);
    let mut sequential = Vec::new();
    for i in 0..300 {
        let k = 1 + (i % 12) as u32;
        let t = if i % 3 == 0 { Some(0.1) } else { None };
        sequential.push(
            c.identify("g", &probes[i * DIM..(i + 1) * DIM], DIM, k, t)
                .await
                .unwrap(),
        );
    }
    let before = metrics(&h).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let c = c.clone();
        let p = probes[i * DIM..(i + 1) * DIM].to_vec();
        tasks.push(tokio::spawn(async move {
            let k = 1 + (i % 12) as u32;
            let t = if i % 3 == 0 { Some(0.1) } else { None };
            c.identify("g", &p, DIM, k, t).await.unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), sequential[i], "probe {i}");
    }
    let after = metrics(&h).await;
    let batches = metric(&after, "biogate_batch_requests_count") - metric(&before, "biogate_batch_requests_count");
    let requests = metric(&after, "biogate_batch_requests_sum") - metric(&before, "biogate_batch_requests_sum");
    assert_eq!(requests, 300.0);
    assert!(
        batches < 150.0,
        "300 concurrent requests ran in {batches} batches: batching is not active"
    );
    assert!(
        after.contains("biogate_requests_total{method=\"Identify\",code=\"Ok\"} 600"),
        "{after}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced_and_refusals_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.tokens = tokens();
    let h = start(cfg).await.unwrap();
    let admin = connect(&h, Some("admin-token-0123456789")).await;
    let officer = connect(&h, Some("officer-token-0123456789")).await;
    let gate = connect(&h, Some("gate-token-0123456789")).await;
    let nobody = connect(&h, None).await;
    let wrong = connect(&h, Some("not-a-real-token-at-all")).await;
    create(&admin, "g", "f32").await;
    let rows = random_rows(&mut rng(3), 4, DIM);
    officer.enroll("g", &rows, DIM, &ids("s", 4)).await.unwrap();
    assert_eq!(
        gate.identify("g", &rows[..DIM], DIM, 1, None).await.unwrap()[0].candidates[0].subject,
        "s-00000"
    );

    let e = nobody.identify("g", &rows[..DIM], DIM, 1, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = wrong.identify("g", &rows[..DIM], DIM, 1, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = gate.enroll("g", &rows, DIM, &ids("x", 4)).await.unwrap_err();
    assert!(
        e.code() == Code::PermissionDenied && e.message().contains("gate-A12"),
        "{e}"
    );
    let e = gate
        .raw()
        .create_gallery(gate.request(proto::CreateGalleryRequest {
            name: "h".into(),
            dim: 8,
            dtype: "f32".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = officer
        .raw()
        .drop_gallery(officer.request(proto::DropGalleryRequest { name: "g".into() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = gate
        .raw()
        .delete_subject(gate.request(proto::DeleteSubjectRequest {
            gallery: "g".into(),
            subject: "s-00000".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nothing changed.
    let g = admin
        .raw()
        .get_gallery(admin.request(proto::GetGalleryRequest { name: "g".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.rows, g.subjects), (4, 4));
    let list = admin
        .raw()
        .list_galleries(admin.request(proto::ListGalleriesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.galleries.len(), 1);
    // The audit trail names callers and never holds template values.
    let audit = std::fs::read_to_string(data.path().join("audit.log")).unwrap();
    assert!(
        audit.contains("\"caller\":\"officer-7\"") && audit.contains("\"caller\":\"gate-A12\""),
        "{audit}"
    );
    assert!(
        !audit.contains(&format!("{}", rows[0])),
        "a template value leaked into the audit log"
    );
    h.shutdown().await.unwrap();
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        for (who, names) in [
            ("server", vec!["localhost".to_string()]),
            ("client", vec!["gate-A12".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
            write(&format!("{who}.pem"), cert.pem());
            write(&format!("{who}.key"), key.serialize_pem());
        }
        Pki { dir }
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.tls = Some(TlsConfig {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    });
    cfg.default_gallery = Some(biogate::server::config::DefaultGallery {
        name: "default".into(),
        dim: DIM,
        dtype: biogate::Dtype::F32,
    });
    let h = start(cfg).await.unwrap();
    let addr = format!("https://localhost:{}", h.addr.port());
    let with_cert = Client::connect(&ConnectOptions {
        addr: addr.clone(),
        ca_cert: Some(pki.path("ca.pem")),
        client_cert: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client.key")),
        ..Default::default()
    })
    .await
    .unwrap();
    let rows = random_rows(&mut rng(4), 2, DIM);
    with_cert.enroll("default", &rows, DIM, &ids("t", 2)).await.unwrap();
    // TLS without a client certificate: the handshake or the first call fails.
    let without = Client::connect(&ConnectOptions {
        addr: addr.clone(),
        ca_cert: Some(pki.path("ca.pem")),
        ..Default::default()
    })
    .await;
    if let Ok(c) = without {
        assert!(
            c.identify("default", &rows[..DIM], DIM, 1, None).await.is_err(),
            "a client without a certificate was served"
        );
        assert!(c.enroll("default", &rows, DIM, &ids("x", 2)).await.is_err());
    }
    // Plain text to a TLS server fails too.
    let plain = Client::connect(&ConnectOptions {
        addr: format!("http://127.0.0.1:{}", h.addr.port()),
        ..Default::default()
    })
    .await;
    if let Ok(c) = plain {
        assert!(c.identify("default", &rows[..DIM], DIM, 1, None).await.is_err());
    }
    let g = with_cert
        .raw()
        .get_gallery(with_cert.request(proto::GetGalleryRequest { name: "default".into() }))
        .await
        .unwrap();
    assert_eq!(g.into_inner().rows, 2, "refused clients changed nothing");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_naming_the_field_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_message_bytes = 64 * 1024;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "f32").await;
    let rows = random_rows(&mut rng(5), 3, DIM);
    c.enroll("g", &rows, DIM, &ids("s", 3)).await.unwrap();
    let identify = |probes: Vec<Vec<u8>>, k: u32, threshold: Option<f32>, gallery: &str| {
        let req = proto::IdentifyRequest {
            gallery: gallery.into(),
            probes,
            k,
            threshold,
            ..Default::default()
        };
        let c = c.clone();
        async move { c.raw().identify(c.request(req)).await.unwrap_err() }
    };
    let good = pack(&rows[..DIM]);
    let mut nan = rows[..DIM].to_vec();
    nan[3] = f32::NAN;
    let cases: Vec<(tonic::Status, Code, &str)> = vec![
        (
            identify(vec![good[..good.len() - 4].to_vec()], 5, None, "g").await,
            Code::InvalidArgument,
            "probes[0]",
        ),
        (
            identify(vec![good.clone(), pack(&nan)], 5, None, "g").await,
            Code::InvalidArgument,
            "probes[1] has a non-finite value",
        ),
        (
            identify(vec![pack(&[0.0; DIM])], 5, None, "g").await,
            Code::InvalidArgument,
            "zero vector",
        ),
        (identify(vec![], 5, None, "g").await, Code::InvalidArgument, "no probes"),
        (
            identify(vec![good.clone()], 0, None, "g").await,
            Code::InvalidArgument,
            "k: 0",
        ),
        (
            identify(vec![good.clone()], 100_000, None, "g").await,
            Code::InvalidArgument,
            "k: 100000",
        ),
        (
            identify(vec![good.clone()], 5, Some(2.0), "g").await,
            Code::InvalidArgument,
            "threshold",
        ),
        (
            identify(vec![good.clone()], 5, None, "nope").await,
            Code::NotFound,
            "nope",
        ),
        (
            identify(vec![good.clone()], 5, None, "").await,
            Code::InvalidArgument,
            "gallery",
        ),
        // Larger than max_message_bytes: tonic's codec refuses it before any handler runs.
        (
            identify(vec![vec![0u8; 70 * 1024]], 5, None, "g").await,
            Code::OutOfRange,
            "too large",
        ),
    ];
    for (status, code, needle) in cases {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should name {needle:?}",
            status.message()
        );
    }
    // Verify of an unknown subject; delete of an unknown subject; a bad dtype.
    let v = c
        .raw()
        .verify(c.request(proto::VerifyRequest {
            gallery: "g".into(),
            probe: good.clone(),
            subject: "ghost".into(),
            threshold: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(v.code(), Code::NotFound);
    let d = c
        .raw()
        .delete_subject(c.request(proto::DeleteSubjectRequest {
            gallery: "g".into(),
            subject: "ghost".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(d.code(), Code::NotFound);
    let g = c
        .raw()
        .create_gallery(c.request(proto::CreateGalleryRequest {
            name: "h".into(),
            dim: 8,
            dtype: "f64".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(g.code() == Code::InvalidArgument && g.message().contains("dtype"));
    let g = c
        .raw()
        .create_gallery(c.request(proto::CreateGalleryRequest {
            name: "../evil".into(),
            dim: 8,
            dtype: "f32".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(g.code(), Code::InvalidArgument);
    // An enroll stream with a bad second message: the first is durable and reported.
    let msgs = vec![
        proto::EnrollRequest {
            gallery: "g".into(),
            subject: "ok-1".into(),
            templates: vec![good.clone()],
            ..Default::default()
        },
        proto::EnrollRequest {
            gallery: "g".into(),
            subject: "bad".into(),
            templates: vec![pack(&nan)],
            ..Default::default()
        },
    ];
    let e = c.raw().enroll(c.request(tokio_stream::iter(msgs))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("message 1") && e.message().contains("1 subjects (1 templates)"),
        "{}",
        e.message()
    );
    let info = c
        .raw()
        .get_gallery(c.request(proto::GetGalleryRequest { name: "g".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.rows, info.subjects), (4, 4), "only the good enrollment landed");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_then_not_serving_and_shutdown_drains() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.shutdown_grace_ms = 5000;
    let h = start(cfg).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let service = "biogate.v1.Biogate".to_string();
    let s = health
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.status(), ServingStatus::Serving);
    let mut watch = health.watch(HealthCheckRequest { service }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    let c = connect(&h, None).await;
    create(&c, "g", "f32").await;
    let rows = random_rows(&mut rng(6), 2000, DIM);
    c.enroll("g", &rows, DIM, &ids("s", 2000)).await.unwrap();
    // Start a burst of requests, then shut down while they are in flight.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        let p = rows[i * DIM..(i + 1) * DIM].to_vec();
        tasks.push(tokio::spawn(async move { c.identify("g", &p, DIM, 5, None).await }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let shutdown = tokio::spawn(h.shutdown());
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    drop(watch);
    let mut served = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r[0].candidates[0].subject, format!("s-{i:05}"));
                served += 1;
            }
            // A request that had not reached the server before it stopped accepting.
            Err(e) => assert_ne!(e.code(), Code::Internal, "{e}"),
        }
    }
    assert!(served > 0, "in-flight requests must be drained, not dropped");
    shutdown.await.unwrap().unwrap();
}

#[test]
// The enrolling server is killed and waited for in the loop's only exit.
#[allow(clippy::zombie_processes)]
fn kill_9_during_enroll_streams_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let port = common::server::free_port();
    let spawn = || common::server::serve_process(port, data.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = || common::server::connect_when_up(port);
    let mut acked: Vec<(String, Vec<f32>)> = Vec::new();
    let mut r = rng(7);
    for round in 0..3 {
        let mut server = spawn();
        let c = rt.block_on(connect());
        let kill_after = r.random_range(3..12);
        for call in 0.. {
            let rows = random_rows(&mut r, 5, 512);
            let names = ids(&format!("r{round}c{call}"), 5);
            if call == kill_after {
                // Kill -9 while this stream is being enrolled.
                let c = c.clone();
                let handle = rt.spawn(async move { c.enroll("default", &rows, 512, &names).await });
                std::thread::sleep(Duration::from_millis(r.random_range(0..15)));
                server.kill().unwrap();
                server.wait().unwrap();
                let _ = rt.block_on(handle);
                break;
            }
            rt.block_on(c.enroll("default", &rows, 512, &names)).unwrap();
            for (i, n) in names.into_iter().enumerate() {
                acked.push((n, rows[i * 512..(i + 1) * 512].to_vec()));
            }
        }
        // Restart: every acknowledged subject is there and is its own best match.
        let mut server = spawn();
        let c = rt.block_on(connect());
        for chunk in acked.chunks(64) {
            let probes: Vec<f32> = chunk.iter().flat_map(|(_, t)| unit(t)).collect();
            let res = rt.block_on(c.identify("default", &probes, 512, 1, None)).unwrap();
            for ((name, _), r) in chunk.iter().zip(&res) {
                assert_eq!(
                    &r.candidates[0].subject, name,
                    "round {round}: acknowledged {name} lost"
                );
            }
        }
        server.kill().unwrap();
        server.wait().unwrap();
    }
    assert!(acked.len() >= 45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_streams_probes_and_gets_tagged_answers_and_errors() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "i8").await;
    let rows = random_rows(&mut rng(9), 50, DIM);
    c.enroll("g", &rows, DIM, &ids("s", 50)).await.unwrap();
    let mut requests: Vec<proto::IdentifyStreamRequest> = (0..50)
        .map(|i| proto::IdentifyStreamRequest {
            request_id: format!("gate7-{i}"),
            gallery: "g".into(),
            probe: pack(&rows[i * DIM..(i + 1) * DIM]),
            k: 3,
            threshold: Some(0.5),
            ..Default::default()
        })
        .collect();
    // Two bad probes in the middle: their errors come back tagged, the rest are served.
    requests[10].probe.truncate(8);
    requests[20].gallery = "nope".into();
    let mut responses = c
        .raw()
        .identify_stream(c.request(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashMap::new();
    while let Some(r) = responses.message().await.unwrap() {
        seen.insert(r.request_id.clone(), r);
    }
    assert_eq!(seen.len(), 50);
    for i in 0..50 {
        let r = &seen[&format!("gate7-{i}")];
        match i {
            10 => assert!(
                r.error_code == Code::InvalidArgument as i32 && r.error_message.contains("probe"),
                "{r:?}"
            ),
            20 => assert_eq!(r.error_code, Code::NotFound as i32),
            _ => {
                let res = r.result.as_ref().unwrap();
                assert!(res.decided && res.matched);
                assert_eq!(res.candidates[0].subject, format!("s-{i:05}"));
            }
        }
    }
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_seals_the_log_and_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.seal_log_rows = 16;
    let h = start(cfg.clone()).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "f16").await;
    let rows = random_rows(&mut rng(12), 60, DIM);
    let names = ids("s", 60);
    for chunk in 0..6 {
        let r = chunk * 10..(chunk + 1) * 10;
        c.enroll("g", &rows[r.start * DIM..r.end * DIM], DIM, &names[r])
            .await
            .unwrap();
    }
    let info = biogate::gallery::info(&data.path().join("galleries/g")).unwrap();
    assert!(info.segments >= 2 && info.log_rows < 16, "the log was sealed: {info:?}");
    let res = c.identify("g", &rows, DIM, 1, None).await.unwrap();
    for (i, r) in res.iter().enumerate() {
        assert_eq!(r.candidates[0].subject, names[i]);
    }
    h.shutdown().await.unwrap();
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    let res = c.identify("g", &rows, DIM, 1, None).await.unwrap();
    assert!(res.iter().zip(&names).all(|(r, n)| &r.candidates[0].subject == n));
    h.shutdown().await.unwrap();
}

/// Many small seals do not pile up: the server merges similar-sized segments in the
/// background. CompactGallery runs while enrollments and searches go on, and every
/// answer during and after it is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_gallery_merges_in_the_background_and_compacts_while_writes_go_on() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.seal_log_rows = 8;
    cfg.file_check_interval_ms = 50; // the tick that looks for merges
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "i8").await;
    let n = 240;
    let rows = random_rows(&mut rng(21), n, DIM);
    let names = ids("s", n);
    let dir = data.path().join("galleries/g");
    let mut most = 0;
    for chunk in 0..n / 8 {
        let r = chunk * 8..(chunk + 1) * 8;
        c.enroll("g", &rows[r.start * DIM..r.end * DIM], DIM, &names[r])
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        most = most.max(biogate::gallery::info(&dir).unwrap().segments);
    }
    assert!(most <= 10, "{most} segments piled up ({} seals)", n / 8);
    // CompactGallery while another client enrolls and searches.
    let writer = {
        let c = connect(&h, None).await;
        let rows = random_rows(&mut rng(22), 40, DIM);
        tokio::spawn(async move {
            for i in 0..40 {
                let name = format!("late-{i:03}");
                c.enroll("g", &rows[i * DIM..(i + 1) * DIM], DIM, std::slice::from_ref(&name))
                    .await
                    .unwrap();
                let got = c
                    .identify("g", &rows[i * DIM..(i + 1) * DIM], DIM, 1, None)
                    .await
                    .unwrap();
                assert_eq!(got[0].candidates[0].subject, name, "found at once, compaction or not");
            }
            rows
        })
    };
    c.delete_subject("g", &names[0]).await.unwrap();
    let report = c.compact_gallery("g").await.unwrap();
    let late = writer.await.unwrap();
    assert!(report.segments_after <= 2, "{report:?}");
    let res = c.identify("g", &rows, DIM, 1, None).await.unwrap();
    for (i, r) in res.iter().enumerate().skip(1) {
        assert_eq!(r.candidates[0].subject, names[i]);
    }
    assert_ne!(res[0].candidates[0].subject, names[0], "deleted before the compaction");
    let res = c.identify("g", &late, DIM, 1, None).await.unwrap();
    assert!(
        res.iter()
            .enumerate()
            .all(|(i, r)| r.candidates[0].subject == format!("late-{i:03}"))
    );
    let info = biogate::gallery::info(&dir).unwrap();
    assert_eq!((info.rows, info.subjects), ((n - 1 + 40) as u64, (n - 1 + 40) as u64));
    h.shutdown().await.unwrap();
    biogate::gallery::check(&dir).unwrap();
}

/// Reflection answers in both versions a stock client may speak: v1, and v1alpha
/// (grpcio-reflection, grpcui, older grpcurl). `tests/python/reflection_client.py`,
/// run by .ci/run, goes further with grpcio: enroll and identify from reflected
/// descriptors alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_service() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    macro_rules! services {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            let mut client = ServerReflectionClient::new(channel.clone());
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut answers = client
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap()
                .into_inner();
            match answers.message().await.unwrap().unwrap().message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
                }
                other => panic!("{}: {other:?}", stringify!($v)),
            }
        }};
    }
    for names in [services!(v1), services!(v1alpha)] {
        assert!(names.iter().any(|n| n == "biogate.v1.Biogate"), "{names:?}");
        assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
    }
    h.shutdown().await.unwrap();
}

/// An unknown gallery with an absurd name (10 KB) is NOT_FOUND with the name cut short,
/// not RESOURCE_EXHAUSTED from a message too large for the client's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_gallery_name_is_echoed_cut_short() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    let name = "x".repeat(10_000);
    let probe = pack(&unit(&random_rows(&mut rng(1), 1, DIM)));
    let req = proto::IdentifyRequest {
        gallery: name,
        probes: vec![probe],
        k: 1,
        threshold: None,
        ..Default::default()
    };
    let e = c.raw().identify(c.request(req)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(
        e.message().len() < 200 && e.message().contains("10000 bytes"),
        "{}",
        e.message()
    );
    h.shutdown().await.unwrap();
}

/// A flight's gallery derived from the master over gRPC answers like the master for
/// its passengers; unknown passengers are listed, a repeated one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_gallery_is_derived_from_the_master_over_grpc() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "master", "i8").await;
    let rows = random_rows(&mut rng(31), 50, DIM);
    let names = ids("p", 50);
    c.enroll("master", &rows, DIM, &names).await.unwrap();
    let mut manifest: Vec<String> = names.iter().step_by(5).cloned().collect();
    manifest.push("nobody".into());
    let info = c.derive_gallery("flight-1", "master", &manifest).await.unwrap();
    assert_eq!((info.subjects, info.dim as usize, info.dtype.as_str()), (10, DIM, "i8"));
    assert_eq!(info.missing_subjects, vec!["nobody".to_string()]);
    let got = c.identify("flight-1", &rows, DIM, 1, None).await.unwrap();
    for (i, r) in got.iter().enumerate() {
        if i % 5 == 0 {
            assert_eq!(r.candidates[0].subject, names[i]);
            let master = c
                .identify("master", &rows[i * DIM..(i + 1) * DIM], DIM, 1, None)
                .await
                .unwrap();
            assert_eq!(
                r.candidates[0].score, master[0].candidates[0].score,
                "the master's bits"
            );
        } else {
            assert!(manifest.contains(&r.candidates[0].subject));
        }
    }
    let twice = vec!["p-00001".to_string(), "p-00001".to_string()];
    let e = c.derive_gallery("flight-2", "master", &twice).await.err().unwrap();
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("entry 1"),
        "{e:?}"
    );
    let e = c.derive_gallery("flight-2", "nope", &manifest).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.derive_gallery("flight-1", "master", &manifest).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    h.shutdown().await.unwrap();
}

/// One Identify searches the flight and a watchlist, each with its own k and threshold:
/// the answers are those of two single-gallery requests, in the order asked; the same
/// through IdentifyStream; a mixed or repeated request is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_searches_a_flight_and_a_watchlist() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "flight", "f16").await;
    create(&c, "watchlist", "i8").await;
    let rows = random_rows(&mut rng(51), 60, DIM);
    c.enroll("flight", &rows[..40 * DIM], DIM, &ids("p", 40)).await.unwrap();
    c.enroll("watchlist", &rows[30 * DIM..], DIM, &ids("w", 30))
        .await
        .unwrap();
    let probes = &rows[25 * DIM..45 * DIM];
    let both = c
        .identify_in(&[("watchlist", 2, Some(0.6)), ("flight", 5, None)], probes, DIM)
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    assert_eq!(
        (both[0].gallery.as_str(), both[1].gallery.as_str()),
        ("watchlist", "flight")
    );
    assert_eq!(
        both[0].results,
        c.identify("watchlist", probes, DIM, 2, Some(0.6)).await.unwrap()
    );
    assert_eq!(
        both[1].results,
        c.identify("flight", probes, DIM, 5, None).await.unwrap()
    );
    // Probe 30 (row 35) is on the flight and on the watchlist: a hit in both.
    assert_eq!(both[0].results[10].candidates[0].subject, "w-00005");
    assert_eq!(both[1].results[10].candidates[0].subject, "p-00035");
    // The same through a stream.
    let search = |g: &str, k: u32, t: Option<f32>| proto::GallerySearch {
        gallery: g.into(),
        k,
        threshold: t,
    };
    let req = proto::IdentifyStreamRequest {
        request_id: "gate-1".into(),
        probe: biogate::client::pack(&rows[35 * DIM..36 * DIM]),
        galleries: vec![search("flight", 1, None), search("watchlist", 1, Some(0.6))],
        ..Default::default()
    };
    let mut answers = c
        .raw()
        .identify_stream(c.request(tokio_stream::iter([req])))
        .await
        .unwrap()
        .into_inner();
    let r = answers.message().await.unwrap().unwrap();
    assert_eq!((r.error_code, r.galleries.len()), (0, 2), "{r:?}");
    assert_eq!(r.galleries[0].result.as_ref().unwrap().candidates[0].subject, "p-00035");
    assert_eq!(r.galleries[1].result.as_ref().unwrap().candidates[0].subject, "w-00005");
    // Refusals name the field.
    let raw = |galleries: Vec<proto::GallerySearch>, gallery: &str| proto::IdentifyRequest {
        gallery: gallery.into(),
        probes: vec![biogate::client::pack(&rows[..DIM])],
        galleries,
        ..Default::default()
    };
    for (req, needle) in [
        (raw(vec![search("flight", 1, None)], "flight"), "galleries"),
        (
            raw(vec![search("flight", 1, None), search("flight", 2, None)], ""),
            "galleries[1]",
        ),
        (
            raw(vec![search("flight", 1, None), search("nope", 1, None)], ""),
            "galleries[1]",
        ),
        (raw(vec![search("flight", 0, None)], ""), "galleries[0]"),
    ] {
        let e = c.raw().identify(c.request(req)).await.err().unwrap();
        assert!(e.message().contains(needle), "{needle}: {e:?}");
    }
    h.shutdown().await.unwrap();
}
