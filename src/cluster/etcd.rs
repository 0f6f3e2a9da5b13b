//! A small client for etcd's v3 API (the calls the cluster makes), over the same tonic
//! as the server. Each call goes to one member, and to the next on a transport error
//! or timeout, so losing one member changes nothing. Without a quorum etcd cannot
//! answer a write or a linearizable read; the call then fails after `CALL_TIMEOUT` with
//! `Error::Unavailable` naming the members tried, or, for a write that a member may
//! have received and not answered, `Error::OutcomeUnknown`: it may still take effect,
//! and only reading the key tells. Writes ask etcd to refuse at once when a member has
//! no leader ("hasleader", as etcd's own client does), a refusal that proves nothing
//! was proposed.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Code generated from proto/etcd/etcd.proto.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::request_op::Request as Op;
use pb::watch_client::WatchClient;
pub use pb::{KeyValue, TxnRequest, TxnResponse};

/// How long one member gets to answer one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to an etcd cluster (its members' client URLs).
pub struct Etcd {
    members: Vec<(String, Channel)>,
    /// The member tried first (the last one that answered).
    preferred: AtomicUsize,
}

/// The first key after every key that starts with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn unavailable(what: &str, tried: &[String]) -> Error {
    Error::Unavailable(format!(
        "etcd did not answer {what} (tried {}; without a quorum it cannot)",
        tried.join(", ")
    ))
}

/// A write whose request a member may have received without answering.
fn unknown(what: &str, tried: &[String]) -> Error {
    Error::OutcomeUnknown(format!(
        "etcd did not answer {what}, which may still take effect (tried {})",
        tried.join(", ")
    ))
}

/// Whether a failed call proves the request never reached etcd's log: the connection
/// was refused (the typed cause), or the member said it has no leader (etcd's refusal
/// of a request that requires one, before proposing it).
fn never_proposed(s: &tonic::Status) -> bool {
    if s.message() == "etcdserver: no leader" {
        return true;
    }
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A request refused at once by a member without a leader (a write, a linearizable read).
fn requiring_leader<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
    r
}

/// What a call does: one whose repetition is harmless (a read, a lease call) is retried
/// freely; a write's lost answer is an unknown outcome.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Repeatable,
    Write,
}

impl Etcd {
    /// Channels to every member (connected on first use). URLs like `http://127.0.0.1:2379`.
    pub fn connect(urls: &[String]) -> Result<Etcd> {
        if urls.is_empty() {
            return Err(Error::Config("--etcd: no member URL given".into()));
        }
        let mut members = Vec::with_capacity(urls.len());
        for url in urls {
            let url = if url.contains("://") {
                url.clone()
            } else {
                format!("http://{url}")
            };
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Config(format!("--etcd {url:?}: {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .timeout(CALL_TIMEOUT)
                .connect_lazy();
            members.push((url, channel));
        }
        Ok(Etcd {
            members,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The members' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.0.clone()).collect()
    }

    /// Run `call` on the preferred member, then on each other one, until one answers.
    /// A status that etcd itself gave (not a transport failure) is returned as is. A
    /// write that some member may have received unanswered fails as an unknown outcome.
    async fn on_members<T, F, Fut>(&self, what: &str, kind: Kind, call: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut tried = Vec::new();
        let mut maybe_received = false;
        for i in 0..n {
            let at = (first + i) % n;
            let (url, channel) = &self.members[at];
            // Named by host and port in messages (a URL would read like a path).
            let url = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            match tokio::time::timeout(CALL_TIMEOUT, call(channel.clone())).await {
                Ok(Ok(v)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(s)) if is_transport(&s) => {
                    maybe_received |= !never_proposed(&s);
                    tried.push(format!("{url}: {}", s.message()));
                }
                Ok(Err(s)) => {
                    tried.push(format!("{url} refused it: {}", s.message()));
                    // An earlier member may have taken the write without answering.
                    if kind == Kind::Write && maybe_received {
                        return Err(unknown(what, &tried));
                    }
                    return Err(Error::Unavailable(format!(
                        "etcd {url} refused {what}: {}",
                        s.message()
                    )));
                }
                Err(_) => {
                    maybe_received = true;
                    tried.push(format!("{url}: no answer in {CALL_TIMEOUT:?}"));
                }
            }
        }
        if kind == Kind::Write && maybe_received {
            Err(unknown(what, &tried))
        } else {
            Err(unavailable(what, &tried))
        }
    }

    /// The value at `key`, with its revisions.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let req = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        // A member without a leader cannot answer a linearizable read: it refuses at once
        // (instead of holding the read until its timeout), and the next member is asked.
        let r = self
            .on_members(&format!("a read of {key}"), Kind::Repeatable, |c| {
                let req = requiring_leader(req.clone());
                async move { KvClient::new(c).range(req).await }
            })
            .await?;
        Ok(r.into_inner().kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let req = pb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        let r = self
            .on_members(&format!("a read of {prefix}*"), Kind::Repeatable, |c| {
                let req = requiring_leader(req.clone());
                async move { KvClient::new(c).range(req).await }
            })
            .await?
            .into_inner();
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// Set `key` (under `lease`, 0 for none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        let req = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        };
        self.on_members(&format!("a write of {key}"), Kind::Write, |c| {
            let req = requiring_leader(req.clone());
            async move { KvClient::new(c).put(req).await }
        })
        .await?;
        Ok(())
    }

    /// Delete `key`.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let req = pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        };
        self.on_members(&format!("a deletion of {key}"), Kind::Write, |c| {
            let req = requiring_leader(req.clone());
            async move { KvClient::new(c).delete_range(req).await }
        })
        .await?;
        Ok(())
    }

    /// An atomic transaction (compare, then one list of operations or the other).
    pub async fn txn(&self, what: &str, req: TxnRequest) -> Result<TxnResponse> {
        let r = self
            .on_members(what, Kind::Write, |c| {
                let req = requiring_leader(req.clone());
                async move { KvClient::new(c).txn(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// A lease of `ttl_s` seconds; its id.
    pub async fn grant_lease(&self, ttl_s: i64) -> Result<i64> {
        let req = pb::LeaseGrantRequest { ttl: ttl_s, id: 0 };
        let r = self
            .on_members("a lease grant", Kind::Repeatable, |c| async move {
                LeaseClient::new(c).lease_grant(req).await
            })
            .await?
            .into_inner();
        if !r.error.is_empty() {
            return Err(Error::Unavailable(format!("etcd refused a lease: {}", r.error)));
        }
        Ok(r.id)
    }

    /// Renew `lease` once; its remaining time to live (0: it has expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64> {
        self.on_members("a lease keep-alive", Kind::Repeatable, |c| async move {
            let mut client = LeaseClient::new(c);
            let once = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease });
            let mut answers = client.lease_keep_alive(once).await?.into_inner();
            match answers.message().await? {
                Some(a) => Ok(a.ttl),
                None => Err(tonic::Status::unavailable("keep-alive stream closed")),
            }
        })
        .await
    }

    /// Revoke `lease` (its keys go at once).
    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.on_members("a lease revocation", Kind::Repeatable, |c| async move {
            LeaseClient::new(c)
                .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                .await
        })
        .await?;
        Ok(())
    }

    /// Watch every key under `prefix` from `start_revision`: the stream of changes.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<tonic::Streaming<pb::WatchResponse>> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix),
                start_revision,
                progress_notify: true,
            })),
        };
        self.on_members(&format!("a watch of {prefix}*"), Kind::Repeatable, |c| {
            let create = create.clone();
            async move {
                // The request stream stays open (a closed one cancels the watch).
                let requests = tokio_stream::once(create).chain(tokio_stream::pending());
                // Ended by etcd when the member loses its leader (no quorum): the
                // view then knows it no longer follows the cluster.
                Ok(WatchClient::new(c)
                    .watch(requiring_leader(requests))
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

use tokio_stream::StreamExt;

/// Whether a status means "this member could not be reached or did not answer"
/// (another member may), rather than an answer from etcd.
fn is_transport(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    ) || s.message().contains("leader")
}

/// Compare: `key` does not exist.
pub fn absent(key: &str) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::CreateRevision(0)),
    }
}

/// Compare: `key` exists.
pub fn present(key: &str) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Greater as i32,
        target: CompareTarget::Version as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::Version(0)),
    }
}

/// Compare: `key` was last written at `revision` (0: it does not exist).
pub fn unchanged_since(key: &str, revision: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::ModRevision(revision)),
    }
}

/// Operation: set `key` to `value` (under `lease`, 0 for none).
pub fn put_op(key: &str, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        })),
    }
}

/// Operation: delete `key` alone.
pub fn delete_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        })),
    }
}

/// Operation: delete the keys from `from` up to (not including) `to`.
pub fn delete_range_op(from: &str, to: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key: from.as_bytes().to_vec(),
            range_end: to.as_bytes().to_vec(),
        })),
    }
}

/// Operation: delete every key under `prefix`, which must end in `/` (a prefix without
/// it would also take the keys of every name it begins: `flight` and `flight-2`).
pub fn delete_prefix_op(prefix: &str) -> pb::RequestOp {
    debug_assert!(
        prefix.ends_with('/'),
        "a prefix deletion of {prefix:?} would reach its siblings"
    );
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
