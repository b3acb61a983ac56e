//! Bearer-token verification for the micro benchmarks: an OpenID issuer on loopback (a
//! discovery document and the JWKS of one RS256 key, as Entra and Kubernetes publish) and a
//! `JwtVerifier` configured for it.

use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::routing::get;
use serde_json::json;
use url::Url;

use crate::authn::{Caller, JwtError, JwtVerifier};
use crate::config::IssuerConfig;
use crate::emulator::keys::IssuerKey;
use crate::sensitive::Sensitive;

pub const AUDIENCE: &str = "api://tokenbroker";

/// An issuer serving its keys on 127.0.0.1 until dropped.
pub struct LoopbackIssuer {
    key: IssuerKey,
    issuer: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LoopbackIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LoopbackIssuer {
    /// Starts the issuer and a verifier that trusts it (call within a tokio runtime).
    pub async fn start() -> anyhow::Result<(LoopbackIssuer, JwtVerifier)> {
        let key = IssuerKey::generate().context("issuer key")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let issuer = format!("http://{}", listener.local_addr()?);
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/keys")});
        let jwks = key.jwks();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || std::future::ready(Json(discovery.clone()))),
            )
            .route("/keys", get(move || std::future::ready(Json(jwks.clone()))));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let cfg = IssuerConfig {
            name: "bench".into(),
            issuer: issuer.clone(),
            discovery_url: Url::parse(&format!("{issuer}/.well-known/openid-configuration"))?,
            audiences: vec![AUDIENCE.into()],
            algorithms: vec![jsonwebtoken::Algorithm::RS256],
            identity_claim: "sub".into(),
            leeway: Duration::from_secs(60),
            jwks_min_refresh: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(3600),
        };
        let verifier = JwtVerifier::new(
            vec![cfg],
            reqwest::Client::new(),
            None,
            crate::config::RememberConfig::default(),
        );
        Ok((LoopbackIssuer { key, issuer, task }, verifier))
    }

    /// Its `iss` (and base URL).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A token for `sub`, valid for an hour, of the size of a Kubernetes service account
    /// token or an Entra app token (~1 KB).
    pub fn token(&self, sub: &str) -> anyhow::Result<Sensitive> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = json!({
            "iss": self.issuer, "sub": sub, "aud": AUDIENCE,
            "iat": now, "nbf": now, "exp": now + 3600,
            "jti": uuid::Uuid::new_v4().to_string(),
            "kubernetes.io": {"namespace": "logs", "serviceaccount": {"name": "collector",
                "uid": uuid::Uuid::new_v4().to_string()},
                "pod": {"name": "collector-7d9f8b6c5d-x2x7q", "uid": uuid::Uuid::new_v4().to_string()}},
        });
        let token = self.key.sign(&claims).map_err(anyhow::Error::msg)?;
        Ok(Sensitive::new(token))
    }
}

/// The full check of a token (signature, claims), never answered from the verifier's memory
/// of tokens it verified before.
pub async fn check_signature(v: &JwtVerifier, token: &Sensitive) -> Result<Caller, JwtError> {
    v.verify_signed(token.expose()).await.map(|v| v.caller)
}
