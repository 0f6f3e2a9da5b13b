//! The encounter log of an entry/exit programme: one row per probe and gallery of every
//! Identify that carried an encounter context (where, which gate, entry / exit /
//! transit, which device, when), with the decision, the best candidate and its score,
//! the threshold and the request id. Never a template.
//!
//! Rows live in an embedded SQLite database (`DATA/encounters.sqlite`, WAL mode,
//! `synchronous = FULL`). The server's [`EncounterLog`] writer thread group-commits:
//! every row waiting goes into one transaction, one WAL fsync, and only then are the
//! requests answered, so an answered request's encounters are durable. A request id
//! is its caller's own (rows are keyed by caller, request id, probe and gallery, so
//! two callers' ids never collide), and one id names one request: the first use
//! records a fingerprint of what was asked ([`RequestClaim`]); a retry with the same
//! content is recorded once, and the same id with other content is refused
//! ([`RecordError::Reused`]) instead of silently dropping its encounters.
//!
//! [`EncounterStore`] answers the programme's questions (a traveller's history, the
//! overstays as of a time, match rates) and applies the retention rule
//! ([`Retention`]): rows older than `keep` go, an overstayer's after `keep_overstayers`.

use crate::error::{Error, Result};
use crate::time_text::{format_day, format_time};
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// The database's file name in the data directory.
pub const ENCOUNTERS_FILE: &str = "encounters.sqlite";

/// Which way the traveller was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Entry,
    Exit,
    Transit,
}

impl Direction {
    /// Parse `entry`, `exit` or `transit`; `field` names the input in the error.
    pub fn parse(text: &str, field: &str) -> Result<Direction> {
        match text {
            "entry" => Ok(Direction::Entry),
            "exit" => Ok(Direction::Exit),
            "transit" => Ok(Direction::Transit),
            _ => Err(Error::invalid(format!(
                "{field}: {:?} is not a direction (entry, exit or transit)",
                text.chars().take(64).collect::<String>()
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Entry => "entry",
            Direction::Exit => "exit",
            Direction::Transit => "transit",
        }
    }
}

/// What the search decided for one probe in one gallery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The best candidate scored at or above the threshold.
    Matched,
    /// A threshold was given and nothing reached it.
    NoMatch,
    /// No threshold was given: candidates only, no decision.
    Undecided,
}

impl Decision {
    /// The decision for a best score (if any) against a threshold (if any).
    pub fn of(best: Option<f32>, threshold: Option<f32>) -> Decision {
        match (best, threshold) {
            (_, None) => Decision::Undecided,
            (Some(s), Some(t)) if s >= t => Decision::Matched,
            _ => Decision::NoMatch,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Matched => "matched",
            Decision::NoMatch => "no_match",
            Decision::Undecided => "undecided",
        }
    }

    fn parse(text: &str) -> Decision {
        match text {
            "matched" => Decision::Matched,
            "no_match" => Decision::NoMatch,
            _ => Decision::Undecided,
        }
    }
}

/// One probe searched in one gallery at a border point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Encounter {
    /// Capture time, milliseconds since the epoch (UTC).
    pub time_ms: i64,
    pub request_id: String,
    /// Index of the probe in its request.
    pub probe: u32,
    pub gallery: String,
    pub location: String,
    pub gate: String,
    pub direction: Direction,
    pub device: String,
    pub decision: Decision,
    /// The best candidate, if any (matched or not).
    pub subject: Option<String>,
    pub score: Option<f32>,
    pub threshold: Option<f32>,
}

/// A subject whose last entry has no exit within the allowed stay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overstay {
    pub subject: String,
    /// The last entry (ms since the epoch).
    pub entry_ms: i64,
    /// The first exit after it, if any (then the overstay is over).
    pub exit_ms: Option<i64>,
    /// How long the stay lasted (to the exit, or to the report's time).
    pub stay_ms: i64,
}

/// Probes and matches of one gallery (and one location, gate or day).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsRow {
    pub gallery: String,
    /// The location, gate or day (UTC), or "all".
    pub key: String,
    pub probes: u64,
    pub matched: u64,
}

impl StatsRow {
    pub fn match_rate(&self) -> f64 {
        if self.probes == 0 {
            0.0
        } else {
            self.matched as f64 / self.probes as f64
        }
    }
}

/// How `stats` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsBy {
    All,
    Location,
    Gate,
    Day,
}

impl StatsBy {
    pub fn parse(text: &str, field: &str) -> Result<StatsBy> {
        match text {
            "" | "all" => Ok(StatsBy::All),
            "location" => Ok(StatsBy::Location),
            "gate" => Ok(StatsBy::Gate),
            "day" => Ok(StatsBy::Day),
            _ => Err(Error::invalid(format!(
                "{field}: {text:?} is not location, gate or day"
            ))),
        }
    }
}

/// How long encounters are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Every encounter is kept this long (ms).
    pub keep_ms: i64,
    /// An overstayer's encounters are kept this long (ms; at least `keep_ms`).
    pub keep_overstayers_ms: i64,
    /// The stay beyond which a traveller is an overstayer (ms).
    pub max_stay_ms: i64,
}

/// What a purge removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Encounters deleted.
    pub removed: u64,
    /// Encounters older than `keep` kept because their subject overstayed.
    pub kept_for_overstayers: u64,
}

/// The schema (version 1: caller-scoped request ids and their claims).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS encounters (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    caller      TEXT NOT NULL DEFAULT '',
    request_id  TEXT NOT NULL,
    probe       INTEGER NOT NULL,
    gallery     TEXT NOT NULL,
    location    TEXT NOT NULL,
    gate        TEXT NOT NULL,
    direction   TEXT NOT NULL,
    device      TEXT NOT NULL,
    decision    TEXT NOT NULL,
    subject     TEXT,
    score       REAL,
    threshold   REAL,
    UNIQUE (caller, request_id, probe, gallery)
);
CREATE INDEX IF NOT EXISTS encounters_matched
    ON encounters (subject, time_ms, direction) WHERE decision = 'matched';
CREATE TABLE IF NOT EXISTS requests (
    caller      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    time_ms     INTEGER NOT NULL,
    PRIMARY KEY (caller, request_id)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

/// A database made before version 1 (rows keyed by request id alone, no claims):
/// its rows are copied into the version 1 table with no caller, in one transaction.
const MIGRATE_FROM_0: &str = "
BEGIN IMMEDIATE;
ALTER TABLE encounters RENAME TO encounters_v0;
DROP INDEX IF EXISTS encounters_matched;
CREATE TABLE encounters (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    caller      TEXT NOT NULL DEFAULT '',
    request_id  TEXT NOT NULL,
    probe       INTEGER NOT NULL,
    gallery     TEXT NOT NULL,
    location    TEXT NOT NULL,
    gate        TEXT NOT NULL,
    direction   TEXT NOT NULL,
    device      TEXT NOT NULL,
    decision    TEXT NOT NULL,
    subject     TEXT,
    score       REAL,
    threshold   REAL,
    UNIQUE (caller, request_id, probe, gallery)
);
INSERT INTO encounters (id, time_ms, request_id, probe, gallery, location, gate, direction, device, decision,
                        subject, score, threshold)
    SELECT id, time_ms, request_id, probe, gallery, location, gate, direction, device, decision, subject, score,
           threshold FROM encounters_v0;
DROP TABLE encounters_v0;
PRAGMA user_version = 1;
COMMIT;
";

fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::Internal(format!("encounter database {}: {e}", path.display()))
}

fn open_connection(path: &Path, create: bool) -> Result<Connection> {
    let flags = if create {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "no encounter database at {} (the server makes it when it starts)",
                path.display()
            )));
        }
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sql_error(path))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql_error(path))?;
    // WAL: readers (reports) never block the writer; FULL: every commit fsyncs the WAL.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_error(path))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_error(path))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_error(path))?;
    let old_table = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'encounters'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql_error(path))?
        > 0;
    if version == 0 && old_table {
        conn.execute_batch(MIGRATE_FROM_0).map_err(sql_error(path))?;
        tracing::info!(path = %path.display(), "encounter database upgraded to caller-scoped request ids");
    }
    conn.execute_batch(SCHEMA).map_err(sql_error(path))?;
    Ok(conn)
}

/// Who asked for a request's encounters to be recorded, under which id, and a
/// fingerprint of what was asked (the galleries, probes, k, thresholds and context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestClaim {
    /// The caller's name (its token's), whose namespace the id is in.
    pub caller: String,
    pub request_id: String,
    /// Equal for a retry of the same request, different for anything else.
    pub fingerprint: String,
}

/// Why encounters were not recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The caller used this request id before for a different request: nothing was
    /// recorded for this one.
    Reused { request_id: String },
    /// The database failed (the message says how).
    Failed(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Reused { request_id } => write!(
                f,
                "request_id {:?} was already used by this caller for a different request",
                request_id.chars().take(64).collect::<String>()
            ),
            RecordError::Failed(why) => f.write_str(why),
        }
    }
}

/// A 128-bit fingerprint (two FNV-1a hashes) of `bytes`, as hex: stable across
/// versions and platforms, as a value kept in a database must be.
pub fn fingerprint(bytes: &[u8]) -> String {
    let fnv = |basis: u64| {
        bytes
            .iter()
            .fold(basis, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    };
    format!("{:016x}{:016x}", fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142))
}

/// Insert each request's rows (each under its claim, if it has one) in one
/// transaction. Returns, per request, whether it was recorded: false when its claim
/// names an id its caller used before for something else (its rows are skipped).
fn insert(conn: &mut Connection, requests: &[(Option<&RequestClaim>, &[Encounter])]) -> rusqlite::Result<Vec<bool>> {
    let tx = conn.transaction()?;
    let mut recorded = Vec::with_capacity(requests.len());
    {
        let mut claim_st = tx.prepare_cached(
            "INSERT OR IGNORE INTO requests (caller, request_id, fingerprint, time_ms) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut claimed_st =
            tx.prepare_cached("SELECT fingerprint FROM requests WHERE caller = ?1 AND request_id = ?2")?;
        let mut st = tx.prepare_cached(
            "INSERT OR IGNORE INTO encounters (time_ms, caller, request_id, probe, gallery, location, gate, \
             direction, device, decision, subject, score, threshold) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for (claim, rows) in requests {
            let caller = claim.map_or("", |c| c.caller.as_str());
            if let Some(c) = claim {
                let time_ms = rows.first().map_or(0, |e| e.time_ms);
                claim_st.execute(params![c.caller, c.request_id, c.fingerprint, time_ms])?;
                let first: String = claimed_st.query_row(params![c.caller, c.request_id], |r| r.get(0))?;
                if first != c.fingerprint {
                    recorded.push(false);
                    continue;
                }
            }
            recorded.push(true);
            for e in rows.iter() {
                st.execute(params![
                    e.time_ms,
                    caller,
                    e.request_id,
                    e.probe,
                    e.gallery,
                    e.location,
                    e.gate,
                    e.direction.as_str(),
                    e.device,
                    e.decision.as_str(),
                    e.subject,
                    e.score.map(f64::from),
                    e.threshold.map(f64::from),
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(recorded)
}

type Waiting = (
    Option<RequestClaim>,
    Vec<Encounter>,
    tokio::sync::oneshot::Sender<std::result::Result<(), RecordError>>,
);

/// The server's handle on the writer thread.
#[derive(Clone)]
pub struct EncounterLog {
    tx: mpsc::Sender<Waiting>,
    path: PathBuf,
}

impl EncounterLog {
    /// Open (create) `dir/encounters.sqlite` and start the writer thread.
    pub fn open(dir: &Path) -> Result<EncounterLog> {
        let path = dir.join(ENCOUNTERS_FILE);
        let mut conn = open_connection(&path, true)?;
        let (tx, rx) = mpsc::channel::<Waiting>();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("biogate-encounters".into())
            .spawn(move || {
                // Group commit: whatever is waiting goes in one transaction.
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        group.push(more);
                    }
                    let requests: Vec<(Option<&RequestClaim>, &[Encounter])> = group
                        .iter()
                        .map(|(claim, rows, _)| (claim.as_ref(), rows.as_slice()))
                        .collect();
                    let result = insert(&mut conn, &requests);
                    if let Err(e) = &result {
                        let rows: usize = group.iter().map(|(_, rows, _)| rows.len()).sum();
                        tracing::error!(path = %thread_path.display(), error = %e, rows, "recording encounters failed");
                    }
                    for (i, (claim, _, done)) in group.into_iter().enumerate() {
                        let answer = match &result {
                            Ok(recorded) if recorded[i] => Ok(()),
                            Ok(_) => Err(RecordError::Reused {
                                request_id: claim.map(|c| c.request_id).unwrap_or_default(),
                            }),
                            Err(e) => Err(RecordError::Failed(e.to_string())),
                        };
                        let _ = done.send(answer);
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("starting the encounter thread: {e}")))?;
        Ok(EncounterLog { tx, path })
    }

    /// Where the database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record one request's encounters under `claim`; returns once they are durable
    /// (or why they are not: the id reused for another request, or a failure).
    pub async fn record(&self, claim: RequestClaim, rows: Vec<Encounter>) -> std::result::Result<(), RecordError> {
        if rows.is_empty() {
            return Ok(());
        }
        let stopped = || RecordError::Failed("the encounter writer stopped".to_owned());
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx.send((Some(claim), rows, done)).map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

/// Reports and retention over an encounter database.
pub struct EncounterStore {
    conn: Connection,
    path: PathBuf,
}

impl EncounterStore {
    /// Open the database of the data directory `dir` (it must exist).
    pub fn open(dir: &Path) -> Result<EncounterStore> {
        Self::open_file(&dir.join(ENCOUNTERS_FILE), false)
    }

    /// Open (or create) the database file `path`.
    pub fn open_file(path: &Path, create: bool) -> Result<EncounterStore> {
        Ok(EncounterStore {
            conn: open_connection(path, create)?,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        sql_error(&self.path)
    }

    /// Insert rows directly, with no caller or claim (imports, tests and benchmarks;
    /// the server uses `EncounterLog`).
    pub fn insert(&mut self, rows: &[Encounter]) -> Result<()> {
        insert(&mut self.conn, &[(None, rows)])
            .map(drop)
            .map_err(sql_error(&self.path))
    }

    /// Encounters in the database.
    pub fn count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM encounters", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// A traveller's matched encounters (entries, exits, transits), oldest first.
    pub fn history(&self, subject: &str) -> Result<Vec<Encounter>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT time_ms, request_id, probe, gallery, location, gate, direction, device, decision, subject, \
                 score, threshold FROM encounters WHERE subject = ?1 AND decision = 'matched' \
                 ORDER BY time_ms, request_id, probe, gallery",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([subject], |r| {
                Ok(Encounter {
                    time_ms: r.get(0)?,
                    request_id: r.get(1)?,
                    probe: r.get(2)?,
                    gallery: r.get(3)?,
                    location: r.get(4)?,
                    gate: r.get(5)?,
                    direction: Direction::parse(&r.get::<_, String>(6)?, "direction").unwrap_or(Direction::Transit),
                    device: r.get(7)?,
                    decision: Decision::parse(&r.get::<_, String>(8)?),
                    subject: r.get(9)?,
                    score: r.get::<_, Option<f64>>(10)?.map(|v| v as f32),
                    threshold: r.get::<_, Option<f64>>(11)?.map(|v| v as f32),
                })
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// Subjects whose last matched entry up to `as_of_ms` has no matched exit after it
    /// within `max_stay_ms`: still in (and past the limit at `as_of_ms`), or left late.
    /// An exit exactly on the limit is within it; an exit with no entry before it, and
    /// entries before the last, are ignored. Sorted by subject.
    pub fn overstays(&self, max_stay_ms: i64, as_of_ms: i64) -> Result<Vec<Overstay>> {
        let mut out = Vec::new();
        self.for_each_stay(as_of_ms, |subject, entry, exit| {
            let stay = exit.unwrap_or(as_of_ms) - entry;
            if stay > max_stay_ms {
                out.push(Overstay {
                    subject: subject.to_owned(),
                    entry_ms: entry,
                    exit_ms: exit,
                    stay_ms: stay,
                });
            }
        })?;
        Ok(out)
    }

    /// Calls `f(subject, last entry, first exit after it)` for every subject with a
    /// matched entry up to `as_of_ms`, in one pass over the matched-encounter index.
    fn for_each_stay(&self, as_of_ms: i64, mut f: impl FnMut(&str, i64, Option<i64>)) -> Result<()> {
        let mut st = self
            .conn
            .prepare(
                "SELECT subject, time_ms, direction FROM encounters INDEXED BY encounters_matched \
                 WHERE decision = 'matched' AND subject IS NOT NULL AND time_ms <= ?1 \
                 ORDER BY subject, time_ms, direction",
            )
            .map_err(self.err())?;
        let mut rows = st.query([as_of_ms]).map_err(self.err())?;
        let mut current: Option<String> = None;
        let (mut entry, mut exit): (Option<i64>, Option<i64>) = (None, None);
        while let Some(r) = rows.next().map_err(self.err())? {
            let subject = r.get_ref(0).map_err(self.err())?.as_str().unwrap_or_default();
            if current.as_deref() != Some(subject) {
                if let (Some(s), Some(e)) = (&current, entry) {
                    f(s, e, exit);
                }
                current = Some(subject.to_owned());
                (entry, exit) = (None, None);
            }
            let time: i64 = r.get(1).map_err(self.err())?;
            match r.get_ref(2).map_err(self.err())?.as_str().unwrap_or_default() {
                "entry" => (entry, exit) = (Some(time), None),
                "exit" => {
                    if let Some(e) = entry
                        && exit.is_none()
                        && time > e
                    {
                        exit = Some(time);
                    }
                }
                _ => {}
            }
        }
        if let (Some(s), Some(e)) = (&current, entry) {
            f(s, e, exit);
        }
        Ok(())
    }

    /// Probes and matches per gallery, and per location, gate or UTC day.
    pub fn stats(&self, by: StatsBy) -> Result<Vec<StatsRow>> {
        let key = match by {
            StatsBy::All => "'all'",
            StatsBy::Location => "location",
            StatsBy::Gate => "gate",
            StatsBy::Day => "time_ms / 86400000",
        };
        let sql = format!(
            "SELECT gallery, {key}, COUNT(*), SUM(decision = 'matched') FROM encounters \
             GROUP BY gallery, {key} ORDER BY gallery, {key}"
        );
        let mut st = self.conn.prepare(&sql).map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                let key = match by {
                    StatsBy::Day => format_day(r.get::<_, i64>(1)? * 86_400_000),
                    _ => r.get::<_, String>(1)?,
                };
                Ok(StatsRow {
                    gallery: r.get(0)?,
                    key,
                    probes: r.get::<_, i64>(2)? as u64,
                    matched: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// Apply the retention rule at `now_ms`: delete encounters older than `keep`,
    /// except those of subjects who overstayed (as of now), which go after
    /// `keep_overstayers`. One transaction: a crash leaves all or none of it.
    pub fn purge(&mut self, rule: Retention, now_ms: i64) -> Result<PurgeReport> {
        let mut overstayers = Vec::new();
        self.for_each_stay(now_ms, |subject, entry, exit| {
            if exit.unwrap_or(now_ms) - entry > rule.max_stay_ms {
                overstayers.push(subject.to_owned());
            }
        })?;
        let cut = now_ms - rule.keep_ms;
        let cut_overstayers = now_ms - rule.keep_overstayers_ms.max(rule.keep_ms);
        let path = self.path.clone();
        let err = sql_error(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS overstayers (subject TEXT PRIMARY KEY); DELETE FROM overstayers;",
        )
        .map_err(&err)?;
        {
            let mut st = tx
                .prepare("INSERT OR IGNORE INTO overstayers (subject) VALUES (?1)")
                .map_err(&err)?;
            for s in &overstayers {
                st.execute([s]).map_err(&err)?;
            }
        }
        let removed_plain = tx
            .execute(
                "DELETE FROM encounters WHERE time_ms < ?1 AND (subject IS NULL OR decision != 'matched' \
                 OR subject NOT IN (SELECT subject FROM overstayers))",
                [cut],
            )
            .map_err(&err)?;
        let removed_overstayers = tx
            .execute("DELETE FROM encounters WHERE time_ms < ?1", [cut_overstayers])
            .map_err(&err)?;
        let kept: i64 = tx
            .query_row("SELECT COUNT(*) FROM encounters WHERE time_ms < ?1", [cut], |r| {
                r.get(0)
            })
            .map_err(&err)?;
        // A request's claim goes with the encounters it covered (a claim outlives them
        // only while an overstayer's are kept).
        tx.execute("DELETE FROM requests WHERE time_ms < ?1", [cut_overstayers])
            .map_err(&err)?;
        tx.execute_batch("DROP TABLE overstayers;").map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(PurgeReport {
            removed: (removed_plain + removed_overstayers) as u64,
            kept_for_overstayers: kept as u64,
        })
    }
}

/// How reports are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format> {
        match text {
            "table" => Ok(Format::Table),
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            _ => Err(Error::invalid(format!("--format: {text:?} is not table, jsonl or csv"))),
        }
    }
}

/// A report: named columns and rows of text cells.
pub struct Report {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Report {
    pub fn history(rows: &[Encounter]) -> Report {
        let opt = |v: Option<f32>| v.map(|s| format!("{s:.6}")).unwrap_or_default();
        Report {
            columns: vec![
                "time",
                "direction",
                "location",
                "gate",
                "device",
                "gallery",
                "subject",
                "score",
                "threshold",
                "request_id",
                "probe",
            ],
            rows: rows
                .iter()
                .map(|e| {
                    vec![
                        format_time(e.time_ms),
                        e.direction.as_str().to_owned(),
                        e.location.clone(),
                        e.gate.clone(),
                        e.device.clone(),
                        e.gallery.clone(),
                        e.subject.clone().unwrap_or_default(),
                        opt(e.score),
                        opt(e.threshold),
                        e.request_id.clone(),
                        e.probe.to_string(),
                    ]
                })
                .collect(),
        }
    }

    pub fn overstays(rows: &[Overstay]) -> Report {
        Report {
            columns: vec!["subject", "entry", "exit", "stay_days"],
            rows: rows
                .iter()
                .map(|o| {
                    vec![
                        o.subject.clone(),
                        format_time(o.entry_ms),
                        o.exit_ms.map(format_time).unwrap_or_default(),
                        format!("{:.2}", o.stay_ms as f64 / 86_400_000.0),
                    ]
                })
                .collect(),
        }
    }

    pub fn stats(rows: &[StatsRow], by: StatsBy) -> Report {
        let key = match by {
            StatsBy::All => "scope",
            StatsBy::Location => "location",
            StatsBy::Gate => "gate",
            StatsBy::Day => "day",
        };
        Report {
            columns: vec!["gallery", key, "probes", "matched", "match_rate"],
            rows: rows
                .iter()
                .map(|s| {
                    vec![
                        s.gallery.clone(),
                        s.key.clone(),
                        s.probes.to_string(),
                        s.matched.to_string(),
                        format!("{:.4}", s.match_rate()),
                    ]
                })
                .collect(),
        }
    }

    /// The report as text: an aligned table, JSON lines (one object per row, every
    /// value a string) or CSV with a header (RFC 4180 quoting).
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        match format {
            Format::Table => {
                let widths: Vec<usize> = (0..self.columns.len())
                    .map(|c| {
                        self.rows
                            .iter()
                            .map(|r| r[c].chars().count())
                            .chain([self.columns[c].len()])
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |cells: Vec<&str>| {
                    let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                    padded.join("  ").trim_end().to_owned() + "\n"
                };
                out.push_str(&line(self.columns.clone()));
                for r in &self.rows {
                    out.push_str(&line(r.iter().map(String::as_str).collect()));
                }
            }
            Format::Jsonl => {
                for r in &self.rows {
                    let object: serde_json::Map<String, serde_json::Value> = self
                        .columns
                        .iter()
                        .zip(r)
                        .map(|(c, v)| ((*c).to_owned(), serde_json::Value::String(v.clone())))
                        .collect();
                    out.push_str(&serde_json::Value::Object(object).to_string());
                    out.push('\n');
                }
            }
            Format::Csv => {
                let cell = |v: &str| {
                    if v.contains([',', '"', '\n', '\r']) {
                        format!("\"{}\"", v.replace('"', "\"\""))
                    } else {
                        v.to_owned()
                    }
                };
                out.push_str(&self.columns.join(","));
                out.push('\n');
                for r in &self.rows {
                    out.push_str(&r.iter().map(|v| cell(v)).collect::<Vec<_>>().join(","));
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// `biogate bench --encounter-reports N`: a database in `dir` of `n` encounters (a
/// traveller every 4: entry, exit within 60 days, entry again, and an exit for 9 in
/// 10 of them; 5% of probes unmatched), then the overstay report, a history and the
/// stats, each timed. Returns (what, seconds).
pub fn bench_reports(n: usize, dir: &Path) -> Result<Vec<(String, f64)>> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let mut store = EncounterStore::open_file(&dir.join(ENCOUNTERS_FILE), true)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let day = 86_400_000i64;
    let start = 20_000 * day;
    let mut timed = Vec::new();
    let t = std::time::Instant::now();
    let mut batch = Vec::with_capacity(100_000);
    let mut made = 0usize;
    let mut traveller = 0usize;
    while made < n {
        let subject = format!("t{traveller:09}");
        let first = start + rng.random_range(0..3 * 365 * day);
        let out1 = first + rng.random_range(1..60 * day);
        let second = out1 + rng.random_range(1..200 * day);
        let mut times = vec![
            (Direction::Entry, first),
            (Direction::Exit, out1),
            (Direction::Entry, second),
        ];
        if rng.random_range(0..10) != 0 {
            times.push((Direction::Exit, second + rng.random_range(1..120 * day)));
        }
        for (i, (direction, time_ms)) in times.into_iter().enumerate() {
            if made == n {
                break;
            }
            let matched = rng.random_range(0..20) != 0;
            batch.push(Encounter {
                time_ms,
                request_id: format!("{traveller}-{i}"),
                probe: 0,
                gallery: "flight".into(),
                location: "CDG".into(),
                gate: format!("G{}", traveller % 40),
                direction,
                device: "cam".into(),
                decision: if matched { Decision::Matched } else { Decision::NoMatch },
                subject: Some(subject.clone()),
                score: Some(0.8),
                threshold: Some(0.5),
            });
            made += 1;
        }
        traveller += 1;
        if batch.len() >= 100_000 || made == n {
            store.insert(&batch)?;
            batch.clear();
        }
    }
    timed.push((
        format!("insert {n} encounters ({traveller} travellers)"),
        t.elapsed().as_secs_f64(),
    ));
    let as_of = start + 4 * 365 * day;
    let t = std::time::Instant::now();
    let over = store.overstays(90 * day, as_of)?;
    timed.push((
        format!("overstays --max-stay 90d ({} found)", over.len()),
        t.elapsed().as_secs_f64(),
    ));
    let t = std::time::Instant::now();
    let h = store.history(&format!("t{:09}", traveller / 2))?;
    timed.push((
        format!("history of one traveller ({} rows)", h.len()),
        t.elapsed().as_secs_f64(),
    ));
    let t = std::time::Instant::now();
    let s = store.stats(StatsBy::Gate)?;
    timed.push((format!("stats --by gate ({} rows)", s.len()), t.elapsed().as_secs_f64()));
    Ok(timed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn at(subject: &str, direction: Direction, time_ms: i64, matched: bool) -> Encounter {
        Encounter {
            time_ms,
            request_id: format!("{subject}-{time_ms}-{}", direction.as_str()),
            probe: 0,
            gallery: "flight".into(),
            location: "CDG".into(),
            gate: "A1".into(),
            direction,
            device: "cam".into(),
            decision: if matched { Decision::Matched } else { Decision::NoMatch },
            subject: Some(subject.into()),
            score: Some(0.9),
            threshold: Some(0.5),
        }
    }

    /// The overstay report on a hand-built table: every edge case the issue names.
    #[test]
    fn overstays_on_a_hand_built_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EncounterStore::open_file(&dir.path().join("e.sqlite"), true).unwrap();
        let (max, t0) = (90 * DAY, 1_000 * DAY);
        use Direction::*;
        store
            .insert(&[
                // In, out within the limit: no overstay.
                at("ok", Entry, t0, true),
                at("ok", Exit, t0 + 10 * DAY, true),
                // Exit exactly on the limit: within it.
                at("boundary", Entry, t0, true),
                at("boundary", Exit, t0 + max, true),
                // One millisecond later: overstayed, and left.
                at("late", Entry, t0, true),
                at("late", Exit, t0 + max + 1, true),
                // Exit without entry: nothing to report.
                at("exit-only", Exit, t0, true),
                // Two entries: the last counts (the first alone would be an overstay).
                at("twice", Entry, t0 - 200 * DAY, true),
                at("twice", Entry, t0 + 50 * DAY, true),
                // Still in, past the limit at the report's time.
                at("inside", Entry, t0, true),
                // A transit and an unmatched exit do not close a stay.
                at("inside", Transit, t0 + DAY, true),
                at("inside", Exit, t0 + 2 * DAY, false),
                // Entered, left, entered again recently: the old stay is closed.
                at("back", Entry, t0 - 400 * DAY, true),
                at("back", Exit, t0 - 300 * DAY, true),
                at("back", Entry, t0 + 60 * DAY, true),
                // An exit at the same instant as the entry is not after it.
                at("same", Entry, t0, true),
                at("same", Exit, t0, true),
            ])
            .unwrap();
        let as_of = t0 + 120 * DAY;
        let got = store.overstays(max, as_of).unwrap();
        let view: Vec<(&str, i64, Option<i64>)> = got
            .iter()
            .map(|o| (o.subject.as_str(), o.entry_ms, o.exit_ms))
            .collect();
        assert_eq!(
            view,
            [
                ("inside", t0, None),
                ("late", t0, Some(t0 + max + 1)),
                ("same", t0, None)
            ]
        );
        assert_eq!(got[0].stay_ms, 120 * DAY);
        // As of the limit itself, nobody still inside is over it yet.
        let on_limit: Vec<String> = store
            .overstays(max, t0 + max)
            .unwrap()
            .into_iter()
            .map(|o| o.subject)
            .collect();
        assert_eq!(on_limit, Vec::<String>::new());
    }

    #[test]
    fn history_stats_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EncounterStore::open_file(&dir.path().join("e.sqlite"), true).unwrap();
        use Direction::*;
        let now = 5_000 * DAY;
        let rule = Retention {
            keep_ms: 3 * 365 * DAY,
            keep_overstayers_ms: 5 * 365 * DAY,
            max_stay_ms: 90 * DAY,
        };
        let old = now - 4 * 365 * DAY;
        let mut miss = at("nobody", Entry, old, false);
        miss.subject = None;
        store
            .insert(&[
                at("a", Entry, old, true),
                at("a", Exit, old + DAY, true),
                at("over", Entry, old, true),
                at("b", Entry, now - DAY, true),
                miss,
                at("ancient", Entry, now - 6 * 365 * DAY, true),
            ])
            .unwrap();
        // The same request id again is recorded once.
        store.insert(&[at("b", Entry, now - DAY, true)]).unwrap();
        assert_eq!(store.count().unwrap(), 6);
        let h = store.history("a").unwrap();
        assert_eq!(h.iter().map(|e| e.direction).collect::<Vec<_>>(), [Entry, Exit]);
        let s = store.stats(StatsBy::All).unwrap();
        assert_eq!((s[0].probes, s[0].matched), (6, 5));
        let report = store.purge(rule, now).unwrap();
        // "a" (4 years, no overstay), the unmatched one and "ancient" (6 years, an
        // overstayer past even the longer period) go; "over" stays 5 years.
        assert_eq!(
            report,
            PurgeReport {
                removed: 4,
                kept_for_overstayers: 1
            }
        );
        assert!(store.history("a").unwrap().is_empty());
        assert_eq!(store.history("over").unwrap().len(), 1);
        assert_eq!(store.history("b").unwrap().len(), 1);
    }

    #[test]
    fn reports_render_in_three_formats() {
        let rows = vec![StatsRow {
            gallery: "f,1".into(),
            key: "say \"hi\"".into(),
            probes: 4,
            matched: 3,
        }];
        let r = Report::stats(&rows, StatsBy::Gate);
        assert_eq!(
            r.render(Format::Csv),
            "gallery,gate,probes,matched,match_rate\n\"f,1\",\"say \"\"hi\"\"\",4,3,0.7500\n"
        );
        let line: serde_json::Value = serde_json::from_str(r.render(Format::Jsonl).trim()).unwrap();
        assert_eq!(line["gate"], "say \"hi\"");
        assert!(r.render(Format::Table).starts_with("gallery  gate"));
        assert!(Format::parse("xml").unwrap_err().to_string().contains("--format"));
        assert!(
            Direction::parse("sideways", "encounter.direction")
                .unwrap_err()
                .to_string()
                .contains("encounter.direction")
        );
    }
}
