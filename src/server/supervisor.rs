//! Watching the galleries while the server runs, so damage is found before it is served:
//!
//! - right after start, every segment of every gallery is verified once, in the
//!   background (SERVING is not delayed; a search that needs an unverified segment
//!   waits for it, so damaged rows are never scored);
//! - every `file_check_interval_ms`, the files in use are checked for being replaced,
//!   removed, truncated or written under the server (a stat each), and per-gallery
//!   health (`biogate.v1.Biogate/<gallery>`) is brought up to date;
//! - every `scrub_interval_s`, a scrub reads every segment again at `scrub_mb_per_s`
//!   and reads each log back against what was acknowledged;
//! - every tick (20 ms), subjects that expired since are hidden from searches
//!   (expiry.rs), and each log idle for `log_idle_ms` has its final length recorded
//!   (wal/tail.rs), so that a cut of it is recognised after a crash.
//!
//! A gallery with damage becomes NOT_SERVING with the reason; the others go on.

use super::config::Config;
use super::metrics::Metrics;
use super::registry::Registry;
use crate::gallery::compaction::MergePolicy;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service name of one gallery.
pub fn health_name(gallery: &str) -> String {
    format!("biogate.v1.Biogate/{gallery}")
}

/// Stops the background work when dropped.
pub struct Supervisor {
    stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
    health_task: tokio::task::JoinHandle<()>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.0.store(true, Ordering::SeqCst);
        self.stop.2.notify_all();
        self.health_task.abort();
    }
}

/// Bring per-gallery health and the not-serving gauge up to date; returns the new view.
pub async fn sync_health(
    registry: &Arc<Registry>,
    health: &HealthReporter,
    metrics: &Metrics,
    known: &mut HashMap<String, bool>,
    merges: Option<MergePolicy>,
) {
    let r = registry.clone();
    let now = tokio::task::spawn_blocking(move || {
        r.all()
            .iter()
            .map(|e| {
                let serving = e.check_integrity().is_none();
                if let (true, Some(policy)) = (serving, merges) {
                    e.merge_in_background(policy);
                }
                (e.name.clone(), serving)
            })
            .collect::<HashMap<_, _>>()
    })
    .await
    .unwrap_or_default();
    for (name, serving) in &now {
        if known.get(name) != Some(serving) {
            let status = if *serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(health_name(name), status).await;
        }
    }
    let mut reporter = health.clone();
    for name in known.keys().filter(|n| !now.contains_key(*n)) {
        reporter.clear_service_status(&health_name(name)).await;
    }
    metrics
        .galleries_not_serving
        .set(now.values().filter(|s| !**s).count() as i64);
    *known = now;
}

/// Start the health loop and the scrub thread.
/// The background merge policy the configuration asks for (None: off).
pub fn merge_policy(config: &Config) -> Option<MergePolicy> {
    (config.merge_segments > 0).then(|| MergePolicy {
        fan_in: config.merge_segments.max(2),
        ..MergePolicy::default()
    })
}

pub fn start(registry: Arc<Registry>, health: HealthReporter, metrics: Arc<Metrics>, config: &Config) -> Supervisor {
    let stop = Arc::new((AtomicBool::new(false), Mutex::new(()), Condvar::new()));
    let interval = Duration::from_millis(config.file_check_interval_ms);
    let r = registry.clone();
    let m = metrics.clone();
    let merges = merge_policy(config);
    let health_task = tokio::spawn(async move {
        let mut known = HashMap::new();
        loop {
            sync_health(&r, &health, &m, &mut known, merges).await;
            tokio::time::sleep(interval).await;
        }
    });
    let scrub_every = Duration::from_secs(config.scrub_interval_s);
    let bytes_per_s = config.scrub_mb_per_s as f64 * 1e6;
    let s = stop.clone();
    let r = registry.clone();
    let spawned = std::thread::Builder::new()
        .name("biogate-scrub".into())
        .spawn(move || scrub_loop(r, scrub_every, bytes_per_s, s));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the scrub thread; segments are verified when first searched");
    }
    let log_idle = (config.log_idle_ms > 0).then(|| Duration::from_millis(config.log_idle_ms));
    let s = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("biogate-tick".into())
        .spawn(move || tick_loop(registry, log_idle, s));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the tick thread; logs record their length at a clean stop only");
    }
    Supervisor { stop, health_task }
}

/// How often the tick thread looks at every gallery.
pub const TICK: Duration = Duration::from_millis(20);

/// Every [`TICK`], each gallery's tick (`GalleryEntry::tick`).
fn tick_loop(registry: Arc<Registry>, log_idle: Option<Duration>, stop: Arc<(AtomicBool, Mutex<()>, Condvar)>) {
    loop {
        let guard = stop.1.lock().unwrap_or_else(|p| p.into_inner());
        let _ = stop
            .2
            .wait_timeout_while(guard, TICK, |_| !stop.0.load(Ordering::SeqCst));
        if stop.0.load(Ordering::SeqCst) {
            return;
        }
        for entry in registry.all() {
            entry.tick(log_idle);
        }
    }
}

fn scrub_loop(registry: Arc<Registry>, every: Duration, bytes_per_s: f64, stop: Arc<(AtomicBool, Mutex<()>, Condvar)>) {
    let stopped = || stop.0.load(Ordering::SeqCst);
    let t = Instant::now();
    for entry in registry.all() {
        if stopped() {
            return;
        }
        entry.verify_once();
    }
    tracing::info!(seconds = t.elapsed().as_secs_f64(), "verified every gallery's segments");
    if every.is_zero() {
        return;
    }
    loop {
        // Sleep until the next scrub (or until told to stop).
        let guard = stop.1.lock().unwrap_or_else(|p| p.into_inner());
        let _ = stop.2.wait_timeout_while(guard, every, |_| !stopped());
        if stopped() {
            return;
        }
        let started = Instant::now();
        let mut read = 0u64;
        let mut pace = |bytes: u64| {
            if stopped() {
                return;
            }
            read += bytes;
            let due = Duration::from_secs_f64(read as f64 / bytes_per_s);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_secs(1)));
            }
        };
        for entry in registry.all() {
            if stopped() {
                return;
            }
            entry.scrub(&mut pace);
        }
        tracing::info!(seconds = started.elapsed().as_secs_f64(), bytes = read, "scrub done");
    }
}
