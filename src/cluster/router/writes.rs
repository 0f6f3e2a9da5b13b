//! Writes: Enroll (every message checked first, then each shard's subjects committed
//! by one of its replicas) and DeleteSubject.

use super::replicas::{as_gallery, never_reached};
use super::*;

impl Router {
    /// Enroll; `subjects` gets the ids asked for and `galleries` the galleries named,
    /// each once (for the audit line).
    pub(super) async fn routed_enroll(
        &self,
        request: Request<Streaming<proto::EnrollRequest>>,
        subjects: &mut Vec<String>,
        galleries: &mut Vec<String>,
    ) -> std::result::Result<proto::EnrollResponse, Status> {
        let auth = self.authorize(&request, Role::Enroll, "Enroll")?;
        let mut incoming = request.into_inner();
        // Check everything first: bad input changes nothing.
        let mut groups: BTreeMap<(String, u32), Vec<proto::EnrollRequest>> = BTreeMap::new();
        let mut index = 0usize;
        while let Some(mut m) = incoming.message().await? {
            let at = |s: Status| Status::new(s.code(), format!("message {index}: {}", s.message()));
            if !galleries.contains(&m.gallery) {
                galleries.push(m.gallery.clone());
            }
            let meta = self.meta(&m.gallery).map_err(at)?;
            m.subject = subject_field(&m.subject).map_err(at)?;
            subjects.push(m.subject.clone());
            if !m.expires_at.is_empty() {
                return Err(at(Status::invalid_argument(
                    "expires_at: a cluster's galleries do not expire subjects yet",
                )));
            }
            if m.templates.is_empty() {
                return Err(at(Status::invalid_argument("templates: no templates given")));
            }
            for (i, t) in m.templates.iter().enumerate() {
                decode_template(t, meta.dim, &format!("templates[{i}]")).map_err(at)?;
            }
            // Placed by its canonical id, which the node stores and checks.
            let s = meta.shard_of(&subject_field(&m.subject).map_err(at)?);
            groups.entry((m.gallery.clone(), s)).or_default().push(m);
            index += 1;
        }
        if groups.is_empty() {
            return Err(Status::invalid_argument("no enrollment messages"));
        }
        let sends = groups.into_iter().map(|((g, s), messages)| {
            let auth = auth.clone();
            async move {
                // A write goes to one replica; to another only if it never reached the
                // first (a write that reached a node may have been committed there).
                let local = keys::replica_name(&g, s);
                let count = messages.len();
                let mut last = None;
                let messages = Arc::new(messages);
                for (node, address) in self.writers(&g, s) {
                    // Each message is copied as it is sent (the list is kept for a
                    // retry on another replica).
                    let (messages, name) = (messages.clone(), local.clone());
                    let stream = tokio_stream::iter((0..count).map(move |i| proto::EnrollRequest {
                        gallery: name.clone(),
                        ..messages[i].clone()
                    }));
                    let mut client = self.client(&address)?;
                    let sent = client.enroll(with_authorization(stream, &auth));
                    let Ok(answer) = tokio::time::timeout(replicas::WRITE_DEADLINE, sent).await else {
                        return Err(Status::unknown(format!(
                            "shard {g}/{s} (node {node}, {count} subjects): no answer within {:?}; the enrollment may or may not have taken effect",
                            replicas::WRITE_DEADLINE
                        )));
                    };
                    match answer {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(e) if never_reached(&e) => {
                            self.suspect(&address);
                            last = Some(format!("{node}: {}", e.message()));
                        }
                        Err(e) => {
                            return Err(Status::new(
                                e.code(),
                                format!(
                                    "shard {g}/{s} (node {node}, {count} subjects): {}",
                                    as_gallery(e.clone(), &local, &g).message()
                                ),
                            ));
                        }
                    }
                }
                Err(Status::unavailable(format!(
                    "shard {g}/{s} takes no enrollments ({count} subjects not enrolled): {}",
                    last.unwrap_or_else(|| self.why_unserved(&g, s))
                )))
            }
        });
        let results = futures_util::future::join_all(sends).await;
        let mut done = proto::EnrollResponse::default();
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(r) => {
                    done.subjects += r.subjects;
                    done.templates += r.templates;
                }
                Err(e) => failures.push(e),
            }
        }
        if let Some(first) = failures.first() {
            let all: Vec<&str> = failures.iter().map(|f| f.message()).collect();
            return Err(Status::new(
                first.code(),
                format!(
                    "{}; {} subjects ({} templates) of other shards are enrolled",
                    all.join("; "),
                    done.subjects,
                    done.templates
                ),
            ));
        }
        Ok(done)
    }

    pub(super) async fn routed_delete_subject(
        &self,
        request: Request<proto::DeleteSubjectRequest>,
    ) -> std::result::Result<proto::DeleteSubjectResponse, Status> {
        let auth = self.authorize(&request, Role::Enroll, "DeleteSubject")?;
        let req = request.into_inner();
        let (_, s) = self.subject_shard(&req.gallery, &req.subject)?;
        let local = keys::replica_name(&req.gallery, s);
        let mut last = None;
        for (node, address) in self.writers(&req.gallery, s) {
            let r = with_authorization(
                proto::DeleteSubjectRequest {
                    gallery: local.clone(),
                    subject: req.subject.clone(),
                },
                &auth,
            );
            let mut client = self.client(&address)?;
            let sent = client.delete_subject(r);
            let Ok(answer) = tokio::time::timeout(replicas::WRITE_DEADLINE, sent).await else {
                return Err(Status::unknown(format!(
                    "shard {}/{s} (node {node}): no answer within {:?}; the deletion may or may not have taken effect",
                    req.gallery,
                    replicas::WRITE_DEADLINE
                )));
            };
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) if never_reached(&e) => {
                    self.suspect(&address);
                    last = Some(format!("{node}: {}", e.message()));
                }
                Err(e) => return Err(as_gallery(e, &local, &req.gallery)),
            }
        }
        Err(Status::unavailable(format!(
            "shard {}/{s} takes no deletions: {}",
            req.gallery,
            last.unwrap_or_else(|| self.why_unserved(&req.gallery, s))
        )))
    }
}
