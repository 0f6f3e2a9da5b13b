//! The router's audit trail: one line per call, refused or not, in its own
//! `--data-dir`'s `audit.log` (the server's format and writer, `server/audit.rs`): the
//! peer, the caller the token names ("-" when none is valid), the method and gallery,
//! the outcome and status code, and the subject ids (with scores) returned or
//! affected; never a token or a template. The nodes audit what reaches them as well.

use super::Router;
use crate::server::audit::AuditEntry;
use crate::server::proto;
use tonic::{Code, Request, Response, Status};

/// One call at the router: who, from where, what.
pub(super) struct RouterCall {
    method: &'static str,
    peer: String,
    caller: String,
    pub(super) gallery: String,
}

/// What a call returned or affected, for its audit line.
#[derive(Default)]
pub(super) struct Audited {
    pub subjects: Vec<(String, Option<f32>)>,
    pub count: usize,
    /// The call changed something on the nodes (they audited it): its answer stands
    /// even if the router's line cannot be written.
    pub took_effect: bool,
}

impl Audited {
    /// The candidates of search results.
    pub fn of_results<'a>(results: impl IntoIterator<Item = &'a proto::ProbeResult>, probes: usize) -> Audited {
        Audited {
            subjects: results
                .into_iter()
                .flat_map(|r| r.candidates.iter().map(|c| (c.subject.clone(), Some(c.score))))
                .collect(),
            count: probes,
            took_effect: false,
        }
    }
}

impl Router {
    /// Start auditing a call to `method` on `gallery`.
    pub(super) fn begin<T>(&self, request: &Request<T>, method: &'static str, gallery: &str) -> RouterCall {
        RouterCall {
            method,
            peer: request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            caller: self.auth.name_of(request).unwrap_or_else(|| "-".into()),
            gallery: gallery.to_owned(),
        }
    }

    /// End a call: write its line, then answer. A read whose line cannot be written is
    /// not answered (UNAVAILABLE, or RESOURCE_EXHAUSTED on a full disk); a write that
    /// took effect keeps its answer (logged as an error); a refusal keeps its status.
    pub(super) async fn finish<T>(
        &self,
        call: RouterCall,
        r: std::result::Result<(T, Audited), Status>,
    ) -> std::result::Result<Response<T>, Status> {
        let (r, audited) = match r {
            Ok((v, a)) => (Ok(v), a),
            Err(s) => (Err(s), Audited::default()),
        };
        self.finish_with(call, r, audited).await
    }

    /// [`Router::finish`] with what the call did audited whatever its outcome.
    pub(super) async fn finish_with<T>(
        &self,
        call: RouterCall,
        r: std::result::Result<T, Status>,
        audited: Audited,
    ) -> std::result::Result<Response<T>, Status> {
        let (code, error) = match &r {
            Ok(_) => (Code::Ok, None),
            Err(s) => (s.code(), Some(s.message().to_owned())),
        };
        let outcome = if code == Code::Ok {
            "ok".to_owned()
        } else {
            crate::server::status_code_name(code)
        };
        let written = self
            .audit
            .record(&AuditEntry {
                peer: &call.peer,
                caller: &call.caller,
                method: call.method,
                gallery: &call.gallery,
                phase: "done",
                outcome: &outcome,
                code: code as i32,
                error: error.as_deref(),
                subjects: audited.subjects.iter().map(|(s, v)| (s.as_str(), *v)).collect(),
                count: audited.count,
                rule: None,
            })
            .await;
        match (r, written) {
            (r, Ok(())) => r.map(Response::new),
            (Ok(v), Err(e)) if audited.took_effect => {
                tracing::error!(method = call.method, caller = %call.caller, gallery = %call.gallery, error = %e,
                    "router audit log: the line of a completed write could not be written (the nodes audited it)");
                Ok(Response::new(v))
            }
            (Ok(_), Err(e)) => Err(crate::server::service::audit_status("the answer is withheld", e)),
            (Err(s), Err(e)) => {
                tracing::error!(method = call.method, caller = %call.caller, error = %e, "router audit log: could not record a failed call");
                Err(s)
            }
        }
    }
}

/// The gallery, or galleries, a search names, for its line (as a server writes them).
pub(super) fn searched(gallery: &str, galleries: &[proto::GallerySearch]) -> String {
    if galleries.is_empty() {
        gallery.to_owned()
    } else {
        crate::server::service::gallery_names(galleries)
    }
}

impl Router {
    /// Audit one answered message of an IdentifyStream. If its line cannot be written,
    /// the message is answered UNAVAILABLE (or RESOURCE_EXHAUSTED) instead of its
    /// candidates, as a server withholds an unaudited answer.
    pub(super) async fn audit_stream_answer(
        &self,
        call: &RouterCall,
        m: &proto::IdentifyStreamRequest,
        out: proto::IdentifyStreamResponse,
    ) -> proto::IdentifyStreamResponse {
        let results = out
            .result
            .iter()
            .chain(out.galleries.iter().filter_map(|g| g.result.as_ref()));
        let audited = Audited::of_results(results, 1);
        let code = Code::from_i32(out.error_code);
        let outcome = if code == Code::Ok {
            "ok".to_owned()
        } else {
            crate::server::status_code_name(code)
        };
        let written = self
            .audit
            .record(&AuditEntry {
                peer: &call.peer,
                caller: &call.caller,
                method: call.method,
                gallery: &searched(&m.gallery, &m.galleries),
                phase: "done",
                outcome: &outcome,
                code: out.error_code,
                error: (code != Code::Ok).then_some(out.error_message.as_str()),
                subjects: audited.subjects.iter().map(|(s, v)| (s.as_str(), *v)).collect(),
                count: 1,
                rule: None,
            })
            .await;
        match written {
            Ok(()) => out,
            Err(e) if code == Code::Ok => {
                let s = crate::server::service::audit_status("the answer is withheld", e);
                proto::IdentifyStreamResponse {
                    request_id: out.request_id,
                    error_code: s.code() as i32,
                    error_message: s.message().to_owned(),
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::error!(method = call.method, caller = %call.caller, error = %e, "router audit log: could not record a failed message");
                out
            }
        }
    }
}
