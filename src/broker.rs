//! The broker core: a token request goes to the cache; a miss (or a refresh) runs the
//! credential flow (`flow.rs`) once per key, in its own task, and every concurrent caller
//! shares the result. Tokens are refreshed ahead of expiry in the background, served while
//! still valid when a refresh fails (to callers that asked for no minimum, down to the
//! safety margin through an outage), and failures are remembered briefly (persistent ones
//! for the negative period, transient ones for their `Retry-After` or a short floor).
//! No tonic or reqwest types here: errors are `BrokerError`, mapped to gRPC status in `api`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use tracing::{Instrument, debug, info_span, warn};

use crate::cache::{
    CachedToken, FlightResult, Joined, Key, KeyRef, Remembered, Slot, SlotState, TokenCache,
};
use crate::claims::Claims;
use crate::clock::{Clock, Moment};
use crate::config::{CacheConfig, Config, Prewarm};
use crate::entra::TokenExchange;
pub use crate::flow::FlowError;
use crate::flow::{self, Flow, Tenant};
use crate::identity::IdentityAssertions;
use crate::resilience::backoff;
use crate::signer::Signer;
use crate::striped::Counter;
use crate::telemetry::LogBudget;
use crate::timetable::Timetable;

/// Longest minimum validity a caller may ask for: a day, the longest a token is cached (Entra's
/// ordinary tokens live 60 to 90 minutes, continuous access evaluation's up to 28 hours). What
/// a key's tokens actually get is checked against the validity they are issued with.
pub const MAX_MIN_VALIDITY: Duration = Duration::from_secs(24 * 3600);
pub const MAX_SCOPES: usize = 8;
pub const MAX_SCOPE_LEN: usize = 512;

/// The shared result of a fetch that callers await.
type Flight = futures::future::Shared<futures::future::BoxFuture<'static, FlightResult<FlowError>>>;
/// A fetch started or joined, and the claims it carries.
type Fetching = (Joined, Flight, Option<Arc<str>>);
/// A fetch under way and the claims it carries (by their canonical JSON), if any.
type Carrying = (Flight, Option<Arc<str>>);

/// A caller's request, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tenant: String,
    pub scopes: Vec<String>,
    pub min_validity: Option<Duration>,
    pub force_refresh: bool,
    /// A resource's claims challenge: the request is a forced refresh whose fetch carries
    /// these claims.
    pub claims: Option<Claims>,
}

/// A request by reference: what `serve_token` reads, so the API keeps the request's strings
/// (for the audit record) and a cache hit copies none of them.
#[derive(Debug, Clone, Copy)]
pub struct TokenQuery<'a> {
    pub tenant: &'a str,
    pub scopes: &'a [String],
    pub min_validity: Option<Duration>,
    pub force_refresh: bool,
    pub claims: Option<&'a Claims>,
}

impl TokenRequest {
    pub fn query(&self) -> TokenQuery<'_> {
        TokenQuery {
            tenant: &self.tenant,
            scopes: &self.scopes,
            min_validity: self.min_validity,
            force_refresh: self.force_refresh,
            claims: self.claims.as_ref(),
        }
    }
}

/// Where a served token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Cache,
    Exchange,
    StaleWhileRefreshFailing,
}

#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: Arc<CachedToken>,
    pub source: TokenSource,
}

/// Broker errors, mapped once to gRPC status in `api`.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("tenant `{0}` is not configured")]
    UnknownTenant(String),
    /// No token with the validity asked for: `remaining` is what the fetched token (or the
    /// cached one, when an early fetch was made too recently) has left.
    #[error("Entra issued a token valid for {remaining:?}, less than the {wanted:?} asked for")]
    MinValidityUnmet {
        remaining: Duration,
        wanted: Duration,
    },
    /// Tokens for the key are issued with less validity than asked for: no fetch would do.
    #[error(
        "tokens for this key are issued valid for {issued:?}, less than the {wanted:?} asked for"
    )]
    MinValidityBeyondLifetime { issued: Duration, wanted: Duration },
    #[error("token for tenant `{tenant}` unavailable: {source}")]
    Upstream {
        tenant: String,
        #[source]
        source: Arc<FlowError>,
        /// How long the key's callers get this failure without a new fetch, when it is
        /// remembered as the configuration's (the negative cache; a held transient failure
        /// says so through its retry-after instead). Told to callers, so an operator fixing
        /// the configuration knows when the key is asked again.
        remembered: Option<Duration>,
    },
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl BrokerError {
    /// A problem of configuration or of the request that asking again soon will not fix (a
    /// disabled app, a missing consent, a certificate Entra does not know, a bad scope), as
    /// opposed to an outage, throttling or shutdown.
    pub fn is_persistent(&self) -> bool {
        match self {
            BrokerError::Upstream { source, .. } => source.is_persistent(),
            BrokerError::ShuttingDown => false,
            BrokerError::InvalidArgument { .. }
            | BrokerError::UnknownTenant(_)
            | BrokerError::MinValidityUnmet { .. }
            | BrokerError::MinValidityBeyondLifetime { .. } => true,
        }
    }
}

/// Cache counters for tests, metrics and benchmarks; striped, as every request bumps one.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered from the cache, stale serves included (at once, or after the fetch
    /// they waited for failed through an outage). With `misses` and `negative_hits`, every
    /// request past validation but a `min_validity` refused from the cache counts once.
    pub hits: Counter,
    /// Requests that waited for a fetch and were answered by it (its token or its failure),
    /// or gave up waiting; counted when the wait ends.
    pub misses: Counter,
    /// Requests that joined a fetch under way instead of starting one, when they join.
    pub coalesced: Counter,
    pub stale_served: Counter,
    pub negative_hits: Counter,
    pub refreshes: Counter,
    /// Failed fetches the broker started itself: a key's refresh (scheduled, retried, or
    /// overdue and started by a request), a watched key's first fetch retried.
    pub refresh_failures: Counter,
    /// Failed fetches a request started: a cold key, a forced refresh, an early fetch for a
    /// minimum validity, a pre-warm.
    pub caller_fetch_failures: Counter,
}

/// A request that waited for a fetch, counted when it is answered or given up on (dropped):
/// a miss, or a hit if the cached token answered it after the fetch failed. Each request
/// is counted once, in `hits`, `misses` or `negative_hits`.
struct Waited<'a> {
    stats: &'a Stats,
    from_cache: bool,
    /// The request looks again (a fetch ended as it was to start one): counted then.
    looked_again: bool,
}

impl Drop for Waited<'_> {
    fn drop(&mut self) {
        if self.looked_again {
            return;
        }
        if self.from_cache {
            self.stats.hits.incr();
        } else {
            self.stats.misses.incr();
        }
    }
}

/// Who started a fetch, for the failure counts (`Stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Started {
    Caller,
    Refresh,
}

/// What a watch may ask of its key besides its state (`Broker::subscribe`).
#[derive(Debug, Clone)]
pub struct WatchedKey {
    /// Weak: a watch must not keep a slot the cache has let go.
    slot: Weak<Slot<FlowError>>,
}

impl WatchedKey {
    /// How much longer, at `now`, the key's configuration failure is remembered (neither
    /// its callers nor its refresh ask the upstream again until then), if one is: what a
    /// caller is told with the failure (`BrokerError::Upstream::remembered`).
    pub fn remembered(&self, now: Moment) -> Option<Duration> {
        let until = self.slot.upgrade()?.negative_until(now)?;
        Some(whole_seconds(until.until(now)))
    }
}

/// The upstream seams the broker uses; tests replace any of them.
#[derive(Clone, Debug)]
pub struct Upstreams {
    /// Key Vault.
    pub signer: Arc<dyn Signer>,
    /// PKCS#11 tokens, for tenants whose key is on an HSM.
    pub hsm: Arc<dyn Signer>,
    /// Managed identity tokens, for tenants whose app trusts one as a federated credential.
    pub identity: Arc<dyn IdentityAssertions>,
    pub exchange: Arc<dyn TokenExchange>,
    pub clock: Arc<dyn Clock>,
}

struct Inner {
    /// Fixed at start (nothing is ever inserted): a fast hash cannot be made to collide.
    tenants: HashMap<String, Arc<Tenant>, foldhash::fast::RandomState>,
    flow: Flow,
    clock: Arc<dyn Clock>,
    cfg: CacheConfig,
    negative_ttl: Duration,
    prewarm: Vec<Prewarm>,
    cache: TokenCache<FlowError>,
    stats: Stats,
    /// Bounds the lines of failed fetches.
    fetch_log: LogBudget,
    /// Bumped when remembered configuration failures are forgotten (`forget_refusals`): it
    /// wakes the tasks waiting for one to end (a watched key's first fetch, a refresh).
    forgotten: tokio::sync::watch::Sender<u64>,
    /// Bumped when `forget_refusals` begins: a fetch under way by then answers a request
    /// made before, and its refusal is not remembered past the forgetting.
    forgetting: AtomicU64,
    /// When each cached key's token is to be refreshed.
    refreshes: Arc<Timetable<Due>>,
}

/// A key's refresh come due: the slot and the token it is to replace.
struct Due {
    key: Key,
    slot: Weak<Slot<FlowError>>,
    mine: crate::sensitive::Fingerprint,
}

/// The broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("tenants", &self.inner.tenants.len())
            .field("cache", &self.inner.cache)
            .finish()
    }
}

impl Broker {
    pub fn new(config: &Config, up: Upstreams) -> Broker {
        let authority = config.cloud.authority_host();
        let tenants = config
            .tenants
            .values()
            .map(|t| (t.name.clone(), Arc::new(flow::tenant(t, &authority))))
            .collect();
        let cfg = config.cache.clone();
        Broker {
            inner: Arc::new_cyclic(|me: &Weak<Inner>| {
                let me = me.clone();
                // Holds the broker weakly: the timetable is the broker's, and its runner
                // ends with it.
                let refreshes = Timetable::new(up.clock.clone(), move |id, due| {
                    if let Some(inner) = me.upgrade() {
                        Broker { inner }.refresh_due(id, due);
                    }
                });
                Inner {
                    tenants,
                    flow: Flow::new(config, &up),
                    clock: up.clock,
                    cache: TokenCache::new(cfg.max_entries, Duration::from_secs(24 * 3600)),
                    cfg,
                    negative_ttl: config.resilience.negative_ttl,
                    prewarm: config.resilience.prewarm.clone(),
                    stats: Stats::default(),
                    fetch_log: LogBudget::default(),
                    forgotten: tokio::sync::watch::Sender::new(0),
                    forgetting: AtomicU64::new(0),
                    refreshes,
                }
            }),
        }
    }

    /// Tokens waiting for their refresh time (one per cached key with a token).
    pub fn scheduled_refreshes(&self) -> usize {
        self.inner.refreshes.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn upstream_stats(&self) -> &flow::UpstreamStats {
        &self.inner.flow.stats
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub fn flow(&self) -> &Flow {
        &self.inner.flow
    }

    pub fn cache(&self) -> &TokenCache<FlowError> {
        &self.inner.cache
    }

    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.inner.tenants.keys().map(String::as_str)
    }

    /// Validates a request and returns its cache key.
    pub fn key(&self, tenant: &str, scopes: &[String]) -> Result<Key, BrokerError> {
        let (tenant, scopes) = self.validate(tenant, scopes)?;
        Ok(Key {
            tenant: tenant.clone(),
            scopes: scopes.as_ref().into(),
        })
    }

    /// Validates a request: the configured tenant's name, and the normalised scopes.
    fn validate<'s>(
        &self,
        tenant: &str,
        scopes: &'s [String],
    ) -> Result<(&Arc<str>, Cow<'s, [String]>), BrokerError> {
        if tenant.is_empty() {
            return Err(BrokerError::InvalidArgument {
                field: "tenant",
                message: "required: the configured tenant name".into(),
            });
        }
        let t = self
            .inner
            .tenants
            .get(tenant)
            .ok_or_else(|| BrokerError::UnknownTenant(tenant.chars().take(64).collect()))?;
        Ok((&t.name, normalise_scopes(scopes)?))
    }

    /// Serves a token: from cache when it meets the caller's minimum validity, otherwise
    /// from the one fetch under way for its key. A caller that asked for no minimum is
    /// served the cached token down to the safety margin while the key's fetches fail
    /// transiently (`serves_through_outage`).
    pub async fn get_token(&self, req: TokenRequest) -> Result<IssuedToken, BrokerError> {
        self.serve_token(req.query(), |token, source, _| IssuedToken {
            token: token.clone(),
            source,
        })
        .await
    }

    /// Like `get_token`, but lends the token to `serve` and returns what it makes of it (the
    /// API's response): a cache hit then takes no reference to the token, which would be a
    /// write to the one reference count that every request for the key shares.
    pub async fn serve_token<R>(
        &self,
        req: TokenQuery<'_>,
        serve: impl FnOnce(&Arc<CachedToken>, TokenSource, Moment) -> R,
    ) -> Result<R, BrokerError> {
        let (tenant, scopes) = self.validate(req.tenant, req.scopes)?;
        if req.min_validity.is_some_and(|d| d > MAX_MIN_VALIDITY) {
            return Err(BrokerError::InvalidArgument {
                field: "min_validity",
                message: format!(
                    "at most {}s (a day, the longest a token is cached)",
                    MAX_MIN_VALIDITY.as_secs()
                ),
            });
        }
        let cfg = &self.inner.cfg;
        // What the caller is owed from `token`.
        let wanted = |token: &CachedToken| match req.min_validity {
            Some(d) => d.max(cfg.safety_margin),
            None => cfg.default_min_validity_for(token.issued_validity()),
        };
        // Looked up by the request's own strings: a hit builds no key.
        let owned_key = || Key {
            tenant: tenant.clone(),
            scopes: scopes.as_ref().into(),
        };
        let slot = self
            .inner
            .cache
            .slot(
                &KeyRef {
                    tenant,
                    scopes: &scopes,
                },
                owned_key,
            )
            .await;
        if let Some(claims) = req.claims {
            wait_for_other_claims(&slot, claims).await;
        }
        // A claims challenge means a resource refused the token: a forced refresh.
        let force = req.force_refresh || req.claims.is_some();
        // A caller that asked for no minimum (nor for a new token) is served the cached
        // token down to the safety margin while the key's fetches fail transiently.
        let through_outage = req.min_validity.is_none() && !force;
        // Looked at again, once, when a fetch it joined that carried claims it did not send
        // failed.
        let mut joined_claims_failed = false;
        let (token, _counted) = 'request: loop {
            // Looked at again when a fetch ended between this look and the fetch it decided on.
            let ((flight, carries), mut counted) = loop {
                let now = self.inner.clock.moment();
                let mut under_way = None;
                // Held until the fetch is asked for: whether it is still the slot's state says
                // whether a fetch has ended since.
                let state = slot.current();
                {
                    if let Some(token) = &state.token
                        && token.remaining(now) >= wanted(token)
                        && !(force && self.forced_past(&slot, now, &mut under_way, req.claims))
                    {
                        self.inner.stats.hits.incr();
                        if token.refresh.reached(now)
                            && state.failure.is_none()
                            && slot.negative(now).is_none()
                        {
                            // Overdue (the scheduled refresh has not run yet): start it, or join the
                            // one running, without waiting. After a failure the scheduler's backoff
                            // decides, and so it does while a failure is remembered (a forced
                            // refresh refused before the refresh was due): the scheduler waits out
                            // a refusal's negative period, and callers must not ask before it ends.
                            let _ = self.start_fetch(
                                &owned_key(),
                                &slot,
                                Started::Refresh,
                                None,
                                Some(&state),
                            );
                        }
                        let source = if state.failure.is_some() {
                            self.inner.stats.stale_served.incr();
                            TokenSource::StaleWhileRefreshFailing
                        } else {
                            TokenSource::Cache
                        };
                        return Ok(serve(token, source, now));
                    }
                    if let Some(token) = &state.token {
                        self.unmet_without_fetch(
                            token,
                            wanted(token),
                            (&slot, req.claims),
                            now,
                            &mut under_way,
                        )?;
                        if through_outage && self.serves_through_outage(token, &state, &slot, now) {
                            self.inner.stats.hits.incr();
                            self.inner.stats.stale_served.incr();
                            return Ok(serve(token, TokenSource::StaleWhileRefreshFailing, now));
                        }
                    }
                }
                // Held across waits from here: the state itself, not a guard of the swap's.
                let state = arc_swap::Guard::into_inner(state);
                if under_way.is_none()
                    && let Some((e, left)) = slot.negative(now)
                {
                    self.inner.stats.negative_hits.incr();
                    // A held transient failure is fetched again when its hold-off ends: that, not
                    // the upstream's original hint, is when a caller should come back.
                    let (source, remembered) = if e.is_retryable() {
                        (Arc::new(e.with_retry_after(whole_seconds(left))), None)
                    } else {
                        (e, Some(whole_seconds(left)))
                    };
                    return Err(BrokerError::Upstream {
                        tenant: tenant.to_string(),
                        source,
                        remembered,
                    });
                }
                // Counted once answered (or given up on): a miss, unless the cached token answers
                // it after all.
                let mut counted = Waited {
                    stats: &self.inner.stats,
                    from_cache: false,
                    looked_again: false,
                };
                let flight = match under_way {
                    Some(joined) => {
                        self.inner.stats.coalesced.incr();
                        Some(joined)
                    }
                    None => {
                        let mut rounds = 0;
                        loop {
                            // After waiting out another's fetch, this one's own, whatever it published.
                            let seen = (rounds == 0).then_some(&*state);
                            let Some((joined, flight, carries)) = self.start_fetch(
                                &owned_key(),
                                &slot,
                                Started::Caller,
                                req.claims,
                                seen,
                            )?
                            else {
                                counted.looked_again = true;
                                break None;
                            };
                            // A fetch carrying other claims began since this request waited for
                            // the last one: waited for too, then this one's own fetch.
                            if joined == Joined::Follower
                                && req
                                    .claims
                                    .is_some_and(|c| !carries_claims(carries.as_deref(), c))
                                && rounds < OTHER_CLAIMS_WAITS
                            {
                                rounds += 1;
                                let _ = flight.await;
                                continue;
                            }
                            if joined == Joined::Follower {
                                self.inner.stats.coalesced.incr();
                            }
                            break Some((flight, carries));
                        }
                    }
                };
                if let Some(flight) = flight {
                    break (flight, counted);
                }
            };
            match flight.await {
                Ok(token) => break 'request (token, counted),
                Err(source) => {
                    let now = self.inner.clock.moment();
                    // The fetch found the outage: the cached token, if it still has the safety
                    // margin, rather than the failure.
                    if through_outage && source.is_retryable() {
                        let state = slot.current();
                        if let Some(token) = &state.token
                            && token.remaining(now) >= self.inner.cfg.safety_margin
                        {
                            counted.from_cache = true;
                            self.inner.stats.stale_served.incr();
                            return Ok(serve(token, TokenSource::StaleWhileRefreshFailing, now));
                        }
                    }
                    // A fetch carrying another caller's claims, joined: its failure may be those
                    // claims refused, that caller's answer and not this one's. Looked at again
                    // once, by the usual rules (the forced-refresh interval, the negative cache).
                    if !joined_claims_failed
                        && carries.is_some()
                        && !req
                            .claims
                            .is_some_and(|c| carries_claims(carries.as_deref(), c))
                    {
                        joined_claims_failed = true;
                        // Counted by the look that answers it.
                        counted.looked_again = true;
                        continue 'request;
                    }
                    // The first answer is told how long it is remembered too: its own entry,
                    // unless another fetch's has taken its place (or a SIGHUP has forgotten it).
                    let remembered = slot
                        .negative(now)
                        .filter(|(e, _)| Arc::ptr_eq(e, &source) && e.is_persistent())
                        .map(|(_, left)| whole_seconds(left));
                    return Err(BrokerError::Upstream {
                        tenant: tenant.to_string(),
                        source,
                        remembered,
                    });
                }
            }
        };
        let now = self.inner.clock.moment();
        let remaining = token.remaining(now);
        let wanted = wanted(&token);
        if remaining < wanted {
            return Err(BrokerError::MinValidityUnmet { remaining, wanted });
        }
        Ok(serve(&token, TokenSource::Exchange, now))
    }

    /// Whether `token`, short of the default minimum validity, is served at once to a caller
    /// who asked for none: the key's fetches are known to fail for a reason that may clear
    /// (a held transient failure, or the refresh failing so), and it has at least the safety
    /// margin left. The key's background refresh keeps retrying with its backoff; callers do
    /// not each start a fetch, or wait out the retry budget, for an answer already known.
    ///
    /// Not after a persistent failure (an app disabled, consent withdrawn): retrying will not
    /// clear it before the token runs out, so the caller is told the refusal and its fix now
    /// rather than handed the last minutes of a token the tenant has stopped granting. While
    /// the token still meets the caller's minimum it is served as ever.
    fn serves_through_outage(
        &self,
        token: &CachedToken,
        state: &SlotState,
        slot: &Slot<FlowError>,
        now: Moment,
    ) -> bool {
        if token.remaining(now) < self.inner.cfg.safety_margin {
            return false;
        }
        match slot.negative(now) {
            Some((e, _)) => e.is_retryable(),
            None => state.failure.is_some() && state.failure_transient,
        }
    }

    /// Whether a forced refresh (or an early fetch for a caller's minimum validity) gets
    /// past a cached token: to the fetch under way (put in `under_way` to join: it costs the
    /// upstream nothing, and its token or failure is the answer, unless it carried claims
    /// the request did not send and failed: then the request looks again, once), to the key's failure while
    /// its callers share it (answered without a fetch), or to a fetch of its own, at most once
    /// per `force_refresh_interval`. Only that fetch spends the interval. Otherwise, within
    /// the interval, a forced refresh is answered with the cached token, its source saying
    /// whether the key's refresh is failing (`STALE_WHILE_REFRESH_FAILING`) or not (`CACHE`),
    /// and an early fetch is refused (`MinValidityUnmet`).
    ///
    /// A request with a claims challenge joins only a fetch carrying the same claims: one
    /// carrying other claims (or none) that began after the request waited for the last
    /// (`wait_for_other_claims`) leaves it the cached token, as within the interval.
    fn forced_past(
        &self,
        slot: &Slot<FlowError>,
        now: Moment,
        under_way: &mut Option<Carrying>,
        claims: Option<&Claims>,
    ) -> bool {
        if let Some((flight, carries)) = slot.flight_carrying() {
            if claims.is_some_and(|c| !carries_claims(carries.as_deref(), c)) {
                return false;
            }
            *under_way = Some((flight, carries));
            return true;
        }
        slot.negative(now).is_some()
            || slot.allow_forced(now, self.inner.cfg.force_refresh_interval)
    }

    /// Refuses a minimum validity that a fetch would not meet, or that would make fetches
    /// the caller could repeat at will, when the cached `token` does not meet it.
    ///
    /// A token for a key has at most the validity the last one was issued with (Entra gives
    /// a key's tokens the same lifetime): above that, no new token would do better, and the
    /// caller is told at once how much a token gets. Below it, while the cached token still
    /// serves callers that ask for no minimum, a fetch under way is joined (put in
    /// `under_way`: its token may meet the minimum at no cost to the upstream), and only
    /// otherwise is a new token fetched early for this caller's sake, as often as a forced
    /// refresh is allowed (`force_refresh_interval`, shared with `force_refresh`): else every
    /// request arriving once the token's remaining validity fell below the wanted one would
    /// fetch. Joining does not spend the interval, nor does sharing the key's held failure.
    fn unmet_without_fetch(
        &self,
        token: &CachedToken,
        wanted: Duration,
        (slot, claims): (&Slot<FlowError>, Option<&Claims>),
        now: Moment,
        under_way: &mut Option<Carrying>,
    ) -> Result<(), BrokerError> {
        let remaining = token.remaining(now);
        if remaining >= wanted {
            return Ok(());
        }
        let most = token.issued_validity();
        if most < wanted {
            return Err(BrokerError::MinValidityBeyondLifetime {
                issued: most,
                wanted,
            });
        }
        let cfg = &self.inner.cfg;
        // Past the cached token by a forced refresh's rules: join the fetch under way, share
        // the key's held failure, or fetch once per interval.
        if remaining >= cfg.default_min_validity_for(most)
            && !self.forced_past(slot, now, under_way, claims)
        {
            return Err(BrokerError::MinValidityUnmet { remaining, wanted });
        }
        Ok(())
    }

    /// Watches a key's state; fetches its token if there is none yet, retrying until there
    /// is one or nobody watches.
    pub async fn subscribe(
        &self,
        tenant: &str,
        scopes: &[String],
    ) -> Result<(tokio::sync::watch::Receiver<SlotState>, WatchedKey), BrokerError> {
        let key = self.key(tenant, scopes)?;
        let (rx, slot) = self.inner.cache.watch(&key).await;
        if slot.current().token.is_none() {
            self.fetch_for_watchers(key, &slot);
        }
        Ok((
            rx,
            WatchedKey {
                slot: Arc::downgrade(&slot),
            },
        ))
    }

    /// Fetches a watched key's first token in the background: a failure is retried with the
    /// refresh scheduler's backoff, a remembered persistent failure once it expires, for as
    /// long as the key has watchers and no token (once it has one, the refresh scheduler
    /// keeps it). One such task per slot, however many watchers.
    fn fetch_for_watchers(&self, key: Key, slot: &Arc<Slot<FlowError>>) {
        if !slot.claim_retry() {
            return;
        }
        let broker = self.clone();
        let weak = Arc::downgrade(slot);
        let done = |s: &Slot<FlowError>| s.current().token.is_some() || !s.watched();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let Some(live) = weak.upgrade() else { return };
                if done(&live) {
                    broker.inner.cache.keep(&key, &live).await;
                    live.release_retry();
                    // A watcher that came just now found the claim taken: go on for it.
                    if done(&live) || !live.claim_retry() {
                        return;
                    }
                }
                let forgotten = broker.inner.forgotten.subscribe();
                if let Some(until) = live.negative_until(broker.inner.clock.moment()) {
                    drop(live);
                    broker.wait_remembered(until, forgotten).await;
                    continue;
                }
                // The first token may have come since the look above: then the loop ends.
                let flight = {
                    let state = live.current();
                    if state.token.is_some() {
                        continue;
                    }
                    match broker.start_fetch(&key, &live, Started::Refresh, None, Some(&state)) {
                        Ok(Some((_, flight, _))) => flight,
                        Ok(None) => continue,
                        Err(_) => {
                            live.release_retry();
                            return;
                        }
                    }
                };
                drop(live);
                if let Err(e) = flight.await {
                    failures += 1;
                    let wait = broker.retry_wait(failures, &e, &weak);
                    broker.inner.clock.sleep(wait).await;
                }
            }
        });
    }

    /// Forgets every remembered configuration failure (the negative cache), so that each
    /// such key is asked again at its next request, and its watched first fetch or refresh
    /// at once: for an operator who has fixed the configuration (consent granted, the
    /// certificate uploaded, a role assigned) and would otherwise wait out
    /// `negative_ttl_secs`. Held transient failures stay, as do the breakers: they protect
    /// an upstream that is down or throttling. Returns how many were in force.
    pub async fn forget_refusals(&self) -> usize {
        // Before the entries go: a fetch under way now, which may have been refused before
        // the fix, remembers no refusal after them (`Slot::remember_unless`).
        self.inner.forgetting.fetch_add(1, Ordering::SeqCst);
        let forgotten = self
            .inner
            .cache
            .forget_persistent(self.inner.clock.moment())
            .await;
        // After the entries are gone: a waiting task subscribed before it looked at its
        // entry, so it either saw none or is woken now.
        self.inner.forgotten.send_modify(|n| *n = n.wrapping_add(1));
        forgotten
    }

    /// Waits until `until` (a remembered configuration failure's end), or until remembered
    /// failures are forgotten after `forgotten` was subscribed.
    async fn wait_remembered(
        &self,
        until: Moment,
        mut forgotten: tokio::sync::watch::Receiver<u64>,
    ) {
        tokio::select! {
            () = self.inner.clock.sleep_until(until) => {}
            _ = forgotten.changed() => {}
        }
    }

    /// The keys the configuration asks to have cached before the broker says it is ready.
    pub fn prewarm_keys(&self) -> &[Prewarm] {
        &self.inner.prewarm
    }

    /// Fetches one pre-warm key; `Ok` once it is cached.
    pub async fn prewarm(&self, key: &Prewarm) -> Result<(), BrokerError> {
        self.get_token(TokenRequest {
            tenant: key.tenant.clone(),
            scopes: key.scopes.clone(),
            min_validity: None,
            force_refresh: false,
            claims: None,
        })
        .await
        .map(drop)
    }

    /// Starts the key's fetch, or joins the one under way (whatever claims it carries):
    /// the flight, and the claims it carries. With `claims`, a fetch it starts sends them.
    /// With `seen`, the state the caller decided on, `None` if a fetch has ended since
    /// (`Slot::fetch_unless_moved`): the caller looks again.
    fn start_fetch(
        &self,
        key: &Key,
        slot: &Arc<Slot<FlowError>>,
        started: Started,
        claims: Option<&Claims>,
        seen: Option<&SlotState>,
    ) -> Result<Option<Fetching>, BrokerError> {
        let tenant = self
            .inner
            .tenants
            .get(key.tenant.as_ref())
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTenant(key.tenant.to_string()))?;
        let broker = self.clone();
        let weak_slot = Arc::downgrade(slot);
        let key = key.clone();
        let claims = claims.cloned();
        let carries = claims.as_ref().map(Claims::shared);
        let start = move || {
            let span = info_span!("fetch", tenant = %tenant.name, scopes = %key.scopes.join(" "));
            if let Some(c) = &claims {
                debug!(parent: &span, claims = %c.digest(), "fetching with a caller's claims challenge");
            }
            async move {
                let forgetting = broker.inner.forgetting.load(Ordering::SeqCst);
                // The error's `Arc` is the one remembered and the one callers get, so a
                // caller can tell its failure's entry (`serve_token`).
                let result = broker
                    .inner
                    .flow
                    .fetch(&tenant, &key.scopes, claims.as_ref())
                    .await
                    .map(Arc::new)
                    .map_err(Arc::new);
                let now = broker.inner.clock.moment();
                if let Some(slot) = weak_slot.upgrade() {
                    match &result {
                        Ok(t) => {
                            slot.set_negative(None);
                            broker.schedule_refresh(key, &slot, t, now);
                        }
                        Err(e) => {
                            let stats = &broker.inner.stats;
                            match started {
                                Started::Refresh => stats.refresh_failures.incr(),
                                Started::Caller => stats.caller_fetch_failures.incr(),
                            }
                            broker.log_fetch_failure(e, now);
                            // Remembered so that callers of a key without a usable token
                            // share the failure instead of each fetching again: a broken
                            // tenant for the negative period, an outage or throttling for its
                            // `Retry-After` (or a short floor).
                            let hold = if e.is_persistent() {
                                // Not a refusal of a fetch that carried a caller's claims:
                                // it may be the claims Entra refused, and the key's other
                                // callers, who sent none, must not get it. Such fetches are
                                // bounded by force_refresh_interval.
                                claims.is_none().then_some(broker.inner.negative_ttl)
                            } else if e.is_retryable() {
                                Some(transient_hold(e))
                            } else {
                                // An internal error (a bug): the next caller tries afresh.
                                None
                            };
                            if let Some(hold) = hold {
                                // Not a refusal to a request sent before remembered refusals
                                // were forgotten (a SIGHUP after the fix): the key is asked
                                // again, as the forgetting promised.
                                let forgotten_since = || {
                                    e.is_persistent()
                                        && broker.inner.forgetting.load(Ordering::SeqCst)
                                            != forgetting
                                };
                                slot.remember_unless(
                                    Remembered {
                                        until: now + hold,
                                        error: e.clone(),
                                        persistent: e.is_persistent(),
                                    },
                                    forgotten_since,
                                );
                            }
                        }
                    }
                }
                result
            }
            .instrument(span)
            .boxed()
        };
        let clock = self.inner.clock.clone();
        Ok(match seen {
            Some(seen) => slot.fetch_unless_moved(clock, carries, seen, start),
            None => Some(slot.fetch_carrying(clock, carries, start)),
        })
    }

    /// Logs a failed fetch, at most `FETCH_FAILURE_LINES_PER_SEC` a second: an outage fails
    /// the fetches of every key at once, and their refreshes again at each retry.
    fn log_fetch_failure(&self, e: &FlowError, now: Moment) {
        let second = now
            .wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(held_back) = self
            .inner
            .fetch_log
            .admit(second, FETCH_FAILURE_LINES_PER_SEC)
        else {
            return;
        };
        if held_back > 0 {
            warn!(
                not_logged = held_back,
                "token fetch failures not logged (at most {FETCH_FAILURE_LINES_PER_SEC} a second); tokenbroker_refresh_failures_total and tokenbroker_caller_fetch_failures_total count every one"
            );
        }
        warn!(error = %e, "token fetch failed");
    }

    /// How long the background retries of a key (refreshes, a watched key's first fetch) wait
    /// after their `failures`-th failure in a row: full-jitter backoff from 2 s doubling to
    /// 60 s, and at least a second. The upstream's `Retry-After` is honoured up to
    /// `MAX_RETRY_AFTER`, and never past the time the cached token's remaining validity falls
    /// to the safety margin: retrying against the hint beats letting callers go without.
    fn retry_wait(&self, failures: u32, e: &FlowError, slot: &Weak<Slot<FlowError>>) -> Duration {
        let mut hint = e.retry_after().unwrap_or_default().min(MAX_RETRY_AFTER);
        if let Some(slot) = slot.upgrade()
            && let Some(token) = &slot.current().token
        {
            let left = token.remaining(self.inner.clock.moment());
            hint = hint.min(left.saturating_sub(self.inner.cfg.safety_margin));
        }
        backoff(failures, Duration::from_secs(2), Duration::from_secs(60))
            .max(hint)
            .max(Duration::from_secs(1))
    }

    /// Refreshes `token`'s key in the background at its refresh time, for as long as its
    /// slot lives and `token` is the slot's token, retrying failures with backoff while the
    /// old token is served. One chain per key: a token published by another fetch (forced,
    /// or early for a minimum validity) has its own schedule, and this one's entry is taken
    /// out of the timetable, or its task aborted (`Slot::schedule_refresh`), as when the slot is
    /// dropped: a key forced every interval would otherwise keep an entry per replaced token.
    /// An entry in the timetable, not a sleeping task: some 630 bytes less per cached
    /// token, and no task spawned on the miss path (which woke the runtime's other thread).
    fn schedule_refresh(
        &self,
        key: Key,
        live: &Arc<Slot<FlowError>>,
        token: &CachedToken,
        now: Moment,
    ) {
        let slot = Arc::downgrade(live);
        let mine = token.fingerprint;
        // Not before this fetch has ended (its result published): a refresh due at once (a
        // fetch that took longer than the token's refresh time) would otherwise join the
        // fetch that scheduled it, take its result for its own, and end the chain.
        let soon = now + REFRESH_FLOOR;
        let at = if token.refresh.reached(soon) {
            soon
        } else {
            token.refresh
        };
        // Ends the replaced token's refresh; were it running, its task, never the caller:
        // fetches run in tasks of their own.
        live.schedule_refresh(|| self.inner.refreshes.insert(at, Due { key, slot, mine }));
    }

    /// Starts the refresh chain of the timetable's entry `id`, come due.
    fn refresh_due(self, id: u64, due: Due) {
        let Some(live) = due.slot.upgrade() else {
            return;
        };
        let task = tokio::spawn(self.refresh_chain(due.key, due.slot, due.mine));
        // Replaced between coming due and now (a newer token's entry): that one's.
        if !live.run_refresh(id, task.abort_handle()) {
            task.abort();
        }
    }

    /// The refresh loop of `schedule_refresh`, once `mine`'s refresh is due.
    async fn refresh_chain(
        self,
        key: Key,
        slot: Weak<Slot<FlowError>>,
        mine: crate::sensitive::Fingerprint,
    ) {
        let broker = self;
        let mut failures = 0u32;
        loop {
            let Some(live) = slot.upgrade() else { return };
            // Watched, the slot stays cached; no longer watched, it may now be evicted. A
            // slot evicted since (held by a request that was under way) is no longer the
            // key's: the key's next request makes a new slot, with its own chain.
            // Boxed: the cache's lookup future, held inline, is some 1.4 KB.
            if !Box::pin(broker.inner.cache.keep(&key, &live)).await {
                return;
            }
            if live
                .current()
                .token
                .as_ref()
                .is_some_and(|t| t.fingerprint != mine)
            {
                return;
            }
            // A remembered persistent failure (an app disabled since): Entra sees one
            // request per negative period for the key, from this chain as from callers.
            // The refresh is due and refused: said so (a forced refresh's refusal, before
            // it was due, left the token healthy).
            let forgotten = broker.inner.forgotten.subscribe();
            let now = broker.inner.clock.moment();
            if let Some(until) = live.negative_until(now) {
                live.publish_remembered(now);
                drop(live);
                broker.wait_remembered(until, forgotten).await;
                continue;
            }
            // Looked at once more, just before the fetch: a token published since the look
            // above (a forced refresh's) is not fetched again; the loop sees it is another.
            let (flight, claims_fetch) = {
                let state = live.current();
                if state.token.as_ref().is_some_and(|t| t.fingerprint != mine) {
                    return;
                }
                match broker.start_fetch(&key, &live, Started::Refresh, None, Some(&state)) {
                    Ok(Some((_, flight, carries))) => (flight, carries.is_some()),
                    Ok(None) => continue,
                    Err(_) => return,
                }
            };
            broker.inner.stats.refreshes.incr();
            debug!(key = %key, "refreshing ahead of expiry");
            drop(live);
            match flight.await {
                // The successful fetch scheduled the next refresh.
                Ok(_) => return,
                // A caller's claims fetch, joined: its failure may be those claims refused,
                // that caller's answer and not the key's. The refresh fetches on its own.
                Err(_) if claims_fetch => continue,
                Err(e) => {
                    failures += 1;
                    let wait = broker.retry_wait(failures, &e, &slot);
                    if e.is_persistent() {
                        // A refusal forgotten (SIGHUP) is asked again at once, in its
                        // backoff too.
                        let until = broker.inner.clock.moment() + wait;
                        broker.wait_remembered(until, forgotten).await;
                    } else {
                        broker.inner.clock.sleep(wait).await;
                    }
                }
            }
        }
    }
}

/// The longest an upstream's `Retry-After` holds back a key's background retries, and the
/// longest hint passed on to callers. The hint comes from the network (a proxy may send a
/// day, or a number that overflows a deadline); Entra and Key Vault ask for seconds to
/// minutes when throttling.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Most lines a second about failed fetches (`Broker::log_fetch_failure`).
const FETCH_FAILURE_LINES_PER_SEC: u32 = 20;

/// How long callers of a key share a transient failure (outage, throttling) without a new
/// fetch, when the upstream gave no longer `Retry-After`: the first wait of the key's
/// background retries.
pub const TRANSIENT_HOLD: Duration = Duration::from_secs(2);

/// How long callers share the transient failure `e`: its `Retry-After` up to
/// `MAX_RETRY_AFTER` (the hint they are told), at least `TRANSIENT_HOLD`.
fn transient_hold(e: &FlowError) -> Duration {
    e.retry_after()
        .unwrap_or_default()
        .min(MAX_RETRY_AFTER)
        .max(TRANSIENT_HOLD)
}

/// `d` rounded up to whole seconds, at least one: a retry hint that is not early.
fn whole_seconds(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

/// How many fetches carrying other claims (or none) a request with a claims challenge waits
/// out before its own fetch; past that it is answered as within the forced-refresh
/// interval. Each wait is bounded by the fetch's retry budget.
const OTHER_CLAIMS_WAITS: u32 = 2;

/// Whether a fetch known by `carries` sends `claims`.
fn carries_claims(carries: Option<&str>, claims: &Claims) -> bool {
    carries == Some(claims.json())
}

/// Waits out the key's fetches under way that carry other claims than `claims` (or none),
/// at most `OTHER_CLAIMS_WAITS`: their tokens would not answer the challenge, and one fetch
/// per key runs at a time, so the request's own fetch, by the forced refresh's rules,
/// comes after them. A fetch carrying the same claims is joined later instead.
async fn wait_for_other_claims(slot: &Slot<FlowError>, claims: &Claims) {
    for _ in 0..OTHER_CLAIMS_WAITS {
        match slot.flight_carrying() {
            Some((flight, carries)) if !carries_claims(carries.as_deref(), claims) => {
                let _ = flight.await;
            }
            _ => return,
        }
    }
}

/// A refresh is scheduled at least this long after the fetch that obtained the token ended.
const REFRESH_FLOOR: Duration = Duration::from_secs(1);

/// Trims, de-duplicates and sorts scopes, and checks their shape.
pub fn normalise_scopes(scopes: &[String]) -> Result<Cow<'_, [String]>, BrokerError> {
    // A request's scopes are checked twice (admission, then the cache key), and nearly
    // always arrive in normal form already: then they are borrowed as they are.
    if already_normal(scopes) {
        return Ok(Cow::Borrowed(scopes));
    }
    normalise_full(scopes).map(Cow::Owned)
}

/// Trims, checks, sorts and de-duplicates; says what is wrong.
fn normalise_full(scopes: &[String]) -> Result<Vec<String>, BrokerError> {
    let bad = |message: String| BrokerError::InvalidArgument {
        field: "scopes",
        message,
    };
    if scopes.is_empty() {
        return Err(bad(
            "at least one scope is required, e.g. https://graph.microsoft.com/.default".into(),
        ));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(bad(format!("at most {MAX_SCOPES} scopes")));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for s in scopes {
        let s = s.trim();
        if s.is_empty() || s.len() > MAX_SCOPE_LEN {
            return Err(bad(format!(
                "each scope must be 1 to {MAX_SCOPE_LEN} characters"
            )));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(format!(
                "scope `{}` contains whitespace",
                s.escape_debug()
            )));
        }
        out.push(s.to_owned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// In normal form, with nothing to trim, reject, sort or remove: 1 to `MAX_SCOPES` scopes of
/// 1 to `MAX_SCOPE_LEN` printable ASCII characters without spaces, strictly ascending.
/// Anything else (non-ASCII included) takes the full path, which decides the same or explains.
fn already_normal(scopes: &[String]) -> bool {
    (1..=MAX_SCOPES).contains(&scopes.len())
        && scopes.iter().all(|s| {
            (1..=MAX_SCOPE_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
        })
        && scopes.windows(2).all(|w| w[0] < w[1])
}

#[cfg(test)]
mod tests;
