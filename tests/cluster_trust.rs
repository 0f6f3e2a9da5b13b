//! The cluster's trust findings (issue 24), each as real processes on loopback (etcd,
//! `serve --etcd` nodes, `router`), each failing on the code before its fix:
//!
//! - Dropping a gallery drops nothing of a gallery whose name it begins (`fl` and
//!   `fl-2`, `fl2`, `flights`), on any node, also after every node restarts; and it
//!   leaves no checkpoint behind for a gallery made again under the name.
//! - A replica restarted after a seal that re-logged deletions applies the next batch
//!   (it once took the log's moved position for that batch having reached the disk,
//!   and reported itself caught up without it).
//! - The router refuses a multi-gallery search exactly as a server does (at most 8
//!   galleries, none twice, k and threshold per gallery only): one check for both.
//! - A paused node (SIGSTOP) fails no search through the router: a read it does not
//!   answer in time is hedged to the other replica (the latencies are printed for
//!   RELIABILITY.md).
//! - A replica that cannot be opened (its checkpoint lost from the object store) keeps
//!   no other replica of its node from serving.
//!
//! - Writes keep flowing while a checkpoint uploads to a slow object store: no commit
//!   waits on an upload (each once waited out every file's upload in the apply loop).
//! - A router whose watch delivers late still reads what another router acknowledged
//!   a moment before (a gallery made, subjects enrolled, the gallery dropped): each
//!   read waits until its view reaches etcd's revision. The nemesis found a search of
//!   a new `fl` answering a subject of the dropped one.
//! - A node answers a read the router sent only from the replica the router chose: of
//!   that gallery (not one dropped and made again under the name), and at least at the
//!   shard's visible batch.
//! - A node cut off from etcd past its lease answers no read of its replicas (it may
//!   be out of the cluster and behind), and answers again once it has renewed it.
//! - A checkpoint paused across a drop deletes nothing of the next gallery of its
//!   name's log (the nemesis saw the next `fl`'s first batch deleted).
//! - A commit paused across a drop leaves no visible mark for the next gallery of its
//!   name (the nemesis found the next `fl` waiting forever on the dropped one's mark).
//! - A replica whose applied mark is gone from etcd (deleted, or taken with the lease
//!   it was put under) publishes it again (the nemesis found replicas of a re-created
//!   `fl` never serving again).
//! - A commit whose answer was lost, refused on its retry after the batch had been
//!   applied and its log key deleted, takes effect once (the nemesis found the batch
//!   committed again under the next number, and the shard wedged).
//! - A router whose view lost etcd (its member died) while the other members hold a
//!   quorum serves no stale read: it asks them, and waits for its view (the nemesis
//!   found a new `fl` answering a subject of the dropped one).
//!
//! They skip when etcd is not installed, unless BIOGATE_REQUIRE_ETCD=1 (as in CI).
#![cfg(feature = "cli")]

mod common;

use biogate::client::Client;
use biogate::cluster::{etcd, keys};
use common::cluster::{Cluster, Node, etcd_available, eventually, router_with_env, wait_for_port};
use common::{random_rows, rng};
use std::time::{Duration, Instant};
use tonic::Code;

const DIM: usize = 16;

async fn create(c: &Client, name: &str, shards: u32, replicas: u32) {
    c.create_sharded_gallery(name, DIM as u32, "f32", shards, replicas)
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    caught_up(c, name).await;
}

/// Wait until every shard of `g` has serving replicas, each at the shard's last batch,
/// and the router reaches one of each (a node just restarted may still be opening).
async fn caught_up(c: &Client, g: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("{g}: every replica caught up"),
        || async {
            c.get_gallery(g).await.is_ok_and(|info| {
                info.state == "SERVING"
                    && info.shard_health.iter().all(|s| {
                        !s.replicas.is_empty() && s.replicas.iter().all(|r| r.serving && r.applied == s.committed)
                    })
            })
        },
    )
    .await;
}

/// Enroll one template each for `ids` (rows from `seed`); returns the rows.
async fn enroll(c: &Client, g: &str, ids: &[String], seed: u64) -> Vec<f32> {
    let rows = random_rows(&mut rng(seed), ids.len(), DIM);
    c.enroll(g, &rows, DIM, ids)
        .await
        .unwrap_or_else(|e| panic!("enrolling into {g}: {e}"));
    rows
}

/// Each of `ids` is its own best match in `g` through `c`, and `g` holds exactly them.
async fn holds_exactly(c: &Client, g: &str, ids: &[String], rows: &[f32], what: &str) {
    let info = c.get_gallery(g).await.unwrap_or_else(|e| panic!("{what}: {g}: {e}"));
    assert_eq!(info.subjects, ids.len() as u64, "{what}: {g} subjects");
    let results = c.identify(g, rows, DIM, 1, None).await.unwrap();
    for (id, r) in ids.iter().zip(&results) {
        assert_eq!(
            r.candidates.first().map(|c| c.subject.as_str()),
            Some(id.as_str()),
            "{what}: {g}"
        );
    }
}

/// A cluster of one node, `n1`, started with `flags` and `env` (fault knobs).
async fn one_node_with(flags: &[&str], env: &[(&str, &str)]) -> Cluster {
    let mut cluster = Cluster::start(0, &[]).await;
    let node = Node::start_with_env("n1", cluster.dir.path(), &cluster.etcd.urls(), flags, env);
    wait_for_port(node.port()).await;
    cluster.nodes.push(node);
    cluster
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_gallery_leaves_the_galleries_its_name_begins_whole() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(2, &["--checkpoint-every", "2"]).await;
    let router = cluster.router.client().await;
    let names = ["fl", "fl-2", "fl2", "flights"];
    let mut held = Vec::new();
    for (i, g) in names.iter().enumerate() {
        create(&router, g, 2, 2).await;
        // Three batches each: enough for a checkpoint of every shard.
        let mut all_ids = Vec::new();
        let mut all_rows = Vec::new();
        for b in 0..3 {
            let batch = ids(&format!("{g}-b{b}"), 6);
            all_rows.extend(enroll(&router, g, &batch, (i * 10 + b) as u64).await);
            all_ids.extend(batch);
        }
        held.push((g.to_string(), all_ids, all_rows));
    }
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    eventually(Duration::from_secs(20), "a checkpoint of fl", || async {
        !etcd
            .get_prefix(&format!("{}fl/", keys::CHECKPOINTS))
            .await
            .unwrap()
            .0
            .is_empty()
    })
    .await;

    router.drop_gallery("fl").await.unwrap();
    let e = router.get_gallery("fl").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // The nodes drop the replicas of `fl` (and only those) when they see its keys go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (g, ids, rows) in &held[1..] {
        caught_up(&router, g).await;
        holds_exactly(&router, g, ids, rows, "after dropping fl").await;
    }
    for n in &mut cluster.nodes {
        n.kill9();
        n.restart();
    }
    for (g, ids, rows) in &held[1..] {
        caught_up(&router, g).await;
        holds_exactly(&router, g, ids, rows, "after dropping fl and restarting every node").await;
    }

    // Nothing of `fl` is left in etcd (no checkpoint for a gallery made again).
    for prefix in [
        keys::CHECKPOINTS,
        keys::SHARDS,
        keys::LOG,
        keys::VISIBLE,
        keys::APPLIED,
        keys::COMMITTED,
    ] {
        let left = etcd.get_prefix(&format!("{prefix}fl/")).await.unwrap().0;
        assert!(left.is_empty(), "{prefix}fl/ still has {} keys", left.len());
    }

    // Made again under the name, it starts empty and takes batches from its own first.
    create(&router, "fl", 2, 2).await;
    assert_eq!(router.get_gallery("fl").await.unwrap().subjects, 0);
    let again = ids("fl-again", 5);
    let rows = enroll(&router, "fl", &again, 99).await;
    caught_up(&router, "fl").await;
    holds_exactly(&router, "fl", &again, &rows, "fl made again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_restarted_after_a_seal_applies_the_next_batch() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("seal.toml");
    // Seal the log at every 4 templates, and no background merges to move things.
    std::fs::write(&config, "seal_log_rows = 4\nmerge_segments = 0\n").unwrap();
    let config = config.display().to_string();
    let flags = ["--config", config.as_str()];
    let mut cluster = Cluster::start_in(dir, 2, &flags, &[]).await;
    let router = cluster.router.client().await;
    create(&router, "g", 1, 2).await;

    let first = ids("a", 5);
    let first_rows = enroll(&router, "g", &first, 1).await; // batch 1: sealed
    router.delete_subject("g", &first[0]).await.unwrap(); // batch 2: a deletion in a segment
    let second = ids("b", 5);
    let second_rows = enroll(&router, "g", &second, 2).await; // batch 3: sealed, the deletion re-logged
    caught_up(&router, "g").await;

    for restarted in 0..2 {
        cluster.nodes[restarted].kill9();
        cluster.nodes[restarted].restart();
        caught_up(&router, "g").await;
        let after = vec![format!("after-restart-{restarted}")];
        let after_rows = enroll(&router, "g", &after, 10 + restarted as u64).await;
        caught_up(&router, "g").await;
        // Every replica, asked directly, holds what was acknowledged.
        for n in &cluster.nodes {
            let node = n.client().await;
            let what = format!("{} after restarting {}", n.name, cluster.nodes[restarted].name);
            for (id, row) in after.iter().zip(after_rows.chunks(DIM)) {
                let r = node.identify("g.s0", row, DIM, 1, None).await.unwrap();
                assert_eq!(
                    r[0].candidates.first().map(|c| c.subject.as_str()),
                    Some(id.as_str()),
                    "{what}: the batch after the restart"
                );
            }
            let e = node
                .verify("g.s0", &first_rows[..DIM], &first[0], None)
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{what}: the deleted subject: {e}");
            let r = node.identify("g.s0", &second_rows, DIM, 1, None).await.unwrap();
            for (id, res) in second.iter().zip(&r) {
                assert_eq!(res.candidates[0].subject, *id, "{what}");
            }
            let info = node.get_gallery("g.s0").await.unwrap();
            assert_eq!(info.subjects, (4 + 5 + restarted + 1) as u64, "{what}: subjects");
        }
    }
}

/// Remove every file or folder under `dir` whose name starts with `prefix`.
fn remove_named(dir: &std::path::Path, prefix: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
            n += 1;
        } else if path.is_dir() {
            n += remove_named(&path, prefix);
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_cannot_be_opened_keeps_no_other_from_serving() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(1, &["--checkpoint-every", "1"]).await;
    let router = cluster.router.client().await;
    let mut held = Vec::new();
    for (i, g) in ["a", "b"].iter().enumerate() {
        create(&router, g, 1, 1).await;
        let mut all_ids = Vec::new();
        let mut all_rows = Vec::new();
        for b in 0..3 {
            let batch = ids(&format!("{g}{b}"), 4);
            all_rows.extend(enroll(&router, g, &batch, (i * 10 + b) as u64).await);
            all_ids.extend(batch);
        }
        held.push((g.to_string(), all_ids, all_rows));
    }
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    eventually(
        Duration::from_secs(20),
        "checkpoints of a and b, the logs before them deleted",
        || async {
            let mut ok = true;
            for g in ["a", "b"] {
                let cps = etcd.get_prefix(&format!("{}{g}/", keys::CHECKPOINTS)).await.unwrap().0;
                let log = etcd.get_prefix(&keys::log_prefix(g, 0)).await.unwrap().0;
                ok &= !cps.is_empty() && log.len() == 1;
            }
            ok
        },
    )
    .await;
    // The node loses its copy of `a`, and the object store loses `a`'s checkpoint: `a`
    // cannot be opened again (its log before the checkpoint is gone too).
    cluster.nodes[0].kill9();
    let root = cluster.dir.path().to_path_buf();
    assert!(remove_named(&root.join("n1"), "a.s0") >= 2, "a's replica and cursor");
    let objects = root.join("objects").join("galleries");
    let a_objects: Vec<_> = std::fs::read_dir(&objects)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("a-"))
        .collect();
    assert_eq!(a_objects.len(), 1);
    assert!(remove_named(&a_objects[0].path(), "checkpoints") >= 1);
    cluster.nodes[0].restart();
    // Past the killed process's lease (its keys said it held both replicas).
    tokio::time::sleep(Duration::from_secs(biogate::cluster::node::LEASE_TTL_S as u64 + 1)).await;

    let (_, b_ids, b_rows) = &held[1];
    caught_up(&router, "b").await;
    holds_exactly(&router, "b", b_ids, b_rows, "b, next to an a that cannot be opened").await;
    let a = router.get_gallery("a").await.unwrap();
    assert_eq!(a.state, "NOT_SERVING", "{a:?}");
    eventually(
        Duration::from_secs(10),
        "the node names the replica it cannot open",
        || async { cluster.nodes[0].log().contains("opening a replica failed") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_refuses_a_bad_multi_gallery_search_as_a_server_does() {
    use biogate::client::pack;
    use biogate::server::proto;
    if !etcd_available() {
        return;
    }
    let cluster = Cluster::start(1, &[]).await;
    let router = cluster.router.client().await;
    let single_server = biogate::server::start(common::server::config(&cluster.dir.path().join("single")))
        .await
        .unwrap();
    let single = common::server::connect(&single_server, None).await;
    for g in ["a", "b"] {
        create(&router, g, 1, 1).await;
        single.create_gallery(g, DIM as u32, "f32").await.unwrap();
    }
    let probe = pack(&random_rows(&mut rng(3), 1, DIM));
    let search = |g: &str| proto::GallerySearch {
        gallery: g.into(),
        k: 3,
        threshold: None,
    };
    let nine: Vec<_> = (0..9).map(|i| search(if i % 2 == 0 { "a" } else { "b" })).collect();
    let cases = [
        ("nine galleries", "", 0, None, nine),
        (
            "a gallery twice",
            "",
            0,
            None,
            vec![search("a"), search("b"), search("a")],
        ),
        ("k beside galleries", "", 5, None, vec![search("a"), search("b")]),
        (
            "a threshold beside galleries",
            "",
            0,
            Some(0.5),
            vec![search("a"), search("b")],
        ),
        ("gallery beside galleries", "a", 0, None, vec![search("b")]),
    ];
    for (what, gallery, k, threshold, galleries) in cases {
        let request = proto::IdentifyRequest {
            gallery: gallery.into(),
            probes: vec![probe.clone()],
            k,
            threshold,
            galleries,
            ..Default::default()
        };
        let from_router = router
            .raw()
            .identify(router.request(request.clone()))
            .await
            .unwrap_err();
        let from_server = single.raw().identify(single.request(request)).await.unwrap_err();
        assert_eq!(from_server.code(), Code::InvalidArgument, "{what}: {from_server}");
        assert_eq!(
            (from_router.code(), from_router.message()),
            (from_server.code(), from_server.message()),
            "{what}"
        );
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_node_fails_no_search_through_the_router() {
    if !etcd_available() {
        return;
    }
    let cluster = Cluster::start(2, &[]).await;
    let router = cluster.router.client().await;
    create(&router, "g", 2, 2).await;
    let people = ids("p", 40);
    let rows = enroll(&router, "g", &people, 5).await;
    caught_up(&router, "g").await;
    // Each search: one probe, rank 1 its own subject, answered within 1 s (the node's
    // lease is 3 s: waiting it out would fail these).
    let searches = |n: usize| {
        let (router, people, rows) = (&router, &people, &rows);
        async move {
            let mut took = Vec::with_capacity(n);
            for i in 0..n {
                let who = i % people.len();
                let began = std::time::Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(1),
                    router.identify("g", &rows[who * DIM..(who + 1) * DIM], DIM, 1, None),
                )
                .await
                .unwrap_or_else(|_| panic!("search {i} did not answer within 1 s"))
                .unwrap_or_else(|e| panic!("search {i}: {e}"));
                took.push(began.elapsed());
                assert_eq!(r[0].candidates[0].subject, people[who], "search {i}");
            }
            took
        }
    };
    let normal = p99(searches(200).await);
    cluster.nodes[1].pause();
    let paused = searches(200).await;
    let (paused_p99, paused_max) = (p99(paused.clone()), *paused.iter().max().unwrap());
    cluster.nodes[1].resume();
    eprintln!(
        "router searches, 2 shards x 2 replicas: p99 {normal:?} with both nodes; with one paused p99 {paused_p99:?}, max {paused_max:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_keep_flowing_while_a_checkpoint_uploads() {
    if !etcd_available() {
        return;
    }
    // Every file upload takes 2.5 s more (a slow remote store); a checkpoint of a few
    // files takes about 10 s.
    let mut cluster = Cluster::start(0, &[]).await;
    for name in ["n1", "n2"] {
        let node = Node::start_with_env(
            name,
            cluster.dir.path(),
            &cluster.etcd.urls(),
            &["--checkpoint-every", "2"],
            &[("BIOGATE_FAULT_SLOW_UPLOAD_MS", "2500")],
        );
        wait_for_port(node.port()).await;
        cluster.nodes.push(node);
    }
    let router = cluster.router.client().await;
    create(&router, "g", 1, 2).await;
    let (mut all_ids, mut all_rows, mut took) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..8 {
        let batch = ids(&format!("b{b}"), 3);
        let t = Instant::now();
        all_rows.extend(enroll(&router, "g", &batch, 300 + b).await);
        took.push(t.elapsed());
        all_ids.extend(batch);
    }
    let slowest = took.iter().max().copied().unwrap();
    println!("commits during checkpoints: {took:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a commit took {slowest:?} while a checkpoint uploaded: {took:?}"
    );
    // The checkpoints do get published, and the gallery holds every batch.
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    eventually(Duration::from_secs(40), "a checkpoint of g", || async {
        !etcd
            .get_prefix(&format!("{}g/", keys::CHECKPOINTS))
            .await
            .unwrap()
            .0
            .is_empty()
    })
    .await;
    caught_up(&router, "g").await;
    holds_exactly(&router, "g", &all_ids, &all_rows, "after checkpoints").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answers_are_lost_takes_effect_once() {
    if !etcd_available() {
        return;
    }
    // One node reaching etcd through proxies that hold etcd's answers back: its commit
    // reaches etcd, the answer does not, and each retry on another member finds the
    // number taken (by itself).
    let mut cluster = Cluster::start(0, &[]).await;
    let proxy = common::etcd_proxy::EtcdProxy::start(cluster.etcd.client_ports()).await;
    let node = Node::start_via("n1", cluster.dir.path(), &proxy.urls(), &[]);
    wait_for_port(node.port()).await;
    cluster.nodes.push(node);
    let router = cluster.router.client().await;
    create(&router, "g", 1, 1).await;
    let first = ids("a", 4);
    let mut rows = enroll(&router, "g", &first, 400).await;
    proxy.set(common::etcd_proxy::Mode::StallAnswers);
    let second = ids("b", 4);
    let second_rows = random_rows(&mut rng(401), second.len(), DIM);
    let healer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        proxy.set(common::etcd_proxy::Mode::Pass);
        proxy
    });
    let answer = router.enroll("g", &second_rows, DIM, &second).await;
    let _proxy = healer.await.unwrap();
    println!("the enrollment whose commit answers were held back: {answer:?}");
    // Committed (etcd got the request): OK, or UNKNOWN; never a refusal a client
    // would read as "nothing happened".
    if let Err(e) = &answer {
        assert_eq!(e.code(), Code::Unknown, "{e}");
    }
    caught_up(&router, "g").await;
    rows.extend(second_rows);
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    holds_exactly(&router, "g", &all, &rows, "after the lost answers").await;
    // Once: as many rows as subjects (a second commit of the batch would double them).
    let info = router.get_gallery("g").await.unwrap();
    assert_eq!(info.rows, all.len() as u64, "rows: the batch was committed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_paused_across_a_drop_leaves_nothing_for_the_next_gallery_of_its_name() {
    if !etcd_available() {
        return;
    }
    // The node's commits pause 3 s before raising their visible mark (as a node
    // paused there would): the gallery is dropped, and made again, in between. The
    // nemesis found this: the dropped gallery's mark was raised after the drop, and
    // the next `fl`'s first commit (which asks for no mark) and its replicas (which
    // waited for the mark's batch) waited forever.
    let cluster = one_node_with(&[], &[("BIOGATE_FAULT_SLOW_VISIBLE_MS", "3000")]).await;
    let router = cluster.router.client().await;
    create(&router, "fl", 1, 1).await;
    let old = ids("old", 3);
    let old_rows = random_rows(&mut rng(500), old.len(), DIM);
    let paused = {
        let router = router.clone();
        let old = old.clone();
        tokio::spawn(async move { router.enroll("fl", &old_rows, DIM, &old).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    router.drop_gallery("fl").await.expect("dropping fl");
    // Its answer: the write may have taken effect in the dropped gallery, or not.
    println!("the enrollment paused across the drop: {:?}", paused.await.unwrap());
    router
        .create_sharded_gallery("fl", DIM as u32, "f32", 1, 1)
        .await
        .expect("making fl again");
    let new = ids("new", 4);
    let new_rows = random_rows(&mut rng(501), new.len(), DIM);
    let enrolled = tokio::time::timeout(Duration::from_secs(20), router.enroll("fl", &new_rows, DIM, &new)).await;
    assert!(
        matches!(enrolled, Ok(Ok(_))),
        "the first enrollment into the new fl: {enrolled:?} (a mark left by the dropped fl?)"
    );
    caught_up(&router, "fl").await;
    holds_exactly(&router, "fl", &new, &new_rows, "the new fl").await;
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    let (marks, _) = etcd.get_prefix(&format!("{}fl/", keys::VISIBLE)).await.unwrap();
    let marks: Vec<(String, u64)> = marks
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let seq = keys::decode(&key, &kv.value).unwrap();
            (key, seq)
        })
        .collect();
    // The enrollment's messages may take one batch or more; the mark is the new log's.
    let (log, _) = etcd.get_prefix(&keys::log_prefix("fl", 0)).await.unwrap();
    assert_eq!(
        marks,
        vec![(keys::visible_key("fl", 0), log.len() as u64)],
        "the new fl's visible marks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_whose_watch_lags_reads_what_another_router_acknowledged() {
    if !etcd_available() {
        return;
    }
    // Router `late` gets each watch answer 150 ms late (an overloaded process): without
    // reading etcd before a read, it answered NOT_FOUND for a gallery another router
    // had just made, and missed subjects another had just enrolled.
    let cluster = Cluster::start(1, &[]).await;
    let late = router_with_env(&cluster.etcd, &[], &[("BIOGATE_FAULT_SLOW_WATCH_MS", "150")]);
    wait_for_port(late.port).await;
    let (first, late_client) = (cluster.router.client().await, late.client().await);
    for round in 0..3u64 {
        let g = format!("w{round}");
        create(&first, &g, 1, 1).await;
        let found = late_client.get_gallery(&g).await;
        assert!(
            found.is_ok(),
            "round {round}: {g} made through the other router: {found:?}"
        );
        let who = ids(&format!("r{round}"), 3);
        let rows = enroll(&first, &g, &who, 600 + round).await;
        let answers = late_client.identify(&g, &rows, DIM, 1, None).await;
        let answers = answers.unwrap_or_else(|e| panic!("round {round}: searching {g} after the enrollment: {e}"));
        for (id, r) in who.iter().zip(&answers) {
            assert_eq!(
                r.candidates.first().map(|c| c.subject.as_str()),
                Some(id.as_str()),
                "round {round}: enrolled through the other router"
            );
        }
        first.drop_gallery(&g).await.unwrap();
        let gone = late_client.identify(&g, &rows, DIM, 1, None).await;
        assert_eq!(
            gone.as_ref().map_err(|e| e.code()).err(),
            Some(Code::NotFound),
            "round {round}: {g} dropped through the other router: {gone:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_answers_a_routed_read_only_from_the_replica_the_router_chose() {
    if !etcd_available() {
        return;
    }
    let cluster = Cluster::start(1, &[]).await;
    let router = cluster.router.client().await;
    create(&router, "g", 1, 1).await;
    let who = ids("s", 3);
    let rows = enroll(&router, "g", &who, 700).await;
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    let meta: keys::GalleryMeta = {
        let kv = etcd
            .get(&keys::gallery_key("g"))
            .await
            .unwrap()
            .expect("g's catalogue key");
        keys::decode(&keys::gallery_key("g"), &kv.value).unwrap()
    };
    let node = cluster.nodes[0].client().await;
    let identify = |created_ms: Option<i64>, applied: u64| {
        let mut r = node.request(biogate::server::proto::IdentifyRequest {
            gallery: keys::replica_name("g", 0),
            probes: vec![rows[..DIM].iter().flat_map(|v| v.to_le_bytes()).collect()],
            k: 1,
            ..Default::default()
        });
        if let Some(c) = created_ms {
            biogate::cluster::node::reads::expect(r.metadata_mut(), c, applied);
        }
        let mut raw = node.raw();
        async move { raw.identify(r).await.map(|a| a.into_inner()) }
    };
    // The enrollment's messages took one batch or more.
    let at = router.get_gallery("g").await.unwrap().shard_health[0].committed;
    // The replica the router chose: answered.
    let ok = identify(Some(meta.created_ms), at)
        .await
        .expect("the replica the router chose");
    assert_eq!(ok.results[0].candidates[0].subject, who[0]);
    // Unmarked (a client talking to the node directly): answered.
    identify(None, 0).await.expect("an unmarked read");
    // Another gallery of the name (one dropped and made again): refused.
    let other = identify(Some(meta.created_ms + 1), at).await.unwrap_err();
    assert_eq!(other.code(), Code::Unavailable, "{other}");
    assert!(other.message().contains("another gallery"), "{other}");
    // A batch the replica has not applied: refused.
    let behind = identify(Some(meta.created_ms), at + 1).await.unwrap_err();
    assert_eq!(behind.code(), Code::Unavailable, "{behind}");
    let says = format!("has applied batch {at} of {}", at + 1);
    assert!(behind.message().contains(&says), "{behind}");
    // GetGallery is checked the same way.
    let mut info = node.request(biogate::server::proto::GetGalleryRequest {
        name: keys::replica_name("g", 0),
    });
    biogate::cluster::node::reads::expect(info.metadata_mut(), meta.created_ms + 1, 0);
    let e = node.raw().get_gallery(info).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_etcd_past_its_lease_answers_no_read() {
    if !etcd_available() {
        return;
    }
    let mut cluster = Cluster::start(0, &[]).await;
    let proxy = common::etcd_proxy::EtcdProxy::start(cluster.etcd.client_ports()).await;
    let node = Node::start_via("n1", cluster.dir.path(), &proxy.urls(), &[]);
    wait_for_port(node.port()).await;
    cluster.nodes.push(node);
    let router = cluster.router.client().await;
    create(&router, "g", 1, 1).await;
    let who = ids("s", 3);
    let rows = enroll(&router, "g", &who, 800).await;
    let direct = cluster.nodes[0].client().await;
    let local = keys::replica_name("g", 0);
    let first = direct
        .identify(&local, &rows[..DIM], DIM, 1, None)
        .await
        .expect("a direct read");
    assert_eq!(first[0].candidates[0].subject, who[0]);
    // Partitioned from etcd for longer than its 3 s lease: out of the cluster (its
    // replica could be placed elsewhere, a drop go unseen), so it fences itself.
    proxy.set(common::etcd_proxy::Mode::Cut);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let fenced = direct.identify(&local, &rows[..DIM], DIM, 1, None).await;
    let e = fenced.expect_err("a read from a node whose lease lapsed");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("lease"), "{e}");
    // Healed: it registers again and answers.
    proxy.set(common::etcd_proxy::Mode::Pass);
    eventually(Duration::from_secs(20), "the node answering again", || async {
        direct.identify(&local, &rows[..DIM], DIM, 1, None).await.is_ok()
    })
    .await;
    caught_up(&router, "g").await;
    holds_exactly(&router, "g", &who, &rows, "after the partition").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_paused_across_a_drop_deletes_nothing_of_the_next_gallery() {
    if !etcd_available() {
        return;
    }
    // Checkpoints every 2 batches, each pausing 4 s before it deletes the log it
    // covers: `fl` is dropped and made again, and its first batch committed, in between.
    let mut cluster = one_node_with(
        &["--checkpoint-every", "2"],
        &[("BIOGATE_FAULT_SLOW_LOG_DELETION_MS", "4000")],
    )
    .await;
    let router = cluster.router.client().await;
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    create(&router, "fl", 1, 1).await;
    for b in 0..3 {
        enroll(&router, "fl", &ids(&format!("old{b}"), 1), 900 + b).await;
    }
    eventually(Duration::from_secs(20), "a checkpoint of the first fl", || async {
        etcd.get(&keys::checkpoint_key("fl", 0)).await.unwrap().is_some()
    })
    .await;
    router.drop_gallery("fl").await.unwrap();
    create(&router, "fl", 1, 1).await;
    let new = ids("new", 1);
    let rows = enroll(&router, "fl", &new, 950).await;
    // The paused deletion has run by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (log, _) = etcd.get_prefix(&keys::log_prefix("fl", 0)).await.unwrap();
    assert!(
        etcd.get(&keys::log_key("fl", 0, 1)).await.unwrap().is_some(),
        "the new fl's first batch was deleted from its log ({} batches left)",
        log.len()
    );
    // And a replica made now (the node restarted without its files) gets it.
    cluster.nodes[0].kill9();
    std::fs::remove_dir_all(cluster.dir.path().join("n1")).unwrap();
    cluster.nodes[0].restart();
    wait_for_port(cluster.nodes[0].port()).await;
    caught_up(&router, "fl").await;
    holds_exactly(&router, "fl", &new, &rows, "the new fl, rebuilt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_applied_mark_is_gone_publishes_it_again() {
    if !etcd_available() {
        return;
    }
    // The nemesis (seeds 6062, 6100) saw a replica of a re-created `fl` stay out of
    // service for good: its applied mark was gone from etcd (taken with the lease it
    // was put under while its node was paused, or by a late deletion of the dropped
    // gallery's mark, which has the same key), and the replica, having published that
    // batch once, never published it again.
    let cluster = Cluster::start(1, &[]).await;
    let router = cluster.router.client().await;
    create(&router, "g", 1, 1).await;
    let who = ids("s", 3);
    let rows = enroll(&router, "g", &who, 1100).await;
    caught_up(&router, "g").await;
    let etcd = etcd::Etcd::connect(&cluster.etcd.urls().split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    let mark = keys::applied_key("g", 0, "n1");
    assert!(etcd.get(&mark).await.unwrap().is_some(), "n1's applied mark of g");
    etcd.delete(&mark).await.unwrap();
    // No write follows: only the replica noticing its mark gone brings it back.
    caught_up(&router, "g").await;
    assert!(
        etcd.get(&mark).await.unwrap().is_some(),
        "n1's applied mark of g, published again"
    );
    holds_exactly(&router, "g", &who, &rows, "after the mark was deleted").await;
    // The same through a lease: paused past it, the node's marks went with it.
    cluster.nodes[0].pause();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    cluster.nodes[0].resume();
    caught_up(&router, "g").await;
    holds_exactly(&router, "g", &who, &rows, "after the node's lease expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_refused_on_a_retry_after_its_batch_was_deleted_takes_effect_once() {
    if !etcd_available() {
        return;
    }
    // The nemesis (seed 8108) saw one batch committed twice: its commit took effect,
    // the answer was lost, and before the retry on another member was refused the
    // batch had been applied and its log key deleted after a checkpoint; reading the
    // key back found nothing, the commit took the refusal for another writer's and
    // committed the batch again under the next number, whose object went with the
    // first's: the shard wedged. Here the answer of the commit of `lost` is lost until
    // its key is gone (BIOGATE_FAULT_LOSE_COMMIT_ANSWER), a checkpoint after every
    // batch, and the other replica commits the batch after it.
    let mut cluster = Cluster::start(0, &[]).await;
    let urls = cluster.etcd.urls();
    for name in ["n1", "n2"] {
        let node = Node::start_with_env(
            name,
            cluster.dir.path(),
            &urls,
            &["--checkpoint-every", "1"],
            &[("BIOGATE_FAULT_LOSE_COMMIT_ANSWER", "lost")],
        );
        wait_for_port(node.port()).await;
        cluster.nodes.push(node);
    }
    let router = cluster.router.client().await;
    create(&router, "g", 1, 2).await;
    let first = ids("a", 1);
    let mut rows = enroll(&router, "g", &first, 1200).await;
    let lost_rows = random_rows(&mut rng(1201), 1, DIM);
    let lost = {
        let (router, lost_rows) = (router.clone(), lost_rows.clone());
        tokio::spawn(async move { router.enroll("g", &lost_rows, DIM, &["lost".to_string()]).await })
    };
    // Batch 2 is `lost`'s: the other node commits batch 3.
    let etcd = etcd::Etcd::connect(&urls.split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap();
    let waited = Instant::now();
    let committer = loop {
        if let Some(kv) = etcd.get(&keys::log_key("g", 0, 2)).await.unwrap() {
            let entry: keys::LogEntry = keys::decode(&keys::log_key("g", 0, 2), &kv.value).unwrap();
            break entry.node;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "lost was not committed as batch 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.name != committer)
        .expect("the other node");
    let after = ids("b", 1);
    let after_rows = random_rows(&mut rng(1202), 1, DIM);
    other
        .client()
        .await
        .enroll(&keys::replica_name("g", 0), &after_rows, DIM, &after)
        .await
        .expect("the batch after lost's, on the other replica");
    let answer = tokio::time::timeout(Duration::from_secs(60), lost)
        .await
        .expect("lost's enrollment answered")
        .unwrap();
    answer.expect("lost's enrollment: committed once, and answered OK");
    rows.extend(lost_rows);
    rows.extend(after_rows);
    let all: Vec<String> = first
        .iter()
        .chain(&["lost".to_string()])
        .chain(&after)
        .cloned()
        .collect();
    caught_up(&router, "g").await;
    holds_exactly(&router, "g", &all, &rows, "after the refused retry").await;
    let info = router.get_gallery("g").await.unwrap();
    assert_eq!(info.rows, all.len() as u64, "rows: the batch was committed twice");
    assert_eq!(info.shard_health[0].committed, 3, "one batch each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_whose_etcd_member_dies_serves_no_stale_read() {
    if !etcd_available() {
        return;
    }
    // Router `r1` follows etcd through member 0 (its first URL), and once its view has
    // lost etcd it waits 30 s before following again (the moment after a member dies,
    // made long). The nemesis (seed 20094) saw such a router answer a search of a new
    // `fl` with a subject of the dropped one: with its view lost it answered from the
    // last known state, while members 1 and 2 still held a quorum.
    let mut cluster = Cluster::start(0, &[]).await;
    let n1 = Node::start_via("n1", cluster.dir.path(), &cluster.etcd.urls(), &[]);
    wait_for_port(n1.port()).await;
    cluster.nodes.push(n1);
    let proxy = common::etcd_proxy::EtcdProxy::start(cluster.etcd.client_ports()).await;
    let n2 = Node::start_via("n2", cluster.dir.path(), &proxy.urls(), &[]);
    wait_for_port(n2.port()).await;
    cluster.nodes.push(n2);
    let r1 = router_with_env(&cluster.etcd, &[], &[("BIOGATE_FAULT_SLOW_VIEW_RECONNECT_MS", "30000")]);
    wait_for_port(r1.port).await;
    let (router, stale) = (cluster.router.client().await, r1.client().await);
    create(&router, "g", 1, 2).await;
    let who = ids("s", 2);
    let rows = enroll(&router, "g", &who, 900).await;
    let probe = &rows[..DIM];
    let before = stale
        .identify("g", probe, DIM, 1, None)
        .await
        .expect("r1 before the faults");
    assert_eq!(before[0].candidates[0].subject, who[0]);
    // r1's view loses etcd; then n2 is cut off (its lease lapses, unseen by r1), and
    // who[0] is deleted through the other router (committed by n1 alone).
    cluster.etcd.kill_member(0);
    proxy.set(common::etcd_proxy::Mode::Cut);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    eventually(Duration::from_secs(20), "the deletion acknowledged", || async {
        router.delete_subject("g", &who[0]).await.is_ok()
    })
    .await;
    // Every search through r1 now either fails or answers without who[0]: n2 still
    // holds it, and r1's last known state still counts n2 as serving.
    let mut refused = 0;
    for attempt in 0..8 {
        match stale.identify("g", probe, DIM, 1, None).await {
            Ok(answer) => {
                let top = answer[0].candidates.first().map(|c| c.subject.clone());
                assert_ne!(
                    top.as_deref(),
                    Some(who[0].as_str()),
                    "search {attempt} through r1 answered a subject whose deletion was acknowledged"
                );
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                refused += 1;
            }
        }
    }
    println!("r1 with its view lost: {refused} of 8 searches UNAVAILABLE, none stale");
    // Once r1 follows etcd again it answers, without who[0].
    cluster.etcd.start_member(0);
    proxy.set(common::etcd_proxy::Mode::Pass);
    eventually(Duration::from_secs(60), "r1 answering again", || async {
        stale
            .identify("g", probe, DIM, 1, None)
            .await
            .is_ok_and(|a| a[0].candidates.first().is_none_or(|c| c.subject != who[0]))
    })
    .await;
}
