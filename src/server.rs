//! Assembles and runs the broker: outbound HTTP, managed identity, Key Vault signer, Entra
//! exchange, cache, and the gRPC server with health and reflection, until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;

use crate::api;
use crate::broker::{Broker, Upstreams};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::entra::HttpTokenExchange;
use crate::outbound::{self, OutboundError};
use crate::signer::keyvault::KeyVaultSigner;

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
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tls(String),
}

/// The real upstreams for a configuration: Key Vault through the Azure SDK with the broker's
/// managed identity, and Entra through the broker's own client, all on one HTTP stack.
pub fn upstreams(config: &Config) -> Result<Upstreams, ServerError> {
    let http = outbound::http_client(&config.outbound)?;
    let credential = outbound::credential(&config.identity, &http)?;
    let signer = KeyVaultSigner::new(credential, outbound::client_options(&http, None));
    Ok(Upstreams {
        signer: Arc::new(signer),
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
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<crate::proto::token_broker_server::TokenBrokerServer<api::Service>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Tls(format!("reflection: {e}")))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let service = api::Service::new(self.broker.clone(), stop_rx);
        let mut builder = Server::builder();
        if let Some(tls) = &self.config.server.tls {
            let cert = std::fs::read(&tls.cert_file)
                .map_err(|e| ServerError::Tls(format!("{}: {e}", tls.cert_file.display())))?;
            let key = std::fs::read(&tls.key_file)
                .map_err(|e| ServerError::Tls(format!("{}: {e}", tls.key_file.display())))?;
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .map_err(|e| ServerError::Tls(e.to_string()))?;
        }
        let addr = self.listener.local_addr().ok();
        info!(
            ?addr,
            tenants = self.config.tenants.len(),
            "tokenbroker serving"
        );
        let reporter = health_reporter.clone();
        let shutdown = async move {
            shutdown.await;
            info!("shutting down: no new requests, draining");
            reporter
                .set_not_serving::<crate::proto::token_broker_server::TokenBrokerServer<api::Service>>()
                .await;
            let _ = stop_tx.send(true);
        };
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await?;
        Ok(())
    }
}

/// Builds the broker with the given upstreams and binds its listener.
pub async fn bind(config: Config, up: Upstreams) -> Result<Bound, ServerError> {
    let broker = Broker::new(&config, up);
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok(Bound {
        broker,
        listener,
        config,
    })
}
