//! A small OpenID issuer on loopback: a discovery document and a JWKS of ES256 keys made in
//! the test, and tokens minted with any claims, header or key, good or bad.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};

struct Key {
    kid: String,
    pair: KeyPair,
}

struct State {
    base: String,
    published: Mutex<Vec<Key>>,
    jwks_fetches: AtomicU64,
    oversized: AtomicBool,
}

#[derive(Clone)]
pub struct TestIssuer {
    state: Arc<State>,
}

pub const AUDIENCE: &str = "api://tokenbroker";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn jwk(k: &Key) -> Value {
    // Uncompressed P-256 point: 0x04 || x || y.
    let raw = k.pair.public_key_raw();
    json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": k.kid,
           "x": b64(&raw[1..33]), "y": b64(&raw[33..65])})
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl TestIssuer {
    pub async fn start() -> TestIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            base: format!("http://{addr}"),
            published: Mutex::new(vec![Key {
                kid: "key-1".into(),
                pair: KeyPair::generate().unwrap(),
            }]),
            jwks_fetches: AtomicU64::new(0),
            oversized: AtomicBool::new(false),
        });
        let s1 = state.clone();
        let s2 = state.clone();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let s = s1.clone();
                    async move {
                        axum::Json(
                            json!({"issuer": s.base, "jwks_uri": format!("{}/jwks", s.base)}),
                        )
                    }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    let s = s2.clone();
                    async move {
                        s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                        let keys: Vec<Value> =
                            s.published.lock().unwrap().iter().map(jwk).collect();
                        // A key type the broker does not use must not spoil the set.
                        let mut keys = keys;
                        keys.push(json!({"kty": "OKP", "crv": "X448", "x": "AA", "kid": "odd"}));
                        let mut jwks = json!({ "keys": keys });
                        if s.oversized.load(Ordering::SeqCst) {
                            // Its keys as ever, in a document past the broker's 256 KiB.
                            jwks["padding"] = json!("x".repeat(300 * 1024));
                        }
                        axum::Json(jwks)
                    }
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestIssuer { state }
    }

    pub fn url(&self) -> String {
        self.state.base.clone()
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Whether the JWKS is served in a document larger than the broker reads.
    pub fn oversize_jwks(&self, on: bool) {
        self.state.oversized.store(on, Ordering::SeqCst);
    }

    /// Publishes a new key (rotation); returns its kid.
    pub fn rotate(&self, kid: &str) {
        self.state.published.lock().unwrap().push(Key {
            kid: kid.into(),
            pair: KeyPair::generate().unwrap(),
        });
    }

    /// Stops publishing `kid`.
    pub fn withdraw(&self, kid: &str) {
        self.state
            .published
            .lock()
            .unwrap()
            .retain(|k| k.kid != kid);
    }

    /// Standard claims for `sub`, valid for ten minutes.
    pub fn claims(&self, sub: &str) -> Value {
        let now = now();
        json!({"iss": self.url(), "sub": sub, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600})
    }

    /// Signs `claims` with the published key `kid`.
    pub fn sign_with(&self, kid: &str, claims: &Value) -> String {
        let keys = self.state.published.lock().unwrap();
        let k = keys.iter().find(|k| k.kid == kid).expect("published kid");
        sign_es256(&k.pair, kid, claims)
    }

    /// Signs `claims` with the published key `kid`, naming no key in the header.
    pub fn sign_without_kid(&self, kid: &str, claims: &Value) -> String {
        let keys = self.state.published.lock().unwrap();
        let k = keys.iter().find(|k| k.kid == kid).expect("published kid");
        let key = EncodingKey::from_ec_pem(k.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
    }

    pub fn token(&self, sub: &str) -> String {
        self.sign_with("key-1", &self.claims(sub))
    }

    /// The public key of `key-1` as PEM, what an HMAC-confusion attacker would use as secret.
    pub fn public_pem(&self) -> String {
        self.state.published.lock().unwrap()[0]
            .pair
            .public_key_pem()
    }
}

pub fn sign_es256(pair: &KeyPair, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

/// A token with a hand-made header and no signature checks on our side.
pub fn unsigned(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}
