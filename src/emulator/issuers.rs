//! Signing keys of external OpenID issuers that apps trust through federated identity
//! credentials, such as a Kubernetes cluster's OIDC issuer for AKS workload identity: the
//! issuer's discovery document (`{issuer}/.well-known/openid-configuration`) and its JWKS,
//! fetched when an assertion names the issuer, kept for a minute, each fetch bounded in time
//! and size. One fetch per issuer at a time: concurrent assertions share its outcome, and a
//! failure is remembered for a few seconds, so an unreachable issuer costs each assertion
//! nothing more than a wait for the fetch already under way.
//!
//! Only an issuer that one of the app's federated credentials names is ever fetched, over
//! https (trusting the platform roots and the emulator's own CA) or over http on a loopback
//! host, as the broker fetches its callers' issuers (`config::secure_or_loopback`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use moka::ops::compute::Op;
use serde::Deserialize;
use url::Url;

use super::error::EmulatorError;

/// How long fetched keys are used before the issuer is asked again.
const KEEP_FOR: Duration = Duration::from_secs(60);
/// An unknown `kid` fetches the keys again (the issuer may have rotated them), but not
/// sooner than this after the last fetch, so a stream of bad assertions cannot flood it.
const REFETCH_AFTER: Duration = Duration::from_secs(5);
/// How long a failed fetch is the answer for the issuer: assertions naming an issuer that
/// is down get its error at once instead of waiting for a fetch each.
const FAILURE_KEPT: Duration = Duration::from_secs(10);
/// Bound of each request to an issuer (connecting included): an issuer that does not
/// answer makes the assertion fail, never the token request hang.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the discovery document and of the JWKS, the broker's own for its callers'
/// issuers: a cluster publishes a few keys, and an issuer answering endlessly must not fill
/// the emulator's memory within the time bound.
const MAX_DOCUMENT: usize = crate::authn::jwt::MAX_ISSUER_DOCUMENT;

/// The keys of the external issuers asked so far.
pub(crate) struct ExternalIssuers {
    http: reqwest::Client,
    /// By issuer. Only issuers the configuration's federated credentials name get here, so
    /// the map is bounded by the configuration.
    known: moka::future::Cache<String, Arc<Known>>,
}

/// What the last fetches of one issuer left: its keys, from the last fetch that succeeded,
/// and a failure since then.
struct Known {
    keys: Option<(Arc<Vec<Jwk>>, Instant)>,
    failed: Option<(String, Instant)>,
}

impl Known {
    /// The answer for `kid` without asking the issuer, or `None` when it must be asked.
    fn answer(&self, kid: Option<&str>) -> Option<Result<Jwk, KeyError>> {
        let fresh = self.keys.as_ref().filter(|(_, at)| at.elapsed() < KEEP_FOR);
        if let Some(key) = fresh.and_then(|(keys, _)| find(keys, kid)) {
            return Some(Ok(key));
        }
        if let Some((why, at)) = &self.failed
            && at.elapsed() < FAILURE_KEPT
        {
            return Some(Err(KeyError::Unavailable(why.clone())));
        }
        match fresh {
            Some((_, at)) if at.elapsed() < REFETCH_AFTER => Some(Err(KeyError::NotFound)),
            _ => None,
        }
    }
}

/// Why an issuer's key could not be had.
#[derive(Debug)]
pub(crate) enum KeyError {
    /// The discovery document or the JWKS could not be fetched or read.
    Unavailable(String),
    /// The issuer's JWKS has no key with the assertion's `kid`.
    NotFound,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

impl ExternalIssuers {
    /// `ca_pem`: the emulator's CA, trusted besides the platform roots (an issuer served
    /// under the emulator's own certificate).
    pub fn new(ca_pem: &str) -> Result<Self, EmulatorError> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
            .map_err(|e| EmulatorError::Http(format!("the emulator's CA: {e}")))?;
        let http = reqwest::Client::builder()
            .tls_certs_merge([ca])
            .connect_timeout(FETCH_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            // An issuer's documents are at its own URLs; a redirect elsewhere is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenbroker-emulator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EmulatorError::Http(e.to_string()))?;
        Ok(Self {
            http,
            known: moka::future::Cache::builder().build(),
        })
    }

    /// The public key `kid` of `issuer` (without a `kid`, the issuer's only key).
    pub async fn key(&self, issuer: &str, kid: Option<&str>) -> Result<Jwk, KeyError> {
        if let Some(known) = self.known.get(issuer).await
            && let Some(answer) = known.answer(kid)
        {
            return answer;
        }
        // moka runs the computations of one key one after the other, each given what the one
        // before stored: assertions arriving during a fetch wait for it and take its outcome
        // (keys or failure) instead of fetching again.
        let mut answer = None;
        self.known
            .entry_by_ref(issuer)
            .and_compute_with(|current| {
                let before = current.map(|e| e.into_value());
                let answer = &mut answer;
                async move {
                    if let Some(known) = &before
                        && let Some(a) = known.answer(kid)
                    {
                        *answer = Some(a);
                        return Op::Nop;
                    }
                    let fetched = self.fetch(issuer).await;
                    let now = Instant::now();
                    let known = match fetched {
                        Ok(keys) => {
                            *answer = Some(find(&keys, kid).ok_or(KeyError::NotFound));
                            Known {
                                keys: Some((Arc::new(keys), now)),
                                failed: None,
                            }
                        }
                        Err(why) => {
                            *answer = Some(Err(KeyError::Unavailable(why.clone())));
                            Known {
                                // Keys still fresh serve the kids they have.
                                keys: before.and_then(|b| b.keys.clone()),
                                failed: Some((why, now)),
                            }
                        }
                    };
                    Op::Put(Arc::new(known))
                }
            })
            .await;
        // The computation always runs, and sets the answer on every path.
        answer.unwrap_or(Err(KeyError::NotFound))
    }

    /// Forgets every fetched key and remembered failure (`POST /reset`).
    pub fn clear(&self) {
        self.known.invalidate_all();
    }

    async fn fetch(&self, issuer: &str) -> Result<Vec<Jwk>, String> {
        let issuer_url = fetchable(issuer).map_err(|why| format!("the issuer URL {why}"))?;
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            issuer_url.as_str().trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&discovery_url).await?;
        // OpenID Connect Discovery: the document names exactly the issuer it was fetched for.
        if discovery.issuer != issuer {
            return Err(format!(
                "{discovery_url} names issuer '{}', not '{issuer}'",
                discovery.issuer
            ));
        }
        let jwks_uri = fetchable(&discovery.jwks_uri).map_err(|why| format!("jwks_uri {why}"))?;
        let raw: RawJwks = self.get_json(jwks_uri.as_str()).await?;
        // Keys that cannot verify a signature (secrets, encryption keys, unknown types) are
        // skipped, not fatal.
        Ok(raw
            .keys
            .into_iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
            .filter(|k| {
                matches!(
                    k.algorithm,
                    AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
                )
            })
            .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
            .collect())
    }

    /// A JSON document of at most `MAX_DOCUMENT` bytes, read as it arrives so a larger one
    /// is refused without being held.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", crate::outbound::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let body = crate::outbound::body_within(resp, MAX_DOCUMENT)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not the expected JSON ({e})"))
    }
}

/// `s` as a URL the emulator fetches: https, or http on a loopback host.
fn fetchable(s: &str) -> Result<Url, String> {
    let u = Url::parse(s).map_err(|e| format!("'{s}' is not a URL ({e})"))?;
    if crate::config::secure_or_loopback(&u) {
        Ok(u)
    } else {
        Err(format!(
            "'{s}' is neither https nor http on a loopback host"
        ))
    }
}

fn find(keys: &[Jwk], kid: Option<&str>) -> Option<Jwk> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

/// Whether `signing_input` carries `signature` (base64url) by `key` with `alg` (RS256,
/// PS256 or ES256, and the key's own `alg` when it names one).
pub(crate) fn verify(key: &Jwk, alg: &str, signing_input: &[u8], signature: &str) -> bool {
    let algorithm = match alg {
        "RS256" => jsonwebtoken::Algorithm::RS256,
        "PS256" => jsonwebtoken::Algorithm::PS256,
        "ES256" => jsonwebtoken::Algorithm::ES256,
        _ => return false,
    };
    if key
        .common
        .key_algorithm
        .as_ref()
        .is_some_and(|a| a.to_string() != alg)
    {
        return false;
    }
    let Ok(decoding) = jsonwebtoken::DecodingKey::from_jwk(key) else {
        return false;
    };
    // A key of another family than `alg`'s is an error here: no signature.
    jsonwebtoken::crypto::verify(signature, signing_input, &decoding, algorithm).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_issuers_are_fetched() {
        assert!(fetchable("https://oidc.prod-aks.azure.com/tenant/cluster/").is_ok());
        assert!(fetchable("http://127.0.0.1:8080/cluster/").is_ok());
        assert!(fetchable("http://localhost:8080").is_ok());
        assert!(fetchable("http://issuer.example").is_err());
        assert!(fetchable("ftp://127.0.0.1/").is_err());
        assert!(fetchable("not a url").is_err());
    }
}
