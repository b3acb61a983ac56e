//! Fast in-memory upstreams for measuring the broker's own costs (memory per cached token,
//! micro benchmarks): a `Signer` that returns a fixed signature and a `TokenExchange` that
//! returns a fresh random token of a given size. Also timing and counting wrappers around
//! real upstreams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use url::Url;

use crate::config::SigningAlgorithm;
use crate::entra::{EntraError, EntraToken, ExchangeRequest, TokenExchange};
use crate::sensitive::Sensitive;
use crate::signer::{CertificateInfo, KeyRef, Signer, SignerError};

/// Answers at once: fixed certificate metadata and a 256-byte signature.
#[derive(Debug, Default)]
pub struct FakeSigner;

#[async_trait]
impl Signer for FakeSigner {
    async fn certificate(
        &self,
        vault_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError> {
        Ok(CertificateInfo {
            x5t: "bench-x5t-aaaaaaaaaaaaaaaaaaaaaaa".into(),
            x5t_s256: "bench-x5t-s256-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            key: KeyRef {
                vault_url: vault_url.clone(),
                name: name.to_owned(),
                version: "0123456789abcdef0123456789abcdef".into(),
            },
            version: "0123456789abcdef0123456789abcdef".into(),
            not_after: None,
        })
    }

    async fn sign(
        &self,
        _key: &KeyRef,
        _algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        let mut sig = vec![0u8; 256];
        sig[..32].copy_from_slice(&digest);
        Ok(sig)
    }
}

/// Answers at once with a new random JWT-shaped token of `token_bytes` characters.
#[derive(Debug)]
pub struct FakeExchange {
    pub token_bytes: usize,
    pub lifetime: Duration,
}

impl Default for FakeExchange {
    fn default() -> Self {
        FakeExchange {
            token_bytes: 1536,
            lifetime: Duration::from_secs(3600),
        }
    }
}

/// A random base64url string of exactly `len` characters, shaped like a JWT.
pub fn random_token(len: usize) -> String {
    let mut raw = vec![0u8; len * 3 / 4 + 3];
    rand::rng().fill_bytes(&mut raw);
    let mut s = String::with_capacity(len + 4);
    s.push_str("eyJ");
    URL_SAFE_NO_PAD.encode_string(&raw, &mut s);
    s.truncate(len);
    s
}

#[async_trait]
impl TokenExchange for FakeExchange {
    async fn exchange(&self, _req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        Ok(EntraToken {
            access_token: Sensitive::new(random_token(self.token_bytes)),
            token_type: "Bearer",
            expires_in: self.lifetime,
            refresh_in: None,
        })
    }
}

/// Which upstream call a `Call` timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Certificate,
    Sign,
    Exchange,
}

/// One upstream call, timed at the seam.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub upstream: Upstream,
    pub start: Instant,
    pub end: Instant,
}

impl Call {
    pub fn took(&self) -> Duration {
        self.end.saturating_duration_since(self.start)
    }
}

/// The upstream calls made through the timing wrappers since it was last taken.
#[derive(Debug, Default)]
pub struct Calls(Mutex<Vec<Call>>);

impl Calls {
    fn record(&self, upstream: Upstream, start: Instant) {
        let call = Call {
            upstream,
            start,
            end: Instant::now(),
        };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }

    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Records every call of the wrapped signer in `calls`.
#[derive(Debug)]
pub struct TimedSigner {
    pub inner: Arc<dyn Signer>,
    pub calls: Arc<Calls>,
}

#[async_trait]
impl Signer for TimedSigner {
    async fn certificate(
        &self,
        vault_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError> {
        let t = Instant::now();
        let r = self.inner.certificate(vault_url, name).await;
        self.calls.record(Upstream::Certificate, t);
        r
    }

    async fn sign(
        &self,
        key: &KeyRef,
        algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        let t = Instant::now();
        let r = self.inner.sign(key, algorithm, digest).await;
        self.calls.record(Upstream::Sign, t);
        r
    }
}

/// Records every call of the wrapped exchange in `calls`, and counts calls per key
/// (token endpoint and scope).
#[derive(Debug)]
pub struct TimedExchange {
    pub inner: Arc<dyn TokenExchange>,
    pub calls: Arc<Calls>,
    pub per_key: Arc<Mutex<HashMap<String, u64>>>,
}

#[async_trait]
impl TokenExchange for TimedExchange {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        let key = format!("{} {}", req.token_endpoint, req.scope);
        *self
            .per_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
        let t = Instant::now();
        let r = self.inner.exchange(req).await;
        self.calls.record(Upstream::Exchange, t);
        r
    }
}
