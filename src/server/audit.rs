//! The audit log: one JSON line per call, refused or not (time, peer, caller, method,
//! gallery, outcome and status code, the subject ids and scores returned or affected;
//! never a template or a token), appended durably.
//!
//! A writer thread group-commits: it writes every line that is waiting, fdatasyncs
//! once, and only then tells the callers, so throughput does not collapse to one fsync
//! per request. A failed write is cut back so the file stays whole lines. The file is
//! rotated by size and age (`audit-<UTC time>.log`) and rotated files are deleted after
//! `keep_days`; each rotation and deletion is itself an audit line. Every write goes
//! through the [`Storage`] seam, so tests inject a full disk here too.

use super::config::AuditConfig;
use crate::error::{IoContext, Result};
use crate::storage::{Storage, StoredFile};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// One audited call (or one phase of one).
#[derive(Serialize, Debug)]
pub struct AuditEntry<'a> {
    /// The client's address.
    pub peer: &'a str,
    /// Who the token says is calling ("-" when no valid token was given).
    pub caller: &'a str,
    /// The RPC ("Identify", "Enroll", ...).
    pub method: &'a str,
    pub gallery: &'a str,
    /// "intent" (before a write takes effect) or "done".
    pub phase: &'a str,
    /// "ok" or the gRPC status code name ("pending" for an intent).
    pub outcome: &'a str,
    /// The gRPC status code (0 for ok and intents).
    pub code: i32,
    /// The error message, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// Subject ids (and scores) returned or affected; never template values.
    pub subjects: Vec<(&'a str, Option<f32>)>,
    /// Number of probes or templates involved (rows removed, for a purge).
    pub count: usize,
    /// The retention rule a purge applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
}

type Pending = (Vec<u8>, oneshot::Sender<std::io::Result<()>>);

/// Handle to the audit writer thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
}

/// Name of the live audit file inside the data directory.
pub const AUDIT_FILE: &str = "audit.log";

impl AuditLog {
    /// Open (append to) `dir/audit.log` and start the writer thread.
    pub fn open(dir: &Path, config: &AuditConfig, storage: Storage) -> Result<AuditLog> {
        let writer = Writer::open(dir, config.clone(), storage)?;
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("biogate-audit".into())
            .spawn(move || writer.run(rx))
            .ctx(|| "starting the audit thread".into())?;
        Ok(AuditLog { tx })
    }

    /// Append an entry; returns once it is on disk (or why it is not).
    pub async fn record(&self, entry: &AuditEntry<'_>) -> std::io::Result<()> {
        let line = encode(entry);
        let (done, wait) = oneshot::channel();
        self.tx
            .send((line, done))
            .map_err(|_| std::io::Error::other("audit writer stopped"))?;
        wait.await.map_err(|_| std::io::Error::other("audit writer stopped"))?
    }
}

fn encode(entry: &AuditEntry<'_>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Line<'a> {
        time_ms: u128,
        #[serde(flatten)]
        entry: &'a AuditEntry<'a>,
    }
    let time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut line = serde_json::to_vec(&Line { time_ms, entry }).expect("audit entry serialises");
    line.push(b'\n');
    line
}

struct Writer {
    dir: PathBuf,
    config: AuditConfig,
    storage: Storage,
    file: StoredFile,
    /// Bytes of whole, durable lines in the current file.
    len: u64,
    opened: Instant,
    /// Set when a failed write could not be cut back: no further writes.
    broken: Option<String>,
}

impl Writer {
    fn open(dir: &Path, config: AuditConfig, storage: Storage) -> Result<Writer> {
        let path = dir.join(AUDIT_FILE);
        let mut file = match storage.open_append(&path) {
            Ok(f) => f,
            Err(_) if !path.exists() => storage.create(&path)?,
            Err(e) => return Err(e),
        };
        let len = file.size()?;
        // A line cut by a crash (or a failed write) is cut off so the file is whole lines.
        let whole = whole_lines_len(&path)?;
        if whole != len {
            file.set_len(whole)?;
            file.sync_all()?;
        }
        // Rotated files too: a failure around a rotation can leave a half line there.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("audit-") && name.ends_with(".log") {
                    let whole = whole_lines_len(&entry.path())?;
                    if entry.metadata().is_ok_and(|m| m.len() != whole) {
                        let mut f = storage.open_write(&entry.path())?;
                        f.set_len(whole)?;
                        f.sync_all()?;
                    }
                }
            }
        }
        let mut w = Writer {
            dir: dir.to_path_buf(),
            config,
            storage,
            file,
            len: whole,
            opened: Instant::now(),
            broken: None,
        };
        w.apply_retention();
        Ok(w)
    }

    fn run(mut self, rx: mpsc::Receiver<Pending>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            let mut buf = Vec::new();
            for (line, _) in &batch {
                buf.extend_from_slice(line);
            }
            let result = self.append(&buf);
            for (_, done) in batch {
                let _ = done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(match e.raw_os_error() {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::new(e.kind(), e.to_string()),
                    }),
                });
            }
            if result.is_ok() {
                self.maybe_rotate();
            }
        }
    }

    /// Write and fdatasync `buf`; on failure cut the file back to its last whole line.
    /// If even that fails, nothing more is written (every record is refused) until the
    /// server restarts, which cuts the file back to whole lines.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(std::io::Error::other(why.clone()));
        }
        let written = self.file.write_all_ctx(buf).and_then(|_| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let len = self.len;
                // Cut the half-written line off, and write the next one where it began.
                let cut = self.file.set_len(len).and_then(|_| {
                    use std::io::Seek;
                    let path = self.file.path().to_path_buf();
                    self.file
                        .seek(std::io::SeekFrom::Start(len))
                        .ctx(|| format!("seeking in {}", path.display()))?;
                    self.file.sync_data()
                });
                if let Err(cut) = cut {
                    tracing::error!(error = %cut, "audit log: could not cut back a failed write; refusing every record until restarted");
                    self.broken = Some(format!(
                        "the audit log could not be cut back after a failed write ({cut}); restart the server"
                    ));
                }
                Err(io_error_of(e))
            }
        }
    }

    fn maybe_rotate(&mut self) {
        let by_size = self.len >= self.config.rotate_bytes;
        let by_age = self.opened.elapsed() >= Duration::from_secs(self.config.rotate_after_s);
        if !(by_size || by_age) || self.len == 0 {
            return;
        }
        let from = self.dir.join(AUDIT_FILE);
        let rotated = self.dir.join(format!("audit-{}.log", crate::storage::utc_timestamp()));
        let rotated_name = rotated.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let line = encode(&AuditEntry {
            peer: "-",
            caller: "biogate",
            method: "rotate_audit_log",
            gallery: "",
            phase: "done",
            outcome: "ok",
            code: 0,
            error: None,
            subjects: vec![(&rotated_name, None)],
            count: 0,
            rule: None,
        });
        let rotate = self
            .append(&line)
            .map_err(|e| crate::error::Error::Io {
                context: "writing the rotation line".into(),
                source: e,
            })
            .and_then(|_| self.storage.rename(&from, &rotated))
            .and_then(|_| self.storage.create(&from))
            .and_then(|f| {
                self.storage.sync_dir(&self.dir)?;
                Ok(f)
            });
        match rotate {
            Ok(f) => {
                self.file = f;
                self.len = 0;
                self.opened = Instant::now();
                tracing::info!(file = %rotated.display(), "rotated the audit log");
                self.apply_retention();
            }
            Err(e) => tracing::error!(error = %e, "audit log: rotation failed; appending to the current file"),
        }
    }

    /// Delete rotated files older than `keep_days`, with an audit line for each.
    fn apply_retention(&mut self) {
        if self.config.keep_days == 0 {
            return;
        }
        let keep = Duration::from_secs(self.config.keep_days * 86_400);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("audit-") && name.ends_with(".log")) {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if !old {
                continue;
            }
            let line = encode(&AuditEntry {
                peer: "-",
                caller: "biogate",
                method: "delete_audit_log",
                gallery: "",
                phase: "done",
                outcome: "ok",
                code: 0,
                error: None,
                subjects: vec![(&name, None)],
                count: self.config.keep_days as usize,
                rule: None,
            });
            // The deletion is recorded durably before it happens.
            if self.append(&line).is_ok() {
                match self.storage.remove_file(&entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %name, keep_days = self.config.keep_days, "deleted an expired audit log")
                    }
                    Err(e) => tracing::error!(file = %name, error = %e, "could not delete an expired audit log"),
                }
            }
        }
    }
}

/// The operating system's error behind a storage error (its errno kept, so a full
/// disk stays recognisable as one).
fn io_error_of(e: crate::error::Error) -> std::io::Error {
    match e {
        crate::error::Error::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Length of the file's whole lines (up to and including its last newline), read from
/// the end backwards: a whole file ends with a newline, so this reads one block, not
/// the (possibly many and large) audit files kept by the retention rule.
fn whole_lines_len(path: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 << 10;
    let what = || format!("reading {}", path.display());
    let mut file = std::fs::File::open(path).ctx(what)?;
    let mut end = file.metadata().ctx(what)?.len();
    let mut block = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        block.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start)).ctx(what)?;
        file.read_exact(&mut block).ctx(what)?;
        if let Some(i) = block.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ENOSPC, FaultPlan};

    fn entry(n: usize) -> AuditEntry<'static> {
        AuditEntry {
            peer: "127.0.0.1:1",
            caller: "gate",
            method: "Identify",
            gallery: "g",
            phase: "done",
            outcome: "ok",
            code: 0,
            error: None,
            subjects: vec![("s1", Some(0.5))],
            count: n,
            rule: None,
        }
    }

    /// Every fault point of a run of records (writes, fsyncs, rotations, retention), one
    /// at a time and sticky: each record is either reported durable and in the files,
    /// or reported failed; the files are whole lines.
    #[tokio::test]
    async fn every_fault_point_is_reported_and_leaves_whole_lines() {
        use crate::storage::EIO;
        let config = &AuditConfig {
            rotate_bytes: 4096,
            rotate_after_s: 3600,
            keep_days: 1,
        };
        let run = |storage: Storage| async move {
            let dir = tempfile::tempdir().unwrap();
            // A fault while opening is an error at start, before any call is served.
            let log = AuditLog::open(dir.path(), config, storage).ok()?;
            let mut acked = Vec::new();
            for i in 0..40 {
                if log.record(&entry(i)).await.is_ok() {
                    acked.push(i);
                }
            }
            drop(log);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            // A restart (on a healthy disk) cuts a half line a broken disk left behind.
            drop(AuditLog::open(dir.path(), config, Storage::default()).unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let mut found = Vec::new();
            for f in std::fs::read_dir(dir.path()).unwrap() {
                let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
                assert!(text.is_empty() || text.ends_with('\n'), "a half line: {text:?}");
                for l in text.lines() {
                    let v: serde_json::Value =
                        serde_json::from_str(l).unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {l:?}"));
                    if v["method"] == "Identify" {
                        found.push(v["count"].as_u64().unwrap() as usize);
                    }
                }
            }
            found.sort_unstable();
            Some((acked, found))
        };
        let counter = FaultPlan::counting();
        let (acked, found) = run(Storage::with_faults(counter.clone())).await.unwrap();
        assert_eq!((acked.len(), found.len()), (40, 40));
        let points = counter.seen();
        assert!(points > 80, "{points}");
        for at in 0..points {
            for (errno, sticky) in [(ENOSPC, false), (EIO, true)] {
                let plan = FaultPlan::fail(at, errno, sticky);
                let Some((acked, found)) = run(Storage::with_faults(plan)).await else {
                    continue;
                };
                // Everything acknowledged is in the files (a failed one may be there too,
                // written before its fsync failed, but never half).
                for a in &acked {
                    assert!(found.contains(a), "fault {at}: acknowledged line {a} missing");
                }
            }
        }
    }

    #[tokio::test]
    async fn rotates_by_size_keeps_whole_lines_and_reports_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            rotate_bytes: 4096,
            rotate_after_s: 3600,
            keep_days: 1,
        };
        let log = AuditLog::open(dir.path(), &config, Storage::default()).unwrap();
        for i in 0..100 {
            log.record(&entry(i)).await.unwrap();
        }
        let rotated: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("audit-"))
            .collect();
        assert!(rotated.len() >= 2, "{rotated:?}");
        let mut lines = 0;
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'));
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                if v["method"] == "Identify" {
                    lines += 1;
                }
            }
        }
        assert_eq!(lines, 100, "every line is in one of the files");

        // A full disk: the caller hears it, and no half line is left behind.
        let d2 = tempfile::tempdir().unwrap();
        let plan = FaultPlan::fail(2, ENOSPC, false); // create, then write #1 fails (call 2? see below)
        let log = AuditLog::open(d2.path(), &config, Storage::with_faults(plan.clone())).unwrap();
        let mut failed = 0;
        for i in 0..4 {
            if log.record(&entry(i)).await.is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 1, "{:?}", plan.calls());
        let text = std::fs::read_to_string(d2.path().join(AUDIT_FILE)).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
    }
}
