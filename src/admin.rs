//! The admin HTTP listener, beside gRPC: `/metrics` (Prometheus text), `/healthz` (liveness:
//! the process answers) and `/readyz` (200 only while gRPC health reports SERVING, so it
//! follows pre-warm and shutdown). Plain HTTP: it serves nothing secret and belongs on a
//! port only the cluster reaches.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::AdminConfig;
use crate::metrics::Metrics;

/// A bound, not yet serving, admin listener.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (admin): {source}")]
pub struct AdminBindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the admin listener (before anything serves, so a taken port fails start-up).
pub async fn bind(cfg: &AdminConfig) -> Result<Admin, AdminBindError> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AdminBindError {
            addr: cfg.listen,
            source,
        })?;
    Ok(Admin { listener })
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: std::sync::Arc<HealthService>,
}

/// The admin routes over a broker's metrics and its gRPC health state.
pub fn router(metrics: Metrics, health: HealthReporter) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health: std::sync::Arc::new(HealthService::from_health_reporter(health)),
        })
}

impl Admin {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is aborted.
    pub fn spawn(self, router: Router) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, router).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        })
    }
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    // Collection runs the observable callbacks, which read the cache: off the async workers.
    let metrics = s.metrics.clone();
    let body = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Whether the whole server (gRPC health service "") is SERVING.
pub async fn serving(health: &HealthService) -> bool {
    let status = health
        .check(tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .map(|r| r.into_inner().status);
    matches!(status, Ok(s) if s == ServingStatus::Serving as i32)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if serving(&s.health).await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
