//! The gRPC API: `tokenbroker.v1.TokenBroker`. Thin handlers that decode requests, admit
//! them through `access` (authenticate, rate limit, authorize, audit), call the broker, and
//! encode responses; errors become status only through `error`.

pub mod error;
mod refused;

pub use refused::AuditRefused;

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

use crate::access::{Access, AccessError};
use crate::audit::{AuditRecord, Outcome};
use crate::authn::{Caller, ClientCert, Credentials};
use crate::broker::{Broker, BrokerError, TokenQuery, TokenSource, WatchedKey};
use crate::cache::{CachedToken, SlotState};
use crate::claims::Claims;
use crate::clock::Moment;
use crate::limits::{InFlight, WatchSlot};
use crate::proto;
use crate::proto::token_broker_server::TokenBroker;
use crate::sensitive::Sensitive;
use crate::telemetry::LogBudget;
use crate::tls::TlsPeer;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    broker: Broker,
    shutdown: tokio::sync::watch::Receiver<bool>,
    access: Arc<Access>,
    /// Whether spans are exported: then every request gets a span, otherwise only requests
    /// that carry a caller's trace context (a span per request costs more than a cache hit).
    traced: bool,
    /// Bounds the log lines of refused and failed requests (the audit trail has them all).
    refusal_log: Arc<LogBudget>,
}

/// Most log lines a second about refused or failed requests: a client stuck retrying a bad
/// request, or a flood of bad credentials, must not flood the log (each one is still in the
/// audit trail).
const REFUSAL_LINES_PER_SEC: u32 = 20;

/// The target of per-request spans; the log output leaves them out (the events that matter
/// carry the request id themselves), trace export keeps them.
pub const REQUEST_SPAN_TARGET: &str = "tokenbroker::request";

/// Why a request got no token: refused by access control, or failed in the broker.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Metadata key carrying the request id that the audit record shows.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// The verified client certificate of a request's connection.
enum PeerCert {
    /// From the broker's TLS listener: the identity read once per connection.
    Identity(Arc<crate::tls::VerifiedClient>),
    /// From any other transport that carries the chain (tonic's own TLS).
    Chain(Arc<Vec<rustls::pki_types::CertificateDer<'static>>>),
}

/// What a request carries that authentication and audit look at.
struct Envelope {
    request_id: String,
    peer_cert: Option<PeerCert>,
    authorization: Option<Sensitive>,
    remote_addr: Option<std::net::SocketAddr>,
}

impl Envelope {
    fn of<T>(request: &Request<T>) -> Envelope {
        let (peer_cert, remote_addr) = match request.extensions().get::<TlsPeer>() {
            Some(p) => (
                p.client_identity.clone().map(PeerCert::Identity),
                p.remote_addr,
            ),
            None => (
                request.peer_certs().map(PeerCert::Chain),
                request.remote_addr(),
            ),
        };
        Envelope {
            request_id: uuid::Uuid::new_v4().to_string(),
            peer_cert,
            // Wrapped at once: the header is a credential.
            authorization: request
                .metadata()
                .get("authorization")
                .map(|v| Sensitive::new(String::from_utf8_lossy(v.as_bytes()).into_owned())),
            remote_addr,
        }
    }

    /// The connection's verified client certificate, to check again later.
    fn verified_client(&self) -> Option<Arc<crate::tls::VerifiedClient>> {
        match &self.peer_cert {
            Some(PeerCert::Identity(v)) => Some(v.clone()),
            _ => None,
        }
    }

    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            client_cert: match &self.peer_cert {
                Some(PeerCert::Identity(id)) => Some(ClientCert::Identity(&id.identity)),
                Some(PeerCert::Chain(chain)) => chain.first().map(ClientCert::Leaf),
                None => None,
            },
            authorization: self.authorization.clone(),
            remote_addr: self.remote_addr,
        }
    }

    /// The request's audit record; its id, tenant and scopes are moved in at the end.
    fn audit(&self, rpc: &'static str) -> AuditRecord {
        AuditRecord::pending(rpc, self.remote_addr)
    }

    fn tag<T>(&self, mut r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        if let Ok(mut v) = self
            .request_id
            .parse::<tonic::metadata::AsciiMetadataValue>()
        {
            // Never indexed: a value unique per response would only churn both ends' HPACK
            // tables, evicting the headers every response repeats.
            v.set_sensitive(true);
            match &mut r {
                Ok(resp) => {
                    resp.metadata_mut().insert(REQUEST_ID_KEY, v);
                }
                Err(status) => {
                    status.metadata_mut().insert(REQUEST_ID_KEY, v);
                }
            }
        }
        r
    }
}

/// What admission establishes about a request.
struct Admitted<'s, 'a> {
    /// Normalised; borrowed from the request when already in normal form.
    scopes: Cow<'s, [String]>,
    /// Held while the request runs (a watch: while it is admitted).
    _in_flight: InFlight<'a>,
    /// The caller's place among its own requests in flight, held as long.
    _caller_in_flight: crate::limits::CallerSlot,
    /// When the caller's credential stops being accepted.
    valid_until: Option<SystemTime>,
    /// How the caller was proven.
    proof: crate::authn::Proof,
}

/// A request's audit record and what it asked for, until the request is answered. Dropped
/// unanswered (the caller cancelled, or its deadline passed, while the request waited for
/// its credentials to be checked or its token to be fetched), it writes the record as
/// cancelled: every request is in the audit trail, also one that got no answer.
struct Unfinished<'a> {
    service: &'a Service,
    env: &'a Envelope,
    method: &'static str,
    started: Instant,
    /// When the caller's deadline passes, if it set one.
    deadline: Option<tokio::time::Instant>,
    record: AuditRecord,
    tenant: String,
    scopes: Vec<String>,
    answered: bool,
}

impl Unfinished<'_> {
    /// The record, with the request's tenant and scopes moved in; nothing more is written
    /// on drop.
    fn answered(mut self) -> AuditRecord {
        self.answered = true;
        self.take_record()
    }

    /// The record, with the request's tenant and scopes moved in.
    fn take_record(&mut self) -> AuditRecord {
        let mut record = std::mem::replace(&mut self.record, AuditRecord::pending("", None));
        record.set_request(
            std::mem::take(&mut self.tenant),
            std::mem::take(&mut self.scopes),
        );
        record
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut record = self.take_record();
        record.request_id = self.env.request_id.clone();
        record.outcome = Outcome::Cancelled;
        record.code = error::code_name(tonic::Code::Cancelled);
        // At shutdown, the drain bound may have cut the request rather than its caller.
        record.reason = Some(if *self.service.shutdown.borrow() {
            "the broker was shutting down: its drain bound (server.shutdown_grace_secs) cut the request, or the caller cancelled it or its deadline passed, before the answer".into()
        } else {
            "the caller cancelled the request, or its deadline passed, before the answer".into()
        });
        self.service.access.audit().record(record);
        let code = dropped_code(self.deadline);
        self.service
            .broker
            .flow()
            .metrics
            .request(self.method, code, self.started.elapsed());
    }
}

impl Service {
    pub fn new(
        broker: Broker,
        shutdown: tokio::sync::watch::Receiver<bool>,
        access: Arc<Access>,
    ) -> Self {
        Service {
            broker,
            shutdown,
            access,
            traced: false,
            refusal_log: Arc::default(),
        }
    }

    /// Gives every request a span (when spans are exported), not only traced ones.
    pub fn traced(mut self, traced: bool) -> Self {
        self.traced = traced;
        self
    }

    /// Authenticates, rate-limits and authorizes; moves the caller's identity into the audit
    /// record; returns the normalised scopes (borrowed from the request when already in
    /// normal form), the in-flight slot to hold while the request runs, and when the
    /// caller's credential ends.
    async fn admit<'s>(
        &self,
        env: &Envelope,
        tenant: &str,
        scopes: &'s [String],
        audit: &mut AuditRecord,
    ) -> Result<Admitted<'s, '_>, Failure> {
        let in_flight = self.access.enter()?;
        let caller = self.access.authenticate(&env.credentials()).await?;
        let proof = caller.proof;
        let by_certificate = matches!(proof, crate::authn::Proof::Mtls);
        // A connection outlives the trust its certificate was verified under: a revocation
        // or a CA removed since then refuses it from its next request.
        let still_trusted = match &env.peer_cert {
            Some(PeerCert::Identity(c)) if by_certificate => c.still_trusted(),
            _ => Ok(()),
        };
        let allowed = still_trusted
            .map_err(|reason| Failure::from(AccessError::CertificateNoLongerAccepted { reason }))
            .and_then(|()| self.allow(&caller, tenant, scopes));
        let valid_until = caller.valid_until;
        audit.set_caller(caller);
        let (scopes, caller_in_flight) = allowed?;
        // After the caller's own checks, so a caller learns of its own mistakes first.
        self.access.check_audit()?;
        Ok(Admitted {
            scopes,
            _in_flight: in_flight,
            _caller_in_flight: caller_in_flight,
            valid_until,
            proof,
        })
    }

    /// An authenticated caller's rate limit and grants; the normalised scopes.
    fn allow<'s>(
        &self,
        caller: &Caller,
        tenant: &str,
        scopes: &'s [String],
    ) -> Result<(Cow<'s, [String]>, crate::limits::CallerSlot), Failure> {
        let slot = self.access.check_rate(caller)?;
        // Shape checks reveal nothing about the configuration, so they come first.
        if tenant.is_empty() {
            return Err(BrokerError::InvalidArgument {
                field: "tenant",
                message: "required: the configured tenant name".into(),
            }
            .into());
        }
        let scopes = crate::broker::normalise_scopes(scopes)?;
        self.access.authorize(caller, tenant, &scopes)?;
        Ok((scopes, slot))
    }

    /// The request's audit record, written as cancelled should the request be dropped
    /// before it is answered.
    fn unfinished<'a>(
        &'a self,
        method: &'static str,
        env: &'a Envelope,
        (started, deadline): (Instant, Option<tokio::time::Instant>),
        tenant: String,
        scopes: Vec<String>,
    ) -> Unfinished<'a> {
        Unfinished {
            service: self,
            env,
            method,
            started,
            deadline,
            record: env.audit(method),
            tenant,
            scopes,
            answered: false,
        }
    }

    /// The status for a failure, with the record's outcome, code and reason filled in.
    fn fail(&self, request_id: &str, audit: &mut AuditRecord, failure: &Failure) -> Status {
        let status = error::failure_status(failure);
        audit.outcome = match failure {
            Failure::Access(AccessError::AuditUnavailable { .. }) | Failure::Broker(_) => {
                Outcome::Failed
            }
            Failure::Access(_) => Outcome::Denied,
        };
        audit.repeatable = matches!(failure, Failure::Access(e) if e.is_repeatable());
        audit.code = error::code_name(status.code());
        // The failure's own words, not the status's advice nor a remembered failure's
        // countdown: a reason that reads the same for every request the failure answers.
        audit.reason = Some(failure.to_string());
        if let Failure::Broker(e) = failure {
            audit.entra_correlation_id = error::entra_correlation_id(e);
        }
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(held_back) = self.refusal_log.admit(second, REFUSAL_LINES_PER_SEC) {
            if held_back > 0 {
                info!(
                    not_logged = held_back,
                    "refused or failed requests not logged (at most {REFUSAL_LINES_PER_SEC} a second); the audit trail accounts for every one"
                );
            }
            info!(
                request_id,
                rpc = audit.rpc,
                tenant = prefix(&audit.tenant, 64),
                code = audit.code,
                error = %failure,
                "request refused or failed"
            );
        }
        if let Failure::Access(
            AccessError::RateLimited { caller, .. }
            | AccessError::CallersFull { caller, .. }
            | AccessError::CallerInFlight { caller, .. },
        ) = failure
        {
            self.broker.flow().metrics.throttled(caller);
        }
        status
    }

    /// Tags the response with the request id, then moves the id into the audit record and
    /// writes it: every decision is in the audit trail.
    fn finish<T>(
        &self,
        env: Envelope,
        mut audit: AuditRecord,
        result: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let result = env.tag(result);
        audit.request_id = env.request_id;
        self.access.audit().record(audit);
        result
    }

    /// Counts a finished request by method, outcome and gRPC code.
    fn record<T>(&self, method: &'static str, started: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.broker
            .flow()
            .metrics
            .request(method, code, started.elapsed());
    }

    pub fn into_server(self) -> proto::token_broker_server::TokenBrokerServer<Self> {
        proto::token_broker_server::TokenBrokerServer::new(self)
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// When the request's caller's deadline passes, if it set one.
fn caller_deadline<T>(request: &Request<T>) -> Option<tokio::time::Instant> {
    request
        .extensions()
        .get::<crate::server::connections::CallerDeadline>()
        .map(|d| d.0)
}

/// The code a call dropped unanswered is counted under: DEADLINE_EXCEEDED once its caller's
/// `deadline` has passed (what its client reports, and what the alert on failing requests
/// counts: a slow upstream shows there, not as callers giving up), else CANCELLED.
fn dropped_code(deadline: Option<tokio::time::Instant>) -> tonic::Code {
    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
        tonic::Code::DeadlineExceeded
    } else {
        tonic::Code::Cancelled
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for log fields).
fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn source_name(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Cache => "CACHE",
        TokenSource::Exchange => "EXCHANGE",
        TokenSource::StaleWhileRefreshFailing => "STALE_WHILE_REFRESH_FAILING",
    }
}

/// What an audit record says of the token served: its source, expiry and fingerprint.
fn note_token(audit: &mut AuditRecord, t: &CachedToken, source: TokenSource, now: Moment) {
    audit.token_source = Some(source_name(source));
    audit.expires_at = Some(t.expires.wall_at(now));
    audit.token_fingerprint = Some(t.fingerprint);
}

/// The response for `t`, its times told in the wall-clock time of `now`.
fn response(t: &CachedToken, source: TokenSource, now: Moment) -> proto::GetTokenResponse {
    proto::GetTokenResponse {
        access_token: t.access_token.expose().to_owned(),
        token_type: t.token_type.to_owned(),
        expires_at: Some(timestamp(t.expires.wall_at(now))),
        refresh_at: Some(timestamp(t.refresh.wall_at(now))),
        tenant_id: String::from(&*t.tenant_id),
        client_id: String::from(&*t.client_id),
        scopes: t.scopes.to_vec(),
        source: match source {
            TokenSource::Cache => proto::TokenSource::Cache,
            TokenSource::Exchange => proto::TokenSource::Exchange,
            TokenSource::StaleWhileRefreshFailing => proto::TokenSource::StaleWhileRefreshFailing,
        } as i32,
    }
}

/// `min_validity` as a span; what protobuf's `Duration` forbids (nanos of a second or more)
/// and a negative span are the caller's to fix.
fn decode_duration(d: Option<prost_types::Duration>) -> Result<Option<Duration>, BrokerError> {
    let bad = |message: &str| BrokerError::InvalidArgument {
        field: "min_validity",
        message: message.into(),
    };
    let Some(d) = d else { return Ok(None) };
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(bad("must not be negative"));
    };
    if nanos >= 1_000_000_000 {
        return Err(bad(
            "nanos must be below 1000000000 (a protobuf Duration's whole seconds go in seconds)",
        ));
    }
    Ok(Some(Duration::new(seconds, nanos)))
}

/// A claims challenge as the caller passed it (empty: none); its faults are the caller's
/// to fix, told without quoting it.
fn decode_claims(claims: &str) -> Result<Option<Claims>, BrokerError> {
    if claims.is_empty() {
        return Ok(None);
    }
    Claims::parse(claims)
        .map(Some)
        .map_err(|message| BrokerError::InvalidArgument {
            field: "claims",
            message: format!(
                "{message} (the `claims` of the resource's WWW-Authenticate: Bearer error=\"insufficient_claims\" challenge)"
            ),
        })
}

type WatchStreamBox =
    Pin<Box<dyn Stream<Item = Result<proto::WatchTokenResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TokenBroker for Service {
    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        refused::entered();
        let started = Instant::now();
        let env = Envelope::of(&request);
        let deadline = caller_deadline(&request);
        let parent = crate::telemetry::remote_context(request.metadata());
        let proto::GetTokenRequest {
            tenant,
            scopes,
            min_validity,
            force_refresh,
            claims,
        } = request.into_inner();
        let span = if parent.is_some() || self.traced {
            info_span!(
                target: REQUEST_SPAN_TARGET,
                "GetToken",
                request_id = env.request_id.as_str(),
                tenant = prefix(&tenant, 64),
                scopes = scopes.len(),
            )
        } else {
            tracing::Span::none()
        };
        crate::telemetry::set_parent(&span, parent);
        let mut pending = self.unfinished("GetToken", &env, (started, deadline), tenant, scopes);
        let result = async {
            let p = &mut pending;
            let admitted = self
                .admit(&env, &p.tenant, &p.scopes, &mut p.record)
                .await?;
            let claims = decode_claims(&claims)?;
            p.record.claims_digest = claims.as_ref().map(Claims::digest);
            let query = TokenQuery {
                tenant: &p.tenant,
                scopes: &admitted.scopes,
                min_validity: decode_duration(min_validity)?,
                force_refresh,
                claims: claims.as_ref(),
            };
            let audit = &mut p.record;
            // The response and the audit fields are made from the token as lent by the cache.
            let served = self.broker.serve_token(query, |token, source, now| {
                // Every grant is in the audit log; this line is for debugging only.
                debug!(
                    request_id = env.request_id.as_str(),
                    source = source_name(source),
                    fingerprint = %token.fingerprint,
                    "token served"
                );
                note_token(audit, token, source, now);
                response(token, source, now)
            });
            Ok::<_, Failure>(served.await?)
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        let mut audit = pending.answered();
        let result = match result {
            Ok(response) => {
                audit.outcome = Outcome::Allowed;
                audit.code = error::code_name(tonic::Code::Ok);
                Ok(Response::new(response))
            }
            Err(f) => Err(self.fail(&env.request_id, &mut audit, &f)),
        };
        // After the audit write, which blocks while the audit output is slow: the duration
        // is the one the caller waited.
        let result = self.finish(env, audit, result);
        self.record("GetToken", started, &result);
        result
    }

    type WatchTokenStream = WatchStreamBox;

    async fn watch_token(
        &self,
        request: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        refused::entered();
        let started = Instant::now();
        let env = Envelope::of(&request);
        let deadline = caller_deadline(&request);
        let proto::WatchTokenRequest { tenant, scopes } = request.into_inner();
        let mut pending = self.unfinished("WatchToken", &env, (started, deadline), tenant, scopes);
        let admitted = async {
            let p = &mut pending;
            // The in-flight slot covers admission only: a watch is long-lived and idle.
            let admitted = self
                .admit(&env, &p.tenant, &p.scopes, &mut p.record)
                .await?;
            // Admitted, so authenticated: the record holds the caller's identity.
            let caller = p.record.caller.clone().unwrap_or_default();
            let slot = self.access.open_watch(&caller)?;
            let (rx, key) = self.broker.subscribe(&p.tenant, &admitted.scopes).await?;
            // A watch proven by the client certificate keeps passing the trust in force
            // (revocation lists reloaded since the handshake).
            let certificate = matches!(admitted.proof, crate::authn::Proof::Mtls)
                .then(|| env.verified_client())
                .flatten();
            // A watch proven by a bearer token keeps passing its verification against the
            // issuer's keys in use (a key withdrawn since refuses it).
            let bearer = matches!(admitted.proof, crate::authn::Proof::Jwt)
                .then(|| env.authorization.clone())
                .flatten();
            Ok::<_, Failure>((
                admitted.scopes.into_owned(),
                (admitted.valid_until, certificate, bearer),
                caller,
                slot,
                (rx, key),
            ))
        }
        .await;
        let mut audit = pending.answered();
        let (scopes, (valid_until, certificate, bearer), caller, slot, (rx, key)) = match admitted {
            Ok(a) => a,
            Err(f) => {
                let r = Err(self.fail(&env.request_id, &mut audit, &f));
                let r = self.finish(env, audit, r);
                self.record("WatchToken", started, &r);
                return r;
            }
        };
        audit.outcome = Outcome::Allowed;
        audit.code = error::code_name(tonic::Code::Ok);
        let mut sent = audit.clone();
        sent.request_id.clone_from(&env.request_id);
        let watcher = Watcher {
            service: self.clone(),
            rx: WatchStream::new(rx),
            key,
            caller,
            tenant: audit.tenant.clone(),
            scopes,
            valid_until,
            certificate,
            bearer,
            record: sent,
            _slot: slot,
            ended: false,
            seen_initial: false,
            last: SlotState::default(),
            said: None,
            sent_expires: None,
        };
        let stream = futures::stream::unfold(watcher, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        });
        let r = self.finish(
            env,
            audit,
            Ok(Response::new(Box::pin(stream) as WatchStreamBox)),
        );
        // A watch counts once, when admitted (after its audit write, as GetToken); its
        // stream is not a request.
        self.record("WatchToken", started, &r);
        r
    }
}

/// An admitted watch: sends its key's state whenever what it says changes (a new token,
/// refreshing failing or working again, the token sent expiring), until the stream ends.
struct Watcher {
    service: Service,
    rx: WatchStream<SlotState>,
    /// Whether the key's failure is remembered, told with it (`last_error`).
    key: WatchedKey,
    caller: String,
    tenant: String,
    /// Normalised.
    scopes: Vec<String>,
    /// When the caller's credential stops being accepted: the watch ends then.
    valid_until: Option<SystemTime>,
    /// The client certificate that proved the caller, checked again before each token.
    certificate: Option<Arc<crate::tls::VerifiedClient>>,
    /// The `authorization` header whose bearer token proved the caller, verified again
    /// before each token (cheap while the issuer's keys are those it verified against).
    bearer: Option<Sensitive>,
    /// The watch's record (its request id, caller, tenant and scopes), copied for each
    /// token sent and for the watch's end.
    record: AuditRecord,
    _slot: WatchSlot,
    ended: bool,
    /// Whether the stream's first state (the cache's, when the watch began) was seen.
    seen_initial: bool,
    /// The key's state as last seen: looked at again when the token sent expires.
    last: SlotState,
    /// What the last message said (its token, and whether the refresh was failing): a
    /// state that says the same is not sent again.
    said: Option<Said>,
    /// When the token last sent expires, until that is seen.
    sent_expires: Option<Moment>,
}

/// What a watch message said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Said {
    token: Option<crate::sensitive::Fingerprint>,
    failing: bool,
    /// Failing for good (remembered) rather than for a reason that may clear: a change
    /// either way is news to the watcher.
    refused: bool,
}

impl Watcher {
    /// The next message, or `None` once the stream ends: after the key's slot is gone, or
    /// after a final error (at shutdown, `UNAVAILABLE`). Each message is checked as a request would be: the
    /// caller's credential still accepted, the grant still in the policy in force (a revoked
    /// grant ends the watch at the next token instead of feeding the caller forever), and
    /// the audit trail writable; and each token sent is in the audit trail.
    async fn next(&mut self) -> Option<Result<proto::WatchTokenResponse, Status>> {
        if self.ended {
            return None;
        }
        let mut shutdown = self.service.shutdown.clone();
        let valid_until = self.valid_until;
        let expired = async move {
            match valid_until {
                Some(t) => {
                    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await;
                    t
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let clock = self.service.broker.clock().clone();
        loop {
            // The token last sent expiring is news (the watcher must not go on using it)
            // even when nothing is published: during an outage nothing is.
            let sent_expires = self.sent_expires;
            let token_expired = async {
                match sent_expires {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let state = tokio::select! {
                biased;
                // Not a clean end (OK), which a client may take for "finished": told to
                // reconnect, as a call at shutdown is.
                _ = shutdown.wait_for(|s| *s) => {
                    return Some(Err(self.end(BrokerError::ShuttingDown)));
                }
                at = &mut expired => {
                    return Some(Err(self.end(AccessError::CredentialExpired { at })));
                }
                state = self.rx.next() => match state {
                    Some(state) => state,
                    // The key's slot is gone (the broker is going): not the caller's doing.
                    None => {
                        self.ended = true;
                        return None;
                    }
                },
                () = token_expired => {
                    self.sent_expires = None;
                    self.last.clone()
                }
            };
            self.last.clone_from(&state);
            let failing = state.failure.is_some();
            // The stream's first state is what the cache held when the watch began.
            let initial = !std::mem::replace(&mut self.seen_initial, true);
            let now = self.service.broker.clock().moment();
            // A token kept through a long outage expires in the slot: it is never sent.
            let token = state
                .token
                .as_deref()
                .filter(|t| !t.remaining(now).is_zero());
            // Nothing to say until there is a token or a failure, nor what was said already.
            if token.is_none() && !failing {
                continue;
            }
            let said = Said {
                token: token.map(|t| t.fingerprint),
                failing,
                refused: failing && !state.failure_transient,
            };
            if self.said == Some(said) {
                continue;
            }
            let access = &self.service.access;
            if !access
                .policy()
                .current()
                .allows(&self.caller, &self.tenant, &self.scopes)
            {
                let caller = self.caller.clone();
                return Some(Err(self.end(AccessError::Denied { caller })));
            }
            // The timer above runs on the monotonic clock; after a suspend or a wall clock
            // stepped forward, the credential may have ended by the wall clock first.
            if let Some(at) = self.valid_until
                && at <= SystemTime::now()
            {
                return Some(Err(self.end(AccessError::CredentialExpired { at })));
            }
            let last_error = self.last_error(&state, now);
            let Some(token) = token else {
                self.said = Some(said);
                return Some(Ok(proto::WatchTokenResponse {
                    token: None,
                    refresh_failing: true,
                    last_error,
                }));
            };
            if let Some(c) = &self.certificate
                && let Err(reason) = c.check.still_accepted()
            {
                return Some(Err(
                    self.end(AccessError::CertificateNoLongerAccepted { reason })
                ));
            }
            if let Some(bearer) = &self.bearer {
                let creds = Credentials {
                    client_cert: None,
                    authorization: Some(bearer.clone()),
                    // No address: the failed-token limit guards the broker against forged tokens
                    // sent at will, and this one verified at admission. Charged to the
                    // caller's address, failures of others behind it (or its own, on
                    // purpose) would end the watch or spare it this check.
                    remote_addr: None,
                };
                match access.authenticate(&creds).await {
                    Ok(caller) if caller.id == self.caller => {}
                    // The same token names the same caller; were it ever otherwise, the
                    // grant checked above was not this caller's.
                    Ok(caller) => {
                        return Some(Err(self.end(AccessError::Denied { caller: caller.id })));
                    }
                    Err(e) => return Some(Err(self.end(e))),
                }
            }
            if let Err(e) = access.check_audit() {
                return Some(Err(self.end(e)));
            }
            let source = if failing {
                TokenSource::StaleWhileRefreshFailing
            } else if initial {
                TokenSource::Cache
            } else {
                TokenSource::Exchange
            };
            let mut sent = self.record.clone();
            note_token(&mut sent, token, source, now);
            access.audit().record(sent);
            self.said = Some(said);
            self.sent_expires = Some(token.expires);
            return Some(Ok(proto::WatchTokenResponse {
                token: Some(response(token, source, now)),
                refresh_failing: failing,
                last_error,
            }));
        }
    }

    /// Why the key's refresh fails, if it does: a configuration failure the broker
    /// remembers says so and for how long, as a `GetToken` caller is told, so that the
    /// watcher knows when the key is asked again (nothing is sent when that fails again).
    fn last_error(&self, state: &SlotState, now: Moment) -> String {
        let Some(failure) = &state.failure else {
            return String::new();
        };
        match self.key.remembered(now) {
            Some(left) if !state.failure_transient => {
                format!("{failure} {}", error::remembered_note(left))
            }
            _ => failure.clone(),
        }
    }

    /// Ends the watch with `e`, recorded in the audit trail.
    fn end(&mut self, e: impl Into<Failure>) -> Status {
        self.ended = true;
        let mut record = self.record.clone();
        let status = self
            .service
            .fail(&self.record.request_id, &mut record, &e.into());
        // One record per watch ended, never folded into a summary of repeats: each names
        // the stream (its request id) that stopped.
        record.repeatable = false;
        self.service.access.audit().record(record);
        status
    }
}

impl Drop for Watcher {
    /// A watch dropped before the broker ended it was closed by its caller (or its
    /// connection went): its end is in the audit trail, as the broker's ends are, so the
    /// trail tells how long each watch was fed.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut record = std::mem::replace(&mut self.record, AuditRecord::pending("", None));
        record.outcome = Outcome::Cancelled;
        record.code = error::code_name(tonic::Code::Cancelled);
        record.reason = Some("the caller closed the watch, or its connection ended".into());
        self.service.access.audit().record(record);
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_duration, prefix};
    use crate::broker::BrokerError;
    use std::time::Duration;

    #[test]
    fn min_validity_is_read_only_from_a_valid_non_negative_duration() {
        let d = |seconds, nanos| decode_duration(Some(prost_types::Duration { seconds, nanos }));
        assert_eq!(decode_duration(None).unwrap(), None);
        assert_eq!(d(0, 0).unwrap(), Some(Duration::ZERO));
        assert_eq!(
            d(300, 999_999_999).unwrap(),
            Some(Duration::new(300, 999_999_999))
        );
        for (seconds, nanos, says) in [
            (-1, 0, "negative"),
            (0, -1, "negative"),
            (-5, -500, "negative"),
            (i64::MIN, 0, "negative"),
            (0, 1_000_000_000, "below 1000000000"),
            (300, i32::MAX, "below 1000000000"),
        ] {
            match d(seconds, nanos) {
                Err(BrokerError::InvalidArgument { field, message }) => {
                    assert_eq!(field, "min_validity");
                    assert!(message.contains(says), "{seconds} {nanos}: {message}");
                }
                other => panic!("{seconds} {nanos}: {other:?}"),
            }
        }
    }

    #[test]
    fn log_prefixes_cut_at_character_boundaries() {
        assert_eq!(prefix("contoso", 64), "contoso");
        assert_eq!(prefix("ééé", 3), "é");
        assert_eq!(prefix("abc", 0), "");
    }
}
