//! The audit log: one JSON line per operation (time, caller, gallery, operation, and the
//! subject ids and scores returned; never templates), appended durably. A writer thread
//! group-commits: it writes every line that is waiting, fdatasyncs once, and only then
//! tells the requests, so throughput does not collapse to one fsync per request.

use crate::error::{IoContext, Result};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// One audited operation.
#[derive(Serialize)]
pub struct AuditEntry<'a> {
    pub caller: &'a str,
    pub gallery: &'a str,
    pub operation: &'a str,
    /// "ok" or the gRPC status code name.
    pub outcome: &'a str,
    /// Subject ids (and scores) returned or affected; never template values.
    pub subjects: Vec<(&'a str, Option<f32>)>,
    /// Number of probes or templates involved.
    pub count: usize,
}

type Pending = (Vec<u8>, oneshot::Sender<std::io::Result<()>>);

/// Handle to the audit writer thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Open (append to) `path` and start the writer thread.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ctx(|| format!("opening audit log {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("biogate-audit".into())
            .spawn(move || writer(file, rx))
            .ctx(|| "starting the audit thread".into())?;
        Ok(AuditLog { tx })
    }

    /// Append an entry; returns once it is on disk.
    pub async fn record(&self, entry: &AuditEntry<'_>) -> std::io::Result<()> {
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
        let (done, wait) = oneshot::channel();
        self.tx
            .send((line, done))
            .map_err(|_| std::io::Error::other("audit writer stopped"))?;
        wait.await.map_err(|_| std::io::Error::other("audit writer stopped"))?
    }
}

fn writer(mut file: File, rx: mpsc::Receiver<Pending>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut buf = Vec::new();
        for (line, _) in &batch {
            buf.extend_from_slice(line);
        }
        let result = file.write_all(&buf).and_then(|_| file.sync_data());
        for (_, done) in batch {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}
