//! Auditing of the calls tonic refuses before the API's handler runs: a message over the
//! decoding limit, one that is not the RPC's protobuf message, an unsupported compression.
//! They are a caller's requests refused, so the trail has them too (with the connection's
//! certificate caller, when it has one, and the status answered), as the handler's own
//! refusals are. So are the calls to a method the service does not have (`UNIMPLEMENTED`):
//! a caller probing for methods shows in the trail. Only the broker's own service is
//! wrapped, so health and reflection calls are not audited. A refused call of one of the
//! service's methods is counted in the request metrics too, as the handler counts its own;
//! a call to a method it lacks is not (its name is the caller's, not a bounded label).
//!
//! A call dropped before its handler ran (its deadline passed while its request had not
//! been read, or the drain bound at shutdown cut it) is recorded too,
//! as cancelled, and counted as the handler counts the calls it was cut from: every call to
//! the service leaves one record.
//!
//! Whether the handler ran is told by a thread-local flag the handler sets on entry, within
//! a poll of the call's future: no allocation, no lock, nothing shared per call.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;

use crate::access::Access;
use crate::audit::{AuditRecord, Outcome};
use crate::metrics::Metrics;
use crate::server::connections::CallerDeadline;
use crate::tls::{TlsPeer, VerifiedClient};

thread_local! {
    /// Set by a handler on entry; read and reset around each poll of a call's future.
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Called by each handler as it starts: the call is its to audit from then on.
pub(super) fn entered() {
    ENTERED.with(|e| e.set(true));
}

/// The API's service, auditing the calls it refuses, or that are dropped, before their
/// handler runs.
#[derive(Debug, Clone)]
pub struct AuditRefused<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What a call's record and count need of the broker: one reference count per call.
#[derive(Debug)]
struct Shared {
    access: Arc<Access>,
    metrics: Metrics,
    /// True once the broker is shutting down: its drain bound may have cut a call.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl<S> AuditRefused<S> {
    pub fn new(
        inner: S,
        access: Arc<Access>,
        metrics: Metrics,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        AuditRefused {
            inner,
            shared: Arc::new(Shared {
                access,
                metrics,
                shutdown,
            }),
        }
    }
}

impl<S: NamedService> NamedService for AuditRefused<S> {
    const NAME: &'static str = S::NAME;
}

/// Longest method name copied from a request into a record.
const MAX_METHOD: usize = 128;

/// What a refused call's record needs of its request, kept until its answer.
struct Asked {
    rpc: &'static str,
    /// The method asked for, when the service has no such method (`rpc` is `unknown`).
    unknown: Option<String>,
    peer: Option<SocketAddr>,
    client: Option<Arc<VerifiedClient>>,
    started: Instant,
    /// When the caller's deadline passes, if it set one.
    deadline: Option<tokio::time::Instant>,
}

impl<S, B> Service<http::Request<B>> for AuditRefused<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    S::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Refusable<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Every path under this service's name is routed here, and the service answers
        // only its methods' exact paths: any other (`.../Admin/GetToken` too) is one it lacks.
        let method = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            .and_then(|p| p.strip_prefix('/'));
        let (rpc, unknown) = match method {
            Some("GetToken") => ("GetToken", None),
            Some("WatchToken") => ("WatchToken", None),
            _ => {
                let path = req.uri().path().trim_start_matches('/');
                ("unknown", Some(path.chars().take(MAX_METHOD).collect()))
            }
        };
        let started = Instant::now();
        let ext = req.extensions();
        let deadline = ext.get::<CallerDeadline>().map(|d| d.0);
        let asked = match ext.get::<TlsPeer>() {
            Some(p) => Asked {
                rpc,
                unknown,
                peer: p.remote_addr,
                client: p.client_identity.clone(),
                started,
                deadline,
            },
            None => Asked {
                rpc,
                unknown,
                peer: ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()),
                client: None,
                started,
                deadline,
            },
        };
        Refusable {
            inner: self.inner.call(req),
            asked: Some(asked),
            entered: false,
            shared: self.shared.clone(),
        }
    }
}

/// A call's answer; written to the audit trail when the handler never ran, whether the call
/// was answered or dropped.
pub struct Refusable<F> {
    inner: F,
    /// Taken once the call is answered: left, the call was dropped unanswered.
    asked: Option<Asked>,
    entered: bool,
    shared: Arc<Shared>,
}

impl<F> Future for Refusable<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Saved and restored: a call polled within another's poll keeps them apart.
        let outer = ENTERED.with(|e| e.replace(false));
        let polled = Pin::new(&mut this.inner).poll(cx);
        this.entered |= ENTERED.with(|e| e.replace(outer));
        let Poll::Ready(Ok(mut answer)) = polled else {
            return polled;
        };
        let asked = this.asked.take();
        if !this.entered
            && let Some(asked) = asked
            && let Some(status) = tonic::Status::from_header_map(answer.headers())
            && status.code() != tonic::Code::Ok
        {
            let request_id = uuid::Uuid::new_v4().to_string();
            if let Ok(mut v) = request_id.parse::<http::HeaderValue>() {
                v.set_sensitive(true);
                answer.headers_mut().insert(super::REQUEST_ID_KEY, v);
            }
            if asked.unknown.is_none() {
                this.shared
                    .metrics
                    .request(asked.rpc, status.code(), asked.started.elapsed());
            }
            this.shared
                .access
                .audit()
                .record(record(asked, request_id, &status));
        }
        Poll::Ready(Ok(answer))
    }
}

impl<F> Drop for Refusable<F> {
    /// A call dropped unanswered before its handler ran: the handler's own record would
    /// have said so, had it started (`Unfinished`), so this one does.
    fn drop(&mut self) {
        if self.entered {
            return;
        }
        let Some(asked) = self.asked.take() else {
            return;
        };
        // Counted as the handler counts the calls it was cut from.
        let code = super::dropped_code(asked.deadline);
        let out_of_time = code == tonic::Code::DeadlineExceeded;
        if asked.unknown.is_none() {
            self.shared
                .metrics
                .request(asked.rpc, code, asked.started.elapsed());
        }
        let shutting_down = *self.shared.shutdown.borrow();
        self.shared.access.audit().record(dropped(
            asked,
            uuid::Uuid::new_v4().to_string(),
            out_of_time,
            shutting_down,
        ));
    }
}

/// A record of `asked`'s call, with its connection's certificate caller when it has one.
fn pending(asked: &Asked, request_id: String) -> AuditRecord {
    let mut r = AuditRecord::pending(asked.rpc, asked.peer);
    r.request_id = request_id;
    if let Some(Ok(id)) = asked.client.as_ref().map(|c| &c.identity) {
        r.caller = Some(id.id.clone());
        r.proof = Some(crate::authn::Proof::Mtls);
    }
    // A client can send these at will: summarised when repeated.
    r.repeatable = true;
    r
}

/// The record of a call dropped unanswered before its handler ran.
fn dropped(
    asked: Asked,
    request_id: String,
    out_of_time: bool,
    shutting_down: bool,
) -> AuditRecord {
    let mut r = pending(&asked, request_id);
    r.outcome = Outcome::Cancelled;
    r.code = super::error::code_name(tonic::Code::Cancelled);
    let why = if out_of_time {
        "the caller's deadline passed before the request was read"
    } else if shutting_down {
        "the broker was shutting down: its drain bound (server.shutdown_grace_secs) cut the request, or the caller cancelled it, before it was read"
    } else {
        "the caller cancelled the request before it was read"
    };
    r.reason = Some(match asked.unknown {
        Some(method) => format!("{why} (no such method: {method})"),
        None => why.into(),
    });
    r
}

fn record(asked: Asked, request_id: String, status: &tonic::Status) -> AuditRecord {
    let mut r = pending(&asked, request_id);
    // Over a limit is an access refusal; a request not read as one is invalid.
    r.outcome = match status.code() {
        tonic::Code::ResourceExhausted => Outcome::Denied,
        _ => Outcome::Failed,
    };
    r.code = super::error::code_name(status.code());
    r.reason = Some(match asked.unknown {
        Some(method) => format!("no such method: {method}"),
        None => format!("refused before it was read: {}", status.message()),
    });
    r
}
