//! The audit trail: one JSON record per access decision (allowed, denied, failed), written to
//! its own sink (a file or stdout) so it can be shipped apart from the diagnostic log. A
//! record identifies an issued token by its fingerprint (truncated SHA-256), never the token.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

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
    pub time: String,
    pub request_id: String,
    /// `GetToken` or `WatchToken`.
    pub rpc: &'static str,
    pub caller: Option<String>,
    pub proof: Option<Proof>,
    pub app_id: Option<String>,
    pub peer: Option<String>,
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
    pub expires_at: Option<String>,
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
        peer: Option<std::net::SocketAddr>,
        tenant: &str,
        scopes: &[String],
    ) -> AuditRecord {
        AuditRecord {
            time: String::new(),
            request_id: request_id.to_owned(),
            rpc,
            caller: None,
            proof: None,
            app_id: None,
            peer: peer.map(|p| p.to_string()),
            tenant: tenant.chars().take(MAX_FIELD).collect(),
            scopes: scopes
                .iter()
                .take(MAX_SCOPES)
                .map(|s| s.chars().take(MAX_FIELD).collect())
                .collect(),
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

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where records go. Writes must not fail the request; a sink reports its own trouble.
pub trait AuditSink: Send + Sync + fmt::Debug + 'static {
    fn write(&self, record: &AuditRecord);
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
        record.time = rfc3339(SystemTime::now());
        self.sink.write(&record);
    }
}

/// JSON lines to a writer: stdout or an append-only file.
pub struct JsonLines {
    out: Mutex<Box<dyn Write + Send>>,
}

impl fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JsonLines")
    }
}

impl JsonLines {
    pub fn stdout() -> Self {
        JsonLines {
            out: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(JsonLines {
            out: Mutex::new(Box::new(f)),
        })
    }
}

impl AuditSink for JsonLines {
    fn write(&self, record: &AuditRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // One write per record keeps lines whole in an O_APPEND file.
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write the audit record");
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
    fn write(&self, record: &AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
    }
}
