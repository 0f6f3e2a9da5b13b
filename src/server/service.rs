//! The gRPC service: validates each request (naming the bad field), checks the caller's
//! role, hands searches to the batcher and writes to the gallery, records the audit
//! line, counts metrics, and maps errors to the right status codes.

use super::audit::{AuditEntry, AuditLog};
use super::auth::{Auth, Caller};
use super::batcher::{Batcher, Job, JobError};
use super::config::{Config, Role};
use super::metrics::Metrics;
use super::proto;
use super::proto::biogate_server::Biogate;
use super::registry::{GalleryEntry, Registry};
use crate::engine::{Engine, ProbeResult};
use crate::error::Error;
use crate::gallery::Enrollment;
use crate::template::{Dtype, check_subject_id, normalize_into};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// Everything a request handler needs.
pub struct Service {
    pub registry: Arc<Registry>,
    pub batcher: Batcher,
    pub engine: Engine,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
}

/// Map a library error to a gRPC status.
pub fn status_of(e: Error) -> Status {
    match e {
        Error::InvalidInput(m) => Status::invalid_argument(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::Locked(m) => Status::failed_precondition(format!("gallery {m} is locked by another process")),
        Error::Corrupt(m) => Status::data_loss(m),
        Error::Io { .. } => Status::internal(e.to_string()),
        Error::Gpu(m) => Status::internal(format!("GPU: {m}")),
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

/// What one identify asks, borrowed from either request type.
struct IdentifyQuery<'a> {
    gallery: &'a str,
    probes: &'a [Vec<u8>],
    k: u32,
    threshold: Option<f32>,
    /// The request field holding the probes, for error messages.
    field: &'a str,
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

type ResponseStream = Pin<Box<dyn Stream<Item = Result<proto::IdentifyStreamResponse, Status>> + Send>>;

impl Service {
    fn gallery(&self, name: &str) -> Result<Arc<GalleryEntry>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("gallery: empty gallery name"));
        }
        self.registry.get(name).map_err(status_of)
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

    async fn audit(&self, entry: AuditEntry<'_>) -> Result<(), Status> {
        self.audit
            .record(&entry)
            .await
            .map_err(|e| Status::internal(format!("audit log: {e}")))
    }

    /// Validate, queue and await one identify job (shared by Identify and IdentifyStream).
    async fn identify_probes(
        &self,
        caller: &Caller,
        query: IdentifyQuery<'_>,
        deadline: Option<Instant>,
    ) -> Result<Vec<ProbeResult>, Status> {
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
        let dim = entry.snapshot().dim();
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
            probes: values,
            k,
            threshold,
            deadline,
            reply,
        };
        if self.batcher.submit(job).is_err() {
            return Err(Status::resource_exhausted("the search queue is full; retry later"));
        }
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
            Ok(Err(JobError::Engine(m))) => return Err(Status::internal(m)),
            Err(_) => return Err(Status::unavailable("the engine stopped")),
        };
        let subjects = results
            .iter()
            .flat_map(|r| r.candidates.iter().map(|c| (c.subject.as_str(), Some(c.score))))
            .collect();
        self.audit(AuditEntry {
            caller: &caller.name,
            gallery,
            operation: "identify",
            outcome: "ok",
            subjects,
            count: probes.len(),
        })
        .await?;
        Ok(results)
    }

    /// Enroll a client stream in groups: every message that has already arrived (up to
    /// `ENROLL_GROUP`) is validated and made durable with one log fsync and one audit
    /// line. If a message is bad, the messages before it are still enrolled and the
    /// error says how many were.
    async fn enroll_stream(
        &self,
        caller: &Caller,
        mut stream: Streaming<proto::EnrollRequest>,
    ) -> Result<proto::EnrollResponse, Status> {
        const ENROLL_GROUP: usize = 256;
        let mut done = proto::EnrollResponse::default();
        let mut index = 0usize;
        let mut ended = false;
        while !ended {
            // Wait for one message, then take whatever else is already here.
            let Some(first) = stream.message().await? else { break };
            let mut group = vec![first];
            while group.len() < ENROLL_GROUP {
                match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(Ok(Some(m))) => group.push(m),
                    Ok(Ok(None)) => {
                        ended = true;
                        break;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break, // nothing more has arrived yet
                }
            }
            // Validate in order; a bad message cuts the group there.
            let mut valid: Vec<(Arc<GalleryEntry>, proto::EnrollRequest, Enrollment)> = Vec::new();
            let mut failure = None;
            for msg in group {
                match self.check_enrollment(&msg) {
                    Ok((entry, enrollment)) => valid.push((entry, msg, enrollment)),
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
                let end = at + valid[at..].iter().take_while(|v| Arc::ptr_eq(&v.0, &gallery)).count();
                let batch: Vec<Enrollment> = valid[at..end].iter().map(|v| v.2.clone()).collect();
                let templates: usize = valid[at..end].iter().map(|v| v.1.templates.len()).sum();
                let writer = gallery.clone();
                let seal_at = self.config.seal_log_rows;
                blocking(move || {
                    writer.write(|g| {
                        let n = g.enroll(&batch)?;
                        if g.log_rows() >= seal_at {
                            // The enrollment is durable either way: a failed seal is
                            // logged and retried on the next enroll, not reported.
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
                .await?;
                done.subjects += (end - at) as u64;
                done.templates += templates as u64;
                self.audit(AuditEntry {
                    caller: &caller.name,
                    gallery: &gallery.name,
                    operation: "enroll",
                    outcome: "ok",
                    subjects: valid[at..end].iter().map(|v| (v.1.subject.as_str(), None)).collect(),
                    count: templates,
                })
                .await?;
                at = end;
            }
            index += valid.len();
            if let Some((i, s)) = failure {
                return Err(Status::new(
                    s.code(),
                    format!(
                        "message {i}: {}; {} subjects ({} templates) from earlier messages are enrolled",
                        s.message(),
                        done.subjects,
                        done.templates
                    ),
                ));
            }
        }
        Ok(done)
    }

    fn check_enrollment(&self, msg: &proto::EnrollRequest) -> Result<(Arc<GalleryEntry>, Enrollment), Status> {
        let entry = self.gallery(&msg.gallery)?;
        check_subject_id(&msg.subject).map_err(|e| Status::invalid_argument(format!("subject: {e}")))?;
        if msg.templates.is_empty() {
            return Err(Status::invalid_argument("templates: no templates given"));
        }
        let dim = entry.snapshot().dim();
        let mut templates = Vec::with_capacity(msg.templates.len() * dim);
        for (i, t) in msg.templates.iter().enumerate() {
            templates.extend(decode_template(t, dim, &format!("templates[{i}]"))?);
        }
        Ok((
            entry,
            Enrollment {
                subject: msg.subject.clone(),
                templates,
            },
        ))
    }

    fn info(entry: &GalleryEntry, backend: &str) -> Result<proto::GalleryInfo, Status> {
        let i = entry.info().map_err(status_of)?;
        Ok(proto::GalleryInfo {
            name: entry.name.clone(),
            dim: i.dim as u32,
            dtype: i.dtype.name().into(),
            rows: i.rows,
            subjects: i.subjects,
            backend: backend.into(),
            bytes: i.bytes_on_disk,
        })
    }

    fn finish<T>(&self, method: &str, start: Instant, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        self.metrics.observe(method, code, start.elapsed().as_secs_f64());
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl Biogate for Arc<Service> {
    async fn identify(
        &self,
        request: Request<proto::IdentifyRequest>,
    ) -> Result<Response<proto::IdentifyResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Identify)?;
            let deadline = deadline_of(&request);
            let req = request.into_inner();
            tracing::debug!(caller = %caller.name, gallery = %req.gallery, probes = req.probes.len(), k = req.k, "identify");
            let results = self
                .identify_probes(
                    &caller,
                    IdentifyQuery { gallery: &req.gallery, probes: &req.probes, k: req.k, threshold: req.threshold, field: "probes" },
                    deadline,
                )
                .await?;
            Ok(proto::IdentifyResponse {
                results: results.iter().map(to_proto).collect(),
            })
        }
        .await;
        self.finish("Identify", start, r)
    }

    type IdentifyStreamStream = ResponseStream;

    async fn identify_stream(
        &self,
        request: Request<Streaming<proto::IdentifyStreamRequest>>,
    ) -> Result<Response<Self::IdentifyStreamStream>, Status> {
        let caller = self.auth.check(&request, Role::Identify)?;
        let deadline = deadline_of(&request);
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
                let (service, tx, caller) = (service.clone(), tx.clone(), caller.clone());
                tokio::spawn(async move {
                    let start = Instant::now();
                    let r = service
                        .identify_probes(
                            &caller,
                            IdentifyQuery {
                                gallery: &msg.gallery,
                                probes: std::slice::from_ref(&msg.probe),
                                k: msg.k,
                                threshold: msg.threshold,
                                field: "probe",
                            },
                            deadline,
                        )
                        .await;
                    let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
                    service
                        .metrics
                        .observe("IdentifyStream", code, start.elapsed().as_secs_f64());
                    let response = match r {
                        Ok(results) => proto::IdentifyStreamResponse {
                            request_id: msg.request_id,
                            result: results.first().map(to_proto),
                            error_code: 0,
                            error_message: String::new(),
                        },
                        Err(s) => proto::IdentifyStreamResponse {
                            request_id: msg.request_id,
                            result: None,
                            error_code: s.code() as i32,
                            error_message: s.message().to_owned(),
                        },
                    };
                    let _ = tx.send(Ok(response)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(&self, request: Request<proto::VerifyRequest>) -> Result<Response<proto::VerifyResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Identify)?;
            let req = request.into_inner();
            check_threshold(req.threshold)?;
            check_subject_id(&req.subject).map_err(|e| Status::invalid_argument(format!("subject: {e}")))?;
            let entry = self.gallery(&req.gallery)?;
            let snapshot = entry.snapshot();
            let probe = decode_template(&req.probe, snapshot.dim(), "probe")?;
            let engine = self.engine.clone();
            let subject = req.subject.clone();
            let score = blocking(move || engine.verify(&snapshot, &probe, &subject))
                .await?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "subject: {:?} is not enrolled in {:?}",
                        req.subject, req.gallery
                    ))
                })?;
            self.audit(AuditEntry {
                caller: &caller.name,
                gallery: &req.gallery,
                operation: "verify",
                outcome: "ok",
                subjects: vec![(req.subject.as_str(), Some(score))],
                count: 1,
            })
            .await?;
            Ok(proto::VerifyResponse {
                score,
                decided: req.threshold.is_some(),
                matched: req.threshold.is_some_and(|t| score >= t),
            })
        }
        .await;
        self.finish("Verify", start, r)
    }

    async fn enroll(
        &self,
        request: Request<Streaming<proto::EnrollRequest>>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Enroll)?;
            self.enroll_stream(&caller, request.into_inner()).await
        }
        .await;
        self.finish("Enroll", start, r)
    }

    async fn delete_subject(
        &self,
        request: Request<proto::DeleteSubjectRequest>,
    ) -> Result<Response<proto::DeleteSubjectResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Enroll)?;
            let req = request.into_inner();
            check_subject_id(&req.subject).map_err(|e| Status::invalid_argument(format!("subject: {e}")))?;
            let entry = self.gallery(&req.gallery)?;
            let subject = req.subject.clone();
            blocking(move || entry.write(|g| g.delete_subject(&subject))).await?;
            self.audit(AuditEntry {
                caller: &caller.name,
                gallery: &req.gallery,
                operation: "delete_subject",
                outcome: "ok",
                subjects: vec![(req.subject.as_str(), None)],
                count: 1,
            })
            .await?;
            Ok(proto::DeleteSubjectResponse {})
        }
        .await;
        self.finish("DeleteSubject", start, r)
    }

    async fn create_gallery(
        &self,
        request: Request<proto::CreateGalleryRequest>,
    ) -> Result<Response<proto::GalleryInfo>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Admin)?;
            let req = request.into_inner();
            let dtype = Dtype::ALL.into_iter().find(|d| d.name() == req.dtype).ok_or_else(|| {
                Status::invalid_argument(format!("dtype: {:?} is not one of f32, f16, i8", req.dtype))
            })?;
            let registry = self.registry.clone();
            let name = req.name.clone();
            let entry = blocking(move || registry.create(&name, req.dim as usize, dtype)).await?;
            self.audit(AuditEntry {
                caller: &caller.name,
                gallery: &req.name,
                operation: "create_gallery",
                outcome: "ok",
                subjects: vec![],
                count: 0,
            })
            .await?;
            tracing::info!(caller = %caller.name, gallery = %req.name, dim = req.dim, %dtype, "created gallery");
            Service::info(&entry, self.engine.backend_name())
        }
        .await;
        self.finish("CreateGallery", start, r)
    }

    async fn drop_gallery(
        &self,
        request: Request<proto::DropGalleryRequest>,
    ) -> Result<Response<proto::DropGalleryResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let caller = self.auth.check(&request, Role::Admin)?;
            let req = request.into_inner();
            let registry = self.registry.clone();
            let name = req.name.clone();
            blocking(move || registry.drop_gallery(&name)).await?;
            self.audit(AuditEntry {
                caller: &caller.name,
                gallery: &req.name,
                operation: "drop_gallery",
                outcome: "ok",
                subjects: vec![],
                count: 0,
            })
            .await?;
            tracing::info!(caller = %caller.name, gallery = %req.name, "dropped gallery");
            Ok(proto::DropGalleryResponse {})
        }
        .await;
        self.finish("DropGallery", start, r)
    }

    async fn list_galleries(
        &self,
        request: Request<proto::ListGalleriesRequest>,
    ) -> Result<Response<proto::ListGalleriesResponse>, Status> {
        let start = Instant::now();
        let r = async {
            self.auth.check(&request, Role::Identify)?;
            let galleries = self
                .registry
                .all()
                .iter()
                .map(|e| Service::info(e, self.engine.backend_name()))
                .collect::<Result<_, _>>()?;
            Ok(proto::ListGalleriesResponse { galleries })
        }
        .await;
        self.finish("ListGalleries", start, r)
    }

    async fn get_gallery(
        &self,
        request: Request<proto::GetGalleryRequest>,
    ) -> Result<Response<proto::GalleryInfo>, Status> {
        let start = Instant::now();
        let r = async {
            self.auth.check(&request, Role::Identify)?;
            let entry = self.gallery(&request.get_ref().name)?;
            Service::info(&entry, self.engine.backend_name())
        }
        .await;
        self.finish("GetGallery", start, r)
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
        let registry = Arc::new(Registry::open(dir).unwrap());
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
            audit: AuditLog::open(&dir.join("audit.log")).unwrap(),
            metrics,
            auth: Arc::new(Auth::new(&[])),
            config,
        })
    }

    fn identify_request(timeout: &str) -> Request<proto::IdentifyRequest> {
        let probe = pack_f32(&[1.0, 0.0, 0.0, 0.0]);
        let mut r = Request::new(proto::IdentifyRequest {
            gallery: "g".into(),
            probes: vec![probe],
            k: 1,
            threshold: None,
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
        // Expired work is not audited as served.
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert_eq!(audit.lines().count(), 1, "{audit}");
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
