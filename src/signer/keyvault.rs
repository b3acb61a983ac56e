//! Azure Key Vault signer through the official SDK crates: certificate metadata from
//! `azure_security_keyvault_certificates`, digest signing from `azure_security_keyvault_keys`.
//! Challenge-resource verification stays on (the SDK default).

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::ClientOptions;
use azure_security_keyvault_certificates::models::CertificateClientGetCertificateOptions;
use azure_security_keyvault_certificates::{CertificateClient, CertificateClientOptions};
use azure_security_keyvault_keys::models::{
    KeyClientSignOptions, SignParameters, SignatureAlgorithm,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceId};
use url::Url;

use super::{CertificateInfo, KeyRef, Signer, SignerError};
use crate::config::SigningAlgorithm;

pub const SERVICE: &str = "Key Vault";

/// Signs with Key Vault keys using the broker's managed identity.
pub struct KeyVaultSigner {
    credential: Arc<dyn TokenCredential>,
    client_options: ClientOptions,
    clients: Mutex<HashMap<String, Clients>>,
}

#[derive(Clone)]
struct Clients {
    keys: Arc<KeyClient>,
    certificates: Arc<CertificateClient>,
    keys_challenge: Arc<Challenge>,
    certificates_challenge: Arc<Challenge>,
}

/// How long a request waits for its client's first request to learn the vault's challenge
/// before it goes on without: a first request that hangs must not hold the others (nor a
/// retry asked beside it) for its whole budget.
const CHALLENGE_WAIT: Duration = Duration::from_secs(2);

/// An SDK client learns the vault's sign-in scope from the 401 challenge that answers its
/// first request, sent without a token; until one has come back, each request it sends is
/// such a probe. So that a cold burst (many tenants of one vault at start-up) costs the vault
/// one 401 per client rather than one per request, a client's requests wait for its first
/// one (at most `CHALLENGE_WAIT`).
#[derive(Default)]
struct Challenge {
    /// A request of the client has ended: the scope is known, or the next request probes.
    answered: AtomicBool,
    first: tokio::sync::Mutex<()>,
}

impl Challenge {
    async fn through<T>(&self, call: impl Future<Output = T>) -> T {
        if self.answered.load(Ordering::Acquire) {
            return call.await;
        }
        let first = tokio::time::timeout(CHALLENGE_WAIT, self.first.lock()).await;
        if self.answered.load(Ordering::Acquire) {
            // Answered while this one waited: the waiters go on together.
            drop(first);
            return call.await;
        }
        // The first (or the first since one that had to give up), held until it is answered.
        let out = call.await;
        self.answered.store(true, Ordering::Release);
        out
    }
}

impl std::fmt::Debug for KeyVaultSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultSigner").finish_non_exhaustive()
    }
}

impl KeyVaultSigner {
    pub fn new(credential: Arc<dyn TokenCredential>, client_options: ClientOptions) -> Self {
        KeyVaultSigner {
            credential,
            client_options,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// One pair of SDK clients per vault, reused so their bearer-token caches are too.
    fn clients(&self, vault_url: &Url) -> Result<Clients, SignerError> {
        let key = vault_url.as_str().to_owned();
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let keys = KeyClient::new(
            vault_url.as_str(),
            self.credential.clone(),
            Some(KeyClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            other(format!(
                "cannot create a Key Vault client for {vault_url}: {e}"
            ))
        })?;
        let certificates = CertificateClient::new(
            vault_url.as_str(),
            self.credential.clone(),
            Some(CertificateClientOptions {
                client_options: self.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| {
            other(format!(
                "cannot create a Key Vault client for {vault_url}: {e}"
            ))
        })?;
        let c = Clients {
            keys: Arc::new(keys),
            certificates: Arc::new(certificates),
            keys_challenge: Arc::default(),
            certificates_challenge: Arc::default(),
        };
        map.insert(key, c.clone());
        Ok(c)
    }
}

#[async_trait]
impl Signer for KeyVaultSigner {
    async fn certificate(
        &self,
        vault_url: &Url,
        name: &str,
    ) -> Result<CertificateInfo, SignerError> {
        let clients = self.clients(vault_url)?;
        let cert = clients
            .certificates_challenge
            .through(clients.certificates.get_certificate(
                name,
                Some(CertificateClientGetCertificateOptions::default()),
            ))
            .await
            .map_err(|e| classify(e, &format!("certificate {name}")))?
            .into_model()
            .map_err(|e| unreadable(&format!("certificate {name}"), &e))?;
        let cer = cert
            .cer
            .ok_or_else(|| incomplete(&format!("certificate {name}"), "public part (cer)"))?;
        let kid = cert
            .kid
            .ok_or_else(|| incomplete(&format!("certificate {name}"), "key id (kid)"))?;
        let rid = ResourceId::from_str(&kid)
            .map_err(|e| other(format!("certificate {name} has an unreadable kid: {e}")))?;
        let version = rid
            .version
            .ok_or_else(|| other(format!("certificate {name}'s kid has no version")))?;
        if cert.attributes.as_ref().and_then(|a| a.enabled) == Some(false) {
            return Err(SignerError::NotFound {
                service: SERVICE,
                what: format!("an enabled version of certificate {name}"),
                code: "CertificateDisabled".into(),
                message: "the current version is disabled".into(),
            });
        }
        let not_after =
            cert.attributes.as_ref().and_then(|a| a.expires).map(|t| {
                std::time::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
            });
        let key = KeyRef {
            vault_url: vault_url.clone(),
            name: rid.name,
            version,
        };
        Ok(CertificateInfo::of_der(&cer, key, not_after))
    }

    async fn sign(
        &self,
        key: &KeyRef,
        algorithm: SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        let clients = self.clients(&key.vault_url)?;
        let params = SignParameters {
            algorithm: Some(match algorithm {
                SigningAlgorithm::RS256 => SignatureAlgorithm::Rs256,
                SigningAlgorithm::PS256 => SignatureAlgorithm::Ps256,
            }),
            value: Some(digest.to_vec()),
        };
        let body = params
            .try_into()
            .map_err(|e: azure_core::Error| other(format!("cannot encode sign request: {e}")))?;
        let result = clients
            .keys_challenge
            .through(clients.keys.sign(
                &key.name,
                body,
                Some(KeyClientSignOptions {
                    key_version: Some(key.version.clone()),
                    ..Default::default()
                }),
            ))
            .await
            .map_err(|e| classify(e, &format!("key {}/{}", key.name, key.version)))?
            .into_model()
            .map_err(|e| unreadable("sign", &e))?;
        result
            .result
            .filter(|s| !s.is_empty())
            .ok_or_else(|| incomplete("sign", "signature (value)"))
    }
}

/// An unexpected failure; its message may quote the SDK (a response it could not read), so
/// it is bounded like Key Vault's own.
fn other(message: String) -> SignerError {
    SignerError::Other {
        service: SERVICE,
        message: bounded(&message),
    }
}

/// A success whose body is not what Key Vault sends (a proxy's or captive portal's page
/// with 200, a body cut short): like a non-Key-Vault error body, retried rather than
/// remembered as the configuration's fault. The parser's message names a position only.
fn unreadable(what: &str, e: &azure_core::Error) -> SignerError {
    SignerError::Unavailable {
        service: SERVICE,
        message: bounded(&format!(
            "unreadable answer for {what} (HTTP 200): not Key Vault's, a proxy or gateway may have answered ({})",
            root_message(e)
        )),
        retry_after: None,
        throttled: false,
    }
}

/// A success whose JSON lacks what every Key Vault answer of its kind has (`{}` or a
/// gateway's own JSON with 200): as `unreadable`, not Key Vault's verdict.
fn incomplete(what: &str, field: &str) -> SignerError {
    SignerError::Unavailable {
        service: SERVICE,
        message: format!(
            "answer for {what} (HTTP 200) has no {field}: not Key Vault's, a proxy or gateway may have answered"
        ),
        retry_after: None,
        throttled: false,
    }
}

/// The most of an upstream's message passed on: it reaches callers' statuses, logs, audit
/// records and watchers.
const MESSAGE_LIMIT: usize = 500;

/// The code of a permanent redirect in Key Vault's or the identity endpoint's place
/// (`SignerError::Configuration`).
pub const REDIRECT: &str = "Redirect";

/// The longest error code passed on; Key Vault's are short words (`KeyNotFound`).
const CODE_LIMIT: usize = 64;

/// `classify`, for other modules' tests.
#[cfg(test)]
pub(crate) fn classify_for_tests(e: azure_core::Error) -> SignerError {
    classify(e, "key k/v")
}

/// Maps an SDK error to the broker's classification, keeping Key Vault's own error code.
fn classify(e: azure_core::Error, what: &str) -> SignerError {
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let status = u16::from(*status);
            let retry_after = raw_response.as_ref().and_then(|r| retry_after(r.headers()));
            // The SDK's own message is "{status}: {whole body}" when the body is not JSON:
            // only Key Vault's error body is quoted. Anything else is a proxy's or gateway's
            // page, which could echo the request (the managed identity's bearer token) and be
            // of any size; it is not Key Vault's verdict either, so it is retried (behind the
            // breaker) rather than remembered as the configuration's fault.
            // Key Vault's id of the request, for an operator to quote to Microsoft support.
            let request_id = raw_response.as_ref().and_then(|r| request_id(r.headers()));
            let Some((answer, message)) = raw_response
                .as_ref()
                .and_then(|r| service_error(r.body()))
                .map(|a| {
                    let m = match &request_id {
                        Some(id) => format!("{} (x-ms-request-id {id})", a.message),
                        None => a.message.clone(),
                    };
                    (a, m)
                })
            else {
                return SignerError::Unavailable {
                    service: SERVICE,
                    message: format!(
                        "HTTP {status} without a Key Vault error in the body: a proxy or gateway may have answered"
                    ),
                    retry_after,
                    throttled: false,
                };
            };
            // The inner code tells apart what a 403 (always `Forbidden`) refuses for: a
            // missing role (`ForbiddenByRbac`), the vault's firewall (`ForbiddenByFirewall`),
            // a disabled key (`KeyDisabled`). The body's own code before the SDK's, which
            // is the status when the SDK cannot read the body (it reads no message with
            // escapes, and Key Vault's RBAC refusals have `\r\n`).
            let said = answer.message.clone();
            let code = [answer.inner, answer.code]
                .into_iter()
                .find(|c| !c.is_empty())
                .or_else(|| error_code.as_deref().map(bounded_code))
                .unwrap_or_default();
            match status {
                // The version is there but disabled, or outside its validity (Key Vault
                // refuses to sign with an expired key): as the certificate's current version
                // disabled (`certificate`), and re-read as a key gone is, in case a new
                // version replaced it.
                403 if unusable_version(&code) || outside_validity(&code, &said) => {
                    SignerError::NotFound {
                        service: SERVICE,
                        what: format!("an enabled version of {what}"),
                        code,
                        message,
                    }
                }
                401 | 403 => SignerError::Forbidden {
                    service: SERVICE,
                    status,
                    code,
                    message,
                },
                404 => SignerError::NotFound {
                    service: SERVICE,
                    what: what.to_owned(),
                    code,
                    message,
                },
                408 | 429 | 500..=599 => SignerError::Unavailable {
                    service: SERVICE,
                    message: format!("HTTP {status} {code}: {message}"),
                    retry_after,
                    throttled: status == 429,
                },
                // Any other refusal (400 BadParameter: a key whose type does not fit the
                // algorithm) is the configuration's, however often it is asked.
                _ => SignerError::Configuration {
                    service: SERVICE,
                    code,
                    message: format!("HTTP {status}: {message}"),
                },
            }
        }
        // The broker's own identity's failure, an answer over its bound included (the
        // endpoint's or Entra's, not Key Vault's).
        ErrorKind::Credential => identity_failure(&e),
        // A 401 without Key Vault's bearer challenge (`outbound::RefusedTokens`): not Key
        // Vault's, retried behind its breaker as a page in its place is.
        _ if let Some(
            not_kv @ crate::outbound::OutboundError::NotKeyVaultsChallenge { retry_after, .. },
        ) = crate::outbound::not_key_vaults_challenge(&e) =>
        {
            SignerError::Unavailable {
                service: SERVICE,
                message: not_kv.to_string(),
                retry_after: *retry_after,
                throttled: false,
            }
        }
        // A redirect in Key Vault's place (`outbound::NotFollowed`): a temporary one is a
        // proxy's, retried as its pages are; a permanent one says vault_url is not a vault's.
        _ if let Some(r @ crate::outbound::OutboundError::Redirect { retry_after, .. }) =
            crate::outbound::redirect(&e) =>
        {
            if r.is_permanent_redirect() {
                SignerError::Configuration {
                    service: SERVICE,
                    code: REDIRECT.into(),
                    message: r.to_string(),
                }
            } else {
                SignerError::Unavailable {
                    service: SERVICE,
                    message: r.to_string(),
                    retry_after: *retry_after,
                    throttled: false,
                }
            }
        }
        // An answer longer than Key Vault ever sends (`outbound::Bounded`): a page in its
        // place, retried as the others are.
        _ if crate::outbound::over_bound(&e) => SignerError::Unavailable {
            service: SERVICE,
            message: root_message(&e),
            retry_after: None,
            throttled: false,
        },
        ErrorKind::Connection | ErrorKind::Io => SignerError::Unavailable {
            service: SERVICE,
            message: crate::outbound::with_dns_hint(root_message(&e)),
            retry_after: None,
            throttled: false,
        },
        _ => challenge_mismatch(&root_message(&e)).unwrap_or_else(|| other(root_message(&e))),
    }
}

/// The SDK's refusal (before any token is sent) of a vault whose host is not under the
/// resource Key Vault's challenge names (`vault.azure.net`): the vault was named otherwise
/// than by its own name (an address, its private endpoint's `privatelink` name, an alias).
/// The operator's to fix in `vault_url`; the SDK's own words advise an option of its client
/// that the broker keeps on. Recognised by those words (`azure_security_keyvault_keys`
/// 1.0's `KeyVaultAuthorizer`).
fn challenge_mismatch(message: &str) -> Option<SignerError> {
    let (_, rest) = message.split_once("challenge resource '")?;
    let (scope, rest) = rest.split_once('\'')?;
    let (_, rest) = rest.split_once("doesn't match the requested domain '")?;
    let (host, _) = rest.split_once('\'')?;
    let resource = scope.trim_end_matches("/.default");
    let domain = resource.trim_start_matches("https://");
    Some(SignerError::Configuration {
        service: SERVICE,
        code: "ChallengeResourceMismatch".into(),
        message: bounded(&format!(
            "the vault answered as one of {resource}, and the vault_url's host {host} is not under {domain}: name the vault by its own name in vault_url (https://NAME.{domain}, which resolves to its private endpoint through the privatelink DNS zone), not by an address, its private endpoint's name or an alias"
        )),
    })
}

/// Whether Key Vault's (inner) error code says the version asked for is there but may not be
/// used: disabled (`KeyDisabled`, `CertificateDisabled`), expired or not yet valid (worded as
/// its secrets' `SecretExpired`).
pub fn unusable_version(code: &str) -> bool {
    ["Disabled", "Expired", "NotYetValid"]
        .iter()
        .any(|s| code.ends_with(s))
}

/// Whether Key Vault's 403 says the version is outside its validity by its words alone
/// (`Operation sign is not allowed on an expired key.`), its inner code missing: Key Vault's
/// documented inner code for this is its secrets' (`SecretExpired`); for a key's it is not
/// documented, so a refusal without one is told apart from a missing role by its message.
pub fn outside_validity(code: &str, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    matches!(code, "Forbidden" | "")
        && m.contains("not allowed")
        && (m.contains("expired") || m.contains("not yet valid"))
}

/// The `x-ms-request-id` Key Vault gives every answer, if it looks like one (an id, not
/// text a proxy put there).
fn request_id(headers: &azure_core::http::headers::Headers) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.as_str().eq_ignore_ascii_case("x-ms-request-id"))
        .map(|(_, v)| v.as_str())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= CODE_LIMIT
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .map(str::to_owned)
}

/// The broker's own credential failed. Entra's answer to its workload identity
/// (`outbound::entra_answer`) is classified as the answers to the broker's own exchanges
/// are, by status, OAuth `error` and codes: a refusal of the broker's configuration (a 4xx
/// with a code of configuration or an unknown one), or of the Key Vault scope it asked for
/// (no caller can change that), is for good; throttling and outages (408, 429, 5xx whatever
/// code their page carries, `temporarily_unavailable`), a token outside its time window or a
/// key Entra has not fetched yet are retried. So is every failure without Entra's answer
/// (the managed identity endpoint, the network, the token file), but the endpoint's refusal
/// of the identity (400, 401, 403), as for a tenant's managed identity
/// (`identity::identity_error`): the host's setup, not an outage.
fn identity_failure(e: &azure_core::Error) -> SignerError {
    use crate::entra::EntraErrorClass::{Caller, Configuration};
    match crate::outbound::entra_answer(e) {
        Some(answer) if matches!(answer.class, Configuration | Caller) => {
            SignerError::IdentityRefused(Box::new(answer.clone()))
        }
        Some(answer) => SignerError::Identity {
            message: bounded(&answer.to_string()),
            retry_after: answer.retry_after,
        },
        // The endpoint's address redirecting for good: no managed identity endpoint there.
        None if crate::outbound::redirect(e).is_some_and(|r| r.is_permanent_redirect()) => {
            SignerError::Configuration {
                service: crate::outbound::IDENTITY_ENDPOINT,
                code: REDIRECT.into(),
                message: root_message(e),
            }
        }
        None => match endpoint_refusal(e) {
            Some(refusal) => SignerError::IdentityNotAssigned {
                status: refusal.status,
                message: root_message(e),
                unnamed: refusal.unnamed,
            },
            _ => SignerError::Identity {
                message: root_message(e),
                retry_after: answered_retry_after(e),
            },
        },
    }
}

/// The managed identity endpoint's refusal of the identity asked for (`endpoint_refusal`).
pub(crate) struct EndpointRefusal {
    pub status: u16,
    /// The host has several user-assigned identities and the request named none (IMDS's
    /// "Multiple user assigned identities exist"): one must be named, not corrected.
    pub unnamed: bool,
}

/// The managed identity endpoint's refusal under `e`: a 400, 401 or 403 with the endpoint's
/// own JSON error (`outbound::endpoint_error`). The same status with any other body (a
/// proxy's or gateway's page) is no verdict on the identity: `None`, retried as an outage.
pub(crate) fn endpoint_refusal(e: &azure_core::Error) -> Option<EndpointRefusal> {
    let (status, answer) = answered(e)?;
    if !matches!(status, 400 | 401 | 403) {
        return None;
    }
    let description = crate::outbound::endpoint_error(status, answer?.body())?;
    Some(EndpointRefusal {
        status,
        unnamed: description.contains("Multiple user assigned identities"),
    })
}

/// The retry hint of an answer under `e` (the managed identity endpoint's 429, say).
pub(crate) fn answered_retry_after(e: &azure_core::Error) -> Option<Duration> {
    if let Some(crate::outbound::OutboundError::Redirect { retry_after, .. }) =
        crate::outbound::redirect(e)
    {
        return *retry_after;
    }
    answered(e).and_then(|(_, r)| r.and_then(|r| retry_after(r.headers())))
}

/// The first answer under `e`: its status, and the answer itself if the SDK kept it.
fn answered(e: &azure_core::Error) -> Option<(u16, Option<&azure_core::http::RawResponse>)> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(ErrorKind::HttpResponse {
            status,
            raw_response,
            ..
        }) = c.downcast_ref::<azure_core::Error>().map(|e| e.kind())
        {
            return Some((u16::from(*status), raw_response.as_deref()));
        }
        cause = c.source();
    }
    None
}

/// Key Vault's error body, `{"error":{"code","message","innererror":{"code"}}}`, its fields
/// bounded (codes that are no word of Key Vault's are empty).
struct ServiceError {
    code: String,
    inner: String,
    message: String,
}

/// Key Vault's error in `body`; `None` for any other body.
fn service_error(body: &[u8]) -> Option<ServiceError> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = v.get("error")?;
    let message = error.get("message")?.as_str()?;
    let code_of = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.get("code")?.as_str())
            .map(bounded_code)
            .unwrap_or_default()
    };
    Some(ServiceError {
        code: code_of(Some(error)),
        inner: code_of(error.get("innererror").or_else(|| error.get("innerError"))),
        message: bounded(message),
    })
}

/// `s` cut to `MESSAGE_LIMIT` characters.
fn bounded(s: &str) -> String {
    s.chars().take(MESSAGE_LIMIT).collect()
}

/// An error code as Key Vault words them, else nothing: the code can come from a header a
/// proxy set.
fn bounded_code(code: &str) -> String {
    let word = !code.is_empty()
        && code.len() <= CODE_LIMIT
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if word { code.to_owned() } else { String::new() }
}

fn retry_after(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    crate::resilience::retry_after(
        |name| {
            headers
                .iter()
                .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str().to_owned())
        },
        std::time::SystemTime::now(),
    )
}

/// The innermost error message: `azure_core` nests the useful text under its own context.
pub(crate) fn root_message(e: &azure_core::Error) -> String {
    bounded(&crate::outbound::root_cause(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::headers::Headers;
    use azure_core::http::{RawResponse, StatusCode};
    use std::sync::atomic::AtomicUsize;

    /// Requests through `challenge` that record how many have started, each answered when
    /// `answer` is notified (one permit each).
    fn requests(
        challenge: &Arc<Challenge>,
        n: usize,
        started: &Arc<AtomicUsize>,
        answer: &Arc<tokio::sync::Semaphore>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let (challenge, started, answer) =
                    (challenge.clone(), started.clone(), answer.clone());
                tokio::spawn(async move {
                    challenge
                        .through(async {
                            started.fetch_add(1, Ordering::SeqCst);
                            answer.acquire().await.unwrap().forget();
                        })
                        .await
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_requests_wait_for_its_first_then_go_together() {
        let challenge = Arc::new(Challenge::default());
        let started = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let tasks = requests(&challenge, 10, &started, &answer);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1, "only the first is sent");
        // The first answered: the nine others are all sent at once, none after another.
        answer.add_permits(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(started.load(Ordering::SeqCst), 10);
        answer.add_permits(9);
        for t in tasks {
            t.await.unwrap();
        }
        // Later requests do not wait at all.
        let later = requests(&challenge, 3, &started, &answer);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(started.load(Ordering::SeqCst), 13);
        answer.add_permits(3);
        for t in later {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_that_hangs_holds_the_others_for_a_bounded_time_only() {
        let challenge = Arc::new(Challenge::default());
        let started = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let tasks = requests(&challenge, 5, &started, &answer);
        tokio::time::sleep(CHALLENGE_WAIT - Duration::from_millis(100)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            5,
            "the others went on without"
        );
        answer.add_permits(5);
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_given_up_passes_the_probe_to_the_next() {
        let challenge = Arc::new(Challenge::default());
        let started = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let first = requests(&challenge, 1, &started, &answer);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let others = requests(&challenge, 4, &started, &answer);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // The first is dropped (its budget spent): one of the others is sent, alone.
        first[0].abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(started.load(Ordering::SeqCst), 2);
        answer.add_permits(4);
        for t in others {
            t.await.unwrap();
        }
        assert_eq!(started.load(Ordering::SeqCst), 5);
    }

    /// The SDK's error for an answer of `status` with `body`, built as `azure_core` does.
    fn answer(status: u16, code: Option<&str>, body: &str) -> azure_core::Error {
        let mut headers = Headers::new();
        headers.insert("retry-after", "7");
        headers.insert("x-ms-request-id", "5e1b7c1a-0b8e-4c1e-9d7e-3f2a1b0c9d8e");
        azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status: StatusCode::from(status),
                error_code: code.map(str::to_owned),
                raw_response: Some(Box::new(RawResponse::from_bytes(
                    StatusCode::from(status),
                    headers,
                    body.to_owned(),
                ))),
            },
            format!("{status}: {body}"),
        )
    }

    #[test]
    fn a_body_that_is_not_key_vaults_is_not_quoted_and_is_retried() {
        let page = format!(
            "<html>Access denied. Your request: Authorization: Bearer eyJmi-token {}</html>",
            "x".repeat(1 << 20)
        );
        for status in [400, 401, 403, 404, 413, 502] {
            let e = classify(answer(status, Some(&status.to_string()), &page), "key k/v");
            let text = e.to_string();
            assert!(
                matches!(&e, SignerError::Unavailable { retry_after, .. } if *retry_after == Some(Duration::from_secs(7))),
                "{status}: {e:?}"
            );
            assert!(!text.contains("eyJ") && !text.contains("html"), "{text}");
            assert!(
                text.contains(&format!("HTTP {status} without a Key Vault error")),
                "{text}"
            );
        }
        // Empty, or JSON that is not Key Vault's error.
        for body in [
            "",
            r#"{"message":"eyJmi-token"}"#,
            r#"{"error":"eyJmi-token"}"#,
        ] {
            let e = classify(answer(403, None, body), "key k/v");
            assert!(
                matches!(e, SignerError::Unavailable { .. }),
                "{body}: {e:?}"
            );
            assert!(!e.to_string().contains("eyJ"), "{e}");
        }
    }

    /// What a Key Vault client returns when Entra answers the broker's workload identity
    /// `status` with `body`: the credential's error carrying Entra's answer
    /// (`outbound::EntraAnswers`), under the context the SDK's pipeline adds.
    fn identity_answered(status: u16, body: &str) -> azure_core::Error {
        azure_core::Error::new(
            ErrorKind::Credential,
            crate::entra::answer_to_sdk(status, body.as_bytes(), None),
        )
        .with_context("non-transport error occurred which will not be retried")
    }

    #[test]
    fn an_identity_entra_refuses_for_its_configuration_is_told_apart_from_one_unavailable() {
        let entra = |error: &str, code: u32| {
            format!(
                r#"{{"error":"{error}","error_description":"AADSTS{code}: Entra's words.","error_codes":[{code}]}}"#
            )
        };
        // Refusals (4xx) with a code of configuration, one not listed, or of the Key Vault
        // scope the broker asked for: for good.
        for (status, body) in [
            (400, entra("invalid_client", 700213)),
            (401, entra("invalid_client", 7002138)),
            (400, entra("invalid_request", 9_999_999)),
            (400, entra("invalid_resource", 500011)),
        ] {
            let e = classify(identity_answered(status, &body), "key k/v");
            assert!(
                matches!(&e, SignerError::IdentityRefused(a) if a.status == status),
                "{status} {body}: {e:?}"
            );
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("Entra's words"), "{e}");
        }
        // Throttling and outages, whatever code their page carries; a token outside its
        // window; a page not Entra's: retried.
        for (status, body) in [
            (500, entra("server_error", 50000)),
            (503, entra("server_error", 9_999_999)),
            (504, entra("", 700213)),
            (429, entra("invalid_request", 9_999_999)),
            (408, entra("invalid_request", 9_999_999)),
            (400, entra("temporarily_unavailable", 9_999_999)),
            (400, entra("invalid_client", 700024)),
            (400, "{}".to_owned()),
            (502, "<html>bad gateway</html>".to_owned()),
        ] {
            let e = classify(identity_answered(status, &body), "key k/v");
            assert!(
                matches!(&e, SignerError::Identity { message, .. } if message.contains(&format!("Entra ID answered {status}"))),
                "{status} {body}: {e:?}"
            );
        }
        // No answer of Entra's under it (the managed identity endpoint's, whatever its text
        // says): its refusal of the identity (400, 401, 403) is the host's setup, for good;
        // its other answers and the network's failures are retried, in the SDK's words.
        let imds = |status: u16| {
            azure_core::Error::with_error(
                ErrorKind::Credential,
                answer(
                    status,
                    None,
                    r#"{"error":"invalid_request","error_description":"AADSTS700213 Identity not found"}"#,
                ),
                "ManagedIdentityCredential authentication failed. Identity not found AADSTS700213",
            )
        };
        for status in [400, 401, 403] {
            let e = classify(imds(status), "key k/v");
            assert!(
                matches!(&e, SignerError::IdentityNotAssigned { status: s, .. } if *s == status),
                "{status}: {e:?}"
            );
            assert!(!crate::flow::FlowError::Signer(e.clone()).is_retryable());
            assert!(crate::flow::FlowError::Signer(e).is_persistent());
        }
        for e in [
            imds(404),
            imds(500),
            azure_core::Error::with_message(ErrorKind::Credential, "connection refused"),
        ] {
            let e = classify(e, "key k/v");
            assert!(matches!(&e, SignerError::Identity { .. }), "{e:?}");
            assert!(crate::flow::FlowError::Signer(e).is_retryable());
        }
    }

    #[test]
    fn an_identity_throttled_passes_the_answers_retry_hint_to_the_brokers_retries() {
        // Entra's 429 to the workload identity, with its `Retry-After`.
        let entra = azure_core::Error::new(
            ErrorKind::Credential,
            crate::entra::answer_to_sdk(
                429,
                br#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: slow down.","error_codes":[50196]}"#,
                Some(Duration::from_secs(12)),
            ),
        );
        // The managed identity endpoint's 429 (`answer` sends `retry-after: 7`).
        let endpoint = azure_core::Error::with_error(
            ErrorKind::Credential,
            answer(429, None, "Too many requests"),
            "ManagedIdentityCredential authentication failed. The request failed: Too many requests",
        );
        for (e, hint) in [(entra, 12), (endpoint, 7)] {
            let e = crate::flow::FlowError::Signer(classify(e, "key k/v"));
            assert!(e.is_retryable(), "{e:?}");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(hint)), "{e:?}");
        }
    }

    #[test]
    fn an_answer_over_its_bound_is_retried_and_charged_to_whoever_sent_it() {
        let over = |upstream: &'static str, limit: usize| {
            azure_core::Error::new(
                ErrorKind::Other,
                crate::outbound::OutboundError::AnswerTooLarge { upstream, limit },
            )
            .with_context("non-transport error occurred which will not be retried")
        };
        // Key Vault's: unavailable, retried, behind Key Vault's breaker.
        let e = classify(over(SERVICE, 1 << 20), "key k/v");
        assert!(
            matches!(&e, SignerError::Unavailable { message, throttled: false, .. }
                if message.starts_with("Key Vault's answer is larger than 1024 KiB")),
            "{e:?}"
        );
        assert!(e.is_retryable());
        // The broker's identity's (under the credential's error): its failure, not Key
        // Vault's, retried.
        let e = classify(
            azure_core::Error::with_error(
                ErrorKind::Credential,
                over("the managed identity endpoint", 64 << 10),
                "ManagedIdentityCredential authentication failed.",
            ),
            "key k/v",
        );
        assert!(
            matches!(&e, SignerError::Identity { message, .. }
                if message.starts_with("the managed identity endpoint's answer is larger than 64 KiB")),
            "{e:?}"
        );
        assert!(crate::flow::FlowError::Signer(e).is_retryable());
    }

    #[test]
    fn key_vaults_own_message_and_code_are_kept_within_bounds() {
        let body = format!(
            r#"{{"error":{{"code":"Forbidden","message":"Caller is not authorized. {}"}}}}"#,
            "y".repeat(10_000)
        );
        let e = classify(answer(403, Some("Forbidden"), &body), "key k/v");
        match &e {
            SignerError::Forbidden { code, message, .. } => {
                assert_eq!(code, "Forbidden");
                assert!(
                    message.starts_with("Caller is not authorized."),
                    "{message}"
                );
                // Key Vault's id of the request follows the bounded message.
                let id = " (x-ms-request-id 5e1b7c1a-0b8e-4c1e-9d7e-3f2a1b0c9d8e)";
                assert!(message.ends_with(id), "{message}");
                assert_eq!(message.chars().count(), MESSAGE_LIMIT + id.len());
            }
            other => panic!("{other:?}"),
        }
        // A code that is no word of Key Vault's (a proxy's header or body) is dropped.
        for odd in ["a b", "<html>", &"K".repeat(CODE_LIMIT + 1)] {
            let body = serde_json::json!({"error": {"code": odd, "message": "Not found.",
                "innererror": {"code": odd}}})
            .to_string();
            match classify(answer(404, Some(odd), &body), "key k/v") {
                SignerError::NotFound { code, .. } => assert_eq!(code, "", "{odd}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(other("z".repeat(5000)).to_string().len() < MESSAGE_LIMIT + 50);
        // The SDK's refusal of a vault named otherwise than by its own name.
        let e = azure_core::Error::with_message(
            ErrorKind::Other,
            "challenge resource 'https://vault.azure.net/.default' doesn't match the requested domain 'v.privatelink.vaultcore.azure.net'. Set verify_challenge_resource in client options to disable this validation if necessary.",
        );
        match classify(e, "certificate c") {
            SignerError::Configuration { code, message, .. } => {
                assert_eq!(code, "ChallengeResourceMismatch");
                assert!(
                    message
                        .contains("v.privatelink.vaultcore.azure.net is not under vault.azure.net"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        // The body's codes before the SDK's (the status, when it could not read a message
        // with escapes), the inner one first: it tells a 403's causes apart.
        let body = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized.\r\nCaller: appid=a","innererror":{"code":"ForbiddenByRbac"}}}"#;
        match classify(answer(403, Some("403"), body), "key k/v") {
            SignerError::Forbidden { code, .. } => assert_eq!(code, "ForbiddenByRbac"),
            other => panic!("{other:?}"),
        }
        let body = r#"{"error":{"code":"Forbidden","message":"Operation sign is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#;
        match classify(answer(403, Some("Forbidden"), body), "key k/v") {
            SignerError::NotFound { code, what, .. } => {
                assert_eq!(code, "KeyDisabled");
                assert_eq!(what, "an enabled version of key k/v");
            }
            other => panic!("{other:?}"),
        }
        // A version outside its validity: by its inner code, or (Key Vault's inner code for
        // a key's being undocumented) by its words when it has none; never a missing role.
        for (body, expected) in [
            (
                r#"{"error":{"code":"Forbidden","message":"Operation sign is not allowed on an expired key.","innererror":{"code":"KeyExpired"}}}"#,
                "KeyExpired",
            ),
            (
                r#"{"error":{"code":"Forbidden","message":"Operation sign is not allowed on a key that is not yet valid.","innererror":{"code":"KeyNotYetValid"}}}"#,
                "KeyNotYetValid",
            ),
            (
                r#"{"error":{"code":"Forbidden","message":"Operation sign is not allowed on an expired key."}}"#,
                "Forbidden",
            ),
            (
                r#"{"error":{"code":"Forbidden","message":"Operation sign is not allowed on a key that is expired or not yet valid."}}"#,
                "Forbidden",
            ),
        ] {
            match classify(answer(403, Some("Forbidden"), body), "key k/v") {
                SignerError::NotFound { code, what, .. } => {
                    assert_eq!(code, expected);
                    assert_eq!(what, "an enabled version of key k/v");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // A missing role's refusal that happens to mention expiry is still a missing role.
        let body = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized: the assignment expired.","innererror":{"code":"ForbiddenByRbac"}}}"#;
        assert!(matches!(
            classify(answer(403, Some("Forbidden"), body), "key k/v"),
            SignerError::Forbidden { .. }
        ));
    }

    #[test]
    fn key_vaults_other_refusals_are_the_configurations_and_not_retried() {
        let body = r#"{"error":{"code":"BadParameter","message":"Key and signing algorithm are incompatible."}}"#;
        for status in [400, 405, 409, 422] {
            let e = classify(answer(status, Some("BadParameter"), body), "key k/v");
            match &e {
                SignerError::Configuration { code, message, .. } => {
                    assert_eq!(code, "BadParameter");
                    assert!(message.contains("incompatible"), "{message}");
                }
                other => panic!("{status}: {other:?}"),
            }
            assert!(!e.is_retryable());
            assert!(crate::flow::FlowError::Signer(e).is_persistent());
        }
        // Throttling and outages are still retried.
        for status in [408, 429, 500, 503] {
            let e = classify(answer(status, Some("Throttled"), body), "key k/v");
            assert!(e.is_retryable(), "{status}: {e:?}");
        }
    }
}
