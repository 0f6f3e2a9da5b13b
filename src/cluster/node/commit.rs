//! The write path: a batch committed to its shard's log in etcd (read back when an
//! answer is lost), applied here, and made visible (ARCHITECTURE.md, "The commit order").

use super::{APPLY_WAIT, Node, Replica, VISIBLE_WAIT};
use crate::cluster::batch::{self, Op};
use crate::cluster::etcd;
use crate::cluster::keys::ClusterState;
use crate::cluster::keys::{self, LogEntry};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Node {
    /// Commit `ops` to the log of the shard whose replica is `local`, and wait until
    /// they are visible (the module's doc gives the order). Returns the batch's number.
    pub async fn commit(&self, local: &str, ops: Vec<Op>) -> Result<u64> {
        let r = self.replica_of_local(local).ok_or_else(|| {
            Error::Unavailable(format!(
                "{local}: this node does not hold that replica now (ask the router)"
            ))
        })?;
        let meta = self.view.read(|st| st.galleries.get(&r.gallery).cloned());
        let meta = meta.ok_or_else(|| Error::NotFound(format!("gallery {:?}", r.gallery)))?;
        for (i, op) in ops.iter().enumerate() {
            let owner = meta.shard_of(op.subject());
            if owner != r.shard {
                return Err(Error::invalid(format!(
                    "operation {i}: subject {:?} belongs to shard {owner} of {:?}, not {}",
                    op.subject(),
                    r.gallery,
                    r.shard
                )));
            }
        }
        let _one_at_a_time = r.commit.lock().await;
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        let object = format!(
            "{}/{}-{}-{n}.bgb",
            keys::batch_prefix(&r.gallery, r.created_ms, r.shard),
            self.name,
            crate::time_text::now_ms()
        );
        self.objects.put(&object, batch::encode(&ops)).await?;
        let entry = LogEntry {
            object,
            ops: ops.len() as u32,
            node: self.name.clone(),
            gallery_created_ms: r.created_ms,
        };
        let value = keys::encode(&entry);
        // Where this node's last commit to the shard went: each attempt asks it to be
        // unchanged and moves it, so once one attempt took effect (at whatever number)
        // no other can, and reading it back says exactly where (a log key can be gone
        // by then: the nemesis saw a batch applied, its key deleted after a checkpoint
        // and the commit, its answer lost, taking it for another writer's and
        // committing it again under the next number).
        let last_key = keys::committed_key(&r.gallery, r.shard, &self.name);
        let seq = loop {
            let head = self
                .view
                .read(|st| st.committed.get(&(r.gallery.clone(), r.shard)).copied().unwrap_or(0));
            self.wait_applied(&r, head, APPLY_WAIT).await?;
            self.check_deletions(&r, &ops)?;
            let seq = head + 1;
            let key = keys::log_key(&r.gallery, r.shard, seq);
            // Known from this replica's last commit (or refusal) here; read when not.
            let known = *r.last_commit.lock().expect("last commit lock");
            let last_revision = match known {
                Some(revision) => revision,
                None => {
                    let revision = self.etcd.get(&last_key).await?.map_or(0, |kv| kv.mod_revision);
                    *r.last_commit.lock().expect("last commit lock") = Some(revision);
                    revision
                }
            };
            // The previous batch must still be there (or, for the first, nothing must
            // have been acknowledged): a writer whose view lags behind a deletion of the
            // log's head can never commit a number already passed.
            let follows = if seq > 1 {
                etcd::present(&keys::log_key(&r.gallery, r.shard, seq - 1))
            } else {
                etcd::absent(&keys::visible_key(&r.gallery, r.shard))
            };
            let mark = keys::encode(&keys::LastCommit {
                object: entry.object.clone(),
                seq,
            });
            let txn = etcd::TxnRequest {
                compare: vec![
                    etcd::absent(&key),
                    follows,
                    self.same_gallery(&r)?,
                    etcd::unchanged_since(&last_key, last_revision),
                ],
                success: vec![etcd::put_op(&key, value.clone(), 0), etcd::put_op(&last_key, mark, 0)],
                failure: Vec::new(),
            };
            let what = format!("the commit of batch {seq} of {local}");
            let mut answer = self.etcd.txn(&what, txn.clone()).await;
            if answer.as_ref().is_ok_and(|t| t.succeeded) && lose_the_answer(&ops) {
                // Fault injection: the answer lost, and the transaction sent again once
                // the batch's key is gone (applied, and deleted after a checkpoint), as
                // the etcd client does on the next member after a timeout.
                let gone_by = Instant::now() + Duration::from_secs(20);
                while Instant::now() < gone_by && self.etcd.get(&key).await.ok().flatten().is_some() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answer = self.etcd.txn(&what, txn).await;
            }
            // Unknown until an answer says.
            *r.last_commit.lock().expect("last commit lock") = None;
            match answer {
                Ok(t) if t.succeeded => {
                    *r.last_commit.lock().expect("last commit lock") = t.header.map(|h| h.revision);
                    break seq;
                }
                // A failed compare can be this very commit, retried on another member
                // after its first answer was lost: the last-commit key says.
                Ok(_) => {
                    let now = self.etcd.get(&last_key).await.map_err(|e| {
                        Error::OutcomeUnknown(format!(
                            "the commit of batch {seq} of {local} was refused on a retry, and reading it back failed ({e}): it may or may not be committed"
                        ))
                    })?;
                    *r.last_commit.lock().expect("last commit lock") =
                        Some(now.as_ref().map_or(0, |kv| kv.mod_revision));
                    if let Some(at) = now.and_then(|kv| self.commit_of(&kv.value, &entry.object)) {
                        break at;
                    }
                    // Not committed, and no attempt of it can be any more (each asked
                    // for the last-commit key as it was). Dropped (or made again) under
                    // it: the compare said so.
                    self.same_gallery(&r)?;
                    // Another writer took `seq`: wait to see it, then go again.
                    let deadline = Instant::now() + APPLY_WAIT;
                    let g = r.gallery.clone();
                    let s = r.shard;
                    self.view
                        .wait_for(deadline, |st| {
                            st.committed.get(&(g.clone(), s)).copied().unwrap_or(0) >= seq
                        })
                        .await;
                }
                Err(e) => {
                    // Did it commit before the answer was lost? The last-commit key
                    // says if it did; only another batch at the number proves it did
                    // not (the transaction asks the key to be absent): absent, it may
                    // still commit, and that is unknown.
                    if let Ok(Some(kv)) = self.etcd.get(&last_key).await
                        && let Some(at) = self.commit_of(&kv.value, &entry.object)
                    {
                        break at;
                    }
                    return match self.etcd.get(&key).await {
                        Ok(Some(kv)) if kv.value == value => break seq,
                        Ok(Some(_)) => Err(Error::Unavailable(format!(
                            "{e}; the batch was not committed (another took number {seq})"
                        ))),
                        _ => Err(Error::OutcomeUnknown(format!(
                            "{e}; batch {seq} of {local} may or may not be committed: read before writing again"
                        ))),
                    };
                }
            }
        };
        // Committed: it takes effect whatever happens now. What is left is making it
        // visible (searches must find it once it is acknowledged); if that fails, the
        // answer is neither OK (a search could miss it) nor UNAVAILABLE (a client would
        // send it again): the write happened, its visibility is unknown.
        let committed = |e: Error| {
            Error::OutcomeUnknown(format!(
                "batch {seq} of {local} is committed and will be applied, but is not yet visible to every search: {e}"
            ))
        };
        self.wait_applied(&r, seq, APPLY_WAIT).await.map_err(committed)?;
        // Every live replica in the map, for a while; then whoever is behind is not
        // searched until it catches up.
        let (g, s) = (r.gallery.clone(), r.shard);
        self.view
            .wait_for(Instant::now() + VISIBLE_WAIT, |st| all_applied(st, &g, s, seq))
            .await;
        let paused = crate::cluster::fault_delay("BIOGATE_FAULT_SLOW_VISIBLE_MS");
        if !paused.is_zero() {
            tokio::time::sleep(paused).await;
        }
        self.raise_visible(&r, seq).await.map_err(committed)?;
        Ok(seq)
    }

    /// The number `object` was committed at, if the last-commit key's `value` names it.
    fn commit_of(&self, value: &[u8], object: &str) -> Option<u64> {
        serde_json::from_slice::<keys::LastCommit>(value)
            .ok()
            .filter(|c| c.object == object)
            .map(|c| c.seq)
    }

    pub(super) fn check_deletions(&self, r: &Replica, ops: &[Op]) -> Result<()> {
        let snapshot = r.entry.snapshot()?;
        for op in ops {
            if let Op::Delete { subject } = op
                && !snapshot.has_subject(subject)
            {
                return Err(Error::NotFound(format!(
                    "subject: {subject:?} is not enrolled in {:?}",
                    r.gallery
                )));
            }
        }
        Ok(())
    }

    pub(super) async fn wait_applied(&self, r: &Replica, seq: u64, wait: Duration) -> Result<()> {
        let mut rx = r.applied.subscribe();
        match tokio::time::timeout(wait, rx.wait_for(|a| *a >= seq)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "replica {}.s{} has applied batch {} of {seq} after {wait:?}",
                r.gallery,
                r.shard,
                *r.applied.borrow()
            ))),
        }
    }

    /// Raise the visible mark of `r`'s shard to `seq`, only while `r`'s gallery is the
    /// one in etcd: a commit of a gallery dropped under it (and perhaps made again
    /// under its name) must never leave a mark behind, or the next gallery's first
    /// commit (which asks for no mark) and its replicas (which wait for the mark's
    /// batch) would wait forever.
    async fn raise_visible(&self, r: &Replica, seq: u64) -> Result<()> {
        let (g, s) = (r.gallery.as_str(), r.shard);
        let key = keys::visible_key(g, s);
        let give_up = Instant::now() + APPLY_WAIT;
        loop {
            if Instant::now() >= give_up {
                return Err(Error::Unavailable(format!(
                    "{key} was not raised to {seq} in {APPLY_WAIT:?}"
                )));
            }
            let (now, revision) = self
                .view
                .read(|st| st.visible.get(&(g.to_owned(), s)).copied().unwrap_or((0, 0)));
            if now >= seq {
                return Ok(());
            }
            let same_gallery = self.same_gallery(r)?;
            let txn = etcd::TxnRequest {
                compare: vec![etcd::unchanged_since(&key, revision), same_gallery],
                success: vec![etcd::put_op(&key, keys::encode(&seq), 0)],
                failure: Vec::new(),
            };
            if self.etcd.txn(&format!("raising {key}"), txn).await?.succeeded {
                return Ok(());
            }
            // Raised by another writer, or the gallery dropped: wait to see which.
            let gallery_revision = self.view.read(|st| st.gallery_revisions.get(g).copied());
            let deadline = Instant::now() + Duration::from_secs(2);
            self.view
                .wait_for(deadline, |st| {
                    st.visible.get(&(g.to_owned(), s)).map_or(0, |v| v.1) != revision
                        || st.gallery_revisions.get(g).copied() != gallery_revision
                })
                .await;
        }
    }
}

/// Fault injection for tests: `BIOGATE_FAULT_LOSE_COMMIT_ANSWER=SUBJECT` loses the
/// answer of each commit whose first operation names SUBJECT (commit.rs sends it again
/// once its key is gone).
fn lose_the_answer(ops: &[Op]) -> bool {
    std::env::var("BIOGATE_FAULT_LOSE_COMMIT_ANSWER").is_ok_and(|s| ops.first().is_some_and(|op| op.subject() == s))
}

/// Whether every replica that serves searches (live, in the map, caught up to the
/// visible batch) has applied `seq`. Replicas still catching up are not waited for:
/// they are not searched until they pass the visible batch.
fn all_applied(st: &ClusterState, g: &str, s: u32, seq: u64) -> bool {
    let applied = st.applied.get(&(g.to_owned(), s));
    st.serving(g, s)
        .iter()
        .all(|(n, _)| applied.and_then(|a| a.get(n)).is_some_and(|&a| a >= seq))
}
