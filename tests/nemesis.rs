//! The nemesis (issue 24): a cluster on loopback (three etcd members, three nodes, two
//! routers) under clients that enroll, delete, identify, create and drop galleries,
//! while a nemesis driven by a seed kill -9s and restarts nodes, routers and etcd
//! members, pauses nodes (SIGSTOP), cuts or stalls a node's etcd connections, and
//! fills a node's disk (each node's data folder is a small tmpfs of its own, when the
//! test may mount one: root; otherwise it says so and leaves that fault out).
//! Every call is recorded as invoked, then ok, failed or unknown; a checker then holds
//! the history against a model:
//!
//! - every acknowledged enrollment is answered until an acknowledged deletion, and
//!   nothing whose enrollment failed, or whose deletion was acknowledged, is answered;
//! - an unknown outcome may be either, but not both (seen, then gone without a deletion);
//! - each gallery's count equals the model's;
//! - every answer is exact against a float64 reference of what the model allows at its
//!   time: no candidate that cannot be there, none missing that must be, scores right;
//! - dropping and re-creating `fl` leaves its siblings `fl-2`, `fl2` and `flights` whole,
//!   and nothing of an earlier `fl` is answered by a later one.
//!
//! CI runs a few schedules (BIOGATE_NEMESIS_SCHEDULES, default 3); `scripts/nemesis.sh
//! SCHEDULES` runs a campaign for RELIABILITY.md. A failure prints its seed
//! (BIOGATE_NEMESIS_SEED replays from it; the processes' timing makes a replay similar,
//! not identical). It skips when etcd is not installed, unless BIOGATE_REQUIRE_ETCD=1.
#![cfg(feature = "cli")]

mod common;

use biogate::client::{Client, ConnectOptions, Status};
use common::cluster::{Etcd, Node, Process, etcd_available, router, wait_for_port};
use common::etcd_proxy::{EtcdProxy, Mode};
use common::{env_number, random_rows, unit};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

const DIM: usize = 16;
/// Score tolerance against the float64 reference (f32 galleries).
const TOL: f64 = 1e-5;
/// A call that has not answered in this long has an unknown outcome.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// The galleries that live through every schedule, with their shard counts; `fl` is
/// dropped and made again.
const STABLE: [(&str, u32); 3] = [("fl-2", 2), ("fl2", 3), ("flights", 4)];
const CHURNED: &str = "fl";

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ok,
    Failed(String),
    Unknown(String),
}

/// How a call ended: acknowledged, refused by the cluster (nothing happened), or
/// unknown (no answer, a broken connection, or the cluster saying it does not know).
fn outcome_of<T>(r: Result<Result<T, Status>, tokio::time::error::Elapsed>) -> (Outcome, Option<T>) {
    match r {
        Err(_) => (Outcome::Unknown(format!("no answer in {CALL_LIMIT:?}")), None),
        Ok(Ok(v)) => (Outcome::Ok, Some(v)),
        Ok(Err(s)) => {
            let transport = std::error::Error::source(&s).is_some();
            let text = format!("{:?}: {}", s.code(), s.message());
            if transport || matches!(s.code(), Code::Unknown | Code::DeadlineExceeded | Code::Cancelled) {
                (Outcome::Unknown(text), None)
            } else {
                (Outcome::Failed(text), None)
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Call {
    invoked: Instant,
    completed: Option<Instant>,
    outcome: Option<Outcome>,
}

impl Call {
    fn now() -> Call {
        Call {
            invoked: Instant::now(),
            completed: None,
            outcome: None,
        }
    }
    fn is(&self, o: &Outcome) -> bool {
        self.outcome.as_ref() == Some(o)
    }
    fn failed(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Failed(_)))
    }
    fn ok_before(&self, t: Instant) -> bool {
        self.is(&Outcome::Ok) && self.completed.is_some_and(|c| c < t)
    }
}

/// One subject (one template), enrolled into one instance of a gallery.
struct Subject {
    instance: String,
    raw: Vec<f32>,
    unit: Vec<f32>,
    enroll: Call,
    delete: Option<Call>,
}

struct Search {
    instance: String,
    probes: Vec<Vec<f32>>,
    k: usize,
    invoked: Instant,
    completed: Instant,
    answer: Vec<Vec<(String, f32)>>,
}

#[derive(Default)]
struct History {
    subjects: BTreeMap<String, Subject>,
    searches: Vec<Search>,
    /// Gallery name -> its current instance (`fl-2#0`, `fl#3`).
    instances: HashMap<String, String>,
    counts: BTreeMap<&'static str, u64>,
    /// How many instances of the churned gallery were made.
    made: u64,
    /// A drop of the churned gallery's instance, or a creation of a new one, was asked
    /// and not acknowledged (either may have taken effect).
    unsure_drop: bool,
    unsure_create: bool,
}

impl History {
    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }
}

type Shared = Arc<Mutex<History>>;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// The routers' ports, and a client of each made on demand.
#[derive(Clone)]
struct Routers {
    ports: Vec<u16>,
}

impl Routers {
    /// A client of a random router; None while it is down.
    async fn any(&self, rng: &mut SmallRng) -> Option<Client> {
        let port = self.ports[rng.random_range(0..self.ports.len())];
        let options = ConnectOptions {
            addr: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(2), Client::connect(&options))
            .await
            .ok()?
            .ok()
    }
}

static NEXT_SUBJECT: AtomicU64 = AtomicU64::new(0);

/// Enroll `n` new subjects into `gallery`'s current instance, recording the call.
async fn enroll(c: &Client, history: &Shared, gallery: &str, n: usize, rng: &mut SmallRng) {
    let instance = history.lock().unwrap().instances[gallery].clone();
    let raw = random_rows(rng, n, DIM);
    let ids: Vec<String> = (0..n)
        .map(|_| format!("p{:06}", NEXT_SUBJECT.fetch_add(1, Ordering::Relaxed)))
        .collect();
    let invoked = Call::now();
    {
        let mut h = history.lock().unwrap();
        for (id, row) in ids.iter().zip(raw.chunks_exact(DIM)) {
            h.subjects.insert(
                id.clone(),
                Subject {
                    instance: instance.clone(),
                    raw: row.to_vec(),
                    unit: unit(row),
                    enroll: invoked.clone(),
                    delete: None,
                },
            );
        }
    }
    let (outcome, _) = outcome_of(tokio::time::timeout(CALL_LIMIT, c.enroll(gallery, &raw, DIM, &ids)).await);
    let mut h = history.lock().unwrap();
    h.count(match outcome {
        Outcome::Ok => "enroll ok",
        Outcome::Failed(_) => "enroll failed",
        Outcome::Unknown(_) => "enroll unknown",
    });
    // A failure of a call that spans shards may have enrolled the other shards' part.
    let outcome = match outcome {
        Outcome::Failed(why) if n > 1 => Outcome::Unknown(format!("spans shards: {why}")),
        o => o,
    };
    let completed = Instant::now();
    for id in &ids {
        let s = h.subjects.get_mut(id).unwrap();
        s.enroll.completed = Some(completed);
        s.enroll.outcome = Some(outcome.clone());
    }
}

/// Delete one subject of `gallery`'s current instance whose enrollment has ended and
/// that no deletion was asked for yet.
async fn delete(c: &Client, history: &Shared, gallery: &str, rng: &mut SmallRng) {
    let chosen = {
        let mut h = history.lock().unwrap();
        let instance = h.instances[gallery].clone();
        let candidates: Vec<String> = h
            .subjects
            .iter()
            .filter(|(_, s)| s.instance == instance && s.delete.is_none() && s.enroll.completed.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let id = candidates[rng.random_range(0..candidates.len())].clone();
        h.subjects.get_mut(&id).unwrap().delete = Some(Call::now());
        id
    };
    let (outcome, _) = outcome_of(tokio::time::timeout(CALL_LIMIT, c.delete_subject(gallery, &chosen)).await);
    let mut h = history.lock().unwrap();
    h.count(match outcome {
        Outcome::Ok => "delete ok",
        Outcome::Failed(_) => "delete failed",
        Outcome::Unknown(_) => "delete unknown",
    });
    let d = h.subjects.get_mut(&chosen).unwrap().delete.as_mut().unwrap();
    d.completed = Some(Instant::now());
    d.outcome = Some(outcome);
}

/// Identify in `gallery`: the own templates of a few of its subjects, or random probes.
async fn identify(c: &Client, history: &Shared, gallery: &str, rng: &mut SmallRng) {
    let (instance, probes) = {
        let h = history.lock().unwrap();
        let instance = h.instances[gallery].clone();
        let own: Vec<&Subject> = h.subjects.values().filter(|s| s.instance == instance).collect();
        let probes: Vec<Vec<f32>> = if own.is_empty() || rng.random_bool(0.3) {
            let n = rng.random_range(1..4);
            random_rows(rng, n, DIM)
                .chunks_exact(DIM)
                .map(<[f32]>::to_vec)
                .collect()
        } else {
            (0..rng.random_range(1..5))
                .map(|_| own[rng.random_range(0..own.len())].raw.clone())
                .collect()
        };
        (instance, probes)
    };
    let k = rng.random_range(1..6);
    let flat: Vec<f32> = probes.concat();
    let invoked = Instant::now();
    let r = tokio::time::timeout(CALL_LIMIT, c.identify(gallery, &flat, DIM, k as u32, None)).await;
    let completed = Instant::now();
    let mut h = history.lock().unwrap();
    match r {
        Ok(Ok(results)) => {
            h.count("identify ok");
            let answer = results
                .into_iter()
                .map(|p| p.candidates.into_iter().map(|c| (c.subject, c.score)).collect())
                .collect();
            h.searches.push(Search {
                instance,
                probes,
                k,
                invoked,
                completed,
                answer,
            });
        }
        _ => h.count("identify failed"),
    }
}

/// A client on the stable galleries until `stop`.
async fn worker(routers: Routers, history: Shared, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = routers.any(&mut rng).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let gallery = STABLE[rng.random_range(0..STABLE.len())].0;
        match rng.random_range(0..100) {
            0..45 => {
                enroll(
                    &c,
                    &history,
                    gallery,
                    if rng.random_bool(0.7) { 1 } else { 3 },
                    &mut rng,
                )
                .await
            }
            45..60 => delete(&c, &history, gallery, &mut rng).await,
            _ => identify(&c, &history, gallery, &mut rng).await,
        }
        // A breath between calls, so a cluster that refuses everything is not hammered.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
    }
}

/// Whether gallery `g` exists: Some(true/false), or None when nobody could say.
async fn exists(c: &Client, g: &str) -> Option<bool> {
    match tokio::time::timeout(CALL_LIMIT, c.get_gallery(g)).await {
        Ok(Ok(_)) => Some(true),
        Ok(Err(s)) if s.code() == Code::NotFound => Some(false),
        _ => None,
    }
}

/// The one client of `fl`: makes it, enrolls, deletes and searches in it, drops it, and
/// makes it again, each time a new instance.
async fn churner(routers: Routers, history: Shared, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = routers.any(&mut rng).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let live = history.lock().unwrap().instances.contains_key(CHURNED);
        if !live {
            let r = tokio::time::timeout(CALL_LIMIT, c.create_sharded_gallery(CHURNED, DIM as u32, "f32", 2, 2)).await;
            let made = match r {
                Ok(Ok(_)) => true,
                Ok(Err(s)) if s.code() == Code::AlreadyExists => true, // an earlier unknown creation took
                _ => exists(&c, CHURNED).await == Some(true),
            };
            let mut h = history.lock().unwrap();
            if made {
                h.count("create ok");
                h.made += 1;
                let n = h.made;
                h.instances.insert(CHURNED.into(), format!("{CHURNED}#{n}"));
                h.unsure_drop = false;
                h.unsure_create = false;
            } else {
                h.unsure_create = true;
            }
            continue;
        }
        match rng.random_range(0..100) {
            0..40 => {
                enroll(
                    &c,
                    &history,
                    CHURNED,
                    if rng.random_bool(0.5) { 1 } else { 2 },
                    &mut rng,
                )
                .await
            }
            40..50 => delete(&c, &history, CHURNED, &mut rng).await,
            50..90 => identify(&c, &history, CHURNED, &mut rng).await,
            _ => {
                let r = tokio::time::timeout(CALL_LIMIT, c.drop_gallery(CHURNED)).await;
                let dropped = match r {
                    Ok(Ok(())) => true,
                    _ => exists(&c, CHURNED).await == Some(false),
                };
                let mut h = history.lock().unwrap();
                if dropped {
                    h.count("drop ok");
                    h.instances.remove(CHURNED);
                    h.unsure_drop = false;
                    h.unsure_create = false;
                } else {
                    h.unsure_drop = true;
                }
            }
        }
    }
}

/// The faults, each healed before the next begins.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillNode(usize),
    PauseNode(usize),
    CutEtcd(usize),
    StallEtcd(usize),
    KillRouter(usize),
    KillEtcdMember(usize),
    FillDisk(usize),
}

struct Processes {
    etcd: Etcd,
    proxies: Vec<EtcdProxy>,
    nodes: Vec<Node>,
    routers: Vec<Process>,
    disks: Disks,
}

/// Each node's data folder on a tmpfs of its own, so that filling it fills only that
/// node's disk. Mounting needs root; without it there are no disks to fill.
struct Disks {
    mounted: Vec<PathBuf>,
    /// Left mounted when the test ends (a failed schedule's folder is kept to read).
    keep: bool,
    /// The full-disk errors the filled node had logged before its disk was filled.
    full_before: usize,
}

/// The filler's name in a node's data folder (the node opens only `galleries/` and its
/// audit folder).
const FILLER: &str = "nemesis-filler";

impl Disks {
    fn mount(root: &Path, nodes: &[&str]) -> Disks {
        let mut disks = Disks {
            mounted: Vec::new(),
            keep: false,
            full_before: 0,
        };
        for n in nodes {
            let dir = root.join(n);
            std::fs::create_dir_all(&dir).unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
                .arg(&dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                println!("nemesis: cannot mount a tmpfs (not root?): no full disks in this run");
                disks.unmount();
                return disks;
            }
            disks.mounted.push(dir);
        }
        disks
    }

    fn available(&self) -> bool {
        !self.mounted.is_empty()
    }

    /// Write zeros into node `i`'s disk until it is full.
    fn fill(&self, i: usize) {
        let mut f = std::fs::File::create(self.mounted[i].join(FILLER)).unwrap();
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", self.mounted[i].display()),
            }
        }
    }

    fn free(&self, i: usize) {
        std::fs::remove_file(self.mounted[i].join(FILLER)).unwrap();
    }

    fn unmount(&mut self) {
        for dir in self.mounted.drain(..) {
            // Lazily: a node killed a moment ago may still hold a file open.
            let _ = std::process::Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        if !self.keep {
            self.unmount();
        }
    }
}

impl Processes {
    fn apply(&mut self, f: Fault) {
        match f {
            Fault::KillNode(i) => self.nodes[i].kill9(),
            Fault::PauseNode(i) => self.nodes[i].pause(),
            Fault::CutEtcd(i) => self.proxies[i].set(Mode::Cut),
            Fault::StallEtcd(i) => self.proxies[i].set(Mode::StallAnswers),
            Fault::KillRouter(i) => self.routers[i].kill9(),
            Fault::KillEtcdMember(i) => self.etcd.kill_member(i),
            Fault::FillDisk(i) => {
                self.disks.full_before = full_disk_errors(&self.nodes[i]);
                self.disks.fill(i);
            }
        }
    }
    /// Heal `f`; for a full disk, how many of the node's writes it refused (as logged).
    fn heal(&mut self, f: Fault) -> String {
        if let Fault::FillDisk(i) = f {
            self.disks.free(i);
            let refused = full_disk_errors(&self.nodes[i]) - self.disks.full_before;
            return format!(" ({refused} writes refused)");
        }
        match f {
            Fault::KillNode(i) => self.nodes[i].restart(),
            Fault::PauseNode(i) => self.nodes[i].resume(),
            Fault::CutEtcd(i) | Fault::StallEtcd(i) => self.proxies[i].set(Mode::Pass),
            Fault::KillRouter(i) => self.routers[i].restart(),
            Fault::KillEtcdMember(i) => self.etcd.start_member(i),
            Fault::FillDisk(_) => {}
        }
        String::new()
    }
}

/// How many times the node logged a full disk (ENOSPC), across its restarts.
fn full_disk_errors(node: &Node) -> usize {
    node.log().matches("os error 28").count()
}

/// Inject faults from `seed` for `window`; returns the processes and the faults.
async fn nemesis(mut p: Processes, window: Duration, seed: u64) -> (Processes, Vec<String>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6e656d65);
    let start = Instant::now();
    let mut faults = Vec::new();
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
        let node = rng.random_range(0..p.nodes.len());
        let f = match rng.random_range(0..7) {
            0 => Fault::KillNode(node),
            1 => Fault::PauseNode(node),
            2 => Fault::CutEtcd(node),
            3 => Fault::StallEtcd(node),
            4 => Fault::KillRouter(rng.random_range(0..p.routers.len())),
            6 if p.disks.available() => Fault::FillDisk(node),
            _ => Fault::KillEtcdMember(rng.random_range(0..3)),
        };
        // Mostly short; sometimes past a node's lease (3 s).
        let hold = Duration::from_millis(if rng.random_bool(0.2) {
            rng.random_range(3000..4500)
        } else {
            rng.random_range(300..2500)
        });
        p.apply(f);
        tokio::time::sleep(hold).await;
        let note = p.heal(f);
        faults.push(format!("{f:?} {} ms{note}", hold.as_millis()));
    }
    (p, faults)
}

/// Wait until every live gallery serves from all its replicas, each caught up.
async fn settled(c: &Client, galleries: &[String], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut all = true;
        for g in galleries {
            match c.get_gallery(g).await {
                Ok(info) => {
                    let ok = info.state == "SERVING"
                        && info.shard_health.iter().all(|s| {
                            !s.replicas.is_empty() && s.replicas.iter().all(|r| r.serving && r.applied == s.committed)
                        });
                    if !ok {
                        last = format!("{g}: {info:?}");
                        all = false;
                    }
                }
                Err(e) => {
                    last = format!("{g}: {e}");
                    all = false;
                }
            }
        }
        if all {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("the cluster did not settle in {within:?}: {last}"))
}

/// Where a subject stands at the end: present or not, from its own template's search.
async fn final_presence(c: &Client, g: &str, ids: &[(&String, &Subject)]) -> Result<HashMap<String, bool>, String> {
    let mut present = HashMap::new();
    for chunk in ids.chunks(32) {
        let flat: Vec<f32> = chunk.iter().flat_map(|(_, s)| s.raw.iter().copied()).collect();
        let results = c
            .identify(g, &flat, DIM, 1, None)
            .await
            .map_err(|e| format!("{g}: the final search failed: {e}"))?;
        for ((id, _), r) in chunk.iter().zip(results) {
            present.insert((*id).clone(), r.candidates.first().is_some_and(|c| &c.subject == *id));
        }
    }
    Ok(present)
}

/// Check the history of one schedule against the model; the violations found.
fn check(c: &Client, history: &Shared, rng: &mut SmallRng) -> Vec<String> {
    let mut bad = Vec::new();
    let h = history.lock().unwrap();
    let live: Vec<(String, String)> = h.instances.iter().map(|(g, i)| (g.clone(), i.clone())).collect();
    // Each live instance's subjects, and where each stands at the end.
    let mut present: HashMap<String, bool> = HashMap::new();
    // Per live gallery: its name, instance, the model's rows at the end, its count.
    type Final = (String, String, Vec<(String, Vec<f32>)>, usize);
    let mut snapshot: Vec<Final> = Vec::new();
    for (g, instance) in &live {
        let ids: Vec<(&String, &Subject)> = h.subjects.iter().filter(|(_, s)| &s.instance == instance).collect();
        // The lock is held across the awaits below: the clients have stopped.
        let found = match futures_block(final_presence(c, g, &ids)) {
            Ok(f) => f,
            Err(e) => {
                bad.push(e);
                continue;
            }
        };
        let mut rows = Vec::new();
        for (id, s) in &ids {
            let there = found[*id];
            present.insert((*id).clone(), there);
            let deleted_ok = s.delete.as_ref().is_some_and(|d| d.is(&Outcome::Ok));
            let delete_maybe = s.delete.as_ref().is_some_and(|d| !d.failed());
            if s.enroll.is(&Outcome::Ok) && !delete_maybe && !there {
                bad.push(format!(
                    "{id} in {instance}: enrollment acknowledged, never deleted, gone"
                ));
            }
            if s.enroll.failed() && there {
                bad.push(format!("{id} in {instance}: enrollment failed, yet answered"));
            }
            if deleted_ok && there {
                bad.push(format!("{id} in {instance}: deletion acknowledged, still answered"));
            }
            if there {
                rows.push(((*id).clone(), s.unit.clone()));
            }
        }
        let count = match futures_block(c.get_gallery(g)) {
            Ok(info) => info.subjects as usize,
            Err(e) => {
                bad.push(format!("{g}: {e}"));
                continue;
            }
        };
        snapshot.push((g.clone(), instance.clone(), rows, count));
    }
    // Counts and exact answers against the final model.
    for (g, instance, rows, count) in &snapshot {
        if *count != rows.len() {
            bad.push(format!("{instance}: counts {count} subjects, the model {}", rows.len()));
        }
        let probes = random_rows(rng, 8, DIM);
        let k = 7;
        match futures_block(c.identify(g, &probes, DIM, k as u32, None)) {
            Ok(results) => {
                for (p, r) in probes.chunks_exact(DIM).zip(results) {
                    let p = unit(p);
                    let mut want: Vec<(&String, f64)> = rows.iter().map(|(id, u)| (id, dot(&p, u))).collect();
                    want.sort_by(|a, b| b.1.total_cmp(&a.1));
                    want.truncate(k);
                    let got: Vec<&String> = r.candidates.iter().map(|c| &c.subject).collect();
                    let want_ids: Vec<&String> = want.iter().map(|w| w.0).collect();
                    if got != want_ids {
                        bad.push(format!("{instance}: final top-{k} {got:?}, the reference {want_ids:?}"));
                    }
                }
            }
            Err(e) => bad.push(format!("{g}: the final exact search failed: {e}")),
        }
    }
    // Every answer during the chaos, against what the model allowed at its time.
    for s in &h.searches {
        for (probe, answer) in s.probes.iter().zip(&s.answer) {
            let p = unit(probe);
            let listed: HashSet<&str> = answer.iter().map(|(id, _)| id.as_str()).collect();
            for (rank, (id, score)) in answer.iter().enumerate() {
                let Some(sub) = h.subjects.get(id).filter(|sub| sub.instance == s.instance) else {
                    bad.push(format!("{}: answered {id}, never enrolled there", s.instance));
                    continue;
                };
                if sub.enroll.invoked > s.completed || sub.enroll.failed() {
                    bad.push(format!(
                        "{}: answered {id} before or without its enrollment",
                        s.instance
                    ));
                }
                if let Some(d) = &sub.delete
                    && d.ok_before(s.invoked)
                {
                    bad.push(format!(
                        "{}: answered {id} after its deletion was acknowledged",
                        s.instance
                    ));
                }
                if let Some(false) = present.get(id)
                    && sub.delete.as_ref().is_none_or(|d| d.failed())
                {
                    bad.push(format!(
                        "{}: answered {id}, which is gone at the end and never deleted",
                        s.instance
                    ));
                }
                let want = dot(&p, &sub.unit);
                if (f64::from(*score) - want).abs() > TOL {
                    bad.push(format!("{}: {id} scored {score}, the reference {want}", s.instance));
                }
                if rank > 0 && answer[rank - 1].1 < *score {
                    bad.push(format!("{}: answer not sorted at rank {rank}", s.instance));
                }
            }
            // Nobody missing who must have been there and scores above the last.
            let floor = if answer.len() == s.k {
                f64::from(answer[s.k - 1].1) + 2.0 * TOL
            } else {
                f64::NEG_INFINITY
            };
            for (id, sub) in h.subjects.iter().filter(|(_, sub)| sub.instance == s.instance) {
                let must = sub.enroll.ok_before(s.invoked)
                    && sub
                        .delete
                        .as_ref()
                        .is_none_or(|d| d.failed() || d.invoked > s.completed);
                if must && !listed.contains(id.as_str()) && dot(&p, &sub.unit) > floor {
                    bad.push(format!(
                        "{}: {id} (reference {}) missing from {answer:?}",
                        s.instance,
                        dot(&p, &sub.unit)
                    ));
                }
            }
        }
    }
    bad
}

/// Run a future to its end from synchronous code inside the runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// One cluster: its processes, and the history across its schedules.
struct Run {
    /// Dropped first: the processes killed and the disks unmounted before the folder goes.
    processes: Option<Processes>,
    history: Shared,
    dir: tempfile::TempDir,
}

impl Run {
    async fn start(seal_rows: usize) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node.toml");
        std::fs::write(&config, format!("seal_log_rows = {seal_rows}\nmerge_segments = 2\n")).unwrap();
        let config = config.display().to_string();
        let etcd = Etcd::start(&dir.path().join("etcd"));
        let disks = Disks::mount(dir.path(), &["n1", "n2", "n3"]);
        let mut proxies = Vec::new();
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let proxy = EtcdProxy::start(etcd.client_ports()).await;
            let flags = ["--checkpoint-every", "3", "--config", config.as_str()];
            let node = Node::start_via(&format!("n{i}"), dir.path(), &proxy.urls(), &flags);
            // Listening before the next port is picked (free_port() would hand it out).
            wait_for_port(node.port()).await;
            nodes.push(node);
            proxies.push(proxy);
        }
        let mut routers: Vec<Process> = Vec::new();
        for _ in 0..2 {
            let r = router(&etcd, &[]);
            wait_for_port(r.port).await;
            routers.push(r);
        }
        let history = Shared::default();
        let c = common::cluster::connect_when_up(routers[0].port).await;
        for (g, shards) in STABLE {
            c.create_sharded_gallery(g, DIM as u32, "f32", shards, 2)
                .await
                .unwrap_or_else(|e| panic!("creating {g}: {e}"));
            history.lock().unwrap().instances.insert(g.into(), format!("{g}#0"));
        }
        Run {
            dir,
            processes: Some(Processes {
                etcd,
                proxies,
                nodes,
                routers,
                disks,
            }),
            history,
        }
    }

    /// One schedule: clients and the nemesis for `window`, then heal, settle and check.
    async fn schedule(&mut self, seed: u64, window: Duration) -> (Vec<String>, Vec<String>) {
        let ports = Routers {
            ports: self
                .processes
                .as_ref()
                .unwrap()
                .routers
                .iter()
                .map(|r| r.port)
                .collect(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for w in 0..3 {
            clients.push(tokio::spawn(worker(
                ports.clone(),
                self.history.clone(),
                stop.clone(),
                seed * 16 + w,
            )));
        }
        clients.push(tokio::spawn(churner(
            ports.clone(),
            self.history.clone(),
            stop.clone(),
            seed * 16 + 9,
        )));
        let (p, faults) = nemesis(self.processes.take().unwrap(), window, seed).await;
        self.processes = Some(p);
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.await.unwrap();
        }
        let c = common::cluster::connect_when_up(ports.ports[0]).await;
        if let Err(e) = self.settle_churned(&c).await {
            return (faults, vec![e]);
        }
        let galleries: Vec<String> = self.history.lock().unwrap().instances.keys().cloned().collect();
        if let Err(e) = settled(&c, &galleries, Duration::from_secs(60)).await {
            return (faults, vec![e]);
        }
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xc4ec);
        let bad = check(&c, &self.history, &mut rng);
        self.history.lock().unwrap().searches.clear();
        (faults, bad)
    }
}

impl Run {
    /// The churned gallery's last drop or creation may have an unknown outcome: ask the
    /// cluster which it was. It may be gone only after a drop was asked, there only
    /// after a creation was; otherwise that is a violation.
    async fn settle_churned(&self, c: &Client) -> Result<(), String> {
        let mut there = None;
        for _ in 0..100 {
            there = exists(c, CHURNED).await;
            if there.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let there = there.ok_or("nobody says whether fl exists")?;
        let mut h = self.history.lock().unwrap();
        let live = h.instances.get(CHURNED).cloned();
        match (there, live) {
            (false, Some(_)) if h.unsure_drop => {
                h.instances.remove(CHURNED);
            }
            (false, Some(instance)) => return Err(format!("{instance} is gone, and no drop was asked")),
            (true, None) if h.unsure_create => {
                h.made += 1;
                let n = h.made;
                h.instances.insert(CHURNED.into(), format!("{CHURNED}#{n}"));
            }
            (true, None) => return Err(format!("{CHURNED} exists, and no creation was asked since its drop")),
            _ => {}
        }
        h.unsure_drop = false;
        h.unsure_create = false;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_schedules_keep_every_acknowledged_operation_and_answer_exactly() {
    if !etcd_available() {
        return;
    }
    let schedules = env_number("BIOGATE_NEMESIS_SCHEDULES", 3);
    let per_cluster = env_number("BIOGATE_NEMESIS_PER_CLUSTER", 20).max(1);
    let window = Duration::from_millis(env_number("BIOGATE_NEMESIS_WINDOW_MS", 8000) as u64);
    let first = env_number("BIOGATE_NEMESIS_SEED", 1) as u64;
    let mut failures = Vec::new();
    let mut run: Option<Run> = None;
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut faults_total = 0;
    for i in 0..schedules as u64 {
        let seed = first + i;
        if run.is_none() || i % per_cluster as u64 == 0 {
            drop(run.take());
            // Seals every few rows, so seals, merges and checkpoints happen often.
            run = Some(Run::start(6).await);
        }
        let r = run.as_mut().unwrap();
        let t = Instant::now();
        let (faults, bad) = r.schedule(seed, window).await;
        faults_total += faults.len();
        let counts = std::mem::take(&mut r.history.lock().unwrap().counts);
        println!(
            "nemesis seed {seed}: {} s, faults [{}], {:?}, {} violations",
            t.elapsed().as_secs(),
            faults.join(", "),
            counts,
            bad.len()
        );
        for (k, v) in counts {
            *totals.entry(k).or_default() += v;
        }
        if !bad.is_empty() {
            for b in bad.iter().take(20) {
                println!("  seed {seed}: {b}");
            }
            failures.push(format!("seed {seed}: {}", bad[0]));
            // Start over: the next schedule should not inherit this one's damage.
            if let Some(mut r) = run.take() {
                if let Some(p) = r.processes.as_mut() {
                    p.disks.keep = true;
                }
                let logs = r.dir.keep();
                println!("  seed {seed}: the cluster's folder is kept at {}", logs.display());
            }
        }
    }
    println!(
        "nemesis: {schedules} schedules, {faults_total} faults, operations {totals:?}, {} failed schedules",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
