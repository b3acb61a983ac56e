//! Local Azure emulator: managed identity (App Service and IMDS shapes), Key Vault (certificates,
//! keys, sign) and Entra ID v2.0 (client credentials with certificate or federated assertions),
//! plus an admin API for fault injection and counters. For development (`tokenbroker dev`) and
//! tests; it binds loopback only and generates all key material at start.
//!
//! # Layout
//! - [`config`]: TOML configuration and the demo estate.
//! - `keys`, `tls`: key material and the throwaway CA; `issuers`: keys of external OpenID
//!   issuers trusted through federated credentials (a Kubernetes cluster's).
//! - `state`: runtime state and counters; `faults`: fault injection middleware.
//! - `identity`, `keyvault`, `entra`, `admin`: the HTTP routes of each emulated service;
//!   `graph`: a Graph-style paged collection for collector demos.
//! - `clock`: the emulator's clock (real time plus an offset tests can advance).
//!
//! See `docs/EMULATOR.md` for what is emulated and how faithfully.

mod admin;
mod clock;
pub mod config;
mod entra;
mod error;
mod faults;
mod graph;
mod identity;
mod issuers;
pub(crate) mod keys;
mod keyvault;
mod state;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_service::Service;

pub use config::{EmulatorConfig, VaultRole};
pub use error::EmulatorError;

use state::Shared;

/// How long in-flight requests get to finish on shutdown before connections are closed.
const GRACE: Duration = Duration::from_secs(5);

/// Where and how to start the emulator.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Where to write the CA certificate (PEM) that signs the HTTPS listener's certificate.
    pub ca_cert_path: PathBuf,
    /// Loopback address to bind; anything else is refused.
    pub bind_ip: IpAddr,
    /// Managed-identity listener port (0 = ephemeral).
    pub identity_port: u16,
    /// Key Vault + Entra HTTPS listener port (0 = ephemeral).
    pub azure_port: u16,
    /// Admin API port (0 = ephemeral).
    pub admin_port: u16,
}

impl StartOptions {
    /// Ephemeral ports on 127.0.0.1, CA written to `ca_cert_path`.
    pub fn new(ca_cert_path: impl Into<PathBuf>) -> Self {
        Self {
            ca_cert_path: ca_cert_path.into(),
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            identity_port: 0,
            azure_port: 0,
            admin_port: 0,
        }
    }
}

/// Where a started emulator listens: the contents of the endpoints file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// App Service style `IDENTITY_ENDPOINT` (`http://127.0.0.1:P/msi/token`).
    pub identity_endpoint: String,
    /// `IDENTITY_HEADER` value, random per start.
    pub identity_header: String,
    /// Base URL of the IMDS-shaped endpoint (`/metadata/identity/oauth2/token`).
    pub imds_endpoint: String,
    /// Key Vault base URL (HTTPS).
    pub key_vault_url: String,
    /// Entra authority host (HTTPS), e.g. for `AZURE_AUTHORITY_HOST`.
    pub authority_host: String,
    /// Absolute path of the CA certificate PEM.
    pub ca_cert: String,
    /// Admin API base URL.
    pub admin_url: String,
}

impl Endpoints {
    /// Writes the JSON to a temporary file beside `path` and renames it into place, so readers
    /// never see a half-written file.
    pub fn write_atomically(&self, path: &Path) -> Result<(), EmulatorError> {
        let json = serde_json::to_vec_pretty(self)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| EmulatorError::io("creating", dir, e))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "endpoints.json".to_owned());
        let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, json).map_err(|e| EmulatorError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| EmulatorError::io("renaming into", path, e))
    }
}

/// A running emulator. Dropping it stops the listeners abruptly; prefer [`Emulator::shutdown`].
pub struct Emulator {
    endpoints: Endpoints,
    ca_pem: String,
    shared: Arc<Shared>,
    handles: Vec<axum_server::Handle>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    shutdown_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Generates key material, binds all listeners and starts serving. When this returns, every
    /// listener accepts connections.
    pub async fn start(
        config: EmulatorConfig,
        opts: StartOptions,
    ) -> Result<Emulator, EmulatorError> {
        config.validate()?;
        if !opts.bind_ip.is_loopback() {
            return Err(EmulatorError::NotLoopback(opts.bind_ip));
        }
        let identities = config.identities.clone();
        // RSA key generation is CPU-bound: keep it off the async workers.
        let (tls, issuer, state) = tokio::task::spawn_blocking(move || {
            std::thread::scope(|s| {
                let issuer = s.spawn(keys::IssuerKey::generate);
                let state = state::build_state(&config)?;
                let issuer = issuer
                    .join()
                    .unwrap_or_else(|_| Err(EmulatorError::crypto("key generation panicked")))?;
                Ok::<_, EmulatorError>((tls::generate()?, issuer, state))
            })
        })
        .await
        .map_err(|e| EmulatorError::crypto(format!("key generation task failed: {e}")))??;

        let ca_path = absolute(&opts.ca_cert_path)?;
        if let Some(dir) = ca_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EmulatorError::io("creating", dir, e))?;
        }
        std::fs::write(&ca_path, &tls.ca_pem)
            .map_err(|e| EmulatorError::io("writing", &ca_path, e))?;

        let identity_l = bind(opts.bind_ip, opts.identity_port)?;
        let azure_l = bind(opts.bind_ip, opts.azure_port)?;
        let admin_l = bind(opts.bind_ip, opts.admin_port)?;
        let addr = |l: &TcpListener| {
            l.local_addr().map_err(|source| EmulatorError::Bind {
                addr: SocketAddr::new(opts.bind_ip, 0),
                source,
            })
        };
        let (identity_addr, azure_addr, admin_addr) =
            (addr(&identity_l)?, addr(&azure_l)?, addr(&admin_l)?);

        let endpoints = Endpoints {
            identity_endpoint: format!("http://{identity_addr}/msi/token"),
            identity_header: uuid::Uuid::new_v4().simple().to_string(),
            imds_endpoint: format!("http://{identity_addr}"),
            key_vault_url: format!("https://{azure_addr}"),
            authority_host: format!("https://{azure_addr}"),
            ca_cert: ca_path.to_string_lossy().into_owned(),
            admin_url: format!("http://{admin_addr}"),
        };

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            endpoints.clone(),
            identities,
            issuer,
            issuers::ExternalIssuers::new(&tls.ca_pem)?,
            state,
            shutdown_rx,
        ));

        let with_faults = |router: Router<Arc<Shared>>| {
            router
                .layer(axum::middleware::from_fn_with_state(
                    shared.clone(),
                    faults::middleware,
                ))
                .with_state(shared.clone())
        };
        let identity_app = with_faults(identity::router());
        let azure_app = with_faults(Router::new().fallback(azure_dispatch));
        let admin_app = admin::router().with_state(shared.clone());

        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (listener, app, tls_config) in [
            (identity_l, identity_app, None),
            (azure_l, azure_app, Some(tls.server_config.clone())),
            (admin_l, admin_app, None),
        ] {
            let handle = axum_server::Handle::new();
            let make = MakeResetAware(app);
            let task = match tls_config {
                Some(cfg) => {
                    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(cfg);
                    let server =
                        axum_server::from_tcp_rustls(listener, rustls).handle(handle.clone());
                    tokio::spawn(server.serve(make))
                }
                None => {
                    let server = axum_server::from_tcp(listener).handle(handle.clone());
                    tokio::spawn(server.serve(make))
                }
            };
            handles.push(handle);
            tasks.push(task);
        }

        Ok(Emulator {
            endpoints,
            ca_pem: tls.ca_pem,
            shared,
            handles,
            tasks,
            shutdown_tx,
        })
    }

    /// Where the emulator listens.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The CA certificate (PEM) that clients must trust for the HTTPS listener.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Moves the emulator's clock forward by `by` (cumulative), like `POST /clock/advance`;
    /// returns the total offset. Every issued timestamp and every time check of the emulated
    /// services follows this clock; fault durations and TLS certificates keep real time.
    pub fn advance_clock(&self, by: Duration) -> Duration {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let total = self.shared.clock.advance_ms(ms);
        Duration::from_millis(u64::try_from(total).unwrap_or(0))
    }

    /// The current offset of the emulator's clock from real time.
    pub fn clock_offset(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.shared.clock.offset_ms()).unwrap_or(0))
    }

    /// Stops accepting, ends hanging requests, lets in-flight requests finish (up to a grace
    /// period) and waits for every listener to close.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for h in &self.handles {
            h.graceful_shutdown(Some(GRACE));
        }
        for task in std::mem::take(&mut self.tasks) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "emulator listener ended with an error"),
                Err(e) => tracing::warn!(error = %e, "emulator listener task failed"),
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            let _ = self.shutdown_tx.send(true);
            for h in &self.handles {
                h.shutdown();
            }
        }
    }
}

/// `tokenbroker emulator [--config FILE] --endpoints-file PATH`: loads the config (the demo
/// configuration without one), starts, writes the endpoints file (CA beside it as `ca.pem`)
/// once all listeners are up, runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run_standalone(
    config: Option<&Path>,
    endpoints_file: &Path,
) -> Result<(), EmulatorError> {
    use tokio::signal::unix::{SignalKind, signal};

    let config = match config {
        Some(path) => EmulatorConfig::from_toml_file(path)?,
        None => EmulatorConfig::demo(),
    };
    let endpoints_file = absolute(endpoints_file)?;
    let ca_path = endpoints_file
        .parent()
        .map_or_else(|| PathBuf::from("ca.pem"), |d| d.join("ca.pem"));
    // Install handlers before starting so an early signal is not lost.
    let mut sigint = signal(SignalKind::interrupt()).map_err(EmulatorError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(EmulatorError::Signal)?;

    let emulator = Emulator::start(config, StartOptions::new(ca_path)).await?;
    emulator.endpoints().write_atomically(&endpoints_file)?;
    let e = emulator.endpoints();
    tracing::info!(
        identity_endpoint = %e.identity_endpoint,
        imds_endpoint = %e.imds_endpoint,
        key_vault_url = %e.key_vault_url,
        authority_host = %e.authority_host,
        admin_url = %e.admin_url,
        ca_cert = %e.ca_cert,
        endpoints_file = %endpoints_file.display(),
        "emulator ready"
    );
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    tracing::info!("emulator shutting down");
    emulator.shutdown().await;
    Ok(())
}

/// Routes the HTTPS listener: Key Vault and the Graph-style demo API by their first segment,
/// everything else Entra.
async fn azure_dispatch(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let path = req.uri().path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "keys" | "certificates" | "secrets" => keyvault::handle(shared, req).await,
        "graph" => graph::handle(shared, req).await,
        _ => entra::handle(shared, req).await,
    }
}

fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, EmulatorError> {
    let addr = SocketAddr::new(ip, port);
    let listener =
        TcpListener::bind(addr).map_err(|source| EmulatorError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| EmulatorError::Bind { addr, source })?;
    Ok(listener)
}

fn absolute(path: &Path) -> Result<PathBuf, EmulatorError> {
    std::path::absolute(path).map_err(|e| EmulatorError::io("resolving", path, e))
}

// === impl MakeResetAware ===

/// Wraps the router so that a fault can drop the connection: hyper closes an HTTP/1.1
/// connection whose service returns an error, which is the closest thing to a TCP reset an
/// HTTP server can do (over HTTP/2 it resets the request's stream only).
#[derive(Clone)]
struct MakeResetAware(Router);

#[derive(Clone)]
struct ResetAware(Router);

impl<T> Service<T> for MakeResetAware {
    type Response = ResetAware;
    type Error = Infallible;
    type Future = std::future::Ready<Result<ResetAware, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _target: T) -> Self::Future {
        std::future::ready(Ok(ResetAware(self.0.clone())))
    }
}

impl<B> Service<Request<B>> for ResetAware
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut router = self.0.clone();
        Box::pin(async move {
            // Router is always ready and infallible.
            let response = match router.call(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if response
                .extensions()
                .get::<faults::ResetConnection>()
                .is_some()
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "emulator fault: connection reset",
                ));
            }
            Ok(response)
        })
    }
}
