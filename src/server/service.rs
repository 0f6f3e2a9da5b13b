//! The gRPC service: every call is admitted (a cap on calls in flight), authorised by
//! role, validated (naming the bad field), run (searches through the batcher, writes on
//! the gallery), audited and counted, and its errors mapped to the right status codes.
//!
//! The audit trail is complete and tells the truth: every call, refused or not, gets a
//! line with its outcome and status code. A write is preceded by a durable "intent"
//! line, so nothing takes effect unless its audit record is durable; once it has taken
//! effect the client is told so, even if the final line cannot be written (that is
//! logged and counted). A search's answer is withheld unless its line is durable.

use super::audit::{AuditEntry, AuditLog};
use super::auth::{Auth, Caller};
use super::batcher::{Batcher, Job, JobError, SubmitError};
use super::config::{Config, Role};
use super::encounters as encounter_rpc;
use super::metrics::{Metrics, Refusal};
use super::proto;
use super::proto::biogate_server::Biogate;
use super::registry::{GalleryEntry, GalleryStatus, Registry};
use super::replication::{Replication, Write};
use super::search_request;
use crate::encounters::{EncounterLog, EncounterStore, StatsBy};
use crate::engine::{Engine, ProbeResult};
use crate::error::{Error, GpuErrorKind};
use crate::gallery::Enrollment;
use crate::template::{Dtype, canonical_subject_id, normalize_into};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// Everything a request handler needs.
pub struct Service {
    pub registry: Arc<Registry>,
    pub batcher: Batcher,
    pub engine: Engine,
    pub audit: AuditLog,
    /// Where Identify requests with an encounter context are recorded.
    pub encounters: EncounterLog,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
    /// One permit per call being handled (`max_requests_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Set when this server is a node of a cluster (`serve --etcd`): writes to its
    /// replicas go through the shard's log (replication.rs).
    pub replication: std::sync::OnceLock<Arc<dyn Replication>>,
}

/// Map a library error to a gRPC status. Messages keep file names but not the server's
/// directories (a remote caller has no business knowing the layout of the host).
pub fn status_of(e: Error) -> Status {
    let status = status_with_paths(e);
    Status::new(status.code(), without_directories(status.message()))
}

/// `/srv/biogate/galleries/g/seg-000003.bgs` -> `seg-000003.bgs`, for every absolute
/// path in `text` (a run of characters from a `/` to a space, quote, colon or comma).
fn without_directories(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('/') {
        let absolute = start == 0 || matches!(rest.as_bytes()[start - 1], b' ' | b'"' | b'(' | b'\'' | b'=');
        if !absolute {
            out.push_str(&rest[..=start]);
            rest = &rest[start + 1..];
            continue;
        }
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find([' ', '"', '\'', ':', ',', ')'])
            .map_or(rest.len(), |e| start + e);
        let path = &rest[start..end];
        out.push_str(path.rsplit('/').find(|p| !p.is_empty()).unwrap_or(""));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn status_with_paths(e: Error) -> Status {
    match e {
        Error::InvalidInput(m) => Status::invalid_argument(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::Locked(m) => Status::failed_precondition(format!("gallery {m} is locked by another process")),
        Error::Corrupt(m) => Status::data_loss(m),
        Error::Io { ref source, .. } if source.raw_os_error() == Some(crate::storage::ENOSPC) => {
            Status::resource_exhausted(e.to_string())
        }
        Error::Io { .. } => Status::internal(e.to_string()),
        Error::Poisoned(_) => {
            Status::failed_precondition(format!("{e}; RepairGallery reopens it (searches still work)"))
        }
        Error::OutcomeUnknown(m) => Status::unknown(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Aborted(m) => Status::aborted(m),
        Error::Gpu(ref g) => match g.kind {
            GpuErrorKind::OutOfMemory => Status::resource_exhausted(e.to_string()),
            GpuErrorKind::NotAvailable | GpuErrorKind::DeviceLost | GpuErrorKind::Timeout => {
                Status::unavailable(e.to_string())
            }
            GpuErrorKind::Internal => Status::internal(e.to_string()),
        },
        Error::Remote { .. } => Status::unavailable(e.to_string()),
        Error::Config(m) => Status::failed_precondition(m),
        Error::Internal(m) => Status::internal(m),
    }
}

/// Decode packed little-endian f32 bytes of exactly `dim` values, checked like any
/// template (finite, not zero). `field` names it in errors ("probes[3]").
pub fn decode_template(bytes: &[u8], dim: usize, field: &str) -> Result<Vec<f32>, Status> {
    if bytes.len() != 4 * dim {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes is not {dim} float32 values ({} bytes) for this gallery",
            bytes.len(),
            4 * dim
        )));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut scratch = vec![0.0; dim];
    normalize_into(&values, &mut scratch, || field.to_owned()).map_err(status_of)?;
    Ok(values)
}

/// The deadline a client set (`grpc-timeout`), if any.
pub fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let v = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(Instant::now() + d)
}

fn to_proto(r: &ProbeResult) -> proto::ProbeResult {
    proto::ProbeResult {
        decided: r.matched.is_some(),
        matched: r.matched.unwrap_or(false),
        candidates: r
            .candidates
            .iter()
            .map(|c| proto::Candidate {
                subject: c.subject.clone(),
                score: c.score,
            })
            .collect(),
    }
}

fn check_threshold(t: Option<f32>) -> Result<(), Status> {
    match t {
        Some(t) if !(-1.0..=1.0).contains(&t) => Err(Status::invalid_argument(format!(
            "threshold: {t} is out of range [-1, 1]"
        ))),
        _ => Ok(()),
    }
}

/// The galleries of a multi-gallery search, as the audit log names them.
pub(crate) fn gallery_names(searches: &[proto::GallerySearch]) -> String {
    searches
        .iter()
        .map(|s| super::registry::echo_name(&s.gallery))
        .collect::<Vec<_>>()
        .join(",")
}

/// A query queued for the engine, not yet answered.
struct Pending {
    wait: oneshot::Receiver<Result<Vec<ProbeResult>, JobError>>,
    probes: usize,
}

/// What one identify asks, borrowed from either request type.
struct IdentifyQuery<'a> {
    gallery: &'a str,
    probes: &'a [Vec<u8>],
    k: u32,
    threshold: Option<f32>,
    /// The request field holding the probes, for error messages.
    field: &'a str,
}

/// A request's `subject` field in canonical form (template.rs), or INVALID_ARGUMENT
/// naming the field and what is wrong with it.
pub fn subject_field(id: &str) -> Result<String, Status> {
    canonical_subject_id(id)
        .map(std::borrow::Cow::into_owned)
        .map_err(|e| Status::invalid_argument(format!("subject: {e}")))
}

/// Run a blocking library call (disk writes, a verify scan) off the async threads and map
/// its error to a status.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status_of)
}

/// One call being handled: who, what, and what to audit when it ends.
struct Call {
    method: &'static str,
    peer: String,
    caller: String,
    gallery: String,
    start: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

/// What a successful call audits.
#[derive(Default)]
struct Audited {
    subjects: Vec<(String, Option<f32>)>,
    count: usize,
    /// The call changed something, after a durable intent line: its answer stands even
    /// if the final line cannot be written.
    took_effect: bool,
}

pub(crate) fn audit_status(what: &str, e: std::io::Error) -> Status {
    if e.raw_os_error() == Some(crate::storage::ENOSPC) {
        Status::resource_exhausted(format!("audit log: {e}; {what}"))
    } else {
        Status::unavailable(format!("audit log: {e}; {what}"))
    }
}

fn gallery_info(s: &GalleryStatus, backend: &str) -> proto::GalleryInfo {
    let mut g = proto::GalleryInfo {
        name: s.name.clone(),
        backend: backend.into(),
        state: if s.problem.is_none() { "SERVING" } else { "NOT_SERVING" }.into(),
        reason: s.problem.as_ref().map(|p| p.reason()).unwrap_or_default(),
        read_only_reason: s.read_only.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(i) = &s.info {
        g.dim = i.dim as u32;
        g.dtype = i.dtype.name().into();
        g.rows = i.rows;
        g.subjects = i.subjects;
        g.bytes = i.bytes_on_disk;
        g.expires_at = i.expires_at.clone().unwrap_or_default();
    }
    g
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<proto::IdentifyStreamResponse, Status>> + Send>>;

impl Service {
    /// CreateGallery from a source gallery and a subject list (a flight's gallery).
    async fn derive_gallery(
        &self,
        call: &Call,
        req: proto::CreateGalleryRequest,
    ) -> Result<(proto::GalleryInfo, Audited), Status> {
        super::registry::check_gallery_name(&req.name).map_err(status_of)?;
        let source = self.gallery(&req.source)?;
        let snapshot = source.snapshot().map_err(status_of)?;
        if req.dim != 0 && req.dim as usize != snapshot.dim() {
            return Err(Status::invalid_argument(format!(
                "dim: {} differs from the source gallery's {}",
                req.dim,
                snapshot.dim()
            )));
        }
        if !req.dtype.is_empty() && req.dtype != snapshot.dtype().name() {
            return Err(Status::invalid_argument(format!(
                "dtype: {:?} differs from the source gallery's {}",
                req.dtype,
                snapshot.dtype()
            )));
        }
        crate::gallery::derive::check_subject_list(&req.subjects).map_err(status_of)?;
        let expires_at = self.expiry_of(
            &req.expires_at,
            "expires_at",
            self.config.retention.gallery_retention_ms(&req.name),
        )?;
        let registry = self.registry.clone();
        let (name, from, subjects) = (req.name.clone(), req.source.clone(), req.subjects);
        let (entry, report) = self
            .admin_write(call, move || registry.derive(&name, &from, &subjects, expires_at))
            .await?;
        tracing::info!(
            caller = %call.caller,
            gallery = %req.name,
            source = %req.source,
            subjects = report.subjects,
            missing = report.missing.len(),
            "derived gallery"
        );
        let mut info = gallery_info(&entry.status(), self.engine.backend_name());
        info.missing_subjects = report.missing;
        Ok((
            info,
            Audited {
                count: report.subjects as usize,
                took_effect: true,
                ..Default::default()
            },
        ))
    }

    /// Start a call: note who is asking from where.
    fn begin<T>(&self, method: &'static str, request: &Request<T>, gallery: &str) -> Call {
        Call {
            method,
            peer: request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            caller: "-".into(),
            gallery: gallery.to_owned(),
            start: Instant::now(),
            _permit: None,
        }
    }

    /// Take one of the in-flight permits, or refuse with RESOURCE_EXHAUSTED.
    fn admit(&self, call: &mut Call) -> Result<(), Status> {
        match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => {
                call._permit = Some(p);
                Ok(())
            }
            Err(_) => {
                self.metrics.refuse(
                    Refusal::RequestsInFlight,
                    &format!("{} calls in flight", self.config.max_requests_in_flight),
                );
                Err(Status::resource_exhausted(format!(
                    "the server is handling its limit of {} calls; retry later",
                    self.config.max_requests_in_flight
                )))
            }
        }
    }

    /// Check the caller's token and role; counts and names refusals.
    fn authorize<T>(&self, call: &mut Call, request: &Request<T>, role: Role) -> Result<Caller, Status> {
        match self.auth.check(request, role) {
            Ok(c) => {
                call.caller = c.name.clone();
                Ok(c)
            }
            Err(s) => {
                if s.code() == Code::PermissionDenied {
                    call.caller = self.auth.name_of(request).unwrap_or_else(|| "-".into());
                    self.metrics.refuse(
                        Refusal::PermissionDenied,
                        &format!("{} from {}", call.method, call.peer),
                    );
                } else {
                    self.metrics
                        .refuse(Refusal::Unauthenticated, &format!("{} from {}", call.method, call.peer));
                }
                Err(s)
            }
        }
    }

    /// Write a durable "intent" line before a write takes effect; if it cannot be
    /// written, the write does not happen.
    async fn intent(&self, call: &Call, subjects: &[&str], count: usize) -> Result<(), Status> {
        self.audit
            .record(&AuditEntry {
                peer: &call.peer,
                caller: &call.caller,
                method: call.method,
                gallery: &call.gallery,
                phase: "intent",
                outcome: "pending",
                code: 0,
                error: None,
                subjects: subjects.iter().map(|s| (*s, None)).collect(),
                count,
                rule: None,
            })
            .await
            .map_err(|e| {
                self.metrics.audit_failures.inc();
                audit_status("nothing was done", e)
            })
    }

    /// End a call: audit its outcome, count it, and answer.
    async fn finish<T>(&self, call: Call, r: Result<(T, Audited), Status>) -> Result<Response<T>, Status> {
        match r {
            Ok((v, audited)) => self.finish_with(call, Ok(v), audited).await,
            Err(s) => self.finish_with(call, Err(s), Audited::default()).await,
        }
    }

    /// [`Service::finish`] with what the call did audited whatever its outcome (a
    /// stream that failed part way after some of its writes took effect).
    async fn finish_with<T>(&self, call: Call, r: Result<T, Status>, audited: Audited) -> Result<Response<T>, Status> {
        let (code, error) = match &r {
            Ok(_) => (Code::Ok, None),
            Err(s) => (s.code(), Some(s.message().to_owned())),
        };
        let outcome = if code == Code::Ok {
            "ok".to_owned()
        } else {
            super::status_code_name(code)
        };
        let audited = &audited;
        let written = self
            .audit
            .record(&AuditEntry {
                peer: &call.peer,
                caller: &call.caller,
                method: call.method,
                gallery: &call.gallery,
                phase: "done",
                outcome: &outcome,
                code: code as i32,
                error: error.as_deref(),
                subjects: audited.subjects.iter().map(|(s, v)| (s.as_str(), *v)).collect(),
                count: audited.count,
                rule: None,
            })
            .await;
        let answer = match (r, written) {
            (r, Ok(())) => r,
            (Ok(v), Err(e)) if audited.took_effect => {
                self.metrics.audit_failures.inc();
                tracing::error!(method = call.method, caller = %call.caller, gallery = %call.gallery, error = %e,
                    "audit log: the outcome line of a completed write could not be written (its intent line is durable)");
                Ok(v)
            }
            (Ok(_), Err(e)) => {
                self.metrics.audit_failures.inc();
                Err(audit_status("the answer is withheld", e))
            }
            (Err(s), Err(e)) => {
                self.metrics.audit_failures.inc();
                tracing::error!(method = call.method, caller = %call.caller, error = %e, "audit log: could not record a failed call");
                Err(s)
            }
        };
        let code = answer.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        self.metrics
            .observe(call.method, code, call.start.elapsed().as_secs_f64());
        answer.map(Response::new)
    }

    /// A gallery by name; an expired one is NOT_FOUND (it answers nothing and is
    /// dropped at the next purge).
    /// The write path of the cluster this server is a node of, if any: then every
    /// write goes through a shard's log, never straight to a local gallery.
    fn replication(&self) -> Option<Arc<dyn Replication>> {
        self.replication.get().cloned()
    }

    /// On a cluster node, a read the router sent to replica `local` is answered only
    /// by the replica the router chose (cluster/node/reads.rs): UNAVAILABLE otherwise,
    /// and the router asks another.
    fn check_replica_read<T>(&self, request: &Request<T>, local: &str) -> Result<(), Status> {
        self.check_replica_read_of(request.metadata(), local)
    }

    fn check_replica_read_of(&self, metadata: &tonic::metadata::MetadataMap, local: &str) -> Result<(), Status> {
        if let Some(replication) = self.replication.get() {
            replication.check_read(local, metadata).map_err(status_of)?;
        }
        Ok(())
    }

    /// Refuse a catalogue change on a cluster node (the router makes them).
    fn not_on_a_node(&self) -> Result<(), Status> {
        if let Some(replication) = self.replication.get() {
            return Err(Status::failed_precondition(format!(
                "this server is node {:?} of a cluster: create and drop galleries through `biogate router`",
                replication.node_name()
            )));
        }
        Ok(())
    }

    fn gallery(&self, name: &str) -> Result<Arc<GalleryEntry>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("gallery: empty gallery name"));
        }
        let entry = self.registry.get(name).map_err(status_of)?;
        if let Ok(snapshot) = entry.snapshot()
            && snapshot.expiry().gallery_expired(crate::time_text::now_ms())
        {
            let expired = status_of(snapshot.expiry().gallery_expired_error());
            return Err(Status::not_found(format!(
                "gallery {}: {}",
                super::registry::echo_name(name),
                expired.message()
            )));
        }
        Ok(entry)
    }

    fn check_k(&self, k: u32) -> Result<usize, Status> {
        if k == 0 || k as usize > self.config.max_k {
            return Err(Status::invalid_argument(format!(
                "k: {k} is out of range 1..={}",
                self.config.max_k
            )));
        }
        Ok(k as usize)
    }

    /// Validate, queue and await one identify job (shared by Identify and IdentifyStream).
    async fn identify_probes(
        &self,
        query: IdentifyQuery<'_>,
        deadline: Option<Instant>,
    ) -> Result<(Vec<ProbeResult>, Audited), Status> {
        let pending = self.submit_probes(query, deadline)?;
        self.answer_of(pending, deadline).await
    }

    /// Search the same probes in several galleries (checked by
    /// [`search_request::check_several`]), each with its own k and threshold: every
    /// search is queued before any is awaited, so the engine takes them in one batch.
    /// Answers in the order of `searches`.
    async fn identify_in_galleries(
        &self,
        searches: &[proto::GallerySearch],
        probes: &[Vec<u8>],
        field: &str,
        deadline: Option<Instant>,
    ) -> Result<(Vec<(String, Vec<ProbeResult>)>, Audited), Status> {
        let mut pending = Vec::with_capacity(searches.len());
        for (i, s) in searches.iter().enumerate() {
            let query = IdentifyQuery {
                gallery: &s.gallery,
                probes,
                k: s.k,
                threshold: s.threshold,
                field,
            };
            let submitted = self.submit_probes(query, deadline).map_err(|e| {
                Status::new(
                    e.code(),
                    format!(
                        "galleries[{i}] ({}): {}",
                        super::registry::echo_name(&s.gallery),
                        e.message()
                    ),
                )
            })?;
            pending.push(submitted);
        }
        let mut answers = Vec::with_capacity(searches.len());
        let mut audited = Audited::default();
        for (s, p) in searches.iter().zip(pending) {
            let (results, a) = self.answer_of(p, deadline).await?;
            audited.subjects.extend(a.subjects);
            audited.count = audited.count.max(a.count);
            answers.push((s.gallery.clone(), results));
        }
        Ok((answers, audited))
    }

    /// Validate a query and queue it for the engine.
    fn submit_probes(&self, query: IdentifyQuery<'_>, deadline: Option<Instant>) -> Result<Pending, Status> {
        let IdentifyQuery {
            gallery,
            probes,
            k,
            threshold,
            field,
        } = query;
        let k = self.check_k(k)?;
        check_threshold(threshold)?;
        if probes.is_empty() {
            return Err(Status::invalid_argument(format!("{field}: no probes given")));
        }
        if probes.len() > self.config.max_probes_per_request {
            return Err(Status::invalid_argument(format!(
                "{field}: {} probes is more than the {} allowed per request",
                probes.len(),
                self.config.max_probes_per_request
            )));
        }
        let entry = self.gallery(gallery)?;
        let dim = entry.snapshot().map_err(status_of)?.dim();
        let mut values = Vec::with_capacity(probes.len() * dim);
        for (i, p) in probes.iter().enumerate() {
            let name = if probes.len() == 1 && field == "probe" {
                field.to_owned()
            } else {
                format!("{field}[{i}]")
            };
            values.extend(decode_template(p, dim, &name)?);
        }
        let (reply, wait) = oneshot::channel();
        let job = Job {
            gallery: entry,
            dim,
            probes: values,
            k,
            threshold,
            deadline,
            reply,
        };
        match self.batcher.submit(job) {
            Ok(()) => Ok(Pending {
                wait,
                probes: probes.len(),
            }),
            Err(SubmitError::Full(_)) => {
                self.metrics.refuse(Refusal::Queue, "the search queue is full");
                Err(Status::resource_exhausted("the search queue is full; retry later"))
            }
            Err(SubmitError::Stopped(_)) => Err(Status::unavailable(
                "the search engine could not be started; see the server's log",
            )),
        }
    }

    /// Wait for a queued query's answer.
    async fn answer_of(
        &self,
        pending: Pending,
        deadline: Option<Instant>,
    ) -> Result<(Vec<ProbeResult>, Audited), Status> {
        let Pending { wait, probes } = pending;
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), wait)
                .await
                .map_err(|_| Status::deadline_exceeded("deadline passed while waiting for the engine"))?,
            None => wait.await,
        };
        let results = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(JobError::DeadlineExceeded)) => {
                return Err(Status::deadline_exceeded("deadline passed before the search started"));
            }
            Ok(Err(JobError::Engine(s))) => return Err(s),
            Err(_) => return Err(Status::unavailable("the engine stopped")),
        };
        let audited = Audited {
            subjects: results
                .iter()
                .flat_map(|r| r.candidates.iter().map(|c| (c.subject.clone(), Some(c.score))))
                .collect(),
            count: probes,
            took_effect: false,
        };
        Ok((results, audited))
    }

    /// Enroll a client stream in groups: every message that has already arrived (up to
    /// `ENROLL_GROUP` messages or `ENROLL_GROUP_BYTES`) is validated, audited as an
    /// intent, and made durable with one log fsync. The stream is read ahead of the
    /// writes (read_ahead.rs), so small messages never pile up unread in HTTP/2. If a
    /// message is bad, or the stream breaks, the messages before it are still enrolled
    /// and the error says how many were (never UNAVAILABLE, which reads as "nothing
    /// happened, retry"). Returns what was enrolled, audited even when the call fails,
    /// and the galleries written.
    async fn enroll_stream(
        &self,
        call: &Call,
        stream: Streaming<proto::EnrollRequest>,
    ) -> (Result<proto::EnrollResponse, Status>, Audited, Vec<String>) {
        const ENROLL_GROUP: usize = 4096;
        const ENROLL_GROUP_BYTES: usize = 8 << 20;
        let mut done = proto::EnrollResponse::default();
        let mut audited = Audited::default();
        let mut galleries: Vec<String> = Vec::new();
        let mut index = 0usize;
        let mut incoming = super::read_ahead::read_ahead(stream, 2 * ENROLL_GROUP_BYTES);
        let enrolled = |done: &proto::EnrollResponse| {
            format!(
                "{} subjects ({} templates) from earlier messages are enrolled",
                done.subjects, done.templates
            )
        };
        loop {
            // Wait for one message, then take whatever else is already here.
            let mut broken = None;
            let mut ended = false;
            let mut group = Vec::new();
            match incoming.recv().await {
                Some(Ok(m)) => group.push(m),
                Some(Err(e)) => broken = Some(e),
                None => break,
            }
            let mut bytes = group.first().map_or(0, |m| m.bytes);
            while broken.is_none() && group.len() < ENROLL_GROUP && bytes < ENROLL_GROUP_BYTES {
                match incoming.try_recv() {
                    Ok(Ok(m)) => {
                        bytes += m.bytes;
                        group.push(m);
                    }
                    Ok(Err(e)) => broken = Some(e),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        ended = true;
                        break;
                    }
                }
            }
            // Validate in order; a bad message cuts the group there.
            let mut valid: Vec<(Arc<GalleryEntry>, proto::EnrollRequest, Enrollment, Option<i64>)> = Vec::new();
            let mut failure = None;
            for ahead in group {
                let msg = ahead.message;
                match self.check_enrollment(&msg) {
                    Ok((entry, enrollment, expires_at)) => valid.push((entry, msg, enrollment, expires_at)),
                    Err(s) => {
                        failure = Some((index + valid.len(), s));
                        break;
                    }
                }
            }
            // Commit per gallery (a stream usually names one), in order.
            let mut at = 0;
            while at < valid.len() {
                let gallery = valid[at].0.clone();
                if !galleries.contains(&gallery.name) {
                    galleries.push(gallery.name.clone());
                }
                let end = at + valid[at..].iter().take_while(|v| Arc::ptr_eq(&v.0, &gallery)).count();
                let templates: usize = valid[at..end].iter().map(|v| v.1.templates.len()).sum();
                let subjects: Vec<String> = valid[at..end].iter().map(|v| v.2.subject.clone()).collect();
                let group_call = Call {
                    method: call.method,
                    peer: call.peer.clone(),
                    caller: call.caller.clone(),
                    gallery: gallery.name.clone(),
                    start: call.start,
                    _permit: None,
                };
                let batch: Vec<Enrollment> = valid[at..end].iter().map(|v| v.2.clone()).collect();
                let expires: Vec<Option<i64>> = valid[at..end].iter().map(|v| v.3).collect();
                let committed = self
                    .commit_enrollments(&group_call, &gallery, batch, expires, templates)
                    .await;
                if let Err(s) = committed {
                    let s = Status::new(s.code(), format!("{}; {}", s.message(), enrolled(&done)));
                    return (Err(s), audited, galleries);
                }
                done.subjects += (end - at) as u64;
                done.templates += templates as u64;
                audited.took_effect = true;
                audited.count += templates;
                audited.subjects.extend(subjects.into_iter().map(|s| (s, None)));
                at = end;
            }
            index += valid.len();
            if let Some((i, s)) = failure {
                let s = Status::new(s.code(), format!("message {i}: {}; {}", s.message(), enrolled(&done)));
                return (Err(s), audited, galleries);
            }
            if let Some(e) = broken {
                // The client's stream ended early (a reset, a dropped connection): what
                // was made durable stands, and the answer (if it can still reach the
                // client) and the audit line say how much that is.
                let s = Status::aborted(format!(
                    "the request stream broke after message {index} ({}: {}); {}; send only the messages after them again",
                    super::status_code_name(e.code()),
                    e.message(),
                    enrolled(&done)
                ));
                return (Err(s), audited, galleries);
            }
            if ended {
                break;
            }
        }
        (Ok(done), audited, galleries)
    }

    /// Make one group of a stream's enrollments durable in `gallery` (after their
    /// intent line): through the cluster's shard log on a node, else with one append
    /// to the gallery's log (sealing it when it is due). Returns the templates enrolled.
    async fn commit_enrollments(
        &self,
        call: &Call,
        gallery: &Arc<GalleryEntry>,
        batch: Vec<Enrollment>,
        expires: Vec<Option<i64>>,
        templates: usize,
    ) -> Result<usize, Status> {
        let subjects: Vec<&str> = batch.iter().map(|e| e.subject.as_str()).collect();
        self.intent(call, &subjects, templates).await?;
        if let Some(replication) = self.replication() {
            let writes = batch
                .into_iter()
                .zip(expires)
                .map(|(enrollment, expires_at)| Write::Enroll { enrollment, expires_at })
                .collect();
            replication.commit(&gallery.name, writes).await.map_err(status_of)?;
            return Ok(templates);
        }
        let writer = gallery.clone();
        let seal_at = self.config.seal_log_rows;
        blocking(move || {
            writer.write(|g| {
                let n = g.enroll_expiring(&batch, &expires)?;
                if g.log_rows() >= seal_at {
                    // The enrollment is durable either way: a failed seal is logged
                    // and retried on the next enroll, not reported.
                    match g.seal_log() {
                        Ok(rows) => tracing::info!(gallery = %g.dir().display(), rows, "sealed the log"),
                        Err(e) => {
                            tracing::error!(gallery = %g.dir().display(), error = %e, "sealing the log failed")
                        }
                    }
                }
                Ok(n)
            })
        })
        .await
    }

    /// An expiry from a request's RFC 3339 `text` (`field` names it), in the future;
    /// empty: `default_ms` from now, if a rule gives one.
    fn expiry_of(&self, text: &str, field: &str, default_ms: Option<i64>) -> Result<Option<i64>, Status> {
        let now = crate::time_text::now_ms();
        if text.is_empty() {
            return Ok(default_ms.map(|d| now.saturating_add(d)));
        }
        let at = crate::time_text::parse_time(text, field).map_err(status_of)?;
        crate::gallery::expiry::check_future(at, now, field).map_err(status_of)?;
        Ok(Some(at))
    }

    fn check_enrollment(
        &self,
        msg: &proto::EnrollRequest,
    ) -> Result<(Arc<GalleryEntry>, Enrollment, Option<i64>), Status> {
        let entry = self.gallery(&msg.gallery)?;
        let subject = subject_field(&msg.subject)?;
        let expires_at = self.expiry_of(
            &msg.expires_at,
            "expires_at",
            self.config.retention.subject_retention_ms(&msg.gallery),
        )?;
        if msg.templates.is_empty() {
            return Err(Status::invalid_argument("templates: no templates given"));
        }
        let dim = entry.snapshot().map_err(status_of)?.dim();
        let mut templates = Vec::with_capacity(msg.templates.len() * dim);
        for (i, t) in msg.templates.iter().enumerate() {
            templates.extend(decode_template(t, dim, &format!("templates[{i}]"))?);
        }
        Ok((entry, Enrollment { subject, templates }, expires_at))
    }

    /// Make a request's encounters durable before it is answered, under the caller's
    /// claim on its request id (`request`: the request message with its id cleared, to
    /// fingerprint). If they cannot be recorded the answer is withheld: UNAVAILABLE
    /// (retry under the same id), or ALREADY_EXISTS when the caller used the id before
    /// for a different request (a new request needs a new id).
    async fn record_encounters(
        &self,
        call: &Call,
        request_id: &str,
        request: &impl prost::Message,
        rows: Vec<crate::encounters::Encounter>,
    ) -> Result<(), Status> {
        let claim = crate::encounters::RequestClaim {
            caller: call.caller.clone(),
            request_id: request_id.to_owned(),
            fingerprint: crate::encounters::fingerprint(&request.encode_to_vec()),
        };
        self.encounters.record(claim, rows).await.map_err(|e| match e {
            crate::encounters::RecordError::Reused { .. } => Status::already_exists(format!(
                "request_id: {e}; nothing was recorded and the answer is withheld (a new request needs a new id)"
            )),
            crate::encounters::RecordError::Failed(why) => {
                tracing::error!(error = %why, "encounters could not be recorded; the answer is withheld");
                Status::unavailable("the encounter could not be recorded; the answer is withheld (retry)")
            }
        })
    }

    /// Run a report over the encounter database on a blocking thread.
    async fn encounter_report<T: Send + 'static>(
        &self,
        report: impl FnOnce(&EncounterStore) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let dir = self.config.data_dir.clone();
        blocking(move || report(&EncounterStore::open(&dir)?)).await
    }

    /// An admin write on a gallery by name: intent line, the blocking operation, then
    /// the outcome (audited by `finish`).
    async fn admin_write<T: Send + 'static>(
        &self,
        call: &Call,
        op: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        self.intent(call, &[], 0).await?;
        blocking(op).await
    }
}

#[tonic::async_trait]
impl Biogate for Arc<Service> {
    async fn identify(
        &self,
        request: Request<proto::IdentifyRequest>,
    ) -> Result<Response<proto::IdentifyResponse>, Status> {
        let mut call = self.begin("Identify", &request, &request.get_ref().gallery);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Identify)?;
            self.check_replica_read(&request, &request.get_ref().gallery)?;
            for g in &request.get_ref().galleries {
                self.check_replica_read(&request, &g.gallery)?;
            }
            let deadline = deadline_of(&request);
            let mut req = request.into_inner();
            // The context is checked before anything is searched.
            let context = req
                .encounter
                .as_ref()
                .map(|c| encounter_rpc::check_context(c, "encounter"))
                .transpose()?;
            let request_id = match (&context, req.request_id.is_empty()) {
                (Some(_), true) => encounter_rpc::new_request_id(),
                _ => {
                    if !req.request_id.is_empty() {
                        encounter_rpc::check_request_id(&req.request_id, "request_id")?;
                    }
                    req.request_id.clone()
                }
            };
            // (gallery, threshold, one result per probe), in request order.
            let (answers, audited): (Vec<(String, Option<f32>, Vec<ProbeResult>)>, Audited) =
                if !req.galleries.is_empty() {
                    search_request::check_several(&req.gallery, req.k, req.threshold, &req.galleries)?;
                    call.gallery = gallery_names(&req.galleries);
                    tracing::debug!(caller = %call.caller, galleries = %call.gallery, probes = req.probes.len(), "identify");
                    let (answers, audited) = self
                        .identify_in_galleries(&req.galleries, &req.probes, "probes", deadline)
                        .await?;
                    let answers = answers
                        .into_iter()
                        .zip(&req.galleries)
                        .map(|((gallery, results), s)| (gallery, s.threshold, results))
                        .collect();
                    (answers, audited)
                } else {
                    tracing::debug!(caller = %call.caller, gallery = %req.gallery, probes = req.probes.len(), k = req.k, "identify");
                    let query = IdentifyQuery {
                        gallery: &req.gallery,
                        probes: &req.probes,
                        k: req.k,
                        threshold: req.threshold,
                        field: "probes",
                    };
                    let (results, audited) = self.identify_probes(query, deadline).await?;
                    (vec![(req.gallery.clone(), req.threshold, results)], audited)
                };
            let mut response = if req.galleries.is_empty() {
                proto::IdentifyResponse {
                    results: answers[0].2.iter().map(to_proto).collect(),
                    ..Default::default()
                }
            } else {
                proto::IdentifyResponse {
                    galleries: answers
                        .iter()
                        .map(|(gallery, _, results)| proto::GalleryResults {
                            gallery: gallery.clone(),
                            results: results.iter().map(to_proto).collect(),
                        })
                        .collect(),
                    ..Default::default()
                }
            };
            if let Some(context) = &context {
                let rows = answers
                    .iter()
                    .flat_map(|(gallery, threshold, results)| {
                        encounter_rpc::rows_of(context, &request_id, gallery, *threshold, results)
                    })
                    .collect();
                req.request_id.clear();
                self.record_encounters(&call, &request_id, &req, rows).await?;
                response.request_id = request_id;
            }
            Ok((response, audited))
        }
        .await;
        self.finish(call, r).await
    }

    type IdentifyStreamStream = ResponseStream;

    async fn identify_stream(
        &self,
        request: Request<Streaming<proto::IdentifyStreamRequest>>,
    ) -> Result<Response<Self::IdentifyStreamStream>, Status> {
        let mut opening = self.begin("IdentifyStream", &request, "");
        let authorized = self.authorize(&mut opening, &request, Role::Identify);
        if let Err(s) = authorized {
            return self.finish::<Self::IdentifyStreamStream>(opening, Err(s)).await;
        }
        let deadline = deadline_of(&request);
        let metadata = request.metadata().clone();
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                let (service, tx, metadata) = (service.clone(), tx.clone(), metadata.clone());
                let many = !msg.galleries.is_empty();
                let mut call = Call {
                    method: "IdentifyStream",
                    peer: opening.peer.clone(),
                    caller: opening.caller.clone(),
                    gallery: if many {
                        gallery_names(&msg.galleries)
                    } else {
                        msg.gallery.clone()
                    },
                    start: Instant::now(),
                    _permit: None,
                };
                tokio::spawn(async move {
                    let probe = std::slice::from_ref(&msg.probe);
                    let r = async {
                        service.admit(&mut call)?;
                        service.check_replica_read_of(&metadata, &msg.gallery)?;
                        for g in &msg.galleries {
                            service.check_replica_read_of(&metadata, &g.gallery)?;
                        }
                        let context = match &msg.encounter {
                            Some(c) => {
                                encounter_rpc::check_request_id(&msg.request_id, "request_id")?;
                                Some(encounter_rpc::check_context(c, "encounter")?)
                            }
                            None => None,
                        };
                        let (answers, audited, thresholds) = if many {
                            search_request::check_several(&msg.gallery, msg.k, msg.threshold, &msg.galleries)?;
                            let (answers, audited) = service
                                .identify_in_galleries(&msg.galleries, probe, "probe", deadline)
                                .await?;
                            (answers, audited, msg.galleries.iter().map(|g| g.threshold).collect())
                        } else {
                            let query = IdentifyQuery {
                                gallery: &msg.gallery,
                                probes: probe,
                                k: msg.k,
                                threshold: msg.threshold,
                                field: "probe",
                            };
                            let (results, audited) = service.identify_probes(query, deadline).await?;
                            (vec![(msg.gallery.clone(), results)], audited, vec![msg.threshold])
                        };
                        if let Some(context) = &context {
                            let rows = answers
                                .iter()
                                .zip(thresholds)
                                .flat_map(|((gallery, results), threshold)| {
                                    encounter_rpc::rows_of(context, &msg.request_id, gallery, threshold, results)
                                })
                                .collect();
                            let asked = proto::IdentifyStreamRequest {
                                request_id: String::new(),
                                ..msg.clone()
                            };
                            service.record_encounters(&call, &msg.request_id, &asked, rows).await?;
                        }
                        Ok((answers, audited))
                    }
                    .await;
                    let response = match service.finish(call, r).await {
                        Ok(answers) => {
                            let mut answers = answers.into_inner().into_iter();
                            let first = |(_, r): (String, Vec<ProbeResult>)| r.first().map(to_proto);
                            proto::IdentifyStreamResponse {
                                request_id: msg.request_id,
                                result: if many { None } else { answers.next().and_then(first) },
                                error_code: 0,
                                error_message: String::new(),
                                galleries: answers
                                    .map(|(gallery, r)| proto::GalleryResult {
                                        gallery,
                                        result: r.first().map(to_proto),
                                    })
                                    .collect(),
                                ..Default::default()
                            }
                        }
                        Err(s) => proto::IdentifyStreamResponse {
                            request_id: msg.request_id,
                            result: None,
                            error_code: s.code() as i32,
                            error_message: s.message().to_owned(),
                            ..Default::default()
                        },
                    };
                    let _ = tx.send(Ok(response)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(&self, request: Request<proto::VerifyRequest>) -> Result<Response<proto::VerifyResponse>, Status> {
        let mut call = self.begin("Verify", &request, &request.get_ref().gallery);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Identify)?;
            self.check_replica_read(&request, &request.get_ref().gallery)?;
            let req = request.into_inner();
            check_threshold(req.threshold)?;
            let canonical = subject_field(&req.subject)?;
            let entry = self.gallery(&req.gallery)?;
            let snapshot = entry.snapshot().map_err(status_of)?;
            let probe = decode_template(&req.probe, snapshot.dim(), "probe")?;
            let engine = self.engine.clone();
            let subject = canonical;
            let found = tokio::task::spawn_blocking(move || engine.verify(&snapshot, &probe, &subject))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let score = match found {
                Ok(s) => s,
                Err(Error::Corrupt(why)) => {
                    entry.mark_damaged(why);
                    return Err(status_of(entry.snapshot().err().expect("just marked damaged")));
                }
                Err(e) => return Err(status_of(e)),
            }
            .ok_or_else(|| {
                Status::not_found(format!(
                    "subject: {:?} is not enrolled in {:?}",
                    req.subject, req.gallery
                ))
            })?;
            Ok((
                proto::VerifyResponse {
                    score,
                    decided: req.threshold.is_some(),
                    matched: req.threshold.is_some_and(|t| score >= t),
                },
                Audited {
                    subjects: vec![(req.subject.clone(), Some(score))],
                    count: 1,
                    took_effect: false,
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn enroll(
        &self,
        request: Request<Streaming<proto::EnrollRequest>>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        // The gallery is named by the messages, not the call: the audit's final line
        // names every gallery the stream wrote to.
        let mut call = self.begin("Enroll", &request, "");
        let admitted = self
            .admit(&mut call)
            .and_then(|()| self.authorize(&mut call, &request, Role::Enroll).map(drop));
        if let Err(s) = admitted {
            return self.finish(call, Err(s)).await;
        }
        // To the end in a task of its own: a connection that drops mid-stream makes the
        // server drop this handler's future, and what the stream wrote must still be
        // audited (the `done` line with the subjects made durable).
        let service = self.clone();
        let stream = request.into_inner();
        tokio::spawn(async move {
            let (r, audited, galleries) = service.enroll_stream(&call, stream).await;
            call.gallery = galleries.join(",");
            service.finish_with(call, r, audited).await
        })
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("the Enroll task failed: {e}"))))
    }

    async fn delete_subject(
        &self,
        request: Request<proto::DeleteSubjectRequest>,
    ) -> Result<Response<proto::DeleteSubjectResponse>, Status> {
        let mut call = self.begin("DeleteSubject", &request, &request.get_ref().gallery);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Enroll)?;
            let mut req = request.into_inner();
            req.subject = subject_field(&req.subject)?;
            let entry = self.gallery(&req.gallery)?;
            // A cluster replica may be behind: the commit checks the subject once it has
            // caught up with the shard's log.
            let replicated = self.replication();
            if replicated.is_none() && !entry.snapshot().map_err(status_of)?.has_subject(&req.subject) {
                return Err(Status::not_found(format!(
                    "subject: {:?} is not enrolled in {:?}",
                    req.subject, req.gallery
                )));
            }
            self.intent(&call, &[req.subject.as_str()], 1).await?;
            let subject = req.subject.clone();
            if let Some(replication) = replicated {
                let write = Write::Delete { subject };
                replication.commit(&entry.name, vec![write]).await.map_err(status_of)?;
            } else {
                blocking(move || entry.write(|g| g.delete_subject(&subject))).await?;
            }
            Ok((
                proto::DeleteSubjectResponse {},
                Audited {
                    subjects: vec![(req.subject.clone(), None)],
                    count: 1,
                    took_effect: true,
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn create_gallery(
        &self,
        request: Request<proto::CreateGalleryRequest>,
    ) -> Result<Response<proto::GalleryInfo>, Status> {
        let mut call = self.begin("CreateGallery", &request, &request.get_ref().name);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            self.not_on_a_node()?;
            let req = request.into_inner();
            if req.shards > 1 || req.replicas > 1 {
                return Err(Status::invalid_argument(format!(
                    "shards/replicas: a single server holds one copy of a gallery ({} shards, {} replicas asked); create sharded galleries through `biogate router`",
                    req.shards, req.replicas
                )));
            }
            if !req.source.is_empty() {
                return self.derive_gallery(&call, req).await;
            }
            if !req.subjects.is_empty() {
                return Err(Status::invalid_argument(
                    "subjects: a subject list needs a source gallery to copy them from",
                ));
            }
            let dtype = Dtype::ALL.into_iter().find(|d| d.name() == req.dtype).ok_or_else(|| {
                Status::invalid_argument(format!("dtype: {:?} is not one of f32, f16, i8", req.dtype))
            })?;
            super::registry::check_gallery_name(&req.name).map_err(status_of)?;
            crate::template::check_dim(req.dim as usize).map_err(status_of)?;
            let expires_at = self.expiry_of(
                &req.expires_at,
                "expires_at",
                self.config.retention.gallery_retention_ms(&req.name),
            )?;
            let registry = self.registry.clone();
            let name = req.name.clone();
            let entry = self
                .admin_write(&call, move || {
                    let entry = registry.create(&name, req.dim as usize, dtype)?;
                    if expires_at.is_some() {
                        entry.write(|g| g.set_gallery_expiry(expires_at))?;
                    }
                    Ok(entry)
                })
                .await?;
            tracing::info!(caller = %call.caller, gallery = %req.name, dim = req.dim, %dtype, "created gallery");
            Ok((
                gallery_info(&entry.status(), self.engine.backend_name()),
                Audited {
                    took_effect: true,
                    ..Default::default()
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn drop_gallery(
        &self,
        request: Request<proto::DropGalleryRequest>,
    ) -> Result<Response<proto::DropGalleryResponse>, Status> {
        let mut call = self.begin("DropGallery", &request, &request.get_ref().name);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            self.not_on_a_node()?;
            let req = request.into_inner();
            self.gallery(&req.name)?;
            let registry = self.registry.clone();
            let name = req.name.clone();
            self.admin_write(&call, move || registry.drop_gallery(&name)).await?;
            tracing::info!(caller = %call.caller, gallery = %req.name, "dropped gallery");
            Ok((
                proto::DropGalleryResponse {},
                Audited {
                    took_effect: true,
                    ..Default::default()
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn list_galleries(
        &self,
        request: Request<proto::ListGalleriesRequest>,
    ) -> Result<Response<proto::ListGalleriesResponse>, Status> {
        let mut call = self.begin("ListGalleries", &request, "");
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Identify)?;
            let registry = self.registry.clone();
            let statuses = blocking(move || Ok(registry.all().iter().map(|e| e.status()).collect::<Vec<_>>())).await?;
            let galleries = statuses
                .iter()
                .map(|s| gallery_info(s, self.engine.backend_name()))
                .collect();
            Ok((proto::ListGalleriesResponse { galleries }, Audited::default()))
        }
        .await;
        self.finish(call, r).await
    }

    async fn get_gallery(
        &self,
        request: Request<proto::GetGalleryRequest>,
    ) -> Result<Response<proto::GalleryInfo>, Status> {
        let mut call = self.begin("GetGallery", &request, &request.get_ref().name);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Identify)?;
            self.check_replica_read(&request, &request.get_ref().name)?;
            let entry = self.gallery(&request.get_ref().name)?;
            let status = blocking(move || Ok(entry.status())).await?;
            if status.problem == Some(super::registry::Problem::Dropped) {
                return Err(Status::not_found(format!("gallery {:?}", status.name)));
            }
            Ok((gallery_info(&status, self.engine.backend_name()), Audited::default()))
        }
        .await;
        self.finish(call, r).await
    }

    async fn repair_gallery(
        &self,
        request: Request<proto::RepairGalleryRequest>,
    ) -> Result<Response<proto::RepairGalleryResponse>, Status> {
        let mut call = self.begin("RepairGallery", &request, &request.get_ref().name);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            let name = request.into_inner().name;
            let entry = self.gallery(&name)?;
            let registry = self.registry.clone();
            let report = self.admin_write(&call, move || registry.repair(&name)).await?;
            let status = blocking(move || Ok(entry.status())).await?;
            let subjects = report.subjects().iter().map(|s| ((*s).to_owned(), None)).collect();
            Ok((
                proto::RepairGalleryResponse {
                    clean: report.clean,
                    actions: report.actions.clone(),
                    kept_aside: report.kept_aside.clone(),
                    lost: report
                        .lost
                        .iter()
                        .map(|l| proto::Loss {
                            file: l.file.clone(),
                            subject: l.subject.clone().unwrap_or_default(),
                            subject_verified: l.subject_verified,
                            what: l.what.clone(),
                        })
                        .collect(),
                    report_file: report.report_file.clone().unwrap_or_default(),
                    gallery: Some(gallery_info(&status, self.engine.backend_name())),
                },
                Audited {
                    subjects,
                    count: report.lost.len(),
                    took_effect: true,
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn compact_gallery(
        &self,
        request: Request<proto::CompactGalleryRequest>,
    ) -> Result<Response<proto::CompactGalleryResponse>, Status> {
        let mut call = self.begin("CompactGallery", &request, &request.get_ref().name);
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            let name = request.into_inner().name;
            self.gallery(&name)?;
            let registry = self.registry.clone();
            let report = self.admin_write(&call, move || registry.compact(&name)).await?;
            Ok((
                proto::CompactGalleryResponse {
                    rows_kept: report.rows_kept,
                    rows_dropped: report.rows_dropped,
                    segments_before: report.segments_before as u32,
                    segments_after: report.segments_after as u32,
                },
                Audited {
                    count: report.rows_kept as usize,
                    took_effect: true,
                    ..Default::default()
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn encounter_history(
        &self,
        request: Request<proto::EncounterHistoryRequest>,
    ) -> Result<Response<proto::EncounterList>, Status> {
        let mut call = self.begin("EncounterHistory", &request, "");
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            let subject = subject_field(&request.into_inner().subject)?;
            let wanted = subject.clone();
            let rows = self.encounter_report(move |store| store.history(&wanted)).await?;
            Ok((
                proto::EncounterList {
                    encounters: rows.iter().map(encounter_rpc::encounter_to_proto).collect(),
                },
                Audited {
                    subjects: vec![(subject, None)],
                    count: rows.len(),
                    took_effect: false,
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn overstays(
        &self,
        request: Request<proto::OverstaysRequest>,
    ) -> Result<Response<proto::OverstayList>, Status> {
        let mut call = self.begin("Overstays", &request, "");
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            let req = request.into_inner();
            let max_stay = crate::time_text::parse_duration(&req.max_stay, "max_stay").map_err(status_of)?;
            let as_of = if req.as_of.is_empty() {
                crate::time_text::now_ms()
            } else {
                crate::time_text::parse_time(&req.as_of, "as_of").map_err(status_of)?
            };
            let rows = self
                .encounter_report(move |store| store.overstays(max_stay, as_of))
                .await?;
            Ok((
                proto::OverstayList {
                    overstays: rows.iter().map(encounter_rpc::overstay_to_proto).collect(),
                },
                Audited {
                    subjects: rows.iter().map(|o| (o.subject.clone(), None)).collect(),
                    count: rows.len(),
                    took_effect: false,
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }

    async fn encounter_stats(
        &self,
        request: Request<proto::EncounterStatsRequest>,
    ) -> Result<Response<proto::EncounterStatsList>, Status> {
        let mut call = self.begin("EncounterStats", &request, "");
        let r = async {
            self.admit(&mut call)?;
            self.authorize(&mut call, &request, Role::Admin)?;
            let by = StatsBy::parse(&request.into_inner().by, "by").map_err(status_of)?;
            let rows = self.encounter_report(move |store| store.stats(by)).await?;
            Ok((
                proto::EncounterStatsList {
                    rows: rows.iter().map(encounter_rpc::stats_to_proto).collect(),
                },
                Audited {
                    count: rows.len(),
                    ..Default::default()
                },
            ))
        }
        .await;
        self.finish(call, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::batcher::BatchConfig;

    async fn service(dir: &std::path::Path) -> Arc<Service> {
        let config = Arc::new(Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        });
        let registry = Arc::new(Registry::open(dir, crate::storage::Storage::default()).unwrap());
        let g = registry.create("g", 4, Dtype::F32).unwrap();
        g.write(|w| {
            w.enroll(&[Enrollment {
                subject: "a".into(),
                templates: vec![1.0, 0.0, 0.0, 0.0],
            }])
        })
        .unwrap();
        let metrics = Metrics::new();
        let engine = Engine::cpu();
        let batch = BatchConfig {
            max_batch: 64,
            max_wait: Duration::ZERO,
            queue_capacity: 16,
        };
        Arc::new(Service {
            registry,
            batcher: Batcher::start(engine.clone(), batch, metrics.clone()),
            engine,
            audit: AuditLog::open(dir, &config.audit, crate::storage::Storage::default()).unwrap(),
            encounters: EncounterLog::open(dir).unwrap(),
            metrics,
            auth: Arc::new(Auth::new(&[])),
            in_flight: Arc::new(Semaphore::new(config.max_requests_in_flight)),
            config,
            replication: std::sync::OnceLock::new(),
        })
    }

    fn identify_request(timeout: &str) -> Request<proto::IdentifyRequest> {
        let probe = pack_f32(&[1.0, 0.0, 0.0, 0.0]);
        let mut r = Request::new(proto::IdentifyRequest {
            gallery: "g".into(),
            probes: vec![probe],
            k: 1,
            threshold: None,
            ..Default::default()
        });
        r.metadata_mut().insert("grpc-timeout", timeout.parse().unwrap());
        r
    }

    fn pack_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[tokio::test]
    async fn a_deadline_that_passes_before_the_search_is_deadline_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path()).await;
        let e = s.identify(identify_request("1n")).await.unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        let ok = s.identify(identify_request("10S")).await.unwrap().into_inner();
        assert_eq!(ok.results[0].candidates[0].subject, "a");
        // Expired work is audited as such, not as served.
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let outcomes: Vec<String> = audit
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["outcome"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(outcomes, ["DEADLINE_EXCEEDED", "ok"], "{audit}");
    }

    #[test]
    fn grpc_timeouts_parse() {
        let r = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("grpc-timeout", v.parse().unwrap());
            deadline_of(&r).map(|d| d.saturating_duration_since(Instant::now()))
        };
        assert!(r("5S").unwrap() > Duration::from_millis(4900));
        assert!(r("100m").unwrap() <= Duration::from_millis(100));
        assert!(r("2H").unwrap() > Duration::from_secs(7000));
        assert_eq!(r("5x"), None);
        assert_eq!(r("S"), None);
    }
}

#[cfg(test)]
mod path_tests {
    #[test]
    fn remote_messages_keep_file_names_but_not_directories() {
        let m = super::without_directories(
            "opening /srv/biogate/galleries/g/seg-000003.bgs: No such file (see \"/var/lib/x/MANIFEST\"), 3/4 done",
        );
        assert_eq!(m, "opening seg-000003.bgs: No such file (see \"MANIFEST\"), 3/4 done");
    }
}
