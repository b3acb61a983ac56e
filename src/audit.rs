//! The audit trail: one JSON record per access decision (allowed, denied, failed), written to
//! its own sink (a file or stdout) so it can be shipped apart from the diagnostic log. A
//! record identifies an issued token by its fingerprint (truncated SHA-256), never the token.
//!
//! Requests never write on their own thread: `JsonLines` serialises a record into one buffer
//! and hands it to one writer thread over a bounded queue. The writer takes what has queued,
//! writes it with one flush, then pauses for `BATCH_PAUSE`, so under load it costs one
//! wake-up and a few `write(2)` calls per pause instead of per record. When the writer falls
//! behind by a whole queue, requests wait for it: records are never dropped.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::authn::{Caller, Proof};

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A token was served (or a watch started).
    Allowed,
    /// Refused on access grounds: no or bad credentials, not granted, over a limit.
    Denied,
    /// Admitted, but no token: invalid request, unknown tenant, upstream failure.
    Failed,
}

/// One decision. Field names are the wire format of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    #[serde(serialize_with = "as_rfc3339")]
    pub time: SystemTime,
    pub request_id: String,
    /// `GetToken` or `WatchToken`.
    pub rpc: &'static str,
    pub caller: Option<String>,
    pub proof: Option<Proof>,
    pub app_id: Option<String>,
    pub peer: Option<SocketAddr>,
    pub tenant: String,
    pub scopes: Vec<String>,
    pub outcome: Outcome,
    /// gRPC status code name (`OK`, `PERMISSION_DENIED`, …).
    pub code: &'static str,
    /// Why it was denied or failed; never a credential.
    pub reason: Option<String>,
    /// `CACHE`, `EXCHANGE` or `STALE_WHILE_REFRESH_FAILING`.
    pub token_source: Option<&'static str>,
    /// RFC 3339 expiry of the token served.
    #[serde(serialize_with = "as_rfc3339_opt")]
    pub expires_at: Option<SystemTime>,
    pub token_fingerprint: Option<String>,
    /// Entra's correlation id when an upstream exchange failed.
    pub entra_correlation_id: Option<String>,
}

/// Longest tenant or scope copied from a request into a record, and at most this many scopes.
const MAX_FIELD: usize = 256;
const MAX_SCOPES: usize = 8;

impl AuditRecord {
    /// A record for a request before anything is decided; the outcome is filled in later.
    pub fn new(
        rpc: &'static str,
        request_id: &str,
        peer: Option<SocketAddr>,
        tenant: &str,
        scopes: &[String],
    ) -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH,
            request_id: request_id.to_owned(),
            rpc,
            caller: None,
            proof: None,
            app_id: None,
            peer,
            tenant: bounded(tenant),
            scopes: scopes.iter().take(MAX_SCOPES).map(|s| bounded(s)).collect(),
            outcome: Outcome::Failed,
            code: "UNKNOWN",
            reason: None,
            token_source: None,
            expires_at: None,
            token_fingerprint: None,
            entra_correlation_id: None,
        }
    }

    pub fn set_caller(&mut self, caller: &Caller) {
        self.caller = Some(caller.id.clone());
        self.proof = Some(caller.proof);
        self.app_id = caller.app_id.clone();
    }
}

/// At most `MAX_FIELD` characters of a caller-supplied string (a plain copy when shorter:
/// no string of at most `MAX_FIELD` bytes has more characters than that).
fn bounded(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        s.to_owned()
    } else {
        s.chars().take(MAX_FIELD).collect()
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn as_rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn as_rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => as_rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// Where records go. Writes must not fail the request; a sink reports its own trouble.
pub trait AuditSink: Send + Sync + fmt::Debug + 'static {
    fn write(&self, record: AuditRecord);

    /// Returns once every record written so far is out of the process (shutdown calls it).
    fn flush(&self) {}
}

/// Stamps the time and hands a record to the sink.
#[derive(Debug, Clone)]
pub struct Audit {
    sink: Arc<dyn AuditSink>,
}

impl Audit {
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Audit { sink }
    }

    pub fn record(&self, mut record: AuditRecord) {
        record.time = SystemTime::now();
        self.sink.write(record);
    }

    /// Blocks until the records so far are written; call it off the async runtime.
    pub fn flush(&self) {
        self.sink.flush();
    }
}

/// Records queued for the writer thread before requests wait for it.
const QUEUE: usize = 8192;
/// The writer's pause after each batch: the most a record waits before it is written (plus
/// the write itself). 8192 records per 5 ms is far beyond what the broker serves.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
/// The writer's buffer: a batch is written with as few `write(2)` calls as this allows, and a
/// record (far smaller) never straddles two of them, so lines stay whole in an O_APPEND file.
const WRITE_BUFFER: usize = 64 * 1024;

enum Msg {
    /// One serialised record with its newline. Serialised by the sender: a record is a dozen
    /// allocations, and freeing them on the writer thread contends with the allocator's
    /// per-thread arenas on the request threads; one buffer is one free.
    Line(Vec<u8>),
    /// Answered once everything queued before it is flushed.
    Flush(SyncSender<()>),
}

/// JSON lines to stdout or an append-only file, written by a dedicated thread.
pub struct JsonLines {
    tx: Option<SyncSender<Msg>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Whether "writer behind" has been logged (once: it would otherwise log per request).
    warned: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JsonLines")
    }
}

impl JsonLines {
    pub fn stdout() -> std::io::Result<Self> {
        Self::spawn(Box::new(std::io::stdout()))
    }

    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Self::spawn(Box::new(f))
    }

    fn spawn(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_batches(&rx, out))?;
        Ok(JsonLines {
            tx: Some(tx),
            writer: Some(writer),
            warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn send(&self, msg: Msg) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                // Slower answers beat a gap in the audit trail.
                if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        queued = QUEUE,
                        "audit writer behind its output; requests wait for it (logged once)"
                    );
                }
                let _ = tx.send(msg);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("audit writer stopped; record lost");
            }
        }
    }
}

impl AuditSink for JsonLines {
    fn write(&self, record: AuditRecord) {
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, &record).is_ok() {
            line.push(b'\n');
            self.send(Msg::Line(line));
        }
    }

    fn flush(&self) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.send(Msg::Flush(ack));
        let _ = done.recv();
    }
}

impl Drop for JsonLines {
    /// Closes the queue and waits for the writer to drain it.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The writer thread: takes what is queued, writes it, flushes once per batch.
fn write_batches(rx: &Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, out);
    let mut failing = false;
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => result = result.and_then(|()| out.write_all(&line)),
                Msg::Flush(ack) => acks.push(ack),
            }
            next = rx.try_recv().ok();
        }
        match result.and_then(|()| out.flush()) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("audit records are being written again");
            }
            Ok(()) => {}
            // Once per streak: a full disk would otherwise log once per batch.
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot write audit records");
            }
            Err(_) => {}
        }
        let flushed = !acks.is_empty();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        // Let records gather (senders enqueue without waking anyone meanwhile); skipped after
        // a flush request so shutdown is not delayed.
        if !flushed {
            std::thread::sleep(BATCH_PAUSE);
        }
    }
}

/// Keeps records in memory, for tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemorySink {
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn take(&self) -> Vec<AuditRecord> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AuditSink for MemorySink {
    fn write(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> AuditRecord {
        let mut r = AuditRecord::new(
            "GetToken",
            &format!("req-{n}"),
            Some("127.0.0.1:4000".parse().unwrap()),
            "contoso",
            &["https://graph.microsoft.com/.default".to_owned()],
        );
        r.expires_at = Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000));
        r
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is a whole JSON record"))
            .collect()
    }

    #[test]
    fn records_from_many_threads_arrive_whole_and_flush_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::new(Arc::new(JsonLines::file(&path).unwrap()));
        std::thread::scope(|s| {
            for t in 0..4 {
                let audit = audit.clone();
                s.spawn(move || {
                    for i in 0..2_500 {
                        audit.record(record(t * 10_000 + i));
                    }
                });
            }
        });
        audit.flush();
        let got = lines(&path);
        assert_eq!(got.len(), 10_000);
        let ids: std::collections::HashSet<&str> = got
            .iter()
            .map(|v| v["request_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn wire_format_has_rfc3339_times_and_the_peer_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::new(Arc::new(JsonLines::file(&path).unwrap()));
        audit.record(record(1));
        audit.flush();
        let v = &lines(&path)[0];
        assert_eq!(v["expires_at"], "2027-01-15T08:00:00Z");
        assert_eq!(v["peer"], "127.0.0.1:4000");
        let time = v["time"].as_str().unwrap();
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).unwrap();
        assert!(v["token_fingerprint"].is_null());
    }

    #[test]
    fn dropping_the_sink_drains_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = JsonLines::file(&path).unwrap();
        for i in 0..1_000 {
            sink.write(record(i));
        }
        drop(sink);
        assert_eq!(lines(&path).len(), 1_000);
    }

    #[test]
    fn long_caller_strings_are_bounded_by_characters() {
        let long = "é".repeat(MAX_FIELD + 10);
        let r = AuditRecord::new("GetToken", "r", None, &long, &[]);
        assert_eq!(r.tenant.chars().count(), MAX_FIELD);
        assert_eq!(bounded("short"), "short");
    }
}
