//! The gRPC front end. `start` loads the galleries, starts the engine thread, the audit
//! writer, the metrics endpoint, health and reflection, and serves until told to stop;
//! stopping flips health to NOT_SERVING, stops accepting, and drains in-flight requests.
//!
//! Request flow: [`connections`] (bounded, silent ones closed) -> tonic ->
//! [`service::Service`] (admission, auth, validation) -> [`batcher`] (one engine
//! thread, coalesced batches) -> `Engine::search` -> audit line -> response. Beside it,
//! the [`supervisor`] verifies and scrubs the galleries and keeps per-gallery health.
//! Writes go to the galleries, or, on a cluster node, through the [`replication`] the
//! cluster gave the server when it started (`cluster::node::start_node`).

pub mod audit;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod connections;
pub mod encounters;
pub mod metrics;
pub mod read_ahead;
pub mod registry;
pub mod replication;
pub mod retention;
pub mod search_request;
pub mod service;
pub mod supervisor;

/// Code generated from proto/biogate/v1/biogate.proto.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("biogate.v1");
    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("biogate_descriptor");
}

use crate::error::{Error, IoContext, Result};
use config::Config;
use proto::biogate_server::BiogateServer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// HTTP/2 flow-control windows of the server's connections. h2 closes a connection
/// (GOAWAY `too_many_data_frames`) whose unread DATA frames under 256 bytes cost more
/// than half the connection window, each costing 256 minus its size; what one call can
/// leave unread is bounded by the stream window. So a 16 MiB connection window (an
/// 8 MiB budget) and 256 KiB per stream: a stream of 60-byte messages held back by a
/// slow disk costs at most ~0.8 MiB, nine such streams on one connection fit, and a
/// call still moves 256 KiB per round trip. (hyper's defaults, 1 MiB and 1 MiB, let
/// one stream of small messages exceed the budget.)
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// The window of each stream (call).
pub const STREAM_WINDOW_BYTES: u32 = 256 << 10;

/// A gRPC status code's name as gRPC writes it ("INVALID_ARGUMENT").
pub fn status_code_name(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A background task of the server (a retention purge), stopped when dropped.
pub struct BackgroundTask(Option<tokio::task::JoinHandle<()>>);

impl BackgroundTask {
    /// Nothing to run (the task is turned off).
    pub fn none() -> BackgroundTask {
        BackgroundTask(None)
    }

    pub fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> BackgroundTask {
        BackgroundTask(Some(tokio::spawn(task)))
    }
}

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// A running server.
pub struct ServerHandle {
    /// Where gRPC listens (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// Where `GET /metrics` listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    grace: std::time::Duration,
    registry: Arc<registry::Registry>,
    _supervisor: supervisor::Supervisor,
    _retention: BackgroundTask,
    _gallery_retention: BackgroundTask,
    /// A cluster node's write path, left on shutdown.
    replication: Option<Arc<dyn replication::Replication>>,
}

impl ServerHandle {
    /// Graceful shutdown: NOT_SERVING, stop accepting, finish in-flight requests (after
    /// the grace period, cut off whatever is still open), then close every gallery: writes
    /// still running end first, and each log's final length is recorded, so that a cut
    /// of a log after a clean stop is always recognised.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(replication) = self.replication.take() {
            let _ = replication.leave().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = match tokio::time::timeout(self.grace, &mut self.task).await {
            Ok(joined) => joined.map_err(|e| Error::Internal(format!("server task: {e}")))?,
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "requests still open after the grace period; closing them");
                self.task.abort();
                Ok(())
            }
        };
        let registry = self.registry.clone();
        let closed = tokio::task::spawn_blocking(move || registry.close_all())
            .await
            .map_err(|e| Error::Internal(format!("closing the galleries: {e}")))?;
        tracing::info!("galleries closed");
        served.and(closed)
    }
}

/// Start serving `config`.
pub async fn start(config: Config) -> Result<ServerHandle> {
    start_with(config, crate::storage::Storage::default()).await
}

/// Start serving `config`, writing through `storage` (tests inject disk faults).
pub async fn start_with(config: Config, storage: crate::storage::Storage) -> Result<ServerHandle> {
    start_inner(config, storage, None).await
}

/// Start serving `config` with the write path `join` gives once the server listens
/// (a cluster node: `cluster::node::start_node`). It holds only the galleries that
/// write path opens (no default gallery).
pub async fn start_replicated(config: Config, join: replication::Join) -> Result<ServerHandle> {
    start_inner(config, crate::storage::Storage::default(), Some(join)).await
}

async fn start_inner(
    config: Config,
    storage: crate::storage::Storage,
    join: Option<replication::Join>,
) -> Result<ServerHandle> {
    config.validate()?;
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir).ctx(|| format!("creating {}", config.data_dir.display()))?;
    connections::raise_fd_limit(config.max_connections);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<BiogateServer<Arc<service::Service>>>().await;

    let registry = Arc::new(registry::Registry::open(&config.data_dir, storage.clone())?);
    // A cluster node holds only the replicas the shard map gives it.
    if registry.is_empty()
        && join.is_none()
        && let Some(d) = &config.default_gallery
    {
        registry.create(&d.name, d.dim, d.dtype)?;
        tracing::info!(gallery = %d.name, dim = d.dim, dtype = %d.dtype, "created the default gallery");
    }
    let metrics = metrics::Metrics::new();
    let (engine, gpu) = crate::engine::open_engine(config.backend)?;
    tracing::info!(backend = %config.backend, gpu = %gpu.map_or_else(|| "none".to_owned(), |g| g.describe()), "search engine");
    let batcher = batcher::Batcher::start(
        engine.clone(),
        batcher::BatchConfig {
            max_batch: config.max_batch,
            max_wait: config.max_wait(),
            queue_capacity: config.queue_capacity,
        },
        metrics.clone(),
    );
    let auth = Arc::new(auth::Auth::new(&config.tokens));
    if !auth.enabled() {
        if config.listen.ip().is_loopback() {
            tracing::info!(listen = %config.listen, "no tokens configured: authentication is off (loopback only)");
        } else {
            tracing::warn!(listen = %config.listen, "no tokens configured: authentication is off (every caller has every role)");
        }
    }
    let audit = audit::AuditLog::open(&config.data_dir, &config.audit, storage)?;
    let encounter_log = crate::encounters::EncounterLog::open(&config.data_dir)?;
    let retention = encounters::start_retention(
        config.data_dir.clone(),
        config.encounters.retention()?,
        std::time::Duration::from_secs(config.encounters.purge_interval_s),
        audit.clone(),
    );
    let gallery_retention = retention::start(registry.clone(), config.retention.clone(), audit.clone());
    let service = Arc::new(service::Service {
        registry: registry.clone(),
        batcher,
        engine,
        audit,
        encounters: encounter_log,
        metrics: metrics.clone(),
        auth,
        config: config.clone(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_requests_in_flight)),
        replication: std::sync::OnceLock::new(),
    });
    let service_for_node = service.clone();

    let keepalive =
        (config.keepalive_interval_ms > 0).then(|| std::time::Duration::from_millis(config.keepalive_interval_ms));
    let accepted = connections::Connections::new(config.connection_limits(), metrics.clone());
    let mut builder = Server::builder()
        // A connection is marked by its first request (connections.rs).
        .layer(accepted.layer())
        // Windows sized for h2's budget of small DATA frames (see the constants).
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(std::time::Duration::from_millis(config.keepalive_timeout_ms)))
        .max_concurrent_streams(Some(config.max_streams_per_connection));
    if let Some(tls) = &config.tls {
        let read = |p: &std::path::Path| std::fs::read(p).ctx(|| format!("reading {}", p.display()));
        let mut tls_config = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(ca) = &tls.client_ca {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(tls_config)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    // Reflection in both versions: v1, and v1alpha for grpcio-reflection, grpcui and
    // older grpcurl builds.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let biogate = BiogateServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(biogate);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .ctx(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr().ctx(|| "reading the bound address".into())?;
    let replication = match join {
        Some(join) => {
            let replication = join(replication::Joining {
                registry: registry.clone(),
                addr,
                data_dir: config.data_dir.clone(),
                seal_log_rows: config.seal_log_rows,
            })
            .await?;
            let _ = service_for_node.replication.set(replication.clone());
            Some(replication)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (metrics_stop_tx, metrics_stop_rx) = oneshot::channel::<()>();
    let metrics_addr = match config.metrics_listen {
        Some(at) => Some(serve_metrics(at, metrics.clone(), metrics_stop_rx).await?),
        None => None,
    };
    let supervisor = supervisor::start(registry.clone(), health.clone(), metrics.clone(), &config);
    let mut known = std::collections::HashMap::new();
    supervisor::sync_health(&registry, &health, &metrics, &mut known, None).await;
    health.set_serving::<BiogateServer<Arc<service::Service>>>().await;
    let galleries: Vec<String> = registry.all().iter().map(|g| g.name.clone()).collect();
    let not_serving: Vec<String> = known.iter().filter(|(_, s)| !**s).map(|(n, _)| n.clone()).collect();
    tracing::info!(
        %addr,
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        galleries = %galleries.join(","),
        not_serving = %not_serving.join(","),
        tls = config.tls.is_some(),
        "serving"
    );

    let shutdown = async move {
        let _ = stop_rx.await;
        tracing::info!("shutting down: NOT_SERVING, draining in-flight requests");
        health.set_not_serving::<BiogateServer<Arc<service::Service>>>().await;
    };
    let task = tokio::spawn(async move {
        let incoming = accepted.incoming(listener);
        let result = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| Error::Internal(format!("gRPC server: {e}")));
        let _ = metrics_stop_tx.send(());
        tracing::info!("stopped");
        result
    });
    Ok(ServerHandle {
        addr,
        metrics_addr,
        stop: Some(stop_tx),
        task,
        grace: std::time::Duration::from_millis(config.shutdown_grace_ms),
        registry,
        _supervisor: supervisor,
        _retention: retention,
        _gallery_retention: gallery_retention,
        replication,
    })
}

async fn serve_metrics(
    at: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    stop: oneshot::Receiver<()>,
) -> Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .ctx(|| format!("listening on {at}"))?;
    let addr = listener.local_addr().ctx(|| "reading the metrics address".into())?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await;
    });
    Ok(addr)
}
