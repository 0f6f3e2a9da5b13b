//! Prometheus metrics: requests, latency, batch sizes, queue depth, engine time,
//! refusals, open connections, audit failures, galleries not serving. Served as text
//! on `GET /metrics` at the configured address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Why the server turned something away before it did any work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A new connection while every slot was held by connections that had spoken.
    Connections,
    /// A connection that sent nothing within the handshake timeout, or closed to make
    /// room while silent.
    SilentConnection,
    /// A connection that made no request within the handshake timeout (it sent bytes:
    /// one, or the HTTP/2 preface), or closed to make room while it had made none.
    IdleConnection,
    /// A new connection from an address holding `max_connections_per_address`
    /// connections that had all made requests.
    AddressLimit,
    /// A call while `max_requests_in_flight` calls were being handled.
    RequestsInFlight,
    /// A search while the engine's queue was full.
    Queue,
    /// No valid token.
    Unauthenticated,
    /// A valid token without the role.
    PermissionDenied,
    /// accept(2) failed (for instance out of file descriptors).
    Accept,
}

impl Refusal {
    fn name(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::SilentConnection => "silent_connection",
            Refusal::IdleConnection => "idle_connection",
            Refusal::AddressLimit => "address_limit",
            Refusal::RequestsInFlight => "requests_in_flight",
            Refusal::Queue => "queue",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::Accept => "accept",
        }
    }
}

/// At most one log line per reason per [`LOG_EVERY`], saying how many were not logged.
struct RateLimit {
    last: std::sync::Mutex<std::collections::HashMap<Refusal, (std::time::Instant, u64)>>,
}

/// How often a refusal of one kind is logged at most.
pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<MethodCode, Counter>,
    pub latency: Family<Method, Histogram>,
    pub batch_probes: Histogram,
    pub batch_requests: Histogram,
    pub queue_depth: Gauge,
    pub engine_seconds: Histogram,
    pub refused: Family<Reason, Counter>,
    pub connections: Gauge,
    pub audit_failures: Counter,
    pub galleries_not_serving: Gauge,
    refusal_log: RateLimit,
}

impl Metrics {
    /// Register everything.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("biogate");
        let requests = Family::<MethodCode, Counter>::default();
        let latency =
            Family::<Method, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(1e-4, 2.0, 18)));
        let batch_probes = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let queue_depth = Gauge::default();
        let engine_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 18));
        registry.register("requests", "gRPC requests by method and status code", requests.clone());
        registry.register("request_seconds", "request latency by method", latency.clone());
        registry.register("batch_probes", "probes per engine batch", batch_probes.clone());
        registry.register(
            "batch_requests",
            "requests coalesced per engine batch",
            batch_requests.clone(),
        );
        registry.register("queue_depth", "requests waiting for the engine", queue_depth.clone());
        registry.register("engine_seconds", "engine time per batch", engine_seconds.clone());
        let refused = Family::<Reason, Counter>::default();
        let connections = Gauge::default();
        let audit_failures = Counter::default();
        let galleries_not_serving = Gauge::default();
        registry.register(
            "refused",
            "connections and calls turned away before any work, by reason",
            refused.clone(),
        );
        registry.register("connections", "open client connections", connections.clone());
        registry.register(
            "audit_failures",
            "audit lines that could not be made durable",
            audit_failures.clone(),
        );
        registry.register(
            "galleries_not_serving",
            "galleries that failed to open or hold damage",
            galleries_not_serving.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            batch_probes,
            batch_requests,
            queue_depth,
            engine_seconds,
            refused,
            connections,
            audit_failures,
            galleries_not_serving,
            refusal_log: RateLimit {
                last: std::sync::Mutex::new(std::collections::HashMap::new()),
            },
        })
    }

    /// Count a refusal and log it, at most once per [`LOG_EVERY`] per reason.
    pub fn refuse(&self, why: Refusal, detail: &str) {
        self.refused
            .get_or_create(&Reason {
                reason: why.name().into(),
            })
            .inc();
        let mut last = self.refusal_log.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match last.get_mut(&why) {
            Some((at, skipped)) if now.duration_since(*at) < LOG_EVERY => *skipped += 1,
            slot => {
                let skipped = slot.map_or(0, |(_, s)| *s);
                tracing::warn!(reason = why.name(), detail, not_logged_since_last = skipped, "refused");
                last.insert(why, (now, 0));
            }
        }
    }

    /// Count a finished request.
    pub fn observe(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&MethodCode {
                method: method.into(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&Method { method: method.into() })
            .observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}
