//! The credential flow for one cache key, with its upstream protection: certificate
//! metadata (cached, refreshed periodically, served stale if Key Vault is down), the client
//! assertion signed by the `Signer`, and the Entra exchange; each upstream call behind a
//! budget (token bucket), a circuit breaker and bounded retries with full-jitter backoff
//! that honour `Retry-After`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{Instrument, info, info_span, warn};
use url::Url;

use crate::assertion::{self, AssertionParams};
use crate::broker::{MAX_RETRY_AFTER, Upstreams};
use crate::cache::CachedToken;
use crate::claims::Claims;
use crate::clock::{Clock, MAX_SPAN, Moment};
use crate::config::{
    CacheConfig, Config, Credential, ResilienceConfig, SigningAlgorithm, TenantConfig,
    ThumbprintHeader,
};
use crate::entra::{self, EntraError, EntraErrorClass, EntraToken, ExchangeRequest, TokenExchange};
use crate::identity::{IdentityAssertions, IdentityError};
use crate::metrics::{self, Metrics, Upstream};
use crate::outbound::WriteWatch;
use crate::resilience::{Breaker, BreakerState, Bucket, backoff};
use crate::sensitive::Sensitive;
use crate::signer::{CertificateInfo, Signer, SignerError};

/// What went wrong in the credential flow for one key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlowError {
    /// Its message names the service (Key Vault or the HSM).
    #[error("{0}")]
    Signer(#[from] SignerError),
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Entra(#[from] EntraError),
    #[error("internal: {0}")]
    Internal(String),
}

impl FlowError {
    /// Transient: worth retrying later (throttling, outage, open breaker, spent budget).
    pub fn is_retryable(&self) -> bool {
        match self {
            FlowError::Signer(e) => e.is_retryable() || matches!(e, SignerError::Identity { .. }),
            // The endpoint failing is worth retrying; an identity the broker lacks is not.
            FlowError::Identity(e) => matches!(e, IdentityError::Unavailable { .. }),
            FlowError::Entra(e) => e.class == EntraErrorClass::Retryable,
            FlowError::Internal(_) => false,
        }
    }

    /// The upstream refused the call rate (Entra's 429, AADSTS90055; Key Vault's 429): calls
    /// before its `Retry-After` would be refused too.
    fn is_throttling(&self) -> bool {
        match self {
            FlowError::Entra(e) => e.status == 429 || e.codes.contains(&90055),
            // Key Vault throttles per vault, which is what its breakers are kept by.
            FlowError::Signer(SignerError::Unavailable { throttled, .. }) => *throttled,
            _ => false,
        }
    }

    /// The upstream's own hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FlowError::Signer(
                SignerError::Unavailable { retry_after, .. }
                | SignerError::Identity { retry_after, .. },
            )
            | FlowError::Identity(IdentityError::Unavailable { retry_after, .. }) => *retry_after,
            FlowError::Entra(e) => e.retry_after,
            _ => None,
        }
    }

    /// This failure with `after` as its retry hint (a variant without one is unchanged).
    pub fn with_retry_after(&self, after: Duration) -> FlowError {
        let mut e = self.clone();
        match &mut e {
            FlowError::Signer(
                SignerError::Unavailable { retry_after, .. }
                | SignerError::Identity { retry_after, .. },
            )
            | FlowError::Identity(IdentityError::Unavailable { retry_after, .. }) => {
                *retry_after = Some(after)
            }
            FlowError::Entra(e) => e.retry_after = Some(after),
            _ => {}
        }
        e
    }

    /// Whether this is `upstream`'s failure (an internal error is everyone's).
    fn is_from(&self, upstream: Upstream) -> bool {
        match self {
            FlowError::Signer(_) => matches!(
                upstream,
                Upstream::KeyVaultSign
                    | Upstream::KeyVaultCertificate
                    | Upstream::HsmSign
                    | Upstream::HsmCertificate
            ),
            FlowError::Identity(_) => upstream == Upstream::ManagedIdentity,
            FlowError::Entra(_) => upstream == Upstream::Entra,
            FlowError::Internal(_) => true,
        }
    }

    /// A configuration or caller problem that asking again will not fix: negative-cached.
    pub fn is_persistent(&self) -> bool {
        !self.is_retryable() && !matches!(self, FlowError::Internal(_))
    }

    /// `upstream` did not answer within the fetch's retry budget: retryable, named, with
    /// the failure of the attempt before, if there was one (the cause worth knowing: the
    /// last attempt was only cut short).
    /// `sent`: the request id the attempt was sent with (Entra's `client-request-id`), for
    /// an operator to quote: the upstream may have logged the request.
    fn timed_out(
        upstream: Upstream,
        budget: Duration,
        before: Option<&FlowError>,
        sent: Option<uuid::Uuid>,
    ) -> Self {
        let mut message = format!(
            "no answer within the fetch's retry budget of {}s (resilience.retry_budget_secs)",
            budget.as_secs()
        );
        if let Some(e) = before {
            message.push_str(&format!("; the attempt before failed: {e}"));
        }
        FlowError::no_answer(upstream, message, sent)
    }

    /// An attempt unanswered after `bound`, asked again on a new connection.
    fn cut_off(upstream: Upstream, bound: Duration, sent: Option<uuid::Uuid>) -> Self {
        let message = format!(
            "no answer within {}s, half the fetch's retry budget, after which a first attempt is asked again on a new connection",
            bound.as_secs_f64()
        );
        FlowError::no_answer(upstream, message, sent)
    }

    fn no_answer(upstream: Upstream, message: String, sent: Option<uuid::Uuid>) -> Self {
        match FlowError::unavailable(upstream, message, Duration::from_secs(1)) {
            FlowError::Entra(e) => FlowError::Entra(EntraError {
                error: "timeout".into(),
                correlation_id: sent.map(|id| id.to_string()),
                ..e
            }),
            other => other,
        }
    }

    /// `upstream`'s breaker refused a call for `remaining` more: named with the failure
    /// that opened it (`last`), so callers see Entra's code, its correlation id and whether
    /// it was throttling, not only that the broker held back.
    fn refused(upstream: Upstream, last: Option<&FlowError>, remaining: Duration) -> Self {
        let next = remaining.as_secs().max(1);
        let Some(last) = last else {
            return FlowError::unavailable(
                upstream,
                format!("circuit open after repeated failures; next try in {next}s"),
                remaining,
            );
        };
        let state = if last.is_throttling() {
            "throttled"
        } else {
            "unavailable"
        };
        // The service is named once, by the error this one becomes.
        let cause = match last {
            FlowError::Signer(SignerError::Unavailable { message, .. })
            | FlowError::Identity(IdentityError::Unavailable { message, .. }) => message.clone(),
            other => other.to_string(),
        };
        FlowError::unavailable(
            upstream,
            format!(
                "{state}, not asked again until the next try in {next}s (circuit open); the failure that opened it: {cause}"
            ),
            remaining,
        )
    }

    fn unavailable(upstream: Upstream, message: String, retry_after: Duration) -> Self {
        match upstream {
            Upstream::Entra => FlowError::Entra(EntraError {
                class: EntraErrorClass::Retryable,
                status: 0,
                error: "broker_backoff".into(),
                codes: vec![],
                description: message,
                correlation_id: None,
                trace_id: None,
                retry_after: Some(retry_after),
            }),
            Upstream::ManagedIdentity => FlowError::Identity(IdentityError::Unavailable {
                message,
                retry_after: Some(retry_after),
            }),
            Upstream::KeyVaultSign
            | Upstream::KeyVaultCertificate
            | Upstream::HsmSign
            | Upstream::HsmCertificate => FlowError::Signer(SignerError::Unavailable {
                service: upstream.service(),
                message,
                retry_after: Some(retry_after),
                throttled: false,
            }),
        }
    }
}

/// What callers and watchers are told when a fetch task died (a panic: a bug).
pub const FETCH_DIED: &str = "internal error in the token fetch; see the broker's log";

impl crate::cache::FromJoin for FlowError {
    fn from_join(e: tokio::task::JoinError) -> Self {
        // A panic's message is the broker's own detail, for its operators: it goes to the
        // log (once per flight), not to every caller and watcher.
        tracing::error!(error = %e, "token fetch task ended without a result");
        FlowError::Internal(FETCH_DIED.into())
    }
}

impl crate::cache::Transient for FlowError {
    fn is_transient(&self) -> bool {
        self.is_retryable()
    }
}

/// A half-open breaker's probe out in an attempt. Released when dropped unsettled: a probe
/// that panics, is cancelled, or ends without a verdict on its upstream must not leave the
/// breaker refusing every call for good.
struct ProbeOut<'a>(Option<&'a Breaker>);

impl<'a> ProbeOut<'a> {
    /// The verdict is being recorded: nothing to release. The breaker, if this was the probe.
    fn settle(&mut self) -> Option<&'a Breaker> {
        self.0.take()
    }

    /// Whether this is a half-open breaker's probe.
    fn is_probe(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for ProbeOut<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0 {
            b.release();
        }
    }
}

/// A fetch's retry budget, spent on two timers. Waits and retries end at `at`, on the
/// broker's `Clock` like every deadline. An attempt (a call in flight) is cut off at `io`,
/// the same span on the runtime's monotonic timer, like the outbound timeouts: it bounds how
/// long the network may take, and a jump of the `Clock` (a host resumed from suspend, a
/// test's manual clock moved a minute on) must not cut off calls answered in an instant.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Moment,
    io: tokio::time::Instant,
}

impl Deadline {
    /// This deadline, or `span` from now if that is sooner.
    fn within(self, clock: &dyn Clock, span: Duration) -> Deadline {
        Deadline {
            at: self.at.earlier(clock.moment() + span),
            io: self.io.min(tokio::time::Instant::now() + span),
        }
    }
}

/// When an attempt watched by `watch` is given up, once that time has come: `bound` after
/// its request was written, or `bound` after it began if it is not written by then (a
/// connection that cannot be had); else, or at the latest, when the budget is spent. The
/// time to get a connection, a starved CPU's included, is not taken from the answer's:
/// counted against it, a cold burst's handshakes cut off first attempts that were being
/// answered, and their retries doubled the signs and exchanges of those keys.
async fn cut_off(
    bound: Option<Duration>,
    watch: &WriteWatch,
    deadline: Deadline,
) -> tokio::time::Instant {
    let at = match bound {
        None => deadline.io,
        Some(b) => {
            let unwritten = tokio::time::Instant::now() + b;
            match tokio::time::timeout_at(unwritten.min(deadline.io), watch.written()).await {
                Ok(written) => written + b,
                Err(_) => unwritten,
            }
        }
    }
    .min(deadline.io);
    tokio::time::sleep_until(at).await;
    at
}

/// The answer of `attempt`, if there is one; else never.
async fn answer_of<F: Future + Unpin>(attempt: &mut Option<F>) -> F::Output {
    match attempt {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The first attempt's answer, if it is one and comes before the budget is spent; at once
/// if there is none.
async fn answer_by_the_end<T, F>(
    upstream: Upstream,
    first: &mut Option<F>,
    deadline: Deadline,
) -> Option<T>
where
    F: Future<Output = Result<T, FlowError>> + Unpin,
{
    let f = first.as_mut()?;
    let answer = tokio::time::timeout_at(deadline.io, f).await.ok()?.ok()?;
    answered_first(upstream);
    Some(answer)
}

fn answered_first(upstream: Upstream) {
    info!(
        upstream = upstream.as_str(),
        "a first attempt asked again after half the budget answered before its retry"
    );
}

/// The request id an attempt sent, kept outside it: an attempt cut off is dropped with it.
type SentId = Mutex<Option<uuid::Uuid>>;

/// Upstream call counters (tests, metrics, benchmarks).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub signs: AtomicU64,
    pub exchanges: AtomicU64,
    pub certificate_reads: AtomicU64,
    pub retries: AtomicU64,
    pub breaker_rejections: AtomicU64,
}

/// What a fetch asks Entra for: the scopes, and the `claims` parameter, if any.
#[derive(Debug, Clone, Copy)]
struct Want<'a> {
    scopes: &'a Arc<[String]>,
    claims: Option<&'a str>,
}

/// A tenant as the flow needs it.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    pub name: Arc<str>,
    pub tenant_id: Arc<str>,
    pub client_id: Arc<str>,
    pub token_endpoint: Url,
}

type CertKey = (Url, String);

struct CertEntry {
    current: Mutex<(CertificateInfo, Moment)>,
    /// The version in use before the current one: signing falls back to it while Entra does
    /// not yet accept a renewed certificate (its public part not yet on the app).
    previous: Mutex<Option<CertificateInfo>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl CertEntry {
    fn store(&self, fresh: &CertificateInfo, now: Moment) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != *fresh {
            *self.previous.lock().unwrap_or_else(|p| p.into_inner()) = Some(current.0.clone());
        }
        *current = (fresh.clone(), now);
    }
}

/// One upstream's guards: a budget and a breaker.
#[derive(Debug)]
struct Guard {
    upstream: Upstream,
    bucket: Option<Bucket>,
    breaker: Breaker,
    /// The last failure the breaker counted: what its refusals name as their cause.
    last_failure: Mutex<Option<FlowError>>,
}

impl Guard {
    /// `probe`: the failed call was the half-open breaker's probe.
    fn failure(&self, now: tokio::time::Instant, e: &FlowError, probe: bool) {
        // Throttled: until the upstream's Retry-After the breaker refuses every call to it,
        // from this fetch and every other (bounded as the refreshes' retries are: a proxy's
        // hint of a day must not stop a tenant).
        let hint = e.retry_after().map(|h| h.min(MAX_RETRY_AFTER));
        self.breaker.failure(now, hint, e.is_throttling(), probe);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
    }
}

/// The flow, shared by every fetch.
pub struct Flow {
    signer: Arc<dyn Signer>,
    hsm: Arc<dyn Signer>,
    identity: Arc<dyn IdentityAssertions>,
    exchange: Arc<dyn TokenExchange>,
    clock: Arc<dyn Clock>,
    cache: CacheConfig,
    res: ResilienceConfig,
    certs: moka::future::Cache<CertKey, Arc<CertEntry>>,
    /// Per vault: signs (budgeted) and certificate reads (breaker only, shared). Per
    /// PKCS#11 token too, by its URI (breakers only: the HSM is the broker's own).
    vaults: HashMap<String, (Guard, Guard)>,
    /// Per managed identity used as a federated credential: its token requests (breaker
    /// only; the credential keeps to the endpoint's limits).
    identities: HashMap<String, Guard>,
    /// Per tenant name: Entra exchanges.
    entra: HashMap<String, Guard>,
    /// Each signing tenant's certificate, for the expiry metric.
    cert_tenants: Vec<(String, CertKey)>,
    pub stats: UpstreamStats,
    /// OpenTelemetry instruments (upstream calls here, requests in `api`, state observed).
    pub metrics: Metrics,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow").finish_non_exhaustive()
    }
}

impl Flow {
    pub fn new(config: &Config, up: &Upstreams) -> Flow {
        let res = config.resilience.clone();
        let clock = up.clock.clone();
        let now = clock.moment().mono;
        let breaker = || Breaker::new(res.breaker_failures, res.breaker_cool_down);
        let mut vaults = HashMap::new();
        let mut identities = HashMap::new();
        let mut entra = HashMap::new();
        for t in config.tenants.values() {
            match &t.credential {
                Credential::KeyVaultCertificate { vault_url, .. } => {
                    vaults.entry(vault_url.to_string()).or_insert_with(|| {
                        (
                            Guard {
                                upstream: Upstream::KeyVaultSign,
                                bucket: Some(Bucket::new(
                                    res.sign_rate_per_vault,
                                    res.sign_burst,
                                    now,
                                )),
                                breaker: breaker(),
                                last_failure: Mutex::default(),
                            },
                            Guard {
                                upstream: Upstream::KeyVaultCertificate,
                                bucket: None,
                                breaker: breaker(),
                                last_failure: Mutex::default(),
                            },
                        )
                    });
                }
                Credential::Pkcs11 { uri, .. } => {
                    vaults.entry(uri.to_string()).or_insert_with(|| {
                        (
                            Guard {
                                upstream: Upstream::HsmSign,
                                bucket: None,
                                breaker: breaker(),
                                last_failure: Mutex::default(),
                            },
                            Guard {
                                upstream: Upstream::HsmCertificate,
                                bucket: None,
                                breaker: breaker(),
                                last_failure: Mutex::default(),
                            },
                        )
                    });
                }
                Credential::ManagedIdentity { client_id, .. } => {
                    identities
                        .entry(client_id.clone())
                        .or_insert_with(|| Guard {
                            upstream: Upstream::ManagedIdentity,
                            bucket: None,
                            breaker: breaker(),
                            last_failure: Mutex::default(),
                        });
                }
            }
            entra.insert(
                t.name.clone(),
                Guard {
                    upstream: Upstream::Entra,
                    bucket: Some(Bucket::new(
                        res.exchange_rate_per_tenant,
                        res.exchange_burst,
                        now,
                    )),
                    breaker: breaker(),
                    last_failure: Mutex::default(),
                },
            );
        }
        let cert_tenants = config
            .tenants
            .values()
            .filter_map(|t| Some((t.name.clone(), cert_key(&t.credential)?)))
            .collect();
        Flow {
            cert_tenants,
            signer: up.signer.clone(),
            hsm: up.hsm.clone(),
            identity: up.identity.clone(),
            exchange: up.exchange.clone(),
            clock,
            cache: config.cache.clone(),
            res,
            certs: moka::future::Cache::builder().max_capacity(10_000).build(),
            vaults,
            identities,
            entra,
            stats: UpstreamStats::default(),
            metrics: Metrics::new(config),
        }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Breaker states by upstream and target (vault URL, tenant name, identity client id),
    /// for metrics.
    pub fn breaker_states(&self) -> Vec<(Upstream, String, BreakerState)> {
        let now = self.clock.moment().mono;
        let vaults = self
            .vaults
            .iter()
            .flat_map(|(v, (sign, read))| [(v, sign), (v, read)]);
        vaults
            .chain(&self.entra)
            .chain(&self.identities)
            .map(|(target, g)| (g.upstream, target.clone(), g.breaker.state(now)))
            .collect()
    }

    /// Obtains a token for `tenant` and `scopes`; with a caller's claims `challenge`, a
    /// token carrying those claims (merged with the tenant's client capabilities).
    pub async fn fetch(
        &self,
        tenant: &Tenant,
        scopes: &Arc<[String]>,
        challenge: Option<&Claims>,
    ) -> Result<CachedToken, FlowError> {
        let claims =
            crate::claims::request_parameter(&tenant.config.client_capabilities, challenge);
        let want = Want {
            scopes,
            claims: claims.as_deref(),
        };
        let deadline = Deadline {
            at: self.clock.moment() + self.res.retry_budget,
            io: tokio::time::Instant::now() + self.res.retry_budget.min(MAX_SPAN),
        };
        match &tenant.config.credential {
            Credential::KeyVaultCertificate {
                vault_url,
                certificate,
                algorithm,
                thumbprint,
            } => {
                let key = (vault_url.clone(), certificate.clone());
                self.fetch_signed(tenant, &want, deadline, key, *algorithm, *thumbprint)
                    .await
            }
            Credential::Pkcs11 {
                uri,
                key,
                algorithm,
                thumbprint,
                ..
            } => {
                let key = (uri.clone(), key.clone());
                self.fetch_signed(tenant, &want, deadline, key, *algorithm, *thumbprint)
                    .await
            }
            Credential::ManagedIdentity {
                client_id,
                audience,
            } => {
                self.fetch_federated(tenant, &want, deadline, client_id, audience)
                    .await
            }
        }
    }

    /// The signer that holds `location`'s keys: a PKCS#11 token (a `pkcs11:` URI) or a
    /// Key Vault, and the upstreams its signs and certificate reads are counted as.
    fn signer_for(&self, location: &Url) -> (&dyn Signer, Upstream, Upstream) {
        if location.scheme() == "pkcs11" {
            (
                self.hsm.as_ref(),
                Upstream::HsmSign,
                Upstream::HsmCertificate,
            )
        } else {
            (
                self.signer.as_ref(),
                Upstream::KeyVaultSign,
                Upstream::KeyVaultCertificate,
            )
        }
    }

    /// With a certificate: the assertion signed by Key Vault or a PKCS#11 token.
    async fn fetch_signed(
        &self,
        tenant: &Tenant,
        want: &Want<'_>,
        deadline: Deadline,
        cert_key: CertKey,
        algorithm: SigningAlgorithm,
        thumbprint: ThumbprintHeader,
    ) -> Result<CachedToken, FlowError> {
        let vault = self.vaults.get(cert_key.0.as_str());
        let entra = self.entra.get(tenant.name.as_ref());
        // No certificate read or sign for an exchange Entra's breaker would refuse: a
        // failing tenant would spend its vault's sign budget, shared by every tenant on it.
        let mut admitted = Some(self.admit(entra)?);
        let mut cert = self
            .certificate(&cert_key, vault.map(|v| &v.1), deadline)
            .await?;
        let mut retried_key = false;
        let mut retried_clock = false;
        // Entra's refusal of the current version, while the previous one is tried instead.
        let mut refused_current: Option<EntraError> = None;
        loop {
            let entra_admitted = match admitted.take() {
                Some(a) => a,
                None => self.admit(entra)?,
            };
            let sign = || {
                self.sign(
                    tenant,
                    &cert_key,
                    vault.map(|v| &v.0),
                    &cert,
                    (algorithm, thumbprint),
                    deadline,
                )
            };
            // The first sign, then the exchange (whose retries sign anew).
            let outcome = match sign().await {
                Ok(assertion) => {
                    self.exchange(tenant, want, (assertion, entra_admitted), sign, deadline)
                        .await
                }
                Err(e) => Err(e),
            };
            // The previous version cannot sign either (disabled, or its key deleted, after the
            // renewal): what is to fix is the current version's absence from the app, not the
            // previous version the broker tried on its own.
            let outcome = match (outcome, refused_current.take()) {
                (
                    Err(FlowError::Signer(fallback @ SignerError::NotFound { .. })),
                    Some(refusal),
                ) => Err(FlowError::Entra(EntraError {
                    description: format!(
                        "{} (the previous version cannot sign instead: {fallback})",
                        refusal.description
                    ),
                    ..refusal
                })),
                (outcome, _) => outcome,
            };
            match outcome {
                Ok((started, t)) => return Ok(self.obtained(tenant, want.scopes, started, t)),
                // The key of the version we hold is gone (removed from an HSM after a
                // rotation), at the first sign or at a retry's: re-read the metadata at once
                // and sign again if it changed, rather than fail every refresh until the next
                // scheduled re-read.
                Err(e @ FlowError::Signer(SignerError::NotFound { .. })) if !retried_key => {
                    retried_key = true;
                    let Some(fresh) = self
                        .changed_certificate(&cert_key, vault.map(|v| &v.1), deadline, &cert)
                        .await?
                    else {
                        return Err(e);
                    };
                    info!(tenant = %tenant.name, version = %fresh.version, "signing key version gone; signing with the current one");
                    cert = fresh;
                    continue;
                }
                // Entra does not know the key we signed with: the certificate may have been
                // rotated. Re-read its metadata at once and retry once if it changed.
                Err(FlowError::Entra(e))
                    if e.class == EntraErrorClass::KeyRejected && !retried_key =>
                {
                    retried_key = true;
                    // Entra's refusal is the news; a failed re-read is only its context.
                    let changed = match self
                        .changed_certificate(&cert_key, vault.map(|v| &v.1), deadline, &cert)
                        .await
                    {
                        Ok(changed) => changed,
                        Err(reread) => {
                            return Err(FlowError::Entra(EntraError {
                                description: format!(
                                    "{} (re-reading the certificate after the refusal failed: {reread})",
                                    e.description
                                ),
                                ..e
                            }));
                        }
                    };
                    if let Some(fresh) = changed {
                        info!(tenant = %tenant.name, version = %fresh.version, "certificate changed; retrying with the new version");
                        cert = fresh;
                        continue;
                    }
                    // The current version itself is refused: typically Key Vault renewed the
                    // certificate and its public part is not on the app yet. Sign with the
                    // previous version, once, rather than fail the tenant.
                    match self.previous_certificate(&cert_key).await {
                        Some(prev) if prev != cert => {
                            warn!(
                                tenant = %tenant.name,
                                refused = %cert.version,
                                using = %prev.version,
                                "Entra refuses the current certificate version (AADSTS700027); signing with the previous version: upload the new certificate to the app registration"
                            );
                            cert = prev;
                            refused_current = Some(e);
                        }
                        _ => return Err(e.into()),
                    }
                }
                // Outside the assertion's time window: one fresh assertion, then give up.
                Err(FlowError::Entra(e)) if e.class == EntraErrorClass::Clock && !retried_clock => {
                    retried_clock = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A client assertion for `tenant`, signed with `cert`'s key behind the signer's guard.
    async fn sign(
        &self,
        tenant: &Tenant,
        cert_key: &CertKey,
        guard: Option<&Guard>,
        cert: &CertificateInfo,
        (algorithm, thumbprint): (SigningAlgorithm, ThumbprintHeader),
        deadline: Deadline,
    ) -> Result<Sensitive, FlowError> {
        let (signer, upstream, _) = self.signer_for(&cert_key.0);
        self.guarded(upstream, guard, deadline, || async {
            let params = AssertionParams {
                token_endpoint: &tenant.token_endpoint,
                client_id: &tenant.client_id,
                algorithm,
                thumbprint,
                now: self.clock.unix(),
            };
            self.stats.signs.fetch_add(1, Ordering::Relaxed);
            let call = self.metrics.upstream_call(upstream);
            let span = match upstream {
                Upstream::HsmSign => info_span!("hsm.sign", otel.kind = "client", tenant = %tenant.name, key_version = %cert.version),
                _ => info_span!("keyvault.sign", otel.kind = "client", tenant = %tenant.name, key_version = %cert.version),
            };
            let r = self
                .metrics
                .scope(assertion::build(signer, &params, cert))
                .instrument(span)
                .await;
            call.end(r.as_ref().err().map(metrics::signer_code));
            Ok(r?)
        })
        .await
    }

    /// With a managed identity the app trusts as a federated credential: its token is the
    /// assertion (cached by the credential and valid for hours, so a refused one is not
    /// retried here).
    async fn fetch_federated(
        &self,
        tenant: &Tenant,
        want: &Want<'_>,
        deadline: Deadline,
        client_id: &str,
        audience: &str,
    ) -> Result<CachedToken, FlowError> {
        let guard = self.identities.get(client_id);
        let admitted = self.admit(self.entra.get(tenant.name.as_ref()))?;
        let assertion = self
            .guarded(Upstream::ManagedIdentity, guard, deadline, || async {
                let span = info_span!("managed_identity.assertion", otel.kind = "client", tenant = %tenant.name, identity = %client_id);
                let r = self
                    .metrics
                    .scope(self.identity.assertion(client_id, audience))
                    .instrument(span)
                    .await;
                Ok(r?)
            })
            .await?;
        // A managed identity's token is meant to be presented again until it expires.
        let again = || std::future::ready(Ok(assertion.clone()));
        let (started, t) = self
            .exchange(tenant, want, (assertion.clone(), admitted), again, deadline)
            .await?;
        Ok(self.obtained(tenant, want.scopes, started, t))
    }

    /// An Entra exchange behind the tenant's guard, and when it was sent. The first attempt
    /// presents `assertion`, under the breaker's admission taken before it was made; a retry
    /// presents what `again` gives. A signed assertion is sent
    /// at most once: an attempt that failed may still have reached Entra, which may refuse
    /// its `jti` the second time (RFC 7523 §3), turning a passing glitch into a refusal.
    async fn exchange<'g, A, AF>(
        &'g self,
        tenant: &Tenant,
        want: &Want<'_>,
        (assertion, admitted): (Sensitive, ProbeOut<'g>),
        again: A,
        deadline: Deadline,
    ) -> Result<(Moment, EntraToken), FlowError>
    where
        A: Fn() -> AF,
        AF: Future<Output = Result<Sensitive, FlowError>>,
    {
        let entra = self.entra.get(tenant.name.as_ref());
        let scope = want.scopes.join(" ");
        let started = self.clock.moment();
        let first = std::sync::Mutex::new(Some(assertion));
        let sent = SentId::default();
        let token = self
            .guarded_admitted(Upstream::Entra, entra, (Some(admitted), Some(&sent)), deadline, || async {
                let unsent = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                let assertion = match unsent {
                    Some(a) => a,
                    None => again().await?,
                };
                let assertion = &assertion;
                self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
                let call = self.metrics.upstream_call(Upstream::Entra);
                let correlation_id = uuid::Uuid::new_v4();
                *sent.lock().unwrap_or_else(|p| p.into_inner()) = Some(correlation_id);
                let span = info_span!("entra.exchange", otel.kind = "client", tenant = %tenant.name, correlation_id = %correlation_id, error_code = tracing::field::Empty);
                let r = self
                    .exchange
                    .exchange(ExchangeRequest {
                        token_endpoint: &tenant.token_endpoint,
                        client_id: &tenant.client_id,
                        scope: &scope,
                        assertion,
                        correlation_id,
                        claims: want.claims,
                    })
                    .instrument(span.clone())
                    .await;
                let code = r.as_ref().err().map(metrics::entra_code);
                if let Some(c) = &code {
                    span.record("error_code", c.as_str());
                }
                call.end(code);
                Ok(r?)
            })
            .await?;
        Ok((started, token))
    }

    /// The cache entry for a token Entra issued at `started`.
    fn obtained(
        &self,
        tenant: &Tenant,
        scopes: &Arc<[String]>,
        started: Moment,
        t: EntraToken,
    ) -> CachedToken {
        let lifetime = t.expires_in;
        // Before the token stops serving callers who ask for no minimum
        // (`default_min_validity_for` its lifetime): for short lifetimes (minutes) a
        // fraction of the lifetime would fall after that, and those callers would each wait
        // for a fetch on their own request. Never at once: a refresh is scheduled before the
        // token is published, and one due at once would find its own fetch still under way,
        // join it, and end the chain.
        let serves_defaults_for =
            lifetime.saturating_sub(self.cache.default_min_validity_for(lifetime));
        let refresh_in = t
            .refresh_in
            .filter(|r| *r < lifetime)
            .unwrap_or_else(|| refresh_after(lifetime, self.cache.refresh_fraction))
            .min(refresh_after(serves_defaults_for, 1.0))
            .max(MIN_REFRESH);
        let fingerprint = t.access_token.fingerprint();
        info!(
            tenant = %tenant.name,
            expires_in = lifetime.as_secs(),
            refresh_in = refresh_in.as_secs(),
            fingerprint = %fingerprint,
            "token obtained"
        );
        // Lifetimes count from when the request was sent: never overestimate.
        let expires = started + lifetime;
        // What Entra says tokens for the key live (not less the time this fetch took, which
        // retries can stretch): the most a new token could offer.
        let issued_validity = lifetime.as_secs();
        CachedToken {
            fingerprint,
            access_token: t.access_token,
            token_type: t.token_type,
            expires,
            refresh: started + refresh_in,
            issued_validity: u32::try_from(issued_validity).unwrap_or(u32::MAX),
            tenant_id: tenant.tenant_id.clone(),
            client_id: tenant.client_id.clone(),
            // The key's own: one copy of the scopes per cached key.
            scopes: scopes.clone(),
        }
    }

    /// Runs `op` (a call to `upstream`) behind the upstream's breaker and budget, retrying
    /// transient failures with full-jitter backoff (at least the upstream's `Retry-After`)
    /// until `deadline`. Each attempt is cut off when the budget is spent, too: the outbound
    /// timeouts may be longer than the whole fetch's budget, and a stalled upstream must not
    /// hold the callers past it.
    async fn guarded<T, F, Fut>(
        &self,
        upstream: Upstream,
        guard: Option<&Guard>,
        deadline: Deadline,
        op: F,
    ) -> Result<T, FlowError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FlowError>>,
    {
        self.guarded_admitted(upstream, guard, (None, None), deadline, op)
            .await
    }

    /// Whether `guard`'s breaker lets a call through now: the probe (released unless
    /// settled) when it is half-open, or the error a caller gets while it is open.
    #[expect(
        clippy::result_large_err,
        reason = "the error every guarded call returns, built only when the breaker refuses"
    )]
    fn admit<'g>(&self, guard: Option<&'g Guard>) -> Result<ProbeOut<'g>, FlowError> {
        let Some(g) = guard else {
            return Ok(ProbeOut(None));
        };
        match g.breaker.admit(self.clock.moment().mono) {
            Ok(true) => Ok(ProbeOut(Some(&g.breaker))),
            Ok(false) => Ok(ProbeOut(None)),
            Err(remaining) => {
                self.stats
                    .breaker_rejections
                    .fetch_add(1, Ordering::Relaxed);
                let last = g.last_failure.lock().unwrap_or_else(|p| p.into_inner());
                Err(FlowError::refused(g.upstream, last.as_ref(), remaining))
            }
        }
    }

    /// `guarded`, its first attempt under `admitted` when the breaker was asked before the
    /// work that prepares the call (an assertion is not signed for a call the breaker
    /// would refuse). `sent`: where an attempt keeps the request id it sends, for the error
    /// of an attempt cut off without an answer.
    async fn guarded_admitted<'g, T, F, Fut>(
        &self,
        upstream: Upstream,
        guard: Option<&'g Guard>,
        (mut admitted, sent): (Option<ProbeOut<'g>>, Option<&SentId>),
        deadline: Deadline,
        mut op: F,
    ) -> Result<T, FlowError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FlowError>>,
    {
        let mut attempt = 0u32;
        let mut before = None;
        // A first attempt asked again on a new connection (`attempt_bound`) is left running:
        // an upstream slow on every request (past half the budget, under all of it) answers
        // it before its retry, which without it would be cut off by the budget in turn.
        let mut first_attempt: Option<
            std::pin::Pin<Box<tokio::task::futures::TaskLocalFuture<WriteWatch, Fut>>>,
        > = None;
        loop {
            let mut probe = match admitted.take() {
                Some(p) => p,
                None => self.admit(guard)?,
            };
            if let Some(g) = guard {
                // Refused by the broker's own budget: the probe (if this is it) is released.
                if let Some(b) = &g.bucket
                    && !b.take(self.clock.as_ref(), deadline.at).await
                {
                    return Err(FlowError::unavailable(
                        g.upstream,
                        "the broker's own call budget for this upstream is spent; retry shortly"
                            .into(),
                        Duration::from_secs(1),
                    ));
                }
            }
            let bound = self.attempt_bound(upstream, attempt);
            if let Some(s) = sent {
                // An attempt that ends before sending (a fresh assertion's sign hangs) has
                // no request id of its own.
                *s.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            let watch = WriteWatch::new();
            let mut current = Box::pin(watch.scope(op()));
            let cut = cut_off(bound, &watch, deadline);
            tokio::pin!(cut);
            let outcome = loop {
                tokio::select! {
                    // An answer that comes as the attempt is cut off is taken.
                    biased;
                    r = &mut current => break Ok(r),
                    r = answer_of(&mut first_attempt) => {
                        first_attempt = None;
                        match r {
                            Ok(v) => {
                                answered_first(upstream);
                                break Ok(Ok(v));
                            }
                            // Its failure is not the answer: the attempt under way gives it.
                            Err(e) if e.is_from(upstream) => before = Some(e),
                            Err(_) => {}
                        }
                    }
                    cut = &mut cut => break Err(cut),
                }
            };
            let result = match outcome {
                Ok(result) => result,
                Err(cut) => {
                    let sent = sent.and_then(|s| *s.lock().unwrap_or_else(|p| p.into_inner()));
                    attempt += 1;
                    let e = match bound {
                        Some(b) if cut < deadline.io => FlowError::cut_off(upstream, b, sent),
                        // What was left of the budget is spent: no retry.
                        _ => FlowError::timed_out(
                            upstream,
                            self.res.retry_budget,
                            before.as_ref(),
                            sent,
                        ),
                    };
                    let retried = cut < deadline.io && attempt < self.res.max_attempts;
                    if retried {
                        // No verdict on the upstream yet (a silent connection, perhaps, or a
                        // starved CPU): its retry's outcome is counted. Counted here, a burst
                        // of them opened the breaker and it refused their retries; a
                        // half-open breaker's probe would reopen it. The retry on a new
                        // connection is still the probe.
                        if probe.is_probe() {
                            admitted = Some(probe);
                        }
                    } else {
                        let was_probe = probe.settle().is_some();
                        if let Some(g) = guard {
                            g.failure(self.clock.moment().mono, &e, was_probe);
                        }
                    }
                    if !retried {
                        return Err(e);
                    }
                    // Half the budget waited already: asked again at once, on a new
                    // connection (a silent one stays with the first attempt, which is
                    // still heard until the budget is spent).
                    first_attempt = Some(current);
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, attempt, "upstream attempt without an answer; retrying");
                    before = Some(e);
                    continue;
                }
            };
            attempt += 1;
            match result {
                Ok(v) => {
                    probe.settle();
                    if let Some(g) = guard {
                        g.breaker.success();
                    }
                    return Ok(v);
                }
                // Another upstream's failure inside an attempt (a fresh assertion for an
                // exchange): its own guard has retried it already, and it says nothing about
                // this upstream (the probe, if this is it, is released).
                Err(e) if !e.is_from(upstream) => {
                    // (A retry's fresh assertion failing leaves the first attempt's request,
                    // signed before, to be answered.)
                    if let Some(v) = answer_by_the_end(upstream, &mut first_attempt, deadline).await
                    {
                        probe.settle();
                        if let Some(g) = guard {
                            g.breaker.success();
                        }
                        return Ok(v);
                    }
                    return Err(e);
                }
                Err(e) if e.is_retryable() => {
                    let probe = probe.settle();
                    // The broker's own identity failed before Key Vault was asked: no word on
                    // Key Vault's health (the identity's outage must not open its breaker).
                    if matches!(e, FlowError::Signer(SignerError::Identity { .. })) {
                        if let Some(b) = probe {
                            b.release();
                        }
                    } else if let Some(g) = guard {
                        g.failure(self.clock.moment().mono, &e, probe.is_some());
                    }
                    let wait = backoff(attempt, Duration::from_millis(250), Duration::from_secs(8))
                        .max(e.retry_after().unwrap_or(Duration::ZERO));
                    let last = attempt >= self.res.max_attempts
                        || wait > deadline.at.until(self.clock.moment());
                    if !last {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, attempt, wait_ms = wait.as_millis() as u64, "transient upstream failure; retrying");
                    }
                    if last {
                        if let Some(v) =
                            answer_by_the_end(upstream, &mut first_attempt, deadline).await
                        {
                            if let Some(g) = guard {
                                g.breaker.success();
                            }
                            return Ok(v);
                        }
                        return Err(e);
                    }
                    // The first attempt, still heard while the next one waits.
                    let mut pause = self.clock.sleep(wait);
                    let heard = tokio::select! {
                        _ = &mut pause => None,
                        r = answer_of(&mut first_attempt) => Some(r),
                    };
                    if let Some(Ok(v)) = heard {
                        answered_first(upstream);
                        if let Some(g) = guard {
                            g.breaker.success();
                        }
                        return Ok(v);
                    }
                    if heard.is_some() {
                        // It failed too: the wait goes on.
                        first_attempt = None;
                        pause.await;
                    }
                    before = Some(e);
                }
                Err(e) => {
                    if let Some(b) = probe.settle() {
                        // The broker's own identity refused before Key Vault was asked: no
                        // word on Key Vault's health either way.
                        if matches!(
                            e,
                            FlowError::Signer(
                                SignerError::IdentityRefused(_)
                                    | SignerError::IdentityNotAssigned { .. }
                                    | SignerError::Configuration {
                                        service: crate::outbound::IDENTITY_ENDPOINT,
                                        ..
                                    }
                            )
                        ) {
                            b.release();
                        } else {
                            b.neutral();
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// How long attempt `attempt` (from 0) of a call to `upstream` may go unanswered before
    /// another is sent beside it (from when its request is written, `cut_off`), when not
    /// until the budget is spent. A pooled connection the network has silently dropped
    /// answers never, while a retry on a new connection answers at once: the first attempt
    /// to Entra or Key Vault gets half the budget (5 s of the default 10 s; their answers
    /// take well under a second), the retry the rest, and the first is still heard until the
    /// budget is spent (an upstream slow on every request answers it first). Not for a budget
    /// under 4 s (10 s for Key Vault, see below), where half would send a second request to
    /// an upstream merely slow; not for the HSM (its calls run on blocking threads and cannot
    /// be cancelled) nor the managed identity (the credential bounds its own requests and
    /// retries).
    fn attempt_bound(&self, upstream: Upstream, attempt: u32) -> Option<Duration> {
        let half = self.res.retry_budget / 2;
        // A Key Vault call gets the broker's managed identity token first: its attempt is
        // never cut off before the credential gives up on the endpoint (the identity's
        // silence would be taken for Key Vault's, and charged to its breaker).
        let least = match upstream {
            Upstream::Entra => MIN_ATTEMPT_BOUND,
            Upstream::KeyVaultSign | Upstream::KeyVaultCertificate => {
                crate::identity::ANSWER_BOUND + Duration::from_secs(1)
            }
            _ => return None,
        };
        (attempt == 0 && self.res.max_attempts > 1 && half >= least).then_some(half)
    }

    /// Certificate metadata: read once (concurrent readers share the read), re-read after
    /// `certificate_refresh`, and kept when a re-read fails so a Key Vault outage does not
    /// stop refreshes that need no new metadata.
    async fn certificate(
        &self,
        key: &CertKey,
        guard: Option<&Guard>,
        deadline: Deadline,
    ) -> Result<CertificateInfo, FlowError> {
        let entry = self
            .certs
            .try_get_with_by_ref(key, async {
                let info = self.read_certificate(key, guard, deadline).await?;
                Ok::<_, FlowError>(Arc::new(CertEntry {
                    current: Mutex::new((info, self.clock.moment())),
                    previous: Mutex::new(None),
                    refreshing: tokio::sync::Mutex::new(()),
                }))
            })
            .await
            .map_err(|e: Arc<FlowError>| (*e).clone())?;
        let (info, read_at) = entry
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stale = (read_at + self.cache.certificate_refresh).reached(self.clock.moment());
        if !stale {
            return Ok(info);
        }
        // One re-read at a time; the others go on with what we have.
        let Ok(_guard) = entry.refreshing.try_lock() else {
            return Ok(info);
        };
        // With a certificate in hand, a re-read that hangs must not spend the budget the
        // sign and the exchange need: it gets a quarter of it.
        let deadline = deadline.within(self.clock.as_ref(), self.res.retry_budget / 4);
        match self.read_certificate(key, guard, deadline).await {
            Ok(fresh) => {
                if fresh != info {
                    info!(certificate = %key.1, version = %fresh.version, "certificate has a new version");
                }
                entry.store(&fresh, self.clock.moment());
                Ok(fresh)
            }
            Err(e) => {
                warn!(certificate = %key.1, error = %e, "certificate metadata refresh failed; using the version we have");
                Ok(info)
            }
        }
    }

    async fn previous_certificate(&self, key: &CertKey) -> Option<CertificateInfo> {
        let entry = self.certs.get(key).await?;
        entry
            .previous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads certificate metadata now (after Entra refused the key, or the key of the
    /// held version was gone) and stores it; returns it only if it is not `held`, that is a
    /// new version to sign with.
    async fn changed_certificate(
        &self,
        key: &CertKey,
        guard: Option<&Guard>,
        deadline: Deadline,
        held: &CertificateInfo,
    ) -> Result<Option<CertificateInfo>, FlowError> {
        let fresh = self.read_certificate(key, guard, deadline).await?;
        if let Some(entry) = self.certs.get(key).await {
            let _g = entry.refreshing.lock().await;
            entry.store(&fresh, self.clock.moment());
        }
        Ok((fresh != *held).then_some(fresh))
    }

    async fn read_certificate(
        &self,
        key: &CertKey,
        guard: Option<&Guard>,
        deadline: Deadline,
    ) -> Result<CertificateInfo, FlowError> {
        self.guarded(self.signer_for(&key.0).2, guard, deadline, || async {
            self.stats.certificate_reads.fetch_add(1, Ordering::Relaxed);
            let (signer, _, upstream) = self.signer_for(&key.0);
            let call = self.metrics.upstream_call(upstream);
            let span = match upstream {
                Upstream::HsmCertificate => {
                    info_span!("hsm.certificate", otel.kind = "client", certificate = %key.1)
                }
                _ => info_span!("keyvault.certificate", otel.kind = "client", certificate = %key.1),
            };
            let r = self
                .metrics
                .scope(signer.certificate(&key.0, &key.1))
                .instrument(span)
                .await;
            call.end(r.as_ref().err().map(metrics::signer_code));
            Ok(r?)
        })
        .await
        .inspect(|info| self.warn_if_expiring(key, info))
    }

    /// Says so in the log, at each read of its metadata, when a signing certificate is
    /// within `EXPIRY_WARNING` of its end or past it: Entra refuses an expired certificate,
    /// and renewing one (or putting the renewed one on the app) takes people time.
    fn warn_if_expiring(&self, key: &CertKey, info: &CertificateInfo) {
        let Some(left) = info.not_after.map(|t| seconds_until(self.clock.now(), t)) else {
            return;
        };
        if left < EXPIRY_WARNING.as_secs_f64() {
            let days = left / 86_400.0;
            warn!(
                certificate = %key.1,
                at = %key.0,
                version = %info.version,
                days_left = format_args!("{days:.1}"),
                "the signing certificate expires soon or has expired: renew it and add the new certificate to the app registration"
            );
        }
    }

    /// Seconds until each tenant's signing certificate, as last read, expires (negative
    /// once past), for tenants whose certificate has been read and names its end.
    pub fn certificate_expiries(&self) -> Vec<(String, f64)> {
        let now = self.clock.now();
        let ends: HashMap<CertKey, SystemTime> = self
            .certs
            .iter()
            .filter_map(|(k, e)| {
                let current = e.current.lock().unwrap_or_else(|p| p.into_inner());
                current.0.not_after.map(|t| ((*k).clone(), t))
            })
            .collect();
        self.cert_tenants
            .iter()
            .filter_map(|(tenant, key)| {
                ends.get(key)
                    .map(|end| (tenant.clone(), seconds_until(now, *end)))
            })
            .collect()
    }
}

/// The soonest a token is refreshed after it was asked for, whatever its lifetime or Entra's
/// `refresh_in` (`expires_in` or `refresh_in` of 0 included).
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// The shortest time a first attempt is given before it is asked again (`attempt_bound`).
const MIN_ATTEMPT_BOUND: Duration = Duration::from_secs(2);

/// How long before a signing certificate's end the broker starts warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// Seconds from `now` to `t`, negative when `t` is past.
pub fn seconds_until(now: SystemTime, t: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The signing certificate a credential names (`None` for a managed identity), as `fetch`
/// names it.
fn cert_key(credential: &Credential) -> Option<CertKey> {
    match credential {
        Credential::KeyVaultCertificate {
            vault_url,
            certificate,
            ..
        } => Some((vault_url.clone(), certificate.clone())),
        Credential::Pkcs11 { uri, key, .. } => Some((uri.clone(), key.clone())),
        Credential::ManagedIdentity { .. } => None,
    }
}

/// When to refresh a token of `lifetime` with no `refresh_in`: at `fraction` of its life,
/// less up to 10% jitter so tenants loaded together do not refresh together.
pub fn refresh_after(lifetime: Duration, fraction: f64) -> Duration {
    use rand::Rng;
    let base = lifetime.mul_f64(fraction);
    let jitter = lifetime.mul_f64(0.1 * rand::rng().random::<f64>());
    base.saturating_sub(jitter)
}

pub fn tenant(t: &TenantConfig, authority: &Url) -> Tenant {
    Tenant {
        name: Arc::from(t.name.as_str()),
        tenant_id: Arc::from(t.tenant_id.as_str()),
        client_id: Arc::from(t.client_id.as_str()),
        token_endpoint: entra::token_endpoint(authority, &t.tenant_id),
        config: t.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_refusing_a_call_fails_it_as_its_own_upstream_retryable_with_the_wait() {
        let wait = Duration::from_secs(7);
        for upstream in [
            Upstream::KeyVaultSign,
            Upstream::KeyVaultCertificate,
            Upstream::HsmSign,
            Upstream::HsmCertificate,
            Upstream::ManagedIdentity,
            Upstream::Entra,
        ] {
            let e = FlowError::unavailable(upstream, "circuit open".into(), wait);
            let right_variant = match upstream {
                Upstream::KeyVaultSign | Upstream::KeyVaultCertificate => matches!(
                    e,
                    FlowError::Signer(SignerError::Unavailable {
                        service: "Key Vault",
                        ..
                    })
                ),
                Upstream::HsmSign | Upstream::HsmCertificate => matches!(
                    e,
                    FlowError::Signer(SignerError::Unavailable {
                        service: "the HSM",
                        ..
                    })
                ),
                Upstream::ManagedIdentity => {
                    matches!(e, FlowError::Identity(IdentityError::Unavailable { .. }))
                }
                Upstream::Entra => matches!(&e, FlowError::Entra(x) if x.error == "broker_backoff"),
            };
            assert!(right_variant, "{upstream:?}: {e:?}");
            assert!(e.is_retryable() && !e.is_persistent(), "{upstream:?}");
            assert_eq!(e.retry_after(), Some(wait), "{upstream:?}");
            assert!(e.to_string().contains("circuit open"), "{upstream:?}: {e}");
        }
    }

    #[test]
    fn an_open_breakers_refusal_names_the_failure_that_opened_it() {
        let throttled = FlowError::Entra(EntraError {
            class: EntraErrorClass::Retryable,
            status: 429,
            error: "temporarily_unavailable".into(),
            codes: vec![90055],
            description: "AADSTS90055: TenantThrottlingError.".into(),
            correlation_id: Some("c0ffee00-0000-4000-8000-000000000001".into()),
            trace_id: None,
            retry_after: None,
        });
        let e = FlowError::refused(Upstream::Entra, Some(&throttled), Duration::from_secs(25));
        let m = e.to_string();
        for part in [
            "Entra ID not called: throttled",
            "next try in 25s",
            "429 temporarily_unavailable (AADSTS90055)",
            "c0ffee00-0000-4000-8000-000000000001",
        ] {
            assert!(m.contains(part), "{part:?} in {m}");
        }
        assert!(e.is_retryable() && e.retry_after() == Some(Duration::from_secs(25)));

        let down = FlowError::Signer(SignerError::Unavailable {
            service: crate::signer::keyvault::SERVICE,
            message: "HTTP 503 ServiceUnavailable".into(),
            retry_after: None,
            throttled: false,
        });
        let m = FlowError::refused(Upstream::KeyVaultSign, Some(&down), Duration::from_secs(3))
            .to_string();
        assert!(
            m.contains("unavailable, not asked again") && m.contains("HTTP 503"),
            "{m}"
        );
        assert_eq!(m.matches("Key Vault").count(), 1, "{m}");
        // A hang cut off by the budget keeps the request id it was sent with.
        let id = uuid::Uuid::new_v4();
        let m = FlowError::timed_out(Upstream::Entra, Duration::from_secs(10), None, Some(id))
            .to_string();
        assert!(m.contains(&format!("[client-request-id {id}]")), "{m}");
    }

    #[tokio::test]
    async fn a_fetch_task_that_died_gives_callers_a_fixed_message_and_the_log_its_detail() {
        use crate::cache::FromJoin;

        let died = tokio::spawn(async { panic!("detail of the bug") })
            .await
            .unwrap_err();
        let log = crate::telemetry::CapturedLog::default();
        let e = {
            let _log = log.install();
            FlowError::from_join(died)
        };
        assert!(
            matches!(&e, FlowError::Internal(m) if m == FETCH_DIED),
            "{e:?}"
        );
        assert!(!e.to_string().contains("detail of the bug"), "{e}");
        let logged = log.text();
        assert!(
            logged.contains("ERROR") && logged.contains("detail of the bug"),
            "{logged}"
        );
    }

    #[test]
    fn a_signer_failure_names_its_own_service_once() {
        use crate::signer::{keyvault, pkcs11};
        for (service, other) in [
            (keyvault::SERVICE, pkcs11::SERVICE),
            (pkcs11::SERVICE, keyvault::SERVICE),
        ] {
            let (code, message) = (String::from("C"), String::from("m"));
            let mut all = vec![
                SignerError::Forbidden {
                    service,
                    status: 403,
                    code: code.clone(),
                    message: message.clone(),
                },
                SignerError::NotFound {
                    service,
                    what: "key k".into(),
                    code: code.clone(),
                    message: message.clone(),
                },
                SignerError::Configuration {
                    service,
                    code: code.clone(),
                    message: message.clone(),
                },
                SignerError::Unavailable {
                    service,
                    message: message.clone(),
                    retry_after: None,
                    throttled: false,
                },
                SignerError::Other { service, message },
            ];
            if service == keyvault::SERVICE {
                all.push(SignerError::Identity {
                    message: "m".into(),
                    retry_after: None,
                });
                all.push(SignerError::IdentityNotAssigned {
                    status: 400,
                    message: "m".into(),
                    unnamed: false,
                });
            }
            for e in all {
                let text = FlowError::Signer(e).to_string();
                assert_eq!(text.matches(service).count(), 1, "{text}");
                assert!(!text.contains(other), "{text}");
            }
        }
    }
}
