//! The encounter log through a real server on loopback: Identify with an encounter
//! context records one row per probe and gallery, durably before the answer, once per
//! request id; the reports over gRPC and on the command line; bad contexts refused
//! naming the field with nothing recorded; and kill -9 of a server under load, after
//! which every answered request's encounter is in the database exactly once.
#![cfg(feature = "cli")]

mod common;

use biogate::client::{Client, pack};
use biogate::encounters::EncounterStore;
use biogate::server::proto;
use biogate::server::start;
use common::server::{DIM, config, connect, connect_when_up, create, free_port, ids, serve_process};
use common::{random_rows, rng};
use rand::Rng;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

fn at(direction: &str, time: &str, gate: &str) -> proto::EncounterContext {
    proto::EncounterContext {
        location: "CDG".into(),
        gate: gate.into(),
        direction: direction.into(),
        device: "cam-1".into(),
        capture_time: time.into(),
    }
}

fn recorded(data: &Path) -> u64 {
    EncounterStore::open(data).unwrap().count().unwrap()
}

fn biogate(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_with_a_context_records_encounters_and_the_reports_read_them() {
    let data = tempfile::tempdir().unwrap();
    let h = start(config(data.path())).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "flight", "i8").await;
    create(&c, "watchlist", "i8").await;
    let rows = random_rows(&mut rng(71), 20, DIM);
    c.enroll("flight", &rows, DIM, &ids("p", 20)).await.unwrap();
    // p-00001 is also on the watchlist, as w-00000.
    c.enroll("watchlist", &rows[DIM..2 * DIM], DIM, &["w-00000".to_string()])
        .await
        .unwrap();
    let both = [("flight", 1, Some(0.9)), ("watchlist", 1, Some(0.9))];

    // Three travellers enter at gate A1; one of them leaves ten days later.
    let entry = c
        .identify_at(
            &both,
            &rows[..3 * DIM],
            DIM,
            at("entry", "2026-01-10T08:00:00Z", "A1"),
            None,
        )
        .await
        .unwrap();
    assert!(!entry.request_id.is_empty(), "the server names the request");
    assert_eq!(entry.galleries[1].results[1].candidates[0].subject, "w-00000");
    let exit = at("exit", "2026-01-20T08:00:00Z", "B7");
    let left = c
        .identify_at(&both[..1], &rows[..DIM], DIM, exit.clone(), Some("exit-1"))
        .await
        .unwrap();
    assert_eq!(left.request_id, "exit-1");
    assert_eq!(recorded(data.path()), 3 * 2 + 1);
    // A retried request id is recorded once; a request without a context not at all.
    c.identify_at(&both[..1], &rows[..DIM], DIM, exit, Some("exit-1"))
        .await
        .unwrap();
    c.identify("flight", &rows[..DIM], DIM, 1, Some(0.9)).await.unwrap();
    assert_eq!(recorded(data.path()), 7);

    let history = c.encounter_history("p-00000").await.unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = history
        .iter()
        .map(|e| {
            (
                e.time.as_str(),
                e.direction.as_str(),
                e.gate.as_str(),
                e.gallery.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("2026-01-10T08:00:00Z", "entry", "A1", "flight"),
            ("2026-01-20T08:00:00Z", "exit", "B7", "flight")
        ]
    );
    assert_eq!(history[0].decision, "matched");
    assert!(history[0].score.unwrap() >= 0.9 && history[0].threshold == Some(0.9));
    // p-00001 matched in both galleries at its entry (the watchlist names it w-00000).
    assert_eq!(c.encounter_history("p-00001").await.unwrap().len(), 1);
    assert_eq!(c.encounter_history("w-00000").await.unwrap().len(), 1);

    let over: Vec<(String, String)> = c
        .overstays("5d", "2026-02-01T00:00:00Z")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.subject, o.exit))
        .collect();
    assert_eq!(
        over,
        [
            ("p-00000".to_string(), "2026-01-20T08:00:00Z".to_string()),
            ("p-00001".to_string(), String::new()),
            ("p-00002".to_string(), String::new()),
            ("w-00000".to_string(), String::new()),
        ]
    );
    assert!(c.overstays("30d", "2026-01-25T00:00:00Z").await.unwrap().is_empty());
    let stats = c.encounter_stats("gate").await.unwrap();
    let view: Vec<(&str, &str, u64, u64)> = stats
        .iter()
        .map(|s| (s.gallery.as_str(), s.key.as_str(), s.probes, s.matched))
        .collect();
    assert_eq!(
        view,
        [
            ("flight", "A1", 3, 3),
            ("flight", "B7", 1, 1),
            ("watchlist", "A1", 3, 1)
        ]
    );

    // The command line reads the same database while the server runs.
    let dir = data.path().to_str().unwrap();
    let csv = biogate(&["encounters", "--data-dir", dir, "--format", "csv", "history", "p-00000"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("time,direction,location,gate"));
    assert!(lines[1].starts_with("2026-01-10T08:00:00Z,entry,CDG,A1,cam-1,flight,p-00000"));
    let jsonl = biogate(&[
        "encounters",
        "--data-dir",
        dir,
        "--format",
        "jsonl",
        "stats",
        "--by",
        "day",
    ]);
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["day"].as_str(), first["probes"].as_str()),
        (Some("2026-01-10"), Some("3"))
    );
    let table = biogate(&[
        "encounters",
        "--data-dir",
        dir,
        "overstays",
        "--max-stay",
        "5d",
        "--as-of",
        "2026-02-01T00:00:00Z",
    ]);
    assert_eq!(table.lines().count(), 5, "{table}");

    // Bad contexts: refused naming the field, nothing searched or recorded.
    let bad = |ctx: proto::EncounterContext| {
        let c = c.clone();
        let probe = rows[..DIM].to_vec();
        async move {
            c.identify_at(&[("flight", 1, None)], &probe, DIM, ctx, None)
                .await
                .err()
                .unwrap()
        }
    };
    let future = biogate::time_text::format_time(biogate::time_text::now_ms() + 86_400_000);
    for (ctx, needle) in [
        (at("sideways", "", "A1"), "encounter.direction"),
        (at("entry", "yesterday", "A1"), "encounter.capture_time"),
        (at("entry", "2026-01-10T08:00:00", "A1"), "no time zone"),
        (at("entry", &future, "A1"), "is in the future"),
        (
            proto::EncounterContext {
                location: String::new(),
                ..at("entry", "", "A1")
            },
            "encounter.location",
        ),
    ] {
        let e = bad(ctx).await;
        assert!(
            e.code() == Code::InvalidArgument && e.message().contains(needle),
            "{needle}: {e:?}"
        );
    }
    // A stream's encounter needs the message's request id.
    let req = proto::IdentifyStreamRequest {
        gallery: "flight".into(),
        probe: pack(&rows[..DIM]),
        k: 1,
        encounter: Some(at("entry", "", "A1")),
        ..Default::default()
    };
    let mut answers = c
        .raw()
        .identify_stream(c.request(tokio_stream::iter([req.clone()])))
        .await
        .unwrap()
        .into_inner();
    let r = answers.message().await.unwrap().unwrap();
    assert_eq!(r.error_code, Code::InvalidArgument as i32, "{r:?}");
    assert!(r.error_message.contains("request_id"), "{r:?}");
    assert_eq!(recorded(data.path()), 7);
    // With one, the stream records it.
    let named = proto::IdentifyStreamRequest {
        request_id: "gate-9".into(),
        ..req
    };
    let mut answers = c
        .raw()
        .identify_stream(c.request(tokio_stream::iter([named])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().error_code, 0);
    assert_eq!(recorded(data.path()), 8);
    let e = c.overstays("soon", "").await.err().unwrap();
    assert!(
        e.code() == Code::InvalidArgument && e.message().contains("max_stay"),
        "{e:?}"
    );
    h.shutdown().await.unwrap();
}

/// kill -9 of a server while 16 gates identify with encounter contexts: after each
/// kill, every request that was answered has its encounter in the database, exactly
/// once (a request cut off before its answer may or may not have one).
#[test]
// The server is killed and waited for in each round.
#[allow(clippy::zombie_processes)]
fn kill_9_under_load_keeps_every_answered_encounter_exactly_once() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let spawn = || serve_process(port, data.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = || connect_when_up(port);
    let rows = random_rows(&mut rng(72), 8, 512);
    let mut answered: Vec<String> = Vec::new();
    let mut r = rng(73);
    for round in 0..3 {
        let mut server = spawn();
        let c: Client = rt.block_on(connect());
        if round == 0 {
            rt.block_on(c.enroll("default", &rows, 512, &ids("t", 8))).unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gates: Vec<_> = (0..16)
            .map(|gate| {
                let (c, stop, rows) = (c.clone(), stop.clone(), rows.clone());
                rt.spawn(async move {
                    let mut done = Vec::new();
                    for i in 0.. {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let id = format!("r{round}-g{gate}-{i}");
                        let probe = &rows[(i % 8) * 512..(i % 8 + 1) * 512];
                        let ctx = at(if i % 2 == 0 { "entry" } else { "exit" }, "", &format!("G{gate}"));
                        match c
                            .identify_at(&[("default", 1, Some(0.5))], probe, 512, ctx, Some(&id))
                            .await
                        {
                            Ok(_) => done.push(id),
                            Err(_) => break,
                        }
                    }
                    done
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(r.random_range(150..400)));
        server.kill().unwrap();
        server.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for g in gates {
            answered.extend(rt.block_on(g).unwrap());
        }
    }
    assert!(answered.len() > 100, "the gates were answered {} times", answered.len());
    let db = rusqlite::Connection::open(data.path().join(biogate::encounters::ENCOUNTERS_FILE)).unwrap();
    let mut st = db
        .prepare("SELECT request_id, COUNT(*) FROM encounters GROUP BY request_id")
        .unwrap();
    let counts: HashMap<String, i64> = st
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(counts.values().all(|&n| n == 1), "a request recorded twice");
    for id in &answered {
        assert_eq!(counts.get(id), Some(&1), "answered request {id} has no encounter");
    }
}

/// The retention rule from the configuration: a purge while serving removes the
/// encounters older than `keep` (not an overstayer's) and writes an audit line with
/// how many and the rule; newer encounters stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_purges_old_encounters_by_rule_and_audits_it() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.encounters.keep = "2d".into();
    cfg.encounters.keep_overstayers = "10d".into();
    cfg.encounters.max_stay = "1d".into();
    cfg.encounters.purge_interval_s = 1;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "flight", "f32").await;
    let rows = random_rows(&mut rng(74), 3, DIM);
    c.enroll("flight", &rows, DIM, &ids("p", 3)).await.unwrap();
    let ago_h = |hours: i64| biogate::time_text::format_time(biogate::time_text::now_ms() - hours * 3_600_000);
    let ago = |days: i64| ago_h(days * 24);
    let g = [("flight", 1, Some(0.9))];
    // p-00000 came and went 3 days ago (older than keep): purged.
    c.identify_at(&g, &rows[..DIM], DIM, at("entry", &ago(3), "A1"), Some("a"))
        .await
        .unwrap();
    c.identify_at(&g, &rows[..DIM], DIM, at("exit", &ago_h(71), "A1"), Some("b"))
        .await
        .unwrap();
    // p-00001 entered 3 days ago and never left: an overstayer, kept for 10 days.
    c.identify_at(&g, &rows[DIM..2 * DIM], DIM, at("entry", &ago(3), "A1"), Some("c"))
        .await
        .unwrap();
    // p-00002 arrived today.
    c.identify_at(&g, &rows[2 * DIM..], DIM, at("entry", "", "A1"), Some("d"))
        .await
        .unwrap();
    let mut left = recorded(data.path());
    for _ in 0..100 {
        if left == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = recorded(data.path());
    }
    assert_eq!(left, 2, "the two old encounters of a traveller who left are purged");
    assert!(c.encounter_history("p-00000").await.unwrap().is_empty());
    assert_eq!(c.encounter_history("p-00001").await.unwrap().len(), 1);
    assert_eq!(c.encounter_history("p-00002").await.unwrap().len(), 1);
    h.shutdown().await.unwrap();
    let audit = std::fs::read_to_string(data.path().join("audit.log")).unwrap();
    let purge: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["method"] == "purge_encounters")
        .expect("an audit line for the purge");
    assert_eq!(purge["count"], 2);
    assert_eq!(purge["rule"], "keep 2d, overstayers 10d, max stay 1d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_with_other_content_is_refused_and_ids_are_each_callers_own() {
    use tokio_stream::StreamExt;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.tokens = common::server::tokens();
    let h = start(cfg).await.unwrap();
    let admin = connect(&h, Some("admin-token-0123456789")).await;
    create(&admin, "flight", "f32").await;
    let officer = connect(&h, Some("officer-token-0123456789")).await;
    let rows = random_rows(&mut rng(5), 6, DIM);
    officer.enroll("flight", &rows, DIM, &ids("t", 6)).await.unwrap();
    let gate = connect(&h, Some("gate-token-0123456789")).await;
    let flight = [("flight", 1, Some(0.9))];
    let lhr = proto::EncounterContext {
        location: "LHR".into(),
        ..at("entry", "2026-03-01T09:00:00Z", "A3")
    };
    let cdg = at("exit", "2026-03-09T18:30:00Z", "K2");
    // Traveller t-00002 enters at LHR under "collide-7".
    gate.identify_at(&flight, &rows[2 * DIM..3 * DIM], DIM, lhr.clone(), Some("collide-7"))
        .await
        .unwrap();
    // Traveller t-00004 leaves CDG under the same id: refused, naming it; nothing of
    // this request is recorded, and no answer is given that would suggest it was.
    let e = gate
        .identify_at(&flight, &rows[4 * DIM..5 * DIM], DIM, cdg.clone(), Some("collide-7"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(e.message().contains("collide-7"), "{}", e.message());
    assert!(admin.encounter_history("t-00004").await.unwrap().is_empty());
    // The same request again (a retry) is answered, and recorded once.
    gate.identify_at(&flight, &rows[2 * DIM..3 * DIM], DIM, lhr.clone(), Some("collide-7"))
        .await
        .unwrap();
    assert_eq!(admin.encounter_history("t-00002").await.unwrap().len(), 1);
    // Another caller's "collide-7" is its own: recorded, and it cannot pre-claim ours.
    officer
        .identify_at(&flight, &rows[4 * DIM..5 * DIM], DIM, cdg.clone(), Some("collide-7"))
        .await
        .unwrap();
    assert_eq!(admin.encounter_history("t-00004").await.unwrap().len(), 1);
    // The stream form applies the same rule.
    let msg = |row: usize, context: &proto::EncounterContext| proto::IdentifyStreamRequest {
        gallery: "flight".into(),
        probe: pack(&rows[row * DIM..(row + 1) * DIM]),
        k: 1,
        threshold: Some(0.9),
        request_id: "collide-9".into(),
        encounter: Some(context.clone()),
        ..Default::default()
    };
    let answers: Vec<proto::IdentifyStreamResponse> = gate
        .raw()
        .identify_stream(gate.request(tokio_stream::iter(vec![msg(1, &lhr)])))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(answers[0].error_code, 0, "{answers:?}");
    let answers: Vec<proto::IdentifyStreamResponse> = gate
        .raw()
        .identify_stream(gate.request(tokio_stream::iter(vec![msg(3, &cdg)])))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(answers[0].error_code, Code::AlreadyExists as i32, "{answers:?}");
    assert!(answers[0].error_message.contains("collide-9"), "{answers:?}");
    assert!(admin.encounter_history("t-00003").await.unwrap().is_empty());
    h.shutdown().await.unwrap();
}
