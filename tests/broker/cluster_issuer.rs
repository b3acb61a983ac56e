//! A Kubernetes cluster's OIDC issuer on loopback (plain http), shaped like AKS's: an issuer
//! URL with a path and a trailing slash, its discovery document and its JWKS; and projected
//! service-account tokens signed with its keys (RS256, as a cluster signs them, and ES256),
//! or with a key it does not publish. It counts the fetches of its documents and can answer
//! badly (`Behaviour`). Shared by the broker and emulator test binaries.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::IntoResponse as _;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};

/// The subject of the broker's service account token in namespace `tokenbroker`.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:tokenbroker:tokenbroker";
/// The audience AKS workload identity projects service account tokens for.
pub const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The published keys' ids.
pub const RSA_KID: &str = "cluster-rsa";
pub const EC_KID: &str = "cluster-ec";

struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

/// How the issuer answers (by default, as a cluster does).
#[derive(Clone, Copy, Default)]
pub struct Behaviour {
    /// The discovery document is a 503.
    pub unavailable: bool,
    /// The JWKS carries this many bytes of padding besides its keys.
    pub jwks_padding: usize,
    /// Discovery requests wait for `ClusterIssuer::release`.
    pub held: bool,
}

struct State {
    issuer: String,
    published: Vec<SigningKey>,
    behaviour: Behaviour,
    released: tokio::sync::watch::Sender<bool>,
    discovery_fetches: AtomicU64,
    jwks_fetches: AtomicU64,
}

pub struct ClusterIssuer {
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ClusterIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_key(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let private = rsa::RsaPrivateKey::from_pkcs8_der(pair.serialized_der()).unwrap();
    let pkcs1 = private.to_pkcs1_der().unwrap();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(pkcs1.as_bytes()),
        jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                    "n": b64(&private.n().to_bytes_be()), "e": b64(&private.e().to_bytes_be())}),
    }
}

fn ec_key(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate().unwrap();
    // Uncompressed P-256 point: 0x04 || x || y.
    let raw = pair.public_key_raw();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl ClusterIssuer {
    /// Serves `{issuer}.well-known/openid-configuration` and `{issuer}openid/v1/jwks` with
    /// one RSA and one EC key, the issuer being `http://127.0.0.1:PORT/cluster/`.
    pub async fn start() -> ClusterIssuer {
        Self::start_with(Behaviour::default()).await
    }

    /// `start`, answering as `behaviour` says.
    pub async fn start_with(behaviour: Behaviour) -> ClusterIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}/cluster/", listener.local_addr().unwrap());
        let state = Arc::new(State {
            issuer,
            published: vec![rsa_key(RSA_KID), ec_key(EC_KID)],
            behaviour,
            released: tokio::sync::watch::channel(!behaviour.held).0,
            discovery_fetches: AtomicU64::new(0),
            jwks_fetches: AtomicU64::new(0),
        });
        let (s1, s2) = (state.clone(), state.clone());
        let app = axum::Router::new()
            .route(
                "/cluster/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let s = s1.clone();
                    async move {
                        s.discovery_fetches.fetch_add(1, Ordering::SeqCst);
                        let _ = s.released.subscribe().wait_for(|r| *r).await;
                        if s.behaviour.unavailable {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        axum::Json(json!({
                            "issuer": s.issuer,
                            "jwks_uri": format!("{}openid/v1/jwks", s.issuer),
                            "response_types_supported": ["id_token"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                        }))
                        .into_response()
                    }
                }),
            )
            .route(
                "/cluster/openid/v1/jwks",
                axum::routing::get(move || {
                    let s = s2.clone();
                    async move {
                        s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                        let keys: Vec<Value> = s.published.iter().map(|k| k.jwk.clone()).collect();
                        let mut jwks = json!({ "keys": keys });
                        if s.behaviour.jwks_padding > 0 {
                            jwks["padding"] = "x".repeat(s.behaviour.jwks_padding).into();
                        }
                        axum::Json(jwks)
                    }
                }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ClusterIssuer { state, server }
    }

    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// Lets held discovery requests (and later ones) be answered.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// How often the discovery document was asked for.
    pub fn discovery_fetches(&self) -> u64 {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// How often the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// A projected service account token's claims for `subject`, valid for an hour.
    pub fn claims(&self, subject: &str) -> Value {
        let now = now();
        json!({
            "aud": [EXCHANGE_AUDIENCE],
            "iss": self.issuer(),
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "kubernetes.io": {"namespace": "tokenbroker", "serviceaccount": {"name": "tokenbroker"}},
        })
    }

    /// A service account token for `subject`, signed RS256.
    pub fn token(&self, subject: &str) -> String {
        self.sign(RSA_KID, &self.claims(subject))
    }

    /// `claims` signed with the published key `kid`.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        let key = self
            .state
            .published
            .iter()
            .find(|k| k.kid == kid)
            .expect("a published kid");
        sign(key, claims)
    }

    /// `claims` signed with an RSA key the issuer does not publish, under the id `kid`.
    pub fn sign_unpublished(&self, kid: &str, claims: &Value) -> String {
        sign(&rsa_key(kid), claims)
    }
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let mut h = Header::new(key.alg);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, claims, &key.encoding).unwrap()
}
