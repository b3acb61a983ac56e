//! Assembles and runs the broker: outbound HTTP, managed identity, Key Vault signer, Entra
//! exchange, cache, caller access control, and the gRPC server (TLS with a reloading
//! certificate and optional client certificates, or plaintext on loopback) with health and
//! reflection, until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::access::{Access, AccessSetupError};
use crate::api;
use crate::broker::{Broker, Upstreams};
use crate::clock::SystemClock;
use crate::config::{Config, Credential, IdentityConfig};
use crate::entra::HttpTokenExchange;
use crate::identity::ManagedIdentityAssertions;
use crate::outbound::{self, OutboundError};
use crate::signer::keyvault::KeyVaultSigner;
use crate::signer::pkcs11::{Pkcs11Signer, TokenConfig};

pub(crate) mod connections;

pub use connections::Silence;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Access(#[from] AccessSetupError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminBindError),
    #[error(transparent)]
    Hsm(#[from] crate::signer::SignerError),
}

/// Aborts a background task (file watchers) when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Calls `reload` every `interval` until the returned task is aborted. On a blocking thread:
/// a file read stuck on a hung mount (NFS, a CSI driver) must not stall a runtime worker.
/// The next look waits for this one.
pub(crate) fn reload_every(
    interval: std::time::Duration,
    reload: impl Fn() + Clone + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(reload.clone()).await;
        }
    })
}

/// SIGHUP reloads at once what the file watchers would pick up at their next look: the
/// policy file, the server certificate, the client CA bundle and revocation lists; and
/// forgets the configuration failures the broker remembers (`Broker::forget_refusals`), so
/// that a fixed app registration or role is asked for at once rather than after
/// `negative_ttl_secs`. Always installed: SIGHUP's default action ends the process, without
/// draining requests or flushing the audit trail.
fn reload_on_hangup(
    broker: Broker,
    policy: Arc<crate::policy::PolicyHandle>,
    tls: Option<Arc<crate::tls::ListenerConfig>>,
) -> Option<AbortOnDrop> {
    #[cfg(unix)]
    {
        // Registered before serving starts, not in the task: a SIGHUP in between would end
        // the process.
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP handler not installed; a SIGHUP ends the process");
                return None;
            }
        };
        Some(AbortOnDrop(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // First, in memory: a file read on a hung mount must not hold it back.
                let forgotten = broker.forget_refusals().await;
                info!(
                    forgotten,
                    "SIGHUP: remembered configuration failures forgotten: {forgotten}; their keys are asked again at their next request"
                );
                if !policy.reloadable() && tls.is_none() {
                    info!(
                        "SIGHUP: no files to reload (the policy is in the configuration file and gRPC is plaintext); restart to change the configuration"
                    );
                    continue;
                }
                info!("SIGHUP: reloading the policy file and TLS files");
                // Files are read on a blocking thread (a hung mount must not stall a runtime
                // worker); signals that come meanwhile are taken once this reload is done.
                let (policy, tls) = (policy.clone(), tls.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    policy.reload_now(true);
                    if let Some(tls) = &tls {
                        tls.reload_now(true);
                    }
                })
                .await;
            }
        })))
    }
    #[cfg(not(unix))]
    {
        let _ = (broker, policy, tls);
        None
    }
}

/// The real upstreams for a configuration: Key Vault through the Azure SDK with the broker's
/// managed identity, and Entra through the broker's own client, all on one HTTP stack. The
/// identity reads the process environment.
pub fn upstreams(config: &Config) -> Result<Upstreams, ServerError> {
    upstreams_with_env(config, &crate::config::process_env)
}

/// `upstreams`, with the broker's identity reading `env` (workload identity's variables and
/// token file) instead of the process environment.
pub fn upstreams_with_env(
    config: &Config,
    env: crate::config::EnvSource<'_>,
) -> Result<Upstreams, ServerError> {
    let clients = outbound::http_clients(&config.outbound)?;
    let credential = outbound::credential(&config.identity, &clients, env)?;
    // A credential per user-assigned identity that tenants present as a federated
    // credential; the broker's own identity shares its token cache with Key Vault's.
    let mut identities = std::collections::HashMap::new();
    for t in config.tenants.values() {
        if let Credential::ManagedIdentity { client_id, .. } = &t.credential
            && !identities.contains_key(client_id)
        {
            let c: Arc<dyn azure_core::credentials::TokenCredential> =
                if config.identity.client_id.as_ref() == Some(client_id) {
                    credential.clone()
                } else {
                    let identity = IdentityConfig {
                        client_id: Some(client_id.clone()),
                        ..config.identity.clone()
                    };
                    outbound::credential(&identity, &clients, env)?
                };
            identities.insert(client_id.clone(), c);
        }
    }
    let http = clients.shared;
    let signer = KeyVaultSigner::new(
        credential.clone(),
        outbound::key_vault_options(&http, credential),
    );
    let tokens: Vec<TokenConfig> = config
        .tenants
        .values()
        .filter_map(|t| match &t.credential {
            Credential::Pkcs11 {
                module, token, pin, ..
            } => Some(TokenConfig {
                module: module.clone(),
                label: token.clone(),
                pin: pin.clone(),
            }),
            _ => None,
        })
        .collect();
    Ok(Upstreams {
        signer: Arc::new(signer),
        hsm: Arc::new(Pkcs11Signer::new(&tokens, config.outbound.request_timeout)?),
        identity: Arc::new(ManagedIdentityAssertions::new(identities)),
        exchange: Arc::new(HttpTokenExchange::new(http)),
        clock: Arc::new(SystemClock),
    })
}

/// A bound, not yet serving, broker.
#[derive(Debug)]
pub struct Bound {
    pub broker: Broker,
    listener: TcpListener,
    config: Config,
    access: Arc<Access>,
    health: tonic_health::server::HealthReporter,
    admin: crate::admin::Admin,
    tls: Option<Arc<crate::tls::ListenerConfig>>,
    connection_age: connections::AgeDraw,
    silence: Silence,
}

impl Bound {
    /// Replaces the per-connection draw of the maximum connection age (by default uniformly
    /// within ±10% of `server.max_connection_age_secs`): `draw` is given the configured age
    /// for each connection accepted, and returns that connection's. For tests.
    pub fn with_connection_age(
        mut self,
        draw: impl Fn(std::time::Duration) -> std::time::Duration + Send + Sync + 'static,
    ) -> Bound {
        self.connection_age = connections::AgeDraw::new(draw);
        self
    }

    /// Replaces how long a silent connection is borne (by default, the preface within 10 s,
    /// a PING after 60 s without a frame, answered within 20 s). For tests.
    pub fn with_silence(mut self, silence: Silence) -> Bound {
        self.silence = silence;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin HTTP listener's address (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The gRPC health state (`/readyz` mirrors it).
    pub fn health_reporter(&self) -> tonic_health::server::HealthReporter {
        self.health.clone()
    }

    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// The server certificate, when serving TLS (to reload it on demand).
    pub fn server_cert(&self) -> Option<&Arc<crate::tls::ReloadingCert>> {
        self.tls.as_ref().map(|t| t.server_cert())
    }

    /// The listener's TLS configuration (to reload the client trust on demand).
    pub fn listener_tls(&self) -> Option<&Arc<crate::tls::ListenerConfig>> {
        self.tls.as_ref()
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let health_reporter = self.health.clone();
        let access = self.access.clone();
        // The admin listener (metrics, probes) lives as long as gRPC serving does.
        let metrics = self.broker.flow().metrics.clone();
        let _observing = metrics.observe(&self.broker);
        let _observing_audit = metrics.observe_audit(self.access.audit());
        let _observing_policy = metrics.observe_policy(self.access.policy());
        let _observing_cert = self.server_cert().map(|c| metrics.observe_server_cert(c));
        let _observing_trust = self
            .tls
            .as_ref()
            .filter(|t| t.verifies_clients())
            .map(|t| metrics.observe_client_trust(t));
        let _observing_handshakes = self.tls.as_ref().map(|t| metrics.observe_handshakes(t));
        let _admin = AbortOnDrop(
            self.admin
                .spawn(crate::admin::router(metrics, self.health.clone())),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let health_service = tonic_health::pb::health_server::HealthServer::new(DrainingHealth {
            inner: tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
            stop: stop_rx.clone(),
        });
        // Ready only once the pre-warm keys are cached, so a rolling deployment never sends
        // traffic to a cold replica.
        let warm = AbortOnDrop(tokio::spawn(become_ready(
            self.broker.clone(),
            self.access.clone(),
            health_reporter.clone(),
        )));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Tls(format!("reflection: {e}")))?;
        let service = api::Service::new(self.broker.clone(), stop_rx.clone(), self.access.clone())
            .traced(self.config.telemetry.otlp_endpoint.is_some())
            .into_server()
            .max_decoding_message_size(self.config.limits.max_request_bytes);
        // Calls tonic refuses before the handler reads them are audited as well.
        let service = api::AuditRefused::new(
            service,
            self.access.clone(),
            self.broker.flow().metrics.clone(),
            stop_rx,
        );
        // The policy file, the server certificate and the client trust files are polled
        // for changes; SIGHUP reloads them at once (and forgets remembered refusals).
        let reload = self.config.server.reload_interval;
        let policy = self.access.policy().clone();
        let _policy_watch = policy
            .reloadable()
            .then(|| AbortOnDrop(reload_every(reload, move || policy.reload_now(false))));
        let _hangup = reload_on_hangup(
            self.broker.clone(),
            self.access.policy().clone(),
            self.tls.clone(),
        );
        let _audit_summaries = AbortOnDrop(tokio::spawn(self.access.audit().clone().summarise()));
        let _tls_watch = self
            .tls
            .clone()
            .map(|tls| AbortOnDrop(reload_every(reload, move || tls.reload_now(false))));
        let addr = self.listener.local_addr().ok();
        info!(
            ?addr,
            tenants = self.config.tenants.len(),
            "tokenbroker serving"
        );
        let reporter = health_reporter.clone();
        let mut stopping = stop_tx.subscribe();
        let shutdown = async move {
            shutdown.await;
            info!("shutting down: no new requests, draining");
            drop(warm);
            set_health(&reporter, false).await;
            let _ = stop_tx.send(true);
        };
        // In-flight requests get `shutdown_grace` to finish; then remaining connections close.
        let grace = self.config.server.shutdown_grace;
        let drain_bound = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection)
            .add_service(service)
            .prepare();
        // Each connection is sent GOAWAY at its own age, drawn within ±10% of the configured
        // one, and closes once its calls in flight and watches finish.
        let each = connections::PerConnection {
            max_age: self.config.server.max_connection_age,
            draw: self.connection_age,
            max_streams: self.config.server.max_concurrent_streams,
            max_connections: self.config.server.max_connections as usize,
            silence: self.silence,
        };
        let streams = connections::Streams::default();
        let alive = streams.clone();
        let serve = async move {
            match self.tls {
                Some(tls) => {
                    let incoming = crate::tls::incoming(self.listener, tls);
                    connections::serve(incoming, routes, each, streams, shutdown).await;
                }
                None => {
                    // gRPC answers are small writes: without TCP_NODELAY, Nagle's algorithm
                    // holds them for the peer's delayed ACK (about 40 ms on Linux).
                    let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
                        .with_nodelay(Some(true));
                    connections::serve(incoming, routes, each, streams, shutdown).await;
                }
            }
        };
        let served = tokio::select! {
            () = serve => Ok(()),
            () = drain_bound => {
                tracing::warn!(grace_secs = grace.as_secs(), "drain bound reached; closing the remaining connections");
                Ok(())
            }
        };
        // The calls the drain bound cut end as their tasks are next polled, each writing its
        // `cancelled` record: they are waited for, so that the flush below has them.
        if !alive.ended(STREAMS_END_BOUND).await {
            tracing::warn!(
                bound_secs = STREAMS_END_BOUND.as_secs(),
                "calls cut at shutdown had not ended in time; their audit records may be lost"
            );
        }
        // Every decision made is in the audit trail before the process exits. The flush gives
        // up on a stalled output by itself; the bound covers getting a blocking thread.
        let flush = tokio::task::spawn_blocking(move || access.audit().flush());
        if tokio::time::timeout(AUDIT_FLUSH_BOUND, flush)
            .await
            .is_err()
        {
            tracing::error!(
                bound_secs = AUDIT_FLUSH_BOUND.as_secs(),
                "the audit trail's final flush did not finish; records not yet written may be lost"
            );
        }
        served
    }
}

/// The gRPC health service, whose `Watch` streams end at shutdown (after NOT_SERVING):
/// a client watching health (gRPC client-side health checking does) would otherwise hold
/// the drain open for the whole grace period.
struct DrainingHealth {
    inner: tonic_health::server::HealthService,
    stop: tokio::sync::watch::Receiver<bool>,
}

type HealthWatch = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for DrainingHealth {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthWatch;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthWatch>, tonic::Status> {
        use futures::StreamExt;
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut stop = self.stop.clone();
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
        // NOT_SERVING is set before the stop is signalled: it ends the stream, said once (the
        // stream itself may have said it just before the stop).
        let said = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let saw = said.clone();
        let statuses = statuses.inspect(move |r| {
            let now = r.as_ref().is_ok_and(|m| m.status == not_serving);
            saw.store(now, std::sync::atomic::Ordering::Relaxed);
        });
        let last = futures::stream::once(async move {
            (!said.load(std::sync::atomic::Ordering::Relaxed)).then_some(Ok(
                tonic_health::pb::HealthCheckResponse {
                    status: not_serving,
                },
            ))
        })
        .filter_map(futures::future::ready);
        Ok(tonic::Response::new(Box::pin(
            statuses.take_until(stopping).chain(last),
        )))
    }
}

/// Marks the broker and the overall server SERVING or NOT_SERVING.
async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter
        .set_service_status(
            <crate::proto::token_broker_server::TokenBrokerServer<api::Service> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}

/// Pre-warms the configured keys (retrying with backoff on the broker's clock), then
/// reports SERVING, and from then on follows the audit trail (`follow_audit`). Aborted at
/// shutdown, which reports NOT_SERVING for good.
async fn become_ready(
    broker: Broker,
    access: Arc<Access>,
    reporter: tonic_health::server::HealthReporter,
) {
    warm_up(broker, &reporter).await;
    if access.refuses_unaudited() {
        follow_audit(|| access.audit().failure(), &reporter).await;
    }
}

/// How often readiness looks at the audit trail.
const AUDIT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the exit waits for the audit trail's final flush to run.
const AUDIT_FLUSH_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// How long shutdown waits for the calls it cut to end (their tasks only have to be polled
/// once) before flushing the audit trail.
const STREAMS_END_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// NOT_SERVING while the audit trail cannot be written and tokens are refused for it (the
/// default), SERVING again once it can: load balancers and Kubernetes send callers to
/// replicas that can serve them.
async fn follow_audit(
    failure: impl Fn() -> Option<String>,
    reporter: &tonic_health::server::HealthReporter,
) {
    let mut serving = true;
    let mut tick = tokio::time::interval(AUDIT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let failure = failure();
        if failure.is_none() != serving {
            serving = failure.is_none();
            match &failure {
                Some(reason) => tracing::error!(
                    %reason,
                    "not ready: the audit trail cannot be written, so no token is served"
                ),
                None => info!("ready again: the audit trail is written"),
            }
            set_health(reporter, serving).await;
        }
    }
}

/// Pre-warm keys fetched at once.
const PREWARM_CONCURRENCY: usize = 8;

/// Pre-warms the configured keys, then reports SERVING. A key failing for a transient reason
/// (an outage, throttling) is retried with backoff on the broker's clock, and readiness waits
/// for it: a new replica does not take callers it could not serve while the old ones can. A
/// key failing for a persistent reason (a customer tenant disabled the app or withdrew
/// consent, a certificate Entra does not know) is given up and logged: readiness does not
/// wait for it, or one tenant's state would stall every rollout and scale-out for all.
async fn warm_up(broker: Broker, reporter: &tonic_health::server::HealthReporter) {
    use futures::StreamExt;
    let mut pending: Vec<crate::config::Prewarm> = broker.prewarm_keys().to_vec();
    if pending.is_empty() {
        set_health(reporter, true).await;
        return;
    }
    set_health(reporter, false).await;
    let mut attempt = 0u32;
    loop {
        let mut failed = Vec::new();
        // A few at once: readiness should not wait for the keys one after another, nor
        // should a start burst every key's sign and exchange on the upstreams at once.
        let mut results = futures::stream::iter(pending.into_iter().map(|key| {
            let broker = broker.clone();
            async move {
                let result = broker.prewarm(&key).await;
                (key, result)
            }
        }))
        .buffer_unordered(PREWARM_CONCURRENCY);
        while let Some((key, result)) = results.next().await {
            match result {
                Ok(()) => {}
                Err(e) if e.is_persistent() => tracing::error!(
                    tenant = %key.tenant,
                    scopes = %key.scopes.join(" "),
                    error = %e,
                    "pre-warm of this key given up: asking again will not fix it; readiness does not wait for it, and it is fetched when a caller asks"
                ),
                Err(e) => {
                    tracing::warn!(
                        tenant = %key.tenant,
                        scopes = %key.scopes.join(" "),
                        error = %e,
                        attempt = attempt + 1,
                        "pre-warm failed; not ready yet"
                    );
                    failed.push(key);
                }
            }
        }
        if failed.is_empty() {
            info!("pre-warm complete; serving");
            set_health(reporter, true).await;
            return;
        }
        pending = failed;
        attempt += 1;
        let wait = crate::resilience::backoff(
            attempt,
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
        )
        .max(std::time::Duration::from_millis(200));
        broker.clock().sleep(wait).await;
    }
}

/// Builds the broker with the given upstreams and binds its listener; callers are admitted as
/// the configuration says, audited to its audit output.
pub async fn bind(config: Config, up: Upstreams) -> Result<Bound, ServerError> {
    let http = outbound::http_client(&config.outbound)?;
    let access = Access::from_config(&config, http)?;
    bind_with(config, up, access).await
}

/// Like `bind`, with the caller access control given (tests supply an in-memory audit sink).
pub async fn bind_with(
    config: Config,
    up: Upstreams,
    access: Access,
) -> Result<Bound, ServerError> {
    // As checked when the configuration was loaded, not read again (a file replaced since
    // would be served unchecked); built here only if it was not (certificate problems then
    // surface here, before anything listens).
    let tls = match (&config.server.tls_loaded, &config.server.tls) {
        (Some(loaded), _) => Some(loaded.clone()),
        (None, Some(tls)) => Some(crate::tls::server_config(tls)?),
        (None, None) => None,
    };
    let broker = Broker::new(&config, up);
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    // NOT_SERVING until `serve` has warmed up.
    let admin = crate::admin::bind(&config.admin).await?;
    let health = tonic_health::server::HealthReporter::new();
    set_health(&health, false).await;
    Ok(Bound {
        broker,
        listener,
        health,
        admin,
        config,
        access: Arc::new(access),
        tls,
        connection_age: connections::AgeDraw::jittered(),
        silence: Silence::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_the_audit_trail_both_ways() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = HealthService::from_health_reporter(reporter.clone());
        super::set_health(&reporter, true).await;
        let failing = Arc::new(AtomicBool::new(false));
        let f = failing.clone();
        let follow = tokio::spawn(async move {
            super::follow_audit(
                move || f.load(Ordering::SeqCst).then(|| "disk full".to_owned()),
                &reporter,
            )
            .await;
        });
        let check = || async {
            service
                .check(tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                }))
                .await
                .unwrap()
                .into_inner()
                .status
        };
        let serving = ServingStatus::Serving as i32;
        let not_serving = ServingStatus::NotServing as i32;
        tokio::time::sleep(super::AUDIT_CHECK * 3).await;
        assert_eq!(check().await, serving);
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(super::AUDIT_CHECK * 2).await;
        assert_eq!(check().await, not_serving);
        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(super::AUDIT_CHECK * 2).await;
        assert_eq!(check().await, serving);
        follow.abort();
    }
}
