//! Which replica of a shard the router asks: a random serving one first, suspected
//! nodes last; reads hedged to the next replica when the first is slow; writes moved
//! to another replica only when the call provably never reached the node.

use super::{Authorization, Router, with_authorization};
use crate::cluster::keys;
use crate::cluster::node::reads;
use crate::server::proto::biogate_client::BiogateClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Whether trying another replica may help.
pub(super) fn worth_another_replica(s: &Status) -> bool {
    !matches!(
        s.code(),
        Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied | Code::OutOfRange
    )
}

/// Put the gallery's name back where a node named its replica (`g.s3` -> `g`).
pub(super) fn as_gallery(s: Status, local: &str, g: &str) -> Status {
    Status::new(s.code(), s.message().replace(local, g))
}

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
/// How long a read waits for etcd's answer to what it must not miss.
const ETCD_READ: Duration = Duration::from_secs(2);
/// How long reads go on from the last known state, without asking etcd, after a read
/// found it unreachable while the view had lost it too.
const UNREACHABLE_FOR: Duration = Duration::from_secs(1);
/// How long a read waits for the router's view to catch up with what it read in etcd.
const VIEW_CATCH_UP: Duration = Duration::from_secs(2);

/// A read sent to one replica: its name on its node, and what the node checks before
/// it answers (the gallery it belongs to, the batch it has applied: node/reads.rs).
#[derive(Clone)]
pub(super) struct ReplicaRead {
    pub local: String,
    created_ms: i64,
    applied: u64,
}

impl ReplicaRead {
    /// `message` for this replica, with the caller's token.
    pub(super) fn request<T>(&self, message: T, auth: &Authorization) -> Request<T> {
        let mut r = with_authorization(message, auth);
        reads::expect(r.metadata_mut(), self.created_ms, self.applied);
        r
    }
}

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
    /// Before a read of `galleries`: read from etcd (a quorum read) what a read must
    /// not miss, each gallery's catalogue key and its shards' visible batches, and wait
    /// until this router's view has them: a gallery just made or dropped through
    /// another router, a batch just acknowledged. The replicas are then chosen from
    /// the view, and each checks that it is of that gallery and at that batch before
    /// it answers (node/reads.rs). A gallery etcd does not have is NOT_FOUND; etcd not
    /// answering while the view follows it is UNAVAILABLE.
    ///
    /// The view losing etcd (its member died, say) does not skip this: the read goes to
    /// the other members, and waits for the view to follow again and catch up (the
    /// nemesis saw a router whose watched member was killed answer, in the moment
    /// before its view followed another, from a replica of a gallery dropped and made
    /// again: a stale answer while the other members held a quorum). Only when etcd
    /// does not answer either (no quorum this router can reach) do reads go on from the
    /// last known state, for [`UNREACHABLE_FOR`] before etcd is asked again: without a
    /// quorum nothing can be acknowledged either. (A router cut off from a quorum that
    /// others still reach can then answer from an old state: RELIABILITY.md.)
    pub(super) async fn current_view(&self, galleries: &[&str]) -> std::result::Result<(), Status> {
        for g in galleries {
            // A name no gallery can have is not worth a read of etcd.
            if g.len() > keys::MAX_GALLERY_NAME || crate::server::registry::check_gallery_name(g).is_err() {
                return Err(Status::not_found(format!("gallery: {g:?} does not exist")));
            }
        }
        let following = self.view.connected();
        if !following && self.etcd_unreachable_lately() {
            return Ok(());
        }
        let reads = galleries.iter().map(|g| async move {
            let (key, prefix) = (keys::gallery_key(g), keys::visible_prefix(g));
            let (meta, visible) = tokio::try_join!(self.etcd.get(&key), self.etcd.get_prefix(&prefix))?;
            let meta = meta
                .map(|kv| keys::decode::<keys::GalleryMeta>(&key, &kv.value))
                .transpose()?;
            let mut marks = Vec::new();
            for kv in visible.0 {
                let mark = String::from_utf8_lossy(&kv.key).into_owned();
                let Some(s) = keys::parts(&mark, &prefix).first().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                marks.push((s, keys::decode::<u64>(&mark, &kv.value)?));
            }
            crate::Result::Ok((g.to_string(), meta.map(|m| m.created_ms), marks))
        });
        // A view that lost etcd may have lost its member: time for every member to be
        // asked in turn (each gets CALL_TIMEOUT), so that one that hangs is not taken for
        // etcd being unreachable.
        let budget = if following {
            ETCD_READ
        } else {
            ETCD_READ * self.etcd.urls().len() as u32
        };
        let read = tokio::time::timeout(budget, futures_util::future::try_join_all(reads)).await;
        let now_in_etcd = match read {
            Ok(Ok(r)) => r,
            // No member answered (each unreachable, or without a leader), or not in time.
            Ok(Err(crate::Error::Unavailable(_))) | Err(_) if !following => {
                *self.etcd_unreachable_at.lock().expect("etcd_unreachable_at lock") =
                    Some((Instant::now(), self.view.follows()));
                return Ok(());
            }
            Ok(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "the read could not be checked against etcd: {e}"
                )));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the read could not be checked against etcd: no answer in {ETCD_READ:?}"
                )));
            }
        };
        if let Some((g, _, _)) = now_in_etcd.iter().find(|(_, created, _)| created.is_none()) {
            return Err(Status::not_found(format!("gallery: {g:?} does not exist")));
        }
        let caught_up = |st: &keys::ClusterState| {
            now_in_etcd.iter().all(|(g, created, marks)| {
                st.galleries.get(g).map(|m| m.created_ms) == *created
                    && marks
                        .iter()
                        .all(|(s, seq)| st.visible.get(&(g.clone(), *s)).is_some_and(|v| v.0 >= *seq))
            })
        };
        if self.view.wait_for(Instant::now() + VIEW_CATCH_UP, caught_up).await {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "the router's view of {} has not caught up with etcd in {VIEW_CATCH_UP:?}",
                galleries.join(", ")
            )))
        }
    }

    /// Whether a read found etcd unreachable, with the view lost too, in the last
    /// [`UNREACHABLE_FOR`], and the view has not followed etcd again since.
    fn etcd_unreachable_lately(&self) -> bool {
        self.etcd_unreachable_at
            .lock()
            .expect("etcd_unreachable_at lock")
            .is_some_and(|(at, follows)| at.elapsed() < UNREACHABLE_FOR && follows == self.view.follows())
    }

    /// The serving replicas of a shard, starting at a random one (each shard of each
    /// search chosen on its own: a counter shared by all shards would give back-to-back
    /// searches of a two-shard gallery the same replicas); nodes suspected lately last.
    pub(super) fn replicas_in_turn(&self, g: &str, s: u32) -> Vec<(String, String)> {
        self.in_turn(self.state(|st| st.serving(g, s)))
    }

    /// `serving` from a random one, nodes suspected lately last.
    fn in_turn(&self, mut serving: Vec<(String, String)>) -> Vec<(String, String)> {
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
    /// `created_ms` names the gallery the read is of (the one whose shard count and
    /// dimension the caller used): a gallery of the name made since is not read.
    pub(super) async fn on_replica<T, F, Fut>(
        &self,
        g: &str,
        created_ms: i64,
        s: u32,
        call: F,
    ) -> std::result::Result<T, Status>
    where
        F: Fn(BiogateClient<Channel>, ReplicaRead) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let read = tokio::time::timeout(READ_DEADLINE, self.on_replica_unbounded(g, created_ms, s, call));
        match read.await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(format!(
                "shard {g}/{s}: no replica answered within {READ_DEADLINE:?}"
            ))),
        }
    }

    async fn on_replica_unbounded<T, F, Fut>(
        &self,
        g: &str,
        created_ms: i64,
        s: u32,
        call: F,
    ) -> std::result::Result<T, Status>
    where
        F: Fn(BiogateClient<Channel>, ReplicaRead) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        use futures_util::StreamExt;
        let local = keys::replica_name(g, s);
        let (replicas, read) = self.state(|st| {
            let read = st
                .galleries
                .get(g)
                .filter(|meta| meta.created_ms == created_ms)
                .map(|_| ReplicaRead {
                    local: local.clone(),
                    created_ms,
                    applied: st.visible.get(&(g.to_owned(), s)).map_or(0, |v| v.0),
                });
            (st.serving(g, s), read)
        });
        let Some(read) = read else {
            return Err(Status::unavailable(format!(
                "gallery {g:?} was dropped, or dropped and made again, while it was read"
            )));
        };
        let mut replicas = self.in_turn(replicas).into_iter();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut last = None;
        let start = |node: String, address: String| {
            let client = self.client(&address);
            let future = client.map(|c| call(c, read.clone()));
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
