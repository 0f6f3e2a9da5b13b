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
mod catalogue;
mod replicas;
mod search;
mod writes;

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
    /// When a read last found etcd unreachable while the view had lost it too, and how
    /// many times the view had followed etcd then (reads go on from the last known state
    /// for a moment, unless the view follows etcd again meanwhile: replicas.rs).
    etcd_unreachable_at: Mutex<Option<(Instant, u64)>>,
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
        etcd_unreachable_at: Mutex::new(None),
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

fn no_encounter_reports() -> Status {
    Status::failed_precondition("encounters are kept by single servers; ask the server that recorded them")
}
