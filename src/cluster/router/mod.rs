//! `biogate router`: the cluster's front door. Stateless: it follows the cluster's keys
//! in etcd ([`View`]) and serves the same `biogate.v1` API as a single server.
//!
//! - Identify / IdentifyStream: every shard of each gallery searched on one serving
//!   replica (another one if that fails), the per-shard top-k lists merged into the
//!   exact top-k (score, then subject id). A shard that no replica can answer fails the
//!   search with UNAVAILABLE naming it, unless the request allows a partial answer.
//! - Enroll: every message checked first (bad input changes nothing), then each
//!   shard's subjects sent to one of its replicas, which commits them to the shard's log.
//! - DeleteSubject, Verify: the subject's shard. CreateGallery, DropGallery: etcd
//!   transactions (and the gallery's objects deleted). GetGallery, ListGalleries: the
//!   catalogue with each shard's replica health.

mod audit;
mod replicas;

use super::etcd::{self, Etcd};
use super::keys::{self, ClusterState, GalleryMeta};
use super::objects::Objects;
use super::view::View;
use crate::error::{Error, IoContext, Result};
use crate::server::auth::Auth;
use crate::server::config::{Config, Role};
use crate::server::connections;
use crate::server::metrics::Metrics;
use crate::server::proto::biogate_client::BiogateClient;
use crate::server::proto::biogate_server::{Biogate, BiogateServer};
use crate::server::proto::{self};
use crate::server::service::{decode_template, status_of, subject_field};
use crate::template::{Dtype, check_dim};
use audit::Audited;
use replicas::never_reached;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

/// Largest message the router passes on (as the server's default).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How long CreateGallery waits for every shard to have a serving replica.
const CREATE_WAIT: Duration = Duration::from_secs(15);

/// The router's state: the cluster view and a channel per node.
pub struct Router {
    /// Every call, refused or not (audit.rs).
    audit: crate::server::audit::AuditLog,
    /// Who may do what (the `[[tokens]]` of `--config`; none: everyone, everything).
    /// The caller's token also travels on to the nodes, which check it again.
    auth: Auth,
    etcd: Arc<Etcd>,
    view: Arc<View>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Nodes that failed to answer lately, or were slow (until when): tried last.
    suspects: Mutex<HashMap<String, Instant>>,
    /// How long the last successful reads of each replica name (`{g}.s{s}`) took (the
    /// newest last), for its hedging delay: a large gallery's reads are not hedged by a
    /// small one's.
    latencies: Mutex<HashMap<String, std::collections::VecDeque<Duration>>>,
}

/// A running router.
pub struct RouterHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RouterHandle {
    /// Stop accepting, finish what is in flight.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task
            .await
            .map_err(|e| Error::Internal(format!("router task: {e}")))?
    }
}

/// Start a router on `listen`, following the cluster in the etcd at `urls`. From
/// `config` it takes the `[[tokens]]` (none: authentication is off, as on a server),
/// the connection and message-size limits, and `data_dir` and `[audit]` for its audit
/// log.
pub async fn start(urls: &[String], listen: SocketAddr, config: &Config) -> Result<RouterHandle> {
    let auth = Auth::new(&config.tokens);
    std::fs::create_dir_all(&config.data_dir).ctx(|| format!("creating {}", config.data_dir.display()))?;
    let audit = crate::server::audit::AuditLog::open(&config.data_dir, &config.audit, Default::default())?;
    if !auth.enabled() && !listen.ip().is_loopback() {
        tracing::warn!(%listen, "no tokens configured: authentication is off (every caller has every role)");
    }
    let etcd = Arc::new(Etcd::connect(urls)?);
    let view = View::start(etcd.clone(), Duration::from_secs(5)).await;
    if !view.connected() {
        tracing::warn!(etcd = %urls.join(","), "etcd did not answer yet; the router serves once it does");
    }
    let router = Arc::new(Router {
        audit,
        auth,
        etcd,
        view,
        channels: Mutex::new(HashMap::new()),
        suspects: Mutex::new(HashMap::new()),
        latencies: Mutex::new(HashMap::new()),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .ctx(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr().ctx(|| "reading the bound address".into())?;
    let (stop, stopped) = oneshot::channel::<()>();
    // The nodes' own limit: the router refuses what a node would.
    let service = BiogateServer::new(router)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // grpc.health.v1 (for load balancers) and reflection (for grpcurl), as on a server.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BiogateServer<Arc<Router>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    // The server's accept loop: connections bounded, silent ones closed, Nagle off.
    connections::raise_fd_limit(config.max_connections);
    let accepted = connections::Connections::new(config.connection_limits(), Metrics::new());
    let task = tokio::spawn(async move {
        Server::builder()
            .layer(accepted.layer())
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(accepted.incoming(listener), async {
                let _ = stopped.await;
                health.set_not_serving::<BiogateServer<Arc<Router>>>().await;
            })
            .await
            .map_err(|e| Error::Internal(format!("router: {e}")))
    });
    tracing::info!(%addr, "router serving");
    Ok(RouterHandle {
        addr,
        stop: Some(stop),
        task,
    })
}

/// What a shard search returned: its answer, or why no replica gave one.
type ShardAnswer = std::result::Result<proto::IdentifyResponse, Status>;

/// Whether trying another replica may help.
fn worth_another_replica(s: &Status) -> bool {
    !matches!(
        s.code(),
        Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied | Code::OutOfRange
    )
}

/// Put the gallery's name back where a node named its replica (`g.s3` -> `g`).
fn as_gallery(s: Status, local: &str, g: &str) -> Status {
    Status::new(s.code(), s.message().replace(local, g))
}

fn merge_probe(parts: Vec<proto::ProbeResult>, k: usize, threshold: Option<f32>) -> proto::ProbeResult {
    let mut candidates: Vec<proto::Candidate> = parts.into_iter().flat_map(|p| p.candidates).collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.subject.cmp(&b.subject)));
    candidates.truncate(k);
    proto::ProbeResult {
        decided: threshold.is_some(),
        matched: threshold.is_some() && !candidates.is_empty(),
        candidates,
    }
}

/// One gallery of a search: its name, k and threshold.
struct Search {
    gallery: String,
    k: u32,
    threshold: Option<f32>,
}

impl Router {
    fn state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        self.view.read(f)
    }

    /// The gallery's meta from etcd itself when this router's view lacks it: a router
    /// whose view lags (just started, its watch re-reading) must not answer NOT_FOUND for
    /// a gallery that exists (a client would drop nothing, or make it again).
    async fn meta_confirmed(&self, g: &str) -> std::result::Result<GalleryMeta, Status> {
        match self.meta(g) {
            Ok(m) => Ok(m),
            Err(not_found) => match self.etcd.get(&keys::gallery_key(g)).await.map_err(status_of)? {
                Some(kv) => keys::decode::<GalleryMeta>(&keys::gallery_key(g), &kv.value).map_err(status_of),
                None => Err(not_found),
            },
        }
    }

    fn meta(&self, g: &str) -> std::result::Result<GalleryMeta, Status> {
        self.state(|st| st.galleries.get(g).cloned())
            .ok_or_else(|| Status::not_found(format!("gallery: {g:?} does not exist")))
    }

    /// The gallery, and the shard that holds (or would hold) `subject` (placed by its
    /// canonical form, which the node stores).
    fn subject_shard(&self, g: &str, subject: &str) -> std::result::Result<(GalleryMeta, u32), Status> {
        let meta = self.meta(g)?;
        let subject = subject_field(subject)?;
        let s = meta.shard_of(&subject);
        Ok((meta, s))
    }

    fn channel(&self, address: &str) -> std::result::Result<Channel, Status> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(format!("node address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(address.to_owned(), c.clone());
        Ok(c)
    }

    fn client(&self, address: &str) -> std::result::Result<BiogateClient<Channel>, Status> {
        Ok(BiogateClient::new(self.channel(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Search `probes` in every shard of each gallery and merge: one list of results per
    /// gallery, and the shards that could not be searched (only when `allow_partial`).
    async fn search(
        &self,
        searches: &[Search],
        probes: &[Vec<u8>],
        authorization: Authorization,
        allow_partial: bool,
    ) -> std::result::Result<(Vec<Vec<proto::ProbeResult>>, Vec<String>), Status> {
        let named: Vec<&str> = searches.iter().map(|s| s.gallery.as_str()).collect();
        self.current_view(&named).await?;
        let mut metas: Vec<GalleryMeta> = Vec::with_capacity(searches.len());
        for search in searches {
            let meta = self.meta(&search.gallery)?;
            // Each probe checked once per dimension (the nodes check it again).
            if !metas.iter().any(|m| m.dim == meta.dim) {
                for (i, p) in probes.iter().enumerate() {
                    decode_template(p, meta.dim, &format!("probes[{i}]"))?;
                }
            }
            metas.push(meta);
        }
        let mut calls = Vec::new();
        for (search, meta) in searches.iter().zip(&metas) {
            for s in 0..meta.shards {
                let request = proto::IdentifyRequest {
                    gallery: String::new(),
                    probes: probes.to_vec(),
                    k: search.k,
                    threshold: search.threshold,
                    ..Default::default()
                };
                let auth = authorization.clone();
                let g = search.gallery.clone();
                let created_ms = meta.created_ms;
                calls.push(async move {
                    self.on_replica(&g, created_ms, s, |mut client, read| {
                        let message = proto::IdentifyRequest {
                            gallery: read.local.clone(),
                            ..request.clone()
                        };
                        let r = read.request(message, &auth);
                        async move { client.identify(r).await.map(Response::into_inner) }
                    })
                    .await
                });
            }
        }
        let answers: Vec<ShardAnswer> = futures_util::future::join_all(calls).await;
        let mut answers = answers.into_iter();
        let mut out = Vec::with_capacity(searches.len());
        let mut missing = Vec::new();
        for (search, meta) in searches.iter().zip(&metas) {
            let mut per_probe: Vec<Vec<proto::ProbeResult>> = vec![Vec::new(); probes.len()];
            for s in 0..meta.shards {
                match answers.next().expect("one answer per shard") {
                    Ok(r) => {
                        for (slot, result) in per_probe.iter_mut().zip(r.results) {
                            slot.push(result);
                        }
                    }
                    Err(e) if allow_partial && e.code() == Code::Unavailable => {
                        missing.push(format!("{}/{s}", search.gallery));
                    }
                    Err(e) => return Err(e),
                }
            }
            out.push(
                per_probe
                    .into_iter()
                    .map(|parts| merge_probe(parts, search.k as usize, search.threshold))
                    .collect(),
            );
        }
        Ok((out, missing))
    }

    /// The searches a request names: one gallery, or several.
    fn searches_of(
        gallery: &str,
        k: u32,
        threshold: Option<f32>,
        galleries: &[proto::GallerySearch],
    ) -> std::result::Result<Vec<Search>, Status> {
        if galleries.is_empty() {
            if gallery.is_empty() {
                return Err(Status::invalid_argument("gallery: no gallery named"));
            }
            return Ok(vec![Search {
                gallery: gallery.to_owned(),
                k,
                threshold,
            }]);
        }
        crate::server::search_request::check_several(gallery, k, threshold, galleries)?;
        Ok(galleries
            .iter()
            .map(|g| Search {
                gallery: g.gallery.clone(),
                k: g.k,
                threshold: g.threshold,
            })
            .collect())
    }

    /// A gallery's info: the catalogue, the counts of one serving replica per shard,
    /// and every shard's health.
    async fn info(&self, g: &str, auth: &Authorization) -> std::result::Result<proto::GalleryInfo, Status> {
        self.current_view(&[g]).await?;
        let meta = self.meta_confirmed(g).await?;
        let mut info = proto::GalleryInfo {
            name: g.to_owned(),
            dim: meta.dim as u32,
            dtype: meta.dtype.name().to_owned(),
            shards: meta.shards,
            replicas: meta.replicas,
            state: "SERVING".into(),
            ..Default::default()
        };
        let mut unserved = Vec::new();
        for s in 0..meta.shards {
            let health = self.state(|st| shard_health(st, g, s));
            match self
                .on_replica(g, meta.created_ms, s, |mut client, read| {
                    let r = read.request(
                        proto::GetGalleryRequest {
                            name: read.local.clone(),
                        },
                        auth,
                    );
                    async move { client.get_gallery(r).await.map(Response::into_inner) }
                })
                .await
            {
                Ok(part) => {
                    info.rows += part.rows;
                    info.subjects += part.subjects;
                    info.bytes += part.bytes;
                    if info.backend.is_empty() {
                        info.backend = part.backend;
                    }
                }
                Err(e) => unserved.push(format!("shard {s}: {}", e.message())),
            }
            info.shard_health.push(health);
        }
        if !unserved.is_empty() {
            info.state = "NOT_SERVING".into();
            info.reason = unserved.join("; ");
        }
        Ok(info)
    }
}

/// A shard's health as the router sees it.
fn shard_health(st: &ClusterState, g: &str, s: u32) -> proto::ShardHealth {
    let key = (g.to_owned(), s);
    let serving: Vec<String> = st.serving(g, s).into_iter().map(|(n, _)| n).collect();
    let replicas = st.shard_map(g, s).map(|m| m.replicas.clone()).unwrap_or_default();
    proto::ShardHealth {
        shard: s,
        committed: st.committed.get(&key).copied().unwrap_or(0),
        visible: st.visible.get(&key).map_or(0, |v| v.0),
        replicas: replicas
            .iter()
            .map(|n| proto::ReplicaHealth {
                node: n.clone(),
                address: st.nodes.get(n).map(|i| i.address.clone()).unwrap_or_default(),
                live: st.nodes.contains_key(n),
                applied: st.applied.get(&key).and_then(|a| a.get(n)).copied().unwrap_or(0),
                serving: serving.contains(n),
            })
            .collect(),
    }
}

/// The caller's `authorization` header, passed on to the nodes.
type Authorization = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;

impl Router {
    /// Check that the caller may act in `role`; its header, to pass on to the nodes.
    fn authorize<T>(&self, r: &Request<T>, role: Role, method: &str) -> std::result::Result<Authorization, Status> {
        let caller = self.auth.check(r, role)?;
        tracing::debug!(caller = %caller.name, method, "routing");
        Ok(r.metadata().get("authorization").cloned())
    }
}

fn with_authorization<T>(message: T, auth: &Authorization) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a.clone());
    }
    r
}

fn no_encounters(e: &Option<proto::EncounterContext>) -> std::result::Result<(), Status> {
    if e.is_some() {
        return Err(Status::invalid_argument(
            "encounter: the router does not record encounters yet; send encounter searches to a single server",
        ));
    }
    Ok(())
}

type IdentifyStreamOut = Pin<Box<dyn Stream<Item = std::result::Result<proto::IdentifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Biogate for Arc<Router> {
    async fn identify(
        &self,
        request: Request<proto::IdentifyRequest>,
    ) -> std::result::Result<Response<proto::IdentifyResponse>, Status> {
        let req = request.get_ref();
        let call = self.begin(&request, "Identify", &audit::searched(&req.gallery, &req.galleries));
        let probes = req.probes.len();
        let r = self.routed_identify(request).await.map(|response| {
            let results = response
                .results
                .iter()
                .chain(response.galleries.iter().flat_map(|g| &g.results));
            let audited = Audited::of_results(results, probes);
            (response, audited)
        });
        self.finish(call, r).await
    }

    type IdentifyStreamStream = IdentifyStreamOut;

    async fn identify_stream(
        &self,
        request: Request<Streaming<proto::IdentifyStreamRequest>>,
    ) -> std::result::Result<Response<Self::IdentifyStreamStream>, Status> {
        let call = self.begin(&request, "IdentifyStream", "");
        match self.authorize(&request, Role::Identify, "IdentifyStream") {
            Ok(auth) => Ok(self.routed_identify_stream(request, auth, call)),
            Err(e) => self.finish(call, Err(e)).await,
        }
    }

    async fn verify(
        &self,
        request: Request<proto::VerifyRequest>,
    ) -> std::result::Result<Response<proto::VerifyResponse>, Status> {
        let call = self.begin(&request, "Verify", &request.get_ref().gallery);
        let subject = request.get_ref().subject.clone();
        let r = self.routed_verify(request).await.map(|v| {
            let audited = Audited {
                subjects: vec![(subject, Some(v.score))],
                count: 1,
                took_effect: false,
            };
            (v, audited)
        });
        self.finish(call, r).await
    }

    async fn enroll(
        &self,
        request: Request<Streaming<proto::EnrollRequest>>,
    ) -> std::result::Result<Response<proto::EnrollResponse>, Status> {
        // The gallery is named by the messages, not the call: the line names every
        // gallery the stream named (as a server's does).
        let mut call = self.begin(&request, "Enroll", "");
        let (mut subjects, mut galleries) = (Vec::new(), Vec::new());
        let r = self.routed_enroll(request, &mut subjects, &mut galleries).await;
        call.gallery = galleries.join(",");
        let audited = Audited {
            count: subjects.len(),
            subjects: subjects.into_iter().map(|s| (s, None)).collect(),
            took_effect: r.is_ok(),
        };
        self.finish_with(call, r, audited).await
    }

    async fn delete_subject(
        &self,
        request: Request<proto::DeleteSubjectRequest>,
    ) -> std::result::Result<Response<proto::DeleteSubjectResponse>, Status> {
        let call = self.begin(&request, "DeleteSubject", &request.get_ref().gallery);
        let subject = request.get_ref().subject.clone();
        let r = self.routed_delete_subject(request).await;
        let audited = Audited {
            subjects: vec![(subject, None)],
            count: 1,
            took_effect: r.is_ok(),
        };
        self.finish_with(call, r, audited).await
    }

    async fn create_gallery(
        &self,
        request: Request<proto::CreateGalleryRequest>,
    ) -> std::result::Result<Response<proto::GalleryInfo>, Status> {
        let call = self.begin(&request, "CreateGallery", &request.get_ref().name);
        let r = self.routed_create_gallery(request).await;
        let audited = Audited {
            took_effect: r.is_ok(),
            ..Default::default()
        };
        self.finish_with(call, r, audited).await
    }

    async fn drop_gallery(
        &self,
        request: Request<proto::DropGalleryRequest>,
    ) -> std::result::Result<Response<proto::DropGalleryResponse>, Status> {
        let call = self.begin(&request, "DropGallery", &request.get_ref().name);
        let r = self.routed_drop_gallery(request).await;
        let audited = Audited {
            took_effect: r.is_ok(),
            ..Default::default()
        };
        self.finish_with(call, r, audited).await
    }

    async fn list_galleries(
        &self,
        request: Request<proto::ListGalleriesRequest>,
    ) -> std::result::Result<Response<proto::ListGalleriesResponse>, Status> {
        let call = self.begin(&request, "ListGalleries", "");
        let r = self.routed_list_galleries(request).await.map(|l| {
            let count = l.galleries.len();
            (
                l,
                Audited {
                    count,
                    ..Default::default()
                },
            )
        });
        self.finish(call, r).await
    }

    async fn get_gallery(
        &self,
        request: Request<proto::GetGalleryRequest>,
    ) -> std::result::Result<Response<proto::GalleryInfo>, Status> {
        let call = self.begin(&request, "GetGallery", &request.get_ref().name);
        let r = async {
            let auth = self.authorize(&request, Role::Identify, "GetGallery")?;
            Ok((self.info(&request.into_inner().name, &auth).await?, Audited::default()))
        }
        .await;
        self.finish(call, r).await
    }

    async fn repair_gallery(
        &self,
        request: Request<proto::RepairGalleryRequest>,
    ) -> std::result::Result<Response<proto::RepairGalleryResponse>, Status> {
        let call = self.begin(&request, "RepairGallery", &request.get_ref().name);
        let r = self.authorize(&request, Role::Admin, "RepairGallery").and_then(|_| {
            Err(Status::failed_precondition(format!(
                "gallery {:?}: a cluster replica is repaired on its node (RepairGallery of `{{gallery}}.s{{shard}}` there), or dropped there and reloaded from the object store",
                request.get_ref().name
            )))
        });
        self.finish(call, r).await
    }

    async fn compact_gallery(
        &self,
        request: Request<proto::CompactGalleryRequest>,
    ) -> std::result::Result<Response<proto::CompactGalleryResponse>, Status> {
        let call = self.begin(&request, "CompactGallery", &request.get_ref().name);
        let r = self.routed_compact_gallery(request).await;
        let audited = Audited {
            took_effect: r.is_ok(),
            ..Default::default()
        };
        self.finish_with(call, r, audited).await
    }

    // Encounters are kept by single servers; the token is still checked first, and
    // the call audited.
    async fn encounter_history(
        &self,
        request: Request<proto::EncounterHistoryRequest>,
    ) -> std::result::Result<Response<proto::EncounterList>, Status> {
        let call = self.begin(&request, "EncounterHistory", "");
        let r = self
            .authorize(&request, Role::Admin, "EncounterHistory")
            .and_then(|_| Err(no_encounter_reports()));
        self.finish(call, r).await
    }

    async fn overstays(
        &self,
        request: Request<proto::OverstaysRequest>,
    ) -> std::result::Result<Response<proto::OverstayList>, Status> {
        let call = self.begin(&request, "Overstays", "");
        let r = self
            .authorize(&request, Role::Admin, "Overstays")
            .and_then(|_| Err(no_encounter_reports()));
        self.finish(call, r).await
    }

    async fn encounter_stats(
        &self,
        request: Request<proto::EncounterStatsRequest>,
    ) -> std::result::Result<Response<proto::EncounterStatsList>, Status> {
        let call = self.begin(&request, "EncounterStats", "");
        let r = self
            .authorize(&request, Role::Admin, "EncounterStats")
            .and_then(|_| Err(no_encounter_reports()));
        self.finish(call, r).await
    }
}

/// The calls' work, audited by the trait's methods above.
impl Router {
    async fn routed_identify(
        &self,
        request: Request<proto::IdentifyRequest>,
    ) -> std::result::Result<proto::IdentifyResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "Identify")?;
        let req = request.into_inner();

        no_encounters(&req.encounter)?;
        if req.probes.is_empty() {
            return Err(Status::invalid_argument("probes: no probes given"));
        }
        let searches = Router::searches_of(&req.gallery, req.k, req.threshold, &req.galleries)?;
        let (mut results, missing) = self.search(&searches, &req.probes, auth, req.allow_partial).await?;
        let mut response = proto::IdentifyResponse {
            partial: !missing.is_empty(),
            unavailable_shards: missing,
            ..Default::default()
        };
        if req.galleries.is_empty() {
            response.results = results.pop().unwrap_or_default();
        } else {
            response.galleries = searches
                .iter()
                .zip(results)
                .map(|(s, results)| proto::GalleryResults {
                    gallery: s.gallery.clone(),
                    results,
                })
                .collect();
        }
        Ok(response)
    }

    /// Each message searched in a task of its own and answered (and audited, one line
    /// each) as it completes.
    fn routed_identify_stream(
        self: &Arc<Self>,
        request: Request<Streaming<proto::IdentifyStreamRequest>>,
        auth: Authorization,
        call: audit::RouterCall,
    ) -> Response<IdentifyStreamOut> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let router = self.clone();
        let call = Arc::new(call);
        tokio::spawn(async move {
            while let Ok(Some(m)) = incoming.message().await {
                let router = router.clone();
                let tx = tx.clone();
                let auth = auth.clone();
                let call = call.clone();
                tokio::spawn(async move {
                    let answer = async {
                        no_encounters(&m.encounter)?;
                        let searches = Router::searches_of(&m.gallery, m.k, m.threshold, &m.galleries)?;
                        let (results, missing) = router
                            .search(&searches, std::slice::from_ref(&m.probe), auth, m.allow_partial)
                            .await?;
                        Ok::<_, Status>((searches, results, missing))
                    }
                    .await;
                    let mut out = proto::IdentifyStreamResponse {
                        request_id: m.request_id.clone(),
                        ..Default::default()
                    };
                    match answer {
                        Ok((searches, mut results, missing)) => {
                            out.partial = !missing.is_empty();
                            out.unavailable_shards = missing;
                            if m.galleries.is_empty() {
                                out.result = results.pop().and_then(|mut r| r.pop());
                            } else {
                                out.galleries = searches
                                    .iter()
                                    .zip(results)
                                    .map(|(s, mut r)| proto::GalleryResult {
                                        gallery: s.gallery.clone(),
                                        result: r.pop(),
                                    })
                                    .collect();
                            }
                        }
                        Err(e) => {
                            out.error_code = e.code() as i32;
                            out.error_message = e.message().to_owned();
                        }
                    }
                    let out = router.audit_stream_answer(&call, &m, out).await;
                    let _ = tx.send(Ok(out)).await;
                });
            }
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }

    async fn routed_verify(
        &self,
        request: Request<proto::VerifyRequest>,
    ) -> std::result::Result<proto::VerifyResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "Verify")?;
        let req = request.into_inner();
        self.current_view(&[&req.gallery]).await?;
        let (meta, s) = self.subject_shard(&req.gallery, &req.subject)?;
        decode_template(&req.probe, meta.dim, "probe")?;
        let answer = self
            .on_replica(&req.gallery, meta.created_ms, s, |mut client, read| {
                let r = read.request(
                    proto::VerifyRequest {
                        gallery: read.local.clone(),
                        ..req.clone()
                    },
                    &auth,
                );
                async move { client.verify(r).await.map(Response::into_inner) }
            })
            .await?;
        Ok(answer)
    }

    /// Enroll; `subjects` gets the ids asked for and `galleries` the galleries named,
    /// each once (for the audit line).
    async fn routed_enroll(
        &self,
        request: Request<Streaming<proto::EnrollRequest>>,
        subjects: &mut Vec<String>,
        galleries: &mut Vec<String>,
    ) -> std::result::Result<proto::EnrollResponse, Status> {
        let auth = self.authorize(&request, Role::Enroll, "Enroll")?;
        let mut incoming = request.into_inner();
        // Check everything first: bad input changes nothing.
        let mut groups: BTreeMap<(String, u32), Vec<proto::EnrollRequest>> = BTreeMap::new();
        let mut index = 0usize;
        while let Some(mut m) = incoming.message().await? {
            let at = |s: Status| Status::new(s.code(), format!("message {index}: {}", s.message()));
            if !galleries.contains(&m.gallery) {
                galleries.push(m.gallery.clone());
            }
            let meta = self.meta(&m.gallery).map_err(at)?;
            m.subject = subject_field(&m.subject).map_err(at)?;
            subjects.push(m.subject.clone());
            if !m.expires_at.is_empty() {
                return Err(at(Status::invalid_argument(
                    "expires_at: a cluster's galleries do not expire subjects yet",
                )));
            }
            if m.templates.is_empty() {
                return Err(at(Status::invalid_argument("templates: no templates given")));
            }
            for (i, t) in m.templates.iter().enumerate() {
                decode_template(t, meta.dim, &format!("templates[{i}]")).map_err(at)?;
            }
            // Placed by its canonical id, which the node stores and checks.
            let s = meta.shard_of(&subject_field(&m.subject).map_err(at)?);
            groups.entry((m.gallery.clone(), s)).or_default().push(m);
            index += 1;
        }
        if groups.is_empty() {
            return Err(Status::invalid_argument("no enrollment messages"));
        }
        let sends = groups.into_iter().map(|((g, s), messages)| {
            let auth = auth.clone();
            async move {
                // A write goes to one replica; to another only if it never reached the
                // first (a write that reached a node may have been committed there).
                let local = keys::replica_name(&g, s);
                let count = messages.len();
                let mut last = None;
                let messages = Arc::new(messages);
                for (node, address) in self.writers(&g, s) {
                    // Each message is copied as it is sent (the list is kept for a
                    // retry on another replica).
                    let (messages, name) = (messages.clone(), local.clone());
                    let stream = tokio_stream::iter((0..count).map(move |i| proto::EnrollRequest {
                        gallery: name.clone(),
                        ..messages[i].clone()
                    }));
                    let mut client = self.client(&address)?;
                    let sent = client.enroll(with_authorization(stream, &auth));
                    let Ok(answer) = tokio::time::timeout(replicas::WRITE_DEADLINE, sent).await else {
                        return Err(Status::unknown(format!(
                            "shard {g}/{s} (node {node}, {count} subjects): no answer within {:?}; the enrollment may or may not have taken effect",
                            replicas::WRITE_DEADLINE
                        )));
                    };
                    match answer {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(e) if never_reached(&e) => {
                            self.suspect(&address);
                            last = Some(format!("{node}: {}", e.message()));
                        }
                        Err(e) => {
                            return Err(Status::new(
                                e.code(),
                                format!(
                                    "shard {g}/{s} (node {node}, {count} subjects): {}",
                                    as_gallery(e.clone(), &local, &g).message()
                                ),
                            ));
                        }
                    }
                }
                Err(Status::unavailable(format!(
                    "shard {g}/{s} takes no enrollments ({count} subjects not enrolled): {}",
                    last.unwrap_or_else(|| self.why_unserved(&g, s))
                )))
            }
        });
        let results = futures_util::future::join_all(sends).await;
        let mut done = proto::EnrollResponse::default();
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(r) => {
                    done.subjects += r.subjects;
                    done.templates += r.templates;
                }
                Err(e) => failures.push(e),
            }
        }
        if let Some(first) = failures.first() {
            let all: Vec<&str> = failures.iter().map(|f| f.message()).collect();
            return Err(Status::new(
                first.code(),
                format!(
                    "{}; {} subjects ({} templates) of other shards are enrolled",
                    all.join("; "),
                    done.subjects,
                    done.templates
                ),
            ));
        }
        Ok(done)
    }

    async fn routed_delete_subject(
        &self,
        request: Request<proto::DeleteSubjectRequest>,
    ) -> std::result::Result<proto::DeleteSubjectResponse, Status> {
        let auth = self.authorize(&request, Role::Enroll, "DeleteSubject")?;
        let req = request.into_inner();
        let (_, s) = self.subject_shard(&req.gallery, &req.subject)?;
        let local = keys::replica_name(&req.gallery, s);
        let mut last = None;
        for (node, address) in self.writers(&req.gallery, s) {
            let r = with_authorization(
                proto::DeleteSubjectRequest {
                    gallery: local.clone(),
                    subject: req.subject.clone(),
                },
                &auth,
            );
            let mut client = self.client(&address)?;
            let sent = client.delete_subject(r);
            let Ok(answer) = tokio::time::timeout(replicas::WRITE_DEADLINE, sent).await else {
                return Err(Status::unknown(format!(
                    "shard {}/{s} (node {node}): no answer within {:?}; the deletion may or may not have taken effect",
                    req.gallery,
                    replicas::WRITE_DEADLINE
                )));
            };
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) if never_reached(&e) => {
                    self.suspect(&address);
                    last = Some(format!("{node}: {}", e.message()));
                }
                Err(e) => return Err(as_gallery(e, &local, &req.gallery)),
            }
        }
        Err(Status::unavailable(format!(
            "shard {}/{s} takes no deletions: {}",
            req.gallery,
            last.unwrap_or_else(|| self.why_unserved(&req.gallery, s))
        )))
    }

    async fn routed_create_gallery(
        &self,
        request: Request<proto::CreateGalleryRequest>,
    ) -> std::result::Result<proto::GalleryInfo, Status> {
        let auth = self.authorize(&request, Role::Admin, "CreateGallery")?;
        let caller = self.auth.name_of(&request).unwrap_or_else(|| "anonymous".into());
        let req = request.into_inner();
        crate::server::registry::check_gallery_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        if req.name.len() > keys::MAX_GALLERY_NAME {
            return Err(Status::invalid_argument(format!(
                "name: a cluster's gallery name is at most {} characters",
                keys::MAX_GALLERY_NAME
            )));
        }
        if !req.source.is_empty() || !req.subjects.is_empty() {
            return Err(Status::invalid_argument(
                "source: a cluster's galleries are not derived yet",
            ));
        }
        if !req.expires_at.is_empty() {
            return Err(Status::invalid_argument(
                "expires_at: a cluster's galleries do not expire yet",
            ));
        }
        check_dim(req.dim as usize).map_err(|e| Status::invalid_argument(format!("dim: {e}")))?;
        let dtype = Dtype::ALL
            .into_iter()
            .find(|d| d.name() == req.dtype)
            .ok_or_else(|| Status::invalid_argument(format!("dtype: {:?} is not one of f32, f16, i8", req.dtype)))?;
        let shards = if req.shards == 0 { 1 } else { req.shards };
        if shards > keys::MAX_SHARDS {
            return Err(Status::invalid_argument(format!(
                "shards: {shards} is over {}",
                keys::MAX_SHARDS
            )));
        }
        let replicas = if req.replicas == 0 { 2 } else { req.replicas };
        if replicas > 16 {
            return Err(Status::invalid_argument(format!("replicas: {replicas} is over 16")));
        }
        // A node that just started may not be in the view yet: give it a moment.
        self.view
            .wait_for(Instant::now() + Duration::from_secs(5), |st| !st.nodes.is_empty())
            .await;
        let live = self.state(|st| st.live_nodes());
        if live.is_empty() {
            return Err(Status::unavailable("no shard server is live to hold the gallery"));
        }
        let meta = GalleryMeta {
            dim: req.dim as usize,
            dtype,
            shards,
            replicas,
            created_ms: crate::time_text::now_ms(),
            shard_hash: keys::ShardHash::Mixed,
        };
        let key = keys::gallery_key(&req.name);
        let mut ops = vec![etcd::put_op(&key, keys::encode(&meta), 0)];
        for s in 0..shards {
            let map = keys::ShardMap {
                replicas: keys::placement(&req.name, s, replicas, &live),
            };
            ops.push(etcd::put_op(&keys::shard_key(&req.name, s), keys::encode(&map), 0));
        }
        let txn = etcd::TxnRequest {
            compare: vec![etcd::absent(&key)],
            success: ops,
            failure: Vec::new(),
        };
        let created = self
            .etcd
            .txn(&format!("the creation of {}", req.name), txn)
            .await
            .map_err(status_of)?;
        if !created.succeeded {
            return Err(Status::already_exists(format!(
                "gallery: {:?} already exists",
                req.name
            )));
        }
        tracing::info!(%caller, gallery = %req.name, dim = req.dim, %dtype, shards, replicas, "created a cluster gallery");
        let name = req.name.clone();
        self.view
            .wait_for(Instant::now() + CREATE_WAIT, |st| {
                st.galleries.contains_key(&name) && (0..shards).all(|s| !st.serving(&name, s).is_empty())
            })
            .await;
        self.info(&req.name, &auth).await
    }

    async fn routed_drop_gallery(
        &self,
        request: Request<proto::DropGalleryRequest>,
    ) -> std::result::Result<proto::DropGalleryResponse, Status> {
        self.authorize(&request, Role::Admin, "DropGallery")?;
        let caller = self.auth.name_of(&request).unwrap_or_else(|| "anonymous".into());
        let g = request.into_inner().name;
        let meta = self.meta_confirmed(&g).await?;
        let key = keys::gallery_key(&g);
        let txn = etcd::TxnRequest {
            compare: vec![etcd::absent(&key)],
            success: Vec::new(),
            // The gallery's own key exactly, and its folders: never a sibling's
            // (`fl` must not take `fl-2`), and no checkpoint left for a gallery made
            // again under the name.
            failure: vec![
                etcd::delete_op(&key),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::SHARDS)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::LOG)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::VISIBLE)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::APPLIED)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::CHECKPOINTS)),
                etcd::delete_prefix_op(&format!("{}{g}/", keys::COMMITTED)),
            ],
        };
        let r = self
            .etcd
            .txn(&format!("the drop of {g}"), txn)
            .await
            .map_err(status_of)?;
        if r.succeeded {
            return Err(Status::not_found(format!("gallery: {g:?} does not exist")));
        }
        // Its objects: the nodes drop their replicas when they see the keys go.
        if let Some(url) = self.state(|st| st.store.clone()) {
            let prefix = keys::objects_prefix(&g, meta.created_ms);
            match Objects::open(&url) {
                Ok(objects) => {
                    if let Err(e) = objects.delete_prefix(&prefix).await {
                        tracing::warn!(gallery = %g, error = %e, "the dropped gallery's objects were not all deleted");
                    }
                }
                Err(e) => tracing::warn!(gallery = %g, error = %e, "the object store could not be opened"),
            }
        }
        tracing::info!(%caller, gallery = %g, "dropped a cluster gallery");
        Ok(proto::DropGalleryResponse {})
    }

    async fn routed_list_galleries(
        &self,
        request: Request<proto::ListGalleriesRequest>,
    ) -> std::result::Result<proto::ListGalleriesResponse, Status> {
        let auth = self.authorize(&request, Role::Identify, "ListGalleries")?;
        let names: Vec<String> = self.state(|st| st.galleries.keys().cloned().collect());
        let mut galleries = Vec::with_capacity(names.len());
        for g in names {
            match self.info(&g, &auth).await {
                Ok(i) => galleries.push(i),
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(proto::ListGalleriesResponse { galleries })
    }

    async fn routed_compact_gallery(
        &self,
        request: Request<proto::CompactGalleryRequest>,
    ) -> std::result::Result<proto::CompactGalleryResponse, Status> {
        let auth = self.authorize(&request, Role::Admin, "CompactGallery")?;
        let g = request.into_inner().name;
        let meta = self.meta(&g)?;
        let mut total = proto::CompactGalleryResponse::default();
        for s in 0..meta.shards {
            // Every serving replica compacts; the counts are the first one's.
            for (i, (node, address)) in self.state(|st| st.serving(&g, s)).into_iter().enumerate() {
                let r = with_authorization(
                    proto::CompactGalleryRequest {
                        name: keys::replica_name(&g, s),
                    },
                    &auth,
                );
                let mut client = self.client(&address)?;
                // No deadline: a large shard's compaction may take long.
                let part = client
                    .compact_gallery(r)
                    .await
                    .map_err(|e| Status::new(e.code(), format!("shard {g}/{s} on {node}: {}", e.message())))?
                    .into_inner();
                if i > 0 {
                    continue;
                }
                total.rows_kept += part.rows_kept;
                total.rows_dropped += part.rows_dropped;
                total.segments_before += part.segments_before;
                total.segments_after += part.segments_after;
            }
        }
        Ok(total)
    }
}

fn no_encounter_reports() -> Status {
    Status::failed_precondition("encounters are kept by single servers; ask the server that recorded them")
}
