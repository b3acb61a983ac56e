//! Metrics as OpenTelemetry instruments: pushed over OTLP when `[telemetry] otlp_endpoint`
//! is set, and always readable in the Prometheus text format at the admin listener's
//! `/metrics` (rendered here from a manual reader).
//!
//! Label values are bounded: tenant labels are configured tenant names (anything else is
//! `_unknown`), caller labels are capped, upstream error codes are AADSTS codes or a small
//! fixed vocabulary. No token and no raw caller-supplied string becomes a label.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundHistogram, Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

use crate::broker::Broker;
use crate::config::Config;
use crate::entra::EntraError;
use crate::flow::FlowError;
use crate::identity::IdentityError;
use crate::resilience::BreakerState;
use crate::signer::SignerError;
use crate::striped::Striped;

/// Label for a tenant that is not configured.
pub const UNKNOWN: &str = "_unknown";
/// Label for callers beyond the cap.
pub const OTHER: &str = "_other";
/// Distinct caller labels kept before the rest are counted as `_other`.
pub const MAX_CALLER_LABELS: usize = 200;

/// Latency buckets in seconds, from a cache hit to a slow upstream with retries.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

tokio::task_local! {
    static CURRENT: Metrics;
}

/// The upstream a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    ManagedIdentity,
    KeyVaultCertificate,
    KeyVaultSign,
    /// A PKCS#11 token: certificate reads and signs.
    HsmCertificate,
    HsmSign,
    Entra,
}

impl Upstream {
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::ManagedIdentity => "managed_identity",
            Upstream::KeyVaultCertificate => "keyvault_certificate",
            Upstream::KeyVaultSign => "keyvault_sign",
            Upstream::HsmCertificate => "hsm_certificate",
            Upstream::HsmSign => "hsm_sign",
            Upstream::Entra => "entra",
        }
    }

    /// The service's name in messages for people.
    pub fn service(self) -> &'static str {
        match self {
            Upstream::ManagedIdentity => "managed identity",
            Upstream::KeyVaultCertificate | Upstream::KeyVaultSign => {
                crate::signer::keyvault::SERVICE
            }
            Upstream::HsmCertificate | Upstream::HsmSign => crate::signer::pkcs11::SERVICE,
            Upstream::Entra => "Entra ID",
        }
    }
}

/// The bounded error label of a Key Vault failure.
pub fn signer_code(e: &SignerError) -> String {
    match e {
        SignerError::Forbidden { .. } => "forbidden",
        SignerError::NotFound { .. } => "not_found",
        SignerError::Configuration { .. } => "configuration",
        SignerError::Unavailable { .. } => "unavailable",
        SignerError::Identity { .. } => "identity",
        SignerError::IdentityNotAssigned { .. } => "identity_not_assigned",
        SignerError::IdentityRefused { .. } => "identity_refused",
        SignerError::Other { .. } => "other",
    }
    .into()
}

/// The error label of an Entra failure: its first AADSTS code, else `http_<status>` or
/// `transport`.
pub fn entra_code(e: &EntraError) -> String {
    match e.aadsts() {
        Some(code) if code.len() <= 16 => code,
        _ if e.status == 0 => "transport".into(),
        _ => format!("http_{}", e.status),
    }
}

/// The error label of any flow failure.
pub fn flow_code(e: &FlowError) -> String {
    match e {
        FlowError::Signer(s) => signer_code(s),
        FlowError::Entra(e) => entra_code(e),
        FlowError::Identity(IdentityError::Unavailable { .. }) => "identity".into(),
        FlowError::Identity(IdentityError::NotConfigured(_)) => "not_configured".into(),
        FlowError::Identity(IdentityError::NotAssigned { .. }) => "identity_not_assigned".into(),
        FlowError::Identity(IdentityError::Refused { .. }) => "identity_refused".into(),
        FlowError::Identity(IdentityError::Misdirected { .. }) => "identity_redirect".into(),
        FlowError::Internal(_) => "internal".into(),
    }
}

/// A manual reader shared between the meter provider and the scrape handler.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// What observable instruments read (the broker, its audit trail); set while it serves.
type Slot<T> = Arc<Mutex<Option<T>>>;
type Source = Slot<Broker>;
type AuditSource = Slot<crate::audit::Audit>;
type PolicySource = Slot<Arc<crate::policy::PolicyHandle>>;
type ServerCertSource = Slot<Arc<crate::tls::ReloadingCert>>;
type ClientTrustSource = Slot<Arc<crate::tls::ListenerConfig>>;
type HandshakeSource = Slot<Arc<crate::tls::ListenerConfig>>;

struct Inner {
    provider: SdkMeterProvider,
    reader: SharedReader,
    tenants: HashSet<String>,
    callers: Mutex<HashSet<String>>,
    source: Source,
    audit_source: AuditSource,
    policy_source: PolicySource,
    server_cert_source: ServerCertSource,
    client_trust_source: ClientTrustSource,
    handshake_source: HandshakeSource,
    requests: Arc<RequestCounts>,
    request_duration: Histogram<f64>,
    /// `request_duration` bound to each method and outcome when first recorded: a bound
    /// instrument skips the SDK's per-call attribute lookup (a lock and a hash of the labels).
    request_duration_by: [[OnceLock<BoundHistogram<f64>>; 2]; METHODS.len()],
    upstream_calls: Counter<u64>,
    upstream_duration: Histogram<f64>,
    throttled: Counter<u64>,
}

/// The methods `tokenbroker_requests` is counted by.
const METHODS: [&str; 2] = ["GetToken", "WatchToken"];
/// gRPC status codes are 0 (`OK`) to 16 (`UNAUTHENTICATED`).
const CODES: usize = 17;

/// `ok` for `OK`, else `error`: the `outcome` label of the request metrics.
fn outcome(code: tonic::Code) -> &'static str {
    if code == tonic::Code::Ok {
        "ok"
    } else {
        "error"
    }
}

/// `tokenbroker_requests` as a table of atomics by method and gRPC code, reported through an
/// observable counter: on a cache hit the SDK's per-call attribute lookup would cost more
/// than the broker's own work. A table per thread stripe, summed when read.
#[derive(Default)]
struct RequestCounts(Striped<[[AtomicU64; CODES]; METHODS.len()]>);

impl RequestCounts {
    fn register(meter: &Meter) -> Arc<RequestCounts> {
        let counts = Arc::new(RequestCounts::default());
        let read = counts.clone();
        meter
            .u64_observable_counter("tokenbroker_requests")
            .with_description("gRPC requests by method, outcome and status code")
            .with_callback(move |o| {
                for (m, method) in METHODS.iter().enumerate() {
                    for code in 0..CODES {
                        let n: u64 = read.0.iter().map(|t| t[m][code].load(Relaxed)).sum();
                        if n > 0 {
                            let code = tonic::Code::from_i32(code as i32);
                            o.observe(
                                n,
                                &[
                                    KeyValue::new("method", *method),
                                    KeyValue::new("outcome", outcome(code)),
                                    KeyValue::new("code", crate::api::error::code_name(code)),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        counts
    }

    /// Counts one request of `METHODS[method]`.
    fn add(&self, method: usize, code: tonic::Code) {
        if let Some(n) = self.0.local()[method].get(code as usize) {
            n.fetch_add(1, Relaxed);
        }
    }
}

/// The broker's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Stops reading a broker's (or its audit trail's) state when dropped (the server holds it
/// while serving), so the broker and its metrics do not keep each other alive.
#[derive(Debug)]
pub struct Observing<T>(Slot<T>);

impl<T> Drop for Observing<T> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Fills `slot` with `value` until the returned guard is dropped.
fn observing<T>(slot: &Slot<T>, value: T) -> Observing<T> {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    Observing(slot.clone())
}

/// `f` of what `slot` holds, if anything; the lock is not held while `f` runs.
fn read_slot<S: Clone, T>(slot: &Slot<S>, f: impl FnOnce(&S) -> T) -> Option<T> {
    let held = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
    held.as_ref().map(f)
}

/// 1 while the audit trail cannot be written (tokens are refused unless configured
/// otherwise), else 0.
fn observe_audit(meter: &Meter, source: &AuditSource) {
    let s = source.clone();
    meter
        .u64_observable_gauge("tokenbroker_audit_failing")
        .with_description("Whether the audit trail cannot be written now (1): no token is served then (unless [audit] on_write_failure = \"serve\"), and records are kept for when it can")
        .with_callback(move |o| {
            if let Some(failing) = read_slot(&s, |a| a.failure().is_some()) {
                o.observe(u64::from(failing), &[]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_counter("tokenbroker_audit_records_lost")
        .with_description(
            "Audit records lost because the audit output failed for longer than they could be kept",
        )
        .with_callback(move |o| {
            if let Some(lost) = read_slot(&s, crate::audit::Audit::lost) {
                o.observe(lost, &[]);
            }
        })
        .build();
}

/// 1 while the policy file holds a policy that was refused (an older one is in force: a grant
/// revoked in the file may still be in force), and the refusals so far.
fn observe_policy(meter: &Meter, source: &PolicySource) {
    let s = source.clone();
    meter
        .u64_observable_gauge("tokenbroker_policy_file_refused")
        .with_description("Whether the policy file holds a policy that was refused or cannot be read (1): the policy loaded before stays in force, grants revoked in the file with it")
        .with_callback(move |o| {
            if let Some(refused) = read_slot(&s, |p| p.file_refused()) {
                o.observe(u64::from(refused), &[]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_counter("tokenbroker_policy_reloads_refused")
        .with_description("Policy file contents refused (invalid or unreadable), each once")
        .with_callback(move |o| {
            if let Some(n) = read_slot(&s, |p| p.refusals()) {
                o.observe(n, &[]);
            }
        })
        .build();
}

/// Seconds until the listener's certificate in use ends: it reloads when its files change, so
/// this follows a renewal, and shows one that did not happen (a client refuses the
/// certificate once it has ended, and the broker cannot serve another on its own). Also 1
/// while the files hold a pair that was refused (the renewal is on disk, the old certificate
/// still in use), and the refusals so far, as for the policy file.
fn observe_server_cert(meter: &Meter, source: &ServerCertSource) {
    let s = source.clone();
    meter
        .f64_observable_gauge("tokenbroker_server_certificate_expiry_seconds")
        .with_description(
            "Seconds until the listener's TLS certificate in use (server.tls_cert_file) expires; negative once expired",
        )
        .with_unit("s")
        .with_callback(move |o| {
            if let Some(Some(end)) = read_slot(&s, |c| c.not_after()) {
                o.observe(crate::flow::seconds_until(SystemTime::now(), end), &[]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_gauge("tokenbroker_server_certificate_refused")
        .with_description("Whether the listener's TLS certificate and key files hold a pair that was refused or cannot be read (1): the certificate loaded before stays in use, and ends when it ends")
        .with_callback(move |o| {
            if let Some(refused) = read_slot(&s, |c| c.file_refused()) {
                o.observe(u64::from(refused), &[]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_counter("tokenbroker_server_certificate_reloads_refused")
        .with_description("Contents of the listener's TLS certificate and key files refused (unreadable, not a usable pair, or outside their validity period), each once")
        .with_callback(move |o| {
            if let Some(n) = read_slot(&s, |c| c.refusals()) {
                o.observe(n, &[]);
            }
        })
        .build();
}

/// 1 while the client CA bundle and revocation lists hold a set that was refused (the trust
/// loaded before stays in force: a certificate revoked in the new lists is still accepted),
/// and the refusals so far, as for the server certificate.
fn observe_client_trust(meter: &Meter, source: &ClientTrustSource) {
    let s = source.clone();
    meter
        .u64_observable_gauge("tokenbroker_client_trust_refused")
        .with_description("Whether the client CA bundle and revocation lists hold a set that was refused or cannot be read (1): the trust loaded before stays in force, certificates revoked in the new lists with it")
        .with_callback(move |o| {
            if let Some(refused) = read_slot(&s, |l| l.client_trust_refused()) {
                o.observe(u64::from(refused), &[]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_counter("tokenbroker_client_trust_reloads_refused")
        .with_description("Contents of the client CA bundle and revocation lists refused (unreadable or not usable), each once")
        .with_callback(move |o| {
            if let Some(n) = read_slot(&s, |l| l.client_trust_refusals()) {
                o.observe(n, &[]);
            }
        })
        .build();
}

/// TLS handshakes the listener refused, by reason (every reason, from 0): a caller's
/// certificate problem, a scan, or a flood, told apart.
fn observe_handshakes(meter: &Meter, source: &HandshakeSource) {
    let s = source.clone();
    meter
        .u64_observable_counter("tokenbroker_tls_handshakes_refused")
        .with_description("TLS handshakes the listener refused or gave up, by reason (the client certificate's fault, the client's alert, protocol, connection lost, timed out, over capacity)")
        .with_callback(move |o| {
            let counts = read_slot(&s, |l| l.handshakes_refused().collect::<Vec<_>>());
            for (reason, n) in counts.into_iter().flatten() {
                o.observe(n, &[KeyValue::new("reason", reason.as_str())]);
            }
        })
        .build();
}

impl Metrics {
    /// Instruments for a configuration: the manual reader for `/metrics`, plus an OTLP
    /// exporter when `telemetry.otlp_endpoint` is set.
    pub fn new(config: &Config) -> Metrics {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let mut builder = SdkMeterProvider::builder()
            .with_resource(crate::telemetry::resource(&config.telemetry))
            .with_reader(reader.clone());
        if let Some(exporter) = crate::telemetry::otlp_metric_exporter(&config.telemetry) {
            builder = builder.with_reader(
                opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(config.telemetry.metrics_interval)
                    .build(),
            );
        }
        Metrics::with_provider(
            builder.build(),
            reader,
            config.tenants.keys().cloned().collect(),
        )
    }

    fn with_provider(
        provider: SdkMeterProvider,
        reader: SharedReader,
        tenants: HashSet<String>,
    ) -> Metrics {
        let meter = provider.meter("tokenbroker");
        let source = Source::default();
        observe(&meter, &source);
        let audit_source = AuditSource::default();
        observe_audit(&meter, &audit_source);
        let policy_source = PolicySource::default();
        observe_policy(&meter, &policy_source);
        let server_cert_source = ServerCertSource::default();
        observe_server_cert(&meter, &server_cert_source);
        let client_trust_source = ClientTrustSource::default();
        observe_client_trust(&meter, &client_trust_source);
        let handshake_source = HandshakeSource::default();
        observe_handshakes(&meter, &handshake_source);
        let inner = Inner {
            requests: RequestCounts::register(&meter),
            request_duration: meter
                .f64_histogram("tokenbroker_request_duration_seconds")
                .with_description("gRPC request latency by method and outcome")
                .with_unit("s")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            request_duration_by: Default::default(),
            upstream_calls: meter
                .u64_counter("tokenbroker_upstream_calls")
                .with_description("Calls to managed identity, Key Vault and Entra ID by result; failures carry an error code (AADSTS code for Entra)")
                .build(),
            upstream_duration: meter
                .f64_histogram("tokenbroker_upstream_duration_seconds")
                .with_description("Upstream call latency by upstream and result")
                .with_unit("s")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            throttled: meter
                .u64_counter("tokenbroker_throttled_requests")
                .with_description("Requests refused by the per-caller rate limit, by caller")
                .build(),
            provider,
            reader,
            tenants,
            callers: Mutex::new(HashSet::new()),
            source,
            audit_source,
            policy_source,
            server_cert_source,
            client_trust_source,
            handshake_source,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// Reads cache, refresh, breaker and expiry state from `broker` until the returned guard
    /// is dropped.
    pub fn observe(&self, broker: &Broker) -> Observing<Broker> {
        observing(&self.inner.source, broker.clone())
    }

    /// Reads the audit trail's state (`tokenbroker_audit_failing`) until the guard is dropped.
    pub fn observe_audit(&self, audit: &crate::audit::Audit) -> Observing<crate::audit::Audit> {
        observing(&self.inner.audit_source, audit.clone())
    }

    /// Reads the policy file's state (`tokenbroker_policy_file_refused`) until the guard is
    /// dropped.
    pub fn observe_policy(
        &self,
        policy: &Arc<crate::policy::PolicyHandle>,
    ) -> Observing<Arc<crate::policy::PolicyHandle>> {
        observing(&self.inner.policy_source, policy.clone())
    }

    /// Reads the listener's TLS certificate in use
    /// (`tokenbroker_server_certificate_expiry_seconds`) and the state of its files
    /// (`tokenbroker_server_certificate_refused`) until the guard is dropped.
    pub fn observe_server_cert(
        &self,
        cert: &Arc<crate::tls::ReloadingCert>,
    ) -> Observing<Arc<crate::tls::ReloadingCert>> {
        observing(&self.inner.server_cert_source, cert.clone())
    }

    /// Reads the state of the listener's client trust files
    /// (`tokenbroker_client_trust_refused`) until the guard is dropped.
    pub fn observe_client_trust(
        &self,
        listener: &Arc<crate::tls::ListenerConfig>,
    ) -> Observing<Arc<crate::tls::ListenerConfig>> {
        observing(&self.inner.client_trust_source, listener.clone())
    }

    /// Reads the TLS listener's refused handshakes (`tokenbroker_tls_handshakes_refused`)
    /// until the guard is dropped.
    pub fn observe_handshakes(
        &self,
        listener: &Arc<crate::tls::ListenerConfig>,
    ) -> Observing<Arc<crate::tls::ListenerConfig>> {
        observing(&self.inner.handshake_source, listener.clone())
    }

    /// A configured tenant name, or `_unknown`.
    pub fn tenant_label(&self, tenant: &str) -> String {
        if self.inner.tenants.contains(tenant) {
            tenant.to_owned()
        } else {
            UNKNOWN.to_owned()
        }
    }

    /// One finished gRPC request.
    pub fn request(&self, method: &'static str, code: tonic::Code, took: Duration) {
        let outcome = outcome(code);
        let labels = || {
            [
                KeyValue::new("method", method),
                KeyValue::new("outcome", outcome),
            ]
        };
        let Some(m) = METHODS.iter().position(|m| *m == method) else {
            // The API passes only the methods above.
            debug_assert!(false, "uncounted request {method} {code:?}");
            self.inner
                .request_duration
                .record(took.as_secs_f64(), &labels());
            return;
        };
        self.inner.requests.add(m, code);
        self.inner.request_duration_by[m][usize::from(code != tonic::Code::Ok)]
            .get_or_init(|| self.inner.request_duration.bind(&labels()))
            .record(took.as_secs_f64());
    }

    /// Starts timing one upstream call: `UpstreamCall::end` records it, and a call dropped
    /// unended (cut off by the fetch's retry budget) is recorded as failed, code `cut_off`,
    /// so that a blackholed upstream shows in the metrics.
    pub fn upstream_call(&self, upstream: Upstream) -> UpstreamCall<'_> {
        UpstreamCall {
            metrics: self,
            upstream,
            started: Instant::now(),
            ended: false,
        }
    }

    /// One upstream call, with its error code when it failed.
    pub fn upstream(&self, upstream: Upstream, started: Instant, error: Option<String>) {
        let took = started.elapsed().as_secs_f64();
        let result = if error.is_some() { "error" } else { "ok" };
        self.inner.upstream_calls.add(
            1,
            &[
                KeyValue::new("upstream", upstream.as_str()),
                KeyValue::new("result", result),
                KeyValue::new("code", error.unwrap_or_default()),
            ],
        );
        self.inner.upstream_duration.record(
            took,
            &[
                KeyValue::new("upstream", upstream.as_str()),
                KeyValue::new("result", result),
            ],
        );
    }

    /// A request refused by the caller's rate limit. Caller ids are authenticated
    /// identities; past `MAX_CALLER_LABELS` distinct ones they count as `_other`.
    pub fn throttled(&self, caller: &str) {
        let label = {
            let mut seen = self.inner.callers.lock().unwrap_or_else(|p| p.into_inner());
            let ok =
                caller.len() <= 256 && (seen.contains(caller) || seen.len() < MAX_CALLER_LABELS);
            if ok {
                seen.insert(caller.to_owned());
                caller.to_owned()
            } else {
                OTHER.to_owned()
            }
        };
        self.inner
            .throttled
            .add(1, &[KeyValue::new("caller", label)]);
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.inner.reader.collect(&mut rm) {
            tracing::warn!(error = %e, "metrics collection failed");
        }
        render(&rm)
    }

    /// Runs `f` with these metrics as the task's current ones, so upstream calls made deep
    /// inside the Azure SDK (the managed identity token) are recorded here.
    pub fn scope<F: std::future::Future>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CURRENT.scope(self.clone(), f)
    }

    /// The metrics of the enclosing `scope`, if any.
    pub fn current() -> Option<Metrics> {
        CURRENT.try_with(Metrics::clone).ok()
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        let _ = self.inner.provider.shutdown();
    }
}

/// Observable instruments over the broker's own counters and state.
fn observe(meter: &Meter, source: &Source) {
    type Read = fn(&Broker) -> u64;
    let counters: [(&'static str, &'static str, Read); 10] = [
        (
            "tokenbroker_cache_hits",
            "Requests served from the cache (including stale serves, also those served after the fetch they waited for failed)",
            |b| b.stats().hits.get(),
        ),
        (
            "tokenbroker_cache_misses",
            "Requests answered by the upstream fetch they waited for, its token or its failure (including coalesced waits), counted when the wait ends",
            |b| b.stats().misses.get(),
        ),
        (
            "tokenbroker_cache_coalesced",
            "Requests that joined a fetch already under way instead of starting one",
            |b| b.stats().coalesced.get(),
        ),
        (
            "tokenbroker_cache_stale_served",
            "Still-valid tokens served while their refresh is failing",
            |b| b.stats().stale_served.get(),
        ),
        (
            "tokenbroker_cache_negative_hits",
            "Requests answered from the negative cache (a recent persistent failure)",
            |b| b.stats().negative_hits.get(),
        ),
        (
            "tokenbroker_refreshes",
            "Refreshes ahead of expiry started",
            |b| b.stats().refreshes.get(),
        ),
        (
            "tokenbroker_refresh_failures",
            "Fetches the broker started that failed: refreshes ahead of expiry (scheduled, retried, or overdue and started by a request) and a watched key's retried first fetch",
            |b| b.stats().refresh_failures.get(),
        ),
        (
            "tokenbroker_caller_fetch_failures",
            "Fetches a request started that failed: a cold key, a forced refresh, an early fetch for a minimum validity, a pre-warm",
            |b| b.stats().caller_fetch_failures.get(),
        ),
        (
            "tokenbroker_upstream_retries",
            "Upstream calls retried after a transient failure",
            |b| b.upstream_stats().retries.load(Relaxed),
        ),
        (
            "tokenbroker_breaker_rejections",
            "Upstream calls refused by an open circuit breaker",
            |b| b.upstream_stats().breaker_rejections.load(Relaxed),
        ),
    ];
    for (name, description, read) in counters {
        let source = source.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |o| {
                if let Some(v) = read_slot(&source, read) {
                    o.observe(v, &[]);
                }
            })
            .build();
    }
    meter
        .u64_observable_counter("tokenbroker_log_lines_dropped")
        .with_description(
            "Log lines dropped because stderr did not keep up or failed (the audit trail is a separate sink that keeps its records)",
        )
        .with_callback(|o| o.observe(crate::telemetry::dropped_log_lines(), &[]))
        .build();
    meter
        .u64_observable_counter("tokenbroker_telemetry_export_failures")
        .with_description(
            "OTLP exports (traces, metrics) that failed: the collector answered an error status, could not be reached or did not answer in time; each such batch is lost",
        )
        .with_callback(|o| {
            for signal in crate::telemetry::Signal::ALL {
                o.observe(
                    crate::telemetry::export_failures(signal),
                    &[KeyValue::new("signal", signal.as_str())],
                );
            }
        })
        .build();
    let s = source.clone();
    meter
        .f64_observable_gauge("tokenbroker_token_expiry_seconds")
        .with_description("Seconds until the soonest-expiring cached token of each tenant expires")
        .with_unit("s")
        .with_callback(move |o| {
            let Some(soonest) = read_slot(&s, soonest_expiry) else {
                return;
            };
            for (tenant, secs) in soonest {
                o.observe(secs, &[KeyValue::new("tenant", tenant)]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .f64_observable_gauge("tokenbroker_certificate_expiry_seconds")
        .with_description(
            "Seconds until each tenant's signing certificate (Key Vault or HSM) expires, as last read; negative once expired",
        )
        .with_unit("s")
        .with_callback(move |o| {
            let Some(ends) = read_slot(&s, |b| b.flow().certificate_expiries()) else {
                return;
            };
            for (tenant, secs) in ends {
                o.observe(secs, &[KeyValue::new("tenant", tenant)]);
            }
        })
        .build();
    let s = source.clone();
    meter
        .u64_observable_gauge("tokenbroker_breaker_state")
        .with_description(
            "Circuit breaker state per upstream and target: 0 closed, 1 half-open, 2 open",
        )
        .with_callback(move |o| {
            let Some(states) = read_slot(&s, |b| b.flow().breaker_states()) else {
                return;
            };
            for (upstream, target, state) in states {
                let v = match state {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                };
                o.observe(
                    v,
                    &[
                        KeyValue::new("upstream", upstream.as_str()),
                        KeyValue::new("target", target),
                    ],
                );
            }
        })
        .build();
}

/// Seconds until the soonest expiry of a cached token, per tenant (configured names only,
/// as cache keys are).
fn soonest_expiry(b: &Broker) -> Vec<(String, f64)> {
    let now = b.clock().moment();
    let mut out: std::collections::BTreeMap<String, f64> = Default::default();
    for (key, slot) in b.cache().iter() {
        let Some(token) = slot.current().token.clone() else {
            continue;
        };
        let secs = if token.expires.reached(now) {
            -token.expires.since(now).as_secs_f64()
        } else {
            token.expires.until(now).as_secs_f64()
        };
        let e = out.entry(key.tenant.to_string()).or_insert(secs);
        *e = e.min(secs);
    }
    out.into_iter().collect()
}

// === Prometheus text rendering ===

fn sanitize_name(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, extra: Option<(&str, String)>) -> String {
    let mut pairs: Vec<(String, String)> = attrs
        .map(|kv| {
            (
                sanitize_name(kv.key.as_str()),
                kv.value.as_str().into_owned(),
            )
        })
        .collect();
    pairs.sort();
    if let Some((k, v)) = extra {
        pairs.push((k.to_owned(), v));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_value(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

trait AsF64: Copy {
    fn f(self) -> f64;
}
impl AsF64 for f64 {
    fn f(self) -> f64 {
        self
    }
}
impl AsF64 for u64 {
    fn f(self) -> f64 {
        self as f64
    }
}
impl AsF64 for i64 {
    fn f(self) -> f64 {
        self as f64
    }
}

fn render_data<T: AsF64>(out: &mut String, name: &str, help: &str, data: &MetricData<T>) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    match data {
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{name}_total"), "counter")
            } else {
                (name.to_owned(), "gauge")
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let mut lines: Vec<String> = sum
                .data_points()
                .map(|p| {
                    format!(
                        "{name}{} {}",
                        labels(p.attributes(), None),
                        number(p.value().f())
                    )
                })
                .collect();
            lines.sort();
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        MetricData::Gauge(g) => {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let mut lines: Vec<String> = g
                .data_points()
                .map(|p| {
                    format!(
                        "{name}{} {}",
                        labels(p.attributes(), None),
                        number(p.value().f())
                    )
                })
                .collect();
            lines.sort();
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        MetricData::Histogram(h) => {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut points: Vec<_> = h.data_points().collect();
            points.sort_by_key(|p| labels(p.attributes(), None));
            for p in points {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = p.bounds().collect();
                for (i, count) in p.bucket_counts().enumerate() {
                    cumulative += count;
                    let le = bounds.get(i).copied().unwrap_or(f64::INFINITY);
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {cumulative}",
                        labels(p.attributes(), Some(("le", number(le))))
                    );
                }
                let l = labels(p.attributes(), None);
                let _ = writeln!(out, "{name}_sum{l} {}", number(p.sum().f()));
                let _ = writeln!(out, "{name}_count{l} {}", p.count());
            }
        }
        // Not used by the broker's instruments.
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// Renders collected metrics, sorted by name so scrapes are stable.
pub fn render(rm: &ResourceMetrics) -> String {
    let mut metrics: Vec<_> = rm.scope_metrics().flat_map(|s| s.metrics()).collect();
    metrics.sort_by(|a, b| a.name().cmp(b.name()));
    let mut seen = BTreeSet::new();
    let mut out = String::new();
    for m in metrics {
        let name = sanitize_name(m.name());
        if !seen.insert(name.clone()) {
            continue;
        }
        match m.data() {
            AggregatedMetrics::F64(d) => render_data(&mut out, &name, m.description(), d),
            AggregatedMetrics::U64(d) => render_data(&mut out, &name, m.description(), d),
            AggregatedMetrics::I64(d) => render_data(&mut out, &name, m.description(), d),
        }
    }
    out
}

/// An upstream call being timed (`Metrics::upstream_call`).
pub struct UpstreamCall<'a> {
    metrics: &'a Metrics,
    upstream: Upstream,
    started: Instant,
    ended: bool,
}

impl UpstreamCall<'_> {
    /// Records the call, with its error code when it failed.
    pub fn end(mut self, error: Option<String>) {
        self.ended = true;
        self.metrics.upstream(self.upstream, self.started, error);
    }
}

impl Drop for UpstreamCall<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics
                .upstream(self.upstream, self.started, Some("cut_off".to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::Resource;

    fn metrics(tenants: &[&str]) -> Metrics {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(Resource::builder_empty().build())
            .with_reader(reader.clone())
            .build();
        Metrics::with_provider(
            provider,
            reader,
            tenants.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn every_grpc_code_has_a_request_counter() {
        let m = metrics(&["contoso"]);
        for i in 0..17 {
            m.request(
                "WatchToken",
                tonic::Code::from_i32(i),
                Duration::from_millis(1),
            );
        }
        let text = m.render();
        for i in 0..17 {
            let code = tonic::Code::from_i32(i);
            let line = format!(
                "tokenbroker_requests_total{{code=\"{}\",method=\"WatchToken\",outcome=\"{}\"}} 1\n",
                crate::api::error::code_name(code),
                outcome(code)
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn counters_and_histograms_render_in_prometheus_text() {
        let m = metrics(&["contoso"]);
        m.request("GetToken", tonic::Code::Ok, Duration::from_millis(3));
        m.request("GetToken", tonic::Code::Ok, Duration::from_millis(30));
        m.request(
            "GetToken",
            tonic::Code::Unavailable,
            Duration::from_secs(60),
        );
        let text = m.render();
        assert!(
            text.contains("# TYPE tokenbroker_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains(
            "tokenbroker_requests_total{code=\"OK\",method=\"GetToken\",outcome=\"ok\"} 2\n"
        ));
        assert!(text.contains("# TYPE tokenbroker_request_duration_seconds histogram\n"));
        assert!(text.contains(
            "tokenbroker_request_duration_seconds_bucket{method=\"GetToken\",outcome=\"ok\",le=\"0.0025\"} 0\n"
        ), "{text}");
        assert!(text.contains(
            "tokenbroker_request_duration_seconds_bucket{method=\"GetToken\",outcome=\"ok\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "tokenbroker_request_duration_seconds_bucket{method=\"GetToken\",outcome=\"ok\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains(
            "tokenbroker_request_duration_seconds_count{method=\"GetToken\",outcome=\"error\"} 1\n"
        ));
        assert!(text.contains(
            "tokenbroker_request_duration_seconds_bucket{method=\"GetToken\",outcome=\"error\",le=\"30\"} 0\n"
        ));
    }

    #[test]
    fn labels_are_bounded() {
        let m = metrics(&["contoso"]);
        assert_eq!(m.tenant_label("contoso"), "contoso");
        assert_eq!(m.tenant_label("evil\"tenant"), UNKNOWN);
        for i in 0..(MAX_CALLER_LABELS + 50) {
            m.throttled(&format!("caller-{i}"));
        }
        m.throttled("caller-0");
        let text = m.render();
        assert!(text.contains("tokenbroker_throttled_requests_total{caller=\"caller-0\"} 2\n"));
        assert!(text.contains("tokenbroker_throttled_requests_total{caller=\"_other\"} 50\n"));
        let lines = text
            .lines()
            .filter(|l| l.starts_with("tokenbroker_throttled_requests_total{"))
            .count();
        assert_eq!(lines, MAX_CALLER_LABELS + 1);
    }

    #[test]
    fn upstream_failures_carry_a_code_and_values_are_escaped() {
        let m = metrics(&[]);
        m.upstream(Upstream::Entra, Instant::now(), Some("AADSTS700016".into()));
        m.upstream(Upstream::Entra, Instant::now(), None);
        m.upstream(
            Upstream::KeyVaultSign,
            Instant::now(),
            Some("a\"b\\c\nd".into()),
        );
        let text = m.render();
        assert!(text.contains(
            "tokenbroker_upstream_calls_total{code=\"AADSTS700016\",result=\"error\",upstream=\"entra\"} 1\n"
        ), "{text}");
        assert!(text.contains(
            "tokenbroker_upstream_calls_total{code=\"\",result=\"ok\",upstream=\"entra\"} 1\n"
        ));
        assert!(text.contains("code=\"a\\\"b\\\\c\\nd\""));
        assert!(text.contains(
            "tokenbroker_upstream_duration_seconds_count{result=\"error\",upstream=\"entra\"} 1\n"
        ));
    }

    #[test]
    fn a_refused_policy_file_shows_until_the_file_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let good = "[[grant]]\ncallers = [\"dns:a\"]\ntenants = [\"t\"]\nscopes = [\"https://graph.microsoft.com/.default\"]\n";
        std::fs::write(&path, good).unwrap();
        let tenants = ["t".to_owned()].into_iter().collect();
        let policy = crate::policy::PolicyHandle::from_file(&path, tenants).unwrap();
        let m = metrics(&[]);
        let _observing = m.observe_policy(&policy);
        assert!(m.render().contains("tokenbroker_policy_file_refused 0\n"));
        std::fs::write(&path, "[[grant]]\ncallers = 1\n").unwrap();
        policy.reload_now(false);
        let text = m.render();
        assert!(
            text.contains("tokenbroker_policy_file_refused 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tokenbroker_policy_reloads_refused_total 1\n"),
            "{text}"
        );
        std::fs::write(&path, good).unwrap();
        policy.reload_now(false);
        assert!(m.render().contains("tokenbroker_policy_file_refused 0\n"));
    }

    #[test]
    fn entra_codes_prefer_aadsts() {
        let mut e = EntraError {
            class: crate::entra::EntraErrorClass::Configuration,
            status: 400,
            error: "invalid_client".into(),
            codes: vec![700027, 1],
            description: String::new(),
            correlation_id: None,
            trace_id: None,
            retry_after: None,
        };
        assert_eq!(entra_code(&e), "AADSTS700027");
        e.codes.clear();
        assert_eq!(entra_code(&e), "http_400");
        e.status = 0;
        assert_eq!(entra_code(&e), "transport");
    }
}
