//! The cluster, as real processes on loopback: a three-member etcd cluster, shard
//! servers (`biogate serve --etcd`) and `biogate router`.
//!
//! - Answers through the router equal one server holding the same templates (same
//!   subjects, scores and tie order) for every dtype, with shards of very different
//!   sizes and an empty one; deletions are honoured on every replica when acknowledged.
//! - kill -9 of a replica under continuous Identify load: no search fails beyond one
//!   retry, and the replica catches up when restarted.
//! - kill -9 of a shard server during enroll streams: every acknowledged enrollment is
//!   found; one etcd member down changes nothing; without a quorum enrollments stop
//!   with a clear error while searches go on.
//! - The router restarted under load, and a new node taking replicas while it serves.
//!
//! They skip when etcd is not installed, unless BIOGATE_REQUIRE_ETCD=1 (as in CI).
#![cfg(feature = "cli")]

mod common;

use biogate::client::Client;
use biogate::cluster::keys::shard_of;
use biogate::server::proto;
use common::cluster::{Cluster, etcd_available, eventually};
use common::server::{config, connect};
use common::{random_rows, rng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

const DIM: usize = 32;

/// Create a gallery through the router and wait until each shard has `replicas`
/// serving replicas (the nodes just started may join the placement a moment later).
async fn create(c: &Client, name: &str, dtype: &str, shards: u32, replicas: u32) -> proto::GalleryInfo {
    c.create_sharded_gallery(name, DIM as u32, dtype, shards, replicas)
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    eventually(Duration::from_secs(20), "every shard's replicas serve", || async {
        let info = c.get_gallery(name).await.unwrap();
        all_serving(&info) && info.shard_health.iter().all(|s| s.replicas.len() == replicas as usize)
    })
    .await;
    c.get_gallery(name).await.unwrap()
}

/// Subject ids whose shards (of `shards`) hold `counts[s]` subjects each.
fn ids_per_shard(counts: &[usize]) -> Vec<String> {
    let shards = counts.len() as u32;
    let mut left = counts.to_vec();
    let mut out = Vec::new();
    let mut i = 0;
    while left.iter().any(|&n| n > 0) {
        let id = format!("p{i:06}");
        let s = shard_of(&id, shards) as usize;
        if left[s] > 0 {
            left[s] -= 1;
            out.push(id);
        }
        i += 1;
    }
    out
}

/// Rows for `ids` (every fifth subject has two templates, its id given twice), with
/// the last two subjects sharing one template (a tie the merge must order by id).
fn enrollment(ids: &[String], seed: u64) -> (Vec<String>, Vec<f32>) {
    let mut r = rng(seed);
    let mut row_ids = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        row_ids.push(id.clone());
        if i % 5 == 0 {
            row_ids.push(id.clone());
        }
    }
    let mut rows = random_rows(&mut r, row_ids.len(), DIM);
    let n = row_ids.len();
    let last = rows[(n - 1) * DIM..].to_vec();
    rows[(n - 2) * DIM..(n - 1) * DIM].copy_from_slice(&last);
    (row_ids, rows)
}

fn same_results(a: &[proto::ProbeResult], b: &[proto::ProbeResult], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: probe count");
    for (p, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            (x.decided, x.matched),
            (y.decided, y.matched),
            "{what}: probe {p} decision"
        );
        let xs: Vec<(&str, u32)> = x
            .candidates
            .iter()
            .map(|c| (c.subject.as_str(), c.score.to_bits()))
            .collect();
        let ys: Vec<(&str, u32)> = y
            .candidates
            .iter()
            .map(|c| (c.subject.as_str(), c.score.to_bits()))
            .collect();
        assert_eq!(xs, ys, "{what}: probe {p}");
    }
}

/// The nodes (names) holding a replica of shard `s`, from the router's GetGallery.
async fn holders(router: &Client, g: &str, s: u32) -> Vec<String> {
    let info = router.get_gallery(g).await.unwrap();
    info.shard_health[s as usize]
        .replicas
        .iter()
        .map(|r| r.node.clone())
        .collect()
}

fn all_serving(info: &proto::GalleryInfo) -> bool {
    info.shard_health
        .iter()
        .all(|s| !s.replicas.is_empty() && s.replicas.iter().all(|r| r.serving && r.applied == s.committed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn router_answers_equal_one_server_for_every_dtype() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(3, &[]).await;
    let router = cluster.router.client().await;
    let single_server = biogate::server::start(config(&cluster.dir.path().join("single")))
        .await
        .unwrap();
    let single = connect(&single_server, None).await;

    // Shards of very different sizes, and shard 2 with no subjects.
    let ids = ids_per_shard(&[150, 12, 0, 3]);
    let (row_ids, rows) = enrollment(&ids, 7);
    let mut r = rng(8);
    let mut probes = random_rows(&mut r, 6, DIM);
    probes.extend_from_slice(&rows[..DIM]);
    probes.extend_from_slice(&rows[rows.len() - DIM..]); // the tie
    let n_probes = probes.len() / DIM;

    for dtype in ["f32", "f16", "i8"] {
        let g = format!("g-{dtype}");
        let info = create(&router, &g, dtype, 4, 2).await;
        assert_eq!((info.shards, info.replicas, info.shard_health.len()), (4, 2, 4));
        single.create_gallery(&g, DIM as u32, dtype).await.unwrap();
        // Two streams, so each shard's log has more than one batch.
        let mut half = row_ids.len() / 2;
        while row_ids[half] == row_ids[half - 1] {
            half += 1;
        }
        for (from, to) in [(0, half), (half, row_ids.len())] {
            let via_router = router
                .enroll(&g, &rows[from * DIM..to * DIM], DIM, &row_ids[from..to])
                .await
                .unwrap();
            let direct = single
                .enroll(&g, &rows[from * DIM..to * DIM], DIM, &row_ids[from..to])
                .await
                .unwrap();
            assert_eq!(via_router, direct);
        }
        for (k, threshold) in [(1, None), (10, None), (100, None), (10, Some(0.3))] {
            let a = router.identify(&g, &probes, DIM, k, threshold).await.unwrap();
            let b = single.identify(&g, &probes, DIM, k, threshold).await.unwrap();
            assert_eq!(a.len(), n_probes);
            same_results(&a, &b, &format!("{g} k={k} threshold={threshold:?}"));
        }
        // The tie: two subjects with one template, ordered by id.
        let top = &router.identify(&g, &probes, DIM, 2, None).await.unwrap()[n_probes - 1];
        assert_eq!(top.candidates[0].score, top.candidates[1].score, "{g}: the planted tie");
        assert!(top.candidates[0].subject < top.candidates[1].subject);
        for id in [&ids[0], &ids[151], &ids[164]] {
            let a = router.verify(&g, &probes[..DIM], id, Some(0.2)).await.unwrap();
            let b = single.verify(&g, &probes[..DIM], id, Some(0.2)).await.unwrap();
            assert_eq!(a, b, "{g}: verify {id}");
        }
        let info = router.get_gallery(&g).await.unwrap();
        let expected = single.get_gallery(&g).await.unwrap();
        assert_eq!((info.rows, info.subjects), (expected.rows, expected.subjects), "{g}");
        assert!(all_serving(&info), "{g}: {:?}", info.shard_health);
    }

    // Several galleries in one request, as a gate searches a flight and a watchlist.
    let searches = [("g-f32", 5, None), ("g-i8", 3, Some(0.25))];
    let a = router.identify_in(&searches, &probes, DIM).await.unwrap();
    let b = single.identify_in(&searches, &probes, DIM).await.unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.gallery, y.gallery);
        same_results(&x.results, &y.results, &format!("multi-gallery {}", x.gallery));
    }

    // A stream of single probes, answered by request id.
    let a = stream_results(&router, "g-f32", &probes).await;
    let b = stream_results(&single, "g-f32", &probes).await;
    same_results(&a, &b, "IdentifyStream");

    // Deletions: acknowledged only once every replica has applied them.
    let g = "g-f16";
    let gone = [&ids[0], &ids[1], &ids[150], &ids[163], &ids[164]];
    for id in gone {
        router.delete_subject(g, id).await.unwrap();
        single.delete_subject(g, id).await.unwrap();
        let s = shard_of(id, 4);
        for holder in holders(&router, g, s).await {
            let node = cluster.node_named(&holder).client().await;
            let local = format!("{g}.s{s}");
            let e = node.verify(&local, &probes[..DIM], id, None).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{id} on {holder}: {e}");
        }
    }
    for k in [10, 100] {
        let a = router.identify(g, &probes, DIM, k, None).await.unwrap();
        let b = single.identify(g, &probes, DIM, k, None).await.unwrap();
        same_results(&a, &b, &format!("{g} after deletions, k={k}"));
    }
    let e = router.delete_subject(g, gone[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Bad input is refused naming what was wrong, and changes nothing.
    let before = router.get_gallery(g).await.unwrap().rows;
    let mut bad = rows[..3 * DIM].to_vec();
    bad[DIM + 2] = f32::NAN;
    let e = router
        .enroll(g, &bad, DIM, &["new-a".into(), "new-b".into(), "new-c".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("message 1") && e.message().contains("templates[0]"),
        "{e}"
    );
    assert_eq!(router.get_gallery(g).await.unwrap().rows, before);
    let e = router
        .identify(g, &probes[..DIM - 1], DIM - 1, 5, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = router.identify("nope", &probes[..DIM], DIM, 5, None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = router
        .create_sharded_gallery("big", DIM as u32, "f32", 5000, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = router.create_gallery("g-f32", DIM as u32, "f32").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = single
        .create_sharded_gallery("x", DIM as u32, "f32", 4, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = cluster.nodes[0]
        .client()
        .await
        .create_gallery("x", DIM as u32, "f32")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // A dropped gallery goes from every node and from the object store, also from a
    // node that was down when it was dropped.
    cluster.nodes[2].kill9();
    router.drop_gallery("g-i8").await.unwrap();
    let e = router.identify("g-i8", &probes[..DIM], DIM, 5, None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    cluster.nodes[2].restart();
    let objects = cluster.dir.path().join("objects").join("galleries");
    eventually(
        Duration::from_secs(10),
        "the dropped gallery's replicas and objects go",
        || async {
            let mut held = 0;
            for n in &cluster.nodes {
                let c = n.client().await;
                held += c
                    .list_galleries()
                    .await
                    .unwrap()
                    .iter()
                    .filter(|i| i.name.starts_with("g-i8."))
                    .count();
            }
            let objects_left = files_under(&objects, "g-i8-");
            held == 0 && objects_left == 0
        },
    )
    .await;
    single_server.shutdown().await.unwrap();
}

/// IdentifyStream with one message per probe (k = 10), the answers in probe order.
async fn stream_results(c: &Client, g: &str, probes: &[f32]) -> Vec<proto::ProbeResult> {
    let requests: Vec<proto::IdentifyStreamRequest> = probes
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, p)| proto::IdentifyStreamRequest {
            request_id: format!("{i:04}"),
            gallery: g.into(),
            probe: biogate::client::pack(p),
            k: 10,
            ..Default::default()
        })
        .collect();
    let mut answers = c
        .raw()
        .identify_stream(c.request(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = answers.message().await.unwrap() {
        assert_eq!(r.error_code, 0, "{}", r.error_message);
        out.push((r.request_id, r.result.unwrap()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, r)| r).collect()
}

/// Files under `dir` in folders whose name starts with `prefix` (the object store
/// keeps empty folders of deleted objects on a local filesystem).
fn files_under(dir: &std::path::Path, prefix: &str) -> usize {
    fn count(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|entries| {
                entries
                    .map(|e| {
                        let e = e.unwrap();
                        if e.file_type().unwrap().is_dir() {
                            count(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| count(&e.path()))
        .sum()
}

/// Identify through the router in `tasks` loops until `stop`; a failed search is
/// retried once (the client's retry of the request in flight). Returns the searches
/// done and those that failed even on the retry.
fn search_load(
    router_port: u16,
    g: &'static str,
    probes: Vec<f32>,
    tasks: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..tasks)
        .map(|_| {
            let stop = stop.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                let mut client = common::cluster::connect_when_up(router_port).await;
                let (mut done, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let mut tries = 0;
                    loop {
                        match client.identify(g, &probes, DIM, 5, None).await {
                            Ok(r) if r.len() * DIM == probes.len() => break,
                            Ok(r) => panic!("{} results for {} probes", r.len(), probes.len() / DIM),
                            Err(e) if tries == 0 => {
                                tries += 1;
                                if e.code() == Code::Unavailable && e.message().contains("transport") {
                                    client = common::cluster::connect_when_up(router_port).await;
                                }
                            }
                            Err(e) => {
                                failed.push(e.to_string());
                                break;
                            }
                        }
                    }
                    done += 1;
                }
                (done, failed)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_fails_no_search_and_catches_up() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(2, &["--checkpoint-every", "3"]).await;
    let router = cluster.router.client().await;
    create(&router, "load", "f32", 2, 2).await;
    let ids: Vec<String> = (0..300).map(|i| format!("s{i:04}")).collect();
    let rows = random_rows(&mut rng(3), ids.len(), DIM);
    router.enroll("load", &rows, DIM, &ids).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = search_load(cluster.router.port, "load", rows[..2 * DIM].to_vec(), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.nodes[1].kill9();
    // Enrollments go on while the replica is down; it must catch up on them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let more: Vec<String> = (0..40).map(|i| format!("late{i:03}")).collect();
    let more_rows = random_rows(&mut rng(4), more.len(), DIM);
    for (ids, rows) in more.chunks(5).zip(more_rows.chunks(5 * DIM)) {
        router.enroll("load", rows, DIM, ids).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = Instant::now();
    cluster.nodes[1].restart();
    eventually(
        Duration::from_secs(20),
        "the restarted replica serves, caught up",
        || async {
            let info = router.get_gallery("load").await.unwrap();
            all_serving(&info)
                && info
                    .shard_health
                    .iter()
                    .all(|s| s.replicas.iter().any(|r| r.node == "n2"))
        },
    )
    .await;
    eprintln!("the restarted replica served again after {:?}", restarted.elapsed());
    assert!(
        cluster.nodes[0].log().contains("deleted the log before the checkpoint"),
        "{}",
        cluster.nodes[0].log()
    );
    assert!(
        cluster.nodes[1].log().contains("reloading from the checkpoint"),
        "{}",
        cluster.nodes[1].log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut searches = 0;
    for t in load {
        let (done, failed) = t.await.unwrap();
        assert!(failed.is_empty(), "searches failed after a retry: {failed:?}");
        searches += done;
    }
    assert!(searches > 20, "only {searches} searches ran");
    // Both replicas of each shard answer alike, the late enrollments included.
    let (a, b) = (cluster.nodes[0].client().await, cluster.nodes[1].client().await);
    for s in 0..2 {
        let local = format!("load.s{s}");
        let x = a.identify(&local, &more_rows, DIM, 10, None).await.unwrap();
        let y = b.identify(&local, &more_rows, DIM, 10, None).await.unwrap();
        same_results(&x, &y, &local);
    }
    let found = router.identify("load", &more_rows, DIM, 1, None).await.unwrap();
    for (i, r) in found.iter().enumerate() {
        assert_eq!(r.candidates[0].subject, more[i]);
    }

    // A shard no replica can answer fails the search with UNAVAILABLE naming it, unless
    // the request takes a partial answer, which then says which shards it lacks.
    create(&router, "solo", "f32", 2, 1).await;
    router.enroll("solo", &rows, DIM, &ids).await.unwrap();
    let holder = holders(&router, "solo", 0).await[0].clone();
    let mut lost = Vec::new();
    for s in 0..2 {
        if holders(&router, "solo", s).await[0] == holder {
            lost.push(format!("solo/{s}"));
        }
    }
    cluster.nodes.iter_mut().find(|n| n.name == holder).unwrap().kill9();
    let e = router.identify("solo", &rows[..DIM], DIM, 5, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("shard solo/0"), "{e}");
    let partial = router
        .raw()
        .identify(router.request(proto::IdentifyRequest {
            gallery: "solo".into(),
            probes: vec![biogate::client::pack(&rows[..DIM])],
            k: 100,
            allow_partial: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(partial.partial);
    assert_eq!(partial.unavailable_shards, lost);
    let answered: Vec<u32> = partial.results[0]
        .candidates
        .iter()
        .map(|c| shard_of(&c.subject, 2))
        .collect();
    assert!(
        answered.iter().all(|s| !lost.contains(&format!("solo/{s}"))),
        "{answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_enrollments_survive_kill9_and_etcd_losing_members() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(2, &[]).await;
    let router = cluster.router.client().await;
    create(&router, "enr", "i8", 2, 2).await;

    // Writers enroll small streams through the router; what is acknowledged is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let stop = stop.clone();
            let batches = batches.clone();
            let port = cluster.router.port;
            tokio::spawn(async move {
                let client = common::cluster::connect_when_up(port).await;
                let mut acked: Vec<(String, Vec<f32>)> = Vec::new();
                let mut r = rng(100 + w);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (0..4).map(|i| format!("w{w}-{n:04}-{i}")).collect();
                    let rows = random_rows(&mut r, ids.len(), DIM);
                    n += 1;
                    if client.enroll("enr", &rows, DIM, &ids).await.is_ok() {
                        batches.fetch_add(1, Ordering::Relaxed);
                        acked.extend(ids.into_iter().zip(rows.chunks_exact(DIM).map(<[f32]>::to_vec)));
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.nodes[0].kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[0].restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() >= 40, "only {} enrollments acknowledged", acked.len());
    eventually(Duration::from_secs(20), "both replicas serve again", || async {
        all_serving(&router.get_gallery("enr").await.unwrap())
    })
    .await;
    for (id, row) in &acked {
        let v = router
            .verify("enr", row, id, None)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(v.score > 0.99, "{id}: score {}", v.score);
    }
    let info = router.get_gallery("enr").await.unwrap();
    assert!(
        info.subjects >= acked.len() as u64,
        "{} subjects, {} acknowledged",
        info.subjects,
        acked.len()
    );

    // One etcd member down changes nothing.
    let probe = acked[0].1.clone();
    let extra = |i: usize| {
        (
            vec![format!("after-{i}")],
            random_rows(&mut rng(900 + i as u64), 1, DIM),
        )
    };
    cluster.etcd.kill_member(0);
    let (ids, rows) = extra(0);
    router.enroll("enr", &rows, DIM, &ids).await.unwrap();
    router.identify("enr", &probe, DIM, 3, None).await.unwrap();

    // Without a quorum, enrollments stop with a clear error; searches go on. The error
    // is UNAVAILABLE when etcd proved the commit was never proposed (no leader, or no
    // member reachable), UNKNOWN when a member took it and did not answer (a leader
    // that has not yet noticed it lost its quorum): it may commit once the quorum is
    // back, so a client must not read it as "safe to send again".
    cluster.etcd.kill_member(1);
    let (ids, rows) = extra(1);
    let e = router.enroll("enr", &rows, DIM, &ids).await.unwrap_err();
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown), "{e}");
    assert!(e.message().contains("etcd"), "{e}");
    for _ in 0..5 {
        let r = router.identify("enr", &probe, DIM, 3, None).await.unwrap();
        assert_eq!(r[0].candidates[0].subject, acked[0].0);
    }
    // Quorum back: enrollments resume.
    cluster.etcd.start_member(0);
    cluster.etcd.start_member(1);
    let (ids, rows) = extra(2);
    eventually(Duration::from_secs(30), "enrollments resume with the quorum", || {
        let (router, ids, rows) = (&router, &ids, &rows);
        async move { router.enroll("enr", rows, DIM, ids).await.is_ok() }
    })
    .await;
    let r = router.identify("enr", &rows, DIM, 1, None).await.unwrap();
    assert_eq!(r[0].candidates[0].subject, ids[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_restarts_and_a_new_node_joins_under_load() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(2, &["--checkpoint-every", "4"]).await;
    let router = cluster.router.client().await;
    create(&router, "join", "f16", 4, 2).await;
    let ids: Vec<String> = (0..200).map(|i| format!("j{i:04}")).collect();
    let rows = random_rows(&mut rng(5), ids.len(), DIM);
    // Ten streams: each shard's log gets ten batches, and checkpoints.
    for (ids, rows) in ids.chunks(20).zip(rows.chunks(20 * DIM)) {
        router.enroll("join", rows, DIM, ids).await.unwrap();
    }
    let expected = router.identify("join", &rows[..4 * DIM], DIM, 5, None).await.unwrap();

    // The router, killed and started again under load: clients reconnect and retry.
    let stop = Arc::new(AtomicBool::new(false));
    let port = cluster.router.port;
    let gates: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let probes = rows[..4 * DIM].to_vec();
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut client = common::cluster::connect_when_up(port).await;
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        match client.identify("join", &probes, DIM, 5, None).await {
                            Ok(r) => {
                                same_results(&r, &expected, "under load");
                                break;
                            }
                            Err(e) => {
                                assert!(Instant::now() < deadline, "no answer for 5 s: {e}");
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                client = common::cluster::connect_when_up(port).await;
                            }
                        }
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.router.kill9();
    cluster.router.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A third node joins: it takes replicas (the shard map moves them), loads them from
    // the object store, and serves; the replicas it replaces leave only after that.
    let n3 = cluster.node("n3", &["--checkpoint-every", "4"]);
    let router = cluster.router.client().await;
    eventually(
        Duration::from_secs(30),
        "n3 serves replicas, and each shard has 2",
        || async {
            let info = router.get_gallery("join").await.unwrap();
            let on_n3 = info
                .shard_health
                .iter()
                .filter(|s| s.replicas.iter().any(|r| r.node == "n3"))
                .count();
            all_serving(&info) && on_n3 > 0 && info.shard_health.iter().all(|s| s.replicas.len() == 2)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for g in gates {
        assert!(g.await.unwrap() > 5);
    }
    // What n3 holds answers like the other replica of the same shard.
    let info = router.get_gallery("join").await.unwrap();
    let c3 = n3.client().await;
    for s in info
        .shard_health
        .iter()
        .filter(|s| s.replicas.iter().any(|r| r.node == "n3"))
    {
        let other = s.replicas.iter().find(|r| r.node != "n3").unwrap();
        let other = cluster.node_named(&other.node).client().await;
        let local = format!("join.s{}", s.shard);
        let x = c3.identify(&local, &rows, DIM, 10, None).await.unwrap();
        let y = other.identify(&local, &rows, DIM, 10, None).await.unwrap();
        same_results(&x, &y, &local);
    }
    let after = router.identify("join", &rows[..4 * DIM], DIM, 5, None).await.unwrap();
    same_results(&after, &expected, "after the join");
    // n3 loaded checkpoints (segments) rather than replaying every batch.
    assert!(n3.log().contains("loaded the shard's checkpoint"), "{}", n3.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_checks_tokens_and_passes_them_to_the_nodes() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokens.toml");
    std::fs::write(
        &config,
        r#"
[[tokens]]
name = "gate-A12"
token = "gate-token-0123456789"
roles = ["identify"]

[[tokens]]
name = "officer-7"
token = "officer-token-0123456789"
roles = ["identify", "enroll"]

[[tokens]]
name = "ops"
token = "admin-token-0123456789"
roles = ["admin"]
"#,
    )
    .unwrap();
    let config = config.display().to_string();
    let flags = ["--config", config.as_str()];
    let cluster = Cluster::start_in(dir, 2, &flags, &flags).await;
    let as_who = |token: Option<&str>| {
        let port = cluster.router.port;
        let token = token.map(str::to_owned);
        async move {
            Client::connect(&biogate::client::ConnectOptions {
                addr: format!("http://127.0.0.1:{port}"),
                token,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let (nobody, gate) = (as_who(None).await, as_who(Some("gate-token-0123456789")).await);
    let (officer, ops) = (
        as_who(Some("officer-token-0123456789")).await,
        as_who(Some("admin-token-0123456789")).await,
    );
    let e = nobody.list_galleries().await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = gate
        .create_sharded_gallery("t", DIM as u32, "f32", 2, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    create(&ops, "t", "f32", 2, 2).await;
    let ids: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    let rows = random_rows(&mut rng(11), ids.len(), DIM);
    let e = gate.enroll("t", &rows, DIM, &ids).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // The officer's token reaches the nodes, which check it again and audit it.
    officer.enroll("t", &rows, DIM, &ids).await.unwrap();
    let r = gate.identify("t", &rows[..DIM], DIM, 1, None).await.unwrap();
    assert_eq!(r[0].candidates[0].subject, ids[0]);
    let info = gate.get_gallery("t").await.unwrap();
    assert_eq!((info.subjects, info.state.as_str()), (20, "SERVING"));
    let e = gate.delete_subject("t", &ids[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // The encounter reports check the token before saying the router keeps none.
    let e = nobody.encounter_history(&ids[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = gate.overstays("72h", "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let wrong = as_who(Some("not-a-token-0123456789")).await;
    let e = wrong.identify("t", &rows[..DIM], DIM, 1, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // The router audits every call, refusals included, by caller name: never a token
    // or a template.
    let audit = cluster.router.audit_log();
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let line = |method: &str, caller: &str, outcome: &str| {
        lines
            .iter()
            .any(|l| l["method"] == method && l["caller"] == caller && l["outcome"] == outcome)
    };
    for (method, caller, outcome) in [
        ("ListGalleries", "-", "UNAUTHENTICATED"),
        ("CreateGallery", "gate-A12", "PERMISSION_DENIED"),
        ("CreateGallery", "ops", "ok"),
        ("Enroll", "gate-A12", "PERMISSION_DENIED"),
        ("Enroll", "officer-7", "ok"),
        ("Identify", "gate-A12", "ok"),
        ("Identify", "-", "UNAUTHENTICATED"),
        ("GetGallery", "gate-A12", "ok"),
        ("DeleteSubject", "gate-A12", "PERMISSION_DENIED"),
        ("EncounterHistory", "-", "UNAUTHENTICATED"),
        ("Overstays", "gate-A12", "PERMISSION_DENIED"),
    ] {
        assert!(
            line(method, caller, outcome),
            "no {method} {caller} {outcome} line in the router's audit log:\n{audit}"
        );
    }
    let enrolled = lines
        .iter()
        .find(|l| l["method"] == "Enroll" && l["outcome"] == "ok")
        .unwrap();
    assert_eq!(enrolled["count"], 20, "{enrolled}");
    assert_eq!(enrolled["gallery"], "t", "{enrolled}");
    assert_eq!(enrolled["subjects"][0][0], ids[0], "{enrolled}");
    let identified = lines
        .iter()
        .find(|l| l["method"] == "Identify" && l["outcome"] == "ok")
        .unwrap();
    assert_eq!(identified["subjects"][0][0], ids[0], "{identified}");
    assert_eq!(identified["gallery"], "t", "{identified}");
    for secret in [
        "gate-token-0123456789",
        "officer-token-0123456789",
        "admin-token-0123456789",
        "not-a-token",
    ] {
        assert!(!audit.contains(secret), "a token in the router's audit log");
    }
    assert!(!audit.contains("templates"), "templates in the router's audit log");

    // The router answers grpc.health.v1, as a server does (no token needed).
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", cluster.router.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "biogate.v1.Biogate".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);

    // A second process under a live node's name is refused, naming the holder.
    let twin = std::process::Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args([
            "serve",
            "--etcd",
            &cluster.etcd.urls(),
            "--node",
            "n1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--store")
        .arg(format!("file://{}", cluster.dir.path().join("objects").display()))
        .arg("--data-dir")
        .arg(cluster.dir.path().join("twin"))
        .args(["--metrics-listen", "off"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&twin.stderr);
    assert!(
        !twin.status.success() && said.contains("already has that name"),
        "{said}"
    );
    let audit = std::fs::read_to_string(cluster.dir.path().join("n1").join("audit.log")).unwrap()
        + &std::fs::read_to_string(cluster.dir.path().join("n2").join("audit.log")).unwrap();
    assert!(audit.contains("officer-7") && audit.contains("\"Enroll\""), "{audit}");
    assert!(!audit.contains("officer-token"), "a token in the audit log");
}
