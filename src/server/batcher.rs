//! Coalesces concurrent identify requests into engine batches. One engine thread per
//! device takes every request that is queued (up to `max_batch` probes, waiting at most
//! `max_wait` for more), groups them by gallery and k band (k rounded up to a power of
//! two: a request for k = 500 is searched apart, so it never makes every request beside
//! it keep 500 candidates, or sends them all to the CPU when that is more than the GPU
//! selects), runs one search per group with the largest k and the lowest threshold
//! asked for, and cuts each request's answer out of it (exact: a top-K list holds every
//! top-k list for k <= K). Requests whose deadline
//! has passed are answered DEADLINE_EXCEEDED before they reach the engine. The queue is
//! bounded; a full queue is refused at once.

use super::metrics::Metrics;
use super::registry::GalleryEntry;
use crate::engine::{Engine, ProbeResult, SearchParams};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Why a job did not get results.
#[derive(Debug)]
pub enum JobError {
    DeadlineExceeded,
    /// The search failed (damage found: DATA_LOSS naming the gallery; a GPU error).
    Engine(tonic::Status),
}

/// One request's probes.
pub struct Job {
    pub gallery: Arc<GalleryEntry>,
    /// The gallery's dimension when the probes were validated.
    pub dim: usize,
    /// Validated, `count * dim` values.
    pub probes: Vec<f32>,
    pub k: usize,
    pub threshold: Option<f32>,
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Result<Vec<ProbeResult>, JobError>>,
}

/// The submitting side.
pub struct Batcher {
    /// The queue into the engine thread; replaced when the thread is restarted.
    tx: std::sync::Mutex<SyncSender<Job>>,
    engine: Engine,
    config: BatchConfig,
    metrics: Arc<Metrics>,
    restarts: std::sync::atomic::AtomicU64,
}

/// Batching knobs.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
}

/// Why a job was not queued.
pub enum SubmitError {
    /// The queue is full: retry later (RESOURCE_EXHAUSTED).
    Full(Box<Job>),
    /// The engine thread could not be started again.
    Stopped(Box<Job>),
}

impl Batcher {
    /// Start the engine thread.
    pub fn start(engine: Engine, config: BatchConfig, metrics: Arc<Metrics>) -> Batcher {
        let tx = spawn_engine_thread(&engine, config, &metrics);
        Batcher {
            tx: std::sync::Mutex::new(tx),
            engine,
            config,
            metrics,
            restarts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Queue a job. If the engine thread has gone (it never should: a panicking search
    /// is caught and answered), it is started again and the job queued there.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let job = match tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                return Ok(());
            }
            Err(TrySendError::Full(job)) => return Err(SubmitError::Full(Box::new(job))),
            Err(TrySendError::Disconnected(job)) => job,
        };
        tracing::error!("the engine thread is gone; starting it again");
        self.restarts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *tx = spawn_engine_thread(&self.engine, self.config, &self.metrics);
        match tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                Err(SubmitError::Stopped(Box::new(job)))
            }
        }
    }

    /// How many times the engine thread had to be started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn spawn_engine_thread(engine: &Engine, config: BatchConfig, metrics: &Arc<Metrics>) -> SyncSender<Job> {
    let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
    let (engine, m) = (engine.clone(), metrics.clone());
    let spawned = std::thread::Builder::new()
        .name("biogate-engine".into())
        .spawn(move || run(rx, engine, config, m));
    if let Err(e) = spawned {
        // The receiver is gone with the closure: submits see Disconnected and retry.
        tracing::error!(error = %e, "could not start the engine thread");
    }
    tx
}

#[cfg(test)]
impl Batcher {
    /// A batcher whose queue nobody drains (tests of the full-queue path).
    fn unstarted(capacity: usize) -> (Batcher, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let config = BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: capacity,
        };
        (
            Batcher {
                tx: std::sync::Mutex::new(tx),
                engine: Engine::cpu(),
                config,
                metrics: Metrics::new(),
                restarts: std::sync::atomic::AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Make the engine thread exit, as if it had died.
    fn kill_engine_thread(&self) {
        let (dead, _) = mpsc::sync_channel(1);
        *self.tx.lock().unwrap() = dead;
    }
}

fn run(rx: mpsc::Receiver<Job>, engine: Engine, config: BatchConfig, metrics: Arc<Metrics>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut probes = jobs[0].probes.len() / jobs[0].dim;
        let until = Instant::now() + config.max_wait;
        while probes < config.max_batch {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            probes += job.probes.len() / job.dim;
            jobs.push(job);
        }
        metrics.queue_depth.dec_by(jobs.len() as i64);
        for group in group_jobs(jobs) {
            run_group(&engine, group, &metrics);
        }
    }
}

/// Jobs searched together: same gallery, same k band, in the order they came.
fn group_jobs(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: HashMap<(String, usize), Vec<Job>> = HashMap::new();
    let mut order = Vec::new();
    for job in jobs {
        let key = (job.gallery.name.clone(), job.k.next_power_of_two());
        let group = groups.entry(key.clone()).or_default();
        if group.is_empty() {
            order.push(key);
        }
        group.push(job);
    }
    order.into_iter().filter_map(|key| groups.remove(&key)).collect()
}

fn run_group(engine: &Engine, group: Vec<Job>, metrics: &Metrics) {
    let now = Instant::now();
    let (live, expired): (Vec<Job>, Vec<Job>) = group.into_iter().partition(|j| j.deadline.is_none_or(|d| d > now));
    for job in expired {
        let _ = job.reply.send(Err(JobError::DeadlineExceeded));
    }
    if live.is_empty() {
        return;
    }
    let gallery = live[0].gallery.clone();
    let snapshot = match gallery.snapshot() {
        Ok(s) if live.iter().all(|j| j.dim == s.dim()) => s,
        other => {
            let status = match other {
                Err(e) => super::service::status_of(e),
                Ok(_) => tonic::Status::aborted("the gallery was replaced while the request waited"),
            };
            for job in live {
                let _ = job.reply.send(Err(JobError::Engine(status.clone())));
            }
            return;
        }
    };
    let dim = snapshot.dim();
    let k = live.iter().map(|j| j.k).max().expect("non-empty");
    let threshold = if live.iter().all(|j| j.threshold.is_some()) {
        live.iter().filter_map(|j| j.threshold).reduce(f32::min)
    } else {
        None
    };
    let mut probes = Vec::with_capacity(live.iter().map(|j| j.probes.len()).sum());
    for j in &live {
        probes.extend_from_slice(&j.probes);
    }
    metrics.batch_probes.observe((probes.len() / dim) as f64);
    metrics.batch_requests.observe(live.len() as f64);
    let t = Instant::now();
    // A panicking search (a defect) answers this group with an error; the engine
    // thread lives on for the next one.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.search(&snapshot, &probes, &SearchParams { k, threshold })
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %what, gallery = %gallery.name, "a search panicked");
        Err(crate::error::Error::Internal(format!(
            "the search engine failed ({what}); the request was not answered"
        )))
    });
    metrics.engine_seconds.observe(t.elapsed().as_secs_f64());
    match result {
        Ok(results) => {
            let mut results = results.into_iter();
            for job in live {
                let n = job.probes.len() / dim;
                let mine = results
                    .by_ref()
                    .take(n)
                    .map(|mut r| {
                        if let Some(t) = job.threshold {
                            r.candidates.retain(|c| c.score >= t);
                        }
                        r.candidates.truncate(job.k);
                        r.matched = job.threshold.map(|_| !r.candidates.is_empty());
                        r
                    })
                    .collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            // Probes are validated before they are queued, so this is not one request's
            // fault; every request in the group hears about it. Damage found by the
            // search takes the gallery out of service at once.
            if let crate::error::Error::Corrupt(why) = &e {
                gallery.mark_damaged(why.clone());
            }
            let status = match e {
                crate::error::Error::Corrupt(why) => tonic::Status::data_loss(format!(
                    "gallery {:?} is not serving: {why}; repair it (RepairGallery) or drop it",
                    gallery.name
                )),
                other => super::service::status_of(other),
            };
            for job in live {
                let _ = job.reply.send(Err(JobError::Engine(status.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::registry::Registry;
    use crate::template::Dtype;

    fn job(
        gallery: Arc<GalleryEntry>,
        deadline: Option<Instant>,
    ) -> (Job, oneshot::Receiver<Result<Vec<ProbeResult>, JobError>>) {
        let (reply, rx) = oneshot::channel();
        let probes = vec![1.0, 0.0, 0.0, 0.0];
        (
            Job {
                gallery,
                dim: 4,
                probes,
                k: 1,
                threshold: None,
                deadline,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn expired_work_never_reaches_the_engine_and_a_full_queue_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let g = one_gallery(dir.path());
        let metrics = Metrics::new();
        let config = BatchConfig {
            max_batch: 8,
            max_wait: Duration::ZERO,
            queue_capacity: 4,
        };
        let b = Batcher::start(Engine::cpu(), config, metrics.clone());
        let (expired, rx1) = job(g.clone(), Some(Instant::now() - Duration::from_millis(1)));
        let (fresh, rx2) = job(g.clone(), Some(Instant::now() + Duration::from_secs(5)));
        b.submit(expired).map_err(|_| ()).unwrap();
        b.submit(fresh).map_err(|_| ()).unwrap();
        assert!(matches!(rx1.blocking_recv().unwrap(), Err(JobError::DeadlineExceeded)));
        let ok = rx2.blocking_recv().unwrap().map_err(|_| ()).unwrap();
        assert_eq!(ok[0].candidates[0].subject, "a");
        // One engine batch at most held the fresh job; the expired one was not searched.
        assert!(
            metrics.encode().contains("biogate_batch_probes_sum 1.0"),
            "{}",
            metrics.encode()
        );

        let (stalled, _rx) = Batcher::unstarted(1);
        let (a, _) = job(g.clone(), None);
        let (c, _) = job(g, None);
        assert!(stalled.submit(a).is_ok());
        assert!(stalled.submit(c).is_err(), "a full queue refuses at once");
    }

    /// A backend that panics on its first search.
    struct PanicsOnce(std::sync::atomic::AtomicBool, crate::engine::cpu::CpuBackend);

    impl crate::engine::Backend for PanicsOnce {
        fn name(&self) -> &'static str {
            "panics-once"
        }
        fn search_slab(
            &self,
            slab: &crate::gallery::Slab<'_>,
            probes: &crate::engine::EncodedProbes,
            k: usize,
            floor: f32,
        ) -> crate::error::Result<Vec<Vec<crate::engine::Hit>>> {
            if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("a defect in a backend");
            }
            self.1.search_slab(slab, probes, k, floor)
        }
    }

    fn one_gallery(dir: &std::path::Path) -> Arc<GalleryEntry> {
        let registry = Registry::open(dir, crate::storage::Storage::default()).unwrap();
        let g = registry.create("g", 4, Dtype::F32).unwrap();
        g.write(|w| {
            w.enroll(&[crate::gallery::Enrollment {
                subject: "a".into(),
                templates: vec![1.0, 0.0, 0.0, 0.0],
            }])
        })
        .unwrap();
        g
    }

    #[test]
    fn a_panicking_search_is_answered_with_an_error_and_the_engine_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let g = one_gallery(dir.path());
        let backend = PanicsOnce(Default::default(), crate::engine::cpu::CpuBackend::new());
        let config = BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: 4,
        };
        let b = Batcher::start(Engine::new(Arc::new(backend)), config, Metrics::new());
        let (first, rx1) = job(g.clone(), None);
        assert!(b.submit(first).is_ok());
        match rx1.blocking_recv().unwrap() {
            Err(JobError::Engine(s)) => {
                assert_eq!(s.code(), tonic::Code::Internal);
                assert!(s.message().contains("a defect in a backend"), "{}", s.message());
            }
            _ => panic!("the panic must be answered with an error"),
        }
        let (second, rx2) = job(g, None);
        assert!(b.submit(second).is_ok());
        let ok = rx2.blocking_recv().unwrap().map_err(|_| ()).unwrap();
        assert_eq!(ok[0].candidates[0].subject, "a");
        assert_eq!(b.restarts(), 0, "the thread never died");
    }

    #[test]
    fn a_large_k_request_is_searched_apart_from_the_small_ones() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path(), crate::storage::Storage::default()).unwrap();
        let g = registry.create("g", 4, Dtype::F32).unwrap();
        let other = registry.create("other", 4, Dtype::F32).unwrap();
        let mut jobs = Vec::new();
        for (gallery, k) in [(&g, 10), (&g, 500), (&g, 7), (&other, 10), (&g, 9), (&g, 16), (&g, 17)] {
            let (mut j, _) = job(gallery.clone(), None);
            j.k = k;
            jobs.push(j);
        }
        let groups: Vec<Vec<usize>> = group_jobs(jobs)
            .iter()
            .map(|group| group.iter().map(|j| j.k).collect())
            .collect();
        // g's k = 10, 9 and 16 share a search (band 16), k = 7 its own (band 8), k = 17
        // (band 32) and k = 500 theirs; the other gallery apart from all of them.
        assert_eq!(groups, vec![vec![10, 9, 16], vec![500], vec![7], vec![10], vec![17]]);
    }

    #[test]
    fn a_dead_engine_thread_is_started_again_by_the_next_submit() {
        let dir = tempfile::tempdir().unwrap();
        let g = one_gallery(dir.path());
        let config = BatchConfig {
            max_batch: 4,
            max_wait: Duration::ZERO,
            queue_capacity: 4,
        };
        let b = Batcher::start(Engine::cpu(), config, Metrics::new());
        b.kill_engine_thread();
        let (j, rx) = job(g, None);
        assert!(b.submit(j).is_ok(), "not 'queue full': the thread is started again");
        let ok = rx.blocking_recv().unwrap().map_err(|_| ()).unwrap();
        assert_eq!(ok[0].candidates[0].subject, "a");
        assert_eq!(b.restarts(), 1);
    }
}
