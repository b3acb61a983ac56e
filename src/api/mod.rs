//! The gRPC API: `tokenbroker.v1.TokenBroker`. Thin handlers that decode requests, call the
//! broker, and encode responses; errors become status only through `error::to_status`.

pub mod error;

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use crate::broker::{Broker, IssuedToken, TokenRequest, TokenSource};
use crate::cache::{CachedToken, SlotState};
use crate::proto;
use crate::proto::token_broker_server::TokenBroker;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    broker: Broker,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Service {
    pub fn new(broker: Broker, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Service { broker, shutdown }
    }

    pub fn into_server(self) -> proto::token_broker_server::TokenBrokerServer<Self> {
        proto::token_broker_server::TokenBrokerServer::new(self)
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn response(t: &CachedToken, source: TokenSource) -> proto::GetTokenResponse {
    proto::GetTokenResponse {
        access_token: t.access_token.expose().to_owned(),
        token_type: t.token_type.clone(),
        expires_at: Some(timestamp(t.expires_at)),
        refresh_at: Some(timestamp(t.refresh_at)),
        tenant_id: t.tenant_id.to_string(),
        client_id: t.client_id.to_string(),
        scopes: t.scopes.to_vec(),
        source: match source {
            TokenSource::Cache => proto::TokenSource::Cache,
            TokenSource::Exchange => proto::TokenSource::Exchange,
            TokenSource::StaleWhileRefreshFailing => proto::TokenSource::StaleWhileRefreshFailing,
        } as i32,
    }
}

fn decode_duration(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(Status::invalid_argument(
            "min_validity: must not be negative",
        )),
        Some(d) => Ok(Some(
            Duration::from_secs(d.seconds as u64) + Duration::from_nanos(d.nanos as u64),
        )),
    }
}

type WatchStreamBox =
    Pin<Box<dyn Stream<Item = Result<proto::WatchTokenResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TokenBroker for Service {
    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!(
            "GetToken",
            tenant = %req.tenant.chars().take(64).collect::<String>(),
            scopes = req.scopes.len(),
            source = tracing::field::Empty,
        );
        let token_req = TokenRequest {
            tenant: req.tenant,
            scopes: req.scopes,
            min_validity: decode_duration(req.min_validity)?,
            force_refresh: req.force_refresh,
        };
        async {
            match self.broker.get_token(&token_req).await {
                Ok(IssuedToken { token, source }) => {
                    tracing::Span::current().record("source", format!("{source:?}"));
                    info!(fingerprint = %token.access_token.fingerprint(), "token served");
                    Ok(Response::new(response(&token, source)))
                }
                Err(e) => {
                    let status = error::to_status(&e);
                    info!(code = error::code_name(status.code()), error = %e, "request failed");
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }

    type WatchTokenStream = WatchStreamBox;

    async fn watch_token(
        &self,
        request: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let req = request.into_inner();
        let rx = self
            .broker
            .subscribe(&req.tenant, &req.scopes)
            .await
            .map_err(|e| error::to_status(&e))?;
        let mut shutdown = self.shutdown.clone();
        let ended = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let stream = WatchStream::new(rx).filter_map(|state: SlotState| {
            let failing = state.failure.is_some();
            // Nothing to say until there is a token or a failure.
            if state.token.is_none() && !failing {
                return None;
            }
            Some(Ok(proto::WatchTokenResponse {
                token: state.token.as_deref().map(|t| {
                    response(
                        t,
                        if failing {
                            TokenSource::StaleWhileRefreshFailing
                        } else {
                            TokenSource::Exchange
                        },
                    )
                }),
                refresh_failing: failing,
                last_error: state.failure.clone().unwrap_or_default(),
            }))
        });
        let stream = futures::StreamExt::take_until(stream, ended);
        Ok(Response::new(Box::pin(stream)))
    }
}
