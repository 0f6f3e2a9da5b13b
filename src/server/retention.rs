//! The gallery retention purge: every `retention.purge_interval_s`, galleries past
//! their expiry are dropped, and subjects past theirs are deleted through the log and
//! their rows removed (the segments holding them rewritten, the log sealed and pruned). Each purge writes an audit line (gallery, how
//! many, the rule; never a subject or a template). Until a purge reaches them, expired
//! galleries and subjects are already never answered (expiry.rs).

use super::audit::{AuditEntry, AuditLog};
use super::config::RetentionConfig;
use super::registry::Registry;
use crate::time_text::{format_time, now_ms};
use std::sync::Arc;
use std::time::Duration;

/// What one gallery's purge did.
struct Purged {
    gallery: String,
    method: &'static str,
    count: usize,
    rule: String,
    error: Option<String>,
}

/// Purge every gallery once at `now` (blocking: writes, fsyncs, compactions).
fn purge_all(registry: &Registry, rules: &RetentionConfig, now: i64) -> Vec<Purged> {
    let mut done = Vec::new();
    for entry in registry.all() {
        let Ok(snapshot) = entry.snapshot() else { continue };
        let name = entry.name.clone();
        let expiry = snapshot.expiry();
        if expiry.gallery_expired(now) {
            let rule = format!(
                "gallery expires_at {}",
                format_time(expiry.gallery_ms.unwrap_or_default())
            );
            let count = snapshot.live_subjects();
            drop(snapshot);
            let error = registry.drop_gallery(&name).err().map(|e| e.to_string());
            done.push(Purged {
                gallery: name,
                method: "purge_expired_gallery",
                count,
                rule,
                error,
            });
            continue;
        }
        drop(snapshot);
        if !entry.expired_pending(now) {
            continue;
        }
        let rule = match rules
            .rule_for(&name)
            .and_then(|r| Some((r.subject_retention.as_ref()?, &r.galleries)))
        {
            Some((keep, pattern)) => format!("subject expires_at, or subject_retention {keep} (rule {pattern:?})"),
            None => "subject expires_at".to_owned(),
        };
        let purged = entry.write(|g| g.purge_expired(now));
        let (count, error) = match purged {
            Ok(deleted) => {
                // The rows themselves go now, not at some later merge: the log sealed,
                // and only the segments that hold deleted rows rewritten.
                let removed = registry
                    .remove_deleted(&name)
                    .err()
                    .map(|e| format!("removing the purged rows: {e}"));
                (deleted.len(), removed)
            }
            Err(e) => (0, Some(e.to_string())),
        };
        done.push(Purged {
            gallery: name,
            method: "purge_expired_subjects",
            count,
            rule,
            error,
        });
    }
    done
}

/// Runs the purge every `rules.purge_interval_s` while the server runs.
pub fn start(registry: Arc<Registry>, rules: RetentionConfig, audit: AuditLog) -> super::BackgroundTask {
    if rules.purge_interval_s == 0 {
        return super::BackgroundTask::none();
    }
    let every = Duration::from_secs(rules.purge_interval_s);
    super::BackgroundTask::spawn(async move {
        loop {
            let (r, c) = (registry.clone(), rules.clone());
            let purged = tokio::task::spawn_blocking(move || purge_all(&r, &c, now_ms()))
                .await
                .unwrap_or_default();
            for p in purged {
                let entry = AuditEntry {
                    peer: "-",
                    caller: "biogate",
                    method: p.method,
                    gallery: &p.gallery,
                    phase: "done",
                    outcome: if p.error.is_some() { "INTERNAL" } else { "ok" },
                    code: if p.error.is_some() {
                        tonic::Code::Internal as i32
                    } else {
                        0
                    },
                    error: p.error.as_deref(),
                    subjects: Vec::new(),
                    count: p.count,
                    rule: Some(&p.rule),
                };
                match &p.error {
                    Some(e) => tracing::error!(gallery = %p.gallery, error = %e, "retention purge failed"),
                    None => {
                        tracing::info!(gallery = %p.gallery, purge = p.method, count = p.count, rule = %p.rule, "retention purge")
                    }
                }
                if let Err(e) = audit.record(&entry).await {
                    tracing::error!(gallery = %p.gallery, error = %e, "audit log: could not record a retention purge");
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}
