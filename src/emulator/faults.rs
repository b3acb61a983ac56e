//! Fault injection and request accounting: a registry of bounded faults (latency, an answer
//! of any status with custom headers or body, hang, connection reset, an answer whose body
//! breaks off, an answer whose body never ends) set through the admin API, and the
//! middleware that classifies each request into a route, applies matching faults and counts
//! the outcome. Every fault is bounded by a count or a duration so a test can never leave the
//! emulator broken.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::state::Shared;

/// Route names, most specific first. A fault on `identity` matches every `identity.*` route.
pub(crate) const ROUTES: &[&str] = &[
    "identity.appservice",
    "identity.imds",
    "keyvault.sign",
    "keyvault.key",
    "keyvault.certificate",
    "keyvault.import",
    "keyvault.secret",
    "entra.token",
    "entra.discovery",
    "graph.list",
];

/// A fault as posted to `POST /faults`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSpec {
    pub route: String,
    /// Only requests for this tenant (id or domain): Entra routes by the URL, Graph routes by
    /// the bearer token. Refused on routes that have no tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only Key Vault requests for this vault (name, or host `{name}.vault.azure.net`).
    #[serde(default)]
    pub vault: Option<String>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub fail: Option<FailSpec>,
    /// Applies to the next N matching requests.
    #[serde(default)]
    pub count: Option<u64>,
    /// Applies for this long after creation.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Never answer; close the connection when `duration_ms` is over.
    #[serde(default)]
    pub hang: bool,
    /// Close the connection without an answer.
    #[serde(default)]
    pub reset: bool,
    /// Answer as the service does, but send only the first half of the body; the rest never
    /// comes, and the connection is closed when `duration_ms` is over.
    #[serde(default)]
    pub stall_body: bool,
    /// Answer 200 with a JSON body that never ends (no `Content-Length`), as a misbehaving
    /// proxy might; it is sent until `duration_ms` is over (then the connection is closed)
    /// or the client goes away.
    #[serde(default)]
    pub endless_body: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailSpec {
    /// 200..=599: a 2xx with a malformed body tests an unreadable success.
    pub status: u16,
    /// Seconds, sent as `Retry-After`.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// Milliseconds, sent as `x-ms-retry-after-ms`.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// JSON response body; a service-shaped error body for the status is used when both
    /// `body` and `raw_body` are omitted.
    #[serde(default)]
    pub body: Option<Value>,
    /// Response body sent as is (not JSON), e.g. a proxy's HTML page or truncated JSON.
    #[serde(default)]
    pub raw_body: Option<String>,
    /// `Content-Type` of the answer: default `application/json`, or `text/plain;
    /// charset=utf-8` for `raw_body`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Extra response headers (name -> value), set last, e.g. `Retry-After` as an HTTP date.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Headers a fault may not set: they describe the body or the connection, which the server
/// owns; `content-type` has its own field.
const RESERVED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
];

impl FailSpec {
    fn validate(&self) -> Result<(), String> {
        if !(200..=599).contains(&self.status) {
            return Err(format!(
                "\"fail.status\" must be 200..=599, got {}",
                self.status
            ));
        }
        if self.body.is_some() && self.raw_body.is_some() {
            return Err(
                "use at most one of \"fail.body\" (JSON) and \"fail.raw_body\" (sent as is)".into(),
            );
        }
        if let Some(ct) = &self.content_type
            && HeaderValue::from_str(ct).is_err()
        {
            return Err(format!(
                "\"fail.content_type\" {ct:?} is not a valid header value"
            ));
        }
        for (name, value) in &self.headers {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                return Err(format!(
                    "\"fail.headers\": {name:?} is not a valid header name"
                ));
            };
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(format!(
                    "\"fail.headers\": {name:?} cannot be set by a fault (reserved: {}; use \"fail.content_type\" for the content type)",
                    RESERVED_HEADERS.join(", ")
                ));
            }
            if HeaderValue::from_str(value).is_err() {
                return Err(format!(
                    "\"fail.headers\": the value of {name:?} is not a valid header value"
                ));
            }
        }
        Ok(())
    }
}

struct Fault {
    id: u64,
    spec: FaultSpec,
    remaining: Option<u64>,
    deadline: Option<Instant>,
    hits: u64,
}

/// What the middleware must do with one request.
pub(crate) enum Action {
    Fail(FailSpec),
    Hang(Instant),
    Reset,
    StallBody(Instant),
    EndlessBody(Instant),
}

/// Routes whose requests name a tenant (`tenant` filter).
const TENANT_ROUTES: &[&str] = &["entra.token", "entra.discovery", "graph.list"];

/// Spent faults kept listed (for their hit counts) beyond which the oldest are dropped.
const SPENT_KEPT: usize = 256;

/// Every route `route` (a route or a prefix) matches.
fn covered(route: &str) -> impl Iterator<Item = &'static str> + '_ {
    ROUTES.iter().copied().filter(move |r| {
        *r == route
            || r.strip_prefix(route)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

pub(crate) struct Applied {
    pub ids: Vec<u64>,
    pub latency: Duration,
    pub action: Option<Action>,
}

/// The fault registry.
#[derive(Default)]
pub(crate) struct Faults {
    faults: Mutex<Vec<Fault>>,
    next_id: AtomicU64,
}

/// Marker put in a response's extensions to make the server drop the connection instead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResetConnection;

impl Faults {
    fn lock(&self) -> MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a fault; `vaults` are the configured vault names (for the `vault` filter).
    pub fn add(&self, mut spec: FaultSpec, vaults: &[String]) -> Result<u64, String> {
        if covered(&spec.route).next().is_none() {
            return Err(format!(
                "unknown route {:?}; known: {}",
                spec.route,
                ROUTES.join(", ")
            ));
        }
        // A filter the route cannot match would silently never fire.
        if spec.tenant.is_some() && !covered(&spec.route).all(|r| TENANT_ROUTES.contains(&r)) {
            return Err(format!(
                "route {:?} has no tenant: \"tenant\" filters only {} (or the prefixes entra, graph)",
                spec.route,
                TENANT_ROUTES.join(", ")
            ));
        }
        if let Some(v) = &spec.vault {
            if !covered(&spec.route).all(|r| r.starts_with("keyvault.")) {
                return Err(format!(
                    "route {:?} has no vault: \"vault\" filters only keyvault routes",
                    spec.route
                ));
            }
            let name = v.to_ascii_lowercase();
            let name = name.strip_suffix(".vault.azure.net").unwrap_or(&name);
            let Some(known) = vaults.iter().find(|k| k.eq_ignore_ascii_case(name)) else {
                return Err(format!(
                    "unknown vault {v:?}; configured: {}",
                    vaults.join(", ")
                ));
            };
            spec.vault = Some(known.clone());
        }
        if spec.count.is_none() && spec.duration_ms.is_none() {
            return Err("a fault must be bounded by \"count\" or \"duration_ms\"".into());
        }
        if spec.count == Some(0) || spec.duration_ms == Some(0) {
            return Err("\"count\" and \"duration_ms\" must be positive".into());
        }
        if spec.hang && spec.duration_ms.is_none() {
            return Err("\"hang\" needs \"duration_ms\" (how long requests hang)".into());
        }
        if spec.stall_body && spec.duration_ms.is_none() {
            return Err(
                "\"stall_body\" needs \"duration_ms\" (how long the rest of the body is held)"
                    .into(),
            );
        }
        if spec.endless_body && spec.duration_ms.is_none() {
            return Err(
                "\"endless_body\" needs \"duration_ms\" (how long the body is sent)".into(),
            );
        }
        let terminal = usize::from(spec.fail.is_some())
            + usize::from(spec.hang)
            + usize::from(spec.reset)
            + usize::from(spec.stall_body)
            + usize::from(spec.endless_body);
        if terminal > 1 {
            return Err(
                "use at most one of \"fail\", \"hang\", \"reset\", \"stall_body\", \"endless_body\""
                    .into(),
            );
        }
        if terminal == 0 && spec.latency_ms.unwrap_or(0) == 0 {
            return Err(
                "a fault needs \"latency_ms\", \"fail\", \"hang\", \"reset\", \"stall_body\" or \"endless_body\""
                    .into(),
            );
        }
        if let Some(f) = &spec.fail {
            f.validate()?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let deadline = spec.duration_ms.map(|ms| now + Duration::from_millis(ms));
        let mut faults = self.lock();
        let spent = faults.iter().filter(|f| !f.live(now)).count();
        if spent > SPENT_KEPT {
            let mut drop = spent - SPENT_KEPT;
            faults.retain(|f| {
                let keep = drop == 0 || f.live(now);
                if !keep {
                    drop -= 1;
                }
                keep
            });
        }
        faults.push(Fault {
            id,
            remaining: spec.count,
            deadline,
            spec,
            hits: 0,
        });
        Ok(id)
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Faults with their hit counts, spent ones included (`spent: true`) so a test can read
    /// how often a fault applied after it ran out.
    pub fn list(&self) -> Value {
        let now = Instant::now();
        let faults = self.lock();
        Value::Array(
            faults
                .iter()
                .map(|f| {
                    json!({
                        "id": f.id,
                        "route": f.spec.route,
                        "tenant": f.spec.tenant,
                        "vault": f.spec.vault,
                        "spent": !f.live(now),
                        "hits": f.hits,
                        "remaining": f.remaining,
                        "remaining_ms": f.deadline.map(|d| d.saturating_duration_since(now).as_millis() as u64),
                    })
                })
                .collect(),
        )
    }

    /// Consumes the faults that apply to one request: every matching latency-only fault, and
    /// the first matching fault with an action (`fail`, `hang`, `reset`). Later matching
    /// faults with an action do not apply, so they keep their count and hits for a later
    /// request.
    pub fn take(&self, route: &str, target: &Target<'_>) -> Option<Applied> {
        let now = Instant::now();
        let mut faults = self.lock();
        let mut applied = Applied {
            ids: Vec::new(),
            latency: Duration::ZERO,
            action: None,
        };
        for f in faults.iter_mut() {
            if !f.live(now) || !f.matches(route, target) {
                continue;
            }
            let action = if let Some(fail) = &f.spec.fail {
                Some(Action::Fail(fail.clone()))
            } else if f.spec.hang {
                // `hang` always has a deadline (checked in `add`).
                Some(Action::Hang(f.deadline.unwrap_or(now)))
            } else if f.spec.reset {
                Some(Action::Reset)
            } else if f.spec.stall_body {
                // Also always has a deadline.
                Some(Action::StallBody(f.deadline.unwrap_or(now)))
            } else if f.spec.endless_body {
                // Also always has a deadline.
                Some(Action::EndlessBody(f.deadline.unwrap_or(now)))
            } else {
                None
            };
            if action.is_some() && applied.action.is_some() {
                continue;
            }
            if let Some(r) = &mut f.remaining {
                *r -= 1;
            }
            f.hits += 1;
            applied.ids.push(f.id);
            applied.latency += Duration::from_millis(f.spec.latency_ms.unwrap_or(0));
            if action.is_some() {
                applied.action = action;
            }
        }
        // Spent faults stay listed (`spent: true`, for their hit counts) but never match again.
        (!applied.ids.is_empty()).then_some(applied)
    }
}

impl Fault {
    fn live(&self, now: Instant) -> bool {
        self.remaining != Some(0) && self.deadline.is_none_or(|d| now < d)
    }

    fn matches(&self, route: &str, target: &Target<'_>) -> bool {
        let route_ok = route == self.spec.route
            || route
                .strip_prefix(self.spec.route.as_str())
                .is_some_and(|rest| rest.starts_with('.'));
        let tenant_ok = match &self.spec.tenant {
            None => true,
            Some(t) => target.tenants.iter().any(|x| x.eq_ignore_ascii_case(t)),
        };
        let vault_ok = match &self.spec.vault {
            None => true,
            Some(v) => target.vault.is_some_and(|x| x.eq_ignore_ascii_case(v)),
        };
        route_ok && tenant_ok && vault_ok
    }
}

/// What a request is for, as fault filters see it.
pub(crate) struct Target<'a> {
    /// Tenant ids and domains the request names.
    pub tenants: &'a [String],
    /// The vault name of a Key Vault request.
    pub vault: Option<&'a str>,
}

/// Which emulated route a request is, from its method and path (`None`: not counted).
pub(crate) fn classify(method: &Method, path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["msi", "token"] => Some("identity.appservice"),
        ["metadata", "identity", "oauth2", "token"] => Some("identity.imds"),
        ["keys", .., "sign"] if method == Method::POST => Some("keyvault.sign"),
        ["keys", ..] => Some("keyvault.key"),
        ["certificates", .., "import"] if method == Method::POST => Some("keyvault.import"),
        ["certificates", ..] => Some("keyvault.certificate"),
        ["secrets", ..] => Some("keyvault.secret"),
        [_, "oauth2", "v2.0", "token"] | [_, "oauth2", "token"] => Some("entra.token"),
        [_, "v2.0", ".well-known", "openid-configuration"]
        | [_, ".well-known", "openid-configuration"]
        | [_, "discovery", "v2.0", "keys"]
        | [_, "discovery", "keys"]
        | ["common", "discovery", "instance"] => Some("entra.discovery"),
        ["graph", ..] => Some("graph.list"),
        _ => None,
    }
}

/// Applies faults and counts requests for the emulated services.
pub(crate) async fn middleware(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(route) = classify(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let vault = route
        .starts_with("keyvault.")
        .then(|| request_vault(&shared, req.headers(), req.uri()))
        .flatten();
    let tenants = if route.starts_with("entra.") {
        request_tenants(&shared, req.uri().path())
    } else if route.starts_with("graph.") {
        token_tenants(&shared, req.headers())
    } else {
        Vec::new()
    };
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let target = Target {
        tenants: &tenants,
        vault: vault.as_ref().map(|v| v.name.as_str()),
    };
    // Counted as it arrives, so a request a fault holds (a hang) shows at once, not when the
    // hang ends; its outcome when it is answered (`Outcome`).
    let resets = {
        let mut counters = shared.counters();
        let count = counters.routes.entry(route.to_owned()).or_default();
        count.total += 1;
        if traceparent.is_some() {
            count.traceparent = traceparent;
        }
        counters.resets
    };
    let mut outcome = Outcome {
        shared: shared.clone(),
        route,
        resets,
        ok: false,
    };
    let response = match shared.faults.take(route, &target) {
        None => next.run(req).await,
        Some(applied) => apply(&shared, route, vault.as_ref(), applied, req, next).await,
    };
    outcome.ok = response.status().as_u16() < 400;
    response
}

/// A counted request's outcome, recorded when it ends: its answer's status (< 400 is a
/// success), or a failure when it ends unanswered (its client went away while a fault held
/// it). Not when the counters were reset since it was counted: the reset cleared its total.
struct Outcome {
    shared: Arc<Shared>,
    route: &'static str,
    /// The counters' resets when it was counted.
    resets: u64,
    ok: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let mut counters = self.shared.counters();
        if counters.resets != self.resets {
            return;
        }
        let count = counters.routes.entry(self.route.to_owned()).or_default();
        if self.ok {
            count.success += 1;
        } else {
            count.failure += 1;
        }
    }
}

async fn apply(
    shared: &Shared,
    route: &str,
    vault: Option<&RequestVault>,
    applied: Applied,
    req: Request,
    next: Next,
) -> Response {
    let ids = applied
        .ids
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut shutdown = shared.shutdown.clone();
    if !applied.latency.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(applied.latency) => {}
            _ = shutdown.wait_for(|down| *down) => return reset_response(),
        }
    }
    let mut response = match applied.action {
        None => next.run(req).await,
        Some(Action::Fail(fail)) => fail_response(route, vault, &fail, shared.clock.now()),
        Some(Action::Reset) => reset_response(),
        Some(Action::Hang(deadline)) => {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.wait_for(|down| *down) => {}
            }
            reset_response()
        }
        Some(Action::StallBody(deadline)) => {
            stall_body(next.run(req).await, deadline, shutdown).await
        }
        Some(Action::EndlessBody(deadline)) => endless_body(deadline, shutdown),
    };
    if let Ok(v) = HeaderValue::from_str(&ids) {
        response.headers_mut().insert("x-emulator-faults", v);
    }
    response
}

/// `response` with only the first half of its body sent; the rest is held until `deadline`
/// (or shutdown), then the body fails, which closes the connection. `Content-Length` stays
/// the whole body's, so a client knows the body broke off rather than ended.
async fn stall_body(
    response: Response,
    deadline: Instant,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return reset_response();
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let head = bytes.slice(..bytes.len() / 2);
    let rest = async move {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
        Err(std::io::Error::other(
            "stall_body fault: the rest of the body never comes",
        ))
    };
    let chunks = futures::stream::once(async move { Ok::<_, std::io::Error>(head) })
        .chain(futures::stream::once(rest));
    Response::from_parts(parts, axum::body::Body::from_stream(chunks))
}

/// A 200 whose JSON body never ends: 64 KiB a millisecond (paced, so a client that reads it
/// whole fills its memory at a bounded rate), until `deadline` (or shutdown), when the body
/// fails, which closes the connection.
fn endless_body(deadline: Instant, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Response {
    const CHUNK: usize = 64 * 1024;
    let padding = axum::body::Bytes::from(vec![b'x'; CHUNK]);
    let end = async move {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
    };
    let more = futures::stream::unfold(Box::pin(end), move |mut end| {
        let padding = padding.clone();
        async move {
            tokio::select! {
                _ = &mut end => None,
                _ = tokio::time::sleep(Duration::from_millis(1)) => Some((Ok(padding), end)),
            }
        }
    })
    .chain(futures::stream::once(async {
        Err(std::io::Error::other(
            "endless_body fault: the fault's duration is over",
        ))
    }));
    let head = futures::stream::once(async {
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"value\":\""))
    });
    let mut response = Response::new(axum::body::Body::from_stream(head.chain(more)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn reset_response() -> Response {
    let mut r = StatusCode::BAD_GATEWAY.into_response();
    r.extensions_mut().insert(ResetConnection);
    r
}

/// The vault a Key Vault request is for (as the Key Vault handler picks it from the host).
pub(crate) struct RequestVault {
    name: String,
    tenant: String,
}

fn request_vault(
    shared: &Shared,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Option<RequestVault> {
    let host = super::state::host_of(headers, uri);
    let state = shared.state();
    let v = &state.vaults[state.vault_for_host(&host)?];
    Some(RequestVault {
        name: v.name.clone(),
        tenant: v.tenant_id.clone(),
    })
}

/// The tenant segment of an Entra URL plus the tenant's id and domain, for tenant filters.
fn request_tenants(shared: &Shared, path: &str) -> Vec<String> {
    let Some(seg) = path.trim_start_matches('/').split('/').next() else {
        return Vec::new();
    };
    let mut out = vec![seg.to_owned()];
    let state = shared.state();
    if let Some(i) = state.tenant(seg) {
        let t = &state.tenants[i];
        out.push(t.tenant_id.clone());
        out.extend(t.domain.clone());
    }
    out
}

/// The tenant named by the bearer token's `tid` (unverified: only for fault filters) with its
/// domain.
fn token_tenants(shared: &Shared, headers: &axum::http::HeaderMap) -> Vec<String> {
    let tid = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' ').map(|(_, t)| t.trim()))
        .and_then(super::keys::parse_jwt)
        .and_then(|jwt| jwt.claim_str("tid").map(str::to_owned));
    let Some(tid) = tid else {
        return Vec::new();
    };
    let state = shared.state();
    match state.tenant(&tid) {
        Some(i) => {
            let t = &state.tenants[i];
            let mut out = vec![t.tenant_id.clone()];
            out.extend(t.domain.clone());
            out
        }
        None => vec![tid],
    }
}

/// An answer shaped like the service behind `route` would send it: the spec's body (JSON or
/// raw) or the service's error for the status, then the spec's headers.
fn fail_response(
    route: &str,
    vault: Option<&RequestVault>,
    fail: &FailSpec,
    now: time::OffsetDateTime,
) -> Response {
    // `add` checked the range, so this never falls back.
    let status = StatusCode::from_u16(fail.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut trace = None;
    let mut response = match (&fail.raw_body, &fail.body) {
        (Some(raw), _) => {
            let mut r = (status, raw.clone()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        (None, Some(body)) => (status, axum::Json(body.clone())).into_response(),
        (None, None) => {
            let body = default_body(route, status, now);
            trace = body
                .get("trace_id")
                .and_then(Value::as_str)
                .and_then(|t| HeaderValue::from_str(t).ok());
            (status, axum::Json(body)).into_response()
        }
    };
    let headers = response.headers_mut();
    if let Some(ct) = fail
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    // As the services' own answers: Entra's request id is the error's trace id.
    if route.starts_with("keyvault.") || route.starts_with("entra.") {
        headers.insert(
            super::entra::REQUEST_ID,
            trace.unwrap_or_else(super::entra::fresh_request_id),
        );
    }
    // Key Vault's 401 always carries the bearer challenge (SDKs start their auth flow from it).
    if status == StatusCode::UNAUTHORIZED
        && route.starts_with("keyvault.")
        && let Some(v) = super::keyvault::challenge(vault.map_or("common", |v| v.tenant.as_str()))
    {
        headers.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Some(s) = fail.retry_after {
        headers.insert("retry-after", HeaderValue::from(s));
    }
    if let Some(ms) = fail.retry_after_ms {
        headers.insert("x-ms-retry-after-ms", HeaderValue::from(ms));
    }
    for (name, value) in &fail.headers {
        // Checked in `add`.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    response
}

/// The status's reason phrase as a code (`Request Timeout` -> `RequestTimeout`).
fn reason_code(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("Error")
        .split([' ', '-'])
        .collect()
}

/// The error body each service sends with `status` (`{}` for a success).
fn default_body(route: &str, status: StatusCode, now: time::OffsetDateTime) -> Value {
    let injected = format!("The service returned {status} (injected by the emulator).");
    if status.is_success() {
        return json!({});
    }
    let code = status.as_u16();
    if route.starts_with("keyvault.") {
        let not_found = match route {
            "keyvault.sign" | "keyvault.key" => "KeyNotFound",
            "keyvault.secret" => "SecretNotFound",
            _ => "CertificateNotFound",
        };
        let (code, message) = match code {
            400 => ("BadParameter".to_owned(), injected),
            401 => (
                "Unauthorized".to_owned(),
                "AKV10000: Request is missing a Bearer or PoP token.".to_owned(),
            ),
            403 => (
                "Forbidden".to_owned(),
                "Caller is not authorized to perform action on resource. (injected by the emulator)"
                    .to_owned(),
            ),
            404 => (
                not_found.to_owned(),
                "The object was not found in this key vault (injected by the emulator).".to_owned(),
            ),
            429 => (
                "Throttled".to_owned(),
                "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached".to_owned(),
            ),
            500 => ("InternalServerError".to_owned(), injected),
            501..=599 => ("ServiceUnavailable".to_owned(), injected),
            _ => (reason_code(status), injected),
        };
        let mut body = json!({"error": {"code": code, "message": message}});
        if status == StatusCode::FORBIDDEN {
            body["error"]["innererror"] = json!({"code": "ForbiddenByRbac"});
        }
        body
    } else if route.starts_with("graph.") {
        let code = match code {
            400 => "BadRequest".to_owned(),
            401 => "InvalidAuthenticationToken".to_owned(),
            403 => "Authorization_RequestDenied".to_owned(),
            404 => "ResourceNotFound".to_owned(),
            429 => "TooManyRequests".to_owned(),
            500..=599 => "ServiceNotAvailable".to_owned(),
            _ => reason_code(status),
        };
        json!({"error": {"code": code, "message": injected}})
    } else if route.starts_with("entra.") {
        let (error, code, text) = match code {
            401 => (
                "invalid_client",
                700027,
                "Client assertion failed signature validation. (Injected by the emulator.)",
            ),
            429 => (
                "temporarily_unavailable",
                90055,
                "TenantThrottlingError - There are too many incoming requests. This exception is thrown for blocked tenants.",
            ),
            400..=499 => (
                "invalid_request",
                90014,
                "The request is missing a required field or is malformed. (Injected by the emulator.)",
            ),
            _ => (
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Try again.",
            ),
        };
        super::entra::error_body(error, code, text, None, now).0
    } else {
        let error = match code {
            400 => "invalid_request".to_owned(),
            401 => "unauthorized".to_owned(),
            429 => "too_many_requests".to_owned(),
            500..=599 => "service_unavailable".to_owned(),
            _ => reason_code(status).to_ascii_lowercase(),
        };
        json!({"error": error, "error_description": format!("The managed identity endpoint returned {status} (injected by the emulator).")})
    }
}
