//! The audit trail: one JSON record per access decision (allowed, denied, failed), written to
//! its own sink (a file or stdout) so it can be shipped apart from the diagnostic log. A
//! record identifies an issued token by its fingerprint (truncated SHA-256), never the token.
//!
//! Requests never write on their own thread: `JsonLines` serialises a record into a buffer
//! of its thread's shard, and one writer thread writes what the shards hold every
//! `BATCH_PAUSE` (backing off to `IDLE_PAUSE` when there is nothing), so under load it costs
//! one wake-up and a few `write(2)` calls per pause instead of per record. When the writer
//! falls behind by a whole shard, requests wait for it (at most `STALL`, without holding up
//! the async runtime): records are never dropped for it. When the
//! output fails, records are kept for it and `Audit::failure` says why, so that the API
//! serves no token unaudited (`[audit] on_write_failure`). A file
//! sink follows its path through log rotation (`FollowedFile`). Refusals a client can repeat
//! at will are summarised (`repeats`), so the trail's size follows the broker's decisions
//! that matter, not a client's sending rate.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::{Serialize, Serializer};

use crate::authn::{Caller, Proof};
use crate::lines::{self, Lines, Output, WhenFull};
use crate::sensitive::Fingerprint;

mod repeats;

use repeats::Repeats;

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
    /// The caller went away (cancelled, or its deadline passed) before the answer: no token
    /// was sent.
    Cancelled,
}

/// One decision. Field names are the wire format of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    #[serde(serialize_with = "as_rfc3339")]
    pub time: SystemTime,
    pub request_id: String,
    /// `GetToken` or `WatchToken`; `unknown` for a method the service does not have.
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
    pub token_fingerprint: Option<Fingerprint>,
    /// Entra's correlation id when an upstream exchange failed.
    pub entra_correlation_id: Option<String>,
    /// Only on a request that passed a claims challenge: the digest of its claims
    /// (`claims::Claims::digest`), not the claims.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims_digest: Option<Fingerprint>,
    /// Only on a summary of repeated refusals: how many requests, this one included, were
    /// refused the same way (same peer address, caller, RPC and code) since the last record
    /// written for them. Absent means one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeats: Option<u64>,
    /// A refusal a client can repeat at will (bad credentials, over a limit): summarised
    /// when it repeats (`repeats`).
    #[serde(skip)]
    pub repeatable: bool,
}

impl Outcome {
    /// The name in the audit log (as serialised).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Longest tenant copied from a request into a record, and at most this many scopes.
const MAX_FIELD: usize = 256;
const MAX_SCOPES: usize = 8;
/// Longest scope copied into a record: the longest a request may carry, so that every scope
/// served is recorded whole (two scopes alike in their first 256 characters read alike cut
/// there).
const MAX_SCOPE: usize = crate::broker::MAX_SCOPE_LEN;

impl AuditRecord {
    /// A record for a request before anything is decided; the outcome is filled in later.
    pub fn new(
        rpc: &'static str,
        request_id: &str,
        peer: Option<SocketAddr>,
        tenant: &str,
        scopes: &[String],
    ) -> AuditRecord {
        let mut r = AuditRecord::pending(rpc, peer);
        r.request_id = request_id.to_owned();
        r.set_request(tenant.to_owned(), scopes.to_vec());
        r
    }

    /// A record with only the RPC and the peer: the request's own strings (its id, tenant and
    /// scopes) are moved in once the request is done with them, so a record copies none.
    pub fn pending(rpc: &'static str, peer: Option<SocketAddr>) -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH,
            request_id: String::new(),
            rpc,
            caller: None,
            proof: None,
            app_id: None,
            peer,
            tenant: String::new(),
            scopes: Vec::new(),
            outcome: Outcome::Failed,
            code: "UNKNOWN",
            reason: None,
            token_source: None,
            expires_at: None,
            token_fingerprint: None,
            entra_correlation_id: None,
            claims_digest: None,
            repeats: None,
            repeatable: false,
        }
    }

    /// Moves in what the caller asked for, cut to the record's bounds.
    pub fn set_request(&mut self, mut tenant: String, mut scopes: Vec<String>) {
        bound(&mut tenant);
        scopes.truncate(MAX_SCOPES);
        scopes.iter_mut().for_each(|s| bound_to(s, MAX_SCOPE));
        self.tenant = tenant;
        self.scopes = scopes;
    }

    /// Moves the authenticated caller's identity in.
    pub fn set_caller(&mut self, caller: Caller) {
        self.caller = Some(caller.id);
        self.proof = Some(caller.proof);
        self.app_id = caller.app_id;
    }

    /// Appends the record as one line of JSON: the same text `serde_json` makes of it
    /// (tested), written directly. A record is written on every request, and going through
    /// serde cost more than the rest of a cache hit (keys escaped on every record, the peer
    /// address through `fmt`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":");
        json_time(out, Some(self.time));
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, &self.request_id);
        out.extend_from_slice(b",\"rpc\":");
        json_static(out, self.rpc);
        out.extend_from_slice(b",\"caller\":");
        json_opt(out, self.caller.as_deref());
        out.extend_from_slice(b",\"proof\":");
        json_static_opt(out, self.proof.map(Proof::name));
        out.extend_from_slice(b",\"app_id\":");
        json_opt(out, self.app_id.as_deref());
        out.extend_from_slice(b",\"peer\":");
        match self.peer {
            Some(addr) => json_addr(out, addr),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"tenant\":");
        json_str(out, &self.tenant);
        out.extend_from_slice(b",\"scopes\":[");
        for (i, s) in self.scopes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, s);
        }
        out.extend_from_slice(b"],\"outcome\":");
        json_static(out, self.outcome.name());
        out.extend_from_slice(b",\"code\":");
        json_static(out, self.code);
        out.extend_from_slice(b",\"reason\":");
        json_opt(out, self.reason.as_deref());
        out.extend_from_slice(b",\"token_source\":");
        json_static_opt(out, self.token_source);
        out.extend_from_slice(b",\"expires_at\":");
        json_time(out, self.expires_at);
        out.extend_from_slice(b",\"token_fingerprint\":");
        json_opt(out, self.token_fingerprint.as_deref());
        out.extend_from_slice(b",\"entra_correlation_id\":");
        json_opt(out, self.entra_correlation_id.as_deref());
        if let Some(d) = &self.claims_digest {
            out.extend_from_slice(b",\"claims_digest\":");
            json_str(out, d);
        }
        if let Some(n) = self.repeats {
            out.extend_from_slice(b",\"repeats\":");
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{n}");
        }
        out.push(b'}');
    }
}

/// Whether a JSON string needs any escape. Almost none does; the check works on 16 bytes at
/// a time without a branch per byte (fixed-size chunks the compiler turns into vector
/// compares; the rest padded to a chunk), then the string is copied whole.
fn needs_escape(bytes: &[u8]) -> bool {
    fn special(chunk: &[u8; 16]) -> bool {
        chunk.iter().fold(false, |any, &b| {
            any | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
    }
    let (chunks, rest) = bytes.as_chunks::<16>();
    let mut last = [b' '; 16];
    last[..rest.len()].copy_from_slice(rest);
    chunks
        .iter()
        .fold(special(&last), |any, c| any | special(c))
}

/// A JSON string, escaped as `serde_json` does: quote, backslash and control characters.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            // Other control characters: `\u00XX`, below.
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.extend_from_slice(&crate::sensitive::hex_digits(b));
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A string of the broker's own (a name from a table in the code), which has nothing to
/// escape: five per record, where the escape check would cost more than the copy.
fn json_static(out: &mut Vec<u8>, s: &'static str) {
    debug_assert!(!needs_escape(s.as_bytes()), "{s:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn json_static_opt(out: &mut Vec<u8>, s: Option<&'static str>) {
    match s {
        Some(s) => json_static(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// RFC 3339, formatted on the stack; `""` beyond the year 9999 (as `as_rfc3339`).
fn json_time(out: &mut Vec<u8>, t: Option<SystemTime>) {
    let Some(t) = t else {
        out.extend_from_slice(b"null");
        return;
    };
    let mut buf = [0u8; RFC3339_MAX];
    let n = format_rfc3339(t, &mut buf).unwrap_or(0);
    // Digits and separators only: nothing to escape.
    out.push(b'"');
    out.extend_from_slice(&buf[..n]);
    out.push(b'"');
}

/// A socket address as `Display` shows it; IPv4 without `fmt`.
fn json_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    out.push(b'"');
    match addr {
        SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u32::from(o));
            }
            out.push(b':');
            push_decimal(out, u32::from(a.port()));
        }
        SocketAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
    out.push(b'"');
}

fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Cuts a caller-supplied string to `MAX_FIELD` characters, in place.
fn bound(s: &mut String) {
    bound_to(s, MAX_FIELD);
}

/// Cuts a string to `max` characters, in place (nothing to do when it has at most `max`
/// bytes: no such string has more characters than that).
fn bound_to(s: &mut String, max: usize) {
    if s.len() > max
        && let Some((end, _)) = s.char_indices().nth(max)
    {
        s.truncate(end);
    }
}

/// `OffsetDateTime::from(SystemTime)` panics out of its range; this says `None`.
fn datetime(t: SystemTime) -> Option<time::OffsetDateTime> {
    let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).ok()?,
        Err(e) => -i128::try_from(e.duration().as_nanos()).ok()?,
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// RFC 3339 with nanoseconds and a UTC offset fits in 30 bytes up to the year 9999, the
/// most it can show.
const RFC3339_MAX: usize = 30;

/// `t` in RFC 3339 as `time`'s `Rfc3339` writes it (UTC as `Z`, the fraction of a second
/// without trailing zeros), written into `buf` from the calendar fields; `None` outside the
/// years 0 to 9999, which RFC 3339 cannot show. Two per record, on every request: `time`'s
/// formatter is generic over format descriptions (with the escape and UTF-8 checks of its
/// output, 765 instructions per time against 429 from the calendar fields, and 263 in a
/// record with the whole seconds remembered; docs/PERFORMANCE.md).
fn format_rfc3339(t: SystemTime, buf: &mut [u8; RFC3339_MAX]) -> Option<usize> {
    let (d, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        // Whole seconds and nanoseconds apart: `datetime`'s 128-bit division costs more than
        // the rest of the formatting.
        Ok(since) => (Seconds::Since(since.as_secs()), since.subsec_nanos()),
        Err(_) => datetime(t).map(|d| (Seconds::Before(d), d.nanosecond()))?,
    };
    let mut n = whole_seconds(d, buf)?;
    if nanos != 0 {
        put_digits(buf, n, nanos, 10);
        n += 10;
        // Ten digits for the nanoseconds: the leading `0` becomes the point.
        buf[n - 10] = b'.';
        while buf[n - 1] == b'0' {
            n -= 1;
        }
    }
    buf[n] = b'Z';
    Some(n + 1)
}

/// The whole seconds of a time: counted from the epoch, or (before it) as a date-time.
enum Seconds {
    Since(u64),
    Before(time::OffsetDateTime),
}

/// `YYYY-MM-DDTHH:MM:SS`, the part of an RFC 3339 time that changes once a second.
const WHOLE_SECONDS: usize = 19;

thread_local! {
    /// The last two whole seconds this thread formatted after the epoch, with their text. A
    /// record has two times (now and the token's expiry), and both repeat from one record to
    /// the next: the calendar arithmetic runs about once a second instead of twice a record.
    /// `u64::MAX` marks an empty entry: no `SystemTime` is that far from the epoch.
    static RECENT_SECONDS: std::cell::Cell<[(u64, [u8; WHOLE_SECONDS]); 2]> =
        const { std::cell::Cell::new([(u64::MAX, [0; WHOLE_SECONDS]); 2]) };
}

/// Writes the whole seconds at the start of `buf`; `None` outside the years 0 to 9999.
fn whole_seconds(secs: Seconds, buf: &mut [u8; RFC3339_MAX]) -> Option<usize> {
    let secs = match secs {
        Seconds::Since(s) => s,
        Seconds::Before(d) => return calendar(d, buf),
    };
    let mut recent = RECENT_SECONDS.get();
    if let Some((_, text)) = recent.iter().find(|(s, _)| *s == secs) {
        buf[..WHOLE_SECONDS].copy_from_slice(text);
        return Some(WHOLE_SECONDS);
    }
    let d = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    let n = calendar(d, buf)?;
    // The older entry goes.
    recent[1] = recent[0];
    recent[0].0 = secs;
    recent[0].1.copy_from_slice(&buf[..WHOLE_SECONDS]);
    RECENT_SECONDS.set(recent);
    Some(n)
}

/// `YYYY-MM-DDTHH:MM:SS` from the calendar fields; `None` outside the years 0 to 9999.
fn calendar(d: time::OffsetDateTime, buf: &mut [u8; RFC3339_MAX]) -> Option<usize> {
    let (year, month, day) = d.to_calendar_date();
    let year = u32::try_from(year).ok().filter(|y| *y < 10_000)?;
    let (hour, minute, second) = d.to_hms();
    let fields: [(u32, usize, u8); 6] = [
        (year, 0, b'-'),
        (u32::from(u8::from(month)), 5, b'-'),
        (u32::from(day), 8, b'T'),
        (u32::from(hour), 11, b':'),
        (u32::from(minute), 14, b':'),
        (u32::from(second), 17, 0),
    ];
    for (value, at, then) in fields {
        let width = if at == 0 { 4 } else { 2 };
        put_digits(buf, at, value, width);
        if then != 0 {
            buf[at + width] = then;
        }
    }
    Some(WHOLE_SECONDS)
}

/// `value` in `width` decimal digits at `buf[at..]`, zero-padded.
fn put_digits(buf: &mut [u8], at: usize, value: u32, width: usize) {
    let mut v = value;
    for b in buf[at..at + width].iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Calls `f` with `t` in RFC 3339, formatted on the stack; `""` when it cannot be shown.
fn with_rfc3339<R>(t: SystemTime, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; RFC3339_MAX];
    let n = format_rfc3339(t, &mut buf).unwrap_or(0);
    // Only ASCII digits and separators were written.
    f(std::str::from_utf8(&buf[..n]).unwrap_or_default())
}

/// `t` as the audit trail writes times (RFC 3339, UTC), for messages.
pub fn rfc3339(t: SystemTime) -> String {
    with_rfc3339(t, str::to_owned)
}

fn as_rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    with_rfc3339(*t, |text| s.serialize_str(text))
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

    /// Why records cannot be written now (they are kept for later, or lost), or `None`.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Records lost so far because the output failed for longer than they could be kept.
    fn lost(&self) -> u64 {
        0
    }
}

/// Stamps the time and hands a record to the sink; summarises repeated refusals
/// (`repeats`).
#[derive(Debug, Clone)]
pub struct Audit {
    sink: Arc<dyn AuditSink>,
    repeats: Arc<Repeats>,
}

impl Audit {
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Audit {
            sink,
            repeats: Arc::default(),
        }
    }

    /// Why the trail cannot be written now (its output fails or stalls), or `None` (two
    /// atomic loads when it can).
    pub fn failure(&self) -> Option<String> {
        self.sink.failure()
    }

    /// Records lost so far because the output failed for longer than they could be kept.
    pub fn lost(&self) -> u64 {
        self.sink.lost()
    }

    pub fn record(&self, mut record: AuditRecord) {
        record.time = SystemTime::now();
        if record.repeatable {
            for r in self
                .repeats
                .admit(record, Instant::now())
                .into_iter()
                .flatten()
            {
                self.sink.write(r);
            }
        } else {
            self.sink.write(record);
        }
    }

    /// Writes the summaries of repeated refusals whose window has closed, until dropped.
    pub async fn summarise(self) {
        // A summary is written at most a quarter window after its window closes.
        let mut tick = tokio::time::interval(repeats::WINDOW / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for r in self.repeats.closed(Instant::now()) {
                self.sink.write(r);
            }
        }
    }

    /// Writes every summary held, then blocks until the records so far are written; call
    /// it off the async runtime.
    pub fn flush(&self) {
        for r in self.repeats.drain() {
            self.sink.write(r);
        }
        self.sink.flush();
    }
}

/// Bytes of serialised records a shard holds before its writers wait for the writer thread
/// (about 1,700 records; far more than the broker serves per pause).
const SHARD_LIMIT: usize = 1 << 20;
/// Bytes of records kept while the output fails (a full disk, a closed stdout), written once
/// it works again: about 130,000 records. While it fails the broker serves no token (unless
/// configured to), so these are mostly refusals; beyond them records are lost and counted.
const KEEP_ON_ERROR: usize = 64 << 20;

/// How long a write of the audit trail may go without returning before the trail counts as
/// failing (a pipe nobody reads, a hung network disk): no token is served meanwhile (unless
/// configured to).
const STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// JSON lines to stdout or an append-only file, written in batches by a thread of its own
/// (`lines::Lines`): a request serialises its record straight into its thread's shard
/// buffer. When the writer falls behind by a whole shard, requests wait for it (at most
/// `STALL`; in `block_in_place` on a runtime worker).
pub struct JsonLines {
    lines: Lines,
}

impl fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JsonLines")
    }
}

impl JsonLines {
    pub fn stdout() -> std::io::Result<Self> {
        Self::spawn(Box::new(std::io::stdout()), SHARD_LIMIT)
    }

    /// Appends to `path`, following it through log rotation (`FollowedFile`).
    pub fn file(path: &Path) -> std::io::Result<Self> {
        Self::spawn(Box::new(FollowedFile::open(path)?), SHARD_LIMIT)
    }

    fn spawn(out: Box<dyn Output>, limit: usize) -> std::io::Result<Self> {
        let lines = Lines::spawn(
            out,
            lines::Options {
                thread: "audit-writer",
                limit,
                // Slower answers beat a gap in the audit trail.
                when_full: WhenFull::Wait,
                report_errors_as: Some("audit records"),
                keep_on_error: Some(KEEP_ON_ERROR),
                stall: Some(STALL),
            },
        )?;
        Ok(JsonLines { lines })
    }

    /// Times a request has waited for the writer so far.
    pub fn waits(&self) -> u64 {
        self.lines.full_count()
    }
}

impl AuditSink for JsonLines {
    fn write(&self, record: AuditRecord) {
        self.lines.append(|buf| {
            record.write_json(buf);
            buf.push(b'\n');
        });
    }

    fn flush(&self) {
        if !self.lines.flush() {
            tracing::error!(
                "the audit output is stalled: records not yet written may be lost at exit"
            );
        }
    }

    fn failure(&self) -> Option<String> {
        self.lines.failure()
    }

    fn lost(&self) -> u64 {
        self.lines.lost()
    }
}

/// The audit file, followed by its path. A log rotator renames (or removes) the file and
/// expects the writer to start a new one: when the path no longer names the open file (by
/// device and inode), the next batch opens the path anew. No signal is needed and no record
/// is lost: those written before the rotation are in the renamed file. Checked before every
/// batch that has records, so at most one batch (5 ms under load) lands in the old file
/// after the rename. A rotator that copies and truncates works too (the file is O_APPEND).
/// A file removed (not renamed) when no new one can be made fails the writes (`orphaned`).
struct FollowedFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// (device, inode) of `file`.
    id: (u64, u64),
    /// Reopening failed and was logged; logged again only after it worked once.
    reopen_failing: bool,
    /// The open file has no name left (removed, its directory too) and none can be made at
    /// the path: what is written to it is written to nothing anyone can read, so writes
    /// fail with this until a file can be made (the records are kept meanwhile, and the
    /// trail counts as failing).
    orphaned: Option<String>,
}

impl FollowedFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let (file, id) = Self::append(path)?;
        Ok(FollowedFile {
            path: path.to_owned(),
            file,
            id,
            reopen_failing: false,
            orphaned: None,
        })
    }

    fn append(path: &Path) -> std::io::Result<(std::fs::File, (u64, u64))> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let id = file_id(&file.metadata()?);
        Ok((file, id))
    }
}

/// (device, inode): which file a path or handle is.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

impl Output for FollowedFile {
    fn before_batch(&mut self) {
        if let Ok(m) = std::fs::metadata(&self.path)
            && file_id(&m) == self.id
        {
            return;
        }
        match Self::append(&self.path) {
            Ok((file, id)) => {
                // The old file is closed here; everything written to it was flushed.
                self.file = file;
                self.id = id;
                self.reopen_failing = false;
                self.orphaned = None;
                tracing::info!(
                    path = %self.path.display(),
                    "audit file renamed or removed (log rotation): writing to a new file at its path"
                );
            }
            // Removed, not renamed: no link to the open file is left.
            Err(e)
                if self.file.metadata().is_ok_and(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    m.nlink() == 0
                }) =>
            {
                self.orphaned = Some(format!(
                    "the audit file {} was removed and a new one cannot be created there: {e}",
                    self.path.display()
                ));
            }
            // Records keep going to the open (renamed) file meanwhile.
            Err(e) if !self.reopen_failing => {
                self.reopen_failing = true;
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "audit file renamed or removed, and a new one cannot be created at its path; still writing to the old one"
                );
            }
            Err(_) => {}
        }
    }
}

impl Write for FollowedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(why) = &self.orphaned {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                why.clone(),
            ));
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Keeps records in memory, for tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: Mutex<Vec<AuditRecord>>,
    /// What `failure` reports: an output that fails, for tests of fail-closed serving.
    failure: Mutex<Option<String>>,
    /// How long each write blocks: a slow output (a stalled pipe or disk), for tests.
    delay: Mutex<Option<std::time::Duration>>,
}

impl MemorySink {
    /// Makes the sink report `reason` as its output's failure (records are still kept).
    pub fn set_failure(&self, reason: Option<&str>) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = reason.map(str::to_owned);
    }

    /// Makes each write block its writer for `delay`, as a slow output does.
    pub fn set_write_delay(&self, delay: Option<std::time::Duration>) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

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
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    fn times_are_rfc3339_with_nanoseconds_and_out_of_range_times_do_not_panic() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 123_456_789);
        let mut r = record(1);
        r.time = t;
        // Past the year 9999, which RFC 3339 cannot show.
        r.expires_at = Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 40));
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(v["time"], "2027-01-15T08:00:00.123456789Z");
        assert_eq!(v["expires_at"], "");
        let before_epoch = SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(86_400);
        assert_eq!(
            with_rfc3339(before_epoch, str::to_owned),
            "1969-12-31T00:00:00Z"
        );
    }

    #[test]
    fn times_are_formatted_as_the_time_crate_formats_rfc3339() {
        use time::format_description::well_known::Rfc3339;
        let secs: [i64; 7] = [
            -62_167_219_200, // 0000-01-01
            -86_400,
            0,
            951_782_400, // 2000-02-29
            1_800_000_000,
            4_107_542_399,   // 2100-02-28T23:59:59
            253_402_300_799, // 9999-12-31T23:59:59
        ];
        let nanos = [0, 1, 10, 100_000_000, 120_000_000, 123_456_789, 999_999_999];
        for s in secs {
            for n in nanos {
                let whole = std::time::Duration::from_secs(s.unsigned_abs());
                let t = if s >= 0 {
                    SystemTime::UNIX_EPOCH + whole
                } else {
                    SystemTime::UNIX_EPOCH - whole
                } + std::time::Duration::from_nanos(n);
                let want = time::OffsetDateTime::from(t).format(&Rfc3339).unwrap();
                assert_eq!(with_rfc3339(t, str::to_owned), want, "{s}s {n}ns");
            }
        }
        // The years RFC 3339 cannot show.
        for t in [
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800),
            SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(62_167_219_201),
        ] {
            assert_eq!(with_rfc3339(t, str::to_owned), "");
        }
    }

    #[test]
    fn remembered_seconds_never_stand_in_for_other_seconds() {
        use time::format_description::well_known::Rfc3339;
        // Three times taking turns (more than the two remembered), repeats, and neighbours
        // one second apart, across the whole range.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut times = Vec::new();
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = x % 253_402_300_799;
            times.extend([
                base,
                base + 1,
                base,
                1_800_000_000,
                base,
                base.saturating_sub(1),
            ]);
        }
        for (i, s) in times.into_iter().enumerate() {
            let t = SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(s)
                + std::time::Duration::from_nanos(i as u64 % 3 * 250_000_000);
            let want = time::OffsetDateTime::from(t).format(&Rfc3339).unwrap();
            assert_eq!(with_rfc3339(t, str::to_owned), want, "{s}s");
        }
    }

    fn request_ids(path: &Path) -> Vec<String> {
        lines(path)
            .iter()
            .map(|v| v["request_id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn the_audit_file_follows_its_path_through_rotation_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = JsonLines::file(&path).unwrap();
        sink.write(record(1));
        sink.flush();
        // Rotation by renaming (logrotate's default): the next records start a new file.
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.write(record(2));
        sink.write(record(3));
        sink.flush();
        assert_eq!(request_ids(&dir.path().join("audit.jsonl.1")), ["req-1"]);
        assert_eq!(request_ids(&path), ["req-2", "req-3"]);
        // Removed outright: a new file again.
        std::fs::remove_file(&path).unwrap();
        sink.write(record(4));
        sink.flush();
        assert_eq!(request_ids(&path), ["req-4"]);
        // Copied and truncated in place: the same file, written from its new end.
        std::fs::File::create(&path).unwrap();
        sink.write(record(5));
        drop(sink);
        assert_eq!(request_ids(&path), ["req-5"]);
    }

    #[test]
    fn records_keep_going_to_the_old_file_while_a_new_one_cannot_be_made() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("audit.jsonl");
        let sink = JsonLines::file(&path).unwrap();
        sink.write(record(1));
        sink.flush();
        // The whole directory moves: no file can be made at the path (not even by root).
        let moved = dir.path().join("logs.old");
        std::fs::rename(&logs, &moved).unwrap();
        sink.write(record(2));
        sink.flush();
        std::fs::create_dir(&logs).unwrap();
        sink.write(record(3));
        drop(sink);
        assert_eq!(request_ids(&moved.join("audit.jsonl")), ["req-1", "req-2"]);
        assert_eq!(request_ids(&path), ["req-3"]);
    }

    #[test]
    fn a_removed_file_that_cannot_be_made_again_is_a_failure_and_its_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("audit.jsonl");
        let sink = JsonLines::file(&path).unwrap();
        sink.write(record(1));
        sink.flush();
        assert_eq!(sink.failure(), None);
        // The file and its directory are gone: records written to the open file would be
        // written to nothing anyone can read.
        std::fs::remove_dir_all(&logs).unwrap();
        sink.write(record(2));
        sink.flush();
        let failure = sink.failure().expect("the trail cannot be written");
        assert!(failure.contains("removed"), "{failure}");
        assert_eq!(sink.lost(), 0);
        // Once a file can be made at the path again, the kept records go there first.
        std::fs::create_dir(&logs).unwrap();
        sink.write(record(3));
        sink.flush();
        assert_eq!(sink.failure(), None);
        drop(sink);
        assert_eq!(request_ids(&path), ["req-2", "req-3"]);
    }

    #[test]
    fn a_full_shard_makes_the_request_wait_for_the_writer_and_nothing_is_lost() {
        let gate = Arc::new(crate::lines::gated::Gate::default());
        let gated = crate::lines::gated::Gated(gate.clone());
        let line = serde_json::to_vec(&record(0)).unwrap().len() + 1;
        // Room for ten records per shard.
        let sink = Arc::new(JsonLines::spawn(Box::new(gated), line * 10).unwrap());
        let sender = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    sink.write(record(i));
                }
            })
        };
        // The writer is stuck in its output, so the sender's shard fills and it waits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sink.waits() == 0 {
            assert!(std::time::Instant::now() < deadline, "sender never waited");
            std::thread::yield_now();
        }
        assert!(!sender.is_finished());
        let (buffered, shards) = sink.lines.buffered();
        assert!(buffered <= line * 10 * shards);
        gate.open();
        sender.join().unwrap();
        sink.flush();
        let text = gate.text();
        let ids: std::collections::HashSet<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string()
            })
            .collect();
        assert_eq!(ids.len(), 100);
    }

    #[test]
    fn the_written_json_is_what_serde_makes_of_the_record() {
        let mut plain = record(7);
        plain.time = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 5);
        let mut full = plain.clone();
        full.caller = Some("spiffe://x/\"quoted\"\\back".into());
        full.proof = Some(Proof::DevLoopback);
        full.app_id = Some("app é ✓".into());
        full.peer = Some("[2001:db8::1]:443".parse().unwrap());
        full.tenant = "t\u{0}\u{1f}\u{7f}\n\r\t\u{8}\u{c}end".into();
        full.scopes = vec!["a".into(), String::new(), "b/.default".into()];
        full.outcome = Outcome::Denied;
        full.code = "PERMISSION_DENIED";
        full.reason = Some("no grant for \"x\"".into());
        full.token_source = Some("CACHE");
        full.token_fingerprint = Some(crate::sensitive::fingerprint(b"x"));
        full.entra_correlation_id = Some("c".into());
        full.claims_digest = Some(crate::sensitive::fingerprint(b"claims"));
        full.repeats = Some(u64::MAX);
        full.repeatable = true;
        let mut far = plain.clone();
        far.peer = None;
        far.scopes = vec![];
        far.expires_at = Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 40));
        let gone = far.clone();
        for (r, outcome) in [
            (plain, Outcome::Allowed),
            (full, Outcome::Denied),
            (far, Outcome::Failed),
            (gone, Outcome::Cancelled),
        ] {
            let mut r = r;
            r.outcome = outcome;
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            let serde = serde_json::to_vec(&r).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(serde).unwrap()
            );
        }
    }

    #[test]
    fn strings_are_escaped_wherever_the_character_falls() {
        for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
            for len in 0..40 {
                for at in 0..=len {
                    let mut s = "x".repeat(len);
                    s.insert(at, special);
                    let mut ours = Vec::new();
                    json_str(&mut ours, &s);
                    assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
                let plain = "é".repeat(len);
                let mut ours = Vec::new();
                json_str(&mut ours, &plain);
                assert_eq!(ours, serde_json::to_vec(&plain).unwrap());
            }
        }
    }

    #[test]
    fn long_caller_strings_are_bounded_by_characters() {
        let long = "é".repeat(MAX_FIELD + 10);
        let r = AuditRecord::new("GetToken", "r", None, &long, &[]);
        assert_eq!(r.tenant.chars().count(), MAX_FIELD);
        assert!(long.starts_with(&r.tenant));
        let mut short = "short".to_owned();
        bound(&mut short);
        assert_eq!(short, "short");
        let scopes: Vec<String> = (0..MAX_SCOPES + 3).map(|i| format!("s{i}")).collect();
        let r = AuditRecord::new("GetToken", "r", None, "t", &scopes);
        assert_eq!(r.scopes, scopes[..MAX_SCOPES]);
        // A scope as long as a request may carry is recorded whole: two that differ only
        // past their 256th character are told apart; a longer one is cut there.
        let base = format!("api://{}", "a".repeat(crate::broker::MAX_SCOPE_LEN - 17));
        let served = [format!("{base}/x/.default"), format!("{base}/y/.default")];
        assert_eq!(served[0].len(), crate::broker::MAX_SCOPE_LEN);
        let r = AuditRecord::new("GetToken", "r", None, "t", &served);
        assert_eq!(r.scopes, served);
        let longer = [format!("{}z", served[0])];
        let r = AuditRecord::new("GetToken", "r", None, "t", &longer);
        assert_eq!(r.scopes, [served[0].clone()]);
    }
}
