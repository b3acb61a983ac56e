//! The broker's own managed identity tokens, cached and refreshed ahead of expiry, with the
//! managed identity endpoint's limits respected (IMDS allows 20 requests/s and 5 concurrent
//! requests per VM for identity). Wraps the `azure_identity` credential. Also the
//! `IdentityAssertions` seam: a user-assigned identity's token presented to Entra as the
//! client assertion of an app that trusts it through a federated identity credential.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::clock::{Clock, Moment, SystemClock};
use crate::sensitive::Sensitive;

/// Managed identity limits per VM (Azure IMDS documentation).
pub const MAX_CONCURRENT: usize = 5;
pub const MAX_PER_SECOND: u32 = 20;

/// Caches tokens per scope set; refreshes once half their remaining life has passed (MI
/// tokens live about 24 h), keeps serving the cached token while a refresh fails and it is
/// still valid, and lets one refresh per scope set run at a time.
pub struct CachingCredential {
    inner: Mutex<Arc<dyn TokenCredential>>,
    /// Makes a new inner credential to replace one whose token was refused (`refused`):
    /// the SDK's credentials cache tokens too, with no way to drop one.
    renew: Option<Renew>,
    cache: Mutex<HashMap<Vec<String>, Cached>>,
    /// A failed request's error, shared until then with every caller that has no usable
    /// token (`FAILURE_SHARED`).
    failed: Mutex<HashMap<Vec<String>, SharedUntil>>,
    flights: Mutex<HashMap<Vec<String>, Arc<tokio::sync::Mutex<()>>>>,
    limits: Arc<EndpointLimits>,
    /// Judges a token's age: its `expires_on` is wall-clock time, turned into a `Moment`
    /// when it arrives, so a wall clock stepped back later cannot stretch it.
    clock: Arc<dyn Clock>,
}

/// A failed request's error and until when it is shared.
type SharedUntil = (Moment, Arc<azure_core::Error>);

/// Makes a new inner credential; `None` when it cannot (the old one is kept).
pub type Renew = Box<dyn Fn() -> Option<Arc<dyn TokenCredential>> + Send + Sync>;

/// A token is no longer served from the cache within this of its expiry, even while its
/// refresh fails: a caller must have time to use it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
/// After a failed refresh, the cached token is served without asking the endpoint again
/// for this long.
const REFRESH_RETRY: Duration = Duration::from_secs(30);
/// The longest one request to the endpoint is waited for. IMDS and App Service answer in
/// well under a second; one that does not answer at all must fail the fetch as the
/// identity's, named so, before the fetch's first attempt (half its budget: 5 s by default)
/// is cut off and taken for Key Vault's silence.
pub const ANSWER_BOUND: Duration = Duration::from_secs(4);
/// The longest the request itself is waited for, within `ANSWER_BOUND` (which also covers
/// the waits for the endpoint's limits and for another caller's request): so the caller that
/// sent it gives up, and records the failure for the others, before they give up on it.
const REQUEST_BOUND: Duration = Duration::from_secs(3);
/// A request that failed, when no usable token is cached, is the answer of every caller for
/// this long (or the failure's `Retry-After`, up to `REFRESH_RETRY`): during an outage the
/// keys being fetched and their retries share one request instead of each making its own
/// (and, for a hung endpoint, each waiting `ANSWER_BOUND`).
const FAILURE_SHARED: Duration = Duration::from_secs(2);
/// A token that replaced a refused one and is refused in turn within this of its arrival is
/// kept: a new one would not fare better (the refusal is the identity's, not the token's),
/// and dropping it would send every refused call to the endpoint.
const REFUSED_AGAIN: Duration = Duration::from_secs(30);

/// The managed identity endpoint's limits are per host, so every credential of the process
/// (the broker's own, each federated identity's) shares one budget.
struct EndpointLimits {
    concurrency: Semaphore,
    /// The current one-second window: when it began, and the requests sent in it. On the
    /// monotonic clock: a wall clock stepped back must not stall requests for the step.
    rate: Mutex<Option<(tokio::time::Instant, u32)>>,
}

/// The window of `MAX_PER_SECOND`.
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl EndpointLimits {
    fn new() -> Self {
        EndpointLimits {
            concurrency: Semaphore::new(MAX_CONCURRENT),
            rate: Mutex::new(None),
        }
    }
}

fn endpoint_limits() -> Arc<EndpointLimits> {
    static LIMITS: std::sync::OnceLock<Arc<EndpointLimits>> = std::sync::OnceLock::new();
    LIMITS
        .get_or_init(|| Arc::new(EndpointLimits::new()))
        .clone()
}

#[derive(Clone)]
struct Cached {
    token: AccessToken,
    refresh_at: Moment,
    /// Served while refreshes fail until here (`EXPIRY_MARGIN` before it expires).
    usable_until: Moment,
    /// When it arrived.
    fetched_at: Moment,
    /// A service refused it: no longer served, replaced at the next call.
    refused: bool,
    /// It replaced a refused token: refused itself within `REFUSED_AGAIN`, it is kept.
    after_refusal: bool,
}

impl std::fmt::Debug for CachingCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingCredential").finish_non_exhaustive()
    }
}

impl CachingCredential {
    pub fn new(inner: Arc<dyn TokenCredential>) -> Self {
        Self::with_clock(inner, Arc::new(SystemClock))
    }

    pub fn with_clock(inner: Arc<dyn TokenCredential>, clock: Arc<dyn Clock>) -> Self {
        Self::with_limits(inner, clock, endpoint_limits())
    }

    fn with_limits(
        inner: Arc<dyn TokenCredential>,
        clock: Arc<dyn Clock>,
        limits: Arc<EndpointLimits>,
    ) -> Self {
        CachingCredential {
            inner: Mutex::new(inner),
            renew: None,
            cache: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            limits,
            clock,
        }
    }

    /// With `renew` making the inner credential anew after a refusal (`refused`).
    pub fn renewed_by(self, renew: Renew) -> Self {
        CachingCredential {
            renew: Some(renew),
            ..self
        }
    }

    /// The inner credential to ask; a new one (`renew`) after a refusal.
    fn inner(&self, after_refusal: bool) -> Arc<dyn TokenCredential> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if after_refusal && let Some(fresh) = self.renew.as_ref().and_then(|r| r()) {
            *inner = fresh;
        }
        inner.clone()
    }

    fn cached(&self, key: &[String]) -> Option<Cached> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// A service refused `token` (Key Vault's 401: expired by its clock, revoked, a
    /// continuous access evaluation challenge): it is no longer served, so the next caller
    /// (the SDK's answer to the challenge) gets a new one. Keyed by the token itself, so a
    /// refusal that arrives after a newer token was cached leaves that one alone. A token
    /// that replaced a refused one and is refused within `REFUSED_AGAIN` is kept: the
    /// refusal stands (a configuration problem), at most one new token per `REFUSED_AGAIN`.
    /// Whether it was dropped.
    pub fn refused(&self, token: &str) -> bool {
        let now = self.clock.moment();
        let mut dropped = false;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for c in cache.values_mut() {
            let again_soon = c.after_refusal && !(c.fetched_at + REFUSED_AGAIN).reached(now);
            if c.token.token.secret() == token && !c.refused && !again_soon {
                c.refused = true;
                c.refresh_at = now;
                c.usable_until = now;
                dropped = true;
            }
        }
        dropped
    }

    /// Waits for a slot in the current one-second window of the endpoint's rate limit.
    async fn pace(&self) {
        loop {
            let wait = {
                let mut rate = self.limits.rate.lock().unwrap_or_else(|p| p.into_inner());
                let now = tokio::time::Instant::now();
                let (start, sent) = rate.get_or_insert((now, 0));
                if now.saturating_duration_since(*start) >= RATE_WINDOW {
                    (*start, *sent) = (now, 0);
                }
                if *sent < MAX_PER_SECOND {
                    *sent += 1;
                    None
                } else {
                    Some(RATE_WINDOW.saturating_sub(now.saturating_duration_since(*start)))
                }
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
            }
        }
    }
}

#[async_trait]
impl TokenCredential for CachingCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        tokio::time::timeout(ANSWER_BOUND, self.token(scopes, options))
            .await
            .unwrap_or_else(|_| Err(no_answer(ANSWER_BOUND)))
    }
}

/// The endpoint kept a caller waiting past `bound`.
fn no_answer(bound: Duration) -> azure_core::Error {
    azure_core::Error::with_message(
        azure_core::error::ErrorKind::Credential,
        format!(
            "the managed identity endpoint did not answer within {}s",
            bound.as_secs()
        ),
    )
}

impl CachingCredential {
    /// `get_token`, unbounded.
    async fn token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let key: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let fresh = |c: &Cached| !c.refresh_at.reached(self.clock.moment());
        let usable = |c: &Cached| !c.usable_until.reached(self.clock.moment());
        if let Some(c) = self.cached(&key)
            && fresh(&c)
        {
            return Ok(c.token);
        }
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // A refresh is under way and the cached token is still good: don't wait for it.
        let _flight = match flight.try_lock() {
            Ok(g) => g,
            Err(_) => match self.cached(&key) {
                Some(c) if usable(&c) => return Ok(c.token),
                _ => flight.lock().await,
            },
        };
        // Someone else may have refreshed while we waited.
        if let Some(c) = self.cached(&key)
            && fresh(&c)
        {
            return Ok(c.token);
        }
        let usable_cached = self.cached(&key).filter(|c| usable(c));
        if usable_cached.is_none()
            && let Some(e) = self.failed_lately(&key)
        {
            return Err(shared(e));
        }
        let after_refusal = self.cached(&key).is_some_and(|c| c.refused);
        let _permit = self.limits.concurrency.acquire().await;
        self.pace().await;
        let inner = self.inner(after_refusal);
        let answer = tokio::time::timeout(REQUEST_BOUND, inner.get_token(scopes, options))
            .await
            .unwrap_or_else(|_| Err(no_answer(REQUEST_BOUND)));
        match answer {
            Ok(token) => {
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                let now = self.clock.moment();
                // Its life left as the endpoint's clock and ours agree now (none if already
                // past), counted from here on both clocks.
                let life = Duration::try_from(token.expires_on - OffsetDateTime::from(now.wall))
                    .unwrap_or_default();
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    key,
                    Cached {
                        token: token.clone(),
                        // Half its life, as it came: a token an endpoint answered from its
                        // cache near its end is asked for again sooner each time (a few
                        // times in its last minute), but never served with less than half
                        // of what it had.
                        refresh_at: now + life / 2,
                        usable_until: now + life.saturating_sub(EXPIRY_MARGIN),
                        fetched_at: now,
                        refused: false,
                        after_refusal,
                    },
                );
                Ok(token)
            }
            Err(e) => match self.cached(&key) {
                Some(c) if usable(&c) => {
                    tracing::warn!(error = %e, "managed identity token refresh failed; using the cached token");
                    // The next try waits a while: otherwise, during an endpoint outage, the
                    // caller that wins each refresh would sit through the SDK's retries
                    // before getting the token the others are served at once.
                    let retry = c.usable_until.earlier(self.clock.moment() + REFRESH_RETRY);
                    if let Some(entry) = self
                        .cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&key)
                    {
                        entry.refresh_at = retry;
                    }
                    Ok(c.token)
                }
                _ => {
                    let e = Arc::new(e);
                    let hold = failure_hint(&e)
                        .unwrap_or_default()
                        .clamp(FAILURE_SHARED, REFRESH_RETRY);
                    self.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (self.clock.moment() + hold, e.clone()));
                    Err(shared(e))
                }
            },
        }
    }
}

impl CachingCredential {
    /// The failure shared with callers of `key` now, if one is.
    fn failed_lately(&self, key: &[String]) -> Option<Arc<azure_core::Error>> {
        let now = self.clock.moment();
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match failed.get(key) {
            Some((until, e)) if !until.reached(now) => Some(e.clone()),
            Some(_) => {
                failed.remove(key);
                None
            }
            None => None,
        }
    }
}

/// The retry hint of the endpoint's, or Entra's (workload identity), failed answer under `e`.
fn failure_hint(e: &azure_core::Error) -> Option<Duration> {
    crate::signer::keyvault::answered_retry_after(e)
        .or_else(|| crate::outbound::entra_answer(e).and_then(|a| a.retry_after))
}

/// A failed request's error as one of the callers that share it gets it: of its kind, with
/// it (and everything under it, read by the signer's and the federated identities'
/// classification) as its cause.
fn shared(e: Arc<azure_core::Error>) -> azure_core::Error {
    azure_core::Error::new(e.kind().clone(), SharedFailure(e))
}

#[derive(Debug)]
struct SharedFailure(Arc<azure_core::Error>);

impl std::fmt::Display for SharedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Managed identity tokens to present as client assertions: the app registration trusts
/// the identity through a federated identity credential, so no key is needed at all.
#[async_trait]
pub trait IdentityAssertions: Send + Sync + std::fmt::Debug + 'static {
    /// The token of the user-assigned identity `client_id` for `audience`
    /// (`api://AzureADTokenExchange` in the public cloud).
    async fn assertion(&self, client_id: &str, audience: &str) -> Result<Sensitive, IdentityError>;
}

/// Why no managed identity assertion could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The broker was not configured with this identity (a tenant added at run time).
    #[error("managed identity {0} is not configured on this broker")]
    NotConfigured(String),
    /// The managed identity endpoint failed or was unreachable, or Entra could not answer the
    /// workload identity's request for the identity's token (or the broker's breaker for it
    /// is open): worth asking again.
    #[error("managed identity token unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The managed identity endpoint refused the identity (400, 401 or 403: IMDS's "Identity
    /// not found", App Service's "Unable to load the proper Managed Identity"): it is not
    /// assigned to this host, or the client id is not the identity's. Asking again will not
    /// help.
    #[error(
        "the managed identity endpoint refused identity {client_id} (HTTP {status}): {message}"
    )]
    NotAssigned {
        client_id: String,
        status: u16,
        message: String,
    },
    /// The managed identity endpoint's address answered with a permanent redirect (301,
    /// 308): no managed identity endpoint answers there. Asking again will not help.
    #[error("no managed identity endpoint answered for identity {client_id}: {message}")]
    Misdirected { client_id: String, message: String },
    /// Entra refused the broker's workload identity the identity's token for a reason of
    /// configuration (the identity does not trust the pod's service account, or is not in
    /// `AZURE_TENANT_ID`'s tenant); Entra's answer as the broker reads its own.
    #[error("Entra refused the workload identity a token of identity {client_id}: {answer}")]
    Refused {
        client_id: String,
        answer: Box<crate::entra::EntraError>,
    },
}

/// Why the identity `client_id`'s token could not be had (`e`, the credential's error), read
/// as the broker reads the answers to its own requests: Entra's answer to the workload
/// identity (`outbound::entra_answer`) by its class; the managed identity endpoint's by its
/// status. Refusals are for good; throttling, outages, IMDS's 404 and 410 (the identity
/// being set up), a page that is not Entra's and no answer at all are worth another try.
fn identity_error(client_id: &str, audience: &str, e: &azure_core::Error) -> IdentityError {
    use crate::entra::EntraErrorClass::{Caller, Configuration};
    match crate::outbound::entra_answer(e) {
        Some(answer) if matches!(answer.class, Configuration | Caller) => IdentityError::Refused {
            client_id: client_id.to_owned(),
            answer: Box::new(answer.clone()),
        },
        Some(answer) => IdentityError::Unavailable {
            message: format!("identity {client_id}, audience {audience}: {answer}"),
            retry_after: answer.retry_after,
        },
        None => {
            let message = crate::signer::keyvault::root_message(e);
            if crate::outbound::redirect(e).is_some_and(|r| r.is_permanent_redirect()) {
                return IdentityError::Misdirected {
                    client_id: client_id.to_owned(),
                    message,
                };
            }
            match crate::signer::keyvault::endpoint_refusal(e) {
                Some(refusal) => IdentityError::NotAssigned {
                    client_id: client_id.to_owned(),
                    status: refusal.status,
                    message,
                },
                _ => IdentityError::Unavailable {
                    message: format!("identity {client_id}, audience {audience}: {message}"),
                    retry_after: crate::signer::keyvault::answered_retry_after(e),
                },
            }
        }
    }
}

/// `IdentityAssertions` from the host's managed identities: one caching credential per
/// configured client id, made at start.
pub struct ManagedIdentityAssertions {
    credentials: HashMap<String, Arc<dyn TokenCredential>>,
}

impl std::fmt::Debug for ManagedIdentityAssertions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedIdentityAssertions")
            .field("identities", &self.credentials.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ManagedIdentityAssertions {
    /// `credentials` by client id.
    pub fn new(credentials: HashMap<String, Arc<dyn TokenCredential>>) -> Self {
        ManagedIdentityAssertions { credentials }
    }
}

#[async_trait]
impl IdentityAssertions for ManagedIdentityAssertions {
    async fn assertion(&self, client_id: &str, audience: &str) -> Result<Sensitive, IdentityError> {
        let credential = self
            .credentials
            .get(client_id)
            .ok_or_else(|| IdentityError::NotConfigured(client_id.to_owned()))?;
        let scope = format!("{}/.default", audience.trim_end_matches('/'));
        let token = credential
            .get_token(&[&scope], None)
            .await
            .map_err(|e| identity_error(client_id, audience, &e))?;
        Ok(Sensitive::new(token.token.secret()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Issues `t0`, `t1`, … living `lifetime` from the clock's now; fails while `fail` is set.
    #[derive(Debug)]
    struct Counting {
        calls: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
        clock: crate::clock::ManualClock,
        /// When set, every token expires then (an endpoint answering from its cache).
        expires: std::sync::Mutex<Option<OffsetDateTime>>,
    }

    /// How long `Counting`'s tokens live, as managed identity tokens do.
    const LIFETIME: azure_core::time::Duration = azure_core::time::Duration::hours(24);

    impl Counting {
        fn new(clock: &crate::clock::ManualClock) -> Arc<Counting> {
            Arc::new(Counting {
                calls: AtomicU32::new(0),
                fail: false.into(),
                clock: clock.clone(),
                expires: std::sync::Mutex::new(None),
            })
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl TokenCredential for Counting {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "down",
                ));
            }
            let expires = *self.expires.lock().unwrap();
            Ok(AccessToken::new(
                format!("t{n}"),
                expires.unwrap_or_else(|| OffsetDateTime::from(self.clock.now()) + LIFETIME),
            ))
        }
    }

    const VAULT: &str = "https://vault.azure.net/.default";

    async fn token(c: &CachingCredential) -> azure_core::Result<String> {
        c.get_token(&[VAULT], None)
            .await
            .map(|t| t.token.secret().to_owned())
    }

    /// A caching credential over `Counting`, both on one manual clock.
    fn on_manual_clock() -> (crate::clock::ManualClock, Arc<Counting>, CachingCredential) {
        let clock = crate::clock::ManualClock::new();
        let inner = Counting::new(&clock);
        let c = CachingCredential::with_clock(inner.clone(), Arc::new(clock.clone()));
        (clock, inner, c)
    }

    fn hours(h: f64) -> Duration {
        Duration::from_secs_f64(h * 3600.0)
    }

    #[tokio::test]
    async fn refreshes_once_half_the_remaining_life_has_passed_and_not_before() {
        let (clock, inner, c) = on_manual_clock();
        assert_eq!(token(&c).await.unwrap(), "t0");
        // A 24 h token is served from the cache for 12 h.
        clock.advance(hours(11.9));
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert_eq!(inner.calls(), 1);
        clock.advance(hours(0.2));
        assert_eq!(token(&c).await.unwrap(), "t1");
        assert_eq!(inner.calls(), 2);
        // The new token counts its half-life from its own fetch.
        clock.advance(hours(11.9));
        assert_eq!(token(&c).await.unwrap(), "t1");
        assert_eq!(inner.calls(), 2);
    }

    #[tokio::test]
    async fn a_token_near_its_end_is_asked_for_again_at_half_its_life_and_never_served_past_it() {
        // The endpoint answers with the token it cached, 100 s from its end, every time.
        let (clock, inner, c) = on_manual_clock();
        let end = OffsetDateTime::from(clock.now()) + azure_core::time::Duration::seconds(100);
        *inner.expires.lock().unwrap() = Some(end);
        let mut asked_at = Vec::new();
        for t in 0..100 {
            let before = inner.calls();
            token(&c).await.unwrap();
            if inner.calls() > before {
                asked_at.push(t);
            }
            clock.advance(Duration::from_secs(1));
        }
        // Half of what was left each time: a few asks, each at half the life before.
        assert_eq!(asked_at, [0, 50, 75, 88, 94, 97, 99]);
    }

    #[tokio::test]
    async fn serves_the_old_token_while_refresh_fails_until_five_minutes_before_it_expires() {
        let (clock, inner, c) = on_manual_clock();
        assert_eq!(token(&c).await.unwrap(), "t0");
        inner.fail.store(true, Ordering::SeqCst);
        // Past its refresh point, every call tries the endpoint and falls back to the token.
        clock.advance(hours(12.5));
        assert_eq!(token(&c).await.unwrap(), "t0");
        clock.advance(hours(11.4));
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert_eq!(inner.calls(), 3);
        // 24 h less 4 minutes: too close to its expiry to hand out.
        clock.advance(Duration::from_secs(120));
        let e = token(&c).await.unwrap_err();
        assert!(e.to_string().contains("down"), "{e}");
        // The endpoint recovers: a fresh token once the failure is no longer shared.
        inner.fail.store(false, Ordering::SeqCst);
        clock.advance(FAILURE_SHARED);
        assert_eq!(token(&c).await.unwrap(), "t4");
    }

    #[tokio::test]
    async fn a_failed_request_is_the_answer_of_every_caller_without_a_token_for_a_while() {
        let (clock, inner, c) = on_manual_clock();
        inner.fail.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            let e = token(&c).await.unwrap_err();
            assert!(e.to_string().contains("down"), "{e}");
            assert_eq!(e.kind(), &azure_core::error::ErrorKind::Credential);
        }
        assert_eq!(inner.calls(), 1, "one request for all of them");
        clock.advance(FAILURE_SHARED);
        assert!(token(&c).await.is_err());
        assert_eq!(inner.calls(), 2, "asked again once it is over");
        inner.fail.store(false, Ordering::SeqCst);
        clock.advance(FAILURE_SHARED);
        assert_eq!(token(&c).await.unwrap(), "t2");
    }

    /// An endpoint that takes the connection and never answers.
    #[derive(Debug)]
    struct Silent;

    #[async_trait]
    impl TokenCredential for Silent {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            futures::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_never_answers_is_given_up_on_and_named() {
        let c = CachingCredential::new(Arc::new(Silent));
        let e = token(&c).await.unwrap_err();
        assert_eq!(e.kind(), &azure_core::error::ErrorKind::Credential);
        assert!(
            e.to_string()
                .contains("the managed identity endpoint did not answer within 3s"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn after_a_failed_refresh_the_endpoint_is_asked_again_only_after_a_pause() {
        let (clock, inner, c) = on_manual_clock();
        assert_eq!(token(&c).await.unwrap(), "t0");
        inner.fail.store(true, Ordering::SeqCst);
        clock.advance(hours(12.5));
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert_eq!(inner.calls(), 2, "the refresh was tried");
        // Callers right after it are served the cached token without a try of their own.
        clock.advance(Duration::from_secs(29));
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert_eq!(inner.calls(), 2);
        clock.advance(Duration::from_secs(1));
        inner.fail.store(false, Ordering::SeqCst);
        assert_eq!(token(&c).await.unwrap(), "t2");
        assert_eq!(inner.calls(), 3);
    }

    #[tokio::test]
    async fn a_wall_clock_stepped_back_stretches_neither_the_refresh_nor_the_fallback() {
        let (clock, inner, c) = on_manual_clock();
        assert_eq!(token(&c).await.unwrap(), "t0");
        inner.fail.store(true, Ordering::SeqCst);
        clock.set_wall(clock.now() - hours(2.0));
        // 12.1 h on (10.1 h on the stepped wall clock): the refresh is due, and fails.
        clock.advance(hours(12.1));
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert_eq!(inner.calls(), 2);
        // 23 h 56 min on, though the wall clock says 21 h 56 min: no longer handed out.
        clock.advance(hours(23.0) + Duration::from_secs(56 * 60) - hours(12.1));
        assert!(token(&c).await.is_err());
    }

    /// Counts calls in flight at once across every credential that uses it, and records
    /// when each reached the endpoint.
    #[derive(Debug, Default)]
    struct Slow {
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
        at: Mutex<Vec<tokio::time::Instant>>,
    }

    #[async_trait]
    impl TokenCredential for Slow {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            self.at.lock().unwrap().push(tokio::time::Instant::now());
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(AccessToken::new(
                "t",
                OffsetDateTime::now_utc() + azure_core::time::Duration::hours(24),
            ))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_credential_of_the_process_shares_the_endpoints_concurrency_limit() {
        let inner = Arc::new(Slow::default());
        // Two identities (the broker's own and a federated one), eight scopes each.
        let a = Arc::new(CachingCredential::new(inner.clone()));
        let b = Arc::new(CachingCredential::new(inner.clone()));
        let calls = (0..16).map(|i| {
            let c = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move { c.get_token(&[&format!("scope-{i}")], None).await.unwrap() }
        });
        futures::future::join_all(calls).await;
        // Per credential it would be 10 (5 each). Other tests share the process's budget, so
        // not necessarily all 5 permits were free.
        let max = inner.max.load(Ordering::SeqCst);
        assert!((1..=MAX_CONCURRENT).contains(&max), "{max} calls at once");
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_twenty_requests_a_second_reach_the_endpoint() {
        let inner = Arc::new(Slow::default());
        // A budget of its own: other tests share the process's.
        let c = Arc::new(CachingCredential::with_limits(
            inner.clone(),
            Arc::new(SystemClock),
            Arc::new(EndpointLimits::new()),
        ));
        let calls = (0..45).map(|i| {
            let c = c.clone();
            async move { c.get_token(&[&format!("scope-{i}")], None).await }
        });
        let results = futures::future::join_all(calls).await;
        assert!(results.iter().all(Result::is_ok));
        let at = inner.at.lock().unwrap().clone();
        assert_eq!(at.len(), 45);
        for (i, t) in at.iter().enumerate() {
            let in_window = at[i..]
                .iter()
                .filter(|u| u.duration_since(*t) < RATE_WINDOW)
                .count();
            assert!(
                in_window <= MAX_PER_SECOND as usize,
                "{in_window} within a second of call {i}"
            );
        }
        // 45 requests need three windows: the last is sent two seconds after the first.
        let span = at[44].duration_since(at[0]);
        assert!(span >= Duration::from_secs(2), "{span:?}");
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_once_and_a_stale_refusal_leaves_the_new_one() {
        let (clock, inner, c) = on_manual_clock();
        assert_eq!(token(&c).await.unwrap(), "t0");
        assert!(c.refused("t0"));
        assert_eq!(token(&c).await.unwrap(), "t1");
        // A refusal of the old token arriving late: the new one stays.
        assert!(!c.refused("t0"));
        assert_eq!(token(&c).await.unwrap(), "t1");
        // The new token refused at once: the refusal is the identity's; it is kept.
        assert!(!c.refused("t1"));
        assert_eq!(token(&c).await.unwrap(), "t1");
        assert_eq!(inner.calls(), 2);
        // Refused again later: replaced once more.
        clock.advance(REFUSED_AGAIN);
        assert!(c.refused("t1"));
        assert_eq!(token(&c).await.unwrap(), "t2");
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let (_clock, inner, c) = on_manual_clock();
        let c = Arc::new(c);
        let calls = (0..50).map(|_| {
            let c = c.clone();
            async move { c.get_token(&["s"], None).await.unwrap() }
        });
        futures::future::join_all(calls).await;
        assert_eq!(inner.calls(), 1);
    }

    /// The SDK's error for the managed identity endpoint's answer of `status` (with a
    /// `retry-after: 7`) and IMDS's JSON error, as `ManagedIdentityCredential` returns it.
    fn endpoint_answered(status: u16) -> azure_core::Error {
        endpoint_answered_with(
            status,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )
    }

    /// As `endpoint_answered`, with `body`.
    fn endpoint_answered_with(status: u16, body: &'static str) -> azure_core::Error {
        use azure_core::http::{RawResponse, StatusCode, headers::Headers};
        let mut headers = Headers::new();
        headers.insert("retry-after", "7");
        let answer = azure_core::Error::with_message(
            azure_core::error::ErrorKind::HttpResponse {
                status: StatusCode::from(status),
                error_code: None,
                raw_response: Some(Box::new(RawResponse::from_bytes(
                    StatusCode::from(status),
                    headers,
                    body,
                ))),
            },
            "The requested identity has not been assigned to this resource",
        );
        azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            answer,
            "ManagedIdentityCredential authentication failed.",
        )
    }

    /// The workload identity's error when Entra answers `status` with `body` (`retry-after`
    /// of 12 s), as `outbound::EntraAnswers` returns it.
    fn entra_answered(status: u16, body: &str) -> azure_core::Error {
        azure_core::Error::new(
            azure_core::error::ErrorKind::Credential,
            crate::entra::answer_to_sdk(status, body.as_bytes(), Some(Duration::from_secs(12))),
        )
    }

    #[test]
    fn a_refused_identity_is_told_apart_from_one_unavailable() {
        let id = "f1c0f1c0-0000-4000-8000-0000000000c2";
        let read = |e: &azure_core::Error| identity_error(id, "api://AzureADTokenExchange", e);
        // The endpoint does not know the identity (IMDS, App Service), or refuses the host.
        for status in [400, 401, 403] {
            let e = read(&endpoint_answered(status));
            assert!(
                matches!(&e, IdentityError::NotAssigned { client_id, status: s, .. } if client_id == id && *s == status),
                "{e:?}"
            );
            assert!(crate::flow::FlowError::Identity(e).is_persistent());
        }
        // App Service's own error too.
        let e = read(&endpoint_answered_with(
            400,
            r#"{"statusCode":400,"message":"Unable to load the proper Managed Identity.","correlationId":"c"}"#,
        ));
        assert!(matches!(&e, IdentityError::NotAssigned { .. }), "{e:?}");
        // The same statuses with a body that is not the endpoint's error (a proxy's page, a
        // gateway's JSON, nothing): no verdict on the identity, retried.
        for body in [
            "<html>Access denied</html>",
            r#"{"error":"Access Denied","message":"blocked"}"#,
            "",
            // A gateway's JSON errors: an `error` word without IMDS's description, an object
            // or a flag, or API Management's `statusCode` and `message` without App
            // Service's correlation id.
            r#"{"error":"unauthorized"}"#,
            r#"{"error":"forbidden","message":"blocked by policy"}"#,
            r#"{"error":{"code":"Forbidden","message":"blocked"}}"#,
            r#"{"message":"Forbidden","error":true}"#,
            r#"{"statusCode":401,"message":"Access denied due to missing subscription key."}"#,
        ] {
            for status in [400, 401, 403] {
                let e = read(&endpoint_answered_with(status, body));
                assert!(
                    matches!(&e, IdentityError::Unavailable { retry_after, .. } if *retry_after == Some(Duration::from_secs(7))),
                    "{status} {body}: {e:?}"
                );
            }
        }
        // Throttled, failing, or IMDS setting the identity up: worth another try, after the
        // endpoint's hint.
        for status in [404, 410, 429, 500, 503] {
            let e = read(&endpoint_answered(status));
            assert!(
                matches!(&e, IdentityError::Unavailable { retry_after, .. } if *retry_after == Some(Duration::from_secs(7))),
                "{status}: {e:?}"
            );
        }
        // Entra refusing the workload identity the identity's token: for good, its answer kept.
        let refusal = r#"{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found.","error_codes":[700213],"correlation_id":"c0c0c0c0-0000-4000-8000-0000000000cc"}"#;
        match read(&entra_answered(401, refusal)) {
            IdentityError::Refused { client_id, answer } => {
                assert_eq!(client_id, id);
                assert_eq!(answer.codes, [700213]);
                assert_eq!(
                    answer.correlation_id.as_deref(),
                    Some("c0c0c0c0-0000-4000-8000-0000000000cc")
                );
            }
            other => panic!("{other:?}"),
        }
        // Its outage or throttling: retried, after Entra's hint, in Entra's words.
        let outage = r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: slow down.","error_codes":[50196]}"#;
        match read(&entra_answered(429, outage)) {
            IdentityError::Unavailable {
                message,
                retry_after,
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(12)));
                assert!(message.contains("Entra ID answered 429"), "{message}");
                assert!(message.contains(id), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // No answer at all.
        let e = read(&azure_core::Error::with_message(
            azure_core::error::ErrorKind::Io,
            "connection refused",
        ));
        assert!(matches!(e, IdentityError::Unavailable { .. }), "{e:?}");
    }
}
