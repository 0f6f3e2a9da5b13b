//! `biogate serve`: the gRPC server, configured by a TOML file, flags and environment.

use biogate::engine::BackendChoice;
use biogate::error::{Error, Result};
use biogate::server::config::Config;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// TOML configuration file (flags and environment variables override it).
    #[arg(long, env = "BIOGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Where galleries and the audit log live.
    #[arg(long, env = "BIOGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "BIOGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Prometheus metrics address, or "off".
    #[arg(long, env = "BIOGATE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Most probes per engine batch.
    #[arg(long, env = "BIOGATE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// Microseconds the engine waits for more work before running a partial batch.
    #[arg(long, env = "BIOGATE_MAX_WAIT_US")]
    max_wait_us: Option<u64>,
    /// cpu, gpu or auto (default: the configuration's `backend`, else auto).
    #[arg(long, env = "BIOGATE_BACKEND")]
    backend: Option<BackendChoice>,
    /// Join a cluster: its etcd members' client URLs (comma-separated). Without it, a
    /// single server.
    #[arg(long, env = "BIOGATE_ETCD", value_delimiter = ',', requires_all = ["store", "node"])]
    etcd: Vec<String>,
    /// The cluster's object store: file:///dir (or s3://bucket/prefix with the s3 feature).
    #[arg(long, env = "BIOGATE_STORE", requires = "etcd")]
    store: Option<String>,
    /// This node's name in the cluster (unique; replicas are placed by it).
    #[arg(long, env = "BIOGATE_NODE", requires = "etcd")]
    node: Option<String>,
    /// The address routers reach this node at (default: the listen address).
    #[arg(long, env = "BIOGATE_ADVERTISE", requires = "etcd")]
    advertise: Option<String>,
    /// Checkpoint each shard's files to the object store every this many batches (a
    /// new replica loads the checkpoint; the log before it is deleted).
    #[arg(long, default_value_t = biogate::cluster::node::CHECKPOINT_EVERY, requires = "etcd")]
    checkpoint_every: u64,
}

#[derive(Args)]
pub(crate) struct RouterArgs {
    /// The cluster's etcd members' client URLs (comma-separated).
    #[arg(long, env = "BIOGATE_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// gRPC listen address.
    #[arg(long, env = "BIOGATE_LISTEN", default_value = "127.0.0.1:50050")]
    listen: std::net::SocketAddr,
    /// TOML file whose `[[tokens]]` say who may do what (the nodes' own, so a caller's
    /// token means the same on both; none: authentication is off), and whose
    /// `max_connections` and `handshake_timeout_ms` bound the router's connections.
    #[arg(long, env = "BIOGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the router's audit log lives (every call, refusals included).
    #[arg(long, env = "BIOGATE_ROUTER_DATA_DIR", default_value = "./biogate-router")]
    data_dir: PathBuf,
}

pub(crate) async fn router(a: RouterArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.data_dir = a.data_dir;
    let handle = biogate::cluster::router::start(&a.etcd, a.listen, &config).await?;
    outln!("biogate router on {} (etcd {})", handle.addr, a.etcd.join(","));
    wait_for_signal().await;
    handle.shutdown().await
}

pub(crate) async fn run(a: ServeArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = a.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = a.listen {
        config.listen = l;
    }
    if let Some(m) = a.metrics_listen {
        config.metrics_listen = match m.as_str() {
            "off" | "" => None,
            other => Some(
                other
                    .parse()
                    .map_err(|e| Error::Config(format!("--metrics-listen {other:?}: {e}")))?,
            ),
        };
    }
    if let Some(b) = a.max_batch {
        config.max_batch = b;
    }
    if let Some(w) = a.max_wait_us {
        config.max_wait_us = w;
    }
    if let Some(b) = a.backend {
        config.backend = b;
    }
    let data_dir = config.data_dir.clone();
    let handle = if a.etcd.is_empty() {
        biogate::server::start(config).await?
    } else {
        let options = biogate::cluster::node::ClusterOptions {
            etcd: a.etcd,
            store: a.store.expect("clap requires --store"),
            node: a.node.expect("clap requires --node"),
            advertise: a.advertise,
            checkpoint_every: a.checkpoint_every,
        };
        biogate::cluster::node::start_node(config, options).await?
    };
    let scheme = "http";
    outln!(
        "biogate serving {} on {} (metrics: {})",
        data_dir.display(),
        handle.addr,
        handle
            .metrics_addr
            .map(|m| format!("http://{m}/metrics"))
            .unwrap_or_else(|| "off".into())
    );
    outln!(
        "try: biogate client --addr {scheme}://{} galleries   (or: grpcurl -plaintext {} list)",
        handle.addr,
        handle.addr
    );
    wait_for_signal().await;
    handle.shutdown().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
