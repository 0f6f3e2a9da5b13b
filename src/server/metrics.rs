//! Prometheus metrics: requests, latency, batch sizes, queue depth, engine time.
//! Served as text on `GET /metrics` at the configured address.

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

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<MethodCode, Counter>,
    pub latency: Family<Method, Histogram>,
    pub batch_probes: Histogram,
    pub batch_requests: Histogram,
    pub queue_depth: Gauge,
    pub engine_seconds: Histogram,
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
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            batch_probes,
            batch_requests,
            queue_depth,
            engine_seconds,
        })
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
