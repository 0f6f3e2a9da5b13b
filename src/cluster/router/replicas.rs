//! Which replica of a shard the router asks: a random serving one first, suspected
//! nodes last; reads hedged to the next replica when the first is slow; writes moved
//! to another replica only when the call provably never reached the node.

use super::{Router, as_gallery, worth_another_replica};
use crate::cluster::keys;
use crate::server::proto::biogate_client::BiogateClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long a node that could not be reached, or did not answer before another
/// replica did, is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(5);
/// Replica reads remembered for the hedging delay.
const LATENCIES_KEPT: usize = 512;
/// The hedging delay's bounds, and its value before enough reads were seen.
const HEDGE_MIN: Duration = Duration::from_millis(2);
const HEDGE_MAX: Duration = Duration::from_millis(250);
const HEDGE_UNTIL_MEASURED: Duration = Duration::from_millis(50);
/// The longest a read waits for any replica of a shard (a hung cluster, not a slow
/// search of a large batch).
pub(super) const READ_DEADLINE: Duration = Duration::from_secs(60);
/// The longest a write waits for the node it went to: longer than the node's own
/// waits (the previous batch applied, 30 s; this one, 30 s; the replicas, 3 s), after
/// which its outcome is unknown.
pub(super) const WRITE_DEADLINE: Duration = Duration::from_secs(75);

/// Whether a call failed before it reached the node (so nothing was done there, and a
/// write may go to another replica): the client's own connection attempt failed
/// (refused, no route, or the connector's timeout), as the local error chain under the
/// status says. Never read from the status's message: a node's answer can carry the
/// same words (its own etcd refusing it) after it did something, and an answer from a
/// node has no local cause at all.
pub(super) fn never_reached(s: &Status) -> bool {
    use std::io::ErrorKind;
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        // hyper's connector names its own failures (a connect timeout among them):
        // nothing was sent on a connection that never opened.
        if e.to_string().starts_with("tcp connect error") {
            return true;
        }
        cause = e.source();
    }
    false
}

impl Router {
    /// The serving replicas of a shard, starting at a random one (each shard of each
    /// search chosen on its own: a counter shared by all shards would give back-to-back
    /// searches of a two-shard gallery the same replicas); nodes suspected lately last.
    pub(super) fn replicas_in_turn(&self, g: &str, s: u32) -> Vec<(String, String)> {
        let mut serving = self.state(|st| st.serving(g, s));
        if !serving.is_empty() {
            let turn = rand::random::<u64>() as usize % serving.len();
            serving.rotate_left(turn);
            let now = Instant::now();
            let mut suspects = self.suspects.lock().expect("suspects lock");
            suspects.retain(|_, until| *until > now);
            serving.sort_by_key(|(_, address)| suspects.contains_key(address));
        }
        serving
    }

    pub(super) fn suspect(&self, address: &str) {
        self.suspects
            .lock()
            .expect("suspects lock")
            .insert(address.to_owned(), Instant::now() + SUSPECT_FOR);
    }

    /// The replicas a write to shard `s` may go to: the serving ones in turn, then the
    /// other live ones in the map (a replica catches up before it commits).
    pub(super) fn writers(&self, g: &str, s: u32) -> Vec<(String, String)> {
        let mut out = self.replicas_in_turn(g, s);
        let others: Vec<(String, String)> = self.state(|st| {
            st.shard_map(g, s)
                .map(|m| {
                    m.replicas
                        .iter()
                        .filter_map(|n| st.nodes.get(n).map(|i| (n.clone(), i.address.clone())))
                        .collect()
                })
                .unwrap_or_default()
        });
        for o in others {
            if !out.contains(&o) {
                out.push(o);
            }
        }
        out
    }

    /// Why a shard has no serving replica, for the error.
    pub(super) fn why_unserved(&self, g: &str, s: u32) -> String {
        self.state(|st| {
            let Some(map) = st.shard_map(g, s) else {
                return "it has no replicas placed".to_owned();
            };
            let visible = st.visible.get(&(g.to_owned(), s)).map_or(0, |v| v.0);
            let each: Vec<String> = map
                .replicas
                .iter()
                .map(|n| {
                    let applied = st.applied.get(&(g.to_owned(), s)).and_then(|a| a.get(n));
                    match (st.nodes.contains_key(n), applied) {
                        (false, _) => format!("{n} is down"),
                        (true, None) => format!("{n} is opening it"),
                        (true, Some(a)) => format!("{n} has applied batch {a} of {visible}"),
                    }
                })
                .collect();
            if each.is_empty() {
                "it has no replicas placed".to_owned()
            } else {
                each.join(", ")
            }
        })
    }

    /// How long a replica read may go unanswered before the next replica is asked too:
    /// the 95th percentile of recent reads (a paused or overloaded node then costs a
    /// search about one more read, not its deadline).
    pub(super) fn hedge_delay(&self, local: &str) -> Duration {
        let latencies = self.latencies.lock().expect("latencies lock");
        let Some(recent) = latencies.get(local).filter(|l| l.len() >= 20) else {
            return HEDGE_UNTIL_MEASURED;
        };
        let mut sorted: Vec<Duration> = recent.iter().copied().collect();
        sorted.sort_unstable();
        sorted[sorted.len() * 95 / 100].clamp(HEDGE_MIN, HEDGE_MAX)
    }

    pub(super) fn record_latency(&self, local: &str, took: Duration) {
        let mut latencies = self.latencies.lock().expect("latencies lock");
        let recent = latencies.entry(local.to_owned()).or_default();
        if recent.len() == LATENCIES_KEPT {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// Send a read `call` to a serving replica of shard `s`; to the next one if it
    /// fails, or (hedged) if it has not answered within [`Router::hedge_delay`]: the
    /// first answer wins, the others are dropped, and a replica that lost the race is
    /// tried last for a while. Reads only: a write is never sent twice.
    /// Gives up after [`READ_DEADLINE`] (every replica paused or hung): UNAVAILABLE.
    pub(super) async fn on_replica<T, F, Fut>(&self, g: &str, s: u32, call: F) -> std::result::Result<T, Status>
    where
        F: Fn(BiogateClient<Channel>, String) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        match tokio::time::timeout(READ_DEADLINE, self.on_replica_unbounded(g, s, call)).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(format!(
                "shard {g}/{s}: no replica answered within {READ_DEADLINE:?}"
            ))),
        }
    }

    async fn on_replica_unbounded<T, F, Fut>(&self, g: &str, s: u32, call: F) -> std::result::Result<T, Status>
    where
        F: Fn(BiogateClient<Channel>, String) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        use futures_util::StreamExt;
        let local = keys::replica_name(g, s);
        let mut replicas = self.replicas_in_turn(g, s).into_iter();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut last = None;
        let start = |node: String, address: String| {
            let client = self.client(&address);
            let future = client.map(|c| call(c, local.clone()));
            async move {
                let began = Instant::now();
                let r = match future {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                (node, address, began.elapsed(), r)
            }
        };
        let mut asked: Vec<String> = Vec::new();
        match replicas.next() {
            Some((node, address)) => {
                asked.push(address.clone());
                in_flight.push(start(node, address));
            }
            None => {
                return Err(Status::unavailable(format!(
                    "shard {g}/{s} cannot be searched: {}",
                    self.why_unserved(g, s)
                )));
            }
        }
        let mut hedge_at = tokio::time::Instant::now() + self.hedge_delay(&local);
        loop {
            let more = replicas.len() > 0;
            tokio::select! {
                done = in_flight.next() => {
                    let Some((node, address, took, r)) = done else { break };
                    match r {
                        Ok(v) => {
                            self.record_latency(&local, took);
                            // The replicas asked before this one and still silent were
                            // slower (one asked after it merely had no time).
                            let winner = asked.iter().position(|a| *a == address).unwrap_or(asked.len());
                            for a in &asked[..winner] {
                                self.suspect(a);
                            }
                            return Ok(v);
                        }
                        Err(e) if worth_another_replica(&e) => {
                            if e.code() == Code::Unavailable {
                                self.suspect(&address);
                            }
                            tracing::debug!(gallery = %g, shard = s, %node, error = %e.message(), "trying another replica");
                            last = Some(format!("{node}: {}", e.message()));
                            asked.retain(|a| *a != address);
                            if let Some((node, address)) = replicas.next() {
                                asked.push(address.clone());
                                in_flight.push(start(node, address));
                                hedge_at = tokio::time::Instant::now() + self.hedge_delay(&local);
                            }
                        }
                        Err(e) => return Err(as_gallery(e, &local, g)),
                    }
                }
                _ = tokio::time::sleep_until(hedge_at), if more => {
                    if let Some((node, address)) = replicas.next() {
                        tracing::debug!(gallery = %g, shard = s, %node, "hedging a slow read to another replica");
                        asked.push(address.clone());
                        in_flight.push(start(node, address));
                        hedge_at = tokio::time::Instant::now() + self.hedge_delay(&local);
                    }
                }
            }
        }
        Err(Status::unavailable(format!(
            "shard {g}/{s} cannot be searched: {}",
            last.unwrap_or_else(|| self.why_unserved(g, s))
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::proto;

    #[tokio::test]
    async fn only_a_refused_connection_is_a_call_that_never_reached_its_node() {
        // Nothing listens on a port just freed: the client's connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let e = proto::biogate_client::BiogateClient::new(channel)
            .list_galleries(proto::ListGalleriesRequest {})
            .await
            .unwrap_err();
        assert!(never_reached(&e), "{e:?}");
        // A node's own answer, whatever its words, reached the node.
        let from_node = Status::unavailable(
            "etcd did not answer the commit of batch 3 (tried 127.0.0.1:2379: transport error: connect error: Connection refused)",
        );
        assert!(!never_reached(&from_node));
    }
}
