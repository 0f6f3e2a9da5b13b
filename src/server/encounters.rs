//! The server's side of the encounter log (crate::encounters): checking a request's
//! encounter context before anything is searched, turning answers into encounter
//! rows, and the report RPCs' conversions.

use super::proto;
use super::service::status_of;
use crate::encounters::{Decision, Direction, Encounter, Overstay, StatsRow};
use crate::engine::ProbeResult;
use crate::time_text::{format_time, now_ms, parse_time};
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::Status;

/// How far in the server's future a capture time may be (clocks at gates drift).
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// Longest location, gate, device or request id.
const MAX_FIELD_CHARS: usize = 256;

/// A checked encounter context.
#[derive(Clone, Debug)]
pub struct Context {
    pub location: String,
    pub gate: String,
    pub direction: Direction,
    pub device: String,
    pub time_ms: i64,
}

fn check_text(value: &str, field: &str) -> Result<(), Status> {
    if value.chars().count() > MAX_FIELD_CHARS || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field}: longer than {MAX_FIELD_CHARS} characters or holds control characters"
        )));
    }
    Ok(())
}

/// Check a request's context (`field` names it in errors: "encounter").
pub fn check_context(c: &proto::EncounterContext, field: &str) -> Result<Context, Status> {
    if c.location.is_empty() {
        return Err(Status::invalid_argument(format!("{field}.location: empty")));
    }
    check_text(&c.location, &format!("{field}.location"))?;
    check_text(&c.gate, &format!("{field}.gate"))?;
    check_text(&c.device, &format!("{field}.device"))?;
    let direction = Direction::parse(&c.direction, &format!("{field}.direction")).map_err(status_of)?;
    let now = now_ms();
    let time_ms = if c.capture_time.is_empty() {
        now
    } else {
        let t = parse_time(&c.capture_time, &format!("{field}.capture_time")).map_err(status_of)?;
        if t > now + CLOCK_SKEW_MS {
            return Err(Status::invalid_argument(format!(
                "{field}.capture_time: {} is in the future (the server's time is {})",
                format_time(t),
                format_time(now)
            )));
        }
        t
    };
    Ok(Context {
        location: c.location.clone(),
        gate: c.gate.clone(),
        direction,
        device: c.device.clone(),
        time_ms,
    })
}

/// A request id for a request that brought none.
pub fn new_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{:x}", now_ms(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Check a client's request id.
pub fn check_request_id(id: &str, field: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: empty (encounters are recorded under it)"
        )));
    }
    check_text(id, field)
}

/// The encounters of one gallery's answers (one per probe).
pub fn rows_of(
    context: &Context,
    request_id: &str,
    gallery: &str,
    threshold: Option<f32>,
    results: &[ProbeResult],
) -> Vec<Encounter> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let best = r.candidates.first();
            Encounter {
                time_ms: context.time_ms,
                request_id: request_id.to_owned(),
                probe: i as u32,
                gallery: gallery.to_owned(),
                location: context.location.clone(),
                gate: context.gate.clone(),
                direction: context.direction,
                device: context.device.clone(),
                decision: Decision::of(best.map(|c| c.score), threshold),
                subject: best.map(|c| c.subject.clone()),
                score: best.map(|c| c.score),
                threshold,
            }
        })
        .collect()
}

pub fn encounter_to_proto(e: &Encounter) -> proto::Encounter {
    proto::Encounter {
        time: format_time(e.time_ms),
        request_id: e.request_id.clone(),
        probe: e.probe,
        gallery: e.gallery.clone(),
        location: e.location.clone(),
        gate: e.gate.clone(),
        direction: e.direction.as_str().to_owned(),
        device: e.device.clone(),
        decision: e.decision.as_str().to_owned(),
        subject: e.subject.clone().unwrap_or_default(),
        score: e.score,
        threshold: e.threshold,
    }
}

pub fn overstay_to_proto(o: &Overstay) -> proto::Overstay {
    proto::Overstay {
        subject: o.subject.clone(),
        entry: format_time(o.entry_ms),
        exit: o.exit_ms.map(format_time).unwrap_or_default(),
        stay_days: o.stay_ms as f64 / 86_400_000.0,
    }
}

pub fn stats_to_proto(s: &StatsRow) -> proto::EncounterStats {
    proto::EncounterStats {
        gallery: s.gallery.clone(),
        key: s.key.clone(),
        probes: s.probes,
        matched: s.matched,
        match_rate: s.match_rate(),
    }
}

/// Applies the encounter retention rule every `every` while the server runs, with an
/// audit line per purge (how many, the rule; never a traveller).
pub fn start_retention(
    dir: std::path::PathBuf,
    rule: crate::encounters::Retention,
    every: std::time::Duration,
    audit: super::audit::AuditLog,
) -> super::BackgroundTask {
    if every.is_zero() {
        return super::BackgroundTask::none();
    }
    let rule_text = format!(
        "keep {}, overstayers {}, max stay {}",
        crate::time_text::format_duration(rule.keep_ms),
        crate::time_text::format_duration(rule.keep_overstayers_ms),
        crate::time_text::format_duration(rule.max_stay_ms)
    );
    super::BackgroundTask::spawn(async move {
        loop {
            let d = dir.clone();
            let purged =
                tokio::task::spawn_blocking(move || crate::encounters::EncounterStore::open(&d)?.purge(rule, now_ms()))
                    .await;
            let (outcome, error, removed) = match purged {
                Ok(Ok(r)) => ("ok", None, r.removed as usize),
                Ok(Err(e)) => ("INTERNAL", Some(e.to_string()), 0),
                Err(e) => ("INTERNAL", Some(e.to_string()), 0),
            };
            if let Some(e) = &error {
                tracing::error!(error = %e, "the encounter retention purge failed");
            }
            if removed > 0 || error.is_some() {
                let entry = super::audit::AuditEntry {
                    peer: "-",
                    caller: "biogate",
                    method: "purge_encounters",
                    gallery: "",
                    phase: "done",
                    outcome,
                    code: if error.is_some() {
                        tonic::Code::Internal as i32
                    } else {
                        0
                    },
                    error: error.as_deref(),
                    subjects: Vec::new(),
                    count: removed,
                    rule: Some(&rule_text),
                };
                if let Err(e) = audit.record(&entry).await {
                    tracing::error!(error = %e, removed, "audit log: could not record an encounter purge");
                }
                tracing::info!(removed, rule = %rule_text, "encounter retention purge");
            }
            tokio::time::sleep(every).await;
        }
    })
}
