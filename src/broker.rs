//! The broker core: a token request goes to the cache; a miss (or a refresh) runs the
//! credential flow once per key: certificate metadata (cached), a client assertion signed by
//! the `Signer`, and the exchange at the tenant's Entra token endpoint. No tonic or reqwest
//! types here: errors are `BrokerError`, mapped to gRPC status only at the API edge.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tracing::{Instrument, debug, info, info_span, warn};
use url::Url;

use crate::assertion::{self, AssertionParams};
use crate::cache::{CachedToken, FlightResult, FromJoin, Joined, Key, Slot, SlotState, TokenCache};
use crate::clock::Clock;
use crate::config::{CacheConfig, Config, Credential, TenantConfig};
use crate::entra::{self, EntraError, EntraErrorClass, ExchangeRequest, TokenExchange};
use crate::signer::{CertificateInfo, Signer, SignerError};

/// Longest minimum validity a caller may ask for: Entra tokens live 60-90 minutes.
pub const MAX_MIN_VALIDITY: Duration = Duration::from_secs(3600);
pub const MAX_SCOPES: usize = 8;
pub const MAX_SCOPE_LEN: usize = 512;

/// The shared result of a fetch that callers await.
type Flight = futures::future::Shared<futures::future::BoxFuture<'static, FlightResult<FlowError>>>;

/// A caller's request, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tenant: String,
    pub scopes: Vec<String>,
    pub min_validity: Option<Duration>,
    pub force_refresh: bool,
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

/// What went wrong in the credential flow for one key.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("Key Vault: {0}")]
    Signer(#[from] SignerError),
    #[error("{0}")]
    Entra(#[from] EntraError),
    #[error("internal: {0}")]
    Internal(String),
}

impl FromJoin for FlowError {
    fn from_join(e: tokio::task::JoinError) -> Self {
        FlowError::Internal(format!("token fetch task ended: {e}"))
    }
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
    #[error("Entra issued a token valid for {remaining:?}, less than the {wanted:?} asked for")]
    MinValidityUnmet {
        remaining: Duration,
        wanted: Duration,
    },
    #[error("token for tenant `{tenant}` unavailable: {source}")]
    Upstream {
        tenant: String,
        #[source]
        source: Arc<FlowError>,
    },
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// Counters for tests, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub stale_served: AtomicU64,
    pub refreshes: AtomicU64,
    pub refresh_failures: AtomicU64,
    pub exchanges: AtomicU64,
    pub signs: AtomicU64,
}

/// The upstream seams the broker uses; tests replace any of them.
#[derive(Clone, Debug)]
pub struct Upstreams {
    pub signer: Arc<dyn Signer>,
    pub exchange: Arc<dyn TokenExchange>,
    pub clock: Arc<dyn Clock>,
}

struct Tenant {
    config: TenantConfig,
    name: Arc<str>,
    tenant_id: Arc<str>,
    client_id: Arc<str>,
    token_endpoint: Url,
}

type CertKey = (Url, String);

struct Inner {
    tenants: HashMap<String, Arc<Tenant>>,
    up: Upstreams,
    cfg: CacheConfig,
    cache: TokenCache<FlowError>,
    certs: moka::future::Cache<CertKey, CertificateInfo>,
    stats: Stats,
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
            .map(|t| {
                let tenant = Tenant {
                    name: Arc::from(t.name.as_str()),
                    tenant_id: Arc::from(t.tenant_id.as_str()),
                    client_id: Arc::from(t.client_id.as_str()),
                    token_endpoint: entra::token_endpoint(&authority, &t.tenant_id),
                    config: t.clone(),
                };
                (t.name.clone(), Arc::new(tenant))
            })
            .collect();
        let cfg = config.cache.clone();
        Broker {
            inner: Arc::new(Inner {
                tenants,
                cache: TokenCache::new(cfg.max_entries, Duration::from_secs(24 * 3600)),
                certs: moka::future::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(cfg.certificate_refresh)
                    .build(),
                cfg,
                up,
                stats: Stats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.inner.tenants.keys().map(String::as_str)
    }

    /// Validates a request and returns its cache key.
    pub fn key(&self, tenant: &str, scopes: &[String]) -> Result<Key, BrokerError> {
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
        let scopes = normalise_scopes(scopes)?;
        Ok(Key {
            tenant: t.name.clone(),
            scopes: scopes.into(),
        })
    }

    /// Serves a token: from cache when it meets the caller's minimum validity, otherwise
    /// from the one fetch under way for its key.
    pub async fn get_token(&self, req: &TokenRequest) -> Result<IssuedToken, BrokerError> {
        let key = self.key(&req.tenant, &req.scopes)?;
        let wanted = match req.min_validity {
            Some(d) if d > MAX_MIN_VALIDITY => {
                return Err(BrokerError::InvalidArgument {
                    field: "min_validity",
                    message: format!(
                        "at most {}s: Entra tokens live 60 to 90 minutes",
                        MAX_MIN_VALIDITY.as_secs()
                    ),
                });
            }
            Some(d) => d.max(self.inner.cfg.safety_margin),
            None => self.inner.cfg.default_min_validity,
        };
        let slot = self.inner.cache.slot(&key).await;
        let now = self.inner.up.clock.now();
        let state = slot.current();
        if let Some(token) = &state.token
            && token.remaining(now) >= wanted
            && !(req.force_refresh && slot.allow_forced(self.inner.cfg.force_refresh_interval))
        {
            self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
            if now >= token.refresh_at && state.failure.is_none() {
                // Overdue (the scheduled refresh has not run yet): start it, or join the one
                // running, without waiting. After a failure the scheduler's backoff decides.
                let _ = self.start_fetch(&key, &slot);
            }
            let source = if state.failure.is_some() {
                self.inner
                    .stats
                    .stale_served
                    .fetch_add(1, Ordering::Relaxed);
                TokenSource::StaleWhileRefreshFailing
            } else {
                TokenSource::Cache
            };
            return Ok(IssuedToken {
                token: token.clone(),
                source,
            });
        }
        self.inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (joined, flight) = self.start_fetch(&key, &slot)?;
        if joined == Joined::Follower {
            self.inner.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        let token = flight.await.map_err(|source| BrokerError::Upstream {
            tenant: key.tenant.to_string(),
            source,
        })?;
        let remaining = token.remaining(self.inner.up.clock.now());
        if remaining < wanted {
            return Err(BrokerError::MinValidityUnmet { remaining, wanted });
        }
        Ok(IssuedToken {
            token,
            source: TokenSource::Exchange,
        })
    }

    /// The slot of a key, for watchers. The first state may have no token yet.
    pub async fn subscribe(
        &self,
        tenant: &str,
        scopes: &[String],
    ) -> Result<tokio::sync::watch::Receiver<SlotState>, BrokerError> {
        let key = self.key(tenant, scopes)?;
        let slot = self.inner.cache.slot(&key).await;
        let rx = slot.subscribe();
        if slot.current().token.is_none() {
            let _ = self.start_fetch(&key, &slot);
        }
        Ok(rx)
    }

    fn start_fetch(
        &self,
        key: &Key,
        slot: &Arc<Slot<FlowError>>,
    ) -> Result<(Joined, Flight), BrokerError> {
        let tenant = self
            .inner
            .tenants
            .get(key.tenant.as_ref())
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTenant(key.tenant.to_string()))?;
        let broker = self.clone();
        let scopes = key.scopes.clone();
        let weak_slot = Arc::downgrade(slot);
        let key_for_refresh = key.clone();
        Ok(slot.fetch(move || {
            let span = info_span!("fetch", tenant = %tenant.name, scopes = %scopes.join(" "));
            async move {
                let result = broker.fetch(&tenant, &scopes).await;
                match &result {
                    Ok(t) => {
                        broker.schedule_refresh(key_for_refresh, weak_slot, t.refresh_at);
                    }
                    Err(e) => {
                        broker
                            .inner
                            .stats
                            .refresh_failures
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "token fetch failed");
                    }
                }
                result.map_err(Arc::new)
            }
            .instrument(span)
        }))
    }

    /// Refreshes a key in the background at its refresh time, for as long as its slot lives.
    fn schedule_refresh(&self, key: Key, slot: std::sync::Weak<Slot<FlowError>>, at: SystemTime) {
        let broker = self.clone();
        let delay = at
            .duration_since(self.inner.up.clock.now())
            .unwrap_or(Duration::ZERO);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut failures = 0u32;
            loop {
                let Some(live) = slot.upgrade() else { return };
                // A newer token may have been published meanwhile (forced refresh): its own
                // schedule takes over.
                if let Some(t) = live.current().token
                    && t.refresh_at > at
                {
                    return;
                }
                broker.inner.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                debug!(key = %key, "refreshing ahead of expiry");
                let Ok((_, flight)) = broker.start_fetch(&key, &live) else {
                    return;
                };
                drop(live);
                if flight.await.is_ok() {
                    // The successful fetch scheduled the next refresh.
                    return;
                }
                failures += 1;
                tokio::time::sleep(refresh_backoff(failures)).await;
            }
        });
    }

    /// The credential flow for one key.
    async fn fetch(
        &self,
        tenant: &Tenant,
        scopes: &[String],
    ) -> Result<Arc<CachedToken>, FlowError> {
        let Credential::KeyVaultCertificate {
            vault_url,
            certificate,
            algorithm,
            thumbprint,
        } = &tenant.config.credential;
        let cert_key: CertKey = (vault_url.clone(), certificate.clone());
        let mut cert = self.certificate(&cert_key).await?;
        let mut retried_key = false;
        let mut retried_clock = false;
        loop {
            let now = self.inner.up.clock.now();
            let params = AssertionParams {
                token_endpoint: &tenant.token_endpoint,
                client_id: &tenant.client_id,
                algorithm: *algorithm,
                thumbprint: *thumbprint,
                now: self.inner.up.clock.unix(),
            };
            self.inner.stats.signs.fetch_add(1, Ordering::Relaxed);
            let assertion = assertion::build(self.inner.up.signer.as_ref(), &params, &cert).await?;
            let correlation_id = uuid::Uuid::new_v4();
            self.inner.stats.exchanges.fetch_add(1, Ordering::Relaxed);
            let result = self
                .inner
                .up
                .exchange
                .exchange(ExchangeRequest {
                    token_endpoint: &tenant.token_endpoint,
                    client_id: &tenant.client_id,
                    scope: &scopes.join(" "),
                    assertion: &assertion,
                    correlation_id,
                })
                .await;
            match result {
                Ok(t) => {
                    let lifetime = t.expires_in;
                    let refresh_in = t.refresh_in.filter(|r| *r < lifetime).unwrap_or_else(|| {
                        refresh_after(lifetime, self.inner.cfg.refresh_fraction)
                    });
                    info!(
                        tenant = %tenant.name,
                        expires_in = lifetime.as_secs(),
                        fingerprint = %t.access_token.fingerprint(),
                        %correlation_id,
                        "token obtained"
                    );
                    return Ok(Arc::new(CachedToken {
                        access_token: t.access_token,
                        token_type: t.token_type,
                        obtained_at: now,
                        expires_at: now + lifetime,
                        refresh_at: now + refresh_in,
                        tenant_id: tenant.tenant_id.clone(),
                        client_id: tenant.client_id.clone(),
                        scopes: scopes.to_vec().into(),
                    }));
                }
                // Entra does not know the key we signed with: the certificate may have been
                // rotated. Re-read its metadata at once and retry once if it changed.
                Err(e) if e.class == EntraErrorClass::KeyRejected && !retried_key => {
                    retried_key = true;
                    self.inner.certs.invalidate(&cert_key).await;
                    let fresh = self.certificate(&cert_key).await?;
                    if fresh == cert {
                        return Err(e.into());
                    }
                    info!(tenant = %tenant.name, version = %fresh.version, "certificate changed; retrying with the new version");
                    cert = fresh;
                }
                // Outside the assertion's time window: one fresh assertion, then give up.
                Err(e) if e.class == EntraErrorClass::Clock && !retried_clock => {
                    retried_clock = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn certificate(&self, key: &CertKey) -> Result<CertificateInfo, FlowError> {
        let signer = self.inner.up.signer.clone();
        let (vault, name) = key.clone();
        self.inner
            .certs
            .try_get_with_by_ref(key, async move { signer.certificate(&vault, &name).await })
            .await
            .map_err(|e: Arc<SignerError>| FlowError::Signer((*e).clone()))
    }
}

/// When to refresh a token of `lifetime` with no `refresh_in`: at `fraction` of its life,
/// less up to 10% jitter so tenants loaded together do not refresh together.
pub fn refresh_after(lifetime: Duration, fraction: f64) -> Duration {
    let base = lifetime.mul_f64(fraction);
    let jitter = lifetime.mul_f64(0.1 * rand::rng().random::<f64>());
    base.saturating_sub(jitter)
}

/// Full-jitter exponential backoff between failed background refreshes: 1 s doubling,
/// capped at 60 s, so an outage costs Entra one call per key per minute at most.
pub fn refresh_backoff(failures: u32) -> Duration {
    let cap = Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60));
    cap.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Trims, de-duplicates and sorts scopes, and checks their shape.
pub fn normalise_scopes(scopes: &[String]) -> Result<Vec<String>, BrokerError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_normalised() {
        let s = normalise_scopes(&[
            " https://graph.microsoft.com/.default".into(),
            "api://b/.default".into(),
            "https://graph.microsoft.com/.default".into(),
        ])
        .unwrap();
        assert_eq!(
            s,
            vec!["api://b/.default", "https://graph.microsoft.com/.default"]
        );
    }

    #[test]
    fn bad_scopes_name_the_field() {
        for bad in [
            vec![],
            vec!["".to_string()],
            vec!["a b".to_string()],
            vec!["x".repeat(600)],
        ] {
            match normalise_scopes(&bad) {
                Err(BrokerError::InvalidArgument { field, .. }) => assert_eq!(field, "scopes"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn refresh_is_at_the_fraction_less_jitter() {
        let life = Duration::from_secs(3600);
        for _ in 0..100 {
            let r = refresh_after(life, 0.5);
            assert!(
                r <= Duration::from_secs(1800) && r >= Duration::from_secs(1440),
                "{r:?}"
            );
        }
    }
}
